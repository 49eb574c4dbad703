//! Starting the broker: one glommio executor per core in the core mapping, each pinned, joined in
//! one channel mesh, each with its own `SO_REUSEPORT` listener on the same port.

use std::net::SocketAddr;
use std::sync::mpsc;

use anyhow::{bail, Context, Result};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::{LocalExecutorBuilder, Placement};

use super::shutdown::{self, ShardReport};
use super::{Envelope, Shard, MESH_CHANNEL_CAPACITY};
use crate::config::ServeOptions;
use crate::metrics::MetricsHub;
use crate::server;

/// Memory each executor registers with io_uring for DMA buffers. Small, so that several shards
/// fit in the default 8 MiB `RLIMIT_MEMLOCK`; larger buffers fall back to ordinary allocations.
const IO_MEMORY_BYTES_PER_SHARD: usize = 2 << 20;

/// The cores to run on: the requested list, or every online core.
pub fn resolve_cores(requested: Option<Vec<usize>>) -> Result<Vec<usize>> {
    let online: Vec<usize> = core_affinity::get_core_ids()
        .context("listing online cores")?
        .into_iter()
        .map(|c| c.id)
        .collect();
    match requested {
        None => Ok(online),
        Some(cores) => {
            if let Some(missing) = cores.iter().find(|c| !online.contains(c)) {
                bail!("core {missing} is not online (online cores: {online:?})");
            }
            Ok(cores)
        }
    }
}

/// Where this broker takes broker-to-broker traffic: `inter.broker.listen`, else its own entry in
/// `controller.quorum.voters`; none on a single node.
fn inter_broker_address(options: &ServeOptions) -> Result<Option<SocketAddr>> {
    let broker = &options.broker;
    if broker.quorum_voters.is_empty() {
        return Ok(None);
    }
    let own = broker
        .quorum_voters
        .iter()
        .find(|(id, _)| *id == broker.node_id)
        .map(|(_, a)| a.clone());
    if own.is_none() && broker.inter_broker_listen.is_none() {
        // A broker outside the quorum (scale-out) has no entry to listen on.
        bail!(
            "node.id {} is not in controller.quorum.voters: a broker outside the quorum needs --set inter.broker.listen=HOST:PORT",
            broker.node_id
        );
    }
    let (host, port) = broker
        .inter_broker_listen
        .clone()
        .or(own)
        .context("no inter-broker address")?;
    let address = format!("{host}:{port}");
    let resolved = std::net::ToSocketAddrs::to_socket_addrs(&address)
        .with_context(|| format!("resolving inter-broker address {address}"))?
        .next()
        .with_context(|| format!("inter-broker address {address} resolves to nothing"))?;
    if !resolved.ip().is_loopback() && !resolved.ip().is_unspecified() {
        tracing::info!(%resolved, "inter-broker listener on a non-loopback address");
    }
    Ok(Some(resolved))
}

/// Runs the broker until SIGTERM or SIGINT has shut it down cleanly (see [`shutdown`]).
/// `on_ready` is called with the bound address once every shard serves.
pub fn run(mut options: ServeOptions, on_ready: impl FnOnce(SocketAddr, SocketAddr)) -> Result<()> {
    watch_signals()?;
    raise_memlock_limit();
    std::fs::create_dir_all(&options.data_dir)
        .with_context(|| format!("creating data directory {}", options.data_dir.display()))?;
    // glommio opens directories with `openat` relative to no directory at all, so a relative path
    // fails with EBADF; every path below the data directory is therefore made absolute once here.
    options.data_dir = std::fs::canonicalize(&options.data_dir)
        .with_context(|| format!("resolving data directory {}", options.data_dir.display()))?;
    crate::storage::files::finish_deletions(&options.data_dir)?;
    tracing::info!(
        bytes_per_shard = options.broker.cache_bytes_per_shard(options.cores.len()),
        "recent-batch cache (strom.cache.bytes.per.shard)"
    );
    if crate::storage::trash::configure(
        &options.data_dir,
        options.broker.delete_pacing,
        options.broker.delete_bytes_per_second,
    ) {
        tracing::info!(
            bytes_per_second_per_shard = options.broker.delete_bytes_per_second,
            "large deleted files are trimmed a chunk at a time (strom.delete.pacing)"
        );
    }
    options.clean_start = shutdown::take_marker(&options.data_dir)?;
    if options.clean_start {
        tracing::info!(
            "the last run stopped cleanly: trusting segment indexes and producer snapshots"
        );
    } else {
        tracing::info!("no clean-shutdown marker: active segments are recovered by a CRC scan");
    }
    let start_time = std::time::Instant::now();
    let count = options.cores.len();
    let open_files_per_shard = open_files_budget(count);
    let (sockets, bound) = server::bind_listeners(options.listen, count)?;
    let inter_broker = inter_broker_address(&options)?;
    let mut peer_sockets: Vec<Option<socket2::Socket>> = match inter_broker {
        Some(address) => crate::replication::transport::bind(address, count)?
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..count).map(|_| None).collect(),
    };
    let advertised = options
        .broker
        .advertised_listener
        .clone()
        .unwrap_or_else(|| (bound.ip().to_string(), bound.port()));
    let hub = MetricsHub::new(count);
    let admin = crate::metrics::admin::serve(options.admin_listen, hub.clone())?;
    let mesh = MeshBuilder::<Envelope, _>::full(count, MESH_CHANNEL_CAPACITY);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let mut handles = Vec::with_capacity(count);
    for (i, (core, socket)) in options.cores.iter().zip(sockets).enumerate() {
        let mesh = mesh.clone();
        let options = options.clone();
        let advertised = advertised.clone();
        let ready_tx = ready_tx.clone();
        let hub = hub.clone();
        let peer_socket = peer_sockets.get_mut(i).and_then(Option::take);
        let handle = LocalExecutorBuilder::new(Placement::Fixed(*core))
            .name(&format!("strom-shard-{i}"))
            .io_memory(IO_MEMORY_BYTES_PER_SHARD)
            .spawn(move || async move {
                crate::storage::open_files::set_open_files_max(open_files_per_shard);
                let (senders, receivers) = match mesh.join().await {
                    Ok(pair) => pair,
                    Err(_) => {
                        let _ = ready_tx.send(Err("joining the shard mesh failed".into()));
                        return None;
                    }
                };
                if let Err(e) = crate::storage::files::probe_device(&options.data_dir).await {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return None;
                }
                let shard =
                    match Shard::start(options, advertised, senders, receivers, hub, peer_socket)
                        .await
                    {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(format!("{e:#}")));
                            return None;
                        }
                    };
                let _ = ready_tx.send(Ok(()));
                let watcher = {
                    let shard = shard.clone();
                    glommio::spawn_local(async move {
                        shutdown::wait_requested().await;
                        shard.begin_stop();
                    })
                };
                if let Err(e) = server::serve(shard.clone(), socket).await {
                    tracing::error!(error = %format!("{e:#}"), "listener stopped");
                }
                watcher.await;
                Some(shutdown::finish(&shard).await)
            })
            .map_err(std::io::Error::from)
            .with_context(|| format!("starting the executor for core {core}"))?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..count {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("a shard failed to start: {e}"),
            Err(_) => bail!("a shard stopped during start-up"),
        }
    }
    // Every shard has opened its partitions and applied what the journals held: from now on the
    // journals may be written over.
    crate::storage::journal::open_journals();
    crate::storage::journal::remove_orphans(&options.data_dir, count)?;
    tracing::info!(%bound, %admin, shards = count, cores = ?options.cores, data_dir = %options.data_dir.display(), clean_start = options.clean_start, startup_ms = u64::try_from(start_time.elapsed().as_millis()).unwrap_or(u64::MAX), "strom serving");
    on_ready(bound, admin);
    let mut reports: Vec<Option<ShardReport>> = Vec::with_capacity(count);
    for h in handles {
        reports.push(
            h.join()
                .map_err(|e| anyhow::anyhow!("shard executor failed: {e}"))?,
        );
    }
    let partitions: usize = reports.iter().flatten().map(|r| r.partitions).sum();
    let failed: usize = reports.iter().flatten().map(|r| r.failed.len()).sum();
    let abandoned: usize = reports
        .iter()
        .flatten()
        .map(|r| r.abandoned_connections)
        .sum();
    if reports.iter().all(Option::is_some) && failed == 0 {
        shutdown::write_marker(&options.data_dir)?;
        tracing::info!(
            partitions,
            abandoned_connections = abandoned,
            "clean shutdown: every partition flushed and fdatasynced, producer state saved, marker written"
        );
        Ok(())
    } else {
        bail!("shutdown was not clean ({failed} partitions failed to close); the next start recovers by scanning")
    }
}

/// SIGTERM and SIGINT request a clean shutdown; a second one exits at once (what was
/// acknowledged with acks=all is durable either way; the next start then scans).
fn watch_signals() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("strom-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if shutdown::requested() {
                    tracing::warn!(
                        signal,
                        "second signal: exiting without finishing the clean shutdown"
                    );
                    std::process::exit(130);
                }
                tracing::info!(
                    signal,
                    "shutting down cleanly (a second signal exits at once)"
                );
                shutdown::request();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Segment files each shard may hold open: half of the process's fd limit (its soft limit lifted
/// to the hard one first), shared evenly; the other half is for sockets and everything else.
fn open_files_budget(shards: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return crate::storage::open_files::OPEN_FILES_MAX_DEFAULT;
        }
        if limit.rlim_cur < limit.rlim_max
            && libc::setrlimit(libc::RLIMIT_NOFILE, &{
                libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                }
            }) == 0
        {
            limit.rlim_max
        } else {
            limit.rlim_cur
        }
    };
    let soft = usize::try_from(soft).unwrap_or(usize::MAX);
    let per_shard = (soft / 2 / shards.max(1)).clamp(16, 1 << 20);
    tracing::info!(
        fd_limit = soft,
        segment_files_per_shard = per_shard,
        "fd budget"
    );
    per_shard
}

/// io_uring registers memory against `RLIMIT_MEMLOCK`; lift the soft limit to the hard one.
fn raise_memlock_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit);
        }
    }
}
