//! Shards: one pinned glommio executor per core in the core mapping. Each partition is owned by
//! exactly one shard ([`owner_of_partition`]); a shard that accepted a request for a partition it
//! does not own sends the work to the owner as a typed [`Request`] over glommio's channel mesh
//! (bounded, lock-free SPSC queues) and awaits the [`Reply`]. Nothing here takes a lock: per-shard
//! state is `RefCell`/`Cell` on the shard's own thread; what crosses shards is moved, or shared
//! immutably.
//!
//! The controller role of a single node (changing the topic table, allocating producer ids) lives
//! on shard 0, which persists the table and hands every shard a snapshot before answering.

pub mod cluster;
pub mod controller;
pub mod owned;
pub mod shutdown;
pub mod startup;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use bytes::{Bytes, BytesMut};
use futures_channel::oneshot;
use glommio::channels::channel_mesh::{Receivers, Senders};

use crate::cluster::{Topic, TopicTable};
use crate::config::{BrokerConfig, LogConfig, ServeOptions};
use crate::group::{GroupCall, GroupCoordinator, GroupReply, OFFSETS_TOPIC};
use crate::metrics::MetricsHub;
use crate::model::{ErrorCode, Offset, ShardId, TopicPartition};
use crate::replication::group::Quorum;
use crate::storage::txn::Outcome;
use crate::storage::{AppendError, Appended, Origin, PartitionFacts, PartitionLog, ReadResult};
use crate::txn::{TxnCall, TxnCoordinator, TxnReply, TRANSACTION_TOPIC};

/// Messages queued per direction between two shards before a sender waits.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;

fn topic_hash(topic: &str) -> u64 {
    u64::from(crc32c::crc32c(topic.as_bytes()))
}

fn spread(topic_hash: u64, partition: i32, shard_count: usize) -> ShardId {
    let p = u64::try_from(partition).unwrap_or(0);
    ShardId(((topic_hash + p) % shard_count.max(1) as u64) as usize)
}

/// The shard that owns `tp` among `shard_count`. Consecutive partitions of a topic land on
/// consecutive shards.
pub fn owner_of_partition(tp: &TopicPartition, shard_count: usize) -> ShardId {
    TopicOwners::new(&tp.topic, shard_count).owner(tp.partition.0)
}

/// The owners of one topic's partitions, the topic's name hashed once (a Fetch or Produce names
/// many partitions of a topic).
pub struct TopicOwners {
    /// None: the metadata topic, whose group feeds the controller on shard 0.
    hash: Option<u64>,
    shard_count: usize,
}

impl TopicOwners {
    pub fn new(topic: &str, shard_count: usize) -> TopicOwners {
        let metadata = topic == crate::cluster::metadata::METADATA_TOPIC;
        TopicOwners {
            hash: (!metadata).then(|| topic_hash(topic)),
            shard_count,
        }
    }

    pub fn owner(&self, partition: i32) -> ShardId {
        match self.hash {
            Some(hash) => spread(hash, partition, self.shard_count),
            None => ShardId(0),
        }
    }
}

/// A topic to create, as CreateTopics or auto-creation asks for it.
#[derive(Clone, Debug)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication_factor: i16,
    pub configs: Vec<(String, String)>,
}

/// Work sent to the shard that owns it.
pub enum Request {
    /// A Produce request's batches for the partitions this shard owns, one entry per partition;
    /// the reply (one result each, in order) comes once all are written (`acks=1`) or durable
    /// (`acks=all`). One call per owner and request, not one per partition: a request spread
    /// over 1,000 partitions costs each owner one message, not hundreds.
    Append {
        /// Each partition's records, which the append assigns offsets in place.
        batches: Vec<(TopicPartition, BytesMut)>,
        acks: i16,
        /// The producer's transactional id: a transaction's first batch to a partition is
        /// checked with its coordinator (KIP-890).
        transactional_id: Option<Arc<str>>,
    },
    /// A Fetch round's reads of the partitions this shard owns: one request per owner.
    Read(Vec<PartitionRead>),
    /// Replies once any listed partition's high watermark (for `committed` readers, its last
    /// stable offset) passes its offset, or after the timeout.
    WaitForData {
        positions: Vec<(TopicPartition, Offset)>,
        timeout_ms: u64,
        committed: bool,
        /// Set by the fetch once another owner ended its wait.
        over: WaitOver,
    },
    /// An incremental fetch session's partitions here: replies with the reads of those that
    /// have news for the session (see [`Shard::probe_local`]), once any has data past its `seen`
    /// offset (or an error), or after the timeout (0: at once).
    Probe {
        probes: Arc<[PartitionProbe]>,
        timeout_ms: u64,
        over: WaitOver,
    },
    ListOffset {
        tp: TopicPartition,
        timestamp: i64,
        current_leader_epoch: i32,
        /// `read_committed`: the latest offset is the last stable offset.
        committed: bool,
    },
    /// Install a new topic table snapshot: open partitions this shard owns, drop deleted ones.
    ApplyTopics(Arc<TopicTable>),
    /// Controller (shard 0) operations.
    CreateTopics {
        specs: Vec<TopicSpec>,
        validate_only: bool,
    },
    DeleteTopics(Vec<String>),
    AllocateProducerId,
    /// A consumer-group request for a group this shard coordinates.
    Group(Box<GroupCall>),
    /// Controller: change topic or broker configs.
    AlterConfigs {
        changes: Vec<controller::ConfigChange>,
        validate_only: bool,
    },
    /// Controller: grow topics to new partition counts.
    /// AlterPartitionReassignments at the controller: (topic, partition, target or cancel).
    Reassign {
        items: Vec<(String, i32, Option<Vec<i32>>)>,
        allow_rf_change: bool,
    },
    CreatePartitions {
        topics: Vec<(String, i32)>,
        validate_only: bool,
    },
    /// Move a partition's log start offset (DeleteRecords); -1 means the high watermark.
    DeleteRecords {
        tp: TopicPartition,
        offset: i64,
    },
    /// Sizes, offsets and producers of partitions this shard owns (None: not here).
    Facts(Vec<TopicPartition>),
    /// The Raft state of groups this shard owns (DescribeQuorum).
    Quorum(Vec<TopicPartition>),
    /// Raft messages from other brokers for groups this shard owns.
    Raft(Vec<(TopicPartition, raft::eraftpb::Message)>),
    /// A Raft group on this broker has a new leader (or none: -1).
    Leader {
        tp: TopicPartition,
        leader: i32,
        epoch: i32,
    },
    /// Metadata commands for shard 0 to propose to the controller (ISR changes).
    Propose(Vec<crate::cluster::metadata::MetadataCommand>),
    /// A transaction request for an id this shard coordinates.
    Txn(Box<TxnCall>),
    /// A transaction marker for a partition this shard owns (from a transaction coordinator).
    WriteMarker {
        tp: TopicPartition,
        producer_id: i64,
        producer_epoch: i16,
        outcome: Outcome,
        coordinator_epoch: i32,
    },
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Append { .. } => "Append",
            Request::Read(_) => "Read",
            Request::WaitForData { .. } => "WaitForData",
            Request::Probe { .. } => "Probe",
            Request::ListOffset { .. } => "ListOffset",
            Request::ApplyTopics(_) => "ApplyTopics",
            Request::CreateTopics { .. } => "CreateTopics",
            Request::DeleteTopics(_) => "DeleteTopics",
            Request::AllocateProducerId => "AllocateProducerId",
            Request::Group(_) => "Group",
            Request::AlterConfigs { .. } => "AlterConfigs",
            Request::CreatePartitions { .. } => "CreatePartitions",
            Request::Reassign { .. } => "Reassign",
            Request::DeleteRecords { .. } => "DeleteRecords",
            Request::Facts(_) => "Facts",
            Request::Quorum(_) => "Quorum",
            Request::Raft(_) => "Raft",
            Request::Leader { .. } => "Leader",
            Request::Propose(_) => "Propose",
            Request::Txn(_) => "Txn",
            Request::WriteMarker { .. } => "WriteMarker",
        }
    }
}

/// One partition read of a Fetch round.
#[derive(Debug)]
pub struct PartitionRead {
    pub tp: TopicPartition,
    pub offset: Offset,
    pub max_bytes: usize,
    /// The leader epoch the client believes current (-1: unchecked), KIP-320.
    pub current_leader_epoch: i32,
    /// `read_committed`: up to the last stable offset.
    pub committed: bool,
}

/// Shared by the owners a fetch waits on: the first to answer ends the others' waits.
#[derive(Debug, Clone, Default)]
pub struct WaitOver(Arc<std::sync::atomic::AtomicBool>);

impl WaitOver {
    pub fn end(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn is_over(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Waits for the first of a fetch's waits on several shards to finish, then ends the others
/// (they stop rechecking their partitions at the next progress instead of at their timeout): the
/// index of the one that finished, and its output.
pub async fn first_of<F: Future + Unpin>(waits: &mut [F], over: &WaitOver) -> (usize, F::Output) {
    let first = futures_lite::future::poll_fn(|cx| {
        for (k, w) in waits.iter_mut().enumerate() {
            if let std::task::Poll::Ready(out) = std::pin::Pin::new(w).poll(cx) {
                return std::task::Poll::Ready((k, out));
            }
        }
        std::task::Poll::Pending
    })
    .await;
    over.end();
    first
}

/// One partition of an incremental fetch session, as [`Shard::probe_local`] checks it.
#[derive(Debug)]
pub struct PartitionProbe {
    pub tp: TopicPartition,
    /// The session's position in the partition.
    pub offset: Offset,
    /// Data past this offset ends the wait: the position, or the end the fetch already read.
    pub seen: Offset,
    pub max_bytes: usize,
    pub current_leader_epoch: i32,
    pub committed: bool,
    /// High watermark, last stable offset and log start the session last sent.
    pub sent: Option<(i64, i64, i64)>,
}

impl Shard {
    /// Reads those of an incremental fetch session's partitions here that have news: records at
    /// the session's position, an error (no such partition here, a fenced epoch, a position out
    /// of range), or offsets other than those last sent. A read of any other one would return
    /// nothing the incremental response includes, so only these are read: a session of 1,000
    /// quiet partitions costs one comparison each, not a read. With a timeout, waits first until
    /// one has data past its `seen` offset or an error. Returns the indices of the probes read,
    /// with their reads.
    pub async fn probe_local(
        &self,
        probes: &[PartitionProbe],
        timeout_ms: u64,
        over: &WaitOver,
    ) -> (Vec<usize>, Vec<Result<ReadResult, ErrorCode>>) {
        let logs: Vec<Result<PartitionLog, ()>> = {
            let owned = self.partitions.borrow();
            let mut topic: Option<(&Arc<str>, Option<&owned::TopicLogs<PartitionLog>>)> = None;
            probes
                .iter()
                .map(|p| {
                    let same =
                        topic.is_some_and(|(t, _)| Arc::ptr_eq(t, &p.tp.topic) || *t == p.tp.topic);
                    if !same {
                        topic = Some((&p.tp.topic, owned.topic(&p.tp.topic)));
                    }
                    topic
                        .and_then(|(_, logs)| logs)
                        .and_then(|logs| owned::OwnedPartitions::in_topic(logs, p.tp.partition))
                        .filter(|log| {
                            self.check_leader_epoch(&p.tp, log, p.current_leader_epoch)
                                .is_ok()
                        })
                        .cloned()
                        .ok_or(())
                })
                .collect()
        };
        self.wait_for_progress(timeout_ms, over, || {
            probes.iter().zip(&logs).any(|(p, log)| match log {
                Ok(log) => log.visible_past(p.seen, p.committed) || log.out_of_range(p.offset),
                Err(()) => true,
            })
        })
        .await;
        let news: Vec<usize> = probes
            .iter()
            .zip(&logs)
            .enumerate()
            .filter(|(_, (p, log))| match log {
                Ok(log) => log.has_news(p.offset, p.committed, p.sent),
                Err(()) => true,
            })
            .map(|(i, _)| i)
            .collect();
        drop(logs);
        let reads = news
            .iter()
            .map(|i| &probes[*i])
            .map(|p| PartitionRead {
                tp: p.tp.clone(),
                offset: p.offset,
                max_bytes: p.max_bytes,
                current_leader_epoch: p.current_leader_epoch,
                committed: p.committed,
            })
            .collect();
        (news, self.read_local(reads).await)
    }

    /// Waits up to `timeout_ms` until `ready` holds, rechecking it each time a partition here
    /// moves its high watermark (one listener for all of a fetch's partitions, not one each), or
    /// until the fetch says the wait is over (another owner ended it), so that a wait nobody
    /// awaits does not recheck its partitions on every move until its timeout.
    async fn wait_for_progress(&self, timeout_ms: u64, over: &WaitOver, ready: impl Fn() -> bool) {
        if timeout_ms == 0 {
            return;
        }
        let wait = async {
            loop {
                let listener = self.data_progress.listen();
                if over.is_over() || ready() {
                    return;
                }
                listener.await;
            }
        };
        let _ = glommio::timer::timeout(Duration::from_millis(timeout_ms), async {
            wait.await;
            Ok(())
        })
        .await;
    }

    /// Reads partitions this shard owns, in order. What memory can answer (a partition with
    /// nothing new, or its recent batches) is answered at once; only reads that go to disk run
    /// as futures, concurrently. A consumer of 1,000 partitions thus costs a lookup and a check
    /// per partition, not a future each.
    pub async fn read_local(
        &self,
        reads: Vec<PartitionRead>,
    ) -> Vec<Result<ReadResult, ErrorCode>> {
        let mut out: Vec<Option<Result<ReadResult, ErrorCode>>> = Vec::with_capacity(reads.len());
        let mut from_disk = Vec::new();
        {
            let owned = self.partitions.borrow();
            // The topic of the previous read and its partitions here: reads come grouped by
            // topic, so a topic is looked up once per run of its partitions.
            let mut topic: Option<(&Arc<str>, Option<&owned::TopicLogs<PartitionLog>>)> = None;
            for (i, r) in reads.iter().enumerate() {
                let same =
                    topic.is_some_and(|(t, _)| Arc::ptr_eq(t, &r.tp.topic) || *t == r.tp.topic);
                if !same {
                    topic = Some((&r.tp.topic, owned.topic(&r.tp.topic)));
                }
                let log = topic
                    .and_then(|(_, logs)| logs)
                    .and_then(|logs| owned::OwnedPartitions::in_topic(logs, r.tp.partition));
                let answer = match log {
                    None => Some(Err(self.missing_partition_error(&r.tp))),
                    Some(log) => {
                        match self.check_leader_epoch(&r.tp, log, r.current_leader_epoch) {
                            Err(code) => Some(Err(code)),
                            Ok(()) => {
                                let now = log.read_from_memory(r.offset, r.max_bytes, r.committed);
                                if now.is_none() {
                                    from_disk.push((i, log.clone()));
                                }
                                now
                            }
                        }
                    }
                };
                out.push(answer);
            }
        }
        if !from_disk.is_empty() {
            let reads = &reads;
            let done = join_all(
                from_disk
                    .iter()
                    .map(|(i, log)| {
                        let r = &reads[*i];
                        log.read(r.offset, r.max_bytes, r.committed)
                    })
                    .collect(),
            )
            .await;
            for ((i, _), result) in from_disk.iter().zip(done) {
                out[*i] = Some(result);
            }
        }
        out.into_iter()
            .map(|r| r.unwrap_or(Err(ErrorCode::UNKNOWN_SERVER_ERROR)))
            .collect()
    }

    /// KIP-320 and leadership: in a cluster only the leader serves reads; a client naming a
    /// leader epoch older than the partition's is fenced, one newer than this broker knows is
    /// ahead of its metadata. -1 skips the epoch check.
    fn check_leader_epoch(
        &self,
        tp: &TopicPartition,
        log: &PartitionLog,
        current: i32,
    ) -> Result<(), ErrorCode> {
        let ours = match self.cluster().and_then(|c| c.group(tp)) {
            Some(group) => {
                if !group.role().leader {
                    return Err(ErrorCode::NOT_LEADER_OR_FOLLOWER);
                }
                group.leader_epoch()
            }
            None => crate::storage::partition::leader_epoch(log).0,
        };
        epoch_check(ours, current)
    }

    /// The error for a partition this shard does not have: in a cluster, an existing partition
    /// held by other brokers is `NOT_LEADER_OR_FOLLOWER` (the client refreshes its metadata).
    fn missing_partition_error(&self, tp: &TopicPartition) -> ErrorCode {
        let exists = self
            .topics()
            .get(&tp.topic)
            .is_some_and(|t| tp.partition.0 >= 0 && tp.partition.0 < t.partitions);
        if self.cluster.is_some() && exists {
            ErrorCode::NOT_LEADER_OR_FOLLOWER
        } else {
            ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
        }
    }
}

fn epoch_check(ours: i32, current: i32) -> Result<(), ErrorCode> {
    match current {
        c if c < 0 || c == ours => Ok(()),
        c if c < ours => Err(ErrorCode::FENCED_LEADER_EPOCH),
        _ => Err(ErrorCode::UNKNOWN_LEADER_EPOCH),
    }
}

/// A client connection counted on its shard; closing it wakes a draining shutdown.
pub struct ConnectionGuard(Rc<Shard>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let shard = &self.0;
        shard
            .connections
            .set(shard.connections.get().saturating_sub(1));
        shard.stop_progress.notify(usize::MAX);
    }
}

impl Shard {
    /// Facts of any partitions, asked of the shards that own them.
    pub async fn partition_facts(
        self: &Rc<Self>,
        tps: Vec<TopicPartition>,
    ) -> HashMap<TopicPartition, PartitionFacts> {
        self.ask_owners(tps, Request::Facts, |reply| match reply {
            Reply::Facts(list) => list
                .into_iter()
                .filter_map(|(tp, f)| f.map(|f| (tp, f)))
                .collect(),
            _ => Vec::new(),
        })
        .await
    }

    /// Asks the shards that own `tps` about them, each shard once for all of its partitions:
    /// `request` builds one shard's request, `answers` takes its reply apart.
    pub async fn ask_owners<T>(
        self: &Rc<Self>,
        tps: Vec<TopicPartition>,
        request: impl Fn(Vec<TopicPartition>) -> Request,
        answers: impl Fn(Reply) -> Vec<(TopicPartition, T)>,
    ) -> HashMap<TopicPartition, T> {
        let mut by_owner: HashMap<ShardId, Vec<TopicPartition>> = HashMap::new();
        for tp in tps {
            by_owner.entry(self.owner_of(&tp)).or_default().push(tp);
        }
        let calls: Vec<_> = by_owner
            .into_iter()
            .map(|(owner, tps)| self.call(owner, request(tps)))
            .collect();
        join_all(calls)
            .await
            .into_iter()
            .flat_map(answers)
            .collect()
    }
}

pub type TopicResult = Result<Topic, (ErrorCode, String)>;

pub enum Reply {
    Append(Vec<Result<Appended, AppendError>>),
    Read(Vec<Result<ReadResult, ErrorCode>>),
    DataReady,
    /// The probes with news (their indices) and their reads.
    Probed(Vec<usize>, Vec<Result<ReadResult, ErrorCode>>),
    ListOffset(Result<Option<(Offset, i64)>, ErrorCode>),
    /// The partitions that failed to open, with why.
    Applied(Vec<(TopicPartition, String)>),
    Created(Vec<(String, TopicResult)>),
    Deleted(Vec<(String, ErrorCode)>),
    ProducerId(Result<i64, ErrorCode>),
    Group(Box<GroupReply>),
    /// Per change or topic: the error and its message.
    Altered(Vec<(ErrorCode, Option<String>)>),
    /// DeleteRecords: the new log start offset.
    LowWatermark(Result<Offset, ErrorCode>),
    Facts(Vec<(TopicPartition, Option<PartitionFacts>)>),
    /// Per group: its Raft state if this broker leads it; NOT_LEADER_OR_FOLLOWER if it holds a
    /// replica that follows; UNKNOWN_TOPIC_OR_PARTITION if it holds none.
    Quorum(Vec<(TopicPartition, Result<Quorum, ErrorCode>)>),
    Txn(Box<TxnReply>),
    Marker(ErrorCode),
    Done,
}

pub enum Envelope {
    Request { id: u64, from: usize, req: Request },
    Reply { id: u64, reply: Reply },
}

/// One shard's state. Lives on its executor thread only (`Rc`).
pub struct Shard {
    pub id: ShardId,
    pub count: usize,
    pub options: ServeOptions,
    /// The host and port Metadata advertises.
    pub advertised: (String, u16),
    topics: RefCell<Arc<TopicTable>>,
    /// Topic ids of the current table, for requests that name topics by id (Fetch v13+).
    topic_ids: RefCell<Rc<HashMap<[u8; 16], Arc<str>>>>,
    /// Static settings with the dynamic broker configs of the current table applied.
    effective: RefCell<Rc<BrokerConfig>>,
    partitions: RefCell<owned::OwnedPartitions<PartitionLog>>,
    /// Connections to other brokers' client listeners, kept between requests.
    pub peer_connections: crate::handlers::forward::PeerConnections,
    senders: Senders<Envelope>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<Reply>>>,
    next_call_id: Cell<u64>,
    ready: RefCell<Option<oneshot::Sender<()>>>,
    pub controller: controller::Controller,
    pub groups: GroupCoordinator,
    pub txns: Rc<TxnCoordinator>,
    pub metrics: Arc<MetricsHub>,
    /// Set once a clean shutdown began: stop accepting, stop reading new requests.
    stopping: Cell<bool>,
    /// Notified when `stopping` is set and whenever a connection closes.
    stop_progress: event_listener::Event,
    /// Client connections open on this shard.
    connections: Cell<usize>,
    /// Notified whenever a partition of this shard progresses (its high watermark or durable
    /// offset moves, or it fails or closes): what a Fetch waiting on many of them listens to.
    data_progress: Rc<event_listener::Event>,
    /// Incremental fetch sessions of this shard's connections (KIP-227).
    pub fetch_sessions: crate::handlers::fetch_session::FetchSessions,
    /// Set when this broker is part of a cluster (`controller.quorum.voters`).
    cluster: Option<cluster::ClusterNode>,
    /// This shard's durability journal (`None` with `strom.journal.files=0`).
    journal: Option<crate::storage::journal::Journal>,
    /// What the journals held after a crash for this shard's partitions, applied as each opens.
    recovered: RefCell<crate::storage::journal::Recovered>,
}

impl Shard {
    /// Joins the mesh and starts serving mesh traffic. Returns once this shard has its first topic
    /// table and its partitions are open.
    pub async fn start(
        options: ServeOptions,
        advertised: (String, u16),
        senders: Senders<Envelope>,
        receivers: Receivers<Envelope>,
        metrics: Arc<MetricsHub>,
        peer_socket: Option<socket2::Socket>,
    ) -> Result<Rc<Shard>> {
        let id = ShardId(senders.peer_id());
        let count = senders.nr_consumers();
        let (ready_tx, ready_rx) = oneshot::channel();
        let fetch_session_slots = options.broker.fetch_session_slots;
        let cluster = (!options.broker.quorum_voters.is_empty()).then(|| {
            cluster::ClusterNode::start(
                options.broker.node_id,
                options.broker.quorum_voters.clone(),
                options.broker.inter_broker_listen.as_ref(),
            )
        });
        let recovered = if options.clean_start {
            crate::storage::journal::Recovered::default()
        } else {
            crate::storage::journal::recover(&options.data_dir, |tp| {
                owner_of_partition(tp, count) == id
            })
            .await?
        };
        let journal = crate::storage::journal::Journal::start(
            &options.data_dir,
            id.0,
            options.broker.journal_files,
            options.broker.journal_file_bytes,
            options.broker.journal_bypass_bytes,
        )
        .await?;
        let shard = Rc::new(Shard {
            journal,
            recovered: RefCell::new(recovered),
            id,
            count,
            advertised,
            topics: RefCell::new(Arc::new(TopicTable::default())),
            topic_ids: RefCell::new(Rc::new(HashMap::new())),
            effective: RefCell::new(Rc::new(options.broker.clone())),
            partitions: RefCell::new(owned::OwnedPartitions::default()),
            peer_connections: Default::default(),
            senders,
            waiting: RefCell::new(HashMap::new()),
            next_call_id: Cell::new(1),
            ready: RefCell::new(Some(ready_tx)),
            controller: controller::Controller::new(),
            groups: GroupCoordinator::new(options.broker.clone()),
            txns: TxnCoordinator::new(options.broker.clone()),
            metrics,
            options,
            stopping: Cell::new(false),
            stop_progress: event_listener::Event::new(),
            connections: Cell::new(0),
            data_progress: Rc::new(event_listener::Event::new()),
            fetch_sessions: crate::handlers::fetch_session::FetchSessions::new(
                id.0,
                count,
                fetch_session_slots,
            ),
            cluster,
        });
        let mut receivers = receivers;
        for (peer, stream) in receivers.streams() {
            let shard = shard.clone();
            glommio::spawn_local(async move {
                while let Some(envelope) = stream.recv().await {
                    shard.clone().on_envelope(envelope);
                }
                tracing::debug!(shard = shard.id.0, peer, "mesh stream closed");
            })
            .detach();
        }
        GroupCoordinator::start_ticker(&shard);
        TxnCoordinator::start_ticker(&shard);
        start_log_cleaner(&shard);
        start_metrics_publisher(&shard);
        start_lateness_probe(&shard);
        // Raft traffic flows before the table is loaded: a broker joining the cluster receives
        // the metadata log this way.
        if let Some(socket) = peer_socket {
            shard.serve_peers(socket);
        }
        if id.0 == 0 {
            shard.controller.load(&shard).await?;
        }
        ready_rx
            .await
            .map_err(|_| anyhow::anyhow!("shard {} never received the topic table", id.0))?;
        Ok(shard)
    }

    fn on_envelope(self: Rc<Self>, envelope: Envelope) {
        match envelope {
            Envelope::Request { id, from, req } => {
                glommio::spawn_local(async move {
                    let reply = self.handle(req).await;
                    if self
                        .senders
                        .send_to(from, Envelope::Reply { id, reply })
                        .await
                        .is_err()
                    {
                        tracing::error!(
                            shard = self.id.0,
                            to = from,
                            "mesh reply could not be sent"
                        );
                    }
                })
                .detach();
            }
            Envelope::Reply { id, reply } => {
                if let Some(tx) = self.waiting.borrow_mut().remove(&id) {
                    let _ = tx.send(reply);
                }
            }
        }
    }

    /// Runs `req` on shard `target`: directly when that is this shard, else over the mesh.
    pub async fn call(self: &Rc<Self>, target: ShardId, req: Request) -> Reply {
        match self.try_call(target, req).await {
            Some(reply) => reply,
            None => panic!("shard {} is unreachable over the mesh", target.0),
        }
    }

    /// [`Shard::call`] for background work that may still run while the shards stop: `None`
    /// when the target shard is gone instead of a panic.
    pub async fn try_call(self: &Rc<Self>, target: ShardId, req: Request) -> Option<Reply> {
        if target == self.id {
            return Some(self.handle(req).await);
        }
        tracing::debug!(
            from = self.id.0,
            to = target.0,
            kind = req.kind(),
            "cross-shard request"
        );
        crate::metrics::add(crate::metrics::Counter::CrossShardRequests, 1);
        let id = self.next_call_id.get();
        self.next_call_id.set(id + 1);
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(id, tx);
        let envelope = Envelope::Request {
            id,
            from: self.id.0,
            req,
        };
        if self.senders.send_to(target.0, envelope).await.is_err() {
            self.waiting.borrow_mut().remove(&id);
            return None;
        }
        rx.await.ok()
    }

    /// Begins a clean shutdown on this shard (see [`shutdown`]).
    pub fn begin_stop(&self) {
        self.stopping.set(true);
        self.stop_progress.notify(usize::MAX);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.get()
    }

    /// Completes once this shard is stopping.
    pub async fn stopped(&self) {
        loop {
            let listener = self.stop_progress.listen();
            if self.stopping.get() {
                return;
            }
            listener.await;
        }
    }

    /// Counts a client connection until the guard is dropped.
    pub fn connection_opened(self: &Rc<Self>) -> ConnectionGuard {
        self.connections.set(self.connections.get() + 1);
        ConnectionGuard(self.clone())
    }

    /// Waits until every client connection has closed, or `grace` passed; returns how many are
    /// still open.
    async fn drain_connections(&self, grace: Duration) -> usize {
        let deadline = glommio::timer::sleep(grace);
        let drained = async {
            loop {
                let listener = self.stop_progress.listen();
                if self.connections.get() == 0 {
                    return;
                }
                listener.await;
            }
        };
        futures_lite::future::or(drained, deadline).await;
        self.connections.get()
    }

    /// The partitions this shard owns.
    fn owned_partitions(&self) -> Vec<(TopicPartition, PartitionLog)> {
        self.partitions
            .borrow()
            .iter()
            .map(|(tp, log)| (tp, log.clone()))
            .collect()
    }

    pub fn owner_of(&self, tp: &TopicPartition) -> ShardId {
        owner_of_partition(tp, self.count)
    }

    pub fn topics(&self) -> Arc<TopicTable> {
        self.topics.borrow().clone()
    }

    /// The name of the topic with this id, if it exists.
    pub fn topic_by_id(&self, id: &uuid::Uuid) -> Option<Arc<str>> {
        self.topic_ids.borrow().get(id.as_bytes()).cloned()
    }

    /// The broker settings in force: static ones with dynamic changes applied.
    pub fn config(&self) -> Rc<BrokerConfig> {
        self.effective.borrow().clone()
    }

    /// Handles work for a partition or table this shard owns.
    async fn handle(self: &Rc<Self>, req: Request) -> Reply {
        match req {
            Request::Append {
                batches,
                acks,
                transactional_id,
            } => {
                let appends = batches
                    .into_iter()
                    .map(|(tp, records)| {
                        self.append_local(tp, records, acks, transactional_id.as_deref())
                    })
                    .collect();
                Reply::Append(join_all(appends).await)
            }
            Request::Read(reads) => Reply::Read(self.read_local(reads).await),
            Request::Probe {
                probes,
                timeout_ms,
                over,
            } => {
                let (news, reads) = self.probe_local(&probes, timeout_ms, &over).await;
                Reply::Probed(news, reads)
            }
            Request::WaitForData {
                positions,
                timeout_ms,
                committed,
                over,
            } => {
                let waits: Vec<_> = positions
                    .into_iter()
                    .filter_map(|(tp, offset)| self.partition(&tp).map(|log| (log, offset)))
                    .collect();
                self.wait_for_progress(timeout_ms, &over, || {
                    waits
                        .iter()
                        .any(|(log, offset)| log.visible_past(*offset, committed))
                })
                .await;
                Reply::DataReady
            }
            Request::ListOffset {
                tp,
                timestamp,
                current_leader_epoch,
                committed,
            } => {
                let Some(log) = self.partition(&tp) else {
                    return Reply::ListOffset(Err(self.missing_partition_error(&tp)));
                };
                if let Err(code) = self.check_leader_epoch(&tp, &log, current_leader_epoch) {
                    return Reply::ListOffset(Err(code));
                }
                let result = match timestamp {
                    -1 if committed => Ok(Some((log.last_stable_offset(), -1))),
                    -1 => Ok(Some((log.high_watermark(), -1))),
                    // -4: earliest local offset (KIP-405); without tiered storage, the log start.
                    -2 | -4 => Ok(Some((log.log_start_offset(), -1))),
                    // -5: latest offset in tiered storage (KIP-1005): there is none.
                    -5 => Ok(Some((crate::model::Offset(-1), -1))),
                    -3 => log.max_timestamp_offset().await,
                    ts => log.offset_for_timestamp(ts).await,
                };
                Reply::ListOffset(result.map_err(|e| {
                    tracing::error!(partition = %tp, error = %format!("{e:#}"), "ListOffsets failed");
                    ErrorCode::KAFKA_STORAGE_ERROR
                }))
            }
            Request::ApplyTopics(table) => Reply::Applied(self.apply_topics(table).await),
            Request::CreateTopics {
                specs,
                validate_only,
            } => Reply::Created(
                self.controller
                    .create_topics(self, specs, validate_only)
                    .await,
            ),
            Request::DeleteTopics(names) => {
                Reply::Deleted(self.controller.delete_topics(self, names).await)
            }
            Request::AllocateProducerId => {
                Reply::ProducerId(self.controller.allocate_producer_id(self).await)
            }
            Request::Group(call) => Reply::Group(Box::new(self.groups.handle(self, *call).await)),
            Request::Txn(call) => {
                let coordinator = self.txns.clone();
                // Boxed: the coordinator calls other shards, whose handling includes this.
                let handled: std::pin::Pin<Box<dyn std::future::Future<Output = TxnReply> + '_>> =
                    Box::pin(async move { coordinator.handle(self, *call).await });
                Reply::Txn(Box::new(handled.await))
            }
            Request::WriteMarker {
                tp,
                producer_id,
                producer_epoch,
                outcome,
                coordinator_epoch,
            } => Reply::Marker(
                self.write_marker(&tp, producer_id, producer_epoch, outcome, coordinator_epoch)
                    .await,
            ),
            Request::AlterConfigs {
                changes,
                validate_only,
            } => Reply::Altered(
                self.controller
                    .alter_configs(self, changes, validate_only)
                    .await,
            ),
            Request::Reassign {
                items,
                allow_rf_change,
            } => Reply::Altered(self.controller.reassign(self, items, allow_rf_change).await),
            Request::CreatePartitions {
                topics,
                validate_only,
            } => Reply::Altered(
                self.controller
                    .create_partitions(self, topics, validate_only)
                    .await,
            ),
            Request::Facts(tps) => Reply::Facts(
                tps.into_iter()
                    .map(|tp| {
                        let mut facts = self.partition(&tp).map(|l| l.facts());
                        if let (Some(f), Some(g)) =
                            (facts.as_mut(), self.cluster().and_then(|c| c.group(&tp)))
                        {
                            f.leader_epoch = g.leader_epoch();
                            f.leading = g.role().leader;
                        }
                        (tp, facts)
                    })
                    .collect(),
            ),
            Request::Quorum(tps) => Reply::Quorum(
                tps.into_iter()
                    .map(|tp| {
                        let answer = match self.cluster().and_then(|c| c.group(&tp)) {
                            None => Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION),
                            Some(g) => g.quorum().ok_or(ErrorCode::NOT_LEADER_OR_FOLLOWER),
                        };
                        (tp, answer)
                    })
                    .collect(),
            ),
            Request::Raft(messages) => {
                self.deliver_raft(messages);
                Reply::Done
            }
            Request::Leader { tp, leader, epoch } => {
                self.record_leader(tp, leader, epoch);
                Reply::Done
            }
            Request::Propose(commands) => {
                for cmd in &commands {
                    self.controller.propose_once(self, cmd);
                }
                Reply::Done
            }
            Request::DeleteRecords { tp, offset } => match self.partition(&tp) {
                Some(log) => Reply::LowWatermark(log.delete_records(offset).await),
                None => Reply::LowWatermark(Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION)),
            },
        }
    }

    /// Whether this broker holds a replica of partition `p` of `topic` (always, on a single node):
    /// it is one of the replicas or of a reassignment's targets.
    fn holds_replica(&self, table: &TopicTable, topic: &Topic, p: i32) -> bool {
        match self.cluster() {
            None => true,
            Some(c) => {
                usize::try_from(p)
                    .ok()
                    .and_then(|p| topic.replicas.get(p))
                    .is_some_and(|r| r.contains(&c.node_id))
                    || table
                        .reassigning
                        .get(&(topic.name.to_string(), p))
                        .is_some_and(|t| t.contains(&c.node_id))
            }
        }
    }

    async fn open_replica_group(
        self: &Rc<Self>,
        tp: &TopicPartition,
        table: &TopicTable,
        log: &PartitionLog,
    ) -> Result<()> {
        // A replica being added by a reassignment starts without a membership: its log begins
        // with the snapshot the leader sends (which carries the membership).
        let me = self.cluster().map_or(-1, |c| c.node_id);
        let replicas: Vec<u64> = table
            .replicas_of(&tp.topic, tp.partition.0)
            .filter(|r| r.contains(&me))
            .map(|r| r.iter().filter_map(|id| u64::try_from(*id).ok()).collect())
            .unwrap_or_default();
        let dir = self.options.data_dir.join(tp.dir_name());
        let end = log.log_end_offset().0;
        let preferred = replicas.first().copied();
        let group = self
            .open_group(
                tp.clone(),
                dir,
                replicas,
                crate::replication::group::Sink::Log(log.clone()),
                end,
            )
            .await?;
        if preferred.is_some() && preferred == u64::try_from(me).ok() {
            group.campaign_if_new();
        }
        group.set_copier(self.snapshot_copier(tp.clone()));
        Ok(())
    }

    /// Appends one partition's batches on this shard (its owner); completes once they are
    /// written (`acks=1`, `acks=0`) or durable (`acks=all`).
    async fn append_local(
        self: &Rc<Self>,
        tp: TopicPartition,
        records: BytesMut,
        acks: i16,
        transactional_id: Option<&str>,
    ) -> Result<Appended, AppendError> {
        let Some(log) = self.partition(&tp) else {
            return Err(self.missing_partition_error(&tp).into());
        };
        if let Err(code) = self
            .verify_transaction(&tp, &log, &records, transactional_id)
            .await
        {
            return Err(code.into());
        }
        if let Some(group) = self.cluster().and_then(|c| c.group(&tp)) {
            let min_insync = log.config().min_insync_replicas;
            let appended = group
                .produce(&log, records.freeze(), acks, min_insync, Origin::Client)
                .await;
            if let Ok(a) = &appended {
                crate::metrics::add(
                    crate::metrics::Counter::RecordsProduced,
                    u64::try_from(a.records).unwrap_or(0),
                );
            }
            return appended;
        }
        let durable = acks == -1;
        if durable && log.config().min_insync_replicas > 1 {
            // One replica per partition on a single node: the in-sync set is just this one.
            return Err(ErrorCode::NOT_ENOUGH_REPLICAS.into());
        }
        let appended = match log.append(records, durable, Origin::Client) {
            Ok(a) => a,
            Err(e) => return Err(e),
        };
        crate::metrics::add(
            crate::metrics::Counter::RecordsProduced,
            u64::try_from(appended.records).unwrap_or(0),
        );
        // acks=0 gets no answer, but its request still completes only once the batches
        // are written: the connection's request budget and in-flight limit then hold a
        // producer that outruns the disk, instead of an unbounded queue in memory.
        log.wait_for(appended.end_offset, durable)
            .await
            .map(|()| appended)
            .map_err(AppendError::from)
    }

    pub fn partition(&self, tp: &TopicPartition) -> Option<PartitionLog> {
        self.partitions.borrow().get(tp).cloned()
    }

    /// KIP-890 part 1: a transactional batch that would open a transaction in this partition is
    /// written only if its coordinator has the partition in the producer's transaction (a
    /// producer that skipped AddPartitionsToTxn would otherwise leave a transaction no marker ever
    /// ends, holding the last stable offset back for good).
    async fn verify_transaction(
        self: &Rc<Self>,
        tp: &TopicPartition,
        log: &PartitionLog,
        records: &[u8],
        transactional_id: Option<&str>,
    ) -> Result<(), ErrorCode> {
        let Ok(h) = crate::storage::batch::BatchHeader::parse(records) else {
            return Ok(()); // validation refuses it with the right error
        };
        if !h.is_transactional() || h.is_control() || h.producer_id < 0 {
            return Ok(());
        }
        if log.has_open_transaction(h.producer_id) {
            return Ok(());
        }
        let Some(id) = transactional_id else {
            return Err(ErrorCode::INVALID_TXN_STATE);
        };
        // Boxed: the coordinator is reached through other shards, whose handling includes this.
        let verified: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ErrorCode>>>> =
            Box::pin(crate::handlers::transactions::verify(
                self,
                id,
                h.producer_id,
                h.producer_epoch,
                tp,
            ));
        verified.await
    }

    /// Writes a transaction marker to a partition this shard owns; an offsets partition's group
    /// coordinator then applies or drops the transaction's offsets.
    async fn write_marker(
        self: &Rc<Self>,
        tp: &TopicPartition,
        producer_id: i64,
        producer_epoch: i16,
        outcome: Outcome,
        coordinator_epoch: i32,
    ) -> ErrorCode {
        let Some(log) = self.partition(tp) else {
            return self.missing_partition_error(tp);
        };
        let batch = match crate::storage::txn::marker_batch(
            producer_id,
            producer_epoch,
            outcome,
            coordinator_epoch,
            crate::storage::partition::now_ms() as i64,
        ) {
            Ok(b) => b,
            Err(_) => return ErrorCode::UNKNOWN_SERVER_ERROR,
        };
        match self.write_internal(&log, batch).await {
            Ok(_) => {
                if &*tp.topic == OFFSETS_TOPIC {
                    self.groups.end_txn(producer_id, outcome);
                }
                ErrorCode::NONE
            }
            Err(e) => e.code,
        }
    }

    /// A coordinator's write to a partition this shard owns (group records, transactional
    /// offsets, transaction markers and state): durable before it returns, through the
    /// partition's Raft group in a cluster (`NOT_LEADER_OR_FOLLOWER` where this broker does not
    /// lead it).
    pub async fn write_internal(
        &self,
        log: &PartitionLog,
        batch: Bytes,
    ) -> Result<Appended, AppendError> {
        let tp = log.topic_partition();
        if let Some(replicated) = self.cluster().and_then(|c| c.group(&tp)) {
            return replicated
                .produce(log, batch, -1, 1, Origin::Coordinator)
                .await;
        }
        let appended = log.append(BytesMut::from(batch), true, Origin::Coordinator)?;
        log.wait_for(appended.end_offset, true).await?;
        Ok(appended)
    }

    /// Installs a topic table snapshot: opens the partitions this shard owns that are new, and
    /// closes and deletes the ones whose topic is gone (or was recreated with a new id).
    async fn apply_topics(
        self: &Rc<Self>,
        table: Arc<TopicTable>,
    ) -> Vec<(TopicPartition, String)> {
        let mut failed = Vec::new();
        let mut wanted: HashMap<TopicPartition, (&Topic, [u8; 16])> = HashMap::new();
        for topic in table.topics.values() {
            for p in 0..topic.partitions {
                let tp = TopicPartition {
                    topic: topic.name.clone(),
                    partition: crate::model::PartitionId(p),
                };
                if self.owner_of(&tp) == self.id && self.holds_replica(&table, topic, p) {
                    wanted.insert(tp, (topic, topic.id));
                }
            }
        }
        // A partition is stale when its topic is gone or was recreated (another id): judged by
        // the id the partition itself holds, never by the previous table.
        let stale: Vec<(TopicPartition, PartitionLog)> = self
            .partitions
            .borrow()
            .iter()
            .filter(|(tp, log)| wanted.get(tp).is_none_or(|(_, id)| log.topic_id() != *id))
            .map(|(tp, log)| (tp, log.clone()))
            .collect();
        for (tp, log) in stale {
            tracing::info!(partition = %tp, "the partition's topic is gone or was recreated, or this broker no longer holds a replica: deleting it");
            self.partitions.borrow_mut().remove(&tp);
            if let Some(c) = self.cluster() {
                c.remove_group(&tp);
            }
            if let Err(e) = log.delete().await {
                tracing::error!(partition = %tp, error = %format!("{e:#}"), "deleting partition failed");
            }
        }
        if let Some(c) = self.cluster() {
            c.connect_joined(&table);
        }
        let effective = Rc::new(self.options.broker.with_dynamic(&table.broker_configs));
        *self.effective.borrow_mut() = effective.clone();
        let n_partitions = wanted.len().max(1);
        let cache_each = self.options.broker.cache_bytes_per_shard(self.count) / n_partitions;
        let configs: HashMap<TopicPartition, LogConfig> = wanted
            .iter()
            .map(|(tp, (topic, _))| (tp.clone(), LogConfig::resolve(&effective, &topic.configs)))
            .collect();
        for (tp, (_, id)) in wanted {
            if self.partitions.borrow().contains_key(&tp) {
                continue;
            }
            let dir = self.options.data_dir.join(tp.dir_name());
            let config = configs[&tp].clone();
            match PartitionLog::open(
                tp.clone(),
                dir,
                id,
                config,
                cache_each,
                self.options.clean_start,
            )
            .await
            {
                Ok(log) => {
                    let chunks = self.recovered.borrow_mut().take(&tp, id);
                    if !chunks.is_empty() {
                        if let Err(e) = log.replay_journal(chunks).await {
                            let why = format!("{e:#}");
                            tracing::error!(partition = %tp, error = %why, "applying the journal failed");
                            log.close();
                            failed.push((tp, why));
                            continue;
                        }
                    }
                    if let Some(journal) = &self.journal {
                        log.attach_journal(journal.clone());
                    }
                    if self.cluster.is_some() {
                        if let Err(e) = self.open_replica_group(&tp, &table, &log).await {
                            let why = format!("{e:#}");
                            tracing::error!(partition = %tp, error = %why, "starting replication failed");
                            log.close();
                            failed.push((tp, why));
                            continue;
                        }
                    }
                    // In a cluster the coordinator loads a partition's groups when it leads it.
                    if &*tp.topic == OFFSETS_TOPIC && self.cluster.is_none() {
                        self.groups.load(&log).await;
                    }
                    if &*tp.topic == TRANSACTION_TOPIC && self.cluster.is_none() {
                        self.txns.clone().load(self, &log).await;
                    }
                    log.notify_shard(self.data_progress.clone());
                    self.partitions.borrow_mut().insert(tp, log);
                }
                Err(e) => {
                    let why = format!("{e:#}");
                    tracing::error!(partition = %tp, error = %why, "opening partition failed");
                    failed.push((tp, why));
                }
            }
        }
        for (tp, log) in self.partitions.borrow().iter() {
            log.set_cache_limit(cache_each);
            if let Some(config) = configs.get(&tp) {
                log.set_config(config.clone());
            }
        }
        *self.topic_ids.borrow_mut() = Rc::new(
            table
                .topics
                .values()
                .map(|t| (t.id, t.name.clone()))
                .collect(),
        );
        *self.topics.borrow_mut() = table;
        if let Some(tx) = self.ready.borrow_mut().take() {
            let left = std::mem::take(&mut *self.recovered.borrow_mut());
            if !left.partitions.is_empty() {
                let names: Vec<String> = left.partitions.keys().map(|tp| tp.to_string()).collect();
                tracing::warn!(partitions = ?names, "the journal held batches of partitions this broker no longer has; dropped");
            }
            let _ = tx.send(());
        }
        failed
    }

    /// Sends a new table to every shard (this one included) and waits until all have applied it.
    /// Returns the partitions that failed to open anywhere.
    pub async fn broadcast_topics(
        self: &Rc<Self>,
        table: Arc<TopicTable>,
    ) -> Vec<(TopicPartition, String)> {
        let calls: Vec<_> = (0..self.count)
            .map(|i| self.call(ShardId(i), Request::ApplyTopics(table.clone())))
            .collect();
        join_all(calls)
            .await
            .into_iter()
            .flat_map(|reply| match reply {
                Reply::Applied(failed) => failed,
                _ => Vec::new(),
            })
            .collect()
    }
}

use std::future::Future;

/// Futures [`join_all`] runs at once, so that what a request names cannot start unbounded work.
const JOIN_WINDOW: usize = 256;

/// Awaits every future, at most [`JOIN_WINDOW`] at a time, and returns their results in order.
///
/// Each future gets a waker of its own, and only a future that was woken is polled again (as
/// `FuturesUnordered` does). Polling every pending future on each wake-up handed glommio a fresh
/// clone of the task's waker per poll for each pending I/O, and glommio counts a task's
/// references in an i16: 20,000 partitions named by one Fetch, then 500 partitions' fdatasyncs at
/// shutdown, overflowed it and aborted the shard.
pub async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    use std::sync::Mutex;
    use std::task::{Poll, Wake, Waker};

    #[derive(Default)]
    struct Shared {
        woken: Mutex<Vec<usize>>,
        parent: Mutex<Option<Waker>>,
    }
    struct SlotWaker {
        index: usize,
        shared: Arc<Shared>,
    }
    impl Wake for SlotWaker {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            if let Ok(mut woken) = self.shared.woken.lock() {
                woken.push(self.index);
            }
            if let Ok(parent) = self.shared.parent.lock() {
                if let Some(w) = parent.as_ref() {
                    w.wake_by_ref();
                }
            }
        }
    }

    let n = futs.len();
    let mut pinned: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..n).map(|_| None).collect();
    let shared = Arc::new(Shared::default());
    let wakers: Vec<Waker> = (0..n)
        .map(|index| {
            Waker::from(Arc::new(SlotWaker {
                index,
                shared: shared.clone(),
            }))
        })
        .collect();
    let (mut next, mut active, mut done) = (0usize, 0usize, 0usize);
    futures_lite::future::poll_fn(|cx| {
        if let Ok(mut parent) = shared.parent.lock() {
            if !parent.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *parent = Some(cx.waker().clone());
            }
        }
        let mut to_poll: Vec<usize> = shared
            .woken
            .lock()
            .map(|mut w| std::mem::take(&mut *w))
            .unwrap_or_default();
        loop {
            // Futures that finished made room: the next ones start now, so they register wakers.
            while active < JOIN_WINDOW && next < n {
                to_poll.push(next);
                next += 1;
                active += 1;
            }
            if to_poll.is_empty() {
                break;
            }
            for i in std::mem::take(&mut to_poll) {
                if out.get(i).is_none_or(Option::is_some) {
                    continue;
                }
                let mut slot_cx = std::task::Context::from_waker(&wakers[i]);
                if let Poll::Ready(v) = pinned[i].as_mut().poll(&mut slot_cx) {
                    out[i] = Some(v);
                    active -= 1;
                    done += 1;
                }
            }
            // Wakes that came during these polls wait for the next poll of this task (they woke
            // it already); only newly started futures are polled in this one.
            if active == JOIN_WINDOW || next >= n {
                break;
            }
        }
        if done == n {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future completed"))
        .collect()
}

/// Runs retention and compaction over this shard's partitions in a low-priority task queue, so
/// that produce and fetch latency stays flat while segments are deleted or rewritten.
fn start_log_cleaner(shard: &Rc<Shard>) {
    use glommio::{Latency, Shares};
    let queue = glommio::executor().create_task_queue(
        Shares::Static(25),
        Latency::NotImportant,
        "log-cleaner",
    );
    let weak = Rc::downgrade(shard);
    let task = glommio::spawn_local_into(
        async move {
            let mut last_retention = std::time::Instant::now();
            let mut last_clean = std::time::Instant::now();
            loop {
                let Some(shard) = weak.upgrade() else { return };
                let config = shard.config();
                drop(shard);
                let retention_every = Duration::from_millis(config.retention_check_interval_ms);
                let clean_every = Duration::from_millis(config.cleaner_backoff_ms.max(1));
                glommio::timer::sleep(
                    retention_every
                        .min(clean_every)
                        .max(Duration::from_millis(10)),
                )
                .await;
                let Some(shard) = weak.upgrade() else { return };
                let logs: Vec<PartitionLog> = shard.partitions.borrow().values().cloned().collect();
                drop(shard);
                let now = crate::storage::partition::now_ms();
                if last_retention.elapsed() >= retention_every {
                    last_retention = std::time::Instant::now();
                    for log in &logs {
                        if let Err(e) = log.enforce_retention(now).await {
                            tracing::error!(partition = %log.topic_partition(), error = %format!("{e:#}"), "retention failed");
                        }
                    }
                }
                if last_clean.elapsed() >= clean_every {
                    last_clean = std::time::Instant::now();
                    for log in &logs {
                        if let Err(e) = log.clean(now).await {
                            tracing::error!(partition = %log.topic_partition(), error = %format!("{e:#}"), "compaction failed");
                        }
                    }
                }
            }
        },
        queue,
    );
    match task {
        Ok(t) => {
            t.detach();
        }
        Err(e) => tracing::error!(error = %e, "the log cleaner could not start"),
    }
}

/// Measures how late a timer fires on this shard, every [`crate::metrics::LATENESS_PROBE`]: what
/// any task on the shard waits beyond its own work when the shard's thread is busy elsewhere or
/// not run by the kernel (`strom_shard_lateness_microseconds`). A stall of 50 ms or more is
/// logged, at most once a second.
fn start_lateness_probe(shard: &Rc<Shard>) {
    let weak = Rc::downgrade(shard);
    glommio::spawn_local(async move {
        while weak.strong_count() > 0 {
            let asleep = std::time::Instant::now();
            glommio::timer::sleep(crate::metrics::LATENESS_PROBE).await;
            let late = asleep
                .elapsed()
                .saturating_sub(crate::metrics::LATENESS_PROBE);
            crate::metrics::record_timing(crate::metrics::Timing::ShardLateness, late);
            if late >= Duration::from_millis(50) && crate::metrics::may_warn() {
                tracing::warn!(
                    late_ms = late.as_millis(),
                    "shard stalled: its tasks ran late"
                );
            }
        }
    })
    .detach();
}

/// Copies this shard's metrics into the shared hub once a second; shard 0 also reports the facts
/// `/v1/status` shows.
fn start_metrics_publisher(shard: &Rc<Shard>) {
    let weak = Rc::downgrade(shard);
    glommio::spawn_local(async move {
        loop {
            let Some(shard) = weak.upgrade() else { return };
            let partitions = shard.partitions.borrow().len() as u64;
            let raft = shard.cluster().map(|c| c.gauges()).unwrap_or_default();
            shard.metrics.publish(shard.id.0, partitions, raft);
            if shard.id.0 == 0 {
                let table = shard.topics();
                if let Ok(mut status) = shard.metrics.status.lock() {
                    status.node_id = shard.options.broker.node_id;
                    status.cluster_id = table.cluster_id.clone();
                    status.topics = table.topics.len();
                }
            }
            drop(shard);
            glommio::timer::sleep(Duration::from_secs(1)).await;
        }
    })
    .detach();
}
