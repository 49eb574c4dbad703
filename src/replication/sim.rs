//! A deterministic simulation of replicated partitions: several nodes, each with one
//! [`Replica`] per partition over raft-rs's in-memory log (the node's "disk"), driven in one
//! thread by a seeded scheduler that loses, delays, duplicates and reorders messages, cuts links
//! and crashes and restarts nodes. After every step it checks what a Kafka client relies on:
//!
//! - no two nodes hold different committed batches at one offset;
//! - a node's committed offsets are dense and its commit point never moves back (in memory while
//!   it runs, on disk across crashes);
//! - everything acknowledged (committed at the leader that proposed it) is, at that offset, on
//!   every node that has committed that far; and at the end, with faults healed, on every node.
//!
//! A failure names the seed; `STROM_SIM_SEED=<seed> cargo test --lib replication::sim` replays
//! it, `STROM_SIM_SEEDS` and `STROM_SIM_STEPS` make the run longer.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use raft::eraftpb::{ConfState, Message};
use raft::storage::MemStorage;
use raft::Storage;

use super::replica::{Applied, Durable, Replica};
use crate::storage::batch::tests::make_batch;

/// SplitMix64: small, seedable, good enough to schedule faults.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

struct Faults {
    loss_per_mille: u64,
    dup_per_mille: u64,
    max_delay: u64,
    crash_per_mille: u64,
    cut_per_mille: u64,
    propose_per_mille: u64,
}

const FAULTY: Faults = Faults {
    loss_per_mille: 100,
    dup_per_mille: 30,
    max_delay: 6,
    crash_per_mille: 4,
    cut_per_mille: 6,
    propose_per_mille: 300,
};

const CALM: Faults = Faults {
    loss_per_mille: 0,
    dup_per_mille: 0,
    max_delay: 1,
    crash_per_mille: 0,
    cut_per_mille: 0,
    propose_per_mille: 0,
};

struct Node {
    /// The node's disk: one Raft log per partition, kept across crashes.
    stores: Vec<MemStorage>,
    /// Running replicas; None while the node is down.
    replicas: Vec<Option<Replica<MemStorage>>>,
    /// What each partition committed, as this node applied it since it (re)started.
    committed: Vec<BTreeMap<i64, Applied>>,
    down_until: Option<u64>,
    /// Commit index on disk per partition, at its highest so far.
    disk_commit: Vec<u64>,
    /// A Ready cycle whose store sync is still "in flight" (as the broker's blocking-thread
    /// fdatasync is): messages are stepped and proposals made meanwhile, as in production.
    durable: Vec<Option<Durable>>,
}

struct Flight {
    at: u64,
    partition: usize,
    msg: Message,
}

struct Sim {
    seed: u64,
    rng: Rng,
    now: u64,
    nodes: Vec<Node>,
    partitions: usize,
    net: Vec<Flight>,
    cut: BTreeSet<(u64, u64)>,
    /// Proposals waiting for their commit: partition, node, (base offset, term).
    pending: Vec<(usize, usize, (i64, u64))>,
    /// Acknowledged batches per partition by base offset.
    acked: Vec<BTreeMap<i64, Bytes>>,
    next_record_id: i64,
}

impl Sim {
    fn new(seed: u64, nodes: usize, partitions: usize) -> Sim {
        let voters: Vec<u64> = (1..=nodes as u64).collect();
        let mut all = Vec::new();
        for id in 1..=nodes as u64 {
            let stores: Vec<MemStorage> = (0..partitions)
                .map(|_| MemStorage::new_with_conf_state(ConfState::from((voters.clone(), vec![]))))
                .collect();
            let replicas = stores
                .iter()
                .map(|s| Some(Replica::new(id, s.clone(), 0).expect("replica starts")))
                .collect();
            all.push(Node {
                stores,
                replicas,
                committed: vec![BTreeMap::new(); partitions],
                down_until: None,
                disk_commit: vec![0; partitions],
                durable: (0..partitions).map(|_| None).collect(),
            });
        }
        Sim {
            seed,
            rng: Rng(seed),
            now: 0,
            nodes: all,
            partitions,
            net: Vec::new(),
            cut: BTreeSet::new(),
            pending: Vec::new(),
            acked: vec![BTreeMap::new(); partitions],
            next_record_id: 1,
        }
    }

    fn fail(&self, why: String) -> ! {
        panic!(
            "replication simulation, seed {}, step {}: {why}",
            self.seed, self.now
        );
    }

    fn alive(&self, node: usize) -> bool {
        self.nodes[node].down_until.is_none()
    }

    fn crash(&mut self, node: usize, until: u64) {
        let n = &mut self.nodes[node];
        n.replicas.iter_mut().for_each(|r| *r = None);
        n.committed.iter_mut().for_each(BTreeMap::clear);
        // A sync in flight never completes: what it promised is never sent.
        n.durable.iter_mut().for_each(|d| *d = None);
        n.down_until = Some(until);
        // Messages in flight to it are lost with it; its unacknowledged proposals are not
        // acknowledged (they may still commit through a later leader, which is allowed).
        let id = node as u64 + 1;
        self.net.retain(|f| f.msg.get_to() != id);
        self.pending.retain(|(_, n, _)| *n != node);
    }

    fn restart(&mut self, node: usize) {
        let id = node as u64 + 1;
        let n = &mut self.nodes[node];
        for (p, store) in n.stores.iter().enumerate() {
            n.replicas[p] = Some(Replica::new(id, store.clone(), 0).expect("replica restarts"));
        }
        n.down_until = None;
    }

    fn step(&mut self, faults: &Faults) {
        self.now += 1;
        let count = self.nodes.len();
        // Crashes and restarts; at most one node down at a time, so the group can progress.
        for node in 0..count {
            if self.nodes[node].down_until.is_some_and(|t| t <= self.now) {
                self.restart(node);
            }
        }
        let down = (0..count).filter(|n| !self.alive(*n)).count();
        if down == 0 && self.rng.chance(faults.crash_per_mille) {
            let victim = self.rng.below(count as u64) as usize;
            let until = self.now + 5 + self.rng.below(60);
            self.crash(victim, until);
        }
        // Link cuts (both directions) that heal later.
        if self.rng.chance(faults.cut_per_mille) {
            let a = self.rng.below(count as u64) + 1;
            let b = self.rng.below(count as u64) + 1;
            if a != b {
                self.cut.insert((a.min(b), a.max(b)));
            }
        }
        if !self.cut.is_empty() && self.rng.chance(30) {
            let i = self.rng.below(self.cut.len() as u64) as usize;
            if let Some(link) = self.cut.iter().nth(i).copied() {
                self.cut.remove(&link);
            }
        }
        // Clock.
        for n in &mut self.nodes {
            for r in n.replicas.iter_mut().flatten() {
                r.tick();
            }
        }
        // Produce at whichever node believes it leads (a stale leader included).
        if self.rng.chance(faults.propose_per_mille) {
            let p = self.rng.below(self.partitions as u64) as usize;
            let leaders: Vec<usize> = (0..count)
                .filter(|n| {
                    self.nodes[*n].replicas[p]
                        .as_ref()
                        .is_some_and(|r| r.is_leader())
                })
                .collect();
            if !leaders.is_empty() {
                let node = leaders[self.rng.below(leaders.len() as u64) as usize];
                let records = 1 + self.rng.below(4) as i32;
                let batch = make_batch(0, records, self.next_record_id);
                self.next_record_id += 1;
                let replica = self.nodes[node].replicas[p].as_mut().expect("leader runs");
                if let Ok(position) = replica.propose(batch.to_vec()) {
                    self.pending.push((p, node, position));
                }
            }
        }
        // Deliver what is due, in a shuffled order.
        let mut due: Vec<Flight> = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].at <= self.now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        for k in (1..due.len()).rev() {
            let j = self.rng.below(k as u64 + 1) as usize;
            due.swap(k, j);
        }
        for f in due {
            let to = f.msg.get_to();
            let from = f.msg.get_from();
            if self.cut.contains(&(to.min(from), to.max(from))) {
                continue;
            }
            let node = (to - 1) as usize;
            if let Some(r) = self.nodes[node].replicas[f.partition].as_mut() {
                // A message from an older term or an unknown state is Raft's to ignore.
                let _ = r.step(f.msg);
            }
        }
        // Ready cycles.
        for node in 0..count {
            for p in 0..self.partitions {
                let pending = self.nodes[node].durable[p].take();
                let Some(r) = self.nodes[node].replicas[p].as_mut() else {
                    continue;
                };
                let before = r.high_watermark();
                // The cycle before completes first (the broker awaits its sync before the
                // next), then this one either completes at once or stays in flight for a step.
                let mut messages = match pending {
                    Some(d) => r.persisted(d),
                    None => Vec::new(),
                };
                let mut in_flight = None;
                let applied = match r.begin() {
                    Ok(Some(cycle)) => {
                        messages.extend(cycle.messages);
                        if self.rng.chance(500) {
                            messages.extend(r.persisted(cycle.durable));
                        } else {
                            in_flight = Some(cycle.durable);
                        }
                        cycle.applied
                    }
                    Ok(None) => Vec::new(),
                    Err(e) => self.fail(format!("node {} partition {p}: {e:#}", node + 1)),
                };
                let after = r.high_watermark();
                let disk_commit = r.store().initial_state().map_or(0, |s| s.hard_state.commit);
                if after < before {
                    self.fail(format!(
                        "node {} partition {p}: high watermark moved back from {before} to {after}",
                        node + 1
                    ));
                }
                if disk_commit < self.nodes[node].disk_commit[p] {
                    self.fail(format!(
                        "node {} partition {p}: commit index on disk moved back from {} to {disk_commit}",
                        node + 1,
                        self.nodes[node].disk_commit[p]
                    ));
                }
                self.nodes[node].disk_commit[p] = disk_commit;
                self.nodes[node].durable[p] = in_flight;
                for msg in messages {
                    if self.rng.chance(faults.loss_per_mille) {
                        continue;
                    }
                    let copies = if self.rng.chance(faults.dup_per_mille) {
                        2
                    } else {
                        1
                    };
                    for _ in 0..copies {
                        let at = self.now + 1 + self.rng.below(faults.max_delay);
                        self.net.push(Flight {
                            at,
                            partition: p,
                            msg: msg.clone(),
                        });
                    }
                }
                for a in applied {
                    self.record(node, p, a);
                }
            }
        }
        self.check();
    }

    /// A batch node `node` committed on partition `p`: dense after its last one, and the
    /// acknowledgement of a proposal of that node's.
    fn record(&mut self, node: usize, p: usize, a: Applied) {
        let committed = &mut self.nodes[node].committed[p];
        let expected = committed
            .values()
            .next_back()
            .map_or(0, |last| last.end_offset);
        if a.base_offset != expected {
            self.fail(format!(
                "node {} partition {p}: committed offset {} after {expected}",
                node + 1,
                a.base_offset
            ));
        }
        let key = (p, node, (a.base_offset, a.term));
        if let Some(i) = self.pending.iter().position(|x| *x == key) {
            self.pending.swap_remove(i);
            if let Some(old) = self.acked[p].insert(a.base_offset, a.batch.clone()) {
                if old != a.batch {
                    self.fail(format!(
                        "partition {p}: offset {} acknowledged twice with different batches",
                        a.base_offset
                    ));
                }
            }
        }
        committed.insert(a.base_offset, a);
    }

    fn check(&self) {
        for p in 0..self.partitions {
            let mut seen: BTreeMap<i64, (usize, &Bytes)> = BTreeMap::new();
            for (node, n) in self.nodes.iter().enumerate() {
                for (offset, a) in &n.committed[p] {
                    match seen.get(offset) {
                        Some((other, bytes)) if **bytes != a.batch => self.fail(format!(
                            "partition {p} offset {offset}: node {} and node {} committed different batches",
                            other + 1,
                            node + 1
                        )),
                        Some(_) => {}
                        None => {
                            seen.insert(*offset, (node, &a.batch));
                        }
                    }
                    if let Some(acked) = self.acked[p].get(offset) {
                        if *acked != a.batch {
                            self.fail(format!(
                                "partition {p} offset {offset}: node {} committed something other than what was acknowledged",
                                node + 1
                            ));
                        }
                    }
                }
            }
        }
    }

    /// Heals every fault, lets the groups settle, and checks every acknowledged batch is
    /// committed on every node.
    fn settle_and_verify(&mut self) -> (usize, usize) {
        self.cut.clear();
        for node in 0..self.nodes.len() {
            if !self.alive(node) {
                self.restart(node);
            }
        }
        for _ in 0..400 {
            self.step(&CALM);
        }
        let mut acked = 0;
        for p in 0..self.partitions {
            for (offset, bytes) in &self.acked[p] {
                acked += 1;
                for (node, n) in self.nodes.iter().enumerate() {
                    match n.committed[p].get(offset) {
                        Some(a) if a.batch == *bytes => {}
                        _ => self.fail(format!(
                            "partition {p}: acknowledged offset {offset} is missing on node {} after healing",
                            node + 1
                        )),
                    }
                }
            }
        }
        let committed = self
            .nodes
            .iter()
            .map(|n| n.committed.iter().map(BTreeMap::len).sum::<usize>())
            .min()
            .unwrap_or(0);
        (acked, committed)
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn seeded_replication_survives_loss_delay_reordering_cuts_and_crashes() {
    let steps = env_u64("STROM_SIM_STEPS", 3000);
    let seeds: Vec<u64> = match std::env::var("STROM_SIM_SEED") {
        Ok(s) => vec![s.parse().expect("STROM_SIM_SEED is a number")],
        Err(_) => {
            let base = crate::storage::partition::now_ms();
            (0..env_u64("STROM_SIM_SEEDS", 4))
                .map(|i| base.wrapping_add(i * 7919))
                .collect()
        }
    };
    for seed in seeds {
        println!("replication simulation seed {seed}: 3 nodes x 4 partitions, {steps} steps");
        let mut sim = Sim::new(seed, 3, 4);
        for _ in 0..steps {
            sim.step(&FAULTY);
        }
        let (acked, committed) = sim.settle_and_verify();
        println!(
            "seed {seed}: acknowledged {acked} batches, committed on every node {committed}, lost 0, diverged 0"
        );
        assert!(
            acked > 0,
            "seed {seed}: nothing was acknowledged: the faults left no progress"
        );
    }
}
