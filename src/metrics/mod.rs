//! Broker metrics: per shard, an HDR latency histogram and counters per Kafka API, plus shard-wide
//! counters (bytes in/out, records produced, cross-shard hops, cache hits and misses, fsyncs).
//!
//! Recording is thread-local to the shard (no atomics, no locks on the data path). Once a second
//! each shard copies its numbers into its slot of the [`MetricsHub`]; the admin HTTP server
//! merges the slots on a scrape and encodes them as Prometheus text with `prometheus-client`.

pub mod admin;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Request latencies are recorded in microseconds up to this bound (longer ones saturate).
const LATENCY_US_MAX: u64 = 3_600_000_000;

/// Shard-wide counters, indexed by [`Counter`].
#[derive(Clone, Copy, Debug)]
pub enum Counter {
    BytesIn,
    BytesOut,
    RecordsProduced,
    CrossShardRequests,
    CacheHits,
    CacheMisses,
    ReadAheadHits,
    Fsyncs,
    JournalRounds,
    JournalBytes,
    JournalCheckpoints,
    JournalCheckpointWaits,
    WriteBehindWaits,
    ConnectionsAccepted,
    ConnectionsClosed,
    PeerConnectionsOpened,
    RaftMessagesDropped,
    RaftMessagesSent,
    RaftFramesSent,
    TransactionsCommitted,
    TransactionsAborted,
}

pub const COUNTERS: [(Counter, &str, &str); 21] = [
    (Counter::BytesIn, "strom_bytes_in", "Request bytes received"),
    (Counter::BytesOut, "strom_bytes_out", "Response bytes sent"),
    (
        Counter::RecordsProduced,
        "strom_records_produced",
        "Records appended by produce",
    ),
    (
        Counter::CrossShardRequests,
        "strom_cross_shard_requests",
        "Requests sent to another shard over the mesh",
    ),
    (
        Counter::CacheHits,
        "strom_fetch_cache_hits",
        "Partition reads served from the batch cache",
    ),
    (
        Counter::CacheMisses,
        "strom_fetch_cache_misses",
        "Partition reads served from segments on disk",
    ),
    (
        Counter::ReadAheadHits,
        "strom_fetch_readahead_hits",
        "Partition reads from disk that a read-ahead had started before they were asked for",
    ),
    (
        Counter::Fsyncs,
        "strom_fsyncs",
        "fdatasync calls on segment and journal files",
    ),
    (
        Counter::JournalRounds,
        "strom_journal_rounds",
        "Flush rounds written to the shards' journals (each covers every partition with queued batches)",
    ),
    (
        Counter::JournalBytes,
        "strom_journal_bytes",
        "Bytes written to the shards' journals, alignment padding included",
    ),
    (
        Counter::JournalCheckpoints,
        "strom_journal_checkpoints",
        "Journal files whose partitions' segments were fdatasynced so that the file could be reused",
    ),
    (
        Counter::JournalCheckpointWaits,
        "strom_journal_checkpoint_waits",
        "Times the journal writer reached a file whose checkpoint had not finished and waited",
    ),
    (
        Counter::WriteBehindWaits,
        "strom_write_behind_waits",
        "Times a partition waited for its segment writes to catch up before taking more batches",
    ),
    (
        Counter::ConnectionsAccepted,
        "strom_connections_accepted",
        "Client connections accepted",
    ),
    (
        Counter::ConnectionsClosed,
        "strom_connections_closed",
        "Client connections closed",
    ),
    (
        Counter::PeerConnectionsOpened,
        "strom_peer_connections_opened",
        "Connections opened to other brokers' client listeners (requests passed on, reads from other leaders, transaction markers); kept open between requests",
    ),
    (
        Counter::RaftMessagesDropped,
        "strom_raft_messages_dropped",
        "Raft messages dropped because a peer's queue was full",
    ),
    (
        Counter::RaftMessagesSent,
        "strom_raft_messages_sent",
        "Raft messages sent to other brokers, all groups",
    ),
    (
        Counter::RaftFramesSent,
        "strom_raft_frames_sent",
        "Frames that carried them: heartbeats of all groups to one broker travel in one frame",
    ),
    (
        Counter::TransactionsCommitted,
        "strom_transactions_committed",
        "Transactions this broker coordinated to a commit, markers written",
    ),
    (
        Counter::TransactionsAborted,
        "strom_transactions_aborted",
        "Transactions this broker coordinated to an abort (asked for, fenced or timed out), markers written",
    ),
];

/// Shard-wide latency histograms of the broker's own operations, indexed by [`Timing`]: they
/// tell an operator whether a produce's tail came from the device or from the shard's CPU.
#[derive(Clone, Copy, Debug)]
pub enum Timing {
    /// One journal round's write, from submitted to completed.
    JournalWrite,
    /// One journal fdatasync (the device flush every `acks=all` produce on the shard waits for).
    JournalSync,
    /// A checkpoint's syncfs, making the segments behind a journal file durable.
    CheckpointSync,
    /// How late the shard's probe timer fired: the time the shard's thread spent on other tasks
    /// or was not run by the kernel, which every task on the shard waited too.
    ShardLateness,
}

pub const TIMINGS: [(Timing, &str, &str); 4] = [
    (
        Timing::JournalWrite,
        "strom_journal_write_latency_microseconds",
        "Journal round writes, submitted to completed, per shard",
    ),
    (
        Timing::JournalSync,
        "strom_journal_sync_latency_microseconds",
        "Journal fdatasyncs (acks=all produces wait for them), per shard",
    ),
    (
        Timing::CheckpointSync,
        "strom_checkpoint_sync_latency_microseconds",
        "Journal checkpoints' syncfs of the segments' file system, per shard",
    ),
    (
        Timing::ShardLateness,
        "strom_shard_lateness_microseconds",
        "How late a shard's 10 ms probe timer fired (the shard busy with other tasks, or its thread not run), per shard",
    ),
];

/// How often each shard's lateness probe wakes.
pub const LATENESS_PROBE: Duration = Duration::from_millis(10);

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid histogram bounds")
}

/// One API's numbers on one shard.
#[derive(Clone)]
pub struct ApiStats {
    pub latency_us: Histogram<u64>,
    pub requests: u64,
    pub errors: u64,
}

impl ApiStats {
    fn new() -> Self {
        ApiStats {
            latency_us: latency_histogram(),
            requests: 0,
            errors: 0,
        }
    }
}

/// Everything one shard reports.
#[derive(Clone, Default)]
pub struct ShardSnapshot {
    pub apis: BTreeMap<i16, ApiStats>,
    pub counters: [u64; COUNTERS.len()],
    /// By [`Timing`]; empty until the shard records its first timing.
    pub timings: Vec<Histogram<u64>>,
    pub partitions: u64,
    /// The Raft groups this shard drives (a cluster).
    pub raft: Vec<RaftGauge>,
}

/// One Raft group's state as `/metrics` shows it.
#[derive(Clone, Debug, Default)]
pub struct RaftGauge {
    pub group: String,
    pub leader: i32,
    pub term: u64,
    pub commit_index: u64,
    /// On the leader: the replicas in sync (itself included) and each follower's lag in entries.
    pub in_sync: usize,
    pub follower_lag: Vec<(i32, u64)>,
}

thread_local! {
    static LOCAL: RefCell<ShardSnapshot> = RefCell::new(ShardSnapshot::default());
}

/// The one bucket every request for an API strom does not serve is counted in. The table of
/// histograms is thereby fixed in size: one per served API plus this one, whatever clients send
/// (a histogram per distinct unknown key once let 30,000 tiny frames take gigabytes).
pub const UNSUPPORTED_API_BUCKET: i16 = -1;

/// Records one handled request on this shard.
pub fn record_request(api_key: i16, latency: Duration, error: bool) {
    let served = crate::protocol::SUPPORTED_APIS
        .iter()
        .any(|(key, _, _)| *key as i16 == api_key);
    let bucket = if served {
        api_key
    } else {
        UNSUPPORTED_API_BUCKET
    };
    LOCAL.with(|m| {
        let mut m = m.borrow_mut();
        let stats = m.apis.entry(bucket).or_insert_with(ApiStats::new);
        stats.requests += 1;
        if error {
            stats.errors += 1;
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        stats.latency_us.saturating_record(us.max(1));
    });
}

/// Records one timing of the broker's own operations on this shard.
pub fn record_timing(timing: Timing, took: Duration) {
    LOCAL.with(|m| {
        let mut m = m.borrow_mut();
        if m.timings.is_empty() {
            m.timings = TIMINGS.iter().map(|_| latency_histogram()).collect();
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        m.timings[timing as usize].saturating_record(us.max(1));
    });
}

/// Whether a shard may log a warning about its own timings now: at most once a second, so that
/// a slow device is reported without flooding the log.
pub fn may_warn() -> bool {
    thread_local! {
        static LAST: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }
    LAST.with(|last| {
        let now = Instant::now();
        let due = last
            .get()
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            last.set(Some(now));
        }
        due
    })
}

/// Adds `n` to a shard-wide counter.
pub fn add(counter: Counter, n: u64) {
    LOCAL.with(|m| {
        let mut m = m.borrow_mut();
        m.counters[counter as usize] = m.counters[counter as usize].wrapping_add(n);
    });
}

/// The shards' latest snapshots, shared with the admin server.
pub struct MetricsHub {
    slots: Vec<Mutex<ShardSnapshot>>,
    pub started: Instant,
    pub status: Mutex<StatusInfo>,
}

/// Facts /v1/status reports, set by shard 0.
#[derive(Clone, Default)]
pub struct StatusInfo {
    pub node_id: i32,
    pub cluster_id: String,
    pub topics: usize,
}

impl MetricsHub {
    pub fn new(shards: usize) -> Arc<MetricsHub> {
        Arc::new(MetricsHub {
            slots: (0..shards)
                .map(|_| Mutex::new(ShardSnapshot::default()))
                .collect(),
            started: Instant::now(),
            status: Mutex::new(StatusInfo::default()),
        })
    }

    pub fn shards(&self) -> usize {
        self.slots.len()
    }

    /// Copies this shard's thread-local numbers into its slot (called about once a second).
    pub fn publish(&self, shard: usize, partitions: u64, raft: Vec<RaftGauge>) {
        let mut snapshot = LOCAL.with(|m| m.borrow().clone());
        snapshot.partitions = partitions;
        snapshot.raft = raft;
        if let Some(slot) = self.slots.get(shard) {
            if let Ok(mut s) = slot.lock() {
                *s = snapshot;
            }
        }
    }

    pub fn snapshots(&self) -> Vec<ShardSnapshot> {
        self.slots
            .iter()
            .map(|s| s.lock().map(|g| g.clone()).unwrap_or_default())
            .collect()
    }
}
