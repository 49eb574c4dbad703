//! Transactions (KIP-98, KIP-447): a coordinator per transactional id on the shard that owns the
//! id's partition of the internal compacted topic `__transaction_state` (the same hash Kafka uses
//! for it, modulo `transaction.state.log.num.partitions`); in a cluster, on the leader of that
//! partition. Each transaction's state is a record in that partition, written durably before a
//! request is answered and replayed when the partition opens (or its leadership moves here), so a
//! transaction survives a crash of its coordinator in whatever phase it was.
//!
//! The coordinator ends a transaction in two steps, as Kafka does: the decision (PrepareCommit or
//! PrepareAbort) is written first; then a COMMIT or ABORT marker goes to every partition of the
//! transaction (through the partition's owner shard, or its leader broker's WriteTxnMarkers), and
//! the transaction becomes CompleteCommit or CompleteAbort. A coordinator that finds a Prepare
//! state on load finishes the markers. What the markers mean to readers is in
//! [`crate::storage::txn`].

pub mod coordinator;
pub mod records;

pub use coordinator::{TxnCall, TxnCoordinator, TxnReply, TxnView};

/// The internal topic of transaction states.
pub const TRANSACTION_TOPIC: &str = "__transaction_state";

/// The `__transaction_state` partition of a transactional id (Kafka's `partitionFor`: Java's
/// `String.hashCode`, made non-negative, modulo the partition count).
pub fn partition_for_txn(transactional_id: &str, partitions: i32) -> i32 {
    crate::group::partition_for_group(transactional_id, partitions)
}
