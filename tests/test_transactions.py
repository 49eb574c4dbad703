"""Transactions and exactly-once (KIP-98, KIP-447) against the real binary with real clients:
transactional producers (confluent-kafka, kafka-python), read_committed and read_uncommitted
consumers, fencing of a zombie, the broker aborting a transaction left open past its timeout,
and consume-transform-produce through kill -9 of the broker and of the processor.

STROM_TXN_FULL=1 runs the long version of the kill -9 scenario (more records, several kills)."""

import os
import pathlib
import random
import subprocess
import sys
import time

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from conftest import STROM_BIN

FULL = os.environ.get("STROM_TXN_FULL") == "1"
HERE = pathlib.Path(__file__).resolve().parent


def create_topic(bootstrap, name, partitions):
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for f in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        f.result(timeout=15)


def read_all(bootstrap, topic, isolation, partitions, quiet_s=2.0, limit_s=30):
    """Every record of `topic` from the beginning, in partition order: (partition, offset, value)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.time()}",
                  "enable.auto.commit": False, "isolation.level": isolation})
    c.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    out = []
    last = time.time()
    deadline = time.time() + limit_s
    while time.time() < deadline and time.time() - last < quiet_s:
        m = c.poll(0.2)
        if m is None or m.error() is not None:
            continue
        out.append((m.partition(), m.offset(), m.value().decode()))
        last = time.time()
    c.close()
    return out


def watermarks(bootstrap, topic, partition, isolation):
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "wm", "isolation.level": isolation})
    try:
        return c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    finally:
        c.close()


def test_interleaved_commits_and_aborts_are_seen_as_kafka_shows_them(broker):
    """A confluent-kafka transactional producer commits and aborts in turn over three partitions:
    read_committed sees exactly the committed records in order, read_uncommitted sees them all;
    an open transaction holds the last stable offset back while the high watermark moves."""
    bs = broker.bootstrap
    create_topic(bs, "tx", 3)
    p = Producer({"bootstrap.servers": bs, "transactional.id": "interleaved", "linger.ms": 1})
    p.init_transactions(15)
    committed, aborted = [], []
    for t in range(8):
        p.begin_transaction()
        batch = [f"t{t}-r{r}" for r in range(9)]
        for r, v in enumerate(batch):
            p.produce("tx", value=v.encode(), partition=r % 3)
        p.flush(10)  # the aborted records reach the log too
        if t % 2 == 0:
            p.commit_transaction(15)
            committed += batch
        else:
            p.abort_transaction(15)
            aborted += batch

    got = read_all(bs, "tx", "read_committed", 3)
    seen = [v for _, _, v in got]
    print(f"committed {len(committed)}, aborted {len(aborted)}, read_committed saw {len(seen)}")
    assert sorted(seen) == sorted(committed)
    for part in range(3):
        in_order = [v for pp, _, v in got if pp == part]
        assert in_order == [v for i, v in enumerate(committed) if int(v.split("-r")[1]) % 3 == part]
    everything = [v for _, _, v in read_all(bs, "tx", "read_uncommitted", 3)]
    assert sorted(everything) == sorted(committed + aborted)

    # Every transaction ended: the last stable offset is the high watermark. Each partition holds
    # 8 transactions × 3 records plus a marker each.
    for part in range(3):
        assert watermarks(bs, "tx", part, "read_committed") == (0, 32)
        assert watermarks(bs, "tx", part, "read_uncommitted") == (0, 32)

    # An open transaction: the high watermark moves past its records, the LSO stays before them.
    p.begin_transaction()
    p.produce("tx", value=b"open", partition=0)
    p.flush(10)
    assert watermarks(bs, "tx", 0, "read_uncommitted") == (0, 33)
    assert watermarks(bs, "tx", 0, "read_committed") == (0, 32)
    from kafka.admin import KafkaAdminClient
    from kafka import TopicPartition as KTP
    admin = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=10000)
    (producer,) = admin.describe_producers([KTP("tx", 0)])[KTP("tx", 0)].active_producers
    admin.close()
    assert producer.current_transaction_start_offset == 32, producer
    p.commit_transaction(15)
    assert watermarks(bs, "tx", 0, "read_committed") == (0, 34)
    assert "open" in [v for _, _, v in read_all(bs, "tx", "read_committed", 3)]


def test_a_second_producer_with_the_same_id_fences_the_first(broker):
    bs = broker.bootstrap
    create_topic(bs, "zombie", 2)
    first = Producer({"bootstrap.servers": bs, "transactional.id": "shared-id", "linger.ms": 1})
    first.init_transactions(15)
    first.begin_transaction()
    first.produce("zombie", value=b"from-the-zombie", partition=0)
    first.flush(10)

    second = Producer({"bootstrap.servers": bs, "transactional.id": "shared-id", "linger.ms": 1})
    second.init_transactions(15)  # aborts the first one's open transaction and fences it
    second.begin_transaction()
    second.produce("zombie", value=b"from-the-new-one", partition=0)
    second.commit_transaction(15)

    with pytest.raises(KafkaException) as refused:
        first.produce("zombie", value=b"zombie-again", partition=1)
        first.flush(10)
        first.commit_transaction(15)
    err = refused.value.args[0]
    print(f"the zombie got: {err}")
    assert err.fatal() or err.txn_requires_abort(), err
    assert "fenc" in err.str().lower() or "epoch" in err.str().lower(), err

    seen = [v for _, _, v in read_all(bs, "zombie", "read_committed", 2)]
    assert seen == ["from-the-new-one"]


def test_a_transaction_left_open_past_its_timeout_is_aborted(broker_factory):
    broker = broker_factory(extra_args=[
        "--set", "transaction.abort.timed.out.transaction.cleanup.interval.ms=200"])
    bs = broker.bootstrap
    create_topic(bs, "stuck", 1)
    p = Producer({"bootstrap.servers": bs, "transactional.id": "forgetful",
                  "transaction.timeout.ms": 2000, "linger.ms": 1})
    p.init_transactions(15)
    p.begin_transaction()
    p.produce("stuck", value=b"never-committed", partition=0)
    p.flush(10)
    plain = Producer({"bootstrap.servers": bs, "linger.ms": 1})
    plain.produce("stuck", value=b"after", partition=0)
    plain.flush(10)
    # Held back behind the open transaction until the broker aborts it.
    assert watermarks(bs, "stuck", 0, "read_committed")[1] == 0
    started = time.time()
    seen = []
    c = Consumer({"bootstrap.servers": bs, "group.id": "patient", "isolation.level": "read_committed",
                  "auto.offset.reset": "earliest"})
    c.subscribe(["stuck"])
    while time.time() - started < 20 and not seen:
        m = c.poll(0.2)
        if m is not None and m.error() is None:
            seen.append(m.value().decode())
    c.close()
    waited = time.time() - started
    print(f"the consumer moved on after {waited:.1f} s: {seen}")
    assert seen == ["after"]
    state = describe(bs, "forgetful")
    assert state in ("CompleteAbort", "PrepareAbort"), state


sys.path.insert(0, str(HERE))


def describe(bootstrap, txn_id):
    """The coordinator's state of a transactional id, as kafka-python's admin client
    (DescribeTransactions, what kafka-transactions.sh describe uses) reports it."""
    from kafka.admin import KafkaAdminClient
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        return admin.describe_transactions([txn_id])[txn_id].state.value
    finally:
        admin.close()


def test_admin_clients_list_and_describe_transactions(broker):
    from kafka.admin import KafkaAdminClient
    bs = broker.bootstrap
    create_topic(bs, "listed", 2)
    p = Producer({"bootstrap.servers": bs, "transactional.id": "listed-txn", "linger.ms": 1})
    p.init_transactions(15)
    p.begin_transaction()
    p.produce("listed", value=b"x", partition=1)
    p.flush(10)
    admin = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=10000)
    try:
        desc = admin.describe_transactions(["listed-txn"])["listed-txn"]
        print(f"described: {desc}")
        assert desc.state.value == "Ongoing"
        assert sorted((tp.topic, tp.partition) for tp in desc.topic_partitions) == [("listed", 1)]
        listed = [t for ts in admin.list_transactions().values() for t in ts]
        assert [t.transactional_id for t in listed] == ["listed-txn"]
        cli = subprocess.run([STROM_BIN, "transactions", "describe", "--transactional-id",
                              "listed-txn", "--bootstrap", bs], capture_output=True, text=True)
        print(cli.stdout)
        row = cli.stdout.splitlines()[1].split()
        assert row[0] == "listed-txn" and row[4] == "Ongoing" and row[-1] == "listed-1", cli
        cli = subprocess.run([STROM_BIN, "transactions", "list", "--bootstrap", bs],
                             capture_output=True, text=True)
        assert cli.stdout.splitlines()[1].split()[0::3] == ["listed-txn", "Ongoing"], cli
        p.commit_transaction(15)
        assert admin.describe_transactions(["listed-txn"])["listed-txn"].state.value == "CompleteCommit"
        ongoing = admin.list_transactions(state_filters=["Ongoing"])
        assert [t for ts in ongoing.values() for t in ts] == []
    finally:
        admin.close()


def test_a_transactional_write_to_a_partition_never_added_is_refused(broker):
    """KIP-890 part 1: a producer that writes a transactional batch to a partition it did not add
    to its transaction gets INVALID_TXN_STATE, and the partition's last stable offset does not
    stay behind a transaction no marker would ever end."""
    import kafka_wire
    from kafka.admin import KafkaAdminClient
    bs = broker.bootstrap
    create_topic(bs, "verified", 2)
    p = Producer({"bootstrap.servers": bs, "transactional.id": "verifier", "linger.ms": 1})
    p.init_transactions(15)
    p.begin_transaction()
    p.produce("verified", value=b"added", partition=0)
    p.flush(10)
    admin = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=10000)
    desc = admin.describe_transactions(["verifier"])["verifier"]
    admin.close()
    batch = kafka_wire.record_batch([b"sneaked-in"], producer=(desc.producer_id, desc.producer_epoch, 0))
    sock = kafka_wire.connect(bs)
    for cid, txn_id in ((7, b"verifier"), (8, None)):
        sock.sendall(kafka_wire.produce_v3(b"verified", 1, batch, acks=-1, correlation_id=cid,
                                           transactional_id=txn_id))
        err, _ = kafka_wire.read_produce_error(sock, cid)
        assert err == 48, f"INVALID_TXN_STATE expected, got {err}"
    sock.close()
    p.commit_transaction(15)
    assert watermarks(bs, "verified", 1, "read_committed") == (0, 0)
    assert [v for _, _, v in read_all(bs, "verified", "read_committed", 2)] == ["added"]


def test_an_idle_transactional_id_expires(broker_factory):
    broker = broker_factory(extra_args=[
        "--set", "transaction.abort.timed.out.transaction.cleanup.interval.ms=200",
        "--set", "transactional.id.expiration.ms=1000"])
    bs = broker.bootstrap
    create_topic(bs, "short-lived", 1)
    p = Producer({"bootstrap.servers": bs, "transactional.id": "fleeting", "linger.ms": 1})
    p.init_transactions(15)
    p.begin_transaction()
    p.produce("short-lived", value=b"x")
    p.commit_transaction(15)
    assert describe(bs, "fleeting") == "CompleteCommit"
    deadline = time.time() + 15
    while time.time() < deadline:
        out = subprocess.run([STROM_BIN, "transactions", "describe", "--transactional-id", "fleeting",
                              "--bootstrap", bs], capture_output=True, text=True)
        if "TRANSACTIONAL_ID_NOT_FOUND" in out.stderr:
            break
        time.sleep(0.3)
    print(out.stderr.strip())
    assert "TRANSACTIONAL_ID_NOT_FOUND" in out.stderr
    # The id can be used again: a new producer id (the old state is gone).
    again = Producer({"bootstrap.servers": bs, "transactional.id": "fleeting", "linger.ms": 1})
    again.init_transactions(15)
    again.begin_transaction()
    again.produce("short-lived", value=b"y")
    again.commit_transaction(15)
    assert sorted(v for _, _, v in read_all(bs, "short-lived", "read_committed", 1)) == ["x", "y"]


def test_kafka_python_transactional_producer(broker):
    from kafka import KafkaConsumer, KafkaProducer
    bs = broker.bootstrap
    create_topic(bs, "kp", 2)
    p = KafkaProducer(bootstrap_servers=bs, transactional_id="kafka-python-txn")
    p.init_transactions()
    p.begin_transaction()
    for i in range(6):
        p.send("kp", value=f"kept-{i}".encode(), partition=i % 2)
    p.commit_transaction()
    p.begin_transaction()
    for i in range(6):
        p.send("kp", value=f"dropped-{i}".encode(), partition=i % 2)
    p.flush()
    p.abort_transaction()
    p.close()
    c = KafkaConsumer("kp", bootstrap_servers=bs, auto_offset_reset="earliest",
                      isolation_level="read_committed", consumer_timeout_ms=3000)
    seen = sorted(m.value.decode() for m in c)
    c.close()
    assert seen == sorted(f"kept-{i}" for i in range(6))


def test_consume_transform_produce_is_exactly_once_through_kill_9(broker):
    """Input → processor (read_committed, transactions with send_offsets_to_transaction) → output,
    with kill -9 of the broker and of the processor at random moments: every input record is in
    the output exactly once as read_committed shows it, and the group's offsets reach the end."""
    seed = int(os.environ.get("STROM_TXN_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    bs = broker.bootstrap
    n = 20000 if FULL else 3000
    kills = 3 if FULL else 1
    create_topic(bs, "in", 3)
    create_topic(bs, "out", 3)
    p = Producer({"bootstrap.servers": bs, "acks": "all", "linger.ms": 5})
    for i in range(n):
        p.produce("in", key=str(i).encode(), value=f"in-{i}".encode(), partition=i % 3)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0
    log_path = broker.data_dir.parent / "processor.log"

    def start_processor(k):
        return subprocess.Popen(
            [sys.executable, str(HERE / "txn_processor.py"), bs, "in", "out", "etl", "etl-txn",
             str(seed + k), str(log_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def committed_total():
        c = Consumer({"bootstrap.servers": bs, "group.id": "etl", "enable.auto.commit": False})
        try:
            got = c.committed([TopicPartition("in", q) for q in range(3)], timeout=10)
            return sum(max(tp.offset, 0) for tp in got)
        except KafkaException:
            return -1
        finally:
            c.close()

    starts = 0
    proc = start_processor(starts)
    broker_kills = processor_kills = 0
    deadline = time.time() + (600 if FULL else 150)
    next_fault = time.time() + rng.uniform(1.0, 3.0)
    faults = ["broker", "processor"] * kills
    rng.shuffle(faults)
    while time.time() < deadline:
        if proc.poll() is not None:
            out = proc.stdout.read().decode(errors="replace")
            print(f"processor exited {proc.returncode}: {out.strip()[-300:]}")
            starts += 1
            proc = start_processor(starts)
        if faults and time.time() >= next_fault:
            fault = faults.pop()
            if fault == "broker":
                broker.kill9()
                broker_kills += 1
                time.sleep(rng.uniform(0.1, 1.0))
                broker.start()
            else:
                proc.kill()
                proc.wait()
                processor_kills += 1
            next_fault = time.time() + rng.uniform(1.0, 4.0)
            continue
        if not faults and committed_total() == n:
            break
        time.sleep(0.3)
    proc.kill()
    proc.wait()
    total = committed_total()
    print(f"broker kills {broker_kills}, processor kills {processor_kills}, processor starts {starts + 1}, "
          f"group offsets {total} of {n}")
    assert total == n, "the processor did not finish"

    visible = read_all(bs, "out", "read_committed", 3, quiet_s=3)
    everything = read_all(bs, "out", "read_uncommitted", 3, quiet_s=3)
    counts = {}
    tags = {}
    for _, _, v in visible:
        value, tag, size = v.split("|")
        counts[value] = counts.get(value, 0) + 1
        tags.setdefault(tag, [int(size), 0])[1] += 1
    lines = log_path.read_text().split() if log_path.exists() else []
    aborted_tags = {lines[i + 1] for i in range(0, len(lines) - 1, 2) if lines[i] == "abort"}
    lost = sum(1 for i in range(n) if f"in-{i}" not in counts)
    duplicated = sum(c - 1 for c in counts.values() if c > 1)
    torn = sum(1 for size, seen in tags.values() if seen != size)
    aborted_reads = sum(1 for t in tags if t in aborted_tags)
    print(f"consume-transform-produce: input {n}, output read_committed {len(visible)}, "
          f"read_uncommitted {len(everything)}, lost {lost}, duplicated {duplicated}, "
          f"torn transactions {torn}, aborted reads {aborted_reads}")
    assert (lost, duplicated, torn, aborted_reads) == (0, 0, 0, 0)
    # The processor abandons some transactions on purpose: their records are in the log.
    assert aborted_tags and len(everything) > len(visible), (len(aborted_tags), len(everything))


def test_transactions_survive_kill_9_and_a_clean_restart(broker_factory):
    """Aborted, committed and open transactions over many small segments, then kill -9: after the
    restart read_committed still hides the aborted records and stops at the open transaction
    (rebuilt from the saved state at the last roll and the batches after it), the coordinator
    still knows the open transaction, and a new producer with the id aborts it. A clean restart
    then keeps it all as well."""
    broker = broker_factory()
    bs = broker.bootstrap
    admin = AdminClient({"bootstrap.servers": bs})
    for f in admin.create_topics([NewTopic("survive", 2, 1,
                                           config={"segment.bytes": "2048"})]).values():
        f.result(timeout=15)
    p = Producer({"bootstrap.servers": bs, "transactional.id": "survivor", "linger.ms": 1})
    p.init_transactions(15)
    committed = []
    for t in range(12):
        p.begin_transaction()
        batch = [f"t{t}-{i}-" + "x" * 200 for i in range(4)]
        for i, v in enumerate(batch):
            p.produce("survive", value=v.encode(), partition=i % 2)
        p.flush(10)
        if t % 3 == 2:
            p.abort_transaction(15)
        else:
            p.commit_transaction(15)
            committed += batch
    p.begin_transaction()
    p.produce("survive", value=b"left-open", partition=0)
    p.flush(10)
    lso_before = watermarks(bs, "survive", 0, "read_committed")[1]
    segments = sorted((broker.data_dir / "survive-0").glob("*.log"))
    saved = sorted((broker.data_dir / "survive-0").glob("*.txnstate"))
    print(f"{len(segments)} segments, {len(saved)} saved transaction states in survive-0")
    assert len(segments) > 3 and saved
    # __transaction_state is an internal topic, as Kafka's clients expect.
    from kafka.admin import KafkaAdminClient
    kadmin = KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=10000)
    (described,) = kadmin.describe_topics(["__transaction_state"])
    kadmin.close()
    assert described["is_internal"] is True and len(described["partitions"]) == 50, described
    from confluent_kafka.admin import NewPartitions
    grower = AdminClient({"bootstrap.servers": bs})
    with pytest.raises(Exception) as refused:
        grower.create_partitions([NewPartitions("__transaction_state", 60)])[
            "__transaction_state"].result(timeout=10)
    assert "fixed" in str(refused.value), refused.value
    broker.kill9()
    broker.start()
    # Recovery read only the active segment, from the state saved when it began; with
    # write-behind the segment may hold none of its batches yet, and the journal gives them back.
    import re
    active_base = int(segments[-1].stem)
    recovered = re.findall(r"transaction state recovered from the log partition=survive-0 from=(\d+)",
                           broker.log())
    from_journal = re.search(r"recovered batches from the journal partition=survive-0 ",
                             broker.log())
    assert [int(r) for r in recovered] in ([active_base], []), (recovered, active_base)
    assert recovered or from_journal, broker.log()[-3000:]

    def check(stage):
        seen = [v for _, _, v in read_all(bs, "survive", "read_committed", 2)]
        print(f"{stage}: read_committed {len(seen)} of {len(committed)} committed")
        assert sorted(seen) == sorted(committed)

    check("after kill -9")
    assert watermarks(bs, "survive", 0, "read_committed")[1] == lso_before
    assert describe(bs, "survivor") == "Ongoing"
    again = Producer({"bootstrap.servers": bs, "transactional.id": "survivor", "linger.ms": 1})
    again.init_transactions(30)
    lo, hi = watermarks(bs, "survive", 0, "read_uncommitted")
    assert watermarks(bs, "survive", 0, "read_committed") == (lo, hi)
    check("after the new producer aborted the open transaction")
    broker.stop()
    broker.start()
    check("after a clean restart")
    assert watermarks(bs, "survive", 0, "read_committed") == (lo, hi)


def test_compaction_never_lets_an_aborted_value_replace_a_committed_one(broker_factory):
    """A compacted topic: key k committed as v1, then written as v2 in a transaction that aborts.
    The cleaner drops the aborted record instead of keeping it as k's latest value, so after
    cleaning read_committed still reads k = v1 (and read_uncommitted no longer sees v2)."""
    broker = broker_factory(extra_args=["--set", "log.cleaner.backoff.ms=200"])
    bs = broker.bootstrap
    admin = AdminClient({"bootstrap.servers": bs})
    for f in admin.create_topics([NewTopic("table", 1, 1, config={
            "cleanup.policy": "compact", "segment.bytes": "1024",
            "min.cleanable.dirty.ratio": "0.01"})]).values():
        f.result(timeout=15)
    p = Producer({"bootstrap.servers": bs, "transactional.id": "table-writer", "linger.ms": 1})
    p.init_transactions(15)
    p.begin_transaction()
    p.produce("table", key=b"k", value=b"v1")
    p.commit_transaction(15)
    p.begin_transaction()
    p.produce("table", key=b"k", value=b"v2")
    p.flush(10)
    p.abort_transaction(15)
    plain = Producer({"bootstrap.servers": bs, "linger.ms": 0})
    for i in range(40):  # roll several segments past the transactions
        plain.produce("table", key=f"filler-{i % 4}".encode(), value=b"f" * 200)
        plain.flush(10)
    deadline = time.time() + 30
    while time.time() < deadline:
        values = {v for _, _, v in read_all(bs, "table", "read_uncommitted", 1, quiet_s=0.5)}
        if "v2" not in values:
            break
        time.sleep(0.5)
    print(f"read_uncommitted after cleaning: {sorted(values)}")
    assert "v2" not in values, "the cleaner never removed the aborted record"
    seen = [v for _, _, v in read_all(bs, "table", "read_committed", 1, quiet_s=0.5)]
    assert "v1" in seen and "v2" not in seen, seen


def test_aiokafka_transactional_producer(broker):
    import asyncio
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    bs = broker.bootstrap
    create_topic(bs, "aio", 2)

    async def run():
        p = AIOKafkaProducer(bootstrap_servers=bs, transactional_id="aiokafka-txn")
        await p.start()
        try:
            async with p.transaction():
                for i in range(5):
                    await p.send("aio", value=f"kept-{i}".encode(), partition=i % 2)
            with pytest.raises(RuntimeError):
                async with p.transaction():
                    for i in range(5):
                        await p.send("aio", value=f"dropped-{i}".encode(), partition=i % 2)
                    await p.flush()
                    raise RuntimeError("abort this one")
        finally:
            await p.stop()
        c = AIOKafkaConsumer("aio", bootstrap_servers=bs, auto_offset_reset="earliest",
                             isolation_level="read_committed")
        await c.start()
        got = []
        try:
            while True:
                batch = await c.getmany(timeout_ms=2000)
                if not batch:
                    return got
                for msgs in batch.values():
                    got += [m.value.decode() for m in msgs]
        finally:
            await c.stop()

    assert sorted(asyncio.run(run())) == sorted(f"kept-{i}" for i in range(5))


def test_kafkajs_transactional_producer(broker):
    import json
    bs = broker.bootstrap
    create_topic(bs, "kjs", 2)
    script = HERE / "js" / "kafkajs_transactions.js"
    out = subprocess.run(["node", str(script), bs, "kjs"], capture_output=True, text=True,
                         timeout=90, env=dict(os.environ, KAFKAJS_NO_PARTITIONER_WARNING="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == sorted(f"kept-{i}" for i in range(4))
