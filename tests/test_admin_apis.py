"""The admin APIs Kafka's admin clients call (issue 9, item 4), each checked with kafka-python's or
confluent-kafka's admin client against the response Kafka documents for a single-node cluster."""

import os

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from kafka import TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic


@pytest.fixture
def admin(broker):
    a = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    yield a
    a.close()


def test_describe_cluster(broker, admin):
    d = admin.describe_cluster()
    assert d["controller_id"] == 0
    assert d["brokers"] == [{"broker_id": 0, "host": "127.0.0.1", "port": broker.port, "rack": None,
                             "is_fenced": False}]
    assert len(d["cluster_id"]) == 22  # a base64 UUID, as Kafka's
    # confluent-kafka's describe_cluster agrees.
    client = AdminClient({"bootstrap.servers": broker.bootstrap})
    c = client.describe_cluster().result(10)
    assert c.cluster_id == d["cluster_id"]
    assert [(n.id, n.host, n.port) for n in c.nodes] == [(0, "127.0.0.1", broker.port)]
    assert c.controller.id == 0


def test_describe_log_dirs_sizes_per_partition(broker, admin):
    admin.create_topics([NewTopic("sized", 2, 1)])
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all"})
    for _ in range(50):
        p.produce("sized", value=os.urandom(1000), partition=1)
    assert p.flush(10) == 0
    dirs = admin.describe_log_dirs()
    assert len(dirs) == 1 and dirs[0]["broker"] == 0
    (log_dir,) = dirs[0]["log_dirs"]
    assert log_dir["error_code"] == 0
    assert log_dir["log_dir"] == str(broker.data_dir.resolve())
    assert 0 < log_dir["usable_bytes"] <= log_dir["total_bytes"]
    parts = {(t["name"], p["partition_index"]): p for t in log_dir["topics"] for p in t["partitions"]}
    on_disk = lambda i: sum(f.stat().st_size for f in (broker.data_dir / f"sized-{i}").glob("*.log"))
    assert parts[("sized", 0)]["partition_size"] == 0
    # The bytes of the batches stored: 50 records of 1000 bytes and their framing.
    size = parts[("sized", 1)]["partition_size"]
    assert 50 * 1000 < size < 50 * 1000 + 50 * 100
    assert all(p["offset_lag"] == 0 and not p["is_future_key"] for p in parts.values())
    # Asking for one topic gives only its partitions.
    only = admin.describe_log_dirs(topic_partitions={"sized": [1]})[0]["log_dirs"][0]["topics"]
    assert [(t["name"], [p["partition_index"] for p in t["partitions"]]) for t in only] == [("sized", [1])]
    # Once stopped cleanly, the segments hold all of it (the file may be longer: O_DIRECT pads
    # its last block, which a clean stop cuts).
    broker.stop()
    assert size <= on_disk(1)


def test_describe_topic_partitions_pages_with_a_cursor(broker, admin):
    admin.create_topics([NewTopic("pa", 3, 1), NewTopic("pb", 2, 1)])
    pages = []
    cursor = None
    while True:
        r = admin.describe_topic_partitions(["pb", "pa"], response_partition_limit=2, cursor=cursor)
        pages.append([(t["name"], [p["partition_index"] for p in t["partitions"]]) for t in r["topics"]])
        for t in r["topics"]:
            assert t["error_code"] == 0 and not t["is_internal"] and t["topic_id"] is not None
            for p in t["partitions"]:
                assert (p["leader_id"], p["replica_nodes"], p["isr_nodes"]) == (0, [0], [0])
        cursor = r["next_cursor"]
        if cursor is None:
            break
    # Topics in name order, two partitions per page, the cursor naming the next one.
    assert pages == [[("pa", [0, 1])], [("pa", [2]), ("pb", [0])], [("pb", [1])]]
    unknown = admin.describe_topic_partitions(["nope"])
    assert [(t["name"], t["error_code"]) for t in unknown["topics"]] == [("nope", 3)]


def test_elect_leaders_is_not_needed_on_one_node(broker, admin):
    admin.create_topics([NewTopic("elect", 2, 1)])
    r = admin.elect_leaders(0, {"elect": [0, 1, 5]}, raise_errors=False)
    assert r.error_code == 0
    got = {(res.topic, p.partition_id): p.error_code for res in r.replica_election_results
           for p in res.partition_result}
    # ELECTION_NOT_NEEDED (84): the only replica is already the preferred leader.
    assert got == {("elect", 0): 84, ("elect", 1): 84, ("elect", 5): 3}
    # Every partition (kafka-python names them all): none needs an election.
    every = admin.elect_leaders(0, None, raise_errors=False)
    assert {p.error_code for res in every.replica_election_results for p in res.partition_result} == {84}


def test_describe_quorum_on_one_node_is_an_invalid_request(broker, admin):
    """A single node has no Raft quorum: DescribeQuorum is refused with INVALID_REQUEST (with
    its message from v2), as Kafka refuses it where there is no KRaft quorum to describe."""
    from kafka.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError, match="single node"):
        admin.describe_metadata_quorum()


def test_describe_producers(broker, admin):
    admin.create_topics([NewTopic("idem", 2, 1)])
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    for _ in range(7):
        p.produce("idem", value=b"x", partition=0)
    assert p.flush(10) == 0
    r = admin.describe_producers([TopicPartition("idem", 0), TopicPartition("idem", 1)])
    (state,) = r[TopicPartition("idem", 0)].active_producers
    assert state.producer_id >= 0 and state.producer_epoch == 0
    assert state.last_sequence == 6  # sequences 0..6
    assert state.last_timestamp > 0
    assert (state.coordinator_epoch, state.current_transaction_start_offset) == (-1, -1)
    assert r[TopicPartition("idem", 1)].active_producers == []


def test_list_config_resources(broker, admin):
    admin.create_topics([NewTopic("cfg1", 1, 1), NewTopic("cfg2", 1, 1)])
    from confluent_kafka import Consumer, TopicPartition as CTP
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "listed"})
    c.commit(offsets=[CTP("cfg1", 0, 0)], asynchronous=False)
    c.close()
    r = admin.list_config_resources()
    assert {k: sorted(v) for k, v in r.items()} == {
        "topic": ["__consumer_offsets", "cfg1", "cfg2"], "broker": ["0"], "group": ["listed"]}
    assert {k: sorted(v) for k, v in admin.list_config_resources(["TOPIC"]).items()} == {
        "topic": ["__consumer_offsets", "cfg1", "cfg2"]}


def test_broker_configs_report_their_sources(broker_factory):
    b = broker_factory(extra_args=["--set", "node.id=0", "--set", "log.retention.hours=24"],
                       name="sources")
    admin = KafkaAdminClient(bootstrap_servers=b.bootstrap, request_timeout_ms=10000)
    try:
        r = admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, "0")], config_filter="all")
    finally:
        admin.close()
    configs = r["broker"]["0"]
    got = {n: (configs[n]["value"], configs[n]["config_source"], configs[n]["read_only"])
           for n in ("listeners", "advertised.listeners", "log.dirs", "node.id", "log.retention.hours",
                     "log.segment.bytes")}
    print(got)
    assert got == {
        "listeners": ("PLAINTEXT://127.0.0.1:0", "STATIC_BROKER_CONFIG", True),
        "advertised.listeners": (f"PLAINTEXT://127.0.0.1:{b.port}", "STATIC_BROKER_CONFIG", True),
        "log.dirs": (str(b.data_dir.resolve()), "STATIC_BROKER_CONFIG", True),
        "node.id": ("0", "STATIC_BROKER_CONFIG", True),
        "log.retention.hours": ("24", "STATIC_BROKER_CONFIG", True),
        "log.segment.bytes": ("1073741824", "DEFAULT_CONFIG", False),
    }


def test_strom_topic_describe_shows_the_topic_id_and_its_overrides(broker, admin):
    import base64
    import subprocess
    from conftest import STROM_BIN
    admin.create_topics([NewTopic("shown", 2, 1, topic_configs={"retention.ms": "60000",
                                                                 "flush.ms": "1000"})])
    (t,) = admin.describe_topic_partitions(["shown"])["topics"]
    kafka_id = base64.urlsafe_b64encode(t["topic_id"].bytes).decode().rstrip("=")
    out = subprocess.run([STROM_BIN, "topic", "describe", "shown", "--bootstrap", broker.bootstrap],
                         capture_output=True, check=True, text=True).stdout
    first = out.splitlines()[0].split("\t")
    assert first[0] == "Topic: shown"
    assert first[1] == f"TopicId: {kafka_id}" and kafka_id != "AAAAAAAAAAAAAAAAAAAAAA"
    assert first[2:4] == ["PartitionCount: 2", "ReplicationFactor: 1"]
    # Only what differs from the defaults, as kafka-topics --describe shows it.
    assert sorted(first[4].removeprefix("Configs: ").split(",")) == ["flush.ms=1000", "retention.ms=60000"]
