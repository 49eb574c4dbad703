"""More than one shard: every connection's produce reaches partitions owned by other shards
through the mesh, and the responses come back in request order."""

import re
import subprocess
import threading
import time

from confluent_kafka import Producer
from kafka.admin import KafkaAdminClient, NewTopic

import kafka_wire as kw


def test_produce_is_routed_to_the_partition_owner_on_another_shard(broker_factory):
    b = broker_factory(log_level="info,strom::shard=debug", name="sharded")
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("spread", 8, 1)])
    admin.close()
    # Several connections: SO_REUSEPORT spreads them over both shards.
    for n in range(4):
        p = Producer({"bootstrap.servers": b.bootstrap, "acks": "all"})
        for part in range(8):
            p.produce("spread", value=f"{n}-{part}".encode(), partition=part)
        assert p.flush(15) == 0
    hops = re.findall(r"cross-shard request.*from=(\d+).*to=(\d+).*kind=\"?Append", b.log())
    assert hops, "no produce crossed shards"
    assert all(f != t for f, t in hops)
    out = subprocess.run(["kcat", "-b", b.bootstrap, "-t", "spread", "-C", "-e", "-f", "%p %s\n"],
                         capture_output=True, text=True, timeout=60)
    rows = out.stdout.split("\n")
    assert sorted(r for r in rows if r) == sorted(f"{part} {n}-{part}" for n in range(4) for part in range(8))


def test_one_produce_request_crosses_to_each_other_shard_once(broker_factory):
    """A request spread over many partitions sends each owning shard one message with all of its
    partitions' batches (not one per partition); every partition's answer lands in its own slot of
    the response, refusals included."""
    b = broker_factory(log_level="info,strom::shard=debug", name="sharded-many")
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("wide", 64, 1)])
    admin.close()
    batches = [(p, kw.record_batch([f"v{p}".encode()])) for p in range(64)]
    # An unknown partition and an empty record set in the middle keep their places.
    batches.insert(10, (500, kw.record_batch([b"nowhere"])))
    batches.insert(20, (7, b""))
    before = len(re.findall(r"cross-shard request.*kind=\"?Append", b.log()))
    s = kw.connect(b.bootstrap)
    s.sendall(kw.produce_v3_partitions(b"wide", batches, acks=-1, correlation_id=7))
    cid, results = kw.parse_produce_v3(kw.read_frame(s))
    s.close()
    assert cid == 7
    assert [(p, e) for _, p, e, _ in results] == [
        (p, 3 if p == 500 else 2 if i == 20 else 0) for i, (p, _) in enumerate(batches)]
    assert all(base == 0 for _, p, e, base in results if e == 0)
    hops = len(re.findall(r"cross-shard request.*kind=\"?Append", b.log())) - before
    # The connection's shard owns half the partitions; the other half is one message away.
    assert hops == 1, f"{hops} cross-shard Append messages for one request"
    out = subprocess.run(["kcat", "-b", b.bootstrap, "-t", "wide", "-C", "-e", "-f", "%p %s\n"],
                         capture_output=True, text=True, timeout=60)
    rows = sorted(r for r in out.stdout.split("\n") if r)
    assert rows == sorted(f"{p} v{p}" for p in range(64))


def test_a_fetch_answers_partitions_of_several_topics_in_request_order(broker_factory):
    """Partitions of two topics on both shards, a topic named twice, an unknown partition and an
    unknown topic: each answer comes back in its request slot with its own watermark and records."""
    b = broker_factory(name="sharded-fetch")
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("left", 4, 1), NewTopic("right", 3, 1)])
    admin.close()
    s = kw.connect(b.bootstrap)
    for topic, partition in ((b"left", 1), (b"right", 2), (b"left", 3)):
        s.sendall(kw.produce_v3(topic, partition, kw.record_batch([b"x" + topic]), acks=-1))
        assert kw.read_produce_error(s, 1) == (0, 0)
    asked = [(b"left", [(0, 0), (1, 0), (9, 0)]), (b"right", [(2, 0), (0, 0)]),
             (b"left", [(3, 0), (2, 0)]), (b"nosuch", [(0, 0)])]
    s.sendall(kw.fetch_v4_topics(asked, correlation_id=9))
    cid, answers = kw.parse_fetch_v4(kw.read_frame(s))
    s.close()
    assert cid == 9
    written = {(b"left", 1), (b"right", 2), (b"left", 3)}
    expected = []
    for topic, partitions in asked:
        for p, _ in partitions:
            if topic == b"nosuch" or p == 9:
                expected.append((topic, p, 3, -1, False))
            else:
                hw = 1 if (topic, p) in written else 0
                expected.append((topic, p, 0, hw, hw == 1))
    got = [(t, p, e, hw, b"x" + t in records) for t, p, e, hw, records in answers]
    assert got == expected


def test_a_long_poll_on_partitions_of_both_shards_wakes_when_either_gets_a_record(broker_factory):
    """A Fetch waiting (min_bytes 1, 20 s) on 40 partitions spread over both shards returns as
    soon as a record lands in one of them, whichever shard owns it, with that record."""
    b = broker_factory(name="sharded-poll")
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("poll", 40, 1)])
    admin.close()
    s = kw.connect(b.bootstrap, timeout=30)
    producer = kw.connect(b.bootstrap)
    offsets = {p: 0 for p in range(40)}
    # Consecutive partitions are owned by different shards: one of the two is the other shard's.
    for n, partition in enumerate((6, 7)):
        asked = [(b"poll", sorted(offsets.items()))]
        s.sendall(kw.fetch_v4_topics(asked, correlation_id=n, max_wait_ms=20_000, min_bytes=1))

        def produce(partition=partition):
            time.sleep(0.5)
            producer.sendall(kw.produce_v3(b"poll", partition, kw.record_batch([b"woke"]), acks=-1))
        threading.Thread(target=produce).start()
        started = time.monotonic()
        cid, answers = kw.parse_fetch_v4(kw.read_frame(s))
        waited = time.monotonic() - started
        assert cid == n
        assert kw.read_produce_error(producer, 1) == (0, 0)
        assert waited < 10, f"the fetch waited {waited:.1f} s for a record produced after 0.5 s"
        with_records = [(p, hw) for _, p, e, hw, records in answers if b"woke" in records]
        assert with_records == [(partition, 1)]
        offsets[partition] = 1
    s.close()
    producer.close()
