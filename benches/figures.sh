#!/usr/bin/env bash
# Measures strom with the shipped workloads and, in the same run, the baselines it is judged
# against: raw loopback TCP throughput (iperf3), O_DIRECT sequential write and read bandwidth and
# fdatasync latency of the data directory's disk (fio). Prints one summary with ratios.
#   bash benches/figures.sh [MEASURED_SECONDS]      (needs: apt-get install iperf3 fio kcat)
#   ROUNDS=3 (rounds per workload), PEER=HOST:PORT (a broker to compare with, in the same rounds),
#   PLOT=/tmp/strom-figures.svg (latency percentile curves of the 50,000 msg/s rounds),
#   RDKAFKA_PERFORMANCE=PATH (librdkafka's benchmark client; also found on the PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20}
rounds=${ROUNDS:-3}
plot=${PLOT:-/tmp/strom-figures.svg}
cargo build --release --quiet
work=$(mktemp -d "$PWD/bench-run.XXXXXX")
# The broker writes out what it holds as it stops: wait for it before removing its directory.
trap 'if [ -n "${broker:-}" ]; then kill "$broker" 2>/dev/null; wait "$broker" 2>/dev/null; fi; rm -rf "$work"' EXIT

iperf3 -s -1 -p 25201 >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p 25201 -t 5 -J >"$work/iperf.json"
fio --name=seqwrite --directory="$work" --rw=write --bs=128k --size=1G --direct=1 --ioengine=io_uring \
    --iodepth=4 --runtime=8 --time_based --output-format=json >"$work/fio-write.json"
fio --name=seqread --directory="$work" --rw=read --bs=1M --size=1G --direct=1 --ioengine=io_uring \
    --iodepth=4 --runtime=8 --time_based --output-format=json >"$work/fio-read.json"
fio --name=fsync --directory="$work" --rw=write --bs=4k --size=64M --direct=1 --ioengine=sync \
    --fdatasync=1 --runtime=8 --time_based --output-format=json >"$work/fio-sync.json"
rm -f "$work"/seqwrite* "$work"/seqread* "$work"/fsync*
# On a file system with online discard the 1 GB just deleted is trimmed in the next commits: let
# that happen before strom is measured (it held journal writes for up to 230 ms here).
sync -f "$work"
sleep 6

started_ns=$(date +%s%N)
serve() {
    ./target/release/strom serve --listen 127.0.0.1:29092 --admin-listen 127.0.0.1:0 \
        --data-dir "$work/strom" >"$work/broker.out" 2>>"$work/broker.err" &
    broker=$!
    until grep -q "strom listening" "$work/broker.out"; do sleep 0.005; done
}
serve
startup_ms=$(( ($(date +%s%N) - started_ns) / 1000000 ))
rss_idle_kib=$(awk '/VmRSS/ {print $2}' /proc/$broker/status)
admin=$(sed -n 's/^strom admin on //p' "$work/broker.out")
# fdatasyncs (segments and journal) so far, from /metrics; and the seconds since the epoch.
fsyncs() { curl -s "http://$admin/metrics" | awk '/^strom_fsyncs_total/ {s += $2} END {print s + 0}'; }
now_s() { date +%s.%N; }

# Every strom bench figure is the median of $rounds rounds, with its range; with PEER=HOST:PORT
# (another Kafka-compatible broker, e.g. Tansu) the rounds alternate between strom (A) and the
# peer (B) and the summary gives the ratio A/B.
compare=()
if [ -n "${PEER:-}" ]; then compare=(--compare "$PEER"); fi
echo "load average before the max-rate rounds: $(cut -d' ' -f1-3 /proc/loadavg)"
./target/release/strom bench --bootstrap 127.0.0.1:29092 "${compare[@]}" --rounds "$rounds" \
    --workload benches/workloads/max-rate-1-topic-16-partitions-1kb.toml \
    --duration-s "$duration" --json "$work/max-rate.json" | grep -v '^\[' | tail -n 12
echo "load average before the 50,000 msg/s rounds: $(cut -d' ' -f1-3 /proc/loadavg)"
f0=$(fsyncs); t0=$(now_s)
./target/release/strom bench --bootstrap 127.0.0.1:29092 "${compare[@]}" --rounds "$rounds" \
    --workload benches/workloads/1-topic-16-partitions-1kb.toml \
    --duration-s "$duration" --json "$work/fixed.json" --plot "$plot" | grep -v '^\[' | tail -n 12
# With a peer, strom ran only half of that time: the rate then understates strom's.
fsyncs_16=$(echo "($(fsyncs) - $f0) / ($(now_s) - $t0)" | bc -l)
echo "load average before the 1,000-partition round: $(cut -d' ' -f1-3 /proc/loadavg)"
f0=$(fsyncs); t0=$(now_s)
./target/release/strom bench --bootstrap 127.0.0.1:29092 \
    --workload benches/workloads/1-topic-1000-partitions-1kb.toml \
    --duration-s "$duration" --json "$work/wide.json" | grep -v '^\[' | tail -n 4
fsyncs_1000=$(echo "($(fsyncs) - $f0) / ($(now_s) - $t0)" | bc -l)
echo "load average before the 10,000-partition round: $(cut -d' ' -f1-3 /proc/loadavg)"
./target/release/strom bench --bootstrap 127.0.0.1:29092 \
    --workload benches/workloads/1-topic-10000-partitions-1kb-10k.toml \
    --duration-s "$duration" --json "$work/wider.json" | grep -v '^\[' | tail -n 4

# Consume from the beginning: 1 GiB of 1 KiB records written with kcat, read back with kcat
# (librdkafka); the figure is bound by kcat's per-record work as much as by the broker.
consumed_mb=0
consume_s=0
if command -v kcat >/dev/null; then
    kcat -b 127.0.0.1:29092 -L >/dev/null
    python3 -c "import sys; line = b'x' * 1023 + b'\n'; [sys.stdout.buffer.write(line * 1024) for _ in range(1024)]" \
        | kcat -P -b 127.0.0.1:29092 -t figures-consume -X linger.ms=5 -X batch.size=1000000 \
              -X queue.buffering.max.kbytes=1048576
    started_ns=$(date +%s%N)
    consumed_mb=$(kcat -C -b 127.0.0.1:29092 -t figures-consume -o beginning -e -q -f '%S\n' \
        | awk '{s += $1} END {printf "%.1f", s / 1e6}')
    consume_s=$(echo "scale=3; ($(date +%s%N) - $started_ns) / 1000000000" | bc)
fi

# librdkafka's own benchmark client, when installed (RDKAFKA_PERFORMANCE=PATH or on the PATH; the
# README says how to build it from Debian's librdkafka source): max-rate acks=all produce of 2 GB
# (2,000,000 x 1 KiB) to 16 partitions, then the same 2 GB consumed from the beginning; $rounds
# rounds, each on a new topic. Broker CPU per GB from /proc (clock ticks of the broker process).
# Each round then runs `strom bench` producing only (no consumer, as rdkafka_performance -P) for
# the strom bench / rdkafka_performance ratio.
rdk=${RDKAFKA_PERFORMANCE:-$(command -v rdkafka_performance || true)}
rdk_produce=""
rdk_consume=""
rdk_cpu=""
rdk_disk=""
rss_loaded_kib=0
if [ -n "$rdk" ] && [ -x "$rdk" ]; then
    ticks() { awk '{print $14 + $15}' "/proc/$broker/stat"; }
    hz=$(getconf CLK_TCK)
    # One -p per partition: rdkafka_performance reads a single number per -p.
    all_partitions=()
    for p in $(seq 0 15); do all_partitions+=(-p "$p"); done
    for round in $(seq 1 "$rounds"); do
        topic=figures-rdk-$round
        ./target/release/strom topic create "$topic" --partitions 16 --bootstrap 127.0.0.1:29092 >/dev/null || true
        echo "load average before rdkafka_performance round $round: $(cut -d' ' -f1-3 /proc/loadavg)"
        c0=$(ticks)
        mb=$("$rdk" -P -t "$topic" -b 127.0.0.1:29092 -s 1024 -c 2000000 -a -1 -X linger.ms=5 \
            -X batch.size=1000000 -q -u 2>&1 | grep '^| *[0-9]' | tail -1 | awk -F'|' '{print $8 + 0}' || true)
        c1=$(ticks)
        rdk_produce="$rdk_produce $mb"
        rdk_cpu="$rdk_cpu $(echo "($c1 - $c0) / $hz / 2.048" | bc -l)"
        mb=$("$rdk" -C -t "$topic" -b 127.0.0.1:29092 "${all_partitions[@]}" -o beginning -c 2000000 \
            -q -u 2>&1 | grep '^| *[0-9]' | tail -1 | awk -F'|' '{print $7 + 0}' || true)
        rdk_consume="$rdk_consume $mb"
        ./target/release/strom bench --bootstrap 127.0.0.1:29092 \
            --workload benches/workloads/max-rate-produce-only-1-topic-16-partitions-1kb.toml \
            --duration-s "$duration" --json "$work/produce-only-$round.json" | grep '^produce' || true
    done
    # The last round's 2 GB once more after a restart, so from the segments: the cache (an eighth
    # of memory by default) held it all above, as Kafka's page cache would have.
    rss_loaded_kib=$(awk '/VmRSS/ {print $2}' /proc/$broker/status)
    kill "$broker"
    wait "$broker" || true
    serve
    echo "load average before the consume from disk: $(cut -d' ' -f1-3 /proc/loadavg)"
    rdk_disk=$("$rdk" -C -t "figures-rdk-$rounds" -b 127.0.0.1:29092 "${all_partitions[@]}" -o beginning \
        -c 2000000 -q -u 2>&1 | grep '^| *[0-9]' | tail -1 | awk -F'|' '{print $7 + 0}' || true)
fi

python3 - "$work" "$rss_idle_kib" "$startup_ms" "$consumed_mb" "$consume_s" "$fsyncs_16" "$fsyncs_1000" \
    "$rdk_produce" "$rdk_consume" "$rdk_cpu" "$rdk_disk" "$rss_loaded_kib" <<'PY'
import glob, json, sys
work, rss, startup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
consumed_mb, consume_s = float(sys.argv[4]), float(sys.argv[5])
fsyncs_16, fsyncs_1000 = float(sys.argv[6]), float(sys.argv[7])
tcp = json.load(open(f"{work}/iperf.json"))["end"]["sum_received"]["bits_per_second"] / 8e6
disk = json.load(open(f"{work}/fio-write.json"))["jobs"][0]["write"]["bw_bytes"] / 1e6
disk_read = json.load(open(f"{work}/fio-read.json"))["jobs"][0]["read"]["bw_bytes"] / 1e6
sync = json.load(open(f"{work}/fio-sync.json"))["jobs"][0]["sync"]["lat_ns"]["percentile"]
sync_p99 = sync["99.000000"] / 1e6


def spread(report, figure, target="A"):
    if "summary" not in report:  # one round against strom only: the single-run keys
        kind, _, q = figure.rpartition("_")[0].partition("_")
        v = report[f"{kind}_latency_ms"][q] if figure.endswith("_ms") else report[figure]
        return {"median": v, "min": v, "max": v}
    s = next(t for t in report["summary"] if t["target"] == target)
    return dict(s["figures"])[figure]


def fmt(report, figure, unit, digits=1):
    s = spread(report, figure)
    out = f"{s['median']:.{digits}f} {unit} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"
    ratios = dict(report.get("ratios", []))
    if figure in ratios:
        out += f", peer {spread(report, figure, 'B')['median']:.{digits}f} -> A/B {ratios[figure]:.2f}"
    return out


mx = json.load(open(f"{work}/max-rate.json"))
fx = json.load(open(f"{work}/fixed.json"))
bound = min(tcp, disk)
mb = spread(mx, "produce_mb_per_s")["median"]
p99 = spread(fx, "e2e_p99_ms")["median"]
p999 = spread(fx, "e2e_p999_ms")["median"]
print(f"baseline loopback TCP            {tcp:10.1f} MB/s")
print(f"baseline O_DIRECT seq write      {disk:10.1f} MB/s")
print(f"baseline O_DIRECT seq read       {disk_read:10.1f} MB/s")
print(f"baseline fdatasync p99           {sync_p99:10.2f} ms  (p50 {sync['50.000000']/1e6:.2f} ms)")
print(f"max-rate produce, acks=all       {fmt(mx, 'produce_mb_per_s', 'MB/s')}  = {mb / bound:.2f} x min(TCP, disk)  (target >= 0.60)")
print(f"50k msg/s produce rate           {fmt(fx, 'produce_msgs_per_s', 'msg/s', 0)}")
print(f"50k msg/s e2e p99                {fmt(fx, 'e2e_p99_ms', 'ms', 2)}  vs fdatasync p99 + 1 ms = {sync_p99 + 1:.2f} ms")
print(f"50k msg/s e2e p99.9 / p99        {p999 / max(p99, 1e-9):10.2f}     (target <= 3)")
wide = json.load(open(f"{work}/wide.json"))
wide_p99 = wide["e2e_latency_ms"]["p99"]
print(f"1,000 partitions e2e p99         {wide_p99:10.2f} ms  = {wide_p99 / max(p99, 1e-9):.1f} x the 16-partition p99  (target <= 1.5)")
wider = json.load(open(f"{work}/wider.json"))
print(f"10,000 partitions at 10,000 msg/s  e2e p99 {wider['e2e_latency_ms']['p99']:.2f} ms, p50 {wider['e2e_latency_ms']['p50']:.2f} ms, "
      f"{wider.get('produce_msgs_per_s', 0):.0f} msg/s produced, errors {wider.get('errors', 0)}")
print(f"fdatasyncs/s, 16 partitions      {fsyncs_16:10.0f}")
print(f"fdatasyncs/s, 1,000 partitions   {fsyncs_1000:10.0f}     = {fsyncs_1000 / max(fsyncs_16, 1e-9):.2f} x 16 partitions  (target <= 1)")
if consume_s > 0:
    rate = consumed_mb / consume_s
    print(f"consume from the beginning (kcat) {rate:9.1f} MB/s  = {rate / bound:.2f} x min(TCP, disk)  ({consumed_mb:.0f} MB in {consume_s:.2f} s; target >= 0.60)")
rdk = [[float(v) for v in arg.split()] for arg in sys.argv[8:11]]
if rdk[0]:
    import statistics

    def med(vs):
        return f"{statistics.median(vs):.1f} [{min(vs):.1f}-{max(vs):.1f}]"

    produce, consume, cpu = rdk
    print(f"rdkafka_performance max-rate produce, acks=all  {med(produce)} MB/s  = {statistics.median(produce) / bound:.2f} x min(TCP, disk)  (target >= 0.60)")
    print(f"  broker CPU per GB produced     {med(cpu)} core-seconds")
    alone = [json.load(open(f))["produce_mb_per_s"] for f in sorted(glob.glob(f"{work}/produce-only-*.json"))]
    if alone:
        print(f"  strom bench producing only      {med(alone)} MB/s  = {statistics.median(alone) / statistics.median(produce):.2f} x rdkafka_performance  (target >= 0.90)")
    print(f"  strom bench max-rate (it also consumes) / rdkafka_performance  {mb / statistics.median(produce):.2f}")
    print(f"rdkafka_performance consume, 2 GB from the beginning  {med(consume)} MB/s  = {statistics.median(consume) / bound:.2f} x min(TCP, disk)  (target >= 0.60)")
    if sys.argv[11].strip():
        from_disk = float(sys.argv[11])
        print(f"  the same 2 GB after a restart (from disk)  {from_disk:.1f} MB/s  = {from_disk / min(tcp, disk_read):.2f} x min(TCP, O_DIRECT read)")
    print(f"  broker RSS after the rounds    {int(sys.argv[12]) / 1024:10.1f} MiB  (the recent-batch cache)")
print(f"idle broker RSS (no partitions)  {rss / 1024:10.1f} MiB  (target < 64)")
print(f"start-up to serving, empty dir   {startup:10d} ms   (target < 300)")
PY
