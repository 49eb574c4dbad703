//! `strom topic create|list|describe|alter|delete|add-partitions`: topic administration over the
//! Kafka protocol, against any Kafka-compatible cluster (the `kafka-topics` / `kafka-configs`
//! view). Changes go to the controller named in Metadata.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
use kafka_protocol::messages::create_topics_request::{CreatableTopic, CreatableTopicConfig};
use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::describe_quorum_request::{
    PartitionData as DescribeQuorumPartition, TopicData as DescribeQuorumTopic,
};
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, CreatePartitionsRequest, CreatePartitionsResponse, CreateTopicsRequest,
    CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse, DescribeConfigsRequest,
    DescribeConfigsResponse, DescribeQuorumRequest, DescribeQuorumResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, MetadataRequest,
    MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::Connection;
use crate::model::ErrorCode;

/// Version 10 is the first with topic ids.
const METADATA_VERSION: i16 = 12;
const RESOURCE_TOPIC: i8 = 2;
/// ConfigSource ids of values that are not defaults.
const SOURCE_DYNAMIC_TOPIC: i8 = 1;

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn check(code: i16, message: Option<&StrBytes>, what: &str) -> Result<()> {
    if code == 0 {
        return Ok(());
    }
    let name = ErrorCode(code).name();
    match message {
        Some(m) if !m.is_empty() => bail!("{what}: {name}: {m}"),
        _ => bail!("{what}: {name}"),
    }
}

pub(super) fn metadata(
    conn: &mut Connection,
    topics: Option<Vec<&str>>,
) -> Result<MetadataResponse> {
    let mut req = MetadataRequest::default();
    req.topics = topics.map(|ts| {
        ts.into_iter()
            .map(|t| {
                let mut mt = MetadataRequestTopic::default();
                mt.name = Some(TopicName(sb(t)));
                mt
            })
            .collect()
    });
    conn.call(ApiKey::Metadata, METADATA_VERSION, &req)
}

/// Connects to the controller the bootstrap broker names.
pub(super) fn controller(bootstrap: &str) -> Result<Connection> {
    let mut conn = Connection::connect(bootstrap)?;
    let md = metadata(&mut conn, Some(Vec::new()))?;
    let Some(b) = md.brokers.iter().find(|b| b.node_id == md.controller_id) else {
        return Ok(conn);
    };
    Connection::connect(&format!("{}:{}", b.host, b.port))
}

/// Parses `name=value` pairs.
pub fn parse_configs(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|i| match i.split_once('=') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => bail!("--config takes name=value, got '{i}'"),
        })
        .collect()
}

pub fn create(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    replication_factor: i16,
    configs: &[(String, String)],
) -> Result<String> {
    let mut conn = controller(bootstrap)?;
    let mut topic = CreatableTopic::default();
    topic.name = TopicName(sb(name));
    topic.num_partitions = partitions;
    topic.replication_factor = replication_factor;
    topic.configs = configs
        .iter()
        .map(|(k, v)| {
            let mut c = CreatableTopicConfig::default();
            c.name = sb(k);
            c.value = Some(sb(v));
            c
        })
        .collect();
    let mut req = CreateTopicsRequest::default();
    req.topics = vec![topic];
    req.timeout_ms = 30_000;
    let resp: CreateTopicsResponse = conn.call(ApiKey::CreateTopics, 5, &req)?;
    for t in &resp.topics {
        check(
            t.error_code,
            t.error_message.as_ref(),
            &format!("creating topic {name}"),
        )?;
    }
    Ok(format!("Created topic {name}.\n"))
}

pub fn list(bootstrap: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let md = metadata(&mut conn, None)?;
    let mut names: Vec<String> = md
        .topics
        .iter()
        .filter_map(|t| t.name.as_ref().map(|n| n.0.to_string()))
        .collect();
    names.sort();
    Ok(names.into_iter().map(|n| n + "\n").collect())
}

fn topic_configs(conn: &mut Connection, name: &str) -> Result<Vec<(String, Option<String>, i8)>> {
    let mut res = DescribeConfigsResource::default();
    res.resource_type = RESOURCE_TOPIC;
    res.resource_name = sb(name);
    res.configuration_keys = None;
    let mut req = DescribeConfigsRequest::default();
    req.resources = vec![res];
    let resp: DescribeConfigsResponse = conn.call(ApiKey::DescribeConfigs, 1, &req)?;
    let Some(r) = resp.results.into_iter().next() else {
        bail!("DescribeConfigs returned no result");
    };
    check(
        r.error_code,
        r.error_message.as_ref(),
        &format!("describing topic {name}"),
    )?;
    Ok(r.configs
        .into_iter()
        .map(|c| {
            (
                c.name.to_string(),
                c.value.map(|v| v.to_string()),
                c.config_source,
            )
        })
        .collect())
}

/// `kafka-topics --describe` layout: a topic line with overridden configs, then partitions.
pub fn describe(bootstrap: &str, name: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let md = metadata(&mut conn, Some(vec![name]))?;
    let Some(t) = md.topics.first() else {
        bail!("Metadata returned no topic");
    };
    check(t.error_code, None, &format!("describing topic {name}"))?;
    let overrides: Vec<String> = topic_configs(&mut conn, name)?
        .into_iter()
        .filter(|(_, _, source)| *source == SOURCE_DYNAMIC_TOPIC)
        .map(|(k, v, _)| format!("{k}={}", v.unwrap_or_default()))
        .collect();
    let replication = t.partitions.first().map_or(0, |p| p.replica_nodes.len());
    let mut out = format!(
        "Topic: {name}\tTopicId: {}\tPartitionCount: {}\tReplicationFactor: {replication}\tConfigs: {}\n",
        crate::model::kafka_uuid(*t.topic_id.as_bytes()),
        t.partitions.len(),
        overrides.join(",")
    );
    let mut parts: Vec<_> = t.partitions.iter().collect();
    parts.sort_by_key(|p| p.partition_index);
    let raft = raft_states(&md, name);
    for p in parts {
        let ids = |v: &Vec<kafka_protocol::messages::BrokerId>| {
            v.iter()
                .map(|b| b.0.to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        out.push_str(&format!(
            "\tTopic: {name}\tPartition: {}\tLeader: {}\tReplicas: {}\tIsr: {}\n",
            p.partition_index,
            p.leader_id.0,
            ids(&p.replica_nodes),
            ids(&p.isr_nodes)
        ));
        if let Some(state) = raft.get(&p.partition_index) {
            out.pop();
            out.push_str(state);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Each partition's Raft state, asked of its leader with DescribeQuorum (a cluster of strom
/// brokers; a single node or another Kafka-compatible broker answers nothing and the columns are
/// left out): `\tTerm: T\tCommitIndex: C\tFollowers: 2=0/15ms,3=4/120ms` (each follower: Raft
/// entries behind the leader's log, how long ago the leader last heard from it).
fn raft_states(md: &MetadataResponse, topic: &str) -> BTreeMap<i32, String> {
    let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
    for p in &md.topics[0].partitions {
        if p.leader_id.0 >= 0 && p.replica_nodes.len() > 1 {
            by_leader
                .entry(p.leader_id.0)
                .or_default()
                .push(p.partition_index);
        }
    }
    let mut out = BTreeMap::new();
    for (leader, partitions) in by_leader {
        let Some(b) = md.brokers.iter().find(|b| b.node_id.0 == leader) else {
            continue;
        };
        let Ok(mut conn) = Connection::connect(&format!("{}:{}", b.host, b.port)) else {
            continue;
        };
        let mut td = DescribeQuorumTopic::default();
        td.topic_name = TopicName(sb(topic));
        td.partitions = partitions
            .iter()
            .map(|i| {
                let mut pd = DescribeQuorumPartition::default();
                pd.partition_index = *i;
                pd
            })
            .collect();
        let mut req = DescribeQuorumRequest::default();
        req.topics = vec![td];
        let Ok(resp) = conn.call::<_, DescribeQuorumResponse>(ApiKey::DescribeQuorum, 1, &req)
        else {
            continue;
        };
        let now = crate::storage::partition::now_ms() as i64;
        for p in resp.topics.iter().flat_map(|t| &t.partitions) {
            if p.error_code != 0 {
                continue;
            }
            let leader_end = p
                .current_voters
                .iter()
                .find(|v| v.replica_id == p.leader_id)
                .map_or(p.high_watermark, |v| v.log_end_offset);
            let followers: Vec<String> = p
                .current_voters
                .iter()
                .chain(&p.observers)
                .filter(|v| v.replica_id != p.leader_id)
                .map(|v| {
                    let heard = if v.last_fetch_timestamp < 0 {
                        "never".to_string()
                    } else {
                        format!("{}ms", (now - v.last_fetch_timestamp).max(0))
                    };
                    let learner = if p.observers.contains(v) {
                        "(learner)"
                    } else {
                        ""
                    };
                    format!(
                        "{}{learner}={}/{heard}",
                        v.replica_id.0,
                        (leader_end - v.log_end_offset).max(0)
                    )
                })
                .collect();
            out.insert(
                p.partition_index,
                format!(
                    "\tTerm: {}\tCommitIndex: {}\tFollowers: {}",
                    p.leader_epoch,
                    p.high_watermark,
                    followers.join(",")
                ),
            );
        }
    }
    out
}

/// Sets and deletes topic config overrides (IncrementalAlterConfigs), leaving others as they are.
pub fn alter(
    bootstrap: &str,
    name: &str,
    set: &[(String, String)],
    delete: &[String],
) -> Result<String> {
    if set.is_empty() && delete.is_empty() {
        bail!("nothing to change: give --config name=value or --delete-config name");
    }
    let mut conn = controller(bootstrap)?;
    let mut res = AlterConfigsResource::default();
    res.resource_type = RESOURCE_TOPIC;
    res.resource_name = sb(name);
    let mut configs: BTreeMap<String, AlterableConfig> = BTreeMap::new();
    for (k, v) in set {
        let mut c = AlterableConfig::default();
        c.name = sb(k);
        c.config_operation = 0;
        c.value = Some(sb(v));
        configs.insert(k.clone(), c);
    }
    for k in delete {
        let mut c = AlterableConfig::default();
        c.name = sb(k);
        c.config_operation = 1;
        configs.insert(k.clone(), c);
    }
    res.configs = configs.into_values().collect();
    let mut req = IncrementalAlterConfigsRequest::default();
    req.resources = vec![res];
    let resp: IncrementalAlterConfigsResponse =
        conn.call(ApiKey::IncrementalAlterConfigs, 0, &req)?;
    for r in &resp.responses {
        check(
            r.error_code,
            r.error_message.as_ref(),
            &format!("altering topic {name}"),
        )?;
    }
    Ok(format!("Completed updating config for topic {name}.\n"))
}

pub fn delete(bootstrap: &str, name: &str) -> Result<String> {
    let mut conn = controller(bootstrap)?;
    let mut req = DeleteTopicsRequest::default();
    req.topic_names = vec![TopicName(sb(name))];
    req.timeout_ms = 30_000;
    let resp: DeleteTopicsResponse = conn.call(ApiKey::DeleteTopics, 4, &req)?;
    for r in &resp.responses {
        check(
            r.error_code,
            r.error_message.as_ref(),
            &format!("deleting topic {name}"),
        )?;
    }
    Ok(format!("Deleted topic {name}.\n"))
}

pub fn add_partitions(bootstrap: &str, name: &str, count: i32) -> Result<String> {
    let mut conn = controller(bootstrap)?;
    let mut t = CreatePartitionsTopic::default();
    t.name = TopicName(sb(name));
    t.count = count;
    t.assignments = None;
    let mut req = CreatePartitionsRequest::default();
    req.topics = vec![t];
    req.timeout_ms = 30_000;
    let resp: CreatePartitionsResponse = conn.call(ApiKey::CreatePartitions, 1, &req)?;
    for r in &resp.results {
        check(
            r.error_code,
            r.error_message.as_ref(),
            &format!("adding partitions to {name}"),
        )?;
    }
    Ok(format!("Topic {name} now has {count} partitions.\n"))
}
