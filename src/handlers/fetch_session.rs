//! Incremental fetch sessions (KIP-227). A consumer of many partitions sends its whole partition
//! list once (epoch 0: a new session); afterwards each request (epoch 1, 2, …) names only the
//! partitions whose position or limit changed, plus those to forget, and the response carries
//! only partitions with something new: records, a moved high watermark, last stable offset or log
//! start offset, or an error.
//!
//! Sessions live on the shard whose connection created them (a connection stays on one shard).
//! A client that reconnects to another shard gets `FETCH_SESSION_ID_NOT_FOUND` and starts a new
//! session, as it would after any broker forgot its session. Ids carry the shard in their low
//! bits, so two shards never hand out the same id. At most
//! `max.incremental.fetch.session.cache.slots` sessions exist per broker (split over the
//! shards); past that the least recently used one is evicted.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use indexmap::IndexMap;
use kafka_protocol::messages::{FetchRequest, TopicName};

use crate::model::{ErrorCode, Offset, PartitionHasher, PartitionId, TopicPartition};

/// What the broker last told the client about a partition in a session, and the client's
/// position there.
#[derive(Clone, Debug)]
pub struct SessionPartition {
    pub topic: TopicName,
    pub topic_id: uuid::Uuid,
    pub fetch_offset: Offset,
    pub max_bytes: i32,
    pub current_leader_epoch: i32,
    /// High watermark, last stable offset and log start last sent (None: never sent).
    pub sent: Option<(i64, i64, i64)>,
}

struct Session {
    /// The epoch the next request must carry.
    epoch: i32,
    partitions: IndexMap<TopicPartition, SessionPartition, PartitionHasher>,
    last_used: Instant,
}

/// The partitions one Fetch reads and how its response is shaped.
pub struct Plan {
    /// The session id the response carries (0: no session).
    pub session_id: i32,
    /// An incremental response lists only partitions with news.
    pub incremental: bool,
    pub partitions: Vec<(TopicPartition, SessionPartition)>,
}

pub struct FetchSessions {
    shard: u32,
    shards: u32,
    slots: usize,
    next: Cell<u32>,
    sessions: RefCell<HashMap<i32, Session>>,
}

const FINAL_EPOCH: i32 = -1;
const INITIAL_EPOCH: i32 = 0;

impl FetchSessions {
    pub fn new(shard: usize, shards: usize, broker_slots: usize) -> FetchSessions {
        let shards = u32::try_from(shards.max(1)).unwrap_or(u32::MAX);
        FetchSessions {
            shard: u32::try_from(shard).unwrap_or(0),
            shards,
            slots: broker_slots / shards as usize,
            next: Cell::new(1),
            sessions: RefCell::new(HashMap::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn new_id(&self) -> i32 {
        loop {
            let n = self.next.get();
            self.next.set(n.wrapping_add(1).max(1));
            // Shard in the low bits; positive, never 0 (which means "no session").
            let id =
                (u64::from(n) * u64::from(self.shards) + u64::from(self.shard)) % (i32::MAX as u64);
            let id = i32::try_from(id).unwrap_or(0);
            if id > 0 && !self.sessions.borrow().contains_key(&id) {
                return id;
            }
        }
    }

    /// Works out what a Fetch reads: the request's own partitions (no session, or a new one), or
    /// the session's after applying the request's changes. `resolve` names a request topic (by
    /// id from version 13): None for an id no topic has.
    pub fn plan(
        &self,
        req: &FetchRequest,
        version: i16,
        resolve: impl Fn(&TopicName, &uuid::Uuid) -> Option<String>,
    ) -> Result<Plan, ErrorCode> {
        let listed = || {
            let mut out = Vec::new();
            for t in &req.topics {
                // One name shared by the topic's partitions, not a copy each.
                let name: Arc<str> = Arc::from(resolve(&t.topic, &t.topic_id).unwrap_or_default());
                for p in &t.partitions {
                    let tp = TopicPartition {
                        topic: name.clone(),
                        partition: PartitionId(p.partition),
                    };
                    out.push((
                        tp,
                        SessionPartition {
                            topic: t.topic.clone(),
                            topic_id: t.topic_id,
                            fetch_offset: Offset(p.fetch_offset),
                            max_bytes: p.partition_max_bytes,
                            current_leader_epoch: if version >= 9 {
                                p.current_leader_epoch
                            } else {
                                -1
                            },
                            sent: None,
                        },
                    ));
                }
            }
            out
        };
        if version < 7 || self.slots == 0 {
            return Ok(Plan {
                session_id: 0,
                incremental: false,
                partitions: listed(),
            });
        }
        let mut sessions = self.sessions.borrow_mut();
        match req.session_epoch {
            FINAL_EPOCH | INITIAL_EPOCH => {
                if req.session_id != 0 {
                    sessions.remove(&req.session_id);
                }
                let partitions = listed();
                if req.session_epoch == FINAL_EPOCH || partitions.is_empty() {
                    return Ok(Plan {
                        session_id: 0,
                        incremental: false,
                        partitions,
                    });
                }
                if sessions.len() >= self.slots {
                    let oldest = sessions
                        .iter()
                        .min_by_key(|(_, s)| s.last_used)
                        .map(|(id, _)| *id);
                    if let Some(id) = oldest {
                        sessions.remove(&id);
                    }
                }
                drop(sessions);
                let id = self.new_id();
                self.sessions.borrow_mut().insert(
                    id,
                    Session {
                        epoch: 1,
                        partitions: partitions.iter().cloned().collect(),
                        last_used: Instant::now(),
                    },
                );
                Ok(Plan {
                    session_id: id,
                    incremental: false,
                    partitions,
                })
            }
            epoch => {
                let Some(session) = sessions.get_mut(&req.session_id) else {
                    return Err(ErrorCode::FETCH_SESSION_ID_NOT_FOUND);
                };
                if session.epoch != epoch {
                    return Err(ErrorCode::INVALID_FETCH_SESSION_EPOCH);
                }
                session.epoch = if epoch == i32::MAX { 1 } else { epoch + 1 };
                session.last_used = Instant::now();
                for t in &req.forgotten_topics_data {
                    let name = resolve(&t.topic, &t.topic_id).unwrap_or_default();
                    for p in &t.partitions {
                        session
                            .partitions
                            .shift_remove(&TopicPartition::new(&name, *p));
                    }
                }
                for (tp, update) in listed() {
                    match session.partitions.get_mut(&tp) {
                        Some(p) => {
                            p.fetch_offset = update.fetch_offset;
                            p.max_bytes = update.max_bytes;
                            p.current_leader_epoch = update.current_leader_epoch;
                        }
                        None => {
                            session.partitions.insert(tp, update);
                        }
                    }
                }
                Ok(Plan {
                    session_id: req.session_id,
                    incremental: true,
                    partitions: session
                        .partitions
                        .iter()
                        .map(|(tp, p)| (tp.clone(), p.clone()))
                        .collect(),
                })
            }
        }
    }

    /// Records what a response told the client about a partition of a session.
    pub fn sent(&self, session_id: i32, tp: &TopicPartition, offsets: (i64, i64, i64)) {
        if let Some(s) = self.sessions.borrow_mut().get_mut(&session_id) {
            if let Some(p) = s.partitions.get_mut(tp) {
                p.sent = Some(offsets);
            }
        }
    }
}
