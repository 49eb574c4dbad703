//! `strom bench`: a load generator in the spirit of the OpenMessaging Benchmark, on strom's own
//! Kafka client, pointed at any Kafka-compatible broker.
//!
//! A workload (TOML, see `benches/workloads/`) creates its topics, starts consumers at the end of
//! every partition, then producers at a fixed rate (or as fast as they can with `producer_rate =
//! 0`). Each record carries its intended send time; publish latency is acknowledgement time minus
//! intended send time, end-to-end latency is consume time minus intended send time. Measuring from
//! the intended (schedule) time rather than the actual write corrects for coordinated omission at
//! fixed rates: a stalled broker delays the schedule's records and shows up in the tail. Numbers
//! from the warm-up are discarded.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, TopicName,
};
use kafka_protocol::protocol::{Encodable, StrBytes};
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};
use serde::Deserialize;

use super::fetch_session::FetchSession;
use super::records::BatchWriter;
use super::Connection;

const PRODUCE_VERSION: i16 = 7;
const FETCH_VERSION: i16 = 11;
/// Latencies are recorded in microseconds up to an hour.
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A workload file. Field names follow the OpenMessaging Benchmark where one exists.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    pub topics: u32,
    pub partitions_per_topic: i32,
    pub message_size: usize,
    #[serde(default)]
    pub payload_random: bool,
    #[serde(default = "default_key_distribution")]
    pub key_distribution: String,
    pub producers_per_topic: u32,
    pub consumers_per_topic: u32,
    #[serde(default = "default_consumer_mode")]
    pub consumer_mode: String,
    /// Messages per second across all producers; 0 produces as fast as possible.
    pub producer_rate: u64,
    #[serde(default = "default_acks")]
    pub acks: String,
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// A partition's batch bytes at which its request goes (Kafka's `batch.size`, per partition).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_compression")]
    pub compression: String,
    #[serde(default)]
    pub warmup_s: u64,
    pub duration_s: u64,
}

fn default_key_distribution() -> String {
    "NO_KEY".into()
}
fn default_consumer_mode() -> String {
    "assign".into()
}
fn default_acks() -> String {
    "all".into()
}
fn default_linger_ms() -> u64 {
    1
}
fn default_batch_size() -> usize {
    128 * 1024
}
fn default_max_in_flight() -> usize {
    5
}
fn default_compression() -> String {
    "none".into()
}

impl Workload {
    pub fn load(path: &Path) -> Result<Workload> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading workload {}", path.display()))?;
        let w: Workload = toml::from_str(&text)
            .with_context(|| format!("parsing workload {}", path.display()))?;
        w.check()?;
        Ok(w)
    }

    fn check(&self) -> Result<()> {
        if self.message_size < 8 {
            bail!("message_size must be at least 8 bytes (the send timestamp)");
        }
        if self.topics == 0 || self.partitions_per_topic <= 0 || self.producers_per_topic == 0 {
            bail!("topics, partitions_per_topic and producers_per_topic must be positive");
        }
        if self.consumer_mode != "assign" {
            bail!(
                "consumer_mode '{}' is not supported; use \"assign\"",
                self.consumer_mode
            );
        }
        self.acks_value()?;
        self.compression_value()?;
        match self.key_distribution.as_str() {
            "NO_KEY" | "KEY_ROUND_ROBIN" | "RANDOM_NANO" => Ok(()),
            other => {
                bail!("key_distribution '{other}' is not NO_KEY, KEY_ROUND_ROBIN or RANDOM_NANO")
            }
        }
    }

    fn acks_value(&self) -> Result<i16> {
        match self.acks.as_str() {
            "all" | "-1" => Ok(-1),
            "1" => Ok(1),
            "0" => Ok(0),
            other => bail!("acks '{other}' is not all, 1 or 0"),
        }
    }

    fn compression_value(&self) -> Result<Compression> {
        Ok(match self.compression.as_str() {
            "none" => Compression::None,
            "gzip" => Compression::Gzip,
            "snappy" => Compression::Snappy,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd,
            other => bail!("compression '{other}' is not none, gzip, snappy, lz4 or zstd"),
        })
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// Numbers shared by every bench thread.
struct Stats {
    epoch: Instant,
    publish_us: Mutex<Histogram<u64>>,
    e2e_us: Mutex<Histogram<u64>>,
    produced: AtomicU64,
    produced_bytes: AtomicU64,
    consumed: AtomicU64,
    consumed_bytes: AtomicU64,
    errors: AtomicU64,
    stop_producing: AtomicBool,
    stop_consuming: AtomicBool,
    /// Records meant to be sent before this (the warm-up) are not counted.
    measure_from_ns: AtomicU64,
}

impl Stats {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Counts a request's records as published at `now_ns` (those meant after the warm-up).
    fn published(&self, flight: InFlight, now_ns: u64) {
        let from = self.measure_from_ns.load(Ordering::Relaxed);
        let per_record = flight.bytes / flight.records.max(1);
        let counted: Vec<u64> = flight
            .intended_ns
            .into_iter()
            .filter(|s| *s >= from)
            .collect();
        self.produced
            .fetch_add(counted.len() as u64, Ordering::Relaxed);
        self.produced_bytes
            .fetch_add(per_record * counted.len() as u64, Ordering::Relaxed);
        if let Ok(mut h) = self.publish_us.lock() {
            for sent in counted {
                h.saturating_record((now_ns.saturating_sub(sent) / 1000).max(1));
            }
        }
    }
}

/// Sends a framed request on a plain blocking stream.
fn write_request<R: Encodable>(
    stream: &mut TcpStream,
    key: ApiKey,
    version: i16,
    correlation: i32,
    req: &R,
) -> Result<()> {
    stream.write_all(&super::encode_request(key, version, correlation, req)?)?;
    Ok(())
}

struct Layout {
    /// topic -> partition -> leader address
    leaders: BTreeMap<String, BTreeMap<i32, String>>,
}

/// The controller's address (CreateTopics goes there, as Kafka's admin clients send it).
fn controller_address(conn: &mut Connection) -> Result<Option<String>> {
    let mut md_req = MetadataRequest::default();
    md_req.topics = Some(Vec::new());
    let md: MetadataResponse = conn.call(ApiKey::Metadata, 9, &md_req)?;
    Ok(md
        .brokers
        .iter()
        .find(|b| b.node_id == md.controller_id)
        .map(|b| format!("{}:{}", b.host, b.port)))
}

fn create_topics(bootstrap: &str, w: &Workload, names: &[String]) -> Result<Layout> {
    let mut conn = Connection::connect(bootstrap)?;
    let mut admin = match controller_address(&mut conn)? {
        Some(address) => Connection::connect(&address)?,
        None => Connection::connect(bootstrap)?,
    };
    let mut req = CreateTopicsRequest::default();
    req.timeout_ms = 30_000;
    req.topics = names
        .iter()
        .map(|n| {
            let mut t = CreatableTopic::default();
            t.name = TopicName(StrBytes::from_string(n.clone()));
            t.num_partitions = w.partitions_per_topic;
            t.replication_factor = -1;
            t
        })
        .collect();
    let resp: CreateTopicsResponse = admin.call(ApiKey::CreateTopics, 4, &req)?;
    for t in resp.topics {
        if t.error_code != 0 {
            bail!(
                "creating topic {} failed with error {}",
                t.name.0,
                t.error_code
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut md_req = MetadataRequest::default();
        md_req.topics = Some(
            names
                .iter()
                .map(|n| {
                    let mut t = MetadataRequestTopic::default();
                    t.name = Some(TopicName(StrBytes::from_string(n.clone())));
                    t
                })
                .collect(),
        );
        let md: MetadataResponse = conn.call(ApiKey::Metadata, 9, &md_req)?;
        let brokers: HashMap<i32, String> = md
            .brokers
            .iter()
            .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
            .collect();
        let mut leaders = BTreeMap::new();
        let mut complete = true;
        for t in &md.topics {
            let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
            let mut parts = BTreeMap::new();
            for p in &t.partitions {
                match brokers.get(&p.leader_id.0) {
                    Some(addr) if p.error_code == 0 => {
                        parts.insert(p.partition_index, addr.clone());
                    }
                    _ => complete = false,
                }
            }
            if parts.len() != usize::try_from(w.partitions_per_topic).unwrap_or(0) {
                complete = false;
            }
            leaders.insert(name, parts);
        }
        if complete && leaders.len() == names.len() {
            return Ok(Layout { leaders });
        }
        if Instant::now() > deadline {
            bail!("topics did not get leaders within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn delete_topics(bootstrap: &str, names: &[String]) -> Result<()> {
    let mut conn = Connection::connect(bootstrap)?;
    let mut req = DeleteTopicsRequest::default();
    req.timeout_ms = 30_000;
    req.topic_names = names
        .iter()
        .map(|n| TopicName(StrBytes::from_string(n.clone())))
        .collect();
    let _: DeleteTopicsResponse = conn.call(ApiKey::DeleteTopics, 4, &req)?;
    Ok(())
}

fn end_offsets(address: &str, topic: &str, partitions: &[i32]) -> Result<BTreeMap<i32, i64>> {
    let mut conn = Connection::connect(address)?;
    let mut req = ListOffsetsRequest::default();
    req.replica_id = BrokerId(-1);
    let mut t = ListOffsetsTopic::default();
    t.name = TopicName(StrBytes::from_string(topic.to_string()));
    t.partitions = partitions
        .iter()
        .map(|p| {
            let mut lp = ListOffsetsPartition::default();
            lp.partition_index = *p;
            lp.timestamp = -1;
            lp
        })
        .collect();
    req.topics = vec![t];
    let resp: ListOffsetsResponse = conn.call(ApiKey::ListOffsets, 5, &req)?;
    let mut out = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            out.insert(p.partition_index, p.offset.max(0));
        }
    }
    Ok(out)
}

/// One consumer: fetches its partitions (all on one leader) from their end at start, in an
/// incremental fetch session.
fn consume(address: String, topic: String, partitions: Vec<i32>, stats: Arc<Stats>) -> Result<()> {
    let mut offsets = end_offsets(&address, &topic, &partitions)?;
    let mut stream = TcpStream::connect(&address)?;
    stream.set_nodelay(true)?;
    let mut correlation = 0;
    let mut session = FetchSession::default();
    while !stats.stop_consuming.load(Ordering::Relaxed) {
        let mut req = FetchRequest::default();
        req.replica_id = BrokerId(-1);
        req.max_wait_ms = 100;
        req.min_bytes = 1;
        req.max_bytes = 64 << 20;
        let mut ft = FetchTopic::default();
        ft.topic = TopicName(StrBytes::from_string(topic.clone()));
        ft.partitions = session
            .next(&mut req, &offsets)
            .into_iter()
            .map(|(p, o)| {
                let mut fp = FetchPartition::default();
                fp.partition = p;
                fp.fetch_offset = o;
                fp.partition_max_bytes = 4 << 20;
                fp
            })
            .collect();
        if !ft.partitions.is_empty() {
            req.topics = vec![ft];
        }
        correlation += 1;
        write_request(&mut stream, ApiKey::Fetch, FETCH_VERSION, correlation, &req)?;
        let (_, resp): (i32, FetchResponse) =
            super::read_response(&mut stream, ApiKey::Fetch, FETCH_VERSION)?;
        // A lost session is opened anew by the next request; any other error counts.
        let lost = session.answered(&resp);
        if resp.error_code != 0 {
            if !lost {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        let now = stats.now_ns();
        let mut latencies = Vec::new();
        for t in resp.responses {
            for p in t.partitions {
                if p.error_code != 0 {
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let Some(records) = p.records else {
                    continue;
                };
                if records.is_empty() {
                    continue;
                }
                let start = offsets.get(&p.partition_index).copied().unwrap_or(0);
                let measure_from = stats.measure_from_ns.load(Ordering::Relaxed);
                let mut bytes = 0u64;
                // The bounded reader of `strom consume`: values are slices of the response.
                let next = super::records::for_each(&records, start, |r| {
                    let Some(value) = r.value else { return true };
                    let Some(head) = value.get(..8) else {
                        return true;
                    };
                    let sent = u64::from_be_bytes(head.try_into().unwrap_or_default());
                    if sent >= measure_from {
                        latencies.push(now.saturating_sub(sent) / 1000);
                        bytes += value.len() as u64;
                    }
                    true
                })?;
                offsets.insert(p.partition_index, next);
                stats.consumed_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
        }
        if !latencies.is_empty() {
            stats
                .consumed
                .fetch_add(latencies.len() as u64, Ordering::Relaxed);
            if let Ok(mut h) = stats.e2e_us.lock() {
                for l in latencies {
                    h.saturating_record(l.max(1));
                }
            }
        }
    }
    Ok(())
}

/// Metadata of one in-flight produce request: when each of its records was meant to be sent.
struct InFlight {
    intended_ns: Vec<u64>,
    records: u64,
    bytes: u64,
}

struct ProducerSetup {
    address: String,
    topic: String,
    partitions: Vec<i32>,
    rate_per_s: f64,
    key_seed: u64,
    /// The cores the bench runs on and this producer's turn among its threads (its thread and
    /// its reader's are pinned to the same core).
    cores: Arc<Vec<usize>>,
    turn: usize,
}

fn produce(w: Workload, setup: ProducerSetup, stats: Arc<Stats>) -> Result<()> {
    pin(&setup.cores, setup.turn);
    let acks = w.acks_value()?;
    let compression = w.compression_value()?;
    let stream = TcpStream::connect(&setup.address)?;
    stream.set_nodelay(true)?;
    let (tx, rx) = mpsc::sync_channel::<InFlight>(w.max_in_flight.max(1));
    // Requests sent and not yet answered. While max_in_flight are out, the producer keeps
    // accumulating (as Kafka's producers do), so a slow acknowledgement makes larger batches
    // instead of a stalled producer.
    let in_flight = Arc::new(AtomicU64::new(0));
    let reader = if acks != 0 {
        let mut read_stream = stream.try_clone()?;
        let stats = stats.clone();
        let in_flight = in_flight.clone();
        let (cores, turn) = (setup.cores.clone(), setup.turn);
        Some(std::thread::spawn(move || -> Result<()> {
            pin(&cores, turn);
            while let Ok(flight) = rx.recv() {
                let (_, resp): (i32, ProduceResponse) =
                    super::read_response(&mut read_stream, ApiKey::Produce, PRODUCE_VERSION)?;
                let now = stats.now_ns();
                let failed = resp
                    .responses
                    .iter()
                    .flat_map(|t| t.partition_responses.iter())
                    .filter(|p| p.error_code != 0)
                    .count();
                stats.errors.fetch_add(failed as u64, Ordering::Relaxed);
                stats.published(flight, now);
                in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(())
        }))
    } else {
        drop(rx);
        None
    };
    // Requests go to the socket from their own thread, so that the producer encodes the next
    // one while the last is written (one connection producing alone against the same broker:
    // 568 MB/s with one thread doing both, 815 MB/s with this one).
    // The written requests come back, for their batches' buffers to be used again: fresh
    // ones of 128 KiB and more are new mappings, and zeroing their pages took a fifth of the
    // producer's CPU.
    let (sent_back, spent) = mpsc::channel::<Vec<Bytes>>();
    let (writes, writer) = if acks != 0 {
        let mut write_stream = stream.try_clone()?;
        let (writes, requests) = mpsc::sync_channel::<Vec<Bytes>>(w.max_in_flight.max(1));
        let (cores, turn) = (setup.cores.clone(), setup.turn);
        let writer = std::thread::spawn(move || -> Result<()> {
            pin(&cores, turn);
            while let Ok(chunks) = requests.recv() {
                for c in &chunks {
                    write_stream.write_all(c)?;
                }
                let _ = sent_back.send(chunks);
            }
            Ok(())
        });
        (Some(writes), Some(writer))
    } else {
        (None, None)
    };

    let mut payload_source = vec![0u8; w.message_size + 4096];
    let mut seed = setup.key_seed | 1;
    if w.payload_random {
        for b in payload_source.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
    }
    let interval_ns = if setup.rate_per_s > 0.0 {
        (1e9 / setup.rate_per_s) as u64
    } else {
        0
    };
    let linger = Duration::from_millis(w.linger_ms);
    let linger_ns = u64::try_from(linger.as_nanos()).unwrap_or(u64::MAX);
    let max_in_flight = w.max_in_flight.max(1) as u64;
    let start_ns = stats.now_ns();
    // Record timestamps from the same clock reading as the latency stamps (one per record).
    let wall_ms_at_epoch = crate::storage::partition::now_ms().saturating_sub(start_ns / 1_000_000);
    let mut sent: u64 = 0;
    let mut next_partition = 0usize;
    let mut out = Outbox {
        stream,
        writes,
        tx,
        stats: stats.clone(),
        topic: setup.topic.clone(),
        acks,
        options: RecordEncodeOptions {
            version: 2,
            compression,
        },
        in_flight: in_flight.clone(),
        pending: BTreeMap::new(),
        pending_ns: Vec::new(),
        pending_bytes: 0,
        fullest: 0,
        first_pending_ns: 0,
        wall_ms_at_epoch,
        spent,
        spare: Vec::new(),
        correlation: 0,
    };
    let slot_free =
        |in_flight: &AtomicU64| acks == 0 || in_flight.load(Ordering::Relaxed) < max_in_flight;
    while !stats.stop_producing.load(Ordering::Relaxed) {
        let intended = start_ns + sent * interval_ns;
        if interval_ns > 0 {
            let now = stats.now_ns();
            if intended > now {
                // Flush what lingered before sleeping until the next record is due.
                if !out.pending_ns.is_empty()
                    && now.saturating_sub(out.first_pending_ns) >= linger_ns
                    && slot_free(&in_flight)
                {
                    out.flush()?;
                }
                // Never a busy wait (it took half a core from the broker at 50,000 msg/s): a
                // record due sooner than the shortest sleep goes out with the ones due by then,
                // each stamped with its own intended time, so the latency figures count the wait.
                let wait = Duration::from_nanos(intended - now);
                std::thread::sleep(wait.clamp(SLEEP_MIN, linger.max(SLEEP_MIN * 2)));
                continue;
            }
        }
        let partition = setup.partitions[next_partition % setup.partitions.len()];
        next_partition += 1;
        let now = stats.now_ns();
        let intended = if interval_ns > 0 { intended } else { now };
        let offset = (sent as usize * 31) % 4096;
        let key = match w.key_distribution.as_str() {
            "KEY_ROUND_ROBIN" => Some((sent % 10_000).to_string()),
            "RANDOM_NANO" => Some(stats.now_ns().to_string()),
            _ => None,
        };
        // The value: the intended send time (for the consumer's end-to-end latency), then payload.
        out.add(
            partition,
            intended,
            now,
            key.as_deref().map(str::as_bytes),
            &[
                &intended.to_be_bytes(),
                &payload_source[offset + 8..offset + w.message_size],
            ],
        );
        sent += 1;
        // batch_size is per partition, as Kafka's batch.size: a request goes once one
        // partition's batch is full (taking every other partition's along) or the first record
        // has lingered long enough.
        let due =
            out.fullest >= w.batch_size || now.saturating_sub(out.first_pending_ns) >= linger_ns;
        let full = out.pending_bytes >= w.batch_size * setup.partitions.len();
        if (due && slot_free(&in_flight)) || full {
            out.flush()?;
        }
    }
    if !out.pending_ns.is_empty() {
        out.flush()?;
    }
    drop(out);
    if let Some(w) = writer {
        w.join()
            .map_err(|_| anyhow::anyhow!("producer writer panicked"))??;
    }
    if let Some(r) = reader {
        r.join()
            .map_err(|_| anyhow::anyhow!("producer reader panicked"))??;
    }
    Ok(())
}

/// Keeps the batch buffers of written requests (`spent`) that nothing else holds any more.
fn take_back_spent(spent: &mpsc::Receiver<Vec<Bytes>>, spare: &mut Vec<BytesMut>) {
    while let Ok(chunks) = spent.try_recv() {
        for chunk in chunks {
            if chunk.len() < SPARE_BYTES_MIN || spare.len() >= SPARE_BUFFERS_MAX {
                continue;
            }
            if let Ok(buf) = chunk.try_into_mut() {
                spare.push(buf);
            }
        }
    }
}

/// Batch buffers a producer keeps for reuse.
const SPARE_BUFFERS_MAX: usize = 64;

/// The smallest written batch whose buffer is kept for reuse (smaller ones were copied into
/// their request, not written by reference).
const SPARE_BYTES_MIN: usize = crate::protocol::chunked::SHARED_MIN_BYTES;

/// A new batch's buffer, when no spare one is at hand (it grows as records come).
const BATCH_BYTES_FIRST: usize = 64 * 1024;

/// The shortest sleep of a fixed-rate producer between records that are not due yet.
const SLEEP_MIN: Duration = Duration::from_micros(100);

/// A producer's connection and the records waiting for its next request.
struct Outbox {
    stream: TcpStream,
    /// To the thread that writes requests (`None` with acks=0, which writes them here).
    writes: Option<mpsc::SyncSender<Vec<Bytes>>>,
    tx: mpsc::SyncSender<InFlight>,
    stats: Arc<Stats>,
    topic: String,
    acks: i16,
    options: RecordEncodeOptions,
    in_flight: Arc<AtomicU64>,
    /// Each partition's batch and the value bytes in it.
    pending: BTreeMap<i32, (Pending, usize)>,
    pending_ns: Vec<u64>,
    pending_bytes: usize,
    /// The most value bytes any partition has pending.
    fullest: usize,
    /// When the oldest pending record was added (`Stats::now_ns`).
    first_pending_ns: u64,
    /// The wall clock (ms) at `Stats::now_ns` 0, for record timestamps.
    wall_ms_at_epoch: u64,
    /// Requests the writer thread has written, whose batch buffers may be used again.
    spent: mpsc::Receiver<Vec<Bytes>>,
    spare: Vec<BytesMut>,
    correlation: i32,
}

/// A partition's records waiting to be sent: written straight into their batch when it goes
/// uncompressed (the common case), else kept for kafka-protocol's encoder to compress.
enum Pending {
    Direct(BatchWriter),
    Records(Vec<Record>),
}

impl Outbox {
    /// Adds one record whose value is `value` (its parts one after another), at `now_ns`.
    fn add(
        &mut self,
        partition: i32,
        intended_ns: u64,
        now_ns: u64,
        key: Option<&[u8]>,
        value: &[&[u8]],
    ) {
        if self.pending_ns.is_empty() {
            self.first_pending_ns = now_ns;
        }
        let value_len: usize = value.iter().map(|p| p.len()).sum();
        self.pending_bytes += value_len;
        let now_ms = (self.wall_ms_at_epoch + now_ns / 1_000_000) as i64;
        let direct = self.options.compression == Compression::None;
        let (batch, bytes) = match self.pending.entry(partition) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let batch = if direct {
                    if self.spare.is_empty() {
                        take_back_spent(&self.spent, &mut self.spare);
                    }
                    Pending::Direct(match self.spare.pop() {
                        Some(buf) => BatchWriter::in_buffer(buf),
                        None => BatchWriter::new(BATCH_BYTES_FIRST),
                    })
                } else {
                    Pending::Records(Vec::new())
                };
                v.insert((batch, 0))
            }
        };
        *bytes += value_len;
        self.fullest = self.fullest.max(*bytes);
        match batch {
            Pending::Direct(w) => w.push_parts(now_ms, key, value),
            Pending::Records(records) => {
                let index = records.len() as i64;
                records.push(crate::storage::records::plain_record(
                    index,
                    now_ms,
                    key.map(Bytes::copy_from_slice),
                    Some(Bytes::from(value.concat())),
                ));
            }
        }
        self.pending_ns.push(intended_ns);
    }

    /// Sends everything pending as one ProduceRequest (one batch per partition).
    fn flush(&mut self) -> Result<()> {
        self.fullest = 0;
        let mut td = TopicProduceData::default();
        td.name = TopicName(StrBytes::from_string(self.topic.clone()));
        for (partition, (pending, _)) in std::mem::take(&mut self.pending) {
            let records = match pending {
                Pending::Direct(w) => w.finish(),
                Pending::Records(records) => {
                    let mut buf = BytesMut::new();
                    RecordBatchEncoder::encode(&mut buf, &records, &self.options)?;
                    buf.freeze()
                }
            };
            let mut pd = PartitionProduceData::default();
            pd.index = partition;
            pd.records = Some(records);
            td.partition_data.push(pd);
        }
        let mut req = ProduceRequest::default();
        req.acks = self.acks;
        req.timeout_ms = 30_000;
        req.topic_data = vec![td];
        let flight = InFlight {
            records: self.pending_ns.len() as u64,
            intended_ns: std::mem::take(&mut self.pending_ns),
            bytes: std::mem::take(&mut self.pending_bytes) as u64,
        };
        self.correlation += 1;
        if self.acks == 0 {
            // No answers come: a record counts as published once written to the socket.
            write_request(
                &mut self.stream,
                ApiKey::Produce,
                PRODUCE_VERSION,
                self.correlation,
                &req,
            )?;
            self.stats.published(flight, self.stats.now_ns());
            return Ok(());
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        // Blocks while max_in_flight requests wait for their answers.
        self.tx
            .send(flight)
            .map_err(|_| anyhow::anyhow!("the producer's reader stopped"))?;
        // The batches go to the socket as they are, not copied into the request's buffer.
        let payloads = req.topic_data[0]
            .partition_data
            .iter()
            .filter_map(|p| p.records.as_ref());
        let chunks = super::encode_request_chunks(
            ApiKey::Produce,
            PRODUCE_VERSION,
            self.correlation,
            &req,
            payloads,
        )?;
        match &self.writes {
            Some(writes) => writes
                .send(chunks)
                .map_err(|_| anyhow::anyhow!("the producer's writer stopped"))?,
            None => {
                for c in &chunks {
                    self.stream.write_all(c)?;
                }
            }
        }
        Ok(())
    }
}

/// Percentiles of a latency histogram in milliseconds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p75: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50: ms(0.5),
            p75: ms(0.75),
            p95: ms(0.95),
            p99: ms(0.99),
            p999: ms(0.999),
            p9999: ms(0.9999),
            max: h.max() as f64 / 1000.0,
        }
    }
}

/// A latency histogram's percentile curve: (quantile, milliseconds) points, for `--plot`.
pub type Curve = Vec<(f64, f64)>;

fn curve(h: &Histogram<u64>) -> Curve {
    if h.is_empty() {
        return Vec::new();
    }
    h.iter_quantiles(4)
        .map(|v| {
            (
                v.quantile_iterated_to(),
                v.value_iterated_to() as f64 / 1000.0,
            )
        })
        .collect()
}

/// How one run is carried out, besides its workload.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Overrides the workload's `duration_s`.
    pub duration_s: Option<u64>,
    /// Writes `<prefix>.publish.hgrm` and `<prefix>.e2e.hgrm`.
    pub hgrm_prefix: Option<std::path::PathBuf>,
    /// Pins the bench's threads to these cores, round robin (away from the broker's).
    pub cores: Vec<usize>,
}

/// Pins the calling thread to the `n`th of `cores` (round robin); no cores: not pinned.
fn pin(cores: &[usize], n: usize) {
    if let Some(&id) = cores.get(n % cores.len().max(1)) {
        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
            eprintln!("strom bench: pinning a thread to core {id} failed");
        }
    }
}

/// What a run measured, as `--json` writes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub workload: String,
    pub duration_s: f64,
    pub produce_msgs_per_s: f64,
    pub produce_mb_per_s: f64,
    pub consume_msgs_per_s: f64,
    pub consume_mb_per_s: f64,
    pub produced: u64,
    pub consumed: u64,
    pub errors: u64,
    pub publish_latency_ms: Percentiles,
    pub e2e_latency_ms: Percentiles,
    #[serde(skip)]
    pub publish_curve: Curve,
    #[serde(skip)]
    pub e2e_curve: Curve,
}

/// Writes a histogram as an HdrHistogram percentile distribution (`.hgrm`), in milliseconds.
fn write_hgrm(path: &Path, h: &Histogram<u64>) -> Result<()> {
    let mut out = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in h.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            1.0 / (1.0 - q)
        } else {
            f64::INFINITY
        };
        out.push_str(&format!(
            "{:12.3} {:14.12} {:10} {:14.2}\n",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inverse
        ));
    }
    out.push_str(&format!(
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        h.max() as f64 / 1000.0,
        h.len()
    ));
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Runs a workload and returns what it measured. Prints a progress line every second.
pub fn run(bootstrap: &str, mut w: Workload, opts: &RunOptions) -> Result<BenchResult> {
    if let Some(d) = opts.duration_s {
        w.duration_s = d;
    }
    let cores = Arc::new(opts.cores.clone());
    let mut threads = 0usize;
    let run_id = format!("{:x}", crate::storage::partition::now_ms());
    let names: Vec<String> = (0..w.topics)
        .map(|i| format!("bench-{}-{run_id}-{i}", w.name))
        .collect();
    let layout = create_topics(bootstrap, &w, &names)?;
    let stats = Arc::new(Stats {
        epoch: Instant::now(),
        publish_us: Mutex::new(histogram()),
        e2e_us: Mutex::new(histogram()),
        produced: AtomicU64::new(0),
        produced_bytes: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        consumed_bytes: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop_producing: AtomicBool::new(false),
        stop_consuming: AtomicBool::new(false),
        measure_from_ns: AtomicU64::new(0),
    });

    let mut consumers = Vec::new();
    for (topic, parts) in &layout.leaders {
        for c in 0..w.consumers_per_topic {
            let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for (p, leader) in parts {
                if (*p as u32) % w.consumers_per_topic == c {
                    by_leader.entry(leader.clone()).or_default().push(*p);
                }
            }
            for (leader, ps) in by_leader {
                let (topic, stats, cores) = (topic.clone(), stats.clone(), cores.clone());
                threads += 1;
                let n = threads;
                consumers.push(std::thread::spawn(move || {
                    pin(&cores, n);
                    consume(leader, topic, ps, stats)
                }));
            }
        }
    }
    // Consumers read the end offsets before the first record is produced.
    std::thread::sleep(Duration::from_millis(500));

    let producer_count = w.topics * w.producers_per_topic;
    let rate_each = w.producer_rate as f64 / f64::from(producer_count);
    let mut producers = Vec::new();
    for (topic, parts) in &layout.leaders {
        for i in 0..w.producers_per_topic {
            let mut by_leader: BTreeMap<String, Vec<i32>> = BTreeMap::new();
            for (p, leader) in parts {
                by_leader.entry(leader.clone()).or_default().push(*p);
            }
            let share = rate_each / by_leader.len() as f64;
            for (leader, ps) in by_leader {
                threads += 1;
                let setup = ProducerSetup {
                    address: leader,
                    topic: topic.clone(),
                    partitions: ps,
                    rate_per_s: share,
                    key_seed: u64::from(i) * 7919 + 1,
                    cores: cores.clone(),
                    turn: threads,
                };
                let (w, stats) = (w.clone(), stats.clone());
                producers.push(std::thread::spawn(move || produce(w, setup, stats)));
            }
        }
    }

    let reset = |stats: &Stats| {
        stats
            .measure_from_ns
            .store(stats.now_ns(), Ordering::Relaxed);
        *stats.publish_us.lock().expect("histogram lock") = histogram();
        *stats.e2e_us.lock().expect("histogram lock") = histogram();
        for c in [
            &stats.produced,
            &stats.produced_bytes,
            &stats.consumed,
            &stats.consumed_bytes,
            &stats.errors,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    };
    let total = w.warmup_s + w.duration_s;
    let mut measured_from = Instant::now();
    let mut last = (0u64, 0u64);
    for second in 1..=total {
        std::thread::sleep(Duration::from_secs(1));
        if second == w.warmup_s {
            reset(&stats);
            measured_from = Instant::now();
            last = (0, 0);
            println!(
                "[{second:>4}s] warm-up done, measuring for {} s",
                w.duration_s
            );
            continue;
        }
        let produced = stats.produced.load(Ordering::Relaxed);
        let consumed = stats.consumed.load(Ordering::Relaxed);
        let p99 = stats
            .publish_us
            .lock()
            .map(|h| h.value_at_quantile(0.99))
            .unwrap_or(0) as f64
            / 1000.0;
        let e2e99 = stats
            .e2e_us
            .lock()
            .map(|h| h.value_at_quantile(0.99))
            .unwrap_or(0) as f64
            / 1000.0;
        println!(
            "[{second:>4}s] produce {:>9} msg/s | consume {:>9} msg/s | publish p99 {p99:>8.2} ms | e2e p99 {e2e99:>8.2} ms | errors {}",
            produced - last.0,
            consumed - last.1,
            stats.errors.load(Ordering::Relaxed)
        );
        last = (produced, consumed);
    }
    stats.stop_producing.store(true, Ordering::Relaxed);
    let measured = measured_from.elapsed().as_secs_f64();
    for p in producers {
        p.join()
            .map_err(|_| anyhow::anyhow!("a producer panicked"))??;
    }
    let drain_deadline = Instant::now() + Duration::from_secs(10);
    while stats.consumed.load(Ordering::Relaxed) < stats.produced.load(Ordering::Relaxed)
        && Instant::now() < drain_deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    stats.stop_consuming.store(true, Ordering::Relaxed);
    for c in consumers {
        c.join()
            .map_err(|_| anyhow::anyhow!("a consumer panicked"))??;
    }
    let publish = stats.publish_us.lock().expect("histogram lock").clone();
    let e2e = stats.e2e_us.lock().expect("histogram lock").clone();
    if let Some(prefix) = &opts.hgrm_prefix {
        write_hgrm(&prefix.with_extension("publish.hgrm"), &publish)?;
        write_hgrm(&prefix.with_extension("e2e.hgrm"), &e2e)?;
    }
    let produced = stats.produced.load(Ordering::Relaxed);
    let consumed = stats.consumed.load(Ordering::Relaxed);
    let result = BenchResult {
        workload: w.name.clone(),
        duration_s: measured,
        produce_msgs_per_s: produced as f64 / measured,
        produce_mb_per_s: stats.produced_bytes.load(Ordering::Relaxed) as f64 / measured / 1e6,
        consume_msgs_per_s: consumed as f64 / measured,
        consume_mb_per_s: stats.consumed_bytes.load(Ordering::Relaxed) as f64 / measured / 1e6,
        produced,
        consumed,
        errors: stats.errors.load(Ordering::Relaxed),
        publish_latency_ms: Percentiles::of(&publish),
        e2e_latency_ms: Percentiles::of(&e2e),
        publish_curve: curve(&publish),
        e2e_curve: curve(&e2e),
    };
    if let Err(e) = delete_topics(bootstrap, &names) {
        eprintln!("strom bench: deleting the bench topics failed: {e:#}");
    }
    Ok(result)
}

/// The end-of-run table.
pub fn table(r: &BenchResult) -> String {
    let row = |name: &str, p: &Percentiles| {
        format!(
            "{name:<16} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}\n",
            p.p50, p.p75, p.p95, p.p99, p.p999, p.p9999, p.max
        )
    };
    let mut out = format!(
        "workload {} over {:.1} s\nproduce {:>12.0} msg/s {:>9.2} MB/s\nconsume {:>12.0} msg/s {:>9.2} MB/s\nerrors  {:>12}\n\n",
        r.workload, r.duration_s, r.produce_msgs_per_s, r.produce_mb_per_s, r.consume_msgs_per_s, r.consume_mb_per_s, r.errors
    );
    out.push_str(&format!(
        "{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
        "latency (ms)", "p50", "p75", "p95", "p99", "p99.9", "p99.99", "max"
    ));
    out.push_str(&row("publish", &r.publish_latency_ms));
    out.push_str(&row("end-to-end", &r.e2e_latency_ms));
    out
}
