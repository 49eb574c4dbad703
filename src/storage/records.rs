//! The one place the broker looks inside a batch's records: ListOffsets by timestamp must answer
//! with the exact first record at or after a time, which may sit in the middle of a batch (and,
//! for a compressed batch, behind its codec). Decoding uses the kafka-protocol crate's record
//! decoder; stored bytes are never changed by it.

use anyhow::Result;
use bytes::Bytes;
use kafka_protocol::records::{Record, TimestampType};

use crate::model::Offset;

/// A plain (non-idempotent, non-transactional) record at position `index` of the batch it will be
/// encoded into. The encoder starts a new batch wherever `offset - sequence` changes, and plain
/// records decode with sequence `-1 + offset delta`, so that is the sequence given here.
pub fn plain_record(
    index: i64,
    timestamp: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset: index,
        sequence: i32::try_from(index).unwrap_or(i32::MAX) - 1,
        timestamp,
        key,
        value,
        headers: Default::default(),
    }
}

/// The offset and timestamp of the first record in `batch` whose timestamp is `>= timestamp`.
/// When no single record qualifies (the batch's max timestamp was set by LogAppendTime), the
/// batch's first record is the answer, with that max timestamp.
pub fn first_at_or_after(batch: &[u8], timestamp: i64) -> Result<(Offset, i64)> {
    let header = super::batch::BatchHeader::parse(batch)
        .map_err(|e| anyhow::anyhow!("batch header: {e:?}"))?;
    if header.has_log_append_time() {
        return Ok((header.base_offset, header.max_timestamp));
    }
    let mut found = None;
    super::codec::for_each_record(
        batch,
        &header,
        super::codec::DECOMPRESSED_BATCH_BYTES_MAX,
        |r| {
            let at = header.base_timestamp.saturating_add(r.timestamp_delta);
            if at >= timestamp {
                found = Some((
                    Offset(header.base_offset.0.saturating_add(r.offset_delta)),
                    at,
                ));
            }
            found.is_none()
        },
    )?;
    if let Some(hit) = found {
        return Ok(hit);
    }
    Ok((header.last_offset(), header.max_timestamp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_record_at_or_after() {
        let b = super::super::batch::tests::make_batch(10, 3, 1000);
        // All records share timestamp 1000 (delta 0): the first qualifies.
        assert_eq!(first_at_or_after(&b, 999).unwrap(), (Offset(10), 1000));
        assert_eq!(first_at_or_after(&b, 1000).unwrap(), (Offset(10), 1000));
    }
}
