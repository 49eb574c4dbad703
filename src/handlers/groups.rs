//! The consumer-group APIs: each request goes to the shard coordinating its group (the owner of
//! the group's `__consumer_offsets` partition), which is created with Kafka's defaults on first
//! use. ListGroups asks every shard.

use std::collections::BTreeMap;
use std::rc::Rc;

use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::{
    AlterShareGroupOffsetsRequest, AlterShareGroupOffsetsResponse, ConsumerGroupDescribeRequest,
    ConsumerGroupDescribeResponse, ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse,
    DeleteGroupsRequest, DeleteGroupsResponse, DeleteShareGroupOffsetsRequest,
    DeleteShareGroupOffsetsResponse, DescribeGroupsRequest, DescribeGroupsResponse,
    DescribeShareGroupOffsetsRequest, DescribeShareGroupOffsetsResponse, GroupId, HeartbeatRequest,
    HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    ListGroupsRequest, ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse,
    OffsetDeleteRequest, OffsetDeleteResponse, OffsetFetchRequest, OffsetFetchResponse,
    ShareAcknowledgeRequest, ShareAcknowledgeResponse, ShareFetchRequest, ShareFetchResponse,
    ShareGroupDescribeRequest, ShareGroupDescribeResponse, ShareGroupHeartbeatRequest,
    ShareGroupHeartbeatResponse, SyncGroupRequest, SyncGroupResponse,
};

use super::{str_bytes, topic_name};
use crate::group::coordinator::Committed;
use crate::group::{partition_for_group, ClientInfo, GroupCall, GroupReply, OFFSETS_TOPIC};
use crate::model::{ErrorCode, ShardId, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard, TopicSpec};

/// `__consumer_offsets` as the controller creates it: compacted, `offsets.topic.num.partitions`,
/// and in a cluster `offsets.topic.replication.factor` replicas (at most the brokers there are).
pub fn offsets_topic_spec(shard: &Shard) -> TopicSpec {
    let broker = &shard.options.broker;
    super::internal_topics::spec(
        shard,
        OFFSETS_TOPIC,
        broker.offsets_topic_partitions,
        broker.offsets_topic_replication_factor,
    )
}

/// Creates `__consumer_offsets` if it does not exist.
pub async fn ensure_offsets_topic(shard: &Rc<Shard>) -> Result<(), ErrorCode> {
    super::internal_topics::ensure(shard, offsets_topic_spec(shard), false).await
}

fn coordinator_for(shard: &Shard, group: &str) -> ShardId {
    let p = partition_for_group(group, shard.options.broker.offsets_topic_partitions);
    shard.owner_of(&TopicPartition::new(OFFSETS_TOPIC, p))
}

/// Sends `call` to the shard coordinating `group` (in a cluster: `NOT_COORDINATOR` unless this
/// broker leads the group's offsets partition).
pub async fn route_call(
    shard: &Rc<Shard>,
    group: &str,
    call: GroupCall,
) -> Result<GroupReply, ErrorCode> {
    route(shard, group, call).await
}

/// In a cluster, the broker coordinating `group`: the leader of the group's offsets partition
/// (`None` when no leader is known, or outside a cluster).
pub fn coordinator_node(shard: &Shard, group: &str) -> Option<i32> {
    let p = partition_for_group(group, shard.options.broker.offsets_topic_partitions);
    shard
        .partition_leader(&TopicPartition::new(OFFSETS_TOPIC, p))
        .map(|(leader, _)| leader)
        .filter(|leader| *leader > 0)
}

async fn route(shard: &Rc<Shard>, group: &str, call: GroupCall) -> Result<GroupReply, ErrorCode> {
    ensure_offsets_topic(shard).await?;
    if let Some(cluster) = shard.cluster() {
        match coordinator_node(shard, group) {
            Some(leader) if leader == cluster.node_id => {}
            Some(_) => return Err(ErrorCode::NOT_COORDINATOR),
            None => return Err(ErrorCode::COORDINATOR_NOT_AVAILABLE),
        }
    }
    match shard
        .call(
            coordinator_for(shard, group),
            Request::Group(Box::new(call)),
        )
        .await
    {
        Reply::Group(reply) => match *reply {
            GroupReply::Refused(code) => Err(code),
            reply => Ok(reply),
        },
        _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
    }
}

pub async fn join(
    shard: &Rc<Shard>,
    req: JoinGroupRequest,
    version: i16,
    client: ClientInfo,
) -> JoinGroupResponse {
    let group = req.group_id.0.to_string();
    let member_id = req.member_id.clone();
    match route(
        shard,
        &group,
        GroupCall::Join {
            req,
            version,
            client,
        },
    )
    .await
    {
        Ok(GroupReply::Join(r)) => r,
        other => {
            let mut r = JoinGroupResponse::default();
            r.error_code = error_of(other).0;
            r.generation_id = -1;
            r.protocol_name = Some(str_bytes(""));
            r.member_id = member_id;
            r
        }
    }
}

pub async fn sync(shard: &Rc<Shard>, req: SyncGroupRequest, version: i16) -> SyncGroupResponse {
    let group = req.group_id.0.to_string();
    match route(shard, &group, GroupCall::Sync { req, version }).await {
        Ok(GroupReply::Sync(r)) => r,
        other => {
            let mut r = SyncGroupResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

pub async fn heartbeat(shard: &Rc<Shard>, req: HeartbeatRequest) -> HeartbeatResponse {
    let group = req.group_id.0.to_string();
    let mut r = HeartbeatResponse::default();
    r.error_code = match route(shard, &group, GroupCall::Heartbeat { req }).await {
        Ok(GroupReply::Heartbeat(code)) => code.0,
        other => error_of(other).0,
    };
    r
}

pub async fn leave(shard: &Rc<Shard>, req: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
    let group = req.group_id.0.to_string();
    match route(shard, &group, GroupCall::Leave { req, version }).await {
        Ok(GroupReply::Leave(r)) => r,
        other => {
            let mut r = LeaveGroupResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

pub async fn commit(shard: &Rc<Shard>, req: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let topics = req.topics.clone();
    match route(shard, &group, GroupCall::Commit { req }).await {
        Ok(GroupReply::Commit(r)) => r,
        other => {
            let code = error_of(other);
            let mut r = OffsetCommitResponse::default();
            for t in topics {
                let mut rt = kafka_protocol::messages::offset_commit_response::OffsetCommitResponseTopic::default();
                rt.name = t.name;
                for p in t.partitions {
                    let mut rp = kafka_protocol::messages::offset_commit_response::OffsetCommitResponsePartition::default();
                    rp.partition_index = p.partition_index;
                    rp.error_code = code.0;
                    rt.partitions.push(rp);
                }
                r.topics.push(rt);
            }
            r
        }
    }
}

async fn fetch_group(
    shard: &Rc<Shard>,
    group: String,
    topics: Option<Vec<(String, Vec<i32>)>>,
) -> Result<Vec<Committed>, ErrorCode> {
    match route(
        shard,
        &group,
        GroupCall::FetchOffsets {
            group: group.clone(),
            topics,
        },
    )
    .await
    {
        Ok(GroupReply::Offsets(list)) => Ok(list),
        other => Err(error_of(other)),
    }
}

pub async fn fetch_offsets(
    shard: &Rc<Shard>,
    req: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    let mut response = OffsetFetchResponse::default();
    // KIP-447: a consumer asking for stable offsets waits out a transaction that commits one.
    let stable = version >= 7 && req.require_stable;
    let unstable = |c: &Committed| {
        if stable && c.pending {
            ErrorCode::UNSTABLE_OFFSET_COMMIT.0
        } else {
            0
        }
    };
    if version >= 8 {
        let calls = req.groups.iter().map(|g| {
            let topics = g.topics.as_ref().map(|ts| {
                ts.iter()
                    .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
                    .collect()
            });
            fetch_group(shard, g.group_id.0.to_string(), topics)
        });
        let results = join_all(calls.collect()).await;
        for (g, result) in req.groups.iter().zip(results) {
            let mut rg = OffsetFetchResponseGroup::default();
            rg.group_id = g.group_id.clone();
            match result {
                Ok(list) => {
                    for (topic, parts) in group_by_topic(list) {
                        let mut rt = OffsetFetchResponseTopics::default();
                        rt.name = topic_name(&topic);
                        rt.partitions = parts
                            .into_iter()
                            .map(|c| {
                                let mut p = OffsetFetchResponsePartitions::default();
                                p.partition_index = c.partition;
                                p.committed_offset = c.offset;
                                p.committed_leader_epoch = c.leader_epoch;
                                p.metadata = Some(str_bytes(&c.metadata));
                                p.error_code = unstable(&c);
                                p
                            })
                            .collect();
                        rg.topics.push(rt);
                    }
                }
                Err(code) => rg.error_code = code.0,
            }
            response.groups.push(rg);
        }
        return response;
    }
    let topics = req.topics.as_ref().map(|ts| {
        ts.iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes.clone()))
            .collect()
    });
    match fetch_group(shard, req.group_id.0.to_string(), topics).await {
        Ok(list) => {
            for (topic, parts) in group_by_topic(list) {
                let mut rt = OffsetFetchResponseTopic::default();
                rt.name = topic_name(&topic);
                rt.partitions = parts
                    .into_iter()
                    .map(|c| {
                        let mut p = OffsetFetchResponsePartition::default();
                        p.partition_index = c.partition;
                        p.committed_offset = c.offset;
                        if version >= 5 {
                            p.committed_leader_epoch = c.leader_epoch;
                        }
                        p.metadata = Some(str_bytes(&c.metadata));
                        p.error_code = unstable(&c);
                        p
                    })
                    .collect();
                response.topics.push(rt);
            }
        }
        Err(code) => {
            if version >= 2 {
                response.error_code = code.0;
            }
        }
    }
    response
}

fn group_by_topic(list: Vec<Committed>) -> Vec<(String, Vec<Committed>)> {
    let mut out: Vec<(String, Vec<Committed>)> = Vec::new();
    for c in list {
        match out.iter_mut().find(|(t, _)| *t == c.topic) {
            Some((_, parts)) => parts.push(c),
            None => out.push((c.topic.clone(), vec![c])),
        }
    }
    out
}

pub async fn describe(
    shard: &Rc<Shard>,
    req: DescribeGroupsRequest,
    version: i16,
) -> DescribeGroupsResponse {
    let include_ops = req.include_authorized_operations;
    let calls = req.groups.iter().map(|g| {
        let group = g.0.to_string();
        async move {
            let mut d = match route(
                shard,
                &group,
                GroupCall::Describe {
                    group: group.clone(),
                    version,
                },
            )
            .await
            {
                Ok(GroupReply::Describe(d)) => d,
                other => {
                    let mut d =
                        kafka_protocol::messages::describe_groups_response::DescribedGroup::default(
                        );
                    d.group_id = GroupId(str_bytes(&group));
                    d.error_code = error_of(other).0;
                    d
                }
            };
            if include_ops && version >= 3 && d.error_code == 0 {
                d.authorized_operations = crate::model::authorized::GROUP;
            }
            d
        }
    });
    let mut response = DescribeGroupsResponse::default();
    response.groups = join_all(calls.collect()).await;
    response
}

/// Every group of every shard's coordinator (none before `__consumer_offsets` exists).
pub async fn all_groups(
    shard: &Rc<Shard>,
) -> Vec<kafka_protocol::messages::list_groups_response::ListedGroup> {
    let mut out = Vec::new();
    if shard.topics().get(OFFSETS_TOPIC).is_none() {
        return out;
    }
    let calls =
        (0..shard.count).map(|i| shard.call(ShardId(i), Request::Group(Box::new(GroupCall::List))));
    for reply in join_all(calls.collect()).await {
        if let Reply::Group(reply) = reply {
            if let GroupReply::List(groups) = *reply {
                out.extend(groups);
            }
        }
    }
    out
}

pub async fn list(shard: &Rc<Shard>, req: ListGroupsRequest, version: i16) -> ListGroupsResponse {
    let mut response = ListGroupsResponse::default();
    for mut g in all_groups(shard).await {
        let state_ok = req.states_filter.is_empty()
            || req
                .states_filter
                .iter()
                .any(|s| s.eq_ignore_ascii_case(&g.group_state));
        // KIP-848 group types: `classic` or `consumer`.
        let type_ok = req.types_filter.is_empty()
            || req
                .types_filter
                .iter()
                .any(|t| t.eq_ignore_ascii_case(&g.group_type));
        if !state_ok || !type_ok {
            continue;
        }
        if version < 4 {
            g.group_state = str_bytes("");
        }
        if version < 5 {
            g.group_type = str_bytes("");
        }
        response.groups.push(g);
    }
    response
}

pub async fn delete(shard: &Rc<Shard>, req: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let calls = req.groups_names.iter().map(|g| {
        let group = g.0.to_string();
        async move {
            let code = match route(
                shard,
                &group,
                GroupCall::Delete {
                    group: group.clone(),
                },
            )
            .await
            {
                Ok(GroupReply::Delete(code)) => code,
                other => error_of(other),
            };
            let mut r = DeletableGroupResult::default();
            r.group_id = GroupId(str_bytes(&group));
            r.error_code = code.0;
            r
        }
    });
    let mut response = DeleteGroupsResponse::default();
    response.results = join_all(calls.collect()).await;
    response
}

pub async fn delete_offsets(shard: &Rc<Shard>, req: OffsetDeleteRequest) -> OffsetDeleteResponse {
    let group = req.group_id.0.to_string();
    match route(shard, &group, GroupCall::DeleteOffsets { req }).await {
        Ok(GroupReply::DeleteOffsets(r)) => r,
        other => {
            let mut r = OffsetDeleteResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

fn error_of(reply: Result<GroupReply, ErrorCode>) -> ErrorCode {
    match reply {
        Err(code) => code,
        Ok(_) => ErrorCode::UNKNOWN_SERVER_ERROR,
    }
}

/// ConsumerGroupHeartbeat (KIP-848), at the group's coordinator.
pub async fn consumer_heartbeat(
    shard: &Rc<Shard>,
    req: ConsumerGroupHeartbeatRequest,
    version: i16,
    client: ClientInfo,
) -> ConsumerGroupHeartbeatResponse {
    let group = req.group_id.0.to_string();
    let call = GroupCall::ConsumerHeartbeat {
        req,
        version,
        client,
    };
    match route(shard, &group, call).await {
        Ok(GroupReply::ConsumerHeartbeat(r)) => r,
        other => {
            let mut r = ConsumerGroupHeartbeatResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

/// Describes each group at its coordinator: `call` builds the request, `reply` takes the
/// described group out of the answer, `failed` builds one for an error.
async fn describe_each<D>(
    shard: &Rc<Shard>,
    groups: &[GroupId],
    call: impl Fn(String) -> GroupCall,
    reply: impl Fn(GroupReply) -> Option<D>,
    failed: impl Fn(&str, ErrorCode) -> D,
) -> Vec<D> {
    let calls = groups.iter().map(|g| {
        let group = g.0.to_string();
        let (call, reply, failed) = (&call, &reply, &failed);
        async move {
            match route(shard, &group, call(group.clone())).await {
                Ok(r) => {
                    reply(r).unwrap_or_else(|| failed(&group, ErrorCode::UNKNOWN_SERVER_ERROR))
                }
                Err(code) => failed(&group, code),
            }
        }
    });
    join_all(calls.collect()).await
}

/// ConsumerGroupDescribe (KIP-848): each group asked of its coordinator.
pub async fn consumer_describe(
    shard: &Rc<Shard>,
    req: ConsumerGroupDescribeRequest,
) -> ConsumerGroupDescribeResponse {
    use kafka_protocol::messages::consumer_group_describe_response::DescribedGroup;
    let ops = req.include_authorized_operations;
    let mut response = ConsumerGroupDescribeResponse::default();
    response.groups = describe_each(
        shard,
        &req.group_ids,
        |group| GroupCall::ConsumerDescribe { group },
        |r| match r {
            GroupReply::ConsumerDescribe(mut d) => {
                if ops && d.error_code == 0 {
                    d.authorized_operations = crate::model::authorized::GROUP;
                }
                Some(d)
            }
            _ => None,
        },
        |group, code| {
            let mut d = DescribedGroup::default();
            d.group_id = GroupId(str_bytes(group));
            d.error_code = code.0;
            d
        },
    )
    .await;
    response
}

/// ShareGroupHeartbeat (KIP-932), at the group's coordinator.
pub async fn share_heartbeat(
    shard: &Rc<Shard>,
    req: ShareGroupHeartbeatRequest,
    client: ClientInfo,
) -> ShareGroupHeartbeatResponse {
    let group = req.group_id.0.to_string();
    match route(shard, &group, GroupCall::ShareHeartbeat { req, client }).await {
        Ok(GroupReply::ShareHeartbeat(r)) => r,
        other => {
            let mut r = ShareGroupHeartbeatResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

/// ShareFetch (KIP-932): the whole request goes to the group's coordinator, which holds the
/// group's share-partitions and reads their records from the shards that own them.
/// `origin`: the broker that passed the request on (see `forward::to_group_coordinator`).
pub async fn share_fetch(
    shard: &Rc<Shard>,
    req: ShareFetchRequest,
    origin: Option<i32>,
) -> ShareFetchResponse {
    let group = req
        .group_id
        .as_ref()
        .map(|g| g.0.to_string())
        .unwrap_or_default();
    if group.is_empty() {
        let mut r = ShareFetchResponse::default();
        r.error_code = ErrorCode::INVALID_REQUEST.0;
        return r;
    }
    match route(shard, &group, GroupCall::ShareFetch { req, origin }).await {
        Ok(GroupReply::ShareFetch(r)) => r,
        other => {
            let mut r = ShareFetchResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

/// ShareAcknowledge (KIP-932), at the group's coordinator.
pub async fn share_acknowledge(
    shard: &Rc<Shard>,
    req: ShareAcknowledgeRequest,
    origin: Option<i32>,
) -> ShareAcknowledgeResponse {
    let group = req
        .group_id
        .as_ref()
        .map(|g| g.0.to_string())
        .unwrap_or_default();
    if group.is_empty() {
        let mut r = ShareAcknowledgeResponse::default();
        r.error_code = ErrorCode::INVALID_REQUEST.0;
        return r;
    }
    match route(shard, &group, GroupCall::ShareAcknowledge { req, origin }).await {
        Ok(GroupReply::ShareAcknowledge(r)) => r,
        other => {
            let mut r = ShareAcknowledgeResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

/// ShareGroupDescribe (KIP-932): each group asked of its coordinator.
pub async fn share_describe(
    shard: &Rc<Shard>,
    req: ShareGroupDescribeRequest,
) -> ShareGroupDescribeResponse {
    use kafka_protocol::messages::share_group_describe_response::DescribedGroup;
    let ops = req.include_authorized_operations;
    let mut response = ShareGroupDescribeResponse::default();
    response.groups = describe_each(
        shard,
        &req.group_ids,
        |group| GroupCall::ShareDescribe { group },
        |r| match r {
            GroupReply::ShareDescribe(mut d) => {
                if ops && d.error_code == 0 {
                    d.authorized_operations = crate::model::authorized::GROUP;
                }
                Some(d)
            }
            _ => None,
        },
        |group, code| {
            let mut d = DescribedGroup::default();
            d.group_id = GroupId(str_bytes(group));
            d.error_code = code.0;
            d
        },
    )
    .await;
    response
}

/// AlterShareGroupOffsets (KIP-932), at the group's coordinator.
pub async fn alter_share_offsets(
    shard: &Rc<Shard>,
    req: AlterShareGroupOffsetsRequest,
) -> AlterShareGroupOffsetsResponse {
    let group = req.group_id.0.to_string();
    match route(shard, &group, GroupCall::AlterShareOffsets { req }).await {
        Ok(GroupReply::AlterShareOffsets(r)) => r,
        other => {
            let mut r = AlterShareGroupOffsetsResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

/// DeleteShareGroupOffsets (KIP-932), at the group's coordinator.
pub async fn delete_share_offsets(
    shard: &Rc<Shard>,
    req: DeleteShareGroupOffsetsRequest,
) -> DeleteShareGroupOffsetsResponse {
    let group = req.group_id.0.to_string();
    match route(shard, &group, GroupCall::DeleteShareOffsets { req }).await {
        Ok(GroupReply::DeleteShareOffsets(r)) => r,
        other => {
            let mut r = DeleteShareGroupOffsetsResponse::default();
            r.error_code = error_of(other).0;
            r
        }
    }
}

/// DescribeShareGroupOffsets (KIP-932): each share-partition's start offset (every record below
/// it is done), -1 for a partition the group has not started; the admin clients' lag is the log
/// end offset minus it.
pub async fn share_offsets(
    shard: &Rc<Shard>,
    req: DescribeShareGroupOffsetsRequest,
) -> DescribeShareGroupOffsetsResponse {
    use kafka_protocol::messages::describe_share_group_offsets_response::{
        DescribeShareGroupOffsetsResponseGroup, DescribeShareGroupOffsetsResponsePartition,
        DescribeShareGroupOffsetsResponseTopic,
    };
    let table = shard.topics();
    let mut response = DescribeShareGroupOffsetsResponse::default();
    for g in req.groups {
        let group = g.group_id.0.to_string();
        let mut out = DescribeShareGroupOffsetsResponseGroup::default();
        out.group_id = g.group_id.clone();
        let call = GroupCall::ShareOffsets {
            group: group.clone(),
        };
        let known = match route(shard, &group, call).await {
            Ok(GroupReply::ShareOffsets(Some(list))) => list,
            Ok(GroupReply::ShareOffsets(None)) => {
                out.error_code = ErrorCode::GROUP_ID_NOT_FOUND.0;
                out.error_message = Some(str_bytes(&format!("group {group} is not a share group")));
                response.groups.push(out);
                continue;
            }
            other => {
                out.error_code = error_of(other).0;
                response.groups.push(out);
                continue;
            }
        };
        let starts: BTreeMap<(String, i32), i64> =
            known.into_iter().map(|(t, p, o)| ((t, p), o)).collect();
        let wanted: Vec<(String, Vec<i32>)> = match g.topics {
            Some(topics) => topics
                .into_iter()
                .map(|t| (t.topic_name.0.to_string(), t.partitions))
                .collect(),
            None => {
                let mut by_topic: BTreeMap<String, Vec<i32>> = BTreeMap::new();
                for (t, p) in starts.keys() {
                    by_topic.entry(t.clone()).or_default().push(*p);
                }
                by_topic.into_iter().collect()
            }
        };
        for (topic, partitions) in wanted {
            let mut t = DescribeShareGroupOffsetsResponseTopic::default();
            t.topic_name = topic_name(&topic);
            let meta = table.get(&topic);
            if let Some(m) = meta {
                t.topic_id = uuid::Uuid::from_bytes(m.id);
            }
            for p in partitions {
                let mut rp = DescribeShareGroupOffsetsResponsePartition::default();
                rp.partition_index = p;
                rp.leader_epoch = -1;
                if meta.is_none_or(|m| p < 0 || p >= m.partitions) {
                    rp.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0;
                    rp.start_offset = -1;
                } else {
                    rp.start_offset = starts.get(&(topic.clone(), p)).copied().unwrap_or(-1);
                }
                t.partitions.push(rp);
            }
            out.topics.push(t);
        }
        response.groups.push(out);
    }
    response
}
