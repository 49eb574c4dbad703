//! The per-shard transaction coordinator: the state of every transactional id whose
//! `__transaction_state` partition this shard owns (in a cluster: leads and has loaded). State
//! lives in a `RefCell`; a request checks and changes it synchronously, writes the new state
//! durably, and only then makes it the state in memory. One request at a time works on an id:
//! another that arrives meanwhile gets `CONCURRENT_TRANSACTIONS`, which every client retries.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::Duration;

use futures_channel::oneshot;

use super::records::{self, TxnStatus, TxnValue};
use super::{partition_for_txn, TRANSACTION_TOPIC};
use crate::config::BrokerConfig;
use crate::model::{ErrorCode, ShardId, TopicPartition};
use crate::shard::{Reply, Request, Shard};
use crate::storage::partition::now_ms;
use crate::storage::txn::Outcome;
use crate::storage::PartitionLog;

/// How long EndTxn waits for its markers before answering anyway: the decision is durable, the
/// markers go on in the background, and the producer's next transaction waits for them
/// (`CONCURRENT_TRANSACTIONS`).
const END_WAIT: Duration = Duration::from_secs(10);
/// Pause between rounds of markers that could not all be written.
const MARKER_RETRY: Duration = Duration::from_millis(200);

/// A transaction request, routed to the shard that coordinates the id.
pub enum TxnCall {
    InitProducerId {
        transactional_id: String,
        timeout_ms: i32,
        /// KIP-360: the id and epoch the producer has (-1 when it has none).
        producer_id: i64,
        producer_epoch: i16,
    },
    AddPartitions {
        transactional_id: String,
        producer_id: i64,
        producer_epoch: i16,
        partitions: Vec<(String, i32)>,
        /// KIP-890: only check that the partitions are in the transaction.
        verify_only: bool,
    },
    EndTxn {
        transactional_id: String,
        producer_id: i64,
        producer_epoch: i16,
        commit: bool,
    },
    Describe {
        transactional_id: String,
    },
    List,
}

impl TxnCall {
    pub fn transactional_id(&self) -> Option<&str> {
        match self {
            TxnCall::InitProducerId {
                transactional_id, ..
            }
            | TxnCall::AddPartitions {
                transactional_id, ..
            }
            | TxnCall::EndTxn {
                transactional_id, ..
            }
            | TxnCall::Describe { transactional_id } => Some(transactional_id),
            TxnCall::List => None,
        }
    }
}

/// A transactional id as DescribeTransactions and ListTransactions show it.
#[derive(Clone, Debug)]
pub struct TxnView {
    pub transactional_id: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub state: &'static str,
    pub timeout_ms: i32,
    pub start_ms: i64,
    pub partitions: Vec<(String, i32)>,
}

pub enum TxnReply {
    Producer(Result<(i64, i16), ErrorCode>),
    /// Per partition: its error (NONE: in the transaction now).
    Partitions(Vec<((String, i32), ErrorCode)>),
    Ended(ErrorCode),
    Described(Result<TxnView, ErrorCode>),
    Listed(Vec<TxnView>),
    /// Not answered here: in a cluster, this shard does not (yet) coordinate the id.
    Refused(ErrorCode),
}

/// Removes an id from the busy set when the work on it ends, however it ends.
struct Busy {
    coordinator: Rc<TxnCoordinator>,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.coordinator.busy.borrow_mut().remove(&self.id);
    }
}

pub struct TxnCoordinator {
    txns: RefCell<HashMap<String, TxnValue>>,
    /// Ids a request or a completion is working on.
    busy: RefCell<HashSet<String>>,
    /// In a cluster: the `__transaction_state` partitions this shard coordinates.
    loaded: RefCell<HashSet<i32>>,
    config: BrokerConfig,
}

fn view(id: &str, v: &TxnValue) -> TxnView {
    TxnView {
        transactional_id: id.to_string(),
        producer_id: v.producer_id,
        producer_epoch: v.producer_epoch,
        state: v.status.name(),
        timeout_ms: v.timeout_ms,
        start_ms: v.start_ms,
        partitions: v.partitions.clone(),
    }
}

impl TxnCoordinator {
    pub fn new(config: BrokerConfig) -> Rc<Self> {
        Rc::new(TxnCoordinator {
            txns: RefCell::new(HashMap::new()),
            busy: RefCell::new(HashSet::new()),
            loaded: RefCell::new(HashSet::new()),
            config,
        })
    }

    fn partition_of(&self, id: &str) -> i32 {
        partition_for_txn(id, self.config.txn_topic_partitions)
    }

    fn log_for(&self, shard: &Shard, id: &str) -> Option<PartitionLog> {
        shard.partition(&TopicPartition::new(
            TRANSACTION_TOPIC,
            self.partition_of(id),
        ))
    }

    fn try_busy(self: &Rc<Self>, id: &str) -> Option<Busy> {
        self.busy.borrow_mut().insert(id.to_string()).then(|| Busy {
            coordinator: self.clone(),
            id: id.to_string(),
        })
    }

    /// Forgets the ids of partition `p` (this broker no longer leads it).
    pub fn unload_partition(&self, p: i32) {
        self.loaded.borrow_mut().remove(&p);
        let partitions = self.config.txn_topic_partitions;
        self.txns
            .borrow_mut()
            .retain(|id, _| partition_for_txn(id, partitions) != p);
    }

    /// Becomes the coordinator of partition `p`: its states are rebuilt from the log, and
    /// transactions found deciding are completed.
    pub async fn take_over(self: &Rc<Self>, shard: &Rc<Shard>, log: &PartitionLog, p: i32) {
        self.unload_partition(p);
        self.load(shard, log).await;
        self.loaded.borrow_mut().insert(p);
    }

    /// Replays one `__transaction_state` partition into memory, then finishes the transactions
    /// it left between decision and markers.
    pub async fn load(self: &Rc<Self>, shard: &Rc<Shard>, log: &PartitionLog) {
        let mut entries = 0usize;
        log.replay(|bytes, _| match records::decode_batches(bytes) {
            Ok(list) => {
                let mut txns = self.txns.borrow_mut();
                for (id, value) in list {
                    entries += 1;
                    match value {
                        Some(v) => txns.insert(id, v),
                        None => txns.remove(&id),
                    };
                }
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "skipping an undecodable transaction state")
            }
        })
        .await;
        let p = log.topic_partition().partition.0;
        let deciding: Vec<String> = self
            .txns
            .borrow()
            .iter()
            .filter(|(id, v)| v.status.preparing() && self.partition_of(id) == p)
            .map(|(id, _)| id.clone())
            .collect();
        if entries > 0 {
            tracing::info!(partition = %log.topic_partition(), entries, deciding = deciding.len(), "transaction states loaded");
        }
        for id in deciding {
            if let Some(busy) = self.try_busy(&id) {
                let (coordinator, shard) = (self.clone(), shard.clone());
                glommio::spawn_local(async move {
                    coordinator.complete(&shard, &id, busy).await;
                })
                .detach();
            }
        }
    }

    /// Starts the periodic abort of transactions open past their timeout.
    pub fn start_ticker(shard: &Rc<Shard>) {
        let weak = Rc::downgrade(shard);
        let every = Duration::from_millis(shard.options.broker.txn_abort_check_ms.max(1));
        glommio::spawn_local(async move {
            loop {
                glommio::timer::sleep(every).await;
                let Some(shard) = weak.upgrade() else { return };
                let coordinator = shard.txns.clone();
                coordinator.abort_timed_out(&shard).await;
                coordinator.expire_ids(&shard).await;
            }
        })
        .detach();
    }

    /// Writes the state of `id` to its partition and, once durable, makes it the state here.
    async fn persist(&self, shard: &Rc<Shard>, id: &str, value: TxnValue) -> Result<(), ErrorCode> {
        let log = self
            .log_for(shard, id)
            .ok_or(ErrorCode::COORDINATOR_NOT_AVAILABLE)?;
        let record = records::record(id, Some(&value)).map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "encoding a transaction state failed");
            ErrorCode::UNKNOWN_SERVER_ERROR
        })?;
        let batch = crate::group::records::encode_batch(vec![record], now_ms() as i64, None)
            .map_err(|_| ErrorCode::UNKNOWN_SERVER_ERROR)?;
        match shard.write_internal(&log, batch).await {
            Ok(_) => {
                self.txns.borrow_mut().insert(id.to_string(), value);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(transactional_id = id, code = ?e.code, "writing a transaction state failed");
                Err(if shard.cluster().is_some() {
                    ErrorCode::NOT_COORDINATOR
                } else {
                    ErrorCode::COORDINATOR_NOT_AVAILABLE
                })
            }
        }
    }

    pub async fn handle(self: &Rc<Self>, shard: &Rc<Shard>, call: TxnCall) -> TxnReply {
        if shard.cluster().is_some() {
            if let Some(id) = call.transactional_id() {
                if !self.loaded.borrow().contains(&self.partition_of(id)) {
                    return TxnReply::Refused(ErrorCode::COORDINATOR_LOAD_IN_PROGRESS);
                }
            }
        }
        match call {
            TxnCall::InitProducerId {
                transactional_id,
                timeout_ms,
                producer_id,
                producer_epoch,
            } => TxnReply::Producer(
                self.init_producer(
                    shard,
                    &transactional_id,
                    timeout_ms,
                    producer_id,
                    producer_epoch,
                )
                .await,
            ),
            TxnCall::AddPartitions {
                transactional_id,
                producer_id,
                producer_epoch,
                partitions,
                verify_only,
            } => TxnReply::Partitions(
                self.add_partitions(
                    shard,
                    &transactional_id,
                    producer_id,
                    producer_epoch,
                    partitions,
                    verify_only,
                )
                .await,
            ),
            TxnCall::EndTxn {
                transactional_id,
                producer_id,
                producer_epoch,
                commit,
            } => TxnReply::Ended(
                self.end_txn(
                    shard,
                    &transactional_id,
                    producer_id,
                    producer_epoch,
                    commit,
                )
                .await,
            ),
            TxnCall::Describe { transactional_id } => TxnReply::Described(
                self.txns
                    .borrow()
                    .get(&transactional_id)
                    .map(|v| view(&transactional_id, v))
                    .ok_or(ErrorCode::TRANSACTIONAL_ID_NOT_FOUND),
            ),
            TxnCall::List => {
                let loaded = self.loaded.borrow();
                let cluster = shard.cluster().is_some();
                TxnReply::Listed(
                    self.txns
                        .borrow()
                        .iter()
                        .filter(|(id, _)| !cluster || loaded.contains(&self.partition_of(id)))
                        .map(|(id, v)| view(id, v))
                        .collect(),
                )
            }
        }
    }

    /// The producer's id and epoch against the coordinator's: a newer producer with the same
    /// transactional id fenced this one (`PRODUCER_FENCED`).
    fn check_producer(
        v: &TxnValue,
        producer_id: i64,
        producer_epoch: i16,
    ) -> Result<(), ErrorCode> {
        if v.producer_id != producer_id {
            return Err(ErrorCode::INVALID_PRODUCER_ID_MAPPING);
        }
        if v.producer_epoch != producer_epoch {
            return Err(ErrorCode::PRODUCER_FENCED);
        }
        Ok(())
    }

    async fn init_producer(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        id: &str,
        timeout_ms: i32,
        producer_id: i64,
        producer_epoch: i16,
    ) -> Result<(i64, i16), ErrorCode> {
        if timeout_ms <= 0
            || u64::try_from(timeout_ms).unwrap_or(u64::MAX) > self.config.txn_timeout_ms_max
        {
            return Err(ErrorCode::INVALID_TRANSACTION_TIMEOUT);
        }
        let Some(busy) = self.try_busy(id) else {
            return Err(ErrorCode::CONCURRENT_TRANSACTIONS);
        };
        let current = self.txns.borrow().get(id).cloned();
        let now = now_ms() as i64;
        let Some(mut v) = current else {
            let pid = allocate_producer_id(shard).await?;
            let v = TxnValue {
                producer_id: pid,
                producer_epoch: 0,
                timeout_ms,
                status: TxnStatus::Empty,
                partitions: Vec::new(),
                start_ms: -1,
                update_ms: now,
            };
            self.persist(shard, id, v).await?;
            drop(busy);
            return Ok((pid, 0));
        };
        // KIP-360: a producer that names its id and epoch must be the current one (or retrying
        // the re-initialisation that bumped it).
        if producer_id >= 0
            && (producer_id != v.producer_id
                || (producer_epoch != v.producer_epoch && producer_epoch != v.producer_epoch - 1))
        {
            return Err(ErrorCode::PRODUCER_FENCED);
        }
        match v.status {
            TxnStatus::PrepareCommit | TxnStatus::PrepareAbort => {
                return Err(ErrorCode::CONCURRENT_TRANSACTIONS)
            }
            TxnStatus::Ongoing => {
                // The previous producer left a transaction open: it is aborted under a bumped
                // epoch (its markers fence that producer at every partition), then the new one
                // gets the epoch after.
                self.fence_and_abort(shard, id, busy).await?;
                return Err(ErrorCode::CONCURRENT_TRANSACTIONS);
            }
            _ => {}
        }
        if v.producer_epoch >= i16::MAX - 1 {
            // The epoch is spent: a new producer id, as Kafka does.
            v.producer_id = allocate_producer_id(shard).await?;
            v.producer_epoch = 0;
        } else {
            v.producer_epoch += 1;
        }
        v.timeout_ms = timeout_ms;
        v.status = TxnStatus::Empty;
        v.partitions.clear();
        v.start_ms = -1;
        v.update_ms = now;
        let answer = (v.producer_id, v.producer_epoch);
        self.persist(shard, id, v).await?;
        drop(busy);
        Ok(answer)
    }

    async fn add_partitions(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        id: &str,
        producer_id: i64,
        producer_epoch: i16,
        partitions: Vec<(String, i32)>,
        verify_only: bool,
    ) -> Vec<((String, i32), ErrorCode)> {
        let all = |code: ErrorCode, partitions: Vec<(String, i32)>| {
            partitions.into_iter().map(|p| (p, code)).collect()
        };
        let current = self.txns.borrow().get(id).cloned();
        let Some(mut v) = current else {
            return all(ErrorCode::INVALID_PRODUCER_ID_MAPPING, partitions);
        };
        if let Err(code) = Self::check_producer(&v, producer_id, producer_epoch) {
            return all(code, partitions);
        }
        if verify_only {
            return partitions
                .into_iter()
                .map(|p| {
                    let code = if v.status == TxnStatus::Ongoing && v.partitions.contains(&p) {
                        ErrorCode::NONE
                    } else {
                        ErrorCode::INVALID_TXN_STATE
                    };
                    (p, code)
                })
                .collect();
        }
        if v.status.preparing() {
            return all(ErrorCode::CONCURRENT_TRANSACTIONS, partitions);
        }
        let table = shard.topics();
        let unknown: Vec<bool> = partitions
            .iter()
            .map(|(t, p)| !table.get(t).is_some_and(|t| *p >= 0 && *p < t.partitions))
            .collect();
        if unknown.iter().any(|u| *u) {
            // Kafka adds none of them: the unknown ones are named, the rest not attempted.
            return partitions
                .into_iter()
                .zip(unknown)
                .map(|(p, u)| {
                    let code = if u {
                        ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
                    } else {
                        ErrorCode::OPERATION_NOT_ATTEMPTED
                    };
                    (p, code)
                })
                .collect();
        }
        let new: Vec<(String, i32)> = partitions
            .iter()
            .filter(|p| !(v.status == TxnStatus::Ongoing && v.partitions.contains(p)))
            .cloned()
            .collect();
        if new.is_empty() {
            return all(ErrorCode::NONE, partitions);
        }
        let Some(busy) = self.try_busy(id) else {
            return all(ErrorCode::CONCURRENT_TRANSACTIONS, partitions);
        };
        if v.status != TxnStatus::Ongoing {
            v.partitions.clear();
            v.start_ms = now_ms() as i64;
            v.status = TxnStatus::Ongoing;
        }
        for p in new {
            if !v.partitions.contains(&p) {
                v.partitions.push(p);
            }
        }
        if v.partitions.len() > self.config.txn_partitions_max {
            return all(ErrorCode::POLICY_VIOLATION, partitions);
        }
        v.update_ms = now_ms() as i64;
        let written = self.persist(shard, id, v).await;
        drop(busy);
        match written {
            Ok(()) => all(ErrorCode::NONE, partitions),
            Err(code) => all(code, partitions),
        }
    }

    async fn end_txn(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        id: &str,
        producer_id: i64,
        producer_epoch: i16,
        commit: bool,
    ) -> ErrorCode {
        let current = self.txns.borrow().get(id).cloned();
        let Some(mut v) = current else {
            return ErrorCode::INVALID_PRODUCER_ID_MAPPING;
        };
        if let Err(code) = Self::check_producer(&v, producer_id, producer_epoch) {
            return code;
        }
        match (v.status, commit) {
            (TxnStatus::Ongoing, _) => {}
            // A retry of an EndTxn that was answered, or whose answer was lost.
            (TxnStatus::CompleteCommit, true) | (TxnStatus::CompleteAbort, false) => {
                return ErrorCode::NONE
            }
            (TxnStatus::PrepareCommit, true) | (TxnStatus::PrepareAbort, false) => {
                return ErrorCode::CONCURRENT_TRANSACTIONS
            }
            // librdkafka and the Java client abort a transaction they never added partitions to
            // without asking; one that asks gets the same no-op.
            (TxnStatus::Empty, false) => return ErrorCode::NONE,
            _ => return ErrorCode::INVALID_TXN_STATE,
        }
        let Some(busy) = self.try_busy(id) else {
            return ErrorCode::CONCURRENT_TRANSACTIONS;
        };
        v.status = if commit {
            TxnStatus::PrepareCommit
        } else {
            TxnStatus::PrepareAbort
        };
        v.update_ms = now_ms() as i64;
        if let Err(code) = self.persist(shard, id, v).await {
            return code;
        }
        let (tx, rx) = oneshot::channel();
        let (coordinator, shard, id) = (self.clone(), shard.clone(), id.to_string());
        glommio::spawn_local(async move {
            coordinator.complete(&shard, &id, busy).await;
            let _ = tx.send(());
        })
        .detach();
        let _ = glommio::timer::timeout(END_WAIT, async { Ok(rx.await) }).await;
        ErrorCode::NONE
    }

    /// Aborts the open transaction of `id` under the next producer epoch, which fences the
    /// producer that opened it (its markers carry the new epoch).
    async fn fence_and_abort(
        self: &Rc<Self>,
        shard: &Rc<Shard>,
        id: &str,
        busy: Busy,
    ) -> Result<(), ErrorCode> {
        let Some(mut v) = self.txns.borrow().get(id).cloned() else {
            return Ok(());
        };
        if v.status != TxnStatus::Ongoing {
            return Ok(());
        }
        v.producer_epoch = v.producer_epoch.saturating_add(1);
        v.status = TxnStatus::PrepareAbort;
        v.update_ms = now_ms() as i64;
        self.persist(shard, id, v).await?;
        self.complete(shard, id, busy).await;
        Ok(())
    }

    async fn abort_timed_out(self: &Rc<Self>, shard: &Rc<Shard>) {
        let now = now_ms() as i64;
        let expired: Vec<String> = self
            .txns
            .borrow()
            .iter()
            .filter(|(_, v)| {
                v.status == TxnStatus::Ongoing
                    && v.start_ms >= 0
                    && now.saturating_sub(v.start_ms) > i64::from(v.timeout_ms)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            let Some(busy) = self.try_busy(&id) else {
                continue;
            };
            tracing::info!(transactional_id = %id, "transaction open past its timeout; aborting it");
            if let Err(code) = self.fence_and_abort(shard, &id, busy).await {
                tracing::warn!(transactional_id = %id, ?code, "aborting a timed-out transaction failed; retried later");
            }
        }
    }

    /// Forgets ids idle past `transactional.id.expiration.ms` with no transaction open: their
    /// state record is deleted (a tombstone, which compaction then removes), so that the
    /// coordinator's memory and its partition do not grow with every id ever used.
    async fn expire_ids(self: &Rc<Self>, shard: &Rc<Shard>) {
        let now = now_ms() as i64;
        let limit = i64::try_from(self.config.txn_id_expiration_ms).unwrap_or(i64::MAX);
        let idle: Vec<String> = self
            .txns
            .borrow()
            .iter()
            .filter(|(_, v)| {
                matches!(
                    v.status,
                    TxnStatus::Empty | TxnStatus::CompleteCommit | TxnStatus::CompleteAbort
                ) && now.saturating_sub(v.update_ms) > limit
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in idle {
            let Some(busy) = self.try_busy(&id) else {
                continue;
            };
            // A request may have used the id since it was found idle.
            let still_idle = self.txns.borrow().get(&id).is_some_and(|v| {
                !matches!(v.status, TxnStatus::Ongoing)
                    && !v.status.preparing()
                    && now.saturating_sub(v.update_ms) > limit
            });
            let Some(log) = self.log_for(shard, &id).filter(|_| still_idle) else {
                continue;
            };
            let Ok(record) = records::record(&id, None) else {
                continue;
            };
            let Ok(batch) = crate::group::records::encode_batch(vec![record], now, None) else {
                continue;
            };
            if shard.write_internal(&log, batch).await.is_ok() {
                self.txns.borrow_mut().remove(&id);
                tracing::info!(transactional_id = %id, "transactional id expired");
            }
            drop(busy);
        }
    }

    /// Writes the markers of a decided transaction to all its partitions, retrying until every
    /// one is written (or this shard stops coordinating the id), then records it complete.
    async fn complete(self: &Rc<Self>, shard: &Rc<Shard>, id: &str, busy: Busy) {
        loop {
            let Some(v) = self.txns.borrow().get(id).cloned() else {
                return;
            };
            let outcome = match v.status {
                TxnStatus::PrepareCommit => Outcome::Commit,
                TxnStatus::PrepareAbort => Outcome::Abort,
                _ => return,
            };
            let coordinator_epoch = self
                .log_for(shard, id)
                .map_or(0, |log| crate::storage::partition::leader_epoch(&log).0);
            let left = write_markers(
                shard,
                v.producer_id,
                v.producer_epoch,
                outcome,
                coordinator_epoch,
                &v.partitions,
            )
            .await;
            if left.is_empty() {
                let mut done = v;
                done.status = match outcome {
                    Outcome::Commit => TxnStatus::CompleteCommit,
                    Outcome::Abort => TxnStatus::CompleteAbort,
                };
                done.partitions.clear();
                done.start_ms = -1;
                done.update_ms = now_ms() as i64;
                match self.persist(shard, id, done).await {
                    Ok(()) => {
                        crate::metrics::add(
                            match outcome {
                                Outcome::Commit => crate::metrics::Counter::TransactionsCommitted,
                                Outcome::Abort => crate::metrics::Counter::TransactionsAborted,
                            },
                            1,
                        );
                        drop(busy);
                        return;
                    }
                    Err(code) => {
                        tracing::warn!(
                            transactional_id = id,
                            ?code,
                            "recording a completed transaction failed; retrying"
                        )
                    }
                }
            } else {
                tracing::debug!(
                    transactional_id = id,
                    left = left.len(),
                    "markers not all written; retrying"
                );
            }
            glommio::timer::sleep(MARKER_RETRY).await;
            if shard.cluster().is_some() && !self.loaded.borrow().contains(&self.partition_of(id)) {
                // Another broker coordinates the id now; it finishes the markers.
                return;
            }
        }
    }
}

async fn allocate_producer_id(shard: &Rc<Shard>) -> Result<i64, ErrorCode> {
    match shard.call(ShardId(0), Request::AllocateProducerId).await {
        Reply::ProducerId(result) => result,
        _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
    }
}

/// Writes a marker to each partition (through its owner shard here, or its leader broker's
/// WriteTxnMarkers). Returns the partitions still to do. A partition that no longer exists, or
/// whose producer a newer epoch already fenced, needs no marker.
pub async fn write_markers(
    shard: &Rc<Shard>,
    producer_id: i64,
    producer_epoch: i16,
    outcome: Outcome,
    coordinator_epoch: i32,
    partitions: &[(String, i32)],
) -> Vec<(String, i32)> {
    let mut local = Vec::new();
    let mut remote: HashMap<i32, Vec<(String, i32)>> = HashMap::new();
    for (topic, p) in partitions {
        let tp = TopicPartition::new(topic, *p);
        match shard.cluster() {
            None => local.push(tp),
            Some(c) => match c.leader_of(&tp) {
                Some((leader, _)) if leader == c.node_id => local.push(tp),
                Some((leader, _)) if leader >= 0 => {
                    remote.entry(leader).or_default().push((topic.clone(), *p))
                }
                _ => {
                    if shard.topics().get(topic).is_none() {
                        continue;
                    }
                    remote.entry(-1).or_default().push((topic.clone(), *p));
                }
            },
        }
    }
    let calls = local.into_iter().map(|tp| {
        let shard = shard.clone();
        async move {
            let owner = shard.owner_of(&tp);
            let reply = shard
                .call(
                    owner,
                    Request::WriteMarker {
                        tp: tp.clone(),
                        producer_id,
                        producer_epoch,
                        outcome,
                        coordinator_epoch,
                    },
                )
                .await;
            let code = match reply {
                Reply::Marker(code) => code,
                _ => ErrorCode::UNKNOWN_SERVER_ERROR,
            };
            (tp, code)
        }
    });
    let mut left = Vec::new();
    for (tp, code) in crate::shard::join_all(calls.collect()).await {
        if !marker_done(code) {
            tracing::debug!(partition = %tp, ?code, "transaction marker not written");
            left.push((tp.topic.to_string(), tp.partition.0));
        }
    }
    for (leader, list) in remote {
        if leader < 0 {
            left.extend(list);
            continue;
        }
        let sent = crate::handlers::transactions::send_markers(
            shard,
            leader,
            producer_id,
            producer_epoch,
            outcome,
            coordinator_epoch,
            &list,
        )
        .await;
        match sent {
            Ok(results) => {
                for (p, code) in results {
                    if !marker_done(code) {
                        left.push(p);
                    }
                }
            }
            Err(e) => {
                tracing::debug!(leader, error = %format!("{e:#}"), "WriteTxnMarkers failed");
                left.extend(list);
            }
        }
    }
    left
}

fn marker_done(code: ErrorCode) -> bool {
    code == ErrorCode::NONE
        || code == ErrorCode::UNKNOWN_TOPIC_OR_PARTITION
        || code == ErrorCode::INVALID_PRODUCER_EPOCH
}
