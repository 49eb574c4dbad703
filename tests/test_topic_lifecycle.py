"""Deleted topics stay deleted: DeleteTopics, then kill -9 at a random moment, restart and re-create
the topic under the same name. The new topic must start empty, whatever the crash interrupted."""

import os
import random
import struct
import subprocess
import time

from kafka.admin import KafkaAdminClient, NewTopic

import kafka_wire as kw

PARTITIONS = 12


def send_delete_topics(bootstrap, topic):
    """DeleteTopics v1 on a raw connection, not waiting for the answer: the kill may land before,
    during or after the deletion."""
    body = kw.request_header(20, 1, 7) + struct.pack(">i", 1) + kw.kstring(topic.encode())
    body += struct.pack(">i", 30000)
    s = kw.connect(bootstrap)
    s.sendall(kw.frame(body))
    return s


def admin(bootstrap):
    return KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)


def kcat_produce(bootstrap, topic, lines):
    out = subprocess.run(["kcat", "-b", bootstrap, "-t", topic, "-P", "-X", "acks=all", "-K:"],
                         input="".join(f"{line}\n" for line in lines), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def kcat_consume(bootstrap, topic):
    out = subprocess.run(["kcat", "-b", bootstrap, "-t", topic, "-C", "-e", "-f", "%p:%o:%s\n"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_deleted_topic_records_never_come_back_after_kill_9(broker_factory):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    broker = broker_factory(name="lifecycle")
    tries = 20
    resurrected = 0
    for i in range(tries):
        a = admin(broker.bootstrap)
        a.create_topics([NewTopic("phoenix", PARTITIONS, 1)])
        a.close()
        kcat_produce(broker.bootstrap, "phoenix", [f"k{n}:old-{i}-{n}" for n in range(600)])
        s = send_delete_topics(broker.bootstrap, "phoenix")
        time.sleep(rng.uniform(0, 0.02))
        broker.kill9()
        s.close()
        broker.start()
        a = admin(broker.bootstrap)
        if "phoenix" in a.list_topics():
            # The kill landed before the deletion was durable: it never happened, as Kafka allows.
            a.delete_topics(["phoenix"])
            time.sleep(0.2)
        a.create_topics([NewTopic("phoenix", PARTITIONS, 1)])
        a.close()
        seen = kcat_consume(broker.bootstrap, "phoenix")
        if seen:
            resurrected += 1
            print(f"try {i}: {len(seen)} records of a deleted topic came back: {seen[:3]}")
        kcat_produce(broker.bootstrap, "phoenix", [f"k:new-{i}"])
        assert [v.split(":", 2)[2] for v in kcat_consume(broker.bootstrap, "phoenix")] == [f"new-{i}"]
        a = admin(broker.bootstrap)
        a.delete_topics(["phoenix"])
        a.close()
        time.sleep(0.2)
    leftovers = [d for d in os.listdir(broker.data_dir) if d.startswith("phoenix")]
    print(f"{tries} tries: {resurrected} brought deleted records back; leftover dirs: {leftovers}")
    assert resurrected == 0
    broker.stop()
    broker.start()
    leftovers = [d for d in os.listdir(broker.data_dir) if d.startswith("phoenix")]
    assert leftovers == [], leftovers
