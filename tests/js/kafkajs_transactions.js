// A kafkajs transactional producer commits one transaction and aborts another, then a
// read_committed consumer (kafkajs's default) prints what it saw as a JSON list.
// Run by test_transactions.py: node kafkajs_transactions.js BOOTSTRAP TOPIC
const { Kafka, logLevel } = require('kafkajs');

const [bootstrap, topic] = process.argv.slice(2);
const kafka = new Kafka({ clientId: 'strom-test', brokers: [bootstrap], logLevel: logLevel.ERROR });

(async () => {
  const producer = kafka.producer({ transactionalId: 'kafkajs-txn', maxInFlightRequests: 1, idempotent: true });
  await producer.connect();
  let txn = await producer.transaction();
  await txn.send({ topic, messages: [0, 1, 2, 3].map((i) => ({ value: `kept-${i}`, partition: i % 2 })) });
  await txn.commit();
  txn = await producer.transaction();
  await txn.send({ topic, messages: [0, 1, 2, 3].map((i) => ({ value: `dropped-${i}`, partition: i % 2 })) });
  await txn.abort();
  await producer.disconnect();

  const consumer = kafka.consumer({ groupId: 'kafkajs-reader', readUncommitted: false });
  await consumer.connect();
  await consumer.subscribe({ topic, fromBeginning: true });
  const seen = [];
  await consumer.run({ eachMessage: async ({ message }) => { seen.push(message.value.toString()); } });
  const deadline = Date.now() + 20000;
  while (seen.length < 4 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 200));
  }
  await new Promise((r) => setTimeout(r, 1000)); // anything aborted would arrive by now
  await consumer.disconnect();
  console.log(JSON.stringify(seen.sort()));
})().catch((e) => { console.error(e); process.exit(1); });
