//! What the group coordinator writes to `__consumer_offsets`: ordinary Kafka record batches whose
//! keys and values are strom's own rkyv structures (validated when read back). Keys are stable
//! bytes for a given group/partition, so the topic compacts to the latest state per key; a record
//! with no value is a tombstone.

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
pub enum GroupKey {
    Offset {
        group: String,
        topic: String,
        partition: i32,
    },
    Group {
        group: String,
    },
    /// A KIP-848 consumer group's state (members, epochs, assignments). Added after the others,
    /// and no larger than `Offset`, so keys written before it still decode (pinned by a test).
    ConsumerGroup {
        group: String,
    },
    /// A KIP-932 share group (its type and epoch).
    ShareGroup {
        group: String,
    },
    /// One share-partition's state (start offset, in-flight records).
    SharePartition {
        group: String,
        topic: String,
        partition: i32,
    },
    /// A group's dynamic configs (IncrementalAlterConfigs on the GROUP resource).
    GroupConfig {
        group: String,
    },
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct OffsetValue {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: String,
    pub commit_timestamp_ms: i64,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct MemberValue {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub session_timeout_ms: u64,
    pub rebalance_timeout_ms: u64,
    pub protocols: Vec<(String, Vec<u8>)>,
    pub assignment: Vec<u8>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct GroupValue {
    pub protocol_type: Option<String>,
    pub generation: i32,
    pub protocol: Option<String>,
    pub leader: Option<String>,
    pub members: Vec<MemberValue>,
}

/// Partitions of one topic, by topic id.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct PartitionsValue {
    pub topic_id: [u8; 16],
    pub partitions: Vec<i32>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ConsumerMemberValue {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout_ms: u64,
    pub subscribed_names: Vec<String>,
    pub subscribed_regex: Option<String>,
    pub assignor: Option<String>,
    pub epoch: i32,
    pub previous_epoch: i32,
    /// 0 stable, 1 unrevoked partitions, 2 unreleased partitions.
    pub state: u8,
    pub assigned: Vec<PartitionsValue>,
    pub revoking: Vec<PartitionsValue>,
    pub target: Vec<PartitionsValue>,
    pub departed: bool,
}

/// A consumer-protocol group: one record per group, rewritten when its epochs or assignments
/// change (compaction keeps the latest).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ConsumerGroupValue {
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub assignor: String,
    /// Subscribed topics as resolved: (name, id, partitions).
    pub metadata: Vec<(String, [u8; 16], i32)>,
    pub members: Vec<ConsumerMemberValue>,
}

/// In-flight records of a share-partition with the same state and delivery count. States are
/// Kafka's share-state codes: 0 available, 2 acknowledged, 4 archived.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ShareRangeValue {
    pub first_offset: i64,
    pub last_offset: i64,
    pub state: u8,
    pub delivery_count: i16,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct SharePartitionValue {
    pub start_offset: i64,
    pub end_offset: i64,
    pub ranges: Vec<ShareRangeValue>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct GroupConfigValue {
    pub configs: Vec<(String, String)>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ShareGroupValue {
    pub epoch: i32,
}

/// One record of the offsets topic, decoded.
pub enum Entry {
    Offset {
        group: String,
        topic: String,
        partition: i32,
        value: Option<OffsetValue>,
    },
    Group {
        group: String,
        value: Option<GroupValue>,
    },
    ConsumerGroup {
        group: String,
        value: Option<ConsumerGroupValue>,
    },
    ShareGroup {
        group: String,
        value: Option<ShareGroupValue>,
    },
    SharePartition {
        group: String,
        topic: String,
        partition: i32,
        value: Option<SharePartitionValue>,
    },
    GroupConfig {
        group: String,
        value: Option<GroupConfigValue>,
    },
}

/// A key and its value (None: a tombstone) as record bytes.
fn keyed<V>(key: GroupKey, value: Option<&V>) -> Result<(Bytes, Option<Bytes>)>
where
    V: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    Ok((encode(&key)?, value.map(encode).transpose()?))
}

/// rkyv bytes of one of strom's own structures, as a record key or value.
fn encode<T>(value: &T) -> Result<Bytes>
where
    T: for<'a> rkyv::Serialize<
        rkyv::api::high::HighSerializer<
            rkyv::util::AlignedVec,
            rkyv::ser::allocator::ArenaHandle<'a>,
            rkyv::rancor::Error,
        >,
    >,
{
    Ok(Bytes::from(
        rkyv::to_bytes::<rkyv::rancor::Error>(value)?.to_vec(),
    ))
}

pub fn offset_record(
    group: &str,
    topic: &str,
    partition: i32,
    value: Option<&OffsetValue>,
) -> Result<(Bytes, Option<Bytes>)> {
    keyed(
        GroupKey::Offset {
            group: group.to_string(),
            topic: topic.to_string(),
            partition,
        },
        value,
    )
}

pub fn group_record(group: &str, value: Option<&GroupValue>) -> Result<(Bytes, Option<Bytes>)> {
    keyed(
        GroupKey::Group {
            group: group.to_string(),
        },
        value,
    )
}

pub fn consumer_group_record(
    group: &str,
    value: Option<&ConsumerGroupValue>,
) -> Result<(Bytes, Option<Bytes>)> {
    keyed(
        GroupKey::ConsumerGroup {
            group: group.to_string(),
        },
        value,
    )
}

pub fn share_group_record(
    group: &str,
    value: Option<&ShareGroupValue>,
) -> Result<(Bytes, Option<Bytes>)> {
    keyed(
        GroupKey::ShareGroup {
            group: group.to_string(),
        },
        value,
    )
}

pub fn share_partition_record(
    group: &str,
    topic: &str,
    partition: i32,
    value: Option<&SharePartitionValue>,
) -> Result<(Bytes, Option<Bytes>)> {
    keyed(
        GroupKey::SharePartition {
            group: group.to_string(),
            topic: topic.to_string(),
            partition,
        },
        value,
    )
}

pub fn group_config_record(
    group: &str,
    value: Option<&GroupConfigValue>,
) -> Result<(Bytes, Option<Bytes>)> {
    keyed(
        GroupKey::GroupConfig {
            group: group.to_string(),
        },
        value,
    )
}

/// Encodes records into one batch; with `producer` (id, epoch), a transactional batch of that
/// producer (TxnOffsetCommit), with no sequence: its marker decides whether it counts.
pub fn encode_batch(
    records: Vec<(Bytes, Option<Bytes>)>,
    now_ms: i64,
    producer: Option<(i64, i16)>,
) -> Result<Bytes> {
    let records: Vec<Record> = records
        .into_iter()
        .enumerate()
        .map(|(i, (key, value))| {
            let mut r = crate::storage::records::plain_record(i as i64, now_ms, Some(key), value);
            if let Some((id, epoch)) = producer {
                r.transactional = true;
                r.producer_id = id;
                r.producer_epoch = epoch;
            }
            r
        })
        .collect();
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, &records, &options).context("encoding a group batch")?;
    Ok(buf.freeze())
}

fn aligned(bytes: &[u8]) -> rkyv::util::AlignedVec<16> {
    let mut a = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    a.extend_from_slice(bytes);
    a
}

/// Decodes every record of the batches in `bytes`.
/// Decodes a record value of one of strom's own structures (None: a tombstone).
fn decode_value<T>(value: Option<Bytes>, what: &'static str) -> Result<Option<T>>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    value
        .map(|v| rkyv::from_bytes::<T, rkyv::rancor::Error>(&aligned(&v)).context(what))
        .transpose()
}

/// Decodes every record of the batches in `bytes`.
pub fn decode_batches(bytes: Bytes) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for set in
        crate::storage::records::decode_record_sets(bytes).context("decoding offsets batches")?
    {
        for record in set.records {
            let Some(key) = record.key else { continue };
            let key = rkyv::from_bytes::<GroupKey, rkyv::rancor::Error>(&aligned(&key))
                .context("decoding a group key")?;
            let value = record.value;
            out.push(match key {
                GroupKey::Offset {
                    group,
                    topic,
                    partition,
                } => Entry::Offset {
                    group,
                    topic,
                    partition,
                    value: decode_value(value, "decoding an offset value")?,
                },
                GroupKey::Group { group } => Entry::Group {
                    group,
                    value: decode_value(value, "decoding a group value")?,
                },
                GroupKey::ConsumerGroup { group } => Entry::ConsumerGroup {
                    group,
                    value: decode_value(value, "decoding a consumer group value")?,
                },
                GroupKey::ShareGroup { group } => Entry::ShareGroup {
                    group,
                    value: decode_value(value, "decoding a share group value")?,
                },
                GroupKey::SharePartition {
                    group,
                    topic,
                    partition,
                } => Entry::SharePartition {
                    group,
                    topic,
                    partition,
                    value: decode_value(value, "decoding a share-partition value")?,
                },
                GroupKey::GroupConfig { group } => Entry::GroupConfig {
                    group,
                    value: decode_value(value, "decoding group configs")?,
                },
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `size_of::<ArchivedGroupKey>()` before `ConsumerGroup` was added (the `Offset` variant:
    /// tag, two archived strings, an i32).
    const ARCHIVED_KEY_BYTES: usize = 24;

    /// Keys written by earlier versions decode only while the archived key keeps its size.
    #[test]
    fn the_archived_key_layout_is_unchanged() {
        assert_eq!(std::mem::size_of::<ArchivedGroupKey>(), ARCHIVED_KEY_BYTES);
    }

    #[test]
    fn records_roundtrip_through_a_batch() {
        let v = OffsetValue {
            offset: 42,
            leader_epoch: -1,
            metadata: "m".into(),
            commit_timestamp_ms: 7,
        };
        let g = GroupValue {
            protocol_type: Some("consumer".into()),
            generation: 3,
            protocol: Some("range".into()),
            leader: Some("a".into()),
            members: vec![],
        };
        let batch = encode_batch(
            vec![
                offset_record("g", "t", 1, Some(&v)).unwrap(),
                group_record("g", Some(&g)).unwrap(),
                offset_record("g", "t", 2, None).unwrap(),
            ],
            1,
            None,
        )
        .unwrap();
        assert_eq!(
            crate::storage::batch::split_batches(&batch).unwrap().len(),
            1
        );
        let entries = decode_batches(batch).unwrap();
        assert_eq!(entries.len(), 3);
        assert!(
            matches!(&entries[0], Entry::Offset { value: Some(x), partition: 1, .. } if *x == v)
        );
        assert!(matches!(&entries[1], Entry::Group { value: Some(x), .. } if *x == g));
        assert!(matches!(&entries[2], Entry::Offset { value: None, .. }));
    }
}
