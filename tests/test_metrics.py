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
    assert metric(text, "strom_request_latency_microseconds_bucket", api="Produce", le="+Inf") >= 1
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
