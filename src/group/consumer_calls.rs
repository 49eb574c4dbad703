//! The coordinator's side of KIP-848: validating ConsumerGroupHeartbeat as Kafka does, running
//! it through the group's state ([`super::consumer`]), writing the group's new state to its
//! `__consumer_offsets` partition before answering when it changed, and ConsumerGroupDescribe.

use std::rc::Rc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::consumer_group_describe_response::{
    Assignment as DescribedAssignment, DescribedGroup, Member as DescribedMember,
    TopicPartitions as DescribedPartitions,
};
use kafka_protocol::messages::consumer_group_heartbeat_response::{
    Assignment as BeatAssignment, TopicPartitions as BeatPartitions,
};
use kafka_protocol::messages::{
    ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse, GroupId,
};
use kafka_protocol::protocol::StrBytes;

use super::consumer::{self, Assignment, ConsumerGroup, Heartbeat, JOIN_EPOCH, STATIC_LEAVE_EPOCH};
use super::coordinator::{ClientInfo, Group, GroupCoordinator};
use super::records;
use crate::model::ErrorCode;
use crate::shard::Shard;

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

fn invalid(message: &str) -> consumer::BeatError {
    (ErrorCode::INVALID_REQUEST, message.to_string())
}

/// Kafka's checks of a heartbeat's fields, before any state is looked at.
fn validate(req: &ConsumerGroupHeartbeatRequest, version: i16) -> Result<(), consumer::BeatError> {
    if req.group_id.0.is_empty() {
        return Err(invalid("GroupId can't be empty."));
    }
    if req.instance_id.as_ref().is_some_and(|i| i.is_empty()) {
        return Err(invalid("InstanceId can't be empty."));
    }
    if req.rack_id.as_ref().is_some_and(|r| r.is_empty()) {
        return Err(invalid("RackId can't be empty."));
    }
    if req.member_epoch < STATIC_LEAVE_EPOCH {
        return Err(invalid("MemberEpoch is invalid."));
    }
    if req.member_epoch == STATIC_LEAVE_EPOCH && req.instance_id.is_none() {
        return Err(invalid(
            "InstanceId can't be null when MemberEpoch is -2 (static leave).",
        ));
    }
    // v0 let the coordinator name a joining member; from v1 the client always does.
    if req.member_id.is_empty() && (version >= 1 || req.member_epoch != JOIN_EPOCH) {
        return Err(invalid("MemberId can't be empty."));
    }
    if req.member_epoch == JOIN_EPOCH {
        if req.rebalance_timeout_ms == -1 {
            return Err(invalid(
                "RebalanceTimeoutMs must be provided in first request.",
            ));
        }
        if req.topic_partitions.as_ref().is_none_or(|t| !t.is_empty()) {
            return Err(invalid("TopicPartitions must be empty when (re-)joining."));
        }
        if req.subscribed_topic_names.is_none() && req.subscribed_topic_regex.is_none() {
            return Err(invalid(
                "SubscribedTopicNames or SubscribedTopicRegex must be set in first request.",
            ));
        }
    }
    Ok(())
}

fn owned_of(req: &ConsumerGroupHeartbeatRequest) -> Option<Assignment> {
    req.topic_partitions.as_ref().map(|list| {
        let mut a = Assignment::new();
        for t in list {
            let set = a.entry(*t.topic_id.as_bytes()).or_default();
            set.extend(t.partitions.iter().copied());
        }
        a.retain(|_, ps| !ps.is_empty());
        a
    })
}

impl GroupCoordinator {
    pub(super) fn consumer_settings(&self) -> consumer::Settings {
        consumer::Settings {
            session_timeout: Duration::from_millis(self.config.group_consumer_session_timeout_ms),
            assignors: self.config.group_consumer_assignors.clone(),
        }
    }

    /// ConsumerGroupHeartbeat: join, leave or heartbeat; the group's state is durable before
    /// the member hears of a new epoch or assignment.
    pub(super) async fn consumer_heartbeat(
        &self,
        shard: &Rc<Shard>,
        req: ConsumerGroupHeartbeatRequest,
        version: i16,
        client: ClientInfo,
    ) -> ConsumerGroupHeartbeatResponse {
        let mut response = ConsumerGroupHeartbeatResponse::default();
        response.heartbeat_interval_ms =
            i32::try_from(self.config.group_consumer_heartbeat_interval_ms).unwrap_or(i32::MAX);
        let fail = |mut r: ConsumerGroupHeartbeatResponse, (code, message): consumer::BeatError| {
            r.error_code = code.0;
            r.error_message = Some(sb(&message));
            r
        };
        if let Err(e) = validate(&req, version) {
            return fail(response, e);
        }
        let group_id = req.group_id.0.to_string();
        let member_id = if req.member_id.is_empty() {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            req.member_id.to_string()
        };
        let hb = Heartbeat {
            member_id,
            epoch: req.member_epoch,
            instance_id: req.instance_id.as_ref().map(|s| s.to_string()),
            rack_id: req.rack_id.as_ref().map(|s| s.to_string()),
            rebalance_timeout_ms: req.rebalance_timeout_ms,
            subscribed_names: req
                .subscribed_topic_names
                .as_ref()
                .map(|names| names.iter().map(|n| n.0.to_string()).collect()),
            subscribed_regex: req.subscribed_topic_regex.as_ref().map(|s| s.to_string()),
            assignor: req.server_assignor.as_ref().map(|s| s.to_string()),
            owned: owned_of(&req),
            client_id: client.client_id,
            client_host: client.host,
        };
        let topics = shard.topics();
        let settings = self.consumer_settings();
        let outcome = {
            let mut groups = self.groups.borrow_mut();
            if !groups.contains_key(&group_id) && hb.epoch != JOIN_EPOCH {
                // No such group (deleted, or never joined): the member rejoins from scratch.
                Err((
                    ErrorCode::UNKNOWN_MEMBER_ID,
                    format!("group {group_id} has no member {}", hb.member_id),
                ))
            } else {
                let group = groups
                    .entry(group_id.clone())
                    .or_insert_with(|| Group::new(&group_id));
                if group.share.is_some()
                    || (group.consumer.is_none() && group.has_classic_members())
                {
                    Err((
                        ErrorCode::GROUP_ID_NOT_FOUND,
                        format!(
                            "group {group_id} is a share group or a classic group with members"
                        ),
                    ))
                } else {
                    // KIP-848 online migration of an empty classic group: it becomes a
                    // consumer-protocol group and keeps its committed offsets.
                    let cg = group.consumer.get_or_insert_with(ConsumerGroup::default);
                    cg.heartbeat(hb, &topics, &settings, Instant::now())
                        .map(|beat| {
                            let value = beat.persist.then(|| cg.value());
                            (beat, value)
                        })
                }
            }
        };
        let (beat, value) = match outcome {
            Ok(x) => x,
            Err(e) => return fail(response, e),
        };
        if let Some(value) = value {
            let written = match records::consumer_group_record(&group_id, Some(&value)) {
                Ok(record) => self.persist(shard, &group_id, vec![record]).await,
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "encoding a consumer group failed");
                    Err(ErrorCode::UNKNOWN_SERVER_ERROR)
                }
            };
            if let Err(code) = written {
                return fail(response, (code, "the group's state was not written".into()));
            }
        }
        response.member_id = Some(sb(&beat.member_id));
        response.member_epoch = beat.epoch;
        response.assignment = beat.assignment.map(|a| {
            let mut out = BeatAssignment::default();
            out.topic_partitions = a
                .into_iter()
                .map(|(topic, ps)| {
                    let mut tp = BeatPartitions::default();
                    tp.topic_id = uuid::Uuid::from_bytes(topic);
                    tp.partitions = ps.into_iter().collect();
                    tp
                })
                .collect();
            out
        });
        response
    }

    /// ConsumerGroupDescribe of one group.
    pub(super) fn consumer_describe(&self, shard: &Rc<Shard>, group_id: &str) -> DescribedGroup {
        let mut d = DescribedGroup::default();
        d.group_id = GroupId(sb(group_id));
        d.authorized_operations = i32::MIN;
        let groups = self.groups.borrow();
        let Some(cg) = groups.get(group_id).and_then(|g| g.consumer.as_ref()) else {
            d.error_code = ErrorCode::GROUP_ID_NOT_FOUND.0;
            d.error_message = Some(sb(&format!(
                "group {group_id} is not a consumer-protocol group"
            )));
            d.group_state = sb("Dead");
            return d;
        };
        let described = |a: &Assignment| {
            let mut out = DescribedAssignment::default();
            out.topic_partitions = a
                .iter()
                .map(|(topic, ps)| {
                    let id = uuid::Uuid::from_bytes(*topic);
                    let mut tp = DescribedPartitions::default();
                    tp.topic_id = id;
                    tp.topic_name = crate::handlers::topic_name(
                        shard.topic_by_id(&id).as_deref().unwrap_or(""),
                    );
                    tp.partitions = ps.iter().copied().collect();
                    tp
                })
                .collect();
            out
        };
        d.group_state = sb(cg.state_name());
        d.group_epoch = cg.epoch;
        d.assignment_epoch = cg.assignment_epoch;
        d.assignor_name = sb(&cg.assignor);
        d.members = cg
            .members
            .values()
            .map(|m| {
                let mut dm = DescribedMember::default();
                dm.member_id = sb(&m.id);
                dm.instance_id = m.instance_id.as_deref().map(sb);
                dm.rack_id = m.rack_id.as_deref().map(sb);
                dm.member_epoch = m.epoch;
                dm.client_id = sb(&m.client_id);
                dm.client_host = sb(&m.client_host);
                dm.subscribed_topic_names = m
                    .subscribed_names
                    .iter()
                    .map(|n| crate::handlers::topic_name(n))
                    .collect();
                dm.subscribed_topic_regex = m.subscribed_regex.as_ref().map(|(p, _)| sb(p));
                dm.assignment = described(&m.assigned);
                dm.target_assignment =
                    described(cg.target.get(&m.id).unwrap_or(&Assignment::new()));
                // 1: the member speaks the consumer protocol (0 would be a classic member).
                dm.member_type = 1;
                dm
            })
            .collect();
        d
    }

    /// Removes consumer-protocol members whose session or rebalance timeout ran out, and writes
    /// their groups' new state.
    pub(super) async fn expire_consumer_members(&self, shard: &Rc<Shard>, now: Instant) {
        let mut work = Vec::new();
        {
            let mut groups = self.groups.borrow_mut();
            for (id, g) in groups.iter_mut() {
                let Some(cg) = g.consumer.as_mut() else {
                    continue;
                };
                let gone = cg.expire(now);
                if gone.is_empty() {
                    continue;
                }
                for (member, reason) in &gone {
                    tracing::info!(group = %id, %member, reason, "consumer group member removed");
                }
                work.push((id.clone(), cg.value()));
            }
        }
        for (group, value) in work {
            if let Ok(record) = records::consumer_group_record(&group, Some(&value)) {
                let _ = self.persist(shard, &group, vec![record]).await;
            }
        }
    }
}
