//! Clean shutdown. SIGTERM or SIGINT sets [`request`]; then every shard, in step with the others:
//!
//! 1. stops accepting, and each connection stops reading at its next frame boundary, answers
//!    what it already read, and closes (a client that does not take its answers within
//!    [`DRAIN_GRACE`] is left behind);
//! 2. waits for every shard to get there (their drained requests may still append to partitions
//!    this shard owns);
//! 3. shuts down every partition it owns: everything accepted written and fdatasynced, the active
//!    segment cut to its last batch with its indexes written, producer state saved;
//! 4. waits for every shard again, and stops.
//!
//! When every shard closed every partition, the broker writes the clean-shutdown marker
//! ([`MARKER`]) in the data directory. The next start removes it (durably) before serving and
//! trusts the logs as they were left; without it, recovery CRC-scans each active segment.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::{join_all, Shard};
use crate::model::TopicPartition;
use crate::storage::PartitionLog;

/// The marker file a clean shutdown leaves in the data directory.
pub const MARKER: &str = "clean_shutdown";

/// How long connections get to answer what they already read.
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);

static REQUESTED: AtomicBool = AtomicBool::new(false);
static DRAINED: AtomicUsize = AtomicUsize::new(0);
static CLOSED: AtomicUsize = AtomicUsize::new(0);

/// Asks every shard to shut down cleanly (called from the signal thread).
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Completes once a shutdown is requested. Polled from each shard's executor: the signal thread
/// cannot wake a glommio executor directly, and a 50 ms check costs nothing.
pub async fn wait_requested() {
    while !requested() {
        glommio::timer::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (without blocking the executor, whose tasks other shards may still need) until all
/// `shards` have arrived at this step.
async fn all_arrive(step: &AtomicUsize, shards: usize) {
    step.fetch_add(1, Ordering::SeqCst);
    while step.load(Ordering::SeqCst) < shards {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
}

/// What one shard's shutdown did.
#[derive(Debug, Default)]
pub struct ShardReport {
    pub partitions: usize,
    pub failed: Vec<(TopicPartition, String)>,
    /// Connections still open when [`DRAIN_GRACE`] ran out.
    pub abandoned_connections: usize,
}

/// How long a shutdown step may take before the watchdog logs what it waits on.
const STUCK_AFTER: Duration = Duration::from_secs(5);

/// Steps 1–4 for one shard, after its listener stopped accepting.
pub async fn finish(shard: &Rc<Shard>) -> ShardReport {
    let started = Instant::now();
    let step: Rc<Cell<&'static str>> = Rc::new(Cell::new("draining connections"));
    let open: Rc<RefCell<HashMap<TopicPartition, PartitionLog>>> = Rc::default();
    // Dropped (cancelled) when the shard has stopped.
    let _watchdog = glommio::spawn_local(watch(shard.clone(), step.clone(), open.clone(), started));
    let abandoned_connections = shard.drain_connections(DRAIN_GRACE).await;
    shard.peer_connections.clear();
    step.set("waiting for the other shards to drain");
    all_arrive(&DRAINED, shard.count).await;
    // Raft groups stop before their partitions close: nothing is applied to a closed log, and
    // no WAL sync is left running on the blocking thread.
    if let Some(cluster) = shard.cluster() {
        step.set("stopping raft groups");
        cluster.stop_groups().await;
    }
    step.set("shutting down partitions");
    let partitions = shard.owned_partitions();
    open.borrow_mut().extend(partitions.iter().cloned());
    let results = join_all(
        partitions
            .iter()
            .map(|(tp, log)| {
                let open = open.clone();
                async move {
                    let result = log.shutdown().await;
                    open.borrow_mut().remove(tp);
                    (tp.clone(), result)
                }
            })
            .collect(),
    )
    .await;
    let failed: Vec<_> = results
        .into_iter()
        .filter_map(|(tp, r)| r.err().map(|e| (tp, format!("{e:#}"))))
        .collect();
    for (tp, why) in &failed {
        tracing::error!(partition = %tp, error = %why, "partition did not shut down cleanly");
    }
    // Blocking calls still out (a connection attempt to a peer, a snapshot copy) end before the
    // executor does.
    step.set("waiting for blocking calls");
    let running = crate::storage::files::blocking_drained(Duration::from_secs(5)).await;
    if running > 0 {
        tracing::warn!(
            shard = shard.id.0,
            running,
            "blocking calls still running at shutdown"
        );
    }
    step.set("waiting for the other shards to close");
    all_arrive(&CLOSED, shard.count).await;
    tracing::info!(
        shard = shard.id.0,
        partitions = partitions.len(),
        failed = failed.len(),
        abandoned_connections,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "shard stopped: partitions flushed, fdatasynced and closed"
    );
    ShardReport {
        partitions: partitions.len(),
        failed,
        abandoned_connections,
    }
}

/// Every [`STUCK_AFTER`] while the shard's shutdown runs: logs the step it is in and, while
/// partitions are shutting down, what the slowest of them and the shard's journal wait on. A
/// shutdown that never finishes then says why.
async fn watch(
    shard: Rc<Shard>,
    step: Rc<Cell<&'static str>>,
    open: Rc<RefCell<HashMap<TopicPartition, PartitionLog>>>,
    started: Instant,
) {
    loop {
        glommio::timer::sleep(STUCK_AFTER).await;
        let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let waiting: Vec<String> = open
            .borrow()
            .iter()
            .take(8)
            .map(|(tp, log)| format!("{tp}: {}", log.progress_summary()))
            .collect();
        tracing::warn!(
            shard = shard.id.0,
            step = step.get(),
            elapsed_ms,
            partitions_open = open.borrow().len(),
            journal = %shard.journal.as_ref().map_or_else(|| "none".to_string(), |j| j.progress_summary()),
            "shutdown is taking long"
        );
        for line in waiting {
            tracing::warn!(shard = shard.id.0, "shutdown waits on partition {line}");
        }
    }
}

/// Takes the marker a clean shutdown left (removing it durably, so that a crash from here on is
/// recovered by scanning); returns whether it was there.
pub fn take_marker(data_dir: &Path) -> Result<bool> {
    let marker = data_dir.join(MARKER);
    match std::fs::remove_file(&marker) {
        Ok(()) => {
            sync_dir(data_dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("removing {}", marker.display())),
    }
}

/// Writes the clean-shutdown marker durably.
pub fn write_marker(data_dir: &Path) -> Result<()> {
    let marker = data_dir.join(MARKER);
    let file =
        std::fs::File::create(&marker).with_context(|| format!("creating {}", marker.display()))?;
    file.sync_all()?;
    sync_dir(data_dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}
