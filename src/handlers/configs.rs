//! DescribeConfigs, AlterConfigs and IncrementalAlterConfigs for topics and the broker, with
//! Kafka's names, defaults and sources. Describe returns every config of the resource (clients do
//! read-modify-write on the full list). Changes go through the controller, which validates them
//! (`INVALID_CONFIG` with a message), persists them and hands every shard the new table; topic
//! overrides and dynamic broker settings survive restarts.

use std::rc::Rc;

use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult, DescribeConfigsSynonym,
};
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, DescribeConfigsRequest, DescribeConfigsResponse,
    IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::str_bytes;
use crate::config::{
    describe_topic_setting, BrokerConfig, ConfigSource, ConfigType, BROKER_SETTINGS,
    STORED_TOPIC_SETTINGS, TOPIC_SETTINGS,
};
use crate::group::{GroupCall, GroupReply};
use crate::model::{ErrorCode, ShardId};
use crate::shard::controller::{ConfigChange, ConfigOp, ConfigResource};
use crate::shard::{Reply, Request, Shard};

const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's GROUP config resource; librdkafka's own enum value (3) is taken as the same.
const RESOURCE_GROUP: i8 = 32;
const RESOURCE_GROUP_LIBRDKAFKA: i8 = 3;

pub(super) fn is_group(kind: i8) -> bool {
    kind == RESOURCE_GROUP || kind == RESOURCE_GROUP_LIBRDKAFKA
}

/// A group's explicit configs, from its coordinator.
async fn group_configs(shard: &Rc<Shard>, group: &str) -> Result<Vec<(String, String)>, ErrorCode> {
    let call = GroupCall::DescribeConfigs {
        group: group.to_string(),
    };
    match crate::handlers::groups::route_call(shard, group, call).await? {
        GroupReply::DescribeConfigs(list) => Ok(list),
        _ => Err(ErrorCode::UNKNOWN_SERVER_ERROR),
    }
}

/// IncrementalAlterConfigs on a group, at its coordinator.
async fn alter_group(
    shard: &Rc<Shard>,
    group: &str,
    changes: Vec<(String, Option<String>)>,
    validate_only: bool,
) -> (ErrorCode, Option<String>) {
    if group.is_empty() {
        return (
            ErrorCode::INVALID_REQUEST,
            Some("Group name can't be empty".into()),
        );
    }
    let call = GroupCall::AlterConfigs {
        group: group.to_string(),
        changes,
        validate_only,
    };
    match crate::handlers::groups::route_call(shard, group, call).await {
        Ok(GroupReply::AlterConfigs(code, message)) => (code, message),
        Ok(_) => (ErrorCode::UNKNOWN_SERVER_ERROR, None),
        Err(code) => (code, None),
    }
}

/// Which resource a request names, or the error for it.
fn resource(shard: &Shard, kind: i8, name: &str) -> Result<ConfigResource, (ErrorCode, String)> {
    match kind {
        RESOURCE_TOPIC => {
            if shard.topics().get(name).is_none() {
                return Err((
                    ErrorCode::UNKNOWN_TOPIC_OR_PARTITION,
                    format!("Topic {name} does not exist"),
                ));
            }
            Ok(ConfigResource::Topic(name.to_string()))
        }
        RESOURCE_BROKER => {
            let node = shard.options.broker.node_id.to_string();
            if name.is_empty() || name == node {
                Ok(ConfigResource::Broker)
            } else {
                Err((ErrorCode::INVALID_REQUEST, format!("Unknown broker {name}")))
            }
        }
        other => Err((
            ErrorCode::INVALID_REQUEST,
            format!("Resource type {other} is not supported"),
        )),
    }
}

/// One config as DescribeConfigs reports it.
struct ConfigRow<'a> {
    name: &'a str,
    value: Option<String>,
    source: ConfigSource,
    read_only: bool,
    kind: crate::config::ConfigType,
    doc: Option<&'a str>,
    synonyms: Vec<(String, Option<String>, ConfigSource)>,
}

fn entry(row: ConfigRow<'_>, version: i16) -> DescribeConfigsResourceResult {
    let mut e = DescribeConfigsResourceResult::default();
    e.name = str_bytes(row.name);
    e.value = row.value.as_deref().map(str_bytes);
    e.read_only = row.read_only;
    e.config_source = row.source as i8;
    e.synonyms = row
        .synonyms
        .into_iter()
        .map(|(n, v, s)| {
            let mut syn = DescribeConfigsSynonym::default();
            syn.name = str_bytes(&n);
            syn.value = v.as_deref().map(str_bytes);
            syn.source = s as i8;
            syn
        })
        .collect();
    if version >= 3 {
        e.config_type = row.kind as i8;
        e.documentation = row.doc.map(str_bytes);
    }
    e
}

fn broker_synonyms(
    config: &BrokerConfig,
    name: &str,
) -> Vec<(String, Option<String>, ConfigSource)> {
    let mut out = Vec::new();
    if let Some((value, source)) = config.describe(name) {
        if source != ConfigSource::Default {
            out.push((name.to_string(), value, source));
        }
    }
    if let Some(d) = BROKER_SETTINGS.iter().find(|d| d.name == name) {
        if let Some(default) = d.default {
            out.push((
                name.to_string(),
                Some(default.to_string()),
                ConfigSource::Default,
            ));
        }
    }
    out
}

pub async fn describe(
    shard: &Rc<Shard>,
    req: DescribeConfigsRequest,
    version: i16,
) -> DescribeConfigsResponse {
    let config = shard.config();
    let table = shard.topics();
    let mut response = DescribeConfigsResponse::default();
    for r in req.resources {
        let mut result = DescribeConfigsResult::default();
        result.resource_type = r.resource_type;
        result.resource_name = r.resource_name.clone();
        let wanted = |name: &str| {
            r.configuration_keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|k| k.as_str() == name))
        };
        let synonyms = |list: Vec<(String, Option<String>, ConfigSource)>| {
            if req.include_synonyms {
                list
            } else {
                Vec::new()
            }
        };
        if is_group(r.resource_type) {
            match group_configs(shard, r.resource_name.as_str()).await {
                Err(code) => result.error_code = code.0,
                Ok(set) => {
                    for (name, value) in set.into_iter().filter(|(n, _)| wanted(n)) {
                        result.configs.push(entry(
                            ConfigRow {
                                name: &name,
                                value: Some(value),
                                source: ConfigSource::DynamicGroup,
                                read_only: false,
                                kind: crate::config::ConfigType::String,
                                doc: None,
                                synonyms: Vec::new(),
                            },
                            version,
                        ));
                    }
                }
            }
            response.results.push(result);
            continue;
        }
        match resource(shard, r.resource_type, r.resource_name.as_str()) {
            Err((code, message)) => {
                result.error_code = code.0;
                result.error_message = Some(str_bytes(&message));
            }
            Ok(ConfigResource::Topic(name)) => {
                let overrides = table
                    .get(&name)
                    .map(|t| t.configs.clone())
                    .unwrap_or_default();
                for (topic_name, broker_name, kind) in TOPIC_SETTINGS {
                    if !wanted(topic_name) {
                        continue;
                    }
                    let Some((value, source)) =
                        describe_topic_setting(&config, &overrides, topic_name)
                    else {
                        continue;
                    };
                    let mut syns = Vec::new();
                    if let Some(v) = overrides.get(*topic_name) {
                        syns.push((
                            topic_name.to_string(),
                            Some(v.clone()),
                            ConfigSource::DynamicTopic,
                        ));
                    }
                    syns.extend(broker_synonyms(&config, broker_name));
                    let doc = BROKER_SETTINGS
                        .iter()
                        .find(|d| d.name == *broker_name)
                        .map(|d| d.doc);
                    result.configs.push(entry(
                        ConfigRow {
                            name: topic_name,
                            value,
                            source,
                            read_only: false,
                            kind: *kind,
                            doc: req.include_documentation.then_some(doc).flatten(),
                            synonyms: synonyms(syns),
                        },
                        version,
                    ));
                }
                for st in STORED_TOPIC_SETTINGS {
                    if !wanted(st.name) {
                        continue;
                    }
                    let (value, source) = match overrides.get(st.name) {
                        Some(v) => (Some(v.clone()), ConfigSource::DynamicTopic),
                        None => (Some(st.default.to_string()), ConfigSource::Default),
                    };
                    let syns = overrides
                        .get(st.name)
                        .map(|v| {
                            (
                                st.name.to_string(),
                                Some(v.clone()),
                                ConfigSource::DynamicTopic,
                            )
                        })
                        .into_iter()
                        .collect();
                    result.configs.push(entry(
                        ConfigRow {
                            name: st.name,
                            value,
                            source,
                            read_only: false,
                            kind: st.kind,
                            doc: req.include_documentation.then_some(st.doc),
                            synonyms: synonyms(syns),
                        },
                        version,
                    ));
                }
            }
            Ok(ConfigResource::Broker) => {
                for d in BROKER_SETTINGS {
                    if !wanted(d.name) {
                        continue;
                    }
                    let Some((mut value, mut source)) = config.describe(d.name) else {
                        continue;
                    };
                    if d.name == "advertised.listeners" && value.is_none() {
                        // Unset, it is what the broker derived at start from where it listens.
                        value = Some(format!(
                            "PLAINTEXT://{}:{}",
                            shard.advertised.0, shard.advertised.1
                        ));
                        source = ConfigSource::StaticBroker;
                    }
                    result.configs.push(entry(
                        ConfigRow {
                            name: d.name,
                            value,
                            source,
                            read_only: !d.dynamic,
                            kind: d.kind,
                            doc: req.include_documentation.then_some(d.doc),
                            synonyms: synonyms(broker_synonyms(&config, d.name)),
                        },
                        version,
                    ));
                }
                // Fixed when the broker started (command line): read-only static configs.
                let started_with = [
                    (
                        "listeners",
                        format!("PLAINTEXT://{}", shard.options.listen),
                        "Where the broker accepts clients (--listen)",
                    ),
                    (
                        "log.dirs",
                        shard.options.data_dir.display().to_string(),
                        "Where partitions and metadata are stored (--data-dir)",
                    ),
                    (
                        "process.roles",
                        "broker,controller".to_string(),
                        "This node is broker and controller of its single-node cluster",
                    ),
                ];
                for (name, value, doc) in started_with {
                    if !wanted(name) {
                        continue;
                    }
                    let row = (
                        name.to_string(),
                        Some(value.clone()),
                        ConfigSource::StaticBroker,
                    );
                    result.configs.push(entry(
                        ConfigRow {
                            name,
                            value: Some(value),
                            source: ConfigSource::StaticBroker,
                            read_only: true,
                            kind: ConfigType::String,
                            doc: req.include_documentation.then_some(doc),
                            synonyms: synonyms(vec![row]),
                        },
                        version,
                    ));
                }
            }
        }
        response.results.push(result);
    }
    response
}

/// Sends resolved changes to the controller; returns (error, message) per resource in order,
/// with resolution errors in place.
async fn apply(
    shard: &Rc<Shard>,
    resolved: Vec<Result<ConfigChange, (ErrorCode, String)>>,
    validate_only: bool,
) -> Vec<(ErrorCode, Option<String>)> {
    let changes: Vec<ConfigChange> = resolved
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    let mut applied = if changes.is_empty() {
        Vec::new().into_iter()
    } else {
        match shard
            .call(
                ShardId(0),
                Request::AlterConfigs {
                    changes,
                    validate_only,
                },
            )
            .await
        {
            Reply::Altered(results) => results.into_iter(),
            _ => Vec::new().into_iter(),
        }
    };
    resolved
        .into_iter()
        .map(|r| match r {
            Ok(_) => applied
                .next()
                .unwrap_or((ErrorCode::UNKNOWN_SERVER_ERROR, None)),
            Err((code, message)) => (code, Some(message)),
        })
        .collect()
}

pub async fn alter(shard: &Rc<Shard>, req: AlterConfigsRequest) -> AlterConfigsResponse {
    let resolved: Vec<_> = req
        .resources
        .iter()
        .map(|r| {
            resource(shard, r.resource_type, r.resource_name.as_str()).map(|resource| {
                ConfigChange {
                    resource,
                    replace: true,
                    ops: r
                        .configs
                        .iter()
                        .map(|c| {
                            (
                                c.name.to_string(),
                                ConfigOp::Set,
                                c.value.as_ref().map(|v| v.to_string()),
                            )
                        })
                        .collect(),
                }
            })
        })
        .collect();
    let results = apply(shard, resolved, req.validate_only).await;
    let mut response = AlterConfigsResponse::default();
    for (r, (code, message)) in req.resources.into_iter().zip(results) {
        let mut out =
            kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse::default(
            );
        out.resource_type = r.resource_type;
        out.resource_name = r.resource_name;
        out.error_code = code.0;
        out.error_message = message.as_deref().map(str_bytes);
        response.responses.push(out);
    }
    response
}

pub async fn incremental_alter(
    shard: &Rc<Shard>,
    req: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut group_results = Vec::new();
    for r in req.resources.iter().filter(|r| is_group(r.resource_type)) {
        let mut changes = Vec::new();
        for c in &r.configs {
            match c.config_operation {
                0 => changes.push((
                    c.name.to_string(),
                    c.value.as_ref().map(StrBytes::to_string),
                )),
                1 => changes.push((c.name.to_string(), None)),
                _ => {}
            }
        }
        let unsupported = r
            .configs
            .iter()
            .any(|c| !matches!(c.config_operation, 0 | 1));
        group_results.push(if unsupported {
            (
                ErrorCode::INVALID_REQUEST,
                Some("group configs take SET and DELETE".to_string()),
            )
        } else {
            alter_group(shard, r.resource_name.as_str(), changes, req.validate_only).await
        });
    }
    let mut group_results = group_results.into_iter();
    let resolved: Vec<_> = req
        .resources
        .iter()
        .filter(|r| !is_group(r.resource_type))
        .map(|r| {
            let resource = resource(shard, r.resource_type, r.resource_name.as_str())?;
            let mut ops = Vec::new();
            for c in &r.configs {
                let op = match c.config_operation {
                    0 => ConfigOp::Set,
                    1 => ConfigOp::Delete,
                    2 => ConfigOp::Append,
                    3 => ConfigOp::Subtract,
                    other => {
                        return Err((
                            ErrorCode::INVALID_REQUEST,
                            format!("Unknown config operation {other}"),
                        ))
                    }
                };
                ops.push((
                    c.name.to_string(),
                    op,
                    c.value.as_ref().map(StrBytes::to_string),
                ));
            }
            Ok(ConfigChange {
                resource,
                replace: false,
                ops,
            })
        })
        .collect();
    let mut results = apply(shard, resolved, req.validate_only).await.into_iter();
    let mut response = IncrementalAlterConfigsResponse::default();
    for r in req.resources {
        let (code, message) = if is_group(r.resource_type) {
            group_results.next()
        } else {
            results.next()
        }
        .unwrap_or((ErrorCode::UNKNOWN_SERVER_ERROR, None));
        let mut out = kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse::default();
        out.resource_type = r.resource_type;
        out.resource_name = r.resource_name;
        out.error_code = code.0;
        out.error_message = message.as_deref().map(str_bytes);
        response.responses.push(out);
    }
    response
}
