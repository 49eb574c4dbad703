//! The partition log: segments of Kafka record batches stored byte-for-byte with sparse offset and
//! time indexes, written with O_DIRECT through glommio (io_uring), recovered by CRC on start.

pub mod batch;
pub mod codec;
pub mod compaction;
pub mod files;
pub mod open_files;
pub mod partition;
pub mod records;
pub mod segment;

pub use partition::{Appended, PartitionLog, ReadResult};
