//! KIP-932 share groups: queues on top of partitions. Any number of members read the same
//! partitions; each record is *acquired* by one member at a time for a lock duration, and the
//! member acknowledges it: ACCEPT (done), RELEASE (back to the queue for anyone), REJECT (never
//! again). A record whose lock runs out is released; one delivered
//! `group.share.delivery.count.limit` times without being accepted is archived.
//!
//! Per share-partition (group, topic, partition) the state is Kafka's: the start offset (every
//! record below is done), the end offset (nothing at or above it was ever acquired), and the
//! in-flight records between, each with its state and delivery count. The in-flight window is
//! bounded by `group.share.partition.max.record.locks`: a partition with that many records in
//! flight acquires no new ones until the oldest are done.
//!
//! What is durable (written to the group's `__consumer_offsets` partition before an
//! acknowledgement is answered): the start offset and every in-flight record's state and
//! delivery count, acquired ones recorded as available, because a lock does not outlive the
//! broker. So after a crash nothing accepted is delivered again and nothing unacknowledged is
//! lost. Delivery counts of acquisitions not yet followed by an acknowledgement can be under-
//! counted by a crash, as in Kafka.
//!
//! Membership is simpler than KIP-848's: no partition is owned exclusively, so there is no
//! revocation. The `simple` assignor gives each member its share of partitions, several members
//! per partition when there are more members than partitions.
//!
//! Pure state, like [`super::consumer`]: callers pass `now` and do the reads and writes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::consumer::{Assignment, TopicId, FENCED_MEMBER_EPOCH};
use super::records::{ShareGroupValue, SharePartitionValue, ShareRangeValue};
use crate::cluster::topics::TopicTable;
use crate::model::ErrorCode;

pub const INVALID_RECORD_STATE: ErrorCode = ErrorCode(121);
pub const SHARE_SESSION_NOT_FOUND: ErrorCode = ErrorCode(122);
pub const INVALID_SHARE_SESSION_EPOCH: ErrorCode = ErrorCode(123);
pub const GROUP_MAX_SIZE_REACHED: ErrorCode = ErrorCode(81);

/// Acknowledgement types on the wire.
pub const ACK_GAP: i8 = 0;
pub const ACK_ACCEPT: i8 = 1;
pub const ACK_RELEASE: i8 = 2;
pub const ACK_REJECT: i8 = 3;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordState {
    Available,
    Acquired,
    Acknowledged,
    Archived,
}

impl RecordState {
    fn done(self) -> bool {
        matches!(self, RecordState::Acknowledged | RecordState::Archived)
    }
}

#[derive(Clone, Debug)]
struct InFlight {
    state: RecordState,
    delivery_count: i16,
    owner: Option<String>,
    lock_until: Option<Instant>,
}

/// The share-partition settings in force.
#[derive(Clone, Debug)]
pub struct Limits {
    pub lock_duration: Duration,
    pub delivery_count_limit: i16,
    pub record_locks_max: usize,
    /// `group.share.max.size`: members per share group.
    pub members_max: usize,
    /// The group config `share.isolation.level=read_committed`: records are read up to the
    /// last stable offset, and those of aborted transactions are archived, never delivered.
    pub read_committed: bool,
}

/// One run of acquired offsets with the same delivery count, as ShareFetch reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acquired {
    pub first: i64,
    pub last: i64,
    pub delivery_count: i16,
}

#[derive(Clone, Debug, Default)]
pub struct SharePartition {
    pub start_offset: i64,
    pub end_offset: i64,
    records: BTreeMap<i64, InFlight>,
}

impl SharePartition {
    pub fn new(start_offset: i64) -> Self {
        SharePartition {
            start_offset,
            end_offset: start_offset,
            records: BTreeMap::new(),
        }
    }

    /// Where the next read should start: the first available in-flight record, else the end.
    pub fn next_read_offset(&self) -> i64 {
        self.records
            .iter()
            .find(|(_, r)| r.state == RecordState::Available)
            .map_or(self.end_offset, |(o, _)| *o)
    }

    /// Records in flight (any state above the start offset).
    pub fn in_flight(&self) -> usize {
        self.records.len()
    }

    /// Records `member` holds acquired.
    pub fn held_by(&self, member: &str) -> usize {
        self.records
            .values()
            .filter(|r| r.state == RecordState::Acquired && r.owner.as_deref() == Some(member))
            .count()
    }

    /// Acquires for `member` what the batches just read offer: available in-flight records and
    /// new ones past the end, in offset order, up to `max_records` and
    /// within the in-flight limit. `batches` are (first offset, last offset, is control).
    pub fn acquire(
        &mut self,
        batches: &[(i64, i64, bool)],
        member: &str,
        max_records: usize,
        limits: &Limits,
        now: Instant,
    ) -> Vec<Acquired> {
        let mut out: Vec<Acquired> = Vec::new();
        let mut taken = 0usize;
        let lock_until = now + limits.lock_duration;
        for &(first, last, control) in batches {
            if taken >= max_records {
                break;
            }
            for offset in first.max(self.start_offset)..=last {
                if taken >= max_records {
                    break;
                }
                if offset >= self.end_offset {
                    if self.records.len() >= limits.record_locks_max {
                        return out;
                    }
                    // New to the share-partition. Control records (transaction markers) are
                    // never delivered: done at once.
                    self.end_offset = offset + 1;
                    let state = if control {
                        RecordState::Archived
                    } else {
                        RecordState::Available
                    };
                    self.records.insert(
                        offset,
                        InFlight {
                            state,
                            delivery_count: 0,
                            owner: None,
                            lock_until: None,
                        },
                    );
                    if control {
                        // Off the window at once when nothing before it is in flight.
                        self.advance();
                        continue;
                    }
                }
                let Some(r) = self.records.get_mut(&offset) else {
                    continue;
                };
                if r.state != RecordState::Available {
                    continue;
                }
                r.state = RecordState::Acquired;
                r.delivery_count = r.delivery_count.saturating_add(1);
                r.owner = Some(member.to_string());
                r.lock_until = Some(lock_until);
                taken += 1;
                match out.last_mut() {
                    Some(a) if a.last + 1 == offset && a.delivery_count == r.delivery_count => {
                        a.last = offset
                    }
                    _ => out.push(Acquired {
                        first: offset,
                        last: offset,
                        delivery_count: r.delivery_count,
                    }),
                }
            }
        }
        self.advance();
        out
    }

    /// Applies one acknowledgement batch from `member`: every offset in it must be acquired by
    /// that member, else nothing changes and the answer is `INVALID_RECORD_STATE`. `types` has
    /// one type for the whole range or one per offset.
    pub fn acknowledge(
        &mut self,
        member: &str,
        first: i64,
        last: i64,
        types: &[i8],
        limits: &Limits,
    ) -> Result<(), ErrorCode> {
        let count = last
            .checked_sub(first)
            .and_then(|d| d.checked_add(1))
            .unwrap_or(0);
        if count <= 0 || count > limits.record_locks_max as i64 * 4 {
            return Err(ErrorCode::INVALID_REQUEST);
        }
        if types.is_empty() || (types.len() != 1 && types.len() as i64 != count) {
            return Err(ErrorCode::INVALID_REQUEST);
        }
        if types.iter().any(|t| !(ACK_GAP..=ACK_REJECT).contains(t)) {
            return Err(ErrorCode::INVALID_REQUEST);
        }
        for offset in first..=last {
            match self.records.get(&offset) {
                Some(r)
                    if r.state == RecordState::Acquired && r.owner.as_deref() == Some(member) => {}
                _ => return Err(INVALID_RECORD_STATE),
            }
        }
        for (i, offset) in (first..=last).enumerate() {
            let kind = if types.len() == 1 { types[0] } else { types[i] };
            let r = self.records.get_mut(&offset).expect("checked above");
            r.owner = None;
            r.lock_until = None;
            r.state = match kind {
                ACK_ACCEPT => RecordState::Acknowledged,
                ACK_RELEASE if r.delivery_count < limits.delivery_count_limit => {
                    RecordState::Available
                }
                // GAP (no record at this offset), REJECT, or released once too often.
                _ => RecordState::Archived,
            };
        }
        self.advance();
        Ok(())
    }

    /// Releases records whose lock ran out, or (with `member`) every record that member holds.
    /// Returns whether any record became archived (a durable change).
    pub fn release(&mut self, member: Option<&str>, limits: &Limits, now: Instant) -> bool {
        let mut archived = false;
        let mut any = false;
        for r in self.records.values_mut() {
            if r.state != RecordState::Acquired {
                continue;
            }
            let due = match member {
                Some(m) => r.owner.as_deref() == Some(m),
                None => r.lock_until.is_some_and(|t| now >= t),
            };
            if !due {
                continue;
            }
            any = true;
            r.owner = None;
            r.lock_until = None;
            r.state = if r.delivery_count >= limits.delivery_count_limit {
                archived = true;
                RecordState::Archived
            } else {
                RecordState::Available
            };
        }
        if any {
            self.advance();
        }
        archived
    }

    /// The earliest lock expiry, so a waiting fetch wakes for a record coming back.
    pub fn next_lock_expiry(&self) -> Option<Instant> {
        self.records.values().filter_map(|r| r.lock_until).min()
    }

    fn advance(&mut self) {
        while let Some(entry) = self.records.first_entry() {
            if *entry.key() < self.start_offset || entry.get().state.done() {
                let offset = *entry.key();
                entry.remove();
                self.start_offset = self.start_offset.max(offset + 1);
            } else {
                break;
            }
        }
        if self.records.is_empty() {
            self.start_offset = self.start_offset.max(self.end_offset);
        } else {
            self.end_offset = self.end_offset.max(self.start_offset);
        }
    }

    /// Moves the start offset (the log's start moved past it, or an admin reset it).
    pub fn reset_start(&mut self, offset: i64) {
        self.records.retain(|o, _| *o >= offset);
        self.start_offset = offset;
        self.end_offset = self.end_offset.max(offset);
        self.advance();
    }

    /// The durable form: in-flight records as runs of equal state and delivery count, acquired
    /// ones written as available.
    pub fn value(&self) -> SharePartitionValue {
        let mut ranges: Vec<ShareRangeValue> = Vec::new();
        for (offset, r) in &self.records {
            let state = match r.state {
                RecordState::Available | RecordState::Acquired => 0,
                RecordState::Acknowledged => 2,
                RecordState::Archived => 4,
            };
            match ranges.last_mut() {
                Some(last)
                    if last.last_offset + 1 == *offset
                        && last.state == state
                        && last.delivery_count == r.delivery_count =>
                {
                    last.last_offset = *offset
                }
                _ => ranges.push(ShareRangeValue {
                    first_offset: *offset,
                    last_offset: *offset,
                    state,
                    delivery_count: r.delivery_count,
                }),
            }
        }
        SharePartitionValue {
            start_offset: self.start_offset,
            end_offset: self.end_offset,
            ranges,
        }
    }

    pub fn from_value(v: &SharePartitionValue) -> Self {
        let mut p = SharePartition::new(v.start_offset);
        p.end_offset = v.end_offset.max(v.start_offset);
        for range in &v.ranges {
            // Bounded by the in-flight limit when written; a corrupt huge range is cut short.
            let last = range
                .last_offset
                .min(range.first_offset.saturating_add(1 << 20));
            for offset in range.first_offset..=last {
                p.records.insert(
                    offset,
                    InFlight {
                        state: match range.state {
                            2 => RecordState::Acknowledged,
                            4 => RecordState::Archived,
                            _ => RecordState::Available,
                        },
                        delivery_count: range.delivery_count,
                        owner: None,
                        lock_until: None,
                    },
                );
            }
        }
        p.advance();
        p
    }
}

pub struct ShareMember {
    pub id: String,
    pub epoch: i32,
    pub previous_epoch: i32,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub subscribed_names: Vec<String>,
    pub session_deadline: Instant,
    /// The assignment this member was last told.
    pub sent: Option<Assignment>,
}

/// A member's share session (ShareFetch): the partitions it fetches and the epoch its next
/// request must carry.
#[derive(Default)]
pub struct ShareSession {
    pub epoch: i32,
    pub partitions: BTreeSet<(TopicId, i32)>,
}

/// How long a member that left keeps its open share sessions, and the records they hold, for
/// its final requests to close them (see [`ShareGroup::leave`]).
pub const DEPARTED_GRACE: Duration = Duration::from_secs(5);

/// The key of a member's share session in [`ShareGroup::sessions`]. A member keeps one session
/// per broker it fetches from (the leaders of its partitions); those passed on to the
/// coordinator by another broker (`origin`) are kept apart by that broker's id.
pub fn session_key(member: &str, origin: Option<i32>) -> String {
    match origin {
        None => member.to_string(),
        Some(node) => format!("{member}\u{0}{node}"),
    }
}

/// The member a [`session_key`] belongs to.
pub fn session_member(key: &str) -> &str {
    key.split_once('\u{0}').map_or(key, |(member, _)| member)
}

#[derive(Default)]
pub struct ShareGroup {
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub members: BTreeMap<String, ShareMember>,
    pub target: BTreeMap<String, Assignment>,
    pub metadata: BTreeMap<String, (TopicId, i32)>,
    /// Share-partition states, by topic name and partition.
    pub partitions: BTreeMap<(String, i32), SharePartition>,
    /// Share sessions by [`session_key`].
    pub sessions: BTreeMap<String, ShareSession>,
    /// Members that left with share sessions still open, and when what they hold is released
    /// if those sessions are not closed first (see [`ShareGroup::leave`]).
    pub departed: BTreeMap<String, Instant>,
}

/// A ShareGroupHeartbeat.
pub struct ShareHeartbeat {
    pub member_id: String,
    pub epoch: i32,
    pub rack_id: Option<String>,
    pub subscribed_names: Option<Vec<String>>,
    pub client_id: String,
    pub client_host: String,
}

pub struct ShareBeat {
    pub epoch: i32,
    pub assignment: Option<Assignment>,
    /// Acquired records of a member that left were released: their partitions changed.
    pub released: Vec<(String, i32)>,
}

impl ShareGroup {
    pub fn state_name(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else {
            "Stable"
        }
    }

    pub fn heartbeat(
        &mut self,
        hb: ShareHeartbeat,
        topics: &TopicTable,
        session_timeout: Duration,
        limits: &Limits,
        now: Instant,
    ) -> Result<ShareBeat, (ErrorCode, String)> {
        if hb.epoch == super::consumer::LEAVE_EPOCH {
            if self.members.contains_key(&hb.member_id) {
                let released = self.leave(&hb.member_id, limits, now);
                return Ok(ShareBeat {
                    epoch: hb.epoch,
                    assignment: None,
                    released,
                });
            }
            return Err((
                ErrorCode::UNKNOWN_MEMBER_ID,
                format!("member {} is not in the group", hb.member_id),
            ));
        }
        if hb.epoch == super::consumer::JOIN_EPOCH {
            if hb.subscribed_names.as_ref().is_none_or(|n| n.is_empty()) {
                return Err((
                    ErrorCode::INVALID_REQUEST,
                    "SubscribedTopicNames must be set in first request.".into(),
                ));
            }
            if !self.members.contains_key(&hb.member_id) {
                if self.members.len() >= limits.members_max {
                    return Err((
                        GROUP_MAX_SIZE_REACHED,
                        format!(
                            "the group has its maximum of {} members",
                            limits.members_max
                        ),
                    ));
                }
                // Back within its grace: what it still holds stays its own.
                self.departed.remove(&hb.member_id);
                self.members.insert(
                    hb.member_id.clone(),
                    ShareMember {
                        id: hb.member_id.clone(),
                        epoch: 0,
                        previous_epoch: 0,
                        rack_id: None,
                        client_id: String::new(),
                        client_host: String::new(),
                        subscribed_names: Vec::new(),
                        session_deadline: now + session_timeout,
                        sent: None,
                    },
                );
                self.epoch += 1;
            } else if let Some(m) = self.members.get_mut(&hb.member_id) {
                m.sent = None;
            }
        } else {
            let Some(m) = self.members.get(&hb.member_id) else {
                return Err((
                    ErrorCode::UNKNOWN_MEMBER_ID,
                    format!("member {} is not in the group", hb.member_id),
                ));
            };
            if hb.epoch != m.epoch && hb.epoch != m.previous_epoch {
                return Err((
                    FENCED_MEMBER_EPOCH,
                    format!(
                        "member {} sent epoch {}, its epoch is {}",
                        m.id, hb.epoch, m.epoch
                    ),
                ));
            }
        }
        let m = self.members.get_mut(&hb.member_id).expect("admitted above");
        m.session_deadline = now + session_timeout;
        m.client_id = hb.client_id;
        m.client_host = hb.client_host;
        if hb.rack_id.is_some() {
            m.rack_id = hb.rack_id;
        }
        if let Some(names) = hb.subscribed_names {
            if names != m.subscribed_names {
                m.subscribed_names = names;
                self.epoch += 1;
            }
        }
        self.refresh(topics);
        let m = self.members.get_mut(&hb.member_id).expect("admitted above");
        if m.epoch != self.assignment_epoch {
            m.previous_epoch = m.epoch;
            m.epoch = self.assignment_epoch;
        }
        let target = self.target.get(&hb.member_id).cloned().unwrap_or_default();
        let assignment = (m.sent.as_ref() != Some(&target)).then(|| {
            m.sent = Some(target.clone());
            target
        });
        Ok(ShareBeat {
            epoch: m.epoch,
            assignment,
            released: Vec::new(),
        })
    }

    /// Re-resolves subscribed topics and recomputes the assignment when anything moved.
    fn refresh(&mut self, topics: &TopicTable) {
        let mut resolved = BTreeMap::new();
        for m in self.members.values() {
            for name in &m.subscribed_names {
                if let Some(t) = topics.get(name) {
                    resolved.insert(name.clone(), (t.id, t.partitions));
                }
            }
        }
        if resolved != self.metadata {
            self.metadata = resolved;
            self.epoch += 1;
        }
        if self.assignment_epoch == self.epoch {
            return;
        }
        let subscriptions: BTreeMap<String, BTreeSet<TopicId>> = self
            .members
            .values()
            .map(|m| {
                let ids = m
                    .subscribed_names
                    .iter()
                    .filter_map(|n| self.metadata.get(n).map(|(id, _)| *id))
                    .collect();
                (m.id.clone(), ids)
            })
            .collect();
        let partitions: BTreeMap<TopicId, i32> = self.metadata.values().copied().collect();
        self.target = assign_simple(&subscriptions, &partitions);
        self.assignment_epoch = self.epoch;
    }

    /// A member leaves the group (its heartbeat with epoch -1). Its final ShareFetch or
    /// ShareAcknowledge to each broker it fetched from, which closes that share session and
    /// carries the acknowledgements of its last records, may come after the leave: in a cluster
    /// those pass through the partitions' leaders while the leave goes straight to the
    /// coordinator. So a member with sessions still open keeps them, and what it holds, for
    /// [`DEPARTED_GRACE`]; each session's close releases its part, and the grace's end the rest.
    /// A member without open sessions is removed at once.
    pub fn leave(&mut self, member: &str, limits: &Limits, now: Instant) -> Vec<(String, i32)> {
        if !self.sessions.keys().any(|k| session_member(k) == member) {
            return self.remove(member, limits, now);
        }
        self.members.remove(member);
        self.target.remove(member);
        self.epoch += 1;
        self.departed
            .insert(member.to_string(), now + DEPARTED_GRACE);
        Vec::new()
    }

    /// Whether `member` may still close a share session: a member, or one that left with
    /// sessions open less than [`DEPARTED_GRACE`] ago.
    pub fn may_close_session(&self, member: &str) -> bool {
        self.members.contains_key(member) || self.departed.contains_key(member)
    }

    /// Removes a member: its sessions close and what it holds is released at once.
    pub fn remove(&mut self, member: &str, limits: &Limits, now: Instant) -> Vec<(String, i32)> {
        self.members.remove(member);
        self.target.remove(member);
        self.departed.remove(member);
        self.sessions.retain(|key, _| session_member(key) != member);
        self.epoch += 1;
        let mut changed = Vec::new();
        for (key, p) in self.partitions.iter_mut() {
            if p.release(Some(member), limits, now) {
                changed.push(key.clone());
            }
        }
        changed
    }

    /// Members whose session ran out, and locks that ran out. Returns the members removed and
    /// the share-partitions whose durable state changed.
    pub fn expire(&mut self, limits: &Limits, now: Instant) -> (Vec<String>, Vec<(String, i32)>) {
        let gone: Vec<String> = self
            .members
            .values()
            .filter(|m| now >= m.session_deadline)
            .map(|m| m.id.clone())
            .collect();
        let mut changed = Vec::new();
        for m in &gone {
            changed.extend(self.remove(m, limits, now));
        }
        let lapsed: Vec<String> = self
            .departed
            .iter()
            .filter(|(_, until)| now >= **until)
            .map(|(m, _)| m.clone())
            .collect();
        for m in &lapsed {
            changed.extend(self.remove(m, limits, now));
        }
        for (key, p) in self.partitions.iter_mut() {
            if p.release(None, limits, now) {
                changed.push(key.clone());
            }
        }
        changed.sort();
        changed.dedup();
        (gone, changed)
    }

    pub fn value(&self) -> ShareGroupValue {
        ShareGroupValue { epoch: self.epoch }
    }
}

/// `simple`: with at least as many partitions as members, each partition to one member
/// (round-robin over the members subscribed to its topic); with more members than partitions,
/// every member still gets a partition, several members sharing each.
pub fn assign_simple(
    subscriptions: &BTreeMap<String, BTreeSet<TopicId>>,
    partitions: &BTreeMap<TopicId, i32>,
) -> BTreeMap<String, Assignment> {
    let mut out: BTreeMap<String, Assignment> = subscriptions
        .keys()
        .map(|m| (m.clone(), Assignment::new()))
        .collect();
    for (topic, count) in partitions {
        let members: Vec<&String> = subscriptions
            .iter()
            .filter(|(_, ts)| ts.contains(topic))
            .map(|(m, _)| m)
            .collect();
        if members.is_empty() || *count <= 0 {
            continue;
        }
        let slots = members.len().max(*count as usize);
        for i in 0..slots {
            let m = members[i % members.len()];
            let p = (i % *count as usize) as i32;
            out.get_mut(m)
                .expect("every member has an entry")
                .entry(*topic)
                .or_default()
                .insert(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            lock_duration: Duration::from_secs(30),
            delivery_count_limit: 3,
            record_locks_max: 100,
            members_max: 200,
            read_committed: false,
        }
    }

    #[test]
    fn each_record_goes_to_one_member_and_comes_back_when_released() {
        // max_records counts records, not batches: one batch of 10 is split between members.
        let l = limits();
        let now = Instant::now();
        let mut p = SharePartition::new(0);
        let a = p.acquire(&[(0, 9, false)], "a", 5, &l, now);
        assert_eq!(
            a,
            vec![Acquired {
                first: 0,
                last: 4,
                delivery_count: 1
            }]
        );
        let b = p.acquire(&[(0, 9, false)], "b", 100, &l, now);
        assert_eq!(
            b,
            vec![Acquired {
                first: 5,
                last: 9,
                delivery_count: 1
            }]
        );
        // b cannot acknowledge a's records.
        assert_eq!(
            p.acknowledge("b", 0, 0, &[ACK_ACCEPT], &l),
            Err(INVALID_RECORD_STATE)
        );
        p.acknowledge("a", 0, 3, &[ACK_ACCEPT], &l).unwrap();
        assert_eq!(p.start_offset, 4);
        p.acknowledge("a", 4, 4, &[ACK_RELEASE], &l).unwrap();
        let again = p.acquire(&[(0, 9, false)], "b", 100, &l, now);
        assert_eq!(
            again,
            vec![Acquired {
                first: 4,
                last: 4,
                delivery_count: 2
            }]
        );
        assert_eq!(p.next_read_offset(), 10);
    }

    #[test]
    fn a_member_that_leaves_with_open_sessions_keeps_its_records_for_their_close() {
        let l = limits();
        let now = Instant::now();
        let member = |id: &str| ShareMember {
            id: id.to_string(),
            epoch: 1,
            previous_epoch: 0,
            rack_id: None,
            client_id: String::new(),
            client_host: String::new(),
            subscribed_names: Vec::new(),
            session_deadline: now + Duration::from_secs(45),
            sent: None,
        };
        let mut g = ShareGroup::default();
        g.members.insert("a".into(), member("a"));
        g.members.insert("b".into(), member("b"));
        g.sessions
            .insert(session_key("a", Some(2)), ShareSession::default());
        let mut p = SharePartition::new(0);
        assert_eq!(p.acquire(&[(0, 9, false)], "a", 10, &l, now).len(), 1);
        g.partitions.insert(("t".into(), 0), p);
        // a leaves with a session open: still holds its records, may still close the session.
        assert!(g.leave("a", &l, now).is_empty());
        assert!(!g.members.contains_key("a") && g.may_close_session("a"));
        let held = |g: &ShareGroup| g.partitions[&("t".to_string(), 0)].held_by("a");
        assert_eq!(held(&g), 10);
        // Its grace runs out before the close: the records go back.
        let (gone, _) = g.expire(&l, now + DEPARTED_GRACE);
        assert!(gone.is_empty());
        assert_eq!(held(&g), 0);
        assert!(!g.may_close_session("a") && g.sessions.is_empty());
        // b has no session open: it is gone at once.
        g.leave("b", &l, now);
        assert!(!g.may_close_session("b"));
    }

    #[test]
    fn expired_locks_release_and_the_delivery_limit_archives() {
        let l = limits();
        let now = Instant::now();
        let mut p = SharePartition::new(0);
        for round in 1..=3 {
            let t = now + l.lock_duration * round;
            let got = p.acquire(&[(0, 0, false)], "a", 10, &l, t);
            assert_eq!(
                got,
                vec![Acquired {
                    first: 0,
                    last: 0,
                    delivery_count: round as i16
                }]
            );
            let archived = p.release(None, &l, t + l.lock_duration);
            assert_eq!(archived, round == 3);
        }
        // Archived after the third delivery: never delivered again.
        assert!(p.acquire(&[(0, 0, false)], "a", 10, &l, now).is_empty());
        assert_eq!(p.start_offset, 1);
        // REJECT archives at once; GAP marks an offset with no record.
        let got = p.acquire(&[(1, 3, false)], "a", 10, &l, now);
        assert_eq!(got.len(), 1);
        p.acknowledge("a", 1, 3, &[ACK_REJECT, ACK_GAP, ACK_ACCEPT], &l)
            .unwrap();
        assert_eq!(p.start_offset, 4);
    }

    #[test]
    fn hostile_acknowledgements_are_refused_without_changing_anything() {
        let l = limits();
        let now = Instant::now();
        let mut p = SharePartition::new(0);
        p.acquire(&[(0, 9, false)], "a", 100, &l, now);
        for (first, last, types) in [
            (0, i64::MAX, vec![ACK_ACCEPT]),
            (i64::MIN, 0, vec![ACK_ACCEPT]),
            (5, 4, vec![ACK_ACCEPT]),
            (0, 3, vec![ACK_ACCEPT, ACK_ACCEPT]),
            (0, 0, vec![]),
            (0, 0, vec![9]),
        ] {
            assert!(p.acknowledge("a", first, last, &types, &l).is_err());
        }
        assert_eq!(p.start_offset, 0);
        assert_eq!(p.held_by("a"), 10);
    }

    #[test]
    fn the_in_flight_window_is_bounded_and_control_records_are_skipped() {
        let mut l = limits();
        l.record_locks_max = 4;
        let now = Instant::now();
        let mut p = SharePartition::new(0);
        let got = p.acquire(&[(0, 2, true), (3, 20, false)], "a", 100, &l, now);
        // 0..=2 are markers (done at once); then 4 records fit the window.
        assert_eq!(
            got,
            vec![Acquired {
                first: 3,
                last: 6,
                delivery_count: 1
            }]
        );
        assert_eq!(p.in_flight(), 4);
    }

    #[test]
    fn durable_form_keeps_accepted_and_returns_acquired_to_the_queue() {
        let l = limits();
        let now = Instant::now();
        let mut p = SharePartition::new(10);
        p.acquire(&[(10, 19, false)], "a", 100, &l, now);
        p.acknowledge("a", 12, 13, &[ACK_ACCEPT], &l).unwrap();
        let back = SharePartition::from_value(&p.value());
        let mut back2 = back.clone();
        let got = back2.acquire(&[(10, 19, false)], "b", 100, &l, now);
        // 12 and 13 were accepted: never again; the rest come back with delivery count 2.
        assert_eq!(
            got,
            vec![
                Acquired {
                    first: 10,
                    last: 11,
                    delivery_count: 2
                },
                Acquired {
                    first: 14,
                    last: 19,
                    delivery_count: 2
                }
            ]
        );
    }

    #[test]
    fn simple_assignor_shares_partitions_when_members_outnumber_them() {
        let t = [1u8; 16];
        let subs: BTreeMap<String, BTreeSet<TopicId>> = ["a", "b", "c", "d"]
            .iter()
            .map(|m| (m.to_string(), BTreeSet::from([t])))
            .collect();
        let one = assign_simple(&subs, &BTreeMap::from([(t, 1)]));
        assert!(one.values().all(|a| a[&t] == BTreeSet::from([0])));
        let eight = assign_simple(&subs, &BTreeMap::from([(t, 8)]));
        assert!(eight.values().all(|a| a[&t].len() == 2));
    }
}
