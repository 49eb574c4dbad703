"""kcat (Debian's, librdkafka 2.0.x) against strom: the strict old ApiVersions parser, and a
round trip of 10,000 keyed records with headers through a 4-partition topic."""

import collections
import subprocess

from kafka.admin import KafkaAdminClient, NewTopic


def create_topic(bootstrap, name, partitions, configs=None):
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs or {})])
    finally:
        admin.close()


def test_kcat_lists_metadata_with_the_advertised_broker(broker):
    out = subprocess.run(["kcat", "-b", broker.bootstrap, "-L"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"broker 0 at {broker.bootstrap}" in out.stdout


def test_kcat_roundtrip_10000_keyed_records_with_headers_in_partition_order(broker):
    create_topic(broker.bootstrap, "kcat-10k", 4)
    lines = [f"key-{i % 97}\tvalue-{i}" for i in range(10_000)]
    produced = subprocess.run(
        ["kcat", "-b", broker.bootstrap, "-t", "kcat-10k", "-P", "-K", "\t",
         "-H", "source=kcat", "-H", "trace=abc123", "-X", "acks=all"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=120)
    assert produced.returncode == 0, produced.stderr

    consumed = subprocess.run(
        ["kcat", "-b", broker.bootstrap, "-t", "kcat-10k", "-C", "-e", "-o", "beginning",
         "-f", "%p\t%o\t%k\t%s\t%h\n"],
        capture_output=True, text=True, timeout=120)
    assert consumed.returncode == 0, consumed.stderr
    rows = [line.split("\t") for line in consumed.stdout.splitlines() if line]
    assert len(rows) == 10_000

    by_partition = collections.defaultdict(list)
    keys_to_partition = {}
    for p, o, k, v, h in rows:
        by_partition[int(p)].append((int(o), k, v))
        assert h == "source=kcat,trace=abc123", h
        # A key always maps to one partition.
        assert keys_to_partition.setdefault(k, p) == p
    assert len(by_partition) == 4, "keys must spread over all 4 partitions"
    seen = set()
    for p, recs in by_partition.items():
        offsets = [o for o, _, _ in recs]
        assert offsets == list(range(len(recs))), f"partition {p} offsets not dense and ordered"
        seqs = [int(v.split("-")[1]) for _, _, v in recs]
        assert seqs == sorted(seqs), f"partition {p} is out of production order"
        for _, k, v in recs:
            i = int(v.split("-")[1])
            assert k == f"key-{i % 97}"
            seen.add(i)
    assert seen == set(range(10_000))
