"""KIP-932 share groups on a three-broker cluster: librdkafka's ShareConsumer sends ShareFetch and
ShareAcknowledge to the leader of each partition it reads; the brokers that do not coordinate the
group pass them on to the coordinator, which reads the partitions it does not lead from their
leaders. Every record is consumed and accepted once across the group, whichever broker leads
its partition. The group's configs, which admin clients send to any broker, reach its
coordinator too."""

import re
import threading
import time
import urllib.request

from confluent_kafka import AcknowledgeType, KafkaException, Producer, ShareConsumer
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                   ResourceType)

from test_cluster import (PARTITIONS, bootstrap, cluster, create_topic,  # noqa: F401 (fixture)
                          wait_for_leaders)
from test_groups import lost_and_duplicated, wait_until

RECORDS = 6000
EARLY = 600


def set_earliest(bs, group):
    """share.auto.offset.reset=earliest for `group`, through the broker at `bs`. Retried: on a
    new cluster the first group request creates `__consumer_offsets`, and the answer is
    COORDINATOR_NOT_AVAILABLE until its partitions have leaders."""
    admin = AdminClient({"bootstrap.servers": bs})
    entry = ConfigEntry("share.auto.offset.reset", "earliest",
                        incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=[entry])
    deadline = time.time() + 30
    while True:
        try:
            for f in admin.incremental_alter_configs([resource]).values():
                f.result(30)
            return admin
        except KafkaException as e:
            if time.time() > deadline or "COORDINATOR_NOT_AVAILABLE" not in str(e):
                raise
            time.sleep(0.5)


def peer_connections_opened(nodes):
    """Connections each broker opened to other brokers' client listeners so far (`/metrics`)."""
    total = {}
    for n in nodes:
        text = urllib.request.urlopen(f"http://{n.admin}/metrics", timeout=10).read().decode()
        counts = re.findall(r'strom_peer_connections_opened_total\{shard="\d+"\} (\d+)', text)
        assert counts, "strom_peer_connections_opened_total missing from /metrics"
        total[n.node_id] = sum(int(v) for v in counts)
    return total


def share_requests(nodes):
    """ShareFetch and ShareAcknowledge requests the brokers handled, passed-on ones included."""
    total = 0
    for n in nodes:
        text = urllib.request.urlopen(f"http://{n.admin}/metrics", timeout=10).read().decode()
        total += sum(int(v) for v in re.findall(
            r'strom_requests_total\{api="Share(?:Fetch|Acknowledge)",shard="\d+"\} (\d+)', text))
    return total


def produce(bs, numbers):
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 5})
    for i in numbers:
        p.produce("cq", value=f"r-{i}".encode(), partition=i % PARTITIONS)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0


def test_share_consumers_read_every_partition_whichever_broker_leads_it(cluster):  # noqa: F811
    nodes = cluster
    leaders = create_topic(nodes, "cq", PARTITIONS, rf=3)
    print(f"leaders {leaders}")
    assert len(set(leaders.values())) >= 2, f"partitions all led by one broker: {leaders}"
    bs = bootstrap(nodes)
    # Each broker in turn takes the group's config change: two of them pass it on.
    for n in nodes:
        admin = set_earliest(n.bootstrap, "cluster-workers")
        described = admin.describe_configs(
            [ConfigResource(ResourceType.GROUP, "cluster-workers")])
        for f in described.values():
            assert f.result(30)["share.auto.offset.reset"].value == "earliest"
    # Records written before any member: the share-partitions start at the log start.
    produce(bs, range(EARLY))
    seen = {i: [] for i in range(3)}
    polled = {i: 0 for i in range(3)}
    stop = threading.Event()
    errors = []

    def work(i):
        c = ShareConsumer({"bootstrap.servers": bs, "group.id": "cluster-workers"})
        c.subscribe(["cq"])
        while not stop.is_set():
            # Implicit mode: a poll accepts what the previous poll returned.
            for m in c.poll(0.5):
                if m.error() is None:
                    seen[i].append((m.partition(), m.value()))
                else:
                    errors.append(str(m.error()))
            polled[i] += 1
        c.close()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(n >= 2 for n in polled.values()), 90, "3 consumers polling")
        opened_before, share_before = peer_connections_opened(nodes), share_requests(nodes)
        produce(bs, range(EARLY, RECORDS))
        wait_until(lambda: sum(len(v) for v in seen.values()) >= RECORDS, 120,
                   f"{RECORDS} records")
        time.sleep(2)
        opened_after, share_after = peer_connections_opened(nodes), share_requests(nodes)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    # Brokers pass share requests on, and the coordinator reads from the other leaders, over
    # connections kept open: not one new connection per request.
    opened = {k: opened_after[k] - opened_before[k] for k in opened_after}
    print(f"while consuming: {share_after - share_before} share requests handled, "
          f"connections opened to other brokers per broker {opened} "
          f"(since the start: {opened_after})")
    assert share_after - share_before > 20
    assert sum(opened.values()) <= 30, opened
    values = [v for vs in seen.values() for _, v in vs]
    lost, duplicated = lost_and_duplicated(values, RECORDS)
    partitions = {p for vs in seen.values() for p, _ in vs}
    print(f"cluster share 3x{PARTITIONS}: acknowledged {len(set(values))}, read back "
          f"{len(values)}, lost {lost}, duplicated {duplicated}, "
          f"per consumer {[len(v) for v in seen.values()]}, errors {errors[:3]}")
    assert lost == 0 and duplicated == 0
    assert partitions == set(range(PARTITIONS))
    # Everything was accepted: a new member of the group gets nothing.
    late = ShareConsumer({"bootstrap.servers": bs, "group.id": "cluster-workers"})
    late.subscribe(["cq"])
    extra = []
    deadline = time.time() + 6
    while time.time() < deadline:
        extra.extend(m for m in late.poll(0.5) if m.error() is None)
    late.close()
    assert extra == []


def test_records_acknowledged_as_a_consumer_closes_are_not_delivered_again(cluster):  # noqa: F811
    """A member that acknowledges its last records and closes sends those acknowledgements in
    its final ShareAcknowledge to each leader (passed on to the coordinator), while its leave
    heartbeat goes straight to the coordinator and usually gets there first. The records must
    count as accepted, not come back to the next member. (librdkafka sends explicit
    acknowledgements at close; implicit ones only ride on the next poll.)"""
    nodes = cluster
    leaders = create_topic(nodes, "closing", PARTITIONS, rf=3)
    assert len(set(leaders.values())) >= 2, f"partitions all led by one broker: {leaders}"
    bs = bootstrap(nodes)
    set_earliest(bs, "closers")
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 5})
    total = 1200
    for i in range(total):
        p.produce("closing", value=f"c-{i}".encode(), partition=i % PARTITIONS)
    assert p.flush(60) == 0
    got = []
    rounds = 0
    # Each member takes one poll's worth and closes, which accepts it.
    while len({v for v, _ in got}) < total and rounds < 60:
        rounds += 1
        c = ShareConsumer({"bootstrap.servers": bs, "group.id": "closers",
                           "share.acknowledgement.mode": "explicit"})
        c.subscribe(["closing"])
        batch = []
        deadline = time.time() + 10
        while not batch and time.time() < deadline:
            batch = [m for m in c.poll(0.5) if m.error() is None]
        got.extend((m.value(), m.delivery_count()) for m in batch)
        for m in batch:
            c.acknowledge(m, AcknowledgeType.ACCEPT)
        c.close()
    values = [v for v, _ in got]
    again = [v for v, n in got if n > 1]
    lost, duplicated = lost_and_duplicated(values, total)
    print(f"closing members: acknowledged {len(set(values))}, read back {len(values)}, lost {lost}, "
          f"duplicated {duplicated}, members {rounds}, redelivered {len(again)}")
    assert lost == 0 and duplicated == 0 and again == []


def offsets_partition(group, partitions=50):
    """The `__consumer_offsets` partition of `group`, as Kafka computes it."""
    h = 0
    for ch in group:
        h = (h * 31 + ord(ch)) & 0xFFFFFFFF
    return (h & 0x7FFFFFFF) % partitions


def test_a_share_group_survives_its_coordinator_killed(cluster):  # noqa: F811
    """kill -9 of the broker coordinating a share group while two members consume: the group's
    state (in its replicated `__consumer_offsets` partition) moves with that partition's
    leadership, the members go on through the new coordinator, and nothing is lost. Records
    accepted before the kill may come again only if their acknowledgement was in flight."""
    nodes = cluster
    create_topic(nodes, "failover-q", PARTITIONS, rf=3)
    bs = bootstrap(nodes)
    set_earliest(bs, "failover-workers")
    total = 4000
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 5})
    for i in range(total):
        p.produce("failover-q", value=f"f-{i}".encode(), partition=i % PARTITIONS)
    assert p.flush(60) == 0
    leaders = wait_for_leaders(nodes, "__consumer_offsets", 50)
    coordinator = next(n for n in nodes
                       if n.node_id == leaders[offsets_partition("failover-workers")])
    seen = {i: [] for i in range(2)}
    stop = threading.Event()

    def work(i):
        c = ShareConsumer({"bootstrap.servers": bs, "group.id": "failover-workers",
                           "share.acknowledgement.mode": "explicit"})
        c.subscribe(["failover-q"])
        while not stop.is_set():
            batch = [m for m in c.poll(0.5) if m.error() is None]
            seen[i].extend(m.value() for m in batch)
            for m in batch:
                c.acknowledge(m, AcknowledgeType.ACCEPT)
            try:
                c.commit_sync()
            except KafkaException:
                pass  # through the failover: the records come back after their lock
            time.sleep(0.05)
        c.close()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: sum(len(v) for v in seen.values()) >= total // 4, 90, "a quarter read")
        coordinator.kill9()
        print(f"killed the coordinator, node {coordinator.node_id}")
        wait_until(lambda: len({v for vs in seen.values() for v in vs}) >= total, 180,
                   f"all {total} records")
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    values = [v for vs in seen.values() for v in vs]
    lost, duplicated = lost_and_duplicated(values, total)
    print(f"share coordinator kill -9: acknowledged {len(set(values))}, read back {len(values)}, "
          f"lost {lost}, duplicated {duplicated}")
    assert lost == 0
    # At most what was in flight at the kill: each member's last poll (500 records at most).
    assert duplicated <= 2 * 500, duplicated
