//! The admin HTTP port: `/metrics` (Prometheus text, encoded by `prometheus-client`) and
//! `/v1/status` (JSON health). Served by `tiny_http` on its own thread, off the shards: a scrape
//! reads the shards' once-a-second snapshots and never touches the data path.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use kafka_protocol::messages::ApiKey;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::{MetricsHub, COUNTERS, TIMINGS};

/// Histogram bucket bounds for request latency, in microseconds.
const LATENCY_BUCKETS_US: &[u64] = &[
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Series<M> {
    kind: MetricType,
    series: Vec<(Labels, M)>,
}

impl<M: EncodeMetric> EncodeMetric for Series<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, m) in &self.series {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }
    fn metric_type(&self) -> MetricType {
        self.kind
    }
}

#[derive(Debug)]
struct CounterValue(u64);

impl EncodeMetric for CounterValue {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, u64, u64>(&self.0, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

#[derive(Debug)]
struct GaugeValue(f64);

impl EncodeMetric for GaugeValue {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}

#[derive(Debug)]
struct HistogramValue {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for HistogramValue {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The request-latency histogram's buckets as prometheus-client takes them: each bound with the
/// count of its own bucket alone (the encoder sums them into Prometheus' cumulative `le`
/// series), the last bound +Inf, so that `le="+Inf"` equals the count.
fn bucket_counts(h: &hdrhistogram::Histogram<u64>) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(LATENCY_BUCKETS_US.len() + 1);
    let mut below = 0;
    for b in LATENCY_BUCKETS_US {
        let upto = h.count_between(0, *b).max(below);
        out.push((*b as f64, upto - below));
        below = upto;
    }
    out.push((f64::INFINITY, h.len().saturating_sub(below)));
    out
}

/// Adds an HDR histogram as a Prometheus histogram (the latency buckets) under `labels`, and its
/// p50, p99, p99.9 and max as gauges with a `quantile` label.
fn push_histogram(
    h: &hdrhistogram::Histogram<u64>,
    labels: &Labels,
    histograms: &mut Vec<(Labels, HistogramValue)>,
    quantiles: &mut Vec<(Labels, GaugeValue)>,
) {
    histograms.push((
        labels.clone(),
        HistogramValue {
            sum: h.mean() * h.len() as f64,
            count: h.len(),
            buckets: bucket_counts(h),
        },
    ));
    for (q, name) in [(0.5, "0.5"), (0.99, "0.99"), (0.999, "0.999"), (1.0, "1")] {
        let mut l = labels.clone();
        l.push(("quantile".to_string(), name.to_string()));
        quantiles.push((l, GaugeValue(h.value_at_quantile(q) as f64)));
    }
}

fn api_name(key: i16) -> String {
    if key == super::UNSUPPORTED_API_BUCKET {
        return "unsupported".to_string();
    }
    ApiKey::try_from(key).map_or_else(|_| key.to_string(), |k| format!("{k:?}"))
}

/// Encodes every shard's metrics as Prometheus text.
pub fn render(hub: &MetricsHub) -> Result<String> {
    let snapshots = hub.snapshots();
    let mut registry = Registry::default();
    let mut requests = Vec::new();
    let mut errors = Vec::new();
    let mut latency = Vec::new();
    let mut quantiles = Vec::new();
    for (shard, s) in snapshots.iter().enumerate() {
        for (key, stats) in &s.apis {
            let labels = vec![
                ("api".to_string(), api_name(*key)),
                ("shard".to_string(), shard.to_string()),
            ];
            requests.push((labels.clone(), CounterValue(stats.requests)));
            errors.push((labels.clone(), CounterValue(stats.errors)));
            push_histogram(&stats.latency_us, &labels, &mut latency, &mut quantiles);
        }
    }
    registry.register(
        "strom_requests",
        "Requests handled, per API and shard",
        Series {
            kind: MetricType::Counter,
            series: requests,
        },
    );
    registry.register(
        "strom_request_errors",
        "Requests that closed the connection, per API and shard",
        Series {
            kind: MetricType::Counter,
            series: errors,
        },
    );
    registry.register(
        "strom_request_latency_microseconds",
        "Request latency from decoded to response ready, per API and shard",
        Series {
            kind: MetricType::Histogram,
            series: latency,
        },
    );
    registry.register(
        "strom_request_latency_quantile_microseconds",
        "Request latency quantiles from the HDR histogram, per API and shard",
        Series {
            kind: MetricType::Gauge,
            series: quantiles,
        },
    );
    for (i, (_, name, help)) in COUNTERS.iter().enumerate() {
        let series = snapshots
            .iter()
            .enumerate()
            .map(|(shard, s)| {
                (
                    vec![("shard".to_string(), shard.to_string())],
                    CounterValue(s.counters[i]),
                )
            })
            .collect();
        registry.register(
            *name,
            *help,
            Series {
                kind: MetricType::Counter,
                series,
            },
        );
    }
    for (i, (_, name, help)) in TIMINGS.iter().enumerate() {
        let (mut histograms, mut quantiles) = (Vec::new(), Vec::new());
        for (shard, s) in snapshots.iter().enumerate() {
            if let Some(h) = s.timings.get(i) {
                let labels = vec![("shard".to_string(), shard.to_string())];
                push_histogram(h, &labels, &mut histograms, &mut quantiles);
            }
        }
        registry.register(
            *name,
            *help,
            Series {
                kind: MetricType::Histogram,
                series: histograms,
            },
        );
        let quantile_name = name.replace("_microseconds", "_quantile_microseconds");
        registry.register(
            quantile_name,
            format!("{help}: quantiles from the HDR histogram"),
            Series {
                kind: MetricType::Gauge,
                series: quantiles,
            },
        );
    }
    let partitions = snapshots
        .iter()
        .enumerate()
        .map(|(shard, s)| {
            (
                vec![("shard".to_string(), shard.to_string())],
                GaugeValue(s.partitions as f64),
            )
        })
        .collect();
    registry.register(
        "strom_partitions",
        "Partitions owned, per shard",
        Series {
            kind: MetricType::Gauge,
            series: partitions,
        },
    );
    register_raft(&mut registry, &snapshots);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .map_err(|e| anyhow!("encoding metrics: {e}"))?;
    Ok(out)
}

/// Per Raft group: term, commit index, leader; on the leader, in-sync replicas and follower lag.
fn register_raft(registry: &mut Registry, snapshots: &[crate::metrics::ShardSnapshot]) {
    let groups: Vec<&crate::metrics::RaftGauge> = snapshots.iter().flat_map(|s| &s.raft).collect();
    if groups.is_empty() {
        return;
    }
    let label = |g: &crate::metrics::RaftGauge| vec![("partition".to_string(), g.group.clone())];
    let gauge = |f: &dyn Fn(&crate::metrics::RaftGauge) -> f64| -> Vec<_> {
        groups
            .iter()
            .map(|g| (label(g), GaugeValue(f(g))))
            .collect()
    };
    for (name, help, series) in [
        (
            "strom_raft_term",
            "Raft term (the leader epoch)",
            gauge(&|g| g.term as f64),
        ),
        (
            "strom_raft_commit_index",
            "Raft commit index",
            gauge(&|g| g.commit_index as f64),
        ),
        (
            "strom_raft_leader",
            "Leader's node id (-1: none known)",
            gauge(&|g| f64::from(g.leader)),
        ),
    ] {
        registry.register(
            name,
            help,
            Series {
                kind: MetricType::Gauge,
                series,
            },
        );
    }
    let leading: Vec<_> = groups.iter().filter(|g| g.in_sync > 0).collect();
    let in_sync = leading
        .iter()
        .map(|g| (label(g), GaugeValue(g.in_sync as f64)))
        .collect();
    registry.register(
        "strom_raft_in_sync_replicas",
        "On the leader: replicas heard from within the election timeout, the leader included",
        Series {
            kind: MetricType::Gauge,
            series: in_sync,
        },
    );
    let lag = leading
        .iter()
        .flat_map(|g| {
            g.follower_lag.iter().map(|(follower, lag)| {
                let mut l = label(g);
                l.push(("follower".to_string(), follower.to_string()));
                (l, GaugeValue(*lag as f64))
            })
        })
        .collect();
    registry.register(
        "strom_raft_follower_lag_entries",
        "On the leader: Raft entries each follower is behind",
        Series {
            kind: MetricType::Gauge,
            series: lag,
        },
    );
}

fn status_json(hub: &MetricsHub) -> String {
    let status = hub.status.lock().map(|s| s.clone()).unwrap_or_default();
    serde_json::json!({
        "status": "ok",
        "node_id": status.node_id,
        "cluster_id": status.cluster_id,
        "shards": hub.shards(),
        "topics": status.topics,
        "uptime_ms": hub.started.elapsed().as_millis() as u64,
    })
    .to_string()
}

/// Binds the admin port and serves it on a thread of its own. Returns the bound address.
pub fn serve(addr: SocketAddr, hub: Arc<MetricsHub>) -> Result<SocketAddr> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| anyhow!("binding the admin port {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| anyhow!("the admin port has no IP address"))?;
    std::thread::Builder::new()
        .name("strom-admin".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let (code, body, content_type) = match request.url() {
                    "/metrics" => match render(&hub) {
                        Ok(text) => (200, text, "text/plain; version=0.0.4"),
                        Err(e) => (500, format!("{e:#}\n"), "text/plain"),
                    },
                    "/v1/status" => (200, status_json(&hub), "application/json"),
                    _ => (404, "not found\n".to_string(), "text/plain"),
                };
                let header =
                    tiny_http::Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes())
                        .expect("a valid header");
                let response = tiny_http::Response::from_string(body)
                    .with_status_code(code)
                    .with_header(header);
                if let Err(e) = request.respond(response) {
                    tracing::debug!(error = %e, "admin response failed");
                }
            }
        })?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bucket_holds_its_own_count_and_they_sum_to_the_total() {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for _ in 0..10 {
            h.record(40).unwrap();
        }
        for _ in 0..5 {
            h.record(300).unwrap();
        }
        h.record(10_000_000).unwrap();
        let b = bucket_counts(&h);
        assert_eq!(b.len(), LATENCY_BUCKETS_US.len() + 1);
        assert_eq!(b[0], (50.0, 10));
        assert_eq!(b[3], (500.0, 5));
        assert_eq!(*b.last().unwrap(), (f64::INFINITY, 1));
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), h.len());
    }
}
