"""Consumer groups with real clients: queue semantics within a group, publish-subscribe across
groups, failover of a killed member, committed offsets across a broker kill -9, cooperative-sticky
rebalancing with librdkafka, and kafka-python's group consumer."""

import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic

HERE = os.path.dirname(os.path.abspath(__file__))
GROUP_SETTINGS = ["--set", "group.initial.rebalance.delay.ms=500", "--set", "offsets.topic.num.partitions=10"]


@pytest.fixture
def gbroker(broker_factory):
    return broker_factory(extra_args=GROUP_SETTINGS, name="groups")


def create_topic(bootstrap, name, partitions):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        admin.close()


def produce(bootstrap, topic, values, partition=None):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    for i, v in enumerate(values):
        kwargs = {"value": v.encode(), "key": str(i).encode()}
        if partition is not None:
            kwargs["partition"] = partition
        p.produce(topic, **kwargs)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0


class Member:
    """A confluent-kafka group member polling on its own thread."""

    def __init__(self, bootstrap, group, topic, **conf):
        self.assigned = set()
        self.records = []
        self.stop = False
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                           "auto.offset.reset": "earliest", "session.timeout.ms": 6000,
                           "heartbeat.interval.ms": 500, **conf})
        self.c.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _on_assign(self, consumer, partitions):
        # confluent-kafka applies the (incremental) assignment itself after this callback.
        self.assigned |= {p.partition for p in partitions}

    def _on_revoke(self, consumer, partitions):
        self.assigned -= {p.partition for p in partitions}

    def _run(self):
        while not self.stop:
            m = self.c.poll(0.1)
            if m is not None and m.error() is None:
                self.records.append((m.partition(), m.offset(), m.value()))

    def close(self):
        self.stop = True
        self.t.join(10)
        self.c.close()


def wait_until(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def lost_and_duplicated(values, total):
    """Of `total` records sent, how many of `values` (every record read, in any order) are
    missing, and how many reads were of a record read already."""
    distinct = len(set(values))
    return total - distinct, len(values) - distinct


def test_queue_four_members_one_partition_each_every_record_once(gbroker):
    create_topic(gbroker.bootstrap, "queue", 4)
    members = [Member(gbroker.bootstrap, "workers", "queue") for _ in range(4)]
    try:
        wait_until(lambda: sorted(len(m.assigned) for m in members) == [1, 1, 1, 1], 30,
                   "each of 4 members to own one partition")
        assert set().union(*(m.assigned for m in members)) == {0, 1, 2, 3}
        produce(gbroker.bootstrap, "queue", [f"job-{i}" for i in range(20_000)])
        wait_until(lambda: sum(len(m.records) for m in members) >= 20_000, 60, "20,000 records")
        time.sleep(0.5)
        values = [v for m in members for _, _, v in m.records]
        assert len(values) == 20_000, "a record was delivered twice within the group"
        assert set(values) == {f"job-{i}".encode() for i in range(20_000)}
        for m in members:
            assert {p for p, _, _ in m.records} == m.assigned
    finally:
        for m in members:
            m.close()


def test_two_groups_each_receive_every_record(gbroker):
    create_topic(gbroker.bootstrap, "news", 2)
    produce(gbroker.bootstrap, "news", [f"n-{i}" for i in range(2000)])
    a = Member(gbroker.bootstrap, "group-a", "news")
    b = Member(gbroker.bootstrap, "group-b", "news")
    try:
        wait_until(lambda: len(a.records) >= 2000 and len(b.records) >= 2000, 60, "both groups")
        expected = {f"n-{i}".encode() for i in range(2000)}
        assert {v for _, _, v in a.records} == expected
        assert {v for _, _, v in b.records} == expected
    finally:
        a.close()
        b.close()


def spawn_member(bootstrap, group, topic, strategy="range"):
    return subprocess.Popen([sys.executable, os.path.join(HERE, "group_member.py"), bootstrap, group, topic, strategy],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


class Reader:
    def __init__(self, proc):
        self.proc = proc
        self.lines = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def assigned(self):
        a = [l for l in self.lines if l.startswith("ASSIGNED")]
        return a[-1].split(" ", 1)[1] if a and " " in a[-1] else ("" if a else None)

    def records(self):
        return [tuple(l.split(" ")) for l in self.lines if not l.startswith("ASSIGNED")]


def test_killed_member_partitions_move_to_survivor_without_skipping(gbroker):
    create_topic(gbroker.bootstrap, "failover", 2)
    first = Reader(spawn_member(gbroker.bootstrap, "fo", "failover"))
    second = Reader(spawn_member(gbroker.bootstrap, "fo", "failover"))
    try:
        wait_until(lambda: first.assigned() not in (None, "") and second.assigned() not in (None, "")
                   and first.assigned() != second.assigned(), 30, "two members with one partition each")
        produce(gbroker.bootstrap, "failover", [f"a-{i}" for i in range(200)], partition=0)
        produce(gbroker.bootstrap, "failover", [f"b-{i}" for i in range(200)], partition=1)
        wait_until(lambda: len(first.records()) + len(second.records()) >= 400, 30, "first 400 records")
        victim, survivor = (first, second)
        killed_at = time.time()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        wait_until(lambda: survivor.assigned() == "0,1", 20, "survivor to own both partitions")
        moved_after = time.time() - killed_at
        print(f"partitions moved {moved_after:.1f}s after SIGKILL (session.timeout.ms=6000)")
        produce(gbroker.bootstrap, "failover", [f"c-{i}" for i in range(100)], partition=0)
        produce(gbroker.bootstrap, "failover", [f"d-{i}" for i in range(100)], partition=1)
        expected = {f"{x}-{i}" for x in "ab" for i in range(200)} | {f"{x}-{i}" for x in "cd" for i in range(100)}
        seen = lambda: {v for _, _, v in first.records()} | {v for _, _, v in second.records()}
        wait_until(lambda: seen() >= expected, 30, "every record consumed by someone")
    finally:
        for r in (first, second):
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()


def test_committed_offsets_and_group_survive_broker_kill_9(gbroker):
    create_topic(gbroker.bootstrap, "resume", 1)
    produce(gbroker.bootstrap, "resume", [f"r-{i}" for i in range(100)])
    c = Consumer({"bootstrap.servers": gbroker.bootstrap, "group.id": "resumers",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe(["resume"])
    got = []
    deadline = time.time() + 30
    while len(got) < 60 and time.time() < deadline:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            got.append(m)
    c.commit(message=got[59], asynchronous=False)
    c.close()

    gbroker.kill9()
    gbroker.start()
    c = Consumer({"bootstrap.servers": gbroker.bootstrap, "group.id": "resumers",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    [tp] = c.committed([TopicPartition("resume", 0)], timeout=10)
    assert tp.offset == 60
    c.subscribe(["resume"])
    first = None
    deadline = time.time() + 30
    while first is None and time.time() < deadline:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            first = m
    c.close()
    assert first is not None and first.offset() == 60 and first.value() == b"r-60"


def test_cooperative_sticky_rebalances_incrementally(gbroker):
    create_topic(gbroker.bootstrap, "coop", 4)
    conf = {"partition.assignment.strategy": "cooperative-sticky"}
    a = Member(gbroker.bootstrap, "coop-group", "coop", **conf)
    try:
        wait_until(lambda: a.assigned == {0, 1, 2, 3}, 30, "first member to own all partitions")
        b = Member(gbroker.bootstrap, "coop-group", "coop", **conf)
        try:
            wait_until(lambda: len(a.assigned) == 2 and len(b.assigned) == 2, 30, "two and two")
            assert a.assigned | b.assigned == {0, 1, 2, 3}
            produce(gbroker.bootstrap, "coop", [f"x-{i}" for i in range(400)])
            wait_until(lambda: len(a.records) + len(b.records) >= 400, 30, "400 records")
        finally:
            b.close()
        wait_until(lambda: a.assigned == {0, 1, 2, 3}, 30, "survivor to take every partition back")
    finally:
        a.close()


def test_kafka_python_group_consumer_reads_everything_and_commits(gbroker):
    create_topic(gbroker.bootstrap, "kp", 3)
    produce(gbroker.bootstrap, "kp", [f"kp-{i}" for i in range(900)])
    c = KafkaConsumer("kp", bootstrap_servers=gbroker.bootstrap, group_id="kp-group",
                      auto_offset_reset="earliest", enable_auto_commit=False, consumer_timeout_ms=10000)
    values = set()
    for m in c:
        values.add(m.value)
        if len(values) == 900:
            break
    c.commit()
    committed = {p: c.committed(TopicPartitionKP("kp", p)) for p in range(3)}
    c.close()
    assert values == {f"kp-{i}".encode() for i in range(900)}
    assert sum(committed.values()) == 900


from kafka import TopicPartition as TopicPartitionKP  # noqa: E402


def test_strom_group_describe_shows_lag_against_the_produced_count(gbroker):
    from conftest import STROM_BIN
    create_topic(gbroker.bootstrap, "lagged", 2)
    produce(gbroker.bootstrap, "lagged", [f"l-{i}" for i in range(400)])
    c = Consumer({"bootstrap.servers": gbroker.bootstrap, "group.id": "laggards",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe(["lagged"])
    consumed = 0
    deadline = time.time() + 30
    last = {}
    while (consumed < 150 or len(last) < 2) and time.time() < deadline:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            consumed += 1
            last[m.partition()] = m
    for m in last.values():
        c.commit(message=m, asynchronous=False)
    committed_total = sum(m.offset() + 1 for m in last.values())

    out = subprocess.run([STROM_BIN, "group", "describe", "laggards", "--bootstrap", gbroker.bootstrap],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("GROUP laggards TYPE classic STATE Stable PROTOCOL range MEMBERS 1"), lines[0]
    rows = [l.split() for l in lines[2:]]
    assert sorted((r[0], int(r[1])) for r in rows) == [("lagged", 0), ("lagged", 1)]
    assert sum(int(r[3]) for r in rows) == 400
    assert sum(int(r[2]) for r in rows) == committed_total
    assert sum(int(r[4]) for r in rows) == 400 - committed_total
    assert all(r[5].startswith("rdkafka-") for r in rows), "every partition shows its owner"

    listed = subprocess.run([STROM_BIN, "group", "list", "--bootstrap", gbroker.bootstrap],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    assert any(l.split()[:4] == ["laggards", "classic", "Stable", "consumer"]
               for l in listed.stdout.splitlines())
    c.close()


def test_static_member_restart_keeps_its_assignment_without_rebalance(gbroker):
    create_topic(gbroker.bootstrap, "static", 2)
    a = Member(gbroker.bootstrap, "statics", "static", **{"group.instance.id": "a", "session.timeout.ms": 20000})
    b = Member(gbroker.bootstrap, "statics", "static", **{"group.instance.id": "b", "session.timeout.ms": 20000})
    try:
        wait_until(lambda: len(a.assigned) == 1 and len(b.assigned) == 1, 30, "one partition each")
        a_partitions, b_partitions = set(a.assigned), set(b.assigned)
        b_assign_events = list(b.assigned)
        a.close()  # a static member does not leave the group on close
        a2 = Member(gbroker.bootstrap, "statics", "static", **{"group.instance.id": "a", "session.timeout.ms": 20000})
        try:
            wait_until(lambda: a2.assigned == a_partitions, 20, "restarted static member to get its partition back")
            time.sleep(1.5)
            assert b.assigned == b_partitions == set(b_assign_events), "the other member was rebalanced"
        finally:
            a2.close()
    finally:
        b.close()


def test_several_groups_rebalancing_at_once_all_settle(gbroker):
    create_topic(gbroker.bootstrap, "multi", 4)
    members = {g: [Member(gbroker.bootstrap, g, "multi") for _ in range(2)] for g in ("m1", "m2", "m3")}
    try:
        for g, ms in members.items():
            wait_until(lambda: sorted(len(m.assigned) for m in ms) == [2, 2], 30, f"group {g} to settle")
            assert ms[0].assigned | ms[1].assigned == {0, 1, 2, 3}
        produce(gbroker.bootstrap, "multi", [f"m-{i}" for i in range(800)])
        for g, ms in members.items():
            wait_until(lambda: sum(len(m.records) for m in ms) >= 800, 30, f"group {g} to read all")
    finally:
        for ms in members.values():
            for m in ms:
                m.close()


def test_kafka_python_cooperative_sticky_members_share_and_consume(gbroker):
    from kafka.coordinator.assignors.cooperative_sticky import CooperativeStickyAssignor
    create_topic(gbroker.bootstrap, "kp-coop", 4)
    produce(gbroker.bootstrap, "kp-coop", [f"kc-{i}" for i in range(800)])
    results = [dict(values=set(), assigned=set()) for _ in range(2)]
    stop = threading.Event()

    def run(slot):
        c = KafkaConsumer("kp-coop", bootstrap_servers=gbroker.bootstrap, group_id="kp-coop-group",
                          auto_offset_reset="earliest", partition_assignment_strategy=[CooperativeStickyAssignor],
                          session_timeout_ms=10000, heartbeat_interval_ms=500)
        try:
            while not stop.is_set():
                for tp, msgs in c.poll(timeout_ms=200).items():
                    results[slot]["values"].update(m.value for m in msgs)
                results[slot]["assigned"] = {tp.partition for tp in c.assignment()}
        finally:
            c.close()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(1)
    try:
        wait_until(lambda: sorted(len(r["assigned"]) for r in results) == [2, 2], 40, "2 + 2 partitions")
        assert results[0]["assigned"] | results[1]["assigned"] == {0, 1, 2, 3}
        wait_until(lambda: len(results[0]["values"] | results[1]["values"]) == 800, 30, "all 800 records")
    finally:
        stop.set()
        for t in threads:
            t.join(15)


def test_committed_offsets_of_an_empty_group_expire_after_retention(broker_factory):
    b = broker_factory(extra_args=GROUP_SETTINGS + ["--set", "offsets.retention.minutes=1",
                                                    "--set", "offsets.retention.check.interval.ms=1000"],
                       name="expiry")
    create_topic(b.bootstrap, "expiring", 1)
    c = Consumer({"bootstrap.servers": b.bootstrap, "group.id": "short-lived", "enable.auto.commit": False})
    committed_at = time.time()
    c.commit(offsets=[TopicPartition("expiring", 0, 5)], asynchronous=False)
    [tp] = c.committed([TopicPartition("expiring", 0)], timeout=10)
    assert tp.offset == 5
    deadline = time.time() + 120
    while time.time() < deadline:
        [tp] = c.committed([TopicPartition("expiring", 0)], timeout=10)
        if tp.offset < 0:
            break
        time.sleep(1)
    expired_after = time.time() - committed_at
    c.close()
    assert tp.offset < 0, "the committed offset never expired"
    assert expired_after >= 59, f"expired after {expired_after:.0f}s, before offsets.retention.minutes=1"
