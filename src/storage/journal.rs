//! A shard's durability journal: one flush round makes every partition's queued batches durable
//! with one write and one fdatasync, whatever the number of partitions.
//!
//! # Why a journal
//! Without it, `acks=all` costs one fdatasync per partition touched by a request, and each is an
//! ext4 journal commit because the segment grew (13 per request at 16 partitions, up to 13,600/s
//! at 1,000). The two ways to share a sync were measured on this machine's ext4 (4 KiB O_DIRECT
//! writes, each followed by fdatasync):
//! - *one sync per dirty file per round, issued together*: the count still grows with the
//!   partitions, and every sync of an appended file is a file-system journal commit
//!   (p99 2.2-4.1 ms);
//! - *a per-shard journal*: one sync per round, and once the journal's files have been written
//!   through once, rounds overwrite allocated blocks, so the sync is a device flush with no
//!   metadata (p99 0.27-0.38 ms against 2.2-4.1 ms appending).
//!
//! strom keeps the second. The segments are written behind the journal (served from memory
//! until then) and synced only when the journal reuses a file (a checkpoint) or the segment
//! rolls.
//!
//! # Rounds
//! The partitions' flushers [`Journal::submit`] each chunk of batches as they start writing it to
//! the segment, and get a ticket. One task writes rounds: everything submitted since the previous
//! round, in one aligned write at the journal's position. Another syncs: one fdatasync covers
//! every round written before it, and runs while the next round is written. So the round size
//! follows the load, and an idle shard writes and syncs at once (no timer, no Nagle). A flusher
//! does not wait for its sync before writing its next chunk: it leaves its partition with the
//! journal ([`Journal::when_durable`]), and the sync that covers its ticket moves the durable
//! offset of every partition it covers in one pass (not a task per partition and round, which at
//! 1,000 partitions was tens of thousands of tasks a second).
//!
//! A round is `[magic u32][crc32c u32][run u64][seq u64][payload len u32][entries u32]` (little
//! endian; the CRC covers everything after itself, payload included), then its entries, padded
//! to the alignment: `[topic name len u16][name][partition i32][topic id 16][len u32][batches]`.
//! `run` is the start time (ns) of the broker run that wrote it and `seq` counts rounds from 1 in
//! that run, so rounds a file kept from an earlier pass or run end the file's replay.
//!
//! # Large chunks
//! A partition's chunk of `strom.journal.bypass.bytes` (256 KiB) or more skips the journal: it is
//! written to the segment and fdatasynced there (see "Large chunks bypass the journal" in
//! [`PartitionLog`]). A round exists to share one sync among many small chunks; journaling a
//! chunk that large only writes its bytes twice. Measured with `rdkafka_performance` producing
//! 2 GB flat out (1 MB batches, 16 partitions, `acks=all`), two paired rounds: through the
//! journal the device wrote 4.3 GB, the produce took 2.76-2.83 s and the broker 2.44-2.63 CPU
//! seconds; with the bypass 2.0 GB, 2.28-2.50 s and 1.87-2.09 CPU seconds.
//!
//! # Files and checkpoints
//! `strom.journal.files` files of `strom.journal.file.bytes` in `journal/shard-N/`, used in turn.
//! Before a file is reused, a checkpoint makes the segments of every partition it covers durable
//! up to the offsets it holds; the writer waits only if that has not finished when it gets there.
//! The files grow on their first pass. Once the writer is half-way through a file, the next one
//! is filled with zeros to its full size (the writer waits for that if it gets there first), so
//! that its rounds overwrite allocated blocks; only the first file's first pass appends, with
//! the file-system commit each sync then costs. A broker that takes little traffic never writes
//! the zeros.
//!
//! # Write-behind
//! With the journal attached, segments are written behind it ([`PartitionLog`]'s write-behind):
//! a partition's batches reach its segment in 64 KiB writes off the produce path, and a
//! checkpoint first has them written (two partitions at a time, eight once the writer needs the
//! file next), then makes all of them durable with one syncfs of the file system rather than an
//! fdatasync per partition.
//!
//! # Recovery
//! After a crash (no clean-shutdown marker) each shard reads every shard's journal directory
//! (the core count may have changed) and keeps the entries of the partitions it owns. A partition
//! applies its entries as it opens ([`crate::storage::PartitionLog::replay_journal`]): a batch
//! that starts at its log end is appended, one below it is skipped, so replay is idempotent; the
//! segments are then fdatasynced. No shard writes its journal before every shard has opened its
//! partitions ([`open_journals`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use event_listener::Event;
use glommio::io::{DmaFile, OpenOptions};

use super::files::GlommioResultExt;
use super::partition::PartitionLog;
use crate::metrics::Timing;
use crate::model::{Offset, PartitionMap, TopicPartition};

pub const JOURNAL_DIR: &str = "journal";
const MAGIC: u32 = 0x4e52_4a53; // "SJRN"
pub const ROUND_HEADER_BYTES: usize = 32;
/// Zeros written at a time when a journal file is filled.
const FILL_CHUNK_BYTES: u64 = 1 << 20;
/// Partitions a checkpoint writes out at the same time while the journal's writer is still
/// files away from needing it: few, so that the journal's own rounds do not queue behind them at
/// the device (at 1,000 partitions, two lanes instead of eight lowered the e2e p95 and p99).
const CHECKPOINT_LANES_CALM: usize = 2;
/// ... and once the writer is in the file before it (it needs this one next): many, so that the
/// journal never waits on a checkpoint because it was paced.
const CHECKPOINT_LANES_URGENT: usize = 8;
/// A round carries at most this much; more waits for the next round.
const ROUND_BYTES_MAX: usize = 8 << 20;

/// A journal or checkpoint sync or write taking this long is logged (at most once a second per
/// shard): every `acks=all` produce on the shard waited for it.
const SLOW_IO: Duration = Duration::from_millis(50);

/// Set once every shard has opened its partitions (and so applied what the journals held):
/// journals may be written from then on. Before it, flushes sync their segments directly.
static JOURNALS_OPEN: AtomicBool = AtomicBool::new(false);

/// Called by the start-up once every shard is ready.
pub fn open_journals() {
    JOURNALS_OPEN.store(true, Ordering::Release);
}

fn journals_open() -> bool {
    JOURNALS_OPEN.load(Ordering::Acquire)
}

/// The directory of shard `shard`'s journal.
pub fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join(JOURNAL_DIR).join(format!("shard-{shard}"))
}

/// Removes the journal directories of shards that no longer exist (the core count shrank). Only
/// once every shard has opened its partitions: their entries are in the segments by then.
pub fn remove_orphans(data_dir: &Path, shards: usize) -> Result<()> {
    let root = data_dir.join(JOURNAL_DIR);
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let index = name
            .strip_prefix("shard-")
            .and_then(|n| n.parse::<usize>().ok());
        if index.is_some_and(|i| i >= shards) {
            tracing::info!(dir = %entry.path().display(), "journal of a shard that no longer exists: removing it");
            std::fs::remove_dir_all(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// One partition's batches in a round.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    pub topic: String,
    pub partition: i32,
    pub topic_id: [u8; 16],
    pub batches: Bytes,
}

/// A decoded round header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundHeader {
    pub run: u64,
    pub seq: u64,
    pub payload_len: usize,
    pub entries: u32,
}

/// Reads a round header; `None` when `bytes` does not start with one (zeros, a stale or torn
/// block). The payload is not checked here: [`decode_round`] does that.
pub fn decode_round_header(bytes: &[u8]) -> Option<RoundHeader> {
    let h = bytes.get(..ROUND_HEADER_BYTES)?;
    if u32::from_le_bytes(h[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    Some(RoundHeader {
        run: u64::from_le_bytes(h[8..16].try_into().ok()?),
        seq: u64::from_le_bytes(h[16..24].try_into().ok()?),
        payload_len: usize::try_from(u32::from_le_bytes(h[24..28].try_into().ok()?)).ok()?,
        entries: u32::from_le_bytes(h[28..32].try_into().ok()?),
    })
}

/// Decodes a whole round (header and payload, as many bytes as `bytes` holds). Errors say why a
/// round is not valid; a reader stops at the first one.
pub fn decode_round(bytes: &Bytes) -> Result<(RoundHeader, Vec<JournalEntry>)> {
    let Some(header) = decode_round_header(bytes) else {
        bail!("no round header");
    };
    let end = ROUND_HEADER_BYTES
        .checked_add(header.payload_len)
        .filter(|&e| e <= bytes.len())
        .context("round longer than the bytes read")?;
    let stored = u32::from_le_bytes(bytes[4..8].try_into()?);
    if crc32c::crc32c(&bytes[8..end]) != stored {
        bail!("round checksum mismatch");
    }
    let mut at = ROUND_HEADER_BYTES;
    let mut entries = Vec::new();
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>> {
        let r = *at..at
            .checked_add(n)
            .filter(|&e| e <= end)
            .context("entry past the round")?;
        *at = r.end;
        Ok(r)
    };
    for _ in 0..header.entries {
        let r = take(&mut at, 2)?;
        let name_len = usize::from(u16::from_le_bytes(bytes[r].try_into()?));
        let r = take(&mut at, name_len)?;
        let topic = std::str::from_utf8(&bytes[r])
            .context("topic name is not UTF-8")?
            .to_string();
        let r = take(&mut at, 4)?;
        let partition = i32::from_le_bytes(bytes[r].try_into()?);
        let r = take(&mut at, 16)?;
        let topic_id: [u8; 16] = bytes[r].try_into()?;
        let r = take(&mut at, 4)?;
        let len = usize::try_from(u32::from_le_bytes(bytes[r].try_into()?))?;
        let r = take(&mut at, len)?;
        entries.push(JournalEntry {
            topic,
            partition,
            topic_id,
            batches: bytes.slice(r),
        });
    }
    if at != end {
        bail!("round payload has bytes after its entries");
    }
    Ok((header, entries))
}

fn entry_len(topic: &str, parts_len: usize) -> usize {
    2 + topic.len() + 4 + 16 + 4 + parts_len
}

/// One partition's batches as the encoder takes them.
pub struct EntryParts<'a> {
    pub tp: &'a TopicPartition,
    pub topic_id: [u8; 16],
    pub parts: &'a [Bytes],
}

/// The encoded length of a round of `entries`, before alignment.
pub fn round_len(entries: &[EntryParts<'_>]) -> usize {
    ROUND_HEADER_BYTES
        + entries
            .iter()
            .map(|e| entry_len(&e.tp.topic, e.parts.iter().map(Bytes::len).sum()))
            .sum::<usize>()
}

/// Encodes a round into `out`, which must be at least [`round_len`] long; the rest is zeroed.
pub fn encode_round(out: &mut [u8], run: u64, seq: u64, entries: &[EntryParts<'_>]) {
    let mut at = ROUND_HEADER_BYTES;
    for e in entries {
        let name = e.tp.topic.as_bytes();
        // Topic names are at most 249 bytes (Kafka's limit, checked at creation).
        let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        out[at..at + 2].copy_from_slice(&name_len.to_le_bytes());
        at += 2;
        out[at..at + name.len()].copy_from_slice(name);
        at += name.len();
        out[at..at + 4].copy_from_slice(&e.tp.partition.0.to_le_bytes());
        at += 4;
        out[at..at + 16].copy_from_slice(&e.topic_id);
        at += 16;
        let parts_len: usize = e.parts.iter().map(Bytes::len).sum();
        let len = u32::try_from(parts_len).unwrap_or(u32::MAX);
        out[at..at + 4].copy_from_slice(&len.to_le_bytes());
        at += 4;
        for p in e.parts {
            out[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
    }
    let payload_len = u32::try_from(at - ROUND_HEADER_BYTES).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&run.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[24..28].copy_from_slice(&payload_len.to_le_bytes());
    let count = u32::try_from(entries.len()).unwrap_or(u32::MAX);
    out[28..32].copy_from_slice(&count.to_le_bytes());
    let crc = crc32c::crc32c(&out[8..at]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out[at..].fill(0);
}

/// Batches submitted by a partition's flusher, waiting for the next round.
struct Submitted {
    ticket: u64,
    tp: TopicPartition,
    topic_id: [u8; 16],
    parts: Vec<Bytes>,
    log: PartitionLog,
    /// One past the last offset of these batches: what a checkpoint makes durable in the segments.
    end: Offset,
}

struct State {
    failed: bool,
    queue: Vec<Submitted>,
    next_ticket: u64,
    /// Every ticket below this is written.
    written: u64,
    /// Every ticket below this is durable.
    durable: u64,
    /// A round must be made durable up to this ticket.
    sync_wanted: u64,
    next_seq: u64,
    current: usize,
    position: u64,
    /// Per file: the partitions it holds batches of, and the end of what it holds.
    members: Vec<PartitionMap<(PartitionLog, Offset)>>,
    /// Per file: a checkpoint is still running, so it cannot be reused yet.
    checkpointing: Vec<bool>,
    /// Per file: written through to its full size, so rounds overwrite allocated blocks.
    filled: Vec<bool>,
    /// Per file: zeros are being written to its end; the writer does not enter it meanwhile.
    filling: Vec<bool>,
    /// Partitions waiting for a ticket to be durable, and the offset that makes durable.
    waiting: Vec<(u64, PartitionLog, Offset)>,
}

struct Inner {
    dir: PathBuf,
    /// The device of `dir`: checkpoints syncfs it for the partitions on the same one.
    device: Option<u64>,
    run: u64,
    file_bytes: u64,
    /// `strom.journal.bypass.bytes`: a partition's chunk this large skips the journal.
    bypass_bytes: usize,
    files: Vec<Rc<DmaFile>>,
    st: RefCell<State>,
    /// Notified when work is queued.
    work: Event,
    /// Notified when tickets become written or durable, a checkpoint ends, or the journal fails.
    progress: Event,
}

/// A shard's journal; cheap to clone (one per shard, shared by its partitions).
#[derive(Clone)]
pub struct Journal {
    inner: Rc<Inner>,
}

impl Journal {
    /// Opens (creating when missing) shard `shard`'s journal files and starts its round writer.
    /// `None` when `files` is 0: partitions then sync their own segments.
    pub async fn start(
        data_dir: &Path,
        shard: usize,
        files: usize,
        file_bytes: u64,
        bypass_bytes: usize,
    ) -> Result<Option<Journal>> {
        if files == 0 {
            return Ok(None);
        }
        let dir = shard_dir(data_dir, shard);
        let target = dir.clone();
        super::files::blocking(move || std::fs::create_dir_all(&target))
            .await
            .with_context(|| format!("creating {}", dir.display()))?;
        super::files::sync_dir(&dir).await?;
        if let Some(parent) = dir.parent() {
            super::files::sync_dir(parent).await?;
        }
        let mut opened = Vec::with_capacity(files);
        let mut filled = Vec::with_capacity(files);
        for i in 0..files {
            let path = dir.join(format!("{i:02}.journal"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .dma_open(&path)
                .await
                .io()
                .with_context(|| format!("opening {}", path.display()))?;
            filled.push(file.file_size().await.io()? >= file_bytes);
            opened.push(Rc::new(file));
        }
        super::files::sync_dir(&dir).await?;
        let run = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let device = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&dir).ok().map(|m| m.dev())
        };
        let journal = Journal {
            inner: Rc::new(Inner {
                dir,
                device,
                run,
                file_bytes,
                bypass_bytes,
                files: opened,
                st: RefCell::new(State {
                    failed: false,
                    queue: Vec::new(),
                    next_ticket: 1,
                    written: 1,
                    durable: 1,
                    sync_wanted: 0,
                    next_seq: 1,
                    current: 0,
                    position: 0,
                    members: (0..files).map(|_| PartitionMap::default()).collect(),
                    checkpointing: vec![false; files],
                    filled,
                    filling: vec![false; files],
                    waiting: Vec::new(),
                }),
                work: Event::new(),
                progress: Event::new(),
            }),
        };
        let writer = journal.clone();
        glommio::spawn_local(async move { writer.run_writer().await }).detach();
        let syncer = journal.clone();
        glommio::spawn_local(async move { syncer.run_syncer().await }).detach();
        Ok(Some(journal))
    }

    /// A partition's chunk of this many bytes or more is written to its segment and fdatasynced
    /// there instead of journaled (see "Large chunks" above).
    pub fn bypass_bytes(&self) -> usize {
        self.inner.bypass_bytes
    }

    /// Where the journal stands, for a log line when a wait takes too long.
    pub fn progress_summary(&self) -> String {
        let st = self.inner.st.borrow();
        format!(
            "queued={} next_ticket={} written={} durable={} sync_wanted={} file={} position={} \
             checkpointing={:?} filling={:?} failed={}",
            st.queue.len(),
            st.next_ticket,
            st.written,
            st.durable,
            st.sync_wanted,
            st.current,
            st.position,
            st.checkpointing,
            st.filling,
            st.failed,
        )
    }

    /// Whether batches may be submitted: every shard has opened its partitions and the journal
    /// has not failed.
    pub fn is_open(&self) -> bool {
        journals_open() && !self.inner.st.borrow().failed
    }

    /// Queues a partition's batches for the next round. Returns the ticket to wait for, or `None`
    /// when the journal cannot take them (closed, failed, or larger than a journal file): the
    /// partition then syncs its segment itself.
    pub fn submit(
        &self,
        log: &PartitionLog,
        tp: &TopicPartition,
        topic_id: [u8; 16],
        parts: Vec<Bytes>,
        end: Offset,
        durable: bool,
    ) -> Option<u64> {
        if !self.is_open() {
            return None;
        }
        let len: usize = parts.iter().map(Bytes::len).sum();
        let total = entry_len(&tp.topic, len);
        if (ROUND_HEADER_BYTES + total) as u64 > self.inner.file_bytes
            || u32::try_from(len).is_err()
        {
            return None;
        }
        let mut st = self.inner.st.borrow_mut();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        if durable {
            st.sync_wanted = st.sync_wanted.max(ticket + 1);
        }
        st.queue.push(Submitted {
            ticket,
            tp: tp.clone(),
            topic_id,
            parts,
            log: log.clone(),
            end,
        });
        drop(st);
        self.inner.work.notify(usize::MAX);
        Some(ticket)
    }

    /// Makes `log` durable up to `upto` once `ticket` is ([`PartitionLog::mark_durable`]), or
    /// takes it offline if the journal fails first, as a failed fdatasync of its own would.
    pub fn when_durable(&self, ticket: u64, log: &PartitionLog, upto: Offset) {
        let mut st = self.inner.st.borrow_mut();
        if st.failed {
            drop(st);
            log.journal_failed();
            return;
        }
        if st.durable > ticket {
            drop(st);
            log.mark_durable(upto);
            return;
        }
        st.waiting.push((ticket, log.clone(), upto));
        if st.sync_wanted <= ticket {
            st.sync_wanted = ticket + 1;
            drop(st);
            self.inner.work.notify(usize::MAX);
        }
    }

    /// Every ticket below `upto` is durable: so are the partitions waiting for one.
    fn advance_durable(&self, upto: u64) {
        let done: Vec<(PartitionLog, Offset)> = {
            let mut st = self.inner.st.borrow_mut();
            st.durable = st.durable.max(upto);
            let durable = st.durable;
            let mut done = Vec::new();
            st.waiting.retain(|(ticket, log, offset)| {
                let covered = *ticket < durable;
                if covered {
                    done.push((log.clone(), *offset));
                }
                !covered
            });
            done
        };
        for (log, upto) in done {
            log.mark_durable(upto);
        }
        self.inner.progress.notify(usize::MAX);
    }

    /// Writes rounds, one at a time, while anything is queued.
    async fn run_writer(self) {
        while self.wait_for_work(|st| !st.queue.is_empty()).await {
            if let Err(e) = self.write_round().await {
                self.fail("write", &e);
                return;
            }
        }
    }

    /// Syncs, one fdatasync at a time, while a waiter needs a written round durable. It runs
    /// beside the writer: the next round is written while the previous one is synced, and one
    /// sync covers every round written before it.
    async fn run_syncer(self) {
        while self
            .wait_for_work(|st| st.sync_wanted > st.durable && st.written > st.durable)
            .await
        {
            if let Err(e) = self.sync_written().await {
                self.fail("fdatasync", &e);
                return;
            }
        }
    }

    /// Waits until `ready` holds (true) or the journal failed (false).
    async fn wait_for_work(&self, ready: impl Fn(&State) -> bool) -> bool {
        loop {
            let listener = self.inner.work.listen();
            {
                let st = self.inner.st.borrow();
                if st.failed {
                    return false;
                }
                if ready(&st) {
                    return true;
                }
            }
            listener.await;
        }
    }

    /// Records how long an I/O `timing` started at `started` took, and logs it if it was slow.
    fn timed(&self, timing: Timing, started: Instant) {
        let took = started.elapsed();
        crate::metrics::record_timing(timing, took);
        if took >= SLOW_IO && crate::metrics::may_warn() {
            tracing::warn!(journal = %self.inner.dir.display(), op = ?timing, took_ms = took.as_millis(), "slow journal I/O: acks=all produces on this shard waited for the device");
        }
    }

    fn fail(&self, what: &str, e: &anyhow::Error) {
        tracing::error!(journal = %self.inner.dir.display(), error = %format!("{e:#}"), "journal {what} failed; partitions waiting on it go offline");
        let waiting = {
            let mut st = self.inner.st.borrow_mut();
            st.failed = true;
            std::mem::take(&mut st.waiting)
        };
        for (_, log, _) in waiting {
            log.journal_failed();
        }
        self.inner.work.notify(usize::MAX);
        self.inner.progress.notify(usize::MAX);
    }

    async fn sync_written(&self) -> Result<()> {
        let (upto, index) = {
            let st = self.inner.st.borrow();
            (st.written, st.current)
        };
        // Rounds written to a file the writer has left were synced as it left it.
        let started = Instant::now();
        self.inner.files[index].fdatasync().await.io()?;
        self.timed(Timing::JournalSync, started);
        crate::metrics::add(crate::metrics::Counter::Fsyncs, 1);
        self.advance_durable(upto);
        Ok(())
    }

    /// Writes one round of what is queued.
    async fn write_round(&self) -> Result<()> {
        let inner = &self.inner;
        let taken = {
            let mut st = inner.st.borrow_mut();
            let mut bytes = ROUND_HEADER_BYTES;
            let mut n = 0;
            for s in &st.queue {
                let len = entry_len(&s.tp.topic, s.parts.iter().map(Bytes::len).sum());
                if n > 0
                    && (bytes + len > ROUND_BYTES_MAX || (bytes + len) as u64 > inner.file_bytes)
                {
                    break;
                }
                bytes += len;
                n += 1;
            }
            let taken: Vec<Submitted> = st.queue.drain(..n).collect();
            taken
        };
        if !taken.is_empty() {
            let views: Vec<EntryParts<'_>> = taken
                .iter()
                .map(|s| EntryParts {
                    tp: &s.tp,
                    topic_id: s.topic_id,
                    parts: &s.parts,
                })
                .collect();
            let len = round_len(&views);
            let file = self.file_for_round(len as u64).await?;
            let (position, seq, index) = {
                let mut st = inner.st.borrow_mut();
                let seq = st.next_seq;
                st.next_seq += 1;
                (st.position, seq, st.current)
            };
            let aligned = usize::try_from(file.align_up(len as u64))?;
            let mut buffer = file.alloc_dma_buffer(aligned);
            encode_round(buffer.as_bytes_mut(), inner.run, seq, &views);
            drop(views);
            let started = Instant::now();
            file.write_at(buffer, position).await.io()?;
            self.timed(Timing::JournalWrite, started);
            crate::metrics::add(crate::metrics::Counter::JournalRounds, 1);
            crate::metrics::add(crate::metrics::Counter::JournalBytes, aligned as u64);
            let mut st = inner.st.borrow_mut();
            st.position = position + aligned as u64;
            let next = (index + 1) % inner.files.len();
            if st.position > inner.file_bytes / 2
                && next != index
                && !st.filled[next]
                && !st.filling[next]
            {
                st.filling[next] = true;
                let journal = self.clone();
                glommio::spawn_local(async move { journal.fill(next).await }).detach();
            }
            let last = taken.last().map_or(0, |s| s.ticket);
            st.written = st.written.max(last + 1);
            for s in taken {
                let slot = st.members[index]
                    .entry(s.tp)
                    .or_insert_with(|| (s.log, s.end));
                slot.1 = slot.1.max(s.end);
            }
        }
        inner.work.notify(usize::MAX);
        inner.progress.notify(usize::MAX);
        Ok(())
    }

    /// The file the next round of `len` bytes goes to: the current one if it fits, else the next
    /// one, once its checkpoint has finished. Leaving a file starts its checkpoint.
    async fn file_for_round(&self, len: u64) -> Result<Rc<DmaFile>> {
        let inner = &self.inner;
        let (fits, current) = {
            let st = inner.st.borrow();
            let file = &inner.files[st.current];
            (
                st.position + file.align_up(len) <= inner.file_bytes,
                st.current,
            )
        };
        if fits {
            return Ok(inner.files[current].clone());
        }
        // What the file holds unsynced is synced before leaving it: later syncs only cover the
        // file they are issued on.
        let unsynced = {
            let st = inner.st.borrow();
            st.written > st.durable
        };
        if unsynced {
            let started = Instant::now();
            inner.files[current].fdatasync().await.io()?;
            self.timed(Timing::JournalSync, started);
            crate::metrics::add(crate::metrics::Counter::Fsyncs, 1);
            let written = inner.st.borrow().written;
            self.advance_durable(written);
        }
        let next = (current + 1) % inner.files.len();
        let members = {
            let mut st = inner.st.borrow_mut();
            st.checkpointing[current] = true;
            std::mem::take(&mut st.members[current])
        };
        let journal = self.clone();
        glommio::spawn_local(async move { journal.checkpoint(current, members).await }).detach();
        loop {
            let listener = inner.progress.listen();
            {
                let st = inner.st.borrow();
                if st.failed {
                    bail!("the journal failed");
                }
                if !st.checkpointing[next] && !st.filling[next] {
                    break;
                }
            }
            crate::metrics::add(crate::metrics::Counter::JournalCheckpointWaits, 1);
            listener.await;
        }
        let mut st = inner.st.borrow_mut();
        st.current = next;
        st.position = 0;
        drop(st);
        // A checkpoint pacing itself widens once the writer is in the file before its own.
        inner.progress.notify(usize::MAX);
        Ok(inner.files[next].clone())
    }

    /// Writes zeros from the end of file `index` (which the writer is not in) to its full size,
    /// then syncs it: from then on rounds in it overwrite allocated blocks, and their syncs need
    /// no file-system commit. Started once the writer is half-way through the file before it, so
    /// a broker that takes little traffic never writes the zeros.
    async fn fill(self, index: usize) {
        let file = self.inner.files[index].clone();
        let filled = async {
            let mut position = file.align_down(file.file_size().await.io()?);
            while position < self.inner.file_bytes {
                let len =
                    usize::try_from((self.inner.file_bytes - position).min(FILL_CHUNK_BYTES))?;
                let mut buffer = file.alloc_dma_buffer(usize::try_from(file.align_up(len as u64))?);
                buffer.as_bytes_mut().fill(0);
                file.write_at(buffer, position).await.io()?;
                position += len as u64;
            }
            file.fdatasync().await.io()?;
            anyhow::Ok(())
        }
        .await;
        let mut st = self.inner.st.borrow_mut();
        st.filling[index] = false;
        match filled {
            Ok(()) => st.filled[index] = true,
            Err(e) => {
                tracing::warn!(journal = %self.inner.dir.display(), file = index, error = %format!("{e:#}"), "filling a journal file failed; its rounds append instead");
            }
        }
        drop(st);
        self.inner.progress.notify(usize::MAX);
    }

    /// Whether the checkpoint of file `index` is urgent: the writer is in the file before it and
    /// needs it next (or the journal failed, and nothing waits to be paced for).
    fn checkpoint_urgent(&self, index: usize) -> bool {
        let st = self.inner.st.borrow();
        st.failed || (st.current + 1) % self.inner.files.len() == index
    }

    /// Runs `f` over the members of file `index`'s checkpoint: [`CHECKPOINT_LANES_CALM`] at a
    /// time, widening to [`CHECKPOINT_LANES_URGENT`] once the checkpoint is urgent.
    async fn in_lanes<T, F, Fut>(
        &self,
        index: usize,
        members: Vec<(PartitionLog, Offset)>,
        f: F,
    ) -> Vec<T>
    where
        F: Fn(PartitionLog, Offset) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let queue = std::cell::RefCell::new(std::collections::VecDeque::from(members));
        let (queue, f) = (&queue, &f);
        let lanes: Vec<_> = (0..CHECKPOINT_LANES_URGENT)
            .map(|lane| async move {
                let mut out = Vec::new();
                if lane >= CHECKPOINT_LANES_CALM {
                    loop {
                        let listener = self.inner.progress.listen();
                        if queue.borrow().is_empty() || self.checkpoint_urgent(index) {
                            break;
                        }
                        listener.await;
                    }
                }
                loop {
                    let next = queue.borrow_mut().pop_front();
                    let Some((log, end)) = next else {
                        // Lanes still waiting for urgency find the queue empty and end.
                        self.inner.progress.notify(usize::MAX);
                        return out;
                    };
                    out.push(f(log, end).await);
                }
            })
            .collect();
        crate::shard::join_all(lanes)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Makes the segments of every partition file `index` covers durable up to what it holds;
    /// then the file may be reused.
    async fn checkpoint(self, index: usize, members: PartitionMap<(PartitionLog, Offset)>) {
        let started = std::time::Instant::now();
        let partitions = members.len();
        // The segments are written out a few partitions at a time, then made durable with one
        // syncfs of the file system: 1,000 partitions' fdatasyncs are 1,000 file-system commits,
        // which, issued together every file (at 50,000 msg/s, every 1.2 s), filled the kernel's
        // io_uring workers and the device queue for 130-170 ms while the journal's own rounds
        // waited behind them (the e2e p99 at 1,000 partitions). A partition on another file
        // system (or a failed syncfs) falls back to its own fdatasync.
        let device = self.inner.device;
        let (here, elsewhere): (Vec<_>, Vec<_>) = members
            .into_values()
            .partition(|(log, _)| device.is_some_and(|d| log.device() == d));
        let written: Vec<(PartitionLog, Offset)> = self
            .in_lanes(index, here, |log, end| async move {
                log.write_out_upto(end).await.then_some((log, end))
            })
            .await
            .into_iter()
            .flatten()
            .collect();
        let mut fallback = elsewhere;
        if !written.is_empty() {
            let syncing = Instant::now();
            let synced = super::files::syncfs(&self.inner.dir).await;
            self.timed(Timing::CheckpointSync, syncing);
            match synced {
                Ok(()) => {
                    crate::metrics::add(crate::metrics::Counter::Fsyncs, 1);
                    for (log, end) in &written {
                        log.note_segments_durable(*end);
                    }
                }
                Err(e) => {
                    tracing::warn!(journal = %self.inner.dir.display(), error = %format!("{e:#}"), "syncfs failed; syncing each segment instead");
                    fallback.extend(written);
                }
            }
        }
        self.in_lanes(index, fallback, |log, end| async move {
            log.sync_segments_upto(end).await;
        })
        .await;
        crate::metrics::add(crate::metrics::Counter::JournalCheckpoints, 1);
        tracing::debug!(journal = %self.inner.dir.display(), file = index, partitions, elapsed_ms = started.elapsed().as_millis(), "journal checkpoint");
        self.inner.st.borrow_mut().checkpointing[index] = false;
        self.inner.progress.notify(usize::MAX);
    }
}

/// What a crash left in the journals: for each partition this shard owns, its batches in the
/// order they were written.
#[derive(Default)]
pub struct Recovered {
    pub partitions: HashMap<TopicPartition, Vec<([u8; 16], Bytes)>>,
}

impl Recovered {
    /// Takes the batches recovered for `tp` of topic `topic_id` (others were left by a deleted
    /// topic of the same name and are dropped).
    pub fn take(&mut self, tp: &TopicPartition, topic_id: [u8; 16]) -> Vec<Bytes> {
        self.partitions
            .remove(tp)
            .unwrap_or_default()
            .into_iter()
            .filter(|(id, _)| *id == topic_id)
            .map(|(_, b)| b)
            .collect()
    }
}

/// Reads every shard's journal under `data_dir` and keeps the entries `owned` accepts.
pub async fn recover(
    data_dir: &Path,
    owned: impl Fn(&TopicPartition) -> bool,
) -> Result<Recovered> {
    let root = data_dir.join(JOURNAL_DIR);
    let listed = root.clone();
    let files = {
        super::files::blocking(move || -> std::io::Result<Vec<PathBuf>> {
            let mut files = Vec::new();
            let Ok(dirs) = std::fs::read_dir(&listed) else {
                return Ok(files);
            };
            for d in dirs {
                let d = d?;
                if !d.file_type()?.is_dir() {
                    continue;
                }
                for f in std::fs::read_dir(d.path())? {
                    let f = f?;
                    if f.file_name().to_string_lossy().ends_with(".journal") {
                        files.push(f.path());
                    }
                }
            }
            files.sort();
            Ok(files)
        })
        .await
        .with_context(|| format!("listing {}", root.display()))?
    };
    let mut rounds: Vec<(u64, u64, Vec<JournalEntry>)> = Vec::new();
    for path in files {
        read_file(&path, &mut rounds)
            .await
            .with_context(|| format!("reading journal {}", path.display()))?;
    }
    rounds.sort_by_key(|(run, seq, _)| (*run, *seq));
    let mut recovered = Recovered::default();
    let mut batches = 0usize;
    for (_, _, entries) in rounds {
        for e in entries {
            let tp = TopicPartition::new(&e.topic, e.partition);
            if owned(&tp) {
                batches += 1;
                recovered
                    .partitions
                    .entry(tp)
                    .or_default()
                    .push((e.topic_id, e.batches));
            }
        }
    }
    if batches > 0 {
        tracing::info!(
            partitions = recovered.partitions.len(),
            entries = batches,
            "journal read after a crash"
        );
    }
    Ok(recovered)
}

/// Reads one journal file's rounds of one run in order, up to the first that is not the next.
async fn read_file(path: &Path, rounds: &mut Vec<(u64, u64, Vec<JournalEntry>)>) -> Result<()> {
    let file = DmaFile::open(path).await.io()?;
    let size = file.file_size().await.io()?;
    let mut position = 0u64;
    let mut expected: Option<(u64, u64)> = None;
    while position + ROUND_HEADER_BYTES as u64 <= size {
        let head = file.read_at(position, ROUND_HEADER_BYTES).await.io()?;
        let Some(h) = decode_round_header(&head) else {
            break;
        };
        if expected.is_some_and(|(run, seq)| (h.run, h.seq) != (run, seq)) {
            break;
        }
        let len = (ROUND_HEADER_BYTES + h.payload_len) as u64;
        if position + len > size {
            break;
        }
        let bytes =
            Bytes::copy_from_slice(&file.read_at(position, usize::try_from(len)?).await.io()?);
        let Ok((h, entries)) = decode_round(&bytes) else {
            break;
        };
        rounds.push((h.run, h.seq, entries));
        expected = Some((h.run, h.seq + 1));
        position += file.align_up(len);
    }
    file.close().await.io()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_decodes_to_what_was_encoded_and_a_flipped_bit_is_refused() {
        let orders = TopicPartition::new("orders", 3);
        let x = TopicPartition::new("x", 0);
        let a = [Bytes::from_static(b"abc"), Bytes::from_static(b"de")];
        let b = [Bytes::from(vec![7u8; 5000])];
        let entries = [
            EntryParts {
                tp: &orders,
                topic_id: [5; 16],
                parts: &a,
            },
            EntryParts {
                tp: &x,
                topic_id: [6; 16],
                parts: &b,
            },
        ];
        let len = round_len(&entries);
        let mut out = vec![0xAAu8; len + 100];
        encode_round(&mut out, 9, 42, &entries);
        let bytes = Bytes::from(out);
        let (h, decoded) = decode_round(&bytes).expect("round decodes");
        assert_eq!((h.run, h.seq, h.entries), (9, 42, 2));
        let expected = [
            ("orders", 3, [5u8; 16], b"abcde".to_vec()),
            ("x", 0, [6; 16], vec![7; 5000]),
        ];
        for (d, (topic, partition, id, batches)) in decoded.iter().zip(expected) {
            assert_eq!(d.topic, topic);
            assert_eq!(d.partition, partition);
            assert_eq!(d.topic_id, id);
            assert_eq!(&d.batches[..], &batches[..]);
        }
        assert!(bytes[len..].iter().all(|&b| b == 0), "padding is zeroed");
        for bit in [8 * 9, 8 * ROUND_HEADER_BYTES + 3, 8 * (len - 1)] {
            let mut flipped = bytes.to_vec();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode_round(&Bytes::from(flipped)).is_err(), "bit {bit}");
        }
        assert!(
            decode_round(&bytes.slice(..len - 1)).is_err(),
            "a short round"
        );
    }
}
