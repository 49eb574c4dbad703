//! The coordinator's side of KIP-932: ShareGroupHeartbeat, ShareFetch, ShareAcknowledge and
//! ShareGroupDescribe for the share groups this shard coordinates. A share group's state,
//! share-partitions included, lives with its coordinator (the shard owning the group's
//! `__consumer_offsets` partition), which reads records from whichever shard owns the data.
//!
//! The order of a ShareFetch: the share session is checked and moved on; the acknowledgements it
//! carries are applied and made durable; share-partitions seen for the first time are started
//! at `share.auto.offset.reset` (durably too); then records are read and acquired, waiting up to
//! `max_wait_ms` for some to arrive, come back from another member, or have their lock expire.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::share_acknowledge_response::{
    PartitionData as AckPartitionData, ShareAcknowledgeTopicResponse,
};
use kafka_protocol::messages::share_fetch_response::{
    AcquiredRecords, PartitionData, ShareFetchableTopicResponse,
};
use kafka_protocol::messages::share_group_describe_response::{
    Assignment as DescribedAssignment, DescribedGroup, Member as DescribedMember,
    TopicPartitions as DescribedPartitions,
};
use kafka_protocol::messages::share_group_heartbeat_response::{
    Assignment as BeatAssignment, TopicPartitions as BeatPartitions,
};
use kafka_protocol::messages::{
    GroupId, ShareAcknowledgeRequest, ShareAcknowledgeResponse, ShareFetchRequest,
    ShareFetchResponse, ShareGroupHeartbeatRequest, ShareGroupHeartbeatResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::consumer::TopicId;
use super::coordinator::{ClientInfo, Group, GroupCoordinator};
use super::records;
use super::share::{
    session_key, session_member, Limits, ShareGroup, ShareHeartbeat, SharePartition, ShareSession,
    INVALID_SHARE_SESSION_EPOCH, SHARE_SESSION_NOT_FOUND,
};
use super::share_remote;
use crate::model::{ErrorCode, Offset, TopicPartition};
use crate::shard::{first_of, join_all, PartitionRead, Reply, Request, Shard, WaitOver};
use crate::storage::batch::BatchHeader;
use crate::storage::txn::AbortedTxn;
use crate::storage::ReadResult;

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Bytes read per share-partition per fetch round.
const SHARE_READ_BYTES_MAX: usize = 1 << 20;
/// How long a waiting ShareFetch sleeps between looks at records released by other members.
const SHARE_WAIT_SLICE: Duration = Duration::from_millis(100);

/// One acknowledgement batch: first offset, last offset, types.
type AckBatch = (i64, i64, Vec<i8>);
/// Each acknowledged partition's result, and the share-partitions whose durable state changed.
type AckOutcome = (Vec<((TopicId, i32), ErrorCode)>, Vec<(String, i32)>);

/// The (first, last, never delivered) offsets of each whole batch in `bytes`, with where it ends.
/// Control batches (transaction markers) are never delivered, nor, for a `read_committed` read,
/// the batches of the aborted transactions in `aborted`.
fn batch_spans(bytes: &[u8], aborted: &[AbortedTxn]) -> Vec<(i64, i64, bool, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let Ok(h) = BatchHeader::parse(&bytes[pos..]) else {
            break;
        };
        if h.size_bytes == 0 || pos + h.size_bytes > bytes.len() {
            break;
        }
        pos += h.size_bytes;
        let first = h.base_offset.0;
        let in_aborted = h.is_transactional()
            && aborted.iter().any(|a| {
                a.producer_id == h.producer_id && a.first_offset <= first && first <= a.last_offset
            });
        out.push((first, h.last_offset().0, h.is_control() || in_aborted, pos));
    }
    out
}

/// Fairness: with several members fetching a share-partition, none may hold more than its share
/// of the in-flight window, so a member waiting is not starved by members that acknowledge and
/// re-acquire in one request. How many more records `member` may acquire there.
fn room_of(
    sessions: &BTreeMap<String, ShareSession>,
    key: (TopicId, i32),
    sp: &SharePartition,
    member: &str,
    limits: &Limits,
) -> usize {
    let fetching = sessions
        .values()
        .filter(|s| s.partitions.contains(&key))
        .count()
        .max(1);
    let share = (limits.record_locks_max / fetching).max(1);
    share.saturating_sub(sp.held_by(member))
}

/// The name and partition count of each topic id asked about that exists (`Shard::topic_by_id`,
/// not a pass over every topic: a ShareFetch names a few of them).
fn topics_by_id(
    shard: &Shard,
    ids: impl IntoIterator<Item = TopicId>,
) -> BTreeMap<TopicId, (String, i32)> {
    let table = shard.topics();
    ids.into_iter()
        .filter_map(|id| {
            let name = shard.topic_by_id(&uuid::Uuid::from_bytes(id))?;
            let partitions = table.get(&name)?.partitions;
            Some((id, (name.to_string(), partitions)))
        })
        .collect()
}

type BoxedFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T>>>;

/// Where a share-partition's records are read: a shard of this broker, or the broker leading
/// the partition in a cluster.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Shard(usize),
    Leader(i32),
}

fn source_of(shard: &Shard, tp: &TopicPartition) -> Source {
    match share_remote::remote_leader(shard, tp) {
        Some(leader) => Source::Leader(leader),
        None => Source::Shard(shard.owner_of(tp).0),
    }
}

/// Reads partitions from the shards that own them, or in a cluster from their leaders,
/// answered in order.
async fn read_partitions(
    shard: &Rc<Shard>,
    reads: Vec<PartitionRead>,
) -> Vec<Result<ReadResult, ErrorCode>> {
    let mut by_source: BTreeMap<Source, (Vec<usize>, Vec<PartitionRead>)> = BTreeMap::new();
    let count = reads.len();
    for (i, r) in reads.into_iter().enumerate() {
        let (at, list) = by_source.entry(source_of(shard, &r.tp)).or_default();
        at.push(i);
        list.push(r);
    }
    let calls = by_source.into_iter().map(|(source, (at, list))| {
        let shard = shard.clone();
        async move {
            let n = list.len();
            // Boxed: this call is made from within a shard's handling of a group call, and the
            // future types would otherwise contain themselves.
            let read: BoxedFuture<Vec<Result<ReadResult, ErrorCode>>> = match source {
                Source::Shard(owner) => Box::pin(async move {
                    match shard
                        .call(crate::model::ShardId(owner), Request::Read(list))
                        .await
                    {
                        Reply::Read(r) => r,
                        _ => vec![Err(ErrorCode::UNKNOWN_SERVER_ERROR); n],
                    }
                }),
                Source::Leader(leader) => Box::pin(async move {
                    share_remote::read(&shard, leader, &list, Duration::ZERO).await
                }),
            };
            (at, read.await)
        }
    });
    let mut out: Vec<Result<ReadResult, ErrorCode>> =
        vec![Err(ErrorCode::UNKNOWN_SERVER_ERROR); count];
    for (at, results) in join_all(calls.collect()).await {
        for (i, r) in at.into_iter().zip(results) {
            out[i] = r;
        }
    }
    out
}

/// Returns when one of `positions` has a record at or past it (new data for a share-partition),
/// or after `wait`.
async fn wait_for_records(
    shard: &Rc<Shard>,
    positions: Vec<(TopicPartition, Offset)>,
    wait: Duration,
    committed: bool,
) {
    let mut by_source: BTreeMap<Source, Vec<(TopicPartition, Offset)>> = BTreeMap::new();
    for (tp, offset) in positions {
        by_source
            .entry(source_of(shard, &tp))
            .or_default()
            .push((tp, offset));
    }
    let timeout_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
    let over = WaitOver::default();
    let mut waits: Vec<BoxedFuture<()>> = by_source
        .into_iter()
        .map(|(source, positions)| {
            let shard = shard.clone();
            let over = over.clone();
            match source {
                Source::Shard(owner) => Box::pin(async move {
                    shard
                        .call(
                            crate::model::ShardId(owner),
                            Request::WaitForData {
                                positions,
                                timeout_ms,
                                committed,
                                over: over.clone(),
                            },
                        )
                        .await;
                }) as BoxedFuture<()>,
                // A leader's long-poll Fetch of one byte from each position: it answers when
                // one of them has a record (whole, however large its batch) or after `wait`.
                Source::Leader(leader) => Box::pin(async move {
                    let reads: Vec<PartitionRead> = positions
                        .into_iter()
                        .map(|(tp, offset)| PartitionRead {
                            tp,
                            offset,
                            max_bytes: 1,
                            current_leader_epoch: -1,
                            committed,
                        })
                        .collect();
                    share_remote::read(&shard, leader, &reads, wait).await;
                }),
            }
        })
        .collect();
    if waits.is_empty() {
        glommio::timer::sleep(wait).await;
        return;
    }
    first_of(&mut waits, &over).await;
}

impl GroupCoordinator {
    /// The end offsets of a session's share-partitions: new records there can be acquired.
    ///
    /// Only share-partitions where `member` could acquire more: one whose in-flight window is
    /// full, or where the member holds its whole share, waits for acknowledgements and
    /// releases (`share_progress`) instead. Waiting on its records, which are there already,
    /// would wake at once, again and again, and keep the shard from everything else until the
    /// fetch's deadline (that stalled a 4-member queue for two minutes).
    fn share_positions(
        &self,
        group_id: &str,
        member: &str,
        session: &[(TopicId, i32)],
        names: &BTreeMap<TopicId, String>,
        limits: &Limits,
    ) -> Vec<(TopicPartition, Offset)> {
        let groups = self.groups.borrow();
        let Some(sg) = groups.get(group_id).and_then(|g| g.share.as_ref()) else {
            return Vec::new();
        };
        session
            .iter()
            .filter_map(|(id, p)| {
                let name = names.get(id)?;
                let sp = sg.partitions.get(&(name.clone(), *p))?;
                if sp.in_flight() >= limits.record_locks_max
                    || room_of(&sg.sessions, (*id, *p), sp, member, limits) == 0
                {
                    return None;
                }
                Some((TopicPartition::new(name, *p), Offset(sp.end_offset)))
            })
            .collect()
    }

    pub(super) fn share_limits(&self, group: Option<&Group>) -> Limits {
        let lock_ms = group
            .and_then(|g| g.config_value("share.record.lock.duration.ms"))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(self.config.group_share_record_lock_duration_ms);
        Limits {
            lock_duration: Duration::from_millis(lock_ms),
            delivery_count_limit: self.config.group_share_delivery_count_limit,
            record_locks_max: self.config.group_share_partition_record_locks_max,
            members_max: self.config.group_share_max_size,
            read_committed: group.and_then(|g| g.config_value("share.isolation.level"))
                == Some("read_committed"),
        }
    }

    /// ShareGroupHeartbeat: join, leave or keep-alive; answers the member's partitions.
    pub(super) async fn share_heartbeat(
        &self,
        shard: &Rc<Shard>,
        req: ShareGroupHeartbeatRequest,
        client: ClientInfo,
    ) -> ShareGroupHeartbeatResponse {
        let mut r = ShareGroupHeartbeatResponse::default();
        r.heartbeat_interval_ms =
            i32::try_from(self.config.group_share_heartbeat_interval_ms).unwrap_or(i32::MAX);
        let group_id = req.group_id.0.to_string();
        let fail = |mut r: ShareGroupHeartbeatResponse, code: ErrorCode, message: String| {
            r.error_code = code.0;
            r.error_message = Some(sb(&message));
            r
        };
        if group_id.is_empty() || req.member_id.is_empty() {
            return fail(
                r,
                ErrorCode::INVALID_REQUEST,
                "GroupId and MemberId can't be empty.".into(),
            );
        }
        if req.member_epoch < super::consumer::LEAVE_EPOCH {
            return fail(
                r,
                ErrorCode::INVALID_REQUEST,
                "MemberEpoch is invalid.".into(),
            );
        }
        let hb = ShareHeartbeat {
            member_id: req.member_id.to_string(),
            epoch: req.member_epoch,
            rack_id: req.rack_id.as_ref().map(|s| s.to_string()),
            subscribed_names: req
                .subscribed_topic_names
                .as_ref()
                .map(|names| names.iter().map(|n| n.0.to_string()).collect()),
            client_id: client.client_id,
            client_host: client.host,
        };
        let topics = shard.topics();
        let session_timeout = Duration::from_millis(self.config.group_share_session_timeout_ms);
        let now = Instant::now();
        let outcome = {
            let mut groups = self.groups.borrow_mut();
            if !groups.contains_key(&group_id) && hb.epoch != super::consumer::JOIN_EPOCH {
                Err((
                    ErrorCode::UNKNOWN_MEMBER_ID,
                    format!("group {group_id} has no member {}", hb.member_id),
                ))
            } else {
                let group = groups
                    .entry(group_id.clone())
                    .or_insert_with(|| Group::new(&group_id));
                let limits = self.share_limits(Some(group));
                if group.share.is_none() && !group.is_empty() {
                    Err((
                        ErrorCode::GROUP_ID_NOT_FOUND,
                        format!("group {group_id} is not a share group"),
                    ))
                } else {
                    let created = group.share.is_none();
                    let sg = group.share.get_or_insert_with(ShareGroup::default);
                    sg.heartbeat(hb, &topics, session_timeout, &limits, now)
                        .map(|beat| {
                            let values: Vec<_> = beat
                                .released
                                .iter()
                                .filter_map(|k| {
                                    sg.partitions.get(k).map(|p| (k.clone(), p.value()))
                                })
                                .collect();
                            (beat, created.then(|| sg.value()), values)
                        })
                }
            }
        };
        let (beat, created, released) = match outcome {
            Ok(x) => x,
            Err((code, message)) => return fail(r, code, message),
        };
        let mut writes = Vec::new();
        if let Some(v) = created {
            writes.extend(records::share_group_record(&group_id, Some(&v)).ok());
        }
        for ((topic, p), v) in &released {
            writes.extend(records::share_partition_record(&group_id, topic, *p, Some(v)).ok());
        }
        if let Err(code) = self.persist(shard, &group_id, writes).await {
            return fail(r, code, "the group's state was not written".into());
        }
        r.member_id = Some(req.member_id.clone());
        r.member_epoch = beat.epoch;
        r.assignment = beat.assignment.map(|a| {
            let mut out = BeatAssignment::default();
            out.topic_partitions = a
                .into_iter()
                .map(|(topic, ps)| {
                    let mut tp = BeatPartitions::default();
                    tp.topic_id = uuid::Uuid::from_bytes(topic);
                    tp.partitions = ps.into_iter().collect();
                    tp
                })
                .collect();
            out
        });
        r
    }

    /// Applies acknowledgement batches; returns each partition's result and the share-partitions
    /// whose durable state changed.
    fn apply_acks(
        &self,
        group_id: &str,
        member: &str,
        acks: &[((TopicId, i32), Vec<AckBatch>)],
        names: &BTreeMap<TopicId, String>,
        now: Instant,
    ) -> AckOutcome {
        let mut results = Vec::new();
        let mut changed = Vec::new();
        let mut groups = self.groups.borrow_mut();
        let Some(group) = groups.get_mut(group_id) else {
            return (results, changed);
        };
        let limits = self.share_limits(Some(group));
        let Some(sg) = group.share.as_mut() else {
            return (results, changed);
        };
        for ((topic_id, partition), batches) in acks {
            let Some(topic) = names.get(topic_id) else {
                results.push(((*topic_id, *partition), ErrorCode::UNKNOWN_TOPIC_ID));
                continue;
            };
            let key = (topic.clone(), *partition);
            let Some(p) = sg.partitions.get_mut(&key) else {
                results.push(((*topic_id, *partition), super::share::INVALID_RECORD_STATE));
                continue;
            };
            let mut code = ErrorCode::NONE;
            for (first, last, types) in batches {
                if let Err(e) = p.acknowledge(member, *first, *last, types, &limits) {
                    code = e;
                }
            }
            let _ = now;
            changed.push(key);
            results.push(((*topic_id, *partition), code));
        }
        if !changed.is_empty() {
            self.share_progress.notify(usize::MAX);
        }
        (results, changed)
    }

    /// A member's final request (session epoch -1) to one broker: that session closes, and the
    /// records the member holds in its partitions (in every partition, when it was the member's
    /// last session) go back to the queue. Returns the share-partitions whose durable state
    /// changed.
    fn close_share_session(
        &self,
        shard: &Shard,
        group_id: &str,
        member: &str,
        session: &str,
        now: Instant,
    ) -> Vec<(String, i32)> {
        let mut changed = Vec::new();
        let mut groups = self.groups.borrow_mut();
        let Some(g) = groups.get_mut(group_id) else {
            return changed;
        };
        let limits = self.share_limits(Some(g));
        if let Some(sg) = g.share.as_mut() {
            let closed = sg.sessions.remove(session);
            let last = !sg.sessions.keys().any(|k| session_member(k) == member);
            if last {
                sg.departed.remove(member);
            }
            let covered: BTreeSet<(String, i32)> = closed
                .iter()
                .flat_map(|s| s.partitions.iter())
                .filter_map(|(id, p)| {
                    let name = shard.topic_by_id(&uuid::Uuid::from_bytes(*id))?;
                    Some((name.to_string(), *p))
                })
                .collect();
            for (key, p) in sg.partitions.iter_mut() {
                if (last || covered.contains(key)) && p.release(Some(member), &limits, now) {
                    changed.push(key.clone());
                }
            }
        }
        self.share_progress.notify(usize::MAX);
        changed
    }

    /// Writes the durable state of the given share-partitions.
    async fn persist_share_partitions(
        &self,
        shard: &Rc<Shard>,
        group_id: &str,
        keys: &[(String, i32)],
    ) -> Result<(), ErrorCode> {
        let writes: Vec<_> = {
            let groups = self.groups.borrow();
            let Some(sg) = groups.get(group_id).and_then(|g| g.share.as_ref()) else {
                return Ok(());
            };
            keys.iter()
                .filter_map(|(t, p)| {
                    let v = sg.partitions.get(&(t.clone(), *p))?.value();
                    records::share_partition_record(group_id, t, *p, Some(&v)).ok()
                })
                .collect()
        };
        self.persist(shard, group_id, writes).await
    }

    /// Starts share-partitions seen for the first time at `share.auto.offset.reset`.
    async fn start_share_partitions(
        &self,
        shard: &Rc<Shard>,
        group_id: &str,
        wanted: &[(String, i32)],
    ) -> Vec<(String, i32)> {
        let (missing, timestamp, committed) = {
            let groups = self.groups.borrow();
            let Some(g) = groups.get(group_id) else {
                return Vec::new();
            };
            let Some(sg) = g.share.as_ref() else {
                return Vec::new();
            };
            let missing: Vec<(String, i32)> = wanted
                .iter()
                .filter(|k| !sg.partitions.contains_key(*k))
                .cloned()
                .collect();
            let reset = g
                .config_value("share.auto.offset.reset")
                .unwrap_or("latest");
            // -2 the log start, -1 the end, else the first record at or after that time.
            let timestamp = match reset {
                "earliest" => -2,
                other => match other.strip_prefix("by_duration:").and_then(duration_ms) {
                    Some(ms) => (crate::storage::partition::now_ms() as i64).saturating_sub(ms),
                    None => -1,
                },
            };
            let committed = g.config_value("share.isolation.level") == Some("read_committed");
            (missing, timestamp, committed)
        };
        let mut started = Vec::new();
        for (topic, p) in missing {
            let tp = TopicPartition::new(&topic, p);
            let list = |timestamp: i64| -> BoxedFuture<Result<Option<Offset>, ErrorCode>> {
                let (shard, tp) = (shard.clone(), tp.clone());
                match source_of(&shard, &tp) {
                    Source::Leader(leader) => Box::pin(async move {
                        share_remote::list_offset(&shard, leader, &tp, timestamp, committed).await
                    }),
                    Source::Shard(owner) => Box::pin(async move {
                        let request = Request::ListOffset {
                            tp,
                            timestamp,
                            current_leader_epoch: -1,
                            committed,
                        };
                        match shard.call(crate::model::ShardId(owner), request).await {
                            Reply::ListOffset(r) => r.map(|found| found.map(|(o, _)| o)),
                            _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
                        }
                    }),
                }
            };
            let mut found = list(timestamp).await;
            if timestamp >= 0 && matches!(found, Ok(None)) {
                // Nothing as recent as the duration asks: start at the end, as Kafka does.
                found = list(-1).await;
            }
            let Ok(Some(offset)) = found else {
                continue;
            };
            let mut groups = self.groups.borrow_mut();
            if let Some(sg) = groups.get_mut(group_id).and_then(|g| g.share.as_mut()) {
                let key = (topic.clone(), p);
                if !sg.partitions.contains_key(&key) {
                    sg.partitions
                        .insert(key.clone(), SharePartition::new(offset.0));
                    started.push(key);
                }
            }
        }
        started
    }

    /// ShareFetch (see the module note for the order of things).
    pub(super) async fn share_fetch(
        &self,
        shard: &Rc<Shard>,
        req: ShareFetchRequest,
        origin: Option<i32>,
    ) -> ShareFetchResponse {
        let mut response = ShareFetchResponse::default();
        let group_id = req
            .group_id
            .as_ref()
            .map(|g| g.0.to_string())
            .unwrap_or_default();
        let member = req
            .member_id
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default();
        let skey = session_key(&member, origin);
        // Only the topics this request and the member's session name are looked up.
        let mut ids: Vec<TopicId> = req.topics.iter().map(|t| *t.topic_id.as_bytes()).collect();
        if let Some(s) = self
            .groups
            .borrow()
            .get(&group_id)
            .and_then(|g| g.share.as_ref())
            .and_then(|sg| sg.sessions.get(&skey))
        {
            ids.extend(s.partitions.iter().map(|(t, _)| *t));
        }
        let known = topics_by_id(shard, ids);
        let names: BTreeMap<TopicId, String> =
            known.iter().map(|(id, (n, _))| (*id, n.clone())).collect();
        let counts: BTreeMap<TopicId, i32> = known.iter().map(|(id, (_, c))| (*id, *c)).collect();
        let now = Instant::now();
        let epoch = req.share_session_epoch;
        // 1. The share session.
        let session: Result<Vec<(TopicId, i32)>, ErrorCode> = {
            let mut groups = self.groups.borrow_mut();
            match groups.get_mut(&group_id).and_then(|g| g.share.as_mut()) {
                None => Err(ErrorCode::UNKNOWN_MEMBER_ID),
                // A member that left may still close its sessions (see ShareGroup::leave).
                Some(sg)
                    if !(sg.members.contains_key(&member)
                        || epoch == -1 && sg.may_close_session(&member)) =>
                {
                    Err(ErrorCode::UNKNOWN_MEMBER_ID)
                }
                Some(sg) => {
                    // Only partitions that exist join a session: its size is bounded by the
                    // cluster's, whatever a client lists.
                    let listed = req
                        .topics
                        .iter()
                        .flat_map(|t| {
                            let id = *t.topic_id.as_bytes();
                            t.partitions.iter().map(move |p| (id, p.partition_index))
                        })
                        .filter(|(id, p)| counts.get(id).is_some_and(|n| *p >= 0 && p < n));
                    if epoch == 0 {
                        let s = ShareSession {
                            epoch: 1,
                            partitions: listed.collect(),
                        };
                        let parts = s.partitions.iter().copied().collect();
                        sg.sessions.insert(skey.clone(), s);
                        Ok(parts)
                    } else {
                        match sg.sessions.get_mut(&skey) {
                            None => Err(SHARE_SESSION_NOT_FOUND),
                            Some(_) if epoch == -1 => Ok(Vec::new()),
                            Some(s) if s.epoch != epoch => Err(INVALID_SHARE_SESSION_EPOCH),
                            Some(s) => {
                                s.partitions.extend(listed);
                                for f in &req.forgotten_topics_data {
                                    for p in &f.partitions {
                                        s.partitions.remove(&(*f.topic_id.as_bytes(), *p));
                                    }
                                }
                                s.epoch = if s.epoch == i32::MAX { 1 } else { s.epoch + 1 };
                                Ok(s.partitions.iter().copied().collect())
                            }
                        }
                    }
                }
            }
        };
        let session = match session {
            Ok(s) => s,
            Err(code) => {
                response.error_code = code.0;
                return response;
            }
        };
        // 2. Acknowledgements, durable before anything else.
        let acks: Vec<((TopicId, i32), Vec<AckBatch>)> = req
            .topics
            .iter()
            .flat_map(|t| {
                let id = *t.topic_id.as_bytes();
                t.partitions
                    .iter()
                    .filter(|p| !p.acknowledgement_batches.is_empty())
                    .map(move |p| {
                        let batches = p
                            .acknowledgement_batches
                            .iter()
                            .map(|b| (b.first_offset, b.last_offset, b.acknowledge_types.clone()))
                            .collect();
                        ((id, p.partition_index), batches)
                    })
            })
            .collect();
        let (ack_results, mut changed) = self.apply_acks(&group_id, &member, &acks, &names, now);
        if epoch == -1 {
            changed.extend(self.close_share_session(shard, &group_id, &member, &skey, now));
        }
        let wanted: Vec<(String, i32)> = session
            .iter()
            .filter_map(|(id, p)| names.get(id).map(|n| (n.clone(), *p)))
            .collect();
        changed.extend(self.start_share_partitions(shard, &group_id, &wanted).await);
        let ack_code = self
            .persist_share_partitions(shard, &group_id, &changed)
            .await
            .err();
        // 3. Records: read, acquire, and wait for some if there are none.
        let mut data: BTreeMap<(TopicId, i32), PartitionData> = BTreeMap::new();
        for ((id, p), code) in &ack_results {
            let mut d = PartitionData::default();
            d.partition_index = *p;
            d.acknowledge_error_code = ack_code.unwrap_or(*code).0;
            data.insert((*id, *p), d);
        }
        let max_records = usize::try_from(req.max_records)
            .ok()
            .filter(|n| *n > 0)
            .unwrap_or(500);
        let deadline = now + Duration::from_millis(u64::try_from(req.max_wait_ms).unwrap_or(0));
        let limits = {
            let groups = self.groups.borrow();
            self.share_limits(groups.get(&group_id))
        };
        if epoch != -1 {
            loop {
                // Listening before looking: a release between the look and the wait is not missed.
                let released = self.share_progress.listen();
                let acquired = self
                    .acquire_round(
                        shard,
                        &group_id,
                        &member,
                        &session,
                        &names,
                        max_records,
                        &limits,
                        &mut data,
                    )
                    .await;
                if acquired || Instant::now() >= deadline {
                    break;
                }
                let wait = deadline
                    .saturating_duration_since(Instant::now())
                    .min(SHARE_WAIT_SLICE);
                let positions = self.share_positions(&group_id, &member, &session, &names, &limits);
                futures_lite::future::or(
                    released,
                    futures_lite::future::or(
                        wait_for_records(shard, positions, wait, limits.read_committed),
                        glommio::timer::sleep(wait),
                    ),
                )
                .await;
                // Whatever woke the wait, the shard's other work gets its turn.
                glommio::yield_if_needed().await;
            }
        }
        response.acquisition_lock_timeout_ms =
            i32::try_from(limits.lock_duration.as_millis()).unwrap_or(i32::MAX);
        let mut by_topic: BTreeMap<TopicId, Vec<PartitionData>> = BTreeMap::new();
        for ((id, _), d) in data {
            by_topic.entry(id).or_default().push(d);
        }
        response.responses = by_topic
            .into_iter()
            .map(|(id, partitions)| {
                let mut t = ShareFetchableTopicResponse::default();
                t.topic_id = uuid::Uuid::from_bytes(id);
                t.partitions = partitions;
                t
            })
            .collect();
        response
    }

    /// One read of every session partition and acquisition of what it offers. Returns whether
    /// any record was acquired.
    #[allow(clippy::too_many_arguments)] // one fetch's context, passed through once
    async fn acquire_round(
        &self,
        shard: &Rc<Shard>,
        group_id: &str,
        member: &str,
        session: &[(TopicId, i32)],
        names: &BTreeMap<TopicId, String>,
        max_records: usize,
        limits: &Limits,
        data: &mut BTreeMap<(TopicId, i32), PartitionData>,
    ) -> bool {
        let plan: Vec<((TopicId, i32), String, i64)> = {
            let groups = self.groups.borrow();
            let Some(sg) = groups.get(group_id).and_then(|g| g.share.as_ref()) else {
                return false;
            };
            session
                .iter()
                .filter_map(|(id, p)| {
                    let name = names.get(id)?;
                    let sp = sg.partitions.get(&(name.clone(), *p))?;
                    Some(((*id, *p), name.clone(), sp.next_read_offset()))
                })
                .collect()
        };
        if plan.is_empty() {
            return false;
        }
        let reads: Vec<PartitionRead> = plan
            .iter()
            .map(|((_, p), name, offset)| PartitionRead {
                tp: TopicPartition::new(name, *p),
                offset: Offset(*offset),
                max_bytes: SHARE_READ_BYTES_MAX,
                current_leader_epoch: -1,
                committed: limits.read_committed,
            })
            .collect();
        let results = read_partitions(shard, reads).await;
        let now = Instant::now();
        let mut left = max_records;
        let mut any = false;
        let mut groups = self.groups.borrow_mut();
        let Some(sg) = groups.get_mut(group_id).and_then(|g| g.share.as_mut()) else {
            return false;
        };
        for (((id, p), name, _), result) in plan.into_iter().zip(results) {
            let entry = data.entry((id, p)).or_insert_with(|| {
                let mut d = PartitionData::default();
                d.partition_index = p;
                d
            });
            let read = match result {
                Ok(r) => r,
                Err(code) => {
                    entry.error_code = code.0;
                    continue;
                }
            };
            let Some(sp) = sg.partitions.get_mut(&(name, p)) else {
                continue;
            };
            if read.log_start_offset.0 > sp.start_offset {
                // Retention or DeleteRecords moved the log past what the group had left.
                sp.reset_start(read.log_start_offset.0);
            }
            if left == 0 {
                continue;
            }
            let room = room_of(&sg.sessions, (id, p), sp, member, limits);
            if room == 0 {
                continue;
            }
            let records = read.records.into_bytes();
            let spans = batch_spans(&records, &read.aborted);
            let batches: Vec<(i64, i64, bool)> =
                spans.iter().map(|(f, l, c, _)| (*f, *l, *c)).collect();
            let got = sp.acquire(&batches, member, left.min(room), limits, now);
            if got.is_empty() {
                continue;
            }
            any = true;
            left = left.saturating_sub(got.iter().map(|a| (a.last - a.first + 1) as usize).sum());
            // The records sent: whole batches from the first to the last one acquired from.
            let first = got[0].first;
            let last = got[got.len() - 1].last;
            let mut start = 0usize;
            let mut end = 0usize;
            for (f, l, _, batch_end) in &spans {
                if *l < first {
                    start = *batch_end;
                }
                if *f <= last {
                    end = *batch_end;
                }
            }
            entry.records = Some(records.slice(start..end.max(start)));
            entry.acquired_records = got
                .into_iter()
                .map(|a| {
                    let mut r = AcquiredRecords::default();
                    r.first_offset = a.first;
                    r.last_offset = a.last;
                    r.delivery_count = a.delivery_count;
                    r
                })
                .collect();
        }
        any
    }
}

impl GroupCoordinator {
    /// ShareAcknowledge: acknowledgements outside a fetch, durable before the answer.
    pub(super) async fn share_acknowledge(
        &self,
        shard: &Rc<Shard>,
        req: ShareAcknowledgeRequest,
        origin: Option<i32>,
    ) -> ShareAcknowledgeResponse {
        let mut response = ShareAcknowledgeResponse::default();
        let group_id = req
            .group_id
            .as_ref()
            .map(|g| g.0.to_string())
            .unwrap_or_default();
        let member = req
            .member_id
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default();
        let skey = session_key(&member, origin);
        let names: BTreeMap<TopicId, String> =
            topics_by_id(shard, req.topics.iter().map(|t| *t.topic_id.as_bytes()))
                .into_iter()
                .map(|(id, (n, _))| (id, n))
                .collect();
        let now = Instant::now();
        let check = {
            let mut groups = self.groups.borrow_mut();
            match groups.get_mut(&group_id).and_then(|g| g.share.as_mut()) {
                Some(sg)
                    if sg.members.contains_key(&member)
                        || (req.share_session_epoch == -1 && sg.may_close_session(&member)) =>
                {
                    match sg.sessions.get_mut(&skey) {
                        None => Err(SHARE_SESSION_NOT_FOUND),
                        Some(_) if req.share_session_epoch == -1 => Ok(()),
                        Some(s)
                            if s.epoch != req.share_session_epoch
                                || req.share_session_epoch == 0 =>
                        {
                            Err(INVALID_SHARE_SESSION_EPOCH)
                        }
                        Some(s) => {
                            s.epoch = if s.epoch == i32::MAX { 1 } else { s.epoch + 1 };
                            Ok(())
                        }
                    }
                }
                _ => Err(ErrorCode::UNKNOWN_MEMBER_ID),
            }
        };
        if let Err(code) = check {
            response.error_code = code.0;
            return response;
        }
        let acks: Vec<((TopicId, i32), Vec<AckBatch>)> = req
            .topics
            .iter()
            .flat_map(|t| {
                let id = *t.topic_id.as_bytes();
                t.partitions.iter().map(move |p| {
                    let batches = p
                        .acknowledgement_batches
                        .iter()
                        .map(|b| (b.first_offset, b.last_offset, b.acknowledge_types.clone()))
                        .collect();
                    ((id, p.partition_index), batches)
                })
            })
            .collect();
        let (results, mut changed) = self.apply_acks(&group_id, &member, &acks, &names, now);
        if req.share_session_epoch == -1 {
            changed.extend(self.close_share_session(shard, &group_id, &member, &skey, now));
        }
        let written = self
            .persist_share_partitions(shard, &group_id, &changed)
            .await;
        let mut by_topic: BTreeMap<TopicId, Vec<AckPartitionData>> = BTreeMap::new();
        for ((id, p), code) in results {
            let mut d = AckPartitionData::default();
            d.partition_index = p;
            d.error_code = match &written {
                Err(e) => e.0,
                Ok(()) => code.0,
            };
            by_topic.entry(id).or_default().push(d);
        }
        response.responses = by_topic
            .into_iter()
            .map(|(id, partitions)| {
                let mut t = ShareAcknowledgeTopicResponse::default();
                t.topic_id = uuid::Uuid::from_bytes(id);
                t.partitions = partitions;
                t
            })
            .collect();
        response
    }

    /// ShareGroupDescribe of one group.
    pub(super) fn share_describe(&self, shard: &Rc<Shard>, group_id: &str) -> DescribedGroup {
        let mut d = DescribedGroup::default();
        d.group_id = GroupId(sb(group_id));
        d.authorized_operations = i32::MIN;
        let groups = self.groups.borrow();
        let Some(sg) = groups.get(group_id).and_then(|g| g.share.as_ref()) else {
            d.error_code = ErrorCode::GROUP_ID_NOT_FOUND.0;
            d.error_message = Some(sb(&format!("group {group_id} is not a share group")));
            d.group_state = sb("Dead");
            return d;
        };
        d.group_state = sb(sg.state_name());
        d.group_epoch = sg.epoch;
        d.assignment_epoch = sg.assignment_epoch;
        d.assignor_name = sb("simple");
        d.members = sg
            .members
            .values()
            .map(|m| {
                let mut dm = DescribedMember::default();
                dm.member_id = sb(&m.id);
                dm.rack_id = m.rack_id.as_deref().map(sb);
                dm.member_epoch = m.epoch;
                dm.client_id = sb(&m.client_id);
                dm.client_host = sb(&m.client_host);
                dm.subscribed_topic_names = m
                    .subscribed_names
                    .iter()
                    .map(|n| crate::handlers::topic_name(n))
                    .collect();
                let mut a = DescribedAssignment::default();
                if let Some(target) = sg.target.get(&m.id) {
                    a.topic_partitions = target
                        .iter()
                        .map(|(topic, ps)| {
                            let id = uuid::Uuid::from_bytes(*topic);
                            let mut tp = DescribedPartitions::default();
                            tp.topic_id = id;
                            tp.topic_name = crate::handlers::topic_name(
                                shard.topic_by_id(&id).as_deref().unwrap_or(""),
                            );
                            tp.partitions = ps.iter().copied().collect();
                            tp
                        })
                        .collect();
                }
                dm.assignment = a;
                dm
            })
            .collect();
        d
    }

    /// Share members whose session ran out and records whose lock ran out.
    pub(super) async fn expire_share(&self, shard: &Rc<Shard>, now: Instant) {
        let mut work = Vec::new();
        {
            let mut groups = self.groups.borrow_mut();
            for (id, g) in groups.iter_mut() {
                let limits = self.share_limits(Some(g));
                let Some(sg) = g.share.as_mut() else {
                    continue;
                };
                let (gone, changed) = sg.expire(&limits, now);
                for member in &gone {
                    tracing::info!(group = %id, %member, "share group member session expired");
                }
                if !changed.is_empty() {
                    work.push((id.clone(), changed));
                }
            }
        }
        if !work.is_empty() {
            self.share_progress.notify(usize::MAX);
        }
        for (group, changed) in work {
            let _ = self.persist_share_partitions(shard, &group, &changed).await;
        }
    }
}

/// An ISO-8601 duration as Java's `Duration.parse` reads it (`PnDTnHnMn.nS`, each part
/// optional, at least one), in milliseconds; None for anything else or a negative one.
fn duration_ms(text: &str) -> Option<i64> {
    let rest = text.strip_prefix('P').or_else(|| text.strip_prefix('p'))?;
    let (days, time) = match rest.find(['T', 't']) {
        Some(at) => (&rest[..at], Some(&rest[at + 1..])),
        None => (rest, None),
    };
    let mut total: i64 = 0;
    let mut parts = 0;
    if !days.is_empty() {
        let n = days.strip_suffix(['D', 'd'])?.parse::<i64>().ok()?;
        total = total.checked_add(n.checked_mul(86_400_000)?)?;
        parts += 1;
    }
    if let Some(mut time) = time {
        if time.is_empty() {
            return None;
        }
        for (unit, ms) in [('H', 3_600_000i64), ('M', 60_000)] {
            if let Some(at) = time.find([unit, unit.to_ascii_lowercase()]) {
                let n = time[..at].parse::<i64>().ok()?;
                total = total.checked_add(n.checked_mul(ms)?)?;
                time = &time[at + 1..];
                parts += 1;
            }
        }
        if !time.is_empty() {
            let secs = time.strip_suffix(['S', 's'])?;
            let (whole, fraction) = secs.split_once('.').unwrap_or((secs, ""));
            if whole.is_empty()
                || fraction.len() > 9
                || !fraction.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            let millis = format!("{fraction:0<3}")[..3].parse::<i64>().ok()?;
            total = total.checked_add(whole.parse::<i64>().ok()?.checked_mul(1000)?)?;
            total = total.checked_add(millis)?;
            parts += 1;
        }
    }
    (parts > 0 && total >= 0 && !text.contains('-')).then_some(total)
}

/// The group configs strom applies, with their check.
const GROUP_CONFIGS: &[&str] = &[
    "share.auto.offset.reset",
    "share.isolation.level",
    "share.record.lock.duration.ms",
];

fn check_group_config(name: &str, value: &str) -> Result<(), String> {
    match name {
        "share.auto.offset.reset" => match value {
            "earliest" | "latest" => Ok(()),
            v if v
                .strip_prefix("by_duration:")
                .and_then(duration_ms)
                .is_some() =>
            {
                Ok(())
            }
            _ => Err(format!(
                "Invalid value {value} for configuration share.auto.offset.reset: \
                 earliest, latest or by_duration:<ISO-8601 duration, such as PT1H30M>"
            )),
        },
        "share.isolation.level" => match value {
            "read_committed" | "read_uncommitted" => Ok(()),
            _ => Err(format!(
                "Invalid value {value} for configuration share.isolation.level: \
                 read_committed or read_uncommitted"
            )),
        },
        "share.record.lock.duration.ms" => match value.parse::<u64>() {
            Ok(ms) if (1000..=3_600_000).contains(&ms) => Ok(()),
            _ => Err(format!(
                "Invalid value {value} for configuration share.record.lock.duration.ms: \
                 a number of milliseconds from 1000 to 3600000"
            )),
        },
        other => Err(format!(
            "Unknown group config name: {other} (strom has {})",
            GROUP_CONFIGS.join(", ")
        )),
    }
}

impl GroupCoordinator {
    /// IncrementalAlterConfigs on a group: checked, written durably, then applied.
    pub(super) async fn alter_configs(
        &self,
        shard: &Rc<Shard>,
        group_id: &str,
        changes: Vec<(String, Option<String>)>,
        validate_only: bool,
    ) -> (ErrorCode, Option<String>) {
        for (name, value) in &changes {
            let checked = match value {
                Some(v) => check_group_config(name, v),
                None if GROUP_CONFIGS.contains(&name.as_str()) => Ok(()),
                None => check_group_config(name, ""),
            };
            if let Err(message) = checked {
                return (ErrorCode::INVALID_CONFIG, Some(message));
            }
        }
        if validate_only {
            return (ErrorCode::NONE, None);
        }
        let mut configs = {
            let groups = self.groups.borrow();
            groups
                .get(group_id)
                .map(|g| g.configs.clone())
                .unwrap_or_default()
        };
        for (name, value) in changes {
            match value {
                Some(v) => configs.insert(name, v),
                None => configs.remove(&name),
            };
        }
        let value = records::GroupConfigValue {
            configs: configs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        let written = match records::group_config_record(group_id, Some(&value)) {
            Ok(record) => self.persist(shard, group_id, vec![record]).await,
            Err(_) => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
        };
        if let Err(code) = written {
            return (code, Some("the group's configs were not written".into()));
        }
        self.groups
            .borrow_mut()
            .entry(group_id.to_string())
            .or_insert_with(|| Group::new(group_id))
            .configs = configs;
        (ErrorCode::NONE, None)
    }
}

#[cfg(test)]
mod tests {
    use super::duration_ms;

    #[test]
    fn iso_8601_durations_as_java_reads_them() {
        assert_eq!(duration_ms("PT1H"), Some(3_600_000));
        assert_eq!(duration_ms("PT1H30M"), Some(5_400_000));
        assert_eq!(duration_ms("P1D"), Some(86_400_000));
        assert_eq!(duration_ms("P2DT3H4M5.25S"), Some(183_845_250));
        assert_eq!(duration_ms("PT0.5S"), Some(500));
        assert_eq!(duration_ms("PT15S"), Some(15_000));
        for bad in [
            "",
            "P",
            "PT",
            "1H",
            "PT-1H",
            "P-1D",
            "PT1.S5",
            "PT1X",
            "PTS",
            "PT1.1234567891S",
            "P99999999999999999D",
            "PT1M1H",
        ] {
            assert_eq!(duration_ms(bad), None, "{bad}");
        }
    }
}
