//! Records out of fetched batches, for `strom consume`: whole v2 batches only (a fetch may end in a
//! partial one), control batches skipped, compressed batches through the broker's own bounded
//! decoder, every length checked against the bytes present.

use anyhow::{bail, Context, Result};
use bytes::Bytes;

use crate::storage::batch::{BatchError, BatchHeader};
use crate::storage::codec;

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
}
