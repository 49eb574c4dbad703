"""Log management and admin with real clients: retention by time and size, DeleteRecords,
compaction, topic and broker configs (describe, alter, persist, validate), CreatePartitions."""

import glob
import os
import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource,
                                   ConfigSource, NewPartitions, ResourceType)
from kafka.admin import ConfigResource as KPConfigResource
from kafka.admin import ConfigResourceType, KafkaAdminClient, NewTopic

FAST_CLEANER = ["--set", "log.retention.check.interval.ms=200", "--set", "log.cleaner.backoff.ms=200",
                "--set", "group.initial.rebalance.delay.ms=0", "--set", "offsets.topic.num.partitions=4"]


@pytest.fixture
def lbroker(broker_factory):
    return broker_factory(extra_args=FAST_CLEANER, name="logs")


def create_topic(bootstrap, name, partitions=1, **configs):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1, topic_configs={k.replace("_", "."): str(v) for k, v in configs.items()})])
    finally:
        admin.close()


def produce(bootstrap, topic, records, partition=0):
    """records: (key, value) pairs; returns their offsets in order."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all", "batch.num.messages": 1})
    offsets = []
    for key, value in records:
        p.produce(topic, key=key, value=value, partition=partition,
                  on_delivery=lambda err, msg: offsets.append((err, msg.offset())))
        p.poll(0)
    assert p.flush(30) == 0
    assert all(err is None for err, _ in offsets), offsets[:3]
    return [o for _, o in offsets]


def log_bytes(broker, topic, partition=0):
    total = 0
    for f in glob.glob(os.path.join(broker.data_dir, f"{topic}-{partition}", "*.log")):
        try:
            total += os.path.getsize(f)
        except FileNotFoundError:
            pass  # retention deleted it between the listing and the stat
    return total


def watermarks(bootstrap, topic, partition=0):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "wm"})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        c.close()


def wait_until(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_time_retention_deletes_old_segments_and_moves_log_start(lbroker):
    create_topic(lbroker.bootstrap, "short", retention_ms=3000, segment_bytes=1024)
    offsets = produce(lbroker.bootstrap, "short", [(b"k", b"x" * 100) for _ in range(60)])
    assert offsets == list(range(60))
    first_segment = os.path.join(lbroker.data_dir, "short-0", "00000000000000000000.log")
    wait_until(lambda: watermarks(lbroker.bootstrap, "short")[0] > 0, 20, "the log start offset to move")
    low, high = watermarks(lbroker.bootstrap, "short")
    assert high == 60
    # The log start moves with the segment list; the files go right after it.
    wait_until(lambda: not os.path.exists(first_segment), 10, "the oldest segment file to be deleted")

    # A consumer at an expired offset is told OFFSET_OUT_OF_RANGE (auto.offset.reset=error) ...
    c = Consumer({"bootstrap.servers": lbroker.bootstrap, "group.id": "strict", "auto.offset.reset": "error"})
    c.assign([TopicPartition("short", 0, 0)])
    err = None
    deadline = time.time() + 15
    while err is None and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and m.error():
            err = m.error()
    c.close()
    assert err is not None and err.code() == KafkaError._AUTO_OFFSET_RESET, err
    # ... and one with auto.offset.reset=earliest resumes at the new log start.
    produce(lbroker.bootstrap, "short", [(b"k", b"fresh")])
    low, high = watermarks(lbroker.bootstrap, "short")
    c = Consumer({"bootstrap.servers": lbroker.bootstrap, "group.id": "lenient", "auto.offset.reset": "earliest"})
    c.assign([TopicPartition("short", 0, 0)])
    first = None
    deadline = time.time() + 15
    while first is None and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            first = m
    c.close()
    assert first is not None and first.offset() >= low


def test_size_retention_holds_the_partition_near_its_bound(lbroker):
    create_topic(lbroker.bootstrap, "bounded", retention_bytes=20_000, segment_bytes=4096)
    produce(lbroker.bootstrap, "bounded", [(b"k", b"y" * 500) for _ in range(400)])
    wait_until(lambda: log_bytes(lbroker, "bounded") <= 20_000 + 4096, 20, "size retention")
    low, high = watermarks(lbroker.bootstrap, "bounded")
    assert high == 400 and low > 0
    print(f"partition holds {log_bytes(lbroker, 'bounded')} bytes with retention.bytes=20000")


def test_delete_records_moves_the_log_start(lbroker):
    create_topic(lbroker.bootstrap, "trim", segment_bytes=1024)
    produce(lbroker.bootstrap, "trim", [(b"k", b"z" * 100) for _ in range(50)])
    admin = AdminClient({"bootstrap.servers": lbroker.bootstrap})
    [(tp, fut)] = admin.delete_records([TopicPartition("trim", 0, 30)]).items()
    assert fut.result(10).low_watermark == 30
    assert watermarks(lbroker.bootstrap, "trim") == (30, 50)


def consume_all(bootstrap, topic, partition=0, timeout=20):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "reader", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    c.assign([TopicPartition(topic, partition, 0)])
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = c.poll(0.5)
        if m is None:
            continue
        if m.error():
            if m.error().code() == KafkaError._PARTITION_EOF:
                break
            continue
        out.append((m.offset(), m.key(), m.value()))
    c.close()
    return out


def test_compaction_keeps_the_latest_value_per_key_with_offsets_unchanged(lbroker):
    # min.compaction.lag.ms holds the cleaner off while producing, so that the footprint before
    # cleaning is measured whole; it is lowered afterwards (a live config change).
    create_topic(lbroker.bootstrap, "table", cleanup_policy="compact", segment_bytes=2048,
                 min_cleanable_dirty_ratio="0.01", delete_retention_ms=500, min_compaction_lag_ms=3600000)
    records, latest = [], {}
    for round_ in range(20):
        for k in range(30):
            records.append((f"key-{k}".encode(), f"v{round_}-{k}".encode()))
    for k in range(5):
        records.append((f"key-{k}".encode(), None))  # tombstones
    offsets = produce(lbroker.bootstrap, "table", records)
    for (key, value), offset in zip(records, offsets):
        latest[key] = (offset, value)
    # Fill a few segments with other keys so every record above sits in a closed segment.
    produce(lbroker.bootstrap, "table", [(f"filler-{i}".encode(), b"f" * 200) for i in range(40)])
    before = log_bytes(lbroker, "table")
    admin = AdminClient({"bootstrap.servers": lbroker.bootstrap})
    res = ConfigResource(ResourceType.TOPIC, "table", incremental_configs=[
        ConfigEntry("min.compaction.lag.ms", "0", incremental_operation=AlterConfigOpType.SET)])
    admin.incremental_alter_configs([res])[res].result(10)

    def compacted():
        got = consume_all(lbroker.bootstrap, "table")
        mine = [(o, k, v) for o, k, v in got if k.startswith(b"key-")]
        return len(mine) == 25 and mine

    wait_until(compacted, 30, "compaction to leave one record per live key")
    mine = compacted()
    assert {k: (o, v) for o, k, v in mine} == {k: ov for k, ov in latest.items() if ov[1] is not None}
    after = log_bytes(lbroker, "table")
    assert after < before / 2, f"disk footprint {before} -> {after} bytes"
    low, high = watermarks(lbroker.bootstrap, "table")
    assert (low, high) == (0, len(records) + 40), "offsets are preserved"


def test_keyless_record_on_a_compacted_topic_is_refused(lbroker):
    create_topic(lbroker.bootstrap, "keyed-only", cleanup_policy="compact")
    p = Producer({"bootstrap.servers": lbroker.bootstrap, "retries": 0})
    errors = []
    p.produce("keyed-only", value=b"no key", on_delivery=lambda err, msg: errors.append(err))
    p.flush(10)
    assert errors and errors[0] is not None and errors[0].code() == KafkaError.INVALID_RECORD


def describe_topic(admin, topic):
    res = ConfigResource(ResourceType.TOPIC, topic)
    return admin.describe_configs([res])[res].result(10)


def test_configs_describe_alter_validate_and_survive_restart(lbroker):
    create_topic(lbroker.bootstrap, "tuned", retention_ms=60000)
    admin = AdminClient({"bootstrap.servers": lbroker.bootstrap})
    configs = describe_topic(admin, "tuned")
    assert configs["retention.ms"].value == "60000"
    assert configs["retention.ms"].source == ConfigSource.DYNAMIC_TOPIC_CONFIG.value
    assert configs["cleanup.policy"].value == "delete"
    assert configs["cleanup.policy"].source == ConfigSource.DEFAULT_CONFIG.value
    assert configs["segment.bytes"].value == "1073741824"

    res = ConfigResource(ResourceType.TOPIC, "tuned", incremental_configs=[
        ConfigEntry("retention.ms", "120000", incremental_operation=AlterConfigOpType.SET),
        ConfigEntry("cleanup.policy", "compact", incremental_operation=AlterConfigOpType.APPEND)])
    admin.incremental_alter_configs([res])[res].result(10)
    configs = describe_topic(admin, "tuned")
    assert configs["retention.ms"].value == "120000"
    assert configs["cleanup.policy"].value == "delete,compact"

    bad = ConfigResource(ResourceType.TOPIC, "tuned", incremental_configs=[
        ConfigEntry("retention.ms", "soon", incremental_operation=AlterConfigOpType.SET)])
    with pytest.raises(KafkaException) as e:
        admin.incremental_alter_configs([bad])[bad].result(10)
    assert e.value.args[0].code() == KafkaError.INVALID_CONFIG

    # kafka-python: broker configs, with Kafka's defaults and a dynamic change.
    kp = KafkaAdminClient(bootstrap_servers=lbroker.bootstrap, request_timeout_ms=10000)
    try:
        broker_res = KPConfigResource(ConfigResourceType.BROKER, "0")
        entries = kp.describe_configs([broker_res], config_filter="all")["broker"]["0"]
        assert entries["log.retention.hours"]["value"] == "168"
        assert entries["log.retention.hours"]["config_source"] == "DEFAULT_CONFIG"
        assert entries["log.retention.check.interval.ms"]["value"] == "200"
        assert entries["log.retention.check.interval.ms"]["config_source"] == "STATIC_BROKER_CONFIG"
        kp.alter_configs([KPConfigResource(ConfigResourceType.BROKER, "0", configs={"log.retention.bytes": "123456789"})])
        kp.alter_configs([KPConfigResource(ConfigResourceType.TOPIC, "tuned", configs={"retention.ms": "777000", "cleanup.policy": "delete"})])
    finally:
        kp.close()

    lbroker.stop()
    lbroker.start()
    admin = AdminClient({"bootstrap.servers": lbroker.bootstrap})
    configs = describe_topic(admin, "tuned")
    assert configs["retention.ms"].value == "777000"
    assert configs["retention.bytes"].value == "123456789"
    assert configs["retention.bytes"].source == ConfigSource.DYNAMIC_DEFAULT_BROKER_CONFIG.value
    broker = ConfigResource(ResourceType.BROKER, "0")
    bconf = admin.describe_configs([broker])[broker].result(10)
    assert bconf["log.retention.bytes"].value == "123456789"
    assert bconf["log.retention.hours"].value == "168" and bconf["log.retention.hours"].is_read_only


def test_create_partitions_grows_a_topic_that_producers_and_groups_pick_up(lbroker):
    create_topic(lbroker.bootstrap, "growing", 2)
    admin = AdminClient({"bootstrap.servers": lbroker.bootstrap})
    c = Consumer({"bootstrap.servers": lbroker.bootstrap, "group.id": "growers", "auto.offset.reset": "earliest",
                  "topic.metadata.refresh.interval.ms": 500})
    assigned = set()
    c.subscribe(["growing"], on_assign=lambda cons, parts: assigned.update(p.partition for p in parts))
    deadline = time.time() + 20
    while assigned != {0, 1} and time.time() < deadline:
        c.poll(0.2)
    assert assigned == {0, 1}

    admin.create_partitions([NewPartitions("growing", 6)])["growing"].result(10)
    md = admin.list_topics(topic="growing", timeout=10)
    assert sorted(md.topics["growing"].partitions) == [0, 1, 2, 3, 4, 5]
    for p in range(6):
        produce(lbroker.bootstrap, "growing", [(b"k", f"p{p}".encode())], partition=p)
    seen = set()
    deadline = time.time() + 30
    while seen != {f"p{p}".encode() for p in range(6)} and time.time() < deadline:
        m = c.poll(0.2)
        if m is not None and not m.error():
            seen.add(m.value())
    c.close()
    assert assigned == {0, 1, 2, 3, 4, 5}
    assert seen == {f"p{p}".encode() for p in range(6)}

    with pytest.raises(KafkaException) as e:
        admin.create_partitions([NewPartitions("growing", 3)])["growing"].result(10)
    assert e.value.args[0].code() == KafkaError.INVALID_PARTITIONS


def test_strom_topic_cli_creates_describes_alters_grows_and_deletes(lbroker):
    import subprocess
    from conftest import STROM_BIN

    def strom(*args):
        out = subprocess.run([STROM_BIN, "topic", *args, "--bootstrap", lbroker.bootstrap],
                             capture_output=True, text=True, timeout=30)
        return out.returncode, out.stdout, out.stderr

    code, out, err = strom("create", "cli-topic", "--partitions", "2", "--config", "retention.ms=90000")
    assert code == 0, err
    code, out, _ = strom("list")
    assert "cli-topic" in out.split()
    code, out, _ = strom("describe", "cli-topic")
    assert "PartitionCount: 2" in out and "retention.ms=90000" in out
    assert out.count("Partition: ") == 2
    code, out, err = strom("alter", "cli-topic", "--config", "cleanup.policy=compact", "--delete-config", "retention.ms")
    assert code == 0, err
    code, out, _ = strom("describe", "cli-topic")
    assert "cleanup.policy=compact" in out and "retention.ms" not in out
    code, out, err = strom("alter", "cli-topic", "--config", "retention.ms=forever")
    assert code != 0 and "INVALID_CONFIG" in err
    code, out, err = strom("add-partitions", "cli-topic", "--partitions", "5")
    assert code == 0, err
    code, out, _ = strom("describe", "cli-topic")
    assert "PartitionCount: 5" in out
    code, out, err = strom("create", "cli-topic")
    assert code != 0 and "TOPIC_ALREADY_EXISTS" in err
    code, out, err = strom("delete", "cli-topic")
    assert code == 0, err
    code, out, _ = strom("list")
    assert "cli-topic" not in out.split()


def test_acks_all_needs_min_insync_replicas(lbroker):
    create_topic(lbroker.bootstrap, "strict-isr", min_insync_replicas=2)
    p = Producer({"bootstrap.servers": lbroker.bootstrap, "acks": "all", "retries": 0, "message.timeout.ms": 5000})
    errors = []
    p.produce("strict-isr", value=b"x", on_delivery=lambda err, msg: errors.append(err))
    p.flush(10)
    assert errors and errors[0] is not None and errors[0].code() == KafkaError.NOT_ENOUGH_REPLICAS
    p1 = Producer({"bootstrap.servers": lbroker.bootstrap, "acks": 1})
    ok = []
    p1.produce("strict-isr", value=b"y", on_delivery=lambda err, msg: ok.append(err))
    p1.flush(10)
    assert ok == [None]


def test_a_large_segment_deleted_by_retention_is_trimmed_at_the_deletion_pace(broker_factory):
    """With paced deletion (strom.delete.pacing, on by itself where the file system trims online),
    a segment that retention deletes leaves the log at once (the log start moves, nothing reads
    it) but its file is renamed `….deleted` and truncated 8 MiB at a time at the shard's pace,
    not unlinked in one go. A crash mid-way leaves the renamed file, which the next start removes
    without touching the log."""
    broker = broker_factory(extra_args=FAST_CLEANER + [
        "--set", "strom.delete.pacing=on",
        "--set", "strom.delete.bytes.per.second.per.shard=2097152"], name="paced")
    mib = 1 << 20
    create_topic(broker.bootstrap, "paced", segment_bytes=32 * mib, retention_bytes=4 * mib)
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5})
    n = 40_000
    for i in range(n):
        p.produce("paced", value=f"{i:08d}".encode().ljust(1000, b"."), partition=0)
        if i % 2000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    first = os.path.join(broker.data_dir, "paced-0", "00000000000000000000.log")
    doomed = first + ".deleted"
    # The oldest 32 MiB segment leaves the log ...
    wait_until(lambda: watermarks(broker.bootstrap, "paced")[0] > 0, 20, "the log start offset to move")
    low, high = watermarks(broker.bootstrap, "paced")
    assert high == n and not os.path.exists(first)
    # ... and its file shrinks a chunk every 4 s (2 MiB/s), from 32 MiB to nothing.
    sizes = set()
    deadline = time.time() + 3
    while time.time() < deadline:
        try:
            sizes.add(os.path.getsize(doomed))
        except FileNotFoundError:
            break
        time.sleep(0.05)
    print(f"sizes of the deleted segment seen (MiB): {sorted(s / mib for s in sizes)}")
    assert any(8 * mib < s < 32 * mib for s in sizes), sizes
    assert os.path.exists(doomed)
    # A crash mid-way: the next start removes the leftover, and the log is as acknowledged.
    broker.kill9()
    broker.start()
    assert not os.path.exists(doomed)
    assert watermarks(broker.bootstrap, "paced") == (low, high)
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "after-paced", "enable.auto.commit": False})
    c.assign([TopicPartition("paced", 0, low)])
    got = []
    deadline = time.time() + 60
    while len(got) < high - low and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append((m.offset(), int(m.value()[:8])))
    c.close()
    assert got == [(o, o) for o in range(low, high)]
    # A deleted topic's large files go the same way: the directory is renamed `…-delete` at once
    # (the topic is gone for clients), its 20 MB segment is trimmed at the pace, then it is removed.
    create_topic(broker.bootstrap, "gone", segment_bytes=32 * mib)
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(20_000):
        p.produce("gone", value=b"g" * 1000, partition=0)
        if i % 2000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.delete_topics(["gone"])
    assert "gone" not in admin.list_topics()
    admin.close()
    doomed_dirs = []
    deadline = time.time() + 5
    while not doomed_dirs and time.time() < deadline:
        doomed_dirs = glob.glob(os.path.join(broker.data_dir, "gone-0.*-delete"))
        time.sleep(0.05)
    assert doomed_dirs and not os.path.exists(os.path.join(broker.data_dir, "gone-0"))

    def shrunk_by_one_chunk():
        try:
            return any(8 * mib < os.path.getsize(f) < 20_000_000 - 4 * mib
                       for f in glob.glob(os.path.join(doomed_dirs[0], "*.log")))
        except FileNotFoundError:
            return False
    # The first chunk goes at once, the next one 4 s later.
    wait_until(shrunk_by_one_chunk, 3, "the deleted topic's segment to lose a chunk")
    wait_until(lambda: not os.path.exists(doomed_dirs[0]), 20, "the deleted topic's directory to go")
