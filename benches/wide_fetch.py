"""The broker's cost of a wide Fetch: sessionless Fetch v4 requests for every partition of one
topic (as librdkafka sends them; min_bytes 0, so nothing waits), on several connections with
several requests in flight each. Prints fetches per second and the broker's CPU per fetch (read
from /proc of the broker's pid), the figure that per-partition work in the Fetch path moves.

    python3 benches/wide_fetch.py --pid $(pgrep -f 'strom serve') [--bootstrap 127.0.0.1:9092]
        [--partitions 1000] [--seconds 10]

Run it against two builds in alternating rounds and compare the ratio; the machine is shared.
"""
import argparse
import os
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import kafka_wire as kw  # noqa: E402
from kafka.admin import KafkaAdminClient, NewTopic  # noqa: E402
from kafka.errors import TopicAlreadyExistsError  # noqa: E402


def broker_cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--pid", type=int, required=True, help="the broker's process id")
    ap.add_argument("--topic", default="wide-fetch")
    ap.add_argument("--partitions", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--depth", type=int, default=4, help="requests in flight per connection")
    args = ap.parse_args()
    admin = KafkaAdminClient(bootstrap_servers=args.bootstrap)
    try:
        admin.create_topics([NewTopic(args.topic, args.partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    admin.close()
    time.sleep(1)
    body = kw.request_header(1, 4, 1)
    body += struct.pack(">iiiib", -1, 0, 0, 1 << 20, 0)
    body += struct.pack(">i", 1) + kw.kstring(args.topic.encode())
    body += struct.pack(">i", args.partitions)
    for p in range(args.partitions):
        body += struct.pack(">iqi", p, 0, 1 << 20)
    request = kw.frame(body)
    answered = [0] * args.connections
    stop = time.monotonic() + args.seconds

    def drive(i):
        s = kw.connect(args.bootstrap)
        for _ in range(args.depth):
            s.sendall(request)
        while time.monotonic() < stop:
            if kw.read_frame(s) is None:
                raise SystemExit("the broker closed the connection")
            answered[i] += 1
            s.sendall(request)
        for _ in range(args.depth):
            kw.read_frame(s)

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(args.connections)]
    ticks = os.sysconf("SC_CLK_TCK")
    cpu0, t0 = broker_cpu_ticks(args.pid), time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed, cpu_s = time.monotonic() - t0, (broker_cpu_ticks(args.pid) - cpu0) / ticks
    n = sum(answered)
    print(f"partitions={args.partitions} fetches_per_s={n / elapsed:.0f} "
          f"broker_cpu_ms_per_fetch={cpu_s * 1000 / max(n, 1):.3f} broker_cores={cpu_s / elapsed:.2f}")


if __name__ == "__main__":
    main()
