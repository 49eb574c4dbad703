"""An fd budget: segment files are opened lazily and closed when least recently used, so a broker
whose process may open only 4,096 files serves 20,000 partitions, and a creation that fails is
reported as failed instead of as a success."""

import struct
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import kafka_wire as kw
from test_bad_input import assert_still_serves

TOPICS = 20
PARTITIONS_EACH = 1000


def open_fds(broker):
    import os
    return len(os.listdir(f"/proc/{broker.proc.pid}/fd"))


def test_twenty_thousand_partitions_under_ulimit_4096(broker_factory):
    broker = broker_factory(nofile=4096, name="many")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    started = time.time()
    for t in range(TOPICS):
        futures = admin.create_topics([NewTopic(f"wide-{t}", PARTITIONS_EACH, 1)], operation_timeout=300,
                                      request_timeout=300)
        for f in futures.values():
            f.result()
    created_s = time.time() - started
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 50, "acks": "all",
                  "queue.buffering.max.messages": 100000})
    delivered = []
    for t in range(TOPICS):
        for part in range(PARTITIONS_EACH):
            p.produce(f"wide-{t}", value=f"{t}/{part}".encode(), partition=part,
                      on_delivery=lambda err, msg: delivered.append(err))
        p.poll(0)
    assert p.flush(300) == 0
    assert len(delivered) == TOPICS * PARTITIONS_EACH and not any(delivered), [e for e in delivered if e][:3]
    fds = open_fds(broker)
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "wide-reader",
                  "enable.auto.commit": False, "fetch.wait.max.ms": 100})
    c.assign([TopicPartition(f"wide-{t}", part, 0) for t in range(TOPICS) for part in range(PARTITIONS_EACH)])
    seen = set()
    deadline = time.time() + 300
    while len(seen) < TOPICS * PARTITIONS_EACH and time.time() < deadline:
        for m in c.consume(num_messages=10000, timeout=1):
            if m.error() is None:
                seen.add(m.value())
    c.close()
    print(f"{TOPICS * PARTITIONS_EACH} partitions under ulimit -n 4096: created in {created_s:.0f} s, "
          f"{len(seen)} records read back, {fds} fds open after writing")
    assert len(seen) == TOPICS * PARTITIONS_EACH
    assert fds < 4096
    # One Fetch naming all 20,000 partitions, from several connections at once: each partition is
    # a call to its owner shard, and that many at once once overflowed glommio's task references.
    frame = fetch_all_partitions()
    conns = [kw.connect(broker.bootstrap, timeout=120) for _ in range(4)]
    for s in conns:
        s.sendall(frame)
    sizes = [len(kw.read_frame(s) or b"") for s in conns]
    print(f"Fetch of {TOPICS * PARTITIONS_EACH} partitions on 4 connections: responses of {sizes} bytes")
    assert all(size > TOPICS * PARTITIONS_EACH * 20 for size in sizes), sizes
    assert_still_serves(broker)


def fetch_all_partitions():
    """Fetch v4 for every partition of every `wide-N` topic from offset 0."""
    body = kw.request_header(1, 4, 1)
    body += struct.pack(">iiiib", -1, 0, 0, 50 << 20, 0)
    body += struct.pack(">i", TOPICS)
    for t in range(TOPICS):
        body += kw.kstring(f"wide-{t}".encode()) + struct.pack(">i", PARTITIONS_EACH)
        for part in range(PARTITIONS_EACH):
            body += struct.pack(">iqi", part, 0, 1 << 20)
    return kw.frame(body)


def test_a_topic_whose_partitions_cannot_be_created_is_reported_failed(broker_factory):
    broker = broker_factory(name="blocked")
    # A plain file where partition 1's directory must go: that partition cannot be created.
    (broker.data_dir / "blocked-1").write_text("in the way")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    futures = admin.create_topics([NewTopic("blocked", 3, 1), NewTopic("fine", 3, 1)], operation_timeout=30)
    try:
        futures["blocked"].result()
        raise AssertionError("creating a topic whose partition cannot be opened succeeded")
    except Exception as e:  # KafkaException carrying the broker's error
        print(f"blocked: {e}")
        assert "KAFKA_STORAGE_ERROR" in str(e) or "storage" in str(e).lower(), e
    futures["fine"].result()
    topics = admin.list_topics(timeout=10).topics
    assert "blocked" not in topics and "fine" in topics
    assert_still_serves(broker)
