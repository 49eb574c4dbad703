//! Storage and routing micro-benchmarks: sparse index lookup, segment append with O_DIRECT
//! writes through glommio (io_uring), and a cross-shard round trip over glommio's channel mesh.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::LocalExecutorBuilder;

use strom::storage::segment::{lookup, IndexEntry};

mod common;

fn bench_index_lookup(c: &mut Criterion) {
    // A 1 GiB segment indexed every 4 KiB: 262,144 entries.
    let index: Vec<IndexEntry> = (0..262_144u32)
        .map(|i| IndexEntry {
            relative_offset: i * 4,
            position: i * 4096,
        })
        .collect();
    let mut target = 0i64;
    c.bench_function("index_lookup_262144_entries", |b| {
        b.iter(|| {
            target = (target + 7919) % (262_144 * 4);
            lookup(std::hint::black_box(&index), target)
        })
    });
}

/// Appends 16 KiB at a time to a DMA file (the flusher's write pattern: rewrite the tail block
/// plus new bytes), with and without fdatasync.
fn bench_segment_append(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("strom-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench directory");
    let mut group = c.benchmark_group("segment_append_16KiB");
    group.throughput(Throughput::Bytes(16 * 1024));
    for sync in [false, true] {
        let path = dir.join(format!("append-{sync}.log"));
        group.bench_function(if sync { "write_fdatasync" } else { "write" }, |b| {
            b.iter_custom(|iters| {
                let path = path.clone();
                LocalExecutorBuilder::default()
                    .io_memory(1 << 20)
                    .spawn(move || async move {
                        let file = glommio::io::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create(true)
                            .truncate(true)
                            .dma_open(&path)
                            .await
                            .expect("open bench file");
                        let started = Instant::now();
                        let mut pos = 0u64;
                        for _ in 0..iters {
                            let mut buf = file.alloc_dma_buffer(20 * 1024);
                            buf.as_bytes_mut().fill(0x5a);
                            file.write_at(buf, pos).await.expect("write");
                            if sync {
                                file.fdatasync().await.expect("fdatasync");
                            }
                            pos += 16 * 1024;
                        }
                        let elapsed = started.elapsed();
                        file.close().await.expect("close");
                        elapsed
                    })
                    .expect("executor")
                    .join()
                    .expect("bench run")
            })
        });
    }
    group.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A request and its reply between two executors over the channel mesh, as a produce for a
/// partition owned by another shard travels.
fn bench_cross_shard_round_trip(c: &mut Criterion) {
    c.bench_function("cross_shard_round_trip", |b| {
        b.iter_custom(|iters| {
            let mesh = MeshBuilder::<u64, _>::full(2, 1024);
            let responder_mesh = mesh.clone();
            let responder = LocalExecutorBuilder::default()
                .io_memory(1 << 20)
                .spawn(move || async move {
                    let (senders, mut receivers) = responder_mesh.join().await.expect("mesh");
                    let me = senders.peer_id();
                    let other = 1 - me;
                    let streams = receivers.streams();
                    let (_, stream) = streams.into_iter().next().expect("one peer");
                    while let Some(v) = stream.recv().await {
                        if senders.send_to(other, v + 1).await.is_err() {
                            break;
                        }
                        if v == u64::MAX - 1 {
                            break;
                        }
                    }
                })
                .expect("responder executor");
            let elapsed = LocalExecutorBuilder::default()
                .io_memory(1 << 20)
                .spawn(move || async move {
                    let (senders, mut receivers) = mesh.join().await.expect("mesh");
                    let me = senders.peer_id();
                    let other = 1 - me;
                    let (_, stream) = receivers.streams().into_iter().next().expect("one peer");
                    let started = Instant::now();
                    for i in 0..iters {
                        senders.send_to(other, i).await.expect("send");
                        stream.recv().await.expect("reply");
                    }
                    let elapsed = started.elapsed();
                    senders.send_to(other, u64::MAX - 1).await.expect("stop");
                    let _ = stream.recv().await;
                    elapsed
                })
                .expect("requester executor")
                .join()
                .expect("requester");
            responder.join().expect("responder");
            elapsed
        })
    });
}

/// One flush round: an `acks=all` batch of 4 KiB to each of 64 partitions, made durable. With the
/// shard journal it is one journal write and one fdatasync; without it (`strom.journal.files=0`)
/// each partition fdatasyncs its own segment. Real `PartitionLog`s and journal, real files.
/// Appends `batch` to every partition with `acks=all` and waits until all are durable.
async fn durable_round(logs: &[strom::storage::PartitionLog], batch: &bytes::Bytes) {
    let ends: Vec<_> = logs
        .iter()
        .map(|log| {
            log.append(
                bytes::BytesMut::from(&batch[..]),
                true,
                strom::storage::Origin::Client,
            )
            .expect("append")
            .end_offset
        })
        .collect();
    for (log, end) in logs.iter().zip(ends) {
        log.wait_for(end, true).await.expect("durable");
    }
}

fn bench_flush_round(c: &mut Criterion) {
    const PARTITIONS: i32 = 64;
    strom::storage::journal::open_journals();
    let mut group = c.benchmark_group("flush_round_64_partitions_4KiB");
    group.throughput(Throughput::Bytes(
        u64::from(PARTITIONS.unsigned_abs()) * 4096,
    ));
    for journaled in [true, false] {
        let name = if journaled {
            "journal"
        } else {
            "fdatasync_per_partition"
        };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                LocalExecutorBuilder::default()
                    .io_memory(1 << 20)
                    .spawn(move || async move {
                        let dir = std::env::temp_dir().join(format!(
                            "strom-bench-round-{}-{journaled}",
                            std::process::id()
                        ));
                        let _ = std::fs::remove_dir_all(&dir);
                        std::fs::create_dir_all(&dir).expect("bench directory");
                        let journal = if journaled {
                            strom::storage::journal::Journal::start(
                                &dir,
                                0,
                                4,
                                64 << 20,
                                usize::MAX,
                            )
                            .await
                            .expect("journal")
                        } else {
                            None
                        };
                        let config = strom::config::LogConfig::resolve(
                            &strom::config::BrokerConfig::default(),
                            &Default::default(),
                        );
                        let mut logs = Vec::new();
                        for p in 0..PARTITIONS {
                            let tp = strom::model::TopicPartition::new("bench", p);
                            let log = strom::storage::PartitionLog::open(
                                tp.clone(),
                                dir.join(tp.dir_name()),
                                [1; 16],
                                config.clone(),
                                1 << 20,
                                false,
                            )
                            .await
                            .expect("partition");
                            if let Some(j) = &journal {
                                log.attach_journal(j.clone());
                            }
                            logs.push(log);
                        }
                        let batch = bytes::Bytes::from(common::sample_batch(4, 1000));
                        // The first round attaches the journal (one sync per partition).
                        durable_round(&logs, &batch).await;
                        let started = Instant::now();
                        for _ in 0..iters {
                            durable_round(&logs, &batch).await;
                        }
                        let elapsed = started.elapsed();
                        let _ = std::fs::remove_dir_all(&dir);
                        elapsed
                    })
                    .expect("executor")
                    .join()
                    .expect("bench run")
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_index_lookup, bench_segment_append, bench_cross_shard_round_trip, bench_flush_round
}
criterion_main!(benches);
