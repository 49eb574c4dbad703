"""The shard journal: acks=all is one journal write and one fdatasync per flush round, whatever
the number of partitions, and what a crash took from the segments comes back from the journal."""

import random
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from test_metrics import metric, scrape


def create(broker, name, partitions):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()


def produce_acked(broker, topic, records, **config):
    """Produces (partition, value) pairs with acks=all; returns {(partition, offset): value}."""
    acked = {}
    errors = []

    def on_delivery(err, msg):
        if err is None:
            acked[(msg.partition(), msg.offset())] = msg.value()
        else:
            errors.append(err)

    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", **config})
    for partition, value in records:
        p.produce(topic, value=value, partition=partition, on_delivery=on_delivery)
        p.poll(0)
    assert p.flush(30) == 0
    assert not errors, errors[:5]
    return acked


def read_all(broker, topic, partitions):
    """Every record of `topic` from offset 0 of each partition: {(partition, offset): value}."""
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "journal-check",
                  "enable.auto.commit": False})
    ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(partitions)}
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = {p: [] for p in range(partitions)}
    deadline = time.time() + 60
    while sum(map(len, got.values())) < sum(ends.values()) and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error() is None:
            got[m.partition()].append((m.offset(), m.value()))
    c.close()
    found = {}
    for p, records in got.items():
        assert [o for o, _ in records] == list(range(ends[p])), f"partition {p}: offsets have a gap"
        found.update({(p, o): v for o, v in records})
    return found


def fsyncs(broker):
    return metric(scrape(broker, "/metrics")[2], "strom_fsyncs_total")


def produce_in_one_request(broker, topic, partitions, value):
    """kafka-python puts every partition's batch for a broker in one Produce request (librdkafka
    sends one request per partition)."""
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=500)
    futures = [p.send(topic, value=value, partition=i) for i in range(partitions)]
    p.flush(30)
    for f in futures:
        f.get(timeout=10)
    p.close()


def test_a_produce_to_many_partitions_costs_one_fdatasync_per_round_not_one_per_partition(broker):
    partitions = 64
    create(broker, "wide", partitions)
    # The first write of each partition syncs its (empty) segment once as the journal takes over.
    produce_in_one_request(broker, "wide", partitions, b"warm-up")
    time.sleep(1.5)  # shards publish their counters once a second
    before = fsyncs(broker)
    text = scrape(broker, "/metrics")[2]
    rounds_before = metric(text, "strom_journal_rounds_total")
    produces_before = metric(text, "strom_requests_total", api="Produce")
    for _ in range(3):
        produce_in_one_request(broker, "wide", partitions, b"x" * 100)
    time.sleep(1.5)
    text = scrape(broker, "/metrics")[2]
    synced = metric(text, "strom_fsyncs_total") - before
    rounds = metric(text, "strom_journal_rounds_total") - rounds_before
    requests = metric(text, "strom_requests_total", api="Produce") - produces_before
    print(f"3 acks=all produces to {partitions} partitions: {requests:.0f} Produce requests, "
          f"{synced:.0f} fdatasyncs, {rounds:.0f} journal rounds")
    assert rounds >= 3, "the produces did not go through the journal"
    assert requests == 3, "each produce was one request"
    # One round per shard per produce, with slack for a shard's flushers reaching the journal in
    # two rounds: never one per partition (32 per shard).
    assert synced <= 3 * 2 * 2, f"{synced} fdatasyncs for 3 produces to {partitions} partitions"
    assert len(read_all(broker, "wide", partitions)) == 4 * partitions


def test_records_a_crash_took_from_the_segments_come_back_from_the_journal(broker_factory):
    """kill -9, then the segments lose everything written (as a power cut loses what was never
    synced to them; the journal was); a restart on fewer cores (another shard owns the
    partitions) recovers every acknowledged record from the journal, at its offset."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    broker = broker_factory()
    partitions = 6
    create(broker, "lost", partitions)
    records = [(rng.randrange(partitions), f"rec-{i}-{rng.randrange(1 << 20)}".encode())
               for i in range(3000)]
    acked = produce_acked(broker, "lost", records, **{"linger.ms": 2})
    assert len(acked) == len(records)
    broker.kill9()
    cut = 0
    segments = list(broker.data_dir.glob("lost-*/*.log"))
    assert len(segments) >= partitions
    for log in segments:
        cut += log.stat().st_size
        with open(log, "r+b") as f:
            f.truncate(0)
    # With write-behind the segments may hold none of it yet: the journal holds it all.
    print(f"cut {cut} bytes from the segments of 'lost'")
    journals = broker.data_dir / "journal"
    shards_before = sorted(p.name for p in journals.iterdir()) if journals.exists() else []
    broker.cores = "0"
    broker.start()
    found = read_all(broker, "lost", partitions)
    lost = [k for k, v in acked.items() if found.get(k) != v]
    extra = [k for k in found if k not in acked]
    print(f"acknowledged {len(acked)}, read back {len(found)}, lost {len(lost)}, not acknowledged {len(extra)}")
    assert not lost, f"acknowledged records lost (seed {seed}): {lost[:10]}"
    assert not extra, f"records nobody produced (seed {seed}): {extra[:10]}"
    assert "recovered batches from the journal" in broker.log()
    # The journal of the shard that no longer exists was applied, then removed.
    assert shards_before == ["shard-0", "shard-1"]
    assert sorted(p.name for p in journals.iterdir()) == ["shard-0"]
    # New records continue the recovered offsets.
    more = produce_acked(broker, "lost", [(0, b"after")])
    ends = {p: max((o for q, o in acked if q == p), default=-1) for p in range(partitions)}
    assert list(more) == [(0, ends[0] + 1)]


def test_journal_files_are_reused_after_checkpoints_and_a_crash_replays_nothing_twice(broker_factory):
    """Two 1 MiB journal files and far more produced: the writer goes round them many times,
    each reuse after the partitions' segments were synced (a checkpoint). kill -9 mid-stream:
    the restart replays what the journal holds without duplicating a record or reviving one from
    an earlier pass over the files."""
    # Chunks of 256 KiB and more skip the journal; this test is about the journal's files.
    broker = broker_factory(extra_args=["--set", "strom.journal.file.bytes=1048576",
                                        "--set", "strom.journal.files=2",
                                        "--set", "strom.journal.bypass.bytes=1073741824"])
    partitions = 4
    create(broker, "wrap", partitions)
    records = [(i % partitions, f"w-{i}-".encode() + b"y" * 1000) for i in range(12000)]
    acked = produce_acked(broker, "wrap", records, **{"linger.ms": 5})
    time.sleep(1.5)
    text = scrape(broker, "/metrics")[2]
    checkpoints = metric(text, "strom_journal_checkpoints_total")
    journaled = metric(text, "strom_journal_bytes_total")
    print(f"journal: {journaled / 1e6:.1f} MB written, {checkpoints:.0f} checkpoints")
    assert journaled > 10e6 and checkpoints >= 5
    # Every file was filled to its full size once the writer was half-way through the one before.
    sizes = {f.relative_to(broker.data_dir).as_posix(): f.stat().st_size
             for f in (broker.data_dir / "journal").glob("shard-*/*.journal")}
    assert sorted(sizes.values()) == [1 << 20] * 4, sizes
    broker.kill9()
    broker.start()
    found = read_all(broker, "wrap", partitions)
    lost = [k for k, v in acked.items() if found.get(k) != v]
    print(f"acknowledged {len(acked)}, read back {len(found)}, lost {len(lost)}, "
          f"duplicated {len(found) - len(set(found.values()))}")
    assert not lost and len(found) == len(acked) == len(set(found.values()))


def test_large_chunks_skip_the_journal_and_mixed_with_small_ones_survive_kill9(broker_factory):
    """Large batches (acks=1, 512 KiB each) go straight to the segment: the journal does not
    write their bytes a second time, and each is fdatasynced although no producer waits for it.
    Then small acks=all batches to the same partitions go through the journal in between large
    ones; a journal round claims durability up to its end, so the large chunks before it must
    already be durable. kill -9 and restart: every acknowledged record is back, once, at its
    offset."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    broker = broker_factory()
    partitions = 2
    create(broker, "mixed", partitions)
    big = Producer({"bootstrap.servers": broker.bootstrap, "acks": "1", "linger.ms": 200,
                    "batch.size": 1 << 20, "message.max.bytes": 2 << 20})
    big_acked = {}

    def on_big(err, msg):
        if err is None:
            big_acked[(msg.partition(), msg.offset())] = msg.value()

    def produce_large(rnd):
        # 512 KiB of 16 KiB records per partition, lingered into one large batch each.
        for p in range(partitions):
            for i in range(32):
                value = f"big-{rnd}-{p}-{i}-".encode() + rng.randbytes(16 << 10)
                big.produce("mixed", value=value, partition=p, on_delivery=on_big)
        assert big.flush(30) == 0

    produce_large(-1)  # the first write of each partition syncs its new segment
    time.sleep(1.5)  # shards publish their counters once a second
    text = scrape(broker, "/metrics")[2]
    journaled_before = metric(text, "strom_journal_bytes_total")
    fsyncs_before = metric(text, "strom_fsyncs_total")
    for rnd in range(3):
        produce_large(rnd)
    time.sleep(1.5)
    text = scrape(broker, "/metrics")[2]
    journaled = metric(text, "strom_journal_bytes_total") - journaled_before
    synced = metric(text, "strom_fsyncs_total") - fsyncs_before
    large_chunks = 3 * partitions
    print(f"{large_chunks} large acks=1 batches of 512 KiB: journal wrote {journaled / 1e6:.2f} MB, "
          f"{synced:.0f} fdatasyncs")
    assert journaled < 256 << 10, "the large batches went through the journal"
    assert synced >= large_chunks, "a chunk that skipped the journal was not fdatasynced"
    small_acked = {}
    for rnd in range(3, 8):
        produce_large(rnd)
        small = [(rng.randrange(partitions), f"small-{rnd}-{i}".encode()) for i in range(50)]
        small_acked.update(produce_acked(broker, "mixed", small, **{"linger.ms": 0}))
    assert len(big_acked) == 9 * partitions * 32
    broker.kill9()
    broker.start()
    found = read_all(broker, "mixed", partitions)
    acked = {**big_acked, **small_acked}
    lost = [k for k, v in acked.items() if found.get(k) != v]
    values = list(found.values())
    print(f"acknowledged {len(acked)}, read back {len(found)}, lost {len(lost)}, "
          f"duplicated {len(values) - len(set(values))}")
    assert not lost, f"acknowledged records lost (seed {seed}): {lost[:10]}"
    assert len(found) == len(acked) == len(set(values))


def test_a_checkpoint_over_a_thousand_partitions_keeps_the_broker_up(broker_factory):
    """A journal file that covers 1,000 partitions is checkpointed by syncing 1,000 segments.
    Polling them all from one task on every wake-up overflowed glommio's waker count and aborted
    the shard (found at 1,000 partitions, 50,000 msg/s; then at shutdown, which closes as many
    partitions the same way); `join_all` now polls only the futures that were woken."""
    broker = broker_factory(extra_args=["--set", "strom.journal.file.bytes=1048576",
                                        "--set", "strom.journal.files=2"])
    partitions = 1000
    create(broker, "many", partitions)
    value = b"m" * 1000
    p = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all", linger_ms=50,
                      max_request_size=16 << 20)
    rounds = 20
    futures = []
    for _ in range(rounds):
        # No flush between rounds: checkpoints run while the next produces arrive.
        futures += [p.send("many", value=value, partition=i) for i in range(partitions)]
    p.flush(120)
    for f in futures:
        f.get(timeout=60)
    p.close()
    time.sleep(1.5)
    text = scrape(broker, "/metrics")[2]
    checkpoints = metric(text, "strom_journal_checkpoints_total")
    print(f"{checkpoints:.0f} checkpoints over {partitions} partitions")
    assert checkpoints >= 2
    assert broker.alive(), broker.log()[-3000:]
    found = read_all(broker, "many", partitions)
    assert len(found) == rounds * partitions
    # The crash could also come during the shutdown's last checkpoints.
    broker.stop()
    assert broker.proc.returncode == 0 and "panicked" not in broker.log(), broker.log()[-3000:]
