//! DeleteRecords: moves each partition's log start offset forward (offset -1 means the high
//! watermark); whole segments below it are deleted.

use std::rc::Rc;

use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};

use crate::model::{ErrorCode, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard};

pub async fn handle(shard: &Rc<Shard>, req: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let table = shard.topics();
    let mut calls = Vec::new();
    for t in &req.topics {
        for p in &t.partitions {
            let tp = TopicPartition::new(&t.name.0, p.partition_index);
            let known = table.get(&tp.topic).is_some_and(|topic| {
                p.partition_index >= 0 && p.partition_index < topic.partitions
            });
            let offset = p.offset;
            let shard = shard.clone();
            calls.push(async move {
                if !known {
                    return Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION);
                }
                let owner = shard.owner_of(&tp);
                match shard
                    .call(owner, Request::DeleteRecords { tp, offset })
                    .await
                {
                    Reply::LowWatermark(r) => r,
                    _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
                }
            });
        }
    }
    let mut results = join_all(calls).await.into_iter();
    let mut response = DeleteRecordsResponse::default();
    for t in req.topics {
        let mut rt = DeleteRecordsTopicResult::default();
        rt.name = t.name;
        for p in t.partitions {
            let mut rp = DeleteRecordsPartitionResult::default();
            rp.partition_index = p.partition_index;
            match results.next().expect("one result per partition") {
                Ok(low) => rp.low_watermark = low.0,
                Err(code) => {
                    rp.error_code = code.0;
                    rp.low_watermark = -1;
                }
            }
            rt.partitions.push(rp);
        }
        response.topics.push(rt);
    }
    response
}
