//! CreatePartitions: grows topics (never shrinks); a result for every topic asked about.

use std::rc::Rc;

use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};

use super::str_bytes;
use crate::model::{ErrorCode, ShardId};
use crate::shard::{Reply, Request, Shard};

pub async fn handle(shard: &Rc<Shard>, req: CreatePartitionsRequest) -> CreatePartitionsResponse {
    let topics: Vec<(String, i32)> = req
        .topics
        .iter()
        .map(|t| (t.name.0.to_string(), t.count))
        .collect();
    let reply = shard
        .call(
            ShardId(0),
            Request::CreatePartitions {
                topics,
                validate_only: req.validate_only,
            },
        )
        .await;
    let mut results = match reply {
        Reply::Altered(r) => r.into_iter(),
        _ => Vec::new().into_iter(),
    };
    let mut response = CreatePartitionsResponse::default();
    for t in req.topics {
        let (code, message) = results
            .next()
            .unwrap_or((ErrorCode::UNKNOWN_SERVER_ERROR, None));
        let mut r = CreatePartitionsTopicResult::default();
        r.name = t.name;
        r.error_code = code.0;
        r.error_message = message.as_deref().map(str_bytes);
        response.results.push(r);
    }
    response
}
