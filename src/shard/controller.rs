//! The controller, on shard 0: the only place the topic table changes. Changes are serialized by
//! a local semaphore (one executor, no lock), persisted before they are announced, and announced
//! to every shard before the client is answered, so that a Metadata request on any connection
//! right after CreateTopics sees the topic.
//!
//! On a single node "persisted" is `meta/cluster.meta`. In a cluster it is the metadata Raft group
//! ([`crate::cluster::metadata`]): only the group's leader (the controller Metadata names) changes
//! topics and configs, others answer `NOT_CONTROLLER`; every broker applies what commits and
//! announces it to its shards; any broker reserves producer-id blocks and registers its address
//! through the group.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_channel::oneshot;
use glommio::sync::Semaphore;

use super::cluster::ClusterNode;
use super::{Shard, TopicResult, TopicSpec};
use crate::cluster::metadata::{assign_replicas, cluster_id_for, MetadataCommand};
use crate::cluster::topics::{validate_topic_name, PRODUCER_ID_BLOCK};
use crate::cluster::{Topic, TopicTable};
use crate::config::validate_topic_setting;
use crate::model::ErrorCode;
use crate::replication::group::Sink;
use crate::replication::Applied;

/// What a config change applies to.
#[derive(Clone, Debug)]
pub enum ConfigResource {
    Topic(String),
    /// The broker's dynamic settings (resource name "" or this broker's id).
    Broker,
}

/// One IncrementalAlterConfigs operation, with Kafka's op ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigOp {
    Set = 0,
    Delete = 1,
    Append = 2,
    Subtract = 3,
}

/// A change to one resource: AlterConfigs replaces the whole set of overrides, incremental
/// changes edit it.
#[derive(Clone, Debug)]
pub struct ConfigChange {
    pub resource: ConfigResource,
    pub replace: bool,
    pub ops: Vec<(String, ConfigOp, Option<String>)>,
}

/// The most partitions one topic may have.
pub const PARTITIONS_PER_TOPIC_MAX: i32 = 10_000;

/// How long a broker waits for a metadata command it proposed to be applied.
const METADATA_WAIT: Duration = Duration::from_secs(10);

/// How long a newly elected controller waits to apply what its predecessors committed before it
/// answers a change with `NOT_CONTROLLER` (retriable) instead.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

pub struct Controller {
    table: RefCell<Option<TopicTable>>,
    changes: Semaphore,
    next_producer_id: Cell<i64>,
    /// The end of this broker's producer-id block (a cluster reserves blocks per broker).
    producer_block_end: Cell<i64>,
    /// Metadata commands this broker proposed, by tag, waiting to be applied and announced.
    waiting: RefCell<HashMap<u64, oneshot::Sender<i64>>>,
    /// Results of applied commands whose table is not announced to the shards yet.
    unannounced: RefCell<Vec<(u64, i64)>>,
    /// Bumped by every applied metadata batch; the announcer runs until it has sent the latest.
    version: Cell<u64>,
    announcing: Cell<bool>,
    /// The committed metadata log has been replayed at start: tables may be announced.
    loaded: Cell<bool>,
    /// Since when this broker leads the metadata group (as `watch_brokers` last saw).
    leading_since: Cell<Option<std::time::Instant>>,
}

impl Controller {
    pub fn new() -> Self {
        Controller {
            table: RefCell::new(None),
            changes: Semaphore::new(1),
            next_producer_id: Cell::new(0),
            producer_block_end: Cell::new(0),
            waiting: RefCell::new(HashMap::new()),
            unannounced: RefCell::new(Vec::new()),
            version: Cell::new(0),
            announcing: Cell::new(false),
            loaded: Cell::new(false),
            leading_since: Cell::new(None),
        }
    }

    /// Cluster start (shard 0): an empty table under the cluster id the voters imply, then the
    /// metadata group, whose committed log (replayed from its start) rebuilds the table; and a
    /// task that registers this broker's client address until the table has it.
    async fn load_cluster(&self, shard: &Rc<Shard>) -> Result<()> {
        let cluster = shard.cluster().context("not a cluster")?;
        let table = TopicTable {
            cluster_id: cluster_id_for(&cluster.voters),
            ..TopicTable::default()
        };
        *self.table.borrow_mut() = Some(table);
        let voters: Vec<u64> = cluster
            .voters
            .iter()
            .filter_map(|(id, _)| u64::try_from(*id).ok())
            .collect();
        let weak = Rc::downgrade(shard);
        let sink = Sink::Metadata(Box::new(move |applied| {
            if let Some(shard) = weak.upgrade() {
                shard.controller.on_metadata(&shard, applied);
            }
        }));
        let tp = ClusterNode::metadata_tp();
        let dir = shard.options.data_dir.join(tp.dir_name());
        let group = shard.open_group(tp, dir, voters, sink, 0).await?;
        if !cluster.is_voter() {
            self.join(shard, &group).await;
        }
        // The shards serve clients once they have a table: the one this broker's log held
        // committed when it stopped, replayed whole first (else a client would hear of unknown
        // topics from a broker that is still replaying, and a Kafka producer gives up on those).
        group.applied_through(group.commit_index()).await;
        self.loaded.set(true);
        // The first table goes out through the announcer, as every later one does: a second
        // broadcast running beside it would apply an older table over a newer one.
        self.announcing.set(true);
        Self::announce(shard.clone()).await;
        let weak = Rc::downgrade(shard);
        glommio::spawn_local(async move {
            loop {
                let Some(shard) = weak.upgrade() else { return };
                let node = shard.options.broker.node_id;
                let (host, port) = shard.advertised.clone();
                let registered =
                    shard.controller.current().brokers.get(&node) == Some(&(host.clone(), port));
                if registered {
                    tracing::info!(node, %host, port, "broker registered with the cluster");
                    drop(shard);
                    create_offsets_topic(weak).await;
                    return;
                }
                let cmd = MetadataCommand::Register { node, host, port };
                if let Err(e) = shard.controller.propose(&shard, &cmd) {
                    tracing::debug!(error = %format!("{e:#}"), "registration not proposed yet");
                }
                drop(shard);
                glommio::timer::sleep(Duration::from_millis(300)).await;
            }
        })
        .detach();
        Ok(())
    }

    /// A broker outside the voters asks the metadata group to take it in: it sends a `Join`
    /// proposal to every voter (a follower hands it on to the leader) until the table it receives
    /// as a learner shows it joined. Until then it has no table and serves no client.
    async fn join(&self, shard: &Rc<Shard>, group: &crate::replication::group::Group) {
        let node = shard.options.broker.node_id;
        let (host, port) = shard.advertised.clone();
        let Some((peer_host, peer_port)) = shard.options.broker.inter_broker_listen.clone() else {
            return;
        };
        let cmd = MetadataCommand::Join {
            node,
            host,
            port,
            peer_host,
            peer_port,
        };
        let Ok(data) = cmd.encode() else { return };
        let voters: Vec<i32> = shard
            .cluster()
            .map(|c| c.voters.iter().map(|(id, _)| *id).collect())
            .unwrap_or_default();
        let mut attempts = 0u32;
        while !self.current().peers.contains_key(&node) {
            if shard.is_stopping() {
                return;
            }
            for voter in &voters {
                let mut m = raft::eraftpb::Message::default();
                m.set_msg_type(raft::eraftpb::MessageType::MsgPropose);
                m.to = u64::try_from(*voter).unwrap_or_default();
                m.from = u64::try_from(node).unwrap_or_default();
                m.mut_entries().push(raft::eraftpb::Entry {
                    data: data.clone().into(),
                    ..Default::default()
                });
                group.send_raw(&m);
            }
            attempts += 1;
            if attempts % 20 == 1 {
                tracing::info!(node, "asking the controller quorum to join the cluster");
            }
            glommio::timer::sleep(Duration::from_millis(500)).await;
        }
        tracing::info!(
            node,
            "joined the cluster as a broker outside the controller quorum"
        );
    }

    /// Whether a proposal for the metadata group that arrived from another broker may go in: any
    /// from a voter or a broker that joined; from any other node only its own `Join` (the
    /// inter-broker port is not a way to write arbitrary cluster metadata).
    pub fn admits(&self, shard: &Shard, from: u64, entries: &[raft::eraftpb::Entry]) -> bool {
        let Ok(from) = i32::try_from(from) else {
            return false;
        };
        let known = shard
            .cluster()
            .is_some_and(|c| c.voters.iter().any(|(id, _)| *id == from))
            || self.current().peers.contains_key(&from);
        known
            || entries.iter().all(|e| {
                matches!(MetadataCommand::decode(e.get_data()),
                    Ok(MetadataCommand::Join { node, .. }) if node == from)
            })
    }

    /// The controller takes every joined broker into the metadata group as a learner (it
    /// receives the log, it does not vote). Called about once a second on shard 0; a change
    /// lost with a leader change is proposed again.
    fn admit_learners(&self, group: &crate::replication::group::Group) {
        let (voters, learners) = group.membership();
        for &node in self.current().peers.keys() {
            let Ok(id) = u64::try_from(node) else {
                continue;
            };
            if voters.contains(&id) || learners.contains(&id) {
                continue;
            }
            tracing::info!(
                node,
                "adding a joined broker to the metadata group as a learner"
            );
            if let Err(e) =
                group.propose_membership(raft::eraftpb::ConfChangeType::AddLearnerNode, id)
            {
                tracing::debug!(node, error = ?e, "learner not proposed yet");
            }
            // One membership change at a time: raft-rs refuses a second one pending.
            return;
        }
    }

    fn metadata_group(shard: &Shard) -> Option<Rc<crate::replication::group::Group>> {
        shard
            .cluster()
            .and_then(|c| c.group(&ClusterNode::metadata_tp()))
    }

    /// In a cluster, this broker is the controller only while it leads the metadata group.
    fn not_controller(&self, shard: &Shard) -> bool {
        shard.cluster().is_some() && !Self::metadata_group(shard).is_some_and(|g| g.role().leader)
    }

    /// Takes the right to change the table (one change at a time), if this broker may decide
    /// now; else the error to answer: `NOT_CONTROLLER` (retriable) or, if the change queue is
    /// gone, `UNKNOWN_SERVER_ERROR`.
    async fn begin_change(
        &self,
        shard: &Shard,
    ) -> Result<glommio::sync::Permit<'_>, (ErrorCode, &'static str)> {
        let Ok(permit) = self.changes.acquire_permit(1).await else {
            return Err((ErrorCode::UNKNOWN_SERVER_ERROR, "The broker is stopping."));
        };
        if !self.acting(shard).await {
            return Err((
                ErrorCode::NOT_CONTROLLER,
                "This broker is not the controller.",
            ));
        }
        Ok(permit)
    }

    /// Whether this broker may decide on the table now. A freshly elected leader of the metadata
    /// group has not yet applied what former controllers committed (it learns the commit point
    /// only when an entry of its own term commits), so it waits for that first: a decision on the
    /// lagging table would assign replicas from a broker list still empty, or write back a table
    /// that drops a topic created a moment earlier.
    async fn acting(&self, shard: &Shard) -> bool {
        if shard.cluster().is_none() {
            return true;
        }
        let Some(group) = Self::metadata_group(shard) else {
            return false;
        };
        if !group.role().leader {
            return false;
        }
        let caught_up = glommio::timer::timeout(CATCH_UP_WAIT, async {
            group.caught_up().await;
            Ok(())
        })
        .await
        .is_ok();
        caught_up && group.role().leader
    }

    /// Proposes a command until the table shows it applied or a newer fact replaced it (a
    /// leader report: retried while the metadata group has no leader).
    pub async fn report(&self, shard: &Rc<Shard>, cmd: MetadataCommand) {
        let MetadataCommand::Leader {
            topic,
            partition,
            epoch,
            ..
        } = &cmd
        else {
            return;
        };
        let key = (topic.clone(), *partition);
        for _ in 0..100 {
            let known = self.current().leaders.get(&key).map_or(-1, |(_, e)| *e);
            if known >= *epoch {
                return;
            }
            if let Err(e) = self.propose(shard, &cmd) {
                tracing::debug!(error = %format!("{e:#}"), "leader report not proposed yet");
            }
            glommio::timer::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Proposes a command that its proposer repeats until the table shows it (an ISR report):
    /// a refusal is only logged.
    pub fn propose_once(&self, shard: &Shard, cmd: &MetadataCommand) {
        if let Err(e) = self.propose(shard, cmd) {
            tracing::debug!(error = %format!("{e:#}"), "metadata report not proposed yet");
        }
    }

    /// The controller fences brokers it has not heard from within `broker.session.timeout.ms`
    /// and unfences them when it hears from them again (KRaft's broker heartbeats; here any Raft
    /// message of the metadata group counts). Called about once a second on shard 0.
    pub fn watch_brokers(&self, shard: &Shard) {
        let Some(group) = Self::metadata_group(shard) else {
            return;
        };
        if self.not_controller(shard) {
            self.leading_since.set(None);
            return;
        }
        self.admit_learners(&group);
        let now = std::time::Instant::now();
        let since = self.leading_since.get().unwrap_or(now);
        self.leading_since.set(Some(since));
        let timeout = Duration::from_millis(shard.options.broker.broker_session_timeout_ms);
        let heard: HashMap<i32, Duration> = group.heard().into_iter().collect();
        let table = self.current();
        for &node in table.brokers.keys() {
            let silent = if node == shard.options.broker.node_id {
                Duration::ZERO
            } else {
                // A new controller gives every broker a full session from its election.
                let since_leading = now.saturating_duration_since(since);
                heard
                    .get(&node)
                    .copied()
                    .unwrap_or(since_leading)
                    .min(since_leading)
            };
            let fenced = table.fenced.contains(&node);
            if silent >= timeout && !fenced {
                tracing::warn!(
                    node,
                    silent_ms = silent.as_millis() as u64,
                    "fencing a broker the controller no longer hears from"
                );
                self.propose_once(shard, &MetadataCommand::Fence { node, fenced: true });
            } else if silent < timeout && fenced {
                tracing::info!(node, "unfencing a broker the controller hears from again");
                self.propose_once(
                    shard,
                    &MetadataCommand::Fence {
                        node,
                        fenced: false,
                    },
                );
            }
        }
    }

    fn propose(&self, shard: &Shard, cmd: &MetadataCommand) -> Result<()> {
        let group = Self::metadata_group(shard).context("no metadata group")?;
        group
            .propose_command(cmd.encode()?)
            .map_err(|e| anyhow::anyhow!("metadata proposal refused: {e:?}"))
    }

    /// Proposes a command with a tag and waits until it is applied and announced; returns its
    /// result (a producer-id block's first id).
    async fn propose_and_wait(
        &self,
        shard: &Shard,
        tag: u64,
        cmd: &MetadataCommand,
    ) -> Result<i64> {
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(tag, tx);
        if let Err(e) = self.propose(shard, cmd) {
            self.waiting.borrow_mut().remove(&tag);
            return Err(e);
        }
        match glommio::timer::timeout(METADATA_WAIT, async { Ok(rx.await) }).await {
            Ok(Ok(v)) => Ok(v),
            _ => {
                self.waiting.borrow_mut().remove(&tag);
                bail!("the metadata change was not committed in time")
            }
        }
    }

    /// Applies committed metadata commands (the metadata group's driver calls this), then has
    /// the new table announced to every shard, in order, before waiting proposers are answered.
    fn on_metadata(&self, shard: &Rc<Shard>, applied: Vec<Applied>) {
        {
            let mut guard = self.table.borrow_mut();
            let Some(table) = guard.as_mut() else { return };
            for a in applied {
                match MetadataCommand::decode(&a.batch) {
                    Ok(cmd) => {
                        if let Some(result) = cmd.apply(table) {
                            self.unannounced.borrow_mut().push(result);
                        }
                    }
                    Err(e) => {
                        tracing::error!(index = a.index, error = %format!("{e:#}"), "undecodable metadata entry skipped")
                    }
                }
            }
        }
        self.version.set(self.version.get() + 1);
        if !self.loaded.get() || self.announcing.replace(true) {
            return;
        }
        glommio::spawn_local(Self::announce(shard.clone())).detach();
    }

    /// Announces the table to every shard until no metadata arrived during the broadcast, then
    /// answers the commands that waited for it. Runs once at a time (`announcing`), so that the
    /// shards apply the tables in order.
    async fn announce(shard: Rc<Shard>) {
        loop {
            let version = shard.controller.version.get();
            let table = shard.controller.current();
            let results: Vec<(u64, i64)> = shard
                .controller
                .unannounced
                .borrow_mut()
                .drain(..)
                .collect();
            shard.broadcast_topics(Arc::new(table)).await;
            for (tag, value) in results {
                if let Some(tx) = shard.controller.waiting.borrow_mut().remove(&tag) {
                    let _ = tx.send(value);
                }
            }
            if shard.controller.version.get() == version {
                shard.controller.announcing.set(false);
                return;
            }
        }
    }

    /// Loads the persisted table (shard 0 at start) and announces it to every shard.
    pub async fn load(&self, shard: &Rc<Shard>) -> Result<()> {
        if shard.cluster().is_some() {
            return self.load_cluster(shard).await;
        }
        let table = TopicTable::load_or_init(&shard.options.data_dir).await?;
        tracing::info!(
            cluster_id = %table.cluster_id,
            topics = table.topics.len(),
            "cluster metadata loaded"
        );
        self.next_producer_id.set(table.producer_id_block_end);
        retire_orphans(&shard.options.data_dir, &table).await?;
        *self.table.borrow_mut() = Some(table.clone());
        let failed = shard.broadcast_topics(Arc::new(table)).await;
        if !failed.is_empty() {
            tracing::error!(
                partitions = failed.len(),
                "partitions failed to open at start; they are offline"
            );
        }
        Ok(())
    }

    fn current(&self) -> TopicTable {
        self.table
            .borrow()
            .clone()
            .expect("controller requests reach shard 0 only after it loaded the table")
    }

    /// Persists and announces a new table; returns the partitions that failed to open.
    async fn commit(
        &self,
        shard: &Rc<Shard>,
        table: TopicTable,
    ) -> Result<Vec<(crate::model::TopicPartition, String)>> {
        if shard.cluster().is_some() {
            if self.not_controller(shard) {
                bail!("this broker is not the controller");
            }
            let tag: u64 = rand_tag();
            self.propose_and_wait(shard, tag, &MetadataCommand::table(tag, &table))
                .await?;
            // Partitions open on the brokers that hold them; a failure there is that broker's
            // (logged, the partition is offline on it), not the whole cluster's.
            return Ok(Vec::new());
        }
        table.persist(&shard.options.data_dir).await?;
        *self.table.borrow_mut() = Some(table.clone());
        Ok(shard.broadcast_topics(Arc::new(table)).await)
    }

    pub async fn create_topics(
        &self,
        shard: &Rc<Shard>,
        specs: Vec<TopicSpec>,
        validate_only: bool,
    ) -> Vec<(String, TopicResult)> {
        let _permit = match self.begin_change(shard).await {
            Ok(permit) => permit,
            Err((code, message)) => {
                return specs
                    .into_iter()
                    .map(|s| (s.name, Err((code, message.to_string()))))
                    .collect()
            }
        };
        let mut table = self.current();
        let mut results = Vec::with_capacity(specs.len());
        let mut changed = false;
        let brokers: Vec<i32> = match shard.cluster() {
            Some(_) => table.brokers.keys().copied().collect(),
            None => vec![shard.options.broker.node_id],
        };
        for spec in specs {
            let mut result = check_spec(&table, &spec, &shard.options.broker, &brokers);
            if let (Ok(topic), Some(_)) = (&mut result, shard.cluster()) {
                let rf = if spec.replication_factor == -1 {
                    usize::try_from(shard.options.broker.default_replication_factor).unwrap_or(1)
                } else {
                    usize::try_from(spec.replication_factor).unwrap_or(1)
                };
                let start = table.topics.len() % brokers.len().max(1);
                topic.replicas = assign_replicas(&brokers, topic.partitions, rf, start);
            }
            match result {
                Ok(topic) => {
                    if !validate_only {
                        table.topics.insert(topic.name.clone(), topic.clone());
                        changed = true;
                    }
                    results.push((spec.name, Ok(topic)));
                }
                Err(e) => results.push((spec.name, Err(e))),
            }
        }
        if changed {
            let failed = match self.commit(shard, table.clone()).await {
                Ok(failed) => failed,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "persisting the topic table failed");
                    return failed_all(results.into_iter().map(|(n, _)| n));
                }
            };
            if !failed.is_empty() {
                return self
                    .undo_failed_creations(shard, table, results, failed)
                    .await;
            }
        }
        results
    }

    /// A topic whose partitions did not all open is not created: it is taken out of the table
    /// again (closing what did open) and answered with `KAFKA_STORAGE_ERROR` and the reason, as
    /// Kafka answers a create it could not carry out, instead of a success that leaves a topic
    /// with partitions nobody serves.
    async fn undo_failed_creations(
        &self,
        shard: &Rc<Shard>,
        mut table: TopicTable,
        results: Vec<(String, TopicResult)>,
        failed: Vec<(crate::model::TopicPartition, String)>,
    ) -> Vec<(String, TopicResult)> {
        let mut out = Vec::with_capacity(results.len());
        for (name, result) in results {
            match failed.iter().find(|(tp, _)| *tp.topic == *name) {
                Some((tp, why)) if result.is_ok() => {
                    table.topics.remove(name.as_str());
                    let count = failed.iter().filter(|(t, _)| *t.topic == *name).count();
                    let message =
                        format!("{count} partition(s) could not be created, {tp} first: {why}");
                    out.push((name, Err((ErrorCode::KAFKA_STORAGE_ERROR, message))));
                }
                _ => out.push((name, result)),
            }
        }
        if let Err(e) = self.commit(shard, table).await {
            tracing::error!(error = %format!("{e:#}"), "persisting the topic table failed");
        }
        out
    }

    pub async fn delete_topics(
        &self,
        shard: &Rc<Shard>,
        names: Vec<String>,
    ) -> Vec<(String, ErrorCode)> {
        let _permit = match self.begin_change(shard).await {
            Ok(permit) => permit,
            Err((code, _)) => return names.into_iter().map(|n| (n, code)).collect(),
        };
        let mut table = self.current();
        let mut results = Vec::with_capacity(names.len());
        let mut changed = false;
        for name in names {
            if table.topics.remove(name.as_str()).is_some() {
                changed = true;
                results.push((name, ErrorCode::NONE));
            } else {
                results.push((name, ErrorCode::UNKNOWN_TOPIC_OR_PARTITION));
            }
        }
        if changed {
            if let Err(e) = self.commit(shard, table).await {
                tracing::error!(error = %format!("{e:#}"), "persisting the topic table failed");
                return results
                    .into_iter()
                    .map(|(n, _)| (n, ErrorCode::UNKNOWN_SERVER_ERROR))
                    .collect();
            }
        }
        results
    }

    /// Applies config changes; each resource's change is validated whole and applied or refused.
    pub async fn alter_configs(
        &self,
        shard: &Rc<Shard>,
        changes: Vec<ConfigChange>,
        validate_only: bool,
    ) -> Vec<(ErrorCode, Option<String>)> {
        let _permit = match self.begin_change(shard).await {
            Ok(permit) => permit,
            Err((code, message)) => {
                return changes
                    .iter()
                    .map(|_| (code, Some(message.to_string())))
                    .collect()
            }
        };
        let mut table = self.current();
        let mut results = Vec::with_capacity(changes.len());
        let mut changed = false;
        for change in changes {
            let current = match &change.resource {
                ConfigResource::Topic(name) => match table.get(name) {
                    Some(t) => t.configs.clone(),
                    None => {
                        results.push((
                            ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                            Some(format!("Topic {name} does not exist")),
                        ));
                        continue;
                    }
                },
                ConfigResource::Broker => table.broker_configs.clone(),
            };
            let effective = shard.options.broker.with_dynamic(&table.broker_configs);
            let default_of = |name: &str| -> Option<String> {
                match name {
                    "cleanup.policy" | "log.cleanup.policy" => {
                        Some(effective.cleanup_policy.clone())
                    }
                    _ => None,
                }
            };
            let edited = match edit_configs(current, &change, default_of) {
                Ok(e) => e,
                Err(message) => {
                    results.push((ErrorCode::INVALID_CONFIG, Some(message)));
                    continue;
                }
            };
            let checked: Result<(), String> =
                edited.iter().try_for_each(|(k, v)| match &change.resource {
                    ConfigResource::Topic(_) => crate::config::validate_topic_setting(k, v),
                    ConfigResource::Broker => shard.options.broker.check_dynamic(k, v),
                });
            if let Err(message) = checked {
                results.push((ErrorCode::INVALID_CONFIG, Some(message)));
                continue;
            }
            if !validate_only {
                match &change.resource {
                    ConfigResource::Topic(name) => {
                        if let Some(t) = table.topics.get_mut(name.as_str()) {
                            t.configs = edited;
                        }
                    }
                    ConfigResource::Broker => table.broker_configs = edited,
                }
                changed = true;
            }
            results.push((ErrorCode::NONE, None));
        }
        if changed {
            if let Err(e) = self.commit(shard, table).await {
                tracing::error!(error = %format!("{e:#}"), "persisting configs failed");
                return results
                    .into_iter()
                    .map(|_| (ErrorCode::UNKNOWN_SERVER_ERROR, None))
                    .collect();
            }
        }
        results
    }

    /// Grows topics to the given partition counts (never shrinks).
    pub async fn create_partitions(
        &self,
        shard: &Rc<Shard>,
        topics: Vec<(String, i32)>,
        validate_only: bool,
    ) -> Vec<(ErrorCode, Option<String>)> {
        let _permit = match self.begin_change(shard).await {
            Ok(permit) => permit,
            Err((code, message)) => {
                return topics
                    .iter()
                    .map(|_| (code, Some(message.to_string())))
                    .collect()
            }
        };
        let mut table = self.current();
        let table_brokers: Vec<i32> = table.brokers.keys().copied().collect();
        let mut results = Vec::with_capacity(topics.len());
        let mut changed = false;
        for (name, count) in topics {
            let Some(topic) = table.topics.get_mut(name.as_str()) else {
                results.push((
                    ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    Some(format!("Topic {name} does not exist")),
                ));
                continue;
            };
            if count <= topic.partitions || count > PARTITIONS_PER_TOPIC_MAX {
                results.push((
                    ErrorCode::INVALID_PARTITIONS,
                    Some(format!(
                        "Topic currently has {} partitions, which is higher than or equal to the requested {count}.",
                        topic.partitions
                    )),
                ));
                continue;
            }
            if crate::cluster::is_internal(&topic.name) {
                // Groups and transactional ids are placed by a hash modulo this count.
                results.push((
                    ErrorCode::INVALID_REQUEST,
                    Some(format!("The partition count of {} is fixed", topic.name)),
                ));
                continue;
            }
            if !validate_only {
                if shard.cluster().is_some() {
                    let brokers: Vec<i32> = table_brokers.clone();
                    let rf = topic.replicas.first().map_or(1, Vec::len);
                    let grown = assign_replicas(&brokers, count, rf, 0);
                    let start = usize::try_from(topic.partitions).unwrap_or(0);
                    topic.replicas.extend(grown.into_iter().skip(start));
                }
                topic.partitions = count;
                changed = true;
            }
            results.push((ErrorCode::NONE, None));
        }
        if changed {
            if let Err(e) = self.commit(shard, table).await {
                tracing::error!(error = %format!("{e:#}"), "persisting partitions failed");
                return results
                    .into_iter()
                    .map(|_| (ErrorCode::UNKNOWN_SERVER_ERROR, None))
                    .collect();
            }
        }
        results
    }

    /// Starts (or, with `None`, cancels) replica reassignments, as Kafka's controller does for
    /// AlterPartitionReassignments: each target is checked (the partition exists, replicas are
    /// distinct registered brokers, the replication factor stays unless allowed to change) and
    /// committed; the partition's leader then moves its Raft membership there.
    pub async fn reassign(
        &self,
        shard: &Rc<Shard>,
        items: Vec<(String, i32, Option<Vec<i32>>)>,
        allow_rf_change: bool,
    ) -> Vec<(ErrorCode, Option<String>)> {
        let _permit = match self.begin_change(shard).await {
            Ok(permit) => permit,
            Err((code, message)) => {
                return items
                    .iter()
                    .map(|_| (code, Some(message.to_string())))
                    .collect()
            }
        };
        let mut results = Vec::with_capacity(items.len());
        for (topic, partition, target) in items {
            let table = self.current();
            let replicas = table.replicas_of(&topic, partition).cloned();
            let Some(replicas) = replicas else {
                results.push((
                    ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    Some(format!("Partition {topic}-{partition} does not exist")),
                ));
                continue;
            };
            let key = (topic.clone(), partition);
            let target = match target {
                None if !table.reassigning.contains_key(&key) => {
                    results.push((
                        ErrorCode::NO_REASSIGNMENT_IN_PROGRESS,
                        Some(format!(
                            "No reassignment of {topic}-{partition} is in progress"
                        )),
                    ));
                    continue;
                }
                None => Vec::new(),
                Some(t) => {
                    let mut seen = std::collections::BTreeSet::new();
                    let bad = if t.is_empty() || !t.iter().all(|b| seen.insert(*b)) {
                        Some("The replica list is empty or names a broker twice".to_string())
                    } else if let Some(b) = t.iter().find(|b| !table.brokers.contains_key(b)) {
                        Some(format!("Broker {b} is not registered"))
                    } else if !allow_rf_change && t.len() != replicas.len() {
                        Some(format!(
                            "The replication factor would change from {} to {}",
                            replicas.len(),
                            t.len()
                        ))
                    } else {
                        None
                    };
                    if let Some(message) = bad {
                        results.push((ErrorCode::INVALID_REPLICA_ASSIGNMENT, Some(message)));
                        continue;
                    }
                    t
                }
            };
            let tag = rand_tag();
            let cmd = MetadataCommand::Reassign {
                tag,
                topic,
                partition,
                target,
            };
            match self.propose_and_wait(shard, tag, &cmd).await {
                Ok(_) => results.push((ErrorCode::NONE, None)),
                Err(e) => results.push((ErrorCode::REQUEST_TIMED_OUT, Some(format!("{e:#}")))),
            }
        }
        results
    }

    /// Hands out a producer id never used before, persisting a new block when one runs out.
    pub async fn allocate_producer_id(&self, shard: &Rc<Shard>) -> Result<i64, ErrorCode> {
        let Ok(_permit) = self.changes.acquire_permit(1).await else {
            return Err(ErrorCode::UNKNOWN_SERVER_ERROR);
        };
        if shard.cluster().is_some() {
            if self.next_producer_id.get() >= self.producer_block_end.get() {
                let tag = rand_tag();
                let node = shard.options.broker.node_id;
                let cmd = MetadataCommand::ProducerBlock { node, tag };
                let start = self.propose_and_wait(shard, tag, &cmd).await.map_err(|e| {
                    tracing::warn!(error = %format!("{e:#}"), "no producer id block");
                    ErrorCode::COORDINATOR_NOT_AVAILABLE
                })?;
                self.next_producer_id.set(start);
                self.producer_block_end.set(start + PRODUCER_ID_BLOCK);
            }
            let id = self.next_producer_id.get();
            self.next_producer_id.set(id + 1);
            return Ok(id);
        }
        let id = self.next_producer_id.get();
        let mut table = self.current();
        if id >= table.producer_id_block_end {
            table.producer_id_block_end = id + PRODUCER_ID_BLOCK;
            if let Err(e) = table.persist(&shard.options.data_dir).await {
                tracing::error!(error = %format!("{e:#}"), "persisting the producer id block failed");
                return Err(ErrorCode::UNKNOWN_SERVER_ERROR);
            }
            *self.table.borrow_mut() = Some(table);
        }
        self.next_producer_id.set(id + 1);
        Ok(id)
    }
}

impl Default for Controller {
    fn default() -> Self {
        Self::new()
    }
}

/// Deletes partition directories whose topic is not in the table: a DeleteTopics that persisted
/// the table but crashed before renaming the directories. (A directory whose topic was deleted
/// and re-created is caught when the partition opens, by its stored topic id.)
async fn retire_orphans(data_dir: &std::path::Path, table: &TopicTable) -> Result<()> {
    let known: std::collections::HashSet<String> = table
        .topics
        .values()
        .flat_map(|t| (0..t.partitions).map(move |p| format!("{}-{p}", t.name)))
        .collect();
    let dir = data_dir.to_path_buf();
    let listed = crate::storage::files::blocking(move || -> std::io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            if entry.path().join("partition.meta").is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(names)
    })
    .await?;
    for name in listed {
        if !known.contains(&name) && !name.ends_with(crate::storage::files::DELETE_SUFFIX) {
            tracing::info!(dir = %name, "partition directory of a deleted topic; deleting it");
            crate::storage::files::retire_dir(&data_dir.join(&name)).await?;
        }
    }
    Ok(())
}

fn failed_all(names: impl Iterator<Item = String>) -> Vec<(String, TopicResult)> {
    names
        .map(|n| {
            (
                n,
                Err((
                    ErrorCode::UNKNOWN_SERVER_ERROR,
                    "the topic table could not be persisted".to_string(),
                )),
            )
        })
        .collect()
}

/// The controller creates `__consumer_offsets` once the voters have registered (or after 30 s
/// with those that have), so that FindCoordinator finds it at any broker.
async fn create_offsets_topic(weak: std::rc::Weak<Shard>) {
    let since = std::time::Instant::now();
    loop {
        let Some(shard) = weak.upgrade() else { return };
        let table = shard.controller.current();
        if table.get(crate::group::OFFSETS_TOPIC).is_some() {
            return;
        }
        let voters = shard.cluster().map_or(0, |c| c.voters.len());
        let ready = table.brokers.len() >= voters || since.elapsed() > Duration::from_secs(30);
        if ready && !shard.controller.not_controller(&shard) {
            let spec = crate::handlers::groups::offsets_topic_spec(&shard);
            for (name, result) in shard
                .controller
                .create_topics(&shard, vec![spec], false)
                .await
            {
                if let Err((code, message)) = result {
                    tracing::debug!(topic = %name, ?code, %message, "offsets topic not created yet");
                }
            }
        }
        drop(shard);
        glommio::timer::sleep(Duration::from_millis(500)).await;
    }
}

/// A tag for a metadata command this broker waits on.
fn rand_tag() -> u64 {
    u64::from_le_bytes(
        uuid::Uuid::new_v4().as_bytes()[..8]
            .try_into()
            .unwrap_or_default(),
    )
}

/// Validates a topic to create against the table and the brokers, as Kafka's controller does.
fn check_spec(
    table: &TopicTable,
    spec: &TopicSpec,
    broker: &crate::config::BrokerConfig,
    brokers: &[i32],
) -> TopicResult {
    let default_partitions = broker.num_partitions;
    validate_topic_name(&spec.name).map_err(|m| (ErrorCode::INVALID_TOPIC_EXCEPTION, m))?;
    if table.get(&spec.name).is_some() {
        return Err((
            ErrorCode::TOPIC_ALREADY_EXISTS,
            format!("Topic '{}' already exists.", spec.name),
        ));
    }
    let partitions = if spec.partitions == -1 {
        default_partitions
    } else {
        spec.partitions
    };
    if partitions <= 0 || partitions > PARTITIONS_PER_TOPIC_MAX {
        return Err((
            ErrorCode::INVALID_PARTITIONS,
            format!("Number of partitions must be between 1 and {PARTITIONS_PER_TOPIC_MAX}."),
        ));
    }
    let rf = if spec.replication_factor == -1 {
        broker.default_replication_factor
    } else {
        spec.replication_factor
    };
    if rf < 1 || usize::try_from(rf).unwrap_or(usize::MAX) > brokers.len() {
        return Err((
            ErrorCode::INVALID_REPLICATION_FACTOR,
            format!(
                "Replication factor: {rf} larger than available brokers: {}.",
                brokers.len()
            ),
        ));
    }
    let mut configs = BTreeMap::new();
    for (name, value) in &spec.configs {
        validate_topic_setting(name, value).map_err(|m| (ErrorCode::INVALID_CONFIG, m))?;
        configs.insert(name.clone(), value.clone());
    }
    Ok(Topic {
        name: Arc::from(spec.name.as_str()),
        id: *uuid::Uuid::new_v4().as_bytes(),
        partitions,
        configs,
        replicas: Vec::new(),
    })
}

/// Applies a change to a resource's current overrides; list ops apply to list-typed configs.
fn edit_configs(
    mut current: BTreeMap<String, String>,
    change: &ConfigChange,
    default_of: impl Fn(&str) -> Option<String>,
) -> Result<BTreeMap<String, String>, String> {
    if change.replace {
        current.clear();
    }
    for (name, op, value) in &change.ops {
        match op {
            ConfigOp::Set => {
                let Some(v) = value else {
                    return Err(format!("Config {name} needs a value"));
                };
                current.insert(name.clone(), v.clone());
            }
            ConfigOp::Delete => {
                current.remove(name);
            }
            ConfigOp::Append | ConfigOp::Subtract => {
                if name != "cleanup.policy" && name != "log.cleanup.policy" {
                    return Err(format!(
                        "Config {name} is not a list: APPEND and SUBTRACT apply only to lists"
                    ));
                }
                let Some(v) = value else {
                    return Err(format!("Config {name} needs a value"));
                };
                // As Kafka: an unset list starts from its default value.
                let base = current.get(name).cloned().or_else(|| default_of(name));
                let mut items: Vec<String> = base
                    .map(|s| {
                        s.split(',')
                            .map(|x| x.trim().to_string())
                            .filter(|x| !x.is_empty())
                            .collect()
                    })
                    .unwrap_or_default();
                for item in v.split(',').map(str::trim).filter(|x| !x.is_empty()) {
                    if *op == ConfigOp::Append {
                        if !items.iter().any(|i| i == item) {
                            items.push(item.to_string());
                        }
                    } else {
                        items.retain(|i| i != item);
                    }
                }
                if items.is_empty() {
                    current.remove(name);
                } else {
                    current.insert(name.clone(), items.join(","));
                }
            }
        }
    }
    Ok(current)
}
