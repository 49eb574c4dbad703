//! The small Kafka client the command line uses (`strom produce`, `strom consume`, `strom group ...`,
//! `strom topic ...`, `strom transactions ...`): blocking, one request at a
//! time, speaking the Kafka protocol to any Kafka-compatible broker. Messages come from the
//! `kafka-protocol` crate; responses are bounded in size before anything is allocated for them.

pub mod bench;
pub mod bench_report;
pub mod cluster;
pub mod consume;
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

/// A size-prefixed request frame.
pub fn encode_request<R: Encodable>(
    key: ApiKey,
    version: i16,
    correlation_id: i32,
    req: &R,
) -> Result<BytesMut> {
    let mut header = RequestHeader::default();
    header.request_api_key = key as i16;
    header.request_api_version = version;
    header.correlation_id = correlation_id;
    header.client_id = Some(StrBytes::from_static_str("strom-cli"));
    let mut buf = BytesMut::new();
    buf.put_i32(0);
    header.encode(&mut buf, key.request_header_version(version))?;
    req.encode(&mut buf, version)?;
    let len = i32::try_from(buf.len() - 4)?;
    buf[0..4].copy_from_slice(&len.to_be_bytes());
    Ok(buf)
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
