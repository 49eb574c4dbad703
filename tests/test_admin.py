"""kafka-python's admin client creates, lists and deletes topics; auto-creation and the topic
name rules follow Kafka."""

import os

import pytest
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import InvalidReplicationFactorError, InvalidTopicError, TopicAlreadyExistsError


@pytest.fixture
def admin(broker):
    a = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    yield a
    a.close()


def test_admin_creates_lists_and_deletes_topics(broker, admin):
    admin.create_topics([NewTopic("orders", 3, 1), NewTopic("payments", 1, 1)])
    assert {"orders", "payments"} <= set(admin.list_topics())
    described = {t["name"]: t for t in admin.describe_topics(["orders"])}
    assert len(described["orders"]["partitions"]) == 3
    assert os.path.isdir(broker.data_dir / "orders-2")

    admin.delete_topics(["payments"])
    assert "payments" not in set(admin.list_topics())
    assert not os.path.exists(broker.data_dir / "payments-0")


def test_create_existing_topic_is_refused(admin):
    admin.create_topics([NewTopic("dup", 1, 1)])
    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topics([NewTopic("dup", 1, 1)])


def test_invalid_topic_name_is_refused_and_not_created(admin):
    with pytest.raises(InvalidTopicError):
        admin.create_topics([NewTopic("bad name!", 1, 1)])
    assert "bad name!" not in admin.list_topics()


def test_replication_factor_beyond_the_brokers_is_refused(admin):
    with pytest.raises(InvalidReplicationFactorError):
        admin.create_topics([NewTopic("rf3", 1, 3)])


def test_validate_only_creates_nothing(admin):
    admin.create_topics([NewTopic("dry-run", 1, 1)], validate_only=True)
    assert "dry-run" not in admin.list_topics()


def test_metadata_auto_creates_a_topic_with_num_partitions(broker_factory):
    from confluent_kafka import Producer
    b = broker_factory(extra_args=["--set", "num.partitions=3"], name="auto")
    p = Producer({"bootstrap.servers": b.bootstrap})
    md = p.list_topics(topic="auto-made", timeout=10)
    assert sorted(md.topics["auto-made"].partitions) == [0, 1, 2]
    assert md.cluster_id and md.controller_id == 0


def test_auto_creation_can_be_turned_off(broker_factory):
    from confluent_kafka import Producer
    b = broker_factory(extra_args=["--set", "auto.create.topics.enable=false"], name="noauto")
    p = Producer({"bootstrap.servers": b.bootstrap})
    md = p.list_topics(topic="not-made", timeout=10)
    assert md.topics["not-made"].error is not None
    assert "not-made" not in p.list_topics(timeout=10).topics


def test_unknown_setting_is_refused_at_start(tmp_path):
    import subprocess
    from conftest import STROM_BIN
    out = subprocess.run([STROM_BIN, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"),
                          "--set", "log.retention.hourz=1"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "unknown broker setting 'log.retention.hourz'" in out.stderr
