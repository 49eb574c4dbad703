//! Consumer groups: a coordinator per group on the shard that owns the group's partition of the
//! internal compacted topic `__consumer_offsets` (Java `String.hashCode` of the group id, made
//! non-negative, modulo `offsets.topic.num.partitions`, as Kafka computes it). Group metadata and
//! committed offsets are records in that partition, written with `acks=all` durability before a
//! request is answered, and replayed when the partition opens, so they survive restarts.
//!
//! The broker side of Kafka's classic rebalance protocol: join phase (with
//! `group.initial.rebalance.delay.ms` for new groups and each member's rebalance timeout),
//! leader-computed assignments carried through SyncGroup unchanged (so `range`, `roundrobin` and
//! `cooperative-sticky` all work), generation ids, heartbeats with session-timeout eviction,
//! static membership (`group.instance.id`) and KIP-394 member ids.
//!
//! Next to it, KIP-848's consumer protocol (`consumer`): broker-side assignment reached member by
//! member through ConsumerGroupHeartbeat, with no group-wide barrier. A group id is either kind;
//! an empty classic group becomes a consumer group when a consumer-protocol member joins it.

pub mod consumer;
mod consumer_calls;
pub mod coordinator;
pub mod records;
pub mod share;
mod share_admin;
mod share_calls;
mod share_remote;

pub use coordinator::{
    partition_for_group, ClientInfo, GroupCall, GroupCoordinator, GroupReply, OFFSETS_TOPIC,
};
