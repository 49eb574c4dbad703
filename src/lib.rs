//! strom: an event streaming broker that speaks the Apache Kafka wire protocol, thread-per-core.
//!
//! Module map (see the README and DESIGN for the picture):
//! - [`config`]: Kafka-named settings, defaults, validation, core mapping
//! - [`model`]: newtypes for ids and offsets, Kafka error codes
//! - [`protocol`]: framing, headers, supported API versions
//! - [`server`]: listeners, connections, in-order responses
//! - [`handlers`]: one file per Kafka API
//! - [`shard`]: executors, shard table, mesh routing, the single-node controller
//! - [`storage`]: the partition log: segments, indexes, recovery
//! - [`cluster`]: topic table and cluster metadata
//! - [`replication`]: a partition replica: its Raft group (raft-rs), offsets and commit point
//! - [`group`]: consumer-group coordinator, committed offsets
//! - [`txn`]: transaction coordinator (`__transaction_state`), markers
//! - [`metrics`]: per-shard histograms and counters, the admin HTTP port
//! - [`tune`]: `strom tune`, machine readiness checks
//! - [`client`]: the small Kafka client behind `strom group ...`

#![forbid(unsafe_op_in_unsafe_fn)]

pub mod alloc;
pub mod client;
pub mod cluster;
pub mod config;
pub mod group;
pub mod handlers;
pub mod metrics;
pub mod model;
pub mod protocol;
pub mod replication;
pub mod server;
pub mod shard;
pub mod storage;
pub mod tune;
pub mod txn;
