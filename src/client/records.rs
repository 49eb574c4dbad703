//! Records out of fetched batches, for `strom consume` and `strom bench`: whole v2 batches only (a
//! fetch may end in a partial one), control batches skipped, compressed batches through the
//! broker's own bounded decoder, every length checked against the bytes present. And records into
//! a batch, for `strom bench`'s producer: [`BatchWriter`] appends each record's bytes straight into
//! the batch (no record structs, no second encoding pass).

use anyhow::{bail, Context, Result};
use bytes::{BufMut, Bytes, BytesMut};

use crate::storage::batch::{BatchError, BatchHeader};
use crate::storage::codec;

/// Builds one uncompressed v2 batch of plain records as a producer sends it: base offset 0 and no
/// producer id or sequence (the broker assigns offsets), CreateTime timestamps.
pub struct BatchWriter {
    buf: BytesMut,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
}

const BATCH_HEADER_BYTES: usize = crate::storage::batch::HEADER_SIZE_BYTES;

fn varint_len(v: i64) -> usize {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut n = 1;
    while z >= 0x80 {
        z >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        buf.put_u8((z as u8) | 0x80);
        z >>= 7;
    }
    buf.put_u8(z as u8);
}

impl BatchWriter {
    pub fn new(capacity_bytes: usize) -> Self {
        Self::in_buffer(BytesMut::with_capacity(BATCH_HEADER_BYTES + capacity_bytes))
    }

    /// A batch written into `buf` (emptied first): a sent batch's buffer, used again.
    pub fn in_buffer(mut buf: BytesMut) -> Self {
        buf.clear();
        buf.put_bytes(0, BATCH_HEADER_BYTES);
        BatchWriter {
            buf,
            count: 0,
            base_timestamp: 0,
            max_timestamp: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends one record (no headers).
    pub fn push(&mut self, timestamp: i64, key: Option<&[u8]>, value: &[u8]) {
        self.push_parts(timestamp, key, &[value]);
    }

    /// Appends one record whose value is `parts` one after another.
    pub fn push_parts(&mut self, timestamp: i64, key: Option<&[u8]>, parts: &[&[u8]]) {
        let value_len: usize = parts.iter().map(|p| p.len()).sum();
        if self.count == 0 {
            self.base_timestamp = timestamp;
            self.max_timestamp = timestamp;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let timestamp_delta = timestamp - self.base_timestamp;
        let offset_delta = i64::from(self.count);
        let key_len = key.map_or(-1, |k| k.len() as i64);
        let body = 1
            + varint_len(timestamp_delta)
            + varint_len(offset_delta)
            + varint_len(key_len)
            + key.map_or(0, <[u8]>::len)
            + varint_len(value_len as i64)
            + value_len
            + 1;
        self.buf.reserve(varint_len(body as i64) + body);
        put_varint(&mut self.buf, body as i64);
        self.buf.put_u8(0); // attributes
        put_varint(&mut self.buf, timestamp_delta);
        put_varint(&mut self.buf, offset_delta);
        put_varint(&mut self.buf, key_len);
        if let Some(k) = key {
            self.buf.put_slice(k);
        }
        put_varint(&mut self.buf, value_len as i64);
        for part in parts {
            self.buf.put_slice(part);
        }
        self.buf.put_u8(0); // no headers
        self.count += 1;
    }

    /// The batch: header filled in, CRC over everything after it.
    pub fn finish(mut self) -> Bytes {
        let batch_length = (self.buf.len() - crate::storage::batch::LOG_OVERHEAD_BYTES) as i32;
        let mut h = &mut self.buf[..BATCH_HEADER_BYTES];
        h.put_i64(0); // base offset
        h.put_i32(batch_length);
        h.put_i32(-1); // partition leader epoch
        h.put_i8(2); // magic
        h.put_u32(0); // crc, below
        h.put_i16(0); // attributes: uncompressed, CreateTime
        h.put_i32(self.count - 1); // last offset delta
        h.put_i64(self.base_timestamp);
        h.put_i64(self.max_timestamp);
        h.put_i64(-1); // producer id
        h.put_i16(-1); // producer epoch
        h.put_i32(-1); // base sequence
        h.put_i32(self.count);
        let crc = crc32c::crc32c(&self.buf[21..]);
        self.buf[17..21].copy_from_slice(&crc.to_be_bytes());
        self.buf.freeze()
    }
}

/// One record as a consumer sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumedRecord {
    pub offset: i64,
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<(Bytes, Option<Bytes>)>,
}

/// Calls `f` for each record at or after `from` in `data` (a fetch response's records), until it
/// returns false. Returns the offset after the last whole batch seen (or `from` if none was).
pub fn for_each(data: &Bytes, from: i64, mut f: impl FnMut(ConsumedRecord) -> bool) -> Result<i64> {
    let mut next = from;
    let mut at = 0usize;
    while at < data.len() {
        let rest = &data[at..];
        let header = match BatchHeader::parse(rest) {
            Ok(h) => h,
            Err(BatchError::Incomplete) => break,
            Err(e) => bail!("batch at offset {next}: {e:?}"),
        };
        if rest.len() < header.size_bytes {
            break;
        }
        let batch = &rest[..header.size_bytes];
        at += header.size_bytes;
        let Some(end) = header
            .base_offset
            .0
            .checked_add(i64::from(header.last_offset_delta))
            .and_then(|last| last.checked_add(1))
        else {
            bail!(
                "batch at offset {} claims offsets past the end of the range",
                header.base_offset.0
            );
        };
        next = next.max(end);
        if header.is_control() || end <= from {
            continue;
        }
        let section = codec::records_section(batch, &header, codec::DECOMPRESSED_BATCH_BYTES_MAX)
            .with_context(|| format!("batch at offset {}", header.base_offset.0))?;
        let section = Bytes::from(section);
        let mut r = Reader {
            data: &section,
            at: 0,
        };
        for _ in 0..header.record_count {
            let record = r.record(&header)?;
            if record.offset >= from && !f(record) {
                return Ok(next);
            }
        }
    }
    Ok(next)
}

struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<i64> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let Some(&b) = self.data.get(self.at) else {
                bail!("record truncated");
            };
            self.at += 1;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        bail!("varint longer than 10 bytes")
    }

    fn bytes(&mut self) -> Result<Option<Bytes>> {
        let len = self.varint()?;
        if len < 0 {
            return Ok(None);
        }
        let len = usize::try_from(len)?;
        let end = self.at.checked_add(len).filter(|e| *e <= self.data.len());
        let Some(end) = end else {
            bail!("record field runs past the batch");
        };
        let out = self.data.slice(self.at..end);
        self.at = end;
        Ok(Some(out))
    }

    fn record(&mut self, header: &BatchHeader) -> Result<ConsumedRecord> {
        let _length = self.varint()?;
        let Some(_attributes) = self.data.get(self.at) else {
            bail!("record truncated");
        };
        self.at += 1;
        let timestamp_delta = self.varint()?;
        let offset_delta = self.varint()?;
        let key = self.bytes()?;
        let value = self.bytes()?;
        let count = self.varint()?;
        let mut headers = Vec::new();
        for _ in 0..count.max(0) {
            let Some(name) = self.bytes()? else {
                bail!("header without a key");
            };
            headers.push((name, self.bytes()?));
        }
        let timestamp = if header.has_log_append_time() {
            header.max_timestamp
        } else {
            header.base_timestamp.saturating_add(timestamp_delta)
        };
        Ok(ConsumedRecord {
            offset: header.base_offset.0.saturating_add(offset_delta),
            timestamp,
            key,
            value,
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the batch_validate fuzz target: a fetched batch whose base offset plus its offset
    /// span passes i64::MAX made `strom consume` overflow. It is an error now.
    #[test]
    fn a_batch_claiming_offsets_past_i64_max_is_an_error_not_a_panic() {
        let mut b = crate::storage::batch::tests::make_batch(0, 3, 1000);
        b[0..8].copy_from_slice(&(i64::MAX - 1).to_be_bytes());
        let data = Bytes::from(b.to_vec());
        assert!(for_each(&data, 0, |_| true).is_err());
        assert!(crate::storage::batch::BatchHeader::parse(&data)
            .is_ok_and(|h| h.last_offset().0 == i64::MAX));
    }

    /// What BatchWriter builds is a batch the broker accepts (CRC, count, offset deltas) and
    /// kafka-protocol decodes to the same records, for keys and values of every varint width.
    #[test]
    fn batch_writer_output_is_a_valid_batch_with_the_records_pushed() {
        use crate::storage::batch;
        let mut w = BatchWriter::new(0);
        assert!(w.is_empty());
        let mut expected = Vec::new();
        for i in 0..300usize {
            let key = (i % 3 != 0).then(|| vec![b'k'; i % 200]);
            let value = vec![(i % 251) as u8; i * 61 % 20_000];
            let timestamp = 1_700_000_000_000 + (i as i64 * 37) % 500;
            w.push(timestamp, key.as_deref(), &value);
            expected.push((timestamp, key, value));
        }
        let bytes = w.finish();
        let header = batch::validate(&bytes).unwrap();
        assert_eq!(header.size_bytes, bytes.len());
        assert_eq!(header.record_count, 300);
        assert_eq!(header.base_timestamp, 1_700_000_000_000);
        assert_eq!(header.max_timestamp, 1_700_000_000_000 + 499);
        batch::check_records(&bytes, &header, false).unwrap();
        let sets = crate::storage::records::decode_record_sets(bytes).unwrap();
        let got: Vec<_> = sets[0]
            .records
            .iter()
            .map(|r| {
                (
                    r.timestamp,
                    r.key.as_ref().map(|k| k.to_vec()),
                    r.value.as_ref().map(|v| v.to_vec()).unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(got, expected);
    }
}
