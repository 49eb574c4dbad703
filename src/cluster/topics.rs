//! The topic table: every topic with its id, partition count and config overrides, plus the
//! cluster id and the producer-id allocator. Persisted as `meta/cluster.meta` with rkyv.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::storage::files;

const META_VERSION: u32 = 2;
/// Producer ids are handed out from blocks; a block's end is persisted before any id in it is
/// used, so ids never repeat after a restart.
pub const PRODUCER_ID_BLOCK: i64 = 1000;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct TopicRecord {
    pub name: String,
    pub id: [u8; 16],
    pub partitions: i32,
    pub configs: Vec<(String, String)>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ClusterRecord {
    pub cluster_id: String,
    pub producer_id_block_end: i64,
    pub topics: Vec<TopicRecord>,
    /// Broker settings changed at run time (AlterConfigs on the broker resource).
    pub broker_configs: Vec<(String, String)>,
}

/// A topic as every shard sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Topic {
    pub name: Arc<str>,
    pub id: [u8; 16],
    pub partitions: i32,
    pub configs: BTreeMap<String, String>,
    /// The brokers holding each partition, leader-preferred first (a cluster; empty on a single
    /// node, where this broker holds everything).
    pub replicas: Vec<Vec<i32>>,
}

/// An immutable snapshot of cluster metadata; shards share it behind an `Arc` and replace it whole.
#[derive(Debug, Clone, Default)]
pub struct TopicTable {
    pub cluster_id: String,
    pub producer_id_block_end: i64,
    pub topics: BTreeMap<Arc<str>, Topic>,
    pub broker_configs: BTreeMap<String, String>,
    /// A cluster's registered brokers and their client addresses (empty on a single node).
    pub brokers: BTreeMap<i32, (String, u16)>,
    /// A cluster's partition leaders and leader epochs as last reported through the controller.
    pub leaders: BTreeMap<(String, i32), (i32, i32)>,
    /// A cluster's in-sync replicas per partition, with the leader epoch of the leader that
    /// reported them.
    pub isr: BTreeMap<(String, i32), (i32, Vec<i32>)>,
    /// The inter-broker addresses of brokers that joined outside the voters (the voters' are in
    /// `controller.quorum.voters`).
    pub peers: BTreeMap<i32, (String, u16)>,
    /// Preferred leader elections asked for (ElectLeaders), counted per partition.
    pub elections: BTreeMap<(String, i32), u64>,
    /// Replica reassignments in progress: each partition's target replicas.
    pub reassigning: BTreeMap<(String, i32), Vec<i32>>,
    /// Registered brokers the controller has not heard from within `broker.session.timeout.ms`.
    pub fenced: std::collections::BTreeSet<i32>,
}

impl TopicTable {
    pub fn get(&self, name: &str) -> Option<&Topic> {
        self.topics.get(name)
    }

    /// The replicas of partition `p` of `topic` (a cluster; None if there is no such partition).
    pub fn replicas_of(&self, topic: &str, p: i32) -> Option<&Vec<i32>> {
        self.get(topic)?.replicas.get(usize::try_from(p).ok()?)
    }

    pub fn to_record(&self) -> ClusterRecord {
        ClusterRecord {
            cluster_id: self.cluster_id.clone(),
            producer_id_block_end: self.producer_id_block_end,
            topics: self
                .topics
                .values()
                .map(|t| TopicRecord {
                    name: t.name.to_string(),
                    id: t.id,
                    partitions: t.partitions,
                    configs: t
                        .configs
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                })
                .collect(),
            broker_configs: self
                .broker_configs
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn from_record(r: ClusterRecord) -> Self {
        TopicTable {
            cluster_id: r.cluster_id,
            producer_id_block_end: r.producer_id_block_end,
            broker_configs: r.broker_configs.into_iter().collect(),
            topics: r
                .topics
                .into_iter()
                .map(|t| {
                    let name: Arc<str> = Arc::from(t.name.as_str());
                    let topic = Topic {
                        name: name.clone(),
                        id: t.id,
                        partitions: t.partitions,
                        configs: t.configs.into_iter().collect(),
                        replicas: Vec::new(),
                    };
                    (name, topic)
                })
                .collect(),
            ..TopicTable::default()
        }
    }

    /// Loads the table from `meta/cluster.meta`, or makes a new cluster id when there is none.
    pub async fn load_or_init(data_dir: &Path) -> Result<TopicTable> {
        let dir = data_dir.join("meta");
        let path = dir.join("cluster.meta");
        if path.exists() {
            let bytes = files::read_meta(&path, META_VERSION).await?;
            return Self::decode(&bytes).with_context(|| format!("decoding {}", path.display()));
        }
        let target = dir.clone();
        files::blocking(move || std::fs::create_dir_all(target))
            .await
            .with_context(|| format!("creating metadata directory {}", dir.display()))?;
        let table = TopicTable {
            cluster_id: new_cluster_id(),
            producer_id_block_end: 0,
            topics: BTreeMap::new(),
            broker_configs: BTreeMap::new(),
            ..TopicTable::default()
        };
        table.persist(data_dir).await?;
        Ok(table)
    }

    /// The table from the payload of `meta/cluster.meta` (validated by bytecheck: arbitrary bytes
    /// are an error, never undefined behaviour).
    pub fn decode(payload: &[u8]) -> Result<TopicTable> {
        let record = rkyv::from_bytes::<ClusterRecord, rkyv::rancor::Error>(payload)?;
        Ok(Self::from_record(record))
    }

    pub async fn persist(&self, data_dir: &Path) -> Result<()> {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&self.to_record())?;
        files::write_meta(&data_dir.join("meta/cluster.meta"), META_VERSION, &bytes).await
    }
}

/// A Kafka-style cluster id: 16 random bytes, URL-safe base64 without padding (22 characters).
fn new_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bytes = *uuid::Uuid::new_v4().as_bytes();
    let mut bits: u128 = u128::from_be_bytes(bytes);
    let mut out = String::with_capacity(22);
    for _ in 0..22 {
        out.push(ALPHABET[(bits & 63) as usize] as char);
        bits >>= 6;
    }
    out
}

/// Kafka's rule for topic names: 1 to 249 of `[a-zA-Z0-9._-]`, and not `.` or `..`.
pub fn validate_topic_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("Topic name is illegal, it can't be empty".into());
    }
    if name == "." || name == ".." {
        return Err("Topic name cannot be \".\" or \"..\"".into());
    }
    if name.len() > 249 {
        return Err(format!(
            "Topic name is illegal, it can't be longer than 249 characters, topic name: {name}"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return Err(format!(
            "Topic name {name} is illegal, it contains a character other than ASCII alphanumerics, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert!(validate_topic_name("orders.v1_x-y").is_ok());
        assert!(validate_topic_name("").is_err());
        assert!(validate_topic_name("..").is_err());
        assert!(validate_topic_name("bad name").is_err());
        assert!(validate_topic_name(&"a".repeat(250)).is_err());
    }

    #[test]
    fn cluster_record_roundtrips_through_rkyv() {
        let mut table = TopicTable {
            cluster_id: new_cluster_id(),
            producer_id_block_end: 2000,
            topics: BTreeMap::new(),
            broker_configs: [("log.retention.ms".to_string(), "5".to_string())].into(),
            ..TopicTable::default()
        };
        let name: Arc<str> = Arc::from("t");
        table.topics.insert(
            name.clone(),
            Topic {
                name,
                id: [7; 16],
                partitions: 4,
                configs: [("retention.ms".to_string(), "1000".to_string())].into(),
                replicas: Vec::new(),
            },
        );
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&table.to_record()).unwrap();
        let back = rkyv::from_bytes::<ClusterRecord, rkyv::rancor::Error>(&bytes).unwrap();
        assert_eq!(back, table.to_record());
        assert_eq!(table.cluster_id.len(), 22);
    }
}
