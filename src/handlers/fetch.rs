//! Fetch with long polling. A round reads every requested partition from its owner at once (each
//! up to its `partition_max_bytes`) and assembles the response within `max_bytes`, always letting
//! the first non-empty partition return at least one whole batch (KIP-74), and no more than
//! that one batch beyond `max_bytes`. The broker's `fetch.max.bytes` caps every request's limit. If the round found
//! fewer than `min_bytes`, the owners are asked to report when any of the partitions grows, and a
//! new round runs as soon as one does, or when `max_wait_ms` is up.
//!
//! From version 13 the request names topics by id (KIP-516): an id no topic has gets
//! `UNKNOWN_TOPIC_ID`. Versions 14–17 add nothing a consumer of one node needs (tiered storage
//! errors, follower replica state and directory ids, new-leader hints with NOT_LEADER errors that
//! a single node never returns).
//!
//! Fetch sessions (KIP-227) are in [`super::fetch_session`]: a session's request names only what
//! changed and its response only partitions with news.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{
    AbortedTransaction, FetchableTopicResponse, PartitionData,
};
use kafka_protocol::messages::{FetchRequest, FetchResponse, ProducerId};

use super::fetch_session::Plan;
use crate::cluster::TopicTable;
use crate::model::{ErrorCode, Offset, ShardId, TopicPartition};
use crate::protocol::chunked::StandIns;
use crate::shard::{
    first_of, join_all, PartitionProbe, PartitionRead, Reply, Request, Shard, TopicOwners, WaitOver,
};
use crate::storage::ReadResult;

struct Wanted {
    tp: TopicPartition,
    offset: Offset,
    max_bytes: usize,
    /// Fetch v13+ named a topic id that no topic has.
    unknown_id: bool,
    current_leader_epoch: i32,
    /// `isolation_level=read_committed`: up to the last stable offset, aborted transactions listed.
    committed: bool,
}

/// A Fetch response, with the stand-ins for its records in several pieces (see
/// [`crate::protocol::chunked`]): encode it with them.
#[derive(Default)]
pub struct Fetched {
    pub response: FetchResponse,
    pub stand_ins: StandIns,
}

pub async fn handle(shard: &Rc<Shard>, req: FetchRequest, version: i16) -> Fetched {
    let started = Instant::now();
    let committed = req.isolation_level == 1;
    let max_wait = Duration::from_millis(u64::try_from(req.max_wait_ms.max(0)).unwrap_or(0));
    let min_bytes = usize::try_from(req.min_bytes.max(0)).unwrap_or(0);
    // Versions before 3 have no overall limit; the broker's `fetch.max.bytes` caps every one.
    let requested = if version >= 3 {
        req.max_bytes
    } else {
        i32::MAX
    };
    let max_bytes = usize::try_from(requested.max(0))
        .unwrap_or(0)
        .min(shard.options.broker.fetch_response_bytes_max);
    // Version 13 on names topics by id only (KIP-516).
    let resolve = |name: &kafka_protocol::messages::TopicName, id: &uuid::Uuid| {
        if version >= 13 {
            shard.topic_by_id(id).map(|n| n.to_string())
        } else {
            Some(name.0.to_string())
        }
    };
    let plan = match shard.fetch_sessions.plan(&req, version, resolve) {
        Ok(plan) => plan,
        Err(code) => {
            let mut fetched = Fetched::default();
            fetched.response.error_code = code.0;
            return fetched;
        }
    };
    let wanted: Vec<Wanted> = plan
        .partitions
        .iter()
        .map(|(tp, p)| Wanted {
            tp: tp.clone(),
            offset: p.fetch_offset,
            max_bytes: usize::try_from(p.max_bytes.max(0))
                .unwrap_or(0)
                .min(max_bytes),
            unknown_id: version >= 13 && tp.topic.is_empty(),
            current_leader_epoch: p.current_leader_epoch,
            committed,
        })
        .collect();
    // The partitions a round reads: every one, except in an incremental session, where each owner
    // reads only those with news (see `Shard::probe_local`).
    let everyone: Vec<usize> = (0..wanted.len()).collect();
    // Per partition, the end of what was read: a wait is for data past it, so that a round short
    // of `min_bytes` waits for more rather than reading the same records again at once.
    let mut seen: Vec<Offset> = wanted.iter().map(|w| w.offset).collect();
    loop {
        let remaining = max_wait.saturating_sub(started.elapsed());
        let (at, results) = if plan.incremental {
            probe_round(shard, &plan, &wanted, &seen, remaining).await
        } else {
            (
                everyone.clone(),
                read_round(shard, &wanted, &everyone).await,
            )
        };
        let total: usize = results
            .iter()
            .map(|r| r.as_ref().map_or(0, |r| r.records.len()))
            .sum();
        let any_error = results.iter().any(|r| r.is_err());
        let elapsed = started.elapsed();
        if total >= min_bytes.max(1) || any_error || elapsed >= max_wait || wanted.is_empty() {
            return build_response(shard, &plan, &at, results, max_bytes, version);
        }
        for (i, r) in at.iter().zip(&results) {
            if let Ok(r) = r {
                let end = if wanted[*i].committed {
                    r.last_stable_offset
                } else {
                    r.high_watermark
                };
                seen[*i] = seen[*i].max(end);
            }
        }
        if !plan.incremental {
            wait_for_data(shard, &wanted, &seen, max_wait - elapsed).await;
        }
    }
}

/// Partitions read and their reads: the indices in an owner's probes, or in the fetch's
/// partitions.
type Probed = (Vec<usize>, Vec<Result<ReadResult, ErrorCode>>);

/// Asks each owner to read those of an incremental session's partitions that have news, waiting
/// up to `timeout` for data past `seen` first: the indices read, in order, and their reads.
async fn probe_round(
    shard: &Rc<Shard>,
    plan: &Plan,
    wanted: &[Wanted],
    seen: &[Offset],
    timeout: Duration,
) -> Probed {
    let table = shard.topics();
    let mut topics = TopicRuns::new(shard);
    let mut read: Vec<(usize, Result<ReadResult, ErrorCode>)> = Vec::new();
    let mut by_owner: BTreeMap<usize, (Vec<usize>, Vec<PartitionProbe>)> = BTreeMap::new();
    for (i, w) in wanted.iter().enumerate() {
        match topics.owner_of(w, &table) {
            Err(code) => read.push((i, Err(code))),
            Ok(owner) => {
                let (indices, probes) = by_owner.entry(owner).or_default();
                indices.push(i);
                probes.push(PartitionProbe {
                    tp: w.tp.clone(),
                    offset: w.offset,
                    seen: seen[i],
                    max_bytes: w.max_bytes,
                    current_leader_epoch: w.current_leader_epoch,
                    committed: w.committed,
                    sent: plan.partitions[i].1.sent,
                });
            }
        }
    }
    // No wait when there is an error to report already; rounded up, as a wait of under a
    // millisecond is still a wait, not a spin.
    let timeout_ms = if read.is_empty() {
        u64::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(u64::MAX)
    } else {
        0
    };
    // Shared, not copied: a wait is asked again without one if another owner ends it.
    let owners: Vec<(ShardId, Vec<usize>, Arc<[PartitionProbe]>)> = by_owner
        .into_iter()
        .map(|(owner, (indices, probes))| (ShardId(owner), indices, probes.into()))
        .collect();
    let over = WaitOver::default();
    let ask = |owner: ShardId, probes: Arc<[PartitionProbe]>, timeout_ms: u64| {
        let shard = shard.clone();
        let over = over.clone();
        let asked = probes.len();
        Box::pin(async move {
            if owner == shard.id {
                shard.probe_local(&probes, timeout_ms, &over).await
            } else {
                let probe = Request::Probe {
                    probes,
                    timeout_ms,
                    over,
                };
                match shard.call(owner, probe).await {
                    Reply::Probed(news, reads) => (news, reads),
                    _ => (
                        (0..asked).collect(),
                        vec![Err(ErrorCode::UNKNOWN_SERVER_ERROR); asked],
                    ),
                }
            }
        })
    };
    let mut answers: Vec<Option<Probed>> = vec![None; owners.len()];
    if timeout_ms > 0 && owners.len() > 1 {
        // The first owner to see data ends the wait, and the others are asked again without one.
        let mut waits: Vec<_> = owners
            .iter()
            .map(|(owner, _, probes)| ask(*owner, probes.clone(), timeout_ms))
            .collect();
        let (k, answer) = first_of(&mut waits, &over).await;
        answers[k] = Some(answer);
    }
    let wait_ms = if owners.len() > 1 { 0 } else { timeout_ms };
    let rest = owners
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|((owner, _, probes), _)| ask(*owner, probes.clone(), wait_ms))
        .collect();
    let mut rest = join_all(rest).await.into_iter();
    for ((_, indices, _), answer) in owners.iter().zip(answers) {
        let Some((news, reads)) = answer.or_else(|| rest.next()) else {
            continue;
        };
        for (n, r) in news.into_iter().zip(reads) {
            if let Some(i) = indices.get(n) {
                read.push((*i, r));
            }
        }
    }
    read.sort_unstable_by_key(|(i, _)| *i);
    read.into_iter().unzip()
}

/// Reads the wanted partitions at `at`: one request per owning shard, answered in `at`'s order.
async fn read_round(
    shard: &Rc<Shard>,
    wanted: &[Wanted],
    at: &[usize],
) -> Vec<Result<ReadResult, ErrorCode>> {
    let table = shard.topics();
    let mut results: Vec<Result<ReadResult, ErrorCode>> = Vec::with_capacity(at.len());
    let mut by_owner: BTreeMap<usize, (Vec<usize>, Vec<PartitionRead>)> = BTreeMap::new();
    let mut topics = TopicRuns::new(shard);
    for (i, w) in at.iter().map(|i| &wanted[*i]).enumerate() {
        results.push(match topics.owner_of(w, &table) {
            Err(code) => Err(code),
            Ok(owner) => {
                let (at, reads) = by_owner.entry(owner).or_default();
                at.push(i);
                reads.push(PartitionRead {
                    tp: w.tp.clone(),
                    offset: w.offset,
                    max_bytes: w.max_bytes,
                    current_leader_epoch: w.current_leader_epoch,
                    committed: w.committed,
                });
                Ok(ReadResult::default())
            }
        });
    }
    let calls = by_owner.into_iter().map(|(owner, (at, reads))| {
        let shard = shard.clone();
        let owner = ShardId(owner);
        async move {
            let read = if owner == shard.id {
                shard.read_local(reads).await
            } else {
                match shard.call(owner, Request::Read(reads)).await {
                    Reply::Read(r) => r,
                    _ => vec![Err(ErrorCode::UNKNOWN_SERVER_ERROR); at.len()],
                }
            };
            (at, read)
        }
    });
    for (at, read) in join_all(calls.collect()).await {
        for (i, r) in at.into_iter().zip(read) {
            results[i] = r;
        }
    }
    results
}

/// Asks each owning shard to report when one of its partitions passes the fetch position; returns
/// when the first one does, or when `timeout` is up.
async fn wait_for_data(shard: &Rc<Shard>, wanted: &[Wanted], seen: &[Offset], timeout: Duration) {
    let committed = wanted.iter().any(|w| w.committed);
    let mut by_owner: BTreeMap<usize, Vec<(TopicPartition, Offset)>> = BTreeMap::new();
    let table = shard.topics();
    let mut topics = TopicRuns::new(shard);
    for (w, seen) in wanted.iter().zip(seen) {
        let (_, owners) = topics.of(&w.tp.topic, &table);
        by_owner
            .entry(owners.owner(w.tp.partition.0).0)
            .or_default()
            .push((w.tp.clone(), *seen));
    }
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let over = WaitOver::default();
    let mut waits: Vec<_> = by_owner
        .into_iter()
        .map(|(owner, positions)| {
            let shard = shard.clone();
            let over = over.clone();
            Box::pin(async move {
                shard
                    .call(
                        ShardId(owner),
                        Request::WaitForData {
                            positions,
                            timeout_ms,
                            committed,
                            over: over.clone(),
                        },
                    )
                    .await
            })
        })
        .collect();
    first_of(&mut waits, &over).await;
}

/// A Fetch's partitions come grouped by topic: what a round needs of a topic (its partition
/// count and owners) is worked out once per run of its partitions.
struct TopicRuns {
    shard_count: usize,
    last: Option<(Arc<str>, i32, TopicOwners)>,
}

impl TopicRuns {
    fn new(shard: &Shard) -> TopicRuns {
        TopicRuns {
            shard_count: shard.count,
            last: None,
        }
    }

    /// The shard that owns a wanted partition, or the error a read of it gets.
    fn owner_of(&mut self, w: &Wanted, table: &TopicTable) -> Result<usize, ErrorCode> {
        let (partitions, owners) = self.of(&w.tp.topic, table);
        if w.unknown_id {
            Err(ErrorCode::UNKNOWN_TOPIC_ID)
        } else if w.tp.partition.0 < 0 || w.tp.partition.0 >= partitions {
            Err(ErrorCode::UNKNOWN_TOPIC_OR_PARTITION)
        } else {
            Ok(owners.owner(w.tp.partition.0).0)
        }
    }

    /// The topic's partition count (0: no such topic) and owners.
    fn of(&mut self, topic: &Arc<str>, table: &TopicTable) -> (i32, &TopicOwners) {
        let same = self
            .last
            .as_ref()
            .is_some_and(|(t, _, _)| Arc::ptr_eq(t, topic) || t == topic);
        if !same {
            self.last = None;
        }
        let shard_count = self.shard_count;
        let (_, partitions, owners) = self.last.get_or_insert_with(|| {
            let partitions = table.get(topic).map_or(0, |t| t.partitions);
            (
                topic.clone(),
                partitions,
                TopicOwners::new(topic, shard_count),
            )
        });
        (*partitions, owners)
    }
}

fn build_response(
    shard: &Rc<Shard>,
    plan: &Plan,
    at: &[usize],
    results: Vec<Result<ReadResult, ErrorCode>>,
    max_bytes: usize,
    version: i16,
) -> Fetched {
    let mut stand_ins = StandIns::default();
    let mut response = FetchResponse::default();
    response.session_id = plan.session_id;
    let mut total = 0usize;
    for (k, (i, result)) in at.iter().zip(results).enumerate() {
        let (tp, p) = &plan.partitions[*i];
        let mut d = PartitionData::default();
        d.partition_index = tp.partition.0;
        d.aborted_transactions = Some(Vec::new());
        match result {
            Ok(r) => {
                d.high_watermark = r.high_watermark.0;
                d.last_stable_offset = r.last_stable_offset.0;
                if !r.aborted.is_empty() {
                    d.aborted_transactions = Some(
                        r.aborted
                            .iter()
                            .map(|a| {
                                let mut t = AbortedTransaction::default();
                                t.producer_id = ProducerId(a.producer_id);
                                t.first_offset = a.first_offset;
                                t
                            })
                            .collect(),
                    );
                }
                if version >= 5 {
                    d.log_start_offset = r.log_start_offset.0;
                }
                let len = r.records.len();
                if len > 0 && total == 0 {
                    // The first data may hold more than `max_bytes` only by its first batch.
                    let mut records = r.records;
                    let keep = records.whole_batches_within(max_bytes);
                    records.truncate(keep);
                    total = keep;
                    d.records = Some(stand_ins.records(records));
                } else if len > 0 && total + len <= max_bytes {
                    total += len;
                    d.records = Some(stand_ins.records(r.records));
                } else {
                    d.records = Some(Bytes::new());
                }
            }
            Err(code) => {
                d.error_code = code.0;
                d.high_watermark = -1;
                d.last_stable_offset = -1;
                d.records = Some(Bytes::new());
            }
        }
        if plan.session_id != 0 {
            let offsets = (d.high_watermark, d.last_stable_offset, d.log_start_offset);
            // An incremental response leaves out partitions with nothing new (KIP-227).
            let news = d.error_code != 0
                || d.records.as_ref().is_some_and(|r| !r.is_empty())
                || p.sent != Some(offsets);
            if plan.incremental && !news {
                continue;
            }
            shard.fetch_sessions.sent(plan.session_id, tp, offsets);
        }
        let same_topic = response
            .responses
            .last()
            .is_some_and(|t: &FetchableTopicResponse| {
                t.topic == p.topic && t.topic_id == p.topic_id
            });
        if !same_topic {
            let mut t = FetchableTopicResponse::default();
            t.topic = p.topic.clone();
            t.topic_id = p.topic_id;
            // Room for the topic's run of partitions at once (not regrown 10 times at 1,000).
            let run = at[k..]
                .iter()
                .map(|i| &plan.partitions[*i].1)
                .take_while(|q| q.topic == p.topic && q.topic_id == p.topic_id)
                .count();
            t.partitions.reserve(run);
            response.responses.push(t);
        }
        if let Some(t) = response.responses.last_mut() {
            t.partitions.push(d);
        }
    }
    Fetched {
        response,
        stand_ins,
    }
}
