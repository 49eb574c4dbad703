//! The single-node controller, on shard 0: the only place the topic table changes. Changes are
//! serialized by a local semaphore (one executor, no lock), persisted before they are announced,
//! and announced to every shard before the client is answered, so that a Metadata request on any
//! connection right after CreateTopics sees the topic.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::Result;
use glommio::sync::Semaphore;

use super::{Shard, TopicResult, TopicSpec};
use crate::cluster::topics::{validate_topic_name, PRODUCER_ID_BLOCK};
use crate::cluster::{Topic, TopicTable};
use crate::config::validate_topic_setting;
use crate::model::ErrorCode;

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

pub struct Controller {
    table: RefCell<Option<TopicTable>>,
    changes: Semaphore,
    next_producer_id: Cell<i64>,
}

impl Controller {
    pub fn new() -> Self {
        Controller {
            table: RefCell::new(None),
            changes: Semaphore::new(1),
            next_producer_id: Cell::new(0),
        }
    }

    /// Loads the persisted table (shard 0 at start) and announces it to every shard.
    pub async fn load(&self, shard: &Rc<Shard>) -> Result<()> {
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
        let Ok(_permit) = self.changes.acquire_permit(1).await else {
            return failed_all(specs.iter().map(|s| s.name.clone()));
        };
        let mut table = self.current();
        let mut results = Vec::with_capacity(specs.len());
        let mut changed = false;
        for spec in specs {
            let result = check_spec(&table, &spec, shard.options.broker.num_partitions);
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
        let Ok(_permit) = self.changes.acquire_permit(1).await else {
            return names
                .into_iter()
                .map(|n| (n, ErrorCode::UNKNOWN_SERVER_ERROR))
                .collect();
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
        let Ok(_permit) = self.changes.acquire_permit(1).await else {
            return changes
                .iter()
                .map(|_| (ErrorCode::UNKNOWN_SERVER_ERROR, None))
                .collect();
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
        let Ok(_permit) = self.changes.acquire_permit(1).await else {
            return topics
                .iter()
                .map(|_| (ErrorCode::UNKNOWN_SERVER_ERROR, None))
                .collect();
        };
        let mut table = self.current();
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
            if &*topic.name == crate::group::OFFSETS_TOPIC {
                results.push((
                    ErrorCode::INVALID_REQUEST,
                    Some("The partition count of __consumer_offsets is fixed".to_string()),
                ));
                continue;
            }
            if !validate_only {
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

    /// Hands out a producer id never used before, persisting a new block when one runs out.
    pub async fn allocate_producer_id(&self, shard: &Rc<Shard>) -> Result<i64, ErrorCode> {
        let Ok(_permit) = self.changes.acquire_permit(1).await else {
            return Err(ErrorCode::UNKNOWN_SERVER_ERROR);
        };
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

/// Validates a topic to create against the table, as Kafka's controller does.
fn check_spec(table: &TopicTable, spec: &TopicSpec, default_partitions: i32) -> TopicResult {
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
    if spec.replication_factor != -1 && spec.replication_factor != 1 {
        return Err((
            ErrorCode::INVALID_REPLICATION_FACTOR,
            format!(
                "Replication factor: {} larger than available brokers: 1.",
                spec.replication_factor
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
