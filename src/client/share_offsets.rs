//! `strom group reset-offsets` and `strom group delete-offsets` for share groups, as Kafka's
//! `kafka-share-groups.sh --reset-offsets` and `--delete-offsets` do: AlterShareGroupOffsets and
//! DeleteShareGroupOffsets sent to the group's coordinator. The group must have no members.
//! Without `--execute`, reset-offsets only prints what it would set (Kafka's `--dry-run`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use kafka_protocol::messages::alter_share_group_offsets_request::{
    AlterShareGroupOffsetsRequestPartition, AlterShareGroupOffsetsRequestTopic,
};
use kafka_protocol::messages::delete_share_group_offsets_request::DeleteShareGroupOffsetsRequestTopic;
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    AlterShareGroupOffsetsRequest, AlterShareGroupOffsetsResponse, ApiKey,
    DeleteShareGroupOffsetsRequest, DeleteShareGroupOffsetsResponse, GroupId, MetadataRequest,
    MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::groups::{brokers, coordinator_of, list_offsets};
use super::Connection;
use crate::model::ErrorCode;

/// Where reset-offsets puts each partition.
#[derive(Clone, Copy, Debug)]
pub enum ResetTo {
    Earliest,
    Latest,
    Offset(i64),
}

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn failed(what: &str, code: i16, message: Option<&StrBytes>) -> anyhow::Error {
    let name = ErrorCode(code).name();
    match message {
        Some(m) if !m.is_empty() => anyhow::anyhow!("{what}: {name}: {m}"),
        _ => anyhow::anyhow!("{what}: {name}"),
    }
}

/// `TOPIC` (every partition) or `TOPIC:P,P,...`, resolved against the cluster's metadata.
fn partitions_of(conn: &mut Connection, specs: &[String]) -> Result<BTreeSet<(String, i32)>> {
    let mut wanted: Vec<(String, Option<Vec<i32>>)> = Vec::new();
    for spec in specs {
        match spec.split_once(':') {
            None => wanted.push((spec.clone(), None)),
            Some((topic, list)) => {
                let ps = list
                    .split(',')
                    .map(|p| {
                        p.trim()
                            .parse::<i32>()
                            .with_context(|| format!("partition '{p}' in --topic {spec}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                wanted.push((topic.to_string(), Some(ps)));
            }
        }
    }
    let mut req = MetadataRequest::default();
    req.topics = Some(
        wanted
            .iter()
            .map(|(t, _)| {
                let mut mt = MetadataRequestTopic::default();
                mt.name = Some(TopicName(sb(t)));
                mt
            })
            .collect(),
    );
    let md: MetadataResponse = conn.call(ApiKey::Metadata, 9, &req)?;
    let mut counts = BTreeMap::new();
    for t in &md.topics {
        let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
        if t.error_code != 0 {
            return Err(failed(&format!("topic {name}"), t.error_code, None));
        }
        counts.insert(name, t.partitions.len() as i32);
    }
    let mut out = BTreeSet::new();
    for (topic, ps) in wanted {
        let Some(&count) = counts.get(&topic) else {
            bail!("topic {topic} does not exist");
        };
        match ps {
            None => out.extend((0..count).map(|p| (topic.clone(), p))),
            Some(ps) => {
                for p in ps {
                    if p < 0 || p >= count {
                        bail!("topic {topic} has no partition {p} (it has {count})");
                    }
                    out.insert((topic.clone(), p));
                }
            }
        }
    }
    Ok(out)
}

/// Sets the start offset of the named share-partitions; prints `GROUP TOPIC PARTITION
/// NEW-START-OFFSET` for each.
pub fn reset(
    bootstrap: &str,
    group: &str,
    topics: &[String],
    to: ResetTo,
    execute: bool,
) -> Result<String> {
    if topics.is_empty() {
        bail!("name at least one --topic");
    }
    let mut conn = Connection::connect(bootstrap)?;
    let (_, brokers) = brokers(&mut conn)?;
    let partitions = partitions_of(&mut conn, topics)?;
    let starts: BTreeMap<(String, i32), i64> = match to {
        ResetTo::Offset(o) => {
            if o < 0 {
                bail!("--to-offset must not be negative");
            }
            partitions.iter().map(|k| (k.clone(), o)).collect()
        }
        ResetTo::Earliest | ResetTo::Latest => {
            let timestamp = if matches!(to, ResetTo::Earliest) {
                -2
            } else {
                -1
            };
            let found = list_offsets(&mut conn, &brokers, &partitions, timestamp)?;
            if let Some(missing) = partitions.iter().find(|k| !found.contains_key(*k)) {
                bail!(
                    "no offset for {}-{}: its leader did not answer",
                    missing.0,
                    missing.1
                );
            }
            found
        }
    };
    let mut out = format!(
        "{:<30} {:<30} {:>9} {:>16}\n",
        "GROUP", "TOPIC", "PARTITION", "NEW-START-OFFSET"
    );
    for ((topic, p), offset) in &starts {
        out.push_str(&format!("{group:<30} {topic:<30} {p:>9} {offset:>16}\n"));
    }
    if !execute {
        out.push_str("(dry run: nothing changed; add --execute to apply)\n");
        return Ok(out);
    }
    let mut by_topic: BTreeMap<&str, Vec<AlterShareGroupOffsetsRequestPartition>> = BTreeMap::new();
    for ((topic, p), offset) in &starts {
        let mut rp = AlterShareGroupOffsetsRequestPartition::default();
        rp.partition_index = *p;
        rp.start_offset = *offset;
        by_topic.entry(topic).or_default().push(rp);
    }
    let mut req = AlterShareGroupOffsetsRequest::default();
    req.group_id = GroupId(sb(group));
    req.topics = by_topic
        .into_iter()
        .map(|(t, ps)| {
            let mut rt = AlterShareGroupOffsetsRequestTopic::default();
            rt.topic_name = TopicName(sb(t));
            rt.partitions = ps;
            rt
        })
        .collect();
    let mut coordinator = coordinator_of(&mut conn, group)?;
    let resp: AlterShareGroupOffsetsResponse =
        coordinator.call(ApiKey::AlterShareGroupOffsets, 0, &req)?;
    let what = format!("resetting share group {group}");
    if resp.error_code != 0 {
        return Err(failed(&what, resp.error_code, resp.error_message.as_ref()));
    }
    for t in &resp.responses {
        for p in &t.partitions {
            if p.error_code != 0 {
                let at = format!("{what}: {}-{}", t.topic_name.0, p.partition_index);
                return Err(failed(&at, p.error_code, p.error_message.as_ref()));
            }
        }
    }
    Ok(out)
}

/// Forgets the share group's offsets for the named topics; prints `TOPIC STATUS` for each.
pub fn delete(bootstrap: &str, group: &str, topics: &[String]) -> Result<String> {
    if topics.is_empty() {
        bail!("name at least one --topic");
    }
    let mut conn = Connection::connect(bootstrap)?;
    let mut req = DeleteShareGroupOffsetsRequest::default();
    req.group_id = GroupId(sb(group));
    req.topics = topics
        .iter()
        .map(|t| {
            let mut rt = DeleteShareGroupOffsetsRequestTopic::default();
            rt.topic_name = TopicName(sb(t));
            rt
        })
        .collect();
    let mut coordinator = coordinator_of(&mut conn, group)?;
    let resp: DeleteShareGroupOffsetsResponse =
        coordinator.call(ApiKey::DeleteShareGroupOffsets, 0, &req)?;
    let what = format!("deleting offsets of share group {group}");
    if resp.error_code != 0 {
        return Err(failed(&what, resp.error_code, resp.error_message.as_ref()));
    }
    let mut out = format!("{:<30} {}\n", "TOPIC", "STATUS");
    let mut errors = Vec::new();
    for t in &resp.responses {
        let status = if t.error_code == 0 {
            "deleted".to_string()
        } else {
            errors.push(failed(
                &format!("{what}: {}", t.topic_name.0),
                t.error_code,
                t.error_message.as_ref(),
            ));
            ErrorCode(t.error_code).name().to_string()
        };
        out.push_str(&format!("{:<30} {status}\n", t.topic_name.0));
    }
    if let Some(e) = errors.into_iter().next() {
        return Err(e);
    }
    Ok(out)
}
