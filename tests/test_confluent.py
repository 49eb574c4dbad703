"""confluent-kafka (current librdkafka): acks=all, idempotence, consuming by offset and by
timestamp, and every compression codec."""

import glob
import os
import struct
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic


def create_topic(bootstrap, name, partitions=1):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def produce_all(bootstrap, topic, records, **conf):
    """Produces (key, value, headers, timestamp) tuples; returns delivery reports in order."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **conf})
    reports = []

    def on_delivery(err, msg):
        reports.append((err, msg.partition(), msg.offset(), msg.value()))

    for key, value, headers, ts in records:
        kwargs = {"key": key, "value": value, "headers": headers, "on_delivery": on_delivery}
        if ts is not None:
            kwargs["timestamp"] = ts
        p.produce(topic, **kwargs)
        p.poll(0)
    assert p.flush(30) == 0, "producer could not deliver everything"
    return reports


def consume(bootstrap, topic, partition, offset, count, timeout_s=30):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4()}",
                  "enable.auto.commit": False, "auto.offset.reset": "error"})
    c.assign([TopicPartition(topic, partition, offset)])
    out = []
    deadline = time.time() + timeout_s
    while len(out) < count and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        assert m.error() is None, m.error()
        out.append(m)
    c.close()
    return out


def test_acks_all_producer_gets_every_record_acknowledged_and_readable(broker):
    create_topic(broker.bootstrap, "acks-all", 2)
    recs = [(f"k{i}".encode(), f"v{i}".encode(), [("h", b"x")], None) for i in range(500)]
    reports = produce_all(broker.bootstrap, "acks-all", recs, acks="all")
    assert all(err is None for err, *_ in reports)
    for partition in (0, 1):
        expected = sorted((o, v) for err, p, o, v in reports if p == partition)
        got = consume(broker.bootstrap, "acks-all", partition, 0, len(expected))
        assert [(m.offset(), m.value()) for m in got] == expected
        assert all(m.headers() == [("h", b"x")] for m in got)


def test_idempotent_producer_writes_each_record_once(broker):
    create_topic(broker.bootstrap, "idem", 1)
    recs = [(None, f"v{i}".encode(), None, None) for i in range(2000)]
    reports = produce_all(broker.bootstrap, "idem", recs, **{"enable.idempotence": True, "acks": "all"})
    assert all(err is None for err, *_ in reports)
    got = consume(broker.bootstrap, "idem", 0, 0, 2000)
    assert [m.value() for m in got] == [f"v{i}".encode() for i in range(2000)]
    assert [m.offset() for m in got] == list(range(2000))


def test_consume_from_an_offset_inside_a_batch(broker):
    create_topic(broker.bootstrap, "mid-batch", 1)
    recs = [(None, f"v{i}".encode(), None, None) for i in range(100)]
    produce_all(broker.bootstrap, "mid-batch", recs, **{"linger.ms": 100})
    got = consume(broker.bootstrap, "mid-batch", 0, 37, 63)
    assert [m.offset() for m in got] == list(range(37, 100))
    assert got[0].value() == b"v37"


def test_offsets_for_times_finds_first_record_at_or_after(broker):
    create_topic(broker.bootstrap, "by-time", 1)
    base = 1_700_000_000_000
    recs = [(None, f"v{i}".encode(), None, base + i * 1000) for i in range(50)]
    produce_all(broker.bootstrap, "by-time", recs)
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "t"})
    try:
        for target, expected in [(base, 0), (base + 10_500, 11), (base + 49_000, 49), (base + 99_000, -1)]:
            [tp] = c.offsets_for_times([TopicPartition("by-time", 0, target)], timeout=10)
            assert tp.error is None
            assert tp.offset == expected, (target, tp.offset)
        lo, hi = c.get_watermark_offsets(TopicPartition("by-time", 0), timeout=10)
        assert (lo, hi) == (0, 50)
    finally:
        c.close()
    got = consume(broker.bootstrap, "by-time", 0, 11, 1)
    assert got[0].value() == b"v11"
    assert got[0].timestamp()[1] == base + 11_000


CODEC_IDS = {"gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


@pytest.mark.parametrize("codec", sorted(CODEC_IDS))
def test_compressed_batches_are_stored_as_sent_and_read_back_intact(broker, codec):
    topic = f"codec-{codec}"
    create_topic(broker.bootstrap, topic, 1)
    recs = [(f"k{i}".encode(), (f"value-{i}-" * 20).encode(), [("n", str(i).encode())], None)
            for i in range(300)]
    reports = produce_all(broker.bootstrap, topic, recs, **{"compression.type": codec, "linger.ms": 50})
    assert all(err is None for err, *_ in reports)
    got = consume(broker.bootstrap, topic, 0, 0, 300)
    assert [(m.key(), m.value(), m.headers()) for m in got] == [(k, v, h) for k, v, h, _ in recs]
    # On disk the batches keep the producer's codec: stored byte-for-byte, never re-encoded.
    # A clean stop writes every batch to its segment (the journal may hold them until then).
    broker.stop()
    [log] = glob.glob(os.path.join(broker.data_dir, f"{topic}-0", "*.log"))
    data = open(log, "rb").read()
    pos, codecs = 0, set()
    while pos + 61 <= len(data):
        length, = struct.unpack_from(">i", data, pos + 8)
        if length <= 0:
            break
        attributes, = struct.unpack_from(">h", data, pos + 21)
        codecs.add(attributes & 7)
        pos += 12 + length
    assert codecs == {CODEC_IDS[codec]}


def test_large_batches_read_back_byte_for_byte_from_memory_and_from_disk(broker):
    """Fetch responses carry batches of 32 KiB and more by reference (no copy into the response
    buffer); every byte must still arrive in place, several partitions to a response, from the
    broker's memory and, after a restart, from the segment files."""
    import hashlib
    import random
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    create_topic(broker.bootstrap, "large", 3)
    recs = [(f"k{i}".encode(), rng.randbytes(rng.randrange(1, 90_000)), None, None)
            for i in range(300)]
    reports = produce_all(broker.bootstrap, "large", recs, acks="all", **{"linger.ms": 50})
    assert all(err is None for err, *_ in reports)
    expected = {(p, o): hashlib.sha256(v).hexdigest() for err, p, o, v in reports}

    def read_all():
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"g-{uuid.uuid4()}",
                      "enable.auto.commit": False, "auto.offset.reset": "earliest",
                      "check.crcs": True})
        c.assign([TopicPartition("large", p, 0) for p in range(3)])
        got = {}
        deadline = time.time() + 60
        while len(got) < len(expected) and time.time() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            assert m.error() is None, m.error()
            got[(m.partition(), m.offset())] = hashlib.sha256(m.value()).hexdigest()
        c.close()
        return got

    assert read_all() == expected
    broker.kill9()
    broker.start(port=int(broker.bootstrap.rsplit(":", 1)[1]))
    assert read_all() == expected


@pytest.mark.parametrize("limits", [
    {},
    {"fetch.max.bytes": 100_000, "message.max.bytes": 100_000, "max.partition.fetch.bytes": 40_000},
    {"fetch.max.bytes": 1_000, "message.max.bytes": 1_000, "max.partition.fetch.bytes": 1},
])
def test_many_cached_batches_reach_a_consumer_intact_under_every_fetch_limit(broker, limits):
    """A read from the broker's memory hands the Fetch response its cached batches as they are,
    several to a partition, not copied together: small and large ones mixed, cut at whole batches
    by the consumer's limits (at least one batch per response: KIP-74). Every record must arrive
    once, in order, with its bytes."""
    import hashlib
    import random
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    topic = f"pieces-{uuid.uuid4().hex[:8]}"
    create_topic(broker.bootstrap, topic, 2)
    # One record per batch (linger 0, flushed after each): small ones and some past 32 KiB.
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 0, "acks": "all"})
    sent = {0: [], 1: []}
    for i in range(400):
        size = rng.choice([rng.randrange(1, 2_000), rng.randrange(30_000, 70_000)])
        value = rng.randbytes(size)
        part = i % 2
        p.produce(topic, value=value, partition=part)
        sent[part].append(hashlib.sha256(value).hexdigest())
        if i % 3 == 0:
            p.flush(10)
    assert p.flush(30) == 0
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"g-{uuid.uuid4()}",
                  "enable.auto.commit": False, "check.crcs": True, **limits})
    c.assign([TopicPartition(topic, part, 0) for part in (0, 1)])
    got = {0: [], 1: []}
    deadline = time.time() + 60
    while sum(map(len, got.values())) < 400 and time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        assert m.error() is None, m.error()
        assert m.offset() == len(got[m.partition()]), "a record out of order or twice"
        got[m.partition()].append(hashlib.sha256(m.value()).hexdigest())
    c.close()
    assert got == sent
