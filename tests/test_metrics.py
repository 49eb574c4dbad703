"""The admin HTTP port: Prometheus /metrics shows per-API, per-shard latency histograms and the
broker's counters after real traffic; /v1/status reports health."""

import json
import re
import time
import urllib.request

from confluent_kafka import Consumer, Producer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic


def scrape(broker, path):
    with urllib.request.urlopen(f"http://{broker.admin}{path}", timeout=10) as r:
        return r.status, r.headers.get("Content-Type"), r.read().decode()


def metric(text, name, **labels):
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        m = re.match(r"^(\w+)(\{([^}]*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(4))
    return total


def test_metrics_show_histograms_and_counters_after_traffic(broker):
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("metered", 4, 1)])
    admin.close()
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(1000):
        p.produce("metered", value=b"m" * 100, key=str(i).encode())
    assert p.flush(30) == 0
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": "metrics-reader"})
    c.assign([TopicPartition("metered", p_, 0) for p_ in range(4)])
    got = 0
    deadline = time.time() + 30
    while got < 1000 and time.time() < deadline:
        m = c.poll(0.2)
        if m is not None and not m.error():
            got += 1
    c.close()
    assert got == 1000
    time.sleep(1.5)  # shards publish their numbers once a second

    status, ctype, text = scrape(broker, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert metric(text, "strom_requests_total", api="Produce") >= 1
    assert metric(text, "strom_requests_total", api="Fetch") >= 1
    assert metric(text, "strom_requests_total", api="Metadata") >= 1
    # Per shard: both shards report series.
    assert {"0", "1"} <= set(re.findall(r'strom_partitions\{shard="(\d+)"\}', text))
    assert metric(text, "strom_request_latency_microseconds_count", api="Produce") == \
        metric(text, "strom_requests_total", api="Produce")
    # Prometheus buckets are cumulative: they never fall, and +Inf holds every request.
    shards = set(re.findall(r'strom_request_latency_microseconds_count\{api="Produce",shard="(\d+)"\}', text))
    assert shards
    for shard in shards:
        les = [(float(le), float(v)) for le, v in re.findall(
            r'strom_request_latency_microseconds_bucket\{le="([^"]+)",api="Produce",shard="'
            + shard + r'"\} (\S+)', text)]
        assert les, f"no Produce buckets for shard {shard}"
        assert [v for _, v in les] == sorted(v for _, v in les)
        assert les[-1][0] == float("inf")
        assert les[-1][1] == metric(text, "strom_request_latency_microseconds_count",
                                    api="Produce", shard=shard)
    assert metric(text, "strom_request_latency_quantile_microseconds", api="Produce", quantile="0.99") > 0
    assert metric(text, "strom_records_produced_total") == 1000
    assert metric(text, "strom_fsyncs_total") >= 1
    assert metric(text, "strom_bytes_in_total") > 100_000
    assert metric(text, "strom_bytes_out_total") > 100_000
    assert metric(text, "strom_cross_shard_requests_total") >= 1
    assert metric(text, "strom_fetch_cache_hits_total") + metric(text, "strom_fetch_cache_misses_total") >= 1
    assert metric(text, "strom_partitions") >= 4

    status, ctype, body = scrape(broker, "/v1/status")
    info = json.loads(body)
    assert status == 200 and info["status"] == "ok" and info["shards"] == 2 and info["topics"] >= 1
    assert len(info["cluster_id"]) == 22


def test_a_consumer_reading_from_disk_is_served_by_read_ahead_and_misses_nothing(broker_factory):
    """A consumer far behind (its records no longer in the batch cache) reads sequentially from
    the segments: each read starts the next one, so most disk reads were under way before they
    were asked for (strom_fetch_readahead_hits). Every record comes back once, in order, and a
    second consumer reading at another position meanwhile gets its own records right."""
    broker = broker_factory(extra_args=["--set", "strom.cache.bytes.per.shard=65536"])
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("behind", 2, 1)])
    admin.close()
    # Small batches, however fast the producer: a whole batch of 1 MB (librdkafka's default
    # batch.size) would make each fetch one batch, and there would be few reads to count.
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 5,
                  "batch.size": 16384})
    n = 20000
    for i in range(n):
        p.produce("behind", value=f"{i:08d}".encode().ljust(512, b"."), partition=i % 2)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0

    def read(partition, start):
        c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"ra-{partition}-{start}",
                      "enable.auto.commit": False, "max.partition.fetch.bytes": 65536})
        c.assign([TopicPartition("behind", partition, start)])
        got = []
        deadline = time.time() + 60
        while len(got) < n // 2 - start and time.time() < deadline:
            m = c.poll(0.5)
            if m is not None and not m.error():
                got.append((m.offset(), int(m.value()[:8])))
        c.close()
        return got

    got = read(0, 0)
    assert [o for o, _ in got] == list(range(n // 2))
    assert [v for _, v in got] == list(range(0, n, 2))
    later = read(1, 3000)
    assert [o for o, _ in later] == list(range(3000, n // 2))
    assert [v for _, v in later] == list(range(6001, n, 2))
    time.sleep(1.5)  # shards publish their numbers once a second
    _, _, text = scrape(broker, "/metrics")
    misses = metric(text, "strom_fetch_cache_misses_total")
    ahead = metric(text, "strom_fetch_readahead_hits_total")
    assert misses > 20 and ahead > misses / 2, (misses, ahead)


def test_metrics_time_the_journal_and_the_shards(broker):
    """An operator can tell a slow device from a busy shard: after acks=all produces, /metrics
    holds per-shard histograms of the journal's writes and fdatasyncs (one sample per round and
    per sync, so never more than the journal counts itself) and of how late each shard's 10 ms
    probe timer fired."""
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, request_timeout_ms=10000)
    admin.create_topics([NewTopic("timed", 4, 1)])
    admin.close()
    p = Producer({"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 0})
    for i in range(200):
        p.produce("timed", value=b"t" * 100, partition=i % 4)
        p.flush(10)  # one at a time: each record its own round and sync
    assert p.flush(10) == 0
    time.sleep(2.5)  # several probe periods, and the once-a-second publish after them
    _, _, text = scrape(broker, "/metrics")
    writes = metric(text, "strom_journal_write_latency_microseconds_count")
    syncs = metric(text, "strom_journal_sync_latency_microseconds_count")
    rounds = metric(text, "strom_journal_rounds_total")
    assert rounds >= 100, rounds
    assert writes == rounds, (writes, rounds)
    assert 100 <= syncs <= metric(text, "strom_fsyncs_total"), syncs
    for name in ("strom_journal_write_latency_microseconds", "strom_journal_sync_latency_microseconds"):
        # A write or sync takes at least a microsecond, and p99 is never above the max.
        p99 = metric(text, name.replace("_microseconds", "_quantile_microseconds"), quantile="0.99")
        top = metric(text, name.replace("_microseconds", "_quantile_microseconds"), quantile="1")
        assert 0 < p99 <= top, (name, p99, top)
        assert metric(text, name + "_bucket", le="+Inf") == metric(text, name + "_count")
    for shard in ("0", "1"):
        # 2.5 s of 10 ms probes, on each shard, whatever it did meanwhile.
        probes = metric(text, "strom_shard_lateness_microseconds_count", shard=shard)
        assert probes >= 100, (shard, probes)
