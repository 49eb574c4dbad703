#!/usr/bin/env bash
# Measures strom with the shipped workloads and, in the same run, the baselines it is judged
# against: raw loopback TCP throughput (iperf3), O_DIRECT sequential write bandwidth and
# fdatasync latency of the data directory's disk (fio). Prints one summary with ratios.
#   bash benches/figures.sh [MEASURED_SECONDS]      (needs: apt-get install iperf3 fio)
set -euo pipefail
cd "$(dirname "$0")/.."
duration=${1:-20}
cargo build --release --quiet
work=$(mktemp -d "$PWD/bench-run.XXXXXX")
trap 'kill "${broker:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT

iperf3 -s -1 -p 25201 >/dev/null 2>&1 &
sleep 0.5
iperf3 -c 127.0.0.1 -p 25201 -t 5 -J >"$work/iperf.json"
fio --name=seqwrite --directory="$work" --rw=write --bs=128k --size=1G --direct=1 --ioengine=io_uring \
    --iodepth=4 --runtime=8 --time_based --output-format=json >"$work/fio-write.json"
fio --name=fsync --directory="$work" --rw=write --bs=4k --size=64M --direct=1 --ioengine=sync \
    --fdatasync=1 --runtime=8 --time_based --output-format=json >"$work/fio-sync.json"
rm -f "$work"/seqwrite* "$work"/fsync*

started_ns=$(date +%s%N)
./target/release/strom serve --listen 127.0.0.1:29092 --admin-listen 127.0.0.1:0 \
    --data-dir "$work/strom" >"$work/broker.out" 2>"$work/broker.err" &
broker=$!
until grep -q "strom listening" "$work/broker.out"; do sleep 0.005; done
startup_ms=$(( ($(date +%s%N) - started_ns) / 1000000 ))
rss_idle_kib=$(awk '/VmRSS/ {print $2}' /proc/$broker/status)

./target/release/strom bench --bootstrap 127.0.0.1:29092 \
    --workload benches/workloads/max-rate-1-topic-16-partitions-1kb.toml \
    --duration-s "$duration" --json "$work/max-rate.json" | tail -n 8
./target/release/strom bench --bootstrap 127.0.0.1:29092 \
    --workload benches/workloads/1-topic-16-partitions-1kb.toml \
    --duration-s "$duration" --json "$work/fixed.json" | tail -n 8

python3 - "$work" "$rss_idle_kib" "$startup_ms" <<'PY'
import json, sys
work, rss, startup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tcp = json.load(open(f"{work}/iperf.json"))["end"]["sum_received"]["bits_per_second"] / 8e6
disk = json.load(open(f"{work}/fio-write.json"))["jobs"][0]["write"]["bw_bytes"] / 1e6
sync = json.load(open(f"{work}/fio-sync.json"))["jobs"][0]["sync"]["lat_ns"]["percentile"]
sync_p99 = sync["99.000000"] / 1e6
mx = json.load(open(f"{work}/max-rate.json"))
fx = json.load(open(f"{work}/fixed.json"))
bound = min(tcp, disk)
print(f"baseline loopback TCP            {tcp:10.1f} MB/s")
print(f"baseline O_DIRECT seq write      {disk:10.1f} MB/s")
print(f"baseline fdatasync p99           {sync_p99:10.2f} ms  (p50 {sync['50.000000']/1e6:.2f} ms)")
print(f"max-rate produce, acks=all       {mx['produce_mb_per_s']:10.1f} MB/s  = {mx['produce_mb_per_s']/bound:.2f} x min(TCP, disk)  (target >= 0.50)")
print(f"50k msg/s produce rate           {fx['produce_msgs_per_s']:10.0f} msg/s")
e = fx["e2e_latency_ms"]
print(f"50k msg/s e2e p99                {e['p99']:10.2f} ms  vs fdatasync p99 + 1 ms = {sync_p99 + 1:.2f} ms")
print(f"50k msg/s e2e p99.9 / p99        {e['p999'] / max(e['p99'], 1e-9):10.2f}     (target <= 3)")
print(f"idle broker RSS (no partitions)  {rss / 1024:10.1f} MiB  (target < 64)")
print(f"start-up to serving, empty dir   {startup:10d} ms   (target < 300)")
PY
