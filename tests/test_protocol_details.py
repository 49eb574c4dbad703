"""Protocol details client libraries' own integration tests check (issue 9, item 6): KIP-467
per-record errors, every documented topic config accepted, and authorized operations."""

from confluent_kafka import KafkaError, Producer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic


def admin_for(broker):
    return KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)


def test_keyless_records_in_a_compacted_topic_are_named_one_by_one(broker):
    """KIP-467: the broker names the 10 keyless records of a 100-record batch (record_errors with
    their batch_index), so librdkafka fails exactly those with INVALID_RECORD and reports the
    other 90 as failed only because of them (_INVALID_DIFFERENT_RECORD). On a loaded machine
    librdkafka may split the 100 into several batches; a batch with no keyless record is then
    written, and only such batches' records succeed."""
    admin = admin_for(broker)
    admin.create_topics([NewTopic("compacted", 1, 1, topic_configs={"cleanup.policy": "compact"})])
    admin.close()
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 500, "acks": "all",
                  "batch.num.messages": 1000})
    reports = []
    for i in range(100):
        key = None if i % 10 == 3 else b"k%d" % i
        p.produce("compacted", key=key, value=b"v%d" % i,
                  on_delivery=lambda err, msg: reports.append((err, msg.key(), msg.value())))
    assert p.flush(30) == 0
    assert len(reports) == 100
    culprits = sorted(v for err, _, v in reports if err and err.code() == KafkaError.INVALID_RECORD)
    assert culprits == sorted(b"v%d" % i for i in range(3, 100, 10)), culprits
    others = [err for err, _, _ in reports if err and err.code() != KafkaError.INVALID_RECORD]
    written = sorted(int(v[1:]) for err, _, v in reports if err is None)
    print(f"{len(others)} failed because of another record, {len(written)} written: {written}")
    assert len(others) + len(written) == 90
    assert {e.code() for e in others} == {KafkaError._INVALID_DIFFERENT_RECORD}
    assert others, "no record was failed only because of another one in its batch"


STORED_CONFIGS = {
    "flush.ms": "1000", "flush.messages": "500", "message.format.version": "2.8",
    "file.delete.delay.ms": "30000", "preallocate": "true", "segment.jitter.ms": "100",
    "max.compaction.lag.ms": "86400000", "message.timestamp.after.max.ms": "3600000",
    "message.timestamp.before.max.ms": "3600000", "unclean.leader.election.enable": "false",
    "follower.replication.throttled.replicas": "0:0", "leader.replication.throttled.replicas": "*",
    "compression.zstd.level": "5", "segment.index.bytes": "1048576",
}


def test_every_documented_topic_config_is_accepted_stored_and_shown(broker):
    from confluent_kafka.admin import (AdminClient, AlterConfigOpType, ConfigEntry,
                                       ConfigResource as CResource, ResourceType)
    admin = admin_for(broker)
    admin.create_topics([NewTopic("configured", 1, 1, topic_configs={"flush.ms": "2000"})])
    # kafka-python's AlterConfigs (the legacy, whole-set API).
    admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, "configured",
                                        configs={"flush.ms": "1000", "message.format.version": "2.8"})])
    # confluent-kafka's IncrementalAlterConfigs, every stored config at once.
    ca = AdminClient({"bootstrap.servers": broker.bootstrap})
    res = CResource(ResourceType.TOPIC, "configured", incremental_configs=[
        ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in STORED_CONFIGS.items()])
    for f in ca.incremental_alter_configs([res]).values():
        f.result(10)
    described = ca.describe_configs([CResource(ResourceType.TOPIC, "configured")])
    entries = list(described.values())[0].result(10)
    for k, v in STORED_CONFIGS.items():
        assert entries[k].value == v, (k, entries[k].value)
        assert entries[k].source == 1, (k, entries[k].source)  # DYNAMIC_TOPIC_CONFIG
    # A default shows as such.
    assert entries["remote.storage.enable"].value == "false" and entries["remote.storage.enable"].source == 5
    # Values are validated with Kafka's types and ranges.
    for k, bad in [("flush.ms", "-5"), ("message.format.version", "banana"), ("preallocate", "maybe"),
                   ("remote.storage.enable", "true")]:
        bad_res = CResource(ResourceType.TOPIC, "configured", incremental_configs=[
            ConfigEntry(k, bad, incremental_operation=AlterConfigOpType.SET)])
        try:
            list(ca.incremental_alter_configs([bad_res]).values())[0].result(10)
            raise AssertionError(f"{k}={bad} was accepted")
        except Exception as e:  # KafkaException(INVALID_CONFIG)
            assert "INVALID_CONFIG" in str(e) or "Invalid" in str(e), (k, e)
    admin.close()


def test_authorized_operations_are_the_full_set_without_acls(broker):
    from confluent_kafka import TopicCollection
    from confluent_kafka.admin import AclOperation, AdminClient
    admin = admin_for(broker)
    admin.create_topics([NewTopic("authz", 1, 1)])
    admin.close()
    ca = AdminClient({"bootstrap.servers": broker.bootstrap})
    topic = ca.describe_topics(TopicCollection(["authz"]), include_authorized_operations=True)["authz"].result(10)
    assert set(topic.authorized_operations) == {
        AclOperation.READ, AclOperation.WRITE, AclOperation.CREATE, AclOperation.DELETE,
        AclOperation.ALTER, AclOperation.DESCRIBE, AclOperation.DESCRIBE_CONFIGS,
        AclOperation.ALTER_CONFIGS}, topic.authorized_operations
    cluster = ca.describe_cluster(include_authorized_operations=True).result(10)
    assert set(cluster.authorized_operations) == {
        AclOperation.CREATE, AclOperation.CLUSTER_ACTION, AclOperation.DESCRIBE_CONFIGS,
        AclOperation.ALTER_CONFIGS, AclOperation.IDEMPOTENT_WRITE, AclOperation.ALTER,
        AclOperation.DESCRIBE}, cluster.authorized_operations
    # A group that exists (offsets committed), described with its operations.
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "authz-group"})
    c.commit(offsets=[TopicPartition("authz", 0, 0)], asynchronous=False)
    c.close()
    group = ca.describe_consumer_groups(["authz-group"], include_authorized_operations=True)["authz-group"].result(10)
    assert set(group.authorized_operations) == {AclOperation.READ, AclOperation.DESCRIBE,
                                                AclOperation.DELETE}, group.authorized_operations
