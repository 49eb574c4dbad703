//! Produce: every partition's batches go to the shard that owns the partition, all partitions at
//! once, in one call per owning shard; the response lists them in request order. `acks=1`
//! answers once the batches are written, `acks=all` once they are fdatasynced (single node: the
//! whole in-sync replica set), `acks=0` not at all.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::protocol::StrBytes;

use crate::model::{ErrorCode, PartitionId, ShardId, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard};
use crate::storage::{AppendError, Appended};

/// One owning shard's share of a request: the result slots and batches of its partitions.
type OwnerBatches = (Vec<usize>, Vec<(TopicPartition, Bytes)>);

pub async fn handle(shard: &Rc<Shard>, req: ProduceRequest, version: i16) -> ProduceResponse {
    let acks = req.acks;
    let transactional_id: Option<Arc<str>> = req
        .transactional_id
        .as_ref()
        .filter(|t| !t.is_empty())
        .map(|t| Arc::from(t.0.as_str()));
    let table = shard.topics();
    // Each partition's result, in request order: refused here, or filled in by its owner.
    let mut results: Vec<Option<Result<Appended, AppendError>>> = Vec::new();
    let mut by_owner: BTreeMap<usize, OwnerBatches> = BTreeMap::new();
    for topic in &req.topic_data {
        let name: Arc<str> = Arc::from(topic.name.0.as_str());
        let partitions = table.get(&name).map_or(0, |t| t.partitions);
        for p in &topic.partition_data {
            let refused = if !matches!(acks, -1..=1) {
                Some(ErrorCode::INVALID_REQUIRED_ACKS)
            } else if p.index < 0 || p.index >= partitions {
                Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION)
            } else {
                None
            };
            let records = p.records.as_ref().filter(|r| !r.is_empty());
            match (refused, records) {
                (Some(code), _) => results.push(Some(Err(code.into()))),
                (None, None) => results.push(Some(Err(ErrorCode::CORRUPT_MESSAGE.into()))),
                (None, Some(records)) => {
                    let tp = TopicPartition {
                        topic: name.clone(),
                        partition: PartitionId(p.index),
                    };
                    let (slots, batches) = by_owner.entry(shard.owner_of(&tp).0).or_default();
                    slots.push(results.len());
                    batches.push((tp, records.clone()));
                    results.push(None);
                }
            }
        }
    }
    let calls = by_owner.into_iter().map(|(owner, (slots, batches))| {
        let shard = shard.clone();
        let transactional_id = transactional_id.clone();
        async move {
            let n = batches.len();
            let request = Request::Append {
                batches,
                acks,
                transactional_id,
            };
            let appended = match shard.call(ShardId(owner), request).await {
                Reply::Append(list) if list.len() == n => list,
                _ => (0..n)
                    .map(|_| Err(ErrorCode::UNKNOWN_SERVER_ERROR.into()))
                    .collect(),
            };
            (slots, appended)
        }
    });
    for (slots, appended) in join_all(calls.collect()).await {
        for (slot, result) in slots.into_iter().zip(appended) {
            results[slot] = Some(result);
        }
    }
    let mut response = ProduceResponse::default();
    let mut results = results.into_iter();
    for topic in req.topic_data {
        let mut t = TopicProduceResponse::default();
        t.name = topic.name;
        for p in topic.partition_data {
            let mut r = PartitionProduceResponse::default();
            r.index = p.index;
            let result = results
                .next()
                .flatten()
                .unwrap_or_else(|| Err(ErrorCode::UNKNOWN_SERVER_ERROR.into()));
            match result {
                Ok(a) => {
                    r.base_offset = a.base_offset.0;
                    r.log_append_time_ms = a.log_append_time_ms;
                    if version >= 5 {
                        r.log_start_offset = a.log_start_offset.0;
                    }
                }
                Err(e) => {
                    r.error_code = e.code.0;
                    r.base_offset = -1;
                    r.log_append_time_ms = -1;
                    if version >= 8 {
                        // KIP-467: which records were refused and why, so a client fails just
                        // those.
                        r.error_message = e.message.map(StrBytes::from_string);
                        r.record_errors = e
                            .record_errors
                            .into_iter()
                            .map(|(index, why)| {
                                let mut b = BatchIndexAndErrorMessage::default();
                                b.batch_index = index;
                                b.batch_index_error_message = Some(StrBytes::from_string(why));
                                b
                            })
                            .collect();
                    }
                }
            }
            t.partition_responses.push(r);
        }
        response.responses.push(t);
    }
    response
}
