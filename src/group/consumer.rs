//! KIP-848 consumer groups (`group.protocol=consumer`): the broker, not a group leader, computes
//! the assignment, and members converge on it one heartbeat at a time with no group-wide barrier.
//!
//! The model is Kafka's (`GroupMetadataManager`, `CurrentAssignmentBuilder`):
//! - The **group epoch** moves whenever what the assignment depends on changes: a member joins or
//!   leaves, a subscription changes, or a subscribed topic appears, disappears or grows.
//! - The **target assignment** is the assignor's answer for a group epoch; its epoch is the
//!   assignment epoch. The `uniform` assignor is sticky: a partition stays with its owner unless
//!   balance needs it elsewhere, so a member joining moves only the partitions it takes.
//! - Each **member** walks towards its target on its own. A member that owns partitions outside
//!   its target is first told to revoke them (`UnrevokedPartitions`, its epoch held back); once
//!   its heartbeat no longer lists them they are free, it moves to the target epoch and gets the
//!   target partitions that nobody else still holds (`UnreleasedPartitions` until all are free).
//!   A partition is never owned by two members, and a member that keeps a partition never stops
//!   consuming it.
//! - **Fencing**: a heartbeat with an epoch that is neither the member's current one nor (if it
//!   only lost our last answer) its previous one gets `FENCED_MEMBER_EPOCH`; the client rejoins
//!   with epoch 0. A member that does not revoke within its rebalance timeout, or is not heard
//!   from within the session timeout, is removed and its partitions freed.
//!
//! This module is pure state: no I/O, no clocks of its own (callers pass `now`), so its rules are
//! unit-tested here and the coordinator only persists and routes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use regex::Regex;

use super::records::{ConsumerGroupValue, ConsumerMemberValue, PartitionsValue};
use crate::cluster::topics::TopicTable;
use crate::model::ErrorCode;

pub type TopicId = [u8; 16];
/// Partitions by topic id.
pub type Assignment = BTreeMap<TopicId, BTreeSet<i32>>;

/// The server-side assignors strom has (`group.consumer.assignors` picks among them).
pub const ASSIGNORS: &[&str] = &["uniform", "range"];

/// Member epochs with a meaning of their own (KIP-848).
pub const JOIN_EPOCH: i32 = 0;
pub const LEAVE_EPOCH: i32 = -1;
pub const STATIC_LEAVE_EPOCH: i32 = -2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    Stable,
    UnrevokedPartitions,
    UnreleasedPartitions,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Stable => "stable",
            MemberState::UnrevokedPartitions => "unrevoked_partitions",
            MemberState::UnreleasedPartitions => "unreleased_partitions",
        }
    }
}

/// The broker settings a consumer group follows.
#[derive(Clone, Debug)]
pub struct Settings {
    pub session_timeout: Duration,
    /// The assignors allowed, the first being the default.
    pub assignors: Vec<String>,
}

pub struct ConsumerMember {
    pub id: String,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    pub rebalance_timeout: Duration,
    pub subscribed_names: Vec<String>,
    /// The regex as sent and compiled (anchored: Kafka matches the whole topic name).
    pub subscribed_regex: Option<(String, Regex)>,
    pub assignor: Option<String>,
    pub epoch: i32,
    pub previous_epoch: i32,
    pub state: MemberState,
    pub assigned: Assignment,
    pub revoking: Assignment,
    pub session_deadline: Instant,
    pub revoke_deadline: Option<Instant>,
    /// Left with epoch -2: a static member about to come back keeps its partitions until its
    /// session runs out.
    pub departed: bool,
}

impl ConsumerMember {
    fn new(id: &str, now: Instant, settings: &Settings) -> Self {
        ConsumerMember {
            id: id.to_string(),
            instance_id: None,
            rack_id: None,
            client_id: String::new(),
            client_host: String::new(),
            rebalance_timeout: Duration::from_secs(300),
            subscribed_names: Vec::new(),
            subscribed_regex: None,
            assignor: None,
            epoch: 0,
            previous_epoch: 0,
            state: MemberState::Stable,
            assigned: Assignment::new(),
            revoking: Assignment::new(),
            session_deadline: now + settings.session_timeout,
            revoke_deadline: None,
            departed: false,
        }
    }

    /// The topics this member subscribes to that exist, by name.
    fn subscribes_to(&self, topic: &str) -> bool {
        self.subscribed_names.iter().any(|n| n == topic)
            || self
                .subscribed_regex
                .as_ref()
                .is_some_and(|(_, re)| !topic.starts_with("__") && re.is_match(topic))
    }
}

/// A ConsumerGroupHeartbeat, with Kafka's "null: unchanged" fields as `None`.
pub struct Heartbeat {
    pub member_id: String,
    pub epoch: i32,
    pub instance_id: Option<String>,
    pub rack_id: Option<String>,
    pub rebalance_timeout_ms: i32,
    pub subscribed_names: Option<Vec<String>>,
    pub subscribed_regex: Option<String>,
    pub assignor: Option<String>,
    pub owned: Option<Assignment>,
    pub client_id: String,
    pub client_host: String,
}

/// The coordinator's answer to a heartbeat.
#[derive(Debug)]
pub struct Beat {
    pub member_id: String,
    pub epoch: i32,
    /// The member's assignment, when it changed or the request was a full one.
    pub assignment: Option<Assignment>,
    /// Whether the group's durable state changed (the coordinator writes it before answering).
    pub persist: bool,
}

pub type BeatError = (ErrorCode, String);

#[derive(Default)]
pub struct ConsumerGroup {
    pub epoch: i32,
    pub assignment_epoch: i32,
    pub members: BTreeMap<String, ConsumerMember>,
    pub target: BTreeMap<String, Assignment>,
    /// The subscribed topics as last resolved: name to (id, partitions). A change moves the epoch.
    pub metadata: BTreeMap<String, (TopicId, i32)>,
    /// The assignor the target was computed with.
    pub assignor: String,
}

pub const FENCED_MEMBER_EPOCH: ErrorCode = ErrorCode(110);
pub const UNRELEASED_INSTANCE_ID: ErrorCode = ErrorCode(111);
pub const UNSUPPORTED_ASSIGNOR: ErrorCode = ErrorCode(112);
pub const STALE_MEMBER_EPOCH: ErrorCode = ErrorCode(113);
pub const INVALID_REGULAR_EXPRESSION: ErrorCode = ErrorCode(128);

fn compile_regex(pattern: &str) -> Result<Regex, BeatError> {
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| {
        (
            INVALID_REGULAR_EXPRESSION,
            format!("invalid subscription regex '{pattern}': {e}"),
        )
    })
}

impl ConsumerGroup {
    pub fn state_name(&self) -> &'static str {
        if self.members.is_empty() {
            "Empty"
        } else if self.assignment_epoch < self.epoch {
            "Assigning"
        } else if self
            .members
            .values()
            .any(|m| m.epoch != self.assignment_epoch || m.state != MemberState::Stable)
        {
            "Reconciling"
        } else {
            "Stable"
        }
    }

    /// Whether an OffsetCommit from `member_id` at `epoch` for `partitions` may commit (Kafka's
    /// `ConsumerGroup.validateOffsetCommit`): an admin or standalone commit (no member, epoch
    /// -1) only while the group is empty; a member at its current epoch; and, as KIP-1251 relaxed
    /// it, a member one epoch behind (its commit crossed the heartbeat that moved it) for
    /// partitions it still owns, which a zombie that lost them does not.
    pub fn commit_check(
        &self,
        member_id: &str,
        epoch: i32,
        partitions: &[(TopicId, i32)],
    ) -> ErrorCode {
        if epoch < 0 && member_id.is_empty() {
            return if self.members.is_empty() {
                ErrorCode::NONE
            } else {
                ErrorCode::UNKNOWN_MEMBER_ID
            };
        }
        let Some(m) = self.members.get(member_id) else {
            return ErrorCode::UNKNOWN_MEMBER_ID;
        };
        let owns = |(t, p): &(TopicId, i32)| {
            m.assigned.get(t).is_some_and(|s| s.contains(p))
                || m.revoking.get(t).is_some_and(|s| s.contains(p))
        };
        if epoch == m.epoch
            || (epoch == m.previous_epoch && epoch > 0 && partitions.iter().all(owns))
        {
            ErrorCode::NONE
        } else {
            STALE_MEMBER_EPOCH
        }
    }

    /// One heartbeat: join, leave, or keep-alive with reconciliation.
    pub fn heartbeat(
        &mut self,
        hb: Heartbeat,
        topics: &TopicTable,
        settings: &Settings,
        now: Instant,
    ) -> Result<Beat, BeatError> {
        if hb.epoch == LEAVE_EPOCH || hb.epoch == STATIC_LEAVE_EPOCH {
            return self.leave(&hb, now);
        }
        if let Some(name) = &hb.assignor {
            if !settings.assignors.iter().any(|a| a == name) {
                return Err((
                    UNSUPPORTED_ASSIGNOR,
                    format!(
                        "assignor '{name}' is not one of {}",
                        settings.assignors.join(", ")
                    ),
                ));
            }
        }
        let regex = match &hb.subscribed_regex {
            Some(p) if !p.is_empty() => Some((p.clone(), compile_regex(p)?)),
            _ => None,
        };
        let mut persist = false;
        let full = hb.epoch == JOIN_EPOCH;
        if hb.epoch == JOIN_EPOCH {
            if hb.subscribed_names.is_none() && hb.subscribed_regex.is_none() {
                return Err((
                    ErrorCode::INVALID_REQUEST,
                    "a joining member must send its subscription".into(),
                ));
            }
            persist |= self.admit(&hb, now, settings)?;
        } else {
            let Some(m) = self.members.get(&hb.member_id) else {
                return Err((
                    ErrorCode::UNKNOWN_MEMBER_ID,
                    format!("member {} is not in the group", hb.member_id),
                ));
            };
            let lost_answer = hb.epoch == m.previous_epoch
                && hb
                    .owned
                    .as_ref()
                    .is_some_and(|owned| is_subset(owned, &m.assigned));
            if hb.epoch != m.epoch && !lost_answer {
                return Err((
                    FENCED_MEMBER_EPOCH,
                    format!(
                        "member {} sent epoch {}, its epoch is {}",
                        hb.member_id, hb.epoch, m.epoch
                    ),
                ));
            }
        }
        let member = self
            .members
            .get_mut(&hb.member_id)
            .expect("the member was admitted or checked above");
        member.session_deadline = now + settings.session_timeout;
        member.departed = false;
        member.client_id = hb.client_id;
        member.client_host = hb.client_host;
        if hb.rebalance_timeout_ms >= 0 {
            member.rebalance_timeout = Duration::from_millis(hb.rebalance_timeout_ms as u64);
        }
        if hb.rack_id.is_some() {
            member.rack_id = hb.rack_id;
        }
        let mut changed = false;
        if let Some(names) = hb.subscribed_names {
            if names != member.subscribed_names {
                member.subscribed_names = names;
                changed = true;
            }
        }
        if hb.subscribed_regex.is_some() {
            let before = member.subscribed_regex.as_ref().map(|(p, _)| p.clone());
            if before != regex.as_ref().map(|(p, _)| p.clone()) {
                member.subscribed_regex = regex;
                changed = true;
            }
        }
        if hb.assignor.is_some() && hb.assignor != member.assignor {
            member.assignor = hb.assignor;
            changed = true;
        }
        if changed {
            self.epoch += 1;
            persist = true;
        }
        persist |= self.refresh_metadata(topics);
        persist |= self.update_target(settings);
        let before = self.members[&hb.member_id].assigned.clone();
        persist |= self.reconcile(&hb.member_id, hb.owned.as_ref(), now);
        let m = &self.members[&hb.member_id];
        // Sent when it changed, on a full request, or when the member's view differs from it
        // (Kafka's rule); a heartbeat that leaves `owned` out has nothing to compare.
        let differs = hb.owned.as_ref().is_some_and(|o| *o != m.assigned);
        let assignment = (full || m.assigned != before || differs).then(|| m.assigned.clone());
        Ok(Beat {
            member_id: hb.member_id,
            epoch: m.epoch,
            assignment,
            persist,
        })
    }

    /// A member joining with epoch 0: new, rejoining after being fenced, or a static member
    /// replacing its previous incarnation. Returns whether the group changed.
    fn admit(
        &mut self,
        hb: &Heartbeat,
        now: Instant,
        settings: &Settings,
    ) -> Result<bool, BeatError> {
        if let Some(instance) = &hb.instance_id {
            let holder = self
                .members
                .values()
                .find(|m| m.instance_id.as_deref() == Some(instance) && m.id != hb.member_id)
                .map(|m| (m.id.clone(), m.departed));
            if let Some((old_id, departed)) = holder {
                if !departed {
                    return Err((
                        UNRELEASED_INSTANCE_ID,
                        format!("instance {instance} is still held by member {old_id}"),
                    ));
                }
                // The static member came back under a new member id: it takes over the old
                // member's partitions and epoch, and the group does not rebalance.
                let mut m = self.members.remove(&old_id).expect("found above");
                m.id = hb.member_id.clone();
                if let Some(t) = self.target.remove(&old_id) {
                    self.target.insert(hb.member_id.clone(), t);
                }
                self.members.insert(hb.member_id.clone(), m);
                return Ok(true);
            }
        }
        if self.members.contains_key(&hb.member_id) {
            // A fenced member rejoining under its id: it lost its partitions on the client side;
            // it keeps its place, and its assignment is sent again in full.
            return Ok(false);
        }
        let mut m = ConsumerMember::new(&hb.member_id, now, settings);
        m.instance_id = hb.instance_id.clone();
        self.members.insert(hb.member_id.clone(), m);
        self.epoch += 1;
        Ok(true)
    }

    fn leave(&mut self, hb: &Heartbeat, now: Instant) -> Result<Beat, BeatError> {
        let Some(m) = self.members.get_mut(&hb.member_id) else {
            return Err((
                ErrorCode::UNKNOWN_MEMBER_ID,
                format!("member {} is not in the group", hb.member_id),
            ));
        };
        if hb.epoch == STATIC_LEAVE_EPOCH && m.instance_id.is_some() {
            // Kept, partitions and all, until its session runs out or it comes back.
            m.departed = true;
            let _ = now;
        } else {
            self.remove(&hb.member_id);
        }
        Ok(Beat {
            member_id: hb.member_id.clone(),
            epoch: hb.epoch,
            assignment: None,
            persist: true,
        })
    }

    /// Removes a member and frees its partitions; the group epoch moves.
    pub fn remove(&mut self, member_id: &str) -> bool {
        if self.members.remove(member_id).is_none() {
            return false;
        }
        self.target.remove(member_id);
        self.epoch += 1;
        true
    }

    /// Members whose session ran out, or that held on to revoked partitions past their
    /// rebalance timeout: removed, with the reason, for the log.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, &'static str)> {
        let gone: Vec<(String, &'static str)> = self
            .members
            .values()
            .filter_map(|m| {
                if now >= m.session_deadline {
                    Some((m.id.clone(), "session timeout"))
                } else if m.revoke_deadline.is_some_and(|d| now >= d) {
                    Some((m.id.clone(), "rebalance timeout (partitions not revoked)"))
                } else {
                    None
                }
            })
            .collect();
        for (id, _) in &gone {
            self.remove(id);
        }
        gone
    }

    /// Re-resolves the subscribed topics; a change (topic created, deleted, grown, or matched by
    /// a regex) moves the group epoch.
    fn refresh_metadata(&mut self, topics: &TopicTable) -> bool {
        // Names are looked up; only regexes need a pass over every topic (each distinct
        // pattern once, however many members share it).
        let mut resolved = BTreeMap::new();
        let mut patterns: BTreeMap<&str, &Regex> = BTreeMap::new();
        for m in self.members.values() {
            for name in &m.subscribed_names {
                if let Some(t) = topics.get(name) {
                    resolved.insert(name.clone(), (t.id, t.partitions));
                }
            }
            if let Some((p, re)) = &m.subscribed_regex {
                patterns.insert(p.as_str(), re);
            }
        }
        if !patterns.is_empty() {
            for t in topics.topics.values() {
                if !t.name.starts_with("__") && patterns.values().any(|re| re.is_match(&t.name)) {
                    resolved.insert(t.name.to_string(), (t.id, t.partitions));
                }
            }
        }
        if resolved == self.metadata {
            return false;
        }
        self.metadata = resolved;
        self.epoch += 1;
        true
    }

    /// Recomputes the target assignment if the group epoch moved past it.
    fn update_target(&mut self, settings: &Settings) -> bool {
        if self.assignment_epoch >= self.epoch {
            return false;
        }
        // Kafka: the assignor most members ask for, else the first configured one.
        let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
        for m in self.members.values() {
            if let Some(a) = &m.assignor {
                *votes.entry(a.as_str()).or_default() += 1;
            }
        }
        let default = settings
            .assignors
            .first()
            .map(String::as_str)
            .unwrap_or("uniform");
        let assignor = votes
            .iter()
            .max_by_key(|(name, n)| (**n, std::cmp::Reverse(**name)))
            .map(|(name, _)| *name)
            .unwrap_or(default)
            .to_string();
        let subscriptions: BTreeMap<String, BTreeSet<TopicId>> = self
            .members
            .values()
            .map(|m| {
                let topics = self
                    .metadata
                    .iter()
                    .filter(|(name, _)| m.subscribes_to(name))
                    .map(|(_, (id, _))| *id)
                    .collect();
                (m.id.clone(), topics)
            })
            .collect();
        let partitions: BTreeMap<TopicId, i32> = self.metadata.values().copied().collect();
        self.target = if assignor == "range" {
            assign_range(&subscriptions, &partitions)
        } else {
            assign_uniform(&subscriptions, &partitions, &self.target)
        };
        self.assignor = assignor;
        self.assignment_epoch = self.epoch;
        true
    }

    /// Moves one member towards its target (see the module note). `owned` is what the member
    /// says it owns (None: unchanged since its last heartbeat). Returns whether it changed.
    fn reconcile(&mut self, member_id: &str, owned: Option<&Assignment>, now: Instant) -> bool {
        let target_epoch = self.assignment_epoch;
        let target = self.target.get(member_id).cloned().unwrap_or_default();
        let mut changed = false;
        {
            let m = self
                .members
                .get_mut(member_id)
                .expect("reconcile of a member");
            if m.state == MemberState::UnrevokedPartitions {
                let released = owned.is_some_and(|o| !intersects(o, &m.revoking));
                if !released {
                    return false;
                }
                m.revoking.clear();
                m.revoke_deadline = None;
                m.state = MemberState::Stable;
                changed = true;
            }
            if m.epoch == target_epoch && m.state == MemberState::Stable {
                return changed;
            }
            let revoke = difference(&m.assigned, &target);
            if !revoke.is_empty() {
                m.assigned = intersection(&m.assigned, &target);
                m.revoking = revoke;
                m.state = MemberState::UnrevokedPartitions;
                m.revoke_deadline = Some(now + m.rebalance_timeout);
                return true;
            }
        }
        // Partitions others still own (assigned or being revoked) are not handed out yet.
        let mut held: HashMap<(TopicId, i32), ()> = HashMap::new();
        for other in self.members.values().filter(|o| o.id != member_id) {
            for (t, ps) in other.assigned.iter().chain(other.revoking.iter()) {
                for p in ps {
                    held.insert((*t, *p), ());
                }
            }
        }
        let m = self
            .members
            .get_mut(member_id)
            .expect("reconcile of a member");
        let mut complete = true;
        for (t, ps) in &target {
            for p in ps {
                if m.assigned.get(t).is_some_and(|s| s.contains(p)) {
                    continue;
                }
                if held.contains_key(&(*t, *p)) {
                    complete = false;
                } else {
                    m.assigned.entry(*t).or_default().insert(*p);
                    changed = true;
                }
            }
        }
        if m.epoch != target_epoch {
            m.previous_epoch = m.epoch;
            m.epoch = target_epoch;
            changed = true;
        }
        let state = if complete {
            MemberState::Stable
        } else {
            MemberState::UnreleasedPartitions
        };
        changed |= m.state != state;
        m.state = state;
        changed
    }

    /// The durable form (the coordinator writes it to `__consumer_offsets`).
    pub fn value(&self) -> ConsumerGroupValue {
        ConsumerGroupValue {
            epoch: self.epoch,
            assignment_epoch: self.assignment_epoch,
            assignor: self.assignor.clone(),
            metadata: self
                .metadata
                .iter()
                .map(|(n, (id, p))| (n.clone(), *id, *p))
                .collect(),
            members: self
                .members
                .values()
                .map(|m| ConsumerMemberValue {
                    member_id: m.id.clone(),
                    instance_id: m.instance_id.clone(),
                    rack_id: m.rack_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    rebalance_timeout_ms: m.rebalance_timeout.as_millis() as u64,
                    subscribed_names: m.subscribed_names.clone(),
                    subscribed_regex: m.subscribed_regex.as_ref().map(|(p, _)| p.clone()),
                    assignor: m.assignor.clone(),
                    epoch: m.epoch,
                    previous_epoch: m.previous_epoch,
                    state: m.state as u8,
                    assigned: to_value(&m.assigned),
                    revoking: to_value(&m.revoking),
                    target: to_value(self.target.get(&m.id).unwrap_or(&Assignment::new())),
                    departed: m.departed,
                })
                .collect(),
        }
    }

    /// Rebuilds a group from its durable form; every member's session starts at `now`.
    pub fn from_value(v: ConsumerGroupValue, settings: &Settings, now: Instant) -> Self {
        let mut g = ConsumerGroup {
            epoch: v.epoch,
            assignment_epoch: v.assignment_epoch,
            assignor: v.assignor,
            metadata: v
                .metadata
                .into_iter()
                .map(|(n, id, p)| (n, (id, p)))
                .collect(),
            ..ConsumerGroup::default()
        };
        for mv in v.members {
            let mut m = ConsumerMember::new(&mv.member_id, now, settings);
            m.instance_id = mv.instance_id;
            m.rack_id = mv.rack_id;
            m.client_id = mv.client_id;
            m.client_host = mv.client_host;
            m.rebalance_timeout = Duration::from_millis(mv.rebalance_timeout_ms);
            m.subscribed_names = mv.subscribed_names;
            // A regex that compiled when it was stored compiles again.
            m.subscribed_regex = mv
                .subscribed_regex
                .and_then(|p| compile_regex(&p).ok().map(|re| (p, re)));
            m.assignor = mv.assignor;
            m.epoch = mv.epoch;
            m.previous_epoch = mv.previous_epoch;
            m.state = match mv.state {
                1 => MemberState::UnrevokedPartitions,
                2 => MemberState::UnreleasedPartitions,
                _ => MemberState::Stable,
            };
            m.assigned = from_value(mv.assigned);
            m.revoking = from_value(mv.revoking);
            if m.state == MemberState::UnrevokedPartitions {
                m.revoke_deadline = Some(now + m.rebalance_timeout);
            }
            m.departed = mv.departed;
            g.target.insert(mv.member_id.clone(), from_value(mv.target));
            g.members.insert(mv.member_id, m);
        }
        g
    }
}

fn to_value(a: &Assignment) -> Vec<PartitionsValue> {
    a.iter()
        .map(|(t, ps)| PartitionsValue {
            topic_id: *t,
            partitions: ps.iter().copied().collect(),
        })
        .collect()
}

fn from_value(v: Vec<PartitionsValue>) -> Assignment {
    v.into_iter()
        .map(|p| (p.topic_id, p.partitions.into_iter().collect()))
        .collect()
}

fn is_subset(a: &Assignment, b: &Assignment) -> bool {
    a.iter()
        .all(|(t, ps)| ps.is_empty() || b.get(t).is_some_and(|bs| ps.is_subset(bs)))
}

fn intersects(a: &Assignment, b: &Assignment) -> bool {
    a.iter()
        .any(|(t, ps)| b.get(t).is_some_and(|bs| !ps.is_disjoint(bs)))
}

fn difference(a: &Assignment, b: &Assignment) -> Assignment {
    let mut out = Assignment::new();
    for (t, ps) in a {
        let rest: BTreeSet<i32> = match b.get(t) {
            Some(bs) => ps.difference(bs).copied().collect(),
            None => ps.clone(),
        };
        if !rest.is_empty() {
            out.insert(*t, rest);
        }
    }
    out
}

fn intersection(a: &Assignment, b: &Assignment) -> Assignment {
    let mut out = Assignment::new();
    for (t, ps) in a {
        if let Some(bs) = b.get(t) {
            let both: BTreeSet<i32> = ps.intersection(bs).copied().collect();
            if !both.is_empty() {
                out.insert(*t, both);
            }
        }
    }
    out
}

/// `range`: for each topic, its subscribers in member-id order get contiguous ranges, the first
/// ones one partition more when the count does not divide.
pub fn assign_range(
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
        if members.is_empty() {
            continue;
        }
        let n = members.len() as i32;
        let (base, extra) = (count / n, count % n);
        let mut next = 0;
        for (i, m) in members.iter().enumerate() {
            let take = base + i32::from((i as i32) < extra);
            if take > 0 {
                let set = out.get_mut(*m).expect("every member has an entry");
                set.entry(*topic).or_default().extend(next..next + take);
            }
            next += take;
        }
    }
    out
}

/// `uniform`: every partition to one of its subscribers, as evenly as the subscriptions allow,
/// keeping each partition with its previous owner where balance permits (sticky).
pub fn assign_uniform(
    subscriptions: &BTreeMap<String, BTreeSet<TopicId>>,
    partitions: &BTreeMap<TopicId, i32>,
    previous: &BTreeMap<String, Assignment>,
) -> BTreeMap<String, Assignment> {
    let mut owner: BTreeMap<(TopicId, i32), String> = BTreeMap::new();
    let mut load: BTreeMap<String, usize> = subscriptions.keys().map(|m| (m.clone(), 0)).collect();
    let eligible = |m: &str, t: &TopicId| subscriptions.get(m).is_some_and(|ts| ts.contains(t));
    // Partitions the members may take in total, for the cap below.
    let total: usize = partitions
        .iter()
        .filter(|(t, _)| subscriptions.values().any(|ts| ts.contains(*t)))
        .map(|(_, n)| (*n).max(0) as usize)
        .sum();
    let cap = if subscriptions.is_empty() {
        0
    } else {
        total.div_ceil(subscriptions.len())
    };
    // 1. Sticky: previous owners keep what they still subscribe to, up to the even share.
    for (m, a) in previous {
        for (t, ps) in a {
            let Some(count) = partitions.get(t) else {
                continue;
            };
            if !eligible(m, t) {
                continue;
            }
            for p in ps.iter().filter(|p| **p < *count) {
                let l = load.get_mut(m).expect("eligible members have a load");
                if *l < cap {
                    *l += 1;
                    owner.insert((*t, *p), m.clone());
                }
            }
        }
    }
    // 2. The rest to the least-loaded subscriber.
    for (t, count) in partitions {
        for p in 0..*count {
            if owner.contains_key(&(*t, p)) {
                continue;
            }
            let best = load
                .iter()
                .filter(|(m, _)| eligible(m, t))
                .min_by_key(|(m, l)| (**l, (*m).clone()))
                .map(|(m, _)| m.clone());
            if let Some(m) = best {
                *load.get_mut(&m).expect("has a load") += 1;
                owner.insert((*t, p), m);
            }
        }
    }
    // 3. With uneven subscriptions, move partitions from a member to a subscriber with at
    // least two fewer until none can move (each move lowers the sum of squared loads).
    loop {
        let mut moved = false;
        let keys: Vec<(TopicId, i32)> = owner.keys().copied().collect();
        for key in keys {
            let from = owner[&key].clone();
            let from_load = load[&from];
            let to = load
                .iter()
                .filter(|(m, l)| eligible(m, &key.0) && **l + 1 < from_load)
                .min_by_key(|(m, l)| (**l, (*m).clone()))
                .map(|(m, _)| m.clone());
            if let Some(to) = to {
                *load.get_mut(&from).expect("has a load") -= 1;
                *load.get_mut(&to).expect("has a load") += 1;
                owner.insert(key, to);
                moved = true;
            }
        }
        if !moved {
            break;
        }
    }
    let mut out: BTreeMap<String, Assignment> = subscriptions
        .keys()
        .map(|m| (m.clone(), Assignment::new()))
        .collect();
    for ((t, p), m) in owner {
        out.entry(m).or_default().entry(t).or_default().insert(p);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::topics::Topic;
    use std::sync::Arc;

    fn settings() -> Settings {
        Settings {
            session_timeout: Duration::from_secs(45),
            assignors: vec!["uniform".into(), "range".into()],
        }
    }

    fn table(topics: &[(&str, u8, i32)]) -> TopicTable {
        let mut t = TopicTable::default();
        for (name, id, n) in topics {
            t.topics.insert(
                Arc::from(*name),
                Topic {
                    name: Arc::from(*name),
                    id: [*id; 16],
                    partitions: *n,
                    configs: Default::default(),
                    replicas: Vec::new(),
                },
            );
        }
        t
    }

    fn hb(member: &str, epoch: i32, owned: Option<&Assignment>) -> Heartbeat {
        Heartbeat {
            member_id: member.into(),
            epoch,
            instance_id: None,
            rack_id: None,
            rebalance_timeout_ms: if epoch == 0 { 30_000 } else { -1 },
            subscribed_names: (epoch == 0).then(|| vec!["t".to_string()]),
            subscribed_regex: None,
            assignor: None,
            owned: owned.cloned(),
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
        }
    }

    fn count(a: &Assignment) -> usize {
        a.values().map(BTreeSet::len).sum()
    }

    /// Every partition owned by at most one member at any time, over any interleaving.
    fn no_double_ownership(g: &ConsumerGroup) {
        let mut seen = BTreeSet::new();
        for m in g.members.values() {
            for (t, ps) in m.assigned.iter().chain(m.revoking.iter()) {
                for p in ps {
                    assert!(seen.insert((*t, *p)), "partition {p} owned twice");
                }
            }
        }
    }

    #[test]
    fn a_joining_member_takes_only_partitions_the_others_released() {
        let topics = table(&[("t", 1, 8)]);
        let s = settings();
        let now = Instant::now();
        let mut g = ConsumerGroup::default();
        let a = g.heartbeat(hb("a", 0, None), &topics, &s, now).unwrap();
        assert_eq!(count(a.assignment.as_ref().unwrap()), 8);
        let a_owned = a.assignment.unwrap();
        // b joins: it gets nothing until a revokes.
        let b = g.heartbeat(hb("b", 0, None), &topics, &s, now).unwrap();
        assert_eq!(count(b.assignment.as_ref().unwrap()), 0);
        no_double_ownership(&g);
        // a's next heartbeat: revoke 4, keep 4 (still consuming them), epoch held back.
        let a2 = g
            .heartbeat(hb("a", a.epoch, Some(&a_owned)), &topics, &s, now)
            .unwrap();
        assert_eq!(a2.epoch, a.epoch);
        let kept = a2.assignment.unwrap();
        assert_eq!(count(&kept), 4);
        assert!(is_subset(&kept, &a_owned));
        no_double_ownership(&g);
        // a acknowledges; it moves to the new epoch.
        let a3 = g
            .heartbeat(hb("a", a.epoch, Some(&kept)), &topics, &s, now)
            .unwrap();
        assert_eq!(a3.epoch, g.assignment_epoch);
        // b now gets the 4 a released.
        let b2 = g
            .heartbeat(hb("b", b.epoch, Some(&Assignment::new())), &topics, &s, now)
            .unwrap();
        assert_eq!(count(b2.assignment.as_ref().unwrap()), 4);
        assert_eq!(g.state_name(), "Stable");
        no_double_ownership(&g);
    }

    /// a owns all 4 partitions; b joins; a is told to revoke two, does, and moves on.
    struct Handover {
        g: ConsumerGroup,
        topics: TopicTable,
        s: Settings,
        now: Instant,
        first_epoch: i32,
        owned: Assignment,
        kept: Assignment,
        moved_epoch: i32,
    }

    fn handover() -> Handover {
        let topics = table(&[("t", 1, 4)]);
        let s = settings();
        let now = Instant::now();
        let mut g = ConsumerGroup::default();
        let a = g.heartbeat(hb("a", 0, None), &topics, &s, now).unwrap();
        let owned = a.assignment.unwrap();
        g.heartbeat(hb("b", 0, None), &topics, &s, now).unwrap();
        let kept = g
            .heartbeat(hb("a", a.epoch, Some(&owned)), &topics, &s, now)
            .unwrap()
            .assignment
            .unwrap();
        let moved = g
            .heartbeat(hb("a", a.epoch, Some(&kept)), &topics, &s, now)
            .unwrap();
        assert!(moved.epoch > a.epoch);
        Handover {
            g,
            topics,
            s,
            now,
            first_epoch: a.epoch,
            owned,
            kept,
            moved_epoch: moved.epoch,
        }
    }

    #[test]
    fn a_stale_epoch_is_fenced_and_a_lost_answer_is_not() {
        let mut h = handover();
        let (topics, s, now) = (h.topics.clone(), h.s.clone(), h.now);
        let err =
            h.g.heartbeat(hb("a", h.moved_epoch + 5, None), &topics, &s, now)
                .unwrap_err();
        assert_eq!(err.0, FENCED_MEMBER_EPOCH);
        // a's answer with the new epoch was lost: it retries with its previous epoch and what it
        // owns, is accepted and told the new epoch.
        let again =
            h.g.heartbeat(hb("a", h.first_epoch, Some(&h.kept)), &topics, &s, now)
                .unwrap();
        assert_eq!(again.epoch, h.moved_epoch);
        // The previous epoch while claiming partitions it no longer has: fenced.
        let err =
            h.g.heartbeat(hb("a", h.first_epoch, Some(&h.owned)), &topics, &s, now)
                .unwrap_err();
        assert_eq!(err.0, FENCED_MEMBER_EPOCH);
        let err =
            h.g.heartbeat(hb("zz", 3, None), &topics, &s, now)
                .unwrap_err();
        assert_eq!(err.0, ErrorCode::UNKNOWN_MEMBER_ID);
    }

    #[test]
    fn commits_need_the_current_epoch_or_the_previous_one_for_owned_partitions() {
        let h = handover();
        let t = [1u8; 16];
        let kept_p = *h.kept[&t].iter().next().unwrap();
        let gone_p = (0..4).find(|p| !h.kept[&t].contains(p)).unwrap();
        let check = |epoch, partitions: &[(TopicId, i32)]| h.g.commit_check("a", epoch, partitions);
        assert_eq!(check(h.moved_epoch, &[(t, gone_p)]), ErrorCode::NONE);
        assert_eq!(check(h.first_epoch, &[(t, kept_p)]), ErrorCode::NONE);
        assert_eq!(check(h.first_epoch, &[(t, gone_p)]), STALE_MEMBER_EPOCH);
        assert_eq!(check(h.moved_epoch + 1, &[]), STALE_MEMBER_EPOCH);
        assert_eq!(h.g.commit_check("x", 1, &[]), ErrorCode::UNKNOWN_MEMBER_ID);
        assert_eq!(h.g.commit_check("", -1, &[]), ErrorCode::UNKNOWN_MEMBER_ID);
    }

    #[test]
    fn leaving_and_expiry_free_partitions_for_the_rest() {
        let topics = table(&[("t", 1, 6)]);
        let s = settings();
        let now = Instant::now();
        let mut g = ConsumerGroup::default();
        let mut owned = BTreeMap::new();
        let mut epochs = BTreeMap::new();
        for m in ["a", "b", "c"] {
            let r = g.heartbeat(hb(m, 0, None), &topics, &s, now).unwrap();
            epochs.insert(m, r.epoch);
            owned.insert(m, r.assignment.unwrap());
        }
        // Converge: heartbeat everyone a few rounds, acknowledging what they are told.
        for _ in 0..4 {
            for m in ["a", "b", "c"] {
                let r = g
                    .heartbeat(hb(m, epochs[m], Some(&owned[m])), &topics, &s, now)
                    .unwrap();
                epochs.insert(m, r.epoch);
                if let Some(a) = r.assignment {
                    owned.insert(m, a);
                }
                no_double_ownership(&g);
            }
        }
        assert_eq!(g.state_name(), "Stable");
        assert!(owned.values().all(|a| count(a) == 2));
        g.heartbeat(hb("c", LEAVE_EPOCH, None), &topics, &s, now)
            .unwrap();
        for _ in 0..2 {
            for m in ["a", "b"] {
                let r = g
                    .heartbeat(hb(m, epochs[m], Some(&owned[m])), &topics, &s, now)
                    .unwrap();
                epochs.insert(m, r.epoch);
                if let Some(a) = r.assignment {
                    owned.insert(m, a);
                }
            }
        }
        assert_eq!(count(&owned["a"]) + count(&owned["b"]), 6);
        // b goes silent: after the session timeout a gets everything.
        let later = now + s.session_timeout + Duration::from_secs(1);
        g.members.get_mut("a").unwrap().session_deadline = later + s.session_timeout;
        let gone = g.expire(later);
        assert_eq!(gone.len(), 1);
        let r = g
            .heartbeat(hb("a", epochs["a"], Some(&owned["a"])), &topics, &s, later)
            .unwrap();
        assert_eq!(count(r.assignment.as_ref().unwrap()), 6);
    }

    #[test]
    fn a_regex_subscription_picks_up_a_topic_created_later() {
        let s = settings();
        let now = Instant::now();
        let mut g = ConsumerGroup::default();
        let mut join = hb("a", 0, None);
        join.subscribed_names = None;
        join.subscribed_regex = Some("orders-.*".into());
        let topics = table(&[("orders-1", 1, 2), ("other", 2, 3)]);
        let r = g.heartbeat(join, &topics, &s, now).unwrap();
        assert_eq!(count(r.assignment.as_ref().unwrap()), 2);
        let topics = table(&[("orders-1", 1, 2), ("other", 2, 3), ("orders-2", 3, 4)]);
        let r2 = g
            .heartbeat(hb("a", r.epoch, r.assignment.as_ref()), &topics, &s, now)
            .unwrap();
        assert!(r2.epoch > r.epoch);
        assert_eq!(count(r2.assignment.as_ref().unwrap()), 6);
        let mut bad = hb("b", 0, None);
        bad.subscribed_regex = Some("(".into());
        assert_eq!(
            g.heartbeat(bad, &topics, &s, now).unwrap_err().0,
            INVALID_REGULAR_EXPRESSION
        );
    }

    #[test]
    fn uniform_is_balanced_and_sticky_and_range_is_contiguous() {
        let t = [1u8; 16];
        let parts = BTreeMap::from([(t, 8)]);
        let subs: BTreeMap<String, BTreeSet<TopicId>> = ["a", "b", "c"]
            .iter()
            .map(|m| (m.to_string(), BTreeSet::from([t])))
            .collect();
        let first = assign_uniform(&subs, &parts, &BTreeMap::new());
        let loads: Vec<usize> = first.values().map(count).collect();
        assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1);
        let mut more = subs.clone();
        more.insert("d".into(), BTreeSet::from([t]));
        let second = assign_uniform(&more, &parts, &first);
        // Only what d takes moved.
        let moved: usize = ["a", "b", "c"]
            .iter()
            .map(|m| count(&difference(&first[*m], &second[*m])))
            .sum();
        assert_eq!(moved, count(&second["d"]));
        assert_eq!(count(&second["d"]), 2);
        let range = assign_range(&subs, &parts);
        assert_eq!(range["a"][&t], BTreeSet::from([0, 1, 2]));
        assert_eq!(range["c"][&t], BTreeSet::from([6, 7]));
    }

    #[test]
    fn durable_form_round_trips() {
        let topics = table(&[("t", 1, 4)]);
        let s = settings();
        let now = Instant::now();
        let mut g = ConsumerGroup::default();
        g.heartbeat(hb("a", 0, None), &topics, &s, now).unwrap();
        g.heartbeat(hb("b", 0, None), &topics, &s, now).unwrap();
        let v = g.value();
        let back = ConsumerGroup::from_value(v.clone(), &s, now);
        assert_eq!(back.value(), v);
    }
}
