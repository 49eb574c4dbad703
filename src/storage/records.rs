//! Looking inside a batch's records. ListOffsets by timestamp must answer with the exact first
//! record at or after a time, which may sit in the middle of a batch (and, for a compressed batch,
//! behind its codec); the group and transaction coordinators replay their own records from the
//! log. Decoding uses the kafka-protocol crate's record decoder behind strom's bounded reader;
//! stored bytes are never changed by it.

use anyhow::Result;
use bytes::Bytes;
use kafka_protocol::records::{Record, RecordBatchDecoder, RecordSet, TimestampType};

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

/// Decodes every batch in `bytes` with kafka-protocol's record decoder, after checking each one with
/// the bounded reader: it must be whole, and hold exactly the records its header counts.
/// kafka-protocol reserves room for the header's record count before it reads a record, so a
/// header that lies (a corrupt file, a hostile peer) would otherwise ask for gigabytes; after the
/// check the count is backed by records that are really there.
pub fn decode_record_sets(bytes: Bytes) -> Result<Vec<RecordSet>> {
    let mut pos = 0;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let header = super::batch::BatchHeader::parse(rest)
            .map_err(|e| anyhow::anyhow!("batch at byte {pos}: {e:?}"))?;
        let batch = rest
            .get(..header.size_bytes)
            .ok_or_else(|| anyhow::anyhow!("batch at byte {pos} is cut short"))?;
        let count = super::codec::for_each_record(
            batch,
            &header,
            super::codec::DECOMPRESSED_BATCH_BYTES_MAX,
            |_| true,
        )
        .map_err(|e| anyhow::anyhow!("batch at byte {pos}: {e}"))?;
        if count != u64::from(header.record_count.unsigned_abs()) {
            anyhow::bail!(
                "batch at byte {pos} counts {} records but holds {count}",
                header.record_count
            );
        }
        pos += header.size_bytes;
    }
    let mut buf = bytes;
    RecordBatchDecoder::decode_all(&mut buf)
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

    /// Found by `cargo fuzz run metadata_loaders`: a batch whose header claimed ~600 million
    /// records made kafka-protocol reserve 94 GB before reading one, aborting the process. The
    /// loaders of `__consumer_offsets` and `__transaction_state` decode through here.
    #[test]
    fn a_lying_record_count_is_an_error_not_an_allocation() {
        let good = super::super::batch::tests::make_batch(0, 3, 1000);
        assert_eq!(
            decode_record_sets(good.clone().freeze()).unwrap()[0]
                .records
                .len(),
            3
        );
        for claimed in [i32::MAX, 600_000_000, 4, 2, 0] {
            let mut b = good.clone();
            b[57..61].copy_from_slice(&claimed.to_be_bytes());
            let crc = crc32c::crc32c(&b[21..]);
            b[17..21].copy_from_slice(&crc.to_be_bytes());
            let err = decode_record_sets(b.freeze()).unwrap_err();
            assert!(err.to_string().contains("holds 3"), "{claimed}: {err}");
        }
        // Cut short, or with a second batch cut short.
        assert!(decode_record_sets(good.clone().freeze().slice(..good.len() - 1)).is_err());
        let mut two = good.clone();
        two.extend_from_slice(&good[..40]);
        assert!(decode_record_sets(two.freeze()).is_err());
        // Group and transaction replay both refuse it.
        let mut b = good.clone();
        b[57..61].copy_from_slice(&i32::MAX.to_be_bytes());
        assert!(crate::group::records::decode_batches(b.clone().freeze()).is_err());
        assert!(crate::txn::records::decode_batches(b.freeze()).is_err());
    }

    #[test]
    fn finds_first_record_at_or_after() {
        let b = super::super::batch::tests::make_batch(10, 3, 1000);
        // All records share timestamp 1000 (delta 0): the first qualifies.
        assert_eq!(first_at_or_after(&b, 999).unwrap(), (Offset(10), 1000));
        assert_eq!(first_at_or_after(&b, 1000).unwrap(), (Offset(10), 1000));
    }
}
