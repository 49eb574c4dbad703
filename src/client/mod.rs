//! The small Kafka client the command line uses (`strom group ...`, `strom topic ...`): blocking, one request at a
//! time, speaking the Kafka protocol to any Kafka-compatible broker. Messages come from the
//! `kafka-protocol` crate; responses are bounded in size before anything is allocated for them.

pub mod bench;
pub mod groups;
pub mod topics;

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

    /// Sends one request at `version` and decodes its response.
    pub fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        key: ApiKey,
        version: i16,
        req: &Req,
    ) -> Result<Resp> {
        self.correlation_id += 1;
        let mut header = RequestHeader::default();
        header.request_api_key = key as i16;
        header.request_api_version = version;
        header.correlation_id = self.correlation_id;
        header.client_id = Some(StrBytes::from_static_str("strom-cli"));
        let mut buf = BytesMut::new();
        buf.put_i32(0);
        header.encode(&mut buf, key.request_header_version(version))?;
        req.encode(&mut buf, version)?;
        let len = i32::try_from(buf.len() - 4)?;
        buf[0..4].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&buf)?;

        let mut size = [0u8; 4];
        self.stream.read_exact(&mut size)?;
        let size = usize::try_from(i32::from_be_bytes(size)).context("negative response size")?;
        if size > RESPONSE_SIZE_BYTES_MAX {
            bail!("response of {size} bytes exceeds the {RESPONSE_SIZE_BYTES_MAX} byte limit");
        }
        let mut body = vec![0u8; size];
        self.stream.read_exact(&mut body)?;
        let mut body = Bytes::from(body);
        let header = ResponseHeader::decode(&mut body, key.response_header_version(version))?;
        if header.correlation_id != self.correlation_id {
            bail!(
                "response correlation id {} does not match request {}",
                header.correlation_id,
                self.correlation_id
            );
        }
        let response = Resp::decode(&mut body, version)?;
        if body.has_remaining() {
            tracing::debug!(left = body.remaining(), ?key, "response had trailing bytes");
        }
        Ok(response)
    }
}
