//! What a read returns: whole record batches in offset order, held as the pieces they already are
//! in memory (one cached batch each, or one buffer read from a segment), not copied together.
//!
//! A consumer's Fetch of 1 MiB per partition from the cache used to concatenate up to a few
//! dozen cached batches into a fresh buffer per partition: at 1 GB/s that copy, and the page
//! faults of the fresh buffers, took most of the broker's CPU and put about 5 ms into each 16 MiB
//! Fetch. The Fetch response now writes the pieces as they are (see `protocol::chunked`); any
//! other reader that wants one contiguous buffer asks for it ([`Batches::into_bytes`]) and pays
//! the copy only when there is more than one piece.

use bytes::{Bytes, BytesMut};

use super::batch::{self, BatchHeader};
use crate::model::Offset;

/// Whole batches in order, in pieces (no piece is empty; each holds whole batches).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batches {
    first: Bytes,
    rest: Vec<Bytes>,
}

impl Batches {
    /// The batches of one buffer.
    pub fn one(bytes: Bytes) -> Self {
        Batches {
            first: bytes,
            rest: Vec::new(),
        }
    }

    /// Adds the batches of `bytes` after the others.
    pub fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.first.is_empty() {
            self.first = bytes;
        } else {
            self.rest.push(bytes);
        }
    }

    /// The length of all pieces together.
    pub fn len(&self) -> usize {
        self.first.len() + self.rest.iter().map(Bytes::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// The pieces in order (none empty).
    pub fn pieces(&self) -> impl Iterator<Item = &Bytes> {
        std::iter::once(&self.first)
            .filter(|b| !b.is_empty())
            .chain(&self.rest)
    }

    /// How many pieces there are.
    pub fn piece_count(&self) -> usize {
        usize::from(!self.first.is_empty()) + self.rest.len()
    }

    /// The batches as one buffer: the piece itself when there is one, else a copy of them all.
    pub fn into_bytes(self) -> Bytes {
        if self.rest.is_empty() {
            return self.first;
        }
        let mut out = BytesMut::with_capacity(self.len());
        for piece in self.pieces() {
            out.extend_from_slice(piece);
        }
        out.freeze()
    }

    /// Keeps the first `len` bytes (a batch boundary: see [`Batches::whole_batches_within`] and
    /// [`Batches::batches_below`]).
    pub fn truncate(&mut self, len: usize) {
        let mut left = len;
        let mut kept = 0usize;
        for piece in std::iter::once(&mut self.first).chain(self.rest.iter_mut()) {
            if left == 0 {
                break;
            }
            if piece.len() > left {
                piece.truncate(left);
            }
            left -= piece.len();
            kept += 1;
        }
        if kept == 0 {
            self.first = Bytes::new();
        }
        self.rest.truncate(kept.saturating_sub(1));
    }

    /// The length of the run of whole batches at the start that fits in `limit_bytes`, but at
    /// least the first batch (KIP-74: a consumer always progresses).
    pub fn whole_batches_within(&self, limit_bytes: usize) -> usize {
        let mut end = 0usize;
        for piece in self.pieces() {
            if end + piece.len() <= limit_bytes {
                end += piece.len();
                continue;
            }
            // The piece crosses the limit: its batches that fit (the first one at least, when
            // nothing is kept yet).
            let room = limit_bytes.saturating_sub(end);
            let first_fits =
                end == 0 || BatchHeader::parse(piece).is_ok_and(|h| h.size_bytes <= room);
            let within = if first_fits {
                batch::whole_batches_within(piece, room)
            } else {
                0
            };
            return end + within;
        }
        end
    }

    /// The length of the run of whole batches at the start that begin below `limit`.
    pub fn batches_below(&self, limit: Offset) -> usize {
        let mut end = 0usize;
        for piece in self.pieces() {
            let below = batch::batches_below(piece, limit);
            end += below;
            if below < piece.len() {
                break;
            }
        }
        end
    }

    /// The offset after the last batch, if the pieces parse as batches.
    pub fn end_offset(&self) -> Option<Offset> {
        batch::end_offset(self.rest.last().unwrap_or(&self.first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::batch::tests::make_batch;

    fn batches(runs: &[(i64, i32)]) -> Vec<Bytes> {
        runs.iter()
            .map(|&(base, count)| make_batch(base, count, 1_000).freeze())
            .collect()
    }

    #[test]
    fn pieces_join_to_the_batches_and_cut_on_batch_boundaries() {
        let bs = batches(&[(0, 10), (10, 20), (30, 30)]);
        let mut joined = Batches::default();
        assert!(joined.is_empty());
        joined.push(Bytes::new());
        joined.push(bs[0].clone());
        joined.push(bs[1].clone());
        joined.push(bs[2].clone());
        assert_eq!(joined.piece_count(), 3);
        let whole: Vec<u8> = bs.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(joined.len(), whole.len());
        assert_eq!(joined.clone().into_bytes(), Bytes::from(whole.clone()));
        assert_eq!(joined.end_offset(), Some(Offset(60)));

        // Within a limit: whole batches, at least the first; the same answer as on one buffer.
        let one = Batches::one(Bytes::from(whole.clone()));
        for limit in [
            0,
            1,
            bs[0].len(),
            bs[0].len() + 1,
            bs[0].len() + bs[1].len(),
            10_000,
        ] {
            let keep = joined.whole_batches_within(limit);
            assert_eq!(keep, one.whole_batches_within(limit), "limit {limit}");
            let mut cut = joined.clone();
            cut.truncate(keep);
            assert_eq!(cut.len(), keep);
            assert_eq!(cut.into_bytes(), Bytes::from(whole[..keep].to_vec()));
        }
        assert_eq!(joined.batches_below(Offset(30)), bs[0].len() + bs[1].len());
        assert_eq!(joined.batches_below(Offset(0)), 0);
        let mut none = joined.clone();
        none.truncate(0);
        assert!(none.is_empty());
        assert_eq!(none.piece_count(), 0);
    }
}
