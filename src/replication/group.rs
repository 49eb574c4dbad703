//! One Raft group on its owning shard: the [`Replica`] over its [`WalStore`], the task that drives
//! it (messages in, ticks, Ready out, committed entries applied), and the produce path at the
//! leader (Kafka's checks, idempotent-producer sequences including batches proposed but not yet
//! committed, waiting for the commit point).
//!
//! A data group applies committed batches to its partition's segments ([`PartitionLog`]), which
//! therefore hold committed batches only: the high watermark readers see is the commit point. The
//! metadata group (`__cluster_metadata`) hands committed commands to the controller instead.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use raft::eraftpb::Message;

use super::replica::{Applied, ProposeError, Replica};
use super::transport::Transport;
use super::wal::WalStore;
use crate::model::{ErrorCode, Offset, TopicPartition};
use crate::storage::batch::{self, BatchHeader};
use crate::storage::files;
use crate::storage::{AppendError, Appended, Origin, PartitionLog};

/// One Raft tick. Election timeout: `ELECTION_TICKS` to twice that many ticks (1–2 s).
pub const TICK: Duration = Duration::from_millis(100);

/// The first tick boundary after `now`. Every group of the process ticks on the same grid, so
/// the heartbeats of all groups to one peer fall due together and the transport sends them as
/// one frame (see `transport`).
fn next_tick_after(now: Instant) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let ticks = now.saturating_duration_since(origin).as_nanos() / TICK.as_nanos() + 1;
    origin + TICK * u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// How long a produce waits for its batch to commit before `REQUEST_TIMED_OUT`.
const COMMIT_WAIT: Duration = Duration::from_secs(30);

/// A group's limits, from the broker's settings.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// `replica.lag.time.max.ms`.
    pub lag_max: Duration,
    /// `strom.raft.log.compact.bytes`: the WAL is compacted once it holds this many bytes.
    pub compact_bytes: u64,
}

/// What a group does with committed entries.
pub enum Sink {
    /// A data partition: batches go into its segments.
    Log(PartitionLog),
    /// The metadata group: commands go to the controller.
    Metadata(Box<dyn Fn(Vec<Applied>)>),
}

/// Copies records the leader's partition holds from `from` on (Kafka Fetch from the leader's
/// client listener): the record batches of one response, in order, and the leader's log start
/// offset. What a snapshot stands for.
pub type Copier = Rc<
    dyn Fn(
        u64,
        i64,
    )
        -> std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<(Bytes, i64)>>>>,
>;

/// A batch of an idempotent producer proposed by this leader and not yet applied.
#[derive(Clone, Copy)]
struct Inflight {
    epoch: i16,
    first_sequence: i32,
    last_sequence: i32,
    base: i64,
    end: i64,
}

/// Leadership as the last Ready left it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Role {
    pub leader: bool,
    pub term: u64,
    pub leader_id: u64,
}

pub struct Group {
    pub tp: TopicPartition,
    replica: RefCell<Replica<WalStore>>,
    inbox: RefCell<Vec<Message>>,
    wake: event_listener::Event,
    /// Notified after every Ready cycle.
    progress: event_listener::Event,
    transport: Rc<Transport>,
    sink: Sink,
    role: Cell<Role>,
    /// This replica led and stepped down because it stopped hearing from a quorum, and no new
    /// leader is known: the partition has fewer live replicas than it needs.
    lost_quorum: Cell<bool>,
    /// Since when this replica leads (None while it follows).
    leading_since: Cell<Option<Instant>>,
    /// When this broker opened the group.
    opened: Instant,
    /// Offsets below this were proposed and are in this leader's own durable log (`acks=1`).
    persisted_end: Cell<i64>,
    /// Produces waiting for their batch to commit, by base offset, with the term proposed in.
    waiters: RefCell<BTreeMap<i64, (u64, oneshot::Sender<bool>)>>,
    inflight: RefCell<HashMap<i64, VecDeque<Inflight>>>,
    /// The raft index and end offset of applied batches not yet known durable in the segments.
    applied_marks: RefCell<VecDeque<(u64, i64)>>,
    /// Told about every leadership change (the shard updates Metadata's view).
    on_role: Box<dyn Fn(Role)>,
    /// While leading: when each follower last caught up with the log end (Kafka's ISR rule).
    followers: RefCell<HashMap<u64, Follower>>,
    /// When each peer was last heard from (any Raft message), leader or not.
    heard: RefCell<HashMap<u64, Instant>>,
    limits: Limits,
    /// How a snapshot's records are copied from the leader (data groups in a cluster).
    copier: RefCell<Option<Copier>>,
    stopped: Cell<bool>,
    /// The driver task has returned (no sync of it is in flight any more).
    exited: Cell<bool>,
    failed: Cell<bool>,
}

/// One replica of a group as its leader sees it (DescribeQuorum).
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaProgress {
    pub id: i32,
    /// The end of its Raft log as far as it matches the leader's (the leader: its last index).
    pub log_end: u64,
    /// How long ago it was last heard from, and last caught up with the leader's log end.
    pub heard: Option<Duration>,
    pub caught_up: Option<Duration>,
}

/// A group's Raft state at its leader: Kafka's DescribeQuorum answer, in Raft indexes.
#[derive(Clone, Debug, PartialEq)]
pub struct Quorum {
    pub leader: i32,
    pub term: u64,
    pub commit: u64,
    pub voters: Vec<ReplicaProgress>,
    /// Learners: replicas being added (a reassignment) or, for the metadata group, brokers
    /// outside the controller quorum.
    pub observers: Vec<ReplicaProgress>,
}

/// Kafka's in-sync test for one follower: the leader notes its log end (`mark`) and when; once the
/// follower's log reaches that mark, it had caught up as of then.
#[derive(Clone, Copy)]
struct Follower {
    /// When this replica started tracking it (its leadership began): it counts as heard from
    /// then.
    since: Instant,
    mark_index: u64,
    mark_time: Instant,
    caught_up: Instant,
}

impl Group {
    pub fn new(
        tp: TopicPartition,
        replica: Replica<WalStore>,
        transport: Rc<Transport>,
        sink: Sink,
        on_role: Box<dyn Fn(Role)>,
        limits: Limits,
    ) -> Rc<Group> {
        let group = Rc::new(Group {
            tp,
            replica: RefCell::new(replica),
            inbox: RefCell::new(Vec::new()),
            wake: event_listener::Event::new(),
            progress: event_listener::Event::new(),
            transport,
            sink,
            role: Cell::new(Role::default()),
            lost_quorum: Cell::new(false),
            leading_since: Cell::new(None),
            opened: Instant::now(),
            persisted_end: Cell::new(0),
            waiters: RefCell::new(BTreeMap::new()),
            inflight: RefCell::new(HashMap::new()),
            applied_marks: RefCell::new(VecDeque::new()),
            on_role,
            followers: RefCell::new(HashMap::new()),
            heard: RefCell::new(HashMap::new()),
            limits,
            copier: RefCell::new(None),
            stopped: Cell::new(false),
            exited: Cell::new(false),
            failed: Cell::new(false),
        });
        let driver = group.clone();
        glommio::spawn_local(async move { driver.run().await }).detach();
        group
    }

    pub fn role(&self) -> Role {
        self.role.get()
    }

    /// The leader epoch Kafka clients see: the Raft term.
    pub fn leader_epoch(&self) -> i32 {
        i32::try_from(self.role.get().term).unwrap_or(i32::MAX)
    }

    pub fn deliver(&self, message: Message) {
        self.inbox.borrow_mut().push(message);
        self.wake.notify(1);
    }

    pub fn stop(&self) {
        self.stopped.set(true);
        self.wake.notify(usize::MAX);
        self.progress.notify(usize::MAX);
    }

    /// Kafka's in-sync replicas, the leader included: followers whose log reached the leader's
    /// log end within the last `replica.lag.time.max.ms`. Empty on a follower. Sorted.
    pub fn in_sync(&self) -> Vec<i32> {
        let r = self.replica.borrow();
        if !r.is_leader() {
            return Vec::new();
        }
        let now = Instant::now();
        // Learners (replicas being added) are not in sync until they vote.
        let (voters, _) = r.membership();
        let followers = self.followers.borrow();
        let heard = self.heard.borrow();
        let recent = |at: Instant| now.saturating_duration_since(at) < self.limits.lag_max;
        let mut ids: Vec<i32> = std::iter::once(r.id())
            .chain(
                followers
                    .iter()
                    .filter(|(id, _)| voters.contains(id))
                    .filter(|(id, f)| {
                        let heard = heard.get(id).map_or(f.since, |at| (*at).max(f.since));
                        recent(f.caught_up) && recent(heard)
                    })
                    .map(|(id, _)| *id),
            )
            .filter_map(|id| i32::try_from(id).ok())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The group's Raft state with each replica's progress; None unless this replica leads.
    pub fn quorum(&self) -> Option<Quorum> {
        let r = self.replica.borrow();
        if !r.is_leader() {
            return None;
        }
        let now = Instant::now();
        let me = r.id();
        let matches: HashMap<u64, u64> = r.follower_matches().into_iter().collect();
        let followers = self.followers.borrow();
        let heard = self.heard.borrow();
        let progress = |id: u64| {
            let ago = |at: Instant| now.saturating_duration_since(at);
            let (log_end, heard, caught_up) = if id == me {
                (r.last_index(), Some(Duration::ZERO), Some(Duration::ZERO))
            } else {
                (
                    matches.get(&id).copied().unwrap_or(0),
                    heard.get(&id).map(|at| ago(*at)),
                    followers.get(&id).map(|f| ago(f.caught_up)),
                )
            };
            ReplicaProgress {
                id: i32::try_from(id).unwrap_or(-1),
                log_end,
                heard,
                caught_up,
            }
        };
        let (voters, learners) = r.membership();
        Some(Quorum {
            leader: i32::try_from(me).unwrap_or(-1),
            term: r.term(),
            commit: r.commit_index(),
            voters: voters.into_iter().map(progress).collect(),
            observers: learners.into_iter().map(progress).collect(),
        })
    }

    /// How long ago each peer was last heard from (any Raft message of this group).
    pub fn heard(&self) -> Vec<(i32, Duration)> {
        let now = Instant::now();
        self.heard
            .borrow()
            .iter()
            .filter_map(|(id, at)| {
                Some((i32::try_from(*id).ok()?, now.saturating_duration_since(*at)))
            })
            .collect()
    }

    /// Moves each follower's caught-up time on (once per tick while leading).
    fn track_followers(&self, now: Instant) {
        let (matches, last) = {
            let r = self.replica.borrow();
            (r.follower_matches(), r.last_index())
        };
        let mut followers = self.followers.borrow_mut();
        if matches.is_empty() {
            followers.clear();
            return;
        }
        followers.retain(|id, _| matches.iter().any(|(m, _)| m == id));
        for (id, matched) in matches {
            // A new leader counts its followers in sync from the start, as Kafka's new leader
            // keeps the ISR it inherits until they fall behind.
            let f = followers.entry(id).or_insert(Follower {
                since: now,
                mark_index: last,
                mark_time: now,
                caught_up: now,
            });
            if matched >= f.mark_index {
                f.caught_up = f.mark_time;
                f.mark_index = last;
                f.mark_time = now;
            }
        }
    }

    /// Follower lag in Raft entries, as the leader tracks it (empty on a follower).
    pub fn follower_lag(&self) -> Vec<(i32, u64)> {
        let r = self.replica.borrow();
        r.follower_lag()
            .into_iter()
            .filter_map(|(id, lag)| i32::try_from(id).ok().map(|id| (id, lag)))
            .collect()
    }

    /// Proposes an opaque command (the metadata group): from any replica, forwarded to the leader.
    pub fn propose_command(&self, data: Vec<u8>) -> Result<(), ProposeError> {
        self.replica.borrow_mut().propose_raw(data)?;
        self.wake.notify(1);
        Ok(())
    }

    /// The group's membership: voters and learners.
    pub fn membership(&self) -> (Vec<u64>, Vec<u64>) {
        self.replica.borrow().membership()
    }

    /// Proposes one membership change (at the leader; it takes effect once committed).
    pub fn propose_membership(
        &self,
        change: raft::eraftpb::ConfChangeType,
        node: u64,
    ) -> Result<(), ProposeError> {
        self.replica.borrow_mut().propose_membership(change, node)?;
        self.wake.notify(1);
        Ok(())
    }

    pub fn set_copier(&self, copier: Copier) {
        *self.copier.borrow_mut() = Some(copier);
    }

    /// The leader's log entries each peer (voter or learner) is known to hold.
    pub fn follower_matches(&self) -> Vec<(u64, u64)> {
        self.replica.borrow().follower_matches()
    }

    pub fn last_index(&self) -> u64 {
        self.replica.borrow().last_index()
    }

    /// Before a replica is added: makes the leader's log start past its first entry, so that the
    /// new replica (which has no membership) is sent a snapshot rather than the log from its
    /// start. Returns whether that holds; if not, it has moved towards it (an empty entry to
    /// compact to, a segment sync) and the caller asks again later.
    pub fn ready_to_add_replica(&self) -> bool {
        let mut r = self.replica.borrow_mut();
        if r.store().first_index() >= 2 {
            return true;
        }
        if !r.is_leader() {
            return false;
        }
        let applied = r.applied_index();
        if applied < 2 {
            if r.last_index() < 2 {
                let _ = r.propose_empty();
                drop(r);
                self.wake.notify(1);
            }
            return false;
        }
        let Sink::Log(log) = &self.sink else {
            return true;
        };
        // Entries leave the log only once the segments hold their batches durably: compact up
        // to the first applied batch that is not durable yet (producers keep writing).
        let durable = log.durable_offset().0;
        log.request_sync();
        let point = self
            .applied_marks
            .borrow()
            .iter()
            .find(|(_, end)| *end > durable)
            .map_or(applied, |(index, _)| *index);
        if point < 2 {
            return false;
        }
        if let Err(e) = r.store().compact(point) {
            tracing::error!(partition = %self.tp, error = %format!("{e:#}"), "raft log compaction failed");
            return false;
        }
        self.applied_marks
            .borrow_mut()
            .retain(|(index, _)| *index >= point);
        r.store().first_index() >= 2
    }

    /// A snapshot was installed: copies the records below `end` from the leader into the
    /// partition and waits until they are durable, retrying (the leader may change) until done
    /// or the group stops.
    async fn copy_snapshot(&self, end: i64) -> bool {
        let Sink::Log(log) = &self.sink else {
            return true;
        };
        let Some(copier) = self.copier.borrow().clone() else {
            return false;
        };
        tracing::info!(partition = %self.tp, from = log.log_end_offset().0, end, "copying a snapshot's records from the leader");
        // The leader's log start, once a fetch below it was refused (records deleted there).
        let mut leader_start: Option<i64> = None;
        while log.log_end_offset().0 < end {
            if self.stopped.get() {
                return false;
            }
            let leader = self.replica.borrow().leader_id();
            let from = log.log_end_offset().0.max(leader_start.unwrap_or(0));
            let fetched = copier(leader, from).await;
            let bytes = match fetched {
                Ok((b, _)) if !b.is_empty() => b,
                Ok((_, start)) if start > from => {
                    leader_start = Some(start);
                    continue;
                }
                Ok(_) => {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    tracing::info!(partition = %self.tp, leader, error = %format!("{e:#}"), "snapshot copy failed; retrying");
                    glommio::timer::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Whole batches only (a response may end in part of one), each checked (CRC).
            let whole = batch::whole_batches_within(&bytes, usize::MAX);
            let batches = match batch::split_batches(&bytes[..whole]) {
                Ok(b) if b.is_empty() => {
                    glommio::timer::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(partition = %self.tp, leader, error = ?e, "a copied batch does not validate; fetching again");
                    glommio::timer::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            for (pos, h) in batches {
                let batch = bytes.slice(pos..pos + h.size_bytes);
                let batch_end = h.last_offset().0 + 1;
                let log_end = log.log_end_offset().0;
                if batch_end <= log_end {
                    continue;
                }
                // Beyond the snapshot the batches come through Raft.
                if batch_end > end {
                    break;
                }
                if leader_start.is_some_and(|start| start > log_end) && h.base_offset.0 > log_end {
                    // This log ends below the leader's log start (the records between were
                    // deleted there by retention or DeleteRecords): as Kafka's follower, it
                    // drops what it holds and starts at the leader's first batch.
                    tracing::info!(partition = %self.tp, log_end, start = h.base_offset.0, "the log ends below the leader's log start: truncating it fully");
                    if let Err(e) = log.truncate_fully_and_start_at(h.base_offset).await {
                        tracing::error!(partition = %self.tp, error = %format!("{e:#}"), "the log cannot start at the leader's first batch");
                        return false;
                    }
                }
                if let Err(code) = log.append_copied(batch) {
                    tracing::error!(partition = %self.tp, ?code, "a snapshot's batch does not fit the partition");
                    return false;
                }
            }
        }
        if let Some(start) = leader_start.filter(|s| *s > log.log_start_offset().0) {
            // The log start may fall inside the first batch: the same start as the leader's.
            tracing::info!(partition = %self.tp, start, "the log starts where the leader's does");
            log.request_sync();
            if log.wait_for(Offset(end), true).await.is_err()
                || log.delete_records(start).await.is_err()
            {
                return false;
            }
        }
        log.request_sync();
        log.wait_for(Offset(end), true).await.is_ok()
    }

    /// A new partition's preferred replica stands at once, so that leadership starts where the
    /// assignment spread it (the others would stand only after an election timeout).
    pub fn campaign_if_new(&self) {
        let mut r = self.replica.borrow_mut();
        if r.is_new() {
            if let Err(e) = r.campaign() {
                tracing::debug!(partition = %self.tp, error = %format!("{e:#}"), "no campaign");
            }
            drop(r);
            self.wake.notify(1);
        }
    }

    /// How long ago this broker opened the group.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// How long this replica has led (None while it follows).
    pub fn leading_for(&self) -> Option<Duration> {
        self.leading_since.get().map(|at| at.elapsed())
    }

    /// The commit point in Kafka offsets.
    pub fn high_watermark(&self) -> i64 {
        self.replica.borrow().high_watermark()
    }

    /// Hands leadership to `to` (Kafka's preferred leader election) once it has caught up.
    pub fn transfer_leader(&self, to: u64) {
        self.replica.borrow_mut().transfer_leader(to);
        self.wake.notify(1);
    }

    /// Sends a message this replica built itself (a broker outside the group asking to join).
    pub fn send_raw(&self, message: &Message) {
        self.transport.send(&self.tp, message);
    }

    /// Completes once this replica has applied every entry its log held when called (a new
    /// leader: everything any former leader committed), or the group stopped.
    pub async fn caught_up(&self) {
        let target = self.replica.borrow().last_index();
        self.applied_through(target).await;
    }

    /// Completes once this replica has applied every entry up to `index`, or the group stopped.
    pub async fn applied_through(&self, index: u64) {
        loop {
            let listener = self.progress.listen();
            if self.replica.borrow().applied_index() >= index || self.stopped.get() {
                return;
            }
            listener.await;
        }
    }

    pub fn commit_index(&self) -> u64 {
        self.replica.borrow().commit_index()
    }

    async fn run(self: Rc<Self>) {
        self.drive_loop().await;
        self.exited.set(true);
        self.progress.notify(usize::MAX);
    }

    /// Stops the group and waits until its driver has returned, so that no WAL sync of it is
    /// still running on the blocking thread (a clean shutdown closes the partition after this).
    pub async fn stop_and_wait(&self) {
        self.stop();
        loop {
            let listener = self.progress.listen();
            if self.exited.get() {
                return;
            }
            listener.await;
        }
    }

    async fn drive_loop(&self) {
        let mut next_tick = next_tick_after(Instant::now());
        loop {
            if self.stopped.get() {
                return;
            }
            let listener = self.wake.listen();
            // A proposal or a persisted cycle leaves Raft work ready: no waiting for it.
            if self.inbox.borrow().is_empty() && !self.replica.borrow().has_ready() {
                let wait = next_tick.saturating_duration_since(Instant::now());
                let _ = glommio::timer::timeout(wait, async {
                    listener.await;
                    Ok(())
                })
                .await;
            }
            let now = Instant::now();
            let begun = {
                let mut r = self.replica.borrow_mut();
                let mut heard = self.heard.borrow_mut();
                for m in self.inbox.borrow_mut().drain(..) {
                    heard.insert(m.from, now);
                    if let Err(e) = r.step(m) {
                        tracing::debug!(partition = %self.tp, error = %format!("{e:#}"), "raft message refused");
                    }
                }
                let ticked = now >= next_tick;
                if ticked {
                    r.tick();
                    next_tick = next_tick_after(now);
                }
                // What this leader proposed so far is in this cycle's entries.
                r.begin().map(|cycle| (cycle, r.proposed_end(), ticked))
            };
            let (cycle, proposed) = match begun {
                Ok((cycle, proposed, ticked)) => {
                    if ticked {
                        self.track_followers(now);
                    }
                    (cycle, proposed)
                }
                Err(e) => return self.fail(&e),
            };
            self.update_role();
            if let Some(cycle) = cycle {
                for m in &cycle.messages {
                    self.transport.send(&self.tp, m);
                    if m.get_msg_type() == raft::eraftpb::MessageType::MsgSnapshot {
                        self.replica.borrow_mut().snapshot_sent(m.to);
                    }
                }
                if let Some(end) = cycle.snapshot_end {
                    if !self.copy_snapshot(end).await {
                        if !self.stopped.get() {
                            self.fail(&anyhow::anyhow!(
                                "the snapshot's records could not be copied"
                            ));
                        }
                        return;
                    }
                }
                if !cycle.applied.is_empty() {
                    self.apply(cycle.applied);
                }
                // The write and fdatasync run on a blocking thread: the shard goes on serving
                // its other partitions and clients meanwhile.
                let job = self.replica.borrow().store().take_flush();
                if let Some(job) = job {
                    match files::blocking(job).await {
                        Ok(written) => self.replica.borrow().store().flushed(written),
                        Err(e) => return self.fail(&e),
                    }
                }
                let durable = self.replica.borrow_mut().persisted(cycle.durable);
                for m in &durable {
                    self.transport.send(&self.tp, m);
                }
                if let Some(p) = proposed {
                    self.persisted_end.set(self.persisted_end.get().max(p));
                }
            }
            self.maybe_compact();
            self.progress.notify(usize::MAX);
        }
    }

    fn fail(&self, e: &anyhow::Error) {
        tracing::error!(partition = %self.tp, error = %format!("{e:#}"), "raft group failed; it stops serving");
        self.failed.set(true);
        self.stop();
    }

    fn update_role(&self) {
        let role = {
            let r = self.replica.borrow();
            Role {
                leader: r.is_leader(),
                term: r.term(),
                leader_id: r.leader_id(),
            }
        };
        let old = self.role.replace(role);
        if old == role {
            return;
        }
        if old.leader && !role.leader && role.leader_id == raft::INVALID_ID {
            self.lost_quorum.set(true);
        } else if role.leader_id != raft::INVALID_ID {
            self.lost_quorum.set(false);
        }
        tracing::info!(partition = %self.tp, leader = role.leader_id, term = role.term, "raft leadership changed");
        self.leading_since.set(role.leader.then(Instant::now));
        self.track_followers(Instant::now());
        if role.leader {
            // Batches a former leader left uncommitted in our log may still commit: a producer's
            // retry of one of them must be recognised as a duplicate.
            let pending = self.replica.borrow().uncommitted_batches();
            let mut inflight = self.inflight.borrow_mut();
            inflight.clear();
            for h in pending {
                if h.producer_id >= 0 {
                    push_inflight(&mut inflight, &h);
                }
            }
        } else {
            self.inflight.borrow_mut().clear();
        }
        (self.on_role)(role);
    }

    fn apply(&self, applied: Vec<Applied>) {
        match &self.sink {
            Sink::Metadata(f) => f(applied),
            Sink::Log(log) => {
                for a in applied {
                    let end = a.end_offset;
                    if let Err(code) = log.append_replicated(a.batch) {
                        tracing::error!(partition = %self.tp, ?code, "applying a committed batch failed; the group stops");
                        self.failed.set(true);
                        self.stop();
                        return;
                    }
                    self.applied_marks.borrow_mut().push_back((a.index, end));
                    // Resolve produces whose offsets this batch covers.
                    let mut waiters = self.waiters.borrow_mut();
                    while let Some((&base, _)) = waiters.iter().next() {
                        if base >= end {
                            break;
                        }
                        let Some((term, tx)) = waiters.remove(&base) else {
                            break;
                        };
                        let _ = tx.send(base == a.base_offset && term == a.term);
                    }
                    let mut inflight = self.inflight.borrow_mut();
                    for q in inflight.values_mut() {
                        while q.front().is_some_and(|b| b.end <= end) {
                            q.pop_front();
                        }
                    }
                    inflight.retain(|_, q| !q.is_empty());
                }
            }
        }
    }

    /// Drops WAL entries whose batches the segments hold durably, once the WAL holds
    /// `strom.raft.log.compact.bytes`. A leader keeps what its in-sync followers still need.
    fn maybe_compact(&self) {
        let Sink::Log(log) = &self.sink else { return };
        let r = self.replica.borrow();
        if r.store().file_bytes() < self.limits.compact_bytes {
            return;
        }
        // Entries stay for the followers in sync; one out of the ISR that falls behind the
        // compacted point catches up from a snapshot (the leader's segments), as a Kafka follower
        // fetches from the leader's log: the WAL stays bounded while a broker is down.
        let in_sync = self.in_sync();
        let matches = r.follower_matches();
        let limit = matches
            .iter()
            .filter(|(id, _)| i32::try_from(*id).is_ok_and(|id| in_sync.contains(&id)))
            .map(|(_, matched)| matched + 1)
            .min()
            .unwrap_or(u64::MAX);
        // Entries leave only once the segments hold their batches durably.
        let durable = log.durable_offset().0;
        let mut marks = self.applied_marks.borrow_mut();
        let mut upto = None;
        while let Some(&(index, end)) = marks.front() {
            if end > durable || index > limit {
                break;
            }
            upto = Some(index);
            marks.pop_front();
        }
        let Some(index) = upto else {
            log.request_sync();
            return;
        };
        let behind: Vec<u64> = matches
            .into_iter()
            .filter(|(_, matched)| *matched + 1 < index)
            .map(|(id, _)| id)
            .collect();
        if !behind.is_empty() {
            tracing::debug!(partition = %self.tp, index, ?behind, "raft log compacted past followers out of the ISR: they catch up from a snapshot");
        }
        if let Err(e) = r.store().compact(index) {
            tracing::error!(partition = %self.tp, error = %format!("{e:#}"), "raft log compaction failed");
        }
    }

    /// Produce at the leader: checks, proposes, and waits for the commit point (`acks=-1`) or this
    /// leader's own durable append (`acks=0/1`).
    pub async fn produce(
        &self,
        log: &PartitionLog,
        records: Bytes,
        acks: i16,
        min_insync: i32,
        origin: Origin,
    ) -> Result<Appended, AppendError> {
        if self.failed.get() {
            return Err(ErrorCode::KAFKA_STORAGE_ERROR.into());
        }
        if !self.role.get().leader {
            // Kafka's answer when too few replicas are in sync for acks=all.
            if acks == -1 && self.lost_quorum.get() {
                return Err(ErrorCode::NOT_ENOUGH_REPLICAS.into());
            }
            return Err(ErrorCode::NOT_LEADER_OR_FOLLOWER.into());
        }
        let batches = log.validate(&records, origin)?;
        if acks == -1 {
            let in_sync = self.in_sync().len();
            if i32::try_from(in_sync).unwrap_or(i32::MAX) < min_insync {
                return Err(ErrorCode::NOT_ENOUGH_REPLICAS.into());
            }
        }
        if let [(_, h)] = batches.as_slice() {
            if origin == Origin::Coordinator {
                // The coordinators' writes carry no sequence; a marker is checked against the
                // producer's epoch only.
                if h.is_control() {
                    log.check_marker_epoch(h)?;
                }
            } else if h.producer_id >= 0 {
                if let Some((base, end)) = self.duplicate_of(log, h)? {
                    self.wait_committed(end).await?;
                    return Ok(Appended {
                        base_offset: Offset(base),
                        end_offset: Offset(end),
                        records: 0,
                        log_append_time_ms: -1,
                        log_start_offset: log.log_start_offset(),
                    });
                }
            }
        }
        let append_time = if log.config().log_append_time {
            crate::storage::partition::now_ms() as i64
        } else {
            -1
        };
        let mut first_base = None;
        let mut end = 0;
        let mut term = 0;
        let mut count = 0i64;
        let mut receivers = Vec::new();
        for (pos, h) in &batches {
            // The one copy of the produce path: out of the request into the Raft entry.
            let mut bytes = records[*pos..*pos + h.size_bytes].to_vec();
            if append_time >= 0 {
                batch::set_log_append_time(&mut bytes, append_time);
            }
            let (base, t) = self
                .replica
                .borrow_mut()
                .propose(bytes)
                .map_err(|e| match e {
                    ProposeError::NotLeader | ProposeError::Dropped => {
                        AppendError::from(ErrorCode::NOT_LEADER_OR_FOLLOWER)
                    }
                    ProposeError::Invalid => AppendError::from(ErrorCode::CORRUPT_MESSAGE),
                })?;
            let batch_end = base + i64::from(h.last_offset_delta) + 1;
            first_base.get_or_insert(base);
            end = batch_end;
            term = t;
            count += i64::from(h.record_count);
            if h.producer_id >= 0 && origin == Origin::Client {
                let mut assigned = *h;
                assigned.base_offset = Offset(base);
                push_inflight(&mut self.inflight.borrow_mut(), &assigned);
            }
            if acks == -1 {
                let (tx, rx) = oneshot::channel();
                self.waiters.borrow_mut().insert(base, (t, tx));
                receivers.push(rx);
            }
        }
        self.wake.notify(1);
        let base = first_base.unwrap_or(0);
        if acks == -1 {
            for rx in receivers {
                match glommio::timer::timeout(COMMIT_WAIT, async { Ok(rx.await) }).await {
                    Ok(Ok(true)) => {}
                    // Overwritten by another leader's batch, or the group stopped.
                    Ok(Ok(false)) | Ok(Err(_)) => {
                        return Err(ErrorCode::NOT_LEADER_OR_FOLLOWER.into())
                    }
                    Err(_) => return Err(ErrorCode::REQUEST_TIMED_OUT.into()),
                }
            }
        } else {
            self.wait_persisted(end, term).await?;
        }
        Ok(Appended {
            base_offset: Offset(base),
            end_offset: Offset(end),
            records: count,
            log_append_time_ms: append_time,
            log_start_offset: log.log_start_offset(),
        })
    }

    /// A retry of a batch in flight or in the log: its offsets. Checks the sequence otherwise.
    fn duplicate_of(
        &self,
        log: &PartitionLog,
        h: &BatchHeader,
    ) -> Result<Option<(i64, i64)>, ErrorCode> {
        let inflight = self.inflight.borrow();
        let Some(q) = inflight.get(&h.producer_id).filter(|q| !q.is_empty()) else {
            return Ok(log.check_sequence(h)?.map(|(b, e)| (b.0, e.0)));
        };
        if let Some(dup) = q
            .iter()
            .find(|b| b.first_sequence == h.base_sequence && b.last_sequence == h.last_sequence())
        {
            return Ok(Some((dup.base, dup.end)));
        }
        if let Some(dup) = log.check_sequence(h).ok().flatten() {
            return Ok(Some((dup.0 .0, dup.1 .0)));
        }
        let last = q.back().map_or(-1, |b| b.last_sequence);
        let epoch = q.back().map_or(h.producer_epoch, |b| b.epoch);
        if h.producer_epoch < epoch {
            return Err(ErrorCode::INVALID_PRODUCER_EPOCH);
        }
        if h.producer_epoch > epoch {
            return if h.base_sequence == 0 {
                Ok(None)
            } else {
                Err(ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER)
            };
        }
        let expected = if last == i32::MAX { 0 } else { last + 1 };
        if h.base_sequence != expected {
            return Err(ErrorCode::OUT_OF_ORDER_SEQUENCE_NUMBER);
        }
        Ok(None)
    }

    async fn wait_committed(&self, end: i64) -> Result<(), AppendError> {
        let deadline = Instant::now() + COMMIT_WAIT;
        loop {
            let listener = self.progress.listen();
            if self.replica.borrow().high_watermark() >= end {
                return Ok(());
            }
            if self.stopped.get() {
                return Err(ErrorCode::NOT_LEADER_OR_FOLLOWER.into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ErrorCode::REQUEST_TIMED_OUT.into());
            }
            let _ = glommio::timer::timeout(left, async {
                listener.await;
                Ok(())
            })
            .await;
        }
    }

    async fn wait_persisted(&self, end: i64, term: u64) -> Result<(), AppendError> {
        loop {
            let listener = self.progress.listen();
            if self.persisted_end.get() >= end {
                return Ok(());
            }
            if self.stopped.get() || self.role.get().term != term {
                return Err(ErrorCode::NOT_LEADER_OR_FOLLOWER.into());
            }
            listener.await;
        }
    }
}

fn push_inflight(inflight: &mut HashMap<i64, VecDeque<Inflight>>, h: &BatchHeader) {
    let q = inflight.entry(h.producer_id).or_default();
    q.push_back(Inflight {
        epoch: h.producer_epoch,
        first_sequence: h.base_sequence,
        last_sequence: h.last_sequence(),
        base: h.base_offset.0,
        end: h.last_offset().0 + 1,
    });
    while q.len() > 5 {
        q.pop_front();
    }
}
