//! The durable Raft store of one replica: `raft.wal` in the partition's directory, an append-only
//! file of checksummed frames, with the live entries also held in memory (raft-rs's `MemStorage`)
//! because raft-rs reads its log synchronously.
//!
//! A frame is `[len u32][crc32c u32][kind u8][payload]` (little endian; `len` counts kind and
//! payload; the CRC covers them). Kinds: a Raft entry, the hard state, the membership (ConfState),
//! and a compaction point (index and term below which entries were dropped). Replay applies frames
//! in order: an entry at an index the log already holds replaces that entry and everything after
//! it (Raft's conflicting-suffix rule, so a follower's truncation needs no rewrite), a later hard
//! state replaces an earlier one. A torn or corrupt tail (a crash mid-write) ends the replay and is
//! cut off; a frame that claims more than [`FRAME_MAX`] is corrupt, never allocated.
//!
//! Writes are buffered by the `persist_*` calls of one Ready cycle and made durable together by
//! [`ReplicaStore::sync`] (one write and one fdatasync per cycle, before any message that promises
//! them leaves). [`WalStore::compact`] drops applied entries and rewrites the file atomically
//! (temporary file, fsync, rename, directory fsync).
//!
//! Today the batches are written twice on every replica: here, then into the segments once
//! committed. The module header of [`crate::replication`] records why, and the segment files
//! becoming the Raft log is the step that removes the second write.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage};

use super::replica::ReplicaStore;

pub const WAL_FILE: &str = "raft.wal";
/// The largest frame replay accepts: an entry is one record batch (`message.max.bytes` is far
/// below this) plus its protobuf envelope.
pub const FRAME_MAX: usize = 256 * 1024 * 1024;

const KIND_ENTRY: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_CONF_STATE: u8 = 3;
const KIND_COMPACTED: u8 = 4;

pub struct WalStore {
    mem: MemStorage,
    path: PathBuf,
    /// Shared with the blocking thread that writes and syncs it ([`WalStore::take_flush`]).
    file: RefCell<Arc<File>>,
    /// Frames persisted by this Ready cycle, written by `sync`.
    buf: RefCell<Vec<u8>>,
    /// Bytes in the file: compaction is worth it once most of them are dropped entries.
    file_bytes: Cell<u64>,
    /// The partition's high watermark as the replica last applied (a snapshot's data).
    applied_end: Cell<i64>,
}

/// Appends one frame to `out`.
pub fn frame(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    let len = u32::try_from(payload.len() + 1).expect("frame under 4 GiB");
    let mut crc = crc32c::crc32c(&[kind]);
    crc = crc32c::crc32c_append(crc, payload);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
}

fn encode<M: protobuf::Message>(m: &M) -> Vec<u8> {
    m.write_to_bytes().expect("protobuf encoding into memory")
}

/// Splits `bytes` into valid frames; returns them and the length of the valid prefix.
fn parse_frames(bytes: &[u8]) -> (Vec<(u8, &[u8])>, usize) {
    let mut frames = Vec::new();
    let mut pos = 0usize;
    while let Some(head) = bytes.get(pos..pos + 8) {
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        if len == 0 || len > FRAME_MAX {
            break;
        }
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32c::crc32c(body) != crc {
            break;
        }
        frames.push((body[0], &body[1..]));
        pos += 8 + len;
    }
    (frames, pos)
}

impl WalStore {
    /// Opens the store in `dir`, replaying `raft.wal`; a new store starts with `voters` as its
    /// membership. Blocking file I/O: call it off the executor (`files::blocking`).
    pub fn open(dir: &Path, voters: &[u64]) -> Result<WalStore> {
        let path = dir.join(WAL_FILE);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)
                    .with_context(|| format!("reading {}", path.display()))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        }
        let mem = MemStorage::new();
        let (frames, valid) = parse_frames(&bytes);
        let fresh = valid == 0;
        for (kind, payload) in frames {
            replay(&mem, kind, payload).with_context(|| format!("replaying {}", path.display()))?;
        }
        // raft-rs stops the process on a commit point outside the log or a membership it
        // cannot restore; a damaged file is an error for this replica instead.
        let state = mem.initial_state()?;
        check_membership(&state.conf_state)
            .with_context(|| format!("{}: the file is damaged", path.display()))?;
        let commit = state.hard_state.commit;
        let (first, last) = (Storage::first_index(&mem)?, Storage::last_index(&mem)?);
        if commit + 1 < first || commit > last {
            bail!(
                "{}: commit index {commit} outside the log held ({first}..={last}); the file is damaged",
                path.display()
            );
        }
        if valid < bytes.len() {
            tracing::warn!(
                wal = %path.display(),
                valid,
                file = bytes.len(),
                "raft log ends in a torn or corrupt frame; truncating it"
            );
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.set_len(valid as u64)
            .with_context(|| format!("truncating {}", path.display()))?;
        let mut file = file;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        let store = WalStore {
            mem,
            path,
            file: RefCell::new(Arc::new(file)),
            buf: RefCell::new(Vec::new()),
            file_bytes: Cell::new(valid as u64),
            applied_end: Cell::new(0),
        };
        if fresh {
            let cs = ConfState::from((voters.to_vec(), Vec::new()));
            store.mem.wl().set_conf_state(cs.clone());
            frame(&mut store.buf.borrow_mut(), KIND_CONF_STATE, &encode(&cs));
            store.flush()?;
            if let Some(parent) = store.path.parent() {
                File::open(parent).and_then(|d| d.sync_all()).ok();
            }
        }
        Ok(store)
    }

    /// The index of the last entry held.
    pub fn last_index(&self) -> u64 {
        Storage::last_index(&self.mem).unwrap_or(0)
    }

    pub fn first_index(&self) -> u64 {
        Storage::first_index(&self.mem).unwrap_or(1)
    }

    /// Bytes of the file; the caller compacts when the dropped part would be most of it.
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes.get()
    }

    /// Drops entries below `index` (they are applied and durable elsewhere) and rewrites the file
    /// with what is left. Blocking I/O, like every write here.
    pub fn compact(&self, index: u64) -> Result<()> {
        if index <= self.first_index() {
            return Ok(());
        }
        let index = index.min(self.last_index());
        let term = Storage::term(&self.mem, index).context("term of the compaction point")?;
        self.mem
            .wl()
            .compact(index)
            .context("compacting raft log")?;
        // After the compaction the first entry held is `index`; the snapshot point is one below.
        let mut out = Vec::new();
        let state = self.mem.rl();
        let hs = state.hard_state().clone();
        drop(state);
        let RaftState { conf_state, .. } = self.mem.initial_state().context("raft state")?;
        frame(&mut out, KIND_CONF_STATE, &encode(&conf_state));
        let prev = index - 1;
        let prev_term = if prev == 0 {
            0
        } else {
            Storage::term(&self.mem, prev).unwrap_or(term)
        };
        let mut point = Vec::with_capacity(16);
        point.extend_from_slice(&prev.to_le_bytes());
        point.extend_from_slice(&prev_term.to_le_bytes());
        frame(&mut out, KIND_COMPACTED, &point);
        frame(&mut out, KIND_HARD_STATE, &encode(&hs));
        let last = self.last_index();
        let entries = self
            .mem
            .entries(index, last + 1, None, GetEntriesContext::empty(false))
            .context("reading live raft entries")?;
        for e in &entries {
            frame(&mut out, KIND_ENTRY, &encode(e));
        }
        let tmp = self.path.with_extension("wal.tmp");
        {
            let mut f =
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            f.write_all(&out)?;
            f.sync_data()?;
        }
        std::fs::rename(&tmp, &self.path)
            .with_context(|| format!("replacing {}", self.path.display()))?;
        if let Some(parent) = self.path.parent() {
            File::open(parent)?.sync_all()?;
        }
        let mut file = OpenOptions::new().append(true).open(&self.path)?;
        std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
        *self.file.borrow_mut() = Arc::new(file);
        self.file_bytes.set(out.len() as u64);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        if let Some(job) = self.take_flush() {
            let written = job()?;
            self.flushed(written);
        }
        Ok(())
    }

    /// Takes the frames persisted since the last flush as a job for a blocking thread, which
    /// writes them and syncs the file and returns the bytes written (hand them to
    /// [`WalStore::flushed`]); `None` when there is nothing to write. One flush at a time: the
    /// group's driver awaits each before its next Ready cycle.
    pub fn take_flush(&self) -> Option<impl FnOnce() -> Result<usize> + Send + 'static> {
        let buf = std::mem::take(&mut *self.buf.borrow_mut());
        if buf.is_empty() {
            return None;
        }
        let file = self.file.borrow().clone();
        let path = self.path.clone();
        Some(move || {
            (&*file)
                .write_all(&buf)
                .and_then(|()| file.sync_data())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(buf.len())
        })
    }

    pub fn flushed(&self, bytes: usize) {
        self.file_bytes.set(self.file_bytes.get() + bytes as u64);
    }
}

/// A membership strom can restore: simple (strom proposes no joint configurations), ids valid
/// and unique, voters and learners apart.
fn check_membership(cs: &ConfState) -> Result<()> {
    if !cs.voters_outgoing.is_empty() || !cs.learners_next.is_empty() || cs.auto_leave {
        bail!("membership {cs:?} is a joint configuration, which strom never writes");
    }
    let mut seen = std::collections::HashSet::new();
    for id in cs.voters.iter().chain(&cs.learners) {
        if *id == raft::INVALID_ID || !seen.insert(*id) {
            bail!("membership {cs:?} names replica {id} twice or an invalid id");
        }
    }
    Ok(())
}

/// Applies one replayed frame to the in-memory log.
fn replay(mem: &MemStorage, kind: u8, payload: &[u8]) -> Result<()> {
    match kind {
        KIND_ENTRY => {
            let e = Entry::parse_from_bytes(payload).context("decoding entry")?;
            let first = Storage::first_index(mem)?;
            let last = Storage::last_index(mem)?;
            if e.index < first || e.index > last + 1 {
                bail!(
                    "entry {} outside the log held ({first}..={last}, next {})",
                    e.index,
                    last + 1
                );
            }
            mem.wl().append(&[e])?;
        }
        KIND_HARD_STATE => {
            let hs = HardState::parse_from_bytes(payload).context("decoding hard state")?;
            mem.wl().set_hardstate(hs);
        }
        KIND_CONF_STATE => {
            let cs = ConfState::parse_from_bytes(payload).context("decoding membership")?;
            mem.wl().set_conf_state(cs);
        }
        KIND_COMPACTED => {
            let (Some(index), Some(term)) = (payload.get(0..8), payload.get(8..16)) else {
                bail!("short compaction frame");
            };
            let index = u64::from_le_bytes(index.try_into()?);
            let term = u64::from_le_bytes(term.try_into()?);
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = index;
            snap.mut_metadata().term = term;
            let cs = mem.initial_state()?.conf_state;
            snap.mut_metadata().set_conf_state(cs);
            mem.wl().apply_snapshot(snap)?;
        }
        other => bail!("unknown frame kind {other}"),
    }
    Ok(())
}

impl Storage for WalStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }
    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }
    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }
    fn first_index(&self) -> raft::Result<u64> {
        Storage::first_index(&self.mem)
    }
    fn last_index(&self) -> raft::Result<u64> {
        Storage::last_index(&self.mem)
    }
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // At the commit point (what raft-rs's log store gives) with the records below the high
        // watermark: the follower copies those from the leader's partition.
        let mut snapshot = self.mem.snapshot(request_index, to)?;
        snapshot.data = self.applied_end.get().to_be_bytes().to_vec().into();
        Ok(snapshot)
    }
}

impl ReplicaStore for WalStore {
    fn persist_entries(&self, entries: &[Entry]) -> raft::Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        self.mem.wl().append(entries)?;
        let mut buf = self.buf.borrow_mut();
        for e in entries {
            frame(&mut buf, KIND_ENTRY, &encode(e));
        }
        Ok(())
    }
    fn persist_hard_state(&self, hs: &HardState) {
        self.mem.wl().set_hardstate(hs.clone());
        frame(&mut self.buf.borrow_mut(), KIND_HARD_STATE, &encode(hs));
    }
    fn install_snapshot(&self, snapshot: Snapshot) -> raft::Result<()> {
        // The log restarts after the snapshot point with the snapshot's membership; the frames
        // go out with this cycle's, once the partition holds the records (the group copies them
        // first), so a crash before that replays the log as it was.
        let meta = snapshot.get_metadata().clone();
        check_membership(meta.get_conf_state())
            .map_err(|e| raft::Error::Store(raft::StorageError::Other(format!("{e:#}").into())))?;
        self.mem.wl().apply_snapshot(snapshot)?;
        let mut buf = self.buf.borrow_mut();
        frame(&mut buf, KIND_CONF_STATE, &encode(meta.get_conf_state()));
        let mut point = Vec::with_capacity(16);
        point.extend_from_slice(&meta.index.to_le_bytes());
        point.extend_from_slice(&meta.term.to_le_bytes());
        frame(&mut buf, KIND_COMPACTED, &point);
        Ok(())
    }
    fn note_applied_end(&self, end_offset: i64) {
        self.applied_end.set(end_offset);
    }
    fn persist_conf_state(&self, cs: &ConfState) {
        self.mem.wl().set_conf_state(cs.clone());
        frame(&mut self.buf.borrow_mut(), KIND_CONF_STATE, &encode(cs));
    }
    fn sync(&self) -> raft::Result<()> {
        self.flush()
            .map_err(|e| raft::Error::Store(raft::StorageError::Other(format!("{e:#}").into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    /// A fresh directory, removed when the test drops it.
    fn tempdir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("strom-wal-{name}-"))
            .tempdir()
            .unwrap()
    }

    #[test]
    fn replays_entries_conflicts_hard_state_and_cuts_a_torn_tail() {
        let tmp = tempdir("replay");
        let dir = tmp.path().to_path_buf();
        {
            let s = WalStore::open(&dir, &[1, 2, 3]).unwrap();
            s.persist_entries(&[entry(1, 1, b"a"), entry(2, 1, b"b"), entry(3, 1, b"c")])
                .unwrap();
            let hs = HardState {
                term: 2,
                vote: 3,
                commit: 1,
                ..Default::default()
            };
            s.persist_hard_state(&hs);
            // A new leader's log diverged from index 2: the suffix is replaced.
            s.persist_entries(&[entry(2, 2, b"B")]).unwrap();
            s.sync().unwrap();
        }
        // A crash mid-write leaves half a frame.
        let path = dir.join(WAL_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let good = bytes.len();
        bytes.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3]);
        std::fs::write(&path, &bytes).unwrap();
        let s = WalStore::open(&dir, &[9]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, good);
        let state = s.initial_state().unwrap();
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!(
            (
                state.hard_state.term,
                state.hard_state.vote,
                state.hard_state.commit
            ),
            (2, 3, 1)
        );
        assert_eq!(s.last_index(), 2);
        let got = s
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(&got[1].data[..], b"B");
        assert_eq!(got[1].term, 2);
    }

    #[test]
    fn compaction_keeps_the_tail_and_survives_reopen() {
        let tmp = tempdir("compact");
        let dir = tmp.path().to_path_buf();
        let s = WalStore::open(&dir, &[1]).unwrap();
        let entries: Vec<Entry> = (1..=100).map(|i| entry(i, 1, &[i as u8; 100])).collect();
        s.persist_entries(&entries).unwrap();
        s.persist_hard_state(&HardState {
            term: 1,
            commit: 100,
            ..Default::default()
        });
        s.sync().unwrap();
        let before = s.file_bytes();
        s.compact(90).unwrap();
        assert!(s.file_bytes() < before / 5);
        s.persist_entries(&[entry(101, 2, b"x")]).unwrap();
        s.sync().unwrap();
        drop(s);
        let s = WalStore::open(&dir, &[1]).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (90, 101));
        assert_eq!(s.term(89).unwrap(), 1);
        assert!(s
            .entries(89, 90, None, GetEntriesContext::empty(false))
            .is_err());
        let got = s
            .entries(90, 102, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len(), 12);
        assert_eq!(&got[11].data[..], b"x");
    }

    /// Found by the `raft_inputs` fuzz target: a hard state committing past the log's end
    /// made raft-rs panic when the replica started.
    #[test]
    fn a_commit_point_past_the_log_is_an_error_not_a_panic() {
        let tmp = tempdir("commit");
        let dir = tmp.path().to_path_buf();
        let mut bytes = Vec::new();
        frame(&mut bytes, KIND_HARD_STATE, &[0x18, 0x02]); // commit: 2, no entries
        std::fs::write(dir.join(WAL_FILE), &bytes).unwrap();
        let e = WalStore::open(&dir, &[1])
            .err()
            .expect("a damaged log must not open");
        assert!(
            format!("{e:#}").contains("commit index 2 outside the log"),
            "{e:#}"
        );
    }

    /// Found by `raft_inputs`: a membership raft-rs cannot restore (auto-leave without a joint
    /// configuration) made it panic.
    #[test]
    fn a_membership_raft_cannot_restore_is_an_error_not_a_panic() {
        let tmp = tempdir("membership");
        let dir = tmp.path().to_path_buf();
        let mut cs = ConfState::from((vec![1], Vec::new()));
        cs.auto_leave = true;
        let mut bytes = Vec::new();
        frame(&mut bytes, KIND_CONF_STATE, &encode(&cs));
        std::fs::write(dir.join(WAL_FILE), &bytes).unwrap();
        let e = WalStore::open(&dir, &[1])
            .err()
            .expect("a damaged log must not open");
        assert!(format!("{e:#}").contains("joint configuration"), "{e:#}");
        let mut cs = ConfState::from((vec![1, 1], Vec::new()));
        bytes.clear();
        frame(&mut bytes, KIND_CONF_STATE, &encode(&cs));
        std::fs::write(dir.join(WAL_FILE), &bytes).unwrap();
        assert!(WalStore::open(&dir, &[1]).is_err());
        cs.voters = vec![1];
        cs.learners = vec![1];
        bytes.clear();
        frame(&mut bytes, KIND_CONF_STATE, &encode(&cs));
        std::fs::write(dir.join(WAL_FILE), &bytes).unwrap();
        assert!(WalStore::open(&dir, &[1]).is_err());
    }

    #[test]
    fn a_frame_claiming_gigabytes_is_corrupt_not_allocated() {
        let tmp = tempdir("huge");
        let dir = tmp.path().to_path_buf();
        std::fs::write(dir.join(WAL_FILE), [0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0, 1]).unwrap();
        let s = WalStore::open(&dir, &[1]).unwrap();
        assert_eq!(s.last_index(), 0);
        // The garbage is cut; the store starts fresh with its membership.
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1]);
        assert_ne!(std::fs::read(dir.join(WAL_FILE)).unwrap()[0], 0xff);
    }
}
