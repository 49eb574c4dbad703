//! What `strom produce` and `strom consume` need of any Kafka-compatible cluster: the API versions
//! each broker serves (negotiated against the range this client speaks), the partitions of a
//! topic with their leaders, and one connection per broker.

use std::collections::HashMap;
use std::ops::RangeInclusive;

use anyhow::{bail, Context, Result};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::Connection;
use crate::model::ErrorCode;

/// The versions of each API this client speaks (the request and response shapes it fills in).
pub fn ours(key: ApiKey) -> RangeInclusive<i16> {
    match key {
        ApiKey::Produce => 3..=9,
        ApiKey::Fetch => 4..=12,
        ApiKey::ListOffsets => 1..=7,
        ApiKey::Metadata => 1..=12,
        ApiKey::FindCoordinator => 1..=3,
        ApiKey::JoinGroup => 2..=9,
        ApiKey::SyncGroup => 1..=5,
        ApiKey::Heartbeat => 1..=4,
        ApiKey::LeaveGroup => 1..=5,
        ApiKey::OffsetFetch => 1..=7,
        ApiKey::OffsetCommit => 2..=8,
        _ => 0..=0,
    }
}

/// A connection with the API versions its broker serves.
pub struct BrokerConnection {
    pub conn: Connection,
    versions: HashMap<i16, (i16, i16)>,
}

impl BrokerConnection {
    pub fn open(address: &str) -> Result<BrokerConnection> {
        let mut conn = Connection::connect(address)?;
        // Version 0 is understood by every broker; its answer lists every API's range.
        let resp: ApiVersionsResponse =
            conn.call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
        if resp.error_code != 0 {
            bail!(
                "{address}: ApiVersions failed: {}",
                ErrorCode(resp.error_code).name()
            );
        }
        let versions = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        Ok(BrokerConnection { conn, versions })
    }

    /// The highest version of `key` both sides speak.
    pub fn version(&self, key: ApiKey) -> Result<i16> {
        let want = ours(key);
        let Some(&(min, max)) = self.versions.get(&(key as i16)) else {
            bail!("{}: the broker does not serve {key:?}", self.conn.address);
        };
        let v = max.min(*want.end());
        if v < min.max(*want.start()) {
            bail!(
                "{}: no common version of {key:?} (broker {min}-{max}, strom {}-{})",
                self.conn.address,
                want.start(),
                want.end()
            );
        }
        Ok(v)
    }

    /// Sends a request that gets no response.
    pub fn send<Req: kafka_protocol::protocol::Encodable>(
        &mut self,
        key: ApiKey,
        req: &Req,
    ) -> Result<()> {
        let version = self.version(key)?;
        self.conn.send(key, version, req)
    }

    pub fn call<Req, Resp>(&mut self, key: ApiKey, req: &Req) -> Result<Resp>
    where
        Req: kafka_protocol::protocol::Encodable,
        Resp: kafka_protocol::protocol::Decodable,
    {
        let version = self.version(key)?;
        self.conn.call(key, version, req)
    }
}

/// A topic's partitions and where their leaders are.
pub struct TopicLayout {
    pub partitions: Vec<i32>,
    /// Partition to leader node id (-1 while there is none).
    pub leaders: HashMap<i32, i32>,
}

/// The brokers of a cluster, reached from a bootstrap address, with a connection per broker.
pub struct Cluster {
    bootstrap: String,
    addresses: HashMap<i32, String>,
    connections: HashMap<i32, BrokerConnection>,
    any: Option<BrokerConnection>,
}

impl Cluster {
    pub fn new(bootstrap: &str) -> Result<Cluster> {
        let any = BrokerConnection::open(bootstrap)
            .with_context(|| format!("bootstrap broker {bootstrap}"))?;
        Ok(Cluster {
            bootstrap: bootstrap.to_string(),
            addresses: HashMap::new(),
            connections: HashMap::new(),
            any: Some(any),
        })
    }

    /// A connection to some broker of the cluster (the bootstrap one while it works).
    pub fn any(&mut self) -> Result<&mut BrokerConnection> {
        if self.any.is_none() {
            self.any = Some(BrokerConnection::open(&self.bootstrap)?);
        }
        self.any
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no broker connection"))
    }

    /// Metadata of `topic`; with `create`, a broker that auto-creates topics creates it.
    pub fn topic(&mut self, topic: &str, create: bool) -> Result<TopicLayout> {
        let mut req = MetadataRequest::default();
        let mut t = MetadataRequestTopic::default();
        t.name = Some(TopicName(StrBytes::from_string(topic.to_string())));
        req.topics = Some(vec![t]);
        req.allow_auto_topic_creation = create;
        let resp: MetadataResponse = match self.any()?.call(ApiKey::Metadata, &req) {
            Ok(r) => r,
            Err(e) => {
                self.any = None;
                return Err(e);
            }
        };
        for b in &resp.brokers {
            self.addresses
                .insert(b.node_id.0, format!("{}:{}", b.host, b.port));
        }
        let Some(t) = resp.topics.first() else {
            bail!("topic {topic}: not in the broker's answer");
        };
        if t.error_code != 0 {
            bail!("topic {topic}: {}", ErrorCode(t.error_code).name());
        }
        let mut partitions: Vec<i32> = t.partitions.iter().map(|p| p.partition_index).collect();
        partitions.sort_unstable();
        let leaders = t
            .partitions
            .iter()
            .map(|p| (p.partition_index, p.leader_id.0))
            .collect();
        Ok(TopicLayout {
            partitions,
            leaders,
        })
    }

    /// The connection to broker `node`, opened on first use.
    pub fn broker(&mut self, node: i32) -> Result<&mut BrokerConnection> {
        if !self.connections.contains_key(&node) {
            let Some(address) = self.addresses.get(&node) else {
                bail!("broker {node} is not in the cluster's metadata");
            };
            let conn = BrokerConnection::open(address)
                .with_context(|| format!("broker {node} at {address}"))?;
            self.connections.insert(node, conn);
        }
        self.connections
            .get_mut(&node)
            .ok_or_else(|| anyhow::anyhow!("broker {node} has no connection"))
    }

    /// Forgets a broker's connection after an error, so the next use reconnects.
    pub fn drop_broker(&mut self, node: i32) {
        self.connections.remove(&node);
    }

    /// The address of broker `node` as metadata gave it.
    pub fn address_of(&self, node: i32) -> Option<&str> {
        self.addresses.get(&node).map(String::as_str)
    }

    pub fn remember(&mut self, node: i32, address: String) {
        self.addresses.insert(node, address);
    }
}

/// Kafka's errors a client retries after refreshing metadata.
pub fn retriable(code: i16) -> bool {
    matches!(
        code,
        3 | 5 | 6 | 7 | 13 | 14 | 15 | 16 | 19 | 20 | 56 | 74 | 75
    )
}

/// One Fetch (as a consumer: up to the high watermark) of a partition from `from` at `address`,
/// a replica copying a snapshot's records from its leader: the records (possibly none) and the leader's log
/// start offset (records below it were deleted: none are returned then).
pub fn fetch_from(
    address: &str,
    topic: &str,
    partition: i32,
    from: i64,
) -> Result<(bytes::Bytes, i64)> {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{ApiKey, BrokerId, FetchRequest, FetchResponse, TopicName};
    let mut conn = super::Connection::connect(address)?;
    let mut req = FetchRequest::default();
    req.replica_id = BrokerId(-1);
    req.max_wait_ms = 100;
    req.min_bytes = 1;
    req.max_bytes = 8 << 20;
    req.session_epoch = -1;
    let mut ft = FetchTopic::default();
    ft.topic = TopicName(topic.to_string().into());
    let mut fp = FetchPartition::default();
    fp.partition = partition;
    fp.fetch_offset = from;
    fp.partition_max_bytes = 4 << 20;
    fp.current_leader_epoch = -1;
    fp.log_start_offset = -1;
    ft.partitions = vec![fp];
    req.topics = vec![ft];
    let resp: FetchResponse = conn.call(ApiKey::Fetch, 11, &req)?;
    let pd = resp
        .responses
        .into_iter()
        .flat_map(|t| t.partitions)
        .next()
        .context("the fetch answered no partition")?;
    if pd.error_code == crate::model::ErrorCode::OFFSET_OUT_OF_RANGE.0 {
        // As Kafka's replica fetcher: the leader's log start from ListOffsets (earliest).
        use kafka_protocol::messages::list_offsets_request::{
            ListOffsetsPartition, ListOffsetsTopic,
        };
        use kafka_protocol::messages::{ListOffsetsRequest, ListOffsetsResponse};
        let mut req = ListOffsetsRequest::default();
        req.replica_id = BrokerId(-1);
        let mut t = ListOffsetsTopic::default();
        t.name = TopicName(topic.to_string().into());
        let mut lp = ListOffsetsPartition::default();
        lp.partition_index = partition;
        lp.timestamp = -2;
        lp.current_leader_epoch = -1;
        t.partitions = vec![lp];
        req.topics = vec![t];
        let resp: ListOffsetsResponse = conn.call(ApiKey::ListOffsets, 4, &req)?;
        let p = resp
            .topics
            .into_iter()
            .flat_map(|t| t.partitions)
            .next()
            .context("ListOffsets answered no partition")?;
        if p.error_code != 0 {
            anyhow::bail!(
                "the leader answered {} to ListOffsets",
                crate::model::ErrorCode(p.error_code).name()
            );
        }
        return Ok((bytes::Bytes::new(), p.offset));
    }
    if pd.error_code != 0 {
        anyhow::bail!(
            "the leader answered {}",
            crate::model::ErrorCode(pd.error_code).name()
        );
    }
    Ok((pd.records.unwrap_or_default(), pd.log_start_offset))
}
