//! One partition replica: a raft-rs `RawNode` over a [`ReplicaStore`], the Kafka offsets its
//! leader assigns, and the high watermark (the Raft commit point in Kafka offsets). See the
//! module header of [`crate::replication`] for how entries map to offsets.
//!
//! The caller drives it: [`Replica::tick`] on its clock, [`Replica::step`] for each message from
//! a peer, [`Replica::propose`] for a produce at the leader, then a Ready cycle:
//! [`Replica::begin`] hands the store what to persist and returns the messages that may go out
//! at once and the batches that became committed, in order; once the store is durable,
//! [`Replica::persisted`] returns the messages that promised it. [`Replica::drive`] does both with
//! the store's `sync` in between.

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeV2, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::storage::MemStorage;
use raft::{Config, GetEntriesContext, RawNode, StateRole, Storage};

use crate::model::Offset;
use crate::storage::batch::{self, BatchHeader};

/// Raft ticks without a leader's heartbeat before a follower stands for election.
pub const ELECTION_TICKS: usize = 10;
/// Raft ticks between a leader's heartbeats.
pub const HEARTBEAT_TICKS: usize = 2;

/// Where a replica's Raft log and state live. `raft::Storage` reads; these write, and each must
/// be durable when it returns (the caller sends messages that promise it right after).
pub trait ReplicaStore: Storage {
    fn persist_entries(&self, entries: &[Entry]) -> raft::Result<()>;
    fn persist_hard_state(&self, hs: &HardState);
    fn install_snapshot(&self, snapshot: Snapshot) -> raft::Result<()>;
    /// The membership after a committed configuration change.
    fn persist_conf_state(&self, cs: &ConfState);
    /// The partition holds every committed batch below `end_offset` (the high watermark): a
    /// snapshot this store hands out stands for the records below it.
    fn note_applied_end(&self, _end_offset: i64) {}
    /// Makes everything persisted since the last call durable (one sync per Ready cycle).
    fn sync(&self) -> raft::Result<()>;
}

/// raft-rs's own in-memory log: what the seeded simulator runs on (its "disk" survives a
/// simulated crash; what was never persisted does not).
impl ReplicaStore for MemStorage {
    fn persist_entries(&self, entries: &[Entry]) -> raft::Result<()> {
        self.wl().append(entries)
    }
    fn persist_hard_state(&self, hs: &HardState) {
        self.wl().set_hardstate(hs.clone());
    }
    fn install_snapshot(&self, snapshot: Snapshot) -> raft::Result<()> {
        self.wl().apply_snapshot(snapshot)
    }
    fn persist_conf_state(&self, cs: &ConfState) {
        self.wl().set_conf_state(cs.clone());
    }
    fn sync(&self) -> raft::Result<()> {
        Ok(())
    }
}

/// A batch that became committed: its Raft position and its Kafka offsets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub index: u64,
    pub term: u64,
    pub base_offset: i64,
    /// One past the batch's last offset.
    pub end_offset: i64,
    pub batch: Bytes,
}

/// Why a produce was not proposed.
#[derive(Debug, PartialEq, Eq)]
pub enum ProposeError {
    /// This replica is not the leader: the client gets `NOT_LEADER_OR_FOLLOWER`.
    NotLeader,
    /// The bytes are not one record batch.
    Invalid,
    /// Raft refused the proposal (leadership is being transferred).
    Dropped,
}

pub struct Replica<S: ReplicaStore> {
    node: RawNode<S>,
    /// The next offset this replica assigns while it leads in `offsets_term`.
    next_offset: i64,
    offsets_term: u64,
    /// End offset of the last committed batch: the high watermark.
    high_watermark: i64,
    /// Entries are opaque commands (the metadata group), not record batches: no offsets, and a
    /// follower's proposal is forwarded to the leader by raft-rs.
    raw: bool,
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl<S: ReplicaStore> Replica<S> {
    /// Starts (or restarts) replica `id` on `store`, whose partition already holds every batch
    /// below `applied_end`. Committed entries are replayed from the start of the store; those
    /// below `applied_end` are skipped, the rest are returned by [`Replica::drive`] to apply.
    pub fn new(id: u64, store: S, applied_end: i64) -> Result<Replica<S>> {
        let config = Config {
            id,
            election_tick: ELECTION_TICKS,
            heartbeat_tick: HEARTBEAT_TICKS,
            // A partitioned leader steps down, and a node that cannot win does not disturb the
            // others' term: both matter when links flap.
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Config::default()
        };
        config.validate().context("raft config")?;
        let node = RawNode::new(&config, store, &logger()).context("starting raft node")?;
        Ok(Replica {
            node,
            next_offset: 0,
            offsets_term: 0,
            high_watermark: applied_end,
            raw: false,
        })
    }

    /// A replica whose entries are opaque commands (see the `raw` field); every committed entry
    /// with data is returned by [`Replica::drive`] as an [`Applied`] without offsets.
    pub fn new_raw(id: u64, store: S) -> Result<Replica<S>> {
        let mut r = Replica::new(id, store, 0)?;
        r.raw = true;
        Ok(r)
    }

    /// Proposes an opaque command from any replica (raft-rs forwards it to the leader; it is
    /// dropped while there is none, and the caller retries).
    pub fn propose_raw(&mut self, data: Vec<u8>) -> Result<(), ProposeError> {
        if self.node.raft.leader_id == raft::INVALID_ID {
            return Err(ProposeError::Dropped);
        }
        self.node
            .propose(Vec::new(), data)
            .map_err(|_| ProposeError::Dropped)
    }

    /// While leading: the end offset of what this leader proposed (persisted by the next drive).
    pub fn proposed_end(&self) -> Option<i64> {
        (self.is_leader() && self.offsets_term == self.term()).then_some(self.next_offset)
    }

    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    pub fn last_index(&self) -> u64 {
        self.node.raft.raft_log.last_index()
    }

    /// Entries up to here were returned by [`Replica::drive`] as applied.
    pub fn applied_index(&self) -> u64 {
        self.node.raft.raft_log.applied
    }

    /// While leading: each follower's highest index known to be in its log.
    pub fn follower_matches(&self) -> Vec<(u64, u64)> {
        if !self.is_leader() {
            return Vec::new();
        }
        let me = self.id();
        self.node
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| **id != me)
            .map(|(id, p)| (*id, p.matched))
            .collect()
    }

    /// While leading: how many entries each follower is behind the leader's log.
    pub fn follower_lag(&self) -> Vec<(u64, u64)> {
        let last = self.node.raft.raft_log.last_index();
        let mut lags: Vec<(u64, u64)> = self
            .follower_matches()
            .into_iter()
            .map(|(id, matched)| (id, last.saturating_sub(matched)))
            .collect();
        lags.sort_unstable();
        lags
    }

    /// Headers of the batches in this replica's log past the commit point.
    pub fn uncommitted_batches(&self) -> Vec<BatchHeader> {
        let log = &self.node.raft.raft_log;
        let (from, to) = (log.committed + 1, log.last_index() + 1);
        if from >= to {
            return Vec::new();
        }
        log.entries(from, u64::MAX, GetEntriesContext::empty(false))
            .map(|entries| {
                entries
                    .iter()
                    .take(usize::try_from(to - from).unwrap_or(usize::MAX))
                    .filter(|e| e.get_entry_type() == EntryType::EntryNormal)
                    .filter_map(|e| BatchHeader::parse(e.get_data()).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn id(&self) -> u64 {
        self.node.raft.id
    }

    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    pub fn leader_id(&self) -> u64 {
        self.node.raft.leader_id
    }

    pub fn high_watermark(&self) -> i64 {
        self.high_watermark
    }

    pub fn store(&self) -> &S {
        self.node.store()
    }

    pub fn tick(&mut self) {
        self.node.tick();
    }

    pub fn step(&mut self, message: Message) -> Result<()> {
        self.check_message(&message)?;
        self.node.step(message).context("raft step")
    }

    /// Refuses the messages raft-rs treats as broken invariants (it stops the process on them):
    /// a peer's bug or a forged frame on the inter-broker port must cost one message, not the
    /// broker.
    fn check_message(&self, m: &Message) -> Result<()> {
        let log = &self.node.raft.raft_log;
        match m.get_msg_type() {
            MessageType::MsgPropose if m.entries.is_empty() => {
                bail!("a proposal without entries")
            }
            MessageType::MsgHeartbeat if m.commit > log.last_index() => bail!(
                "a heartbeat committing {} past this replica's log end {}",
                m.commit,
                log.last_index()
            ),
            MessageType::MsgAppend
                if m.index == 0 && !m.entries.is_empty() && self.awaits_snapshot() =>
            {
                // A replica added to a group starts without a membership: the log from its
                // start would give it a wrong one. Only a snapshot (with the membership) may
                // begin its log; the leader compacts before adding it so that it sends one.
                bail!("a replica without a membership takes a snapshot first, not entries from the log's start")
            }
            MessageType::MsgAppend => {
                for e in m.entries.iter().filter(|e| e.index <= log.committed) {
                    if log.term(e.index).is_ok_and(|t| t != e.term) {
                        bail!(
                            "an append rewriting committed entry {} (term {} here, {} sent)",
                            e.index,
                            log.term(e.index).unwrap_or(0),
                            e.term
                        );
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Assigns the batch its offsets and this term as its leader epoch, and proposes it. Returns
    /// its base offset and the term: it is acknowledged (`acks=all`) once [`Replica::drive`]
    /// returns an [`Applied`] with both.
    pub fn propose(&mut self, mut batch: Vec<u8>) -> Result<(i64, u64), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader);
        }
        let term = self.term();
        if self.offsets_term != term {
            // First proposal of this leadership: continue after the last batch in our log.
            self.next_offset = self.log_end_offset();
            self.offsets_term = term;
        }
        let header = BatchHeader::parse(&batch).map_err(|_| ProposeError::Invalid)?;
        if header.size_bytes != batch.len() {
            return Err(ProposeError::Invalid);
        }
        let base = self.next_offset;
        let epoch = i32::try_from(term).map_err(|_| ProposeError::Invalid)?;
        batch::assign(&mut batch, Offset(base), epoch);
        self.node
            .propose(Vec::new(), batch)
            .map_err(|_| ProposeError::Dropped)?;
        self.next_offset = base + i64::from(header.last_offset_delta) + 1;
        Ok((base, term))
    }

    /// The end offset of the last batch in this replica's log, committed or not.
    fn log_end_offset(&self) -> i64 {
        let log = &self.node.raft.raft_log;
        let mut index = log.last_index();
        let floor = log.committed.max(log.first_index().saturating_sub(1));
        while index > floor {
            if let Ok(entries) = log.entries(index, 1, GetEntriesContext::empty(false)) {
                if let Some(end) = entries.first().and_then(batch_end) {
                    return end;
                }
            }
            index -= 1;
        }
        // Everything up to the commit point is applied (drive runs before any proposal).
        self.high_watermark
    }

    /// Runs one Ready cycle with the store's `sync` in line: [`Replica::begin`], `sync`,
    /// [`Replica::persisted`]. Returns the messages to send and the batches newly committed.
    pub fn drive(&mut self) -> Result<(Vec<Message>, Vec<Applied>)> {
        let Some(mut cycle) = self.begin()? else {
            return Ok((Vec::new(), Vec::new()));
        };
        self.node.store().sync().context("syncing raft log")?;
        let later = self.persisted(cycle.durable);
        cycle.messages.extend(later);
        Ok((cycle.messages, cycle.applied))
    }

    /// Whether Raft has work for a Ready cycle (messages, entries to persist or to apply).
    pub fn has_ready(&self) -> bool {
        self.node.has_ready()
    }

    /// The first half of a Ready cycle: hands the store what Raft asks to persist (the store
    /// buffers it; it is not durable yet), applies the entries that committed, and returns the
    /// messages that may go out now (a leader's appends: Raft lets the leader persist in
    /// parallel with replication). The caller makes the store durable, off this thread if it
    /// likes, then calls [`Replica::persisted`] with `durable`; steps, ticks and proposals may
    /// come in between (raft-rs's asynchronous Ready).
    pub fn begin(&mut self) -> Result<Option<Cycle>> {
        if !self.node.has_ready() {
            return Ok(None);
        }
        let mut ready = self.node.ready();
        let messages = ready.take_messages();
        let mut snapshot_end = None;
        if !ready.snapshot().is_empty() {
            // The leader no longer holds the entries this replica lacks: the snapshot stands for
            // the records below its end offset, which the caller copies from the leader's
            // partition before anything of this cycle is made durable or acknowledged.
            let end = snapshot_end_offset(ready.snapshot())?;
            self.node
                .store()
                .install_snapshot(ready.snapshot().clone())
                .context("installing snapshot")?;
            if !self.raw && end > self.high_watermark {
                self.high_watermark = end;
                snapshot_end = Some(end);
            }
        }
        let mut applied = Vec::new();
        self.apply(ready.take_committed_entries(), &mut applied)?;
        self.node.store().note_applied_end(self.high_watermark);
        self.node
            .store()
            .persist_entries(ready.entries())
            .context("persisting raft entries")?;
        if let Some(hs) = ready.hs() {
            self.node.store().persist_hard_state(hs);
        }
        // raft-rs counts a snapshot applied only once it is persisted.
        let snapshot_index =
            (!ready.snapshot().is_empty()).then(|| ready.snapshot().get_metadata().index);
        let durable = Durable {
            number: ready.number(),
            messages: ready.take_persisted_messages(),
            snapshot_index,
        };
        self.node.advance_append_async(ready);
        if snapshot_index.is_none() {
            self.node.advance_apply();
        }
        Ok(Some(Cycle {
            messages,
            applied,
            durable,
            snapshot_end,
        }))
    }

    /// The second half of a Ready cycle, once the store made it durable: Raft counts this
    /// replica's own append (a leader's commit point may move) and the messages that promised
    /// durability (votes, append acknowledgements) may go out.
    pub fn persisted(&mut self, durable: Durable) -> Vec<Message> {
        self.node.on_persist_ready(durable.number);
        if let Some(index) = durable.snapshot_index {
            self.node.advance_apply_to(index);
        }
        durable.messages
    }

    fn apply(&mut self, entries: Vec<Entry>, out: &mut Vec<Applied>) -> Result<()> {
        for mut e in entries {
            match e.get_entry_type() {
                EntryType::EntryNormal if e.get_data().is_empty() => {}
                EntryType::EntryNormal if self.raw => out.push(Applied {
                    index: e.get_index(),
                    term: e.get_term(),
                    base_offset: 0,
                    end_offset: 0,
                    batch: std::mem::take(&mut e.data),
                }),
                EntryType::EntryNormal => {
                    let header = BatchHeader::parse(e.get_data()).map_err(|err| {
                        anyhow::anyhow!("committed entry is not a batch: {err:?}")
                    })?;
                    let end = header.last_offset().0 + 1;
                    if end <= self.high_watermark {
                        // Already in the partition (applied before a restart).
                        continue;
                    }
                    if header.base_offset.0 != self.high_watermark {
                        bail!(
                            "committed batch at offset {} does not follow the high watermark {}",
                            header.base_offset.0,
                            self.high_watermark
                        );
                    }
                    self.high_watermark = end;
                    out.push(Applied {
                        index: e.get_index(),
                        term: e.get_term(),
                        base_offset: header.base_offset.0,
                        end_offset: end,
                        batch: std::mem::take(&mut e.data),
                    });
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(e.get_data())
                        .context("decoding a membership change")?;
                    let cs = self.node.apply_conf_change(&cc);
                    self.persist_membership(cs)?;
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(e.get_data())
                        .context("decoding a membership change")?;
                    let cs = self.node.apply_conf_change(&cc);
                    self.persist_membership(cs)?;
                }
            }
        }
        Ok(())
    }
}

impl<S: ReplicaStore> Replica<S> {
    /// Persists the membership a committed change left (raft-rs applied it). Replaying a
    /// log on restart applies its changes again over the membership persisted last; each is
    /// idempotent there (adding a learner or voter that is one, removing one that is gone).
    fn persist_membership(&mut self, cs: raft::Result<ConfState>) -> Result<()> {
        let cs = cs.context("applying a membership change")?;
        self.node.store().persist_conf_state(&cs);
        Ok(())
    }

    /// A replica added to a running group that has no membership and no log yet.
    pub fn awaits_snapshot(&self) -> bool {
        let (voters, learners) = self.membership();
        voters.is_empty() && learners.is_empty() && self.node.raft.raft_log.last_index() == 0
    }

    /// The current membership: voters and learners.
    pub fn membership(&self) -> (Vec<u64>, Vec<u64>) {
        let cs = self.node.raft.prs().conf().to_conf_state();
        (cs.voters, cs.learners)
    }

    /// Proposes an entry that carries nothing (it moves the log on, e.g. so that there is a point
    /// to compact to before a new replica is added).
    pub fn propose_empty(&mut self) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader);
        }
        self.node
            .propose(Vec::new(), Vec::new())
            .map_err(|_| ProposeError::Dropped)
    }

    /// The leader sent a snapshot to `to`: it goes on probing (a lost snapshot is sent again
    /// when the follower's reply shows it still lacks it).
    pub fn snapshot_sent(&mut self, to: u64) {
        self.node.report_snapshot(to, raft::SnapshotStatus::Finish);
    }

    /// Whether this replica has never seen a term (a new partition's group, before any election).
    pub fn is_new(&self) -> bool {
        self.node.raft.term == 0 && self.node.raft.raft_log.last_index() == 0
    }

    /// Stands for election now rather than after an election timeout.
    pub fn campaign(&mut self) -> Result<()> {
        self.node.campaign().context("campaign")
    }

    /// Hands leadership to `to` once its log has caught up (raft-rs's leader transfer).
    pub fn transfer_leader(&mut self, to: u64) {
        if self.is_leader() {
            self.node.transfer_leader(to);
        }
    }

    /// Proposes one simple membership change (at the leader).
    pub fn propose_membership(
        &mut self,
        change: raft::eraftpb::ConfChangeType,
        node: u64,
    ) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NotLeader);
        }
        let mut cc = ConfChange::default();
        cc.set_change_type(change);
        cc.node_id = node;
        self.node
            .propose_conf_change(Vec::new(), cc)
            .map_err(|_| ProposeError::Dropped)
    }
}

/// One Ready cycle in flight: what may go out now, what committed, and what waits for the store.
pub struct Cycle {
    pub messages: Vec<Message>,
    pub applied: Vec<Applied>,
    pub durable: Durable,
    /// A snapshot was installed: the partition must hold every record below this offset (copied
    /// from the leader) before the committed batches of this cycle are applied.
    pub snapshot_end: Option<i64>,
}

/// A snapshot's data is the end offset of the records it stands for (8 bytes, big endian); an
/// empty one (the metadata group's, or a simulator's) stands for none.
pub fn snapshot_end_offset(snapshot: &Snapshot) -> Result<i64> {
    let data = snapshot.get_data();
    if data.is_empty() {
        return Ok(0);
    }
    let bytes: [u8; 8] = data
        .try_into()
        .map_err(|_| anyhow::anyhow!("snapshot data of {} bytes, not 8", data.len()))?;
    let end = i64::from_be_bytes(bytes);
    if end < 0 {
        bail!("snapshot end offset {end} is negative");
    }
    Ok(end)
}

/// The part of a Ready cycle that waits until the store is durable.
pub struct Durable {
    number: u64,
    messages: Vec<Message>,
    /// The cycle installed a snapshot at this index: applied once durable.
    snapshot_index: Option<u64>,
}

/// The end offset of the batch an entry carries (None for entries that are not batches).
fn batch_end(e: &Entry) -> Option<i64> {
    if e.get_entry_type() != EntryType::EntryNormal || e.get_data().is_empty() {
        return None;
    }
    BatchHeader::parse(e.get_data())
        .ok()
        .map(|h| h.last_offset().0 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica of a single-voter group that has committed `n` empty-leader entries.
    fn leader() -> Replica<MemStorage> {
        let store = MemStorage::new_with_conf_state((vec![1], vec![]));
        let mut r = Replica::new(1, store, 0).unwrap();
        for _ in 0..30 {
            r.tick();
            r.drive().unwrap();
            if r.is_leader() {
                break;
            }
        }
        r.drive().unwrap();
        assert!(r.is_leader());
        r
    }

    /// Each of these made raft-rs stop the process; a broker must refuse them instead.
    #[test]
    fn messages_that_break_raft_invariants_are_refused_not_fatal() {
        let mut r = leader();
        let committed = r.commit_index();
        assert!(committed >= 1);
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = 2;
        assert!(r.step(m).is_err());

        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgHeartbeat);
        m.from = 2;
        m.term = r.term() + 1;
        m.commit = r.last_index() + 100;
        assert!(r.step(m).is_err());

        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 2;
        m.term = r.term() + 1;
        m.index = 0;
        m.log_term = 0;
        let e = Entry {
            index: committed,
            term: r.term() + 1,
            ..Default::default()
        };
        m.entries = vec![e].into();
        m.commit = committed;
        assert!(r.step(m).is_err());
        // Still serving.
        r.drive().unwrap();
        assert!(r.is_leader());
    }
}
