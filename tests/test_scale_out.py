"""Scale-out: a broker outside `controller.quorum.voters` joins a running three-broker cluster
(127.0.0.4, its own `node.id`, `inter.broker.listen`), is listed by Metadata, takes replicas of new
topics, and survives kill -9; replicas of existing partitions move onto it through Raft membership
changes (AlterPartitionReassignments, `strom cluster rebalance`) while clients run.
"""

import os
import random
import re
import subprocess
import threading
import time

import pytest

from conftest import STROM_BIN
from confluent_kafka import Consumer

from test_cluster import (Load, Node, bootstrap, check, check_replicas_identical, cluster_status,
                          create_topic, read_all, segment_bytes, start_cluster)


@pytest.fixture
def growing(tmp_path):
    """Three voters, and `join()` to start a fourth broker that joins them."""
    gen = start_cluster(tmp_path)
    nodes = next(gen)
    port = nodes[0].port
    fourth = Node(4, tmp_path / "node4", port, nodes[0].voters,
                  extra=["--set", f"inter.broker.listen=127.0.0.4:{port + 1}"])
    fourth.proxies = nodes[0].proxies

    def join():
        fourth.start()
        nodes.append(fourth)
        for n in nodes:
            wait_brokers(n, [1, 2, 3, 4])
        return fourth
    try:
        yield nodes, join
    finally:
        complaint = fourth.stop()
        for _ in gen:
            pass
        assert not complaint, complaint


def brokers_listed(node):
    out = subprocess.run(["kcat", "-b", node.bootstrap, "-L", "-m", "3"],
                         capture_output=True, text=True).stdout
    return sorted(int(b) for b in re.findall(r"broker (\d+) at", out)), out


def wait_brokers(node, want, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        listed, out = brokers_listed(node)
        if listed == want:
            return
        time.sleep(0.3)
    raise AssertionError(f"{node.bootstrap} lists {listed}, not {want}:\n{out}")


def replicas_of(node, topic):
    out = subprocess.run(["kcat", "-b", node.bootstrap, "-L", "-t", topic, "-m", "3"],
                         capture_output=True, text=True).stdout
    return {int(p): (int(l), [int(x) for x in r.split(",") if x]) for p, l, r in
            re.findall(r"partition (\d+), leader (-?\d+), replicas: ([\d,]*)", out)}


def test_a_fourth_broker_joins_and_takes_replicas_of_new_topics(growing):
    nodes, join = growing
    fourth = join()
    status = cluster_status(nodes[0])
    assert "Brokers: 4 live, 0 not live" in status, status
    # Round robin over four brokers: every broker holds 3 of 4 partitions, and leads one.
    create_topic(nodes, "wide", partitions=4, rf=3)
    deadline = time.time() + 30
    while time.time() < deadline:
        parts = replicas_of(nodes[0], "wide")
        if len(parts) == 4 and sorted(l for l, _ in parts.values()) == [1, 2, 3, 4]:
            break
        time.sleep(0.5)
    assert sum(4 in r for _, r in parts.values()) == 3, parts
    assert sorted(l for l, _ in parts.values()) == [1, 2, 3, 4], parts
    seed = int(os.environ.get("STROM_CLUSTER_SEED", random.randrange(1 << 30)))
    load = Load(nodes, "wide", seed)
    load.produce(2000)
    load.flush()
    assert not load.errors, load.errors[:3]
    # The joined broker restarts from its own log (it is a learner of the metadata group).
    fourth.kill9()
    fourth.start()
    wait_brokers(fourth, [1, 2, 3, 4])
    load.produce(1000)
    load.flush()
    # Its partition is led elsewhere now (another replica won the election while it was down);
    # a preferred election (kafka-python's elect_leaders) hands it back.
    from kafka.admin import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=bootstrap(nodes), request_timeout_ms=30000)
    deadline = time.time() + 60
    while time.time() < deadline:
        parts = replicas_of(nodes[0], "wide")
        if sorted(l for l, _ in parts.values()) == [1, 2, 3, 4]:
            break
        admin.elect_leaders(0, {"wide": [0, 1, 2, 3]}, raise_errors=False)
        time.sleep(2)
    admin.close()
    assert sorted(l for l, _ in parts.values()) == [1, 2, 3, 4], parts
    assert all(l == r[0] for l, r in parts.values()), parts
    check("fourth broker joins", load, read_all(nodes, "wide", partitions=4,
                                                expect=len(load.acked)), seed)
    time.sleep(1)
    check_replicas_identical(nodes, "wide", partitions=4)


def leaders_and_replicas(nodes, topic, partitions):
    parts = replicas_of(nodes[0], topic)
    assert len(parts) == partitions, parts
    return parts


def test_rebalance_moves_replicas_onto_a_new_broker_while_clients_run(growing):
    """A topic on three brokers; a fourth joins; `strom cluster rebalance` moves replicas onto
    it (Raft learner, then voter, then the old replica removed) while an idempotent acks=all
    producer and a consumer run. Afterwards every broker holds and leads a fair share, nothing
    acknowledged is lost or duplicated, and each partition's replicas hold the same bytes."""
    nodes, join = growing
    partitions = 6
    create_topic(nodes, "moving", partitions=partitions, rf=3)
    seed = int(os.environ.get("STROM_CLUSTER_SEED", random.randrange(1 << 30)))
    load = Load(nodes, "moving", seed)
    load.produce(3000)
    load.flush()
    fourth = join()
    consumed = []
    stop = threading.Event()

    def produce():
        while not stop.is_set():
            load.produce(100)
            load.producer.poll(0.05)

    def consume():
        c = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": "mover",
                      "auto.offset.reset": "earliest", "enable.auto.commit": True})
        c.subscribe(["moving"])
        while not stop.is_set():
            m = c.poll(0.2)
            if m is not None and not m.error():
                consumed.append(m.value())
        c.close()
    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        started = time.time()
        out = subprocess.run([STROM_BIN, "cluster", "rebalance", "--bootstrap", nodes[0].bootstrap,
                              "--timeout", "180"], capture_output=True, text=True, timeout=240)
        print(out.stdout, out.stderr)
        assert out.returncode == 0, out
        print(f"rebalance took {time.time() - started:.1f} s")
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()
    load.flush()
    assert not load.errors, load.errors[:3]
    assert consumed, "the consumer read nothing while replicas moved"
    status = cluster_status(nodes[0])
    assert "Brokers: 4 live, 0 not live" in status and "Reassigning: 0" in status, status
    # Fair shares: 18 replicas over 4 brokers (4 or 5 each), 6 leaders (1 or 2 each).
    deadline = time.time() + 60
    while True:
        parts = leaders_and_replicas(nodes, "moving", partitions)
        held = {b: sum(b in r for _, r in parts.values()) for b in (1, 2, 3, 4)}
        led = {b: sum(l == b for l, _ in parts.values()) for b in (1, 2, 3, 4)}
        fair = all(4 <= c <= 5 for c in held.values()) and all(1 <= c <= 2 for c in led.values())
        if fair or time.time() > deadline:
            break
        time.sleep(1)
    assert fair, (parts, held, led)
    check("rebalance onto a fourth broker", load,
          read_all(nodes, "moving", partitions=partitions, expect=len(load.acked)), seed)
    time.sleep(1)
    for p, (_, replicas) in parts.items():
        holders = [n for n in nodes if n.node_id in replicas]
        logs = [segment_bytes(n.data_dir, "moving", p) for n in holders]
        longest = max(logs, key=len)
        assert all(longest.startswith(log) for log in logs), f"partition {p} replicas differ"
        assert len(longest) > 0
    # Replicas that moved away were deleted from the brokers that gave them up.
    for n in nodes:
        for p, (_, replicas) in parts.items():
            if n.node_id not in replicas:
                assert not (n.data_dir / f"moving-{p}").exists(), f"node {n.node_id} kept moving-{p}"


def test_a_replica_moved_by_a_kafka_admin_client_catches_up_past_deleted_records(growing):
    """kafka-python's alter_partition_reassignments moves a partition whose first records were
    deleted (DeleteRecords) onto a new broker: the new replica's log starts where the leader's
    does, holds the same records from there, and serves them once it leads; the admin client
    sees the move in list_partition_reassignments until it completes, and a cancel of a
    partition that is not moving is refused."""
    from kafka import TopicPartition as KTP
    from kafka.admin import KafkaAdminClient
    nodes, join = growing
    create_topic(nodes, "trimmed", partitions=1, rf=3)
    load = Load(nodes, "trimmed", 5)
    load.produce(500)
    load.flush()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap(nodes), request_timeout_ms=30000)
    admin.delete_records({KTP("trimmed", 0): 200})
    join()
    admin.close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap(nodes), request_timeout_ms=30000)
    result = admin.alter_partition_reassignments({KTP("trimmed", 0): [4, 1, 2]})
    assert all(v is None for v in result.values()), result
    # A broker that is not registered is refused.
    bad = admin.alter_partition_reassignments({KTP("trimmed", 0): [9, 1, 2]})
    assert bad and all(v is not None for v in bad.values()), bad
    deadline = time.time() + 60
    while admin.list_partition_reassignments() and time.time() < deadline:
        time.sleep(0.5)
    assert not admin.list_partition_reassignments()
    refused = admin.alter_partition_reassignments({KTP("trimmed", 0): None})
    assert refused and all(v is not None for v in refused.values()), refused
    admin.close()
    deadline = time.time() + 60
    while time.time() < deadline:
        parts = replicas_of(nodes[0], "trimmed")
        if parts.get(0) == (4, [4, 1, 2]):
            break
        time.sleep(0.5)
    assert parts.get(0) == (4, [4, 1, 2]), parts
    load.produce(100)
    load.flush()
    got = read_all(nodes, "trimmed", partitions=1, expect=400)
    offsets = [o for _, o, _ in got]
    assert offsets == list(range(200, 600)), (offsets[:3], offsets[-3:], len(offsets))
    # A clean stop writes every batch to the segments (the shard journals may hold the latest).
    assert nodes[3].stop() is None and nodes[0].stop() is None
    moved = segment_bytes(nodes[3].data_dir, "trimmed", 0)
    kept = segment_bytes(nodes[0].data_dir, "trimmed", 0)
    assert moved and kept.endswith(moved), "the new replica's records differ from the leader's"
    assert not (nodes[2].data_dir / "trimmed-0").exists()
