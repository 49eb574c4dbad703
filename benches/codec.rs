//! Micro-benchmarks of the request path's CPU work: CRC-32C over batch bytes, parsing plus
//! validating a record batch (what every produced batch goes through), and decoding Produce and
//! Fetch requests with the kafka-protocol crate.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use strom::storage::batch;

mod common;
use common::sample_batch;

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

fn bench_request_decode(c: &mut Criterion) {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{FetchRequest, ProduceRequest, TopicName};
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

    let batch = sample_batch(16, 1024).freeze();
    let mut produce = ProduceRequest::default();
    produce.acks = -1;
    produce.timeout_ms = 30_000;
    let mut topic = TopicProduceData::default();
    topic.name = TopicName(StrBytes::from_static_str("bench"));
    topic.partition_data = (0..16)
        .map(|p| {
            let mut d = PartitionProduceData::default();
            d.index = p;
            d.records = Some(batch.clone());
            d
        })
        .collect();
    produce.topic_data = vec![topic];
    let mut produce_bytes = BytesMut::new();
    produce
        .encode(&mut produce_bytes, 9)
        .expect("encode produce");
    let produce_bytes = produce_bytes.freeze();

    let mut fetch = FetchRequest::default();
    let mut ft = FetchTopic::default();
    ft.topic = TopicName(StrBytes::from_static_str("bench"));
    ft.partitions = (0..16)
        .map(|p| {
            let mut fp = FetchPartition::default();
            fp.partition = p;
            fp.fetch_offset = 1_000_000;
            fp.partition_max_bytes = 1 << 20;
            fp
        })
        .collect();
    fetch.topics = vec![ft];
    let mut fetch_bytes = BytesMut::new();
    fetch.encode(&mut fetch_bytes, 12).expect("encode fetch");
    let fetch_bytes = fetch_bytes.freeze();

    let mut g = c.benchmark_group("request_decode");
    g.throughput(Throughput::Bytes(produce_bytes.len() as u64));
    g.bench_function("produce_v9_16_partitions", |b| {
        b.iter(|| ProduceRequest::decode(&mut produce_bytes.clone(), 9).expect("decode"))
    });
    g.throughput(Throughput::Bytes(fetch_bytes.len() as u64));
    g.bench_function("fetch_v12_16_partitions", |b| {
        b.iter(|| FetchRequest::decode(&mut fetch_bytes.clone(), 12).expect("decode"))
    });
    g.finish();
}

/// Encoding a Fetch response of 16 partitions × 1 MiB of records: in chunks that reference the
/// batches (as strom answers one now), into one buffer sized up front (as it did before), and
/// into a buffer growing from 64 bytes (as it did before that).
fn bench_fetch_response_encode(c: &mut Criterion) {
    use bytes::BufMut;
    use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
    use kafka_protocol::messages::{ApiKey, FetchResponse, TopicName};
    use kafka_protocol::protocol::{Encodable, StrBytes};

    let batch = sample_batch(1024, 1000).freeze();
    let mut response = FetchResponse::default();
    let mut topic = FetchableTopicResponse::default();
    topic.topic = TopicName(StrBytes::from_static_str("bench"));
    topic.partitions = (0..16)
        .map(|p| {
            let mut d = PartitionData::default();
            d.partition_index = p;
            d.high_watermark = 1 << 20;
            d.records = Some(batch.clone());
            d
        })
        .collect();
    response.responses = vec![topic];
    let size = response.compute_size(12).expect("size");
    let mut g = c.benchmark_group("fetch_response_encode");
    g.throughput(Throughput::Bytes(size as u64));
    g.bench_function("v12_16x1MiB_sized", |b| {
        b.iter(|| {
            strom::protocol::encode_response(ApiKey::Fetch, 12, 7, &response).expect("encode")
        })
    });
    // The chunked encoding strom uses: the batches are referenced, not copied.
    g.bench_function("v12_16x1MiB_chunked", |b| {
        b.iter(|| {
            strom::protocol::chunked::encode_response_chunks(
                ApiKey::Fetch,
                12,
                7,
                &response,
                std::iter::once(&batch),
                strom::protocol::chunked::StandIns::default(),
            )
            .expect("encode")
        })
    });
    // A partition's 1 MiB as 16 cached batches of 64 KiB (what a Fetch from the broker's cache
    // gets): written as the pieces behind a stand-in, against copying them into one buffer.
    let pieces: Vec<bytes::Bytes> = (0..16).map(|_| sample_batch(1024, 64).freeze()).collect();
    let in_pieces = |stand_ins: &mut strom::protocol::chunked::StandIns| {
        let mut response = FetchResponse::default();
        let mut topic = FetchableTopicResponse::default();
        topic.topic = TopicName(StrBytes::from_static_str("bench"));
        topic.partitions = (0..16)
            .map(|p| {
                let mut batches = strom::storage::Batches::default();
                for piece in &pieces {
                    batches.push(piece.clone());
                }
                let mut d = PartitionData::default();
                d.partition_index = p;
                d.high_watermark = 1 << 20;
                d.records = Some(stand_ins.records(batches));
                d
            })
            .collect();
        response.responses = vec![topic];
        response
    };
    g.bench_function("v12_16x16x64KiB_pieces", |b| {
        b.iter(|| {
            let mut stand_ins = strom::protocol::chunked::StandIns::default();
            let response = in_pieces(&mut stand_ins);
            strom::protocol::chunked::encode_response_chunks(
                ApiKey::Fetch,
                12,
                7,
                &response,
                std::iter::empty(),
                stand_ins,
            )
            .expect("encode")
        })
    });
    g.bench_function("v12_16x16x64KiB_concatenated", |b| {
        b.iter(|| {
            let mut response = in_pieces(&mut strom::protocol::chunked::StandIns::default());
            for d in &mut response.responses[0].partitions {
                let mut joined = BytesMut::with_capacity(16 * pieces[0].len());
                for piece in &pieces {
                    joined.extend_from_slice(piece);
                }
                d.records = Some(joined.freeze());
            }
            let payloads: Vec<bytes::Bytes> = response.responses[0]
                .partitions
                .iter()
                .filter_map(|d| d.records.clone())
                .collect();
            strom::protocol::chunked::encode_response_chunks(
                ApiKey::Fetch,
                12,
                7,
                &response,
                payloads.iter(),
                strom::protocol::chunked::StandIns::default(),
            )
            .expect("encode")
        })
    });
    g.bench_function("v12_16x1MiB_grown", |b| {
        b.iter(|| {
            let mut buf = BytesMut::with_capacity(64);
            buf.put_i32(0);
            response.encode(&mut buf, 12).expect("encode");
            buf.freeze()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_crc,
    bench_validate,
    bench_request_decode,
    bench_fetch_response_encode
);
criterion_main!(benches);
