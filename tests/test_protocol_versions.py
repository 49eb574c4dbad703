"""Protocol versions (issue 9, item 5): ApiVersions advertises exactly the README's table, Fetch by
topic id (v13+, KIP-516) works and answers UNKNOWN_TOPIC_ID for an id no topic has, and the
clients' own negotiation (which picks the newest versions advertised) round-trips records."""

import pathlib
import re
import socket
import struct
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def readme_table():
    rows = re.findall(r"^\| (\w+) \| (\d+) \| (\d+)-(\d+) \|$", README.read_text(), re.M)
    return {int(k): (int(lo), int(hi)) for _, k, lo, hi in rows}


def test_api_versions_match_the_readme_table(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    advertised = {int(k): v for k, v in admin.api_versions().items()}
    admin.close()
    assert advertised == readme_table()


def call(bootstrap, request, response_class, version):
    """Sends one request built with kafka-python's protocol classes and decodes the answer."""
    request.with_header(correlation_id=7, client_id="strom-test")
    host, port = bootstrap.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request.encode(header=True, framed=True))
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        body = s.recv(size, socket.MSG_WAITALL)
    return response_class.decode(body, version=version, header=True)


def fetch_by_id(bootstrap, topic_id, version):
    FT = FetchRequest.FetchTopic
    FP = FT.FetchPartition
    req = FetchRequest[version](
        replica_id=-1, max_wait_ms=10, min_bytes=0, max_bytes=1 << 20, isolation_level=0,
        session_id=0, session_epoch=-1,
        topics=[FT(topic_id=topic_id, partitions=[FP(
            partition=0, current_leader_epoch=-1, fetch_offset=0, last_fetched_epoch=-1,
            log_start_offset=-1, partition_max_bytes=1 << 20)])],
        forgotten_topics_data=[], rack_id="")
    return call(bootstrap, req, FetchResponse, version)


@pytest.mark.parametrize("version", [13, 17])
def test_fetch_by_topic_id(broker, version):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("by-id", 1, 1)])
    topic_id = admin.describe_topic_partitions(["by-id"])["topics"][0]["topic_id"]
    admin.close()
    p = Producer({"bootstrap.servers": broker.bootstrap})
    p.produce("by-id", value=b"found by id")
    assert p.flush(10) == 0
    r = fetch_by_id(broker.bootstrap, topic_id, version)
    (topic,) = r.responses
    assert topic.topic_id == topic_id
    (part,) = topic.partitions
    assert (part.error_code, part.high_watermark) == (0, 1)
    assert b"found by id" in part.records
    stranger = fetch_by_id(broker.bootstrap, uuid.uuid4(), version)
    # UNKNOWN_TOPIC_ID (100), as Kafka answers an id it does not know.
    assert stranger.responses[0].partitions[0].error_code == 100


def test_clients_negotiating_the_newest_versions_round_trip(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("newest", 2, 1)])
    admin.close()
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for i in range(200):
        p.produce("newest", key=b"k%d" % i, value=b"v%d" % i)
    assert p.flush(10) == 0
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "newest-c",
                  "auto.offset.reset": "earliest"})
    c.assign([TopicPartition("newest", 0, 0), TopicPartition("newest", 1, 0)])
    got = []
    import time
    deadline = time.time() + 20
    while time.time() < deadline:
        m = c.poll(0.2)
        if m is not None and not m.error():
            got.append(m.value())
        if len(got) == 200:
            break
    c.close()
    assert sorted(got) == sorted(b"v%d" % i for i in range(200))
    k = KafkaConsumer("newest", bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                      consumer_timeout_ms=5000, group_id=None)
    values = sorted(m.value for m in k)
    k.close()
    assert values == sorted(b"v%d" % i for i in range(200))


def test_offset_for_leader_epoch_and_epoch_fencing(broker):
    from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse
    from kafka.protocol.consumer.offsets import (ListOffsetsRequest, ListOffsetsResponse,
                                                 OffsetForLeaderEpochRequest,
                                                 OffsetForLeaderEpochResponse)
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("epochs", 1, 1)])
    admin.close()
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(5):
        p.produce("epochs", value=b"e%d" % i)
    assert p.flush(10) == 0

    def epoch_query(current, asked, partition=0):
        T = OffsetForLeaderEpochRequest.OffsetForLeaderTopic
        P = T.OffsetForLeaderPartition
        req = OffsetForLeaderEpochRequest[4](replica_id=-1, topics=[T(topic="epochs", partitions=[
            P(partition=partition, current_leader_epoch=current, leader_epoch=asked)])])
        (part,) = call(broker.bootstrap, req, OffsetForLeaderEpochResponse, 4).topics[0].partitions
        return part.error_code, part.leader_epoch, part.end_offset

    # Epoch 0 is the only one this partition has had: it ends at the log end.
    assert epoch_query(-1, 0) == (0, 0, 5)
    assert epoch_query(0, 0) == (0, 0, 5)
    assert epoch_query(-1, 7) == (0, -1, -1)  # unknown epoch: UNDEFINED, as Kafka
    assert epoch_query(3, 0)[0] == 75  # UNKNOWN_LEADER_EPOCH: the client is ahead of us
    assert epoch_query(-1, 0, partition=9)[0] == 3

    # Fetch and ListOffsets check the client's current_leader_epoch too (KIP-320).
    FT = FetchRequest.FetchTopic
    FP = FT.FetchPartition
    fetch = FetchRequest[12](replica_id=-1, max_wait_ms=10, min_bytes=0, max_bytes=1 << 20,
                             isolation_level=0, session_id=0, session_epoch=-1,
                             topics=[FT(topic="epochs", partitions=[FP(
                                 partition=0, current_leader_epoch=3, fetch_offset=0,
                                 last_fetched_epoch=-1, log_start_offset=-1,
                                 partition_max_bytes=1 << 20)])],
                             forgotten_topics_data=[], rack_id="")
    assert call(broker.bootstrap, fetch, FetchResponse, 12).responses[0].partitions[0].error_code == 75

    def list_offsets(timestamp, current=-1):
        T = ListOffsetsRequest.ListOffsetsTopic
        P = T.ListOffsetsPartition
        req = ListOffsetsRequest[10](replica_id=-1, isolation_level=0, timeout_ms=1000, topics=[T(
            name="epochs", partitions=[P(partition_index=0, current_leader_epoch=current,
                                         timestamp=timestamp)])])
        (part,) = call(broker.bootstrap, req, ListOffsetsResponse, 10).topics[0].partitions
        return part.error_code, part.offset

    assert list_offsets(-1) == (0, 5)
    assert list_offsets(-2) == (0, 0)
    assert list_offsets(-4) == (0, 0)   # earliest local: the log start, no tiered storage
    assert list_offsets(-5) == (0, -1)  # latest tiered: none
    assert list_offsets(-1, current=3)[0] == 75
