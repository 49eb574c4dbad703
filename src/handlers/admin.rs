//! The admin APIs Kafka's admin clients call to look at a cluster: DescribeCluster,
//! DescribeLogDirs, DescribeTopicPartitions (KIP-966, paginated), ElectLeaders, DescribeProducers
//! and ListConfigResources (KIP-1142). On a single node each partition's one replica is its
//! leader, in sync, and already the preferred leader.

use std::collections::BTreeSet;
use std::rc::Rc;

use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::describe_producers_response::{
    PartitionResponse, ProducerState, TopicResponse,
};
use kafka_protocol::messages::describe_topic_partitions_response::{
    Cursor, DescribeTopicPartitionsResponsePartition, DescribeTopicPartitionsResponseTopic,
};
use kafka_protocol::messages::elect_leaders_response::{PartitionResult, ReplicaElectionResult};
use kafka_protocol::messages::list_config_resources_response::ConfigResource;
use kafka_protocol::messages::{
    BrokerId, DescribeClusterRequest, DescribeClusterResponse, DescribeLogDirsRequest,
    DescribeLogDirsResponse, DescribeProducersRequest, DescribeProducersResponse,
    DescribeTopicPartitionsRequest, DescribeTopicPartitionsResponse, ElectLeadersRequest,
    ElectLeadersResponse, ListConfigResourcesRequest, ListConfigResourcesResponse, ProducerId,
};

use super::{str_bytes, topic_name};
use crate::cluster::Topic;
use crate::model::{authorized, ErrorCode, TopicPartition};
use crate::shard::Shard;

/// Kafka's config resource types (ListConfigResources, DescribeConfigs).
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
const RESOURCE_BROKER_LOGGER: i8 = 8;
const RESOURCE_CLIENT_METRICS: i8 = 16;
const RESOURCE_GROUP: i8 = 32;

pub fn describe_cluster(
    shard: &Rc<Shard>,
    req: DescribeClusterRequest,
    version: i16,
) -> DescribeClusterResponse {
    let mut r = DescribeClusterResponse::default();
    // Endpoint type 1 is the brokers; 2 (controllers, KIP-919) is the same set: every voter
    // is a broker.
    if version >= 1 {
        r.endpoint_type = req.endpoint_type;
        if !matches!(req.endpoint_type, 1 | 2) {
            r.error_code = ErrorCode::UNSUPPORTED_ENDPOINT_TYPE.0;
            r.error_message = Some(str_bytes(
                "endpoint type must be 1 (brokers) or 2 (controllers)",
            ));
            return r;
        }
    }
    r.cluster_id = str_bytes(&shard.topics().cluster_id);
    r.controller_id = BrokerId(super::metadata::controller_id(shard));
    r.brokers = super::metadata::brokers(shard)
        .into_iter()
        .map(|(id, (host, port))| {
            let mut b = DescribeClusterBroker::default();
            b.broker_id = BrokerId(id);
            b.host = str_bytes(&host);
            b.port = i32::from(port);
            b
        })
        .collect();
    r.cluster_authorized_operations = if req.include_cluster_authorized_operations {
        authorized::CLUSTER
    } else {
        i32::MIN
    };
    r
}

pub async fn describe_log_dirs(
    shard: &Rc<Shard>,
    req: DescribeLogDirsRequest,
    version: i16,
) -> DescribeLogDirsResponse {
    let table = shard.topics();
    // Null asks for every partition; otherwise only those named that exist.
    let wanted: Vec<TopicPartition> = match &req.topics {
        None => table
            .topics
            .values()
            .flat_map(|t| (0..t.partitions).map(|p| TopicPartition::new(&t.name, p)))
            .collect(),
        Some(topics) => topics
            .iter()
            .flat_map(|t| {
                let name = t.topic.0.to_string();
                let count = table.get(&name).map_or(0, |t| t.partitions);
                t.partitions
                    .iter()
                    .filter(move |p| (0..count).contains(*p))
                    .map(move |p| TopicPartition::new(&name, *p))
            })
            .collect(),
    };
    let facts = shard.partition_facts(wanted.clone()).await;
    let mut by_topic: std::collections::BTreeMap<String, Vec<DescribeLogDirsPartition>> =
        Default::default();
    for tp in &wanted {
        let Some(f) = facts.get(tp) else { continue };
        let mut p = DescribeLogDirsPartition::default();
        p.partition_index = tp.partition.0;
        p.partition_size = i64::try_from(f.size_bytes).unwrap_or(i64::MAX);
        // The leader's own log: nothing to catch up on.
        p.offset_lag = 0;
        by_topic.entry(tp.topic.to_string()).or_default().push(p);
    }
    let mut result = DescribeLogDirsResult::default();
    result.log_dir = str_bytes(&shard.options.data_dir.display().to_string());
    result.topics = by_topic
        .into_iter()
        .map(|(name, partitions)| {
            let mut t = DescribeLogDirsTopic::default();
            t.name = topic_name(&name);
            t.partitions = partitions;
            t
        })
        .collect();
    if version >= 4 {
        let (total, usable) = disk_space(&shard.options.data_dir);
        result.total_bytes = total;
        result.usable_bytes = usable;
    }
    let mut r = DescribeLogDirsResponse::default();
    r.results = vec![result];
    r
}

/// Total and available bytes of the filesystem holding `dir` (-1 when unknown).
fn disk_space(dir: &std::path::Path) -> (i64, i64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (-1, -1);
    };
    // SAFETY: statvfs writes only into the zeroed struct passed by pointer; the path is a valid
    // NUL-terminated string that outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return (-1, -1);
    }
    let block = st.f_frsize;
    let total = st.f_blocks.saturating_mul(block);
    let usable = st.f_bavail.saturating_mul(block);
    (
        i64::try_from(total).unwrap_or(i64::MAX),
        i64::try_from(usable).unwrap_or(i64::MAX),
    )
}

fn partition_of(node: i32, index: i32) -> DescribeTopicPartitionsResponsePartition {
    let mut p = DescribeTopicPartitionsResponsePartition::default();
    p.partition_index = index;
    p.leader_id = BrokerId(node);
    p.leader_epoch = 0;
    p.replica_nodes = vec![BrokerId(node)];
    p.isr_nodes = vec![BrokerId(node)];
    p.eligible_leader_replicas = Some(Vec::new());
    p.last_known_elr = Some(Vec::new());
    p
}

/// KIP-966: topics in name order from the cursor on, at most `response_partition_limit`
/// partitions in all; `next_cursor` names the first partition left out. An empty topic list
/// means every topic.
pub fn describe_topic_partitions(
    shard: &Rc<Shard>,
    req: DescribeTopicPartitionsRequest,
) -> DescribeTopicPartitionsResponse {
    let node = shard.options.broker.node_id;
    let table = shard.topics();
    let names: BTreeSet<String> = if req.topics.is_empty() {
        table.topics.keys().map(|n| n.to_string()).collect()
    } else {
        req.topics.iter().map(|t| t.name.0.to_string()).collect()
    };
    let limit = usize::try_from(req.response_partition_limit.max(1)).unwrap_or(2000);
    let (start_topic, start_partition) = match &req.cursor {
        Some(c) => (c.topic_name.0.to_string(), c.partition_index.max(0)),
        None => (String::new(), 0),
    };
    let mut r = DescribeTopicPartitionsResponse::default();
    let mut budget = limit;
    for name in names.range(start_topic.clone()..) {
        let first = if *name == start_topic {
            start_partition
        } else {
            0
        };
        let mut t = DescribeTopicPartitionsResponseTopic::default();
        t.name = Some(topic_name(name));
        t.topic_authorized_operations = authorized::TOPIC;
        let Some(topic) = table.get(name) else {
            t.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0;
            r.topics.push(t);
            continue;
        };
        if budget == 0 {
            let mut c = Cursor::default();
            c.topic_name = topic_name(name);
            c.partition_index = first;
            r.next_cursor = Some(c);
            break;
        }
        fill_topic(&mut t, topic);
        let mut p = first;
        while p < topic.partitions && budget > 0 {
            t.partitions.push(partition_of(node, p));
            p += 1;
            budget -= 1;
        }
        r.topics.push(t);
        if p < topic.partitions {
            let mut c = Cursor::default();
            c.topic_name = topic_name(name);
            c.partition_index = p;
            r.next_cursor = Some(c);
            break;
        }
    }
    r
}

fn fill_topic(t: &mut DescribeTopicPartitionsResponseTopic, topic: &Topic) {
    t.topic_id = uuid::Uuid::from_bytes(topic.id);
    t.is_internal = crate::cluster::is_internal(&topic.name);
}

/// With one replica per partition the leader already is the preferred replica: every partition
/// named gets ELECTION_NOT_NEEDED (unknown ones UNKNOWN_TOPIC_OR_PARTITION). Null names every
/// partition, and Kafka then lists only partitions where an election happened: none.
pub async fn elect_leaders(
    shard: &Rc<Shard>,
    req: ElectLeadersRequest,
    version: i16,
) -> ElectLeadersResponse {
    let table = shard.topics();
    let mut r = ElectLeadersResponse::default();
    if version >= 1 && !matches!(req.election_type, 0 | 1) {
        r.error_code = ErrorCode::INVALID_REQUEST.0;
        return r;
    }
    if shard.cluster().is_some() {
        return elect_in_cluster(shard, req, version).await;
    }
    let Some(topics) = req.topic_partitions else {
        return r;
    };
    for t in topics {
        let name = t.topic.0.to_string();
        let count = table.get(&name).map_or(0, |t| t.partitions);
        let mut result = ReplicaElectionResult::default();
        result.topic = t.topic.clone();
        for p in t.partitions {
            let mut pr = PartitionResult::default();
            pr.partition_id = p;
            if (0..count).contains(&p) {
                pr.error_code = ErrorCode::ELECTION_NOT_NEEDED.0;
                pr.error_message =
                    Some(str_bytes("Leader election not needed for topic partition."));
            } else {
                pr.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0;
                pr.error_message =
                    Some(str_bytes("This server does not host this topic-partition."));
            }
            result.partition_result.push(pr);
        }
        r.replica_election_results.push(result);
    }
    r
}

/// ElectLeaders in a cluster. Preferred: a partition led by its preferred replica (the first of
/// its replicas) needs none; one whose preferred replica is not in sync gets
/// `PREFERRED_LEADER_NOT_AVAILABLE`; for the others a `Prefer` command goes through the controller
/// and the leader hands over as soon as it applies it (answered once proposed). Unclean: Raft
/// never elects a replica that lacks committed data, so there is nothing unclean to do: a
/// partition with a leader needs none, one without gets `ELIGIBLE_LEADERS_NOT_AVAILABLE`. Null
/// names every partition and lists those where an election was started.
async fn elect_in_cluster(
    shard: &Rc<Shard>,
    req: ElectLeadersRequest,
    version: i16,
) -> ElectLeadersResponse {
    use crate::cluster::metadata::MetadataCommand;
    let table = shard.topics();
    let preferred_kind = version == 0 || req.election_type == 0;
    let every = req.topic_partitions.is_none();
    let wanted: Vec<(kafka_protocol::messages::TopicName, Vec<i32>)> = match req.topic_partitions {
        Some(ts) => ts.into_iter().map(|t| (t.topic, t.partitions)).collect(),
        None => table
            .topics
            .values()
            .map(|t| (topic_name(&t.name), (0..t.partitions).collect()))
            .collect(),
    };
    let mut proposals = Vec::new();
    let mut r = ElectLeadersResponse::default();
    for (topic, partitions) in wanted {
        let name = topic.0.to_string();
        let mut result = ReplicaElectionResult::default();
        result.topic = topic.clone();
        for p in partitions {
            let mut pr = PartitionResult::default();
            pr.partition_id = p;
            let key = (name.clone(), p);
            let replicas = table.replicas_of(&name, p);
            let leader = table.leaders.get(&key).map_or(-1, |(l, _)| *l);
            let isr = table
                .isr
                .get(&key)
                .map(|(_, i)| i.as_slice())
                .unwrap_or(&[]);
            let (code, message) = match replicas.and_then(|r| r.first()) {
                None => (
                    ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    "This server does not host this topic-partition.",
                ),
                Some(_) if !preferred_kind && leader >= 0 => (
                    ErrorCode::ELECTION_NOT_NEEDED,
                    "Leader election not needed for topic partition.",
                ),
                Some(_) if !preferred_kind => (
                    ErrorCode::ELIGIBLE_LEADERS_NOT_AVAILABLE,
                    "No replica can lead without losing committed records.",
                ),
                Some(first) if *first == leader => (
                    ErrorCode::ELECTION_NOT_NEEDED,
                    "Leader election not needed for topic partition.",
                ),
                Some(first) if !isr.contains(first) => (
                    ErrorCode::PREFERRED_LEADER_NOT_AVAILABLE,
                    "The preferred leader is not in sync.",
                ),
                Some(_) => {
                    proposals.push(MetadataCommand::Prefer {
                        topic: name.clone(),
                        partition: p,
                    });
                    (ErrorCode::NONE, "")
                }
            };
            if every && code != ErrorCode::NONE {
                continue;
            }
            pr.error_code = code.0;
            pr.error_message = (!message.is_empty()).then(|| str_bytes(message));
            result.partition_result.push(pr);
        }
        if !(every && result.partition_result.is_empty()) {
            r.replica_election_results.push(result);
        }
    }
    if !proposals.is_empty()
        && shard
            .try_call(
                crate::model::ShardId(0),
                crate::shard::Request::Propose(proposals),
            )
            .await
            .is_none()
    {
        r.error_code = ErrorCode::UNKNOWN_SERVER_ERROR.0;
    }
    r
}

pub async fn describe_producers(
    shard: &Rc<Shard>,
    req: DescribeProducersRequest,
) -> DescribeProducersResponse {
    let table = shard.topics();
    let mut wanted = Vec::new();
    for t in &req.topics {
        for p in &t.partition_indexes {
            wanted.push(TopicPartition::new(t.name.0.as_str(), *p));
        }
    }
    let known: Vec<TopicPartition> = wanted
        .iter()
        .filter(|tp| {
            table
                .get(&tp.topic)
                .is_some_and(|t| (0..t.partitions).contains(&tp.partition.0))
        })
        .cloned()
        .collect();
    let facts = shard.partition_facts(known).await;
    let mut r = DescribeProducersResponse::default();
    for t in req.topics {
        let mut tr = TopicResponse::default();
        tr.name = t.name.clone();
        for p in t.partition_indexes {
            let mut pr = PartitionResponse::default();
            pr.partition_index = p;
            let tp = TopicPartition::new(t.name.0.as_str(), p);
            match facts.get(&tp) {
                Some(f) => {
                    pr.active_producers = f
                        .producers
                        .iter()
                        .map(|a| {
                            let mut s = ProducerState::default();
                            s.producer_id = ProducerId(a.producer_id);
                            s.producer_epoch = i32::from(a.epoch);
                            s.last_sequence = a.last_sequence;
                            s.last_timestamp = a.last_timestamp;
                            s.coordinator_epoch = -1;
                            s.current_txn_start_offset = a.current_txn_start_offset;
                            s
                        })
                        .collect();
                }
                None => {
                    pr.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0;
                    pr.error_message =
                        Some(str_bytes("This server does not host this topic-partition."));
                }
            }
            tr.partitions.push(pr);
        }
        r.topics.push(tr);
    }
    r
}

/// KIP-1142: the config resources of the asked types (all when none are asked): every topic,
/// this broker, and every group. Version 0 (ListClientMetricsResources) lists only client
/// metrics subscriptions, of which strom has none.
pub async fn list_config_resources(
    shard: &Rc<Shard>,
    req: ListConfigResourcesRequest,
    version: i16,
) -> ListConfigResourcesResponse {
    let mut r = ListConfigResourcesResponse::default();
    if version == 0 {
        return r;
    }
    let supported = [
        RESOURCE_TOPIC,
        RESOURCE_BROKER,
        RESOURCE_BROKER_LOGGER,
        RESOURCE_CLIENT_METRICS,
        RESOURCE_GROUP,
    ];
    if let Some(bad) = req.resource_types.iter().find(|t| !supported.contains(t)) {
        r.error_code = ErrorCode::UNSUPPORTED_VERSION.0;
        tracing::debug!(
            resource_type = bad,
            "ListConfigResources for an unknown type"
        );
        return r;
    }
    let all = req.resource_types.is_empty();
    let wants = |t: i8| all || req.resource_types.contains(&t);
    let mut push = |name: String, kind: i8| {
        let mut c = ConfigResource::default();
        c.resource_name = str_bytes(&name);
        c.resource_type = kind;
        r.config_resources.push(c);
    };
    if wants(RESOURCE_TOPIC) {
        for name in shard.topics().topics.keys() {
            push(name.to_string(), RESOURCE_TOPIC);
        }
    }
    if wants(RESOURCE_BROKER) {
        push(shard.options.broker.node_id.to_string(), RESOURCE_BROKER);
    }
    if wants(RESOURCE_GROUP) {
        for g in super::groups::all_groups(shard).await {
            push(g.group_id.0.to_string(), RESOURCE_GROUP);
        }
    }
    r
}
