//! A shard's part in a cluster (`controller.quorum.voters` set): the Raft groups of the partition
//! replicas it owns, its connections to the other brokers, and the leaders of every group on this
//! broker as Metadata reports them. Raft messages from other brokers arrive on any shard and are
//! handed to the owning shard over the mesh ([`Request::Raft`]); a leadership change is told to
//! every shard ([`Request::Leader`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::time::Duration;

use anyhow::{Context, Result};
use raft::eraftpb::Message;

use super::{join_all, Reply, Request, Shard};
use crate::cluster::metadata::{MetadataCommand, METADATA_TOPIC};
use crate::group::OFFSETS_TOPIC;
use crate::model::{PartitionMap, ShardId, TopicPartition};
use crate::replication::group::{Group, Limits, Role, Sink};
use crate::replication::transport::Transport;
use crate::replication::wal::WalStore;
use crate::replication::Replica;
use crate::storage::files;

/// A partition's replicas and preferred-election count as this broker last saw them, and since
/// when (either changing makes its leader hand over to the preferred replica without waiting).
struct Assigned {
    replicas: Vec<i32>,
    elections: u64,
    since: std::time::Instant,
}

pub struct ClusterNode {
    pub node_id: i32,
    pub voters: Vec<(i32, (String, u16))>,
    pub transport: Rc<Transport>,
    groups: RefCell<PartitionMap<Rc<Group>>>,
    /// Leader and leader epoch of every Raft group on this broker, as last announced.
    leaders: RefCell<PartitionMap<(i32, i32)>>,
    /// Each partition's replicas as this broker last saw them, and since when (a reassignment
    /// that completed hands leadership to its preferred replica without waiting).
    assigned: RefCell<PartitionMap<Assigned>>,
}

impl ClusterNode {
    pub fn start(
        node_id: i32,
        voters: Vec<(i32, (String, u16))>,
        inter_broker: Option<&(String, u16)>,
    ) -> ClusterNode {
        let peers: Vec<_> = voters
            .iter()
            .filter(|(id, _)| *id != node_id)
            .cloned()
            .collect();
        // Connections to peers leave from this broker's own inter-broker host.
        let own = voters.iter().find(|(id, _)| *id == node_id).map(|(_, a)| a);
        let local = inter_broker
            .or(own)
            .and_then(|(host, _)| host.parse::<std::net::IpAddr>().ok());
        ClusterNode {
            node_id,
            transport: Transport::start(&peers, local),
            voters,
            groups: RefCell::new(PartitionMap::default()),
            leaders: RefCell::new(PartitionMap::default()),
            assigned: RefCell::new(PartitionMap::default()),
        }
    }

    /// Whether this broker votes in the controller quorum (else it joined as a learner).
    pub fn is_voter(&self) -> bool {
        self.voters.iter().any(|(id, _)| *id == self.node_id)
    }

    /// Connects to the brokers that joined outside the voters, as the table names them.
    pub fn connect_joined(&self, table: &crate::cluster::TopicTable) {
        for (node, (host, port)) in &table.peers {
            if *node != self.node_id {
                self.transport.add_peer(*node, host, *port);
            }
        }
    }

    /// The Raft groups of the data partitions on this shard (the metadata group left out), with
    /// `leading` only those this broker leads.
    fn data_groups(&self, leading: bool) -> Vec<(TopicPartition, Rc<Group>)> {
        self.groups
            .borrow()
            .iter()
            .filter(|(tp, g)| &*tp.topic != METADATA_TOPIC && (!leading || g.role().leader))
            .map(|(tp, g)| (tp.clone(), g.clone()))
            .collect()
    }

    pub fn group(&self, tp: &TopicPartition) -> Option<Rc<Group>> {
        self.groups.borrow().get(tp).cloned()
    }

    /// The leader (-1: none known) and leader epoch of a partition this broker holds.
    pub fn leader_of(&self, tp: &TopicPartition) -> Option<(i32, i32)> {
        self.leaders.borrow().get(tp).copied()
    }

    pub fn remove_group(&self, tp: &TopicPartition) {
        if let Some(g) = self.groups.borrow_mut().remove(tp) {
            g.stop();
        }
        self.leaders.borrow_mut().remove(tp);
    }

    /// Stops the transport and every Raft group on this shard, and waits for the groups' drivers
    /// (clean shutdown).
    pub async fn stop_groups(&self) {
        self.transport.stop();
        let groups: Vec<Rc<Group>> = self.groups.borrow_mut().drain().map(|(_, g)| g).collect();
        join_all(groups.iter().map(|g| g.stop_and_wait()).collect()).await;
    }

    /// Every group's Raft state, for `/metrics`.
    pub fn gauges(&self) -> Vec<crate::metrics::RaftGauge> {
        self.groups
            .borrow()
            .iter()
            .map(|(tp, g)| {
                let role = g.role();
                crate::metrics::RaftGauge {
                    group: tp.to_string(),
                    leader: if role.leader_id == raft::INVALID_ID {
                        -1
                    } else {
                        i32::try_from(role.leader_id).unwrap_or(-1)
                    },
                    term: role.term,
                    commit_index: g.commit_index(),
                    in_sync: g.in_sync().len(),
                    follower_lag: g.follower_lag(),
                }
            })
            .collect()
    }

    pub fn metadata_tp() -> TopicPartition {
        TopicPartition::new(METADATA_TOPIC, 0)
    }
}

impl Shard {
    pub fn cluster(&self) -> Option<&ClusterNode> {
        self.cluster.as_ref()
    }

    /// The leader and leader epoch of a partition, as this broker best knows them: its own view
    /// where it holds a replica (the freshest), the controller's record for the others and where
    /// that has a newer epoch (a replica this broker gave up in a reassignment). `None` outside a
    /// cluster.
    pub fn partition_leader(&self, tp: &TopicPartition) -> Option<(i32, i32)> {
        let c = self.cluster()?;
        let own = c.leader_of(tp);
        let recorded = self
            .topics()
            .leaders
            .get(&(tp.topic.to_string(), tp.partition.0))
            .copied();
        Some(match (own, recorded) {
            (Some(o), Some(r)) if r.1 > o.1 => r,
            (Some(o), _) => o,
            (None, r) => r.unwrap_or((-1, -1)),
        })
    }

    /// Opens the Raft group of a partition replica this shard owns, in `dir`, over `voters`.
    /// `applied_end`: the partition already holds every batch below it.
    pub async fn open_group(
        self: &Rc<Self>,
        tp: TopicPartition,
        dir: std::path::PathBuf,
        voters: Vec<u64>,
        sink: Sink,
        applied_end: i64,
    ) -> Result<Rc<Group>> {
        let cluster = self.cluster().context("not a cluster")?;
        let id = u64::try_from(cluster.node_id).context("node id")?;
        let raw = matches!(sink, Sink::Metadata(_));
        let store = {
            let target = dir.clone();
            files::blocking(move || {
                std::fs::create_dir_all(&target)?;
                WalStore::open(&target, &voters)
            })
            .await
            .with_context(|| format!("opening the raft log in {}", dir.display()))?
        };
        let replica = if raw {
            Replica::new_raw(id, store)?
        } else {
            Replica::new(id, store, applied_end)?
        };
        let weak: Weak<Shard> = Rc::downgrade(self);
        let role_tp = tp.clone();
        let on_role = Box::new(move |role: Role| {
            let Some(shard) = weak.upgrade() else { return };
            let tp = role_tp.clone();
            glommio::spawn_local(async move { shard.announce_leader(tp, role).await }).detach();
        });
        let group = Group::new(
            tp.clone(),
            replica,
            cluster.transport.clone(),
            sink,
            on_role,
            Limits {
                lag_max: Duration::from_millis(self.options.broker.replica_lag_time_max_ms),
                compact_bytes: self.options.broker.raft_log_compact_bytes,
            },
        );
        cluster.groups.borrow_mut().insert(tp, group.clone());
        Ok(group)
    }

    async fn announce_leader(self: Rc<Self>, tp: TopicPartition, role: Role) {
        let leader = if role.leader_id == raft::INVALID_ID {
            -1
        } else {
            i32::try_from(role.leader_id).unwrap_or(-1)
        };
        let epoch = i32::try_from(role.term).unwrap_or(i32::MAX);
        let calls: Vec<_> = (0..self.count)
            .map(|i| {
                self.try_call(
                    ShardId(i),
                    Request::Leader {
                        tp: tp.clone(),
                        leader,
                        epoch,
                    },
                )
            })
            .collect();
        join_all(calls).await;
    }

    pub(super) fn record_leader(self: &Rc<Self>, tp: TopicPartition, leader: i32, epoch: i32) {
        let Some(c) = self.cluster() else { return };
        c.leaders.borrow_mut().insert(tp.clone(), (leader, epoch));
        if self.id.0 == 0 && leader == c.node_id && &*tp.topic != METADATA_TOPIC {
            // Tell the brokers that do not hold the partition, through the controller.
            let cmd = crate::cluster::metadata::MetadataCommand::Leader {
                topic: tp.topic.to_string(),
                partition: tp.partition.0,
                leader,
                epoch,
            };
            let shard = self.clone();
            glommio::spawn_local(async move { shard.controller.report(&shard, cmd).await })
                .detach();
        }
        // The group and transaction coordinators follow the leadership of their partitions.
        let coordinated =
            &*tp.topic == OFFSETS_TOPIC || &*tp.topic == crate::txn::TRANSACTION_TOPIC;
        if !coordinated || self.owner_of(&tp) != self.id {
            return;
        }
        let p = tp.partition.0;
        let groups = &*tp.topic == OFFSETS_TOPIC;
        if leader != c.node_id {
            if groups {
                self.groups.unload_partition(p);
            } else {
                self.txns.unload_partition(p);
            }
            return;
        }
        let (Some(group), Some(log)) = (c.group(&tp), self.partition(&tp)) else {
            return;
        };
        let shard = self.clone();
        glommio::spawn_local(async move {
            group.caught_up().await;
            let still = shard
                .cluster()
                .and_then(|c| c.leader_of(&tp))
                .is_some_and(|(l, e)| l == leader && e == epoch);
            if !still {
                return;
            }
            if groups {
                shard.groups.take_over(&log, p).await;
                tracing::info!(partition = %tp, epoch, "coordinating the groups of this partition");
            } else {
                let coordinator = shard.txns.clone();
                coordinator.take_over(&shard, &log, p).await;
                tracing::info!(partition = %tp, epoch, "coordinating the transactions of this partition");
            }
        })
        .detach();
    }

    /// Accepts broker-to-broker connections on this shard's inter-broker socket.
    pub fn serve_peers(self: &Rc<Self>, socket: socket2::Socket) {
        use std::os::unix::io::{FromRawFd, IntoRawFd};
        // SAFETY: the fd comes from a socket2 listening socket handed over whole (into_raw_fd
        // gives up ownership), so the glommio listener is its only owner.
        let listener = unsafe { glommio::net::TcpListener::from_raw_fd(socket.into_raw_fd()) };
        let weak = Rc::downgrade(self);
        let deliver: crate::replication::transport::Deliver = Rc::new(move |messages| {
            if let Some(shard) = weak.upgrade() {
                shard.deliver_raft(messages);
            }
        });
        let shard = self.clone();
        glommio::spawn_local(async move {
            let stopped = {
                let shard = shard.clone();
                async move { shard.stopped().await }
            };
            crate::replication::transport::serve(listener, stopped, deliver).await;
        })
        .detach();
        glommio::spawn_local(watch(Rc::downgrade(self))).detach();
    }

    /// The ISR changes of the partitions this shard leads that the table does not show yet.
    fn isr_changes(&self) -> Vec<MetadataCommand> {
        let Some(cluster) = self.cluster() else {
            return Vec::new();
        };
        let table = self.topics();
        let groups = cluster.groups.borrow();
        groups
            .iter()
            .filter(|(tp, g)| &*tp.topic != METADATA_TOPIC && g.role().leader)
            .filter_map(|(tp, g)| {
                let (epoch, isr) = (g.leader_epoch(), g.in_sync());
                let key = (tp.topic.to_string(), tp.partition.0);
                if table.isr.get(&key) == Some(&(epoch, isr.clone())) {
                    return None;
                }
                Some(MetadataCommand::Isr {
                    topic: key.0,
                    partition: key.1,
                    epoch,
                    isr,
                })
            })
            .collect()
    }

    /// How a replica of `tp` copies a snapshot's records: a Kafka Fetch (as a consumer: up to the
    /// high watermark) from the leader's client listener, on a blocking thread (rare, and the
    /// group waits for it anyway). Returns the records of one response.
    pub fn snapshot_copier(
        self: &Rc<Self>,
        tp: TopicPartition,
    ) -> crate::replication::group::Copier {
        let weak = Rc::downgrade(self);
        Rc::new(move |leader: u64, from: i64| {
            let address = weak.upgrade().and_then(|shard| {
                let leader = i32::try_from(leader).ok()?;
                let (host, port) = shard.topics().brokers.get(&leader)?.clone();
                Some(format!("{host}:{port}"))
            });
            let tp = tp.clone();
            Box::pin(async move {
                let address = address.context("the leader's address is not known")?;
                files::blocking(move || {
                    crate::client::cluster::fetch_from(&address, &tp.topic, tp.partition.0, from)
                })
                .await
            })
        })
    }

    /// Moves the Raft membership of every partition this shard leads towards its target: the
    /// reassignment's target replicas, else (none, or cancelled) its replicas. One change at a
    /// time, each committed before the next: a new replica joins as a learner (the leader first
    /// compacts so that it is sent a snapshot), becomes a voter once it has caught up, then the
    /// replicas that are not in the target are removed (the leader hands leadership to an
    /// in-sync target replica before removing itself). Once the membership is the target, the
    /// completion goes through the controller and the target becomes the replicas. Returns the
    /// completions to propose.
    fn drive_reassignments(&self) -> Vec<MetadataCommand> {
        let Some(cluster) = self.cluster() else {
            return Vec::new();
        };
        let table = self.topics();
        let me = cluster.node_id;
        let mut done = Vec::new();
        for (tp, g) in cluster.data_groups(true) {
            let key = (tp.topic.to_string(), tp.partition.0);
            let target = table.reassigning.get(&key);
            let replicas = table.replicas_of(&tp.topic, tp.partition.0);
            let Some(desired) = target.or(replicas) else {
                continue;
            };
            let desired: Vec<u64> = desired
                .iter()
                .filter_map(|id| u64::try_from(*id).ok())
                .collect();
            let (voters, learners) = g.membership();
            let change = |kind, node: u64| {
                tracing::info!(partition = %tp, ?kind, node, "replica membership change");
                if let Err(e) = g.propose_membership(kind, node) {
                    tracing::debug!(partition = %tp, error = ?e, "membership change not proposed yet");
                }
            };
            use raft::eraftpb::ConfChangeType::{AddLearnerNode, AddNode, RemoveNode};
            if let Some(&new) = desired
                .iter()
                .find(|n| !voters.contains(n) && !learners.contains(n))
            {
                if g.ready_to_add_replica() {
                    change(AddLearnerNode, new);
                }
                continue;
            }
            let last = g.last_index();
            let matches = g.follower_matches();
            let caught_up = |n: u64| matches.iter().any(|(id, m)| *id == n && m + 1 >= last);
            if let Some(&learner) = learners
                .iter()
                .find(|n| desired.contains(n) && caught_up(**n))
            {
                change(AddNode, learner);
                continue;
            }
            if learners.iter().any(|n| desired.contains(n)) {
                continue;
            }
            let mine = u64::try_from(me).unwrap_or_default();
            if let Some(&gone) = voters
                .iter()
                .chain(learners.iter())
                .find(|n| !desired.contains(n))
            {
                if gone == mine {
                    if let Some(&next) = desired.iter().find(|n| caught_up(**n)) {
                        tracing::info!(partition = %tp, to = next, "leaving the replicas: handing leadership over first");
                        g.transfer_leader(next);
                    }
                } else {
                    change(RemoveNode, gone);
                }
                continue;
            }
            if let Some(target) = target {
                done.push(MetadataCommand::Reassigned {
                    topic: key.0,
                    partition: key.1,
                    replicas: target.clone(),
                });
                // The target's first replica is the preferred leader.
                if let Some(&first) = desired.first().filter(|f| **f != mine) {
                    if caught_up(first) {
                        g.transfer_leader(first);
                    }
                }
            }
        }
        done
    }

    /// Kafka's preferred leader election (`auto.leader.rebalance.enable`): a leader that is not
    /// its partition's preferred replica (the first in the assignment) hands leadership to it
    /// once the preferred replica is in sync: at once while a new partition holds no records yet
    /// (its first election is a race) or just after a reassignment, otherwise after leading for
    /// `leader.imbalance.check.interval.seconds` (a broker back from a restart gets its
    /// leadership back, not at the first moment it is in sync).
    fn prefer_leaders(&self) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        let broker = self.effective.borrow().clone();
        if !broker.auto_leader_rebalance {
            return;
        }
        let settle = Duration::from_secs(broker.leader_imbalance_check_s);
        let table = self.topics();
        let now = std::time::Instant::now();
        let mut assigned = cluster.assigned.borrow_mut();
        assigned.retain(|tp, _| cluster.groups.borrow().contains_key(tp));
        for (tp, g) in cluster.data_groups(false) {
            let key = (tp.topic.to_string(), tp.partition.0);
            let replicas = table
                .replicas_of(&tp.topic, tp.partition.0)
                .cloned()
                .unwrap_or_default();
            let elections = table.elections.get(&key).copied().unwrap_or(0);
            // What is seen for the first time counts as settled; a change is recent.
            let seen = assigned.entry(tp.clone()).or_insert_with(|| Assigned {
                replicas: replicas.clone(),
                elections,
                since: now.checked_sub(settle).unwrap_or(now),
            });
            if seen.replicas != replicas || seen.elections != elections {
                *seen = Assigned {
                    replicas: replicas.clone(),
                    elections,
                    since: now,
                };
            }
            let reassigned = now.saturating_duration_since(seen.since) < REASSIGNED_LEADER_WINDOW;
            if !g.role().leader {
                continue;
            }
            let preferred = replicas.first().copied();
            let Some(preferred) = preferred.filter(|p| *p != cluster.node_id) else {
                continue;
            };
            // A reassignment in progress decides leadership itself.
            if table.reassigning.contains_key(&key) {
                continue;
            }
            // A new partition (opened here moments ago, still empty) or a completed
            // reassignment: at once.
            let new = g.age() < REASSIGNED_LEADER_WINDOW && g.high_watermark() == 0;
            let due = new || reassigned || g.leading_for().is_some_and(|d| d >= settle);
            if due && g.in_sync().contains(&preferred) {
                tracing::info!(partition = %tp, to = preferred, "handing leadership to the preferred replica");
                if let Ok(id) = u64::try_from(preferred) {
                    g.transfer_leader(id);
                }
            }
        }
    }

    /// Hands Raft messages from another broker to the groups they belong to.
    pub(super) fn deliver_raft(self: &Rc<Self>, messages: Vec<(TopicPartition, Message)>) {
        let Some(cluster) = self.cluster() else {
            return;
        };
        let mut elsewhere: HashMap<ShardId, Vec<(TopicPartition, Message)>> = HashMap::new();
        for (tp, m) in messages {
            let owner = self.owner_of(&tp);
            if owner == self.id {
                if m.get_msg_type() == raft::eraftpb::MessageType::MsgPropose
                    && &*tp.topic == METADATA_TOPIC
                    && !self.controller.admits(self, m.from, &m.entries)
                {
                    tracing::warn!(
                        from = m.from,
                        "metadata proposal from a broker that has not joined refused"
                    );
                    continue;
                }
                match cluster.group(&tp) {
                    Some(g) => g.deliver(m),
                    None => tracing::debug!(partition = %tp, "raft message for a group not here"),
                }
            } else {
                elsewhere.entry(owner).or_default().push((tp, m));
            }
        }
        for (owner, batch) in elsewhere {
            let shard = self.clone();
            glommio::spawn_local(async move {
                if let Reply::Done = shard.call(owner, Request::Raft(batch)).await {}
            })
            .detach();
        }
    }
}

/// For this long after a partition's replicas changed (a reassignment completed) or a preferred
/// election was asked for, its leader hands leadership to the preferred replica as soon as that
/// one is in sync.
const REASSIGNED_LEADER_WINDOW: Duration = Duration::from_secs(60);

/// How often leaders compare their in-sync replicas with the table, and the controller checks
/// its brokers' liveness.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Per shard in a cluster: reports ISR changes of the partitions it leads through the controller
/// (repeated until the table shows them, so a lost proposal is made good a second later); on
/// shard 0 also fences and unfences brokers.
async fn watch(weak: Weak<Shard>) {
    loop {
        glommio::timer::sleep(WATCH_INTERVAL).await;
        let Some(shard) = weak.upgrade() else { return };
        if shard.is_stopping() {
            return;
        }
        shard.prefer_leaders();
        let mut changes = shard.isr_changes();
        changes.extend(shard.drive_reassignments());
        if !changes.is_empty() {
            // Shard 0 gone means the broker is stopping.
            if shard
                .try_call(ShardId(0), Request::Propose(changes))
                .await
                .is_none()
            {
                return;
            }
        }
        if shard.id.0 == 0 {
            shard.controller.watch_brokers(&shard);
        }
    }
}
