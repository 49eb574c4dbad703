//! `strom cluster rebalance`: spreads replicas and leadership evenly over the live brokers (a
//! broker that joined takes its share), through Kafka's own AlterPartitionReassignments, so it
//! works with the same moves an operator could make with `kafka-reassign-partitions`.
//!
//! The plan moves as few replicas as it can: while one broker holds two replicas more than
//! another, one of its replicas moves to the least loaded broker that does not hold that
//! partition. Leaders then go round: each partition's preferred replica (first in the list,
//! where its leadership goes once the move completes) is the one of its replicas that leads the
//! fewest partitions so far. Partitions whose list does not change are not moved. Once the moves
//! are done, every partition whose leader is not its preferred replica gets a preferred leader
//! election (ElectLeaders, as `kafka-leader-election --election-type PREFERRED`): a partition
//! whose first election another replica won would otherwise keep that leader until
//! `leader.imbalance.check.interval.seconds` passes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kafka_protocol::messages::alter_partition_reassignments_request::{
    ReassignablePartition, ReassignableTopic,
};
use kafka_protocol::messages::elect_leaders_request::TopicPartitions as ElectTopicPartitions;
use kafka_protocol::messages::{
    AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, ApiKey, BrokerId,
    ElectLeadersRequest, ElectLeadersResponse, ListPartitionReassignmentsRequest,
    ListPartitionReassignmentsResponse, TopicName,
};

use super::topics::{controller, metadata};
use crate::model::ErrorCode;

/// A partition's replicas, preferred leader first.
pub type Assignment = BTreeMap<(String, i32), Vec<i32>>;

/// The balanced assignment for `current` over `brokers` (see the module header): each topic is
/// balanced on its own, so every topic's load spreads (and with it the whole cluster's).
pub fn plan(current: &Assignment, brokers: &[i32]) -> Assignment {
    let mut topics: BTreeMap<&str, Assignment> = BTreeMap::new();
    for (k, v) in current {
        topics
            .entry(k.0.as_str())
            .or_default()
            .insert(k.clone(), v.clone());
    }
    topics
        .into_values()
        .flat_map(|t| plan_topic(&t, brokers))
        .collect()
}

fn plan_topic(current: &Assignment, brokers: &[i32]) -> Assignment {
    let mut next = current.clone();
    if brokers.is_empty() {
        return next;
    }
    let mut load: BTreeMap<i32, usize> = brokers.iter().map(|b| (*b, 0)).collect();
    for replicas in next.values() {
        for r in replicas {
            *load.entry(*r).or_default() += 1;
        }
    }
    // Each move narrows the spread; bounded in any case.
    for _ in 0..next.values().map(Vec::len).sum::<usize>() + 1 {
        let Some((&hi, &hi_load)) = load.iter().max_by_key(|(b, l)| (**l, -**b)) else {
            break;
        };
        let Some((&lo, &lo_load)) = load
            .iter()
            .filter(|(b, _)| brokers.contains(b))
            .min_by_key(|(b, l)| (**l, **b))
        else {
            break;
        };
        // A broker that is not live gives up every replica; otherwise stop once even.
        if brokers.contains(&hi) && hi_load <= lo_load + 1 {
            break;
        }
        if hi_load == 0 {
            break;
        }
        let Some(replicas) = next
            .values_mut()
            .find(|r| r.contains(&hi) && !r.contains(&lo))
        else {
            break;
        };
        for r in replicas.iter_mut() {
            if *r == hi {
                *r = lo;
            }
        }
        *load.entry(hi).or_default() -= 1;
        *load.entry(lo).or_default() += 1;
    }
    let mut leads: BTreeMap<i32, usize> = brokers.iter().map(|b| (*b, 0)).collect();
    for replicas in next.values_mut() {
        let Some(pos) = (0..replicas.len())
            .min_by_key(|i| (leads.get(&replicas[*i]).copied().unwrap_or(usize::MAX), *i))
        else {
            continue;
        };
        let leader = replicas.remove(pos);
        replicas.insert(0, leader);
        *leads.entry(leader).or_default() += 1;
    }
    next
}

/// Plans, submits and waits for the moves (at most `timeout`); returns a report.
pub fn rebalance(bootstrap: &str, timeout: Duration) -> Result<String> {
    let mut conn = controller(bootstrap)?;
    let md = metadata(&mut conn, None)?;
    let mut brokers: Vec<i32> = md.brokers.iter().map(|b| b.node_id.0).collect();
    brokers.sort_unstable();
    let mut current = Assignment::new();
    for t in &md.topics {
        let Some(name) = t.name.as_ref() else {
            continue;
        };
        for p in &t.partitions {
            current.insert(
                (name.0.to_string(), p.partition_index),
                p.replica_nodes.iter().map(|b| b.0).collect(),
            );
        }
    }
    let next = plan(&current, &brokers);
    let moves: Assignment = next
        .iter()
        .filter(|(k, v)| current.get(*k) != Some(*v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut out = String::new();
    if moves.is_empty() {
        out.push_str("Balanced already: nothing to move.\n");
        out.push_str(&elect_preferred(&mut conn)?);
        return Ok(out);
    }
    let deadline = Instant::now() + timeout;
    submit(&mut conn, &moves)?;
    for ((topic, p), replicas) in &moves {
        out.push_str(&format!(
            "{topic}-{p}\t{:?} -> {:?}\n",
            current
                .get(&(topic.clone(), *p))
                .cloned()
                .unwrap_or_default(),
            replicas
        ));
    }
    loop {
        let req = ListPartitionReassignmentsRequest::default();
        let resp: ListPartitionReassignmentsResponse =
            conn.call(ApiKey::ListPartitionReassignments, 0, &req)?;
        let ongoing: usize = resp.topics.iter().map(|t| t.partitions.len()).sum();
        if ongoing == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{ongoing} reassignments still in progress after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    out.push_str(&format!("Moved {} partitions.\n", moves.len()));
    out.push_str(&elect_preferred(&mut conn)?);
    Ok(out)
}

/// A preferred leader election for every partition led by a replica other than its first.
fn elect_preferred(conn: &mut super::Connection) -> Result<String> {
    let md = metadata(conn, None)?;
    let mut wanted: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for t in &md.topics {
        let Some(name) = t.name.as_ref() else {
            continue;
        };
        for p in &t.partitions {
            if p.leader_id.0 >= 0 && p.replica_nodes.first() != Some(&p.leader_id) {
                wanted
                    .entry(name.0.to_string())
                    .or_default()
                    .push(p.partition_index);
            }
        }
    }
    if wanted.is_empty() {
        return Ok(String::new());
    }
    let mut req = ElectLeadersRequest::default();
    req.election_type = 0;
    req.timeout_ms = 30_000;
    req.topic_partitions = Some(
        wanted
            .into_iter()
            .map(|(topic, partitions)| {
                let mut tp = ElectTopicPartitions::default();
                tp.topic = TopicName(topic.into());
                tp.partitions = partitions;
                tp
            })
            .collect(),
    );
    let resp: ElectLeadersResponse = conn.call(ApiKey::ElectLeaders, 1, &req)?;
    let mut out = String::new();
    for t in &resp.replica_election_results {
        for p in &t.partition_result {
            let outcome = if p.error_code == 0 {
                "preferred leader elected"
            } else {
                ErrorCode(p.error_code).name()
            };
            out.push_str(&format!("{}-{}\t{outcome}\n", t.topic.0, p.partition_id));
        }
    }
    Ok(out)
}

fn submit(conn: &mut super::Connection, moves: &Assignment) -> Result<()> {
    let mut by_topic: BTreeMap<&str, Vec<ReassignablePartition>> = BTreeMap::new();
    for ((topic, p), replicas) in moves {
        let mut rp = ReassignablePartition::default();
        rp.partition_index = *p;
        rp.replicas = Some(replicas.iter().map(|b| BrokerId(*b)).collect());
        by_topic.entry(topic.as_str()).or_default().push(rp);
    }
    let mut req = AlterPartitionReassignmentsRequest::default();
    req.timeout_ms = 60_000;
    for (topic, partitions) in by_topic {
        let mut t = ReassignableTopic::default();
        t.name = TopicName(topic.to_string().into());
        t.partitions = partitions;
        req.topics.push(t);
    }
    let resp: AlterPartitionReassignmentsResponse =
        conn.call(ApiKey::AlterPartitionReassignments, 0, &req)?;
    if resp.error_code != 0 {
        bail!(
            "reassignment refused: {}",
            ErrorCode(resp.error_code).name()
        );
    }
    for t in resp.responses {
        for p in t.partitions {
            if p.error_code != 0 {
                bail!(
                    "reassignment of {}-{} refused: {} {}",
                    t.name.0,
                    p.partition_index,
                    ErrorCode(p.error_code).name(),
                    p.error_message.as_deref().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(a: &Assignment) -> (BTreeMap<i32, usize>, BTreeMap<i32, usize>) {
        let mut replicas = BTreeMap::new();
        let mut leaders = BTreeMap::new();
        for r in a.values() {
            *leaders.entry(r[0]).or_default() += 1;
            for b in r {
                *replicas.entry(*b).or_default() += 1;
            }
        }
        (replicas, leaders)
    }

    #[test]
    fn a_new_broker_takes_its_share_of_replicas_and_leaders() {
        let mut current = Assignment::new();
        for p in 0..6 {
            let r: Vec<i32> = (0..3).map(|i| 1 + (p + i) % 3).collect();
            current.insert(("t".into(), p), r);
        }
        let next = plan(&current, &[1, 2, 3, 4]);
        let (replicas, leaders) = counts(&next);
        // 18 replicas over 4 brokers: 4 or 5 each; 6 leaders: 1 or 2 each.
        assert!(
            replicas.values().all(|c| (4..=5).contains(c)),
            "{replicas:?}"
        );
        assert!(leaders.values().all(|c| (1..=2).contains(c)), "{leaders:?}");
        assert_eq!(leaders.len(), 4);
        // Few moves: only what the new broker takes (4 or 5 replicas) changes brokers.
        let moved: usize = next
            .iter()
            .map(|(k, v)| v.iter().filter(|b| !current[k].contains(b)).count())
            .sum();
        assert!(moved <= 5, "{moved} replicas moved");
        for r in next.values() {
            let mut s = r.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), 3, "a partition lost a replica: {r:?}");
        }
        // Balanced input stays as it is.
        assert_eq!(plan(&next, &[1, 2, 3, 4]), next);
    }
}
