//! Micro-benchmarks of the produce path's per-batch work: CRC-32C over batch bytes, and parsing
//! plus validating a record batch header (what every produced batch goes through).

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};

use strom::storage::batch;

fn sample_batch(records: usize, value_bytes: usize) -> BytesMut {
    let records: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // One batch: the encoder splits wherever offset - sequence changes.
            sequence: i as i32 - 1,
            timestamp: 1_700_000_000_000,
            key: Some(bytes::Bytes::from(format!("key-{i}"))),
            value: Some(bytes::Bytes::from(vec![b'x'; value_bytes])),
            headers: Default::default(),
        })
        .collect();
    let mut buf = BytesMut::new();
    let options = RecordEncodeOptions {
        version: 2,
        compression: Compression::None,
    };
    RecordBatchEncoder::encode(&mut buf, &records, &options).expect("encoding a sample batch");
    buf
}

fn bench_crc(c: &mut Criterion) {
    let data = vec![0xA5u8; 16 * 1024];
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.bench_function("16KiB", |b| {
        b.iter(|| crc32c::crc32c(std::hint::black_box(&data)))
    });
    g.finish();
}

fn bench_validate(c: &mut Criterion) {
    let batch = sample_batch(16, 1024);
    let mut g = c.benchmark_group("batch");
    g.throughput(Throughput::Bytes(batch.len() as u64));
    g.bench_function("validate_16x1KiB", |b| {
        b.iter(|| batch::validate(std::hint::black_box(&batch)).expect("valid batch"))
    });
    g.finish();
}

criterion_group!(benches, bench_crc, bench_validate);
criterion_main!(benches);
