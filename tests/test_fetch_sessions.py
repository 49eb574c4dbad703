"""Incremental fetch sessions (KIP-227): a session's requests name only what changed and its
responses carry only partitions with news; kafka-python's consumer (which uses sessions) reads
every record of a many-partition topic through them."""

import os
import socket
import struct
import threading
import time

from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse

FT = FetchRequest.FetchTopic
FP = FT.FetchPartition


class Conn:
    def __init__(self, bootstrap):
        host, port = bootstrap.split(":")
        self.s = socket.create_connection((host, int(port)), timeout=10)
        self.cid = 0

    def fetch(self, session_id, epoch, partitions, forgotten=(), topic="sess", max_wait_ms=10,
              min_bytes=0):
        self.cid += 1
        req = FetchRequest[12](
            replica_id=-1, max_wait_ms=max_wait_ms, min_bytes=min_bytes, max_bytes=1 << 20,
            isolation_level=0, session_id=session_id, session_epoch=epoch,
            topics=[FT(topic=topic, partitions=[FP(
                partition=p, current_leader_epoch=-1, fetch_offset=o, last_fetched_epoch=-1,
                log_start_offset=-1, partition_max_bytes=1 << 20) for p, o in partitions])]
            if partitions else [],
            forgotten_topics_data=[FetchRequest.ForgottenTopic(topic=topic, partitions=list(forgotten))]
            if forgotten else [],
            rack_id="")
        req.with_header(correlation_id=self.cid, client_id="strom-test")
        self.s.sendall(req.encode(header=True, framed=True))
        size = struct.unpack(">i", self.s.recv(4, socket.MSG_WAITALL))[0]
        r = FetchResponse.decode(self.s.recv(size, socket.MSG_WAITALL), version=12, header=True)
        listed = {(p.partition_index, p.high_watermark) for t in r.responses for p in t.partitions}
        return r, listed


def produce(bootstrap, partition, n):
    p = Producer({"bootstrap.servers": bootstrap})
    for i in range(n):
        p.produce("sess", value=b"x%d" % i, partition=partition)
    assert p.flush(10) == 0


def test_incremental_session_lists_only_partitions_with_news(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("sess", 8, 1)])
    admin.close()
    c = Conn(broker.bootstrap)
    # Epoch 0: a new session; the full response lists every partition.
    r, listed = c.fetch(0, 0, [(p, 0) for p in range(8)])
    assert r.error_code == 0 and r.session_id > 0
    assert listed == {(p, 0) for p in range(8)}
    sid = r.session_id
    # Epoch 1, nothing named, nothing new: an empty response that keeps the session.
    r, listed = c.fetch(sid, 1, [])
    assert (r.error_code, r.session_id, listed) == (0, sid, set())
    # Records on partition 3 only: only partition 3 comes back, with them.
    produce(broker.bootstrap, 3, 5)
    r, listed = c.fetch(sid, 2, [])
    assert listed == {(3, 5)}
    (part,) = r.responses[0].partitions
    assert part.records
    # The client moves its position on 3 (named, as it changed); nothing new anywhere else.
    r, listed = c.fetch(sid, 3, [(3, 5)])
    assert listed == set()
    # Forgotten partitions leave the session: new data there is not reported.
    produce(broker.bootstrap, 6, 2)
    r, listed = c.fetch(sid, 4, [], forgotten=[6])
    assert listed == set()
    produce(broker.bootstrap, 1, 1)
    r, listed = c.fetch(sid, 5, [])
    assert listed == {(1, 1)}
    # A wrong epoch and an unknown session are refused with Kafka's errors.
    r, _ = c.fetch(sid, 9, [])
    assert r.error_code == 71  # INVALID_FETCH_SESSION_EPOCH
    r, _ = c.fetch(sid + 1_000_000, 1, [])
    assert r.error_code == 70  # FETCH_SESSION_ID_NOT_FOUND
    # Epoch -1 closes it: a full, sessionless answer, and the id is gone.
    r, listed = c.fetch(sid, -1, [(0, 0)])
    assert r.session_id == 0 and listed == {(0, 0)}
    r, _ = c.fetch(sid, 6, [])
    assert r.error_code == 70


def test_kafka_python_consumer_reads_every_partition_through_sessions(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("sess", 40, 1)])
    admin.close()
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for i in range(4000):
        p.produce("sess", key=b"k%d" % i, value=b"v%d" % i)
    assert p.flush(20) == 0
    consumer = KafkaConsumer("sess", bootstrap_servers=broker.bootstrap, group_id=None,
                             auto_offset_reset="earliest", consumer_timeout_ms=6000)
    got = [m.value for m in consumer]
    # More records arrive while the session is open: still every one, exactly once.
    for i in range(4000, 4500):
        p.produce("sess", key=b"k%d" % i, value=b"v%d" % i)
    assert p.flush(20) == 0
    deadline = time.time() + 20
    while len(got) < 4500 and time.time() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            got.extend(m.value for m in batch)
    consumer.close()
    assert sorted(got) == sorted(b"v%d" % i for i in range(4500))


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_waiting_session_wakes_on_data_and_reports_every_kind_of_news(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("sess", 8, 1)])
    admin.close()
    produce(broker.bootstrap, 2, 10)
    c = Conn(broker.bootstrap)
    r, listed = c.fetch(0, 0, [(p, 0) for p in range(8)], max_wait_ms=0)
    sid = r.session_id
    assert sid > 0 and (2, 10) in listed
    r, listed = c.fetch(sid, 1, [(2, 10)], max_wait_ms=0)
    assert listed == set()
    # A quiet session long-polls; a record on one partition ends the wait with that partition.
    threading.Timer(0.5, produce, (broker.bootstrap, 5, 1)).start()
    started = time.monotonic()
    r, listed = c.fetch(sid, 2, [], max_wait_ms=8000)
    assert listed == {(5, 1)}
    assert time.monotonic() - started < 6
    r, listed = c.fetch(sid, 3, [(5, 1)], max_wait_ms=0)
    assert listed == set()
    # A log start moved on a partition without new records is news too.
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    [(_, fut)] = admin.delete_records([TopicPartition("sess", 2, 4)]).items()
    fut.result(10)
    r, _ = c.fetch(sid, 4, [], max_wait_ms=0)
    (part,) = r.responses[0].partitions
    assert (part.partition_index, part.high_watermark, part.log_start_offset) == (2, 10, 4)
    assert not part.records
    # A position out of range is answered with its error at once, not after the wait.
    started = time.monotonic()
    r, _ = c.fetch(sid, 5, [(2, 1)], max_wait_ms=8000)
    (part,) = r.responses[0].partitions
    assert (part.partition_index, part.error_code) == (2, 1)  # OFFSET_OUT_OF_RANGE
    assert time.monotonic() - started < 6


def test_a_fetch_short_of_min_bytes_waits_for_more_without_spinning(broker):
    """Data below `min_bytes` is not re-read in a loop until the wait is up: the broker waits for
    more (it used to spin a core for the whole `max_wait_ms`)."""
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("sess", 2, 1)])
    admin.close()
    produce(broker.bootstrap, 0, 3)
    c = Conn(broker.bootstrap)
    before = cpu_seconds(broker.proc.pid)
    for session_epoch, session in ((-1, 0), (0, 0)):
        for _ in range(4):
            started = time.monotonic()
            r, listed = c.fetch(session, session_epoch, [(0, 0), (1, 0)], max_wait_ms=800,
                                min_bytes=1 << 20)
            # The wait runs its course and the records come back.
            assert time.monotonic() - started >= 0.7
            assert (0, 3) in listed
    spent = cpu_seconds(broker.proc.pid) - before
    print(f"broker CPU over 8 fetches waiting 0.8 s each: {spent:.2f} s")
    assert spent < 2.0
