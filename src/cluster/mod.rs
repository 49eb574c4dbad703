//! Cluster metadata. On a single node the controller role lives on shard 0: it alone changes the
//! topic table, persists it (rkyv, validated on load) and hands every shard an immutable snapshot.
//! In a cluster the table is the state of the metadata Raft group instead ([`metadata`]): every
//! broker applies the same committed commands, and the group's leader is the controller.

pub mod metadata;
pub mod topics;

pub use topics::{Topic, TopicTable};

/// The internal topics: `__consumer_offsets` and `__transaction_state` (Metadata marks them
/// `is_internal`, and their partition counts are fixed: ids are placed by a hash modulo them).
pub fn is_internal(topic: &str) -> bool {
    topic == crate::group::OFFSETS_TOPIC || topic == crate::txn::TRANSACTION_TOPIC
}
