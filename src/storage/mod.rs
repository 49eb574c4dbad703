//! The partition log: segments of Kafka record batches stored byte-for-byte with sparse offset and
//! time indexes, written with O_DIRECT through glommio (io_uring), recovered by CRC on start.

// Reads bytes from the wire or the disk: no unwrap, expect or truncating cast on such a value (a
// bad value is an error, never a panic). Unit tests may unwrap what they built themselves.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::cast_possible_truncation
    )
)]

pub mod batch;
pub mod codec;
pub mod compaction;
pub mod files;
pub mod journal;
pub mod open_files;
pub mod partition;
pub mod read;
pub mod records;
pub mod segment;
pub mod trash;
pub mod txn;

pub use partition::{
    ActiveProducer, AppendError, Appended, Origin, PartitionFacts, PartitionLog, ReadResult,
};
pub use read::Batches;
