//! The small Kafka client the command line uses (`strom produce`, `strom consume`, `strom group ...`,
//! `strom topic ...`, `strom transactions ...`): blocking, one request at a
//! time, speaking the Kafka protocol to any Kafka-compatible broker. Messages come from the
//! `kafka-protocol` crate; responses are bounded in size before anything is allocated for them.

pub mod bench;
pub mod bench_report;
pub mod cluster;
pub mod consume;
pub mod fetch_session;
pub mod groups;
pub mod produce;
pub mod rebalance;
pub mod records;
pub mod share_offsets;
pub mod status;
pub mod topics;
pub mod transactions;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{ApiKey, RequestHeader, ResponseHeader};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

/// The largest response accepted.
const RESPONSE_SIZE_BYTES_MAX: usize = 100 * 1024 * 1024;

pub struct Connection {
    stream: TcpStream,
    correlation_id: i32,
    pub address: String,
}

impl Connection {
    pub fn connect(address: &str) -> Result<Connection> {
        let stream =
            TcpStream::connect(address).with_context(|| format!("connecting to {address}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            correlation_id: 0,
            address: address.to_string(),
        })
    }

    /// Sends one request that gets no response (Produce with `acks=0`).
    pub fn send<Req: Encodable>(&mut self, key: ApiKey, version: i16, req: &Req) -> Result<()> {
        self.correlation_id += 1;
        let frame = encode_request(key, version, self.correlation_id, req)?;
        self.stream.write_all(&frame)?;
        Ok(())
    }

    /// Sends one request at `version` and decodes its response.
    pub fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Result<Resp> {
        self.correlation_id += 1;
        let frame = encode_request(key, version, self.correlation_id, req)?;
        self.stream.write_all(&frame)?;
        let (correlation_id, response) = read_response(&mut self.stream, key, version)?;
        if correlation_id != self.correlation_id {
            bail!(
                "response correlation id {correlation_id} does not match request {}",
                self.correlation_id
            );
        }
        Ok(response)
    }
}

/// The header strom's clients send with each request.
fn request_header(key: ApiKey, version: i16, correlation_id: i32) -> RequestHeader {
    let mut header = RequestHeader::default();
    header.request_api_key = key as i16;
    header.request_api_version = version;
    header.correlation_id = correlation_id;
    header.client_id = Some(StrBytes::from_static_str("strom-cli"));
    header
}

/// A size-prefixed request frame.
pub fn encode_request<R: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    req: &R,
) -> Result<BytesMut> {
    let header = request_header(key, version, correlation_id);
    let header_version = key.request_header_version(version);
    // Sized up front: a produce request of megabytes would otherwise be copied at every doubling.
    let size = header.compute_size(header_version)? + req.compute_size(version)?;
    let mut buf = BytesMut::with_capacity(4 + size);
    buf.put_i32(i32::try_from(size)?);
    header.encode(&mut buf, header_version)?;
    req.encode(&mut buf, version)?;
    Ok(buf)
}

/// [`encode_request`] into chunks: the payloads of at least
/// [`crate::protocol::chunked::SHARED_MIN_BYTES`] among `payloads` (a produce request's batches)
/// are referenced, not copied; the chunks are written in order.
pub fn encode_request_chunks<'a, R: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    req: &R,
    payloads: impl IntoIterator<Item = &'a Bytes>,
) -> Result<Vec<Bytes>> {
    crate::protocol::chunked::encode_frame_chunks(
        &request_header(key, version, correlation_id),
        key.request_header_version(version),
        req,
        version,
        payloads,
        crate::protocol::chunked::StandIns::default(),
    )
}

/// Reads one response frame (bounded by [`RESPONSE_SIZE_BYTES_MAX`]) and decodes it; returns the
/// correlation id with the response.
pub fn read_response<R: Decodable>(
    stream: &mut impl Read,
    key: ApiKey,
    version: i16,
) -> Result<(i32, R)> {
    let mut size = [0u8; 4];
    stream.read_exact(&mut size)?;
    let size = usize::try_from(i32::from_be_bytes(size)).context("negative response size")?;
    if size > RESPONSE_SIZE_BYTES_MAX {
        bail!("response of {size} bytes exceeds the {RESPONSE_SIZE_BYTES_MAX} byte limit");
    }
    let mut body = vec![0u8; size];
    stream.read_exact(&mut body)?;
    let mut body = Bytes::from(body);
    let header = ResponseHeader::decode(&mut body, key.response_header_version(version))?;
    let response = R::decode(&mut body, version)?;
    if body.has_remaining() {
        tracing::debug!(left = body.remaining(), ?key, "response had trailing bytes");
    }
    Ok((header.correlation_id, response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ProduceRequest, TopicName};

    #[test]
    fn a_chunked_request_is_the_one_buffer_request_with_its_batches_shared() {
        let mut w = records::BatchWriter::new(0);
        for i in 0..40u8 {
            w.push(1_000, None, &[i; 1000]);
        }
        let batch = w.finish();
        let mut td = TopicProduceData::default();
        td.name = TopicName(StrBytes::from_static_str("t"));
        for p in 0..3 {
            let mut pd = PartitionProduceData::default();
            pd.index = p;
            pd.records = Some(batch.clone());
            td.partition_data.push(pd);
        }
        let mut req = ProduceRequest::default();
        req.acks = -1;
        req.topic_data = vec![td];
        let whole = encode_request(ApiKey::Produce, 9, 5, &req).unwrap();
        let chunks =
            encode_request_chunks(ApiKey::Produce, 9, 5, &req, std::iter::once(&batch)).unwrap();
        let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(joined, whole.to_vec());
        let shared = chunks
            .iter()
            .filter(|c| c.as_ptr() == batch.as_ptr())
            .count();
        assert_eq!(shared, 3);
    }
}
