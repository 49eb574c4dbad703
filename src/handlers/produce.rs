//! Produce: every partition's batches go to the shard that owns the partition, all partitions at
//! once, in one call per owning shard; the response lists them in request order. `acks=1`
//! answers once the batches are written, `acks=all` once they are fdatasynced (single node: the
//! whole in-sync replica set), `acks=0` not at all.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use kafka_protocol::messages::produce_response::{
    BatchIndexAndErrorMessage, PartitionProduceResponse, TopicProduceResponse,
};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::protocol::StrBytes;

use crate::model::{ErrorCode, PartitionId, ShardId, TopicPartition};
use crate::shard::{join_all, Reply, Request, Shard};
use crate::storage::{AppendError, Appended};

/// One owning shard's share of a request: the result slots and batches of its partitions.
type OwnerBatches = (Vec<usize>, Vec<(TopicPartition, BytesMut)>);

/// A partition keeps its records in the request's buffer when they are at least 15/16 of it,
/// so that the cache, which counts only the records, never holds more than 1/15 more memory than
/// it counts. At half (tried first) the broker's memory grew past its cache: producing 6 GB with
/// `rdkafka_performance` into 16 partitions, 4.1 GB of RSS against 3.2 GB with every batch copied
/// (a 3 GiB cache), since a request of two partitions' batches kept all of its buffer alive for
/// the larger one.
const IN_PLACE_SHARE_DIVISOR: usize = 16;

/// Where a partition's records were when they were taken out of the request.
enum Taken {
    /// At `start..start + len` of the frame.
    InFrame { start: usize, len: usize },
    /// Not a view of the frame (never, for a decoded request): copied at once.
    Elsewhere(BytesMut),
}

/// Takes every partition's records out of `req` (in request order; `None` where the request had
/// none), as buffers the append may write offsets into.
///
/// `frame` is the frame `req` was decoded from. Once no other view of it is left (the records
/// taken out, names copied, unknown tagged fields dropped) its buffer is this request's alone.
/// A partition whose records are nearly all of that buffer (`IN_PLACE_SHARE_DIVISOR`) then
/// keeps them where they arrived: the append writes their offsets in place and the cache holds
/// that view, so nothing is copied between the socket and the segment's write buffer. Every
/// other partition's records are copied once, as every append did before: a view keeps the whole buffer alive for as long as
/// the cache holds it, and the cache counts only the view's bytes. Views of one buffer taken for
/// several partitions would tie their lifetimes together (a partition writing a small batch into
/// each of many large requests would keep all of them in memory while its cache share counted
/// the small batches). Also copied: a frame whose buffer still holds the start of the next
/// request.
pub fn take_records(req: &mut ProduceRequest, frame: Bytes) -> Vec<Option<BytesMut>> {
    let base = frame.as_ptr() as usize;
    let end = base + frame.len();
    req.unknown_tagged_fields.clear();
    if let Some(id) = req.transactional_id.as_mut() {
        id.0 = StrBytes::from_string(id.0.to_string());
    }
    let mut taken: Vec<Option<Taken>> = Vec::new();
    for topic in &mut req.topic_data {
        topic.unknown_tagged_fields.clear();
        topic.name.0 = StrBytes::from_string(topic.name.0.to_string());
        for p in &mut topic.partition_data {
            p.unknown_tagged_fields.clear();
            taken.push(p.records.take().map(|r| {
                let start = r.as_ptr() as usize;
                if start >= base && start + r.len() <= end {
                    Taken::InFrame {
                        start: start - base,
                        len: r.len(),
                    }
                } else {
                    Taken::Elsewhere(BytesMut::from(&r[..]))
                }
            }));
        }
    }
    let mut whole = match frame.try_into_mut() {
        Ok(whole) => whole,
        Err(frame) => return copied(&frame, taken, None),
    };
    // At most one partition's records can be nearly all of the buffer.
    let capacity = whole.capacity();
    let kept = taken.iter().enumerate().find_map(|(i, t)| match t {
        Some(Taken::InFrame { start, len })
            if len.saturating_mul(IN_PLACE_SHARE_DIVISOR)
                >= capacity.saturating_mul(IN_PLACE_SHARE_DIVISOR - 1) =>
        {
            Some((i, *start, *len))
        }
        _ => None,
    });
    let Some((kept, start, len)) = kept else {
        return copied(&whole, taken, None);
    };
    let mut records = copied(&whole, taken, Some(kept));
    whole.advance(start);
    whole.truncate(len);
    records[kept] = Some(whole);
    records
}

/// Each partition's records copied out of `frame`, except the `kept` one (left `None`).
fn copied(frame: &[u8], taken: Vec<Option<Taken>>, kept: Option<usize>) -> Vec<Option<BytesMut>> {
    taken
        .into_iter()
        .enumerate()
        .map(|(i, t)| match t? {
            _ if Some(i) == kept => None,
            Taken::InFrame { start, len } => Some(BytesMut::from(&frame[start..start + len])),
            Taken::Elsewhere(records) => Some(records),
        })
        .collect()
}

pub async fn handle(
    shard: &Rc<Shard>,
    req: ProduceRequest,
    records: Vec<Option<BytesMut>>,
    version: i16,
) -> ProduceResponse {
    let acks = req.acks;
    let transactional_id: Option<Arc<str>> = req
        .transactional_id
        .as_ref()
        .filter(|t| !t.is_empty())
        .map(|t| Arc::from(t.0.as_str()));
    let table = shard.topics();
    // Each partition's result, in request order: refused here, or filled in by its owner.
    let mut results: Vec<Option<Result<Appended, AppendError>>> = Vec::new();
    let mut by_owner: BTreeMap<usize, OwnerBatches> = BTreeMap::new();
    let mut records = records.into_iter();
    for topic in &req.topic_data {
        let name: Arc<str> = Arc::from(topic.name.0.as_str());
        let partitions = table.get(&name).map_or(0, |t| t.partitions);
        for p in &topic.partition_data {
            let refused = if !matches!(acks, -1..=1) {
                Some(ErrorCode::INVALID_REQUIRED_ACKS)
            } else if p.index < 0 || p.index >= partitions {
                Some(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION)
            } else {
                None
            };
            let records = records.next().flatten().filter(|r| !r.is_empty());
            match (refused, records) {
                (Some(code), _) => results.push(Some(Err(code.into()))),
                (None, None) => results.push(Some(Err(ErrorCode::CORRUPT_MESSAGE.into()))),
                (None, Some(records)) => {
                    let tp = TopicPartition {
                        topic: name.clone(),
                        partition: PartitionId(p.index),
                    };
                    let (slots, batches) = by_owner.entry(shard.owner_of(&tp).0).or_default();
                    slots.push(results.len());
                    batches.push((tp, records));
                    results.push(None);
                }
            }
        }
    }
    let calls = by_owner.into_iter().map(|(owner, (slots, batches))| {
        let shard = shard.clone();
        let transactional_id = transactional_id.clone();
        async move {
            let n = batches.len();
            let request = Request::Append {
                batches,
                acks,
                transactional_id,
            };
            let appended = match shard.call(ShardId(owner), request).await {
                Reply::Append(list) if list.len() == n => list,
                _ => (0..n)
                    .map(|_| Err(ErrorCode::UNKNOWN_SERVER_ERROR.into()))
                    .collect(),
            };
            (slots, appended)
        }
    });
    for (slots, appended) in join_all(calls.collect()).await {
        for (slot, result) in slots.into_iter().zip(appended) {
            results[slot] = Some(result);
        }
    }
    let mut response = ProduceResponse::default();
    let mut results = results.into_iter();
    for topic in req.topic_data {
        let mut t = TopicProduceResponse::default();
        t.name = topic.name;
        for p in topic.partition_data {
            let mut r = PartitionProduceResponse::default();
            r.index = p.index;
            let result = results
                .next()
                .flatten()
                .unwrap_or_else(|| Err(ErrorCode::UNKNOWN_SERVER_ERROR.into()));
            match result {
                Ok(a) => {
                    r.base_offset = a.base_offset.0;
                    r.log_append_time_ms = a.log_append_time_ms;
                    if version >= 5 {
                        r.log_start_offset = a.log_start_offset.0;
                    }
                }
                Err(e) => {
                    r.error_code = e.code.0;
                    r.base_offset = -1;
                    r.log_append_time_ms = -1;
                    if version >= 8 {
                        // KIP-467: which records were refused and why, so a client fails just
                        // those.
                        r.error_message = e.message.map(StrBytes::from_string);
                        r.record_errors = e
                            .record_errors
                            .into_iter()
                            .map(|(index, why)| {
                                let mut b = BatchIndexAndErrorMessage::default();
                                b.batch_index = index;
                                b.batch_index_error_message = Some(StrBytes::from_string(why));
                                b
                            })
                            .collect();
                    }
                }
            }
            t.partition_responses.push(r);
        }
        response.responses.push(t);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::batch::tests::make_batch;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ApiKey, RequestKind, TopicName, TransactionalId};

    /// A produce request for one topic with `records` per partition, as the connection hands it
    /// over: the frame in its own buffer, its size prefix split off. Also what the buffer holds.
    fn arrived(records: &[Option<Bytes>]) -> (ProduceRequest, Bytes, std::ops::Range<usize>) {
        let mut topic = TopicProduceData::default();
        topic.name = TopicName(StrBytes::from_static_str("orders"));
        for (i, r) in records.iter().enumerate() {
            let mut p = PartitionProduceData::default();
            p.index = i32::try_from(i).unwrap();
            p.records = r.clone();
            topic.partition_data.push(p);
        }
        let mut req = ProduceRequest::default();
        req.acks = -1;
        req.transactional_id = Some(TransactionalId(StrBytes::from_static_str("tx")));
        req.topic_data.push(topic);
        let mut buf = crate::client::encode_request(ApiKey::Produce, 9, 7, &req).unwrap();
        let frame = buf.split_off(4).freeze();
        drop(buf);
        let start = frame.as_ptr() as usize;
        let held = start..start + frame.len();
        let decoded = crate::handlers::decode_request(frame.clone()).unwrap();
        let RequestKind::Produce(req) = decoded.request else {
            panic!("not a produce request");
        };
        (req, frame, held)
    }

    fn within(piece: &BytesMut, held: &std::ops::Range<usize>) -> bool {
        let at = piece.as_ptr() as usize;
        held.contains(&at) && at + piece.len() <= held.end
    }

    #[test]
    fn the_partition_that_is_nearly_all_of_the_request_keeps_its_records_where_they_arrived() {
        let sent = [
            Some(make_batch(0, 2000, 1).freeze()),
            None,
            Some(make_batch(0, 2, 2).freeze()),
        ];
        let (mut req, frame, held) = arrived(&sent);
        let mut taken = take_records(&mut req, frame);
        assert_eq!(taken.len(), 3);
        assert!(taken[1].is_none(), "null records stay null, in their place");
        for (got, want) in taken.iter().zip(&sent) {
            if let (Some(got), Some(want)) = (got, want) {
                assert_eq!(&got[..], &want[..]);
            }
        }
        assert!(
            within(taken[0].as_ref().unwrap(), &held),
            "the large batch was copied"
        );
        assert!(
            !within(taken[2].as_ref().unwrap(), &held),
            "the small batch was not copied"
        );
        // What is left of the request owns its names.
        assert_eq!(req.topic_data[0].name.0.as_str(), "orders");
        assert_eq!(req.transactional_id.as_ref().unwrap().0.as_str(), "tx");
        assert!(req.topic_data[0]
            .partition_data
            .iter()
            .all(|p| p.records.is_none()));
        // The view is writable where it is.
        let first = taken[0].as_mut().unwrap();
        crate::storage::batch::assign(first, crate::model::Offset(99), 3);
        assert_eq!(first[0..8], 99i64.to_be_bytes());
    }

    #[test]
    fn partitions_of_alike_size_are_copied_so_their_lifetimes_stay_apart() {
        let sent = [
            Some(make_batch(0, 40, 1).freeze()),
            Some(make_batch(0, 40, 2).freeze()),
        ];
        let (mut req, frame, held) = arrived(&sent);
        let taken = take_records(&mut req, frame);
        for (got, want) in taken.iter().zip(&sent) {
            let got = got.as_ref().unwrap();
            assert_eq!(&got[..], &want.as_ref().unwrap()[..]);
            assert!(
                !within(got, &held),
                "a view of a shared buffer would keep it alive"
            );
        }
    }

    #[test]
    fn records_in_a_shared_buffer_are_copied() {
        let sent = [Some(make_batch(0, 200, 1).freeze())];
        let (mut req, frame, held) = arrived(&sent);
        // Another view of the buffer, as the start of the next request read with this one.
        let next = frame.slice(0..4);
        let taken = take_records(&mut req, frame);
        let got = taken[0].as_ref().unwrap();
        assert_eq!(&got[..], &sent[0].as_ref().unwrap()[..]);
        assert!(!within(got, &held), "a shared buffer must not be written");
        drop(next);
    }

    #[test]
    fn a_small_batch_in_a_large_buffer_is_copied() {
        let sent = [Some(make_batch(0, 300, 1).freeze())];
        let (mut req, frame, held) = arrived(&sent);
        // The connection reserves read slack beyond the frame: here, far more than the records.
        let mut buffer = BytesMut::with_capacity(256 * 1024);
        buffer.extend_from_slice(&frame);
        let start = buffer.as_ptr() as usize;
        let moved = buffer.freeze();
        let decoded = crate::handlers::decode_request(moved.clone()).unwrap();
        let RequestKind::Produce(mut req2) = decoded.request else {
            panic!("not a produce request");
        };
        drop(decoded.header);
        let taken = take_records(&mut req2, moved);
        let got = taken[0].as_ref().unwrap();
        assert_eq!(&got[..], &sent[0].as_ref().unwrap()[..]);
        assert!(!within(got, &(start..start + 256 * 1024)));
        // The same request in a buffer of its own size keeps its batch.
        let taken = take_records(&mut req, frame);
        assert!(within(taken[0].as_ref().unwrap(), &held));
    }
}
