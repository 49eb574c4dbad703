"""Scale-out: a broker outside `controller.quorum.voters` joins a running three-broker cluster
(127.0.0.4, its own `node.id`, `inter.broker.listen`), is listed by Metadata, takes replicas of new
topics, and survives kill -9; replicas of existing partitions move onto it through Raft membership
changes (AlterPartitionReassignments, `strom cluster rebalance`) while clients run.
"""

import os
import random
import re
import subprocess
import time

import pytest

from conftest import STROM_BIN
from test_cluster import (Load, Node, bootstrap, check, check_replicas_identical, cluster_status,
                          create_topic, read_all, start_cluster)


@pytest.fixture
def four(tmp_path):
    """Three voters and a fourth broker that joins them."""
    gen = start_cluster(tmp_path)
    nodes = next(gen)
    port = nodes[0].port
    fourth = Node(4, tmp_path / "node4", port, nodes[0].voters,
                  extra=["--set", f"inter.broker.listen=127.0.0.4:{port + 1}"])
    fourth.proxies = nodes[0].proxies
    fourth.start()
    try:
        yield nodes + [fourth]
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


def test_a_fourth_broker_joins_and_takes_replicas_of_new_topics(four):
    nodes = four
    fourth = nodes[3]
    for n in nodes:
        wait_brokers(n, [1, 2, 3, 4])
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
    check("fourth broker joins", load, read_all(nodes, "wide", partitions=4,
                                                expect=len(load.acked)), seed)
    time.sleep(1)
    check_replicas_identical(nodes, "wide", partitions=4)
