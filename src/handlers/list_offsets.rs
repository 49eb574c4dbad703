//! ListOffsets: latest (-1, the high watermark), earliest (-2, the log start offset), max
//! timestamp (-3), or the first record whose timestamp is at or after a given time.

use std::rc::Rc;

use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};

use crate::model::{ErrorCode, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard};

pub async fn handle(
    shard: &Rc<Shard>,
    req: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let table = shard.topics();
    let mut calls = Vec::new();
    for topic in &req.topics {
        for p in &topic.partitions {
            let tp = TopicPartition::new(&topic.name.0, p.partition_index);
            let known = table
                .get(&tp.topic)
                .is_some_and(|t| p.partition_index >= 0 && p.partition_index < t.partitions);
            let shard = shard.clone();
            let timestamp = p.timestamp;
            calls.push(async move {
                if !known {
                    return Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION);
                }
                let owner = shard.owner_of(&tp);
                match shard
                    .call(owner, Request::ListOffset { tp, timestamp })
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
