"""A three-broker cluster on 127.0.0.1, 127.0.0.2 and 127.0.0.3: real `strom` processes joined by
`controller.quorum.voters`, driven by confluent-kafka (idempotent, acks=all) and kafka-python.

Each fault scenario prints one line: acknowledged, read back, lost, duplicated. The short version
runs in CI; STROM_CLUSTER_FULL=1 runs more records per scenario. STROM_CLUSTER_SEED fixes the seed.
"""

import os
import pathlib
import random
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from conftest import STROM_BIN

FULL = os.environ.get("STROM_CLUSTER_FULL") == "1"
RECORDS_PER_PHASE = 20000 if FULL else 3000
PARTITIONS = 6


class Node:
    def __init__(self, node_id, data_dir, port, voters, extra=()):
        self.node_id = node_id
        self.host = f"127.0.0.{node_id}"
        self.port = port
        self.data_dir = pathlib.Path(data_dir)
        self.voters = voters
        self.extra = list(extra)
        self.proc = None
        self.log_path = self.data_dir.parent / f"node{node_id}.log"

    @property
    def bootstrap(self):
        return f"{self.host}:{self.port}"

    def start(self):
        args = [STROM_BIN, "serve", "--listen", self.bootstrap, "--data-dir", str(self.data_dir),
                "--admin-listen", f"{self.host}:0", "--cores", "0-1",
                "--set", f"node.id={self.node_id}",
                "--set", f"controller.quorum.voters={self.voters}"] + self.extra
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log,
                                     env=dict(os.environ, RUST_LOG=os.environ.get("STROM_CLUSTER_LOG", "info")))
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"strom admin on"):
                self.admin = line.strip().split(b" on ")[1].decode()
            if line.startswith(b"strom listening on"):
                return self
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"node {self.node_id} did not start:\n{self.log_path.read_text()}")

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        """SIGTERM; returns a complaint if the broker did not stop cleanly (None if it did or was
        not running)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return f"node {self.node_id} did not stop within 15 s of SIGTERM"
            if code != 0:
                return f"node {self.node_id} exited with {code} on SIGTERM"
        if "panicked" in self.log_path.read_text():
            return f"node {self.node_id} panicked (see {self.log_path})"
        return None


class LinkProxy:
    """A fault-injecting proxy in front of one broker's inter-broker listener. Brokers connect
    from their own 127.0.0.x address, so the proxy knows which broker is calling; `cut` drops
    every connection from or to the named brokers and refuses new ones until `heal`."""

    def __init__(self, host, port, target):
        self.host = host
        self.target = target
        self.blocked = set()
        self.conns = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                client, (src, _) = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if src in self.blocked or self.host in self.blocked:
                    client.close()
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            # The timeout was for the connect only: a link carries Raft traffic one way, so the
            # other way stays idle (a 2 s read timeout there cut every link every few seconds).
            upstream.settimeout(None)
            with self.lock:
                self.conns.append((src, client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self, hosts):
        with self.lock:
            self.blocked |= set(hosts)
            keep = []
            for src, c, u in self.conns:
                if src in self.blocked or self.host in self.blocked:
                    for s in (c, u):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                else:
                    keep.append((src, c, u))
            self.conns = keep

    def heal(self):
        with self.lock:
            self.blocked.clear()

    def close(self):
        self.closed = True
        self.sock.close()
        self.cut({self.host})


@pytest.fixture
def cluster(tmp_path):
    """Three brokers; each one's broker-to-broker traffic passes through a LinkProxy."""
    yield from start_cluster(tmp_path)


@pytest.fixture
def quick_cluster(tmp_path):
    """Three brokers that fence a silent broker and shrink the ISR after 4 s (Kafka's defaults
    are 9 s and 30 s)."""
    yield from start_cluster(tmp_path, ["--set", "broker.session.timeout.ms=4000",
                                        "--set", "replica.lag.time.max.ms=4000"])


@pytest.fixture
def trimming_cluster(tmp_path):
    """As quick_cluster, with each partition's Raft log compacted from 64 KiB (default 64 MiB)."""
    yield from start_cluster(tmp_path, ["--set", "broker.session.timeout.ms=4000",
                                        "--set", "replica.lag.time.max.ms=4000",
                                        "--set", "strom.raft.log.compact.bytes=65536"])


def start_cluster(tmp_path, settings=()):
    for attempt in range(5):
        # Below the kernel's ephemeral range (32768 up), so no outgoing connection holds the port.
        port = random.Random().randrange(20000, 32000, 4)
        voters = ",".join(f"{i}@127.0.0.{i}:{port + 2}" for i in (1, 2, 3))
        proxies = []
        try:
            for i in (1, 2, 3):
                proxies.append(LinkProxy(f"127.0.0.{i}", port + 2, (f"127.0.0.{i}", port + 1)))
        except OSError:  # another test's port: pick again
            for p in proxies:
                p.close()
            continue
        break
    nodes = [Node(i, tmp_path / f"node{i}", port, voters,
                  extra=["--set", f"inter.broker.listen=127.0.0.{i}:{port + 1}", *settings])
             for i in (1, 2, 3)]
    for n in nodes:
        n.proxies = proxies
        n.start()
    wait_formed(nodes)
    yield nodes
    complaints = [c for c in (n.stop() for n in nodes) if c]
    for p in proxies:
        p.close()
    assert not complaints, complaints


def wait_formed(nodes, timeout=90):
    """Every broker names all three brokers and a controller, as an operator checks with kcat -L
    before creating topics: replicas go to the brokers registered when a topic is created.
    (Formation takes a few seconds. The first election used to take 30 s and more at times:
    LinkProxy cut every link every few seconds, a read timeout on the idle direction.)"""
    started = time.time()
    deadline = started + timeout
    pending = list(nodes)
    while pending and time.time() < deadline:
        out = subprocess.run(["kcat", "-b", pending[0].bootstrap, "-L", "-m", "3"],
                             capture_output=True, text=True).stdout
        if " 3 brokers:" in out and "(controller)" in out:
            pending.pop(0)
        else:
            time.sleep(0.2)
    logs = "\n".join(f"--- node {n.node_id}:\n" + "\n".join(n.log_path.read_text().splitlines()[-15:])
                     for n in nodes)
    assert not pending, f"cluster not formed in {timeout} s: {out}\n{logs}"
    print(f"cluster formed in {time.time() - started:.1f} s")


def isolate(nodes, victim):
    """Cuts every link between `victim` and the other brokers (clients still reach it)."""
    for p in nodes[0].proxies:
        p.cut({victim.host})


def heal(nodes):
    for p in nodes[0].proxies:
        p.heal()


def bootstrap(nodes):
    return ",".join(n.bootstrap for n in nodes)


def wait_for_leaders(nodes, topic, partitions, timeout=30):
    """Every partition has a leader in the metadata of some live broker; returns {partition: id}."""
    deadline = time.time() + timeout
    last = None
    ids = {1, 2, 3} | {n.node_id for n in nodes}
    while time.time() < deadline:
        for n in nodes:
            if n.proc.poll() is not None:
                continue
            out = subprocess.run(["kcat", "-b", n.bootstrap, "-L", "-t", topic, "-m", "3"],
                                 capture_output=True, text=True).stdout
            leaders = {int(p): int(l) for p, l in re.findall(r"partition (\d+), leader (-?\d+)", out)}
            last = out
            if len(leaders) == partitions and all(l in ids for l in leaders.values()):
                return leaders
            assert all(l in ids | {-1} for l in leaders.values()), out
        time.sleep(0.3)
    raise AssertionError(f"partitions without a leader:\n{last}")


def node_leading(nodes, leaders, rng):
    """The broker leading a partition chosen by the seeded generator."""
    leader = leaders[rng.randrange(len(leaders))]
    return next(n for n in nodes if n.node_id == leader)


def create_topic(nodes, name, partitions=PARTITIONS, rf=3, configs=None):
    deadline = time.time() + 30
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap(nodes), request_timeout_ms=10000)
            admin.create_topics([NewTopic(name, partitions, rf, topic_configs=configs or {})])
            admin.close()
            break
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    return wait_for_leaders(nodes, name, partitions)


class Load:
    """An idempotent acks=all producer writing numbered values until stopped."""

    def __init__(self, nodes, topic, seed, size=0):
        self.rng = random.Random(seed)
        self.topic = topic
        self.size = size  # values padded with spaces to this many bytes
        self.producer = Producer({"bootstrap.servers": bootstrap(nodes), "enable.idempotence": True,
                                  "acks": "all", "linger.ms": 2, "message.timeout.ms": 60000,
                                  "request.timeout.ms": 5000,
                                  # A paused leader answers nothing: refresh leaders often.
                                  "topic.metadata.refresh.interval.ms": 2000})
        self.acked = {}  # value -> (partition, offset)
        self.errors = []
        self.next = 0

    def produce(self, count):
        def cb(err, msg):
            if err:
                self.errors.append(str(err))
            else:
                self.acked[msg.value().decode()] = (msg.partition(), msg.offset())
        for _ in range(count):
            value = f"v{self.next}".ljust(self.size)
            self.next += 1
            key = str(self.rng.randrange(1000)).encode()
            while True:
                try:
                    self.producer.produce(self.topic, key=key, value=value.encode(), on_delivery=cb)
                    break
                except BufferError:
                    self.producer.poll(0.1)
            self.producer.poll(0)

    def flush(self):
        left = self.producer.flush(90)
        assert left == 0, f"{left} records never answered"


def read_all(nodes, topic, partitions=PARTITIONS, expect=0, timeout=60):
    consumer = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": "reader",
                         "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.time() + timeout
    idle_since = time.time()
    while time.time() < deadline:
        m = consumer.poll(0.5)
        if m is None:
            if len(got) >= expect and time.time() - idle_since > 3:
                break
            continue
        if m.error():
            continue
        idle_since = time.time()
        got.append((m.partition(), m.offset(), m.value().decode()))
    consumer.close()
    return got


def check(name, load, got, seed):
    counts = {}
    for _, _, v in got:
        counts[v] = counts.get(v, 0) + 1
    lost = [v for v in load.acked if v not in counts]
    duplicated = [v for v, c in counts.items() if c > 1]
    kinds = sorted({e.split(":")[0] for e in load.errors})
    print(f"scenario {name}: seed {seed} acknowledged {len(load.acked)} read back {len(got)} "
          f"lost {len(lost)} duplicated {len(duplicated)} "
          f"(not acknowledged so far: {load.next - len(load.acked)} {kinds})")
    assert not lost, f"lost acknowledged records, e.g. {lost[:5]}"
    assert not duplicated, f"duplicated records, e.g. {duplicated[:5]}"
    # Acknowledged offsets are where the records are.
    where = {v: (p, o) for p, o, v in got}
    wrong = [v for v, po in load.acked.items() if where.get(v) != po]
    assert not wrong, f"records not at their acknowledged offsets, e.g. {wrong[:5]}"
    # Per partition, offsets are dense and values from the one producer keep their order.
    by_partition = {}
    for p, o, v in got:
        by_partition.setdefault(p, []).append((o, int(v[1:])))
    for p, items in by_partition.items():
        items.sort()
        values = [v for _, v in items]
        assert values == sorted(values), f"partition {p}: order differs from the producer's"


class GroupAudit:
    """A consumer group that reads a share of the records after each fault and commits; its
    committed offsets must never go backwards."""

    def __init__(self, nodes, topic):
        self.nodes = nodes
        self.topic = topic
        self.committed = {}

    def step(self, count=500):
        c = Consumer({"bootstrap.servers": bootstrap(self.nodes), "group.id": "audit",
                      "enable.auto.commit": False, "auto.offset.reset": "earliest"})
        c.subscribe([self.topic])
        n = 0
        deadline = time.time() + 60
        while n < count and time.time() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                n += 1
        for _ in range(20):
            try:
                c.commit(asynchronous=False)
                break
            except KafkaException:
                time.sleep(0.5)
        got = c.committed([TopicPartition(self.topic, p) for p in range(PARTITIONS)], timeout=30)
        c.close()
        now = {tp.partition: tp.offset for tp in got}
        for p, before in self.committed.items():
            assert now.get(p, -1) >= before, f"committed offset of {p} went back: {before} -> {now}"
        self.committed = {p: o for p, o in now.items() if o >= 0}
        assert n > 0, "the group read nothing"
        return n


def segment_bytes(data_dir, topic, partition):
    d = pathlib.Path(data_dir) / f"{topic}-{partition}"
    out = b"".join(f.read_bytes() for f in sorted(d.glob("*.log")))
    return out.rstrip(b"\0")


def check_replicas_identical(nodes, topic, partitions=PARTITIONS):
    """The replicas' segment files agree: each is a prefix of the longest (followers may lag)."""
    for p in range(partitions):
        logs = [segment_bytes(n.data_dir, topic, p) for n in nodes]
        longest = max(logs, key=len)
        for n, log in zip(nodes, logs):
            assert longest.startswith(log), f"node {n.node_id} partition {p} diverged"


def test_cluster_forms_and_replicates(cluster):
    nodes = cluster
    leaders = create_topic(nodes, "basic")
    out = subprocess.run(["kcat", "-b", nodes[1].bootstrap, "-L"], capture_output=True, text=True).stdout
    assert "3 brokers" in out, out
    for i in (1, 2, 3):
        assert f"broker {i} at 127.0.0.{i}:" in out, out
    assert "(controller)" in out
    assert set(leaders.values()) <= {1, 2, 3}
    admin = KafkaAdminClient(bootstrap_servers=nodes[0].bootstrap, request_timeout_ms=10000)
    described = admin.describe_cluster()
    admin.close()
    assert sorted(b["broker_id"] for b in described["brokers"]) == [1, 2, 3], described
    assert described["controller_id"] in (1, 2, 3), described
    seed = int(os.environ.get("STROM_CLUSTER_SEED", random.randrange(1 << 30)))
    load = Load(nodes, "basic", seed)
    load.produce(2000)
    load.flush()
    assert not load.errors, load.errors[:3]
    check("steady", load, read_all(nodes, "basic", expect=len(load.acked)), seed)
    # The operator's view: every broker reports each group's Raft state; leaders their followers.
    import urllib.request
    time.sleep(1.5)
    leading = 0
    for n in nodes:
        text = urllib.request.urlopen(f"http://{n.admin}/metrics", timeout=10).read().decode()
        terms = re.findall(r'strom_raft_term\{partition="basic-(\d+)"\} (\d+)', text)
        assert len(terms) == PARTITIONS, text[-2000:]
        assert all(int(t) >= 1 for _, t in terms)
        lags = re.findall(r'strom_raft_follower_lag_entries\{partition="basic-\d+",follower="\d"\} (\d+)', text)
        leading += len(lags) // 2
        assert all(int(l) == 0 for l in lags), lags
    assert leading == PARTITIONS
    # Idle, the groups (6 partitions and 50 of __consumer_offsets) only heartbeat: the heartbeats
    # of all groups a shard leads go to a peer as one frame, not one frame each.
    def raft_counters(n):
        text = urllib.request.urlopen(f"http://{n.admin}/metrics", timeout=10).read().decode()
        return [sum(int(v) for v in re.findall(rf'strom_raft_{name}_sent_total\{{shard="\d+"\}} (\d+)', text))
                for name in ("messages", "frames")]
    before = [raft_counters(n) for n in nodes]
    time.sleep(3)
    after = [raft_counters(n) for n in nodes]
    messages = sum(a[0] - b[0] for a, b in zip(after, before))
    frames = sum(a[1] - b[1] for a, b in zip(after, before))
    print(f"idle for 3 s: {messages} raft messages in {frames} frames")
    # About 5 to 1 here (a frame per message without batching); the ratio grows with partitions.
    assert messages > 0 and frames * 2 <= messages, (messages, frames)
    # Every replica holds the data in its segments, the same bytes: after a clean stop (until
    # then the shard journals may hold the latest batches, with the segments behind them).
    for n in nodes:
        assert n.stop() is None
    check_replicas_identical(nodes, "basic")
    for n in nodes:
        for p in range(PARTITIONS):
            assert segment_bytes(n.data_dir, "basic", p), f"node {n.node_id} has no data for {p}"


def test_cluster_failover_keeps_every_acknowledged_record(cluster):
    nodes = cluster
    seed = int(os.environ.get("STROM_CLUSTER_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    create_topic(nodes, "orders")
    load = Load(nodes, "orders", seed)
    audit = GroupAudit(nodes, "orders")
    load.produce(RECORDS_PER_PHASE)
    load.flush()
    audit.step()

    def fault(name, inject, recover, settle=0, during=True):
        """Inject a fault, produce through it (unless nothing can serve), recover, produce
        again, then check everything."""
        leader = node_leading(nodes, wait_for_leaders(nodes, "orders", PARTITIONS), rng)
        inject(leader)
        time.sleep(settle)
        if during:
            load.produce(RECORDS_PER_PHASE)
            load.flush()
        recover(leader)
        wait_for_leaders(nodes, "orders", PARTITIONS)
        load.produce(RECORDS_PER_PHASE)
        load.flush()
        check(name, load, read_all(nodes, "orders", expect=len(load.acked)), seed)
        audit.step()

    # (1) kill -9 the leader of a partition, keep producing, restart it.
    fault("kill -9 leader", Node.kill9, Node.start)
    # (2) pause a leader past the election timeout, produce, resume: it steps down.
    fault("SIGSTOP leader", lambda n: n.proc.send_signal(signal.SIGSTOP),
          lambda n: n.proc.send_signal(signal.SIGCONT), settle=3)
    # (3) one broker cut off from the others (clients still reach it), then healed.
    fault("broker cut off", lambda n: isolate(nodes, n), lambda n: heal(nodes), settle=3)
    # (4) all three killed together and restarted.
    fault("kill -9 all", lambda n: [m.kill9() for m in nodes],
          lambda n: [m.start() for m in nodes], during=False)
    assert not [e for e in load.errors if "Fatal" in e], load.errors[:3]
    time.sleep(2)
    check_replicas_identical(nodes, "orders")


def test_a_follower_refuses_fetch_with_not_leader_or_follower(cluster):
    import socket
    import struct
    from kafka.protocol.consumer.fetch import FetchRequest, FetchResponse
    ft = FetchRequest.FetchTopic
    fp = ft.FetchPartition
    nodes = cluster
    leaders = create_topic(nodes, "lead", partitions=1)
    follower = next(n for n in nodes if n.node_id != leaders[0])
    req = FetchRequest[12](
        replica_id=-1, max_wait_ms=0, min_bytes=0, max_bytes=1 << 20, isolation_level=0,
        session_id=0, session_epoch=-1,
        topics=[ft(topic="lead", partitions=[fp(
            partition=0, current_leader_epoch=-1, fetch_offset=0, last_fetched_epoch=-1,
            log_start_offset=-1, partition_max_bytes=1 << 20)])],
        forgotten_topics_data=[], rack_id="")
    req.with_header(correlation_id=1, client_id="strom-test")
    with socket.create_connection((follower.host, follower.port), timeout=10) as s:
        s.sendall(req.encode(header=True, framed=True))
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        r = FetchResponse.decode(s.recv(size, socket.MSG_WAITALL), version=12, header=True)
    code = r.responses[0].partitions[0].error_code
    assert code == 6, f"expected NOT_LEADER_OR_FOLLOWER (6) from a follower, got {code}"


def raw_produce(node, topic, partition, acks=-1):
    """One Produce v7 request with one record straight to `node`; returns the error code."""
    import struct
    from kafka.protocol.producer.produce import ProduceRequest, ProduceResponse
    from kafka.record.memory_records import MemoryRecordsBuilder
    builder = MemoryRecordsBuilder(magic=2, compression_type=0, batch_size=1 << 20)
    builder.append(timestamp=None, key=b"k", value=b"raw", headers=[])
    builder.close()
    tpd = ProduceRequest.TopicProduceData
    req = ProduceRequest[7](
        transactional_id=None, acks=acks, timeout_ms=10000,
        topic_data=[tpd(name=topic, partition_data=[tpd.PartitionProduceData(
            index=partition, records=bytes(builder.buffer()))])])
    req.with_header(correlation_id=1, client_id="strom-test")
    with socket.create_connection((node.host, node.port), timeout=30) as s:
        s.sendall(req.encode(header=True, framed=True))
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        r = ProduceResponse.decode(s.recv(size, socket.MSG_WAITALL), version=7, header=True)
    return r.responses[0].partition_responses[0].error_code


def until_refused(node, topic, timeout=20):
    """acks=all at `node` until it answers NOT_ENOUGH_REPLICAS (19): a dead follower stays in the
    ISR for replica.lag.time.max.ms, as in Kafka."""
    deadline = time.time() + timeout
    code = None
    while time.time() < deadline:
        code = raw_produce(node, topic, 0, acks=-1)
        if code == 19:
            return code
        time.sleep(0.5)
    return code


def test_min_insync_replicas_refuses_acks_all_and_loses_nothing(quick_cluster):
    nodes = quick_cluster
    seed = int(os.environ.get("STROM_CLUSTER_SEED", random.randrange(1 << 30)))
    leaders = create_topic(nodes, "safe", partitions=1, configs={"min.insync.replicas": "3"})
    load = Load(nodes, "safe", seed)
    load.produce(500)
    load.flush()
    leader = next(n for n in nodes if n.node_id == leaders[0])
    followers = [n for n in nodes if n is not leader]
    # One replica down, three required: the leader refuses acks=all, takes acks=1.
    followers[0].kill9()
    assert until_refused(leader, "safe") == 19  # NOT_ENOUGH_REPLICAS once the ISR shrank
    assert raw_produce(leader, "safe", 0, acks=1) == 0
    # Two replicas down: nobody can commit; acks=all is refused, never acknowledged.
    followers[1].kill9()
    assert until_refused(leader, "safe") == 19
    for n in followers:
        n.start()
    wait_for_leaders(nodes, "safe", 1)
    load.produce(500)
    load.flush()
    got = [g for g in read_all(nodes, "safe", partitions=1, expect=len(load.acked) + 1)
           if g[2] != "raw"]
    check("two of three down", load, got, seed)


def test_a_consumer_reading_through_a_leader_change_misses_and_repeats_nothing(cluster):
    """One consumer keeps fetching while the partition's leader is killed: it follows the new
    leader (validating its position with OffsetForLeaderEpoch, KIP-320) and sees every
    acknowledged record once."""
    nodes = cluster
    seed = int(os.environ.get("STROM_CLUSTER_SEED", random.randrange(1 << 30)))
    leaders = create_topic(nodes, "follow", partitions=1)
    load = Load(nodes, "follow", seed)
    consumer = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": "follow",
                         "enable.auto.commit": False, "topic.metadata.refresh.interval.ms": 2000})
    consumer.assign([TopicPartition("follow", 0, 0)])
    seen = []

    def poll_for(seconds):
        deadline = time.time() + seconds
        while time.time() < deadline:
            m = consumer.poll(0.2)
            if m is not None and not m.error():
                seen.append((0, m.offset(), m.value().decode()))

    load.produce(1000)
    load.flush()
    poll_for(3)
    node_leading(nodes, leaders, random.Random(seed)).kill9()
    load.produce(1000)
    load.flush()
    poll_for(8)
    consumer.close()
    check("consumer across a leader change", load, seen, seed)


def test_every_broker_names_leaders_of_partitions_it_does_not_hold(cluster):
    """Replication factor 1 on three brokers: each partition lives on one broker, and the others
    learn its leader through the controller, so Metadata from any broker is complete."""
    nodes = cluster
    create_topic(nodes, "single", partitions=6, rf=1)
    for n in nodes:
        leaders = wait_for_leaders([n], "single", 6)
        assert set(leaders.values()) == {1, 2, 3}, leaders
    load = Load(nodes, "single", 7)
    load.produce(600)
    load.flush()
    assert not load.errors, load.errors[:3]
    check("replication factor 1", load, read_all(nodes, "single", partitions=6,
                                                  expect=len(load.acked)), 7)


def cluster_status(node):
    return subprocess.run([STROM_BIN, "cluster", "status", "--bootstrap", node.bootstrap],
                          capture_output=True, text=True, check=True).stdout


def health(node, topic):
    """(brokers listed, {partition: (replicas, isr)}) from kcat -L at `node`."""
    out = subprocess.run(["kcat", "-b", node.bootstrap, "-L", "-t", topic, "-m", "3"],
                         capture_output=True, text=True).stdout
    brokers = sorted(int(b) for b in re.findall(r"broker (\d+) at", out))
    parts = {int(p): (r, i) for p, r, i in
             re.findall(r"partition (\d+), leader -?\d+, replicas: ([\d,]*), isrs: ([\d,]*)", out)}
    return brokers, parts, out


def wait_health(node, topic, want, timeout=40):
    deadline = time.time() + timeout
    while time.time() < deadline:
        brokers, parts, out = health(node, topic)
        if want(brokers, parts):
            return brokers, parts
        time.sleep(0.5)
    raise AssertionError(f"cluster health not reached in {timeout} s:\n{out}\n{cluster_status(node)}")


def wait_status(node, want, timeout=30):
    """Polls `strom cluster status` at `node` until `want(status)` holds."""
    deadline = time.time() + timeout
    while True:
        status = cluster_status(node)
        if want(status):
            return status
        assert time.time() < deadline, f"cluster status not reached in {timeout} s:\n{status}"
        time.sleep(0.5)


def test_dead_broker_is_fenced_and_leaves_the_isr_then_rejoins(quick_cluster):
    """kill -9 of a broker: after the session timeout Metadata stops listing it and its replicas
    leave the ISR, `strom cluster status` shows it not live and the partitions under-replicated;
    restarted, it is listed again and rejoins every ISR."""
    nodes = quick_cluster
    create_topic(nodes, "health", partitions=3, rf=3)
    load = Load(nodes, "health", 11)
    load.produce(300)
    load.flush()
    full = wait_health(nodes[0], "health", lambda b, parts: b == [1, 2, 3] and all(
        i.split(",") == ["1", "2", "3"] for _, i in parts.values()) and len(parts) == 3)
    status = cluster_status(nodes[0])
    assert "Brokers: 3 live, 0 not live" in status and "Under-replicated: 0" in status, status
    # Each partition's Raft state, from its leader (DescribeQuorum): both followers listed.
    for line in raft_lines(nodes[0], "health"):
        assert len(re.search(r"\tFollowers: (\S+)", line).group(1).split(",")) == 2, line
    quorum = metadata_quorum(nodes)
    assert sorted(v["replica_id"] for v in quorum["current_voters"]) == [1, 2, 3], quorum
    assert quorum["leader_id"] in (1, 2, 3) and quorum["high_watermark"] > 0, quorum
    # A data partition's quorum is described by its leader; a follower refuses.
    from kafka.protocol.admin import DescribeQuorumRequest, DescribeQuorumResponse
    leader = int(re.search(r"Partition: 0\tLeader: (\d+)", raft_lines(nodes[0], "health")[0]).group(1))
    td = DescribeQuorumRequest[1].TopicData
    asked = {n.node_id: raw_admin(n, DescribeQuorumRequest, DescribeQuorumResponse, 1, topics=[
        td(topic_name="health", partitions=[td.PartitionData(partition_index=0)])]).topics[0].partitions[0]
        for n in nodes}
    assert asked[leader].error_code == 0 and asked[leader].leader_id == leader, asked[leader]
    assert sorted(v.replica_id for v in asked[leader].current_voters) == [1, 2, 3], asked[leader]
    assert all(p.error_code == 6 for i, p in asked.items() if i != leader), asked  # NOT_LEADER_OR_FOLLOWER
    # The metadata quorum is described by every broker: those that are not the controller
    # forward the request to it.
    answers = [raw_admin(n, DescribeQuorumRequest, DescribeQuorumResponse, 1, topics=[
        td(topic_name="__cluster_metadata", partitions=[td.PartitionData(partition_index=0)])
    ]).topics[0].partitions[0] for n in nodes]
    assert all(a.error_code == 0 and a.leader_id == quorum["leader_id"] for a in answers), answers

    victim = nodes[2]
    victim.kill9()
    watcher = nodes[0]
    brokers, parts = wait_health(watcher, "health", lambda b, parts: b == [1, 2] and len(parts) == 3
                                 and all("3" not in i.split(",") for _, i in parts.values()))
    assert all(r.split(",") and "3" in r.split(",") for r, _ in parts.values()), parts
    wait_status(watcher, lambda status: "Brokers: 2 live, 1 not live" in status
                and "\tBroker: 3\t-\tnot live" in status
                and sum(line.startswith("\tUnder-replicated: health-") for line in status.splitlines()) == 3)
    # Writes go on with two of three in sync.
    load.produce(300)
    load.flush()
    # The leaders have not heard from the victim since it died.
    for line in raft_lines(watcher, "health"):
        heard = re.search(r"\b3=\d+/(\d+)ms", line)
        assert heard and int(heard.group(1)) >= 3000, line

    victim.start()
    wait_health(watcher, "health", lambda b, parts: b == [1, 2, 3] and len(parts) == 3 and all(
        i.split(",") == ["1", "2", "3"] for _, i in parts.values()))
    # `cluster status` agrees (polled: its view and Metadata's are read a moment apart, and the
    # restarted broker, still catching up, may drop out of an ISR once more on a loaded machine).
    wait_status(watcher, lambda status: "Brokers: 3 live, 0 not live" in status and not any(
        line.startswith("\tUnder-replicated: health-") for line in status.splitlines()))
    assert not load.errors, load.errors[:3]
    check("fenced broker rejoins", load, read_all(nodes, "health", partitions=3,
                                                  expect=len(load.acked)), 11)


def test_a_replica_behind_the_leaders_log_start_truncates_fully_and_catches_up(trimming_cluster):
    """A follower is down while the leader writes 4 MiB (segments of about 1 MiB) and DeleteRecords moves the log start
    past everything the follower holds. The leader's Raft log stays bounded: once the follower
    left the ISR it is compacted past it (before, it kept every entry for the dead follower).
    Restarted, the follower gets a snapshot, finds its log ends below the leader's log start,
    drops its log and starts at the leader's first batch (Kafka's truncateFullyAndStartAt),
    holds the leader's bytes from there, and rejoins the ISR."""
    from kafka import TopicPartition as KTP
    nodes = trimming_cluster
    create_topic(nodes, "behind", partitions=1)
    load = Load(nodes, "behind", 13, size=1024)
    load.produce(300)
    load.flush()
    # Leadership has settled on the preferred replica by now.
    leaders = wait_for_leaders(nodes, "behind", 1)
    leader = next(n for n in nodes if n.node_id == leaders[0])
    follower = next(n for n in nodes if n is not leader)
    deadline = time.time() + 20
    while len(segment_bytes(follower.data_dir, "behind", 0)) < 300 * 1024 and time.time() < deadline:
        time.sleep(0.2)
    follower.kill9()
    killed = time.time()
    fid = str(follower.node_id)
    wait_health(leader, "behind", lambda b, parts: 0 in parts and fid not in parts[0][1].split(","))
    # Metadata may not list the follower in the ISR yet right after the topic was created, and
    # the controller's fencing can show the shrink before the leader's own view does: the
    # leader drops it from its ISR replica.lag.time.max.ms (4 s) after it died. Only then is
    # its Raft log compacted past the follower.
    time.sleep(max(0.0, killed + 6 - time.time()))
    load.produce(4000)
    load.flush()
    # Both live replicas' Raft logs shrink (the leader's is the one that kept every entry).
    for n in nodes:
        if n is follower:
            continue
        wal = n.data_dir / "behind-0" / "raft.wal"
        deadline = time.time() + 20
        while (wal_bytes := wal.stat().st_size) >= 1 << 20 and time.time() < deadline:
            time.sleep(0.5)
        assert wal_bytes < 1 << 20, f"node {n.node_id}'s raft log holds {wal_bytes} bytes"
    # The live brokers only: kafka-python gives up on a bootstrap broker that refuses.
    admin = KafkaAdminClient(bootstrap_servers=bootstrap([n for n in nodes if n is not follower]),
                             request_timeout_ms=30000)
    admin.delete_records({KTP("behind", 0): 3000})
    admin.close()
    # Appends the leader sent towards the dead follower are lost by now (its link fails), so
    # the follower cannot catch up from them: only from a snapshot.
    time.sleep(2)
    follower.start()
    try:
        wait_health(leader, "behind", lambda b, parts: 0 in parts and fid in parts[0][1].split(","),
                    timeout=60)
    except AssertionError as e:
        tails = "\n".join(f"--- node {n.node_id}:\n" + "\n".join(n.log_path.read_text().splitlines()[-40:])
                          for n in (follower, leader))
        raise AssertionError(f"{e}\n{tails}") from None
    load.produce(300)
    load.flush()
    assert not load.errors, load.errors[:3]
    got = read_all(nodes, "behind", partitions=1, expect=1600)
    offsets = [o for _, o, _ in got]
    assert offsets == list(range(3000, 4600)), (offsets[:3], offsets[-3:], len(offsets))
    acked = {v: po for v, po in load.acked.items() if po[1] >= 3000}
    assert {v: (p, o) for p, o, v in got} == acked, "records differ from the acknowledged ones"
    assert "truncating it fully" in follower.log_path.read_text()
    # A clean stop writes every batch to the segments (the shard journals may hold the latest).
    assert follower.stop() is None and leader.stop() is None
    mine, theirs = (segment_bytes(n.data_dir, "behind", 0) for n in (follower, leader))
    # The leader deletes whole segments only: it may hold batches below the follower's first.
    assert mine and theirs.endswith(mine), "the follower's records differ from the leader's"
    assert not (follower.data_dir / "behind-0" / "00000000000000000000.log").exists()


def test_a_restarted_broker_keeps_its_replicas_while_it_catches_up_on_metadata(quick_cluster):
    """A broker restarted after missing metadata (topics created while it was down) keeps every
    replica it holds. Regression: it announced the table it replayed and, at the same time, the
    table with the entries it caught up on; the second judged stale what the first had just
    opened (against a table the first had not installed yet) and deleted it, so a follower's
    whole log vanished without a log line and was copied again from the leader."""
    nodes = quick_cluster
    create_topic(nodes, "kept", partitions=12)
    # Enough that reopening (a CRC scan of each active segment after kill -9) takes a while.
    load = Load(nodes, "kept", 19, size=1000)
    load.produce(20000)
    load.flush()
    # The controller: restarted, it follows a new one and catches up on what it missed.
    controller = int(re.search(r"Controller: (\d+)", cluster_status(nodes[0])).group(1))
    victim = next(n for n in nodes if n.node_id == controller)
    deadline = time.time() + 20
    while time.time() < deadline and not all(segment_bytes(victim.data_dir, "kept", p) for p in range(12)):
        time.sleep(0.2)
    victim.kill9()
    held = {p: segment_bytes(victim.data_dir, "kept", p) for p in range(12)}
    # A replica deleted and copied again would hold the same bytes in new files.
    inodes = {p: (victim.data_dir / f"kept-{p}" / f"{0:020}.log").stat().st_ino for p in range(12)}
    assert all(held.values()), "the victim holds every partition before it dies"
    live = [n for n in nodes if n is not victim]
    for i in range(6):
        create_topic(live, f"later{i}", partitions=4)
    victim.start()
    wait_health(nodes[0], "kept", lambda b, parts: len(parts) == 12 and all(
        i.split(",") == ["1", "2", "3"] for _, i in parts.values()))
    log = victim.log_path.read_text()
    assert "deleting it" not in log, [line for line in log.splitlines() if "deleting it" in line][:3]
    for p, before in held.items():
        assert segment_bytes(victim.data_dir, "kept", p).startswith(before), f"partition {p} lost what it held"
        assert (victim.data_dir / f"kept-{p}" / f"{0:020}.log").stat().st_ino == inodes[p], \
            f"partition {p} was deleted and copied again"
    check_replicas_identical(nodes, "kept", partitions=12)


def raft_lines(node, topic):
    """The partition lines of `strom topic describe`, each with its Raft columns."""
    out = subprocess.run([STROM_BIN, "topic", "describe", topic, "--bootstrap", node.bootstrap],
                         capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if "\tPartition: " in line]
    assert lines and all("\tTerm: " in line and "\tCommitIndex: " in line for line in lines), out
    return lines


def metadata_quorum(nodes):
    """kafka-python's describe_metadata_quorum (sent to any broker; forwarded to the controller)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap(nodes), request_timeout_ms=10000)
    try:
        q = admin.describe_metadata_quorum()
    finally:
        admin.close()
    p = q["topics"][0]["partitions"][0]
    assert q["topics"][0]["topic_name"] == "__cluster_metadata" and p["error"] is None, q
    return p


def raw_admin(node, request_class, response_class, version, **fields):
    """One admin request straight to `node` (kafka-python's message classes); returns the
    decoded response."""
    import struct
    req = request_class[version](**fields)
    req.with_header(correlation_id=9, client_id="strom-test")
    with socket.create_connection((node.host, node.port), timeout=60) as s:
        s.sendall(req.encode(header=True, framed=True))
        size = struct.unpack(">i", s.recv(4, socket.MSG_WAITALL))[0]
        return response_class.decode(s.recv(size, socket.MSG_WAITALL), version=version, header=True)


def test_brokers_that_are_not_the_controller_forward_metadata_changes(cluster):
    """Kafka's admin clients send AlterConfigs and IncrementalAlterConfigs to any broker (KIP-590
    forwarding); CreateTopics sent to a broker that is not the controller works as well."""
    from kafka.protocol.admin import (CreateTopicsRequest, CreateTopicsResponse,
                                      IncrementalAlterConfigsRequest,
                                      IncrementalAlterConfigsResponse)
    nodes = cluster
    out = subprocess.run(["kcat", "-b", nodes[0].bootstrap, "-L", "-m", "3"],
                         capture_output=True, text=True).stdout
    controller = int(re.search(r"broker (\d+) at \S+ \(controller\)", out).group(1))
    others = [n for n in nodes if n.node_id != controller]
    ct = CreateTopicsRequest[4].CreatableTopic
    r = raw_admin(others[0], CreateTopicsRequest, CreateTopicsResponse, 4, timeout_ms=30000,
                  validate_only=False,
                  topics=[ct(name="fwd", num_partitions=2, replication_factor=3, assignments=[],
                             configs=[])])
    assert r.topics[0].error_code == 0, r
    wait_for_leaders(nodes, "fwd", 2)
    res = IncrementalAlterConfigsRequest[1].AlterConfigsResource
    for i, node in enumerate(others):
        r = raw_admin(node, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse, 1,
                      validate_only=False,
                      resources=[res(resource_type=2, resource_name="fwd", configs=[
                          res.AlterableConfig(name="retention.ms", config_operation=0,
                                              value=str(60000 + i))])])
        assert r.responses[0].error_code == 0, r
        # Every broker's copy of the table shows the change (followers apply it a moment later).
        for n in nodes:
            deadline = time.time() + 10
            while True:
                described = subprocess.run([STROM_BIN, "topic", "describe", "fwd",
                                            "--bootstrap", n.bootstrap],
                                           capture_output=True, text=True, check=True).stdout
                if f"retention.ms={60000 + i}" in described or time.time() > deadline:
                    break
                time.sleep(0.2)
            assert f"retention.ms={60000 + i}" in described, described


def read_isolated(nodes, topic, isolation, partitions=PARTITIONS, timeout=60):
    consumer = Consumer({"bootstrap.servers": bootstrap(nodes), "group.id": f"iso-{time.time()}",
                         "enable.auto.commit": False, "isolation.level": isolation})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    got = []
    deadline = time.time() + timeout
    idle_since = time.time()
    while time.time() < deadline and time.time() - idle_since < 4:
        m = consumer.poll(0.5)
        if m is None or m.error():
            continue
        idle_since = time.time()
        got.append(m.value().decode())
    consumer.close()
    return got


def test_transactions_span_partitions_led_by_several_brokers(cluster):
    """A transactional producer writes to six partitions led by several brokers: the coordinator
    (the leader of the id's __transaction_state partition) reaches the other brokers' partitions
    with WriteTxnMarkers, and they verify the transaction with it (AddPartitionsToTxn v4). Then
    the coordinator is killed with a transaction open: the new leader of its state partition takes over, and a new producer with the same id fences the
    old transaction, which is aborted everywhere."""
    nodes = cluster
    leaders = create_topic(nodes, "txc")
    # At least two leaders: whichever broker coordinates, some partition is led by another one.
    assert len(set(leaders.values())) >= 2, leaders
    p = Producer({"bootstrap.servers": bootstrap(nodes), "transactional.id": "across",
                  "linger.ms": 1})
    p.init_transactions(90)
    committed, aborted = [], []
    for t in range(4):
        p.begin_transaction()
        batch = [f"t{t}-p{q}" for q in range(PARTITIONS)]
        for q, v in enumerate(batch):
            p.produce("txc", value=v.encode(), partition=q)
        p.flush(30)
        if t % 2 == 0:
            p.commit_transaction(60)
            committed += batch
        else:
            p.abort_transaction(60)
            aborted += batch
    assert sorted(read_isolated(nodes, "txc", "read_committed")) == sorted(committed)
    assert sorted(read_isolated(nodes, "txc", "read_uncommitted")) == sorted(committed + aborted)

    admin = KafkaAdminClient(bootstrap_servers=bootstrap(nodes), request_timeout_ms=10000)
    coordinator_id = admin.describe_transactions(["across"])["across"].coordinator_id
    admin.close()
    p.begin_transaction()
    for q in range(PARTITIONS):
        p.produce("txc", value=f"orphan-p{q}".encode(), partition=q)
    p.flush(30)
    victim = next(n for n in nodes if n.node_id == coordinator_id)
    print(f"killing the coordinator, broker {coordinator_id}, with a transaction open")
    victim.kill9()
    rest = [n for n in nodes if n is not victim]
    after = Producer({"bootstrap.servers": bootstrap(rest), "transactional.id": "across",
                      "linger.ms": 1})
    after.init_transactions(120)
    after.begin_transaction()
    after.produce("txc", value=b"after-failover", partition=0)
    after.commit_transaction(60)
    victim.start()
    seen = read_isolated(nodes, "txc", "read_committed")
    print(f"read_committed after the failover: {len(seen)} records")
    assert sorted(seen) == sorted(committed + ["after-failover"])
