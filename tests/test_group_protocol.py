"""Group-protocol behaviour that client libraries' own integration tests check (issue 9, item 6):
a member that vanishes during a rebalance, static membership (no revocation on a static
member's restart, fencing of a duplicate group.instance.id, expiry of closed static members), and
OffsetCommit to a topic that does not exist."""

import signal
import time

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient
from kafka.errors import UnknownTopicOrPartitionError
from kafka.structs import OffsetAndMetadata
from kafka.structs import TopicPartition as KTopicPartition

from test_groups import GROUP_SETTINGS, Member, Reader, create_topic, spawn_member, wait_until


@pytest.fixture
def gbroker(broker_factory):
    return broker_factory(extra_args=GROUP_SETTINGS, name="groups")


class CountingMember(Member):
    """A Member that counts revocations."""

    def __init__(self, *args, **kwargs):
        self.revocations = 0
        super().__init__(*args, **kwargs)

    def _on_revoke(self, consumer, partitions):
        if partitions:
            self.revocations += 1
        super()._on_revoke(consumer, partitions)


def describe(bootstrap, group):
    """(state, member count) as kafka-python's admin client describes the group."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        d = admin.describe_groups([group])[group]
        return d["group_state"], len(d["members"])
    finally:
        admin.close()


def test_member_that_vanishes_during_a_rebalance_is_expired(gbroker):
    """B is killed (no LeaveGroup) just as C's join starts a rebalance: B never rejoins. Its session
    (6 s) must expire and the rebalance complete with A and C, long before the 300 s rebalance
    timeout (max.poll.interval.ms) that bounds the join phase."""
    create_topic(gbroker.bootstrap, "vanish", 4)
    a = Member(gbroker.bootstrap, "vanishers", "vanish")
    b = Reader(spawn_member(gbroker.bootstrap, "vanishers", "vanish"))
    try:
        wait_until(lambda: len(a.assigned) == 2 and b.assigned() not in (None, ""), 30,
                   "A and B with two partitions each")
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        killed = time.time()
        c = Member(gbroker.bootstrap, "vanishers", "vanish")
        try:
            wait_until(lambda: len(a.assigned) == 2 and len(c.assigned) == 2, 30,
                       "A and C to share the four partitions")
            settled = time.time() - killed
            assert describe(gbroker.bootstrap, "vanishers") == ("Stable", 2)
            print(f"vanished member expired; group Stable with 2 members {settled:.1f} s after the kill")
        finally:
            c.close()
    finally:
        a.close()
        if b.proc.poll() is None:
            b.proc.kill()


def test_static_member_restart_revokes_nothing_from_the_others(gbroker):
    """Even when the restarting static member was the group's leader, and although its new
    subscription metadata differs (no owned partitions yet), the others keep their partitions:
    no revocation at all."""
    create_topic(gbroker.bootstrap, "static2", 4)
    conf = {"session.timeout.ms": 20000}
    members = {i: CountingMember(gbroker.bootstrap, "statics2", "static2",
                                 **{"group.instance.id": f"m{i}"}, **conf) for i in range(2)}
    try:
        wait_until(lambda: all(len(m.assigned) == 2 for m in members.values()), 30, "two each")
        before = {i: set(m.assigned) for i, m in members.items()}
        for restarting in (0, 1):
            members[restarting].close()
            members[restarting] = CountingMember(gbroker.bootstrap, "statics2", "static2",
                                                 **{"group.instance.id": f"m{restarting}"}, **conf)
            wait_until(lambda: members[restarting].assigned == before[restarting], 20,
                       "the restarted member to get its partitions back")
            time.sleep(2)
            other = members[1 - restarting]
            assert other.revocations == 0, f"member m{1 - restarting} was revoked"
            assert other.assigned == before[1 - restarting]
    finally:
        for m in members.values():
            m.close()


def test_second_consumer_with_the_same_instance_id_fences_the_first(gbroker):
    create_topic(gbroker.bootstrap, "fence", 1)
    conf = {"bootstrap.servers": gbroker.bootstrap, "group.id": "fencers", "group.instance.id": "dup",
            "session.timeout.ms": 10000, "heartbeat.interval.ms": 300, "auto.offset.reset": "earliest"}
    first = Consumer(conf)
    first.subscribe(["fence"])
    deadline = time.time() + 30
    while not first.assignment() and time.time() < deadline:
        first.poll(0.2)
    assert first.assignment()
    second = Consumer(conf)
    second.subscribe(["fence"])
    fenced = None
    deadline = time.time() + 30
    try:
        while fenced is None and time.time() < deadline:
            second.poll(0.1)
            try:
                m = first.poll(0.1)
                if m is not None and m.error():
                    print(f"first consumer error: {m.error()}")
                    if m.error().code() in (KafkaError._FATAL, KafkaError._FENCED,
                                            KafkaError.FENCED_INSTANCE_ID):
                        fenced = m.error()
            except KafkaException as e:
                fenced = e.args[0]
    finally:
        second.close()
        first.close()
    assert fenced is not None, "the first consumer was never fenced"
    # librdkafka raises a fatal error whose text names the broker's FENCED_INSTANCE_ID.
    assert fenced.code() in (KafkaError._FATAL, KafkaError._FENCED, KafkaError.FENCED_INSTANCE_ID), fenced
    assert "fenced" in str(fenced).lower(), fenced
    print(f"first consumer: {fenced}")


def test_closed_static_members_leave_when_their_session_expires(gbroker):
    create_topic(gbroker.bootstrap, "static3", 2)
    members = [Member(gbroker.bootstrap, "statics3", "static3",
                      **{"group.instance.id": f"s{i}", "session.timeout.ms": 6000}) for i in range(2)]
    wait_until(lambda: all(len(m.assigned) == 1 for m in members), 30, "one partition each")
    for m in members:
        m.close()  # static members send no LeaveGroup
    admin = KafkaAdminClient(bootstrap_servers=gbroker.bootstrap, request_timeout_ms=10000)
    try:
        wait_until(lambda: describe(gbroker.bootstrap, "statics3")[0] == "Empty", 20,
                   "the group to be empty once the sessions expired")
        result = admin.delete_groups(["statics3"])
        print(f"delete_groups: {result}")
        errors = dict(result) if not isinstance(result, dict) else result
        assert list(errors) == ["statics3"]
        assert getattr(errors["statics3"], "errno", 0) == 0, errors
    finally:
        admin.close()


def test_offset_commit_for_a_topic_that_does_not_exist(gbroker):
    create_topic(gbroker.bootstrap, "real", 2)
    admin = KafkaAdminClient(bootstrap_servers=gbroker.bootstrap, request_timeout_ms=10000)
    try:
        result = admin.alter_group_offsets("committers", {
            KTopicPartition("no-such-topic", 0): OffsetAndMetadata(5, "", -1),
            KTopicPartition("real", 7): OffsetAndMetadata(5, "", -1),
            KTopicPartition("real", 1): OffsetAndMetadata(5, "", -1),
        })
        print(f"alter_group_offsets: {result}")
        assert result[KTopicPartition("no-such-topic", 0)] is UnknownTopicOrPartitionError
        assert result[KTopicPartition("real", 7)] is UnknownTopicOrPartitionError
        assert result[KTopicPartition("real", 1)].errno == 0
    finally:
        admin.close()
    c = Consumer({"bootstrap.servers": gbroker.bootstrap, "group.id": "committers2"})
    try:
        c.commit(offsets=[TopicPartition("no-such-topic", 0, 5)], asynchronous=False)
        raised = None
    except KafkaException as e:
        raised = e.args[0]
    assert raised is not None and raised.code() == KafkaError.UNKNOWN_TOPIC_OR_PART, raised
    ok = c.commit(offsets=[TopicPartition("real", 0, 3)], asynchronous=False)
    assert [(tp.topic, tp.partition, tp.offset, tp.error) for tp in ok] == [("real", 0, 3, None)]
    c.close()


def test_list_groups_v5_reports_group_types(gbroker):
    from kafka.protocol.admin.groups import ListGroupsRequest, ListGroupsResponse
    from test_protocol_versions import call
    create_topic(gbroker.bootstrap, "typed", 1)
    c = Consumer({"bootstrap.servers": gbroker.bootstrap, "group.id": "typed-group"})
    c.commit(offsets=[TopicPartition("typed", 0, 1)], asynchronous=False)
    c.close()

    def listed(types):
        req = ListGroupsRequest[5](states_filter=[], types_filter=types)
        r = call(gbroker.bootstrap, req, ListGroupsResponse, 5)
        assert r.error_code == 0
        return [(g.group_id, g.group_type) for g in r.groups]

    assert listed([]) == [("typed-group", "classic")]
    assert listed(["classic"]) == [("typed-group", "classic")]
    assert listed(["consumer"]) == []  # no KIP-848 groups
