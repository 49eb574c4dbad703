"""A consumer-group member as its own process, so a test can SIGKILL it. Prints one line per
record (`partition offset value`) and commits each record's offset synchronously before the next,
so what it printed and what is committed never differ by more than the record in hand."""

import sys

from confluent_kafka import Consumer


def main():
    bootstrap, group, topic, strategy = sys.argv[1:5]
    c = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
        "enable.auto.commit": False, "session.timeout.ms": 6000, "heartbeat.interval.ms": 500,
        "partition.assignment.strategy": strategy,
    })

    def on_assign(consumer, partitions):
        print("ASSIGNED " + ",".join(str(p.partition) for p in partitions), flush=True)

    c.subscribe([topic], on_assign=on_assign)
    while True:
        m = c.poll(0.2)
        if m is None or m.error():
            continue
        print(f"{m.partition()} {m.offset()} {m.value().decode()}", flush=True)
        c.commit(message=m, asynchronous=False)


if __name__ == "__main__":
    main()
