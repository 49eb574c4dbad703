//! `strom group list` and `strom group describe`: the `kafka-consumer-groups` view of a cluster.
//! Describe shows every member with its assigned partitions, and per partition the committed
//! offset, the log end offset and the lag between them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{bail, Result};
use bytes::Buf;
use kafka_protocol::messages::describe_share_group_offsets_request::DescribeShareGroupOffsetsRequestGroup;
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, BrokerId, ConsumerGroupDescribeRequest, ConsumerGroupDescribeResponse,
    ConsumerProtocolAssignment, DescribeGroupsRequest, DescribeGroupsResponse,
    DescribeShareGroupOffsetsRequest, DescribeShareGroupOffsetsResponse, FindCoordinatorRequest,
    FindCoordinatorResponse, GroupId, ListGroupsRequest, ListGroupsResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, OffsetFetchRequest,
    OffsetFetchResponse, ShareGroupDescribeRequest, ShareGroupDescribeResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::Connection;

const METADATA_VERSION: i16 = 9;

pub(super) fn brokers(
    bootstrap: &mut Connection,
) -> Result<(MetadataResponse, HashMap<i32, String>)> {
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

/// Prints every group of every broker: `GROUP TYPE STATE PROTOCOL-TYPE`.
pub fn list(bootstrap: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let (_, brokers) = brokers(&mut conn)?;
    let mut rows = BTreeSet::new();
    for address in brokers.values() {
        let mut c = Connection::connect(address)?;
        let resp: ListGroupsResponse =
            c.call(ApiKey::ListGroups, 5, &ListGroupsRequest::default())?;
        if resp.error_code != 0 {
            bail!(
                "ListGroups on {address} failed with error {}",
                resp.error_code
            );
        }
        for g in resp.groups {
            rows.insert((
                g.group_id.0.to_string(),
                g.group_type.to_string(),
                g.group_state.to_string(),
                g.protocol_type.to_string(),
            ));
        }
    }
    let mut out = format!(
        "{:<40} {:<9} {:<20} {}\n",
        "GROUP", "TYPE", "STATE", "PROTOCOL-TYPE"
    );
    for (group, kind, state, protocol) in rows {
        out.push_str(&format!("{group:<40} {kind:<9} {state:<20} {protocol}\n"));
    }
    Ok(out)
}

/// A connection to the group's coordinator.
pub(super) fn coordinator_of(conn: &mut Connection, group: &str) -> Result<Connection> {
    let mut find = FindCoordinatorRequest::default();
    find.key = StrBytes::from_string(group.to_string());
    let found: FindCoordinatorResponse = conn.call(ApiKey::FindCoordinator, 3, &find)?;
    if found.error_code != 0 {
        bail!(
            "FindCoordinator for group '{group}' failed with error {}",
            found.error_code
        );
    }
    Connection::connect(&format!("{}:{}", found.host, found.port))
}

/// Prints the group's state and one row per partition it has committed or is assigned:
/// `TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID`.
pub fn describe(bootstrap: &str, group: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let (_, brokers) = brokers(&mut conn)?;

    let mut coordinator = coordinator_of(&mut conn, group)?;

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

    // The group's type (classic, consumer, share) as its coordinator lists it: a classic
    // consumer group's protocol type is also "consumer".
    let listed: ListGroupsResponse =
        coordinator.call(ApiKey::ListGroups, 5, &ListGroupsRequest::default())?;
    let kind = listed
        .groups
        .iter()
        .find(|g| g.group_id.0.as_str() == group)
        .map_or_else(|| "classic".to_string(), |g| g.group_type.to_string());
    let mut members = d.members.len();
    if kind == "consumer" || kind == "share" {
        // KIP-848 and KIP-932 groups: the members are in their own describe.
        let listed = broker_assigned(&mut coordinator, group, &kind)?;
        members = listed.len();
        for (member, host, client, partitions) in listed {
            for key in partitions {
                owners.insert(key, (member.clone(), host.clone(), client.clone()));
            }
        }
    }
    // Classic and consumer groups: committed offsets. Share groups: each share-partition's
    // start offset (every record below it is done).
    let committed = if kind == "share" {
        share_starts(&mut coordinator, group)?
    } else {
        committed_offsets(&mut coordinator, group)?
    };
    let partitions: BTreeSet<(String, i32)> =
        owners.keys().chain(committed.keys()).cloned().collect();
    let ends = log_end_offsets(&mut conn, &brokers, &partitions)?;

    let mut out = format!(
        "GROUP {group} TYPE {} STATE {} PROTOCOL {} MEMBERS {}\n",
        kind,
        d.group_state,
        if d.protocol_data.is_empty() {
            "-"
        } else {
            d.protocol_data.as_str()
        },
        members
    );
    out.push_str(&format!(
        "{:<30} {:>9} {:>14} {:>14} {:>8} {:<50} {:<18} {}\n",
        "TOPIC",
        "PARTITION",
        if kind == "share" {
            "START-OFFSET"
        } else {
            "CURRENT-OFFSET"
        },
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

/// A classic or consumer-protocol group's committed offsets.
fn committed_offsets(
    coordinator: &mut Connection,
    group: &str,
) -> Result<BTreeMap<(String, i32), i64>> {
    let mut fetch = OffsetFetchRequest::default();
    fetch.group_id = GroupId(StrBytes::from_string(group.to_string()));
    fetch.topics = None;
    let resp: OffsetFetchResponse = coordinator.call(ApiKey::OffsetFetch, 7, &fetch)?;
    if resp.error_code != 0 {
        bail!(
            "OffsetFetch for '{group}' failed with error {}",
            resp.error_code
        );
    }
    let mut committed = BTreeMap::new();
    for t in resp.topics {
        for p in t.partitions {
            if p.committed_offset >= 0 {
                committed.insert(
                    (t.name.0.to_string(), p.partition_index),
                    p.committed_offset,
                );
            }
        }
    }
    Ok(committed)
}

/// A share group's start offset per share-partition (DescribeShareGroupOffsets).
fn share_starts(coordinator: &mut Connection, group: &str) -> Result<BTreeMap<(String, i32), i64>> {
    let mut req = DescribeShareGroupOffsetsRequest::default();
    let mut g = DescribeShareGroupOffsetsRequestGroup::default();
    g.group_id = GroupId(StrBytes::from_string(group.to_string()));
    g.topics = None;
    req.groups = vec![g];
    let resp: DescribeShareGroupOffsetsResponse =
        coordinator.call(ApiKey::DescribeShareGroupOffsets, 0, &req)?;
    let mut starts = BTreeMap::new();
    for g in resp.groups {
        if g.error_code != 0 {
            bail!(
                "DescribeShareGroupOffsets for '{group}' failed with error {}",
                g.error_code
            );
        }
        for t in g.topics {
            for p in t.partitions {
                if p.start_offset >= 0 {
                    starts.insert(
                        (t.topic_name.0.to_string(), p.partition_index),
                        p.start_offset,
                    );
                }
            }
        }
    }
    Ok(starts)
}

/// A member as `strom group describe` shows it: id, host, client id, partitions.
type ListedMember = (String, String, String, Vec<(String, i32)>);

/// The members of a KIP-848 (`consumer`) or KIP-932 (`share`) group with their partitions.
fn broker_assigned(
    coordinator: &mut Connection,
    group: &str,
    kind: &str,
) -> Result<Vec<ListedMember>> {
    let id = GroupId(StrBytes::from_string(group.to_string()));
    let partitions = |list: Vec<(TopicName, Vec<i32>)>| {
        list.into_iter()
            .flat_map(|(t, ps)| ps.into_iter().map(move |p| (t.0.to_string(), p)))
            .collect::<Vec<_>>()
    };
    let mut out = Vec::new();
    if kind == "share" {
        let mut req = ShareGroupDescribeRequest::default();
        req.group_ids = vec![id];
        let resp: ShareGroupDescribeResponse =
            coordinator.call(ApiKey::ShareGroupDescribe, 1, &req)?;
        for g in resp.groups {
            for m in g.members {
                let list = m
                    .assignment
                    .topic_partitions
                    .into_iter()
                    .map(|t| (t.topic_name, t.partitions))
                    .collect();
                out.push((
                    m.member_id.to_string(),
                    m.client_host.to_string(),
                    m.client_id.to_string(),
                    partitions(list),
                ));
            }
        }
    } else {
        let mut req = ConsumerGroupDescribeRequest::default();
        req.group_ids = vec![id];
        let resp: ConsumerGroupDescribeResponse =
            coordinator.call(ApiKey::ConsumerGroupDescribe, 0, &req)?;
        for g in resp.groups {
            for m in g.members {
                let list = m
                    .assignment
                    .topic_partitions
                    .into_iter()
                    .map(|t| (t.topic_name, t.partitions))
                    .collect();
                out.push((
                    m.member_id.to_string(),
                    m.client_host.to_string(),
                    m.client_id.to_string(),
                    partitions(list),
                ));
            }
        }
    }
    Ok(out)
}

/// The log end offset of each partition, asked of each partition's leader.
fn log_end_offsets(
    conn: &mut Connection,
    brokers: &HashMap<i32, String>,
    partitions: &BTreeSet<(String, i32)>,
) -> Result<BTreeMap<(String, i32), i64>> {
    list_offsets(conn, brokers, partitions, -1)
}

/// The offset of each partition at `timestamp` (-1: the log end, -2: the log start), asked of
/// each partition's leader. Partitions that answer with an error are left out.
pub(super) fn list_offsets(
    conn: &mut Connection,
    brokers: &HashMap<i32, String>,
    partitions: &BTreeSet<(String, i32)>,
    timestamp: i64,
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
                        lp.timestamp = timestamp;
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
