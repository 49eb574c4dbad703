//! DescribeQuorum (KIP-595, KIP-836): the Raft state of a group at its leader. Kafka answers it
//! for `__cluster_metadata` only; every strom partition is a Raft group as well, so strom
//! answers for any partition the broker leads. Offsets in the answer are Raft indexes: the high
//! watermark is the commit index, each replica's log end offset is how far its log matches the
//! leader's, and the timestamps are when the leader last heard from it and when it last caught
//! up with the leader's log end (Kafka's `replica.lag.time.max.ms` rule). A broker that follows
//! answers `NOT_LEADER_OR_FOLLOWER`; a request naming only `__cluster_metadata` is forwarded to
//! the controller (see `forward`), as Kafka's admin clients send it to any broker.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use kafka_protocol::messages::describe_quorum_response::{
    Listener, Node, PartitionData, ReplicaState, TopicData,
};
use kafka_protocol::messages::{BrokerId, DescribeQuorumRequest, DescribeQuorumResponse};

use super::str_bytes;
use crate::model::{ErrorCode, TopicPartition};
use crate::replication::group::{Quorum, ReplicaProgress};
use crate::shard::{Reply, Request, Shard};

pub async fn handle(
    shard: &Rc<Shard>,
    req: DescribeQuorumRequest,
    version: i16,
) -> DescribeQuorumResponse {
    let mut response = DescribeQuorumResponse::default();
    if shard.cluster().is_none() {
        response.error_code = ErrorCode::INVALID_REQUEST.0;
        if version >= 2 {
            response.error_message = Some(str_bytes(
                "This broker runs as a single node: it has no Raft quorum.",
            ));
        }
        return response;
    }
    let tps: Vec<TopicPartition> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|p| TopicPartition::new(&t.topic_name.0, p.partition_index))
        })
        .collect();
    let answers = quorums(shard, tps).await;
    let now_ms = i64::try_from(crate::storage::partition::now_ms()).unwrap_or(i64::MAX);
    for t in req.topics {
        let mut td = TopicData::default();
        td.topic_name = t.topic_name.clone();
        for p in t.partitions {
            let tp = TopicPartition::new(&t.topic_name.0, p.partition_index);
            let mut pd = PartitionData::default();
            pd.partition_index = p.partition_index;
            match answers.get(&tp) {
                Some(Ok(q)) => fill(&mut pd, q, now_ms),
                Some(Err(code)) => {
                    pd.error_code = code.0;
                    pd.leader_id = BrokerId(-1);
                }
                None => {
                    pd.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0;
                    pd.leader_id = BrokerId(-1);
                }
            }
            td.partitions.push(pd);
        }
        response.topics.push(td);
    }
    if version >= 2 {
        // KIP-853: the listeners of the replicas named above.
        let brokers = &shard.topics().brokers;
        let mut ids: Vec<i32> = response
            .topics
            .iter()
            .flat_map(|t| &t.partitions)
            .flat_map(|p| p.current_voters.iter().chain(&p.observers))
            .map(|r| r.replica_id.0)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            let Some((host, port)) = brokers.get(&id) else {
                continue;
            };
            let mut listener = Listener::default();
            listener.name = str_bytes("PLAINTEXT");
            listener.host = str_bytes(host);
            listener.port = *port;
            let mut node = Node::default();
            node.node_id = BrokerId(id);
            node.listeners = vec![listener];
            response.nodes.push(node);
        }
    }
    response
}

/// The Raft state of each named group, asked of the shards that own them.
pub async fn quorums(
    shard: &Rc<Shard>,
    tps: Vec<TopicPartition>,
) -> HashMap<TopicPartition, Result<Quorum, ErrorCode>> {
    let mut out = shard
        .ask_owners(tps, Request::Quorum, |reply| match reply {
            Reply::Quorum(list) => list,
            _ => Vec::new(),
        })
        .await;
    // A partition of the table with no replica here: its leader is elsewhere.
    let table = shard.topics();
    for (tp, answer) in out.iter_mut() {
        if matches!(answer, Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION))
            && table.replicas_of(&tp.topic, tp.partition.0).is_some()
        {
            *answer = Err(ErrorCode::NOT_LEADER_OR_FOLLOWER);
        }
    }
    out
}

fn fill(pd: &mut PartitionData, q: &Quorum, now_ms: i64) {
    pd.leader_id = BrokerId(q.leader);
    pd.leader_epoch = i32::try_from(q.term).unwrap_or(i32::MAX);
    pd.high_watermark = i64::try_from(q.commit).unwrap_or(i64::MAX);
    let state = |r: &ReplicaProgress| {
        let at = |ago: Option<Duration>| {
            ago.map_or(-1, |d| {
                now_ms - i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 2)
            })
        };
        let mut s = ReplicaState::default();
        s.replica_id = BrokerId(r.id);
        s.log_end_offset = i64::try_from(r.log_end).unwrap_or(i64::MAX);
        s.last_fetch_timestamp = at(r.heard);
        s.last_caught_up_timestamp = at(r.caught_up);
        s
    };
    pd.current_voters = q.voters.iter().map(state).collect();
    pd.observers = q.observers.iter().map(state).collect();
}
