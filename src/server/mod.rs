//! Listeners and connections. Every shard accepts on the same port (one `SO_REUSEPORT` socket per
//! shard, so the kernel spreads connections). A connection reads frames, starts each request as its
//! own task, and writes responses strictly in request order, as Kafka requires per connection. At
//! most `queued.max.requests` requests are in flight per connection; past that, reading waits.
//!
//! A frame whose size prefix is negative or above `socket.request.max.bytes` closes the connection
//! with a log line before anything is allocated for it; the body buffer grows only as bytes arrive,
//! so a large prefix followed by silence costs nothing.
//!
//! Limits on the whole broker's request memory and connections:
//! - `queued.max.request.bytes`, split evenly over the shards: a frame's size is taken from the
//!   shard's budget before its body is read and given back once its response is written, so when
//!   the budget is spent every connection on the shard stops reading (TCP pushes back on clients).
//! - `connections.max.idle.ms`: a connection that does not complete a request for that long is
//!   closed, whether it is silent or trickling a frame byte by byte.
//! - `max.connections` and `max.connections.per.ip`: connections past either are closed at
//!   accept, with a log line.

// Reads bytes from the wire or the disk: no unwrap, expect or truncating cast on such a value (a
// bad value is an error, never a panic). Unit tests may unwrap what they built themselves.
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::cast_possible_truncation
    )
)]

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::{Bytes, BytesMut};
use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::sync::{Semaphore, StaticPermit};
use kafka_protocol::messages::ApiKey;
use socket2::{Domain, Protocol, Socket, Type};

use crate::handlers::{self, Outcome};
use crate::metrics::{self, Counter};
use crate::shard::Shard;

const LISTEN_BACKLOG: i32 = 1024;
/// At most this much of a frame's reserved buffer is zeroed and read into per read.
const READ_STEP_BYTES: usize = 64 * 1024;
/// Every read asks for at least this much (it may pick up the start of the next frame).
const MIN_READ_STEP_BYTES: usize = 4096;

/// Fetches one connection may have in flight, their responses included until written. Kafka's own
/// clients send one fetch per connection at a time; without this bound a client that pipelines
/// fetches and never reads would hold up to `queued.max.requests` full responses in memory.
const FETCHES_IN_FLIGHT_MAX: u64 = 2;

/// Client connections open on the whole broker (every shard), for `max.connections`.
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Open connections per client address, for `max.connections.per.ip`. Shared by the shards but
/// touched only when a connection is accepted or closed, never on the request path.
static CONNECTIONS_PER_IP: LazyLock<Mutex<HashMap<IpAddr, usize>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

/// A connection counted against `max.connections` and `max.connections.per.ip`; dropping it
/// gives both back.
struct Admission {
    ip: Option<IpAddr>,
}

impl Admission {
    /// Counts a new connection, or says which limit refuses it.
    fn admit(
        peer: Option<SocketAddr>,
        total_max: usize,
        per_ip_max: usize,
    ) -> Result<Admission, &'static str> {
        if OPEN_CONNECTIONS.fetch_add(1, Ordering::Relaxed) >= total_max {
            OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
            return Err("max.connections");
        }
        let ip = peer.map(|p| p.ip());
        if let Some(ip) = ip {
            let mut counts = CONNECTIONS_PER_IP
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let open = counts.entry(ip).or_insert(0);
            if *open >= per_ip_max {
                drop(counts);
                OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
                return Err("max.connections.per.ip");
            }
            *open += 1;
        }
        Ok(Admission { ip })
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.ip {
            let mut counts = CONNECTIONS_PER_IP
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(open) = counts.get_mut(&ip) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    counts.remove(&ip);
                }
            }
        }
    }
}

/// The request-memory budget of one shard (`queued.max.request.bytes` / shards).
struct RequestBudget {
    semaphore: Rc<Semaphore>,
    bytes_max: u64,
}

impl RequestBudget {
    fn new(shard: &Shard) -> Self {
        let total = shard.options.broker.queued_request_bytes_max;
        let bytes_max =
            u64::try_from(total).map_or(u64::MAX, |t| (t / shard.count.max(1) as u64).max(1));
        RequestBudget {
            semaphore: Rc::new(Semaphore::new(bytes_max)),
            bytes_max,
        }
    }

    /// Waits until `bytes` (capped at the whole budget, so one large frame can still pass alone)
    /// are free, and holds them until the permit is dropped.
    async fn take(&self, bytes: usize) -> Result<StaticPermit, FrameError> {
        let units = u64::try_from(bytes).unwrap_or(u64::MAX).min(self.bytes_max);
        self.semaphore
            .acquire_static_permit(units)
            .await
            .map_err(|_| FrameError::Closed)
    }
}

/// Creates one listening socket per shard on the same address. The first binds (resolving port 0
/// to a real port); the others bind to the resolved address.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> Result<(Vec<Socket>, SocketAddr)> {
    let mut sockets = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket
            .bind(&bound.into())
            .with_context(|| format!("binding {bound}"))?;
        socket.listen(LISTEN_BACKLOG)?;
        if sockets.is_empty() {
            bound = socket
                .local_addr()?
                .as_socket()
                .context("listener has no IP address")?;
        }
        sockets.push(socket);
    }
    Ok((sockets, bound))
}

/// Accepts connections on this shard's socket until the shard stops (clean shutdown); the
/// listening socket is closed on return, so new connections are refused.
pub async fn serve(shard: Rc<Shard>, socket: Socket) -> Result<()> {
    use std::os::unix::io::{FromRawFd, IntoRawFd};
    // SAFETY: the fd comes from a socket2 listening socket we own and hand over whole
    // (into_raw_fd gives up ownership), so the glommio listener is its only owner.
    let listener = unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) };
    let budget = Rc::new(RequestBudget::new(&shard));
    let connections_max = shard.options.broker.connections_max;
    let per_ip_max = shard.options.broker.connections_per_ip_max;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.stopped().await;
            None
        })
        .await;
        let Some(accepted) = accepted else {
            tracing::info!(shard = shard.id.0, "stopped accepting connections");
            return Ok(());
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(shard = shard.id.0, error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        metrics::add(Counter::ConnectionsAccepted, 1);
        let peer = stream.peer_addr().ok();
        let admission = match Admission::admit(peer, connections_max, per_ip_max) {
            Ok(a) => a,
            Err(limit) => {
                tracing::warn!(
                    ?peer,
                    connections_max,
                    per_ip_max,
                    "too many connections ({limit}); closing the new one"
                );
                metrics::add(Counter::ConnectionsClosed, 1);
                drop(stream);
                continue;
            }
        };
        let shard = shard.clone();
        let budget = budget.clone();
        let counted = shard.connection_opened();
        glommio::spawn_local(async move {
            if let Err(e) = connection(shard, stream, budget).await {
                tracing::debug!(?peer, error = %format!("{e:#}"), "connection ended");
            }
            drop(counted);
            drop(admission);
            metrics::add(Counter::ConnectionsClosed, 1);
        })
        .detach();
    }
}

/// Shares one TCP stream between the reading and the writing side of a connection. Both run on
/// the same executor thread; the borrow lasts only for one poll, never across a suspension.
#[derive(Clone)]
struct SharedStream(Rc<RefCell<TcpStream>>);

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.0.borrow_mut();
        Pin::new(&mut *s).poll_read(cx, buf)
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut s = self.0.borrow_mut();
        Pin::new(&mut *s).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut s = self.0.borrow_mut();
        Pin::new(&mut *s).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut s = self.0.borrow_mut();
        Pin::new(&mut *s).poll_close(cx)
    }
}

/// Why a connection's reading stopped.
enum FrameError {
    Closed,
    Idle,
    /// The broker is shutting down: answer what was read, then close.
    Stopping,
    TooLarge(i64),
    Io(std::io::Error),
}

struct FrameReader {
    stream: SharedStream,
    buf: BytesMut,
}

impl FrameReader {
    /// Ensures at least `n` bytes are buffered, reading at most `READ_STEP_BYTES` at a time.
    async fn fill(&mut self, n: usize) -> Result<(), FrameError> {
        while self.buf.len() < n {
            let step = (n - self.buf.len()).clamp(MIN_READ_STEP_BYTES, READ_STEP_BYTES);
            let old = self.buf.len();
            self.buf.resize(old + step, 0);
            let read = self
                .stream
                .read(&mut self.buf[old..])
                .await
                .map_err(FrameError::Io)?;
            self.buf.truncate(old + read);
            if read == 0 {
                return Err(FrameError::Closed);
            }
        }
        Ok(())
    }

    /// The next whole frame, with the budget its bytes hold until its response is written.
    async fn next_frame(
        &mut self,
        size_max: usize,
        budget: &RequestBudget,
    ) -> Result<(Bytes, StaticPermit), FrameError> {
        self.fill(4).await?;
        let size = i32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let size = match usize::try_from(size) {
            Ok(s) if s <= size_max => s,
            _ => return Err(FrameError::TooLarge(i64::from(size))),
        };
        let permit = budget.take(4 + size).await?;
        // The budget now holds the frame's bytes: reserve them at once, so that filling a large
        // frame does not reallocate (and copy) the buffer as it grows. Pages are touched only as
        // the bytes arrive. The slack is the smallest read step, which the last read may take.
        self.buf
            .reserve((4 + size + MIN_READ_STEP_BYTES).saturating_sub(self.buf.len()));
        self.fill(4 + size).await?;
        let mut frame = self.buf.split_to(4 + size);
        if self.buf.is_empty() {
            // Nothing more buffered: hold no memory while the connection waits for its next frame
            // (what is left would share the frame's allocation and keep it alive).
            self.buf = BytesMut::new();
        } else if self.buf.capacity() > READ_STEP_BYTES {
            // The start of the next frame shares this frame's allocation: keep it and the whole
            // frame would stay in memory for as long as the connection lives. Copy it out.
            self.buf = BytesMut::from(&self.buf[..]);
        }
        Ok((frame.split_off(4).freeze(), permit))
    }
}

async fn connection(shard: Rc<Shard>, stream: TcpStream, budget: Rc<RequestBudget>) -> Result<()> {
    let peer = stream.peer_addr().ok();
    let stream = SharedStream(Rc::new(RefCell::new(stream)));
    let mut reader = FrameReader {
        stream: stream.clone(),
        buf: BytesMut::with_capacity(READ_STEP_BYTES),
    };
    let inflight_max = shard.options.broker.inflight_requests_max;
    let (tx, rx) = glommio::channels::local_channel::new_bounded::<
        glommio::Task<(Outcome, (StaticPermit, Option<StaticPermit>))>,
    >(inflight_max);
    let mut writer_stream = stream.clone();
    let (closed_tx, mut closed_rx) = futures_channel::oneshot::channel::<()>();
    let writer = glommio::spawn_local(async move {
        let _closed_tx = closed_tx;
        while let Some(task) = rx.recv().await {
            // The request's budget is given back when this iteration ends: after the write.
            let (outcome, _permit) = task.await;
            match outcome {
                Outcome::Respond(bytes) => writer_stream.write_all(&bytes).await?,
                Outcome::RespondChunks(chunks) => {
                    for c in &chunks {
                        writer_stream.write_all(c).await?;
                    }
                }
                Outcome::NoResponse => {}
                Outcome::Close(reason) => {
                    tracing::warn!(?peer, %reason, "closing connection");
                    break;
                }
            }
        }
        let _ = writer_stream.close().await;
        Ok::<(), std::io::Error>(())
    });
    let size_max = shard.options.broker.request_size_bytes_max;
    let fetches = Rc::new(Semaphore::new(FETCHES_IN_FLIGHT_MAX));
    let idle_max = Duration::from_millis(shard.options.broker.connection_idle_ms_max);
    let read_result = loop {
        // Reading a frame and queueing it (which waits while `queued.max.requests` are in flight)
        // both count against the idle limit: a client that stops reading its responses stops
        // this too, and is closed rather than holding its share of the request budget forever.
        let next = async {
            let (frame, permit) = reader.next_frame(size_max, &budget).await?;
            let is_fetch = crate::protocol::peek_header(&frame)
                .is_some_and(|h| h.api_key == ApiKey::Fetch as i16);
            let fetch_permit = if is_fetch {
                Some(
                    fetches
                        .acquire_static_permit(1)
                        .await
                        .map_err(|_| FrameError::Closed)?,
                )
            } else {
                None
            };
            let shard = shard.clone();
            let task = glommio::spawn_local(async move {
                let started = std::time::Instant::now();
                let api_key = crate::protocol::peek_header(&frame).map_or(-1, |h| h.api_key);
                metrics::add(Counter::BytesIn, frame.len() as u64 + 4);
                let outcome = handlers::dispatch(&shard, frame, peer).await;
                match &outcome {
                    Outcome::Respond(bytes) => metrics::add(Counter::BytesOut, bytes.len() as u64),
                    Outcome::RespondChunks(chunks) => metrics::add(
                        Counter::BytesOut,
                        chunks.iter().map(|c| c.len() as u64).sum(),
                    ),
                    Outcome::NoResponse | Outcome::Close(_) => {}
                }
                metrics::record_request(
                    api_key,
                    started.elapsed(),
                    matches!(outcome, Outcome::Close(_)),
                );
                (outcome, (permit, fetch_permit))
            });
            tx.send(task).await.map_err(|_| FrameError::Closed)
        };
        let idle = async {
            glommio::timer::sleep(idle_max).await;
            Err(FrameError::Idle)
        };
        let writer_gone = async {
            let _ = (&mut closed_rx).await;
            Err(FrameError::Closed)
        };
        let stopping = async {
            shard.stopped().await;
            Err(FrameError::Stopping)
        };
        let ended = futures_lite::future::or(
            futures_lite::future::or(next, idle),
            futures_lite::future::or(writer_gone, stopping),
        );
        if let Err(e) = ended.await {
            break e;
        }
    };
    match read_result {
        FrameError::TooLarge(size) => {
            tracing::warn!(
                ?peer,
                size,
                size_max,
                "request size prefix out of bounds (socket.request.max.bytes); closing connection"
            );
        }
        FrameError::Idle => {
            tracing::info!(
                ?peer,
                idle_ms = idle_max.as_millis(),
                "no complete request within connections.max.idle.ms; closing connection"
            );
            // Unblocks a writer stuck on a client that does not read; its queued responses (and
            // their budget) are dropped with it.
            use std::os::unix::io::AsRawFd;
            let fd = stream.0.borrow().as_raw_fd();
            // SAFETY: shutdown(2) on a socket this connection owns and keeps open until it
            // returns; it only changes the socket's state (no memory is passed).
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
        FrameError::Io(e) => tracing::debug!(?peer, error = %e, "read failed"),
        FrameError::Closed | FrameError::Stopping => {}
    }
    drop(tx);
    let _ = writer.await;
    Ok(())
}
