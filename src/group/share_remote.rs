//! A share group's partitions led by another broker. The coordinator keeps the group's
//! share-partitions (see [`super::share_calls`]) wherever the partitions' data lives; in a
//! cluster it reads, waits on and lists the offsets of those it does not lead with the same
//! Kafka requests a consumer sends (Fetch v12, ListOffsets v7) to their leaders, so that the
//! leaders need nothing beyond what every client already gets from them.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
    TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::handlers::forward::exchange;
use crate::model::{ErrorCode, Offset, TopicPartition};
use crate::shard::{PartitionRead, Shard};
use crate::storage::batch::BatchHeader;
use crate::storage::txn::AbortedTxn;
use crate::storage::{Batches, ReadResult};

const FETCH_VERSION: i16 = 12;
const LIST_OFFSETS_VERSION: i16 = 7;

/// The broker leading `tp` when that is another broker of the cluster; `None` when this broker
/// leads it, no leader is known, or there is no cluster (the partition is then read here, and
/// answers for itself).
pub fn remote_leader(shard: &Shard, tp: &TopicPartition) -> Option<i32> {
    let own = shard.cluster()?.node_id;
    let (leader, _) = shard.partition_leader(tp)?;
    (leader > 0 && leader != own).then_some(leader)
}

/// Reads `reads` (all led by `leader`) with one Fetch, waiting up to `max_wait` for a first
/// byte; answered in order.
pub async fn read(
    shard: &Rc<Shard>,
    leader: i32,
    reads: &[PartitionRead],
    max_wait: Duration,
) -> Vec<Result<ReadResult, ErrorCode>> {
    let committed = reads.iter().any(|r| r.committed);
    let mut by_topic: BTreeMap<&str, Vec<FetchPartition>> = BTreeMap::new();
    for r in reads {
        let mut fp = FetchPartition::default();
        fp.partition = r.tp.partition.0;
        fp.fetch_offset = r.offset.0;
        fp.partition_max_bytes = i32::try_from(r.max_bytes).unwrap_or(i32::MAX);
        fp.current_leader_epoch = r.current_leader_epoch;
        by_topic.entry(&r.tp.topic).or_default().push(fp);
    }
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = i32::try_from(max_wait.as_millis()).unwrap_or(i32::MAX);
    req.min_bytes = 1;
    req.max_bytes = i32::MAX;
    req.isolation_level = i8::from(committed);
    req.session_id = 0;
    req.session_epoch = -1;
    req.topics = by_topic
        .into_iter()
        .map(|(topic, partitions)| {
            let mut t = FetchTopic::default();
            t.topic = TopicName(StrBytes::from_string(topic.to_string()));
            t.partitions = partitions;
            t
        })
        .collect();
    let resp: FetchResponse = match exchange(shard, leader, ApiKey::Fetch, FETCH_VERSION, &req)
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(leader, error = %format!("{e:#}"), "share group read from the leader failed");
            return vec![Err(ErrorCode::NOT_LEADER_OR_FOLLOWER); reads.len()];
        }
    };
    let mut answers: BTreeMap<(String, i32), Result<ReadResult, ErrorCode>> = BTreeMap::new();
    for t in resp.responses {
        for p in t.partitions {
            let key = (t.topic.0.to_string(), p.partition_index);
            let answer = if p.error_code != 0 {
                Err(ErrorCode(p.error_code))
            } else {
                let records = p.records.unwrap_or_default();
                let aborted = aborted_spans(
                    &records,
                    p.aborted_transactions
                        .unwrap_or_default()
                        .iter()
                        .map(|a| (a.producer_id.0, a.first_offset)),
                );
                Ok(ReadResult {
                    records: Batches::one(records),
                    high_watermark: Offset(p.high_watermark),
                    log_start_offset: Offset(p.log_start_offset),
                    last_stable_offset: Offset(p.last_stable_offset),
                    aborted,
                })
            };
            answers.insert(key, answer);
        }
    }
    reads
        .iter()
        .map(|r| {
            answers
                .remove(&(r.tp.topic.to_string(), r.tp.partition.0))
                .unwrap_or(Err(ErrorCode::UNKNOWN_SERVER_ERROR))
        })
        .collect()
}

/// A Fetch answer's aborted transactions (producer id, first offset) as spans: each ends at the
/// producer's abort marker among `records`, or runs past them when the marker is further on.
fn aborted_spans(records: &[u8], aborted: impl Iterator<Item = (i64, i64)>) -> Vec<AbortedTxn> {
    let mut markers: Vec<(i64, i64)> = Vec::new();
    let mut pos = 0;
    while pos < records.len() {
        let Ok(h) = BatchHeader::parse(&records[pos..]) else {
            break;
        };
        if h.size_bytes == 0 {
            break;
        }
        if h.is_control() {
            markers.push((h.producer_id, h.base_offset.0));
        }
        pos += h.size_bytes;
    }
    aborted
        .map(|(producer_id, first_offset)| AbortedTxn {
            producer_id,
            first_offset,
            last_offset: markers
                .iter()
                .find(|(p, at)| *p == producer_id && *at >= first_offset)
                .map_or(i64::MAX, |(_, at)| *at),
        })
        .collect()
}

/// The offset ListOffsets gives for `timestamp` (-2 the log start, -1 the end: the last stable
/// offset when `committed`), asked of `leader`; `Ok(None)` when no record is that recent.
pub async fn list_offset(
    shard: &Rc<Shard>,
    leader: i32,
    tp: &TopicPartition,
    timestamp: i64,
    committed: bool,
) -> Result<Option<Offset>, ErrorCode> {
    let mut req = ListOffsetsRequest::default();
    req.replica_id = BrokerId(-1);
    req.isolation_level = i8::from(committed);
    let mut t = ListOffsetsTopic::default();
    t.name = TopicName(StrBytes::from_string(tp.topic.to_string()));
    let mut p = ListOffsetsPartition::default();
    p.partition_index = tp.partition.0;
    p.timestamp = timestamp;
    p.current_leader_epoch = -1;
    t.partitions = vec![p];
    req.topics = vec![t];
    let resp: ListOffsetsResponse = exchange(
        shard,
        leader,
        ApiKey::ListOffsets,
        LIST_OFFSETS_VERSION,
        &req,
    )
    .await
    .map_err(|e| {
        tracing::debug!(leader, partition = %tp, error = %format!("{e:#}"), "ListOffsets to the leader failed");
        ErrorCode::NOT_LEADER_OR_FOLLOWER
    })?;
    let p = resp
        .topics
        .into_iter()
        .flat_map(|t| t.partitions)
        .find(|p| p.partition_index == tp.partition.0)
        .ok_or(ErrorCode::UNKNOWN_SERVER_ERROR)?;
    if p.error_code != 0 {
        return Err(ErrorCode(p.error_code));
    }
    Ok((p.offset >= 0).then_some(Offset(p.offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aborted_transaction_ends_at_its_producers_marker() {
        // A one-record batch of producer `pid` at `at`: transactional data, or its control marker.
        let batch = |pid: i64, at: i64, control: bool| {
            let mut b = crate::storage::batch::tests::make_batch(at, 1, 0);
            let attributes: i16 = if control { 0x30 } else { 0x10 };
            b[21..23].copy_from_slice(&attributes.to_be_bytes());
            b[43..51].copy_from_slice(&pid.to_be_bytes());
            b
        };
        let data = |pid: i64, at: i64| batch(pid, at, false);
        let marker = |pid: i64, at: i64| batch(pid, at, true);
        let mut records = Vec::new();
        records.extend(data(7, 10));
        records.extend(data(8, 11));
        records.extend(marker(8, 12));
        records.extend(marker(7, 13));
        let spans = aborted_spans(&records, [(7, 10), (8, 11), (9, 14)].into_iter());
        let ends: Vec<(i64, i64, i64)> = spans
            .iter()
            .map(|a| (a.producer_id, a.first_offset, a.last_offset))
            .collect();
        assert_eq!(ends, vec![(7, 10, 13), (8, 11, 12), (9, 14, i64::MAX)]);
    }
}
