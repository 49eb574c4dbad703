//! Log compaction (`cleanup.policy=compact`): keeps the latest record per key in the closed
//! segments, drops tombstones older than `delete.retention.ms`, never touches the active segment,
//! and preserves offsets (a cleaned segment keeps its base offset; batches keep their base offset
//! and last offset delta, so offsets simply get gaps, as in Kafka).
//!
//! Batches are filtered at the byte level: retained records are copied unchanged (headers and all),
//! only the batch header's length, record count and CRC are rewritten; a compressed batch is
//! decompressed, filtered and compressed again with its own codec. A batch with nothing left is
//! dropped; a batch with everything kept is copied as-is.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::compression::{Compressor, Gzip, Lz4, Snappy, Zstd};

use super::batch::{BatchHeader, HEADER_SIZE_BYTES};

/// One record inside a batch's (uncompressed) records section.
pub struct RawRecord {
    pub start: usize,
    pub end: usize,
    pub offset_delta: i32,
    pub key: Option<(usize, usize)>,
    pub tombstone: bool,
}

fn varint(buf: &mut &[u8]) -> Result<i64> {
    let mut value: u64 = 0;
    for shift in (0..64).step_by(7) {
        if buf.is_empty() {
            bail!("truncated varint");
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
        }
    }
    bail!("varint longer than 10 bytes")
}

/// Walks the records of an uncompressed records section.
pub fn walk_records(section: &[u8]) -> Result<Vec<RawRecord>> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < section.len() {
        let mut cur = &section[pos..];
        let before = cur.len();
        let len =
            usize::try_from(varint(&mut cur)?).map_err(|_| anyhow!("negative record length"))?;
        let body_start = pos + (before - cur.len());
        let end = body_start
            .checked_add(len)
            .filter(|e| *e <= section.len())
            .ok_or_else(|| anyhow!("record overruns its batch"))?;
        let mut body = &section[body_start..end];
        let body_len = body.len();
        if body.is_empty() {
            bail!("empty record");
        }
        let _attributes = body.get_i8();
        let _timestamp_delta = varint(&mut body)?;
        let offset_delta = i32::try_from(varint(&mut body)?)?;
        let key_len = varint(&mut body)?;
        let key = if key_len < 0 {
            None
        } else {
            let key_len = usize::try_from(key_len)?;
            if key_len > body.len() {
                bail!("record key overruns its record");
            }
            let key_start = body_start + (body_len - body.len());
            body.advance(key_len);
            Some((key_start, key_start + key_len))
        };
        let value_len = varint(&mut body)?;
        out.push(RawRecord {
            start: pos,
            end,
            offset_delta,
            key,
            tombstone: value_len < 0,
        });
        pos = end;
    }
    Ok(out)
}

/// The uncompressed records section of a batch, through the bounded decoder.
pub fn records_section(batch: &[u8], header: &BatchHeader) -> Result<Bytes> {
    super::codec::records_section(batch, header, super::codec::DECOMPRESSED_BATCH_BYTES_MAX)
        .map(Bytes::from)
        .context("decompressing a batch")
}

fn compress(codec: i16, section: &[u8]) -> Result<BytesMut> {
    let mut out = BytesMut::new();
    let fill = |tmp: &mut BytesMut| -> Result<()> {
        tmp.extend_from_slice(section);
        Ok(())
    };
    match codec {
        0 => out.extend_from_slice(section),
        1 => Gzip::compress(&mut out, fill)?,
        2 => Snappy::compress(&mut out, fill)?,
        3 => Lz4::compress(&mut out, fill)?,
        4 => Zstd::compress(&mut out, fill)?,
        other => bail!("unknown compression codec {other}"),
    }
    Ok(out)
}

/// Adds every keyed record of a batch to the map of latest offsets.
pub fn index_latest(
    batch: &[u8],
    header: &BatchHeader,
    latest: &mut HashMap<Bytes, i64>,
) -> Result<()> {
    if header.is_control() {
        return Ok(());
    }
    let section = records_section(batch, header)?;
    for r in walk_records(&section)? {
        if let Some((a, b)) = r.key {
            let offset = header.base_offset.0 + i64::from(r.offset_delta);
            latest.insert(section.slice(a..b), offset);
        }
    }
    Ok(())
}

/// What filtering a batch left.
pub struct Filtered {
    /// The batch to store (maybe the original bytes), or None when nothing is left.
    pub batch: Option<Bytes>,
    /// A latest-per-key tombstone was kept because `delete.retention.ms` has not passed.
    pub kept_tombstone: bool,
}

/// Filters a batch, keeping keyless records, the latest record of each key, and tombstones not
/// yet past `delete.retention.ms`.
pub fn filter_batch(
    batch: &[u8],
    header: &BatchHeader,
    latest: &HashMap<Bytes, i64>,
    now_ms: i64,
    delete_retention_ms: i64,
) -> Result<Filtered> {
    let batch = &batch[..header.size_bytes];
    if header.is_control() {
        return Ok(Filtered {
            batch: Some(Bytes::copy_from_slice(batch)),
            kept_tombstone: false,
        });
    }
    let section = records_section(batch, header)?;
    let records = walk_records(&section)?;
    let tombstones_expired = now_ms.saturating_sub(header.max_timestamp) > delete_retention_ms;
    let keep: Vec<&RawRecord> = records
        .iter()
        .filter(|r| match r.key {
            None => true,
            Some((a, b)) => {
                let offset = header.base_offset.0 + i64::from(r.offset_delta);
                latest.get(&section[a..b]) == Some(&offset) && !(r.tombstone && tombstones_expired)
            }
        })
        .collect();
    let kept_tombstone = keep.iter().any(|r| r.tombstone && r.key.is_some());
    if keep.len() == records.len() {
        return Ok(Filtered {
            batch: Some(Bytes::copy_from_slice(batch)),
            kept_tombstone,
        });
    }
    if keep.is_empty() {
        return Ok(Filtered {
            batch: None,
            kept_tombstone,
        });
    }
    let mut kept = Vec::new();
    for r in &keep {
        kept.extend_from_slice(&section[r.start..r.end]);
    }
    let body = compress(header.compression(), &kept)?;
    let mut out = BytesMut::with_capacity(HEADER_SIZE_BYTES + body.len());
    out.extend_from_slice(&batch[..HEADER_SIZE_BYTES]);
    out.put_slice(&body);
    let length = i32::try_from(out.len() - 12)?;
    out[8..12].copy_from_slice(&length.to_be_bytes());
    let count = i32::try_from(keep.len())?;
    out[57..61].copy_from_slice(&count.to_be_bytes());
    let crc = crc32c::crc32c(&out[21..]);
    out[17..21].copy_from_slice(&crc.to_be_bytes());
    Ok(Filtered {
        batch: Some(out.freeze()),
        kept_tombstone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};

    fn batch(base: i64, keys: &[(&str, Option<&str>)], compression: Compression) -> BytesMut {
        let records: Vec<Record> = keys
            .iter()
            .enumerate()
            .map(|(i, (k, v))| {
                let mut r = crate::storage::records::plain_record(
                    i as i64,
                    1000,
                    Some(Bytes::copy_from_slice(k.as_bytes())),
                    v.map(|v| Bytes::copy_from_slice(v.as_bytes())),
                );
                r.offset += base;
                r
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .unwrap();
        buf
    }

    #[test]
    fn keeps_latest_per_key_with_offsets_and_crc() {
        for compression in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let b = batch(
                10,
                &[
                    ("a", Some("1")),
                    ("b", Some("1")),
                    ("a", Some("2")),
                    ("c", None),
                ],
                compression,
            );
            let h = crate::storage::batch::BatchHeader::parse(&b).unwrap();
            let mut latest = HashMap::new();
            index_latest(&b, &h, &mut latest).unwrap();
            assert_eq!(latest[&Bytes::from_static(b"a")], 12);
            let filtered = filter_batch(&b, &h, &latest, 2000, 10_000).unwrap();
            assert!(filtered.kept_tombstone);
            let out = filtered.batch.unwrap();
            let oh = crate::storage::batch::BatchHeader::parse(&out).unwrap();
            assert_eq!(oh.base_offset.0, 10);
            assert_eq!(oh.last_offset_delta, 3);
            assert_eq!(oh.record_count, 3, "{compression:?}");
            assert_eq!(oh.compression(), h.compression());
            assert_eq!(crc32c::crc32c(&out[21..]), oh.crc);
            let mut bytes = out.clone();
            let set = kafka_protocol::records::RecordBatchDecoder::decode(&mut bytes).unwrap();
            let offsets: Vec<i64> = set.records.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, vec![11, 12, 13]);
            // After delete.retention.ms the tombstone goes too.
            let out = filter_batch(&b, &h, &latest, 1000 + 10_001, 10_000)
                .unwrap()
                .batch
                .unwrap();
            assert_eq!(
                crate::storage::batch::BatchHeader::parse(&out)
                    .unwrap()
                    .record_count,
                2
            );
        }
    }
}
