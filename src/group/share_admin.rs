//! The share-group offset admin APIs of KIP-932, at the group's coordinator: AlterShareGroupOffsets
//! (Kafka's `kafka-share-groups.sh --reset-offsets`, `strom group reset-offsets`) and
//! DeleteShareGroupOffsets (`--delete-offsets`). Both change what the group has left to read, so
//! both need a group without members, as in Kafka (`NON_EMPTY_GROUP`).
//!
//! A share-partition's state lives in the group's `__consumer_offsets` partition (strom's stand-in
//! for Kafka's `__share_group_state`), so Kafka's inter-broker DeleteShareGroupState is a
//! tombstone written here, not a request to another coordinator.
//!
//! - Altering a partition's start offset starts it afresh there: every record at or above the new
//!   start is available again with delivery count 0, every record below it is done. A group that
//!   does not exist yet is created empty, so a group can be placed before its first consumer.
//! - Deleting a topic's offsets forgets its share-partitions: the next consumer starts them at
//!   `share.auto.offset.reset`, as for a group that never read the topic.

use std::rc::Rc;

use kafka_protocol::messages::alter_share_group_offsets_response::{
    AlterShareGroupOffsetsResponsePartition, AlterShareGroupOffsetsResponseTopic,
};
use kafka_protocol::messages::delete_share_group_offsets_response::DeleteShareGroupOffsetsResponseTopic;
use kafka_protocol::messages::{
    AlterShareGroupOffsetsRequest, AlterShareGroupOffsetsResponse, DeleteShareGroupOffsetsRequest,
    DeleteShareGroupOffsetsResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::coordinator::{Group, GroupCoordinator};
use super::records;
use super::share::{ShareGroup, SharePartition};
use crate::model::ErrorCode;
use crate::shard::Shard;

fn sb(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// Why a group's share offsets cannot change now (None: they can; the group may not exist yet).
fn refusal(group: Option<&Group>, group_id: &str) -> Option<(ErrorCode, String)> {
    let g = group?;
    if g.share.is_none() && !g.is_bare() {
        return Some((
            ErrorCode::GROUP_ID_NOT_FOUND,
            format!("group {group_id} is not a share group"),
        ));
    }
    if !g.is_empty() {
        return Some((
            ErrorCode::NON_EMPTY_GROUP,
            format!("share group {group_id} has members; stop them first"),
        ));
    }
    None
}

impl GroupCoordinator {
    /// AlterShareGroupOffsets: sets the start offset of each named share-partition.
    pub(super) async fn alter_share_offsets(
        &self,
        shard: &Rc<Shard>,
        req: AlterShareGroupOffsetsRequest,
    ) -> AlterShareGroupOffsetsResponse {
        let mut response = AlterShareGroupOffsetsResponse::default();
        let group_id = req.group_id.0.to_string();
        let fail = |mut r: AlterShareGroupOffsetsResponse, code: ErrorCode, message: String| {
            r.error_code = code.0;
            r.error_message = Some(sb(&message));
            r
        };
        if group_id.is_empty() {
            return fail(
                response,
                ErrorCode::INVALID_GROUP_ID,
                "the group id is empty".into(),
            );
        }
        let table = shard.topics();
        let mut starts: Vec<((String, i32), i64)> = Vec::new();
        for t in &req.topics {
            let name = t.topic_name.0.to_string();
            let meta = table.get(&name);
            let mut rt = AlterShareGroupOffsetsResponseTopic::default();
            rt.topic_name = t.topic_name.clone();
            if let Some(m) = meta {
                rt.topic_id = uuid::Uuid::from_bytes(m.id);
            }
            for p in &t.partitions {
                let mut rp = AlterShareGroupOffsetsResponsePartition::default();
                rp.partition_index = p.partition_index;
                if meta.is_none_or(|m| p.partition_index < 0 || p.partition_index >= m.partitions) {
                    rp.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0;
                    rp.error_message =
                        Some(sb(&format!("{name}-{} does not exist", p.partition_index)));
                } else if p.start_offset < 0 {
                    rp.error_code = ErrorCode::INVALID_REQUEST.0;
                    rp.error_message =
                        Some(sb(&format!("start offset {} is negative", p.start_offset)));
                } else {
                    starts.push(((name.clone(), p.partition_index), p.start_offset));
                }
                rt.partitions.push(rp);
            }
            response.responses.push(rt);
        }
        let writes = {
            let groups = self.groups.borrow();
            let group = groups.get(&group_id);
            if let Some((code, message)) = refusal(group, &group_id) {
                return fail(response, code, message);
            }
            let created = group.and_then(|g| g.share.as_ref()).is_none();
            let mut writes = Vec::new();
            if created {
                writes.extend(
                    records::share_group_record(&group_id, Some(&ShareGroup::default().value()))
                        .ok(),
                );
            }
            for ((topic, p), offset) in &starts {
                let v = SharePartition::new(*offset).value();
                writes.extend(records::share_partition_record(&group_id, topic, *p, Some(&v)).ok());
            }
            writes
        };
        if let Err(code) = self.persist(shard, &group_id, writes).await {
            return fail(response, code, "the group's state was not written".into());
        }
        let mut groups = self.groups.borrow_mut();
        let group = groups
            .entry(group_id.clone())
            .or_insert_with(|| Group::new(&group_id));
        // Members may have joined while the records were written: they start from the new offsets.
        let sg = group.share.get_or_insert_with(ShareGroup::default);
        for (key, offset) in starts {
            sg.partitions.insert(key, SharePartition::new(offset));
        }
        drop(groups);
        self.share_progress.notify(usize::MAX);
        response
    }

    /// DeleteShareGroupOffsets: forgets every share-partition of each named topic.
    pub(super) async fn delete_share_offsets(
        &self,
        shard: &Rc<Shard>,
        req: DeleteShareGroupOffsetsRequest,
    ) -> DeleteShareGroupOffsetsResponse {
        let mut response = DeleteShareGroupOffsetsResponse::default();
        let group_id = req.group_id.0.to_string();
        let fail = |mut r: DeleteShareGroupOffsetsResponse, code: ErrorCode, message: String| {
            r.error_code = code.0;
            r.error_message = Some(sb(&message));
            r
        };
        if group_id.is_empty() {
            return fail(
                response,
                ErrorCode::INVALID_GROUP_ID,
                "the group id is empty".into(),
            );
        }
        let table = shard.topics();
        let (gone, writes) = {
            let groups = self.groups.borrow();
            let group = groups.get(&group_id);
            if group.is_none_or(|g| g.share.is_none()) {
                return fail(
                    response,
                    ErrorCode::GROUP_ID_NOT_FOUND,
                    format!("share group {group_id} does not exist"),
                );
            }
            if let Some((code, message)) = refusal(group, &group_id) {
                return fail(response, code, message);
            }
            let partitions = group
                .and_then(|g| g.share.as_ref())
                .map(|sg| &sg.partitions);
            let mut gone = Vec::new();
            let mut writes = Vec::new();
            for t in &req.topics {
                let name = t.topic_name.0.to_string();
                let mut rt = DeleteShareGroupOffsetsResponseTopic::default();
                rt.topic_name = TopicName(sb(&name));
                if let Some(m) = table.get(&name) {
                    rt.topic_id = uuid::Uuid::from_bytes(m.id);
                }
                let keys: Vec<(String, i32)> = partitions
                    .into_iter()
                    .flat_map(|ps| ps.keys())
                    .filter(|(topic, _)| *topic == name)
                    .cloned()
                    .collect();
                if keys.is_empty() {
                    rt.error_code = ErrorCode::UNKNOWN_TOPIC_OR_PARTITION.0;
                    rt.error_message = Some(sb(&format!(
                        "share group {group_id} has no offsets for {name}"
                    )));
                }
                for (topic, p) in &keys {
                    writes.extend(records::share_partition_record(&group_id, topic, *p, None).ok());
                }
                gone.extend(keys);
                response.responses.push(rt);
            }
            (gone, writes)
        };
        if let Err(code) = self.persist(shard, &group_id, writes).await {
            return fail(response, code, "the group's state was not written".into());
        }
        if let Some(sg) = self
            .groups
            .borrow_mut()
            .get_mut(&group_id)
            .and_then(|g| g.share.as_mut())
        {
            for key in &gone {
                sg.partitions.remove(key);
            }
        }
        response
    }
}
