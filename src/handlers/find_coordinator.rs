//! FindCoordinator: on a single node this broker coordinates every consumer group and
//! transactional id (their partitions of `__consumer_offsets` and `__transaction_state` live
//! here); in a cluster the leader of that partition does. librdkafka also reads this API's
//! presence as the sign that a broker takes LZ4 batches.

use std::rc::Rc;

use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::{BrokerId, FindCoordinatorRequest, FindCoordinatorResponse};
use kafka_protocol::protocol::StrBytes;

use super::str_bytes;
use crate::group::{partition_for_group, OFFSETS_TOPIC};
use crate::model::{ErrorCode, TopicPartition};
use crate::shard::Shard;

const KEY_TYPE_TRANSACTION: i8 = 1;

/// A broker's id and client address.
type BrokerAddress = (i32, (String, u16));

pub async fn handle(
    shard: &Rc<Shard>,
    req: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let transaction = req.key_type == KEY_TYPE_TRANSACTION;
    let mut refused = (req.key_type != 0 && !transaction).then_some(ErrorCode::INVALID_REQUEST);
    if refused.is_none() {
        let ensured = if transaction {
            super::transactions::ensure_txn_topic(shard).await
        } else {
            super::groups::ensure_offsets_topic(shard).await
        };
        if let Err(e) = ensured {
            refused = Some(e);
        }
    }
    let message = None;
    let keys: Vec<StrBytes> = if version >= 4 {
        req.coordinator_keys
    } else {
        vec![req.key]
    };
    let found: Vec<(StrBytes, Result<BrokerAddress, ErrorCode>)> = keys
        .into_iter()
        .map(|key| {
            let result = match refused {
                Some(code) => Err(code),
                None => coordinator_of(shard, &key, transaction),
            };
            (key, result)
        })
        .collect();
    let mut response = FindCoordinatorResponse::default();
    if version >= 4 {
        response.coordinators = found
            .into_iter()
            .map(|(key, result)| {
                let mut c = Coordinator::default();
                c.key = key;
                c.error_message = message.clone();
                match result {
                    Ok((node, (host, port))) => {
                        c.node_id = BrokerId(node);
                        c.host = str_bytes(&host);
                        c.port = i32::from(port);
                    }
                    Err(code) => {
                        c.error_code = code.0;
                        c.node_id = BrokerId(-1);
                    }
                }
                c
            })
            .collect();
        return response;
    }
    if version >= 1 {
        response.error_message = message;
    }
    match found.into_iter().next().map(|(_, r)| r) {
        Some(Ok((node, (host, port)))) => {
            response.node_id = BrokerId(node);
            response.host = str_bytes(&host);
            response.port = i32::from(port);
        }
        Some(Err(code)) => {
            response.error_code = code.0;
            response.node_id = BrokerId(-1);
        }
        None => response.node_id = BrokerId(-1),
    }
    response
}

/// The broker coordinating a group (or a transactional id): this one on a single node; in a
/// cluster the leader of its partition of `__consumer_offsets` (or `__transaction_state`).
fn coordinator_of(shard: &Shard, key: &str, transaction: bool) -> Result<BrokerAddress, ErrorCode> {
    let Some(cluster) = shard.cluster() else {
        return Ok((shard.options.broker.node_id, shard.advertised.clone()));
    };
    let tp = if transaction {
        if key.is_empty() {
            return Err(ErrorCode::INVALID_REQUEST);
        }
        super::transactions::state_partition(shard, key)
    } else {
        TopicPartition::new(
            OFFSETS_TOPIC,
            partition_for_group(key, shard.options.broker.offsets_topic_partitions),
        )
    };
    let leader = cluster
        .leader_of(&tp)
        .or_else(|| {
            let key = (tp.topic.to_string(), tp.partition.0);
            shard.topics().leaders.get(&key).copied()
        })
        .map(|(l, _)| l)
        .filter(|l| *l >= 0)
        .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)?;
    super::metadata::brokers(shard)
        .into_iter()
        .find(|(id, _)| *id == leader)
        .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)
}
