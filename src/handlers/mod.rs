//! One file per Kafka API: decode → route to the owning shards → fan out → build the response.
//! [`dispatch`] checks the API and version against what strom advertises before decoding the body;
//! an unknown API key, an unsupported version, or a body that does not decode closes the
//! connection with a log line (ApiVersions instead answers `UNSUPPORTED_VERSION` in its v0 layout,
//! so that a client can retry lower).

pub mod admin;
pub mod api_versions;
pub mod configs;
pub mod create_partitions;
pub mod create_topics;
pub mod delete_records;
pub mod delete_topics;
pub mod fetch;
pub mod fetch_session;
pub mod find_coordinator;
pub mod forward;
pub mod groups;
pub mod init_producer_id;
pub mod internal_topics;
pub mod list_offsets;
pub mod metadata;
pub mod produce;
pub mod quorum;
pub mod reassign;
pub mod transactions;

use std::net::SocketAddr;
use std::rc::Rc;

use bytes::Bytes;
use kafka_protocol::messages::{ApiKey, RequestKind, TopicName};
use kafka_protocol::protocol::StrBytes;

use crate::group::ClientInfo;
use crate::protocol::{self, encode_response};
use crate::shard::Shard;

/// What the connection does with a handled request.
pub enum Outcome {
    Respond(Bytes),
    /// A response in chunks written in order (a fetch response's record batches by reference).
    RespondChunks(Vec<Bytes>),
    /// `acks=0` produce: Kafka sends nothing back.
    NoResponse,
    Close(String),
}

/// Why a frame is not a request strom can handle.
#[derive(Debug)]
pub enum DecodeError {
    /// ApiVersions at a version strom does not know: answered with the supported ranges.
    UnsupportedApiVersions { correlation_id: i32 },
    /// Anything else: the connection is closed with this reason in the log.
    Close(String),
}

/// A decoded request: its key, version, correlation id, header and body.
pub struct Decoded {
    pub key: ApiKey,
    pub version: i16,
    pub correlation_id: i32,
    pub header: kafka_protocol::messages::RequestHeader,
    pub request: RequestKind,
}

/// Decodes one request frame (without its size prefix): the header's key and version checked
/// against what strom serves, then header and body with kafka-protocol. Never panics on any
/// bytes (the `request_decode` fuzz target holds it to that).
pub fn decode_request(mut frame: Bytes) -> Result<Decoded, DecodeError> {
    let Some(raw) = protocol::peek_header(&frame) else {
        return Err(DecodeError::Close(format!(
            "frame of {} bytes is shorter than a request header",
            frame.len()
        )));
    };
    let Ok(key) = ApiKey::try_from(raw.api_key) else {
        return Err(DecodeError::Close(format!(
            "unknown API key {}",
            raw.api_key
        )));
    };
    let Some((min, max)) = protocol::supported_range(key) else {
        return Err(DecodeError::Close(format!(
            "API {key:?} (key {}) is not supported",
            raw.api_key
        )));
    };
    let version = raw.api_version;
    if version < min || version > max {
        if key == ApiKey::ApiVersions {
            return Err(DecodeError::UnsupportedApiVersions {
                correlation_id: raw.correlation_id,
            });
        }
        return Err(DecodeError::Close(format!(
            "{key:?} version {version} is not supported (supported {min}..={max})"
        )));
    }
    let header = protocol::decode_header(&mut frame, key, version).map_err(|e| {
        DecodeError::Close(format!("malformed {key:?} v{version} request header: {e}"))
    })?;
    let request = RequestKind::decode(key, &mut frame, version)
        .map_err(|e| DecodeError::Close(format!("malformed {key:?} v{version} request: {e}")))?;
    Ok(Decoded {
        key,
        version,
        correlation_id: raw.correlation_id,
        header,
        request,
    })
}

/// Who sent a request, as group descriptions report members.
fn client_info(
    header: &kafka_protocol::messages::RequestHeader,
    peer: Option<SocketAddr>,
) -> ClientInfo {
    ClientInfo {
        client_id: header
            .client_id
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default(),
        host: peer.map(|p| format!("/{}", p.ip())).unwrap_or_default(),
    }
}

pub async fn dispatch(shard: &Rc<Shard>, frame: Bytes, peer: Option<SocketAddr>) -> Outcome {
    if let Some(answer) = forward::to_controller(shard, &frame).await {
        return Outcome::Respond(answer);
    }
    if let Some(answer) = forward::to_group_coordinator(shard, &frame).await {
        return Outcome::Respond(answer);
    }
    // A produce request's records get their offsets in its own frame (`produce::take_records`).
    let whole = crate::protocol::peek_header(&frame)
        .is_some_and(|h| h.api_key == ApiKey::Produce as i16)
        .then(|| frame.clone());
    let Decoded {
        key,
        version,
        correlation_id: cid,
        header,
        request,
    } = match decode_request(frame) {
        Ok(d) => d,
        Err(DecodeError::UnsupportedApiVersions { correlation_id }) => {
            return respond(api_versions::unsupported_version(correlation_id))
        }
        Err(DecodeError::Close(reason)) => return Outcome::Close(reason),
    };
    let encoded = match request {
        RequestKind::ApiVersions(_) => encode_response(key, version, cid, &api_versions::handle()),
        RequestKind::Metadata(r) => encode_response(
            key,
            version,
            cid,
            &metadata::handle(shard, r, version).await,
        ),
        RequestKind::Produce(mut r) => {
            let acks = r.acks;
            // The header's client id is a view of the frame too.
            drop(header);
            let records = produce::take_records(&mut r, whole.unwrap_or_default());
            let response = produce::handle(shard, r, records, version).await;
            if acks == 0 {
                return Outcome::NoResponse;
            }
            encode_response(key, version, cid, &response)
        }
        RequestKind::Fetch(r) => {
            let fetched = fetch::handle(shard, r, version).await;
            let response = &fetched.response;
            let payloads = response
                .responses
                .iter()
                .flat_map(|t| t.partitions.iter().filter_map(|p| p.records.as_ref()));
            return match protocol::chunked::encode_response_chunks(
                key,
                version,
                cid,
                response,
                payloads,
                fetched.stand_ins,
            ) {
                Ok(chunks) => Outcome::RespondChunks(chunks),
                Err(e) => respond(Err(e)),
            };
        }
        RequestKind::ListOffsets(r) => encode_response(
            key,
            version,
            cid,
            &list_offsets::handle(shard, r, version).await,
        ),
        RequestKind::CreateTopics(r) => encode_response(
            key,
            version,
            cid,
            &create_topics::handle(shard, r, version).await,
        ),
        RequestKind::DeleteTopics(r) => encode_response(
            key,
            version,
            cid,
            &delete_topics::handle(shard, r, version).await,
        ),
        RequestKind::FindCoordinator(r) => encode_response(
            key,
            version,
            cid,
            &find_coordinator::handle(shard, r, version).await,
        ),
        RequestKind::JoinGroup(r) => {
            let client = client_info(&header, peer);
            encode_response(
                key,
                version,
                cid,
                &groups::join(shard, r, version, client).await,
            )
        }
        RequestKind::SyncGroup(r) => {
            encode_response(key, version, cid, &groups::sync(shard, r, version).await)
        }
        RequestKind::Heartbeat(r) => {
            encode_response(key, version, cid, &groups::heartbeat(shard, r).await)
        }
        RequestKind::LeaveGroup(r) => {
            encode_response(key, version, cid, &groups::leave(shard, r, version).await)
        }
        RequestKind::OffsetCommit(r) => {
            encode_response(key, version, cid, &groups::commit(shard, r).await)
        }
        RequestKind::OffsetFetch(r) => encode_response(
            key,
            version,
            cid,
            &groups::fetch_offsets(shard, r, version).await,
        ),
        RequestKind::DescribeGroups(r) => encode_response(
            key,
            version,
            cid,
            &groups::describe(shard, r, version).await,
        ),
        RequestKind::ListGroups(r) => {
            encode_response(key, version, cid, &groups::list(shard, r, version).await)
        }
        RequestKind::DeleteGroups(r) => {
            encode_response(key, version, cid, &groups::delete(shard, r).await)
        }
        RequestKind::OffsetDelete(r) => {
            encode_response(key, version, cid, &groups::delete_offsets(shard, r).await)
        }
        RequestKind::DescribeConfigs(r) => encode_response(
            key,
            version,
            cid,
            &configs::describe(shard, r, version).await,
        ),
        RequestKind::AlterConfigs(r) => {
            encode_response(key, version, cid, &configs::alter(shard, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => encode_response(
            key,
            version,
            cid,
            &configs::incremental_alter(shard, r).await,
        ),
        RequestKind::CreatePartitions(r) => encode_response(
            key,
            version,
            cid,
            &create_partitions::handle(shard, r).await,
        ),
        RequestKind::AlterPartitionReassignments(r) => {
            encode_response(key, version, cid, &reassign::alter(shard, r).await)
        }
        RequestKind::ListPartitionReassignments(r) => {
            encode_response(key, version, cid, &reassign::list(shard, r))
        }
        RequestKind::DeleteRecords(r) => {
            encode_response(key, version, cid, &delete_records::handle(shard, r).await)
        }
        RequestKind::OffsetForLeaderEpoch(r) => encode_response(
            key,
            version,
            cid,
            &list_offsets::offset_for_leader_epoch(shard, r).await,
        ),
        RequestKind::DescribeCluster(r) => encode_response(
            key,
            version,
            cid,
            &admin::describe_cluster(shard, r, version),
        ),
        RequestKind::DescribeLogDirs(r) => encode_response(
            key,
            version,
            cid,
            &admin::describe_log_dirs(shard, r, version).await,
        ),
        RequestKind::DescribeTopicPartitions(r) => encode_response(
            key,
            version,
            cid,
            &admin::describe_topic_partitions(shard, r),
        ),
        RequestKind::ElectLeaders(r) => encode_response(
            key,
            version,
            cid,
            &admin::elect_leaders(shard, r, version).await,
        ),
        RequestKind::DescribeProducers(r) => encode_response(
            key,
            version,
            cid,
            &admin::describe_producers(shard, r).await,
        ),
        RequestKind::ListConfigResources(r) => encode_response(
            key,
            version,
            cid,
            &admin::list_config_resources(shard, r, version).await,
        ),
        RequestKind::DescribeQuorum(r) => {
            encode_response(key, version, cid, &quorum::handle(shard, r, version).await)
        }
        RequestKind::InitProducerId(r) => {
            if r.transactional_id.is_some() {
                encode_response(
                    key,
                    version,
                    cid,
                    &transactions::init_producer_id(shard, r, version).await,
                )
            } else {
                encode_response(key, version, cid, &init_producer_id::handle(shard, r).await)
            }
        }
        RequestKind::AddPartitionsToTxn(r) => encode_response(
            key,
            version,
            cid,
            &transactions::add_partitions_to_txn(shard, r, version).await,
        ),
        RequestKind::AddOffsetsToTxn(r) => encode_response(
            key,
            version,
            cid,
            &transactions::add_offsets_to_txn(shard, r, version).await,
        ),
        RequestKind::EndTxn(r) => encode_response(
            key,
            version,
            cid,
            &transactions::end_txn(shard, r, version).await,
        ),
        RequestKind::ConsumerGroupHeartbeat(r) => {
            let client = client_info(&header, peer);
            encode_response(
                key,
                version,
                cid,
                &groups::consumer_heartbeat(shard, r, version, client).await,
            )
        }
        RequestKind::ShareGroupHeartbeat(r) => {
            let client = client_info(&header, peer);
            encode_response(
                key,
                version,
                cid,
                &groups::share_heartbeat(shard, r, client).await,
            )
        }
        RequestKind::ShareGroupDescribe(r) => {
            encode_response(key, version, cid, &groups::share_describe(shard, r).await)
        }
        RequestKind::DescribeShareGroupOffsets(r) => {
            encode_response(key, version, cid, &groups::share_offsets(shard, r).await)
        }
        RequestKind::AlterShareGroupOffsets(r) => encode_response(
            key,
            version,
            cid,
            &groups::alter_share_offsets(shard, r).await,
        ),
        RequestKind::DeleteShareGroupOffsets(r) => encode_response(
            key,
            version,
            cid,
            &groups::delete_share_offsets(shard, r).await,
        ),
        RequestKind::ShareFetch(r) => {
            let origin = forward::share_origin(header.client_id.as_deref());
            encode_response(
                key,
                version,
                cid,
                &groups::share_fetch(shard, r, origin).await,
            )
        }
        RequestKind::ShareAcknowledge(r) => {
            let origin = forward::share_origin(header.client_id.as_deref());
            encode_response(
                key,
                version,
                cid,
                &groups::share_acknowledge(shard, r, origin).await,
            )
        }
        RequestKind::ConsumerGroupDescribe(r) => encode_response(
            key,
            version,
            cid,
            &groups::consumer_describe(shard, r).await,
        ),
        RequestKind::TxnOffsetCommit(r) => encode_response(
            key,
            version,
            cid,
            &transactions::txn_offset_commit(shard, r, version).await,
        ),
        RequestKind::WriteTxnMarkers(r) => encode_response(
            key,
            version,
            cid,
            &transactions::write_txn_markers(shard, r).await,
        ),
        RequestKind::DescribeTransactions(r) => encode_response(
            key,
            version,
            cid,
            &transactions::describe_transactions(shard, r).await,
        ),
        RequestKind::ListTransactions(r) => encode_response(
            key,
            version,
            cid,
            &transactions::list_transactions(shard, r).await,
        ),
        other => {
            return Outcome::Close(format!(
                "no handler for {:?}",
                std::mem::discriminant(&other)
            ))
        }
    };
    respond(encoded)
}

fn respond(encoded: anyhow::Result<Bytes>) -> Outcome {
    match encoded {
        Ok(bytes) => Outcome::Respond(bytes),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "encoding a response failed");
            Outcome::Close(format!("response encoding failed: {e}"))
        }
    }
}

pub fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

pub fn topic_name(s: &str) -> TopicName {
    TopicName(str_bytes(s))
}
