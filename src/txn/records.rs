//! What the transaction coordinator writes to `__transaction_state`: one record per transactional
//! id, its key and value strom's own rkyv structures (validated when read back). The key is stable
//! bytes for an id, so the compacted topic keeps the latest state of each.

use anyhow::{Context, Result};
use bytes::Bytes;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TxnKey {
    pub transactional_id: String,
}

/// Kafka's transaction states.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnStatus {
    Empty,
    Ongoing,
    PrepareCommit,
    PrepareAbort,
    CompleteCommit,
    CompleteAbort,
}

impl TxnStatus {
    /// The name Kafka's admin APIs use.
    pub fn name(self) -> &'static str {
        match self {
            TxnStatus::Empty => "Empty",
            TxnStatus::Ongoing => "Ongoing",
            TxnStatus::PrepareCommit => "PrepareCommit",
            TxnStatus::PrepareAbort => "PrepareAbort",
            TxnStatus::CompleteCommit => "CompleteCommit",
            TxnStatus::CompleteAbort => "CompleteAbort",
        }
    }

    pub fn preparing(self) -> bool {
        matches!(self, TxnStatus::PrepareCommit | TxnStatus::PrepareAbort)
    }
}

/// The state of one transactional id.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct TxnValue {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub timeout_ms: i32,
    pub status: TxnStatus,
    /// The partitions of the open (or ending) transaction.
    pub partitions: Vec<(String, i32)>,
    /// When the open transaction began (its first AddPartitionsToTxn), or -1.
    pub start_ms: i64,
    pub update_ms: i64,
}

fn aligned(bytes: &[u8]) -> rkyv::util::AlignedVec<16> {
    let mut a = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    a.extend_from_slice(bytes);
    a
}

/// The key and value of the record for `transactional_id` (no value: a tombstone).
pub fn record(transactional_id: &str, value: Option<&TxnValue>) -> Result<(Bytes, Option<Bytes>)> {
    let key = TxnKey {
        transactional_id: transactional_id.to_string(),
    };
    let key = rkyv::to_bytes::<rkyv::rancor::Error>(&key).context("encoding a transaction key")?;
    let value = match value {
        Some(v) => Some(Bytes::from(
            rkyv::to_bytes::<rkyv::rancor::Error>(v)
                .context("encoding a transaction state")?
                .to_vec(),
        )),
        None => None,
    };
    Ok((Bytes::from(key.to_vec()), value))
}

/// Decodes every record of the batches in `bytes`: (transactional id, state or tombstone).
pub fn decode_batches(bytes: Bytes) -> Result<Vec<(String, Option<TxnValue>)>> {
    let mut out = Vec::new();
    for set in crate::storage::records::decode_record_sets(bytes)
        .context("decoding transaction batches")?
    {
        for record in set.records {
            if record.control {
                continue;
            }
            let Some(key) = record.key else { continue };
            let key = rkyv::from_bytes::<TxnKey, rkyv::rancor::Error>(&aligned(&key))
                .context("decoding a transaction key")?;
            let value = match record.value {
                Some(v) => Some(
                    rkyv::from_bytes::<TxnValue, rkyv::rancor::Error>(&aligned(&v))
                        .context("decoding a transaction state")?,
                ),
                None => None,
            };
            out.push((key.transactional_id, value));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_a_batch() {
        let v = TxnValue {
            producer_id: 4,
            producer_epoch: 2,
            timeout_ms: 60_000,
            status: TxnStatus::Ongoing,
            partitions: vec![("t".into(), 1)],
            start_ms: 10,
            update_ms: 11,
        };
        let batch = crate::group::records::encode_batch(
            vec![record("a", Some(&v)).unwrap(), record("b", None).unwrap()],
            1,
            None,
        )
        .unwrap();
        let back = decode_batches(batch).unwrap();
        assert_eq!(
            back,
            vec![("a".to_string(), Some(v)), ("b".to_string(), None)]
        );
        assert!(decode_batches(Bytes::from_static(b"garbage")).is_err());
    }
}
