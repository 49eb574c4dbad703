//! Produce: every partition's batches go to the shard that owns the partition, all partitions at
//! once; the response lists them in request order. `acks=1` answers once the batches are written,
//! `acks=all` once they are fdatasynced (single node: the whole in-sync replica set), `acks=0` not
//! at all.

use std::rc::Rc;
use std::sync::Arc;

use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::protocol::StrBytes;

use crate::model::{ErrorCode, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard};
use crate::storage::{AppendError, Appended};

pub async fn handle(shard: &Rc<Shard>, req: ProduceRequest, version: i16) -> ProduceResponse {
    let acks = req.acks;
    let transactional_id: Option<Arc<str>> = req
        .transactional_id
        .as_ref()
        .filter(|t| !t.is_empty())
        .map(|t| Arc::from(t.0.as_str()));
    let table = shard.topics();
    let mut work = Vec::new();
    for topic in &req.topic_data {
        let name = topic.name.0.to_string();
        for p in &topic.partition_data {
            work.push((name.clone(), p.index, p.records.clone()));
        }
    }
    let calls = work.iter().map(|(name, index, records)| {
        let shard = shard.clone();
        let known = table
            .get(name)
            .is_some_and(|t| *index >= 0 && *index < t.partitions);
        let records = records.clone();
        let tp = TopicPartition::new(name, *index);
        let transactional_id = transactional_id.clone();
        async move {
            if !matches!(acks, -1..=1) {
                return Err(ErrorCode::INVALID_REQUIRED_ACKS.into());
            }
            if !known {
                return Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.into());
            }
            let Some(records) = records.filter(|r| !r.is_empty()) else {
                return Err(ErrorCode::CORRUPT_MESSAGE.into());
            };
            let owner = shard.owner_of(&tp);
            match shard
                .call(
                    owner,
                    Request::Append {
                        tp,
                        records,
                        acks,
                        transactional_id,
                    },
                )
                .await
            {
                Reply::Append(result) => result,
                _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR.into()),
            }
        }
    });
    let results: Vec<Result<Appended, AppendError>> = join_all(calls.collect()).await;
    let mut response = ProduceResponse::default();
    let mut results = results.into_iter();
    for topic in req.topic_data {
        let mut t = TopicProduceResponse::default();
        t.name = topic.name;
        for p in topic.partition_data {
            let mut r = PartitionProduceResponse::default();
            r.index = p.index;
            match results.next().expect("one result per partition") {
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
