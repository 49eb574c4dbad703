//! Inputs the benchmarks share.

use bytes::BytesMut;
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};

/// A record batch as a producer sends it: `records` records with a key and a value of
/// `value_bytes`.
pub fn sample_batch(records: usize, value_bytes: usize) -> BytesMut {
    let records: Vec<Record> = (0..records)
        .map(|i| {
            strom::storage::records::plain_record(
                i as i64,
                1_700_000_000_000,
                Some(bytes::Bytes::from(format!("key-{i}"))),
                Some(bytes::Bytes::from(vec![b'x'; value_bytes])),
            )
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
