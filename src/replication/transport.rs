//! Broker-to-broker transport for Raft messages: its own listener (`inter.broker.listen`, or this
//! node's entry in `controller.quorum.voters`), one outgoing connection per peer per shard.
//!
//! A frame is `[len u32 BE][header len u16 BE][header][message]`: the header is the rkyv
//! [`GroupKey`] naming the Raft group (a partition), the message is raft-rs's protobuf `Message`
//! as raft-rs encodes it. A length above [`FRAME_MAX`] or a header that does not validate closes
//! the connection with a log line; the body buffer grows only as bytes arrive.
//!
//! Heartbeats are batched across groups (Redpanda's heartbeat manager): a heartbeat or heartbeat
//! response (nothing but a term and a commit index) is not framed alone but joins the peer's
//! [`Beats`], and the writer sends all queued beats as one frame, `[len][0xFFFF][rkyv Beats]`.
//! Groups tick together (see `group::TICK`), so 1,000 partitions led here mean one heartbeat
//! frame per peer per heartbeat interval and shard, not 1,000. The receiver expands a batch back
//! into raft-rs messages, byte-for-byte what raft-rs produced (anything else is framed alone).
//!
//! Sending never waits: a message goes into the peer's queue and a writer task per peer drains
//! the queue into the socket, all queued frames in one write. When the peer is down the queue is
//! dropped past [`QUEUE_BYTES_MAX`] and on every failed connection attempt; Raft resends what it
//! needs (heartbeats, appends after a rejection), so a lost message is a delay, never a loss.

#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use protobuf::Message as _;
use raft::eraftpb::Message;

use crate::model::{PartitionId, TopicPartition};

/// The largest frame accepted: one Raft append carries at most `max_size_per_msg` (1 MiB) of
/// entries beyond the first, and one entry is at most one record batch.
pub const FRAME_MAX: usize = 128 * 1024 * 1024;
/// Bytes queued for one peer before new messages are dropped.
pub const QUEUE_BYTES_MAX: usize = 64 * 1024 * 1024;
const READ_STEP_BYTES: usize = 64 * 1024;
/// A peer that does not accept within this is treated as down until the next attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Where received messages go: the shard hands each to the group's owning shard.
pub type Deliver = Rc<dyn Fn(Vec<(TopicPartition, Message)>)>;

/// Names a Raft group on the wire: the partition it replicates.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct GroupKey {
    pub topic: String,
    pub partition: i32,
}

/// The header length that marks a frame of batched heartbeats.
const BEATS_MARK: u16 = u16::MAX;

/// One group's heartbeat (leader to follower) or heartbeat response.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct Beat {
    pub topic: String,
    pub partition: i32,
    pub response: bool,
    pub term: u64,
    pub commit: u64,
}

/// The heartbeats from one broker to another queued since the last write, all groups together.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Beats {
    pub from: u64,
    pub to: u64,
    pub beats: Vec<Beat>,
}

/// The raft-rs message a beat stands for.
fn beat_message(from: u64, to: u64, beat: &Beat) -> Message {
    let mut m = Message::default();
    m.set_msg_type(if beat.response {
        raft::eraftpb::MessageType::MsgHeartbeatResponse
    } else {
        raft::eraftpb::MessageType::MsgHeartbeat
    });
    m.from = from;
    m.to = to;
    m.term = beat.term;
    m.commit = beat.commit;
    m
}

/// `message` as a beat, if it is a heartbeat or heartbeat response that a beat carries whole.
fn as_beat(tp: &TopicPartition, message: &Message) -> Option<Beat> {
    use raft::eraftpb::MessageType::{MsgHeartbeat, MsgHeartbeatResponse};
    let response = match message.get_msg_type() {
        MsgHeartbeat => false,
        MsgHeartbeatResponse => true,
        _ => return None,
    };
    let beat = Beat {
        topic: tp.topic.to_string(),
        partition: tp.partition.0,
        response,
        term: message.term,
        commit: message.commit,
    };
    (beat_message(message.from, message.to, &beat) == *message).then_some(beat)
}

/// Encodes one frame carrying the batched `beats`.
pub fn encode_beats(beats: &Beats) -> Result<Vec<u8>> {
    let body = rkyv::to_bytes::<rkyv::rancor::Error>(beats)?;
    let len = u32::try_from(2 + body.len()).context("heartbeat batch too large")?;
    let mut out = Vec::with_capacity(4 + len as usize);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&BEATS_MARK.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Encodes one frame carrying `message` for the group of `tp`.
pub fn encode_frame(tp: &TopicPartition, message: &Message) -> Result<Vec<u8>> {
    let key = GroupKey {
        topic: tp.topic.to_string(),
        partition: tp.partition.0,
    };
    let header = rkyv::to_bytes::<rkyv::rancor::Error>(&key)?;
    let body = message.write_to_bytes().context("encoding raft message")?;
    let header_len = u16::try_from(header.len()).context("group key too long")?;
    let len = u32::try_from(2 + header.len() + body.len()).context("raft message too large")?;
    let mut out = Vec::with_capacity(4 + len as usize);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&header_len.to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a frame's body (after the length prefix): one message, or a batch of heartbeats.
pub fn decode_frame(body: &[u8]) -> Result<Vec<(TopicPartition, Message)>> {
    let Some(len_bytes) = body.get(0..2) else {
        bail!("frame shorter than its header length");
    };
    let mark = u16::from_be_bytes([len_bytes[0], len_bytes[1]]);
    if mark == BEATS_MARK {
        let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len() - 2);
        aligned.extend_from_slice(&body[2..]);
        let batch = rkyv::from_bytes::<Beats, rkyv::rancor::Error>(&aligned)
            .context("heartbeat batch does not validate")?;
        return Ok(batch
            .beats
            .iter()
            .map(|b| {
                let m = beat_message(batch.from, batch.to, b);
                (TopicPartition::new(&b.topic, b.partition), m)
            })
            .collect());
    }
    let header_len = usize::from(mark);
    let Some(header) = body.get(2..2 + header_len) else {
        bail!("frame shorter than its header");
    };
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(header.len());
    aligned.extend_from_slice(header);
    let key = rkyv::from_bytes::<GroupKey, rkyv::rancor::Error>(&aligned)
        .context("group key does not validate")?;
    let message = Message::parse_from_bytes(&body[2 + header_len..])
        .context("raft message does not decode")?;
    let tp = TopicPartition {
        topic: key.topic.into(),
        partition: PartitionId(key.partition),
    };
    Ok(vec![(tp, message)])
}

/// One peer's outgoing queue, drained by its writer task.
struct PeerLink {
    node: i32,
    address: String,
    /// The source address of connections to the peer: this broker's inter-broker host, so that
    /// the peer (and anything between) sees which broker is connecting.
    local: Option<IpAddr>,
    queue: RefCell<VecDeque<Vec<u8>>>,
    /// Heartbeats waiting for the next write, sent as one frame.
    beats: RefCell<Beats>,
    queued_bytes: Cell<usize>,
    wake: event_listener::Event,
    /// Set once the shard stops: the writer makes no more connection attempts.
    stopped: Rc<Cell<bool>>,
}

impl PeerLink {
    /// Drops what is queued for the peer (its connection failed or broke): stale messages are
    /// worthless to Raft once the peer is back, and Raft resends what it needs.
    fn drop_queued(&self) {
        self.queue.borrow_mut().clear();
        self.beats.borrow_mut().beats.clear();
        self.queued_bytes.set(0);
    }
}

/// This shard's connections to the other brokers: the voters from the start, brokers that join
/// later (scale-out) as the cluster metadata names them.
pub struct Transport {
    peers: RefCell<HashMap<i32, Rc<PeerLink>>>,
    local: Option<IpAddr>,
    stopped: Rc<Cell<bool>>,
}

impl Transport {
    /// Starts a writer task per peer on the current executor.
    pub fn start(peers: &[(i32, (String, u16))], local: Option<IpAddr>) -> Rc<Transport> {
        let transport = Rc::new(Transport {
            peers: RefCell::new(HashMap::new()),
            local,
            stopped: Rc::new(Cell::new(false)),
        });
        for (node, (host, port)) in peers {
            transport.add_peer(*node, host, *port);
        }
        transport
    }

    /// Connects to a peer at `host:port` from now on (a broker that joined, or one that moved:
    /// its link is replaced). Nothing changes when the peer is known at that address.
    pub fn add_peer(&self, node: i32, host: &str, port: u16) {
        let address = format!("{host}:{port}");
        if self
            .peers
            .borrow()
            .get(&node)
            .is_some_and(|l| l.address == address)
        {
            return;
        }
        let link = Rc::new(PeerLink {
            node,
            address,
            local: self.local,
            queue: RefCell::new(VecDeque::new()),
            beats: RefCell::new(Beats::default()),
            queued_bytes: Cell::new(0),
            wake: event_listener::Event::new(),
            stopped: self.stopped.clone(),
        });
        glommio::spawn_local(writer(Rc::downgrade(&link))).detach();
        // The replaced link's writer ends once its last reference (this map's) is gone.
        if let Some(old) = self.peers.borrow_mut().insert(node, link) {
            old.wake.notify(usize::MAX);
        }
    }

    /// Stops every writer (the shard is stopping): queued messages are dropped, no connection is
    /// attempted any more.
    pub fn stop(&self) {
        self.stopped.set(true);
        for link in self.peers.borrow().values() {
            link.wake.notify(usize::MAX);
        }
    }

    /// Queues `message` for its destination (`message.to`); drops it when the peer is unknown or
    /// its queue is full.
    pub fn send(&self, tp: &TopicPartition, message: &Message) {
        let Ok(to) = i32::try_from(message.to) else {
            return;
        };
        let Some(link) = self.peers.borrow().get(&to).cloned() else {
            tracing::debug!(to, "raft message for a node that is not a peer; dropped");
            return;
        };
        crate::metrics::add(crate::metrics::Counter::RaftMessagesSent, 1);
        if let Some(beat) = as_beat(tp, message) {
            let size = 48 + beat.topic.len();
            if link.queued_bytes.get() + size > QUEUE_BYTES_MAX {
                crate::metrics::add(crate::metrics::Counter::RaftMessagesDropped, 1);
                return;
            }
            link.queued_bytes.set(link.queued_bytes.get() + size);
            let mut beats = link.beats.borrow_mut();
            beats.from = message.from;
            beats.to = message.to;
            beats.beats.push(beat);
            drop(beats);
            link.wake.notify(1);
            return;
        }
        let frame = match encode_frame(tp, message) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(partition = %tp, error = %format!("{e:#}"), "raft message not sent");
                return;
            }
        };
        if link.queued_bytes.get() + frame.len() > QUEUE_BYTES_MAX {
            crate::metrics::add(crate::metrics::Counter::RaftMessagesDropped, 1);
            return;
        }
        link.queued_bytes.set(link.queued_bytes.get() + frame.len());
        link.queue.borrow_mut().push_back(frame);
        link.wake.notify(1);
    }
}

async fn writer(link: Weak<PeerLink>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(l) = link.upgrade() else { return };
        if l.stopped.get() {
            return;
        }
        let address = l.address.clone();
        let node = l.node;
        let local = l.local;
        drop(l);
        let stream = match connect(address.clone(), local).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer = node, %address, error = %e, "peer unreachable");
                if let Some(l) = link.upgrade() {
                    l.drop_queued();
                }
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(peer = node, %address, "connected to peer");
        let connected_at = std::time::Instant::now();
        let mut stream = stream;
        loop {
            let Some(l) = link.upgrade() else { return };
            if l.stopped.get() {
                return;
            }
            let listener = l.wake.listen();
            let batch: Vec<u8> = {
                let mut q = l.queue.borrow_mut();
                let mut out = Vec::with_capacity(l.queued_bytes.get());
                let beats = std::mem::take(&mut *l.beats.borrow_mut());
                if !beats.beats.is_empty() {
                    match encode_beats(&beats) {
                        Ok(frame) => {
                            crate::metrics::add(crate::metrics::Counter::RaftFramesSent, 1);
                            out.extend_from_slice(&frame);
                        }
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "heartbeats not sent")
                        }
                    }
                }
                crate::metrics::add(crate::metrics::Counter::RaftFramesSent, q.len() as u64);
                for f in q.drain(..) {
                    out.extend_from_slice(&f);
                }
                l.queued_bytes.set(0);
                out
            };
            drop(l);
            if batch.is_empty() {
                listener.await;
                continue;
            }
            if let Err(e) = stream.write_all(&batch).await {
                tracing::debug!(peer = node, error = %e, "peer connection lost");
                if let Some(l) = link.upgrade() {
                    l.drop_queued();
                }
                break;
            }
        }
        // A link that drops right after connecting (a peer that accepts and closes, a proxy
        // cutting it) is retried with the same backoff as one that refuses: no reconnect storm.
        if connected_at.elapsed() >= Duration::from_secs(1) {
            backoff = Duration::from_millis(50);
        } else {
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

/// Connects to `address` from `local` (any port). The connect runs on a blocking thread (it is
/// instant on a reachable peer and bounded by [`CONNECT_TIMEOUT`] otherwise); the socket then
/// joins this executor.
async fn connect(address: String, local: Option<IpAddr>) -> Result<TcpStream> {
    let socket = crate::storage::files::blocking(move || -> Result<socket2::Socket> {
        let target: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(address.as_str())?
            .next()
            .with_context(|| format!("{address} resolves to nothing"))?;
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(target),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if let Some(ip) = local.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
            socket.bind(&SocketAddr::new(ip, 0).into())?;
        }
        socket.connect_timeout(&target.into(), CONNECT_TIMEOUT)?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })
    .await?;
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    // SAFETY: the fd is a connected socket we own and hand over whole (into_raw_fd gives up
    // ownership), so the glommio stream is its only owner.
    Ok(unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) })
}

/// Accepts broker-to-broker connections until the shard stops; each frame goes to `deliver`.
pub async fn serve(
    listener: TcpListener,
    stopped: impl std::future::Future<Output = ()>,
    deliver: Deliver,
) {
    let stopped = std::pin::pin!(stopped);
    let mut stopped = stopped;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            (&mut stopped).await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        match accepted {
            Ok(stream) => {
                let deliver = deliver.clone();
                glommio::spawn_local(async move {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = read_frames(stream, deliver).await {
                        tracing::info!(?peer, error = %format!("{e:#}"), "peer connection closed");
                    }
                })
                .detach();
            }
            Err(e) => {
                tracing::warn!(error = %e, "inter-broker accept failed");
                glommio::timer::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn read_frames(mut stream: TcpStream, deliver: Deliver) -> Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; READ_STEP_BYTES];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let mut pos = 0usize;
        let mut out = Vec::new();
        while let Some(head) = buf.get(pos..pos + 4) {
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len > FRAME_MAX {
                bail!("frame of {len} bytes is over the {FRAME_MAX}-byte limit");
            }
            let Some(body) = buf.get(pos + 4..pos + 4 + len) else {
                break;
            };
            out.extend(decode_frame(body)?);
            pos += 4 + len;
        }
        buf.drain(..pos);
        if !out.is_empty() {
            deliver(out);
        }
    }
}

/// Binds the inter-broker listener (one socket per shard, `SO_REUSEPORT`).
pub fn bind(address: SocketAddr, count: usize) -> Result<Vec<socket2::Socket>> {
    let (sockets, _) = crate::server::bind_listeners(address, count)
        .with_context(|| format!("binding the inter-broker listener {address}"))?;
    Ok(sockets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let tp = TopicPartition {
            topic: "orders".into(),
            partition: PartitionId(7),
        };
        let m = Message {
            to: 3,
            term: 9,
            ..Default::default()
        };
        let frame = encode_frame(&tp, &m).unwrap();
        let decoded = decode_frame(&frame[4..]).unwrap();
        assert_eq!(decoded.len(), 1);
        let (tp2, m2) = &decoded[0];
        assert_eq!((tp2, m2.to, m2.term), (&tp, 3, 9));
        assert!(decode_frame(&[0, 200, 1, 2]).is_err());
        assert!(decode_frame(&[0, 2, 1, 2, 3]).is_err());
        assert!(decode_frame(&[0xFF, 0xFF, 1, 2, 3]).is_err());
    }

    #[test]
    fn heartbeats_of_many_groups_travel_in_one_frame_and_come_back_as_raft_sent_them() {
        use raft::eraftpb::MessageType::{MsgAppend, MsgHeartbeat, MsgHeartbeatResponse};
        let mut sent = Vec::new();
        let mut beats = Beats::default();
        for p in 0..100 {
            let tp = TopicPartition::new("orders", p);
            let mut m = Message::default();
            m.set_msg_type(if p % 2 == 0 {
                MsgHeartbeat
            } else {
                MsgHeartbeatResponse
            });
            m.from = 1;
            m.to = 2;
            m.term = 5 + u64::try_from(p).unwrap();
            m.commit = 1000 + u64::try_from(p).unwrap();
            let beat = as_beat(&tp, &m).unwrap();
            beats.from = m.from;
            beats.to = m.to;
            beats.beats.push(beat);
            sent.push((tp, m));
        }
        let frame = encode_beats(&beats).unwrap();
        assert_eq!(decode_frame(&frame[4..]).unwrap(), sent);
        // Anything a beat cannot carry whole is framed alone.
        let tp = TopicPartition::new("orders", 0);
        let mut with_context = sent[0].1.clone();
        with_context.context = b"read-index".to_vec().into();
        assert!(as_beat(&tp, &with_context).is_none());
        let mut append = sent[0].1.clone();
        append.set_msg_type(MsgAppend);
        assert!(as_beat(&tp, &append).is_none());
    }
}
