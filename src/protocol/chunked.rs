//! Response encoding that does not copy large payloads. A fetch response is mostly record batches
//! the broker already holds as `Bytes` (read from a segment or the log's cache); encoding it into
//! one buffer copied every fetched byte once more before the socket write. [`ChunkedBuf`] is the
//! buffer kafka-protocol encodes into: the payloads registered with it are kept as references
//! (their length prefix is written inline, their bytes are not copied), everything else goes into
//! small inline chunks between them, and the connection writes the chunks in order.

use std::collections::HashMap;
use std::ops::Range;

use anyhow::Result;
use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, ResponseHeader};
use kafka_protocol::protocol::buf::ByteBufMut;
use kafka_protocol::protocol::Encodable;

/// Payloads smaller than this are copied inline: a separate chunk costs a write of its own.
pub const SHARED_MIN_BYTES: usize = 32 * 1024;

/// A buffer of inline bytes and shared payloads, in order.
pub struct ChunkedBuf {
    done: Vec<Bytes>,
    done_len: usize,
    tail: BytesMut,
    /// The registered payloads by address and length: a `put_slice` of exactly one of them
    /// becomes a reference to it.
    shared: HashMap<(usize, usize), Bytes>,
}

impl ChunkedBuf {
    /// A buffer that will keep each of `payloads` of at least [`SHARED_MIN_BYTES`] by reference.
    pub fn new<'a>(payloads: impl IntoIterator<Item = &'a Bytes>, inline_capacity: usize) -> Self {
        let shared = payloads
            .into_iter()
            .filter(|b| b.len() >= SHARED_MIN_BYTES)
            .map(|b| ((b.as_ptr() as usize, b.len()), b.clone()))
            .collect();
        ChunkedBuf {
            done: Vec::new(),
            done_len: 0,
            tail: BytesMut::with_capacity(inline_capacity),
            shared,
        }
    }

    /// The chunks, in order.
    pub fn finish(mut self) -> Vec<Bytes> {
        if !self.tail.is_empty() {
            self.done.push(self.tail.freeze());
        }
        self.done
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
            if let Some(b) = self.shared.get(&(src.as_ptr() as usize, src.len())) {
                if !self.tail.is_empty() {
                    let inline = self.tail.split().freeze();
                    self.done_len += inline.len();
                    self.done.push(inline);
                }
                self.done_len += b.len();
                self.done.push(b.clone());
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
) -> Result<Vec<Bytes>> {
    let size = header.compute_size(header_version)? + body.compute_size(version)?;
    let mut buf = ChunkedBuf::new(payloads, 4 * 1024);
    buf.put_i32(i32::try_from(size)?);
    header.encode(&mut buf, header_version)?;
    body.encode(&mut buf, version)?;
    anyhow::ensure!(
        buf.offset() == size + 4,
        "v{version} encoded to {} bytes, sized {}",
        buf.offset(),
        size + 4
    );
    Ok(buf.finish())
}

/// [`super::encode_response`] into chunks: the payloads of at least [`SHARED_MIN_BYTES`] among
/// `payloads` are referenced, not copied.
pub fn encode_response_chunks<'a, M: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    body: &M,
    payloads: impl IntoIterator<Item = &'a Bytes>,
) -> Result<Vec<Bytes>> {
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    encode_frame_chunks(
        &header,
        key.response_header_version(version),
        body,
        version,
        payloads,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::FetchResponse;

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
                encode_response_chunks(ApiKey::Fetch, version, 77, &r, payloads.iter()).unwrap();
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
            encode_response_chunks(ApiKey::Fetch, 12, 1, &r, std::iter::once(&payload)).unwrap();
        assert_eq!(chunks.len(), 1);
    }

    #[test]
    fn gaps_behind_a_shared_chunk_still_land_in_place() {
        let payload = Bytes::from(vec![7u8; SHARED_MIN_BYTES]);
        let mut buf = ChunkedBuf::new(std::iter::once(&payload), 16);
        buf.put_u8(1);
        let gap = buf.put_gap(4);
        buf.put_slice(&payload);
        buf.put_u8(2);
        buf.gap_buf(gap).copy_from_slice(&[1, 2, 3, 4]);
        let joined: Vec<u8> = buf
            .finish()
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        assert_eq!(&joined[..5], &[1, 1, 2, 3, 4]);
        assert_eq!(joined.len(), 1 + 4 + SHARED_MIN_BYTES + 1);
        assert_eq!(joined[joined.len() - 1], 2);
    }
}
