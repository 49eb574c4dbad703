//! DeleteTopics: by name (v1-5) or by name or topic id (v6). Partitions are closed and their
//! directories removed on every owning shard before the answer.

use std::rc::Rc;

use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::{DeleteTopicsRequest, DeleteTopicsResponse};

use super::{str_bytes, topic_name};
use crate::model::{ErrorCode, ShardId};
use crate::shard::{Reply, Request, Shard};

pub async fn handle(
    shard: &Rc<Shard>,
    req: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let table = shard.topics();
    let mut wanted: Vec<(Option<String>, uuid::Uuid)> = req
        .topic_names
        .iter()
        .map(|n| (Some(n.0.to_string()), uuid::Uuid::nil()))
        .collect();
    wanted.extend(
        req.topics
            .iter()
            .map(|t| (t.name.as_ref().map(|n| n.0.to_string()), t.topic_id)),
    );
    let resolved: Vec<Option<String>> = wanted
        .iter()
        .map(|(name, id)| match name {
            Some(n) => Some(n.clone()),
            None => table
                .topics
                .values()
                .find(|t| uuid::Uuid::from_bytes(t.id) == *id)
                .map(|t| t.name.to_string()),
        })
        .collect();
    let names: Vec<String> = resolved.iter().flatten().cloned().collect();
    let reply = shard.call(ShardId(0), Request::DeleteTopics(names)).await;
    let mut outcomes = match reply {
        Reply::Deleted(r) => r.into_iter(),
        _ => Vec::new().into_iter(),
    };
    let mut response = DeleteTopicsResponse::default();
    for ((_, id), name) in wanted.into_iter().zip(resolved) {
        let mut r = DeletableTopicResult::default();
        if version >= 6 {
            r.topic_id = id;
        }
        let code = match &name {
            Some(n) => {
                r.name = Some(topic_name(n));
                outcomes
                    .next()
                    .map_or(ErrorCode::UNKNOWN_SERVER_ERROR, |(_, c)| c)
            }
            None => ErrorCode(100), // UNKNOWN_TOPIC_ID
        };
        r.error_code = code.0;
        if !code.is_ok() && version >= 5 {
            r.error_message = Some(str_bytes("topic could not be deleted"));
        }
        response.responses.push(r);
    }
    response
}
