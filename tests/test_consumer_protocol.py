"""KIP-848, the consumer group protocol (`group.protocol=consumer`), with librdkafka: the broker
assigns partitions, members join and leave while records flow without the others stopping, every
record is consumed once per group with committed offsets, regex subscriptions pick up new topics,
the group's state survives a broker kill -9, and classic and consumer groups coexist."""

import subprocess
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from test_groups import lost_and_duplicated, wait_until

SETTINGS = ["--set", "offsets.topic.num.partitions=10",
            "--set", "group.consumer.heartbeat.interval.ms=500"]


@pytest.fixture
def kbroker(broker_factory):
    return broker_factory(extra_args=SETTINGS, name="kip848")


def create_topic(bootstrap, name, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, partitions, 1)])[name].result(30)


class Flow:
    """A producer thread writing `v-<n>` round-robin over the partitions until stopped."""

    def __init__(self, bootstrap, topic, partitions):
        self.p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 2})
        self.topic, self.partitions = topic, partitions
        self.sent = 0
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            self.p.produce(self.topic, value=f"v-{self.sent}".encode(),
                           partition=self.sent % self.partitions)
            self.sent += 1
            self.p.poll(0)
            time.sleep(0.001)

    def finish(self):
        self.stop = True
        self.t.join(10)
        assert self.p.flush(30) == 0
        return self.sent


class Member:
    """A consumer-protocol member on its own thread. Offsets are committed as it goes and,
    synchronously, for partitions being revoked, so a partition that moves is picked up exactly
    where this member stopped."""

    def __init__(self, bootstrap, group, topics, name, **conf):
        self.name = name
        self.assigned = set()
        self.history = []  # the assignment after each change
        self.records = []
        self.next = {}  # (topic, partition) -> next offset to commit
        self.stop = False
        self.errors = []
        self.c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                           "group.protocol": "consumer", "auto.offset.reset": "earliest",
                           "enable.auto.commit": False, "client.id": name, **conf})
        self.c.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _on_assign(self, consumer, partitions):
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        self.history.append(frozenset(self.assigned))

    def _on_revoke(self, consumer, partitions):
        self._commit([(p.topic, p.partition) for p in partitions])
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        self.history.append(frozenset(self.assigned))

    def _commit(self, keys):
        offsets = [TopicPartition(t, p, self.next[(t, p)]) for t, p in keys if (t, p) in self.next]
        if offsets:
            try:
                self.c.commit(offsets=offsets, asynchronous=False)
            except KafkaException as e:
                self.errors.append(str(e))

    def _run(self):
        last_commit = time.time()
        while not self.stop:
            m = self.c.poll(0.1)
            if m is not None and m.error() is None:
                self.records.append((m.topic(), m.partition(), m.offset(), m.value()))
                self.next[(m.topic(), m.partition())] = m.offset() + 1
            if time.time() - last_commit > 0.5:
                self._commit(sorted(self.assigned))
                last_commit = time.time()

    def close(self):
        self.stop = True
        self.t.join(10)
        self._commit(sorted(self.assigned))
        self.c.close()


def sizes(members):
    return sorted(len(m.assigned) for m in members)


def test_members_join_and_leave_while_records_flow_and_the_others_never_stop(kbroker):
    bs = kbroker.bootstrap
    create_topic(bs, "flow", 8)
    flow = Flow(bs, "flow", 8)
    members = [Member(bs, "live", ["flow"], f"m{i}") for i in range(4)]
    everyone = list(members)
    try:
        wait_until(lambda: sizes(members) == [2, 2, 2, 2], 60, "4 members with 2 partitions each")
        settled = {m.name: len(m.history) for m in members}
        # A fifth member joins: it takes partitions from others, one at a time.
        fifth = Member(bs, "live", ["flow"], "m4")
        everyone.append(fifth)
        members.append(fifth)
        wait_until(lambda: sizes(members) == [1, 1, 2, 2, 2], 60, "5 members sharing 8 partitions")
        # One of the first leaves: its partitions go to the others.
        before_leave = {m.name: len(m.history) for m in members}
        leaver = members.pop(0)
        leaver.close()
        wait_until(lambda: sizes(members) == [2, 2, 2, 2], 60, "4 members again")
        sent = flow.finish()
        wait_until(lambda: sum(len(m.records) for m in everyone) >= sent, 60,
                   f"all {sent} records consumed")
        time.sleep(1)
        values = [v for m in everyone for *_, v in m.records]
        lost, duplicated = lost_and_duplicated(values, sent)
        print(f"kip848 join/leave: sent {sent}, consumed {len(set(values))}, lost {lost}, "
              f"duplicated {duplicated}")
        assert lost == 0 and duplicated == 0
        # No stop-the-world: after the group first settled, a member that stayed never went
        # without partitions (a classic eager rebalance revokes everything from everyone).
        first = everyone[:4]
        assert any(before_leave[m.name] > settled[m.name] for m in first), \
            "the joining member got its partitions from nobody"
        for m in first:
            # The leaver's own final revocation (it is closing) is not a stop.
            end = before_leave[m.name] if m is leaver else len(m.history)
            seen = m.history[settled[m.name] - 1:end]
            assert min(len(a) for a in seen) >= 1, f"{m.name} stopped: {seen}"
        for m in everyone:
            assert not m.errors, f"{m.name}: {m.errors}"
    finally:
        flow.stop = True
        for m in members:
            m.close()
    # Committed offsets are where the group stopped: the end of every partition.
    probe = Consumer({"bootstrap.servers": bs, "group.id": "live"})
    try:
        committed = probe.committed([TopicPartition("flow", p) for p in range(8)], timeout=10)
        for tp in committed:
            _, high = probe.get_watermark_offsets(TopicPartition("flow", tp.partition), timeout=10)
            assert tp.offset == high, f"partition {tp.partition}: committed {tp.offset}, end {high}"
    finally:
        probe.close()


def test_a_regex_subscription_picks_up_a_topic_created_later(kbroker):
    bs = kbroker.bootstrap
    create_topic(bs, "rx-one", 2)
    p = Producer({"bootstrap.servers": bs})
    for i in range(100):
        p.produce("rx-one", value=f"one-{i}".encode())
    p.flush(10)
    m = Member(bs, "rx", ["^rx-.*"], "rx",
               **{"topic.metadata.refresh.interval.ms": 1000})
    try:
        wait_until(lambda: len(m.records) >= 100, 60, "rx-one's records")
        create_topic(bs, "rx-two", 3)
        create_topic(bs, "other", 1)
        for i in range(100):
            p.produce("rx-two", value=f"two-{i}".encode())
            p.produce("other", value=b"x")
        p.flush(10)
        wait_until(lambda: len(m.records) >= 200, 60, "rx-two's records")
        assert {t for t, *_ in m.records} == {"rx-one", "rx-two"}
        assert {(t, q) for t, q in m.assigned} == {("rx-one", 0), ("rx-one", 1), ("rx-two", 0),
                                                   ("rx-two", 1), ("rx-two", 2)}
    finally:
        m.close()


def describe(bs, group):
    admin = AdminClient({"bootstrap.servers": bs})
    return admin.describe_consumer_groups([group])[group].result(30)


def test_group_state_survives_broker_kill_9(kbroker):
    bs = kbroker.bootstrap
    create_topic(bs, "durable", 4)
    members = [Member(bs, "keep", ["durable"], f"k{i}") for i in range(2)]
    try:
        wait_until(lambda: sizes(members) == [2, 2], 60, "2 members with 2 partitions each")
        before = describe(bs, "keep")
        assert str(before.type).endswith("CONSUMER")
        kbroker.kill9()
        kbroker.start(port=int(bs.rsplit(":", 1)[1]))
        after = describe(bs, "keep")
        # The members, their epochs and assignments were replayed from __consumer_offsets.
        assert {m.member_id for m in after.members} == {m.member_id for m in before.members}
        for m in after.members:
            assert len(m.assignment.topic_partitions) == 2
        # And they carry on: records produced now reach them without a rejoin.
        p = Producer({"bootstrap.servers": bs})
        for i in range(200):
            p.produce("durable", value=f"d-{i}".encode())
        p.flush(10)
        wait_until(lambda: sum(len(m.records) for m in members) >= 200, 60, "records after restart")
        assert sizes(members) == [2, 2]
        # `strom group describe` shows the broker-assigned owner of every partition.
        from conftest import STROM_BIN
        out = subprocess.run([STROM_BIN, "group", "describe", "keep", "--bootstrap", bs],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("GROUP keep TYPE consumer"), lines[0]
        assert lines[0].endswith("MEMBERS 2"), lines[0]
        owners = {r.split()[5] for r in lines[2:]}
        assert owners == {m.member_id for m in after.members}, lines
    finally:
        for m in members:
            m.close()


def test_an_empty_classic_group_converts_and_keeps_its_offsets(kbroker):
    bs = kbroker.bootstrap
    create_topic(bs, "convert", 1)
    p = Producer({"bootstrap.servers": bs})
    for i in range(100):
        p.produce("convert", value=f"c-{i}".encode())
    p.flush(10)
    classic = Consumer({"bootstrap.servers": bs, "group.id": "mixed", "auto.offset.reset": "earliest",
                        "enable.auto.commit": False})
    classic.subscribe(["convert"])
    got = []
    deadline = time.time() + 30
    while len(got) < 40 and time.time() < deadline:
        m = classic.poll(0.5)
        if m is not None and m.error() is None:
            got.append(m)
    assert len(got) == 40
    classic.commit(message=got[-1], asynchronous=False)
    classic.close()
    # The empty classic group becomes a consumer-protocol group and resumes at its offset.
    m = Member(bs, "mixed", ["convert"], "new")
    try:
        wait_until(lambda: len(m.records) >= 60, 60, "the rest of the records")
        time.sleep(1)
        assert [v for *_, v in m.records] == [f"c-{i}".encode() for i in range(40, 100)]
        # While it has a consumer-protocol member, a classic member cannot join.
        intruder = Consumer({"bootstrap.servers": bs, "group.id": "mixed",
                             "auto.offset.reset": "earliest"})
        errors = []
        intruder.subscribe(["convert"])
        deadline = time.time() + 20
        while not errors and time.time() < deadline:
            msg = intruder.poll(0.5)
            if msg is not None and msg.error() is not None:
                errors.append(msg.error())
        intruder.close()
        assert errors and "INCONSISTENT_GROUP_PROTOCOL" in str(errors[0]), errors
    finally:
        m.close()
