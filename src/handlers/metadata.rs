//! Metadata: this broker at its advertised address, the cluster id, and topics with their
//! partitions (this broker leads them all on a single node). An unknown topic is created when
//! `auto.create.topics.enable` is on and the request allows it; an invalid name is refused with
//! `INVALID_TOPIC_EXCEPTION` and not created.

use std::rc::Rc;

use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{BrokerId, MetadataRequest, MetadataResponse};

use super::{str_bytes, topic_name};
use crate::cluster::topics::validate_topic_name;
use crate::cluster::Topic;
use crate::model::{ErrorCode, ShardId, TopicPartition};
use crate::shard::cluster::ClusterNode;
use crate::shard::{Reply, Request, Shard, TopicSpec};

pub async fn handle(shard: &Rc<Shard>, req: MetadataRequest, version: i16) -> MetadataResponse {
    let node = shard.options.broker.node_id;
    let req_topic_ops = req.include_topic_authorized_operations;
    let req_cluster_ops = req.include_cluster_authorized_operations;
    let mut table = shard.topics();
    let wanted: Option<Vec<(Option<String>, uuid::Uuid)>> = match req.topics {
        None => None,
        Some(t) if t.is_empty() && version == 0 => None,
        Some(t) => Some(
            t.into_iter()
                .map(|t| (t.name.map(|n| n.0.to_string()), t.topic_id))
                .collect(),
        ),
    };
    let auto_create =
        shard.options.broker.auto_create_topics && (version < 4 || req.allow_auto_topic_creation);
    if let (Some(list), true) = (&wanted, auto_create) {
        let missing: Vec<TopicSpec> = list
            .iter()
            .filter_map(|(name, _)| name.as_ref())
            .filter(|name| table.get(name).is_none() && validate_topic_name(name).is_ok())
            .map(|name| TopicSpec {
                name: name.clone(),
                partitions: shard.options.broker.num_partitions,
                replication_factor: shard.options.broker.default_replication_factor,
                configs: Vec::new(),
            })
            .collect();
        if !missing.is_empty() {
            let reply = shard
                .call(
                    ShardId(0),
                    Request::CreateTopics {
                        specs: missing,
                        validate_only: false,
                    },
                )
                .await;
            if let Reply::Created(results) = reply {
                for (name, result) in results {
                    if let Err((code, message)) = result {
                        if code != ErrorCode::TOPIC_ALREADY_EXISTS {
                            tracing::warn!(topic = %name, ?code, %message, "auto-creating topic failed");
                        }
                    }
                }
            }
            table = shard.topics();
        }
    }
    let mut response = MetadataResponse::default();
    response.brokers = brokers(shard)
        .into_iter()
        .map(|(id, (host, port))| {
            let mut broker = MetadataResponseBroker::default();
            broker.node_id = BrokerId(id);
            broker.host = str_bytes(&host);
            broker.port = i32::from(port);
            broker
        })
        .collect();
    if version >= 2 {
        response.cluster_id = Some(str_bytes(&table.cluster_id));
    }
    if version >= 1 {
        response.controller_id = BrokerId(controller_id(shard));
    }
    let describe = |t: &Topic| describe(shard, t, node);
    response.topics = match wanted {
        None => table.topics.values().map(describe).collect(),
        Some(list) => list
            .into_iter()
            .map(|(name, id)| {
                let found = match &name {
                    Some(n) => table.get(n),
                    None => table
                        .topics
                        .values()
                        .find(|t| uuid::Uuid::from_bytes(t.id) == id),
                };
                match found {
                    Some(t) => describe(t),
                    None => {
                        let mut t = MetadataResponseTopic::default();
                        let name = name.unwrap_or_default();
                        t.error_code = if validate_topic_name(&name).is_err() {
                            ErrorCode::INVALID_TOPIC_EXCEPTION.0
                        } else {
                            ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0
                        };
                        t.name = Some(topic_name(&name));
                        t.topic_id = id;
                        t
                    }
                }
            })
            .collect(),
    };
    if version >= 8 {
        if req_topic_ops {
            for t in &mut response.topics {
                if t.error_code == 0 {
                    t.topic_authorized_operations = crate::model::authorized::TOPIC;
                }
            }
        }
        if req_cluster_ops && version <= 10 {
            response.cluster_authorized_operations = crate::model::authorized::CLUSTER;
        }
    }
    response
}

/// The brokers Metadata and DescribeCluster list: the cluster's registered brokers, this one
/// always included (a single node is only itself).
pub fn brokers(shard: &Shard) -> Vec<(i32, (String, u16))> {
    let node = shard.options.broker.node_id;
    let table = shard.topics();
    // Fenced brokers (the controller stopped hearing from them) are not offered to clients.
    let mut brokers: Vec<(i32, (String, u16))> = table
        .brokers
        .iter()
        .filter(|(id, _)| !table.fenced.contains(id))
        .map(|(id, a)| (*id, a.clone()))
        .collect();
    if !brokers.iter().any(|(id, _)| *id == node) {
        brokers.push((node, shard.advertised.clone()));
    }
    brokers
}

/// The controller Metadata names: this node on a single node; in a cluster the leader of the
/// metadata group (-1 while there is none).
pub fn controller_id(shard: &Shard) -> i32 {
    match shard.cluster() {
        None => shard.options.broker.node_id,
        Some(c) => c
            .leader_of(&ClusterNode::metadata_tp())
            .map_or(-1, |(leader, _)| leader),
    }
}

fn describe(shard: &Shard, topic: &Topic, node: i32) -> MetadataResponseTopic {
    let table = shard.topics();
    let mut t = MetadataResponseTopic::default();
    t.name = Some(topic_name(&topic.name));
    t.topic_id = uuid::Uuid::from_bytes(topic.id);
    t.is_internal = crate::cluster::is_internal(&topic.name);
    t.partitions = (0..topic.partitions)
        .map(|p| {
            let mut part = MetadataResponsePartition::default();
            part.partition_index = p;
            match shard.cluster() {
                None => {
                    part.leader_id = BrokerId(node);
                    part.leader_epoch = 0;
                    part.replica_nodes = vec![BrokerId(node)];
                    part.isr_nodes = vec![BrokerId(node)];
                }
                Some(c) => {
                    let replicas: Vec<BrokerId> = usize::try_from(p)
                        .ok()
                        .and_then(|i| topic.replicas.get(i))
                        .map(|r| r.iter().map(|id| BrokerId(*id)).collect())
                        .unwrap_or_default();
                    let tp = TopicPartition::new(&topic.name, p);
                    let (leader, epoch) = shard.partition_leader(&tp).unwrap_or((-1, -1));
                    // A fenced broker's partitions are offline until another replica leads.
                    let leader = if table.fenced.contains(&leader) && c.leader_of(&tp).is_none() {
                        -1
                    } else {
                        leader
                    };
                    if leader < 0 {
                        part.error_code = ErrorCode::LEADER_NOT_AVAILABLE.0;
                    }
                    part.leader_id = BrokerId(leader);
                    part.leader_epoch = epoch;
                    // The in-sync set is the leader's to know: its own view where it leads
                    // here, else what it last reported through the controller.
                    let key = (topic.name.to_string(), p);
                    let isr = c
                        .group(&tp)
                        .map(|g| g.in_sync())
                        .filter(|isr| !isr.is_empty())
                        .or_else(|| table.isr.get(&key).map(|(_, isr)| isr.clone()));
                    part.isr_nodes = match isr {
                        Some(isr) => isr.into_iter().map(BrokerId).collect(),
                        None => replicas.clone(),
                    };
                    part.offline_replicas = replicas
                        .iter()
                        .filter(|id| table.fenced.contains(&id.0))
                        .copied()
                        .collect();
                    part.replica_nodes = replicas;
                }
            }
            part
        })
        .collect();
    t
}
