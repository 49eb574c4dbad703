//! FindCoordinator: on a single node this broker coordinates every consumer group (the group's
//! partition of `__consumer_offsets` lives here). librdkafka also reads this API's presence as the
//! sign that a broker takes LZ4 batches. Transactions are not supported: a transaction key gets
//! `INVALID_REQUEST` with a message saying so.

use std::rc::Rc;

use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{BrokerId, FindCoordinatorRequest, FindCoordinatorResponse};
use kafka_protocol::protocol::StrBytes;

use super::str_bytes;
use crate::model::ErrorCode;
use crate::shard::Shard;

const KEY_TYPE_TRANSACTION: i8 = 1;

pub async fn handle(
    shard: &Rc<Shard>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let node = BrokerId(shard.options.broker.node_id);
    let host = str_bytes(&shard.advertised.0);
    let port = i32::from(shard.advertised.1);
    let mut refused = req.key_type == KEY_TYPE_TRANSACTION;
    let mut code = if refused {
        ErrorCode::INVALID_REQUEST.0
    } else {
        ErrorCode::NONE.0
    };
    if !refused {
        if let Err(e) = super::groups::ensure_offsets_topic(shard).await {
            refused = true;
            code = e.0;
        }
    }
    let message = (req.key_type == KEY_TYPE_TRANSACTION)
        .then(|| str_bytes("transactions are not supported by this broker"));
    let mut response = FindCoordinatorResponse::default();
    if version >= 4 {
        response.coordinators = req
            .coordinator_keys
            .into_iter()
            .map(|key: StrBytes| {
                let mut c = Coordinator::default();
                c.key = key;
                c.error_code = code;
                c.error_message = message.clone();
                if !refused {
                    c.node_id = node;
                    c.host = host.clone();
                    c.port = port;
                }
                c
            })
            .collect();
        return response;
    }
    response.error_code = code;
    if version >= 1 {
        response.error_message = message;
    }
    if refused {
        response.node_id = BrokerId(-1);
    } else {
        response.node_id = node;
        response.host = host;
        response.port = port;
    }
    response
}
