//! A partition's transactions (KIP-98), as its written batches show them: which producers have a
//! transaction open here and where it began, the last stable offset (LSO) that `read_committed`
//! consumers may read up to, and the aborted transactions a `read_committed` fetch lists so that
//! the client drops their records.
//!
//! The state follows the batches the flusher writes, not those merely accepted: the LSO never
//! passes the high watermark, and a state saved at a segment roll is exactly the state at the new
//! segment's base offset. Recovery loads the newest saved state at or below the log end
//! (`<offset>.txnstate`, written at every roll and at a clean shutdown) and replays the batch
//! headers after it, so a crash costs at most a scan of the active segment.
//!
//! Control batches (COMMIT and ABORT markers) are written by the transaction coordinator only:
//! each is one uncompressed record whose key is `[version i16 = 0][type i16]` (0 abort, 1 commit)
//! and whose value is `[version i16 = 0][coordinator epoch i32]`.

use std::collections::{BTreeMap, VecDeque};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use super::batch::{BatchHeader, HEADER_SIZE_BYTES};
use crate::model::Offset;

/// The suffix of a saved transaction state; the file stem is the offset it is valid at.
pub const STATE_SUFFIX: &str = ".txnstate";
pub const STATE_VERSION: u32 = 1;

/// What a marker ends a transaction with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Abort,
    Commit,
}

/// A transaction that was aborted: `read_committed` consumers skip the producer's records from
/// `first_offset` up to the marker at `last_offset`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortedTxn {
    pub producer_id: i64,
    pub first_offset: i64,
    pub last_offset: i64,
}

/// The saved form of [`TxnState`], valid for a log that ends at `offset`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct SavedTxnState {
    pub offset: i64,
    /// Producer id and the first offset of its open transaction.
    pub ongoing: Vec<(i64, i64)>,
    pub aborted: Vec<AbortedTxn>,
}

/// The transactions of one partition.
#[derive(Default, Debug, Clone)]
pub struct TxnState {
    /// Open transactions: producer id → first offset.
    ongoing: BTreeMap<i64, Offset>,
    /// Aborted transactions in marker order (so by `last_offset`).
    aborted: VecDeque<AbortedTxn>,
}

impl TxnState {
    /// Takes account of a batch the log now holds (`bytes` is the whole batch).
    pub fn observe(&mut self, h: &BatchHeader, bytes: &[u8]) {
        if h.producer_id < 0 || !h.is_transactional() {
            return;
        }
        if !h.is_control() {
            self.ongoing.entry(h.producer_id).or_insert(h.base_offset);
            return;
        }
        let first = self.ongoing.remove(&h.producer_id);
        if control_outcome(bytes, h) == Some(Outcome::Abort) {
            // An abort with nothing written here (the partition was added, then nothing sent)
            // hides nothing.
            if let Some(first) = first {
                self.aborted.push_back(AbortedTxn {
                    producer_id: h.producer_id,
                    first_offset: first.0,
                    last_offset: h.base_offset.0,
                });
            }
        }
    }

    /// The last stable offset: below the first open transaction, and never past `high_watermark`.
    pub fn last_stable_offset(&self, high_watermark: Offset) -> Offset {
        self.ongoing
            .values()
            .copied()
            .min()
            .map_or(high_watermark, |first| first.min(high_watermark))
    }

    /// The aborted transactions whose records may lie in `[from, upto)`.
    pub fn aborted_between(&self, from: Offset, upto: Offset) -> Vec<AbortedTxn> {
        let start = self.aborted.partition_point(|a| a.last_offset < from.0);
        self.aborted
            .range(start..)
            .filter(|a| a.first_offset < upto.0)
            .copied()
            .collect()
    }

    /// Where the producer's open transaction here began, if it has one.
    pub fn open_since(&self, producer_id: i64) -> Option<Offset> {
        self.ongoing.get(&producer_id).copied()
    }

    /// Whether any aborted transaction is still in the log.
    pub fn has_aborted(&self) -> bool {
        !self.aborted.is_empty()
    }

    /// Forgets aborted transactions wholly below the log start (their segments are gone).
    pub fn forget_below(&mut self, log_start: Offset) {
        while self
            .aborted
            .front()
            .is_some_and(|a| a.last_offset < log_start.0)
        {
            self.aborted.pop_front();
        }
    }

    /// Forgets everything (the log was emptied and restarts at a new offset).
    pub fn clear(&mut self) {
        self.ongoing.clear();
        self.aborted.clear();
    }

    pub fn save(&self, offset: Offset) -> SavedTxnState {
        SavedTxnState {
            offset: offset.0,
            ongoing: self.ongoing.iter().map(|(p, o)| (*p, o.0)).collect(),
            aborted: self.aborted.iter().copied().collect(),
        }
    }

    pub fn restore(saved: &SavedTxnState) -> TxnState {
        let mut aborted: Vec<AbortedTxn> = saved.aborted.clone();
        aborted.sort_by_key(|a| a.last_offset);
        TxnState {
            ongoing: saved
                .ongoing
                .iter()
                .map(|(p, o)| (*p, Offset(*o)))
                .collect(),
            aborted: aborted.into(),
        }
    }
}

pub fn encode_saved(saved: &SavedTxnState) -> Result<Vec<u8>> {
    Ok(rkyv::to_bytes::<rkyv::rancor::Error>(saved)
        .context("encoding a transaction state")?
        .to_vec())
}

/// Decodes a saved transaction state's payload; arbitrary bytes are an error.
pub fn decode_saved(payload: &[u8]) -> Result<SavedTxnState> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    Ok(rkyv::from_bytes::<SavedTxnState, rkyv::rancor::Error>(
        &aligned,
    )?)
}

/// The file name of the state saved at `offset`.
pub fn state_file_name(offset: Offset) -> String {
    format!("{:020}{STATE_SUFFIX}", offset.0)
}

/// The outcome a control batch records, or `None` for one that is not a transaction marker
/// (or cannot be read: such a batch is never written by strom).
pub fn control_outcome(batch: &[u8], h: &BatchHeader) -> Option<Outcome> {
    if !h.is_control() || h.compression() != 0 {
        return None;
    }
    let section = batch.get(HEADER_SIZE_BYTES..h.size_bytes.min(batch.len()))?;
    let record = super::compaction::walk_records(section).ok()?;
    let (a, b) = record.first()?.key?;
    let key = section.get(a..b)?;
    if key.len() < 4 {
        return None;
    }
    match i16::from_be_bytes([key[2], key[3]]) {
        0 => Some(Outcome::Abort),
        1 => Some(Outcome::Commit),
        _ => None,
    }
}

/// A COMMIT or ABORT marker batch for `producer_id` at `producer_epoch`, offsets to be assigned.
pub fn marker_batch(
    producer_id: i64,
    producer_epoch: i16,
    outcome: Outcome,
    coordinator_epoch: i32,
    timestamp_ms: i64,
) -> Result<Bytes> {
    let kind: i16 = match outcome {
        Outcome::Abort => 0,
        Outcome::Commit => 1,
    };
    let mut key = BytesMut::with_capacity(4);
    key.extend_from_slice(&0i16.to_be_bytes());
    key.extend_from_slice(&kind.to_be_bytes());
    let mut value = BytesMut::with_capacity(6);
    value.extend_from_slice(&0i16.to_be_bytes());
    value.extend_from_slice(&coordinator_epoch.to_be_bytes());
    let record = Record {
        transactional: true,
        control: true,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id,
        producer_epoch,
        timestamp_type: TimestampType::Creation,
        offset: 0,
        sequence: -1,
        timestamp: timestamp_ms,
        key: Some(key.freeze()),
        value: Some(value.freeze()),
        headers: Default::default(),
    };
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, std::slice::from_ref(&record), &options)
        .context("encoding a transaction marker")?;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_of(bytes: &[u8], base: i64) -> (BatchHeader, BytesMut) {
        let mut b = BytesMut::from(bytes);
        super::super::batch::assign(&mut b, Offset(base), 0);
        (BatchHeader::parse(&b).unwrap(), b)
    }

    #[test]
    fn markers_round_trip_and_move_the_lso() {
        let commit = marker_batch(7, 2, Outcome::Commit, 0, 1).unwrap();
        let abort = marker_batch(8, 0, Outcome::Abort, 0, 1).unwrap();
        let (h, b) = header_of(&commit, 10);
        assert!(h.is_control() && h.is_transactional());
        assert_eq!(h.producer_id, 7);
        assert_eq!(h.producer_epoch, 2);
        assert_eq!(control_outcome(&b, &h), Some(Outcome::Commit));
        let (ha, ba) = header_of(&abort, 12);
        assert_eq!(control_outcome(&ba, &ha), Some(Outcome::Abort));

        let mut state = TxnState::default();
        // Producer 7 opens at 3, producer 8 at 5; the LSO stays at 3 until 7 commits at 10.
        let data = |pid: i64, base: i64| {
            let mut h = h;
            h.attributes &= !0x20;
            h.producer_id = pid;
            h.base_offset = Offset(base);
            h
        };
        state.observe(&data(7, 3), &[]);
        state.observe(&data(8, 5), &[]);
        state.observe(&data(7, 6), &[]);
        assert_eq!(state.last_stable_offset(Offset(9)), Offset(3));
        state.observe(&h, &b);
        assert_eq!(state.last_stable_offset(Offset(11)), Offset(5));
        state.observe(&ha, &ba);
        assert_eq!(state.last_stable_offset(Offset(13)), Offset(13));
        let aborted = state.aborted_between(Offset(0), Offset(13));
        assert_eq!(
            aborted,
            vec![AbortedTxn {
                producer_id: 8,
                first_offset: 5,
                last_offset: 12
            }]
        );
        assert!(state.aborted_between(Offset(13), Offset(20)).is_empty());
        assert!(state.aborted_between(Offset(0), Offset(5)).is_empty());

        let saved = decode_saved(&encode_saved(&state.save(Offset(13))).unwrap()).unwrap();
        let back = TxnState::restore(&saved);
        assert_eq!(back.aborted_between(Offset(0), Offset(13)), aborted);
        assert!(decode_saved(b"not a state").is_err());
    }
}
