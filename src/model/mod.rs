//! Newtypes for the identifiers and positions that flow through the broker, so that an offset cannot
//! be passed where a partition id is expected, plus the Kafka error codes strom answers with.

use std::fmt;
use std::sync::Arc;

/// A position in a partition's log. Offsets are assigned by the broker, dense within a batch and
/// monotonic within a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub i64);

impl Offset {
    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

impl fmt::Display for Offset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A partition index within a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub i32);

/// The index of a shard (one pinned executor) within this broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardId(pub usize);

/// A broker's `node.id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BrokerId(pub i32);

/// A partition leader epoch, stamped into every stored batch's `partitionLeaderEpoch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Epoch(pub i32);

/// A topic partition. The topic name is shared, so cloning is cheap.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TopicPartition {
    pub topic: Arc<str>,
    pub partition: PartitionId,
}

impl TopicPartition {
    pub fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: Arc::from(topic),
            partition: PartitionId(partition),
        }
    }

    /// The partition's directory name, as Kafka names it: `<topic>-<partition>`.
    pub fn dir_name(&self) -> String {
        format!("{}-{}", self.topic, self.partition.0)
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition.0)
    }
}

/// The hasher of maps keyed by [`TopicPartition`] that requests look up per partition: foldhash,
/// seeded at random per process, in place of SipHash (4% of a shard's CPU at 1,000 partitions,
/// where a Fetch looks up every partition of its session).
pub type PartitionHasher = foldhash::fast::RandomState;

/// A map keyed by partition, with [`PartitionHasher`].
pub type PartitionMap<V> = std::collections::HashMap<TopicPartition, V, PartitionHasher>;

/// A Kafka protocol error code (see Kafka's `Errors` enum); `NONE` is success.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub i16);

impl ErrorCode {
    pub const NONE: ErrorCode = ErrorCode(0);
    pub const UNKNOWN_SERVER_ERROR: ErrorCode = ErrorCode(-1);
    pub const OFFSET_OUT_OF_RANGE: ErrorCode = ErrorCode(1);
    pub const CORRUPT_MESSAGE: ErrorCode = ErrorCode(2);
    pub const UNKNOWN_TOPIC_OR_PARTITION: ErrorCode = ErrorCode(3);
    pub const INVALID_FETCH_SIZE: ErrorCode = ErrorCode(4);
    pub const LEADER_NOT_AVAILABLE: ErrorCode = ErrorCode(5);
    pub const NOT_LEADER_OR_FOLLOWER: ErrorCode = ErrorCode(6);
    pub const REQUEST_TIMED_OUT: ErrorCode = ErrorCode(7);
    pub const MESSAGE_TOO_LARGE: ErrorCode = ErrorCode(10);
    pub const INVALID_TOPIC_EXCEPTION: ErrorCode = ErrorCode(17);
    pub const RECORD_LIST_TOO_LARGE: ErrorCode = ErrorCode(18);
    pub const NOT_ENOUGH_REPLICAS: ErrorCode = ErrorCode(19);
    pub const INVALID_REQUIRED_ACKS: ErrorCode = ErrorCode(21);
    pub const UNSUPPORTED_VERSION: ErrorCode = ErrorCode(35);
    pub const TOPIC_ALREADY_EXISTS: ErrorCode = ErrorCode(36);
    pub const INVALID_PARTITIONS: ErrorCode = ErrorCode(37);
    pub const INVALID_REPLICATION_FACTOR: ErrorCode = ErrorCode(38);
    pub const INVALID_CONFIG: ErrorCode = ErrorCode(40);
    pub const INVALID_REQUEST: ErrorCode = ErrorCode(42);
    pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: ErrorCode = ErrorCode(43);
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: ErrorCode = ErrorCode(45);
    pub const INVALID_PRODUCER_EPOCH: ErrorCode = ErrorCode(47);
    pub const INVALID_TIMESTAMP: ErrorCode = ErrorCode(32);
    pub const KAFKA_STORAGE_ERROR: ErrorCode = ErrorCode(56);
    pub const INVALID_RECORD: ErrorCode = ErrorCode(87);
    pub const OFFSET_METADATA_TOO_LARGE: ErrorCode = ErrorCode(12);
    pub const COORDINATOR_LOAD_IN_PROGRESS: ErrorCode = ErrorCode(14);
    pub const COORDINATOR_NOT_AVAILABLE: ErrorCode = ErrorCode(15);
    pub const NOT_COORDINATOR: ErrorCode = ErrorCode(16);
    pub const NOT_CONTROLLER: ErrorCode = ErrorCode(41);
    pub const ILLEGAL_GENERATION: ErrorCode = ErrorCode(22);
    pub const INCONSISTENT_GROUP_PROTOCOL: ErrorCode = ErrorCode(23);
    pub const INVALID_GROUP_ID: ErrorCode = ErrorCode(24);
    pub const UNKNOWN_MEMBER_ID: ErrorCode = ErrorCode(25);
    pub const INVALID_SESSION_TIMEOUT: ErrorCode = ErrorCode(26);
    pub const REBALANCE_IN_PROGRESS: ErrorCode = ErrorCode(27);
    pub const NON_EMPTY_GROUP: ErrorCode = ErrorCode(68);
    pub const GROUP_ID_NOT_FOUND: ErrorCode = ErrorCode(69);
    pub const MEMBER_ID_REQUIRED: ErrorCode = ErrorCode(79);
    pub const FENCED_INSTANCE_ID: ErrorCode = ErrorCode(82);
    pub const GROUP_SUBSCRIBED_TO_TOPIC: ErrorCode = ErrorCode(86);
    pub const ELECTION_NOT_NEEDED: ErrorCode = ErrorCode(84);
    pub const INVALID_REPLICA_ASSIGNMENT: ErrorCode = ErrorCode(39);
    pub const NO_REASSIGNMENT_IN_PROGRESS: ErrorCode = ErrorCode(85);
    pub const PREFERRED_LEADER_NOT_AVAILABLE: ErrorCode = ErrorCode(80);
    pub const ELIGIBLE_LEADERS_NOT_AVAILABLE: ErrorCode = ErrorCode(83);
    pub const FETCH_SESSION_ID_NOT_FOUND: ErrorCode = ErrorCode(70);
    pub const INVALID_FETCH_SESSION_EPOCH: ErrorCode = ErrorCode(71);
    pub const FENCED_LEADER_EPOCH: ErrorCode = ErrorCode(74);
    pub const UNKNOWN_LEADER_EPOCH: ErrorCode = ErrorCode(75);
    pub const UNKNOWN_TOPIC_ID: ErrorCode = ErrorCode(100);
    pub const INCONSISTENT_TOPIC_ID: ErrorCode = ErrorCode(103);
    pub const UNSUPPORTED_ENDPOINT_TYPE: ErrorCode = ErrorCode(115);
    pub const POLICY_VIOLATION: ErrorCode = ErrorCode(44);
    pub const INVALID_TXN_STATE: ErrorCode = ErrorCode(48);
    pub const INVALID_PRODUCER_ID_MAPPING: ErrorCode = ErrorCode(49);
    pub const INVALID_TRANSACTION_TIMEOUT: ErrorCode = ErrorCode(50);
    pub const CONCURRENT_TRANSACTIONS: ErrorCode = ErrorCode(51);
    pub const OPERATION_NOT_ATTEMPTED: ErrorCode = ErrorCode(55);
    pub const UNSTABLE_OFFSET_COMMIT: ErrorCode = ErrorCode(88);
    pub const PRODUCER_FENCED: ErrorCode = ErrorCode(90);
    pub const TRANSACTIONAL_ID_NOT_FOUND: ErrorCode = ErrorCode(105);

    pub fn is_ok(self) -> bool {
        self == ErrorCode::NONE
    }

    /// Kafka's name for the error, for messages people read.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "NONE",
            -1 => "UNKNOWN_SERVER_ERROR",
            1 => "OFFSET_OUT_OF_RANGE",
            2 => "CORRUPT_MESSAGE",
            3 => "UNKNOWN_TOPIC_OR_PARTITION",
            5 => "LEADER_NOT_AVAILABLE",
            14 => "COORDINATOR_LOAD_IN_PROGRESS",
            6 => "NOT_LEADER_OR_FOLLOWER",
            41 => "NOT_CONTROLLER",
            7 => "REQUEST_TIMED_OUT",
            10 => "MESSAGE_TOO_LARGE",
            15 => "COORDINATOR_NOT_AVAILABLE",
            16 => "NOT_COORDINATOR",
            17 => "INVALID_TOPIC_EXCEPTION",
            19 => "NOT_ENOUGH_REPLICAS",
            22 => "ILLEGAL_GENERATION",
            25 => "UNKNOWN_MEMBER_ID",
            74 => "FENCED_LEADER_EPOCH",
            75 => "UNKNOWN_LEADER_EPOCH",
            84 => "ELECTION_NOT_NEEDED",
            39 => "INVALID_REPLICA_ASSIGNMENT",
            85 => "NO_REASSIGNMENT_IN_PROGRESS",
            80 => "PREFERRED_LEADER_NOT_AVAILABLE",
            83 => "ELIGIBLE_LEADERS_NOT_AVAILABLE",
            100 => "UNKNOWN_TOPIC_ID",
            27 => "REBALANCE_IN_PROGRESS",
            35 => "UNSUPPORTED_VERSION",
            36 => "TOPIC_ALREADY_EXISTS",
            37 => "INVALID_PARTITIONS",
            38 => "INVALID_REPLICATION_FACTOR",
            40 => "INVALID_CONFIG",
            42 => "INVALID_REQUEST",
            68 => "NON_EMPTY_GROUP",
            69 => "GROUP_ID_NOT_FOUND",
            87 => "INVALID_RECORD",
            44 => "POLICY_VIOLATION",
            47 => "INVALID_PRODUCER_EPOCH",
            48 => "INVALID_TXN_STATE",
            49 => "INVALID_PRODUCER_ID_MAPPING",
            50 => "INVALID_TRANSACTION_TIMEOUT",
            51 => "CONCURRENT_TRANSACTIONS",
            55 => "OPERATION_NOT_ATTEMPTED",
            88 => "UNSTABLE_OFFSET_COMMIT",
            90 => "PRODUCER_FENCED",
            105 => "TRANSACTIONAL_ID_NOT_FOUND",
            _ => "UNKNOWN_ERROR_CODE",
        }
    }
}

/// Kafka's ACL operations as the bit sets `*_authorized_operations` carry (bit n is operation
/// code n). strom has no ACLs, so every operation Kafka supports on a resource is authorized.
pub mod authorized {
    const READ: i32 = 1 << 3;
    const WRITE: i32 = 1 << 4;
    const CREATE: i32 = 1 << 5;
    const DELETE: i32 = 1 << 6;
    const ALTER: i32 = 1 << 7;
    const DESCRIBE: i32 = 1 << 8;
    const CLUSTER_ACTION: i32 = 1 << 9;
    const DESCRIBE_CONFIGS: i32 = 1 << 10;
    const ALTER_CONFIGS: i32 = 1 << 11;
    const IDEMPOTENT_WRITE: i32 = 1 << 12;

    /// What Kafka supports on a topic: READ, WRITE, CREATE, DELETE, ALTER, DESCRIBE,
    /// DESCRIBE_CONFIGS, ALTER_CONFIGS.
    pub const TOPIC: i32 =
        READ | WRITE | CREATE | DELETE | ALTER | DESCRIBE | DESCRIBE_CONFIGS | ALTER_CONFIGS;
    /// On a group: READ, DESCRIBE, DELETE.
    pub const GROUP: i32 = READ | DESCRIBE | DELETE;
    /// On the cluster: CREATE, CLUSTER_ACTION, DESCRIBE_CONFIGS, ALTER_CONFIGS,
    /// IDEMPOTENT_WRITE, ALTER, DESCRIBE.
    pub const CLUSTER: i32 = CREATE
        | CLUSTER_ACTION
        | DESCRIBE_CONFIGS
        | ALTER_CONFIGS
        | IDEMPOTENT_WRITE
        | ALTER
        | DESCRIBE;
}

/// A UUID as Kafka prints one (`Uuid.toString`): URL-safe base64 of its 16 bytes, no padding.
pub fn kafka_uuid(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(22);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    out
}

#[cfg(test)]
mod uuid_tests {
    #[test]
    fn kafka_uuid_is_url_safe_base64_without_padding() {
        // Kafka's UuidTest: new Uuid(0, 1) prints "AAAAAAAAAAAAAAAAAAAAAQ".
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(super::kafka_uuid(one), "AAAAAAAAAAAAAAAAAAAAAQ");
        assert_eq!(super::kafka_uuid([0xff; 16]), "_____________________w");
    }
}
