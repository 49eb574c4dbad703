//! AlterPartitionReassignments and ListPartitionReassignments (KIP-455): replica moves between
//! brokers. The controller commits a partition's target replicas; the partition's Raft leader
//! then changes the group's membership one replica at a time (a new replica as a learner first,
//! caught up from a snapshot and the log, then a voter; leaving replicas removed last), so the
//! partition stays available throughout. Listing reads the committed table, at any broker.

use std::rc::Rc;

use kafka_protocol::messages::alter_partition_reassignments_response::{
    ReassignablePartitionResponse, ReassignableTopicResponse,
};
use kafka_protocol::messages::list_partition_reassignments_response::{
    OngoingPartitionReassignment, OngoingTopicReassignment,
};
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, BrokerId,
    ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse, TopicName,
};

use super::str_bytes;
use crate::model::{ErrorCode, ShardId};
use crate::shard::{Reply, Request, Shard};

pub async fn alter(
    shard: &Rc<Shard>,
    req: AlterPartitionReassignmentsRequest,
) -> AlterPartitionReassignmentsResponse {
    let mut response = AlterPartitionReassignmentsResponse::default();
    if shard.cluster().is_none() {
        response.error_code = ErrorCode::INVALID_REQUEST.0;
        response.error_message = Some(str_bytes(
            "A single broker has no other broker to move replicas to.",
        ));
        return response;
    }
    let items: Vec<(String, i32, Option<Vec<i32>>)> = req
        .topics
        .iter()
        .flat_map(|t| {
            t.partitions.iter().map(|p| {
                (
                    t.name.0.to_string(),
                    p.partition_index,
                    p.replicas.as_ref().map(|r| r.iter().map(|b| b.0).collect()),
                )
            })
        })
        .collect();
    let reply = shard
        .call(
            ShardId(0),
            Request::Reassign {
                items,
                allow_rf_change: req.allow_replication_factor_change,
            },
        )
        .await;
    let mut results = match reply {
        Reply::Altered(r) => r.into_iter(),
        _ => Vec::new().into_iter(),
    };
    for t in req.topics {
        let mut tr = ReassignableTopicResponse::default();
        tr.name = t.name;
        for p in t.partitions {
            let (code, message) = results
                .next()
                .unwrap_or((ErrorCode::UNKNOWN_SERVER_ERROR, None));
            let mut pr = ReassignablePartitionResponse::default();
            pr.partition_index = p.partition_index;
            pr.error_code = code.0;
            pr.error_message = message.as_deref().map(str_bytes);
            tr.partitions.push(pr);
        }
        response.responses.push(tr);
    }
    response
}

pub fn list(
    shard: &Rc<Shard>,
    req: ListPartitionReassignmentsRequest,
) -> ListPartitionReassignmentsResponse {
    let table = shard.topics();
    let mut response = ListPartitionReassignmentsResponse::default();
    let wanted = |topic: &str, p: i32| match &req.topics {
        None => true,
        Some(ts) => ts
            .iter()
            .any(|t| &*t.name.0 == topic && t.partition_indexes.contains(&p)),
    };
    let mut by_topic: std::collections::BTreeMap<&str, Vec<OngoingPartitionReassignment>> =
        std::collections::BTreeMap::new();
    for ((topic, p), target) in &table.reassigning {
        if !wanted(topic, *p) {
            continue;
        }
        let current = table.replicas_of(topic, *p).cloned().unwrap_or_default();
        let mut all = current.clone();
        all.extend(target.iter().filter(|b| !current.contains(b)));
        let mut o = OngoingPartitionReassignment::default();
        o.partition_index = *p;
        o.replicas = all.iter().map(|b| BrokerId(*b)).collect();
        o.adding_replicas = target
            .iter()
            .filter(|b| !current.contains(b))
            .map(|b| BrokerId(*b))
            .collect();
        o.removing_replicas = current
            .iter()
            .filter(|b| !target.contains(b))
            .map(|b| BrokerId(*b))
            .collect();
        by_topic.entry(topic.as_str()).or_default().push(o);
    }
    for (topic, partitions) in by_topic {
        let mut t = OngoingTopicReassignment::default();
        t.name = TopicName(str_bytes(topic));
        t.partitions = partitions;
        response.topics.push(t);
    }
    response
}
