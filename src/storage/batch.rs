//! Kafka record batches (magic v2) as bytes: header parsing, validation and the few in-place
//! rewrites the broker performs. The batch itself is never re-encoded; offsets and the leader epoch
//! live outside the CRC, so assigning them needs no recompute. Only `LogAppendTime` rewrites a
//! CRC-covered field (the max timestamp) and recomputes the CRC.

use bytes::Buf;

use super::codec;
use crate::model::{ErrorCode, Offset};

/// Bytes before the records: every header field of a v2 batch.
pub const HEADER_SIZE_BYTES: usize = 61;
/// `baseOffset` + `batchLength`: the part of the header not counted in `batchLength`.
pub const LOG_OVERHEAD_BYTES: usize = 12;
const CRC_START: usize = 21;

const ATTR_COMPRESSION_MASK: i16 = 0x07;
const ATTR_TIMESTAMP_TYPE: i16 = 0x08;
const ATTR_TRANSACTIONAL: i16 = 0x10;
const ATTR_CONTROL: i16 = 0x20;

/// The fixed header of one batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: Offset,
    /// Whole batch size, header included.
    pub size_bytes: usize,
    pub leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub record_count: i32,
}

/// Why bytes are not a valid batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchError {
    /// Fewer bytes than the header or the declared length: a torn tail or a truncated request.
    Incomplete,
    /// The length, magic, or counts contradict each other.
    Malformed,
    /// The CRC-32C over attributes..end does not match.
    CrcMismatch,
    UnsupportedMagic,
}

impl BatchError {
    pub fn error_code(self) -> ErrorCode {
        match self {
            BatchError::UnsupportedMagic => ErrorCode::UNSUPPORTED_FOR_MESSAGE_FORMAT,
            _ => ErrorCode::CORRUPT_MESSAGE,
        }
    }
}

impl BatchHeader {
    /// Parses the header at the start of `bytes`. Checks only what the header itself can prove.
    pub fn parse(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
        if bytes.len() < HEADER_SIZE_BYTES {
            return Err(BatchError::Incomplete);
        }
        let mut b = &bytes[..HEADER_SIZE_BYTES];
        let base_offset = b.get_i64();
        let length = b.get_i32();
        let leader_epoch = b.get_i32();
        let magic = b.get_i8();
        let crc = b.get_u32();
        let attributes = b.get_i16();
        let last_offset_delta = b.get_i32();
        let base_timestamp = b.get_i64();
        let max_timestamp = b.get_i64();
        let producer_id = b.get_i64();
        let producer_epoch = b.get_i16();
        let base_sequence = b.get_i32();
        let record_count = b.get_i32();
        let size_bytes = usize::try_from(length)
            .ok()
            .and_then(|l| l.checked_add(LOG_OVERHEAD_BYTES))
            .ok_or(BatchError::Malformed)?;
        if size_bytes < HEADER_SIZE_BYTES {
            return Err(BatchError::Malformed);
        }
        if magic != 2 {
            return Err(BatchError::UnsupportedMagic);
        }
        if last_offset_delta < 0 || record_count < 0 {
            return Err(BatchError::Malformed);
        }
        Ok(BatchHeader {
            base_offset: Offset(base_offset),
            size_bytes,
            leader_epoch,
            magic,
            crc,
            attributes,
            last_offset_delta,
            base_timestamp,
            max_timestamp,
            producer_id,
            producer_epoch,
            base_sequence,
            record_count,
        })
    }

    /// The batch's last offset. A header from the wire or a corrupt file may claim offsets past
    /// i64::MAX: that saturates (and fails the checks that follow) rather than overflowing.
    pub fn last_offset(&self) -> Offset {
        Offset(
            self.base_offset
                .0
                .saturating_add(i64::from(self.last_offset_delta)),
        )
    }

    pub fn compression(&self) -> i16 {
        self.attributes & ATTR_COMPRESSION_MASK
    }

    pub fn is_transactional(&self) -> bool {
        self.attributes & ATTR_TRANSACTIONAL != 0
    }

    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    pub fn has_log_append_time(&self) -> bool {
        self.attributes & ATTR_TIMESTAMP_TYPE != 0
    }

    /// The last sequence number in the batch, wrapping at i32::MAX as Kafka's producers do.
    pub fn last_sequence(&self) -> i32 {
        if self.base_sequence < 0 {
            return self.base_sequence;
        }
        let last = i64::from(self.base_sequence) + i64::from(self.last_offset_delta);
        if last > i64::from(i32::MAX) {
            i32::try_from(last - i64::from(i32::MAX) - 1).unwrap_or(i32::MAX)
        } else {
            i32::try_from(last).unwrap_or(i32::MAX)
        }
    }
}

/// Parses one whole batch at the start of `bytes` and checks its CRC.
pub fn validate(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(bytes)?;
    if bytes.len() < header.size_bytes {
        return Err(BatchError::Incomplete);
    }
    let actual = crc32c::crc32c(&bytes[CRC_START..header.size_bytes]);
    if actual != header.crc {
        return Err(BatchError::CrcMismatch);
    }
    if header.record_count != header.last_offset_delta + 1 && header.record_count != 0 {
        // A producer may compact away records only on the broker side; a produced batch whose
        // count disagrees with its offset span would give offsets that never exist.
        return Err(BatchError::Malformed);
    }
    Ok(header)
}

/// Checks a produced batch's records against its header, reading through the bounded decoder:
/// the header's record count must equal the records present, the offset deltas must run 0, 1, 2 …
/// to `last_offset_delta`, and (for a compacted topic) every record must have a key. A header that
/// lies about its records would otherwise move the partition's offsets by up to 2^31 per batch.
pub fn check_records(
    batch: &[u8],
    header: &BatchHeader,
    keys_required: bool,
) -> Result<(), RecordsCheck> {
    if header.record_count < 1 || header.record_count != header.last_offset_delta.saturating_add(1)
    {
        return Err(RecordsCheck::Invalid(
            "record count disagrees with the offset span",
        ));
    }
    let mut expected = 0i64;
    let mut bad: Option<&'static str> = None;
    let mut keyless = Vec::new();
    let count = codec::for_each_record(batch, header, codec::DECOMPRESSED_BATCH_BYTES_MAX, |r| {
        if r.offset_delta != expected {
            bad = Some("record offset deltas are not 0, 1, 2, ...");
        } else if keys_required && !r.has_key {
            // Every keyless record is named (KIP-467), so keep walking.
            keyless.push(i32::try_from(expected).unwrap_or(i32::MAX));
        }
        expected += 1;
        bad.is_none()
    })
    .map_err(RecordsCheck::Unreadable)?;
    if let Some(why) = bad {
        return Err(RecordsCheck::Invalid(why));
    }
    if count != u64::from(header.record_count.unsigned_abs()) {
        return Err(RecordsCheck::Invalid(
            "record count disagrees with the records present",
        ));
    }
    if !keyless.is_empty() {
        return Err(RecordsCheck::Keyless(keyless));
    }
    Ok(())
}

/// Why a produced batch's records were refused.
#[derive(Debug)]
pub enum RecordsCheck {
    /// Readable, but the records contradict the header or the topic's rules.
    Invalid(&'static str),
    /// A compacted topic got records without a key: their indexes in the batch.
    Keyless(Vec<i32>),
    Unreadable(codec::RecordsError),
}

impl RecordsCheck {
    /// Kafka answers `INVALID_RECORD` when records contradict their batch, `CORRUPT_MESSAGE` when
    /// they cannot be read at all.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            RecordsCheck::Invalid(_)
            | RecordsCheck::Keyless(_)
            | RecordsCheck::Unreadable(codec::RecordsError::TooLarge) => ErrorCode::INVALID_RECORD,
            RecordsCheck::Unreadable(codec::RecordsError::Corrupt(_)) => ErrorCode::CORRUPT_MESSAGE,
        }
    }
}

impl std::fmt::Display for RecordsCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordsCheck::Invalid(why) => f.write_str(why),
            RecordsCheck::Keyless(at) => write!(
                f,
                "a compacted topic requires a key on every record ({} without)",
                at.len()
            ),
            RecordsCheck::Unreadable(e) => write!(f, "{e}"),
        }
    }
}

/// Splits a produce request's records into batches, validating each one.
pub fn split_batches(bytes: &[u8]) -> Result<Vec<(usize, BatchHeader)>, BatchError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        let header = validate(&bytes[pos..])?;
        out.push((pos, header));
        pos += header.size_bytes;
    }
    Ok(out)
}

/// The length of the longest run of whole batches at the start of `bytes` that fits in
/// `limit_bytes`, but at least the first batch (KIP-74: a consumer must always make progress).
pub fn whole_batches_within(bytes: &[u8], limit_bytes: usize) -> usize {
    let mut end = 0usize;
    while let Some(rest) = bytes.get(end..).filter(|r| !r.is_empty()) {
        let Ok(header) = BatchHeader::parse(rest) else {
            break;
        };
        let next = end.saturating_add(header.size_bytes);
        if next > bytes.len() || (end > 0 && next > limit_bytes) {
            break;
        }
        end = next;
    }
    end
}

/// The offset after the last batch of `records`, if they all parse as batches.
pub fn end_offset(records: &[u8]) -> Option<Offset> {
    let mut at = 0;
    let mut end = None;
    while at < records.len() {
        let h = BatchHeader::parse(&records[at..]).ok()?;
        end = Some(h.last_offset().next());
        at += h.size_bytes;
    }
    end
}

/// The length of the run of whole batches at the start of `bytes` that begin below `limit` (a
/// `read_committed` read stops at the last stable offset, which is always a batch's base offset).
pub fn batches_below(bytes: &[u8], limit: Offset) -> usize {
    let mut end = 0usize;
    while let Some(rest) = bytes.get(end..).filter(|r| !r.is_empty()) {
        let Ok(header) = BatchHeader::parse(rest) else {
            break;
        };
        let next = end.saturating_add(header.size_bytes);
        if header.base_offset >= limit || next > bytes.len() {
            break;
        }
        end = next;
    }
    end
}

/// Writes the broker-assigned base offset and leader epoch into a batch (outside the CRC).
pub fn assign(batch: &mut [u8], base_offset: Offset, leader_epoch: i32) {
    batch[0..8].copy_from_slice(&base_offset.0.to_be_bytes());
    batch[12..16].copy_from_slice(&leader_epoch.to_be_bytes());
}

/// For `message.timestamp.type=LogAppendTime`: sets the timestamp type bit and the max timestamp
/// to the broker's clock, then recomputes the CRC those fields are covered by.
pub fn set_log_append_time(batch: &mut [u8], now_ms: i64) {
    let attributes = i16::from_be_bytes([batch[21], batch[22]]) | ATTR_TIMESTAMP_TYPE;
    batch[21..23].copy_from_slice(&attributes.to_be_bytes());
    batch[35..43].copy_from_slice(&now_ms.to_be_bytes());
    let crc = crc32c::crc32c(&batch[CRC_START..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    /// Builds a valid uncompressed batch of `count` records with small values, for tests.
    pub fn make_batch(base_offset: i64, count: i32, timestamp: i64) -> BytesMut {
        let mut records = BytesMut::new();
        for i in 0..count {
            let mut rec = BytesMut::new();
            rec.put_i8(0); // attributes
            put_varint(&mut rec, 0); // timestamp delta
            put_varint(&mut rec, i64::from(i)); // offset delta
            put_varint(&mut rec, -1); // null key
            put_varint(&mut rec, 1);
            rec.put_u8(b'v');
            put_varint(&mut rec, 0); // headers
            put_varint(&mut records, rec.len() as i64);
            records.extend_from_slice(&rec);
        }
        let mut b = BytesMut::new();
        b.put_i64(base_offset);
        b.put_i32((HEADER_SIZE_BYTES - LOG_OVERHEAD_BYTES + records.len()) as i32);
        b.put_i32(0);
        b.put_i8(2);
        b.put_u32(0);
        b.put_i16(0);
        b.put_i32(count - 1);
        b.put_i64(timestamp);
        b.put_i64(timestamp);
        b.put_i64(-1);
        b.put_i16(-1);
        b.put_i32(-1);
        b.put_i32(count);
        b.extend_from_slice(&records);
        let crc = crc32c::crc32c(&b[CRC_START..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b
    }

    fn put_varint(buf: &mut BytesMut, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            buf.put_u8((z as u8) | 0x80);
            z >>= 7;
        }
        buf.put_u8(z as u8);
    }

    #[test]
    fn valid_batch_parses_and_crc_checks() {
        let b = make_batch(0, 3, 1000);
        let h = validate(&b).unwrap();
        assert_eq!(h.record_count, 3);
        assert_eq!(h.last_offset(), Offset(2));
        assert_eq!(h.size_bytes, b.len());
    }

    #[test]
    fn flipped_payload_bit_fails_crc() {
        let mut b = make_batch(0, 3, 1000);
        let last = b.len() - 1;
        b[last] ^= 1;
        assert_eq!(validate(&b), Err(BatchError::CrcMismatch));
    }

    #[test]
    fn assigning_offsets_keeps_crc_valid() {
        let mut b = make_batch(0, 3, 1000);
        assign(&mut b, Offset(4242), 7);
        let h = validate(&b).unwrap();
        assert_eq!(h.base_offset, Offset(4242));
        assert_eq!(h.leader_epoch, 7);
    }

    #[test]
    fn log_append_time_rewrites_crc() {
        let mut b = make_batch(0, 1, 1000);
        set_log_append_time(&mut b, 99);
        let h = validate(&b).unwrap();
        assert_eq!(h.max_timestamp, 99);
        assert!(h.has_log_append_time());
    }

    #[test]
    fn truncated_and_garbage_input_are_errors_not_panics() {
        let b = make_batch(0, 3, 1000);
        for cut in 0..b.len() {
            assert!(validate(&b[..cut]).is_err());
        }
        let mut seed = 0x9e3779b97f4a7c15u64;
        println!("seed {seed:#x}");
        for _ in 0..2000 {
            let mut junk = vec![0u8; 80];
            for byte in junk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *byte = seed as u8;
            }
            let _ = split_batches(&junk);
        }
    }

    #[test]
    fn whole_batches_within_keeps_at_least_the_first() {
        let mut bytes = make_batch(0, 3, 0);
        let one = bytes.len();
        bytes.extend_from_slice(&make_batch(3, 3, 0));
        bytes.extend_from_slice(&make_batch(6, 3, 0));
        assert_eq!(whole_batches_within(&bytes, 1), one);
        assert_eq!(whole_batches_within(&bytes, 2 * one), 2 * one);
        assert_eq!(whole_batches_within(&bytes, 2 * one + 1), 2 * one);
        assert_eq!(whole_batches_within(&bytes, 10 * one), 3 * one);
        assert_eq!(whole_batches_within(&bytes[..one + 5], 10 * one), one);
    }

    #[test]
    fn sequence_wraps_at_i32_max() {
        let mut h = BatchHeader::parse(&make_batch(0, 3, 0)).unwrap();
        h.base_sequence = i32::MAX - 1;
        assert_eq!(h.last_sequence(), 0);
    }
}
