//! CreateTopics: validated and applied by the controller on shard 0; `validate_only` checks and
//! creates nothing. Replica assignments may fix the partition count; with one broker, only
//! replication factor 1 can be met.

use std::rc::Rc;

use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};

use super::str_bytes;
use crate::model::ShardId;
use crate::shard::{Reply, Request, Shard, TopicSpec};

pub async fn handle(
    shard: &Rc<Shard>,
    req: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let specs: Vec<TopicSpec> = req
        .topics
        .iter()
        .map(|t| {
            let (partitions, replication_factor) = match t.assignments.first() {
                Some(first) => (
                    i32::try_from(t.assignments.len()).unwrap_or(i32::MAX),
                    i16::try_from(first.broker_ids.len()).unwrap_or(i16::MAX),
                ),
                None => (t.num_partitions, t.replication_factor),
            };
            TopicSpec {
                name: t.name.0.to_string(),
                partitions,
                replication_factor,
                configs: t
                    .configs
                    .iter()
                    .filter_map(|c| Some((c.name.to_string(), c.value.as_ref()?.to_string())))
                    .collect(),
            }
        })
        .collect();
    let reply = shard
        .call(
            ShardId(0),
            Request::CreateTopics {
                specs,
                validate_only: req.validate_only,
            },
        )
        .await;
    let mut response = CreateTopicsResponse::default();
    let Reply::Created(results) = reply else {
        return response;
    };
    for (topic, (_, result)) in req.topics.into_iter().zip(results) {
        let mut r = CreatableTopicResult::default();
        r.name = topic.name;
        match result {
            Ok(t) => {
                if version >= 7 {
                    r.topic_id = uuid::Uuid::from_bytes(t.id);
                }
                if version >= 5 {
                    r.num_partitions = t.partitions;
                    r.replication_factor = 1;
                }
            }
            Err((code, message)) => {
                r.error_code = code.0;
                r.error_message = Some(str_bytes(&message));
            }
        }
        response.topics.push(r);
    }
    response
}
