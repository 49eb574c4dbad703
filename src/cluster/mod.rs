//! Cluster metadata. On a single node the controller role lives on shard 0: it alone changes the
//! topic table, persists it (rkyv, validated on load) and hands every shard an immutable snapshot.
//! Replication and the Raft controller group will take this role over; the table is already the
//! shape a Raft state machine would apply.

pub mod topics;

pub use topics::{Topic, TopicTable};
