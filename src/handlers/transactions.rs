//! The transaction APIs (KIP-98, KIP-447): InitProducerId with a transactional id,
//! AddPartitionsToTxn (v0–3 from producers; the batched v4 form from brokers, `verify_only`
//! included), AddOffsetsToTxn, EndTxn, TxnOffsetCommit (to the group coordinator),
//! WriteTxnMarkers (from another broker's coordinator), DescribeTransactions and
//! ListTransactions. Each goes to the shard coordinating the transactional id (see
//! [`crate::txn`]); in a cluster, a broker that does not lead the id's partition answers
//! `NOT_COORDINATOR`.
//!
//! Versions that knew only `INVALID_PRODUCER_EPOCH` get it where newer ones get `PRODUCER_FENCED`
//! (KIP-588).

use std::rc::Rc;

use kafka_protocol::messages::add_partitions_to_txn_response::{
    AddPartitionsToTxnPartitionResult, AddPartitionsToTxnResult, AddPartitionsToTxnTopicResult,
};
use kafka_protocol::messages::describe_transactions_response::{TopicData, TransactionState};
use kafka_protocol::messages::list_transactions_response::TransactionState as ListedState;
use kafka_protocol::messages::write_txn_markers_request::{
    WritableTxnMarker, WritableTxnMarkerTopic,
};
use kafka_protocol::messages::write_txn_markers_response::{
    WritableTxnMarkerPartitionResult, WritableTxnMarkerResult, WritableTxnMarkerTopicResult,
};
use kafka_protocol::messages::{
    AddOffsetsToTxnRequest, AddOffsetsToTxnResponse, AddPartitionsToTxnRequest,
    AddPartitionsToTxnResponse, ApiKey, DescribeTransactionsRequest, DescribeTransactionsResponse,
    EndTxnRequest, EndTxnResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListTransactionsRequest, ListTransactionsResponse, ProducerId, TransactionalId,
    TxnOffsetCommitRequest, TxnOffsetCommitResponse, WriteTxnMarkersRequest,
    WriteTxnMarkersResponse,
};

use super::{str_bytes, topic_name};
use crate::group::{partition_for_group, GroupCall, GroupReply, OFFSETS_TOPIC};
use crate::model::{ErrorCode, ShardId, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard, TopicSpec};
use crate::storage::txn::Outcome;
use crate::txn::{partition_for_txn, TxnCall, TxnReply, TxnView, TRANSACTION_TOPIC};

/// `PRODUCER_FENCED` for versions from `since` on; `INVALID_PRODUCER_EPOCH` before.
fn versioned(code: ErrorCode, version: i16, since: i16) -> ErrorCode {
    if code == ErrorCode::PRODUCER_FENCED && version < since {
        ErrorCode::INVALID_PRODUCER_EPOCH
    } else {
        code
    }
}

/// `__transaction_state` as the controller creates it: compacted,
/// `transaction.state.log.num.partitions`, and in a cluster
/// `transaction.state.log.replication.factor` replicas (at most the brokers there are).
pub fn txn_topic_spec(shard: &Shard) -> TopicSpec {
    let broker = &shard.options.broker;
    super::internal_topics::spec(
        shard,
        TRANSACTION_TOPIC,
        broker.txn_topic_partitions,
        broker.txn_topic_replication_factor,
    )
}

/// Creates `__transaction_state` if it does not exist.
pub async fn ensure_txn_topic(shard: &Rc<Shard>) -> Result<(), ErrorCode> {
    super::internal_topics::ensure(shard, txn_topic_spec(shard), true).await
}

/// The partition of `__transaction_state` that holds `transactional_id`.
pub fn state_partition(shard: &Shard, transactional_id: &str) -> TopicPartition {
    TopicPartition::new(
        TRANSACTION_TOPIC,
        partition_for_txn(transactional_id, shard.options.broker.txn_topic_partitions),
    )
}

/// Sends `call` to the shard coordinating its transactional id.
async fn route(shard: &Rc<Shard>, id: &str, call: TxnCall) -> Result<TxnReply, ErrorCode> {
    if id.is_empty() {
        return Err(ErrorCode::INVALID_REQUEST);
    }
    ensure_txn_topic(shard).await?;
    let tp = state_partition(shard, id);
    if let Some(cluster) = shard.cluster() {
        match cluster.leader_of(&tp) {
            Some((leader, _)) if leader == cluster.node_id => {}
            Some((leader, _)) if leader >= 0 => return Err(ErrorCode::NOT_COORDINATOR),
            _ => return Err(ErrorCode::COORDINATOR_NOT_AVAILABLE),
        }
    }
    match shard
        .call(shard.owner_of(&tp), Request::Txn(Box::new(call)))
        .await
    {
        Reply::Txn(reply) => match *reply {
            TxnReply::Refused(code) => Err(code),
            reply => Ok(reply),
        },
        _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
    }
}

/// Asks the coordinator of `id` whether `tp` is in the producer's open transaction (KIP-890):
/// through its shard here, or AddPartitionsToTxn v4 with `verify_only` to the broker leading the
/// id's `__transaction_state` partition.
pub async fn verify(
    shard: &Rc<Shard>,
    id: &str,
    producer_id: i64,
    producer_epoch: i16,
    tp: &TopicPartition,
) -> Result<(), ErrorCode> {
    let partition = (tp.topic.to_string(), tp.partition.0);
    let remote = shard.cluster().and_then(|c| {
        c.leader_of(&state_partition(shard, id))
            .map(|(leader, _)| leader)
            .filter(|leader| *leader != c.node_id && *leader >= 0)
    });
    let code = match remote {
        None => add_partitions(
            shard,
            id,
            producer_id,
            producer_epoch,
            vec![partition],
            true,
        )
        .await
        .first()
        .map_or(ErrorCode::UNKNOWN_SERVER_ERROR, |(_, c)| *c),
        Some(leader) => {
            use kafka_protocol::messages::add_partitions_to_txn_request::{
                AddPartitionsToTxnTopic, AddPartitionsToTxnTransaction,
            };
            let mut topic = AddPartitionsToTxnTopic::default();
            topic.name = topic_name(&partition.0);
            topic.partitions = vec![partition.1];
            let mut txn = AddPartitionsToTxnTransaction::default();
            txn.transactional_id = TransactionalId(str_bytes(id));
            txn.producer_id = ProducerId(producer_id);
            txn.producer_epoch = producer_epoch;
            txn.verify_only = true;
            txn.topics = vec![topic];
            let mut req = AddPartitionsToTxnRequest::default();
            req.transactions = vec![txn];
            let answer: anyhow::Result<AddPartitionsToTxnResponse> =
                super::forward::exchange(shard, leader, ApiKey::AddPartitionsToTxn, 4, &req).await;
            match answer {
                Ok(r) if r.error_code != 0 => ErrorCode(r.error_code),
                Ok(r) => r
                    .results_by_transaction
                    .iter()
                    .flat_map(|t| t.topic_results.iter())
                    .flat_map(|t| t.results_by_partition.iter())
                    .map(|p| ErrorCode(p.partition_error_code))
                    .next()
                    .unwrap_or(ErrorCode::UNKNOWN_SERVER_ERROR),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "transaction verification failed");
                    ErrorCode::NOT_ENOUGH_REPLICAS
                }
            }
        }
    };
    match code {
        ErrorCode::NONE => Ok(()),
        // The coordinator's word on this producer; anything else it could not say.
        ErrorCode::INVALID_TXN_STATE
        | ErrorCode::PRODUCER_FENCED
        | ErrorCode::INVALID_PRODUCER_ID_MAPPING => {
            if code == ErrorCode::PRODUCER_FENCED {
                Err(ErrorCode::INVALID_PRODUCER_EPOCH)
            } else {
                Err(ErrorCode::INVALID_TXN_STATE)
            }
        }
        _ => Err(ErrorCode::NOT_ENOUGH_REPLICAS),
    }
}

pub async fn init_producer_id(
    shard: &Rc<Shard>,
    req: InitProducerIdRequest,
    version: i16,
) -> InitProducerIdResponse {
    let mut response = InitProducerIdResponse::default();
    response.producer_id = ProducerId(-1);
    response.producer_epoch = -1;
    let id = req
        .transactional_id
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    let call = TxnCall::InitProducerId {
        transactional_id: id.clone(),
        timeout_ms: req.transaction_timeout_ms,
        producer_id: req.producer_id.0,
        producer_epoch: req.producer_epoch,
    };
    match route(shard, &id, call).await {
        Ok(TxnReply::Producer(Ok((pid, epoch)))) => {
            response.producer_id = ProducerId(pid);
            response.producer_epoch = epoch;
        }
        Ok(TxnReply::Producer(Err(code))) | Err(code) => {
            response.error_code = versioned(code, version, 4).0;
        }
        Ok(_) => response.error_code = ErrorCode::UNKNOWN_SERVER_ERROR.0,
    }
    response
}

async fn add_partitions(
    shard: &Rc<Shard>,
    id: &str,
    producer_id: i64,
    producer_epoch: i16,
    partitions: Vec<(String, i32)>,
    verify_only: bool,
) -> Vec<((String, i32), ErrorCode)> {
    let call = TxnCall::AddPartitions {
        transactional_id: id.to_string(),
        producer_id,
        producer_epoch,
        partitions: partitions.clone(),
        verify_only,
    };
    match route(shard, id, call).await {
        Ok(TxnReply::Partitions(list)) => list,
        Ok(_) => partitions
            .into_iter()
            .map(|p| (p, ErrorCode::UNKNOWN_SERVER_ERROR))
            .collect(),
        Err(code) => partitions.into_iter().map(|p| (p, code)).collect(),
    }
}

fn topic_results(
    results: Vec<((String, i32), ErrorCode)>,
    version: i16,
) -> Vec<AddPartitionsToTxnTopicResult> {
    let mut out: Vec<AddPartitionsToTxnTopicResult> = Vec::new();
    for ((topic, p), code) in results {
        let mut r = AddPartitionsToTxnPartitionResult::default();
        r.partition_index = p;
        r.partition_error_code = versioned(code, version, 2).0;
        match out.iter_mut().find(|t| *t.name.0 == *topic) {
            Some(t) => t.results_by_partition.push(r),
            None => {
                let mut t = AddPartitionsToTxnTopicResult::default();
                t.name = topic_name(&topic);
                t.results_by_partition.push(r);
                out.push(t);
            }
        }
    }
    out
}

pub async fn add_partitions_to_txn(
    shard: &Rc<Shard>,
    req: AddPartitionsToTxnRequest,
    version: i16,
) -> AddPartitionsToTxnResponse {
    let mut response = AddPartitionsToTxnResponse::default();
    let flatten = |topics: &[kafka_protocol::messages::add_partitions_to_txn_request::AddPartitionsToTxnTopic]| {
        topics
            .iter()
            .flat_map(|t| t.partitions.iter().map(|p| (t.name.0.to_string(), *p)))
            .collect::<Vec<_>>()
    };
    if version <= 3 {
        let results = add_partitions(
            shard,
            &req.v3_and_below_transactional_id.0,
            req.v3_and_below_producer_id.0,
            req.v3_and_below_producer_epoch,
            flatten(&req.v3_and_below_topics),
            false,
        )
        .await;
        response.results_by_topic_v3_and_below = topic_results(results, version);
        return response;
    }
    let calls = req.transactions.iter().map(|t| {
        let partitions = flatten(&t.topics);
        add_partitions(
            shard,
            &t.transactional_id.0,
            t.producer_id.0,
            t.producer_epoch,
            partitions,
            t.verify_only,
        )
    });
    let results = join_all(calls.collect()).await;
    for (t, results) in req.transactions.iter().zip(results) {
        let mut r = AddPartitionsToTxnResult::default();
        r.transactional_id = t.transactional_id.clone();
        r.topic_results = topic_results(results, version);
        response.results_by_transaction.push(r);
    }
    response
}

pub async fn add_offsets_to_txn(
    shard: &Rc<Shard>,
    req: AddOffsetsToTxnRequest,
    version: i16,
) -> AddOffsetsToTxnResponse {
    let mut response = AddOffsetsToTxnResponse::default();
    if let Err(code) = super::groups::ensure_offsets_topic(shard).await {
        response.error_code = code.0;
        return response;
    }
    let p = partition_for_group(
        &req.group_id.0,
        shard.options.broker.offsets_topic_partitions,
    );
    let results = add_partitions(
        shard,
        &req.transactional_id.0,
        req.producer_id.0,
        req.producer_epoch,
        vec![(OFFSETS_TOPIC.to_string(), p)],
        false,
    )
    .await;
    let code = results
        .first()
        .map_or(ErrorCode::UNKNOWN_SERVER_ERROR, |(_, c)| *c);
    response.error_code = versioned(code, version, 2).0;
    response
}

pub async fn end_txn(shard: &Rc<Shard>, req: EndTxnRequest, version: i16) -> EndTxnResponse {
    let mut response = EndTxnResponse::default();
    let call = TxnCall::EndTxn {
        transactional_id: req.transactional_id.0.to_string(),
        producer_id: req.producer_id.0,
        producer_epoch: req.producer_epoch,
        commit: req.committed,
    };
    let code = match route(shard, &req.transactional_id.0, call).await {
        Ok(TxnReply::Ended(code)) | Err(code) => code,
        Ok(_) => ErrorCode::UNKNOWN_SERVER_ERROR,
    };
    response.error_code = versioned(code, version, 2).0;
    response
}

pub async fn txn_offset_commit(
    shard: &Rc<Shard>,
    req: TxnOffsetCommitRequest,
    version: i16,
) -> TxnOffsetCommitResponse {
    let group = req.group_id.0.to_string();
    let topics: Vec<(kafka_protocol::messages::TopicName, Vec<i32>)> = req
        .topics
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                t.partitions.iter().map(|p| p.partition_index).collect(),
            )
        })
        .collect();
    let code = match super::groups::route_call(shard, &group, GroupCall::TxnCommit { req }).await {
        Ok(GroupReply::TxnCommit(mut r)) => {
            for t in &mut r.topics {
                for p in &mut t.partitions {
                    p.error_code = versioned(ErrorCode(p.error_code), version, 2).0;
                }
            }
            return r;
        }
        Ok(_) => ErrorCode::UNKNOWN_SERVER_ERROR,
        Err(code) => code,
    };
    let mut response = TxnOffsetCommitResponse::default();
    for (name, partitions) in topics {
        let mut t = kafka_protocol::messages::txn_offset_commit_response::TxnOffsetCommitResponseTopic::default();
        t.name = name;
        for p in partitions {
            let mut r = kafka_protocol::messages::txn_offset_commit_response::TxnOffsetCommitResponsePartition::default();
            r.partition_index = p;
            r.error_code = code.0;
            t.partitions.push(r);
        }
        response.topics.push(t);
    }
    response
}

/// WriteTxnMarkers from another broker's transaction coordinator: each marker to the owner shard
/// of each of its partitions that this broker leads.
pub async fn write_txn_markers(
    shard: &Rc<Shard>,
    req: WriteTxnMarkersRequest,
) -> WriteTxnMarkersResponse {
    let mut response = WriteTxnMarkersResponse::default();
    for m in req.markers {
        let outcome = if m.transaction_result {
            Outcome::Commit
        } else {
            Outcome::Abort
        };
        let mut result = WritableTxnMarkerResult::default();
        result.producer_id = m.producer_id;
        for t in m.topics {
            let calls = t.partition_indexes.iter().map(|p| {
                let tp = TopicPartition::new(&t.name.0, *p);
                let shard = shard.clone();
                async move {
                    let known = shard.topics().get(&tp.topic).is_some_and(|topic| {
                        tp.partition.0 >= 0 && tp.partition.0 < topic.partitions
                    });
                    if !known {
                        return ErrorCode::UNKNOWN_TOPIC_OR_PARTITION;
                    }
                    let owner = shard.owner_of(&tp);
                    match shard
                        .call(
                            owner,
                            Request::WriteMarker {
                                tp,
                                producer_id: m.producer_id.0,
                                producer_epoch: m.producer_epoch,
                                outcome,
                                coordinator_epoch: m.coordinator_epoch,
                            },
                        )
                        .await
                    {
                        Reply::Marker(code) => code,
                        _ => ErrorCode::UNKNOWN_SERVER_ERROR,
                    }
                }
            });
            let codes = join_all(calls.collect()).await;
            let mut rt = WritableTxnMarkerTopicResult::default();
            rt.name = t.name.clone();
            for (p, code) in t.partition_indexes.iter().zip(codes) {
                let mut rp = WritableTxnMarkerPartitionResult::default();
                rp.partition_index = *p;
                rp.error_code = code.0;
                rt.partitions.push(rp);
            }
            result.topics.push(rt);
        }
        response.markers.push(result);
    }
    response
}

/// Sends markers for `partitions` to broker `leader` (WriteTxnMarkers v1); returns each
/// partition's error.
pub async fn send_markers(
    shard: &Rc<Shard>,
    leader: i32,
    producer_id: i64,
    producer_epoch: i16,
    outcome: Outcome,
    coordinator_epoch: i32,
    partitions: &[(String, i32)],
) -> anyhow::Result<Vec<((String, i32), ErrorCode)>> {
    let mut marker = WritableTxnMarker::default();
    marker.producer_id = ProducerId(producer_id);
    marker.producer_epoch = producer_epoch;
    marker.transaction_result = outcome == Outcome::Commit;
    marker.coordinator_epoch = coordinator_epoch;
    for (topic, p) in partitions {
        match marker.topics.iter_mut().find(|t| *t.name.0 == **topic) {
            Some(t) => t.partition_indexes.push(*p),
            None => {
                let mut t = WritableTxnMarkerTopic::default();
                t.name = topic_name(topic);
                t.partition_indexes.push(*p);
                marker.topics.push(t);
            }
        }
    }
    let mut req = WriteTxnMarkersRequest::default();
    req.markers.push(marker);
    let response: WriteTxnMarkersResponse =
        super::forward::exchange(shard, leader, ApiKey::WriteTxnMarkers, 1, &req).await?;
    let mut out = Vec::new();
    for m in response.markers {
        for t in m.topics {
            for p in t.partitions {
                out.push((
                    (t.name.0.to_string(), p.partition_index),
                    ErrorCode(p.error_code),
                ));
            }
        }
    }
    Ok(out)
}

fn describe_state(v: &TxnView) -> TransactionState {
    let mut s = TransactionState::default();
    s.transactional_id = TransactionalId(str_bytes(&v.transactional_id));
    s.transaction_state = str_bytes(v.state);
    s.transaction_timeout_ms = v.timeout_ms;
    s.transaction_start_time_ms = v.start_ms;
    s.producer_id = ProducerId(v.producer_id);
    s.producer_epoch = v.producer_epoch;
    for (topic, p) in &v.partitions {
        match s.topics.iter_mut().find(|t| *t.topic.0 == **topic) {
            Some(t) => t.partitions.push(*p),
            None => {
                let mut t = TopicData::default();
                t.topic = topic_name(topic);
                t.partitions.push(*p);
                s.topics.push(t);
            }
        }
    }
    s
}

pub async fn describe_transactions(
    shard: &Rc<Shard>,
    req: DescribeTransactionsRequest,
) -> DescribeTransactionsResponse {
    let calls = req.transactional_ids.iter().map(|id| {
        let id = id.0.to_string();
        async move {
            let call = TxnCall::Describe {
                transactional_id: id.clone(),
            };
            (id.clone(), route(shard, &id, call).await)
        }
    });
    let mut response = DescribeTransactionsResponse::default();
    for (id, result) in join_all(calls.collect()).await {
        let state = match result {
            Ok(TxnReply::Described(Ok(v))) => describe_state(&v),
            other => {
                let code = match other {
                    Ok(TxnReply::Described(Err(code))) | Err(code) => code,
                    _ => ErrorCode::UNKNOWN_SERVER_ERROR,
                };
                let mut s = TransactionState::default();
                s.transactional_id = TransactionalId(str_bytes(&id));
                s.error_code = code.0;
                s.producer_id = ProducerId(-1);
                s.producer_epoch = -1;
                s
            }
        };
        response.transaction_states.push(state);
    }
    response
}

/// The transactions this broker coordinates (every shard's), filtered as asked.
pub async fn list_transactions(
    shard: &Rc<Shard>,
    req: ListTransactionsRequest,
) -> ListTransactionsResponse {
    const STATES: [&str; 6] = [
        "Empty",
        "Ongoing",
        "PrepareCommit",
        "PrepareAbort",
        "CompleteCommit",
        "CompleteAbort",
    ];
    let mut response = ListTransactionsResponse::default();
    response.unknown_state_filters = req
        .state_filters
        .iter()
        .filter(|s| !STATES.contains(&s.as_str()))
        .cloned()
        .collect();
    if shard.topics().get(TRANSACTION_TOPIC).is_none() {
        return response;
    }
    let calls = (0..shard.count).map(|i| {
        let shard = shard.clone();
        async move {
            match shard
                .call(ShardId(i), Request::Txn(Box::new(TxnCall::List)))
                .await
            {
                Reply::Txn(reply) => match *reply {
                    TxnReply::Listed(list) => list,
                    _ => Vec::new(),
                },
                _ => Vec::new(),
            }
        }
    });
    let now = crate::storage::partition::now_ms() as i64;
    let mut all: Vec<TxnView> = join_all(calls.collect())
        .await
        .into_iter()
        .flatten()
        .collect();
    all.sort_by(|a, b| a.transactional_id.cmp(&b.transactional_id));
    for v in all {
        let state_ok =
            req.state_filters.is_empty() || req.state_filters.iter().any(|s| s.as_str() == v.state);
        let producer_ok = req.producer_id_filters.is_empty()
            || req.producer_id_filters.iter().any(|p| p.0 == v.producer_id);
        // KIP-994: only transactions running longer than the filter.
        let duration_ok = req.duration_filter < 0
            || (v.start_ms >= 0 && now.saturating_sub(v.start_ms) > req.duration_filter);
        if state_ok && producer_ok && duration_ok {
            let mut s = ListedState::default();
            s.transactional_id = TransactionalId(str_bytes(&v.transactional_id));
            s.producer_id = ProducerId(v.producer_id);
            s.transaction_state = str_bytes(v.state);
            response.transaction_states.push(s);
        }
    }
    response
}
