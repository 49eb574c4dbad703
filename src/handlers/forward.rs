//! Forwarding of metadata changes (KIP-590's role): in a cluster only the controller changes
//! topics and configs, but Kafka's admin clients send some of these requests to any broker
//! (AlterConfigs and IncrementalAlterConfigs go to the least loaded one). A broker that is not
//! the controller passes such a request to the controller's client listener unchanged (its
//! client id marked, so that it is never passed on twice) and hands the answer back as it came:
//! the client sees the controller's response, correlation id included.

use std::rc::Rc;
use std::time::Duration;

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
    let marked = mark(frame)?;
    let (host, port) = shard.topics().brokers.get(&controller)?.clone();
    let address = format!("{host}:{port}");
    let exchange = async {
        let mut stream = glommio::net::TcpStream::connect(address.as_str()).await?;
        let mut out = BytesMut::with_capacity(4 + marked.len());
        out.put_u32(u32::try_from(marked.len()).map_err(std::io::Error::other)?);
        out.put_slice(&marked);
        stream.write_all(&out).await?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let size = u32::from_be_bytes(len) as usize;
        if size > RESPONSE_SIZE_BYTES_MAX {
            return Err(std::io::Error::other(format!("answer of {size} bytes")));
        }
        let mut answer = vec![0u8; 4 + size];
        answer[..4].copy_from_slice(&len);
        stream.read_exact(&mut answer[4..]).await?;
        Ok(answer)
    };
    match glommio::timer::timeout(FORWARD_TIMEOUT, async { Ok(exchange.await) }).await {
        Ok(Ok(answer)) => {
            tracing::debug!(
                controller,
                api_key = key,
                "request forwarded to the controller"
            );
            Some(Bytes::from(answer))
        }
        Ok(Err(e)) => {
            tracing::warn!(controller, %address, error = %e, "forwarding to the controller failed");
            None
        }
        Err(_) => {
            tracing::warn!(controller, %address, "forwarding to the controller timed out");
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
    let exchange = async {
        let mut stream = glommio::net::TcpStream::connect(address.as_str()).await?;
        stream.write_all(&body).await?;
        let mut len = [0u8; 4];
        stream.read_exact(&mut len).await?;
        let size = u32::from_be_bytes(len) as usize;
        if size > RESPONSE_SIZE_BYTES_MAX {
            return Err(std::io::Error::other(format!("answer of {size} bytes")));
        }
        let mut answer = vec![0u8; size];
        stream.read_exact(&mut answer).await?;
        Ok(answer)
    };
    let answer = glommio::timer::timeout(FORWARD_TIMEOUT, async { Ok(exchange.await) })
        .await
        .map_err(|_| anyhow::anyhow!("{key:?} to broker {broker} at {address} timed out"))?
        .map_err(|e| anyhow::anyhow!("{key:?} to broker {broker} at {address}: {e}"))?;
    let mut answer = Bytes::from(answer);
    ResponseHeader::decode(&mut answer, key.response_header_version(version))?;
    Resp::decode(&mut answer, version)
}

/// `frame` with its client id prefixed by [`MARK`]; `None` if it is marked already or its
/// header does not parse. The request header keeps the client id at a fixed place in every
/// version: api key, api version, correlation id, then a nullable string (i16 length).
fn mark(frame: &Bytes) -> Option<Bytes> {
    let len = i16::from_be_bytes([*frame.get(8)?, *frame.get(9)?]);
    let id: &[u8] = if len < 0 {
        &[]
    } else {
        frame.get(10..10 + usize::try_from(len).ok()?)?
    };
    if id.starts_with(MARK.as_bytes()) {
        return None;
    }
    let new_len = i16::try_from(MARK.len() + id.len()).ok()?;
    let rest = &frame[10 + id.len()..];
    let mut out = BytesMut::with_capacity(frame.len() + MARK.len());
    out.put_slice(&frame[..8]);
    out.put_i16(new_len);
    out.put_slice(MARK.as_bytes());
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
        let marked = mark(&frame(Some("admin"))).unwrap();
        assert_eq!(marked, frame(Some("strom-forwarded/admin")));
        assert!(mark(&marked).is_none());
        assert_eq!(mark(&frame(None)).unwrap(), frame(Some("strom-forwarded/")));
        // A header cut short is not forwarded.
        assert!(mark(&Bytes::from_static(&[0, 44, 0, 1, 0, 0, 0, 7, 0, 9, b'a'])).is_none());
    }
}
