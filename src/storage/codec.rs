//! The records inside a batch, read through a bounded decompressing stream.
//!
//! A compressed batch is the one place where a few bytes from the wire can ask the broker for a lot
//! of work: a 32 KB zstd frame can expand to a gigabyte. Every look inside a batch therefore goes
//! through [`records_reader`]: the codec's streaming decoder (bounded memory of its own: a gzip
//! window, a 4 MiB lz4 block, a zstd window of at most 2^[`ZSTD_WINDOW_LOG_MAX`] bytes, one snappy
//! block checked against the budget before it is allocated) behind a reader that fails once more
//! than the budget has come out. Walking the records ([`for_each_record`]) streams and keeps only
//! one small buffer, so its memory does not depend on what the batch claims.

use std::io::{self, BufRead, BufReader, Read};

use bytes::Buf;

use super::batch::{BatchHeader, HEADER_SIZE_BYTES};

/// The most a batch's records section may decompress to. Producers cap batches at
/// `max.message.bytes` (1 MiB by default) *compressed*; 64 MiB leaves room for ratios of 64:1
/// while a decompression bomb stops after a bounded amount of work.
pub const DECOMPRESSED_BATCH_BYTES_MAX: u64 = 64 << 20;

/// zstd window limit (16 MiB): producers compress batches of at most a few MiB, so their frames
/// never need more, and a frame that asks for a larger window is refused before it is allocated.
const ZSTD_WINDOW_LOG_MAX: u32 = 24;

/// Buffer between the decoder and the record walker.
const WALK_BUFFER_BYTES: usize = 64 << 10;

/// The fields of one record the broker looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordInfo {
    pub offset_delta: i64,
    pub timestamp_delta: i64,
    pub has_key: bool,
}

/// Why a batch's records could not be read.
#[derive(Debug)]
pub enum RecordsError {
    /// The records section does not parse or does not decompress.
    Corrupt(String),
    /// It decompresses to more than the budget allows.
    TooLarge,
}

impl std::fmt::Display for RecordsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordsError::Corrupt(why) => write!(f, "corrupt records: {why}"),
            RecordsError::TooLarge => write!(
                f,
                "records decompress to more than {DECOMPRESSED_BATCH_BYTES_MAX} bytes"
            ),
        }
    }
}

impl std::error::Error for RecordsError {}

impl From<io::Error> for RecordsError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::OutOfMemory {
            RecordsError::TooLarge
        } else {
            RecordsError::Corrupt(e.to_string())
        }
    }
}

fn corrupt(why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

fn over_budget() -> io::Error {
    io::Error::new(io::ErrorKind::OutOfMemory, "over the decompression budget")
}

/// A reader of the uncompressed records section of `batch` (the whole batch, header included),
/// failing with `OutOfMemory` once more than `limit_bytes` have come out.
pub fn records_reader<'a>(
    batch: &'a [u8],
    header: &BatchHeader,
    limit_bytes: u64,
) -> io::Result<Box<dyn Read + 'a>> {
    let body = batch
        .get(HEADER_SIZE_BYTES..header.size_bytes)
        .ok_or_else(|| corrupt("batch shorter than its length field"))?;
    let inner: Box<dyn Read + 'a> = match header.compression() {
        0 => Box::new(body),
        1 => Box::new(flate2::read::MultiGzDecoder::new(body)),
        2 => Box::new(SnappyReader::new(body, limit_bytes)),
        3 => Box::new(lz4::Decoder::new(body)?),
        4 => {
            let mut d = zstd::stream::read::Decoder::with_buffer(body)?;
            d.window_log_max(ZSTD_WINDOW_LOG_MAX)?;
            Box::new(d)
        }
        other => return Err(corrupt(&format!("unknown compression codec {other}"))),
    };
    Ok(Box::new(Bounded {
        inner,
        remaining_bytes: limit_bytes,
    }))
}

/// The whole uncompressed records section in memory, at most `limit_bytes` of it.
pub fn records_section(
    batch: &[u8],
    header: &BatchHeader,
    limit_bytes: u64,
) -> Result<Vec<u8>, RecordsError> {
    let mut out = Vec::new();
    records_reader(batch, header, limit_bytes)?.read_to_end(&mut out)?;
    Ok(out)
}

/// Calls `f` for every record of the batch in order, until it returns false; returns how many
/// records were seen. Memory stays at one small buffer whatever the batch holds or claims.
pub fn for_each_record(
    batch: &[u8],
    header: &BatchHeader,
    limit_bytes: u64,
    f: impl FnMut(&RecordInfo) -> bool,
) -> Result<u64, RecordsError> {
    if header.compression() == 0 {
        // Uncompressed (the common produce case): walk the batch's own bytes, no buffer at all.
        let body = batch
            .get(HEADER_SIZE_BYTES..header.size_bytes)
            .ok_or_else(|| corrupt("batch shorter than its length field"))?;
        return walk(body, f);
    }
    let reader = records_reader(batch, header, limit_bytes)?;
    walk(BufReader::with_capacity(WALK_BUFFER_BYTES, reader), f)
}

fn walk(mut r: impl BufRead, mut f: impl FnMut(&RecordInfo) -> bool) -> Result<u64, RecordsError> {
    let mut count = 0u64;
    loop {
        if r.fill_buf()?.is_empty() {
            return Ok(count);
        }
        let (length, _) = read_varint(&mut r)?;
        let length = u64::try_from(length).map_err(|_| corrupt("negative record length"))?;
        let mut used = 1u64; // attributes
        let mut attributes = [0u8; 1];
        r.read_exact(&mut attributes)?;
        let (timestamp_delta, n) = read_varint(&mut r)?;
        used += n;
        let (offset_delta, n) = read_varint(&mut r)?;
        used += n;
        let (key_length, n) = read_varint(&mut r)?;
        used += n;
        let rest = length
            .checked_sub(used)
            .ok_or_else(|| corrupt("record shorter than its fields"))?;
        let copied = io::copy(&mut (&mut r).take(rest), &mut io::sink())?;
        if copied != rest {
            return Err(RecordsError::Corrupt("record overruns its batch".into()));
        }
        count += 1;
        let info = RecordInfo {
            offset_delta,
            timestamp_delta,
            has_key: key_length >= 0,
        };
        if !f(&info) {
            return Ok(count);
        }
    }
}

/// A zig-zag varint as Kafka's records use, with the number of bytes it took.
fn read_varint(r: &mut impl Read) -> io::Result<(i64, u64)> {
    let mut value: u64 = 0;
    for (i, shift) in (0..64).step_by(7).enumerate() {
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte)?;
        value |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            let decoded =
                i64::from_ne_bytes((value >> 1).to_ne_bytes()) ^ -i64::from(value & 1 == 1);
            return Ok((decoded, i as u64 + 1));
        }
    }
    Err(corrupt("varint longer than 10 bytes"))
}

/// Fails once more than the budget has been read through it.
struct Bounded<R> {
    inner: R,
    remaining_bytes: u64,
}

impl<R: Read> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let n64 = n as u64;
        if n64 > self.remaining_bytes {
            return Err(over_budget());
        }
        self.remaining_bytes -= n64;
        Ok(n)
    }
}

/// Kafka's snappy: either one raw snappy block, or xerial framing (a 16-byte magic header, then
/// blocks each preceded by a big-endian u32 length). Each block states its uncompressed length;
/// that claim is checked against the budget before anything is allocated.
struct SnappyReader<'a> {
    rest: &'a [u8],
    raw: bool,
    block: Vec<u8>,
    at: usize,
    budget_bytes: u64,
}

const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_BYTES: usize = 16;

impl<'a> SnappyReader<'a> {
    fn new(body: &'a [u8], budget_bytes: u64) -> Self {
        let framed = body.starts_with(XERIAL_MAGIC) && body.len() >= XERIAL_HEADER_BYTES;
        SnappyReader {
            rest: if framed {
                &body[XERIAL_HEADER_BYTES..]
            } else {
                body
            },
            raw: !framed,
            block: Vec::new(),
            at: 0,
            budget_bytes,
        }
    }

    fn next_block(&mut self) -> io::Result<bool> {
        if self.rest.is_empty() {
            return Ok(false);
        }
        let compressed = if self.raw {
            std::mem::take(&mut self.rest)
        } else {
            if self.rest.len() < 4 {
                return Err(corrupt("truncated snappy block length"));
            }
            let len =
                usize::try_from(self.rest.get_u32()).map_err(|_| corrupt("snappy block length"))?;
            if len > self.rest.len() {
                return Err(corrupt("snappy block overruns the batch"));
            }
            let (block, rest) = self.rest.split_at(len);
            self.rest = rest;
            block
        };
        let claimed = snap::raw::decompress_len(compressed).map_err(|e| corrupt(&e.to_string()))?;
        let claimed64 = claimed as u64;
        if claimed64 > self.budget_bytes {
            return Err(over_budget());
        }
        self.budget_bytes -= claimed64;
        self.block.clear();
        self.block.resize(claimed, 0);
        let n = snap::raw::Decoder::new()
            .decompress(compressed, &mut self.block)
            .map_err(|e| corrupt(&e.to_string()))?;
        self.block.truncate(n);
        self.at = 0;
        Ok(true)
    }
}

impl Read for SnappyReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.at >= self.block.len() {
            if !self.next_block()? {
                return Ok(0);
            }
        }
        let n = buf.len().min(self.block.len() - self.at);
        buf[..n].copy_from_slice(&self.block[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use kafka_protocol::records::{Compression, RecordBatchEncoder, RecordEncodeOptions};

    fn encoded(count: i64, compression: Compression, value_bytes: usize) -> BytesMut {
        let records: Vec<_> = (0..count)
            .map(|i| {
                crate::storage::records::plain_record(
                    i,
                    1000 + i,
                    (i % 2 == 0).then(|| bytes::Bytes::from(format!("k{i}"))),
                    Some(bytes::Bytes::from(vec![b'x'; value_bytes])),
                )
            })
            .collect();
        let mut out = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut out,
            &records,
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .expect("test batch encodes");
        out
    }

    #[test]
    fn every_codec_walks_every_record() {
        for compression in [
            Compression::None,
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let b = encoded(50, compression, 10);
            let h = BatchHeader::parse(&b).expect("header");
            let mut seen = Vec::new();
            let n = for_each_record(&b, &h, DECOMPRESSED_BATCH_BYTES_MAX, |r| {
                seen.push(*r);
                true
            })
            .expect("walks");
            assert_eq!(n, 50, "{compression:?}");
            for (i, r) in seen.iter().enumerate() {
                assert_eq!(r.offset_delta, i as i64);
                assert_eq!(r.timestamp_delta, i as i64);
                assert_eq!(r.has_key, i % 2 == 0);
            }
        }
    }

    #[test]
    fn a_bomb_stops_at_the_budget() {
        for compression in [
            Compression::Gzip,
            Compression::Snappy,
            Compression::Lz4,
            Compression::Zstd,
        ] {
            let b = encoded(20, compression, 100_000);
            let h = BatchHeader::parse(&b).expect("header");
            let walked = for_each_record(&b, &h, 1 << 20, |_| true);
            assert!(
                matches!(walked, Err(RecordsError::TooLarge)),
                "{compression:?}: {walked:?}"
            );
            assert!(matches!(
                records_section(&b, &h, 1 << 20),
                Err(RecordsError::TooLarge)
            ));
        }
    }

    #[test]
    fn garbage_bodies_are_errors_not_panics() {
        let mut seed = 0x2545f4914f6cdd1du64;
        println!("seed {seed:#x}");
        for codec in 0..5i16 {
            let good = encoded(3, Compression::None, 5);
            let mut h = BatchHeader::parse(&good).expect("header");
            h.attributes = codec;
            for _ in 0..300 {
                let mut b = good.to_vec();
                for byte in b[HEADER_SIZE_BYTES..].iter_mut() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    *byte = seed.to_le_bytes()[0];
                }
                let _ = for_each_record(&b, &h, 1 << 20, |_| true);
            }
        }
    }
}
