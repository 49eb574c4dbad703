"""More than one shard: every connection's produce reaches partitions owned by other shards
through the mesh, and the responses come back in request order."""

import re
import subprocess

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
