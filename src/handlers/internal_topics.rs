//! The internal topics the coordinators keep their state in, `__consumer_offsets` and
//! `__transaction_state`: how they are created (compacted, their partition counts fixed) when
//! first needed. On a single node this broker's controller creates them; a broker of a cluster
//! that is not the controller asks the controller with CreateTopics over its client listener.

use std::rc::Rc;

use kafka_protocol::messages::ApiKey;

use super::{str_bytes, topic_name};
use crate::model::{ErrorCode, ShardId};
use crate::shard::{Reply, Request, Shard, TopicSpec};

/// A compacted internal topic of `partitions` partitions; in a cluster `replication_factor`
/// replicas (at most the brokers there are), on a single node one.
pub fn spec(shard: &Shard, name: &str, partitions: i32, replication_factor: i16) -> TopicSpec {
    let replication_factor = match shard.cluster() {
        None => 1,
        Some(_) => {
            let brokers = i16::try_from(shard.topics().brokers.len()).unwrap_or(i16::MAX);
            replication_factor.min(brokers.max(1))
        }
    };
    TopicSpec {
        name: name.to_string(),
        partitions,
        replication_factor,
        configs: vec![("cleanup.policy".to_string(), "compact".to_string())],
    }
}

/// Creates the topic of `spec` if it does not exist. `COORDINATOR_NOT_AVAILABLE` until this
/// broker's table has it: clients retry FindCoordinator. In a cluster, `ask_controller` sends the
/// creation to the controller; without it a broker that is not the controller waits for the
/// controller to create the topic itself (as it does `__consumer_offsets`, once the voters have
/// registered, so that it gets all its replicas).
pub async fn ensure(
    shard: &Rc<Shard>,
    spec: TopicSpec,
    ask_controller: bool,
) -> Result<(), ErrorCode> {
    if shard.topics().get(&spec.name).is_some() {
        return Ok(());
    }
    if let Some(cluster) = shard.cluster().filter(|_| ask_controller) {
        let controller = super::metadata::controller_id(shard);
        if controller >= 0 && controller != cluster.node_id {
            use kafka_protocol::messages::create_topics_request::{
                CreatableTopic, CreatableTopicConfig,
            };
            use kafka_protocol::messages::{CreateTopicsRequest, CreateTopicsResponse};
            let mut topic = CreatableTopic::default();
            topic.name = topic_name(&spec.name);
            topic.num_partitions = spec.partitions;
            topic.replication_factor = spec.replication_factor;
            topic.configs = spec
                .configs
                .iter()
                .map(|(k, v)| {
                    let mut c = CreatableTopicConfig::default();
                    c.name = str_bytes(k);
                    c.value = Some(str_bytes(v));
                    c
                })
                .collect();
            let mut req = CreateTopicsRequest::default();
            req.topics = vec![topic];
            req.timeout_ms = 30_000;
            let answer: anyhow::Result<CreateTopicsResponse> =
                super::forward::exchange(shard, controller, ApiKey::CreateTopics, 5, &req).await;
            match answer {
                Ok(r) => {
                    let code = r.topics.first().map(|t| ErrorCode(t.error_code));
                    if code != Some(ErrorCode::NONE)
                        && code != Some(ErrorCode::TOPIC_ALREADY_EXISTS)
                    {
                        tracing::warn!(?code, topic = %spec.name, "the controller did not create an internal topic");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), topic = %spec.name, "asking the controller to create an internal topic failed");
                }
            }
            // The topic is there once this broker's table has it; until then clients retry.
            return Err(ErrorCode::COORDINATOR_NOT_AVAILABLE);
        }
    }
    let reply = shard
        .call(
            ShardId(0),
            Request::CreateTopics {
                specs: vec![spec],
                validate_only: false,
            },
        )
        .await;
    match reply {
        Reply::Created(results) => match results.first() {
            Some((_, Ok(_))) => Ok(()),
            Some((_, Err((code, _)))) if *code == ErrorCode::TOPIC_ALREADY_EXISTS => Ok(()),
            _ => Err(ErrorCode::COORDINATOR_NOT_AVAILABLE),
        },
        _ => Err(ErrorCode::COORDINATOR_NOT_AVAILABLE),
    }
}
