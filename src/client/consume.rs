//! `strom consume TOPIC`: prints a topic's records (as `kcat -C` and `rpk topic consume`) from any
//! Kafka-compatible cluster, every partition, formatted with kcat's `%k %v %p %o %T %h`.
//!
//! Without `--group` it reads every partition from `--from`. With `--group` it is a member of
//! that consumer group (Kafka's classic protocol, the `range` assignor, so it shares partitions
//! with other members, strom's or any Kafka client's): it starts each assigned partition at the
//! group's committed offset (else at `--from`), heartbeats, rejoins on a rebalance, commits what
//! it printed every few seconds and when it stops, and leaves the group at the end.
//!
//! It stops after `--num` records, on SIGINT/SIGTERM, or when standard output closes; exit status
//! 0 then, 1 on an error (unknown topic, unreachable cluster, an error the broker gives).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::consumer_protocol_assignment::TopicPartition as AssignedTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
use kafka_protocol::messages::leave_group_request::MemberIdentity;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::offset_commit_request::{
    OffsetCommitRequestPartition, OffsetCommitRequestTopic,
};
use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
use kafka_protocol::messages::{
    ApiKey, BrokerId, ConsumerProtocolAssignment, ConsumerProtocolSubscription, FetchRequest,
    FetchResponse, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, HeartbeatRequest,
    HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListOffsetsRequest, ListOffsetsResponse, OffsetCommitRequest, OffsetCommitResponse,
    OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::cluster::{retriable, BrokerConnection, Cluster, TopicLayout};
use super::fetch_session::FetchSession;
use super::records::{self, ConsumedRecord};
use crate::model::ErrorCode;

const SESSION_TIMEOUT_MS: i32 = 10_000;
const REBALANCE_TIMEOUT_MS: i32 = 30_000;
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(3);
const COMMIT_INTERVAL: Duration = Duration::from_secs(5);
const FETCH_WAIT_MS: i32 = 500;
const ASSIGNOR: &str = "range";

/// Where to start a partition that has no committed offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartFrom {
    Beginning,
    End,
    /// An absolute offset, or with a negative value that many records before the end.
    Offset(i64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
}

pub fn parse_from(s: &str) -> Result<StartFrom> {
    Ok(match s {
        "beginning" | "earliest" | "start" => StartFrom::Beginning,
        "end" | "latest" => StartFrom::End,
        _ => {
            if let Some(ts) = s.strip_prefix('@') {
                StartFrom::Timestamp(
                    ts.parse()
                        .with_context(|| format!("--from @TIMESTAMP_MS, not '{s}'"))?,
                )
            } else {
                StartFrom::Offset(s.parse().with_context(|| {
                    format!("--from takes beginning, end, OFFSET or @TIMESTAMP_MS, not '{s}'")
                })?)
            }
        }
    })
}

/// One piece of a `--format`.
#[derive(Clone, Debug, PartialEq)]
pub enum Token {
    Text(Vec<u8>),
    Key,
    Value,
    Partition,
    Offset,
    Timestamp,
    Headers,
}

/// Parses kcat's format: `%k %v %p %o %T %h`, `%%`, and the escapes `\n \t \r \\`.
pub fn parse_format(fmt: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut text = Vec::new();
    let mut chars = fmt.chars().peekable();
    let flush = |text: &mut Vec<u8>, tokens: &mut Vec<Token>| {
        if !text.is_empty() {
            tokens.push(Token::Text(std::mem::take(text)));
        }
    };
    while let Some(c) = chars.next() {
        match (c, chars.peek().copied()) {
            ('%', Some(n)) => {
                let token = match n {
                    'k' => Some(Token::Key),
                    'v' => Some(Token::Value),
                    'p' => Some(Token::Partition),
                    'o' => Some(Token::Offset),
                    'T' => Some(Token::Timestamp),
                    'h' => Some(Token::Headers),
                    _ => None,
                };
                chars.next();
                match token {
                    Some(t) => {
                        flush(&mut text, &mut tokens);
                        tokens.push(t);
                    }
                    None if n == '%' => text.push(b'%'),
                    None => {
                        text.push(b'%');
                        let mut buf = [0u8; 4];
                        text.extend_from_slice(n.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            ('\\', Some(n)) => {
                chars.next();
                match n {
                    'n' => text.push(b'\n'),
                    't' => text.push(b'\t'),
                    'r' => text.push(b'\r'),
                    '\\' => text.push(b'\\'),
                    other => {
                        text.push(b'\\');
                        let mut buf = [0u8; 4];
                        text.extend_from_slice(other.encode_utf8(&mut buf).as_bytes());
                    }
                }
            }
            (c, _) => {
                let mut buf = [0u8; 4];
                text.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    flush(&mut text, &mut tokens);
    tokens
}

/// Writes one record as the format says.
pub fn format_record(out: &mut Vec<u8>, tokens: &[Token], partition: i32, r: &ConsumedRecord) {
    for t in tokens {
        match t {
            Token::Text(s) => out.extend_from_slice(s),
            Token::Key => out.extend_from_slice(r.key.as_deref().unwrap_or_default()),
            Token::Value => out.extend_from_slice(r.value.as_deref().unwrap_or_default()),
            Token::Partition => out.extend_from_slice(partition.to_string().as_bytes()),
            Token::Offset => out.extend_from_slice(r.offset.to_string().as_bytes()),
            Token::Timestamp => out.extend_from_slice(r.timestamp.to_string().as_bytes()),
            Token::Headers => {
                for (i, (k, v)) in r.headers.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(k);
                    out.push(b'=');
                    out.extend_from_slice(v.as_deref().unwrap_or_default());
                }
            }
        }
    }
}

pub struct ConsumeOptions {
    pub topic: String,
    pub bootstrap: String,
    pub from: StartFrom,
    pub group: Option<String>,
    pub num: Option<u64>,
    pub format: String,
}

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Encodes a consumer-protocol message behind its version, as JoinGroup and SyncGroup carry them.
fn versioned<M: Encodable>(m: &M, version: i16) -> Result<Bytes> {
    let mut buf = BytesMut::new();
    buf.put_i16(version);
    m.encode(&mut buf, version)?;
    Ok(buf.freeze())
}

fn unversioned<M: Decodable>(mut data: Bytes, newest: i16) -> Result<M> {
    if data.remaining() < 2 {
        bail!("consumer protocol message shorter than its version");
    }
    let version = data.get_i16().clamp(0, newest);
    M::decode(&mut data, version)
}

/// The `range` assignor: each topic's partitions in order, split over the members subscribed to
/// it (sorted by member id), the first ones taking one more when it does not divide evenly.
pub fn range_assign(
    subscriptions: &BTreeMap<String, Vec<String>>,
    partitions: &HashMap<String, Vec<i32>>,
) -> BTreeMap<String, BTreeMap<String, Vec<i32>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<i32>>> = subscriptions
        .keys()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    let mut topics: Vec<&String> = subscriptions.values().flatten().collect();
    topics.sort();
    topics.dedup();
    for topic in topics {
        let Some(parts) = partitions.get(topic) else {
            continue;
        };
        let members: Vec<&String> = subscriptions
            .iter()
            .filter(|(_, ts)| ts.contains(topic))
            .map(|(m, _)| m)
            .collect();
        let n = members.len().max(1);
        let (each, extra) = (parts.len() / n, parts.len() % n);
        let mut at = 0;
        for (i, m) in members.iter().enumerate() {
            let take = each + usize::from(i < extra);
            let mine = parts[at..at + take].to_vec();
            at += take;
            if let Some(entry) = out.get_mut(*m) {
                entry.insert(topic.clone(), mine);
            }
        }
    }
    out
}

/// This process as a member of a consumer group.
struct Membership {
    group: String,
    topic: String,
    coordinator: BrokerConnection,
    member_id: String,
    generation: i32,
    last_heartbeat: Instant,
    last_commit: Instant,
    committed: BTreeMap<i32, i64>,
}

enum Heartbeat {
    Fine,
    Rejoin,
}

impl Membership {
    fn find(cluster: &mut Cluster, group: &str, topic: &str) -> Result<Membership> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut req = FindCoordinatorRequest::default();
            req.key = sb(group);
            req.key_type = 0;
            let resp: FindCoordinatorResponse =
                cluster.any()?.call(ApiKey::FindCoordinator, &req)?;
            if resp.error_code == 0 {
                let address = format!("{}:{}", resp.host, resp.port);
                let coordinator = BrokerConnection::open(&address)
                    .with_context(|| format!("group coordinator {address}"))?;
                return Ok(Membership {
                    group: group.to_string(),
                    topic: topic.to_string(),
                    coordinator,
                    member_id: String::new(),
                    generation: -1,
                    last_heartbeat: Instant::now(),
                    last_commit: Instant::now(),
                    committed: BTreeMap::new(),
                });
            }
            if !retriable(resp.error_code) || attempt >= 10 {
                bail!(
                    "finding the coordinator of group {group}: {}",
                    ErrorCode(resp.error_code).name()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Joins (or rejoins) the group and returns this member's partitions of the topic.
    fn join(&mut self, cluster: &mut Cluster) -> Result<Vec<i32>> {
        loop {
            let subscription = {
                let mut s = ConsumerProtocolSubscription::default();
                s.topics = vec![sb(&self.topic)];
                versioned(&s, 0)?
            };
            let mut req = JoinGroupRequest::default();
            req.group_id = GroupId(sb(&self.group));
            req.session_timeout_ms = SESSION_TIMEOUT_MS;
            req.rebalance_timeout_ms = REBALANCE_TIMEOUT_MS;
            req.member_id = sb(&self.member_id);
            req.protocol_type = sb("consumer");
            let mut protocol = JoinGroupRequestProtocol::default();
            protocol.name = sb(ASSIGNOR);
            protocol.metadata = subscription;
            req.protocols = vec![protocol];
            let resp: JoinGroupResponse = self.coordinator.call(ApiKey::JoinGroup, &req)?;
            match resp.error_code {
                0 => {}
                // KIP-394: the first join only hands out a member id.
                79 => {
                    self.member_id = resp.member_id.to_string();
                    continue;
                }
                25 => {
                    self.member_id.clear();
                    continue;
                }
                27 => continue,
                code => bail!("joining group {}: {}", self.group, ErrorCode(code).name()),
            }
            self.member_id = resp.member_id.to_string();
            self.generation = resp.generation_id;
            let assignments = if resp.leader == resp.member_id {
                self.assign(cluster, &resp)?
            } else {
                Vec::new()
            };
            let mut sync = SyncGroupRequest::default();
            sync.group_id = GroupId(sb(&self.group));
            sync.generation_id = self.generation;
            sync.member_id = sb(&self.member_id);
            sync.protocol_type = Some(sb("consumer"));
            sync.protocol_name = resp.protocol_name.clone();
            sync.assignments = assignments;
            let synced: SyncGroupResponse = self.coordinator.call(ApiKey::SyncGroup, &sync)?;
            match synced.error_code {
                0 => {}
                27 | 22 => continue,
                25 => {
                    self.member_id.clear();
                    continue;
                }
                code => bail!("syncing group {}: {}", self.group, ErrorCode(code).name()),
            }
            self.last_heartbeat = Instant::now();
            if synced.assignment.is_empty() {
                return Ok(Vec::new());
            }
            let assignment: ConsumerProtocolAssignment = unversioned(synced.assignment, 3)?;
            let mut mine: Vec<i32> = assignment
                .assigned_partitions
                .iter()
                .filter(|t| t.topic.0.as_str() == self.topic)
                .flat_map(|t| t.partitions.iter().copied())
                .collect();
            mine.sort_unstable();
            return Ok(mine);
        }
    }

    /// The leader's part: every member's assignment of every topic any member subscribed to.
    fn assign(
        &self,
        cluster: &mut Cluster,
        resp: &JoinGroupResponse,
    ) -> Result<Vec<SyncGroupRequestAssignment>> {
        let mut subscriptions = BTreeMap::new();
        for m in &resp.members {
            let s: ConsumerProtocolSubscription = unversioned(m.metadata.clone(), 3)?;
            subscriptions.insert(
                m.member_id.to_string(),
                s.topics.iter().map(ToString::to_string).collect::<Vec<_>>(),
            );
        }
        let mut partitions = HashMap::new();
        for topic in subscriptions.values().flatten() {
            if !partitions.contains_key(topic) {
                if let Ok(layout) = cluster.topic(topic, false) {
                    partitions.insert(topic.clone(), layout.partitions);
                }
            }
        }
        range_assign(&subscriptions, &partitions)
            .into_iter()
            .map(|(member, topics)| {
                let mut a = ConsumerProtocolAssignment::default();
                a.assigned_partitions = topics
                    .into_iter()
                    .map(|(t, ps)| {
                        let mut at = AssignedTopic::default();
                        at.topic = TopicName(sb(&t));
                        at.partitions = ps;
                        at
                    })
                    .collect();
                let mut sa = SyncGroupRequestAssignment::default();
                sa.member_id = sb(&member);
                sa.assignment = versioned(&a, 0)?;
                Ok(sa)
            })
            .collect()
    }

    fn heartbeat_if_due(&mut self) -> Result<Heartbeat> {
        if self.last_heartbeat.elapsed() < HEARTBEAT_INTERVAL {
            return Ok(Heartbeat::Fine);
        }
        self.last_heartbeat = Instant::now();
        let mut req = HeartbeatRequest::default();
        req.group_id = GroupId(sb(&self.group));
        req.generation_id = self.generation;
        req.member_id = sb(&self.member_id);
        let resp: HeartbeatResponse = self.coordinator.call(ApiKey::Heartbeat, &req)?;
        match resp.error_code {
            0 => Ok(Heartbeat::Fine),
            27 | 22 => Ok(Heartbeat::Rejoin),
            25 => {
                self.member_id.clear();
                Ok(Heartbeat::Rejoin)
            }
            code => bail!(
                "heartbeat to group {}: {}",
                self.group,
                ErrorCode(code).name()
            ),
        }
    }

    /// The group's committed offsets of `partitions` (absent where none is).
    fn committed(&mut self, partitions: &[i32]) -> Result<BTreeMap<i32, i64>> {
        let mut req = OffsetFetchRequest::default();
        req.group_id = GroupId(sb(&self.group));
        let mut t = OffsetFetchRequestTopic::default();
        t.name = TopicName(sb(&self.topic));
        t.partition_indexes = partitions.to_vec();
        req.topics = Some(vec![t]);
        let resp: OffsetFetchResponse = self.coordinator.call(ApiKey::OffsetFetch, &req)?;
        if resp.error_code != 0 {
            bail!(
                "committed offsets of group {}: {}",
                self.group,
                ErrorCode(resp.error_code).name()
            );
        }
        let mut out = BTreeMap::new();
        for t in resp.topics {
            for p in t.partitions {
                if p.error_code == 0 && p.committed_offset >= 0 {
                    out.insert(p.partition_index, p.committed_offset);
                }
            }
        }
        self.committed = out.clone();
        Ok(out)
    }

    /// Commits `positions` (the next offset to read per partition) where they moved.
    fn commit(&mut self, positions: &BTreeMap<i32, i64>) -> Result<()> {
        self.last_commit = Instant::now();
        let changed: Vec<(i32, i64)> = positions
            .iter()
            .filter(|(p, o)| self.committed.get(p) != Some(o))
            .map(|(p, o)| (*p, *o))
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let mut req = OffsetCommitRequest::default();
        req.group_id = GroupId(sb(&self.group));
        req.generation_id_or_member_epoch = self.generation;
        req.member_id = sb(&self.member_id);
        req.retention_time_ms = -1;
        let mut t = OffsetCommitRequestTopic::default();
        t.name = TopicName(sb(&self.topic));
        t.partitions = changed
            .iter()
            .map(|(p, o)| {
                let mut cp = OffsetCommitRequestPartition::default();
                cp.partition_index = *p;
                cp.committed_offset = *o;
                cp.committed_leader_epoch = -1;
                cp.committed_metadata = Some(StrBytes::default());
                cp
            })
            .collect();
        req.topics = vec![t];
        let resp: OffsetCommitResponse = self.coordinator.call(ApiKey::OffsetCommit, &req)?;
        for t in resp.topics {
            for p in t.partitions {
                if p.error_code != 0 {
                    bail!(
                        "committing {}-{} for group {}: {}",
                        self.topic,
                        p.partition_index,
                        self.group,
                        ErrorCode(p.error_code).name()
                    );
                }
            }
        }
        for (p, o) in changed {
            self.committed.insert(p, o);
        }
        Ok(())
    }

    fn leave(&mut self) -> Result<()> {
        let mut req = LeaveGroupRequest::default();
        req.group_id = GroupId(sb(&self.group));
        if self.coordinator.version(ApiKey::LeaveGroup)? >= 3 {
            let mut m = MemberIdentity::default();
            m.member_id = sb(&self.member_id);
            if self.coordinator.version(ApiKey::LeaveGroup)? >= 5 {
                m.reason = Some(sb("strom consume stopped"));
            }
            req.members = vec![m];
        } else {
            req.member_id = sb(&self.member_id);
        }
        let resp: LeaveGroupResponse = self.coordinator.call(ApiKey::LeaveGroup, &req)?;
        if resp.error_code != 0 {
            bail!(
                "leaving group {}: {}",
                self.group,
                ErrorCode(resp.error_code).name()
            );
        }
        Ok(())
    }
}

/// ListOffsets on each partition's leader: earliest (-2), latest (-1) or a timestamp.
fn list_offsets(
    cluster: &mut Cluster,
    layout: &TopicLayout,
    topic: &str,
    partitions: &[i32],
    timestamp: i64,
) -> Result<BTreeMap<i32, i64>> {
    let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in partitions {
        by_leader
            .entry(layout.leaders.get(p).copied().unwrap_or(-1))
            .or_default()
            .push(*p);
    }
    let mut out = BTreeMap::new();
    for (leader, ps) in by_leader {
        let mut req = ListOffsetsRequest::default();
        req.replica_id = BrokerId(-1);
        let mut t = ListOffsetsTopic::default();
        t.name = TopicName(sb(topic));
        t.partitions = ps
            .iter()
            .map(|p| {
                let mut lp = ListOffsetsPartition::default();
                lp.partition_index = *p;
                lp.timestamp = timestamp;
                lp.current_leader_epoch = -1;
                lp
            })
            .collect();
        req.topics = vec![t];
        let resp: ListOffsetsResponse = cluster.broker(leader)?.call(ApiKey::ListOffsets, &req)?;
        for t in resp.topics {
            for p in t.partitions {
                if p.error_code != 0 {
                    bail!(
                        "offsets of {topic}-{}: {}",
                        p.partition_index,
                        ErrorCode(p.error_code).name()
                    );
                }
                out.insert(p.partition_index, p.offset);
            }
        }
    }
    Ok(out)
}

/// Where each partition starts when nothing is committed for it.
fn start_positions(
    cluster: &mut Cluster,
    layout: &TopicLayout,
    topic: &str,
    partitions: &[i32],
    from: StartFrom,
) -> Result<BTreeMap<i32, i64>> {
    if partitions.is_empty() {
        return Ok(BTreeMap::new());
    }
    Ok(match from {
        StartFrom::Beginning => list_offsets(cluster, layout, topic, partitions, -2)?,
        StartFrom::End => list_offsets(cluster, layout, topic, partitions, -1)?,
        StartFrom::Offset(o) if o >= 0 => partitions.iter().map(|p| (*p, o)).collect(),
        StartFrom::Offset(back) => {
            let earliest = list_offsets(cluster, layout, topic, partitions, -2)?;
            let end = list_offsets(cluster, layout, topic, partitions, -1)?;
            end.into_iter()
                .map(|(p, e)| {
                    let floor = earliest.get(&p).copied().unwrap_or(0);
                    (p, (e + back).max(floor))
                })
                .collect()
        }
        StartFrom::Timestamp(ts) => {
            let at = list_offsets(cluster, layout, topic, partitions, ts)?;
            let end = list_offsets(cluster, layout, topic, partitions, -1)?;
            // No record at or after the time: start at the end.
            at.into_iter()
                .map(|(p, o)| {
                    (
                        p,
                        if o < 0 {
                            end.get(&p).copied().unwrap_or(0)
                        } else {
                            o
                        },
                    )
                })
                .collect()
        }
    })
}

/// Runs the consumer; returns how many records it printed.
pub fn run(options: &ConsumeOptions) -> Result<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())?;
    }
    let tokens = parse_format(&options.format);
    let mut cluster = Cluster::new(&options.bootstrap)?;
    let mut layout = cluster.topic(&options.topic, false)?;
    let mut membership = match &options.group {
        Some(g) => Some(Membership::find(&mut cluster, g, &options.topic)?),
        None => None,
    };
    let mut positions = assign(&mut cluster, &layout, options, membership.as_mut())?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut printed = 0u64;
    let mut line = Vec::new();
    let wanted = options.num.unwrap_or(u64::MAX);
    let mut sessions: HashMap<i32, FetchSession> = HashMap::new();
    'consume: while printed < wanted && !stop.load(Ordering::Relaxed) {
        if let Some(m) = membership.as_mut() {
            if let Heartbeat::Rejoin = m.heartbeat_if_due()? {
                m.commit(&positions).ok();
                positions = assign(&mut cluster, &layout, options, Some(m))?;
                continue;
            }
            if m.last_commit.elapsed() >= COMMIT_INTERVAL {
                m.commit(&positions)?;
            }
        }
        if positions.is_empty() {
            std::thread::sleep(Duration::from_millis(FETCH_WAIT_MS as u64));
            continue;
        }
        let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for p in positions.keys() {
            by_leader
                .entry(layout.leaders.get(p).copied().unwrap_or(-1))
                .or_default()
                .push(*p);
        }
        let mut refresh = false;
        let wait = FETCH_WAIT_MS / i32::try_from(by_leader.len()).unwrap_or(1).max(1);
        for (leader, ps) in by_leader {
            if leader < 0 {
                refresh = true;
                continue;
            }
            let mut req = FetchRequest::default();
            req.replica_id = BrokerId(-1);
            req.max_wait_ms = wait;
            req.min_bytes = 1;
            req.max_bytes = 50 << 20;
            let offsets: BTreeMap<i32, i64> = ps
                .iter()
                .map(|p| (*p, positions.get(p).copied().unwrap_or(0)))
                .collect();
            // An incremental fetch session per leader: after the first request only moved
            // positions are sent, and only partitions with news come back.
            let session = sessions.entry(leader).or_default();
            let mut ft = FetchTopic::default();
            ft.topic = TopicName(sb(&options.topic));
            ft.partitions = session
                .next(&mut req, &offsets)
                .into_iter()
                .map(|(p, o)| {
                    let mut fp = FetchPartition::default();
                    fp.partition = p;
                    fp.fetch_offset = o;
                    fp.partition_max_bytes = 1 << 20;
                    fp.current_leader_epoch = -1;
                    fp.log_start_offset = -1;
                    fp
                })
                .collect();
            if !ft.partitions.is_empty() {
                req.topics = vec![ft];
            }
            let resp: FetchResponse = match cluster.broker(leader) {
                Ok(b) => match b.call(ApiKey::Fetch, &req) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("strom consume: fetch from broker {leader}: {e:#}");
                        cluster.drop_broker(leader);
                        session.id = 0;
                        refresh = true;
                        continue;
                    }
                },
                Err(e) => {
                    eprintln!("strom consume: {e:#}");
                    session.id = 0;
                    refresh = true;
                    continue;
                }
            };
            if session.answered(&resp) {
                // The broker lost the session: the next request opens a new one.
                continue;
            }
            if resp.error_code != 0 {
                bail!("fetch: {}", ErrorCode(resp.error_code).name());
            }
            for t in resp.responses {
                for pd in t.partitions {
                    let p = pd.partition_index;
                    match pd.error_code {
                        0 => {}
                        1 => {
                            // OFFSET_OUT_OF_RANGE: the records were deleted (or the offset given
                            // lies beyond the end): start over from the earliest one.
                            let reset =
                                list_offsets(&mut cluster, &layout, &options.topic, &[p], -2)?;
                            if let Some(o) = reset.get(&p) {
                                positions.insert(p, *o);
                            }
                            continue;
                        }
                        code if retriable(code) => {
                            refresh = true;
                            continue;
                        }
                        code => bail!("fetch {}-{p}: {}", options.topic, ErrorCode(code).name()),
                    }
                    let Some(data) = pd.records else { continue };
                    let Some(&from) = positions.get(&p) else {
                        continue;
                    };
                    let mut next = from;
                    let mut write_failed = None;
                    records::for_each(&data, from, |r| {
                        line.clear();
                        format_record(&mut line, &tokens, p, &r);
                        if let Err(e) = out.write_all(&line) {
                            write_failed = Some(e);
                            return false;
                        }
                        next = r.offset + 1;
                        printed += 1;
                        printed < wanted
                    })?;
                    positions.insert(p, next);
                    if let Some(e) = write_failed {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            break 'consume;
                        }
                        return Err(e.into());
                    }
                    if printed >= wanted {
                        break 'consume;
                    }
                }
            }
        }
        if let Err(e) = out.flush() {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                break;
            }
            return Err(e.into());
        }
        if refresh {
            std::thread::sleep(Duration::from_millis(200));
            layout = cluster.topic(&options.topic, false)?;
        }
    }
    let _ = out.flush();
    if let Some(m) = membership.as_mut() {
        m.commit(&positions)?;
        m.leave()?;
    }
    Ok(printed)
}

/// The partitions to read and where to start each: every partition without a group; with one,
/// this member's assignment, at the group's committed offsets.
fn assign(
    cluster: &mut Cluster,
    layout: &TopicLayout,
    options: &ConsumeOptions,
    membership: Option<&mut Membership>,
) -> Result<BTreeMap<i32, i64>> {
    let Some(m) = membership else {
        return start_positions(
            cluster,
            layout,
            &options.topic,
            &layout.partitions,
            options.from,
        );
    };
    let mine = m.join(cluster)?;
    let committed = m.committed(&mine)?;
    let missing: Vec<i32> = mine
        .iter()
        .filter(|p| !committed.contains_key(p))
        .copied()
        .collect();
    let mut positions = start_positions(cluster, layout, &options.topic, &missing, options.from)?;
    positions.extend(committed);
    Ok(positions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_tokens_and_escapes() {
        let t = parse_format("%k=%v %p:%o@%T [%h]\\t100%%\\n");
        let r = ConsumedRecord {
            offset: 7,
            timestamp: 1234,
            key: Some(Bytes::from_static(b"key")),
            value: Some(Bytes::from_static(b"val")),
            headers: vec![(Bytes::from_static(b"a"), Some(Bytes::from_static(b"1")))],
        };
        let mut out = Vec::new();
        format_record(&mut out, &t, 3, &r);
        assert_eq!(out, b"key=val 3:7@1234 [a=1]\t100%\n");
    }

    #[test]
    fn range_assignor_splits_like_kafka() {
        let subs: BTreeMap<String, Vec<String>> = [
            ("a".to_string(), vec!["t".to_string()]),
            ("b".to_string(), vec!["t".to_string()]),
        ]
        .into();
        let parts: HashMap<String, Vec<i32>> = [("t".to_string(), vec![0, 1, 2])].into();
        let got = range_assign(&subs, &parts);
        assert_eq!(got["a"]["t"], vec![0, 1]);
        assert_eq!(got["b"]["t"], vec![2]);
    }

    #[test]
    fn from_parses() {
        assert_eq!(parse_from("beginning").unwrap(), StartFrom::Beginning);
        assert_eq!(parse_from("end").unwrap(), StartFrom::End);
        assert_eq!(parse_from("42").unwrap(), StartFrom::Offset(42));
        assert_eq!(parse_from("-10").unwrap(), StartFrom::Offset(-10));
        assert_eq!(
            parse_from("@1700000000000").unwrap(),
            StartFrom::Timestamp(1_700_000_000_000)
        );
        assert!(parse_from("soon").is_err());
    }
}
