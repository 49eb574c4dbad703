//! ListOffsets: latest (-1, the high watermark), earliest (-2, the log start offset), max
//! timestamp (-3), earliest local (-4, the log start: no tiered storage), latest tiered (-5: none,
//! offset -1), or the first record whose timestamp is at or after a given time. A
//! `current_leader_epoch` that is not the partition's gets FENCED_LEADER_EPOCH or
//! UNKNOWN_LEADER_EPOCH (KIP-320).

use std::rc::Rc;

use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::offset_for_leader_epoch_response::{
    EpochEndOffset, OffsetForLeaderTopicResult,
};
use kafka_protocol::messages::{
    ListOffsetsRequest, ListOffsetsResponse, OffsetForLeaderEpochRequest,
    OffsetForLeaderEpochResponse,
};

use crate::model::{ErrorCode, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard};

pub async fn handle(
    shard: &Rc<Shard>,
    req: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let table = shard.topics();
    // `read_committed` consumers (isolation level 1) see the last stable offset as the latest.
    let committed = version >= 2 && req.isolation_level == 1;
    let mut calls = Vec::new();
    for topic in &req.topics {
        for p in &topic.partitions {
            let tp = TopicPartition::new(&topic.name.0, p.partition_index);
            let known = table
                .get(&tp.topic)
                .is_some_and(|t| p.partition_index >= 0 && p.partition_index < t.partitions);
            let shard = shard.clone();
            let timestamp = p.timestamp;
            let current_leader_epoch = if version >= 4 {
                p.current_leader_epoch
            } else {
                -1
            };
            calls.push(async move {
                if !known {
                    return Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION);
                }
                let owner = shard.owner_of(&tp);
                match shard
                    .call(
                        owner,
                        Request::ListOffset {
                            tp,
                            timestamp,
                            current_leader_epoch,
                            committed,
                        },
                    )
                    .await
                {
                    Reply::ListOffset(r) => r,
                    _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
                }
            });
        }
    }
    let mut results = join_all(calls).await.into_iter();
    let mut response = ListOffsetsResponse::default();
    for topic in req.topics {
        let mut t = ListOffsetsTopicResponse::default();
        t.name = topic.name;
        for p in topic.partitions {
            let mut r = ListOffsetsPartitionResponse::default();
            r.partition_index = p.partition_index;
            r.timestamp = -1;
            r.offset = -1;
            match results.next().expect("one result per partition") {
                Ok(Some((offset, timestamp))) => {
                    r.offset = offset.0;
                    r.timestamp = timestamp;
                    if version >= 4 {
                        r.leader_epoch = 0;
                    }
                }
                Ok(None) => {}
                Err(code) => r.error_code = code.0,
            }
            t.partitions.push(r);
        }
        response.topics.push(t);
    }
    response
}

/// OffsetForLeaderEpoch (KIP-101/KIP-320): for each partition, the largest epoch at or below the
/// one asked for and the offset where it ended, so a client (or, with replication, a follower)
/// can tell whether the log it read from was truncated. Every batch a partition holds carries the
/// epoch it was written in; the current epoch ends at the log end offset. An epoch above the
/// current one is unknown here: `-1` and `-1`, as Kafka answers.
pub async fn offset_for_leader_epoch(
    shard: &Rc<Shard>,
    req: OffsetForLeaderEpochRequest,
) -> OffsetForLeaderEpochResponse {
    let table = shard.topics();
    let mut wanted = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            let tp = TopicPartition::new(&t.topic.0, p.partition);
            if table
                .get(&tp.topic)
                .is_some_and(|topic| (0..topic.partitions).contains(&p.partition))
            {
                wanted.push(tp);
            }
        }
    }
    let facts = shard.partition_facts(wanted).await;
    let mut response = OffsetForLeaderEpochResponse::default();
    for t in req.topics {
        let mut rt = OffsetForLeaderTopicResult::default();
        rt.topic = t.topic.clone();
        for p in t.partitions {
            let mut e = EpochEndOffset::default();
            e.partition = p.partition;
            e.leader_epoch = -1;
            e.end_offset = -1;
            let tp = TopicPartition::new(&t.topic.0, p.partition);
            match facts.get(&tp) {
                None if shard.cluster().is_some() => {
                    e.error_code = ErrorCode::NOT_LEADER_OR_FOLLOWER.0
                }
                None => e.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0,
                Some(f) if !f.leading => e.error_code = ErrorCode::NOT_LEADER_OR_FOLLOWER.0,
                Some(f)
                    if p.current_leader_epoch >= 0 && p.current_leader_epoch < f.leader_epoch =>
                {
                    e.error_code = ErrorCode::FENCED_LEADER_EPOCH.0;
                }
                Some(f) if p.current_leader_epoch > f.leader_epoch => {
                    e.error_code = ErrorCode::UNKNOWN_LEADER_EPOCH.0;
                }
                Some(f) if p.leader_epoch == f.leader_epoch => {
                    e.leader_epoch = f.leader_epoch;
                    e.end_offset = f.log_end.0;
                }
                // An older epoch. On a single node no batch carries one (every batch has the
                // partition's epoch): as Kafka, it ends where the known epochs start, the log
                // start. In a cluster the segments hold committed batches only, and Raft never
                // changes a committed batch, so what a consumer read under an older epoch is a
                // prefix of this log and there is never anything to truncate. The answer is the
                // log end, which a client's validation (KIP-320) compares with its position and
                // accepts. Kafka answers the start of the next epoch; strom keeps no epoch cache
                // yet, and no client of a committed-only log needs the difference.
                Some(f) if p.leader_epoch >= 0 && p.leader_epoch < f.leader_epoch => {
                    e.leader_epoch = p.leader_epoch;
                    e.end_offset = if shard.cluster().is_some() {
                        f.log_end.0
                    } else {
                        f.log_start.0
                    };
                }
                Some(_) => {}
            }
            rt.partitions.push(e);
        }
        response.topics.push(rt);
    }
    response
}
