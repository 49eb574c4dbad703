"""A consume-transform-produce processor (exactly-once, KIP-447), run as its own process by
test_transactions.py so that the test can kill -9 it.

    txn_processor.py BOOTSTRAP INPUT OUTPUT GROUP TRANSACTIONAL_ID SEED LOG

It reads INPUT with `read_committed`, and for each batch it polled writes one output record per
input record in one transaction, with the consumer's positions (send_offsets_to_transaction).
One transaction in ten (seeded) is aborted on purpose once its records are in the log.
Each output value is `<input value>|<transaction tag>|<records in the transaction>`, so a reader
can tell torn transactions. LOG gets a line `commit TAG` after each commit returned and
`abort TAG` after each abort, so a reader can tell aborted reads. An error it cannot abort out of
ends the process (exit 3): the test starts a new one, which fences this one's transactional id.
"""

import random
import sys
import uuid

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition


def main():
    bootstrap, input_topic, output_topic, group, txn_id, seed, log_path = sys.argv[1:8]
    rng = random.Random(int(seed))
    log = open(log_path, "a", buffering=1)
    consumer = Consumer({
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "session.timeout.ms": 6000,
        "reconnect.backoff.max.ms": 200,
    })
    producer = Producer({
        "bootstrap.servers": bootstrap,
        "transactional.id": txn_id,
        "transaction.timeout.ms": 10000,
        "linger.ms": 1,
        "reconnect.backoff.max.ms": 200,
    })
    producer.init_transactions(30)
    consumer.subscribe([input_topic])
    print("ready", flush=True)
    while True:
        msgs = [m for m in consumer.consume(num_messages=rng.randint(1, 20), timeout=0.5)
                if m.error() is None]
        if not msgs:
            continue
        tag = uuid.uuid4().hex[:12]
        try:
            producer.begin_transaction()
            for m in msgs:
                value = f"{m.value().decode()}|{tag}|{len(msgs)}".encode()
                producer.produce(output_topic, key=m.key(), value=value)
            positions = consumer.position(consumer.assignment())
            producer.send_offsets_to_transaction(positions, consumer.consumer_group_metadata(), 30)
            if rng.random() < 0.1:
                # One transaction in ten is abandoned once its records are in the log: readers
                # must never see them, and the input is processed again.
                producer.flush(30)
                producer.abort_transaction(30)
                log.write(f"abort {tag}\n")
                rewind(consumer)
                continue
            producer.commit_transaction(30)
            log.write(f"commit {tag}\n")
        except KafkaException as e:
            err = e.args[0]
            if not err.txn_requires_abort():
                print(f"fatal: {err}", flush=True)
                sys.exit(3)
            producer.abort_transaction(30)
            log.write(f"abort {tag}\n")
            rewind(consumer)


def rewind(consumer):
    """Start again from what the group committed."""
    committed = consumer.committed(consumer.assignment(), timeout=30)
    for tp in committed:
        consumer.seek(TopicPartition(tp.topic, tp.partition, max(tp.offset, 0)))


if __name__ == "__main__":
    try:
        main()
    except KafkaException as e:
        print(f"fatal: {e}", flush=True)
        sys.exit(3)
