"""KIP-932 share groups with librdkafka's ShareConsumer (confluent-kafka): queue semantics on one
partition across four consumers, RELEASE and lock expiry redelivering with a delivery count,
REJECT and the delivery limit archiving, and acknowledgements surviving a broker kill -9."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from confluent_kafka import AcknowledgeType, Producer, ShareConsumer
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                   NewTopic, ResourceType)

from test_groups import lost_and_duplicated, wait_until

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ["--set", "offsets.topic.num.partitions=10",
            "--set", "group.share.heartbeat.interval.ms=500",
            "--set", "group.share.delivery.count.limit=3"]


@pytest.fixture
def sbroker(broker_factory):
    return broker_factory(extra_args=SETTINGS, name="share")


def setup(bs, topic, group, count, lock_ms=None):
    """A one-partition topic with `count` records `r-<i>`, and a share group reading it from the
    beginning (`share.auto.offset.reset=earliest`, as an admin sets it)."""
    admin = AdminClient({"bootstrap.servers": bs})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)
    configs = [ConfigEntry("share.auto.offset.reset", "earliest",
                           incremental_operation=AlterConfigOpType.SET)]
    if lock_ms is not None:
        configs.append(ConfigEntry("share.record.lock.duration.ms", str(lock_ms),
                                   incremental_operation=AlterConfigOpType.SET))
    resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=configs)
    for f in admin.incremental_alter_configs([resource]).values():
        f.result(30)
    produce(bs, topic, range(count))


def produce(bs, topic, numbers):
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 5})
    for i in numbers:
        p.produce(topic, value=f"r-{i}".encode())
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0


def consumer(bs, group, explicit=False):
    conf = {"bootstrap.servers": bs, "group.id": group}
    if explicit:
        conf["share.acknowledgement.mode"] = "explicit"
    return ShareConsumer(conf)


def poll(c, timeout=1.0):
    return [m for m in c.poll(timeout) if m.error() is None]


def test_four_share_consumers_on_one_partition_each_record_once(sbroker):
    bs = sbroker.bootstrap
    setup(bs, "queue", "workers", 0)
    seen = {i: [] for i in range(4)}
    polled = {i: 0 for i in range(4)}
    stop = threading.Event()

    def work(i):
        c = consumer(bs, "workers")
        c.subscribe(["queue"])
        while not stop.is_set():
            # Implicit mode: a poll accepts what the previous poll returned.
            seen[i].extend(m.value() for m in poll(c, 0.5))
            polled[i] += 1
        c.close()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    try:
        # Workers waiting on an empty queue, then the work arrives.
        wait_until(lambda: all(n >= 2 for n in polled.values()), 60, "4 consumers polling")
        produce(bs, "queue", range(20_000))
        try:
            wait_until(lambda: sum(len(v) for v in seen.values()) >= 20_000, 120, "20,000 records")
        except AssertionError:
            got = {v for vs in seen.values() for v in vs}
            missing = sorted(int(v[2:]) for v in {f"r-{i}".encode() for i in range(20_000)} - got)
            print(f"share 4x1 timed out: per consumer {[len(v) for v in seen.values()]}, "
                  f"polls {polled}, missing {len(missing)}: {missing[:20]}")
            raise
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    values = [v for vs in seen.values() for v in vs]
    lost, duplicated = lost_and_duplicated(values, 20_000)
    print(f"share 4x1: acknowledged {len(set(values))}, lost {lost}, duplicated {duplicated}, "
          f"per consumer {[len(v) for v in seen.values()]}")
    assert lost == 0 and duplicated == 0
    assert all(len(v) > 0 for v in seen.values()), "a consumer got no work"
    # Everything was accepted: a new consumer of the group gets nothing.
    late = consumer(bs, "workers")
    late.subscribe(["queue"])
    deadline = time.time() + 5
    extra = []
    while time.time() < deadline:
        extra.extend(poll(late, 0.5))
    late.close()
    assert extra == []


def test_a_released_record_goes_to_another_consumer_with_delivery_count_2(sbroker):
    bs = sbroker.bootstrap
    setup(bs, "rel", "rel", 10)
    a = consumer(bs, "rel", explicit=True)
    a.subscribe(["rel"])
    got = []
    wait_until(lambda: got.extend(poll(a)) or got, 30, "a's records")
    released = got[0]
    a.acknowledge(released, AcknowledgeType.RELEASE)
    for m in got[1:]:
        a.acknowledge(m, AcknowledgeType.ACCEPT)
    a.commit_sync()
    b = consumer(bs, "rel", explicit=True)
    b.subscribe(["rel"])
    later = []
    try:
        wait_until(lambda: later.extend(poll(b)) or later, 30, "the released record")
        assert [(m.offset(), m.delivery_count()) for m in later] == [(released.offset(), 2)]
        for m in later:
            b.acknowledge(m, AcknowledgeType.ACCEPT)
        b.commit_sync()
    finally:
        b.close()
        a.close()


def test_records_of_a_killed_consumer_come_back_after_the_lock_with_delivery_count_2(sbroker):
    bs = sbroker.bootstrap
    setup(bs, "held", "held", 50, lock_ms=2000)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "share_member.py"), bs, "held", "held"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().split()
    assert line and line[0] == "HOLDING", line
    held = sorted(int(o) for o in line[1:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    c = consumer(bs, "held", explicit=True)
    c.subscribe(["held"])
    again = {}
    try:
        def collect():
            for m in poll(c):
                again[m.offset()] = m.delivery_count()
                c.acknowledge(m, AcknowledgeType.ACCEPT)
            return set(held) <= set(again)
        wait_until(collect, 60, "the killed consumer's records")
        print(f"share kill: held {len(held)}, redelivered {len(set(held) & set(again))}, "
              f"lost {len(set(held) - set(again))}")
        assert all(again[o] == 2 for o in held), again
        c.commit_sync()
    finally:
        c.close()


def test_rejected_and_too_often_released_records_are_archived(sbroker):
    bs = sbroker.bootstrap
    setup(bs, "arch", "arch", 5)
    c = consumer(bs, "arch", explicit=True)
    c.subscribe(["arch"])
    deliveries = {}
    try:
        # Offset 0 is rejected once; offset 1 is released every time (limit 3); the rest accepted.
        def round_():
            for m in poll(c):
                deliveries.setdefault(m.offset(), []).append(m.delivery_count())
                kind = {0: AcknowledgeType.REJECT, 1: AcknowledgeType.RELEASE}.get(
                    m.offset(), AcknowledgeType.ACCEPT)
                c.acknowledge(m, kind)
            c.commit_sync()
            return len(deliveries.get(1, [])) >= 3
        wait_until(round_, 60, "offset 1 delivered three times")
        produce(bs, "arch", range(5, 10))
        wait_until(lambda: round_() and 9 in deliveries, 60, "the records after")
        time.sleep(1)
        round_()
        assert deliveries[0] == [1], deliveries
        assert deliveries[1] == [1, 2, 3], deliveries
        assert all(deliveries[o] == [1] for o in range(2, 10)), deliveries
    finally:
        c.close()


def test_acknowledgements_survive_broker_kill_9(sbroker):
    bs = sbroker.bootstrap
    setup(bs, "dur", "dur", 1000)
    a = consumer(bs, "dur", explicit=True)
    a.subscribe(["dur"])
    accepted = set()
    released = set()
    while len(accepted) + len(released) < 1000 and len(accepted) < 500:
        for m in poll(a):
            if m.offset() < 500:
                a.acknowledge(m, AcknowledgeType.ACCEPT)
                accepted.add(m.offset())
            else:
                a.acknowledge(m, AcknowledgeType.RELEASE)
                released.add(m.offset())
        a.commit_sync()
    assert accepted == set(range(500))
    sbroker.kill9()
    sbroker.start(port=int(bs.rsplit(":", 1)[1]))
    a.close()
    b = consumer(bs, "dur", explicit=True)
    b.subscribe(["dur"])
    got = []
    try:
        def collect():
            for m in poll(b):
                got.append(m.offset())
                b.acknowledge(m, AcknowledgeType.ACCEPT)
            return len(set(got)) >= 500
        wait_until(collect, 60, "the unaccepted half")
        time.sleep(1)
        collect()
        b.commit_sync()
    finally:
        b.close()
    redelivered = sorted(set(got) & accepted)
    lost = sorted(set(range(500, 1000)) - set(got))
    print(f"share kill -9: accepted {len(accepted)}, read back {len(set(got))}, "
          f"redelivered {len(redelivered)}, lost {len(lost)}")
    assert redelivered == [] and lost == []


def test_strom_group_shows_a_share_group_with_its_start_offset_and_lag(sbroker):
    from conftest import STROM_BIN
    bs = sbroker.bootstrap
    setup(bs, "shown", "shown", 100)
    c = consumer(bs, "shown", explicit=True)
    c.subscribe(["shown"])
    accepted = []
    try:
        # Accept exactly the first 30 records; release the rest.
        while len(accepted) < 30:
            for m in poll(c):
                kind = AcknowledgeType.ACCEPT if m.offset() < 30 else AcknowledgeType.RELEASE
                if m.offset() < 30:
                    accepted.append(m.offset())
                c.acknowledge(m, kind)
            c.commit_sync()
        out = subprocess.run([STROM_BIN, "group", "describe", "shown", "--bootstrap", bs],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("GROUP shown TYPE share STATE Stable"), lines[0]
        assert lines[0].endswith("MEMBERS 1"), lines[0]
        assert "START-OFFSET" in lines[1]
        row = lines[2].split()
        assert row[:5] == ["shown", "0", "30", "100", "70"], row
        listed = subprocess.run([STROM_BIN, "group", "list", "--bootstrap", bs],
                                capture_output=True, text=True, timeout=30)
        assert any(l.split()[:3] == ["shown", "share", "Stable"] for l in listed.stdout.splitlines())
    finally:
        c.close()


def strom(*args):
    from conftest import STROM_BIN
    return subprocess.run([STROM_BIN, *args], capture_output=True, text=True, timeout=30)


def start_row(bs, group):
    """`strom group describe`'s first partition row (topic, partition, start, end, lag) and its
    header line."""
    out = strom("group", "describe", group, "--bootstrap", bs)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return lines[0], [l.split()[:5] for l in lines[2:]]


def read_all(bs, group, topic, want):
    """Offsets and delivery counts a fresh explicit consumer gets (accepting each) until it has
    `want` records and nothing more arrives for a second; then it leaves the group."""
    c = consumer(bs, group, explicit=True)
    c.subscribe([topic])
    got = []
    try:
        def collect():
            for m in poll(c, 0.5):
                got.append((m.offset(), m.delivery_count()))
                c.acknowledge(m, AcknowledgeType.ACCEPT)
            c.commit_sync()
            return len(got) >= want
        wait_until(collect, 60, f"{want} records of {topic}")
        time.sleep(1)
        collect()
    finally:
        c.close()
    wait_until(lambda: start_row(bs, group)[0].endswith("MEMBERS 0"), 30, "the group to empty")
    return got


def test_share_group_offsets_reset_and_delete_with_strom_group(sbroker):
    """AlterShareGroupOffsets and DeleteShareGroupOffsets through `strom group reset-offsets` and
    `delete-offsets` (Kafka's kafka-share-groups.sh --reset-offsets / --delete-offsets)."""
    bs = sbroker.bootstrap
    setup(bs, "moved", "mover", 100)
    a = consumer(bs, "mover", explicit=True)
    a.subscribe(["moved"])
    accepted = set()
    try:
        while len(accepted) < 30:
            for m in poll(a):
                if m.offset() < 30:
                    accepted.add(m.offset())
                    a.acknowledge(m, AcknowledgeType.ACCEPT)
                else:
                    a.acknowledge(m, AcknowledgeType.RELEASE)
            a.commit_sync()
        # A member is reading: offsets stay where they are.
        busy = strom("group", "reset-offsets", "mover", "--topic", "moved", "--to-offset", "70",
                     "--execute", "--bootstrap", bs)
        assert busy.returncode != 0 and "NON_EMPTY_GROUP" in busy.stderr, busy
    finally:
        a.close()
    wait_until(lambda: start_row(bs, "mover")[0].endswith("MEMBERS 0"), 30, "the group to empty")
    assert start_row(bs, "mover")[1] == [["moved", "0", "30", "100", "70"]]

    # Without --execute, a plan only.
    plan = strom("group", "reset-offsets", "mover", "--topic", "moved:0", "--to-offset", "70",
                 "--bootstrap", bs)
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines()[1].split() == ["mover", "moved", "0", "70"], plan.stdout
    assert "dry run" in plan.stdout
    assert start_row(bs, "mover")[1] == [["moved", "0", "30", "100", "70"]]

    done = strom("group", "reset-offsets", "mover", "--topic", "moved", "--to-offset", "70",
                 "--execute", "--bootstrap", bs)
    assert done.returncode == 0, done.stderr
    assert start_row(bs, "mover")[1] == [["moved", "0", "70", "100", "30"]]
    # Durable: a broker kill -9 keeps the new start.
    sbroker.kill9()
    sbroker.start(port=int(bs.rsplit(":", 1)[1]))
    assert start_row(bs, "mover")[1] == [["moved", "0", "70", "100", "30"]]

    # The next consumer gets exactly the records from 70 on, each for the first time.
    got = read_all(bs, "mover", "moved", 30)
    assert sorted(got) == [(o, 1) for o in range(70, 100)], got

    # Deleting the topic's offsets: the next consumer starts at share.auto.offset.reset
    # (earliest) and gets all 100 again.
    deleted = strom("group", "delete-offsets", "mover", "--topic", "moved", "--bootstrap", bs)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.splitlines()[1].split() == ["moved", "deleted"], deleted.stdout
    assert start_row(bs, "mover")[1] == []
    got = read_all(bs, "mover", "moved", 100)
    assert sorted(got) == [(o, 1) for o in range(100)], got

    # --to-latest: only what is written afterwards is read.
    latest = strom("group", "reset-offsets", "mover", "--topic", "moved", "--to-latest",
                   "--execute", "--bootstrap", bs)
    assert latest.returncode == 0, latest.stderr
    assert latest.stdout.splitlines()[1].split() == ["mover", "moved", "0", "100"], latest.stdout
    produce(bs, "moved", range(100, 105))
    got = read_all(bs, "mover", "moved", 5)
    assert sorted(got) == [(o, 1) for o in range(100, 105)], got

    # Wrong targets get Kafka's errors.
    for args, error in [
        (["delete-offsets", "nobody", "--topic", "moved"], "GROUP_ID_NOT_FOUND"),
        (["delete-offsets", "mover", "--topic", "never-read"], "UNKNOWN_TOPIC_OR_PARTITION"),
        (["reset-offsets", "mover", "--topic", "moved:3", "--to-earliest", "--execute"],
         "no partition 3"),
    ]:
        out = strom("group", *args, "--bootstrap", bs)
        assert out.returncode != 0 and error in out.stderr, (args, out)


def test_read_committed_share_group_gets_committed_records_only(sbroker):
    """Group config share.isolation.level=read_committed: records of aborted transactions are
    never delivered, those of an open one only once it commits; a read_uncommitted group on the
    same topic gets everything (so the check can tell the two apart)."""
    bs = sbroker.bootstrap
    setup(bs, "txq", "committed-only", 0)
    admin = AdminClient({"bootstrap.servers": bs})
    for group, level in [("committed-only", "read_committed"), ("everything", "read_uncommitted")]:
        configs = [ConfigEntry("share.auto.offset.reset", "earliest",
                               incremental_operation=AlterConfigOpType.SET),
                   ConfigEntry("share.isolation.level", level,
                               incremental_operation=AlterConfigOpType.SET)]
        resource = ConfigResource(ResourceType.GROUP, group, incremental_configs=configs)
        for f in admin.incremental_alter_configs([resource]).values():
            f.result(30)
    bad = ConfigResource(ResourceType.GROUP, "committed-only", incremental_configs=[
        ConfigEntry("share.isolation.level", "serializable",
                    incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(Exception, match="share.isolation.level"):
        for f in admin.incremental_alter_configs([bad]).values():
            f.result(30)

    tp = Producer({"bootstrap.servers": bs, "transactional.id": "share-txn", "linger.ms": 5})
    tp.init_transactions(30)

    def txn(prefix, n, commit):
        tp.begin_transaction()
        for i in range(n):
            tp.produce("txq", value=f"{prefix}-{i}".encode())
        assert tp.flush(30) == 0
        if commit:
            tp.commit_transaction(30)
        else:
            tp.abort_transaction(30)

    txn("c", 10, True)
    txn("a", 10, False)
    plain = Producer({"bootstrap.servers": bs, "acks": "all"})
    for i in range(5):
        plain.produce("txq", value=f"n-{i}".encode())
    assert plain.flush(30) == 0
    txn("c2", 10, True)
    # An open transaction: written, not yet committed.
    tp.begin_transaction()
    for i in range(5):
        tp.produce("txq", value=f"o-{i}".encode())
    assert tp.flush(30) == 0

    def read(group, want, extra_wait=1.0):
        c = consumer(bs, group)
        c.subscribe(["txq"])
        got = []
        try:
            def collect():
                got.extend(m.value().decode() for m in poll(c, 0.5))
                return len(got) >= want
            wait_until(collect, 60, f"{want} records for {group}")
            deadline = time.time() + extra_wait
            while time.time() < deadline:
                collect()
        finally:
            c.close()
        return got

    committed = ([f"c-{i}" for i in range(10)] + [f"n-{i}" for i in range(5)]
                 + [f"c2-{i}" for i in range(10)])
    got = read("committed-only", 25)
    assert sorted(got) == sorted(committed), got
    everything = read("everything", 40)
    assert sorted(everything) == sorted(committed + [f"a-{i}" for i in range(10)]
                                        + [f"o-{i}" for i in range(5)]), everything
    tp.commit_transaction(30)
    later = read("committed-only", 5)
    assert sorted(later) == [f"o-{i}" for i in range(5)], later


def test_share_auto_offset_reset_by_duration_starts_at_records_that_recent(sbroker):
    """share.auto.offset.reset=by_duration:PT1H: a new share-partition starts at the first record
    of the last hour; with none that recent it starts at the end."""
    bs = sbroker.bootstrap
    admin = AdminClient({"bootstrap.servers": bs})
    admin.create_topics([NewTopic("timed", 1, 1), NewTopic("stale", 1, 1)])["timed"].result(30)
    resource = ConfigResource(ResourceType.GROUP, "recent", incremental_configs=[
        ConfigEntry("share.auto.offset.reset", "by_duration:PT1H",
                    incremental_operation=AlterConfigOpType.SET)])
    for f in admin.incremental_alter_configs([resource]).values():
        f.result(30)
    bad = ConfigResource(ResourceType.GROUP, "recent", incremental_configs=[
        ConfigEntry("share.auto.offset.reset", "by_duration:-PT1H",
                    incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(Exception, match="share.auto.offset.reset"):
        for f in admin.incremental_alter_configs([bad]).values():
            f.result(30)
    p = Producer({"bootstrap.servers": bs, "acks": "all"})
    two_hours_ago = int(time.time() * 1000) - 2 * 3600 * 1000
    for i in range(10):
        p.produce("timed", value=f"old-{i}".encode(), timestamp=two_hours_ago + i)
        p.produce("stale", value=f"old-{i}".encode(), timestamp=two_hours_ago + i)
    for i in range(10):
        p.produce("timed", value=f"new-{i}".encode())
    assert p.flush(30) == 0

    c = consumer(bs, "recent")
    c.subscribe(["timed", "stale"])
    got = []
    try:
        def collect():
            got.extend((m.topic(), m.value().decode()) for m in poll(c, 0.5))
            return len(got) >= 10
        wait_until(collect, 60, "the recent records")
        # The stale topic's partition starts at its end (10): nothing there is that recent.
        wait_until(lambda: ["stale", "0", "10", "10", "0"] in start_row(bs, "recent")[1], 30,
                   "the stale partition to start at its end")
        p.produce("stale", value=b"later")
        assert p.flush(30) == 0
        wait_until(lambda: collect() and ("stale", "later") in got, 60, "the later record")
    finally:
        c.close()
    assert sorted(got) == sorted([("timed", f"new-{i}") for i in range(10)]
                                 + [("stale", "later")]), got
