//! `strom group list` and `strom group describe`: the `kafka-consumer-groups` view of a cluster.
//! Describe shows every member with its assigned partitions, and per partition the committed
//! offset, the log end offset and the lag between them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{bail, Result};
use bytes::Buf;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, BrokerId, ConsumerProtocolAssignment, DescribeGroupsRequest, DescribeGroupsResponse,
    FindCoordinatorRequest, FindCoordinatorResponse, GroupId, ListGroupsRequest,
    ListGroupsResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse,
    OffsetFetchRequest, OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::Connection;

const METADATA_VERSION: i16 = 9;

fn brokers(bootstrap: &mut Connection) -> Result<(MetadataResponse, HashMap<i32, String>)> {
    let mut req = MetadataRequest::default();
    req.topics = Some(Vec::new());
    let md: MetadataResponse = bootstrap.call(ApiKey::Metadata, METADATA_VERSION, &req)?;
    let map = md
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
        .collect();
    Ok((md, map))
}

/// Prints every group of every broker: `GROUP STATE PROTOCOL-TYPE`.
pub fn list(bootstrap: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let (_, brokers) = brokers(&mut conn)?;
    let mut rows = BTreeSet::new();
    for address in brokers.values() {
        let mut c = Connection::connect(address)?;
        let resp: ListGroupsResponse =
            c.call(ApiKey::ListGroups, 4, &ListGroupsRequest::default())?;
        if resp.error_code != 0 {
            bail!(
                "ListGroups on {address} failed with error {}",
                resp.error_code
            );
        }
        for g in resp.groups {
            rows.insert((
                g.group_id.0.to_string(),
                g.group_state.to_string(),
                g.protocol_type.to_string(),
            ));
        }
    }
    let mut out = format!("{:<40} {:<20} {}\n", "GROUP", "STATE", "PROTOCOL-TYPE");
    for (group, state, protocol) in rows {
        out.push_str(&format!("{group:<40} {state:<20} {protocol}\n"));
    }
    Ok(out)
}

/// Prints the group's state and one row per partition it has committed or is assigned:
/// `TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID`.
pub fn describe(bootstrap: &str, group: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let (_, brokers) = brokers(&mut conn)?;

    let mut find = FindCoordinatorRequest::default();
    find.key = StrBytes::from_string(group.to_string());
    let found: FindCoordinatorResponse = conn.call(ApiKey::FindCoordinator, 3, &find)?;
    if found.error_code != 0 {
        bail!(
            "FindCoordinator for group '{group}' failed with error {}",
            found.error_code
        );
    }
    let mut coordinator = Connection::connect(&format!("{}:{}", found.host, found.port))?;

    let mut req = DescribeGroupsRequest::default();
    req.groups = vec![GroupId(StrBytes::from_string(group.to_string()))];
    let described: DescribeGroupsResponse = coordinator.call(ApiKey::DescribeGroups, 5, &req)?;
    let Some(d) = described.groups.into_iter().next() else {
        bail!("DescribeGroups returned no group");
    };
    if d.error_code != 0 {
        bail!(
            "DescribeGroups for '{group}' failed with error {}",
            d.error_code
        );
    }
    // partition -> (member id, host, client id)
    let mut owners: BTreeMap<(String, i32), (String, String, String)> = BTreeMap::new();
    if d.protocol_type.as_str() == "consumer" {
        for m in &d.members {
            let mut b = m.member_assignment.clone();
            if b.len() < 2 {
                continue;
            }
            let version = b.get_i16();
            let Ok(assignment) = ConsumerProtocolAssignment::decode(&mut b, version.clamp(0, 3))
            else {
                continue;
            };
            for tp in assignment.assigned_partitions {
                for p in tp.partitions {
                    owners.insert(
                        (tp.topic.0.to_string(), p),
                        (
                            m.member_id.to_string(),
                            m.client_host.to_string(),
                            m.client_id.to_string(),
                        ),
                    );
                }
            }
        }
    }

    let mut fetch = OffsetFetchRequest::default();
    fetch.group_id = GroupId(StrBytes::from_string(group.to_string()));
    fetch.topics = None;
    let committed_resp: OffsetFetchResponse = coordinator.call(ApiKey::OffsetFetch, 7, &fetch)?;
    if committed_resp.error_code != 0 {
        bail!(
            "OffsetFetch for '{group}' failed with error {}",
            committed_resp.error_code
        );
    }
    let mut committed: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for t in committed_resp.topics {
        for p in t.partitions {
            if p.committed_offset >= 0 {
                committed.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
    }
    let partitions: BTreeSet<(String, i32)> =
        owners.keys().chain(committed.keys()).cloned().collect();
    let ends = log_end_offsets(&mut conn, &brokers, &partitions)?;

    let mut out = format!(
        "GROUP {group} STATE {} PROTOCOL {} MEMBERS {}\n",
        d.group_state,
        if d.protocol_data.is_empty() {
            "-"
        } else {
            d.protocol_data.as_str()
        },
        d.members.len()
    );
    out.push_str(&format!(
        "{:<30} {:>9} {:>14} {:>14} {:>8} {:<50} {:<18} {}\n",
        "TOPIC",
        "PARTITION",
        "CURRENT-OFFSET",
        "LOG-END-OFFSET",
        "LAG",
        "CONSUMER-ID",
        "HOST",
        "CLIENT-ID"
    ));
    for key in &partitions {
        let current = committed.get(key).copied();
        let end = ends.get(key).copied();
        let lag = match (current, end) {
            (Some(c), Some(e)) => (e - c).max(0).to_string(),
            _ => "-".to_string(),
        };
        let (member, host, client) = owners
            .get(key)
            .cloned()
            .unwrap_or_else(|| ("-".into(), "-".into(), "-".into()));
        out.push_str(&format!(
            "{:<30} {:>9} {:>14} {:>14} {:>8} {:<50} {:<18} {}\n",
            key.0,
            key.1,
            current.map_or("-".to_string(), |c| c.to_string()),
            end.map_or("-".to_string(), |e| e.to_string()),
            lag,
            member,
            host,
            client
        ));
    }
    Ok(out)
}

/// The log end offset of each partition, asked of each partition's leader.
fn log_end_offsets(
    conn: &mut Connection,
    brokers: &HashMap<i32, String>,
    partitions: &BTreeSet<(String, i32)>,
) -> Result<BTreeMap<(String, i32), i64>> {
    let topics: BTreeSet<&String> = partitions.iter().map(|(t, _)| t).collect();
    if topics.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut req = MetadataRequest::default();
    req.topics = Some(
        topics
            .iter()
            .map(|t| {
                let mut mt = MetadataRequestTopic::default();
                mt.name = Some(TopicName(StrBytes::from_string((*t).clone())));
                mt
            })
            .collect(),
    );
    let md: MetadataResponse = conn.call(ApiKey::Metadata, METADATA_VERSION, &req)?;
    let mut by_leader: BTreeMap<i32, Vec<(String, i32)>> = BTreeMap::new();
    for t in &md.topics {
        let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
        for p in &t.partitions {
            if partitions.contains(&(name.clone(), p.partition_index)) {
                by_leader
                    .entry(p.leader_id.0)
                    .or_default()
                    .push((name.clone(), p.partition_index));
            }
        }
    }
    let mut ends = BTreeMap::new();
    for (leader, parts) in by_leader {
        let Some(address) = brokers.get(&leader) else {
            continue;
        };
        let mut c = Connection::connect(address)?;
        let mut req = ListOffsetsRequest::default();
        req.replica_id = BrokerId(-1);
        let mut grouped: BTreeMap<String, Vec<i32>> = BTreeMap::new();
        for (t, p) in parts {
            grouped.entry(t).or_default().push(p);
        }
        req.topics = grouped
            .into_iter()
            .map(|(t, ps)| {
                let mut lt = ListOffsetsTopic::default();
                lt.name = TopicName(StrBytes::from_string(t));
                lt.partitions = ps
                    .into_iter()
                    .map(|p| {
                        let mut lp = ListOffsetsPartition::default();
                        lp.partition_index = p;
                        lp.timestamp = -1;
                        lp
                    })
                    .collect();
                lt
            })
            .collect();
        let resp: ListOffsetsResponse = c.call(ApiKey::ListOffsets, 5, &req)?;
        for t in resp.topics {
            for p in t.partitions {
                if p.error_code == 0 {
                    ends.insert((t.name.0.to_string(), p.partition_index), p.offset);
                }
            }
        }
    }
    Ok(ends)
}
