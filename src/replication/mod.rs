//! Partition replication: one Raft group (TiKV's raft-rs) per partition over its replicas. This
//! module is the replica layer that sits between the Kafka handlers and a partition's stored log;
//! it owns the Raft node, the commit point, and the mapping between Raft entries and Kafka
//! offsets. raft-rs is passive: the owning shard drives it (ticks, messages in, `Ready` out), so
//! the same code runs under glommio in the broker and under the seeded simulator in the tests
//! (`sim`), where clock, network and storage are the simulator's.
//!
//! # Raft entries and Kafka offsets
//! - A normal Raft entry with data carries exactly one Kafka record batch, byte for byte, with its
//!   offsets already assigned (base offset in the header) and `partitionLeaderEpoch` set to the
//!   Raft term it was proposed in. The leader assigns offsets when it proposes: the next offset
//!   is the end of the last batch in its own log (committed or not), so offsets are dense along
//!   every log, and Raft's log matching makes the committed sequence dense.
//! - Entries without data (the no-op a new leader appends) and configuration changes are not
//!   records and take no offset. Raft indexes and Kafka offsets are therefore different numbers;
//!   the replica keeps the correspondence of committed entries (`committed_end` per index).
//! - The high watermark is the end offset of the last committed batch: the Raft commit point.
//!   Consumers read below it only. `acks=all` is answered once the batch's entry is committed,
//!   i.e. durable on a majority.
//! - A new leader's term is the epoch of every batch it proposes (`FENCED_LEADER_EPOCH` /
//!   `OffsetsForLeaderEpoch` build on this).

pub mod replica;
#[cfg(test)]
mod sim;

pub use replica::{Applied, ProposeError, Replica, ReplicaStore};
