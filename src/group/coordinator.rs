//! The per-shard group coordinator: state of every group whose `__consumer_offsets` partition
//! this shard owns. State lives in a `RefCell`; every method mutates synchronously, drops the
//! borrow, and only then awaits (durable writes, waiting for the rest of a rebalance).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_channel::oneshot;
use indexmap::IndexMap;
use kafka_protocol::messages::consumer_group_describe_response::DescribedGroup as ConsumerDescribedGroup;
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::share_group_describe_response::DescribedGroup as ShareDescribedGroup;
use kafka_protocol::messages::txn_offset_commit_response::{
    TxnOffsetCommitResponsePartition, TxnOffsetCommitResponseTopic,
};
use kafka_protocol::messages::{
    AlterShareGroupOffsetsRequest, AlterShareGroupOffsetsResponse, ConsumerGroupHeartbeatRequest,
    ConsumerGroupHeartbeatResponse, ConsumerProtocolSubscription, DeleteShareGroupOffsetsRequest,
    DeleteShareGroupOffsetsResponse, GroupId, HeartbeatRequest, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, OffsetCommitRequest,
    OffsetCommitResponse, OffsetDeleteRequest, OffsetDeleteResponse, ShareAcknowledgeRequest,
    ShareAcknowledgeResponse, ShareFetchRequest, ShareFetchResponse, ShareGroupHeartbeatRequest,
    ShareGroupHeartbeatResponse, SyncGroupRequest, SyncGroupResponse, TxnOffsetCommitRequest,
    TxnOffsetCommitResponse,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::consumer::{self, ConsumerGroup};
use super::records::{self, Entry, GroupValue, MemberValue, OffsetValue};
use super::share::{ShareGroup, SharePartition};
use crate::config::BrokerConfig;
use crate::model::{ErrorCode, TopicPartition};
use crate::shard::Shard;
use crate::storage::partition::now_ms;
use crate::storage::txn::{self, Outcome};
use crate::storage::PartitionLog;

/// A committed partition's outcome: partition, error, and the value to keep on success.
type PartitionOutcome = (i32, ErrorCode, Option<OffsetValue>);

pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// `offset.metadata.max.bytes`: the longest commit metadata string kept.
const OFFSET_METADATA_BYTES_MAX: usize = 4096;
/// How often session timeouts and rebalance deadlines are checked.
const TICK: Duration = Duration::from_millis(100);

/// Kafka's `Utils.abs(groupId.hashCode()) % partitions`, with Java's UTF-16 `String.hashCode`.
pub fn partition_for_group(group: &str, partitions: i32) -> i32 {
    let mut h: i32 = 0;
    for unit in group.encode_utf16() {
        h = h.wrapping_mul(31).wrapping_add(i32::from(unit));
    }
    (h & 0x7fff_ffff) % partitions.max(1)
}

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Who sent a request, as DescribeGroups reports members.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub client_id: String,
    pub host: String,
}

/// A group request, routed to the shard that coordinates the group.
pub enum GroupCall {
    Join {
        req: JoinGroupRequest,
        version: i16,
        client: ClientInfo,
    },
    Sync {
        req: SyncGroupRequest,
        version: i16,
    },
    Heartbeat {
        req: HeartbeatRequest,
    },
    Leave {
        req: LeaveGroupRequest,
        version: i16,
    },
    Commit {
        req: OffsetCommitRequest,
    },
    FetchOffsets {
        group: String,
        topics: Option<Vec<(String, Vec<i32>)>>,
    },
    Describe {
        group: String,
        version: i16,
    },
    List,
    Delete {
        group: String,
    },
    DeleteOffsets {
        req: OffsetDeleteRequest,
    },
    /// TxnOffsetCommit: offsets that become visible when the producer's transaction commits.
    TxnCommit {
        req: TxnOffsetCommitRequest,
    },
    /// KIP-848 ConsumerGroupHeartbeat.
    ConsumerHeartbeat {
        req: ConsumerGroupHeartbeatRequest,
        version: i16,
        client: ClientInfo,
    },
    /// KIP-848 ConsumerGroupDescribe, one group.
    ConsumerDescribe {
        group: String,
    },
    /// KIP-932 share groups.
    ShareHeartbeat {
        req: ShareGroupHeartbeatRequest,
        client: ClientInfo,
    },
    /// `origin`: the broker that passed the request on, which the member's share session there
    /// is told apart by (`None`: the member sent it here).
    ShareFetch {
        req: ShareFetchRequest,
        origin: Option<i32>,
    },
    ShareAcknowledge {
        req: ShareAcknowledgeRequest,
        origin: Option<i32>,
    },
    ShareDescribe {
        group: String,
    },
    /// IncrementalAlterConfigs on the GROUP resource: (name, value or None to delete).
    AlterConfigs {
        group: String,
        changes: Vec<(String, Option<String>)>,
        validate_only: bool,
    },
    DescribeConfigs {
        group: String,
    },
    /// DescribeShareGroupOffsets: every share-partition's start offset.
    ShareOffsets {
        group: String,
    },
    AlterShareOffsets {
        req: AlterShareGroupOffsetsRequest,
    },
    DeleteShareOffsets {
        req: DeleteShareGroupOffsetsRequest,
    },
}

impl GroupCall {
    /// The group the call is about (None: every group).
    pub fn group(&self) -> Option<&str> {
        match self {
            GroupCall::Join { req, .. } => Some(&req.group_id.0),
            GroupCall::Sync { req, .. } => Some(&req.group_id.0),
            GroupCall::Heartbeat { req } => Some(&req.group_id.0),
            GroupCall::Leave { req, .. } => Some(&req.group_id.0),
            GroupCall::Commit { req } => Some(&req.group_id.0),
            GroupCall::DeleteOffsets { req } => Some(&req.group_id.0),
            GroupCall::TxnCommit { req } => Some(&req.group_id.0),
            GroupCall::ConsumerHeartbeat { req, .. } => Some(&req.group_id.0),
            GroupCall::ConsumerDescribe { group } => Some(group),
            GroupCall::ShareHeartbeat { req, .. } => Some(&req.group_id.0),
            GroupCall::ShareFetch { req, .. } => req.group_id.as_ref().map(|g| g.0.as_str()),
            GroupCall::ShareAcknowledge { req, .. } => req.group_id.as_ref().map(|g| g.0.as_str()),
            GroupCall::AlterShareOffsets { req } => Some(&req.group_id.0),
            GroupCall::DeleteShareOffsets { req } => Some(&req.group_id.0),
            GroupCall::ShareDescribe { group }
            | GroupCall::AlterConfigs { group, .. }
            | GroupCall::DescribeConfigs { group }
            | GroupCall::ShareOffsets { group } => Some(group),
            GroupCall::FetchOffsets { group, .. }
            | GroupCall::Describe { group, .. }
            | GroupCall::Delete { group } => Some(group),
            GroupCall::List => None,
        }
    }
}

/// A committed offset as OffsetFetch returns it.
#[derive(Clone, Debug)]
pub struct Committed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    /// A transaction not yet complete has an offset for this partition (KIP-447: a consumer
    /// that asks for stable offsets gets `UNSTABLE_OFFSET_COMMIT` and retries).
    pub pending: bool,
}

pub enum GroupReply {
    Join(JoinGroupResponse),
    Sync(SyncGroupResponse),
    Heartbeat(ErrorCode),
    Leave(LeaveGroupResponse),
    Commit(OffsetCommitResponse),
    Offsets(Vec<Committed>),
    Describe(DescribedGroup),
    List(Vec<ListedGroup>),
    Delete(ErrorCode),
    DeleteOffsets(OffsetDeleteResponse),
    TxnCommit(TxnOffsetCommitResponse),
    ConsumerHeartbeat(ConsumerGroupHeartbeatResponse),
    ConsumerDescribe(ConsumerDescribedGroup),
    ShareHeartbeat(ShareGroupHeartbeatResponse),
    ShareFetch(ShareFetchResponse),
    ShareAcknowledge(ShareAcknowledgeResponse),
    ShareDescribe(ShareDescribedGroup),
    /// A config change's outcome, with a message for an error.
    AlterConfigs(ErrorCode, Option<String>),
    /// A group's configs set explicitly.
    DescribeConfigs(Vec<(String, String)>),
    /// A share group's share-partitions and their start offsets (None: not a share group).
    ShareOffsets(Option<Vec<(String, i32, i64)>>),
    AlterShareOffsets(AlterShareGroupOffsetsResponse),
    DeleteShareOffsets(DeleteShareGroupOffsetsResponse),
    /// Not answered here: in a cluster, this shard does not (yet) coordinate the group.
    Refused(ErrorCode),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

struct Member {
    id: String,
    instance_id: Option<String>,
    client: ClientInfo,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    assignment: Bytes,
    last_heartbeat: Instant,
    join_version: i16,
    awaiting_join: Option<oneshot::Sender<JoinGroupResponse>>,
    awaiting_sync: Option<oneshot::Sender<Result<Bytes, ErrorCode>>>,
}

pub(super) struct Group {
    id: String,
    /// Set when this is a KIP-848 consumer-protocol group; its classic `members` are then empty.
    pub(super) consumer: Option<ConsumerGroup>,
    /// Set when this is a KIP-932 share group.
    pub(super) share: Option<ShareGroup>,
    /// Dynamic group configs (`share.auto.offset.reset`, ...).
    pub(super) configs: std::collections::BTreeMap<String, String>,
    state: State,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: IndexMap<String, Member>,
    /// KIP-394 member ids handed out with MEMBER_ID_REQUIRED, with when they expire: a client
    /// that never comes back must not leave its id behind forever.
    pending_members: HashMap<String, Instant>,
    static_members: HashMap<String, String>,
    pub(super) offsets: HashMap<(String, i32), OffsetValue>,
    join_deadline: Instant,
    initial_delay_until: Option<Instant>,
}

impl Group {
    pub(super) fn new(id: &str) -> Group {
        Group {
            id: id.to_string(),
            consumer: None,
            share: None,
            configs: std::collections::BTreeMap::new(),
            state: State::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: IndexMap::new(),
            pending_members: HashMap::new(),
            static_members: HashMap::new(),
            offsets: HashMap::new(),
            join_deadline: Instant::now(),
            initial_delay_until: None,
        }
    }

    /// Whether classic-protocol members are in the group.
    pub(super) fn has_classic_members(&self) -> bool {
        !self.members.is_empty()
    }

    /// No members of either protocol (offsets may expire, the group may be deleted or converted).
    pub(super) fn is_empty(&self) -> bool {
        self.members.is_empty()
            && self.consumer.as_ref().is_none_or(|c| c.members.is_empty())
            && self.share.as_ref().is_none_or(|s| s.members.is_empty())
    }

    /// Known only by configs set for it: no members, offsets, protocol or share state.
    pub(super) fn is_bare(&self) -> bool {
        self.is_empty()
            && self.offsets.is_empty()
            && self.consumer.is_none()
            && self.share.is_none()
            && self.protocol_type.is_none()
    }

    /// A dynamic group config, if set.
    pub(super) fn config_value(&self, name: &str) -> Option<&str> {
        self.configs.get(name).map(String::as_str)
    }

    /// The group's type as ListGroups reports it.
    fn type_name(&self) -> &'static str {
        if self.share.is_some() {
            "share"
        } else if self.consumer.is_some() {
            "consumer"
        } else {
            "classic"
        }
    }

    /// The state as ListGroups and DescribeGroups name it.
    fn state_name(&self) -> &'static str {
        match (&self.consumer, &self.share) {
            (Some(c), _) => c.state_name(),
            (None, Some(s)) => s.state_name(),
            (None, None) => self.state.name(),
        }
    }

    fn value(&self) -> GroupValue {
        GroupValue {
            protocol_type: self.protocol_type.clone(),
            generation: self.generation,
            protocol: self.protocol.clone(),
            leader: self.leader.clone(),
            members: self
                .members
                .values()
                .map(|m| MemberValue {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client.client_id.clone(),
                    client_host: m.client.host.clone(),
                    session_timeout_ms: m.session_timeout.as_millis() as u64,
                    rebalance_timeout_ms: m.rebalance_timeout.as_millis() as u64,
                    protocols: m
                        .protocols
                        .iter()
                        .map(|(n, b)| (n.clone(), b.to_vec()))
                        .collect(),
                    assignment: m.assignment.to_vec(),
                })
                .collect(),
        }
    }

    /// The join answer of a stable group to a follower whose metadata did not change: the current
    /// generation, no rebalance.
    fn current_join_response(&self, member_id: &str, version: i16) -> JoinGroupResponse {
        let mut r = JoinGroupResponse::default();
        r.generation_id = self.generation;
        r.protocol_name = Some(sb(self.protocol.as_deref().unwrap_or("")));
        if version >= 7 {
            r.protocol_type = self.protocol_type.as_deref().map(sb);
        }
        r.leader = sb(self.leader.as_deref().unwrap_or(""));
        r.member_id = sb(member_id);
        r
    }

    /// The member list a leader's JoinGroup response carries: ids, instance ids and their
    /// metadata for the group's protocol.
    fn join_members(&self, version: i16) -> Vec<JoinGroupResponseMember> {
        let protocol = self.protocol.clone().unwrap_or_default();
        self.members
            .values()
            .map(|m| {
                let mut jm = JoinGroupResponseMember::default();
                jm.member_id = sb(&m.id);
                if version >= 5 {
                    jm.group_instance_id = m.instance_id.as_deref().map(sb);
                }
                jm.metadata = m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default();
                jm
            })
            .collect()
    }

    /// KIP-345 fencing: a request naming a static instance whose current member is another one
    /// comes from a member that a newer one with the same `group.instance.id` replaced.
    fn fenced(&self, member_id: &str, instance_id: Option<&str>) -> bool {
        instance_id
            .and_then(|i| self.static_members.get(i))
            .is_some_and(|current| current != member_id)
    }

    fn prepare_rebalance(&mut self, config: &BrokerConfig, now: Instant) {
        if self.state == State::CompletingRebalance {
            for m in self.members.values_mut() {
                if let Some(tx) = m.awaiting_sync.take() {
                    let _ = tx.send(Err(ErrorCode::REBALANCE_IN_PROGRESS));
                }
            }
        }
        let max_rebalance = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::ZERO);
        let initial = self.state == State::Empty;
        self.state = State::PreparingRebalance;
        self.join_deadline = now + max_rebalance;
        self.initial_delay_until = initial.then(|| {
            (now + Duration::from_millis(config.group_initial_rebalance_delay_ms))
                .min(self.join_deadline)
        });
    }

    /// Completes the join phase when every member has rejoined (and a new group's initial delay
    /// is over) or the deadline passed. Returns true when the group became empty (to persist).
    fn maybe_complete_join(&mut self, now: Instant) -> bool {
        if self.state != State::PreparingRebalance {
            return false;
        }
        let all_joined = self.members.values().all(|m| m.awaiting_join.is_some());
        let delay_over = self.initial_delay_until.is_none_or(|t| now >= t);
        if !((all_joined && delay_over) || now >= self.join_deadline) {
            return false;
        }
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| m.awaiting_join.is_none())
            .map(|m| m.id.clone())
            .collect();
        for id in gone {
            self.remove_member(&id);
        }
        self.generation += 1;
        self.initial_delay_until = None;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.protocol = None;
            self.leader = None;
            return true;
        }
        self.protocol = self.choose_protocol();
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        self.state = State::CompletingRebalance;
        let protocol = self.protocol.clone().unwrap_or_default();
        let leader = self.leader.clone().unwrap_or_default();
        let roster: Vec<(String, Option<String>, Bytes)> = self
            .members
            .values()
            .map(|m| {
                let metadata = m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default();
                (m.id.clone(), m.instance_id.clone(), metadata)
            })
            .collect();
        let generation = self.generation;
        let protocol_type = self.protocol_type.clone();
        for m in self.members.values_mut() {
            m.assignment = Bytes::new();
            m.last_heartbeat = now;
            let Some(tx) = m.awaiting_join.take() else {
                continue;
            };
            let mut r = JoinGroupResponse::default();
            r.generation_id = generation;
            r.protocol_name = Some(sb(&protocol));
            if m.join_version >= 7 {
                r.protocol_type = protocol_type.as_deref().map(sb);
            }
            r.leader = sb(&leader);
            r.member_id = sb(&m.id);
            if m.id == leader {
                r.members = roster
                    .iter()
                    .map(|(id, instance, metadata)| {
                        let mut jm = JoinGroupResponseMember::default();
                        jm.member_id = sb(id);
                        if m.join_version >= 5 {
                            jm.group_instance_id = instance.as_deref().map(sb);
                        }
                        jm.metadata = metadata.clone();
                        jm
                    })
                    .collect();
            }
            let _ = tx.send(r);
        }
        false
    }

    /// The first protocol of the first member that every member supports.
    fn choose_protocol(&self) -> Option<String> {
        let first = self.members.values().next()?;
        first
            .protocols
            .iter()
            .map(|(n, _)| n)
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .cloned()
    }

    fn remove_member(&mut self, id: &str) {
        if let Some(m) = self.members.shift_remove(id) {
            if let Some(instance) = &m.instance_id {
                if self.static_members.get(instance).map(String::as_str) == Some(id) {
                    self.static_members.remove(instance);
                }
            }
            if let Some(tx) = m.awaiting_join {
                let mut r = JoinGroupResponse::default();
                r.error_code = ErrorCode::UNKNOWN_MEMBER_ID.0;
                r.generation_id = -1;
                r.protocol_name = Some(sb(""));
                r.member_id = sb(id);
                let _ = tx.send(r);
            }
            if let Some(tx) = m.awaiting_sync {
                let _ = tx.send(Err(ErrorCode::UNKNOWN_MEMBER_ID));
            }
        }
        if self.leader.as_deref() == Some(id) {
            self.leader = None;
        }
    }

    /// After members left: an empty group goes to Empty (true: persist), else rebalances.
    fn after_removal(&mut self, config: &BrokerConfig, now: Instant) -> bool {
        if self.members.is_empty() {
            if self.state != State::Empty {
                self.state = State::Empty;
                self.generation += 1;
                self.protocol = None;
                self.leader = None;
                return true;
            }
            return false;
        }
        if self.state != State::PreparingRebalance {
            self.prepare_rebalance(config, now);
        }
        self.maybe_complete_join(now)
    }

    fn subscribed_topics(&self) -> HashSet<String> {
        let mut topics = HashSet::new();
        if self.protocol_type.as_deref() != Some("consumer") {
            return topics;
        }
        for m in self.members.values() {
            for (_, metadata) in &m.protocols {
                if let Some(s) = decode_subscription(metadata) {
                    topics.extend(s.topics.into_iter().map(|t| t.to_string()));
                }
            }
        }
        topics
    }
}

fn decode_subscription(metadata: &Bytes) -> Option<ConsumerProtocolSubscription> {
    let mut b = metadata.clone();
    if b.len() < 2 {
        return None;
    }
    let version = i16::from_be_bytes([b[0], b[1]]);
    let _ = bytes::Buf::get_i16(&mut b);
    ConsumerProtocolSubscription::decode(&mut b, version.clamp(0, 3)).ok()
}

fn join_error(code: ErrorCode, member_id: &str) -> JoinGroupResponse {
    let mut r = JoinGroupResponse::default();
    r.error_code = code.0;
    r.generation_id = -1;
    r.protocol_name = Some(sb(""));
    r.member_id = sb(member_id);
    r
}

fn sync_response(
    result: Result<Bytes, ErrorCode>,
    group: Option<(&Group, i16)>,
) -> SyncGroupResponse {
    let mut r = SyncGroupResponse::default();
    match result {
        Ok(assignment) => r.assignment = assignment,
        Err(code) => r.error_code = code.0,
    }
    if let Some((g, version)) = group {
        if version >= 5 {
            r.protocol_type = g.protocol_type.as_deref().map(sb);
            r.protocol_name = g.protocol.as_deref().map(sb);
        }
    }
    r
}

pub struct GroupCoordinator {
    pub(super) groups: RefCell<HashMap<String, Group>>,
    pub(super) config: BrokerConfig,
    last_expiry_check: Cell<Instant>,
    /// In a cluster: the offsets partitions this shard coordinates (it leads them and has loaded
    /// their groups). A single node coordinates all of its partitions without this.
    loaded: RefCell<std::collections::HashSet<i32>>,
    /// TxnOffsetCommit offsets by producer id, until the transaction's marker: (group, topic,
    /// partition, offset).
    pending_txn: RefCell<HashMap<i64, Vec<PendingOffset>>>,
    /// Notified when share-group records are released or acknowledged (a waiting ShareFetch
    /// looks again).
    pub(super) share_progress: event_listener::Event,
}

/// One partition's offset in an OffsetCommit or TxnOffsetCommit.
struct OffsetCommit<'a> {
    group: &'a str,
    topic: &'a str,
    partition: i32,
    /// The topic's partition count (0: no such topic).
    partitions: i32,
    offset: i64,
    leader_epoch: i32,
    metadata: Option<&'a str>,
    now_ms: i64,
}

impl OffsetCommit<'_> {
    /// Kafka's checks, in its order (the partition exists, the member may commit, the metadata
    /// fits), then the record to write and the value to keep.
    fn entry(
        &self,
        member_check: ErrorCode,
    ) -> Result<((Bytes, Option<Bytes>), OffsetValue), ErrorCode> {
        if self.partition < 0 || self.partition >= self.partitions {
            return Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION);
        }
        if !member_check.is_ok() {
            return Err(member_check);
        }
        let metadata = self.metadata.unwrap_or_default().to_string();
        if metadata.len() > OFFSET_METADATA_BYTES_MAX {
            return Err(ErrorCode::OFFSET_METADATA_TOO_LARGE);
        }
        let value = OffsetValue {
            offset: self.offset,
            leader_epoch: self.leader_epoch,
            metadata,
            commit_timestamp_ms: self.now_ms,
        };
        let record = records::offset_record(self.group, self.topic, self.partition, Some(&value))
            .map_err(|_| ErrorCode::UNKNOWN_SERVER_ERROR)?;
        Ok((record, value))
    }
}

/// An offset a transaction committed: (group, topic, partition, value).
type PendingOffset = (String, String, i32, OffsetValue);

impl GroupCoordinator {
    pub fn new(config: BrokerConfig) -> Self {
        GroupCoordinator {
            groups: RefCell::new(HashMap::new()),
            config,
            last_expiry_check: Cell::new(Instant::now()),
            loaded: RefCell::new(std::collections::HashSet::new()),
            pending_txn: RefCell::new(HashMap::new()),
            share_progress: event_listener::Event::new(),
        }
    }

    /// In a cluster: whether this shard coordinates the groups of offsets partition `p`.
    pub fn coordinates(&self, p: i32) -> bool {
        self.loaded.borrow().contains(&p)
    }

    /// Forgets the groups of offsets partition `p` (this broker no longer leads it).
    pub fn unload_partition(&self, p: i32) {
        self.loaded.borrow_mut().remove(&p);
        let partitions = self.config.offsets_topic_partitions;
        self.groups
            .borrow_mut()
            .retain(|name, _| partition_for_group(name, partitions) != p);
        for held in self.pending_txn.borrow_mut().values_mut() {
            held.retain(|(group, ..)| partition_for_group(group, partitions) != p);
        }
    }

    /// Becomes the coordinator of offsets partition `p`: its groups are rebuilt from the log
    /// (which holds every committed record once the new leader has applied its log).
    pub async fn take_over(&self, log: &PartitionLog, p: i32) {
        self.unload_partition(p);
        self.load(log).await;
        self.loaded.borrow_mut().insert(p);
    }

    /// Starts the periodic check of session timeouts, rebalance deadlines and offset expiry.
    pub fn start_ticker(shard: &Rc<Shard>) {
        let shard = Rc::downgrade(shard);
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(TICK).await;
                let Some(shard) = shard.upgrade() else { return };
                shard.groups.tick(&shard).await;
            }
        })
        .detach();
    }

    fn log_for(&self, shard: &Rc<Shard>, group: &str) -> Option<PartitionLog> {
        let p = partition_for_group(group, self.config.offsets_topic_partitions);
        shard.partition(&TopicPartition::new(OFFSETS_TOPIC, p))
    }

    /// Appends records for `group` to its offsets partition and waits until they are durable.
    pub(super) async fn persist(
        &self,
        shard: &Rc<Shard>,
        group: &str,
        records: Vec<(Bytes, Option<Bytes>)>,
    ) -> Result<(), ErrorCode> {
        if records.is_empty() {
            return Ok(());
        }
        let batch = records::encode_batch(records, now_ms() as i64, None).map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "encoding group records failed");
            ErrorCode::UNKNOWN_SERVER_ERROR
        })?;
        self.persist_batch(shard, group, batch).await
    }

    /// Appends one batch to the group's offsets partition and waits until it is durable (in a
    /// cluster: committed by the partition's Raft group).
    async fn persist_batch(
        &self,
        shard: &Rc<Shard>,
        group: &str,
        batch: Bytes,
    ) -> Result<(), ErrorCode> {
        let log = self
            .log_for(shard, group)
            .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)?;
        let cluster = shard.cluster().is_some();
        shard
            .write_internal(&log, batch)
            .await
            .map(|_| ())
            .map_err(|_| {
                if cluster {
                    ErrorCode::NOT_COORDINATOR
                } else {
                    ErrorCode::COORDINATOR_NOT_AVAILABLE
                }
            })
    }

    /// The transaction of `producer_id` ended: its offset commits become the groups' committed
    /// offsets, or are dropped. Called as its marker is written to an offsets partition this shard
    /// owns, and for each marker when a partition is loaded.
    pub fn end_txn(&self, producer_id: i64, outcome: Outcome) {
        let Some(pending) = self.pending_txn.borrow_mut().remove(&producer_id) else {
            return;
        };
        if outcome == Outcome::Commit {
            for (group, topic, partition, value) in pending {
                self.apply(Entry::Offset {
                    group,
                    topic,
                    partition,
                    value: Some(value),
                });
            }
        }
    }

    /// TxnOffsetCommit (KIP-98, KIP-447): the offsets are written to the offsets partition in a
    /// transactional batch of the producer, durably, and held back until its marker.
    async fn txn_commit(
        &self,
        shard: &Rc<Shard>,
        req: TxnOffsetCommitRequest,
    ) -> TxnOffsetCommitResponse {
        let group_id = req.group_id.0.to_string();
        let member_id = req.member_id.to_string();
        let check = {
            let groups = self.groups.borrow();
            match groups.get(&group_id) {
                // KIP-447: a commit from a member of an older generation is a zombie's.
                Some(g) if req.generation_id >= 0 && !member_id.is_empty() => {
                    if !g.members.contains_key(&member_id) {
                        ErrorCode::UNKNOWN_MEMBER_ID
                    } else if req.generation_id != g.generation {
                        ErrorCode::ILLEGAL_GENERATION
                    } else {
                        ErrorCode::NONE
                    }
                }
                _ => ErrorCode::NONE,
            }
        };
        let now = now_ms() as i64;
        let table = shard.topics();
        let mut records = Vec::new();
        let mut accepted = Vec::new();
        let mut results: Vec<(String, Vec<(i32, ErrorCode)>)> = Vec::new();
        for t in &req.topics {
            let topic = t.name.0.to_string();
            let partitions = table.get(&topic).map_or(0, |t| t.partitions);
            let mut parts = Vec::new();
            for p in &t.partitions {
                let commit = OffsetCommit {
                    group: &group_id,
                    topic: &topic,
                    partition: p.partition_index,
                    partitions,
                    offset: p.committed_offset,
                    leader_epoch: p.committed_leader_epoch,
                    metadata: p.committed_metadata.as_deref(),
                    now_ms: now,
                };
                let code = match commit.entry(check) {
                    Ok((record, value)) => {
                        records.push(record);
                        accepted.push((group_id.clone(), topic.clone(), p.partition_index, value));
                        ErrorCode::NONE
                    }
                    Err(code) => code,
                };
                parts.push((p.partition_index, code));
            }
            results.push((topic, parts));
        }
        let producer = (req.producer_id.0, req.producer_epoch);
        let written = if records.is_empty() {
            Ok(())
        } else {
            match records::encode_batch(records, now, Some(producer)) {
                Ok(batch) => self.persist_batch(shard, &group_id, batch).await,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "encoding transactional offsets failed");
                    Err(ErrorCode::UNKNOWN_SERVER_ERROR)
                }
            }
        };
        if written.is_ok() {
            self.pending_txn
                .borrow_mut()
                .entry(req.producer_id.0)
                .or_default()
                .extend(accepted);
        }
        let mut response = TxnOffsetCommitResponse::default();
        for (topic, parts) in results {
            let mut rt = TxnOffsetCommitResponseTopic::default();
            rt.name = crate::handlers::topic_name(&topic);
            for (partition, code) in parts {
                let mut rp = TxnOffsetCommitResponsePartition::default();
                rp.partition_index = partition;
                rp.error_code = match (&written, code.is_ok()) {
                    (Err(e), true) => e.0,
                    _ => code.0,
                };
                rt.partitions.push(rp);
            }
            response.topics.push(rt);
        }
        response
    }

    async fn persist_group(&self, shard: &Rc<Shard>, group: &str) -> Result<(), ErrorCode> {
        let value = match self.groups.borrow().get(group) {
            Some(g) => g.value(),
            None => return Ok(()),
        };
        let record = records::group_record(group, Some(&value)).map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "encoding group metadata failed");
            ErrorCode::UNKNOWN_SERVER_ERROR
        })?;
        self.persist(shard, group, vec![record]).await
    }

    /// Replays one `__consumer_offsets` partition into memory (when the partition opens).
    pub async fn load(&self, log: &PartitionLog) {
        let mut entries = 0usize;
        log.replay(|bytes, h| {
            if h.is_control() {
                if let Some(outcome) = txn::control_outcome(&bytes, &h) {
                    self.end_txn(h.producer_id, outcome);
                }
                return;
            }
            match records::decode_batches(bytes) {
                Ok(list) => {
                    entries += list.len();
                    if h.is_transactional() {
                        self.hold_for_txn(h.producer_id, list);
                    } else {
                        for e in list {
                            self.apply(e);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "skipping undecodable group records")
                }
            }
        })
        .await;
        if entries > 0 {
            tracing::info!(partition = %log.topic_partition(), entries, "group state loaded");
        }
    }

    /// Offsets a transaction wrote, held until its marker (when a partition is loaded).
    fn hold_for_txn(&self, producer_id: i64, list: Vec<Entry>) {
        let mut pending = self.pending_txn.borrow_mut();
        let held = pending.entry(producer_id).or_default();
        for e in list {
            if let Entry::Offset {
                group,
                topic,
                partition,
                value: Some(value),
            } = e
            {
                held.push((group, topic, partition, value));
            }
        }
    }

    fn apply(&self, entry: Entry) {
        let mut groups = self.groups.borrow_mut();
        let now = Instant::now();
        match entry {
            Entry::Offset {
                group,
                topic,
                partition,
                value,
            } => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group));
                match value {
                    Some(v) => {
                        g.offsets.insert((topic, partition), v);
                    }
                    None => {
                        g.offsets.remove(&(topic, partition));
                    }
                }
            }
            Entry::Group { group, value: None } => {
                groups.remove(&group);
            }
            Entry::ShareGroup { group, value } => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group));
                match value {
                    Some(v) => {
                        let sg = g.share.get_or_insert_with(ShareGroup::default);
                        sg.epoch = sg.epoch.max(v.epoch);
                    }
                    None => g.share = None,
                }
            }
            Entry::SharePartition {
                group,
                topic,
                partition,
                value,
            } => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group));
                let sg = g.share.get_or_insert_with(ShareGroup::default);
                match value {
                    Some(v) => {
                        sg.partitions
                            .insert((topic, partition), SharePartition::from_value(&v));
                    }
                    None => {
                        sg.partitions.remove(&(topic, partition));
                    }
                }
            }
            Entry::GroupConfig { group, value } => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group));
                g.configs = value
                    .map(|v| v.configs.into_iter().collect())
                    .unwrap_or_default();
            }
            Entry::ConsumerGroup { group, value } => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group));
                // The latest record of either kind says what the group is.
                g.members.clear();
                g.static_members.clear();
                g.state = State::Empty;
                g.consumer =
                    value.map(|v| ConsumerGroup::from_value(v, &self.consumer_settings(), now));
            }
            Entry::Group {
                group,
                value: Some(v),
            } => {
                let g = groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group));
                g.consumer = None;
                g.generation = v.generation;
                g.protocol_type = v.protocol_type;
                g.protocol = v.protocol;
                g.leader = v.leader;
                g.members.clear();
                g.static_members.clear();
                for m in v.members {
                    if let Some(instance) = &m.instance_id {
                        g.static_members
                            .insert(instance.clone(), m.member_id.clone());
                    }
                    g.members.insert(
                        m.member_id.clone(),
                        Member {
                            id: m.member_id,
                            instance_id: m.instance_id,
                            client: ClientInfo {
                                client_id: m.client_id,
                                host: m.client_host,
                            },
                            session_timeout: Duration::from_millis(m.session_timeout_ms),
                            rebalance_timeout: Duration::from_millis(m.rebalance_timeout_ms),
                            protocol_type: g.protocol_type.clone().unwrap_or_default(),
                            protocols: m
                                .protocols
                                .into_iter()
                                .map(|(n, b)| (n, Bytes::from(b)))
                                .collect(),
                            assignment: Bytes::from(m.assignment),
                            last_heartbeat: now,
                            join_version: 0,
                            awaiting_join: None,
                            awaiting_sync: None,
                        },
                    );
                }
                g.state = if g.members.is_empty() {
                    State::Empty
                } else {
                    State::Stable
                };
            }
        }
    }

    pub async fn handle(&self, shard: &Rc<Shard>, call: GroupCall) -> GroupReply {
        if shard.cluster().is_some() {
            if let Some(group) = call.group() {
                let p = partition_for_group(group, self.config.offsets_topic_partitions);
                if !self.coordinates(p) {
                    // Leading the partition but still loading its groups, or not leading it.
                    return GroupReply::Refused(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS);
                }
            }
        }
        match call {
            GroupCall::Join {
                req,
                version,
                client,
            } => GroupReply::Join(self.join(shard, req, version, client).await),
            GroupCall::Sync { req, version } => {
                GroupReply::Sync(self.sync(shard, req, version).await)
            }
            GroupCall::Heartbeat { req } => GroupReply::Heartbeat(self.heartbeat(req)),
            GroupCall::Leave { req, version } => {
                GroupReply::Leave(self.leave(shard, req, version).await)
            }
            GroupCall::Commit { req } => GroupReply::Commit(self.commit(shard, req).await),
            GroupCall::FetchOffsets { group, topics } => {
                GroupReply::Offsets(self.fetch_offsets(&group, topics))
            }
            GroupCall::Describe { group, version } => {
                GroupReply::Describe(self.describe(&group, version))
            }
            GroupCall::List => GroupReply::List(self.list()),
            GroupCall::Delete { group } => GroupReply::Delete(self.delete(shard, &group).await),
            GroupCall::DeleteOffsets { req } => {
                GroupReply::DeleteOffsets(self.delete_offsets(shard, req).await)
            }
            GroupCall::TxnCommit { req } => {
                GroupReply::TxnCommit(self.txn_commit(shard, req).await)
            }
            GroupCall::ConsumerHeartbeat {
                req,
                version,
                client,
            } => GroupReply::ConsumerHeartbeat(
                self.consumer_heartbeat(shard, req, version, client).await,
            ),
            GroupCall::ConsumerDescribe { group } => {
                GroupReply::ConsumerDescribe(self.consumer_describe(shard, &group))
            }
            GroupCall::ShareHeartbeat { req, client } => {
                GroupReply::ShareHeartbeat(self.share_heartbeat(shard, req, client).await)
            }
            GroupCall::ShareFetch { req, origin } => {
                GroupReply::ShareFetch(self.share_fetch(shard, req, origin).await)
            }
            GroupCall::ShareAcknowledge { req, origin } => {
                GroupReply::ShareAcknowledge(self.share_acknowledge(shard, req, origin).await)
            }
            GroupCall::ShareDescribe { group } => {
                GroupReply::ShareDescribe(self.share_describe(shard, &group))
            }
            GroupCall::AlterConfigs {
                group,
                changes,
                validate_only,
            } => {
                let (code, message) = self
                    .alter_configs(shard, &group, changes, validate_only)
                    .await;
                GroupReply::AlterConfigs(code, message)
            }
            GroupCall::AlterShareOffsets { req } => {
                GroupReply::AlterShareOffsets(self.alter_share_offsets(shard, req).await)
            }
            GroupCall::DeleteShareOffsets { req } => {
                GroupReply::DeleteShareOffsets(self.delete_share_offsets(shard, req).await)
            }
            GroupCall::ShareOffsets { group } => GroupReply::ShareOffsets(
                self.groups
                    .borrow()
                    .get(&group)
                    .and_then(|g| g.share.as_ref())
                    .map(|sg| {
                        sg.partitions
                            .iter()
                            .map(|((t, p), sp)| (t.clone(), *p, sp.start_offset))
                            .collect()
                    }),
            ),
            GroupCall::DescribeConfigs { group } => GroupReply::DescribeConfigs(
                self.groups
                    .borrow()
                    .get(&group)
                    .map(|g| {
                        g.configs
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
        }
    }

    async fn join(
        &self,
        shard: &Rc<Shard>,
        req: JoinGroupRequest,
        version: i16,
        client: ClientInfo,
    ) -> JoinGroupResponse {
        let group_id = req.group_id.0.to_string();
        let member_id = req.member_id.to_string();
        if group_id.is_empty() {
            return join_error(ErrorCode::INVALID_GROUP_ID, &member_id);
        }
        let session_ms = u64::try_from(req.session_timeout_ms).unwrap_or(0);
        if session_ms < self.config.group_session_timeout_ms_min
            || session_ms > self.config.group_session_timeout_ms_max
        {
            return join_error(ErrorCode::INVALID_SESSION_TIMEOUT, &member_id);
        }
        let rebalance_ms = if version == 0 {
            session_ms
        } else {
            u64::try_from(req.rebalance_timeout_ms).unwrap_or(session_ms)
        };
        let protocol_type = req.protocol_type.to_string();
        let protocols: Vec<(String, Bytes)> = req
            .protocols
            .iter()
            .map(|p| (p.name.to_string(), p.metadata.clone()))
            .collect();
        let instance_id = req.group_instance_id.as_ref().map(|s| s.to_string());
        let now = Instant::now();
        let (tx, rx) = oneshot::channel();
        let became_empty;
        {
            let mut groups = self.groups.borrow_mut();
            let group = groups
                .entry(group_id.clone())
                .or_insert_with(|| Group::new(&group_id));
            if group.share.as_ref().is_some_and(|s| !s.members.is_empty()) {
                return join_error(ErrorCode::INCONSISTENT_GROUP_PROTOCOL, &member_id);
            }
            if let Some(cg) = &group.consumer {
                if !cg.members.is_empty() {
                    // Live members speak KIP-848; a classic member cannot join them.
                    return join_error(ErrorCode::INCONSISTENT_GROUP_PROTOCOL, &member_id);
                }
                // An empty consumer-protocol group becomes a classic one (its offsets stay).
                group.consumer = None;
            }
            if protocols.is_empty()
                || (!group.members.is_empty()
                    && (group.protocol_type.as_deref() != Some(protocol_type.as_str())
                        || !protocols.iter().any(|(n, _)| {
                            group
                                .members
                                .values()
                                .all(|m| m.protocols.iter().any(|(mn, _)| mn == n))
                        })))
            {
                return join_error(ErrorCode::INCONSISTENT_GROUP_PROTOCOL, &member_id);
            }
            let id = if member_id.is_empty() {
                let new_id = format!("{}-{}", client.client_id, uuid::Uuid::new_v4());
                match instance_id
                    .as_ref()
                    .and_then(|i| group.static_members.get(i).cloned())
                {
                    Some(old_id) if group.members.contains_key(&old_id) => {
                        // A static member restarted: it takes over its old identity and
                        // assignment; a stable group answers without a rebalance.
                        let mut m = group.members.shift_remove(&old_id).expect("checked");
                        if let Some(tx) = m.awaiting_join.take() {
                            let _ = tx.send(join_error(ErrorCode::FENCED_INSTANCE_ID, &old_id));
                        }
                        if let Some(tx) = m.awaiting_sync.take() {
                            let _ = tx.send(Err(ErrorCode::FENCED_INSTANCE_ID));
                        }
                        // Kafka compares only the selected protocol: a restarted member's
                        // subscription metadata differs (it owns no partitions yet).
                        let unchanged = group
                            .protocol
                            .as_ref()
                            .is_some_and(|p| protocols.iter().any(|(n, _)| n == p));
                        m.id = new_id.clone();
                        m.protocols = protocols.clone();
                        m.last_heartbeat = now;
                        m.join_version = version;
                        group.members.insert(new_id.clone(), m);
                        let instance = instance_id.clone().expect("static member");
                        group.static_members.insert(instance, new_id.clone());
                        let was_leader = group.leader.as_deref() == Some(old_id.as_str());
                        if was_leader {
                            group.leader = Some(new_id.clone());
                        }
                        if group.state == State::Stable && unchanged {
                            // No rebalance: the others keep their partitions. A restarted leader
                            // gets the members with skip_assignment (KIP-814), so it does not
                            // compute a new assignment; its SyncGroup returns its old one.
                            let mut r = group.current_join_response(&new_id, version);
                            if was_leader {
                                r.members = group.join_members(version);
                                r.skip_assignment = version >= 9;
                            }
                            return r;
                        }
                        new_id
                    }
                    _ => {
                        if instance_id.is_none() && version >= 4 {
                            group
                                .pending_members
                                .insert(new_id.clone(), now + Duration::from_millis(session_ms));
                            return join_error(ErrorCode::MEMBER_ID_REQUIRED, &new_id);
                        }
                        new_id
                    }
                }
            } else {
                if group.fenced(&member_id, instance_id.as_deref()) {
                    return join_error(ErrorCode::FENCED_INSTANCE_ID, &member_id);
                }
                if !group.members.contains_key(&member_id)
                    && group.pending_members.remove(&member_id).is_none()
                {
                    return join_error(ErrorCode::UNKNOWN_MEMBER_ID, &member_id);
                }
                if let (Some(instance), Some(m)) = (&instance_id, group.members.get(&member_id)) {
                    if m.instance_id.as_ref() != Some(instance) {
                        return join_error(ErrorCode::FENCED_INSTANCE_ID, &member_id);
                    }
                }
                member_id.clone()
            };
            let is_new = !group.members.contains_key(&id);
            if is_new {
                if let Some(instance) = &instance_id {
                    group.static_members.insert(instance.clone(), id.clone());
                }
                group.members.insert(
                    id.clone(),
                    Member {
                        id: id.clone(),
                        instance_id: instance_id.clone(),
                        client,
                        session_timeout: Duration::from_millis(session_ms),
                        rebalance_timeout: Duration::from_millis(rebalance_ms),
                        protocol_type: protocol_type.clone(),
                        protocols: protocols.clone(),
                        assignment: Bytes::new(),
                        last_heartbeat: now,
                        join_version: version,
                        awaiting_join: None,
                        awaiting_sync: None,
                    },
                );
            }
            let m = group.members.get_mut(&id).expect("member present");
            let unchanged = !is_new && m.protocols == protocols;
            m.protocols = protocols;
            m.session_timeout = Duration::from_millis(session_ms);
            m.rebalance_timeout = Duration::from_millis(rebalance_ms);
            m.last_heartbeat = now;
            m.join_version = version;
            m.protocol_type = protocol_type.clone();
            let is_leader = group.leader.as_deref() == Some(id.as_str());
            if group.state == State::Stable && unchanged && !is_leader {
                // A follower rejoining with the same metadata: nothing to rebalance.
                return group.current_join_response(&id, version);
            }
            if let Some(old) = m.awaiting_join.replace(tx) {
                let _ = old.send(join_error(ErrorCode::REBALANCE_IN_PROGRESS, &id));
            }
            group.protocol_type = Some(protocol_type);
            match group.state {
                State::PreparingRebalance => {
                    if let Some(until) = group.initial_delay_until {
                        // Each newcomer to a new group extends the wait, within the deadline.
                        let extended = now
                            + Duration::from_millis(self.config.group_initial_rebalance_delay_ms);
                        group.initial_delay_until = Some(
                            until.max(extended).min(
                                group
                                    .join_deadline
                                    .max(now + Duration::from_millis(rebalance_ms)),
                            ),
                        );
                        group.join_deadline = group
                            .join_deadline
                            .max(now + Duration::from_millis(rebalance_ms));
                    }
                }
                _ => group.prepare_rebalance(&self.config, now),
            }
            became_empty = group.maybe_complete_join(now);
        }
        if became_empty {
            let _ = self.persist_group(shard, &group_id).await;
        }
        rx.await
            .unwrap_or_else(|_| join_error(ErrorCode::REBALANCE_IN_PROGRESS, &member_id))
    }

    async fn sync(
        &self,
        shard: &Rc<Shard>,
        req: SyncGroupRequest,
        version: i16,
    ) -> SyncGroupResponse {
        let group_id = req.group_id.0.to_string();
        let member_id = req.member_id.to_string();
        let (rx, leader_generation) = {
            let mut groups = self.groups.borrow_mut();
            let Some(group) = groups.get_mut(&group_id) else {
                return sync_response(Err(ErrorCode::UNKNOWN_MEMBER_ID), None);
            };
            if group.fenced(
                &member_id,
                req.group_instance_id.as_ref().map(|s| s.as_str()),
            ) {
                return sync_response(Err(ErrorCode::FENCED_INSTANCE_ID), Some((group, version)));
            }
            if !group.members.contains_key(&member_id) {
                return sync_response(Err(ErrorCode::UNKNOWN_MEMBER_ID), Some((group, version)));
            }
            if req.generation_id != group.generation {
                return sync_response(Err(ErrorCode::ILLEGAL_GENERATION), Some((group, version)));
            }
            match group.state {
                State::Empty => {
                    return sync_response(Err(ErrorCode::UNKNOWN_MEMBER_ID), Some((group, version)))
                }
                State::PreparingRebalance => {
                    return sync_response(
                        Err(ErrorCode::REBALANCE_IN_PROGRESS),
                        Some((group, version)),
                    )
                }
                State::Stable => {
                    let assignment = group.members[&member_id].assignment.clone();
                    group.members[&member_id].last_heartbeat = Instant::now();
                    return sync_response(Ok(assignment), Some((group, version)));
                }
                State::CompletingRebalance => {}
            }
            let (tx, rx) = oneshot::channel();
            let is_leader = group.leader.as_deref() == Some(member_id.as_str());
            {
                let m = &mut group.members[&member_id];
                m.last_heartbeat = Instant::now();
                if let Some(old) = m.awaiting_sync.replace(tx) {
                    let _ = old.send(Err(ErrorCode::REBALANCE_IN_PROGRESS));
                }
            }
            if is_leader {
                let given: HashMap<String, Bytes> = req
                    .assignments
                    .into_iter()
                    .map(|a| (a.member_id.to_string(), a.assignment))
                    .collect();
                for m in group.members.values_mut() {
                    m.assignment = given.get(&m.id).cloned().unwrap_or_default();
                }
            }
            (rx, is_leader.then_some(group.generation))
        };
        if let Some(generation) = leader_generation {
            let persisted = self.persist_group(shard, &group_id).await;
            let mut groups = self.groups.borrow_mut();
            if let Some(group) = groups.get_mut(&group_id) {
                if group.generation == generation && group.state == State::CompletingRebalance {
                    match persisted {
                        Ok(()) => {
                            group.state = State::Stable;
                            for m in group.members.values_mut() {
                                if let Some(tx) = m.awaiting_sync.take() {
                                    let _ = tx.send(Ok(m.assignment.clone()));
                                }
                            }
                        }
                        Err(code) => {
                            for m in group.members.values_mut() {
                                m.assignment = Bytes::new();
                                if let Some(tx) = m.awaiting_sync.take() {
                                    let _ = tx.send(Err(code));
                                }
                            }
                            group.prepare_rebalance(&self.config, Instant::now());
                        }
                    }
                }
            }
        }
        let result = rx.await.unwrap_or(Err(ErrorCode::REBALANCE_IN_PROGRESS));
        let groups = self.groups.borrow();
        sync_response(result, groups.get(&group_id).map(|g| (g, version)))
    }

    fn heartbeat(&self, req: HeartbeatRequest) -> ErrorCode {
        let mut groups = self.groups.borrow_mut();
        let Some(group) = groups.get_mut(req.group_id.0.as_str()) else {
            return ErrorCode::UNKNOWN_MEMBER_ID;
        };
        let member_id = req.member_id.to_string();
        if group.fenced(
            &member_id,
            req.group_instance_id.as_ref().map(|s| s.as_str()),
        ) {
            return ErrorCode::FENCED_INSTANCE_ID;
        }
        let state = group.state;
        let generation = group.generation;
        let Some(m) = group.members.get_mut(&member_id) else {
            return ErrorCode::UNKNOWN_MEMBER_ID;
        };
        if let Some(instance) = &req.group_instance_id {
            if m.instance_id.as_deref() != Some(instance.as_str()) {
                return ErrorCode::FENCED_INSTANCE_ID;
            }
        }
        if req.generation_id != generation {
            return ErrorCode::ILLEGAL_GENERATION;
        }
        m.last_heartbeat = Instant::now();
        match state {
            State::PreparingRebalance => ErrorCode::REBALANCE_IN_PROGRESS,
            State::Empty => ErrorCode::UNKNOWN_MEMBER_ID,
            _ => ErrorCode::NONE,
        }
    }

    async fn leave(
        &self,
        shard: &Rc<Shard>,
        req: LeaveGroupRequest,
        version: i16,
    ) -> LeaveGroupResponse {
        let group_id = req.group_id.0.to_string();
        let leaving: Vec<(String, Option<String>)> = if version >= 3 {
            req.members
                .iter()
                .map(|m| {
                    (
                        m.member_id.to_string(),
                        m.group_instance_id.as_ref().map(|s| s.to_string()),
                    )
                })
                .collect()
        } else {
            vec![(req.member_id.to_string(), None)]
        };
        let mut response = LeaveGroupResponse::default();
        let persist;
        {
            let mut groups = self.groups.borrow_mut();
            let Some(group) = groups.get_mut(&group_id) else {
                response.error_code = ErrorCode::UNKNOWN_MEMBER_ID.0;
                return response;
            };
            let mut removed = false;
            let mut codes = Vec::new();
            for (member_id, instance) in &leaving {
                let id = match instance {
                    Some(i) if member_id.is_empty() => group.static_members.get(i).cloned(),
                    _ => Some(member_id.clone()),
                };
                let code = match id {
                    Some(id) if group.members.contains_key(&id) => {
                        let fenced = instance
                            .as_ref()
                            .is_some_and(|i| group.members[&id].instance_id.as_ref() != Some(i));
                        if fenced {
                            ErrorCode::FENCED_INSTANCE_ID
                        } else {
                            group.remove_member(&id);
                            removed = true;
                            ErrorCode::NONE
                        }
                    }
                    _ => ErrorCode::UNKNOWN_MEMBER_ID,
                };
                codes.push(code);
            }
            persist = removed && group.after_removal(&self.config, Instant::now());
            if version >= 3 {
                response.members = leaving
                    .iter()
                    .zip(&codes)
                    .map(|((id, instance), code)| {
                        let mut r = MemberResponse::default();
                        r.member_id = sb(id);
                        r.group_instance_id = instance.as_deref().map(sb);
                        r.error_code = code.0;
                        r
                    })
                    .collect();
            } else {
                response.error_code = codes[0].0;
            }
        }
        if persist {
            let _ = self.persist_group(shard, &group_id).await;
        }
        response
    }

    async fn commit(&self, shard: &Rc<Shard>, req: OffsetCommitRequest) -> OffsetCommitResponse {
        let group_id = req.group_id.0.to_string();
        let member_id = req.member_id.to_string();
        let generation = req.generation_id_or_member_epoch;
        let check = {
            let mut groups = self.groups.borrow_mut();
            let group = groups
                .entry(group_id.clone())
                .or_insert_with(|| Group::new(&group_id));
            if let Some(cg) = &group.consumer {
                let table = shard.topics();
                let partitions: Vec<(consumer::TopicId, i32)> = req
                    .topics
                    .iter()
                    .filter_map(|t| table.get(&t.name.0).map(|topic| (topic.id, &t.partitions)))
                    .flat_map(|(id, ps)| ps.iter().map(move |p| (id, p.partition_index)))
                    .collect();
                cg.commit_check(&member_id, generation, &partitions)
            } else if group.fenced(
                &member_id,
                req.group_instance_id.as_ref().map(|s| s.as_str()),
            ) {
                ErrorCode::FENCED_INSTANCE_ID
            } else if generation < 0 && member_id.is_empty() {
                // A simple (standalone) commit: only for a group with no active members.
                if group.members.is_empty() {
                    ErrorCode::NONE
                } else {
                    ErrorCode::UNKNOWN_MEMBER_ID
                }
            } else if !group.members.contains_key(&member_id) {
                ErrorCode::UNKNOWN_MEMBER_ID
            } else if generation != group.generation {
                ErrorCode::ILLEGAL_GENERATION
            } else if group.state == State::CompletingRebalance {
                ErrorCode::REBALANCE_IN_PROGRESS
            } else {
                group.members[&member_id].last_heartbeat = Instant::now();
                ErrorCode::NONE
            }
        };
        let now = now_ms() as i64;
        let table = shard.topics();
        let mut records = Vec::new();
        let mut results: Vec<(String, Vec<PartitionOutcome>)> = Vec::new();
        for t in &req.topics {
            let topic = t.name.0.to_string();
            // Kafka refuses offsets of partitions that do not exist.
            let partitions = table.get(&topic).map_or(0, |t| t.partitions);
            let mut parts = Vec::new();
            for p in &t.partitions {
                let commit = OffsetCommit {
                    group: &group_id,
                    topic: &topic,
                    partition: p.partition_index,
                    partitions,
                    offset: p.committed_offset,
                    leader_epoch: p.committed_leader_epoch,
                    metadata: p.committed_metadata.as_deref(),
                    now_ms: now,
                };
                match commit.entry(check) {
                    Ok((record, value)) => {
                        records.push(record);
                        parts.push((p.partition_index, ErrorCode::NONE, Some(value)));
                    }
                    Err(code) => parts.push((p.partition_index, code, None)),
                }
            }
            results.push((topic, parts));
        }
        let written = self.persist(shard, &group_id, records).await;
        let mut response = OffsetCommitResponse::default();
        let mut groups = self.groups.borrow_mut();
        for (topic, parts) in results {
            let mut rt = OffsetCommitResponseTopic::default();
            rt.name = crate::handlers::topic_name(&topic);
            for (partition, code, value) in parts {
                let mut rp = OffsetCommitResponsePartition::default();
                rp.partition_index = partition;
                rp.error_code = match (&written, code.is_ok()) {
                    (Err(e), true) => e.0,
                    _ => code.0,
                };
                if let (Ok(()), Some(value)) = (&written, value) {
                    if let Some(g) = groups.get_mut(&group_id) {
                        g.offsets.insert((topic.clone(), partition), value);
                    }
                }
                rt.partitions.push(rp);
            }
            response.topics.push(rt);
        }
        response
    }

    fn fetch_offsets(
        &self,
        group: &str,
        topics: Option<Vec<(String, Vec<i32>)>>,
    ) -> Vec<Committed> {
        let groups = self.groups.borrow();
        let g = groups.get(group);
        let pending_txn = self.pending_txn.borrow();
        let lookup = |topic: &str, partition: i32| -> Committed {
            let v = g.and_then(|g| g.offsets.get(&(topic.to_string(), partition)));
            let pending = pending_txn
                .values()
                .flatten()
                .any(|(gr, t, p, _)| gr == group && t == topic && *p == partition);
            Committed {
                pending,
                topic: topic.to_string(),
                partition,
                offset: v.map_or(-1, |v| v.offset),
                leader_epoch: v.map_or(-1, |v| v.leader_epoch),
                metadata: v.map(|v| v.metadata.clone()).unwrap_or_default(),
            }
        };
        match topics {
            Some(list) => list
                .iter()
                .flat_map(|(t, parts)| parts.iter().map(move |p| (t, *p)))
                .map(|(t, p)| lookup(t, p))
                .collect(),
            None => {
                let mut all: Vec<Committed> = g
                    .map(|g| g.offsets.keys().map(|(t, p)| lookup(t, *p)).collect())
                    .unwrap_or_default();
                all.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
                all
            }
        }
    }

    fn describe(&self, group: &str, version: i16) -> DescribedGroup {
        let groups = self.groups.borrow();
        let mut d = DescribedGroup::default();
        d.group_id = GroupId(sb(group));
        let Some(g) = groups.get(group) else {
            d.group_state = sb("Dead");
            return d;
        };
        d.group_state = sb(g.state_name());
        if g.consumer.is_some() || g.share.is_some() {
            // ConsumerGroupDescribe and ShareGroupDescribe have their members.
            d.protocol_type = sb(g.type_name());
            return d;
        }
        d.protocol_type = sb(g.protocol_type.as_deref().unwrap_or(""));
        let protocol = if g.state == State::Stable || g.state == State::CompletingRebalance {
            g.protocol.clone().unwrap_or_default()
        } else {
            String::new()
        };
        d.protocol_data = sb(&protocol);
        d.members = g
            .members
            .values()
            .map(|m| {
                let mut dm = DescribedGroupMember::default();
                dm.member_id = sb(&m.id);
                if version >= 4 {
                    dm.group_instance_id = m.instance_id.as_deref().map(sb);
                }
                dm.client_id = sb(&m.client.client_id);
                dm.client_host = sb(&m.client.host);
                dm.member_metadata = m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default();
                dm.member_assignment = m.assignment.clone();
                dm
            })
            .collect();
        d
    }

    fn list(&self) -> Vec<ListedGroup> {
        let groups = self.groups.borrow();
        let mut out: Vec<ListedGroup> = groups
            .values()
            // A group known only by configs set for it (Kafka lists it once it has members).
            .filter(|g| !g.is_bare())
            .map(|g| {
                let mut l = ListedGroup::default();
                l.group_id = GroupId(sb(&g.id));
                l.group_type = sb(g.type_name());
                if g.consumer.is_some() || g.share.is_some() {
                    l.protocol_type = sb(g.type_name());
                } else {
                    l.protocol_type = sb(g.protocol_type.as_deref().unwrap_or(""));
                }
                l.group_state = sb(g.state_name());
                l
            })
            .collect();
        out.sort_by(|a, b| a.group_id.0.cmp(&b.group_id.0));
        out
    }

    async fn delete(&self, shard: &Rc<Shard>, group_id: &str) -> ErrorCode {
        let records = {
            let groups = self.groups.borrow();
            let Some(g) = groups.get(group_id) else {
                return ErrorCode::GROUP_ID_NOT_FOUND;
            };
            if !g.is_empty() {
                return ErrorCode::NON_EMPTY_GROUP;
            }
            let mut records: Vec<_> = g
                .offsets
                .keys()
                .filter_map(|(t, p)| records::offset_record(group_id, t, *p, None).ok())
                .collect();
            records.extend(records::group_record(group_id, None).ok());
            if g.consumer.is_some() {
                records.extend(records::consumer_group_record(group_id, None).ok());
            }
            if let Some(sg) = &g.share {
                for (t, p) in sg.partitions.keys() {
                    records.extend(records::share_partition_record(group_id, t, *p, None).ok());
                }
                records.extend(records::share_group_record(group_id, None).ok());
            }
            if !g.configs.is_empty() {
                records.extend(records::group_config_record(group_id, None).ok());
            }
            records
        };
        match self.persist(shard, group_id, records).await {
            Ok(()) => {
                self.groups.borrow_mut().remove(group_id);
                ErrorCode::NONE
            }
            Err(code) => code,
        }
    }

    async fn delete_offsets(
        &self,
        shard: &Rc<Shard>,
        req: OffsetDeleteRequest,
    ) -> OffsetDeleteResponse {
        let group_id = req.group_id.0.to_string();
        let mut response = OffsetDeleteResponse::default();
        let (subscribed, exists) = {
            let groups = self.groups.borrow();
            match groups.get(&group_id) {
                Some(g) => (g.subscribed_topics(), true),
                None => (HashSet::new(), false),
            }
        };
        if !exists {
            response.error_code = ErrorCode::GROUP_ID_NOT_FOUND.0;
            return response;
        }
        let mut records = Vec::new();
        let mut deleted = Vec::new();
        for t in &req.topics {
            let topic = t.name.0.to_string();
            let mut rt = OffsetDeleteResponseTopic::default();
            rt.name = t.name.clone();
            for p in &t.partitions {
                let mut rp = OffsetDeleteResponsePartition::default();
                rp.partition_index = p.partition_index;
                if subscribed.contains(&topic) {
                    rp.error_code = ErrorCode::GROUP_SUBSCRIBED_TO_TOPIC.0;
                } else if let Ok(r) =
                    records::offset_record(&group_id, &topic, p.partition_index, None)
                {
                    records.push(r);
                    deleted.push((topic.clone(), p.partition_index));
                }
                rt.partitions.push(rp);
            }
            response.topics.push(rt);
        }
        if let Err(code) = self.persist(shard, &group_id, records).await {
            response.error_code = code.0;
            return response;
        }
        if let Some(g) = self.groups.borrow_mut().get_mut(&group_id) {
            for key in deleted {
                g.offsets.remove(&key);
            }
        }
        response
    }

    /// Evicts members whose session timed out, completes join phases whose deadline passed, and
    /// expires committed offsets of empty groups after `offsets.retention.minutes`.
    async fn tick(&self, shard: &Rc<Shard>) {
        let now = Instant::now();
        let mut to_persist = Vec::new();
        {
            let mut groups = self.groups.borrow_mut();
            for g in groups.values_mut() {
                g.pending_members.retain(|_, expires| *expires > now);
                // As in Kafka, a member waiting in JoinGroup is kept alive by that wait; any
                // other whose session ran out is removed, in the join phase too: a member that
                // vanished mid-rebalance must not hold the group there until the rebalance
                // timeout (max.poll.interval.ms, five minutes by default).
                let expired: Vec<String> = match g.state {
                    State::Stable | State::CompletingRebalance | State::PreparingRebalance => g
                        .members
                        .values()
                        .filter(|m| {
                            m.awaiting_join.is_none()
                                && now.duration_since(m.last_heartbeat) > m.session_timeout
                        })
                        .map(|m| m.id.clone())
                        .collect(),
                    State::Empty => Vec::new(),
                };
                let mut persist = false;
                if !expired.is_empty() {
                    for id in &expired {
                        tracing::info!(group = %g.id, member = %id, "member session expired");
                        g.remove_member(id);
                    }
                    persist = g.after_removal(&self.config, now);
                }
                if g.state == State::PreparingRebalance {
                    persist |= g.maybe_complete_join(now);
                }
                if persist {
                    to_persist.push(g.id.clone());
                }
            }
        }
        for group in to_persist {
            let _ = self.persist_group(shard, &group).await;
        }
        self.expire_consumer_members(shard, now).await;
        self.expire_share(shard, now).await;
        let interval = Duration::from_millis(self.config.offsets_retention_check_interval_ms);
        if now.duration_since(self.last_expiry_check.get()) >= interval {
            self.last_expiry_check.set(now);
            self.expire_offsets(shard).await;
        }
    }

    async fn expire_offsets(&self, shard: &Rc<Shard>) {
        let cutoff = now_ms() as i64 - self.config.offsets_retention_ms as i64;
        let mut work = Vec::new();
        {
            let groups = self.groups.borrow();
            for g in groups
                .values()
                .filter(|g| g.state == State::Empty && g.is_empty() && g.share.is_none())
            {
                let expired: Vec<(String, i32)> = g
                    .offsets
                    .iter()
                    .filter(|(_, v)| v.commit_timestamp_ms < cutoff)
                    .map(|(k, _)| k.clone())
                    .collect();
                if !expired.is_empty() {
                    work.push((g.id.clone(), expired, g.offsets.len()));
                }
            }
        }
        for (group, expired, total) in work {
            let mut records: Vec<_> = expired
                .iter()
                .filter_map(|(t, p)| records::offset_record(&group, t, *p, None).ok())
                .collect();
            let emptied = expired.len() == total;
            if emptied {
                records.extend(records::group_record(&group, None).ok());
                records.extend(records::consumer_group_record(&group, None).ok());
            }
            if self.persist(shard, &group, records).await.is_ok() {
                let mut groups = self.groups.borrow_mut();
                if emptied {
                    groups.remove(&group);
                } else if let Some(g) = groups.get_mut(&group) {
                    for key in &expired {
                        g.offsets.remove(key);
                    }
                }
                tracing::info!(%group, expired = expired.len(), "committed offsets expired");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_partition_matches_kafka() {
        // Java: "my-group".hashCode() == -1906497762; abs (masked) mod 50 == 36.
        assert_eq!(partition_for_group("my-group", 50), 36);
        assert!((0..50).contains(&partition_for_group("\u{1F600}-emoji", 50)));
    }
}
