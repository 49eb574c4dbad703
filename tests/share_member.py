"""A share-group member as its own process, so a test can SIGKILL it while it holds records: it
polls once in explicit acknowledgement mode, prints `HOLDING <offset> ...` and then sleeps,
acknowledging nothing."""

import sys
import time

from confluent_kafka import ShareConsumer


def main():
    bootstrap, group, topic = sys.argv[1:4]
    c = ShareConsumer({"bootstrap.servers": bootstrap, "group.id": group,
                       "share.acknowledgement.mode": "explicit"})
    c.subscribe([topic])
    while True:
        got = [m for m in c.poll(1.0) if m.error() is None]
        if got:
            print("HOLDING " + " ".join(str(m.offset()) for m in got), flush=True)
            break
    time.sleep(3600)


if __name__ == "__main__":
    main()
