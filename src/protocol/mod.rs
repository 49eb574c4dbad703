//! The Kafka wire protocol at strom's edge: the API versions strom serves, request framing with
//! the size limit checked before any allocation, request header decoding and response encoding.
//! Message types come from the `kafka-protocol` crate (generated from Kafka's own schemas).

// Reads bytes from the wire or the disk: no unwrap, expect or truncating cast on such a value (a
// bad value is an error, never a panic). Unit tests may unwrap what they built themselves.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::cast_possible_truncation
    )
)]

pub mod chunked;

use anyhow::Result;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable};

/// The APIs and version ranges strom serves: exactly what ApiVersions advertises. Versions are
/// Kafka 4.x serves, bounded where a newer version's semantics are not implemented yet (Produce
/// v12 and the other KIP-890 part 2 versions bump the producer epoch at every transaction).
pub const SUPPORTED_APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 11),
    (ApiKey::Fetch, 4, 17),
    (ApiKey::ListOffsets, 1, 10),
    (ApiKey::Metadata, 0, 13),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    // v9 of both: KIP-848 member epochs (v10 would name topics by id).
    (ApiKey::OffsetCommit, 2, 9),
    (ApiKey::OffsetFetch, 1, 9),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::ListGroups, 0, 5),
    (ApiKey::DeleteGroups, 0, 2),
    // KIP-848, the consumer group protocol.
    (ApiKey::ConsumerGroupHeartbeat, 0, 1),
    (ApiKey::ConsumerGroupDescribe, 0, 1),
    // KIP-932, share groups (v1: Kafka 4.1's, generally available).
    (ApiKey::ShareGroupHeartbeat, 1, 1),
    (ApiKey::ShareGroupDescribe, 1, 1),
    (ApiKey::ShareFetch, 1, 1),
    (ApiKey::ShareAcknowledge, 1, 1),
    (ApiKey::DescribeShareGroupOffsets, 0, 0),
    (ApiKey::AlterShareGroupOffsets, 0, 0),
    (ApiKey::DeleteShareGroupOffsets, 0, 0),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::OffsetForLeaderEpoch, 2, 4),
    (ApiKey::DescribeCluster, 0, 2),
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::DescribeTopicPartitions, 0, 0),
    (ApiKey::ElectLeaders, 0, 2),
    (ApiKey::AlterPartitionReassignments, 0, 0),
    (ApiKey::ListPartitionReassignments, 0, 0),
    (ApiKey::DescribeProducers, 0, 0),
    (ApiKey::ListConfigResources, 0, 1),
    (ApiKey::DescribeQuorum, 0, 2),
    // Transactions (KIP-98, KIP-447). Not the KIP-890 part 2 versions (AddPartitionsToTxn 5,
    // EndTxn 5, TxnOffsetCommit 5), which bump the producer epoch at every transaction.
    (ApiKey::AddPartitionsToTxn, 0, 4),
    (ApiKey::AddOffsetsToTxn, 0, 4),
    (ApiKey::EndTxn, 0, 4),
    (ApiKey::WriteTxnMarkers, 1, 1),
    (ApiKey::TxnOffsetCommit, 0, 4),
    (ApiKey::DescribeTransactions, 0, 0),
    (ApiKey::ListTransactions, 0, 1),
];

pub fn supported_range(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED_APIS
        .iter()
        .find(|(k, _, _)| *k == key)
        .map(|(_, min, max)| (*min, *max))
}

/// A request's fixed header fields, read before deciding whether the body can be decoded.
#[derive(Clone, Copy, Debug)]
pub struct RawHeader {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
}

/// Reads api key, version and correlation id without decoding anything else.
pub fn peek_header(frame: &[u8]) -> Option<RawHeader> {
    if frame.len() < 8 {
        return None;
    }
    Some(RawHeader {
        api_key: i16::from_be_bytes([frame[0], frame[1]]),
        api_version: i16::from_be_bytes([frame[2], frame[3]]),
        correlation_id: i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]),
    })
}

/// Decodes the full request header of a known API, leaving `frame` at the body.
pub fn decode_header(frame: &mut Bytes, key: ApiKey, version: i16) -> Result<RequestHeader> {
    RequestHeader::decode(frame, key.request_header_version(version))
}

/// Encodes a size-prefixed response: header (at the API's own header version) and body.
pub fn encode_response<M: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &M,
) -> Result<Bytes> {
    let header_version = key.response_header_version(version);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    // Sized up front: a fetch response of many megabytes would otherwise be copied again at
    // every doubling of the buffer.
    let size = 4 + header.compute_size(header_version)? + body.compute_size(version)?;
    let mut buf = BytesMut::with_capacity(size);
    buf.put_i32(0);
    header.encode(&mut buf, header_version)?;
    body.encode(&mut buf, version)?;
    let len = i32::try_from(buf.len() - 4)?;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::ApiVersionsResponse;

    #[test]
    fn every_advertised_range_is_one_the_codec_knows() {
        for (key, min, max) in SUPPORTED_APIS {
            let valid = key.valid_versions();
            assert!(
                *min >= valid.min && *max <= valid.max,
                "{key:?} {min}..={max} outside the codec's {valid:?}"
            );
        }
    }

    #[test]
    fn api_versions_response_header_is_v0_even_when_flexible() {
        let bytes =
            encode_response(ApiKey::ApiVersions, 3, 7, &ApiVersionsResponse::default()).unwrap();
        // size, correlation id, then the body's error code straight away: no tagged-field byte.
        assert_eq!(&bytes[4..8], &7i32.to_be_bytes());
        assert_eq!(&bytes[8..10], &0i16.to_be_bytes());
    }
}
