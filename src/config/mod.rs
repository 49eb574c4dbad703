//! Broker configuration: Kafka's own setting names (so an operator's knowledge carries over), their
//! defaults, validation, and the core mapping that decides how many shards run and where.
//!
//! Settings come from an optional TOML file (`strom.toml`, flat `"log.retention.hours" = 168` or
//! nested `[log.retention] hours = 168`) and then from `--set name=value`, later ones winning. A
//! name strom does not know is refused at start: a typo must not silently fall back to a default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Every broker-wide setting strom understands, with its value in force.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// `node.id`: this broker's id in Metadata.
    pub node_id: i32,
    /// `num.partitions`: partitions of an auto-created topic, and of CreateTopics with -1.
    pub num_partitions: i32,
    /// `auto.create.topics.enable`: Metadata for an unknown topic creates it.
    pub auto_create_topics: bool,
    /// `default.replication.factor`.
    pub default_replication_factor: i16,
    /// `socket.request.max.bytes`: the largest request frame accepted; checked before allocating.
    pub request_size_bytes_max: usize,
    /// `message.max.bytes`: the largest record batch accepted by produce.
    pub batch_size_bytes_max: usize,
    /// `log.segment.bytes`: a segment rolls once it holds this many bytes.
    pub segment_size_bytes: u64,
    /// `log.roll.ms` / `log.roll.hours`: a segment rolls once it is this old.
    pub segment_age_ms: u64,
    /// `log.index.interval.bytes`: bytes between two sparse index entries.
    pub index_interval_bytes: u64,
    /// `log.retention.ms` / `.minutes` / `.hours` (default 168 hours); -1 keeps forever.
    pub retention_ms: i64,
    /// `log.retention.bytes`; -1 means no size bound.
    pub retention_bytes: i64,
    /// `advertised.listeners`: the address clients are told to connect to.
    pub advertised_listener: Option<(String, u16)>,
    /// `queued.max.requests`: requests in flight per connection before reading pauses.
    pub inflight_requests_max: usize,
    /// `strom.cache.bytes.per.shard`: recent batches kept in memory per shard for fetches.
    pub cache_size_bytes_per_shard: usize,
    /// `offsets.topic.num.partitions`: partitions of `__consumer_offsets`, fixed once created.
    pub offsets_topic_partitions: i32,
    /// `group.initial.rebalance.delay.ms`: how long a new group waits for more members.
    pub group_initial_rebalance_delay_ms: u64,
    /// `group.min.session.timeout.ms` / `group.max.session.timeout.ms`.
    pub group_session_timeout_ms_min: u64,
    pub group_session_timeout_ms_max: u64,
    /// `offsets.retention.minutes` (as ms): committed offsets of an empty group expire after this.
    pub offsets_retention_ms: u64,
    /// `offsets.retention.check.interval.ms`.
    pub offsets_retention_check_interval_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            node_id: 0,
            num_partitions: 1,
            auto_create_topics: true,
            default_replication_factor: 1,
            request_size_bytes_max: 100 * 1024 * 1024,
            batch_size_bytes_max: 1_048_588,
            segment_size_bytes: 1024 * 1024 * 1024,
            segment_age_ms: 168 * 3_600_000,
            index_interval_bytes: 4096,
            retention_ms: 168 * 3_600_000,
            retention_bytes: -1,
            advertised_listener: None,
            inflight_requests_max: 500,
            cache_size_bytes_per_shard: 64 * 1024 * 1024,
            offsets_topic_partitions: 50,
            group_initial_rebalance_delay_ms: 3000,
            group_session_timeout_ms_min: 6000,
            group_session_timeout_ms_max: 1_800_000,
            offsets_retention_ms: 10080 * 60_000,
            offsets_retention_check_interval_ms: 600_000,
        }
    }
}

/// The broker settings strom knows, for `--help`, the README and error messages.
pub const KNOWN_SETTINGS: &[&str] = &[
    "node.id",
    "broker.id",
    "num.partitions",
    "auto.create.topics.enable",
    "default.replication.factor",
    "socket.request.max.bytes",
    "message.max.bytes",
    "log.segment.bytes",
    "log.roll.ms",
    "log.roll.hours",
    "log.index.interval.bytes",
    "log.retention.ms",
    "log.retention.minutes",
    "log.retention.hours",
    "log.retention.bytes",
    "advertised.listeners",
    "queued.max.requests",
    "strom.cache.bytes.per.shard",
    "offsets.topic.num.partitions",
    "group.initial.rebalance.delay.ms",
    "group.min.session.timeout.ms",
    "group.max.session.timeout.ms",
    "offsets.retention.minutes",
    "offsets.retention.check.interval.ms",
];

impl BrokerConfig {
    /// Builds the configuration from an optional TOML file and `name=value` overrides.
    pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut settings: Vec<(String, String)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let table: toml::Table = text
                .parse()
                .with_context(|| format!("parsing config file {}", path.display()))?;
            flatten_toml("", &toml::Value::Table(table), &mut settings)?;
        }
        for item in overrides {
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| anyhow!("--set takes name=value, got '{item}'"))?;
            settings.push((name.trim().to_string(), value.trim().to_string()));
        }
        let mut config = BrokerConfig::default();
        for (name, value) in &settings {
            config
                .apply(name, value)
                .with_context(|| format!("setting '{name}' = '{value}'"))?;
        }
        Ok(config)
    }

    fn apply(&mut self, name: &str, value: &str) -> Result<()> {
        match name {
            "node.id" | "broker.id" => self.node_id = parse_in(value, 0, i32::MAX as i64)? as i32,
            "num.partitions" => self.num_partitions = parse_in(value, 1, 1_000_000)? as i32,
            "auto.create.topics.enable" => self.auto_create_topics = parse_bool(value)?,
            "default.replication.factor" => {
                self.default_replication_factor = parse_in(value, 1, 1)? as i16
            }
            "socket.request.max.bytes" => {
                self.request_size_bytes_max = parse_in(value, 1024, i32::MAX as i64)? as usize
            }
            "message.max.bytes" => {
                self.batch_size_bytes_max = parse_in(value, 128, i32::MAX as i64)? as usize
            }
            "log.segment.bytes" => {
                self.segment_size_bytes = parse_in(value, 14, i32::MAX as i64)? as u64
            }
            "log.roll.ms" => self.segment_age_ms = parse_in(value, 1, i64::MAX)? as u64,
            "log.roll.hours" => {
                self.segment_age_ms = parse_in(value, 1, i64::MAX / 3_600_000)? as u64 * 3_600_000
            }
            "log.index.interval.bytes" => {
                self.index_interval_bytes = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "log.retention.ms" => self.retention_ms = parse_retention(value, 1)?,
            "log.retention.minutes" => self.retention_ms = parse_retention(value, 60_000)?,
            "log.retention.hours" => self.retention_ms = parse_retention(value, 3_600_000)?,
            "log.retention.bytes" => self.retention_bytes = parse_in(value, -1, i64::MAX)?,
            "advertised.listeners" => self.advertised_listener = Some(parse_listener(value)?),
            "queued.max.requests" => {
                self.inflight_requests_max = parse_in(value, 1, 100_000)? as usize
            }
            "strom.cache.bytes.per.shard" => {
                self.cache_size_bytes_per_shard = parse_in(value, 0, i64::MAX)? as usize
            }
            "offsets.topic.num.partitions" => {
                self.offsets_topic_partitions = parse_in(value, 1, 10_000)? as i32
            }
            "group.initial.rebalance.delay.ms" => {
                self.group_initial_rebalance_delay_ms = parse_in(value, 0, i32::MAX as i64)? as u64
            }
            "group.min.session.timeout.ms" => {
                self.group_session_timeout_ms_min = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "group.max.session.timeout.ms" => {
                self.group_session_timeout_ms_max = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "offsets.retention.minutes" => {
                self.offsets_retention_ms = parse_in(value, 1, i32::MAX as i64)? as u64 * 60_000
            }
            "offsets.retention.check.interval.ms" => {
                self.offsets_retention_check_interval_ms = parse_in(value, 1, i64::MAX)? as u64
            }
            _ => bail!(
                "unknown broker setting '{name}'; known settings: {}",
                KNOWN_SETTINGS.join(", ")
            ),
        }
        Ok(())
    }
}

fn flatten_toml(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) -> Result<()> {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let name = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten_toml(&name, value, out)?;
            }
        }
        toml::Value::String(s) => out.push((prefix.to_string(), s.clone())),
        toml::Value::Integer(i) => out.push((prefix.to_string(), i.to_string())),
        toml::Value::Boolean(b) => out.push((prefix.to_string(), b.to_string())),
        other => bail!("setting '{prefix}' has an unsupported value {other}"),
    }
    Ok(())
}

fn parse_in(value: &str, min: i64, max: i64) -> Result<i64> {
    let v: i64 = value
        .parse()
        .map_err(|_| anyhow!("'{value}' is not an integer"))?;
    if v < min || v > max {
        bail!("{v} is outside the allowed range {min}..={max}");
    }
    Ok(v)
}

fn parse_bool(value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => bail!("'{value}' is not true or false"),
    }
}

fn parse_retention(value: &str, unit_ms: i64) -> Result<i64> {
    let v = parse_in(value, -1, i64::MAX / unit_ms)?;
    Ok(if v < 0 { -1 } else { v * unit_ms })
}

/// Parses `PLAINTEXT://host:port` (or `host:port`), the first listener of a comma-separated list.
fn parse_listener(value: &str) -> Result<(String, u16)> {
    let first = value.split(',').next().unwrap_or_default().trim();
    let hostport = first.rsplit_once("://").map_or(first, |(_, rest)| rest);
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("'{value}' is not host:port"))?;
    let port: u16 = port.parse().map_err(|_| anyhow!("bad port in '{value}'"))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// Parses a core list such as `0-3`, `0,2,4` or `1-2,5`.
pub fn parse_core_list(spec: &str) -> Result<Vec<usize>> {
    let mut cores = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse()?, b.trim().parse()?);
                if a > b {
                    bail!("core range '{part}' is reversed");
                }
                cores.extend(a..=b);
            }
            None => cores.push(part.parse()?),
        }
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        bail!("core list '{spec}' names no core");
    }
    Ok(cores)
}

/// A core-mapping profile from `tuning/`: `cores = "0-1"` (or `"all"`).
pub fn load_core_profile(path: &Path) -> Result<Option<Vec<usize>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading core profile {}", path.display()))?;
    let table: toml::Table = text.parse()?;
    match table.get("cores").and_then(|v| v.as_str()) {
        Some("all") => Ok(None),
        Some(spec) => Ok(Some(parse_core_list(spec)?)),
        None => bail!("core profile {} has no 'cores' key", path.display()),
    }
}

/// Where the broker listens, keeps its data, and which cores it runs on.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub cores: Vec<usize>,
    pub broker: BrokerConfig,
}

/// Topic-level settings that strom accepts at CreateTopics, with Kafka's names.
pub const TOPIC_SETTINGS: &[&str] = &[
    "cleanup.policy",
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "segment.ms",
    "max.message.bytes",
    "message.timestamp.type",
    "min.insync.replicas",
    "compression.type",
];

/// Checks one topic config given at CreateTopics; the error text is returned to the client.
pub fn validate_topic_setting(name: &str, value: &str) -> std::result::Result<(), String> {
    let int = |min: i64| -> std::result::Result<(), String> {
        match value.parse::<i64>() {
            Ok(v) if v >= min => Ok(()),
            _ => Err(format!("Invalid value {value} for configuration {name}")),
        }
    };
    match name {
        "cleanup.policy" => match value {
            "delete" | "compact" | "compact,delete" | "delete,compact" => Ok(()),
            _ => Err(format!("Invalid value {value} for configuration {name}")),
        },
        "retention.ms" | "retention.bytes" => int(-1),
        "segment.bytes" => int(14),
        "segment.ms" | "max.message.bytes" | "min.insync.replicas" => int(1),
        "message.timestamp.type" => match value {
            "CreateTime" | "LogAppendTime" => Ok(()),
            _ => Err(format!("Invalid value {value} for configuration {name}")),
        },
        "compression.type" => match value {
            "producer" | "uncompressed" | "gzip" | "snappy" | "lz4" | "zstd" => Ok(()),
            _ => Err(format!("Invalid value {value} for configuration {name}")),
        },
        _ => Err(format!("Unknown topic config name: {name}")),
    }
}

/// The effective per-topic log settings: topic overrides on top of broker defaults.
#[derive(Clone, Debug)]
pub struct LogConfig {
    pub segment_size_bytes: u64,
    pub segment_age_ms: u64,
    pub index_interval_bytes: u64,
    pub batch_size_bytes_max: usize,
    pub log_append_time: bool,
}

impl LogConfig {
    pub fn resolve(broker: &BrokerConfig, topic: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| topic.get(k).and_then(|v| v.parse::<i64>().ok());
        LogConfig {
            segment_size_bytes: get("segment.bytes")
                .map_or(broker.segment_size_bytes, |v| v.max(14) as u64),
            segment_age_ms: get("segment.ms").map_or(broker.segment_age_ms, |v| v.max(1) as u64),
            index_interval_bytes: broker.index_interval_bytes,
            batch_size_bytes_max: get("max.message.bytes")
                .map_or(broker.batch_size_bytes_max, |v| v.max(1) as usize),
            log_append_time: topic.get("message.timestamp.type").map(String::as_str)
                == Some("LogAppendTime"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_setting_is_refused_with_its_name() {
        let err = BrokerConfig::load(None, &["log.retention.hourz=5".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("unknown broker setting 'log.retention.hourz'"));
    }

    #[test]
    fn retention_hours_default_and_override() {
        assert_eq!(BrokerConfig::default().retention_ms, 168 * 3_600_000);
        let c = BrokerConfig::load(None, &["log.retention.hours=2".into()]).unwrap();
        assert_eq!(c.retention_ms, 2 * 3_600_000);
    }

    #[test]
    fn core_lists_parse() {
        assert_eq!(parse_core_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert!(parse_core_list("3-1").is_err());
    }

    #[test]
    fn listener_parses_with_scheme() {
        assert_eq!(
            parse_listener("PLAINTEXT://127.0.0.1:9092").unwrap(),
            ("127.0.0.1".to_string(), 9092)
        );
    }
}
