//! InitProducerId for idempotent producers: a producer id never handed out before (allocated by
//! the controller from persisted blocks), epoch 0; a producer that re-initialises with its id and
//! epoch (v3+) keeps the id and gets the next epoch. Transactions are not supported yet: a
//! transactional id is refused with `INVALID_REQUEST`.

use std::rc::Rc;

use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};

use crate::model::{ErrorCode, ShardId};
use crate::shard::{Reply, Request, Shard};

pub async fn handle(shard: &Rc<Shard>, req: InitProducerIdRequest) -> InitProducerIdResponse {
    let mut response = InitProducerIdResponse::default();
    response.producer_id = ProducerId(-1);
    response.producer_epoch = -1;
    if req.transactional_id.is_some() {
        response.error_code = ErrorCode::INVALID_REQUEST.0;
        return response;
    }
    if req.producer_id.0 >= 0 && req.producer_epoch >= 0 && req.producer_epoch < i16::MAX - 1 {
        response.producer_id = req.producer_id;
        response.producer_epoch = req.producer_epoch + 1;
        return response;
    }
    match shard.call(ShardId(0), Request::AllocateProducerId).await {
        Reply::ProducerId(Ok(id)) => {
            response.producer_id = ProducerId(id);
            response.producer_epoch = 0;
        }
        Reply::ProducerId(Err(code)) => response.error_code = code.0,
        _ => response.error_code = ErrorCode::UNKNOWN_SERVER_ERROR.0,
    }
    response
}
