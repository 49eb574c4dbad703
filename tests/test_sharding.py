"""More than one shard: every connection's produce reaches partitions owned by other shards
through the mesh, and the responses come back in request order."""

import re
import subprocess

from confluent_kafka import Producer
from kafka.admin import KafkaAdminClient, NewTopic


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
