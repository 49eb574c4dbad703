//! Response encoding that does not copy large payloads. A fetch response is mostly record batches
//! the broker already holds as `Bytes` (read from a segment or the log's cache); encoding it into
//! one buffer copied every fetched byte once more before the socket write. [`ChunkedBuf`] is the
//! buffer kafka-protocol encodes into: the payloads registered with it are kept as references
//! (their length prefix is written inline, their bytes are not copied), everything else goes into
//! small inline chunks between them, and the connection writes the chunks in order.
//!
//! A partition's records may be several pieces (cached batches, see `storage::read`), while
//! kafka-protocol encodes them from one `Bytes`. Such records get a [`StandIns`] entry: a
//! `Bytes` of the right length whose only use is its address, which [`ChunkedBuf`] replaces with
//! the pieces when the encoder writes it. Stand-ins are slices of one read-only anonymous mapping
//! reserved once (no memory behind it is ever touched), so that each has an address of its own
//! within a response. A stand-in the encoder did not write is an error, never zeros on the wire.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

use anyhow::Result;
use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::Encodable;

use crate::storage::Batches;

/// Payloads smaller than this are copied inline: a separate chunk costs a write of its own.
pub const SHARED_MIN_BYTES: usize = 32 * 1024;

/// The address space stand-ins are cut from: the most bytes of records in several pieces one
/// response can stand in for (more are copied together). Reserved, never backed by memory.
const STAND_IN_REGION_BYTES: usize = 1 << 30;

/// The stand-in region: an anonymous read-only mapping, `None` where it cannot be had.
fn stand_in_region() -> Option<&'static [u8]> {
    static REGION: OnceLock<Option<&'static [u8]>> = OnceLock::new();
    *REGION.get_or_init(|| {
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                STAND_IN_REGION_BYTES,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            tracing::warn!("no address space for fetch stand-ins: multi-piece records are copied");
            return None;
        }
        // SAFETY: the mapping is readable (zeros), `STAND_IN_REGION_BYTES` long, and never
        // unmapped, so the slice is valid for the life of the process.
        Some(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), STAND_IN_REGION_BYTES) })
    })
}

/// Records in several pieces that one response writes without copying them together.
#[derive(Default)]
pub struct StandIns {
    used: usize,
    pieces: HashMap<(usize, usize), Vec<Bytes>>,
}

impl StandIns {
    /// What to put in the response for `batches`: the one piece itself, a copy of several small
    /// ones, or a stand-in that the encoder's buffer replaces with the pieces.
    pub fn records(&mut self, batches: Batches) -> Bytes {
        let len = batches.len();
        if batches.piece_count() < 2 || len < SHARED_MIN_BYTES {
            return batches.into_bytes();
        }
        let Some(region) = stand_in_region().and_then(|r| r.get(self.used..self.used + len)) else {
            return batches.into_bytes();
        };
        self.used += len;
        self.pieces.insert(
            (region.as_ptr() as usize, len),
            batches.pieces().cloned().collect(),
        );
        Bytes::from_static(region)
    }
}

/// A buffer of inline bytes and shared payloads, in order.
pub struct ChunkedBuf {
    done: Vec<Bytes>,
    done_len: usize,
    tail: BytesMut,
    /// The registered payloads by address and length: a `put_slice` of exactly one of them
    /// becomes a reference to it.
    shared: HashMap<(usize, usize), Bytes>,
    /// Stand-ins by address and length: a `put_slice` of one becomes its pieces.
    stand_ins: HashMap<(usize, usize), Vec<Bytes>>,
}

impl ChunkedBuf {
    /// A buffer that will keep each of `payloads` of at least [`SHARED_MIN_BYTES`] by reference.
    pub fn new<'a>(
        payloads: impl IntoIterator<Item = &'a Bytes>,
        stand_ins: StandIns,
        inline_capacity: usize,
    ) -> Self {
        // A stand-in is never a payload of its own: its bytes are not the records.
        let shared = payloads
            .into_iter()
            .filter(|b| b.len() >= SHARED_MIN_BYTES)
            .map(|b| ((b.as_ptr() as usize, b.len()), b.clone()))
            .filter(|(key, _)| !stand_ins.pieces.contains_key(key))
            .collect();
        ChunkedBuf {
            done: Vec::new(),
            done_len: 0,
            tail: BytesMut::with_capacity(inline_capacity),
            shared,
            stand_ins: stand_ins.pieces,
        }
    }

    /// The chunks, in order; an error if a stand-in was not replaced by its pieces.
    pub fn finish(mut self) -> Result<Vec<Bytes>> {
        anyhow::ensure!(
            self.stand_ins.is_empty(),
            "{} stand-ins were not written",
            self.stand_ins.len()
        );
        if !self.tail.is_empty() {
            self.done.push(self.tail.freeze());
        }
        Ok(self.done)
    }

    /// Ends the inline tail as a chunk, and adds `piece` after it as one.
    fn push_shared(&mut self, piece: Bytes) {
        if !self.tail.is_empty() {
            let inline = self.tail.split().freeze();
            self.done_len += inline.len();
            self.done.push(inline);
        }
        self.done_len += piece.len();
        self.done.push(piece);
    }

    /// Everything in the inline tail again, for the rare access behind a shared chunk.
    fn flatten(&mut self) {
        if self.done.is_empty() {
            return;
        }
        let mut all = BytesMut::with_capacity(self.done_len + self.tail.len());
        for c in self.done.drain(..) {
            all.extend_from_slice(&c);
        }
        all.extend_from_slice(&self.tail);
        self.tail = all;
        self.done_len = 0;
    }
}

// SAFETY: every method delegates to the inline tail (a `BytesMut`, itself a correct `BufMut`);
// `put_slice` either copies through it or records a reference without touching it.
unsafe impl BufMut for ChunkedBuf {
    fn remaining_mut(&self) -> usize {
        self.tail.remaining_mut()
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        // SAFETY: the caller initialised `cnt` bytes of `chunk_mut`, which is the tail's.
        unsafe { self.tail.advance_mut(cnt) }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        self.tail.chunk_mut()
    }

    fn put_slice(&mut self, src: &[u8]) {
        if src.len() >= SHARED_MIN_BYTES {
            let key = (src.as_ptr() as usize, src.len());
            if let Some(pieces) = self.stand_ins.remove(&key) {
                for piece in pieces {
                    if piece.len() >= SHARED_MIN_BYTES {
                        self.push_shared(piece);
                    } else {
                        self.tail.extend_from_slice(&piece);
                    }
                }
                return;
            }
            if let Some(b) = self.shared.get(&key) {
                self.push_shared(b.clone());
                return;
            }
        }
        self.tail.extend_from_slice(src);
    }
}

impl ByteBufMut for ChunkedBuf {
    fn offset(&self) -> usize {
        self.done_len + self.tail.len()
    }

    fn seek(&mut self, offset: usize) {
        if offset < self.done_len {
            self.flatten();
        }
        self.tail.resize(offset - self.done_len, 0);
    }

    fn range(&mut self, r: Range<usize>) -> &mut [u8] {
        if r.start < self.done_len {
            self.flatten();
        }
        let base = self.done_len;
        &mut self.tail[r.start - base..r.end - base]
    }
}

/// A size-prefixed frame (`header` at `header_version`, then `body` at `version`) in chunks: the
/// payloads of at least [`SHARED_MIN_BYTES`] among `payloads` are referenced, not copied.
pub fn encode_frame_chunks<'a, H: Encodable, M: Encodable>(
    header: &H,
    header_version: i16,
    body: &M,
    version: i16,
    payloads: impl IntoIterator<Item = &'a Bytes>,
    stand_ins: StandIns,
) -> Result<Vec<Bytes>> {
    let size = header.compute_size(header_version)? + body.compute_size(version)?;
    let mut buf = ChunkedBuf::new(payloads, stand_ins, 4 * 1024);
    buf.put_i32(i32::try_from(size)?);
    header.encode(&mut buf, header_version)?;
    body.encode(&mut buf, version)?;
    anyhow::ensure!(
        buf.offset() == size + 4,
        "v{version} encoded to {} bytes, sized {}",
        buf.offset(),
        size + 4
    );
    buf.finish()
}

/// [`super::encode_response`] into chunks: the payloads of at least [`SHARED_MIN_BYTES`] among
/// `payloads` are referenced, not copied, and `stand_ins` are replaced by their pieces.
pub fn encode_response_chunks<'a, M: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &M,
    payloads: impl IntoIterator<Item = &'a Bytes>,
    stand_ins: StandIns,
) -> Result<Vec<Bytes>> {
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    encode_frame_chunks(
        &header,
        key.response_header_version(version),
        body,
        version,
        payloads,
        stand_ins,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::FetchResponse;

    fn none() -> StandIns {
        StandIns::default()
    }

    fn response(payloads: &[Bytes]) -> FetchResponse {
        let mut r = FetchResponse::default();
        let mut t = FetchableTopicResponse::default();
        for (i, p) in payloads.iter().enumerate() {
            let mut pd = PartitionData::default();
            pd.partition_index = i as i32;
            pd.high_watermark = 1000 + i as i64;
            pd.records = Some(p.clone());
            t.partitions.push(pd);
        }
        r.responses.push(t);
        r
    }

    #[test]
    fn chunks_join_to_the_single_buffer_encoding_and_share_the_payloads() {
        let big: Vec<Bytes> = (0..3u8)
            .map(|i| Bytes::from(vec![i + 1; SHARED_MIN_BYTES + 100 * usize::from(i)]))
            .collect();
        let small = Bytes::from(vec![9u8; 300]);
        let payloads = vec![
            big[0].clone(),
            small.clone(),
            big[1].clone(),
            big[2].clone(),
        ];
        let r = response(&payloads);
        for version in [4, 11, 12, 16] {
            let whole = super::super::encode_response(ApiKey::Fetch, version, 77, &r).unwrap();
            let chunks =
                encode_response_chunks(ApiKey::Fetch, version, 77, &r, payloads.iter(), none())
                    .unwrap();
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(joined, whole.to_vec(), "v{version}");
            // The three large payloads are the very same memory, not copies.
            for b in &big {
                assert!(
                    chunks
                        .iter()
                        .any(|c| c.as_ptr() == b.as_ptr() && c.len() == b.len()),
                    "v{version}"
                );
            }
            assert!(!chunks.iter().any(|c| c.as_ptr() == small.as_ptr()));
        }
    }

    #[test]
    fn an_equal_slice_elsewhere_is_copied_not_mistaken_for_a_payload() {
        let payload = Bytes::from(vec![5u8; SHARED_MIN_BYTES]);
        let copy = Bytes::from(payload.to_vec());
        let r = response(std::slice::from_ref(&copy));
        let chunks =
            encode_response_chunks(ApiKey::Fetch, 12, 1, &r, std::iter::once(&payload), none())
                .unwrap();
        assert_eq!(chunks.len(), 1);
    }

    #[test]
    fn gaps_behind_a_shared_chunk_still_land_in_place() {
        let payload = Bytes::from(vec![7u8; SHARED_MIN_BYTES]);
        let mut buf = ChunkedBuf::new(std::iter::once(&payload), none(), 16);
        buf.put_u8(1);
        let gap = buf.put_gap(4);
        buf.put_slice(&payload);
        buf.put_u8(2);
        buf.gap_buf(gap).copy_from_slice(&[1, 2, 3, 4]);
        let joined: Vec<u8> = buf
            .finish()
            .unwrap()
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        assert_eq!(&joined[..5], &[1, 1, 2, 3, 4]);
        assert_eq!(joined.len(), 1 + 4 + SHARED_MIN_BYTES + 1);
        assert_eq!(joined[joined.len() - 1], 2);
    }

    fn joined(chunks: &[Bytes]) -> Vec<u8> {
        chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    #[test]
    fn records_in_pieces_are_written_as_their_pieces_in_place_of_their_stand_in() {
        let big = |fill: u8, extra: usize| Bytes::from(vec![fill; SHARED_MIN_BYTES + extra]);
        let small = |fill: u8| Bytes::from(vec![fill; 100]);
        // Partition 0: big, small, big; partition 1: one big piece; partition 2: small pieces
        // only (copied together); partition 3: big, big.
        let parts: Vec<Vec<Bytes>> = vec![
            vec![big(1, 0), small(2), big(3, 7)],
            vec![big(4, 1)],
            vec![small(5), small(6)],
            vec![big(7, 3), big(8, 5)],
        ];
        let mut stand_ins = StandIns::default();
        let records: Vec<Bytes> = parts
            .iter()
            .map(|pieces| {
                let mut batches = Batches::default();
                for p in pieces {
                    batches.push(p.clone());
                }
                stand_ins.records(batches)
            })
            .collect();
        let r = response(&records);
        // The same response with every partition's pieces copied together.
        let flat: Vec<Bytes> = parts
            .iter()
            .map(|pieces| Bytes::from(pieces.concat()))
            .collect();
        let whole = super::super::encode_response(ApiKey::Fetch, 12, 5, &response(&flat)).unwrap();
        let chunks =
            encode_response_chunks(ApiKey::Fetch, 12, 5, &r, records.iter(), stand_ins).unwrap();
        assert_eq!(joined(&chunks), whole.to_vec());
        // Every big piece went out as itself, not copied.
        for piece in parts
            .iter()
            .flatten()
            .filter(|p| p.len() >= SHARED_MIN_BYTES)
        {
            assert!(chunks
                .iter()
                .any(|c| c.as_ptr() == piece.as_ptr() && c.len() == piece.len()));
        }
    }

    #[test]
    fn a_stand_in_the_encoder_never_wrote_fails_the_response() {
        let mut stand_ins = StandIns::default();
        let mut batches = Batches::default();
        batches.push(Bytes::from(vec![1u8; SHARED_MIN_BYTES]));
        batches.push(Bytes::from(vec![2u8; SHARED_MIN_BYTES]));
        let stand_in = stand_ins.records(batches);
        assert_eq!(stand_in.len(), 2 * SHARED_MIN_BYTES);
        // A response that does not hold the stand-in (as if it had been copied elsewhere).
        let r = response(&[Bytes::from(stand_in.to_vec())]);
        let written = encode_response_chunks(ApiKey::Fetch, 12, 5, &r, [], stand_ins);
        assert!(written.is_err());
    }
}
