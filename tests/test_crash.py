"""Durability: every record acknowledged with acks=all survives kill -9 of the broker, exactly
once, and new offsets continue without a gap after the restart."""

import random
import threading
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic


def test_acked_records_survive_kill_9(broker):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("durable", 2, 1)])
    admin.close()

    acked = []
    lock = threading.Lock()

    def on_delivery(err, msg):
        if err is None:
            with lock:
                acked.append((msg.partition(), msg.offset(), msg.value()))

    producer = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 2,
                         "enable.idempotence": True, "message.timeout.ms": 5000,
                         "reconnect.backoff.max.ms": 200})
    kill_after = rng.randrange(2000, 6000)
    i = 0
    deadline = time.time() + 60
    while time.time() < deadline:
        producer.produce("durable", key=str(i % 13).encode(), value=f"rec-{i}".encode(), on_delivery=on_delivery)
        producer.poll(0)
        i += 1
        with lock:
            n = len(acked)
        if n >= kill_after:
            broker.kill9()
            break
        if i % 500 == 0:
            producer.poll(0.01)
    assert not broker.alive(), "the broker was never killed: too few acknowledgements"
    producer.flush(8)  # what was in flight fails: the broker is gone
    with lock:
        acked_before = list(acked)
    print(f"acknowledged before kill -9: {len(acked_before)} of {i} sent")

    broker.start()
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "check", "enable.auto.commit": False})
    found = {}
    ends = {}
    for p in (0, 1):
        lo, hi = c.get_watermark_offsets(TopicPartition("durable", p), timeout=10)
        ends[p] = hi
        c.assign([TopicPartition("durable", p, 0)])
        got = []
        t_end = time.time() + 30
        while len(got) < hi and time.time() < t_end:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                got.append(m)
        assert [m.offset() for m in got] == list(range(hi)), f"partition {p}: offsets have a gap"
        for m in got:
            found.setdefault(m.value(), []).append((p, m.offset()))
    c.close()

    lost = [(p, o, v) for p, o, v in acked_before if (p, o) not in [tuple(x) for x in found.get(v, [])]]
    assert not lost, f"acknowledged records lost after kill -9 (seed {seed}): {lost[:10]}"
    dupes = {v: locs for v, locs in found.items() if len(locs) > 1}
    assert not dupes, f"records stored twice (seed {seed}): {list(dupes.items())[:5]}"

    # New offsets continue exactly where the recovered log ends.
    p2 = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    reports = []
    p2.produce("durable", value=b"after-restart", partition=0,
               on_delivery=lambda err, msg: reports.append((err, msg.offset())))
    assert p2.flush(10) == 0
    assert reports == [(None, ends[0])]
