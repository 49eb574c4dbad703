"""`strom produce` and `strom consume`: the command-line client, checked against real clients
(confluent-kafka, kafka-python, kcat) on the real broker."""

import subprocess
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.partitioner.default import murmur2

from conftest import STROM_BIN


def strom(*args, stdin=None, timeout=60):
    return subprocess.run([STROM_BIN, *args], input=stdin, capture_output=True, timeout=timeout)


def create(bootstrap, name, partitions):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic(name, partitions, 1)])
    admin.close()


def read_with_confluent(bootstrap, topic, partitions, expect):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "check", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.time() + 30
    while len(got) < expect and time.time() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            got.append(m)
    c.close()
    return got


def test_10000_keyed_records_with_headers_round_trip(broker):
    create(broker.bootstrap, "cli", 4)
    lines = b"".join(b"user-%d:event %d\n" % (i % 97, i) for i in range(10000))
    p = strom("produce", "cli", "--bootstrap", broker.bootstrap, "--key-separator", ":",
              "--header", "source=cli", "--header", "trace=42", stdin=lines)
    assert p.returncode == 0, p.stderr

    # Read back by a real client: every record, its key, value and headers, and the partition
    # Kafka's default partitioner (murmur2, as kafka-python and the Java client compute it) gives.
    got = read_with_confluent(broker.bootstrap, "cli", 4, 10000)
    assert len(got) == 10000
    assert sorted((m.key(), m.value()) for m in got) == sorted(
        (b"user-%d" % (i % 97), b"event %d" % i) for i in range(10000))
    for m in got:
        assert m.headers() == [("source", b"cli"), ("trace", b"42")]
        assert m.partition() == (murmur2(m.key()) & 0x7FFFFFFF) % 4, m.key()
    # Per key, the order of the input is kept.
    by_key = {}
    for m in sorted(got, key=lambda m: (m.partition(), m.offset())):
        by_key.setdefault(m.key(), []).append(int(m.value().split()[1]))
    assert all(v == sorted(v) for v in by_key.values())

    c = strom("consume", "cli", "--bootstrap", broker.bootstrap, "--num", "10000",
              "--format", "%k\\t%v\\t%p\\t%o\\t%h\\n")
    assert c.returncode == 0, c.stderr
    rows = [r.split(b"\t") for r in c.stdout.splitlines()]
    assert len(rows) == 10000
    expected = {(m.key(), m.value(), str(m.partition()).encode(), str(m.offset()).encode())
                for m in got}
    assert {tuple(r[:4]) for r in rows} == expected
    assert {r[4] for r in rows} == {b"source=cli,trace=42"}


def test_consume_from_a_timestamp_offsets_and_the_end(broker):
    create(broker.bootstrap, "times", 2)
    first = b"".join(b"k%d:early %d\n" % (i, i) for i in range(50))
    assert strom("produce", "times", "--bootstrap", broker.bootstrap, "--key-separator", ":",
                 stdin=first).returncode == 0
    time.sleep(0.3)
    since = int(time.time() * 1000)
    time.sleep(0.3)
    second = b"".join(b"k%d:late %d\n" % (i, i) for i in range(30))
    assert strom("produce", "times", "--bootstrap", broker.bootstrap, "--key-separator", ":",
                 stdin=second).returncode == 0

    c = strom("consume", "times", "--bootstrap", broker.bootstrap, "--from", f"@{since}",
              "--num", "30", "--format", "%v %T\\n")
    assert c.returncode == 0, c.stderr
    rows = [r.split(b" ") for r in c.stdout.splitlines()]
    assert sorted(r[0] + b" " + r[1] for r in rows) == sorted(b"late %d" % i for i in range(30))
    assert all(int(r[2]) >= since for r in rows)

    # --from OFFSET applies to every partition; a negative one counts back from the end.
    ends = {0: 0, 1: 0}
    for m in read_with_confluent(broker.bootstrap, "times", 2, 80):
        ends[m.partition()] = max(ends[m.partition()], m.offset() + 1)
    expected = sorted(b"%d %d" % (p, o) for p, e in ends.items() for o in range(max(e - 5, 0), e))
    c = strom("consume", "times", "--bootstrap", broker.bootstrap, "--from", "-5", "--num",
              str(len(expected)), "--format", "%p %o\\n")
    assert c.returncode == 0, c.stderr
    assert sorted(c.stdout.splitlines()) == expected

    # --from end prints only what is produced after it started.
    proc = subprocess.Popen([STROM_BIN, "consume", "times", "--bootstrap", broker.bootstrap,
                             "--from", "end", "--num", "3"], stdout=subprocess.PIPE)
    time.sleep(1.5)
    assert strom("produce", "times", "--bootstrap", broker.bootstrap,
                 stdin=b"new 1\nnew 2\nnew 3\n").returncode == 0
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert sorted(out.splitlines()) == [b"new 1", b"new 2", b"new 3"]


def test_consume_with_a_group_commits_and_resumes(broker):
    create(broker.bootstrap, "grouped", 3)
    lines = b"".join(b"k%d:v%d\n" % (i, i) for i in range(300))
    assert strom("produce", "grouped", "--bootstrap", broker.bootstrap, "--key-separator", ":",
                 stdin=lines).returncode == 0
    seen = []
    for _ in range(3):
        c = strom("consume", "grouped", "--bootstrap", broker.bootstrap, "--group", "g",
                  "--num", "100")
        assert c.returncode == 0, c.stderr
        seen += c.stdout.splitlines()
    # Three runs of 100 read all 300 exactly once: each resumes where the last one committed.
    assert sorted(seen) == sorted(b"v%d" % i for i in range(300))
    check = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "g"})
    committed = check.committed([TopicPartition("grouped", p) for p in range(3)], timeout=10)
    check.close()
    ends = {}
    for m in read_with_confluent(broker.bootstrap, "grouped", 3, 300):
        ends[m.partition()] = max(ends.get(m.partition(), 0), m.offset() + 1)
    assert {tp.partition: tp.offset for tp in committed} == ends
    # It left the group: nobody is a member now.
    d = strom("group", "describe", "g", "--bootstrap", broker.bootstrap)
    assert b"MEMBERS 0" in d.stdout, d.stdout


def test_every_compression_both_ways(broker):
    create(broker.bootstrap, "codecs", 1)
    for codec in ["none", "gzip", "snappy", "lz4", "zstd"]:
        p = strom("produce", "codecs", "--bootstrap", broker.bootstrap, "--compression", codec,
                  "--acks", "1", stdin=b"".join(b"%s %d\n" % (codec.encode(), i) for i in range(20)))
        assert p.returncode == 0, p.stderr
    # librdkafka's compressed batches, read by strom consume.
    producer = Producer({"bootstrap.servers": broker.bootstrap, "compression.type": "zstd",
                         "linger.ms": 20})
    for i in range(20):
        producer.produce("codecs", value=b"librdkafka %d" % i)
    assert producer.flush(10) == 0
    c = strom("consume", "codecs", "--bootstrap", broker.bootstrap, "--num", "120")
    assert c.returncode == 0, c.stderr
    expected = [b"%s %d" % (codec, i) for codec in [b"none", b"gzip", b"snappy", b"lz4", b"zstd",
                                                     b"librdkafka"] for i in range(20)]
    assert c.stdout.splitlines() == expected


def test_exit_codes(broker):
    create(broker.bootstrap, "codes", 1)
    # acks=0: nothing comes back, exit 0 once sent; the records arrive.
    assert strom("produce", "codes", "--bootstrap", broker.bootstrap, "--acks", "0",
                 stdin=b"a\nb\n").returncode == 0
    c = strom("consume", "codes", "--bootstrap", broker.bootstrap, "--num", "2")
    assert c.stdout == b"a\nb\n"
    # A record over the broker's max.message.bytes: refused, reported, exit 1.
    big = strom("produce", "codes", "--bootstrap", broker.bootstrap, stdin=b"x" * (2 << 20) + b"\n")
    assert big.returncode == 1
    assert b"MESSAGE_TOO_LARGE" in big.stderr or b"RECORD_LIST_TOO_LARGE" in big.stderr, big.stderr
    missing = strom("consume", "no-such-topic", "--bootstrap", broker.bootstrap, "--num", "1")
    assert missing.returncode == 1
    assert b"UNKNOWN_TOPIC_OR_PARTITION" in missing.stderr
    down = strom("consume", "codes", "--bootstrap", "127.0.0.1:1", "--num", "1")
    assert down.returncode == 1 and b"Connection refused" in down.stderr
    assert strom("produce", "codes", "--bootstrap", broker.bootstrap, "--acks", "2",
                 stdin=b"").returncode == 1
    assert strom("consume", "codes", "--bogus").returncode == 2
    # Output that closes early (| head): the next write fails and the consumer ends quietly.
    pipeline = subprocess.Popen(
        f"{STROM_BIN} consume codes --bootstrap {broker.bootstrap} | head -1; "
        "echo exit=${PIPESTATUS[0]}", shell=True, executable="/bin/bash", stdout=subprocess.PIPE)
    time.sleep(2)
    assert strom("produce", "codes", "--bootstrap", broker.bootstrap, stdin=b"c\n").returncode == 0
    out, _ = pipeline.communicate(timeout=30)
    assert out == b"a\nexit=0\n"
