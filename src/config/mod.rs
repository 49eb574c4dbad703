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

/// Where a config value comes from, with Kafka's `ConfigSource` ids (DescribeConfigs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    DynamicTopic = 1,
    DynamicDefaultBroker = 3,
    StaticBroker = 4,
    Default = 5,
    /// A group config set with IncrementalAlterConfigs (Kafka's GROUP_CONFIG).
    DynamicGroup = 8,
}

/// Kafka's config types, as DescribeConfigs v3+ reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigType {
    Boolean = 1,
    String = 2,
    Int = 3,
    Long = 5,
    Double = 6,
    List = 7,
}

/// One broker setting: its Kafka name, default (None: unset, as Kafka shows `null`), type,
/// whether it can be changed at run time (AlterConfigs on the broker), and the topic-level
/// config it is the default of.
pub struct SettingDef {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub kind: ConfigType,
    pub dynamic: bool,
    pub topic: Option<&'static str>,
    pub doc: &'static str,
}

const fn def(
    name: &'static str,
    default: Option<&'static str>,
    kind: ConfigType,
    dynamic: bool,
    topic: Option<&'static str>,
    doc: &'static str,
) -> SettingDef {
    SettingDef {
        name,
        default,
        kind,
        dynamic,
        topic,
        doc,
    }
}

use ConfigType as T;

/// Every broker setting strom knows. Values are validated by [`BrokerConfig::apply`].
pub const BROKER_SETTINGS: &[SettingDef] = &[
    def(
        "node.id",
        Some("0"),
        T::Int,
        false,
        None,
        "This broker's id",
    ),
    def("broker.id", None, T::Int, false, None, "Alias of node.id"),
    def(
        "num.partitions",
        Some("1"),
        T::Int,
        false,
        None,
        "Partitions of an auto-created topic",
    ),
    def(
        "auto.create.topics.enable",
        Some("true"),
        T::Boolean,
        false,
        None,
        "Metadata for an unknown topic creates it",
    ),
    def(
        "default.replication.factor",
        Some("1"),
        T::Int,
        false,
        None,
        "Replication factor of auto-created topics",
    ),
    def(
        "socket.request.max.bytes",
        Some("104857600"),
        T::Int,
        false,
        None,
        "The largest request frame",
    ),
    def(
        "message.max.bytes",
        Some("1048588"),
        T::Int,
        true,
        Some("max.message.bytes"),
        "The largest record batch",
    ),
    def(
        "log.segment.bytes",
        Some("1073741824"),
        T::Int,
        true,
        Some("segment.bytes"),
        "Segment roll size",
    ),
    def(
        "log.roll.ms",
        None,
        T::Long,
        true,
        Some("segment.ms"),
        "Segment roll age in ms (overrides log.roll.hours)",
    ),
    def(
        "log.roll.hours",
        Some("168"),
        T::Int,
        false,
        None,
        "Segment roll age in hours",
    ),
    def(
        "log.index.interval.bytes",
        Some("4096"),
        T::Int,
        true,
        Some("index.interval.bytes"),
        "Bytes between sparse index entries",
    ),
    def(
        "log.retention.ms",
        None,
        T::Long,
        true,
        Some("retention.ms"),
        "Retention time in ms (overrides minutes and hours)",
    ),
    def(
        "log.retention.minutes",
        None,
        T::Int,
        false,
        None,
        "Retention time in minutes (overrides hours)",
    ),
    def(
        "log.retention.hours",
        Some("168"),
        T::Int,
        false,
        None,
        "Retention time in hours",
    ),
    def(
        "log.retention.bytes",
        Some("-1"),
        T::Long,
        true,
        Some("retention.bytes"),
        "Retention size per partition; -1 for none",
    ),
    def(
        "log.retention.check.interval.ms",
        Some("300000"),
        T::Long,
        false,
        None,
        "How often retention is enforced",
    ),
    def(
        "log.cleanup.policy",
        Some("delete"),
        T::List,
        true,
        Some("cleanup.policy"),
        "delete, compact, or both",
    ),
    def(
        "log.cleaner.backoff.ms",
        Some("15000"),
        T::Long,
        false,
        None,
        "Sleep of the cleaner when there is nothing to clean",
    ),
    def(
        "log.cleaner.delete.retention.ms",
        Some("86400000"),
        T::Long,
        true,
        Some("delete.retention.ms"),
        "How long tombstones are kept",
    ),
    def(
        "log.cleaner.min.cleanable.ratio",
        Some("0.5"),
        T::Double,
        true,
        Some("min.cleanable.dirty.ratio"),
        "Dirty share of a log before it is cleaned",
    ),
    def(
        "log.cleaner.min.compaction.lag.ms",
        Some("0"),
        T::Long,
        true,
        Some("min.compaction.lag.ms"),
        "Minimum age of a record before compaction",
    ),
    def(
        "log.message.timestamp.type",
        Some("CreateTime"),
        T::String,
        true,
        Some("message.timestamp.type"),
        "CreateTime or LogAppendTime",
    ),
    def(
        "min.insync.replicas",
        Some("1"),
        T::Int,
        true,
        Some("min.insync.replicas"),
        "Replicas that must acknowledge acks=all",
    ),
    def(
        "compression.type",
        Some("producer"),
        T::String,
        true,
        Some("compression.type"),
        "Codec of stored batches; producer keeps the producer's",
    ),
    def(
        "advertised.listeners",
        None,
        T::String,
        false,
        None,
        "Address in Metadata, e.g. PLAINTEXT://host:9092",
    ),
    def(
        "controller.quorum.voters",
        None,
        T::String,
        false,
        None,
        "The Raft voters: id@host:port,... (a cluster; unset is a single node)",
    ),
    def(
        "inter.broker.listen",
        None,
        T::String,
        false,
        None,
        "Broker-to-broker listener host:port (default: this node's voter entry)",
    ),
    def(
        "auto.leader.rebalance.enable",
        Some("true"),
        T::Boolean,
        false,
        None,
        "Leaders hand leadership back to a partition's preferred replica once it is in sync",
    ),
    def(
        "leader.imbalance.check.interval.seconds",
        Some("300"),
        T::Long,
        false,
        None,
        "How long a leader that is not the preferred replica keeps leading before handing back",
    ),
    def(
        "queued.max.requests",
        Some("500"),
        T::Int,
        false,
        None,
        "Requests in flight per connection",
    ),
    def(
        "fetch.max.bytes",
        Some("57671680"),
        T::Int,
        false,
        None,
        "The most record bytes one Fetch response carries (beyond one first batch)",
    ),
    def(
        "max.incremental.fetch.session.cache.slots",
        Some("1000"),
        T::Int,
        false,
        None,
        "Incremental fetch sessions (KIP-227) kept, least recently used evicted; 0 disables them",
    ),
    def(
        "queued.max.request.bytes",
        Some("268435456"),
        T::Long,
        false,
        None,
        "Bytes of requests read but not yet answered, across all connections (split evenly over the shards); reading stops at the limit. -1: unbounded",
    ),
    def(
        "max.connections.per.ip",
        Some("2147483647"),
        T::Int,
        false,
        None,
        "Client connections open at once from one address; past it a new one is closed at accept",
    ),
    def(
        "connections.max.idle.ms",
        Some("600000"),
        T::Long,
        false,
        None,
        "A connection with no complete request for this long is closed (also one that sends a frame too slowly)",
    ),
    def(
        "max.connections",
        Some("16384"),
        T::Int,
        false,
        None,
        "Client connections open at once; a connection past it is closed at accept with a log line",
    ),
    def(
        "strom.cache.bytes.per.shard",
        Some("-1"),
        T::Long,
        false,
        None,
        "Recent-batch cache per shard; -1: an eighth of the memory the broker may use (the machine's, or its cgroup's limit) split among the shards, at least 64 MiB",
    ),
    def(
        "strom.journal.file.bytes",
        Some("67108864"),
        T::Long,
        false,
        None,
        "Size of each file of a shard's durability journal (acks=all is one journal write and one fdatasync per flush round, whatever the partition count)",
    ),
    def(
        "strom.delete.pacing",
        Some("auto"),
        T::String,
        false,
        None,
        "When large deleted files are truncated a chunk at a time at a pace instead of unlinked at once: auto (when the data directory's file system is mounted with online discard, whose trims otherwise hold up the journal's syncs), on or off",
    ),
    def(
        "strom.delete.bytes.per.second.per.shard",
        Some("134217728"),
        T::Long,
        false,
        None,
        "Pace of paced deletions per shard (strom.delete.pacing); a shard with more than 4 GiB waiting deletes without pacing",
    ),
    def(
        "strom.journal.bypass.bytes",
        Some("262144"),
        T::Long,
        false,
        None,
        "A partition's flush chunk this large or larger is written to its segment and fdatasynced there instead of going through the journal (which would write its bytes twice)",
    ),
    def(
        "strom.journal.files",
        Some("4"),
        T::Int,
        false,
        None,
        "Journal files per shard, reused in turn once the segments they cover are fdatasynced; 0 turns the journal off (one fdatasync per partition)",
    ),
    def(
        "offsets.topic.replication.factor",
        Some("3"),
        T::Int,
        false,
        None,
        "Replicas of __consumer_offsets in a cluster (at most the brokers there are)",
    ),
    def(
        "replica.lag.time.max.ms",
        Some("30000"),
        T::Long,
        false,
        None,
        "A follower that has not caught up with the leader's log end for this long leaves the ISR",
    ),
    def(
        "strom.raft.log.compact.bytes",
        Some("67108864"),
        T::Long,
        false,
        None,
        "A partition's Raft log is compacted once it holds this many bytes the segments already made durable; a follower out of the ISR behind that point catches up from the leader's segments",
    ),
    def(
        "broker.session.timeout.ms",
        Some("9000"),
        T::Int,
        false,
        None,
        "A broker the controller has not heard from for this long is fenced: Metadata stops listing it",
    ),
    def(
        "transaction.state.log.num.partitions",
        Some("50"),
        T::Int,
        false,
        None,
        "Partitions of __transaction_state, where transaction coordinators keep their state",
    ),
    def(
        "transaction.state.log.replication.factor",
        Some("3"),
        T::Int,
        false,
        None,
        "Replicas of __transaction_state in a cluster (at most the brokers there are)",
    ),
    def(
        "transaction.max.timeout.ms",
        Some("900000"),
        T::Int,
        false,
        None,
        "The longest transaction.timeout.ms a producer may ask for",
    ),
    def(
        "transaction.abort.timed.out.transaction.cleanup.interval.ms",
        Some("10000"),
        T::Int,
        false,
        None,
        "How often coordinators look for transactions open past their timeout, and abort them",
    ),
    def(
        "transactional.id.expiration.ms",
        Some("604800000"),
        T::Int,
        false,
        None,
        "A transactional id with no transaction open and no request for this long is forgotten (its state record deleted)",
    ),
    def(
        "strom.transaction.partitions.max",
        Some("10000"),
        T::Int,
        false,
        None,
        "Partitions one transaction may span (AddPartitionsToTxn beyond it is refused)",
    ),
    def(
        "offsets.topic.num.partitions",
        Some("50"),
        T::Int,
        false,
        None,
        "Partitions of __consumer_offsets",
    ),
    def(
        "group.initial.rebalance.delay.ms",
        Some("3000"),
        T::Int,
        false,
        None,
        "A new group waits this long for more members",
    ),
    def(
        "group.consumer.session.timeout.ms",
        Some("45000"),
        T::Int,
        false,
        None,
        "A consumer-protocol (KIP-848) member not heard from this long is removed",
    ),
    def(
        "group.consumer.heartbeat.interval.ms",
        Some("5000"),
        T::Int,
        false,
        None,
        "How often consumer-protocol (KIP-848) members heartbeat",
    ),
    def(
        "group.consumer.assignors",
        Some("uniform,range"),
        T::List,
        false,
        None,
        "Server-side assignors for consumer-protocol groups, the first the default",
    ),
    def(
        "group.share.record.lock.duration.ms",
        Some("30000"),
        T::Int,
        false,
        None,
        "How long a share-group member holds a record it was given before it is released",
    ),
    def(
        "group.share.delivery.count.limit",
        Some("5"),
        T::Int,
        false,
        None,
        "Deliveries of a share-group record before it is archived",
    ),
    def(
        "group.share.partition.max.record.locks",
        Some("2000"),
        T::Int,
        false,
        None,
        "Records in flight per share-partition",
    ),
    def(
        "group.share.max.size",
        Some("200"),
        T::Int,
        false,
        None,
        "Members per share group",
    ),
    def(
        "group.share.heartbeat.interval.ms",
        Some("5000"),
        T::Int,
        false,
        None,
        "How often share-group members heartbeat",
    ),
    def(
        "group.share.session.timeout.ms",
        Some("45000"),
        T::Int,
        false,
        None,
        "A share-group member not heard from this long is removed",
    ),
    def(
        "group.min.session.timeout.ms",
        Some("6000"),
        T::Int,
        false,
        None,
        "Shortest member session timeout",
    ),
    def(
        "group.max.session.timeout.ms",
        Some("1800000"),
        T::Int,
        false,
        None,
        "Longest member session timeout",
    ),
    def(
        "offsets.retention.minutes",
        Some("10080"),
        T::Int,
        false,
        None,
        "Committed offsets of an empty group expire after this",
    ),
    def(
        "offsets.retention.check.interval.ms",
        Some("600000"),
        T::Long,
        false,
        None,
        "How often offset expiry runs",
    ),
];

/// Topic-level configs strom knows, each with the broker setting it defaults to.
pub const TOPIC_SETTINGS: &[(&str, &str, ConfigType)] = &[
    ("cleanup.policy", "log.cleanup.policy", T::List),
    ("compression.type", "compression.type", T::String),
    (
        "delete.retention.ms",
        "log.cleaner.delete.retention.ms",
        T::Long,
    ),
    ("index.interval.bytes", "log.index.interval.bytes", T::Int),
    ("max.message.bytes", "message.max.bytes", T::Int),
    (
        "message.timestamp.type",
        "log.message.timestamp.type",
        T::String,
    ),
    (
        "min.cleanable.dirty.ratio",
        "log.cleaner.min.cleanable.ratio",
        T::Double,
    ),
    (
        "min.compaction.lag.ms",
        "log.cleaner.min.compaction.lag.ms",
        T::Long,
    ),
    ("min.insync.replicas", "min.insync.replicas", T::Int),
    ("retention.bytes", "log.retention.bytes", T::Long),
    ("retention.ms", "log.retention.ms", T::Long),
    ("segment.bytes", "log.segment.bytes", T::Int),
    ("segment.ms", "log.roll.ms", T::Long),
];

/// How a stored-only topic config's value is checked.
#[derive(Clone, Copy, Debug)]
pub enum Check {
    Range(i64, i64),
    Ratio,
    Bool,
    OneOf(&'static [&'static str]),
    /// A list such as `0:1,1:2` or `*` (replication throttles).
    ReplicaList,
}

/// A topic config Kafka documents that strom accepts, stores, validates and shows, but does not
/// act on (yet): flush intervals (strom syncs on `acks=all` instead), replication throttles,
/// tiered storage, codec levels, timestamp bounds, preallocation, legacy formats.
pub struct StoredTopicSetting {
    pub name: &'static str,
    pub kind: ConfigType,
    pub default: &'static str,
    pub check: Check,
    pub doc: &'static str,
}

const fn stored(
    name: &'static str,
    kind: ConfigType,
    default: &'static str,
    check: Check,
    doc: &'static str,
) -> StoredTopicSetting {
    StoredTopicSetting {
        name,
        kind,
        default,
        check,
        doc,
    }
}

const LONG_MAX: i64 = i64::MAX;
const INT_MAX: i64 = i32::MAX as i64;

/// Kafka 3.9/4.x topic configs that strom stores without acting on them.
pub const STORED_TOPIC_SETTINGS: &[StoredTopicSetting] = &[
    stored(
        "compression.gzip.level",
        T::Int,
        "-1",
        Check::Range(-1, 9),
        "Stored, not acted on: strom stores batches as the producer compressed them",
    ),
    stored(
        "compression.lz4.level",
        T::Int,
        "9",
        Check::Range(1, 17),
        "Stored, not acted on: strom stores batches as the producer compressed them",
    ),
    stored(
        "compression.zstd.level",
        T::Int,
        "3",
        Check::Range(-131_072, 22),
        "Stored, not acted on: strom stores batches as the producer compressed them",
    ),
    stored(
        "file.delete.delay.ms",
        T::Long,
        "60000",
        Check::Range(0, LONG_MAX),
        "Stored, not acted on: strom deletes segments at once",
    ),
    stored(
        "flush.messages",
        T::Long,
        "9223372036854775807",
        Check::Range(1, LONG_MAX),
        "Stored, not acted on: strom fdatasyncs for acks=all and at shutdown",
    ),
    stored(
        "flush.ms",
        T::Long,
        "9223372036854775807",
        Check::Range(0, LONG_MAX),
        "Stored, not acted on: strom fdatasyncs for acks=all and at shutdown",
    ),
    stored(
        "follower.replication.throttled.replicas",
        T::List,
        "",
        Check::ReplicaList,
        "Stored, not acted on until replication exists",
    ),
    stored(
        "leader.replication.throttled.replicas",
        T::List,
        "",
        Check::ReplicaList,
        "Stored, not acted on until replication exists",
    ),
    stored(
        "local.retention.bytes",
        T::Long,
        "-2",
        Check::Range(-2, LONG_MAX),
        "Stored, not acted on: no tiered storage",
    ),
    stored(
        "local.retention.ms",
        T::Long,
        "-2",
        Check::Range(-2, LONG_MAX),
        "Stored, not acted on: no tiered storage",
    ),
    stored(
        "max.compaction.lag.ms",
        T::Long,
        "9223372036854775807",
        Check::Range(1, LONG_MAX),
        "Stored, not acted on: compaction runs by dirty ratio",
    ),
    stored(
        "message.downconversion.enable",
        T::Boolean,
        "true",
        Check::Bool,
        "Stored, not acted on: strom serves only record batch v2",
    ),
    stored(
        "message.format.version",
        T::String,
        "3.0-IV1",
        Check::OneOf(&[
            "0.8.0",
            "0.8.1",
            "0.8.2",
            "0.9.0",
            "0.10.0-IV0",
            "0.10.0-IV1",
            "0.10.0",
            "0.10.1-IV0",
            "0.10.1-IV1",
            "0.10.1-IV2",
            "0.10.1",
            "0.10.2-IV0",
            "0.10.2",
            "0.11.0-IV0",
            "0.11.0-IV1",
            "0.11.0-IV2",
            "0.11.0",
            "1.0-IV0",
            "1.0",
            "1.1-IV0",
            "1.1",
            "2.0-IV0",
            "2.0-IV1",
            "2.0",
            "2.1-IV0",
            "2.1-IV1",
            "2.1-IV2",
            "2.1",
            "2.2-IV0",
            "2.2-IV1",
            "2.2",
            "2.3-IV0",
            "2.3-IV1",
            "2.3",
            "2.4-IV0",
            "2.4-IV1",
            "2.4",
            "2.5-IV0",
            "2.5",
            "2.6-IV0",
            "2.6",
            "2.7-IV0",
            "2.7-IV1",
            "2.7-IV2",
            "2.7",
            "2.8-IV0",
            "2.8-IV1",
            "2.8",
            "3.0-IV0",
            "3.0-IV1",
            "3.0",
            "3.1-IV0",
            "3.1",
            "3.2-IV0",
            "3.2",
            "3.3-IV0",
            "3.3-IV1",
            "3.3-IV2",
            "3.3-IV3",
            "3.3",
            "3.4-IV0",
            "3.4",
            "3.5-IV0",
            "3.5-IV1",
            "3.5-IV2",
            "3.5",
            "3.6-IV0",
            "3.6-IV1",
            "3.6-IV2",
            "3.6",
            "3.7-IV0",
            "3.7-IV1",
            "3.7-IV2",
            "3.7-IV3",
            "3.7-IV4",
            "3.7",
            "3.8-IV0",
            "3.8",
            "3.9-IV0",
            "3.9",
        ]),
        "Deprecated in Kafka 3.x; stored, not acted on: strom writes record batch v2",
    ),
    stored(
        "message.timestamp.after.max.ms",
        T::Long,
        "9223372036854775807",
        Check::Range(0, LONG_MAX),
        "Stored, not acted on: timestamps are not bounded",
    ),
    stored(
        "message.timestamp.before.max.ms",
        T::Long,
        "9223372036854775807",
        Check::Range(0, LONG_MAX),
        "Stored, not acted on: timestamps are not bounded",
    ),
    stored(
        "message.timestamp.difference.max.ms",
        T::Long,
        "9223372036854775807",
        Check::Range(0, LONG_MAX),
        "Deprecated; stored, not acted on",
    ),
    stored(
        "preallocate",
        T::Boolean,
        "false",
        Check::Bool,
        "Stored, not acted on: segments grow as written",
    ),
    stored(
        "remote.log.copy.disable",
        T::Boolean,
        "false",
        Check::Bool,
        "Stored, not acted on: no tiered storage",
    ),
    stored(
        "remote.log.delete.on.disable",
        T::Boolean,
        "false",
        Check::Bool,
        "Stored, not acted on: no tiered storage",
    ),
    stored(
        "remote.storage.enable",
        T::Boolean,
        "false",
        Check::OneOf(&["false"]),
        "Tiered storage is not available: only false is accepted",
    ),
    stored(
        "segment.index.bytes",
        T::Int,
        "10485760",
        Check::Range(4, INT_MAX),
        "Stored, not acted on: strom's indexes grow as needed",
    ),
    stored(
        "segment.jitter.ms",
        T::Long,
        "0",
        Check::Range(0, LONG_MAX),
        "Stored, not acted on",
    ),
    stored(
        "unclean.leader.election.enable",
        T::Boolean,
        "false",
        Check::Bool,
        "Stored, not acted on until replication exists",
    ),
];

fn check_stored(s: &StoredTopicSetting, value: &str) -> std::result::Result<(), String> {
    let ok = match s.check {
        Check::Range(min, max) => value
            .trim()
            .parse::<i64>()
            .is_ok_and(|v| (min..=max).contains(&v)),
        Check::Ratio => value
            .trim()
            .parse::<f64>()
            .is_ok_and(|v| (0.0..=1.0).contains(&v)),
        Check::Bool => matches!(value.trim().to_ascii_lowercase().as_str(), "true" | "false"),
        Check::OneOf(allowed) => allowed.contains(&value.trim()),
        Check::ReplicaList => {
            let v = value.trim();
            v.is_empty()
                || v == "*"
                || v.split(',').all(|pair| {
                    pair.trim().split_once(':').is_some_and(|(p, b)| {
                        p.trim().parse::<u32>().is_ok() && b.trim().parse::<u32>().is_ok()
                    })
                })
        }
    };
    if ok {
        Ok(())
    } else {
        let expected = match s.check {
            Check::Range(min, max) => format!("a number in [{min}, {max}]"),
            Check::Ratio => "a number in [0, 1]".to_string(),
            Check::Bool => "true or false".to_string(),
            Check::OneOf(allowed) => format!("one of {}", allowed.join(", ")),
            Check::ReplicaList => "[PartitionId]:[BrokerId],... or *".to_string(),
        };
        Err(format!(
            "Invalid value {value} for configuration {}: expected {expected}",
            s.name
        ))
    }
}

/// Every broker-wide setting in force, typed, plus where each explicitly set value came from.
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
    /// `log.retention.check.interval.ms`.
    pub retention_check_interval_ms: u64,
    /// `log.cleanup.policy`: `delete`, `compact`, or both.
    pub cleanup_policy: String,
    /// `log.cleaner.backoff.ms`.
    pub cleaner_backoff_ms: u64,
    /// `log.cleaner.delete.retention.ms`: tombstones are kept this long after cleaning.
    pub delete_retention_ms: i64,
    /// `log.cleaner.min.cleanable.ratio`.
    pub min_cleanable_dirty_ratio: f64,
    /// `log.cleaner.min.compaction.lag.ms`.
    pub min_compaction_lag_ms: i64,
    /// `log.message.timestamp.type`.
    pub message_timestamp_type: String,
    /// `min.insync.replicas`.
    pub min_insync_replicas: i32,
    /// `compression.type`.
    pub compression_type: String,
    /// `advertised.listeners`: the address clients are told to connect to.
    pub advertised_listener: Option<(String, u16)>,
    /// `controller.quorum.voters`: the cluster's Raft voters (node id, broker-to-broker
    /// address). Empty: a single node.
    pub quorum_voters: Vec<(i32, (String, u16))>,
    /// `inter.broker.listen`: where this broker takes broker-to-broker traffic.
    pub inter_broker_listen: Option<(String, u16)>,
    /// `queued.max.requests`: requests in flight per connection before reading pauses.
    pub inflight_requests_max: usize,
    /// `fetch.max.bytes`: caps every Fetch request's `max_bytes`.
    pub fetch_response_bytes_max: usize,
    /// `max.incremental.fetch.session.cache.slots`: fetch sessions kept by the broker.
    pub fetch_session_slots: usize,
    /// `queued.max.request.bytes`: request bytes held across all connections (-1: unbounded).
    pub queued_request_bytes_max: i64,
    /// `connections.max.idle.ms`.
    pub connection_idle_ms_max: u64,
    /// `max.connections`.
    pub connections_max: usize,
    /// `max.connections.per.ip`.
    pub connections_per_ip_max: usize,
    /// `strom.cache.bytes.per.shard`: recent batches kept in memory per shard for fetches;
    /// `None` (-1): sized from the memory the broker may use ([`BrokerConfig::cache_bytes_per_shard`]).
    pub cache_size_bytes_per_shard: Option<usize>,
    /// `strom.journal.file.bytes`: size of each file of a shard's durability journal.
    pub journal_file_bytes: u64,
    /// `strom.journal.files`: journal files per shard (0: no journal).
    pub journal_files: usize,
    /// `strom.journal.bypass.bytes`: a partition's chunk this large skips the journal.
    pub journal_bypass_bytes: usize,
    /// `strom.delete.pacing`: when deletions of large files are paced.
    pub delete_pacing: crate::storage::trash::Pacing,
    /// `strom.delete.bytes.per.second.per.shard`.
    pub delete_bytes_per_second: u64,
    /// `offsets.topic.num.partitions`: partitions of `__consumer_offsets`, fixed once created.
    pub offsets_topic_partitions: i32,
    /// `offsets.topic.replication.factor`.
    pub offsets_topic_replication_factor: i16,
    /// `transaction.state.log.num.partitions`: partitions of `__transaction_state`.
    pub txn_topic_partitions: i32,
    /// `transaction.state.log.replication.factor`.
    pub txn_topic_replication_factor: i16,
    /// `transaction.max.timeout.ms`.
    pub txn_timeout_ms_max: u64,
    /// `transaction.abort.timed.out.transaction.cleanup.interval.ms`.
    pub txn_abort_check_ms: u64,
    /// `strom.transaction.partitions.max`.
    pub txn_partitions_max: usize,
    /// `transactional.id.expiration.ms`.
    pub txn_id_expiration_ms: u64,
    /// `auto.leader.rebalance.enable`.
    pub auto_leader_rebalance: bool,
    /// `leader.imbalance.check.interval.seconds`.
    pub leader_imbalance_check_s: u64,
    /// `replica.lag.time.max.ms`: how long a follower may go without catching up and stay in sync.
    pub replica_lag_time_max_ms: u64,
    /// `strom.raft.log.compact.bytes`: the Raft log size that triggers its compaction.
    pub raft_log_compact_bytes: u64,
    /// `broker.session.timeout.ms`: how long the controller waits to hear from a broker before
    /// it fences it.
    pub broker_session_timeout_ms: u64,
    /// `group.initial.rebalance.delay.ms`: how long a new group waits for more members.
    pub group_initial_rebalance_delay_ms: u64,
    /// `group.consumer.session.timeout.ms` (KIP-848 members).
    pub group_consumer_session_timeout_ms: u64,
    /// `group.consumer.heartbeat.interval.ms`.
    pub group_consumer_heartbeat_interval_ms: u64,
    /// `group.consumer.assignors`: short names (`uniform`, `range`), the first the default.
    pub group_consumer_assignors: Vec<String>,
    /// `group.share.record.lock.duration.ms`.
    pub group_share_record_lock_duration_ms: u64,
    /// `group.share.delivery.count.limit`.
    pub group_share_delivery_count_limit: i16,
    /// `group.share.partition.max.record.locks`.
    pub group_share_partition_record_locks_max: usize,
    /// `group.share.heartbeat.interval.ms`.
    pub group_share_heartbeat_interval_ms: u64,
    /// `group.share.max.size`.
    pub group_share_max_size: usize,
    /// `group.share.session.timeout.ms`.
    pub group_share_session_timeout_ms: u64,
    /// `group.min.session.timeout.ms` / `group.max.session.timeout.ms`.
    pub group_session_timeout_ms_min: u64,
    pub group_session_timeout_ms_max: u64,
    /// `offsets.retention.minutes` (as ms): committed offsets of an empty group expire after this.
    pub offsets_retention_ms: u64,
    /// `offsets.retention.check.interval.ms`.
    pub offsets_retention_check_interval_ms: u64,
    /// Values set explicitly, with their source; everything else is at its default.
    explicit: BTreeMap<String, (String, ConfigSource)>,
    /// The retention and roll settings are layered (ms over minutes over hours); these remember
    /// which layers are set so that the effective value can be recomputed.
    retention_layers: [Option<i64>; 3],
    roll_layers: [Option<u64>; 2],
}

impl Default for BrokerConfig {
    fn default() -> Self {
        let mut config = Self {
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
            retention_check_interval_ms: 300_000,
            cleanup_policy: "delete".to_string(),
            cleaner_backoff_ms: 15_000,
            delete_retention_ms: 86_400_000,
            min_cleanable_dirty_ratio: 0.5,
            min_compaction_lag_ms: 0,
            message_timestamp_type: "CreateTime".to_string(),
            min_insync_replicas: 1,
            compression_type: "producer".to_string(),
            advertised_listener: None,
            quorum_voters: Vec::new(),
            inter_broker_listen: None,
            inflight_requests_max: 500,
            fetch_response_bytes_max: 57_671_680,
            fetch_session_slots: 1000,
            queued_request_bytes_max: 256 << 20,
            connection_idle_ms_max: 600_000,
            connections_max: 16_384,
            connections_per_ip_max: i32::MAX as usize,
            cache_size_bytes_per_shard: None,
            journal_file_bytes: 64 * 1024 * 1024,
            journal_files: 4,
            journal_bypass_bytes: 256 << 10,
            delete_pacing: crate::storage::trash::Pacing::Auto,
            delete_bytes_per_second: 128 << 20,
            offsets_topic_partitions: 50,
            offsets_topic_replication_factor: 3,
            txn_topic_partitions: 50,
            txn_topic_replication_factor: 3,
            txn_timeout_ms_max: 900_000,
            txn_abort_check_ms: 10_000,
            txn_partitions_max: 10_000,
            txn_id_expiration_ms: 604_800_000,
            replica_lag_time_max_ms: 30_000,
            raft_log_compact_bytes: 64 * 1024 * 1024,
            auto_leader_rebalance: true,
            leader_imbalance_check_s: 300,
            broker_session_timeout_ms: 9_000,
            group_initial_rebalance_delay_ms: 3000,
            group_consumer_session_timeout_ms: 45_000,
            group_consumer_heartbeat_interval_ms: 5_000,
            group_consumer_assignors: vec!["uniform".to_string(), "range".to_string()],
            group_share_record_lock_duration_ms: 30_000,
            group_share_delivery_count_limit: 5,
            group_share_partition_record_locks_max: 2000,
            group_share_heartbeat_interval_ms: 5_000,
            group_share_max_size: 200,
            group_share_session_timeout_ms: 45_000,
            group_session_timeout_ms_min: 6000,
            group_session_timeout_ms_max: 1_800_000,
            offsets_retention_ms: 10080 * 60_000,
            offsets_retention_check_interval_ms: 600_000,
            explicit: BTreeMap::new(),
            retention_layers: [None, None, Some(168)],
            roll_layers: [None, Some(168)],
        };
        config.recompute_layers();
        config
    }
}

/// The smallest recent-batch cache a shard sizes for itself (`strom.cache.bytes.per.shard=-1`).
pub const CACHE_BYTES_PER_SHARD_MIN: usize = 64 << 20;

/// The memory this process may use: the machine's (`MemTotal`), or less where a cgroup (v2 or v1)
/// limits it. `None` where neither can be read. Read once: topic changes size the cache again.
pub fn usable_memory_bytes() -> Option<u64> {
    static USABLE: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *USABLE.get_or_init(read_usable_memory_bytes)
}

fn read_usable_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    // The limit files of the process's own cgroup (from /proc/self/cgroup: the v2 `0::` line,
    // the v1 `memory` controller's line) and of the hierarchy's root (what a container with its
    // own cgroup namespace sees). "max" (no limit) does not parse and is skipped.
    let mut files = vec![
        "/sys/fs/cgroup/memory.max".to_string(),
        "/sys/fs/cgroup/memory/memory.limit_in_bytes".to_string(),
    ];
    for line in std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
    {
        if let Some(path) = line.strip_prefix("0::") {
            files.push(format!(
                "/sys/fs/cgroup{}/memory.max",
                path.trim_end_matches('/')
            ));
        } else if let Some((_, path)) = line.split_once(":memory:") {
            let dir = path.trim_end_matches('/');
            files.push(format!("/sys/fs/cgroup/memory{dir}/memory.limit_in_bytes"));
        }
    }
    let limit = files
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .min();
    match (total, limit) {
        (Some(t), Some(l)) => Some(t.min(l)),
        (t, l) => t.or(l),
    }
}

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
                .set(name, value, ConfigSource::StaticBroker)
                .with_context(|| format!("setting '{name}' = '{value}'"))?;
        }
        Ok(config)
    }

    /// The recent-batch cache of each of `shards` shards: as set, or an eighth of the memory the
    /// broker may use split among them, at least [`CACHE_BYTES_PER_SHARD_MIN`]. A consumer a few
    /// seconds behind at full rate then reads from memory, as Kafka's would from the page cache,
    /// rather than from the disk (which reads at half the rate it writes on this kind of machine).
    pub fn cache_bytes_per_shard(&self, shards: usize) -> usize {
        self.cache_size_bytes_per_shard.unwrap_or_else(|| {
            let share = usable_memory_bytes().map_or(0, |m| m / 8 / shards.max(1) as u64);
            usize::try_from(share)
                .unwrap_or(usize::MAX)
                .max(CACHE_BYTES_PER_SHARD_MIN)
        })
    }

    /// This configuration with dynamic (AlterConfigs) broker settings applied on top.
    pub fn with_dynamic(&self, dynamic: &BTreeMap<String, String>) -> BrokerConfig {
        let mut config = self.clone();
        for (name, value) in dynamic {
            if let Err(e) = config.set(name, value, ConfigSource::DynamicDefaultBroker) {
                tracing::warn!(%name, %value, error = %e, "ignoring an invalid dynamic broker setting");
            }
        }
        config
    }

    /// Validates a dynamic broker setting without applying it.
    pub fn check_dynamic(&self, name: &str, value: &str) -> std::result::Result<(), String> {
        let Some(d) = BROKER_SETTINGS.iter().find(|d| d.name == name) else {
            return Err(format!("Unknown broker config name: {name}"));
        };
        if !d.dynamic {
            return Err(format!(
                "Cannot update these configs dynamically: Set({name})"
            ));
        }
        let mut probe = self.clone();
        probe
            .apply(name, value)
            .map_err(|e| format!("Invalid value {value} for configuration {name}: {e}"))
    }

    fn set(&mut self, name: &str, value: &str, source: ConfigSource) -> Result<()> {
        self.apply(name, value)?;
        self.explicit
            .insert(name.to_string(), (value.to_string(), source));
        Ok(())
    }

    /// The value and source of a broker setting, as DescribeConfigs shows it.
    pub fn describe(&self, name: &str) -> Option<(Option<String>, ConfigSource)> {
        let d = BROKER_SETTINGS.iter().find(|d| d.name == name)?;
        Some(match self.explicit.get(name) {
            Some((v, source)) => (Some(v.clone()), *source),
            None => (d.default.map(str::to_string), ConfigSource::Default),
        })
    }

    fn recompute_layers(&mut self) {
        let [ms, minutes, hours] = self.retention_layers;
        self.retention_ms = ms
            .or(minutes.map(|m| if m < 0 { -1 } else { m * 60_000 }))
            .or(hours.map(|h| if h < 0 { -1 } else { h * 3_600_000 }))
            .unwrap_or(-1);
        let [roll_ms, roll_hours] = self.roll_layers;
        self.segment_age_ms = roll_ms
            .or(roll_hours.map(|h| h * 3_600_000))
            .unwrap_or(168 * 3_600_000);
    }

    fn apply(&mut self, name: &str, value: &str) -> Result<()> {
        match name {
            "node.id" | "broker.id" => self.node_id = parse_in(value, 0, i32::MAX as i64)? as i32,
            "num.partitions" => self.num_partitions = parse_in(value, 1, 1_000_000)? as i32,
            "auto.create.topics.enable" => self.auto_create_topics = parse_bool(value)?,
            "default.replication.factor" => {
                self.default_replication_factor = parse_in(value, 1, i64::from(i16::MAX))? as i16
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
            "log.roll.ms" => {
                self.roll_layers[0] = Some(parse_in(value, 1, i64::MAX)? as u64);
                self.recompute_layers();
            }
            "log.roll.hours" => {
                self.roll_layers[1] = Some(parse_in(value, 1, i64::MAX / 3_600_000)? as u64);
                self.recompute_layers();
            }
            "log.index.interval.bytes" => {
                self.index_interval_bytes = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "log.retention.ms" => {
                self.retention_layers[0] = Some(parse_in(value, -1, i64::MAX)?);
                self.recompute_layers();
            }
            "log.retention.minutes" => {
                self.retention_layers[1] = Some(parse_in(value, -1, i64::MAX / 60_000)?);
                self.recompute_layers();
            }
            "log.retention.hours" => {
                self.retention_layers[2] = Some(parse_in(value, -1, i64::MAX / 3_600_000)?);
                self.recompute_layers();
            }
            "log.retention.bytes" => self.retention_bytes = parse_in(value, -1, i64::MAX)?,
            "log.retention.check.interval.ms" => {
                self.retention_check_interval_ms = parse_in(value, 1, i64::MAX)? as u64
            }
            "log.cleanup.policy" => self.cleanup_policy = parse_cleanup_policy(value)?,
            "log.cleaner.backoff.ms" => {
                self.cleaner_backoff_ms = parse_in(value, 0, i64::MAX)? as u64
            }
            "log.cleaner.delete.retention.ms" => {
                self.delete_retention_ms = parse_in(value, 0, i64::MAX)?
            }
            "log.cleaner.min.cleanable.ratio" => {
                self.min_cleanable_dirty_ratio = parse_ratio(value)?
            }
            "log.cleaner.min.compaction.lag.ms" => {
                self.min_compaction_lag_ms = parse_in(value, 0, i64::MAX)?
            }
            "log.message.timestamp.type" => {
                self.message_timestamp_type = parse_enum(value, &["CreateTime", "LogAppendTime"])?
            }
            "min.insync.replicas" => {
                self.min_insync_replicas = parse_in(value, 1, i32::MAX as i64)? as i32
            }
            "compression.type" => {
                self.compression_type = parse_enum(
                    value,
                    &["producer", "uncompressed", "gzip", "snappy", "lz4", "zstd"],
                )?
            }
            "advertised.listeners" => self.advertised_listener = Some(parse_listener(value)?),
            "controller.quorum.voters" => self.quorum_voters = parse_voters(value)?,
            "inter.broker.listen" => self.inter_broker_listen = Some(parse_listener(value)?),
            "queued.max.requests" => {
                self.inflight_requests_max = parse_in(value, 1, 100_000)? as usize
            }
            "max.incremental.fetch.session.cache.slots" => {
                self.fetch_session_slots = parse_in(value, 0, i32::MAX as i64)? as usize
            }
            "fetch.max.bytes" => {
                self.fetch_response_bytes_max = parse_in(value, 1024, i32::MAX as i64)? as usize
            }
            "queued.max.request.bytes" => {
                self.queued_request_bytes_max = parse_in(value, -1, i64::MAX)?;
                if self.queued_request_bytes_max == 0 {
                    bail!("queued.max.request.bytes must be -1 or positive");
                }
            }
            "connections.max.idle.ms" => {
                self.connection_idle_ms_max = parse_in(value, 1, i64::MAX)? as u64
            }
            "max.connections.per.ip" => {
                self.connections_per_ip_max = parse_in(value, 1, i32::MAX as i64)? as usize
            }
            "max.connections" => {
                self.connections_max = parse_in(value, 1, i32::MAX as i64)? as usize
            }
            "strom.cache.bytes.per.shard" => {
                self.cache_size_bytes_per_shard = match parse_in(value, -1, i64::MAX)? {
                    -1 => None,
                    v => Some(v as usize),
                }
            }
            "strom.journal.file.bytes" => {
                self.journal_file_bytes = parse_in(value, 1 << 20, 1 << 40)? as u64
            }
            "strom.journal.files" => self.journal_files = parse_in(value, 0, 64)? as usize,
            "strom.journal.bypass.bytes" => {
                self.journal_bypass_bytes = parse_in(value, 1, i64::MAX)? as usize
            }
            "strom.delete.pacing" => {
                self.delete_pacing = match value {
                    "auto" => crate::storage::trash::Pacing::Auto,
                    "on" => crate::storage::trash::Pacing::On,
                    "off" => crate::storage::trash::Pacing::Off,
                    _ => bail!("'{value}' is not auto, on or off"),
                }
            }
            "strom.delete.bytes.per.second.per.shard" => {
                self.delete_bytes_per_second = parse_in(value, 1 << 20, i64::MAX)? as u64
            }
            "offsets.topic.replication.factor" => {
                self.offsets_topic_replication_factor =
                    parse_in(value, 1, i64::from(i16::MAX))? as i16
            }
            "auto.leader.rebalance.enable" => self.auto_leader_rebalance = parse_bool(value)?,
            "leader.imbalance.check.interval.seconds" => {
                self.leader_imbalance_check_s = parse_in(value, 1, i64::MAX)? as u64
            }
            "replica.lag.time.max.ms" => {
                self.replica_lag_time_max_ms = parse_in(value, 1, i64::MAX)? as u64
            }
            "strom.raft.log.compact.bytes" => {
                self.raft_log_compact_bytes = parse_in(value, 1, i64::MAX)? as u64
            }
            "broker.session.timeout.ms" => {
                self.broker_session_timeout_ms = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "transaction.state.log.num.partitions" => {
                self.txn_topic_partitions = parse_in(value, 1, 10_000)? as i32
            }
            "transaction.state.log.replication.factor" => {
                self.txn_topic_replication_factor = parse_in(value, 1, i64::from(i16::MAX))? as i16
            }
            "transaction.max.timeout.ms" => {
                self.txn_timeout_ms_max = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "transaction.abort.timed.out.transaction.cleanup.interval.ms" => {
                self.txn_abort_check_ms = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "transactional.id.expiration.ms" => {
                self.txn_id_expiration_ms = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "strom.transaction.partitions.max" => {
                self.txn_partitions_max = parse_in(value, 1, 1_000_000)? as usize
            }
            "offsets.topic.num.partitions" => {
                self.offsets_topic_partitions = parse_in(value, 1, 10_000)? as i32
            }
            "group.initial.rebalance.delay.ms" => {
                self.group_initial_rebalance_delay_ms = parse_in(value, 0, i32::MAX as i64)? as u64
            }
            "group.consumer.session.timeout.ms" => {
                self.group_consumer_session_timeout_ms = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "group.consumer.heartbeat.interval.ms" => {
                self.group_consumer_heartbeat_interval_ms =
                    parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "group.consumer.assignors" => {
                let mut names = Vec::new();
                for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    // Kafka names them by class; strom takes those and the short names.
                    let name = match item {
                        "org.apache.kafka.coordinator.group.assignor.UniformAssignor" => "uniform",
                        "org.apache.kafka.coordinator.group.assignor.RangeAssignor" => "range",
                        other => other,
                    };
                    if !crate::group::consumer::ASSIGNORS.contains(&name) {
                        bail!(
                            "group.consumer.assignors: unknown assignor '{item}' (strom has {})",
                            crate::group::consumer::ASSIGNORS.join(", ")
                        );
                    }
                    names.push(name.to_string());
                }
                if names.is_empty() {
                    bail!("group.consumer.assignors needs at least one assignor");
                }
                self.group_consumer_assignors = names;
            }
            "group.share.record.lock.duration.ms" => {
                self.group_share_record_lock_duration_ms = parse_in(value, 1000, 3_600_000)? as u64
            }
            "group.share.delivery.count.limit" => {
                self.group_share_delivery_count_limit = parse_in(value, 2, 10)? as i16
            }
            "group.share.partition.max.record.locks" => {
                self.group_share_partition_record_locks_max = parse_in(value, 100, 10_000)? as usize
            }
            "group.share.max.size" => {
                self.group_share_max_size = parse_in(value, 1, 1000)? as usize
            }
            "group.share.heartbeat.interval.ms" => {
                self.group_share_heartbeat_interval_ms = parse_in(value, 1, i32::MAX as i64)? as u64
            }
            "group.share.session.timeout.ms" => {
                self.group_share_session_timeout_ms = parse_in(value, 1, i32::MAX as i64)? as u64
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
                BROKER_SETTINGS
                    .iter()
                    .map(|d| d.name)
                    .collect::<Vec<_>>()
                    .join(", ")
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

fn parse_ratio(value: &str) -> Result<f64> {
    let v: f64 = value
        .parse()
        .map_err(|_| anyhow!("'{value}' is not a number"))?;
    if !(0.0..=1.0).contains(&v) {
        bail!("{v} is outside the allowed range 0..=1");
    }
    Ok(v)
}

fn parse_enum(value: &str, allowed: &[&str]) -> Result<String> {
    if allowed.contains(&value) {
        Ok(value.to_string())
    } else {
        bail!("'{value}' is not one of {}", allowed.join(", "))
    }
}

/// `delete`, `compact`, or both (comma-separated, either order), normalized.
pub fn parse_cleanup_policy(value: &str) -> Result<String> {
    let mut delete = false;
    let mut compact = false;
    for part in value.split(',').map(str::trim) {
        match part {
            "delete" => delete = true,
            "compact" => compact = true,
            _ => bail!("'{part}' is not delete or compact"),
        }
    }
    Ok(match (compact, delete) {
        (true, true) => "compact,delete",
        (true, false) => "compact",
        _ => "delete",
    }
    .to_string())
}

fn parse_bool(value: &str) -> Result<bool> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => bail!("'{value}' is not true or false"),
    }
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

/// Parses `controller.quorum.voters`: `id@host:port` entries separated by commas, ids unique.
fn parse_voters(value: &str) -> Result<Vec<(i32, (String, u16))>> {
    let mut voters = Vec::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (id, address) = entry
            .split_once('@')
            .ok_or_else(|| anyhow!("voter '{entry}' is not id@host:port"))?;
        let id: i32 = id
            .trim()
            .parse()
            .map_err(|_| anyhow!("voter id in '{entry}' is not a number"))?;
        if id < 0 {
            bail!("voter id in '{entry}' is negative");
        }
        if voters.iter().any(|(v, _)| *v == id) {
            bail!("voter id {id} appears twice");
        }
        voters.push((id, parse_listener(address)?));
    }
    if voters.is_empty() {
        bail!("controller.quorum.voters names no voter");
    }
    Ok(voters)
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
    /// The admin HTTP port (`/metrics`, `/v1/status`).
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub cores: Vec<usize>,
    pub broker: BrokerConfig,
    /// The last run stopped cleanly (its marker was found): partitions trust their active
    /// segments' indexes and producer snapshots instead of scanning.
    pub clean_start: bool,
}

/// Checks one topic config; the error text is returned to the client with `INVALID_CONFIG`.
pub fn validate_topic_setting(name: &str, value: &str) -> std::result::Result<(), String> {
    if let Some(s) = STORED_TOPIC_SETTINGS.iter().find(|s| s.name == name) {
        return check_stored(s, value);
    }
    let Some((_, broker_name, _)) = TOPIC_SETTINGS.iter().find(|(n, _, _)| *n == name) else {
        return Err(format!("Unknown topic config name: {name}"));
    };
    let mut probe = BrokerConfig::default();
    probe
        .apply(broker_name, value)
        .map_err(|e| format!("Invalid value {value} for configuration {name}: {e}"))
}

/// The effective per-topic log settings: topic overrides on top of broker defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub segment_size_bytes: u64,
    pub segment_age_ms: u64,
    pub index_interval_bytes: u64,
    pub batch_size_bytes_max: usize,
    pub log_append_time: bool,
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub delete: bool,
    pub compact: bool,
    pub delete_retention_ms: i64,
    pub min_cleanable_dirty_ratio: f64,
    pub min_compaction_lag_ms: i64,
    /// With one replica per partition, `acks=all` fails with NOT_ENOUGH_REPLICAS above 1.
    pub min_insync_replicas: i32,
}

impl LogConfig {
    pub fn resolve(broker: &BrokerConfig, topic: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| topic.get(k).and_then(|v| v.parse::<i64>().ok());
        let policy = topic
            .get("cleanup.policy")
            .and_then(|p| parse_cleanup_policy(p).ok())
            .unwrap_or_else(|| broker.cleanup_policy.clone());
        LogConfig {
            segment_size_bytes: get("segment.bytes")
                .map_or(broker.segment_size_bytes, |v| v.max(14) as u64),
            segment_age_ms: get("segment.ms").map_or(broker.segment_age_ms, |v| v.max(1) as u64),
            index_interval_bytes: get("index.interval.bytes")
                .map_or(broker.index_interval_bytes, |v| v.max(1) as u64),
            batch_size_bytes_max: get("max.message.bytes")
                .map_or(broker.batch_size_bytes_max, |v| v.max(1) as usize),
            log_append_time: topic
                .get("message.timestamp.type")
                .map_or(broker.message_timestamp_type.as_str(), String::as_str)
                == "LogAppendTime",
            retention_ms: get("retention.ms").unwrap_or(broker.retention_ms),
            retention_bytes: get("retention.bytes").unwrap_or(broker.retention_bytes),
            delete: policy.contains("delete"),
            compact: policy.contains("compact"),
            delete_retention_ms: get("delete.retention.ms").unwrap_or(broker.delete_retention_ms),
            min_cleanable_dirty_ratio: topic
                .get("min.cleanable.dirty.ratio")
                .and_then(|v| v.parse().ok())
                .unwrap_or(broker.min_cleanable_dirty_ratio),
            min_compaction_lag_ms: get("min.compaction.lag.ms")
                .unwrap_or(broker.min_compaction_lag_ms),
            min_insync_replicas: get("min.insync.replicas")
                .map_or(broker.min_insync_replicas, |v| {
                    i32::try_from(v).unwrap_or(i32::MAX)
                }),
        }
    }
}

/// A topic config's value and source, as DescribeConfigs shows it: the topic's override, else the
/// broker setting it defaults to (which may itself be static, dynamic or a default).
pub fn describe_topic_setting(
    broker: &BrokerConfig,
    topic: &BTreeMap<String, String>,
    name: &str,
) -> Option<(Option<String>, ConfigSource)> {
    if let Some(v) = topic.get(name) {
        return Some((Some(v.clone()), ConfigSource::DynamicTopic));
    }
    if let Some(s) = STORED_TOPIC_SETTINGS.iter().find(|s| s.name == name) {
        return Some((Some(s.default.to_string()), ConfigSource::Default));
    }
    let (_, broker_name, _) = TOPIC_SETTINGS.iter().find(|(n, _, _)| *n == name)?;
    let (_, source) = broker.describe(broker_name)?;
    let effective = match name {
        "retention.ms" => broker.retention_ms.to_string(),
        "segment.ms" => broker.segment_age_ms.to_string(),
        "cleanup.policy" => broker.cleanup_policy.clone(),
        "min.cleanable.dirty.ratio" => broker.min_cleanable_dirty_ratio.to_string(),
        _ => broker.describe(broker_name)?.0.unwrap_or_default(),
    };
    let source = match (name, source) {
        // retention.ms and segment.ms follow the hours/minutes layers when the ms one is unset.
        ("retention.ms", ConfigSource::Default) => {
            broker_layer_source(broker, &["log.retention.minutes", "log.retention.hours"])
        }
        ("segment.ms", ConfigSource::Default) => broker_layer_source(broker, &["log.roll.hours"]),
        (_, s) => s,
    };
    Some((Some(effective), source))
}

fn broker_layer_source(broker: &BrokerConfig, names: &[&str]) -> ConfigSource {
    names
        .iter()
        .filter_map(|n| broker.describe(n))
        .map(|(_, s)| s)
        .find(|s| *s != ConfigSource::Default)
        .unwrap_or(ConfigSource::Default)
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
    fn the_cache_is_as_set_or_an_eighth_of_memory_among_the_shards() {
        let set = BrokerConfig::load(None, &["strom.cache.bytes.per.shard=65536".into()]).unwrap();
        assert_eq!(set.cache_bytes_per_shard(4), 65536);
        let auto = BrokerConfig::default();
        let memory = usable_memory_bytes().unwrap();
        for shards in [1, 2, 64] {
            let each = auto.cache_bytes_per_shard(shards) as u64;
            let share = memory / 8 / shards as u64;
            assert_eq!(
                each,
                share.max(CACHE_BYTES_PER_SHARD_MIN as u64),
                "{shards} shards"
            );
        }
        let back = BrokerConfig::load(None, &["strom.cache.bytes.per.shard=-1".into()]).unwrap();
        assert_eq!(back.cache_size_bytes_per_shard, None);
    }

    #[test]
    fn retention_hours_default_and_override() {
        assert_eq!(BrokerConfig::default().retention_ms, 168 * 3_600_000);
        let c = BrokerConfig::load(None, &["log.retention.hours=2".into()]).unwrap();
        assert_eq!(c.retention_ms, 2 * 3_600_000);
        let c = BrokerConfig::load(
            None,
            &["log.retention.hours=2".into(), "log.retention.ms=5".into()],
        )
        .unwrap();
        assert_eq!(c.retention_ms, 5);
        assert_eq!(
            c.describe("log.retention.hours"),
            Some((Some("2".to_string()), ConfigSource::StaticBroker))
        );
        assert_eq!(
            BrokerConfig::default().describe("log.retention.hours"),
            Some((Some("168".to_string()), ConfigSource::Default))
        );
    }

    #[test]
    fn every_setting_default_parses() {
        for d in BROKER_SETTINGS {
            if let Some(v) = d.default {
                BrokerConfig::default().apply(d.name, v).unwrap();
            }
        }
        for (name, _, _) in TOPIC_SETTINGS {
            let (value, _) =
                describe_topic_setting(&BrokerConfig::default(), &BTreeMap::new(), name).unwrap();
            validate_topic_setting(name, &value.unwrap()).unwrap();
        }
    }

    #[test]
    fn topic_settings_validate() {
        assert!(validate_topic_setting("retention.ms", "-1").is_ok());
        assert!(validate_topic_setting("cleanup.policy", "compact,delete").is_ok());
        assert!(validate_topic_setting("cleanup.policy", "shred").is_err());
        assert!(validate_topic_setting("segment.bytes", "1").is_err());
        assert!(validate_topic_setting("no.such.config", "1").is_err());
        assert!(validate_topic_setting("flush.ms", "1000").is_ok());
        assert!(validate_topic_setting("flush.ms", "-5").is_err());
        assert!(validate_topic_setting("message.format.version", "2.8").is_ok());
        assert!(validate_topic_setting("message.format.version", "banana").is_err());
        assert!(validate_topic_setting("leader.replication.throttled.replicas", "0:1,1:1").is_ok());
        for s in STORED_TOPIC_SETTINGS {
            validate_topic_setting(s.name, s.default).unwrap();
        }
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
