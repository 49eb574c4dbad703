//! A partition's log: its segments, the offsets it has assigned, written and made durable, the
//! recent-batch cache, and idempotent-producer state. Owned by exactly one shard; every access is
//! from that shard's executor, so the state sits in a `RefCell` that is never borrowed across an
//! `.await`.
//!
//! Produce is split in two so that offsets follow arrival order without any await in between:
//! [`PartitionLog::append`] validates, deduplicates and assigns offsets synchronously and queues the
//! bytes; the partition's flusher task writes queued batches in large aligned DMA writes (group
//! commit) and fdatasyncs when an `acks=all` producer waits. Offsets:
//! `log_start <= durable <= high_watermark <= next_offset`, where `high_watermark` is what has been
//! written and is visible to fetches, and `durable` what has been fdatasynced.
//!
//! # Write-behind
//! Once the shard's journal is attached ([`super::journal`]), a chunk the flusher takes is
//! submitted to the journal, which makes it durable, and becomes visible at once: it waits in
//! `unwritten` (served to fetches from memory) for the partition's writer task, which writes it
//! to the active segment in one aligned write once [`WRITE_BEHIND_BYTES`] have gathered, the
//! shard holds more than [`SHARD_WRITE_BEHIND_MAX`] unwritten, or someone needs the segment
//! itself: a journal checkpoint (before the journal reuses the file holding the batches), a
//! roll, a truncation or shutdown. Segment writes thus leave the produce path: with one small
//! write per partition per request, 1,000 partitions meant 1,000 extending O_DIRECT writes, each
//! a trip through the kernel's io_uring workers, before a record became visible. Without a
//! journal (or before it opens) the flusher writes the segment itself and fdatasyncs it.
//! Offsets: `log_start <= written_end <= high_watermark`, where `written_end` is the front of
//! `unwritten` (the high watermark when it is empty).
//!
//! # Large chunks bypass the journal
//! A chunk of `strom.journal.bypass.bytes` ([`Journal::bypass_bytes`]) or more goes straight to
//! the segment (after whatever is unwritten) and is made durable there with an fdatasync, whether
//! or not a producer waits for it: a later chunk's journal round may only claim durability up to
//! its end if everything before it is durable. The journal exists to share one sync among many
//! small chunks; a chunk that large has a sync to itself anyway, and journaling it would write
//! every byte twice. With `rdkafka_performance` producing flat out (1 MB batches, 16 partitions,
//! `acks=all`) the device wrote 4.3 GB for 2 GB produced through the journal, and the write
//! bandwidth, not the CPU, was what ran out first.
//!
//! For replication the log is already shaped as a Raft log would need: every batch carries the
//! leader epoch in `partitionLeaderEpoch`, the partition's epoch is persisted in `partition.meta`,
//! and recovery truncates to the last valid batch.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use event_listener::Event;

use super::batch::{self, BatchHeader};
use super::files::{self, GlommioResultExt};
use super::journal::Journal;
use super::open_files::FileSlot;
use super::read::Batches;
use super::segment::{self, Segment};
use super::txn::{self, AbortedTxn, TxnState};
use crate::config::LogConfig;
use crate::model::{Epoch, ErrorCode, Offset, TopicPartition};

/// Largest single DMA write the flusher issues.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// With the journal attached, a partition writes its segment once this much is journaled but
/// not yet written, and at most this much at once (see "Write-behind" in [`PartitionLog`]).
/// Larger writes hurt the tail: at 50,000 msg/s over 16 partitions the e2e p99.9 was 3.1 ms
/// with 32 and 64 KiB, 3.9 ms with 128 KiB, 40 ms with 256 KiB and 44 ms with 4 MiB (one run
/// each): the journal's small rounds queue behind them at the device.
const WRITE_BEHIND_BYTES: usize = 64 << 10;
/// A partition's unwritten bytes at which its flusher waits for the writer before taking more:
/// the journal is faster than a segment's writes, and a producer that does not wait (acks=0)
/// must not make the backlog grow without bound.
const PARTITION_WRITE_BEHIND_MAX: usize = 4 << 20;
/// A shard's journaled-but-unwritten bytes above which every partition that has some writes them
/// out, and takes no more until it has.
const SHARD_WRITE_BEHIND_MAX: usize = 64 << 20;
/// Kafka keeps the last five batches per producer for duplicate detection.
const PRODUCER_BATCHES_KEPT: usize = 5;
const META_VERSION: u32 = 1;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Who writes a batch: a producer, or a coordinator of strom's own (transaction markers,
/// transactional offset commits), whose batches carry no sequence and may be control batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Client,
    Coordinator,
}

/// strom's own per-partition metadata, persisted with rkyv in `partition.meta`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct PartitionMeta {
    pub topic: String,
    pub partition: i32,
    pub topic_id: [u8; 16],
    pub leader_epoch: i32,
    pub log_start_offset: i64,
}

enum RetentionStep {
    DeleteOldest,
    RollActive,
}

struct PendingBatch {
    header: BatchHeader,
    bytes: Bytes,
}

#[derive(Clone)]
struct CachedBatch {
    base_offset: Offset,
    last_offset: Offset,
    bytes: Bytes,
}

#[derive(Clone, Copy)]
struct ProducerBatch {
    first_sequence: i32,
    last_sequence: i32,
    base_offset: Offset,
    last_offset: Offset,
}

struct ProducerState {
    epoch: i16,
    batches: VecDeque<ProducerBatch>,
    /// Max timestamp of the producer's last batch (DescribeProducers).
    last_timestamp: i64,
}

/// An idempotent producer as DescribeProducers shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActiveProducer {
    pub producer_id: i64,
    /// Where its open transaction in this partition began (-1: none open).
    pub current_txn_start_offset: i64,
    pub epoch: i16,
    pub last_sequence: i32,
    pub last_timestamp: i64,
}

/// What an admin API asks of a partition: its bytes on disk, offsets and producers.
#[derive(Clone, Debug)]
pub struct PartitionFacts {
    pub size_bytes: u64,
    pub high_watermark: Offset,
    pub log_end: Offset,
    pub log_start: Offset,
    pub leader_epoch: i32,
    pub producers: Vec<ActiveProducer>,
    /// This broker serves the partition's reads and writes (always on a single node; in a
    /// cluster, while it leads the partition's Raft group).
    pub leading: bool,
}

/// What a successful append returns: where the batches went, and the offset to wait for.
#[derive(Clone, Copy, Debug)]
pub struct Appended {
    pub base_offset: Offset,
    /// One past the last offset appended; the produce is answered once this is written/durable.
    pub end_offset: Offset,
    /// Records newly appended (0 for an idempotent retry answered from the original).
    pub records: i64,
    pub log_append_time_ms: i64,
    pub log_start_offset: Offset,
}

/// Why an append was refused: Kafka's error code, and for records refused one by one (KIP-467)
/// their indexes in the batch with why.
#[derive(Clone, Debug, PartialEq)]
pub struct AppendError {
    pub code: ErrorCode,
    pub message: Option<String>,
    pub record_errors: Vec<(i32, String)>,
}

impl From<ErrorCode> for AppendError {
    fn from(code: ErrorCode) -> Self {
        AppendError {
            code,
            message: None,
            record_errors: Vec::new(),
        }
    }
}

impl AppendError {
    /// Kafka's answer to keyless records in a compacted topic: each one named, and the summary
    /// message `LogValidator` builds (at most three errors shown).
    fn keyless(tp: &TopicPartition, indexes: &[i32]) -> AppendError {
        let why =
            format!("Compacted topic cannot accept message without key in topic partition {tp}.");
        let record_errors: Vec<(i32, String)> = indexes.iter().map(|i| (*i, why.clone())).collect();
        let shown: Vec<String> = record_errors
            .iter()
            .take(3)
            .map(|(i, m)| format!("RecordError(batchIndex={i}, message='{m}')"))
            .collect();
        AppendError {
            code: ErrorCode::INVALID_RECORD,
            message: Some(format!(
                "One or more records have been rejected due to {} record errors in total, and only showing the first three errors at most: [{}]",
                record_errors.len(),
                shown.join(", ")
            )),
            record_errors,
        }
    }
}

/// The answer to a read: batches (possibly none) and the partition's offsets.
#[derive(Clone, Debug, Default)]
pub struct ReadResult {
    pub records: Batches,
    pub high_watermark: Offset,
    pub log_start_offset: Offset,
    pub last_stable_offset: Offset,
    /// For a `read_committed` read: the aborted transactions among the records returned.
    pub aborted: Vec<AbortedTxn>,
}

pub struct PartitionState {
    pub tp: TopicPartition,
    dir: PathBuf,
    config: LogConfig,
    meta: PartitionMeta,
    segments: Vec<Segment>,
    pub next_offset: Offset,
    pub high_watermark: Offset,
    durable: Offset,
    sync_wanted: Offset,
    log_start: Offset,
    pending: VecDeque<PendingBatch>,
    cache: VecDeque<CachedBatch>,
    cache_bytes: usize,
    pub cache_bytes_max: usize,
    producers: HashMap<i64, ProducerState>,
    /// Open and aborted transactions, as of the written batches (see [`super::txn`]).
    txns: TxnState,
    /// Retention asked the flusher to close the active segment (it expired by time).
    roll_requested: bool,
    /// Compaction has cleaned every closed segment below this offset.
    cleaned_upto: Offset,
    /// When the earliest tombstone kept by the last cleaning passes `delete.retention.ms`: the
    /// log is cleaned again then even if nothing new is dirty.
    tombstone_deadline_ms: Option<i64>,
    failed: bool,
    closed: bool,
    /// The next read of a consumer that reads from disk, started as its previous one finished.
    readahead: Option<ReadAhead>,
    /// The shard's journal, which makes written batches durable (see [`super::journal`]).
    journal: Option<Journal>,
    /// Everything written before the journal took over is durable in the segments, so journaled
    /// batches continue the segments' durable end on replay. Cleared when a chunk could not be
    /// journaled: the next flush syncs the segment before journaling again.
    journal_attached: bool,
    /// The ticket of the last chunk submitted to the journal.
    journal_ticket: Option<u64>,
    /// What a journal sync in flight will make durable: the flusher does not wait for it.
    durable_pending: Offset,
    /// Every offset below this is fdatasynced in the segments themselves (not only journaled).
    segments_durable: Offset,
    /// Batches made durable by the journal and readable from memory, not yet written to the
    /// active segment (write-behind, see [`PartitionLog`]), in offset order.
    unwritten: VecDeque<PendingBatch>,
    unwritten_bytes: usize,
    /// The segment writer has a write of `unwritten` batches in flight.
    writing: bool,
    /// Someone needs the segment written up to here (a journal checkpoint, a roll, shutdown).
    write_out_upto: Offset,
    /// The device (`st_dev`) of `dir`: a journal checkpoint syncs the file system it is on.
    device: u64,
}

/// Bytes of read-ahead a shard may have in flight or waiting (each partition holds at most one).
const READAHEAD_BYTES_MAX: usize = 64 << 20;

thread_local! {
    /// This shard's read-ahead bytes (one thread per shard).
    static READAHEAD_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// This shard's journaled batches not yet written to their segments.
    static UNWRITTEN_BYTES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn add_unwritten(delta: isize) {
    UNWRITTEN_BYTES.with(|b| b.set(b.get().saturating_add_signed(delta)));
}

/// A consumer that reads the log from disk (behind its cached tail) reads sequentially: as one
/// read is answered, the partition starts the next one (same offset it will ask for, same size)
/// so that the disk works while the response travels and the consumer parses it. A read that
/// asks for something else leaves it, and the bytes are dropped unused.
struct ReadAhead {
    from: Offset,
    max_bytes: usize,
    slot: Rc<RefCell<Option<Result<Bytes, ErrorCode>>>>,
    done: Rc<Event>,
}

impl ReadAhead {
    fn finished(&self) -> bool {
        self.slot.borrow().is_some()
    }

    async fn wait(self) -> Result<Bytes, ErrorCode> {
        loop {
            let listener = self.done.listen();
            if let Some(result) = self.slot.borrow_mut().take() {
                return result;
            }
            listener.await;
        }
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        READAHEAD_BYTES.with(|b| b.set(b.get().saturating_sub(self.max_bytes)));
    }
}

/// A shared handle to a partition on its owning shard: one reference count for the whole
/// handle, since a Fetch of 1,000 partitions clones and drops handles by the thousand.
#[derive(Clone)]
pub struct PartitionLog(Rc<LogShared>);

/// What the handles of one partition share.
pub struct LogShared {
    state: RefCell<PartitionState>,
    /// Notified when batches are queued or a sync is wanted: wakes the flusher.
    work: Event,
    /// Notified when journaled batches may be due for their segment write: wakes the writer.
    write_work: Event,
    /// Notified when `high_watermark` or `durable` advance, or the partition fails or closes.
    progress: Event,
    /// The owning shard's event for the same, shared by all of its partitions: one Fetch
    /// waiting on many partitions listens once there, not once per partition.
    shard_progress: RefCell<Option<Rc<Event>>>,
}

impl std::ops::Deref for PartitionLog {
    type Target = LogShared;

    fn deref(&self) -> &LogShared {
        &self.0
    }
}

impl PartitionLog {
    /// Opens (or creates) the partition in `dir`, recovering its log, and starts its flusher.
    pub async fn open(
        tp: TopicPartition,
        dir: PathBuf,
        topic_id: [u8; 16],
        config: LogConfig,
        cache_bytes_max: usize,
        clean: bool,
    ) -> Result<PartitionLog> {
        let meta_path = dir.join("partition.meta");
        let exists = {
            let path = meta_path.clone();
            files::blocking(move || path.exists()).await
        };
        let stored = if exists {
            let bytes = files::read_meta(&meta_path, META_VERSION).await?;
            Some(
                decode_partition_meta(&bytes)
                    .with_context(|| format!("decoding {}", meta_path.display()))?,
            )
        } else {
            None
        };
        let stored = match stored {
            Some(m) if m.topic_id != topic_id => {
                // Left by a deleted topic of the same name (a crash between the topic table and
                // the directory's removal): its records must never appear in the new topic.
                tracing::warn!(partition = %tp, dir = %dir.display(), "partition directory belongs to a deleted topic (topic id differs); deleting it");
                files::retire_dir(&dir).await?;
                None
            }
            other => other,
        };
        let meta = match stored {
            Some(meta) => meta,
            None => {
                let target = dir.clone();
                files::blocking(move || std::fs::create_dir_all(target))
                    .await
                    .with_context(|| format!("creating partition directory {}", dir.display()))?;
                if let Some(parent) = dir.parent() {
                    files::sync_dir(parent).await?;
                }
                let meta = PartitionMeta {
                    topic: tp.topic.to_string(),
                    partition: tp.partition.0,
                    topic_id,
                    leader_epoch: 0,
                    log_start_offset: 0,
                };
                write_partition_meta(&meta_path, &meta).await?;
                meta
            }
        };
        let mut bases = {
            let target = dir.clone();
            files::blocking(move || list_segments(&target)).await?
        };
        let now = now_ms();
        let mut segments = Vec::new();
        let mut producers = HashMap::new();
        if bases.is_empty() {
            bases.push(Offset(meta.log_start_offset));
            segments.push(Segment::create(&dir, bases[0], now).await?);
        } else {
            let last = bases.len() - 1;
            for (i, base) in bases.iter().enumerate() {
                let active = i == last;
                let (seg, scanned) =
                    Segment::open(&dir, *base, active, clean, config.index_interval_bytes, now)
                        .await?;
                if active {
                    match scanned {
                        Some(scanned) => {
                            for b in &scanned {
                                record_producer_batch(&mut producers, &b.header);
                            }
                        }
                        None => match load_producers(&dir, seg.end_offset).await {
                            Ok(loaded) => producers = loaded,
                            Err(e) => {
                                // Without the snapshot only the active segment's batches are
                                // known: scan it (what recovery after a crash does).
                                tracing::info!(partition = %tp, error = %format!("{e:#}"), "no usable producer snapshot; scanning the active segment");
                                let (seg, scanned) = Segment::open(
                                    &dir,
                                    *base,
                                    true,
                                    false,
                                    config.index_interval_bytes,
                                    now,
                                )
                                .await?;
                                for b in scanned.iter().flatten() {
                                    record_producer_batch(&mut producers, &b.header);
                                }
                                segments.push(seg);
                                continue;
                            }
                        },
                    }
                }
                segments.push(seg);
            }
        }
        let end = segments.last().map_or(Offset(0), |s| s.end_offset);
        let log_start = Offset(meta.log_start_offset).max(segments[0].base_offset);
        let mut txns = recover_txns(&tp, &dir, &segments, end).await?;
        let device = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .dev()
        };
        txns.forget_below(log_start);
        tracing::debug!(partition = %tp, end_offset = end.0, segments = segments.len(), "partition opened");
        let state = PartitionState {
            tp,
            dir,
            config,
            meta,
            segments,
            next_offset: end,
            high_watermark: end,
            durable: end,
            sync_wanted: end,
            log_start,
            pending: VecDeque::new(),
            cache: VecDeque::new(),
            cache_bytes: 0,
            cache_bytes_max,
            producers,
            txns,
            roll_requested: false,
            cleaned_upto: Offset(0),
            tombstone_deadline_ms: None,
            readahead: None,
            failed: false,
            closed: false,
            journal: None,
            journal_attached: false,
            journal_ticket: None,
            durable_pending: end,
            segments_durable: end,
            unwritten: VecDeque::new(),
            unwritten_bytes: 0,
            writing: false,
            write_out_upto: end,
            device,
        };
        let log = PartitionLog(Rc::new(LogShared {
            state: RefCell::new(state),
            work: Event::new(),
            write_work: Event::new(),
            progress: Event::new(),
            shard_progress: RefCell::new(None),
        }));
        let flusher = log.clone();
        glommio::spawn_local(async move { flusher.run_flusher().await }).detach();
        let writer = log.clone();
        glommio::spawn_local(async move { writer.run_writer().await }).detach();
        Ok(log)
    }

    pub fn topic_partition(&self) -> TopicPartition {
        self.state.borrow().tp.clone()
    }

    /// Applies changed topic or broker configs; takes effect from the next append or check.
    pub fn set_config(&self, config: LogConfig) {
        let mut st = self.state.borrow_mut();
        if st.config != config {
            tracing::debug!(partition = %st.tp, ?config, "log config changed");
            st.config = config;
        }
    }

    pub fn config(&self) -> LogConfig {
        self.state.borrow().config.clone()
    }

    /// Sets the partition's share of its shard's cache, letting its oldest batches go at once
    /// down to it (a partition no longer written to would otherwise keep a larger old share).
    pub fn set_cache_limit(&self, bytes: usize) {
        let mut st = self.state.borrow_mut();
        st.cache_bytes_max = bytes;
        st.trim_cache();
    }

    pub fn high_watermark(&self) -> Offset {
        self.state.borrow().high_watermark
    }

    pub fn log_start_offset(&self) -> Offset {
        self.state.borrow().log_start
    }

    /// The id of the topic this partition belongs to (a topic recreated under the same name has
    /// another).
    pub fn topic_id(&self) -> [u8; 16] {
        self.state.borrow().meta.topic_id
    }

    /// Kafka's checks on produced batches, before anything is accepted: sizes, CRC, record
    /// framing, keys on compacted topics, one batch per request for idempotent producers.
    /// Returns each batch's position and header.
    pub fn validate(
        &self,
        records: &[u8],
        origin: Origin,
    ) -> Result<Vec<(usize, BatchHeader)>, AppendError> {
        let st = self.state.borrow();
        if st.failed || st.closed {
            return Err(ErrorCode::KAFKA_STORAGE_ERROR.into());
        }
        let batches =
            batch::split_batches(records).map_err(|e| AppendError::from(e.error_code()))?;
        if batches.is_empty() {
            return Err(ErrorCode::CORRUPT_MESSAGE.into());
        }
        for (_, h) in &batches {
            if h.size_bytes > st.config.batch_size_bytes_max {
                return Err(ErrorCode::MESSAGE_TOO_LARGE.into());
            }
            if h.is_control() && origin == Origin::Client {
                // Markers come from the transaction coordinator, never from a producer.
                return Err(AppendError {
                    code: ErrorCode::INVALID_RECORD,
                    message: Some("control batches are written by the broker only".to_string()),
                    record_errors: Vec::new(),
                });
            }
            if h.is_transactional() && h.producer_id < 0 {
                return Err(ErrorCode::INVALID_RECORD.into());
            }
        }
        // Every record is walked (through the bounded decoder) before anything is accepted;
        // Kafka refuses keyless records on a compacted topic: there is no key to keep.
        for (pos, h) in &batches {
            let bytes = records
                .get(*pos..*pos + h.size_bytes)
                .ok_or(ErrorCode::CORRUPT_MESSAGE)?;
            match batch::check_records(bytes, h, st.config.compact) {
                Ok(()) => {}
                Err(batch::RecordsCheck::Keyless(at)) => {
                    return Err(AppendError::keyless(&st.tp, &at));
                }
                Err(e) => {
                    tracing::info!(partition = %st.tp, error = %e, "produced batch refused");
                    return Err(e.error_code().into());
                }
            }
        }
        if batches.len() > 1 && batches.iter().any(|(_, h)| h.producer_id >= 0) {
            // Kafka's producers send one batch per partition; more with producer ids is invalid.
            return Err(ErrorCode::INVALID_RECORD.into());
        }
        Ok(batches)
    }

    /// Checks an idempotent batch's sequence against the batches in the log: `Ok(Some((base,
    /// end)))` is a retry of a recent batch, with its offsets.
    pub fn check_sequence(&self, h: &BatchHeader) -> Result<Option<(Offset, Offset)>, ErrorCode> {
        Ok(self
            .state
            .borrow()
            .check_sequence(h)?
            .map(|dup| (dup.base_offset, dup.last_offset.next())))
    }

    /// A transaction marker must not come from an older producer epoch than the batches here.
    pub fn check_marker_epoch(&self, h: &BatchHeader) -> Result<(), ErrorCode> {
        self.state.borrow().check_marker_epoch(h)
    }

    /// Appends a batch that already has its offsets and leader epoch (a replica applying what
    /// Raft committed): stored byte for byte at the log end, which must be its base offset.
    pub fn append_replicated(&self, bytes: Bytes) -> Result<(), ErrorCode> {
        self.append_with_offsets(bytes, false)
    }

    /// Appends a batch copied from the leader's segments (a snapshot's records): as
    /// [`PartitionLog::append_replicated`], except that it may start past the log end, as a
    /// compacted log's batches do (Kafka's follower append takes increasing offsets, not dense
    /// ones).
    pub fn append_copied(&self, bytes: Bytes) -> Result<(), ErrorCode> {
        self.append_with_offsets(bytes, true)
    }

    fn append_with_offsets(&self, bytes: Bytes, gaps: bool) -> Result<(), ErrorCode> {
        let mut st = self.state.borrow_mut();
        if st.failed || st.closed {
            return Err(ErrorCode::KAFKA_STORAGE_ERROR);
        }
        let header = BatchHeader::parse(&bytes).map_err(|e| e.error_code())?;
        let placed = if gaps {
            header.base_offset >= st.next_offset
        } else {
            header.base_offset == st.next_offset
        };
        if !placed || header.size_bytes != bytes.len() {
            tracing::error!(partition = %st.tp, base = header.base_offset.0, log_end = st.next_offset.0, "replicated batch does not start at the log end");
            return Err(ErrorCode::KAFKA_STORAGE_ERROR);
        }
        if header.producer_id >= 0 {
            record_producer_batch(&mut st.producers, &header);
        }
        st.meta.leader_epoch = st.meta.leader_epoch.max(header.leader_epoch);
        st.next_offset = header.last_offset().next();
        st.pending.push_back(PendingBatch { header, bytes });
        drop(st);
        self.work.notify(1);
        Ok(())
    }

    /// Asks the flusher to make everything accepted durable; [`PartitionLog::durable_offset`]
    /// tells when it is.
    pub fn request_sync(&self) {
        let mut st = self.state.borrow_mut();
        st.sync_wanted = st.sync_wanted.max(st.next_offset);
        drop(st);
        self.work.notify(1);
    }

    /// Every offset below this is written and fdatasynced.
    pub fn durable_offset(&self) -> Offset {
        self.state.borrow().durable
    }

    /// The offset the next batch gets.
    pub fn log_end_offset(&self) -> Offset {
        self.state.borrow().next_offset
    }

    /// Validates `records` (one or more batches), deduplicates idempotent retries, assigns offsets
    /// and queues the batches for the flusher. No await: offsets follow call order.
    ///
    /// The offsets and leader epoch are written into `records` where they are: each batch is
    /// then queued, cached and served as a view of the same buffer, so appending copies nothing
    /// (a produce request's records are that buffer's only occupant, or the request's own frame
    /// when they are most of it: `handlers::produce::take_records`).
    pub fn append(
        &self,
        records: BytesMut,
        durable: bool,
        origin: Origin,
    ) -> Result<Appended, AppendError> {
        let batches = self.validate(&records, origin)?;
        let mut st = self.state.borrow_mut();
        // Idempotence: a retry of one of the producer's last five batches is answered with its
        // original offsets and not written again. The coordinators' own writes carry no
        // sequence; a marker is checked against the producer's epoch only.
        if let [(_, h)] = batches.as_slice() {
            if origin == Origin::Coordinator {
                if h.is_control() {
                    st.check_marker_epoch(h)?;
                }
            } else if h.producer_id >= 0 {
                if let Some(dup) = st.check_sequence(h)? {
                    let end = dup.last_offset.next();
                    if durable {
                        st.sync_wanted = st.sync_wanted.max(end);
                    }
                    drop(st);
                    self.work.notify(1);
                    let st = self.state.borrow();
                    return Ok(Appended {
                        base_offset: dup.base_offset,
                        end_offset: end,
                        records: 0,
                        log_append_time_ms: -1,
                        log_start_offset: st.log_start,
                    });
                }
            }
        }
        let append_time = if st.config.log_append_time {
            now_ms() as i64
        } else {
            -1
        };
        let base_offset = st.next_offset;
        // Batches lie in order; anything between them (nothing, for valid records) is skipped.
        let mut rest = records;
        let mut at = 0;
        for (pos, h) in &batches {
            rest.advance(pos - at);
            let mut bytes = rest.split_to(h.size_bytes);
            at = pos + h.size_bytes;
            let assigned = st.next_offset;
            batch::assign(&mut bytes, assigned, st.meta.leader_epoch);
            if append_time >= 0 {
                batch::set_log_append_time(&mut bytes, append_time);
            }
            let header =
                BatchHeader::parse(&bytes).map_err(|e| AppendError::from(e.error_code()))?;
            assert_eq!(
                header.base_offset, assigned,
                "assigned offset must be stored"
            );
            if header.producer_id >= 0 {
                record_producer_batch(&mut st.producers, &header);
            }
            st.next_offset = header.last_offset().next();
            st.pending.push_back(PendingBatch {
                header,
                bytes: bytes.freeze(),
            });
        }
        let end_offset = st.next_offset;
        if durable {
            st.sync_wanted = st.sync_wanted.max(end_offset);
        }
        let log_start = st.log_start;
        drop(st);
        self.work.notify(1);
        Ok(Appended {
            base_offset,
            end_offset,
            records: batches.iter().map(|(_, h)| i64::from(h.record_count)).sum(),
            log_append_time_ms: append_time,
            log_start_offset: log_start,
        })
    }

    /// Waits until every offset below `end` is written (and, with `durable`, fdatasynced).
    pub async fn wait_for(&self, end: Offset, durable: bool) -> Result<(), ErrorCode> {
        loop {
            let listener = self.progress.listen();
            {
                let st = self.state.borrow();
                let reached = if durable {
                    st.durable
                } else {
                    st.high_watermark
                };
                if reached >= end {
                    return Ok(());
                }
                if st.failed || st.closed {
                    return Err(ErrorCode::KAFKA_STORAGE_ERROR);
                }
            }
            listener.await;
        }
    }

    /// Waits until the high watermark (for a `committed` reader, the last stable offset) passes
    /// `offset`, or the partition closes. The caller bounds the wait with its own timer.
    pub async fn wait_for_data(&self, offset: Offset, committed: bool) {
        loop {
            let listener = self.progress.listen();
            if self.visible_past(offset, committed) {
                return;
            }
            listener.await;
        }
    }

    /// Reads whole batches starting with the one that contains `offset`, up to `max_bytes` (but at
    /// least one whole batch, so a consumer always progresses).
    /// A `committed` read (`isolation_level=read_committed`) stops at the last stable offset and
    /// lists the aborted transactions among what it returns.
    pub async fn read(
        &self,
        offset: Offset,
        max_bytes: usize,
        committed: bool,
    ) -> Result<ReadResult, ErrorCode> {
        if let Some(answer) = self.read_from_memory(offset, max_bytes, committed) {
            return answer;
        }
        let mut result = self.read_start(offset)?;
        crate::metrics::add(crate::metrics::Counter::CacheMisses, 1);
        let bytes = match self.take_readahead(offset, max_bytes) {
            Some(ahead) => {
                crate::metrics::add(crate::metrics::Counter::ReadAheadHits, 1);
                ahead.wait().await?
            }
            None => {
                self.read_segments(offset, max_bytes, result.high_watermark)
                    .await?
            }
        };
        self.read_ahead(&bytes, max_bytes);
        result.records = Batches::one(bytes);
        Ok(self.finish_read(result, offset, committed))
    }

    /// [`PartitionLog::read`] when memory can answer it (nothing new, or the batches are cached
    /// or not yet written), without an await; `None` when it needs the disk.
    pub fn read_from_memory(
        &self,
        offset: Offset,
        max_bytes: usize,
        committed: bool,
    ) -> Option<Result<ReadResult, ErrorCode>> {
        let mut result = match self.read_start(offset) {
            Ok(result) => result,
            Err(code) => return Some(Err(code)),
        };
        if offset < result.high_watermark {
            let st = self.state.borrow();
            let bytes = st
                .read_cache(offset, max_bytes)
                .or_else(|| st.read_unwritten(offset, max_bytes))?;
            crate::metrics::add(crate::metrics::Counter::CacheHits, 1);
            result.records = bytes;
        }
        Some(Ok(self.finish_read(result, offset, committed)))
    }

    /// The offsets of a read at `offset`, with no records yet; OFFSET_OUT_OF_RANGE outside the
    /// log.
    fn read_start(&self, offset: Offset) -> Result<ReadResult, ErrorCode> {
        let st = self.state.borrow();
        if st.out_of_range(offset) {
            return Err(ErrorCode::OFFSET_OUT_OF_RANGE);
        }
        Ok(ReadResult {
            records: Batches::default(),
            high_watermark: st.high_watermark,
            log_start_offset: st.log_start,
            last_stable_offset: st.txns.last_stable_offset(st.high_watermark),
            aborted: Vec::new(),
        })
    }

    /// Cuts a `committed` read at the last stable offset and lists the aborted transactions in
    /// it.
    fn finish_read(&self, mut result: ReadResult, offset: Offset, committed: bool) -> ReadResult {
        if !committed {
            return result;
        }
        // Without open or aborted transactions (the common case) there is nothing to cut or to
        // list, and the batches are not walked again.
        if result.last_stable_offset < result.high_watermark {
            let kept = result.records.batches_below(result.last_stable_offset);
            result.records.truncate(kept);
        }
        let st = self.state.borrow();
        if st.txns.has_aborted() {
            if let Some(end) = result.records.end_offset() {
                result.aborted = st.txns.aborted_between(offset, end);
            }
        }
        result
    }

    /// Hands every batch from the log start to the high watermark to `f`, in order (a
    /// coordinator replaying its partition).
    pub async fn replay(&self, mut f: impl FnMut(Bytes, BatchHeader)) {
        let mut at = self.log_start_offset();
        let end = self.high_watermark();
        while at < end {
            let read = match self.read(at, 1 << 20, false).await {
                Ok(r) if !r.records.is_empty() => r,
                _ => return,
            };
            let records = read.records.into_bytes();
            let batches = batch::split_batches(&records).unwrap_or_default();
            match batches.last() {
                Some((_, last)) => at = last.last_offset().next(),
                None => return,
            }
            for (pos, h) in batches {
                f(records.slice(pos..pos + h.size_bytes), h);
            }
        }
    }

    /// The last stable offset: what `read_committed` consumers may read up to.
    pub fn last_stable_offset(&self) -> Offset {
        let st = self.state.borrow();
        st.txns.last_stable_offset(st.high_watermark)
    }

    /// Whether the producer has a transaction open in this partition.
    pub fn has_open_transaction(&self, producer_id: i64) -> bool {
        self.state.borrow().txns.open_since(producer_id).is_some()
    }

    /// The read-ahead for exactly this read, if one was started; one for another read is
    /// dropped once it has finished (so that this reader may start its own).
    fn take_readahead(&self, offset: Offset, max_bytes: usize) -> Option<ReadAhead> {
        let mut st = self.state.borrow_mut();
        let ahead = st.readahead.as_ref()?;
        if ahead.from == offset && ahead.max_bytes == max_bytes {
            return st.readahead.take();
        }
        if ahead.finished() {
            st.readahead = None;
        }
        None
    }

    /// After a read from disk that filled most of `max_bytes`, starts reading what follows it,
    /// unless the cache holds that already or the shard's read-ahead budget is spent.
    fn read_ahead(&self, records: &Bytes, max_bytes: usize) {
        if records.len() < max_bytes / 2 || max_bytes == 0 {
            return;
        }
        let Some(next) = batch::end_offset(records) else {
            return;
        };
        let hw = {
            let st = self.state.borrow();
            let cached = st.cache.front().is_some_and(|b| b.base_offset <= next);
            if st.readahead.is_some() || cached || next >= st.written_end() || st.closed {
                return;
            }
            st.high_watermark
        };
        let budget = READAHEAD_BYTES.with(|b| {
            let used = b.get();
            (used + max_bytes <= READAHEAD_BYTES_MAX).then(|| b.set(used + max_bytes))
        });
        if budget.is_none() {
            return;
        }
        let ahead = ReadAhead {
            from: next,
            max_bytes,
            slot: Rc::new(RefCell::new(None)),
            done: Rc::new(Event::new()),
        };
        let (slot, done, log) = (ahead.slot.clone(), ahead.done.clone(), self.clone());
        self.state.borrow_mut().readahead = Some(ahead);
        glommio::spawn_local(async move {
            let result = log.read_segments(next, max_bytes, hw).await;
            *slot.borrow_mut() = Some(result);
            done.notify(usize::MAX);
        })
        .detach();
    }

    async fn read_segments(
        &self,
        offset: Offset,
        max_bytes: usize,
        hw: Offset,
    ) -> Result<Bytes, ErrorCode> {
        let mut target = offset;
        loop {
            let (file, start, end) = {
                let st = self.state.borrow();
                let i = st
                    .segments
                    .partition_point(|s| s.base_offset <= target)
                    .saturating_sub(1);
                let Some(seg) = st.segments.get(i) else {
                    return Ok(Bytes::new());
                };
                if seg.end_offset <= target {
                    // The offset lies past this segment: continue with the next one, if any.
                    match st.segments.get(i + 1) {
                        Some(next) if next.base_offset <= hw => {
                            target = target.max(next.base_offset);
                            continue;
                        }
                        _ => return Ok(Bytes::new()),
                    }
                }
                (seg.file.clone(), seg.position_for(target), seg.size_bytes)
            };
            let read =
                async { read_batches(&*file.get().await?, start, end, target, max_bytes).await };
            return read.await.map_err(|e: anyhow::Error| {
                tracing::error!(error = %e, "segment read failed");
                ErrorCode::KAFKA_STORAGE_ERROR
            });
        }
    }

    /// The offset and timestamp of the first record with a timestamp at or after `timestamp`, by
    /// walking batch headers (max timestamp) and then the records of the batch that qualifies.
    pub async fn offset_for_timestamp(&self, timestamp: i64) -> Result<Option<(Offset, i64)>> {
        // The segments as written now, and what is not written to them yet.
        let unwritten: Vec<Bytes> = {
            let st = self.state.borrow();
            st.unwritten
                .iter()
                .filter(|b| b.header.max_timestamp >= timestamp)
                .map(|b| b.bytes.clone())
                .collect()
        };
        let candidates: Vec<(Rc<FileSlot>, Offset, u64, u64)> = {
            let st = self.state.borrow();
            st.segments
                .iter()
                .filter(|s| s.max_timestamp >= timestamp && s.size_bytes > 0)
                .map(|s| {
                    (
                        s.file.clone(),
                        s.base_offset,
                        s.position_for_timestamp(timestamp),
                        s.size_bytes,
                    )
                })
                .collect()
        };
        let hw = self.high_watermark();
        for (slot, base, start, end) in candidates {
            let file = slot.get().await?;
            let (batches, _) = segment::scan(&file, base, start, end, false).await?;
            for b in batches {
                if b.header.base_offset >= hw {
                    return Ok(None);
                }
                if b.header.max_timestamp >= timestamp {
                    let bytes = file.read_at(b.position, b.header.size_bytes).await.io()?;
                    return Ok(Some(super::records::first_at_or_after(&bytes, timestamp)?));
                }
            }
        }
        match unwritten.first() {
            Some(bytes) => Ok(Some(super::records::first_at_or_after(bytes, timestamp)?)),
            None => Ok(None),
        }
    }

    /// The offset and timestamp of the record with the largest timestamp (ListOffsets -3).
    pub async fn max_timestamp_offset(&self) -> Result<Option<(Offset, i64)>> {
        let best = {
            let st = self.state.borrow();
            st.segments
                .iter()
                .filter(|s| s.size_bytes > 0)
                .max_by_key(|s| s.max_timestamp)
                .map(|s| (s.max_timestamp, s.file.clone(), s.base_offset, s.size_bytes))
        };
        // A batch not yet written to the segment holds the maximum if it beats them all (on a
        // tie the earlier record, in the segments, wins).
        let unwritten = {
            let st = self.state.borrow();
            st.unwritten
                .iter()
                .rev()
                .max_by_key(|b| b.header.max_timestamp)
                .map(|b| (b.header.max_timestamp, b.bytes.clone()))
        };
        if let Some((ts, bytes)) = unwritten {
            if best.as_ref().is_none_or(|(max_ts, ..)| ts > *max_ts) {
                return Ok(Some(super::records::first_at_or_after(&bytes, ts)?));
            }
        }
        let Some((max_ts, slot, base, end)) = best else {
            return Ok(None);
        };
        let file = slot.get().await?;
        let (batches, _) = segment::scan(&file, base, 0, end, false).await?;
        for b in batches {
            if b.header.max_timestamp == max_ts {
                let bytes = file.read_at(b.position, b.header.size_bytes).await.io()?;
                return Ok(Some(super::records::first_at_or_after(&bytes, max_ts)?));
            }
        }
        Ok(None)
    }

    /// Stops the flusher and wakes every waiter; queued but unwritten batches fail.
    pub fn close(&self) {
        self.state.borrow_mut().closed = true;
        self.work.notify(usize::MAX);
        self.notify_progress();
    }

    /// Where the partition's writes and syncs stand, for a log line when a wait takes too long
    /// (a shutdown that does not finish).
    pub fn progress_summary(&self) -> String {
        let st = self.state.borrow();
        format!(
            "next_offset={} high_watermark={} durable={} durable_pending={} sync_wanted={} \
             segments_durable={} written_end={} unwritten={} ({} B) writing={} write_out_upto={} \
             pending={} journal_attached={} journal_ticket={:?} closed={} failed={}",
            st.next_offset.0,
            st.high_watermark.0,
            st.durable.0,
            st.durable_pending.0,
            st.sync_wanted.0,
            st.segments_durable.0,
            st.written_end().0,
            st.unwritten.len(),
            st.unwritten_bytes,
            st.writing,
            st.write_out_upto.0,
            st.pending.len(),
            st.journal_attached,
            st.journal_ticket,
            st.closed,
            st.failed,
        )
    }

    /// Size on disk, offsets and idempotent producers (DescribeLogDirs, DescribeProducers).
    pub fn facts(&self) -> PartitionFacts {
        let st = self.state.borrow();
        let mut producers: Vec<ActiveProducer> = st
            .producers
            .iter()
            .map(|(id, p)| ActiveProducer {
                producer_id: *id,
                current_txn_start_offset: st.txns.open_since(*id).map_or(-1, |first| first.0),
                epoch: p.epoch,
                last_sequence: p.batches.back().map_or(-1, |b| b.last_sequence),
                last_timestamp: p.last_timestamp,
            })
            .collect();
        producers.sort_by_key(|p| p.producer_id);
        PartitionFacts {
            size_bytes: st.segments.iter().map(|s| s.size_bytes).sum::<u64>()
                + st.unwritten_bytes as u64,
            high_watermark: st.high_watermark,
            log_end: st.next_offset,
            log_start: st.log_start,
            leader_epoch: st.meta.leader_epoch,
            producers,
            leading: true,
        }
    }

    /// Clean shutdown: writes and fdatasyncs everything accepted, closes the partition, cuts the
    /// active segment to its last batch with its indexes written, and saves the idempotent
    /// producers' state, so that the next start trusts all of it instead of scanning. Appends after
    /// this fail with KAFKA_STORAGE_ERROR.
    pub async fn shutdown(&self) -> Result<()> {
        let end = {
            let mut st = self.state.borrow_mut();
            st.sync_wanted = st.sync_wanted.max(st.next_offset);
            st.next_offset
        };
        self.work.notify(usize::MAX);
        self.wait_for(end, true)
            .await
            .map_err(|e| anyhow::anyhow!("partition failed before its data was durable: {e:?}"))?;
        self.write_out_all().await?;
        self.close();
        let (dir, snapshot) = {
            let st = self.state.borrow();
            (st.dir.clone(), producer_snapshot(&st.producers, end))
        };
        let active = {
            let st = self.state.borrow();
            st.segments
                .last()
                .map(|a| (a.file.clone(), a.size_bytes, a.index_snapshot()))
        };
        if let Some((slot, size_bytes, indexes)) = active {
            // O_DIRECT writes pad the last block with zeros: cut them, so the file ends at its
            // last whole batch, as a clean start expects.
            let file = slot.get().await?;
            file.truncate(size_bytes).await.io()?;
            file.fdatasync().await.io()?;
            indexes.write_indexes().await?;
        }
        self.save_txns(end).await?;
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&snapshot)?;
        files::write_meta(&dir.join(PRODUCERS_FILE), PRODUCERS_VERSION, &bytes).await
    }

    /// Saves the transaction state, which must be the state at `offset` (every batch below it
    /// written, none above), and removes saved states that a later start no longer needs (all but
    /// the newest two).
    async fn save_txns(&self, offset: Offset) -> Result<()> {
        let (dir, saved) = {
            let st = self.state.borrow();
            (st.dir.clone(), st.txns.save(offset))
        };
        let payload = txn::encode_saved(&saved)?;
        let path = dir.join(txn::state_file_name(offset));
        files::write_meta(&path, txn::STATE_VERSION, &payload).await?;
        let mut saved_at = {
            let dir = dir.clone();
            files::blocking(move || list_txn_states(&dir)).await?
        };
        saved_at.sort();
        let keep = saved_at.len().saturating_sub(2);
        for old in saved_at.into_iter().take(keep) {
            files::remove_file(&dir.join(txn::state_file_name(old))).await?;
        }
        Ok(())
    }

    /// Closes the partition and deletes its directory.
    pub async fn delete(&self) -> Result<()> {
        self.close();
        let dir = {
            let mut st = self.state.borrow_mut();
            st.unwritten.clear();
            add_unwritten(-(std::mem::take(&mut st.unwritten_bytes) as isize));
            // The cached batches go now, not whenever the last handle to the log does (a task
            // may hold one for a while; with a cache of gigabytes that is not small).
            st.cache.clear();
            st.cache_bytes = 0;
            st.readahead = None;
            st.dir.clone()
        };
        let segments: Vec<_> = self.state.borrow_mut().segments.drain(..).collect();
        drop(segments);
        files::retire_dir(&dir).await
    }

    /// Deletes the oldest segments that `retention.ms` or `retention.bytes` no longer keep (for
    /// `cleanup.policy` with `delete`). An expired active segment is rolled first so that it can
    /// go too. The log start offset moves to the first remaining segment. Returns the number of
    /// segments deleted.
    pub async fn enforce_retention(&self, now_ms: u64) -> Result<usize> {
        let mut deleted = 0;
        loop {
            let step = {
                let st = self.state.borrow();
                if !st.config.delete || st.closed || st.failed {
                    return Ok(deleted);
                }
                // Batches not yet written to the active segment count as its bytes.
                let total: u64 = st.segments.iter().map(|s| s.size_bytes).sum::<u64>()
                    + st.unwritten_bytes as u64;
                // `unwritten`: bytes not yet written that belong to `s` (the active segment's).
                let expired = |s: &Segment, unwritten: u64| {
                    st.config.retention_ms >= 0
                        && s.size_bytes + unwritten > 0
                        && s.max_timestamp >= 0
                        && (now_ms as i64).saturating_sub(s.max_timestamp) > st.config.retention_ms
                };
                let oversized = |s: &Segment| {
                    st.config.retention_bytes >= 0
                        && total.saturating_sub(s.size_bytes) >= st.config.retention_bytes as u64
                };
                let first = &st.segments[0];
                if st.segments.len() > 1 && (expired(first, 0) || oversized(first)) {
                    RetentionStep::DeleteOldest
                } else if st.segments.len() == 1
                    && expired(first, st.unwritten_bytes as u64)
                    && st.pending.is_empty()
                {
                    RetentionStep::RollActive
                } else {
                    return Ok(deleted);
                }
            };
            match step {
                RetentionStep::DeleteOldest => {
                    self.delete_oldest_segment().await?;
                    deleted += 1;
                }
                RetentionStep::RollActive => {
                    self.state.borrow_mut().roll_requested = true;
                    self.work.notify(1);
                    let rolled =
                        glommio::timer::timeout(std::time::Duration::from_secs(5), async {
                            loop {
                                let listener = self.progress.listen();
                                if self.state.borrow().segments.len() > 1 {
                                    return Ok(());
                                }
                                listener.await;
                            }
                        })
                        .await;
                    if rolled.is_err() {
                        return Ok(deleted);
                    }
                }
            }
        }
    }

    /// DeleteRecords: moves the log start offset to `offset` (-1: the high watermark) and deletes
    /// the segments wholly below it. Returns the new log start offset.
    pub async fn delete_records(&self, offset: i64) -> Result<Offset, ErrorCode> {
        let (hw, start) = {
            let st = self.state.borrow();
            (st.high_watermark, st.log_start)
        };
        let target = if offset == -1 { hw } else { Offset(offset) };
        if target.0 < 0 || target > hw {
            return Err(ErrorCode::OFFSET_OUT_OF_RANGE);
        }
        if target <= start {
            return Ok(start);
        }
        // The new log start is persisted only once everything below it is durable: otherwise a
        // crash could recover a log that ends below its own start.
        {
            let mut st = self.state.borrow_mut();
            st.sync_wanted = st.sync_wanted.max(target);
        }
        self.work.notify(1);
        self.wait_for(target, true).await?;
        self.set_log_start(target).await.map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "persisting the log start offset failed");
            ErrorCode::KAFKA_STORAGE_ERROR
        })?;
        loop {
            let whole = {
                let st = self.state.borrow();
                st.segments.len() > 1 && st.segments[1].base_offset <= target
            };
            if !whole {
                break;
            }
            self.delete_oldest_segment().await.map_err(|e| {
                tracing::error!(error = %format!("{e:#}"), "deleting a segment failed");
                ErrorCode::KAFKA_STORAGE_ERROR
            })?;
        }
        self.state.borrow().check_offsets();
        Ok(target)
    }

    /// Compacts the closed segments when their dirty share reaches `min.cleanable.dirty.ratio`
    /// (segments younger than `min.compaction.lag.ms` are left for later). Returns the bytes the
    /// cleaned segments held before and after, or None when nothing was due.
    pub async fn clean(&self, now_ms: u64) -> Result<Option<(u64, u64)>> {
        let (candidates, cleaned_upto, config, dir, tombstones_due, aborted) = {
            let st = self.state.borrow();
            if !st.config.compact || st.closed || st.failed || st.segments.len() < 2 {
                return Ok(None);
            }
            let lag_cutoff = (now_ms as i64).saturating_sub(st.config.min_compaction_lag_ms);
            // Only segments wholly below the last stable offset: a record of a transaction not
            // yet decided must not replace a committed one.
            let lso = st.txns.last_stable_offset(st.high_watermark);
            let candidates: Vec<(Offset, Rc<FileSlot>, u64, Offset)> = st.segments
                [..st.segments.len() - 1]
                .iter()
                .take_while(|s| s.max_timestamp <= lag_cutoff && s.end_offset <= lso)
                .map(|s| (s.base_offset, s.file.clone(), s.size_bytes, s.end_offset))
                .collect();
            let tombstones_due = st.tombstone_deadline_ms.is_some_and(|t| now_ms as i64 >= t);
            let aborted = match (candidates.first(), candidates.last()) {
                (Some(first), Some(last)) => st.txns.aborted_between(first.0, last.3),
                _ => Vec::new(),
            };
            (
                candidates,
                st.cleaned_upto,
                st.config.clone(),
                st.dir.clone(),
                tombstones_due,
                aborted,
            )
        };
        // Records of aborted transactions never count as a key's latest value, and cleaning
        // removes them (as Kafka's cleaner does); the markers stay.
        let is_aborted = |h: &BatchHeader| {
            h.is_transactional()
                && !h.is_control()
                && aborted.iter().any(|a| {
                    a.producer_id == h.producer_id
                        && a.first_offset <= h.base_offset.0
                        && h.base_offset.0 <= a.last_offset
                })
        };
        let total: u64 = candidates.iter().map(|c| c.2).sum();
        let dirty: u64 = candidates
            .iter()
            .filter(|c| c.3 > cleaned_upto)
            .map(|c| c.2)
            .sum();
        let dirty_enough =
            dirty > 0 && (dirty as f64) >= config.min_cleanable_dirty_ratio * total as f64;
        if !dirty_enough && !tombstones_due {
            return Ok(None);
        }
        let mut tombstone_deadline: Option<i64> = None;
        let mut latest: HashMap<Bytes, i64> = HashMap::new();
        for (_, slot, size, _) in &candidates {
            for_each_batch(&*slot.get().await?, *size, |batch, header| {
                if is_aborted(header) {
                    return Ok(());
                }
                super::compaction::index_latest(batch, header, &mut latest)
            })
            .await?;
        }
        let mut before = 0u64;
        let mut after = 0u64;
        for (base, slot, size, _) in &candidates {
            let mut cleaned = Vec::with_capacity(usize::try_from(*size).unwrap_or(0));
            for_each_batch(&*slot.get().await?, *size, |batch, header| {
                if is_aborted(header) {
                    return Ok(());
                }
                let filtered = super::compaction::filter_batch(
                    batch,
                    header,
                    &latest,
                    now_ms as i64,
                    config.delete_retention_ms,
                )?;
                if filtered.kept_tombstone {
                    let due = header
                        .max_timestamp
                        .saturating_add(config.delete_retention_ms)
                        + 1;
                    tombstone_deadline = Some(tombstone_deadline.map_or(due, |t| t.min(due)));
                }
                if let Some(kept) = filtered.batch {
                    cleaned.extend_from_slice(&kept);
                }
                Ok(())
            })
            .await?;
            before += size;
            after += cleaned.len() as u64;
            if cleaned.len() as u64 == *size {
                continue;
            }
            self.replace_segment(&dir, *base, &cleaned).await?;
        }
        let end = candidates.last().map_or(cleaned_upto, |c| c.3);
        let mut st = self.state.borrow_mut();
        st.cleaned_upto = end;
        st.tombstone_deadline_ms = tombstone_deadline;
        // Cached batches below the cleaned end hold records compaction removed.
        while st.cache.front().is_some_and(|b| b.base_offset < end) {
            if let Some(old) = st.cache.pop_front() {
                st.cache_bytes -= old.bytes.len();
            }
        }
        drop(st);
        tracing::info!(partition = %self.topic_partition(), before, after, "log compacted");
        Ok(Some((before, after)))
    }

    /// Swaps a closed segment for its cleaned contents: written beside it, made durable, renamed
    /// over it, indexes rebuilt.
    async fn replace_segment(&self, dir: &Path, base: Offset, contents: &[u8]) -> Result<()> {
        let log_path = segment::log_path(dir, base);
        let cleaned_path = log_path.with_extension("cleaned");
        files::write_whole(&cleaned_path, contents).await?;
        let (interval, present) = {
            let st = self.state.borrow();
            let present = st.segments.iter().any(|s| s.base_offset == base);
            (st.config.index_interval_bytes, present)
        };
        if !present {
            // DeleteRecords or retention removed the segment meanwhile: nothing to replace.
            let _ = files::remove_file(&cleaned_path).await;
            return Ok(());
        }
        // Index files describe the old contents: remove them before the swap, so a crash
        // between the two leaves a segment whose indexes are rebuilt on open.
        for ext in ["index", "timeindex"] {
            let _ = files::remove_file(&log_path.with_extension(ext)).await;
        }
        glommio::io::rename(&cleaned_path, &log_path).await.io()?;
        files::sync_dir(dir).await?;
        let (segment, _) = Segment::open(dir, base, false, false, interval, now_ms()).await?;
        let mut st = self.state.borrow_mut();
        if let Some(slot) = st.segments.iter_mut().find(|s| s.base_offset == base) {
            *slot = segment;
        }
        Ok(())
    }

    async fn set_log_start(&self, offset: Offset) -> Result<()> {
        let (path, meta) = {
            let mut st = self.state.borrow_mut();
            if offset <= st.log_start {
                return Ok(());
            }
            st.log_start = offset;
            st.meta.log_start_offset = offset.0;
            st.txns.forget_below(offset);
            while st.cache.front().is_some_and(|b| b.last_offset < offset) {
                if let Some(old) = st.cache.pop_front() {
                    st.cache_bytes -= old.bytes.len();
                }
            }
            (st.dir.join("partition.meta"), st.meta.clone())
        };
        write_partition_meta(&path, &meta).await
    }

    /// Kafka's `truncateFullyAndStartAt`: the log drops everything it holds and starts at
    /// `offset`, at or past its end (a replica whose log ends below its leader's log start, the
    /// records between deleted there by retention or DeleteRecords): what it held is first made
    /// durable (nothing may be in flight to the segments it removes), then a new active segment
    /// at `offset`, the log start persisted, the old segments removed.
    pub async fn truncate_fully_and_start_at(&self, offset: Offset) -> Result<()> {
        let end = self.log_end_offset();
        if offset < end {
            anyhow::bail!(
                "the log ends at {}: it cannot start at offset {}",
                end.0,
                offset.0
            );
        }
        if offset == end {
            return Ok(());
        }
        self.request_sync();
        self.wait_for(end, true)
            .await
            .map_err(|code| anyhow::anyhow!("the log's end did not become durable: {code:?}"))?;
        self.write_out_all().await?;
        let dir = {
            let st = self.state.borrow();
            if st.next_offset != end || !st.pending.is_empty() {
                anyhow::bail!("the log grew while it was being truncated");
            }
            st.dir.clone()
        };
        let segment = Segment::create(&dir, offset, now_ms()).await?;
        let old = {
            let mut st = self.state.borrow_mut();
            let old = std::mem::replace(&mut st.segments, vec![segment]);
            st.readahead = None;
            st.txns.clear();
            st.next_offset = offset;
            st.high_watermark = offset;
            st.durable = offset;
            st.segments_durable = offset;
            st.sync_wanted = st.sync_wanted.max(offset);
            old
        };
        self.set_log_start(offset).await?;
        // The log restarts empty: a saved state from before must never be loaded for it.
        self.save_txns(offset).await?;
        for segment in old {
            let paths = segment.paths();
            drop(segment);
            for path in paths {
                if path.exists() {
                    files::remove_file(&path).await?;
                }
            }
        }
        self.state.borrow().check_offsets();
        self.notify_progress();
        Ok(())
    }

    /// Removes the oldest (closed) segment and its files, advancing the log start offset.
    async fn delete_oldest_segment(&self) -> Result<()> {
        let (segment, next_base) = {
            let mut st = self.state.borrow_mut();
            if st.segments.len() < 2 {
                return Ok(());
            }
            let segment = st.segments.remove(0);
            (segment, st.segments[0].base_offset)
        };
        self.set_log_start(next_base).await?;
        let paths = segment.paths();
        drop(segment);
        for path in paths {
            let Some(len) = super::trash::paced_len(&path).await else {
                files::remove_file(&path).await?;
                continue;
            };
            // Renamed first: nothing opens it again, and a crash leaves a name the next open
            // removes rather than a shortened segment.
            let mut doomed = path.clone().into_os_string();
            doomed.push(super::trash::DELETED_SUFFIX);
            let doomed = PathBuf::from(doomed);
            glommio::io::rename(&path, &doomed)
                .await
                .io()
                .with_context(|| format!("renaming {} for deletion", path.display()))?;
            glommio::spawn_local(async move {
                if let Err(e) = super::trash::trickle(doomed, len).await {
                    tracing::warn!(error = %format!("{e:#}"), "deleting a segment failed; removed at next start");
                }
            })
            .detach();
        }
        tracing::info!(partition = %self.topic_partition(), log_start = next_base.0, "segment deleted by retention");
        Ok(())
    }

    async fn run_flusher(self) {
        loop {
            let listener = self.work.listen();
            let has_work = {
                let st = self.state.borrow();
                if st.closed || st.failed {
                    return;
                }
                !st.pending.is_empty() || st.sync_unmet() || st.roll_requested
            };
            if !has_work {
                listener.await;
                continue;
            }
            drop(listener);
            if let Err(e) = self.flush_once().await {
                let tp = self.topic_partition();
                tracing::error!(partition = %tp, error = %format!("{e:#}"), "log write failed; partition is offline");
                self.state.borrow_mut().failed = true;
                self.notify_progress();
                return;
            }
        }
    }

    /// Takes one chunk of queued batches (rolling the segment first when due). With the journal
    /// attached, the chunk is journaled and left to the writer (write-behind) unless it is large
    /// enough to bypass the journal; otherwise it is written to the segment here. If a producer
    /// waits for durability, the chunk is made durable: through the journal, or by fdatasyncing
    /// the segment when there is no journal or it cannot take the chunk. A chunk that bypassed
    /// the journal is always fdatasynced.
    async fn flush_once(&self) -> Result<()> {
        let roll = {
            let mut st = self.state.borrow_mut();
            let requested =
                std::mem::take(&mut st.roll_requested) && st.logical_size().is_some_and(|s| s > 0);
            requested || st.should_roll()
        };
        if roll {
            self.write_out_all().await?;
            self.roll().await?;
            self.notify_progress();
        }
        self.attach_journal_when_open().await?;
        self.wait_for_writer().await?;
        let (chunk, chunk_bytes) = {
            let st = self.state.borrow();
            let Some(active) = st.segments.last() else {
                anyhow::bail!("a partition has an active segment");
            };
            let size = st.logical_size().unwrap_or(active.size_bytes);
            let room = st.config.segment_size_bytes.saturating_sub(size).max(1);
            let mut data_len = 0;
            let mut chunk = Vec::new();
            for p in &st.pending {
                let len = p.bytes.len();
                if !chunk.is_empty()
                    && (data_len + len > WRITE_CHUNK_BYTES
                        || (data_len + len) as u64 > room
                        || !active.fits(size + data_len as u64, &p.header))
                {
                    break;
                }
                data_len += len;
                chunk.push((p.header, p.bytes.clone()));
            }
            (chunk, data_len)
        };
        let Some((last, _)) = chunk.last() else {
            return self.sync_if_wanted().await;
        };
        let end = last.last_offset().next();
        let journaled = {
            let mut st = self.state.borrow_mut();
            let bypass = st
                .journal
                .as_ref()
                .is_some_and(|j| chunk_bytes >= j.bypass_bytes());
            if st.journal_attached && !bypass {
                let durable = st.sync_wanted > st.durable;
                let parts = chunk.iter().map(|(_, b)| b.clone()).collect();
                let ticket = st
                    .journal
                    .as_ref()
                    .and_then(|j| j.submit(self, &st.tp, st.meta.topic_id, parts, end, durable));
                match ticket {
                    Some(t) => st.journal_ticket = Some(t),
                    None => st.journal_attached = false,
                }
                ticket.is_some()
            } else {
                false
            }
        };
        if journaled {
            // Durable once the journal's round is: visible now, written to the segment later.
            let due = {
                let mut st = self.state.borrow_mut();
                st.take_chunk(chunk, true);
                st.write_due()
            };
            if due {
                self.write_work.notify(1);
            }
            self.notify_progress();
            return self.sync_if_wanted().await;
        }
        // The segment is written here: whatever waits for the writer goes first.
        self.write_out_all().await?;
        self.write_segment(&chunk).await?;
        {
            let mut st = self.state.borrow_mut();
            st.track_written(&chunk)?;
            st.take_chunk(chunk, false);
        }
        self.notify_progress();
        if self.state.borrow().journal_attached {
            // A chunk that bypassed the journal is made durable now, wanted or not: the next
            // chunk's round must not claim durability past a chunk that is only written.
            return self.sync_active_segment().await;
        }
        self.sync_if_wanted().await
    }

    /// Writes `chunk` (whole batches) at the end of the active segment, in one aligned write; the
    /// caller then records it ([`PartitionState::track_written`]).
    async fn write_segment(&self, chunk: &[(BatchHeader, Bytes)]) -> Result<()> {
        let slot = self.state.borrow().segments.last().map(|s| s.file.clone());
        let file = match slot {
            Some(slot) => slot.get().await?,
            None => anyhow::bail!("a partition has an active segment"),
        };
        let prepared = {
            let st = self.state.borrow();
            let Some(active) = st.segments.last() else {
                anyhow::bail!("a partition has an active segment");
            };
            active.prepare_write(&file, chunk.iter().map(|(_, b)| &b[..]))
        };
        prepared
            .file
            .write_at(prepared.buffer, prepared.position)
            .await
            .io()?;
        Ok(())
    }

    /// Makes everything taken so far durable if a producer waits for it: through the journal
    /// (without waiting for its sync, so the next chunk's round is written meanwhile), or by
    /// fdatasyncing the segment.
    async fn sync_if_wanted(&self) -> Result<()> {
        let upto = {
            let st = self.state.borrow();
            if !st.sync_unmet() {
                return Ok(());
            }
            st.high_watermark
        };
        let journaled = {
            let st = self.state.borrow();
            st.journal_attached
                .then(|| st.journal.clone().map(|j| (j, st.journal_ticket)))
                .flatten()
        };
        match journaled {
            // Everything taken since the journal took over is in it.
            Some((journal, Some(ticket))) => {
                {
                    let mut st = self.state.borrow_mut();
                    st.durable_pending = st.durable_pending.max(upto);
                }
                journal.when_durable(ticket, self, upto);
                return Ok(());
            }
            // Nothing taken since the journal took over, which synced the segment.
            Some((_, None)) => {}
            None => {
                self.write_out_all().await?;
                self.sync_active_segment().await?;
            }
        }
        self.mark_durable(upto);
        Ok(())
    }

    /// The shard's journal failed before this partition's batches in it were durable: the
    /// partition goes offline.
    pub fn journal_failed(&self) {
        let mut st = self.state.borrow_mut();
        tracing::error!(partition = %st.tp, "the shard's journal failed; partition is offline");
        st.failed = true;
        drop(st);
        self.notify_progress();
    }

    /// Every offset below `upto` is durable: advances `durable` and wakes whoever waits for it.
    /// Every advance goes through here, so none can leave a waiter parked (a shutdown once
    /// waited forever on a sync made by the journal's attach, which advanced it silently).
    pub fn mark_durable(&self, upto: Offset) {
        let mut st = self.state.borrow_mut();
        if upto <= st.durable {
            return;
        }
        st.durable = upto;
        drop(st);
        self.notify_progress();
    }

    /// The partition's segment writer (write-behind): writes journaled batches to the active
    /// segment when [`PartitionState::write_due`] says so.
    async fn run_writer(self) {
        loop {
            let listener = self.write_work.listen();
            let due = {
                let st = self.state.borrow();
                if st.closed || st.failed {
                    return;
                }
                st.write_due()
            };
            if !due {
                listener.await;
                continue;
            }
            drop(listener);
            if let Err(e) = self.write_unwritten().await {
                let tp = self.topic_partition();
                tracing::error!(partition = %tp, error = %format!("{e:#}"), "segment write failed; partition is offline");
                let mut st = self.state.borrow_mut();
                st.writing = false;
                st.failed = true;
                drop(st);
                self.notify_progress();
                return;
            }
        }
    }

    /// Writes the oldest unwritten batches (up to [`WRITE_BEHIND_BYTES`], or [`WRITE_CHUNK_BYTES`]
    /// when behind; at least one) to the
    /// active segment in one aligned write.
    async fn write_unwritten(&self) -> Result<()> {
        let chunk = {
            let mut st = self.state.borrow_mut();
            if st.unwritten.is_empty() {
                return Ok(());
            }
            st.writing = true;
            // Small writes keep the journal's rounds flowing; a writer that fell behind catches
            // up with large ones.
            let limit = if st.unwritten_bytes > 2 * WRITE_BEHIND_BYTES {
                WRITE_CHUNK_BYTES
            } else {
                WRITE_BEHIND_BYTES
            };
            let mut len = 0;
            st.unwritten
                .iter()
                .take_while(|b| {
                    let take = len == 0 || len + b.bytes.len() <= limit;
                    len += b.bytes.len();
                    take
                })
                .map(|b| (b.header, b.bytes.clone()))
                .collect::<Vec<_>>()
        };
        self.write_segment(&chunk).await?;
        let mut st = self.state.borrow_mut();
        st.writing = false;
        if st.closed || st.unwritten.len() < chunk.len() {
            // Deleted while the write was in flight: nothing is left to account for.
            return Ok(());
        }
        st.track_written(&chunk)?;
        let bytes: usize = chunk.iter().map(|(_, b)| b.len()).sum();
        st.unwritten.drain(..chunk.len());
        st.unwritten_bytes -= bytes;
        add_unwritten(-(bytes as isize));
        drop(st);
        self.notify_progress();
        Ok(())
    }

    /// Waits on the segment writer: `check` looks at the state on every progress and ends the
    /// wait with `Some`; meanwhile the writer is asked to write (`check` says what is wanted by
    /// setting `write_out_upto`).
    async fn wait_on_writer<T>(
        &self,
        mut check: impl FnMut(&mut PartitionState) -> Option<T>,
    ) -> T {
        loop {
            let listener = self.progress.listen();
            if let Some(done) = check(&mut self.state.borrow_mut()) {
                return done;
            }
            self.write_work.notify(1);
            listener.await;
        }
    }

    /// Backpressure of write-behind: while the partition (or the shard) holds too much that is not
    /// written to its segment, waits for the writer before taking more.
    async fn wait_for_writer(&self) -> Result<()> {
        self.wait_on_writer(|st| {
            if st.failed || st.closed {
                return Some(Err(anyhow::anyhow!("the partition failed or closed")));
            }
            let shard_over = UNWRITTEN_BYTES.with(std::cell::Cell::get) >= SHARD_WRITE_BEHIND_MAX;
            let over = st.unwritten_bytes >= PARTITION_WRITE_BEHIND_MAX
                || (shard_over && !st.unwritten.is_empty());
            if !over {
                return Some(Ok(()));
            }
            crate::metrics::add(crate::metrics::Counter::WriteBehindWaits, 1);
            None
        })
        .await
    }

    /// Waits until every batch taken so far is written to the segment (and no write is in
    /// flight): before the flusher writes the segment itself, rolls it, or it is cut or closed.
    async fn write_out_all(&self) -> Result<()> {
        self.wait_on_writer(|st| {
            if st.unwritten.is_empty() && !st.writing {
                return Some(Ok(()));
            }
            if st.failed || st.closed {
                return Some(Err(anyhow::anyhow!(
                    "the partition failed or closed with batches not yet written"
                )));
            }
            st.write_out_upto = st.write_out_upto.max(st.high_watermark);
            None
        })
        .await
    }

    /// fdatasyncs the active segment: everything written so far is durable in the segments.
    async fn sync_active_segment(&self) -> Result<()> {
        let (file, written) = {
            let st = self.state.borrow();
            (st.segments.last().map(|s| s.file.clone()), st.written_end())
        };
        if let Some(slot) = file {
            // fdatasync flushes the file's data whichever descriptor wrote it, so a file the fd
            // budget closed and reopened since the write is still made durable.
            slot.get().await?.fdatasync().await.io()?;
            crate::metrics::add(crate::metrics::Counter::Fsyncs, 1);
        }
        {
            let mut st = self.state.borrow_mut();
            st.segments_durable = st.segments_durable.max(written);
        }
        self.mark_durable(written);
        Ok(())
    }

    /// Gives the partition its shard's journal; it is used once every shard has started.
    /// Wakes what waits on this partition's progress, and the shard's waiters on any partition.
    fn notify_progress(&self) {
        self.progress.notify(usize::MAX);
        if let Ok(shard) = self.shard_progress.try_borrow() {
            if let Some(event) = shard.as_ref() {
                event.notify(usize::MAX);
            }
        }
    }

    /// Notifies `event` too whenever this partition progresses (see [`Self::visible_past`]).
    pub fn notify_shard(&self, event: Rc<Event>) {
        *self.shard_progress.borrow_mut() = Some(event);
    }

    /// Whether a reader at `offset` has something to read (or will never have: the partition
    /// failed or closed). `committed` readers see up to the last stable offset.
    pub fn visible_past(&self, offset: Offset, committed: bool) -> bool {
        let st = self.state.borrow();
        let visible = if committed {
            st.txns.last_stable_offset(st.high_watermark)
        } else {
            st.high_watermark
        };
        visible > offset || st.failed || st.closed
    }

    /// Whether a read at `offset` would have news for a fetch session that last sent `sent`
    /// (high watermark, last stable offset, log start): records, an error (out of range, a
    /// failed or closed log), or other offsets.
    pub fn has_news(&self, offset: Offset, committed: bool, sent: Option<(i64, i64, i64)>) -> bool {
        let st = self.state.borrow();
        let lso = st.txns.last_stable_offset(st.high_watermark);
        let visible = if committed { lso } else { st.high_watermark };
        visible > offset
            || st.out_of_range(offset)
            || st.failed
            || st.closed
            || sent != Some((st.high_watermark.0, lso.0, st.log_start.0))
    }

    /// Whether a read at `offset` gets OFFSET_OUT_OF_RANGE.
    pub fn out_of_range(&self, offset: Offset) -> bool {
        self.state.borrow().out_of_range(offset)
    }

    pub fn attach_journal(&self, journal: Journal) {
        self.state.borrow_mut().journal = Some(journal);
        self.work.notify(1);
    }

    /// Once the journal is open: syncs the segment so that what the journal will hold continues
    /// the segments' durable end, then journals every later chunk.
    async fn attach_journal_when_open(&self) -> Result<()> {
        let attach = {
            let st = self.state.borrow();
            !st.journal_attached && st.journal.as_ref().is_some_and(Journal::is_open)
        };
        if attach {
            self.write_out_all().await?;
            self.sync_active_segment().await?;
            let mut st = self.state.borrow_mut();
            st.journal_attached = true;
            st.journal_ticket = None;
        }
        Ok(())
    }

    /// Makes the segments durable up to `end` (a journal checkpoint, before the journal reuses the
    /// file holding these batches): writes them out, then fdatasyncs. A closed, deleted or failed
    /// partition has nothing more to make durable.
    pub async fn sync_segments_upto(&self, end: Offset) {
        if !self.write_out_upto(end).await {
            return;
        }
        if self.state.borrow().segments_durable >= end {
            return;
        }
        if let Err(e) = self.sync_active_segment().await {
            let tp = self.topic_partition();
            tracing::error!(partition = %tp, error = %format!("{e:#}"), "segment fdatasync for a journal checkpoint failed; partition is offline");
            self.state.borrow_mut().failed = true;
            self.notify_progress();
        }
    }

    /// Waits until the segments hold every batch below `end` (asking the writer for it); `false`
    /// when the partition closed or failed first, or its segments are already durable there.
    pub async fn write_out_upto(&self, end: Offset) -> bool {
        self.wait_on_writer(|st| {
            if st.closed || st.failed || st.segments_durable >= end {
                return Some(false);
            }
            if st.written_end() >= end {
                return Some(true);
            }
            st.write_out_upto = st.write_out_upto.max(end);
            None
        })
        .await
    }

    /// The segments are durable up to `end`: a file-system-wide sync covered them after
    /// [`PartitionLog::write_out_upto`].
    pub fn note_segments_durable(&self, end: Offset) {
        let mut st = self.state.borrow_mut();
        st.segments_durable = st.segments_durable.max(end);
        drop(st);
        self.notify_progress();
    }

    /// The device (`st_dev`) of the partition's directory.
    pub fn device(&self) -> u64 {
        self.state.borrow().device
    }

    /// Applies what the journal held for this partition after a crash (see
    /// [`super::journal`]): batches that continue the log are appended, those it already holds
    /// skipped; then the segments are made durable. Returns the batches appended.
    pub async fn replay_journal(&self, chunks: Vec<Bytes>) -> Result<usize> {
        let mut appended = 0;
        let tp = self.topic_partition();
        'chunks: for chunk in chunks {
            let mut at = 0;
            while at < chunk.len() {
                let header = BatchHeader::parse(&chunk[at..])
                    .map_err(|e| anyhow::anyhow!("journal batch of {tp}: {e:?}"))?;
                let size = header.size_bytes;
                if size == 0 || at + size > chunk.len() {
                    anyhow::bail!("journal batch of {tp} runs past its entry");
                }
                let end = self.log_end_offset();
                if header.last_offset() < end {
                    at += size;
                    continue;
                }
                if header.base_offset != end {
                    tracing::warn!(partition = %tp, base = header.base_offset.0, log_end = end.0, "journal batch does not continue the log; the rest of its entries are skipped");
                    break 'chunks;
                }
                self.append_replicated(chunk.slice(at..at + size))
                    .map_err(|code| {
                        anyhow::anyhow!("appending a journal batch to {tp}: {code:?}")
                    })?;
                appended += 1;
                at += size;
            }
        }
        if appended > 0 {
            let end = self.log_end_offset();
            self.wait_for(end, false)
                .await
                .map_err(|code| anyhow::anyhow!("writing journal batches to {tp}: {code:?}"))?;
            self.sync_active_segment().await?;
            tracing::info!(partition = %tp, batches = appended, log_end = end.0, "recovered batches from the journal");
        }
        Ok(appended)
    }

    /// Closes the active segment (durable, indexes written) and starts a new one at the next offset.
    async fn roll(&self) -> Result<()> {
        let (dir, next_base) = {
            let st = self.state.borrow();
            if st.segments.is_empty() {
                anyhow::bail!("a partition has an active segment");
            }
            (st.dir.clone(), st.high_watermark)
        };
        self.sync_active_segment().await?;
        let segment = Segment::create(&dir, next_base, now_ms()).await?;
        // Index files are written from a copy of the closed segment's indexes, so that no borrow
        // of the partition is held across the writes.
        let closed = {
            let mut st = self.state.borrow_mut();
            st.segments.push(segment);
            let n = st.segments.len();
            st.segments[n - 2].index_snapshot()
        };
        closed.write_indexes().await?;
        // The flusher rolls between chunks: the state is exactly the state at the new base.
        self.save_txns(next_base).await?;
        tracing::debug!(partition = %self.topic_partition(), base = next_base.0, "segment rolled");
        Ok(())
    }
}

impl PartitionState {
    /// Below the log start or past the high watermark: a read there gets OFFSET_OUT_OF_RANGE.
    fn out_of_range(&self, offset: Offset) -> bool {
        offset < self.log_start || offset > self.high_watermark
    }

    /// The order the module header promises: `log_start <= durable <= high_watermark <=
    /// next_offset`. A violation is a bug in strom, not bad input: debug builds stop on it, release
    /// builds log it loudly.
    fn check_offsets(&self) {
        let ordered = self.log_start <= self.durable
            && self.durable <= self.high_watermark
            && self.high_watermark <= self.next_offset;
        debug_assert!(
            ordered,
            "partition {}: expected log_start {} <= durable {} <= high_watermark {} <= next_offset {}",
            self.tp, self.log_start.0, self.durable.0, self.high_watermark.0, self.next_offset.0
        );
        if !ordered {
            tracing::error!(partition = %self.tp, log_start = self.log_start.0, durable = self.durable.0, high_watermark = self.high_watermark.0, next_offset = self.next_offset.0, "partition offsets out of order");
        }
    }

    /// A producer waits for more than is durable or being made durable.
    fn sync_unmet(&self) -> bool {
        self.sync_wanted > self.durable.max(self.durable_pending)
    }

    fn should_roll(&self) -> bool {
        let (Some(active), Some(size)) = (self.segments.last(), self.logical_size()) else {
            return false;
        };
        let Some(first) = self.pending.front() else {
            return false;
        };
        size > 0
            && (size + first.bytes.len() as u64 > self.config.segment_size_bytes
                || now_ms().saturating_sub(active.created_ms) >= self.config.segment_age_ms
                || !active.fits(size, &first.header))
    }

    /// The active segment's size counting the batches not yet written to it.
    fn logical_size(&self) -> Option<u64> {
        self.segments
            .last()
            .map(|s| s.size_bytes + self.unwritten_bytes as u64)
    }

    /// Every offset below this is written to the segments (the rest waits in `unwritten`).
    fn written_end(&self) -> Offset {
        self.unwritten
            .front()
            .map_or(self.high_watermark, |b| b.header.base_offset)
    }

    /// The writer should write unwritten batches now.
    fn write_due(&self) -> bool {
        !self.unwritten.is_empty()
            && (self.unwritten_bytes >= WRITE_BEHIND_BYTES
                || self.write_out_upto > self.written_end()
                || !self.journal_attached
                || UNWRITTEN_BYTES.with(std::cell::Cell::get) >= SHARD_WRITE_BEHIND_MAX)
    }

    /// Moves a chunk the flusher took from `pending` to the visible log (and, with write-behind,
    /// to `unwritten`).
    fn take_chunk(&mut self, chunk: Vec<(BatchHeader, Bytes)>, write_behind: bool) {
        for (h, bytes) in chunk {
            let done = self.pending.pop_front();
            debug_assert_eq!(done.map(|d| d.header.base_offset), Some(h.base_offset));
            if write_behind {
                self.unwritten_bytes += bytes.len();
                add_unwritten(bytes.len() as isize);
                self.unwritten.push_back(PendingBatch {
                    header: h,
                    bytes: bytes.clone(),
                });
            }
            self.high_watermark = h.last_offset().next();
            self.txns.observe(&h, &bytes);
            self.push_cache(CachedBatch {
                base_offset: h.base_offset,
                last_offset: h.last_offset(),
                bytes,
            });
        }
        self.check_offsets();
    }

    /// Records batches just written at the end of the active segment in its indexes and size.
    fn track_written(&mut self, chunk: &[(BatchHeader, Bytes)]) -> Result<()> {
        let interval = self.config.index_interval_bytes;
        let Some(active) = self.segments.last_mut() else {
            anyhow::bail!("a partition has an active segment");
        };
        let mut position = active.size_bytes;
        for (h, _) in chunk {
            // should_roll keeps every batch addressable; failing here takes the partition
            // offline rather than writing an index that points at the wrong offsets.
            active.track(position, h, interval)?;
            position += h.size_bytes as u64;
        }
        active.commit_write(chunk.iter().map(|(_, b)| &b[..]));
        Ok(())
    }

    /// A transaction marker must not come from an older epoch than the producer's batches here
    /// (the coordinator fenced that producer since).
    fn check_marker_epoch(&self, h: &BatchHeader) -> Result<(), ErrorCode> {
        match self.producers.get(&h.producer_id) {
            Some(state) if h.producer_epoch < state.epoch => Err(ErrorCode::INVALID_PRODUCER_EPOCH),
            _ => Ok(()),
        }
    }

    /// Checks an idempotent batch's sequence. `Ok(Some)` is a duplicate of a recent batch.
    fn check_sequence(&self, h: &BatchHeader) -> Result<Option<ProducerBatch>, ErrorCode> {
        let Some(state) = self.producers.get(&h.producer_id) else {
            return Ok(None);
        };
        if h.producer_epoch < state.epoch {
            return Err(ErrorCode::INVALID_PRODUCER_EPOCH);
        }
        if h.producer_epoch > state.epoch {
            return if h.base_sequence == 0 {
                Ok(None)
            } else {
                Err(ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER)
            };
        }
        if let Some(dup) = state
            .batches
            .iter()
            .find(|b| b.first_sequence == h.base_sequence && b.last_sequence == h.last_sequence())
        {
            return Ok(Some(*dup));
        }
        let last = state.batches.back().map_or(-1, |b| b.last_sequence);
        let expected = if last == i32::MAX { 0 } else { last + 1 };
        if h.base_sequence != expected {
            return Err(ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER);
        }
        Ok(None)
    }

    fn push_cache(&mut self, batch: CachedBatch) {
        self.cache_bytes += batch.bytes.len();
        self.cache.push_back(batch);
        self.trim_cache();
    }

    /// Lets the oldest cached batches go until the cache is within its limit.
    fn trim_cache(&mut self) {
        while self.cache_bytes > self.cache_bytes_max {
            match self.cache.pop_front() {
                Some(old) => self.cache_bytes -= old.bytes.len(),
                None => break,
            }
        }
    }

    /// Serves a read from the cache when it holds the batch containing `offset`.
    fn read_cache(&self, offset: Offset, max_bytes: usize) -> Option<Batches> {
        let first = self.cache.front()?;
        if first.base_offset > offset {
            return None;
        }
        let start = partition_point_from_back(&self.cache, |b| b.last_offset < offset);
        concat_batches(self.cache.range(start..).map(|b| &b.bytes), max_bytes)
    }

    /// Serves a read from the batches not yet written to the segment, when they hold `offset`
    /// (the cache may have let them go; the segment does not have them yet).
    fn read_unwritten(&self, offset: Offset, max_bytes: usize) -> Option<Batches> {
        let first = self.unwritten.front()?;
        if first.header.base_offset > offset {
            return None;
        }
        let start = partition_point_from_back(&self.unwritten, |b| b.header.last_offset() < offset);
        concat_batches(self.unwritten.range(start..).map(|b| &b.bytes), max_bytes)
    }
}

/// `VecDeque::partition_point` (the first index where `pred` is false; `pred` holds for a
/// prefix), searched from the back: the span that holds the answer is found by doubling steps
/// from the end, then halved. A consumer at the tail of a log reads its newest batches, so a read
/// touches a few entries at the end (recently written, in the CPU's cache) instead of a binary
/// search's way through the whole deque: at 1,000 partitions, each caching a few thousand small
/// batches, those cache misses were 6% of the broker's CPU.
fn partition_point_from_back<T>(deque: &VecDeque<T>, mut pred: impl FnMut(&T) -> bool) -> usize {
    // `pred` is false at `hi` (or `hi` is the end) and true below `lo`.
    let mut hi = deque.len();
    let mut step = 1;
    let mut lo = loop {
        if step > hi {
            break 0;
        }
        let probe = hi - step;
        if pred(&deque[probe]) {
            break probe + 1;
        }
        hi = probe;
        step *= 2;
    };
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if pred(&deque[mid]) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Whole batches from `batches` up to `max_bytes`, at least one, as they are (not copied
/// together).
fn concat_batches<'a>(
    mut batches: impl Iterator<Item = &'a Bytes>,
    max_bytes: usize,
) -> Option<Batches> {
    let mut out = Batches::one(batches.next()?.clone());
    let mut len = out.len();
    for b in batches {
        if len + b.len() > max_bytes {
            break;
        }
        len += b.len();
        out.push(b.clone());
    }
    Some(out)
}

/// The idempotent producers of a partition as a clean shutdown leaves them (`producers.snapshot`),
/// valid only for a log that ends at `end_offset`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ProducerSnapshot {
    pub end_offset: i64,
    pub producers: Vec<SnapshotProducer>,
}

/// One idempotent producer in a [`ProducerSnapshot`], with its last batches (at most five).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct SnapshotProducer {
    pub producer_id: i64,
    pub epoch: i16,
    pub last_timestamp: i64,
    /// First and last sequence, base and last offset of each batch, oldest first.
    pub batches: Vec<[i64; 4]>,
}

const PRODUCERS_FILE: &str = "producers.snapshot";
const PRODUCERS_VERSION: u32 = 1;

fn producer_snapshot(producers: &HashMap<i64, ProducerState>, end: Offset) -> ProducerSnapshot {
    let mut list: Vec<_> = producers
        .iter()
        .map(|(id, p)| {
            let batches = p
                .batches
                .iter()
                .map(|b| {
                    [
                        i64::from(b.first_sequence),
                        i64::from(b.last_sequence),
                        b.base_offset.0,
                        b.last_offset.0,
                    ]
                })
                .collect();
            SnapshotProducer {
                producer_id: *id,
                epoch: p.epoch,
                last_timestamp: p.last_timestamp,
                batches,
            }
        })
        .collect();
    list.sort_by_key(|p| p.producer_id);
    ProducerSnapshot {
        end_offset: end.0,
        producers: list,
    }
}

/// Loads the producer snapshot of a cleanly stopped partition; fails unless it was taken at
/// `end` (the log's end as it was opened).
async fn load_producers(dir: &Path, end: Offset) -> Result<HashMap<i64, ProducerState>> {
    let bytes = files::read_meta(&dir.join(PRODUCERS_FILE), PRODUCERS_VERSION).await?;
    let snapshot = decode_producer_snapshot(&bytes)?;
    if snapshot.end_offset != end.0 {
        anyhow::bail!(
            "snapshot taken at offset {}, log ends at {}",
            snapshot.end_offset,
            end.0
        );
    }
    let mut producers = HashMap::with_capacity(snapshot.producers.len());
    for p in snapshot.producers {
        let mut batches = VecDeque::with_capacity(p.batches.len());
        for [first, last, base, last_offset] in p.batches {
            batches.push_back(ProducerBatch {
                first_sequence: i32::try_from(first)?,
                last_sequence: i32::try_from(last)?,
                base_offset: Offset(base),
                last_offset: Offset(last_offset),
            });
        }
        producers.insert(
            p.producer_id,
            ProducerState {
                epoch: p.epoch,
                batches,
                last_timestamp: p.last_timestamp,
            },
        );
    }
    Ok(producers)
}

/// Decodes a producer snapshot's payload; arbitrary bytes are an error.
pub fn decode_producer_snapshot(payload: &[u8]) -> Result<ProducerSnapshot> {
    Ok(rkyv::from_bytes::<ProducerSnapshot, rkyv::rancor::Error>(
        payload,
    )?)
}

fn record_producer_batch(producers: &mut HashMap<i64, ProducerState>, h: &BatchHeader) {
    if h.producer_id < 0 {
        return;
    }
    let entry = producers
        .entry(h.producer_id)
        .or_insert_with(|| ProducerState {
            epoch: h.producer_epoch,
            batches: VecDeque::new(),
            last_timestamp: -1,
        });
    if h.producer_epoch != entry.epoch {
        entry.epoch = h.producer_epoch;
        entry.batches.clear();
    }
    if h.is_control() || h.base_sequence < 0 {
        // A marker, or a coordinator's transactional write: no sequence to continue.
        return;
    }
    entry.last_timestamp = h.max_timestamp;
    entry.batches.push_back(ProducerBatch {
        first_sequence: h.base_sequence,
        last_sequence: h.last_sequence(),
        base_offset: h.base_offset,
        last_offset: h.last_offset(),
    });
    while entry.batches.len() > PRODUCER_BATCHES_KEPT {
        entry.batches.pop_front();
    }
}

/// Reads whole batches from a segment file between `start` and `end`, skipping batches that end
/// before `offset`, until `max_bytes` (always at least one batch).
async fn read_batches(
    file: &glommio::io::DmaFile,
    start: u64,
    end: u64,
    offset: Offset,
    max_bytes: usize,
) -> Result<Bytes> {
    let mut pos = start;
    // Sized for what the read may return: grown batch by batch, the buffer was copied again at
    // every doubling (a tenth of the broker's CPU when a consumer reads from the beginning).
    let mut out = BytesMut::with_capacity(usize::try_from((end - start).min(max_bytes as u64))?);
    while pos < end {
        let want = usize::try_from((end - pos).min((max_bytes.max(64 * 1024)) as u64))?;
        let chunk = file.read_at(pos, want).await.io()?;
        let mut at = 0usize;
        while at < chunk.len() {
            let header = match BatchHeader::parse(&chunk[at..]) {
                Ok(h) => h,
                Err(batch::BatchError::Incomplete) => break,
                Err(e) => anyhow::bail!(
                    "corrupt batch header at position {}: {e:?}",
                    pos + at as u64
                ),
            };
            let batch_end = at + header.size_bytes;
            if header.last_offset() < offset {
                if batch_end > chunk.len() {
                    at = batch_end;
                    break;
                }
                at = batch_end;
                continue;
            }
            if !out.is_empty() && out.len() + header.size_bytes > max_bytes {
                return Ok(out.freeze());
            }
            if batch_end > chunk.len() {
                if out.is_empty() {
                    let whole = file
                        .read_at(pos + at as u64, header.size_bytes)
                        .await
                        .io()?;
                    out.extend_from_slice(&whole);
                    at = batch_end;
                }
                break;
            }
            out.extend_from_slice(&chunk[at..batch_end]);
            at = batch_end;
            if out.len() >= max_bytes {
                return Ok(out.freeze());
            }
        }
        if at == 0 {
            break;
        }
        pos += at as u64;
    }
    Ok(out.freeze())
}

/// Calls `f` with every batch of a segment file, reading it in large chunks.
async fn for_each_batch(
    file: &glommio::io::DmaFile,
    size: u64,
    mut f: impl FnMut(&[u8], &BatchHeader) -> Result<()>,
) -> Result<()> {
    let mut pos = 0u64;
    while pos < size {
        let want = usize::try_from((size - pos).min(1 << 20))?;
        let chunk = file.read_at(pos, want).await.io()?;
        let mut at = 0usize;
        while at < chunk.len() {
            let header = match BatchHeader::parse(&chunk[at..]) {
                Ok(h) => h,
                Err(batch::BatchError::Incomplete) => break,
                Err(e) => anyhow::bail!("corrupt batch at position {}: {e:?}", pos + at as u64),
            };
            if at + header.size_bytes > chunk.len() {
                if at == 0 {
                    let whole = file.read_at(pos, header.size_bytes).await.io()?;
                    f(&whole, &header)?;
                    at = header.size_bytes;
                }
                break;
            }
            f(&chunk[at..at + header.size_bytes], &header)?;
            at += header.size_bytes;
        }
        if at == 0 {
            anyhow::bail!("no progress reading batches at position {pos}");
        }
        pos += at as u64;
        glommio::yield_if_needed().await;
    }
    Ok(())
}

/// The `(topic, partition, topic id)` a partition's metadata payload names; arbitrary bytes are an
/// error (bytecheck validates before anything is read).
pub fn partition_meta_identity(payload: &[u8]) -> Result<(String, i32, [u8; 16])> {
    let meta = decode_partition_meta(payload)?;
    Ok((meta.topic, meta.partition, meta.topic_id))
}

fn decode_partition_meta(payload: &[u8]) -> Result<PartitionMeta> {
    Ok(rkyv::from_bytes::<PartitionMeta, rkyv::rancor::Error>(
        payload,
    )?)
}

async fn write_partition_meta(path: &Path, meta: &PartitionMeta) -> Result<()> {
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(meta)?;
    files::write_meta(path, META_VERSION, &bytes).await
}

/// The base offsets of the segments in partition directory `dir`, ascending. Segment files renamed for a paced deletion that a
/// restart interrupted ([`super::trash`]) are removed here.
fn list_segments(dir: &Path) -> Result<Vec<Offset>> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(super::trash::DELETED_SUFFIX) {
            std::fs::remove_file(entry.path())?;
            tracing::info!(file = %entry.path().display(), "finished an interrupted segment deletion");
            continue;
        }
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(base) = stem.parse::<i64>() {
                bases.push(Offset(base));
            }
        }
    }
    bases.sort();
    Ok(bases)
}

/// The offsets at which transaction states are saved in `dir`.
fn list_txn_states(dir: &Path) -> Result<Vec<Offset>> {
    let mut offsets = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(txn::STATE_SUFFIX) {
            if let Ok(offset) = stem.parse::<i64>() {
                offsets.push(Offset(offset));
            }
        }
    }
    Ok(offsets)
}

/// The transaction state of a log ending at `end`: the newest saved state at or below `end`,
/// then every transactional batch after it, read from the segments.
async fn recover_txns(
    tp: &TopicPartition,
    dir: &Path,
    segments: &[Segment],
    end: Offset,
) -> Result<TxnState> {
    let mut saved_at = {
        let dir = dir.to_path_buf();
        files::blocking(move || list_txn_states(&dir)).await?
    };
    saved_at.sort();
    let mut from = Offset(0);
    let mut state = TxnState::default();
    for at in saved_at.iter().rev().filter(|o| **o <= end) {
        let path = dir.join(txn::state_file_name(*at));
        match files::read_meta(&path, txn::STATE_VERSION)
            .await
            .and_then(|payload| txn::decode_saved(&payload))
        {
            Ok(saved) if saved.offset == at.0 => {
                state = TxnState::restore(&saved);
                from = *at;
                break;
            }
            Ok(_) => {
                tracing::warn!(partition = %tp, file = %path.display(), "transaction state names another offset; ignored")
            }
            Err(e) => {
                tracing::warn!(partition = %tp, file = %path.display(), error = %format!("{e:#}"), "unreadable transaction state; ignored")
            }
        }
    }
    if from >= end {
        return Ok(state);
    }
    let mut scanned = 0usize;
    for seg in segments
        .iter()
        .filter(|s| s.end_offset > from && s.size_bytes > 0)
    {
        let file = seg.file.get().await?;
        let start = if seg.base_offset < from {
            seg.position_for(from)
        } else {
            0
        };
        let (batches, _) =
            segment::scan(&file, seg.base_offset, start, seg.size_bytes, false).await?;
        for b in batches {
            let h = b.header;
            if h.last_offset() < from || !h.is_transactional() {
                continue;
            }
            scanned += 1;
            if h.is_control() {
                let bytes = file.read_at(b.position, h.size_bytes).await.io()?;
                state.observe(&h, &bytes);
            } else {
                state.observe(&h, &[]);
            }
        }
    }
    if scanned > 0 {
        tracing::info!(partition = %tp, from = from.0, batches = scanned, "transaction state recovered from the log");
    }
    Ok(state)
}

/// Epoch of the partition's current leadership, for Metadata and stored batches.
pub fn leader_epoch(log: &PartitionLog) -> Epoch {
    Epoch(log.state.borrow().meta.leader_epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_from_the_back_finds_what_a_binary_search_finds() {
        // Every length up to 70, values with repeats and gaps, every threshold among them.
        for len in 0..70usize {
            let deque: VecDeque<usize> = (0..len).map(|i| i / 3 * 2).collect();
            for threshold in 0..=len {
                let want = deque.partition_point(|v| *v < threshold);
                assert_eq!(
                    partition_point_from_back(&deque, |v| *v < threshold),
                    want,
                    "len {len}, threshold {threshold}"
                );
            }
        }
    }
    use crate::storage::batch::tests::make_batch;
    use glommio::LocalExecutorBuilder;

    fn config(segment_size_bytes: u64) -> LogConfig {
        LogConfig {
            segment_size_bytes,
            segment_age_ms: u64::MAX,
            index_interval_bytes: 256,
            ..LogConfig::resolve(&crate::config::BrokerConfig::default(), &Default::default())
        }
    }

    fn run<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        LocalExecutorBuilder::default()
            .io_memory(1 << 20)
            .spawn(f)
            .expect("executor starts")
            .join()
            .expect("executor finishes");
    }

    /// A fresh directory, removed when the test drops it.
    fn temp_dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("strom-test-{name}-"))
            .tempdir()
            .unwrap()
    }

    async fn open(dir: &Path, segment_size_bytes: u64) -> PartitionLog {
        super::super::files::probe_device(dir).await.unwrap();
        PartitionLog::open(
            TopicPartition::new("t", 0),
            dir.join("t-0"),
            [0; 16],
            config(segment_size_bytes),
            1 << 20,
            false,
        )
        .await
        .unwrap()
    }

    /// Appends `n` batches of 3 records with acks=all; returns the end offset.
    async fn append_durable(log: &PartitionLog, n: usize) -> Offset {
        let mut end = Offset(0);
        for i in 0..n {
            let b = make_batch(0, 3, 1_000 + i as i64);
            let a = log.append(b, true, Origin::Client).unwrap();
            end = a.end_offset;
        }
        log.wait_for(end, true).await.unwrap();
        end
    }

    async fn read_all(log: &PartitionLog, from: Offset) -> Vec<BatchHeader> {
        let mut out = Vec::new();
        let mut at = from;
        loop {
            let r = log.read(at, 4096, false).await.unwrap();
            if r.records.is_empty() {
                return out;
            }
            let batches = batch::split_batches(&r.records.into_bytes()).unwrap();
            for (_, h) in batches {
                at = h.last_offset().next();
                out.push(h);
            }
        }
    }

    /// Regression (a broker that hung on SIGTERM in the cluster tests): batches appended without
    /// acks=all, then a shutdown. The shutdown's sync wakes the flusher, which attaches the
    /// journal and, doing so, fdatasyncs the segment; that made the batches durable without waking
    /// the shutdown, which then waited forever.
    #[test]
    fn shutdown_finishes_when_the_journals_attach_made_its_batches_durable() {
        let tmp = temp_dir("attach-wakes-shutdown");
        let dir = tmp.path().to_path_buf();
        run(move || async move {
            let log = open(&dir, 1 << 20).await;
            let mut end = Offset(0);
            for i in 0..5 {
                let b = make_batch(0, 3, 1_000 + i);
                end = log.append(b, false, Origin::Client).unwrap().end_offset;
            }
            log.wait_for(end, false).await.unwrap();
            assert!(
                log.durable_offset() < end,
                "acks=1 appends are not synced yet"
            );
            let journal = crate::storage::journal::Journal::start(&dir, 0, 2, 1 << 20, usize::MAX)
                .await
                .unwrap()
                .expect("a journal with two files");
            crate::storage::journal::open_journals();
            log.attach_journal(journal);
            let stopped = glommio::timer::timeout(std::time::Duration::from_secs(5), async {
                Ok(log.shutdown().await)
            })
            .await;
            let result = stopped.expect("shutdown finished within 5 s");
            result.unwrap();
            assert_eq!(log.durable_offset(), end);
        });
    }

    #[test]
    fn a_smaller_cache_share_lets_the_oldest_batches_go_at_once() {
        let tmp = temp_dir("cache-share");
        let dir = tmp.path().to_path_buf();
        run(move || async move {
            let log = open(&dir, 1 << 30).await;
            let end = append_durable(&log, 10).await;
            log.wait_for(end, true).await.unwrap();
            let from_memory = |at: i64| log.read_from_memory(Offset(at), 1 << 20, false).is_some();
            assert!(from_memory(0), "ten small batches fit in a 1 MiB cache");
            // A new topic elsewhere on the shard halves this partition's share; with no appends
            // here to trim it, the share must still hold.
            let batch_bytes = make_batch(0, 3, 1_000).len();
            log.set_cache_limit(4 * batch_bytes);
            assert!(!from_memory(0), "the oldest batches must leave the cache");
            assert!(from_memory(27), "the newest four stay");
            assert!(!from_memory(17));
            log.close();
        });
    }

    #[test]
    fn appended_batches_read_back_across_segments_after_restart() {
        let tmp = temp_dir("segments");
        let dir = tmp.path().to_path_buf();
        run(move || async move {
            let log = open(&dir, 1_000).await;
            let end = append_durable(&log, 60).await;
            assert_eq!(end, Offset(180));
            log.close();
            let segments = list_segments(&dir.join("t-0")).unwrap();
            assert!(
                segments.len() > 5,
                "small segment.bytes must roll: {segments:?}"
            );

            let log = open(&dir, 1_000).await;
            assert_eq!(log.high_watermark(), Offset(180));
            let headers = read_all(&log, Offset(0)).await;
            assert_eq!(headers.len(), 60);
            for (i, h) in headers.iter().enumerate() {
                assert_eq!(h.base_offset, Offset(3 * i as i64));
            }
            // A read from inside a batch returns that whole batch first.
            let r = log.read(Offset(100), 1, false).await.unwrap();
            let first = BatchHeader::parse(&r.records.into_bytes()).unwrap();
            assert_eq!(first.base_offset, Offset(99));
            // New appends continue at the recovered end.
            let a = log
                .append(make_batch(0, 2, 5), true, Origin::Client)
                .unwrap();
            assert_eq!(a.base_offset, Offset(180));
            log.wait_for(a.end_offset, true).await.unwrap();
            log.close();
        });
    }

    #[test]
    fn torn_tail_is_truncated_on_recovery() {
        let tmp = temp_dir("torn");
        let dir = tmp.path().to_path_buf();
        run(move || async move {
            let log = open(&dir, 1 << 30).await;
            append_durable(&log, 10).await;
            log.close();
            let seg = dir.join("t-0").join(format!("{:020}.log", 0));
            let mut data = std::fs::read(&seg).unwrap();
            let mut valid_len = 0;
            let mut batches = 0;
            while let Ok(h) = batch::validate(&data[valid_len..]) {
                valid_len += h.size_bytes;
                batches += 1;
            }
            assert_eq!(batches, 10);
            // A torn last batch: the first half of a copy of batch 0 with a wrong offset.
            data.truncate(valid_len);
            let mut torn = make_batch(30, 3, 9).to_vec();
            torn.truncate(torn.len() / 2);
            data.extend_from_slice(&torn);
            std::fs::write(&seg, &data).unwrap();

            let log = open(&dir, 1 << 30).await;
            assert_eq!(log.high_watermark(), Offset(30));
            assert_eq!(read_all(&log, Offset(0)).await.len(), 10);
            assert_eq!(std::fs::metadata(&seg).unwrap().len(), valid_len as u64);
            log.close();
        });
    }

    #[test]
    fn idempotent_retry_returns_the_original_offset() {
        let tmp = temp_dir("idem");
        let dir = tmp.path().to_path_buf();
        run(move || async move {
            let log = open(&dir, 1 << 30).await;
            let mut b = make_batch(0, 2, 7);
            // producer id 42, epoch 0, base sequence 0; then recompute the CRC.
            b[43..51].copy_from_slice(&42i64.to_be_bytes());
            b[51..53].copy_from_slice(&0i16.to_be_bytes());
            b[53..57].copy_from_slice(&0i32.to_be_bytes());
            let crc = crc32c::crc32c(&b[21..]);
            b[17..21].copy_from_slice(&crc.to_be_bytes());
            let first = log.append(b.clone(), true, Origin::Client).unwrap();
            let retry = log.append(b, true, Origin::Client).unwrap();
            assert_eq!(first.base_offset, retry.base_offset);
            log.wait_for(retry.end_offset, true).await.unwrap();
            assert_eq!(log.high_watermark(), Offset(2));
            log.close();
        });
    }
}
