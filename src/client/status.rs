//! `strom cluster status`: what an operator checks first on a cluster, from one Metadata
//! request: the brokers (live, or holding replicas while not live), the controller, how many
//! partitions each broker leads, and the partitions that are under-replicated (fewer in-sync
//! replicas than replicas) or offline (no leader), and the replica moves in progress.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;

use kafka_protocol::messages::{
    ApiKey, ListPartitionReassignmentsRequest, ListPartitionReassignmentsResponse,
};

use super::topics::metadata;
use super::Connection;

pub fn status(bootstrap: &str) -> Result<String> {
    let mut conn = Connection::connect(bootstrap)?;
    let md = metadata(&mut conn, None)?;
    let live: BTreeMap<i32, String> = md
        .brokers
        .iter()
        .map(|b| (b.node_id.0, format!("{}:{}", b.host, b.port)))
        .collect();
    let mut leads: BTreeMap<i32, usize> = live.keys().map(|id| (*id, 0)).collect();
    let mut holders: BTreeSet<i32> = BTreeSet::new();
    let mut total = 0;
    let mut under = Vec::new();
    let mut offline = Vec::new();
    let mut topics: Vec<_> = md.topics.iter().collect();
    topics.sort_by(|a, b| a.name.cmp(&b.name));
    for t in topics {
        let name = t.name.as_ref().map_or("", |n| n.0.as_str());
        let mut parts: Vec<_> = t.partitions.iter().collect();
        parts.sort_by_key(|p| p.partition_index);
        for p in parts {
            total += 1;
            holders.extend(p.replica_nodes.iter().map(|b| b.0));
            let ids = |v: &[kafka_protocol::messages::BrokerId]| {
                v.iter()
                    .map(|b| b.0.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let line = format!(
                "{name}-{}\tLeader: {}\tReplicas: {}\tIsr: {}",
                p.partition_index,
                p.leader_id.0,
                ids(&p.replica_nodes),
                ids(&p.isr_nodes)
            );
            if p.leader_id.0 < 0 {
                offline.push(line);
                continue;
            }
            *leads.entry(p.leader_id.0).or_default() += 1;
            if p.isr_nodes.len() < p.replica_nodes.len() {
                under.push(line);
            }
        }
    }
    let cluster_id = md.cluster_id.as_ref().map_or("", |c| c.as_str());
    let not_live: Vec<i32> = holders
        .iter()
        .filter(|id| !live.contains_key(id))
        .copied()
        .collect();
    let mut out = format!(
        "Cluster: {cluster_id}\tController: {}\nBrokers: {} live, {} not live\n",
        md.controller_id.0,
        live.len(),
        not_live.len()
    );
    for (id, address) in &live {
        let controller = if *id == md.controller_id.0 {
            "\tcontroller"
        } else {
            ""
        };
        out.push_str(&format!(
            "\tBroker: {id}\t{address}\tlive\tLeads: {}{controller}\n",
            leads.get(id).copied().unwrap_or(0)
        ));
    }
    for id in &not_live {
        out.push_str(&format!("\tBroker: {id}\t-\tnot live\tLeads: 0\n"));
    }
    out.push_str(&format!(
        "Partitions: {total}\tUnder-replicated: {}\tOffline: {}\n",
        under.len(),
        offline.len()
    ));
    for line in &under {
        out.push_str(&format!("\tUnder-replicated: {line}\n"));
    }
    for line in &offline {
        out.push_str(&format!("\tOffline: {line}\n"));
    }
    // Replica moves in progress (a single node, or a broker without the API, has none).
    let listed: Result<ListPartitionReassignmentsResponse> = conn.call(
        ApiKey::ListPartitionReassignments,
        0,
        &ListPartitionReassignmentsRequest::default(),
    );
    if let Ok(resp) =
        listed.map_err(|e| tracing::debug!(error = %format!("{e:#}"), "no reassignments listed"))
    {
        let moving: Vec<String> = resp
            .topics
            .iter()
            .flat_map(|t| {
                t.partitions.iter().map(move |p| {
                    let ids = |v: &[kafka_protocol::messages::BrokerId]| {
                        v.iter()
                            .map(|b| b.0.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    format!(
                        "{}-{}\tAdding: {}\tRemoving: {}",
                        t.name.0,
                        p.partition_index,
                        ids(&p.adding_replicas),
                        ids(&p.removing_replicas)
                    )
                })
            })
            .collect();
        out.push_str(&format!("Reassigning: {}\n", moving.len()));
        for line in &moving {
            out.push_str(&format!("\tReassigning: {line}\n"));
        }
    }
    Ok(out)
}
