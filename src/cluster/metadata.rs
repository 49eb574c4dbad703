//! The cluster metadata log: what the controller's Raft group (`__cluster_metadata`, over the
//! voters of `controller.quorum.voters`) replicates. Each entry is one rkyv [`MetadataCommand`];
//! every broker applies the committed commands in order to its copy of the [`TopicTable`], so all
//! brokers hold the same table. The log is replayed from its start when a broker starts (it holds
//! metadata only, no records).
//!
//! - `Register`: a broker's client address (any broker proposes its own at start).
//! - `ProducerBlock`: reserves the next block of producer ids for one broker.
//! - `Leader`: a partition's new leader and epoch, as its Raft group elected it.
//! - `Isr`: a partition's in-sync replicas, as its leader (of that epoch) saw them change.
//! - `Fence`: the controller stopped (or started again) hearing from a broker within
//!   `broker.session.timeout.ms`; Metadata lists unfenced brokers only.
//! - `Join`: a broker outside the voters (scale-out) announces its client and inter-broker
//!   addresses; the controller then adds it to the metadata group as a learner, so it receives
//!   this log, and assigns it replicas like any broker.
//! - `Table`: the topics (with replica assignments) and dynamic broker configs as the controller
//!   (the group's leader) computed them from the table it had applied; brokers and producer-id
//!   blocks are not in it, so a concurrent `Register` or `ProducerBlock` is never overwritten.

use anyhow::Result;

use super::topics::{ClusterRecord, TopicRecord, PRODUCER_ID_BLOCK};
use super::TopicTable;

/// The Raft group of the cluster metadata; not a Kafka topic (Metadata does not list it).
pub const METADATA_TOPIC: &str = "__cluster_metadata";

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub enum MetadataCommand {
    Register {
        node: i32,
        host: String,
        port: u16,
    },
    ProducerBlock {
        node: i32,
        tag: u64,
    },
    /// A partition's Raft group elected a leader (proposed by the new leader); brokers that do
    /// not hold the partition learn its leader from this.
    Leader {
        topic: String,
        partition: i32,
        leader: i32,
        epoch: i32,
    },
    /// A partition leader's in-sync replica set changed.
    Isr {
        topic: String,
        partition: i32,
        epoch: i32,
        isr: Vec<i32>,
    },
    /// The controller fences a broker it stopped hearing from, or unfences one it hears again.
    Fence {
        node: i32,
        fenced: bool,
    },
    Table {
        tag: u64,
        topics: Vec<TopicRecord>,
        /// Per topic (same order), per partition: the replicas.
        replicas: Vec<Vec<Vec<i32>>>,
        broker_configs: Vec<(String, String)>,
    },
    /// A broker that is not a voter joins (new variants go last: the archived form of the
    /// others, in logs written before, stays as it was).
    Join {
        node: i32,
        host: String,
        port: u16,
        peer_host: String,
        peer_port: u16,
    },
    /// A replica reassignment (AlterPartitionReassignments) begins: the partition's leader moves
    /// its Raft membership to `target`; an empty target cancels (back to the replicas).
    Reassign {
        tag: u64,
        topic: String,
        partition: i32,
        target: Vec<i32>,
    },
    /// The partition's membership reached the target: the target becomes its replicas.
    Reassigned {
        topic: String,
        partition: i32,
        replicas: Vec<i32>,
    },
    /// ElectLeaders (preferred): the partition's leader hands leadership to its preferred
    /// replica now rather than after `leader.imbalance.check.interval.seconds`.
    Prefer {
        topic: String,
        partition: i32,
    },
}

impl MetadataCommand {
    pub fn encode(&self) -> Result<Vec<u8>> {
        Ok(rkyv::to_bytes::<rkyv::rancor::Error>(self)?.into_vec())
    }

    /// Decodes a committed entry (validated by bytecheck: a bad entry is an error).
    pub fn decode(bytes: &[u8]) -> Result<MetadataCommand> {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        Ok(rkyv::from_bytes::<MetadataCommand, rkyv::rancor::Error>(
            &aligned,
        )?)
    }

    /// The `Table` command for `table`.
    pub fn table(tag: u64, table: &TopicTable) -> MetadataCommand {
        let ClusterRecord {
            topics,
            broker_configs,
            ..
        } = table.to_record();
        let replicas = topics
            .iter()
            .map(|t| {
                table
                    .get(&t.name)
                    .map(|topic| topic.replicas.clone())
                    .unwrap_or_default()
            })
            .collect();
        MetadataCommand::Table {
            tag,
            topics,
            replicas,
            broker_configs,
        }
    }

    /// Applies the command to `table`. Returns the command's tag and its result for the broker
    /// waiting on it (a producer-id block's first id).
    pub fn apply(self, table: &mut TopicTable) -> Option<(u64, i64)> {
        match self {
            MetadataCommand::Register { node, host, port } => {
                table.brokers.insert(node, (host, port));
                None
            }
            MetadataCommand::Join {
                node,
                host,
                port,
                peer_host,
                peer_port,
            } => {
                table.brokers.insert(node, (host, port));
                table.peers.insert(node, (peer_host, peer_port));
                None
            }
            MetadataCommand::Leader {
                topic,
                partition,
                leader,
                epoch,
            } => {
                let known = table.leaders.entry((topic, partition)).or_insert((-1, -1));
                if epoch >= known.1 {
                    *known = (leader, epoch);
                }
                None
            }
            MetadataCommand::Isr {
                topic,
                partition,
                epoch,
                isr,
            } => {
                let known = table
                    .isr
                    .entry((topic, partition))
                    .or_insert((-1, Vec::new()));
                if epoch >= known.0 {
                    *known = (epoch, isr);
                }
                None
            }
            MetadataCommand::Reassign {
                tag,
                topic,
                partition,
                target,
            } => {
                let key = (topic, partition);
                if target.is_empty() {
                    table.reassigning.remove(&key);
                } else if table
                    .get(&key.0)
                    .is_some_and(|t| (0..t.partitions).contains(&partition))
                {
                    table.reassigning.insert(key, target);
                }
                Some((tag, 0))
            }
            MetadataCommand::Reassigned {
                topic,
                partition,
                replicas,
            } => {
                let key = (topic, partition);
                if table.reassigning.get(&key) == Some(&replicas) {
                    table.reassigning.remove(&key);
                    let slot = table
                        .topics
                        .get_mut(key.0.as_str())
                        .and_then(|t| t.replicas.get_mut(usize::try_from(partition).ok()?));
                    if let Some(slot) = slot {
                        *slot = replicas;
                    }
                }
                None
            }
            MetadataCommand::Prefer { topic, partition } => {
                if table
                    .get(&topic)
                    .is_some_and(|t| (0..t.partitions).contains(&partition))
                {
                    *table.elections.entry((topic, partition)).or_default() += 1;
                }
                None
            }
            MetadataCommand::Fence { node, fenced } => {
                if fenced {
                    table.fenced.insert(node);
                } else {
                    table.fenced.remove(&node);
                }
                None
            }
            MetadataCommand::ProducerBlock { tag, .. } => {
                let start = table.producer_id_block_end;
                table.producer_id_block_end = start + PRODUCER_ID_BLOCK;
                Some((tag, start))
            }
            MetadataCommand::Table {
                tag,
                topics,
                replicas,
                broker_configs,
            } => {
                let record = ClusterRecord {
                    cluster_id: table.cluster_id.clone(),
                    producer_id_block_end: table.producer_id_block_end,
                    topics,
                    broker_configs,
                };
                let mut next = TopicTable::from_record(record);
                next.brokers = std::mem::take(&mut table.brokers);
                next.peers = std::mem::take(&mut table.peers);
                next.fenced = std::mem::take(&mut table.fenced);
                next.leaders = std::mem::take(&mut table.leaders);
                next.isr = std::mem::take(&mut table.isr);
                let topics = &next.topics;
                next.leaders
                    .retain(|(t, _), _| topics.contains_key(t.as_str()));
                next.isr.retain(|(t, _), _| topics.contains_key(t.as_str()));
                next.elections = std::mem::take(&mut table.elections);
                next.elections
                    .retain(|(t, _), _| topics.contains_key(t.as_str()));
                next.reassigning = std::mem::take(&mut table.reassigning);
                next.reassigning
                    .retain(|(t, _), _| topics.contains_key(t.as_str()));
                for (topic, mut r) in next.topics.values_mut().zip(replicas) {
                    // Replicas of existing partitions change only through `Reassigned`: a table
                    // the controller computed before one committed must not undo it.
                    if let Some(old) = table.topics.get(&topic.name).filter(|t| t.id == topic.id) {
                        for (slot, kept) in r.iter_mut().zip(&old.replicas) {
                            slot.clone_from(kept);
                        }
                    }
                    topic.replicas = r;
                }
                *table = next;
                Some((tag, 0))
            }
        }
    }
}

/// The cluster id every voter derives from the same `controller.quorum.voters`: 22 characters of
/// URL-safe base64 over 16 bytes, the form Kafka's cluster ids take.
pub fn cluster_id_for(voters: &[(i32, (String, u16))]) -> String {
    let mut text = String::new();
    for (id, (host, port)) in voters {
        text.push_str(&format!("{id}@{host}:{port},"));
    }
    let a = u64::from(crc32c::crc32c(text.as_bytes()));
    let b = u64::from(crc32c::crc32c_append(0x5354_524f, text.as_bytes()));
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&(a << 32 | b).to_be_bytes());
    bytes[8..].copy_from_slice(&(b << 32 | a).to_be_bytes());
    crate::model::kafka_uuid(bytes)
}

/// Spreads `partitions` partitions of `rf` replicas over `brokers` (sorted ids), round robin from
/// `start`: partition p's first replica (its preferred leader) is broker (start + p) mod n.
pub fn assign_replicas(brokers: &[i32], partitions: i32, rf: usize, start: usize) -> Vec<Vec<i32>> {
    let n = brokers.len().max(1);
    (0..usize::try_from(partitions).unwrap_or(0))
        .map(|p| {
            (0..rf)
                .filter_map(|i| brokers.get((start + p + i) % n).copied())
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_apply_in_order() {
        let mut table = TopicTable::default();
        let cmds = vec![
            MetadataCommand::Register {
                node: 2,
                host: "127.0.0.2".into(),
                port: 9092,
            },
            MetadataCommand::ProducerBlock { node: 2, tag: 7 },
            MetadataCommand::Table {
                tag: 9,
                topics: vec![TopicRecord {
                    name: "t".into(),
                    id: [1; 16],
                    partitions: 2,
                    configs: vec![],
                }],
                replicas: vec![vec![vec![1, 2], vec![2, 1]]],
                broker_configs: vec![],
            },
            MetadataCommand::ProducerBlock { node: 1, tag: 8 },
        ];
        let mut results = Vec::new();
        for c in cmds {
            let decoded = MetadataCommand::decode(&c.encode().unwrap()).unwrap();
            assert_eq!(decoded, c);
            results.push(decoded.apply(&mut table));
        }
        assert_eq!(
            results,
            vec![None, Some((7, 0)), Some((9, 0)), Some((8, 1000))]
        );
        assert_eq!(table.brokers.len(), 1);
        assert_eq!(
            table.get("t").unwrap().replicas,
            vec![vec![1, 2], vec![2, 1]]
        );
        assert!(MetadataCommand::decode(b"garbage").is_err());
    }

    #[test]
    fn isr_reports_follow_leader_epochs_and_fencing_survives_a_table() {
        let mut table = TopicTable::default();
        let isr = |epoch, isr: &[i32]| MetadataCommand::Isr {
            topic: "t".into(),
            partition: 0,
            epoch,
            isr: isr.to_vec(),
        };
        let table_cmd = |tag, topics: Vec<TopicRecord>| MetadataCommand::Table {
            tag,
            replicas: topics.iter().map(|_| vec![vec![1, 2, 3]]).collect(),
            topics,
            broker_configs: vec![],
        };
        let t = TopicRecord {
            name: "t".into(),
            id: [1; 16],
            partitions: 1,
            configs: vec![],
        };
        for c in [
            table_cmd(1, vec![t.clone()]),
            isr(3, &[1, 2, 3]),
            isr(3, &[1, 2]),
            // A report of a former leader (older epoch) arriving late changes nothing.
            isr(2, &[1, 2, 3]),
            MetadataCommand::Fence {
                node: 3,
                fenced: true,
            },
            table_cmd(2, vec![t.clone()]),
        ] {
            MetadataCommand::decode(&c.encode().unwrap())
                .unwrap()
                .apply(&mut table);
        }
        let key = ("t".to_string(), 0);
        assert_eq!(table.isr.get(&key), Some(&(3, vec![1, 2])));
        assert!(table.fenced.contains(&3));
        MetadataCommand::Fence {
            node: 3,
            fenced: false,
        }
        .apply(&mut table);
        assert!(table.fenced.is_empty());
        // Deleting the topic drops its ISR.
        table_cmd(3, vec![]).apply(&mut table);
        assert!(table.isr.is_empty());
    }

    #[test]
    fn joins_and_reassignments_apply_and_survive_a_table() {
        let mut table = TopicTable::default();
        let t = TopicRecord {
            name: "t".into(),
            id: [1; 16],
            partitions: 2,
            configs: vec![],
        };
        let table_cmd = |tag| MetadataCommand::Table {
            tag,
            topics: vec![t.clone()],
            replicas: vec![vec![vec![1, 2, 3], vec![2, 3, 1]]],
            broker_configs: vec![],
        };
        let reassign = |partition, target: &[i32]| MetadataCommand::Reassign {
            tag: 5,
            topic: "t".into(),
            partition,
            target: target.to_vec(),
        };
        for c in [
            table_cmd(1),
            MetadataCommand::Join {
                node: 4,
                host: "127.0.0.4".into(),
                port: 9092,
                peer_host: "127.0.0.4".into(),
                peer_port: 9093,
            },
            reassign(0, &[4, 2, 3]),
            reassign(1, &[4, 3, 1]),
            // A reassignment of a partition that does not exist is not recorded.
            reassign(7, &[1, 2, 4]),
            // A completion that does not match the target (a stale one) changes nothing.
            MetadataCommand::Reassigned {
                topic: "t".into(),
                partition: 1,
                replicas: vec![1, 2, 3],
            },
            MetadataCommand::Reassigned {
                topic: "t".into(),
                partition: 0,
                replicas: vec![4, 2, 3],
            },
            // A table computed before the completion keeps the reassigned replicas.
            table_cmd(2),
            // Cancelled.
            reassign(1, &[]),
        ] {
            MetadataCommand::decode(&c.encode().unwrap())
                .unwrap()
                .apply(&mut table);
        }
        assert_eq!(table.peers.get(&4), Some(&("127.0.0.4".to_string(), 9093)));
        assert!(table.brokers.contains_key(&4));
        assert_eq!(
            table.get("t").unwrap().replicas,
            vec![vec![4, 2, 3], vec![2, 3, 1]]
        );
        assert!(table.reassigning.is_empty(), "{:?}", table.reassigning);
    }

    #[test]
    fn replicas_spread_round_robin() {
        let r = assign_replicas(&[1, 2, 3], 4, 2, 0);
        assert_eq!(r, vec![vec![1, 2], vec![2, 3], vec![3, 1], vec![1, 2]]);
    }
}
