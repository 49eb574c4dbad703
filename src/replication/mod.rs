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
//!   records. In the simulator they take no offset. Once stored in the partition log they become
//!   one-offset control batches (see below). Raft indexes and Kafka offsets are different numbers
//!   either way: a batch of n records is one entry.
//! - The high watermark is the end offset of the last committed batch: the Raft commit point.
//!   Consumers read below it only. `acks=all` is answered once the batch's entry is committed,
//!   i.e. durable on a majority.
//! - A new leader's term is the epoch of every batch it proposes (`FENCED_LEADER_EPOCH` /
//!   `OffsetsForLeaderEpoch` build on this).

//! # Where the Raft log lives
//! Today: each replica has its own Raft log, `raft.wal` in the partition directory ([`wal`]).
//! Entries are replayed into memory at start, because raft-rs reads its log synchronously. Once a
//! batch commits it is appended to the segments ([`crate::storage::PartitionLog`]), which
//! therefore hold committed batches only. The WAL drops entries the segments hold durably, and a
//! leader keeps what a follower still lacks. This costs a second write of every batch, and the
//! WAL fdatasync runs on the shard's thread. Both are accepted for the first end-to-end path and
//! are the next step:
//! - The target is that the segment files are the Raft log, with no second copy.
//!   - Every Raft entry is one batch in the log, in index order. A data entry is the Kafka batch
//!     as proposed.
//!   - An entry that is not records becomes a Kafka control batch of one record, of the kinds
//!     KRaft already defines: a new leader's empty entry as `LEADER_CHANGE` (control type 2),
//!     membership as `KRAFT_VOTERS` (6). Clients already skip control batches, so offsets stay
//!     dense.
//!   - The Raft index of a batch is its ordinal in the log, found through a sparse `.raftindex`.
//!     The term of an entry is the batch's `partitionLeaderEpoch`.
//!   - A follower's conflicting suffix is truncated at a batch boundary.
//!   - A snapshot (a follower behind retention) moves the log start.
//! - Writes go through io_uring, with the shard's groups sharing one sync per round (issue 11).
//!
//! The metadata group (the controller) uses the same replica in its raw mode: its entries are
//! rkyv commands, not batches ([`crate::cluster::metadata`]).

pub mod group;
pub mod replica;
#[cfg(test)]
mod sim;
pub mod transport;
pub mod wal;

pub use replica::{Applied, ProposeError, Replica, ReplicaStore};
