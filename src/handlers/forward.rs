//! Forwarding of metadata changes (KIP-590's role): in a cluster only the controller changes
//! topics and configs, but Kafka's admin clients send some of these requests to any broker
//! (AlterConfigs and IncrementalAlterConfigs go to the least loaded one). A broker that is not
//! the controller passes such a request to the controller's client listener unchanged (its
//! client id marked, so that it is never passed on twice) and hands the answer back as it came:
//! the client sees the controller's response, correlation id included.
//!
//! Every request one broker sends another's client listener (passed on, or its own: share reads
//! from other leaders, transaction markers) goes over a connection kept open between requests
//! ([`PeerConnections`]): a forwarded ShareFetch comes many times a second, and a connection each
//! cost a handshake each and left a socket in TIME_WAIT each.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use kafka_protocol::messages::{ApiKey, RequestKind};

use crate::shard::Shard;

/// Prefix of the client id of a forwarded request.
const MARK: &str = "strom-forwarded/";

/// How long a forwarded request may take, connection included.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest answer taken back from the controller.
const RESPONSE_SIZE_BYTES_MAX: usize = 64 << 20;

/// Idle connections kept per broker address, per shard. The most recently used is taken first,
/// so those beyond what requests to that broker overlap by lately age out ([`IDLE_FOR_MAX`]).
/// A share coordinator long-polls each leader once per ShareFetch it holds (9 at once with three
/// members reading through three brokers): with 8 kept, those beyond were a new connection each.
const IDLE_PER_ADDRESS_MAX: usize = 64;

/// An idle connection older than this is closed rather than used: well inside the other broker's
/// `connections.max.idle.ms` (10 minutes by default), after which it closes its end.
const IDLE_FOR_MAX: Duration = Duration::from_secs(60);

/// A shard's open connections to other brokers' client listeners, idle between round trips. A
/// connection is taken for one request and its answer, and put back only once the whole answer
/// was read, so a connection given up half-way (a timeout, an error) is closed, never reused.
/// Cheap to clone (shared).
#[derive(Default, Clone)]
pub struct PeerConnections {
    inner: Rc<Pool>,
}

#[derive(Default)]
struct Pool {
    idle: RefCell<HashMap<String, Vec<(glommio::net::TcpStream, Instant)>>>,
    /// Set when the shard stops: connections are closed rather than kept from then on.
    closed: std::cell::Cell<bool>,
}

impl PeerConnections {
    fn take(&self, address: &str) -> Option<glommio::net::TcpStream> {
        let mut idle = self.inner.idle.borrow_mut();
        let kept = idle.get_mut(address)?;
        while let Some((stream, since)) = kept.pop() {
            if since.elapsed() < IDLE_FOR_MAX {
                return Some(stream);
            }
        }
        None
    }

    fn put(&self, address: &str, stream: glommio::net::TcpStream) {
        if self.inner.closed.get() {
            return;
        }
        let mut idle = self.inner.idle.borrow_mut();
        // The address is copied once per broker, not once per round trip.
        if !idle.contains_key(address) {
            idle.insert(address.to_string(), Vec::new());
        }
        let Some(kept) = idle.get_mut(address) else {
            return;
        };
        kept.retain(|(_, since)| since.elapsed() < IDLE_FOR_MAX);
        if kept.len() < IDLE_PER_ADDRESS_MAX {
            kept.push((stream, Instant::now()));
        }
    }

    /// Closes every idle connection, and those in use as their round trips end (the shard is
    /// stopping).
    pub fn clear(&self) {
        self.inner.closed.set(true);
        self.inner.idle.borrow_mut().clear();
    }
}

/// The requests a broker that is not the controller forwards: DescribeQuorum when it names the
/// metadata partition only (the controller leads that group; other groups are described by
/// their own leaders).
fn forwarded(key: i16, frame: &Bytes) -> bool {
    if key == ApiKey::DescribeQuorum as i16 {
        return match super::decode_request(frame.clone()) {
            Ok(super::Decoded {
                request: RequestKind::DescribeQuorum(r),
                ..
            }) => {
                !r.topics.is_empty()
                    && r.topics
                        .iter()
                        .all(|t| &*t.topic_name.0 == crate::cluster::metadata::METADATA_TOPIC)
            }
            _ => false,
        };
    }
    if (key == ApiKey::AlterConfigs as i16 || key == ApiKey::IncrementalAlterConfigs as i16)
        && config_groups(frame).is_some()
    {
        // A group's configs live with its coordinator (see [`to_group_coordinator`]).
        return false;
    }
    [
        ApiKey::CreateTopics,
        ApiKey::DeleteTopics,
        ApiKey::CreatePartitions,
        ApiKey::AlterConfigs,
        ApiKey::IncrementalAlterConfigs,
        ApiKey::AlterPartitionReassignments,
    ]
    .iter()
    .any(|k| *k as i16 == key)
}

/// The groups a config request (DescribeConfigs, AlterConfigs, IncrementalAlterConfigs) names,
/// when it names groups only.
fn config_groups(frame: &Bytes) -> Option<Vec<String>> {
    let is_group = super::configs::is_group;
    let names: Vec<(i8, String)> = match super::decode_request(frame.clone()).ok()?.request {
        RequestKind::DescribeConfigs(r) => r
            .resources
            .iter()
            .map(|r| (r.resource_type, r.resource_name.to_string()))
            .collect(),
        RequestKind::AlterConfigs(r) => r
            .resources
            .iter()
            .map(|r| (r.resource_type, r.resource_name.to_string()))
            .collect(),
        RequestKind::IncrementalAlterConfigs(r) => r
            .resources
            .iter()
            .map(|r| (r.resource_type, r.resource_name.to_string()))
            .collect(),
        _ => return None,
    };
    if names.is_empty() || !names.iter().all(|(kind, _)| is_group(*kind)) {
        return None;
    }
    Some(names.into_iter().map(|(_, name)| name).collect())
}

/// The controller's answer to `frame` (a request without its length prefix, the answer with
/// it), when this broker is in a cluster, is not the controller, knows which broker is, and the
/// request was not forwarded already. `None`: handle the request here (the handler answers
/// `NOT_CONTROLLER` where it must).
pub async fn to_controller(shard: &Rc<Shard>, frame: &Bytes) -> Option<Bytes> {
    let cluster = shard.cluster()?;
    let key = i16::from_be_bytes([*frame.first()?, *frame.get(1)?]);
    if !forwarded(key, frame) {
        return None;
    }
    let controller = super::metadata::controller_id(shard);
    if controller < 0 || controller == cluster.node_id {
        return None;
    }
    let marked = mark(frame, "")?;
    pass_on(shard, controller, key, &marked, "the controller").await
}

/// Prefix (after [`MARK`]) of the client id of a share request passed on to the group's
/// coordinator, followed by the passing broker's node id and `/`.
const SHARE_FROM: &str = "share-from-";

/// Requests a group's coordinator must answer, which clients send to other brokers.
/// - KIP-932 clients send ShareFetch and ShareAcknowledge to the leader of each partition they
///   read; strom keeps a share group's state, share-partitions included, at the group's
///   coordinator. The request's client id is marked with this broker's node id: the member keeps
///   one share session per broker it fetches from, and the coordinator keeps them apart by it.
/// - Admin clients send a group's DescribeConfigs and (Incremental)AlterConfigs to any broker;
///   strom keeps a group's configs at its coordinator.
///
/// A broker in a cluster that is not the coordinator passes such a request on to the
/// coordinator's client listener and hands the answer back unchanged. `None`: handle it here
/// (a request naming groups of different coordinators too: each gets `NOT_COORDINATOR` but
/// this broker's own).
pub async fn to_group_coordinator(shard: &Rc<Shard>, frame: &Bytes) -> Option<Bytes> {
    let cluster = shard.cluster()?;
    let key = i16::from_be_bytes([*frame.first()?, *frame.get(1)?]);
    let (groups, tag) =
        if key == ApiKey::ShareFetch as i16 || key == ApiKey::ShareAcknowledge as i16 {
            let group = match super::decode_request(frame.clone()).ok()?.request {
                RequestKind::ShareFetch(r) => r.group_id?.0.to_string(),
                RequestKind::ShareAcknowledge(r) => r.group_id?.0.to_string(),
                _ => return None,
            };
            (vec![group], format!("{SHARE_FROM}{}/", cluster.node_id))
        } else if key == ApiKey::DescribeConfigs as i16
            || key == ApiKey::AlterConfigs as i16
            || key == ApiKey::IncrementalAlterConfigs as i16
        {
            (config_groups(frame)?, String::new())
        } else {
            return None;
        };
    let mut coordinators = groups
        .iter()
        .map(|g| super::groups::coordinator_node(shard, g));
    let coordinator = coordinators.next()??;
    if coordinator == cluster.node_id || !coordinators.all(|c| c == Some(coordinator)) {
        return None;
    }
    let marked = mark(frame, &tag)?;
    pass_on(shard, coordinator, key, &marked, "the group's coordinator").await
}

/// The broker a share request was passed on from (see [`to_group_coordinator`]), by its client
/// id; `None` when a client sent it here itself.
pub fn share_origin(client_id: Option<&str>) -> Option<i32> {
    let rest = client_id?.strip_prefix(MARK)?.strip_prefix(SHARE_FROM)?;
    rest.split_once('/')?.0.parse().ok()
}

/// Sends `marked` (a request frame without its length prefix) to broker `node`'s client
/// listener and returns the answer with its length prefix; `None` (logged) when that fails.
async fn pass_on(
    shard: &Rc<Shard>,
    node: i32,
    key: i16,
    marked: &Bytes,
    whom: &str,
) -> Option<Bytes> {
    let (host, port) = shard.topics().brokers.get(&node)?.clone();
    let address = format!("{host}:{port}");
    let mut out = BytesMut::with_capacity(4 + marked.len());
    out.put_u32(u32::try_from(marked.len()).ok()?);
    out.put_slice(marked);
    match round_trip(&shard.peer_connections, &address, out.freeze(), true).await {
        Ok(answer) => {
            tracing::debug!(node, api_key = key, "request passed on to {whom}");
            Some(Bytes::from(answer))
        }
        Err(e) => {
            tracing::warn!(node, %address, error = %e, "passing a request on to {whom} failed");
            None
        }
    }
}

/// Sends one request of this broker's own to another broker's client listener and decodes the
/// answer (a transaction coordinator's markers to the partition leaders; the creation of
/// `__transaction_state` asked of the controller). The client id carries [`MARK`], so the request
/// is never passed on again.
pub async fn exchange<Req, Resp>(
    shard: &Rc<Shard>,
    broker: i32,
    key: ApiKey,
    version: i16,
    request: &Req,
) -> anyhow::Result<Resp>
where
    Req: kafka_protocol::protocol::Encodable,
    Resp: kafka_protocol::protocol::Decodable,
{
    use kafka_protocol::messages::{RequestHeader, ResponseHeader};
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
    let (host, port) = shard
        .topics()
        .brokers
        .get(&broker)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("broker {broker} is not registered"))?;
    let mut header = RequestHeader::default();
    header.request_api_key = key as i16;
    header.request_api_version = version;
    header.correlation_id = 1;
    header.client_id = Some(StrBytes::from_string(format!(
        "{MARK}broker-{}",
        shard.options.broker.node_id
    )));
    let mut body = BytesMut::new();
    body.put_i32(0);
    header.encode(&mut body, key.request_header_version(version))?;
    request.encode(&mut body, version)?;
    let len = u32::try_from(body.len() - 4)?;
    body[0..4].copy_from_slice(&len.to_be_bytes());
    let address = format!("{host}:{port}");
    let answer = round_trip(&shard.peer_connections, &address, body.freeze(), false)
        .await
        .map_err(|e| anyhow::anyhow!("{key:?} to broker {broker} at {address}: {e}"))?;
    let mut answer = Bytes::from(answer);
    ResponseHeader::decode(&mut answer, key.response_header_version(version))?;
    Resp::decode(&mut answer, version)
}

/// Sends `request` (a whole frame, length prefix included) to `address` and reads one answer of
/// at most [`RESPONSE_SIZE_BYTES_MAX`] bytes, with its length prefix when `keep_prefix`; over an
/// idle connection of the shard's when there is one. An idle connection the other broker closed
/// meanwhile (it restarted, or its idle limit passed) fails before any answer: the request then
/// goes once more over a new connection.
///
/// The round trip runs as a task of its own, bounded by [`FORWARD_TIMEOUT`]: a caller that stops
/// waiting (a share coordinator drops its long-polls of the other leaders once one has records)
/// leaves it to read its answer and put its connection back, rather than closing it.
async fn round_trip(
    peers: &PeerConnections,
    address: &str,
    request: Bytes,
    keep_prefix: bool,
) -> std::io::Result<Vec<u8>> {
    let (tx, rx) = futures_channel::oneshot::channel();
    let peers = peers.clone();
    let address = address.to_string();
    glommio::spawn_local(async move {
        let answer = glommio::timer::timeout(FORWARD_TIMEOUT, async {
            Ok(pooled_round_trip(&peers, &address, &request, keep_prefix).await)
        })
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in time",
            ))
        });
        let _ = tx.send(answer);
    })
    .detach();
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the round trip's task was dropped")))
}

async fn pooled_round_trip(
    peers: &PeerConnections,
    address: &str,
    request: &[u8],
    keep_prefix: bool,
) -> std::io::Result<Vec<u8>> {
    if let Some(mut stream) = peers.take(address) {
        match answer_on(&mut stream, request, keep_prefix).await {
            Ok(answer) => {
                peers.put(address, stream);
                return Ok(answer);
            }
            Err(e) if closed_meanwhile(&e) => {
                tracing::debug!(%address, error = %e, "an idle connection to another broker was closed; reconnecting");
            }
            Err(e) => return Err(e),
        }
    }
    let mut stream = glommio::net::TcpStream::connect(address).await?;
    crate::metrics::add(crate::metrics::Counter::PeerConnectionsOpened, 1);
    stream.set_nodelay(true)?;
    let answer = answer_on(&mut stream, request, keep_prefix).await?;
    peers.put(address, stream);
    Ok(answer)
}

/// Whether a round trip over a kept connection failed because the other end had closed it.
fn closed_meanwhile(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        e.kind(),
        BrokenPipe | ConnectionAborted | ConnectionReset | UnexpectedEof
    )
}

/// One request and its answer over `stream`.
async fn answer_on(
    stream: &mut glommio::net::TcpStream,
    request: &[u8],
    keep_prefix: bool,
) -> std::io::Result<Vec<u8>> {
    let prefix = if keep_prefix { 4 } else { 0 };
    stream.write_all(request).await?;
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let size = u32::from_be_bytes(len) as usize;
    if size > RESPONSE_SIZE_BYTES_MAX {
        return Err(std::io::Error::other(format!("answer of {size} bytes")));
    }
    let mut answer = vec![0u8; prefix + size];
    answer[..prefix].copy_from_slice(&len[..prefix]);
    stream.read_exact(&mut answer[prefix..]).await?;
    Ok(answer)
}

/// `frame` with its client id prefixed by [`MARK`]; `None` if it is marked already or its
/// header does not parse. The request header keeps the client id at a fixed place in every
/// version: api key, api version, correlation id, then a nullable string (i16 length).
fn mark(frame: &Bytes, tag: &str) -> Option<Bytes> {
    let len = i16::from_be_bytes([*frame.get(8)?, *frame.get(9)?]);
    let id: &[u8] = if len < 0 {
        &[]
    } else {
        frame.get(10..10 + usize::try_from(len).ok()?)?
    };
    if id.starts_with(MARK.as_bytes()) {
        return None;
    }
    let new_len = i16::try_from(MARK.len() + tag.len() + id.len()).ok()?;
    let rest = &frame[10 + id.len()..];
    let mut out = BytesMut::with_capacity(frame.len() + MARK.len() + tag.len());
    out.put_slice(&frame[..8]);
    out.put_i16(new_len);
    out.put_slice(MARK.as_bytes());
    out.put_slice(tag.as_bytes());
    out.put_slice(id);
    out.put_slice(rest);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(client_id: Option<&str>) -> Bytes {
        let mut b = BytesMut::new();
        b.put_i16(44); // IncrementalAlterConfigs
        b.put_i16(1);
        b.put_i32(7);
        match client_id {
            Some(id) => {
                b.put_i16(id.len() as i16);
                b.put_slice(id.as_bytes());
            }
            None => b.put_i16(-1),
        }
        b.put_slice(b"body");
        b.freeze()
    }

    #[test]
    fn marks_the_client_id_once() {
        let marked = mark(&frame(Some("admin")), "").unwrap();
        assert_eq!(marked, frame(Some("strom-forwarded/admin")));
        assert!(mark(&marked, "").is_none());
        assert_eq!(
            mark(&frame(None), "").unwrap(),
            frame(Some("strom-forwarded/"))
        );
        // A header cut short is not forwarded.
        assert!(mark(
            &Bytes::from_static(&[0, 44, 0, 1, 0, 0, 0, 7, 0, 9, b'a']),
            ""
        )
        .is_none());
    }

    #[test]
    fn a_share_request_names_the_broker_it_came_through() {
        let marked = mark(&frame(Some("rdkafka")), "share-from-3/").unwrap();
        assert_eq!(marked, frame(Some("strom-forwarded/share-from-3/rdkafka")));
        assert!(
            mark(&marked, "share-from-2/").is_none(),
            "never passed on twice"
        );
        assert_eq!(
            share_origin(Some("strom-forwarded/share-from-3/rdkafka")),
            Some(3)
        );
        assert_eq!(
            share_origin(Some("strom-forwarded/share-from-12/")),
            Some(12)
        );
        assert_eq!(share_origin(Some("rdkafka")), None);
        assert_eq!(share_origin(Some("strom-forwarded/admin")), None);
        assert_eq!(share_origin(None), None);
    }

    /// A listener that answers each request frame with its body reversed, after `delay`, on
    /// connections it keeps or closes after one answer; returns its address and a count of
    /// connections accepted.
    fn echo_server(close_after_one: bool, delay: Duration) -> (String, Rc<std::cell::Cell<usize>>) {
        let listener = glommio::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Rc::new(std::cell::Cell::new(0));
        let count = accepted.clone();
        glommio::spawn_local(async move {
            while let Ok(mut stream) = listener.accept().await {
                count.set(count.get() + 1);
                glommio::spawn_local(async move {
                    loop {
                        let mut len = [0u8; 4];
                        if stream.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                        if stream.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        body.reverse();
                        glommio::timer::sleep(delay).await;
                        let mut out = len.to_vec();
                        out.extend_from_slice(&body);
                        if stream.write_all(&out).await.is_err() || close_after_one {
                            return;
                        }
                    }
                })
                .detach();
            }
        })
        .detach();
        (address, accepted)
    }

    fn run_in_executor<F, Fut>(f: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + 'static,
    {
        glommio::LocalExecutorBuilder::default()
            .spawn(f)
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn round_trips_to_a_broker_share_one_connection() {
        run_in_executor(|| async {
            let (address, accepted) = echo_server(false, Duration::ZERO);
            let peers = PeerConnections::default();
            for _ in 0..3 {
                let answer = round_trip(
                    &peers,
                    &address,
                    Bytes::from_static(&[0, 0, 0, 3, b'a', b'b', b'c']),
                    false,
                )
                .await
                .unwrap();
                assert_eq!(answer, b"cba");
            }
            assert_eq!(accepted.get(), 1);
        });
    }

    #[test]
    fn a_kept_connection_the_other_broker_closed_is_replaced_without_an_error() {
        run_in_executor(|| async {
            let (address, accepted) = echo_server(true, Duration::ZERO);
            let peers = PeerConnections::default();
            for _ in 0..3 {
                let answer = round_trip(
                    &peers,
                    &address,
                    Bytes::from_static(&[0, 0, 0, 2, b'x', b'y']),
                    true,
                )
                .await
                .unwrap();
                assert_eq!(answer, [0, 0, 0, 2, b'y', b'x']);
                // Let the server's close reach this end before the next request.
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(accepted.get(), 3);
        });
    }

    #[test]
    fn a_round_trip_its_caller_gave_up_on_still_puts_its_connection_back() {
        run_in_executor(|| async {
            let (address, accepted) = echo_server(false, Duration::from_millis(50));
            let peers = PeerConnections::default();
            let request = Bytes::from_static(&[0, 0, 0, 1, b'q']);
            // A long-poll given up before its answer (another leader had records first).
            let given_up = glommio::timer::timeout(Duration::from_millis(10), async {
                Ok(round_trip(&peers, &address, request.clone(), false).await)
            })
            .await;
            assert!(given_up.is_err());
            glommio::timer::sleep(Duration::from_millis(100)).await;
            let answer = round_trip(&peers, &address, request, false).await.unwrap();
            assert_eq!(answer, b"q");
            assert_eq!(accepted.get(), 1);
        });
    }
}
