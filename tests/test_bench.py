"""`strom bench` runs the shipped workloads' format end to end against strom and writes JSON
with the agreed keys (short, low-rate runs: this checks the tool, not performance)."""

import json
import os
import subprocess

from conftest import ROOT, STROM_BIN

WORKLOADS = os.path.join(ROOT, "benches", "workloads")


def test_shipped_workloads_parse_and_declare_acks_all():
    import tomllib
    for name in ("1-topic-16-partitions-1kb.toml", "max-rate-1-topic-16-partitions-1kb.toml"):
        with open(os.path.join(WORKLOADS, name), "rb") as f:
            w = tomllib.load(f)
        assert w["acks"] == "all" and w["partitions_per_topic"] == 16 and w["message_size"] == 1024
    with open(os.path.join(WORKLOADS, "1-topic-16-partitions-1kb.toml"), "rb") as f:
        assert tomllib.load(f)["producer_rate"] == 50000
    # The produce-only max-rate workload is the max-rate one without its consumer.
    loaded = {}
    for name in ("max-rate-1-topic-16-partitions-1kb.toml",
                 "max-rate-produce-only-1-topic-16-partitions-1kb.toml"):
        with open(os.path.join(WORKLOADS, name), "rb") as f:
            loaded[name] = tomllib.load(f)
    both, alone = loaded.values()
    assert alone["consumers_per_topic"] == 0
    assert {k: v for k, v in alone.items() if k not in ("name", "consumers_per_topic")} == \
        {k: v for k, v in both.items() if k not in ("name", "consumers_per_topic")}


SMALL = """
name = "small"
topics = 1
partitions_per_topic = 4
message_size = 256
payload_random = true
producers_per_topic = 1
consumers_per_topic = {consumers}
producer_rate = 2000
acks = "all"
linger_ms = 1
warmup_s = 1
duration_s = 2
"""


def run_small(broker, tmp_path, consumers):
    """A 2-second run of 2,000 msg/s to 4 partitions: the process and its JSON report."""
    workload = tmp_path / "small.toml"
    workload.write_text(SMALL.format(consumers=consumers))
    out_json = tmp_path / "result.json"
    run = subprocess.run([STROM_BIN, "bench", "--bootstrap", broker.bootstrap, "--workload", str(workload),
                          "--duration-s", "2", "--json", str(out_json)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run, json.loads(out_json.read_text())


def test_bench_produces_without_consumers(broker, tmp_path):
    _, r = run_small(broker, tmp_path, consumers=0)
    assert r["errors"] == 0 and r["consumed"] == 0
    assert 1000 < r["produce_msgs_per_s"] < 3000
    assert 0 < r["publish_latency_ms"]["p50"] <= r["publish_latency_ms"]["p99"]


def test_bench_runs_a_workload_and_writes_json(broker, tmp_path):
    run, r = run_small(broker, tmp_path, consumers=1)
    assert "publish" in run.stdout and "end-to-end" in run.stdout and "p99.99" in run.stdout
    for key in ("produce_msgs_per_s", "produce_mb_per_s", "consume_msgs_per_s"):
        assert r[key] > 0, key
    for hist in ("publish_latency_ms", "e2e_latency_ms"):
        assert set(r[hist]) >= {"p50", "p99", "p999", "p9999", "max"}
        assert 0 < r[hist]["p50"] <= r[hist]["p99"] <= r[hist]["max"]
    assert r["errors"] == 0
    assert r["consumed"] == r["produced"] > 0
    # About the requested 2,000 msg/s.
    assert 1000 < r["produce_msgs_per_s"] < 3000
    assert (tmp_path / "result.publish.hgrm").read_text().startswith("       Value")


def test_bench_compares_two_brokers_in_interleaved_rounds_and_plots_them(broker_factory, tmp_path):
    """--compare runs the workload against a second broker, alternating which goes first each
    round; the summary has each broker's median and range and the ratio A/B of the medians;
    --plot draws every run's percentile curves into an SVG; --threads sets the producers."""
    a, b = broker_factory(), broker_factory()
    workload = tmp_path / "tiny.toml"
    workload.write_text('name = "tiny"\ntopics = 1\npartitions_per_topic = 2\nmessage_size = 128\n'
                        'producers_per_topic = 1\nconsumers_per_topic = 1\nproducer_rate = 1000\n'
                        'warmup_s = 1\nduration_s = 1\n')
    out_json, svg = tmp_path / "cmp.json", tmp_path / "curves.svg"
    run = subprocess.run([STROM_BIN, "bench", "--bootstrap", a.bootstrap, "--compare", b.bootstrap,
                          "--rounds", "2", "--threads", "2", "--cores", "0", "--workload", str(workload),
                          "--json", str(out_json), "--plot", str(svg)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(out_json.read_text())
    assert [(x["target"], x["round"]) for x in r["rounds"]] == [("A", 1), ("B", 1), ("B", 2), ("A", 2)]
    assert {x["bootstrap"] for x in r["rounds"] if x["target"] == "B"} == {b.bootstrap}
    assert all(x["errors"] == 0 and x["consumed"] == x["produced"] > 0 for x in r["rounds"])
    # The single-run keys hold A's median round.
    assert r["produce_msgs_per_s"] in [x["produce_msgs_per_s"] for x in r["rounds"] if x["target"] == "A"]
    spreads = {s["target"]: dict(s["figures"]) for s in r["summary"]}
    for t in ("A", "B"):
        rates = sorted(x["produce_msgs_per_s"] for x in r["rounds"] if x["target"] == t)
        got = spreads[t]["produce_msgs_per_s"]
        assert (got["min"], got["max"]) == (rates[0], rates[-1]) and got["median"] == sum(rates) / 2
    ratios = dict(r["ratios"])
    want = spreads["A"]["e2e_p99_ms"]["median"] / spreads["B"]["e2e_p99_ms"]["median"]
    assert abs(ratios["e2e_p99_ms"] - want) < 1e-9, (ratios, spreads)
    assert 0.5 < ratios["produce_msgs_per_s"] < 2
    assert "A/B" in run.stdout and "e2e_p99_ms" in run.stdout
    # The workload's rate holds when split over two producer connections.
    assert 800 < r["rounds"][0]["produce_msgs_per_s"] < 1200
    text = svg.read_text()
    assert text.startswith("<svg") and text.rstrip().endswith("</svg>")
    for t, addr in (("A", a.bootstrap), ("B", b.bootstrap)):
        for n in (1, 2):
            assert f"{t} {addr} r{n} e2e" in text and f"{t} {addr} r{n} publish" in text
    assert text.count("<polyline") >= 8 and "99.9%" in text


def test_bench_refuses_an_unknown_workload_field(tmp_path):
    workload = tmp_path / "bad.toml"
    workload.write_text('name = "x"\ntopics = 1\npartitions_per_topic = 1\nmessage_size = 64\n'
                        'producers_per_topic = 1\nconsumers_per_topic = 1\nproducer_rate = 1\nduration_s = 1\n'
                        'partitions = 3\n')
    run = subprocess.run([STROM_BIN, "bench", "--bootstrap", "127.0.0.1:1", "--workload", str(workload)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "unknown field `partitions`" in run.stderr


def test_tune_reports_each_check_and_fails_without_a_usable_data_dir(tmp_path):
    ok = subprocess.run([STROM_BIN, "tune", "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for name in ("io_uring", "memlock", "O_DIRECT", "online discard", "cpu governor", "transparent huge pages", "open files"):
        assert name in ok.stdout
    # Online discard is reported as the data directory's file system is mounted: a warning with
    # the fstrim advice if its mount (the longest mount point above it) has `discard`.
    mounts = []
    for line in open("/proc/self/mountinfo"):
        left, right = line.split(" - ", 1)
        point, options = left.split()[4].replace("\\040", " "), left.split()[5]
        mounts.append((point, options.split(",") + right.split()[2].split(",")))
    data = str((tmp_path / "data").resolve())
    point, options = max((m for m in mounts if data.startswith(m[0])), key=lambda m: len(m[0]))
    online = "discard" in options or "discard=sync" in options
    line = next(l for l in ok.stdout.splitlines() if "online discard" in l)
    assert line.startswith("[warn]" if online else "[ok  ]"), (line, point, options)
    assert ("fstrim.timer" in ok.stdout) == online
    assert "ready: strom can run here" in ok.stdout
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    bad = subprocess.run([STROM_BIN, "tune", "--data-dir", str(blocker / "data")], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "[FAIL] O_DIRECT" in bad.stdout
