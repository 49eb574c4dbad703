//! `strom produce TOPIC`: one record per line of standard input, to any Kafka-compatible cluster
//! (as `kcat -P` and `rpk topic produce`). Lines are batched as they arrive: whatever is waiting
//! when the previous request was answered goes out in the next one, one batch per partition, so
//! a pipe is sent in large batches and a typed line at once.
//!
//! Partitioning follows Kafka's default: `--partition` if given, else murmur2 of the key (the
//! Java client's and rpk's choice, so a key lands where their producers put it), else keyless
//! records stick to one partition for 16 KiB (`batch.size`), then move on to the next (Kafka's
//! sticky partitioner).
//!
//! Exit status: 0 once every record was acknowledged (with `--acks 0`, once sent); 1 when any
//! record failed (each failure is reported on stderr) or the cluster could not be reached.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Result};
use bytes::{Bytes, BytesMut};
use indexmap::IndexMap;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{ApiKey, ProduceRequest, ProduceResponse, TopicName};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};

use super::cluster::{retriable, Cluster, TopicLayout};
use crate::model::ErrorCode;

/// Bytes of record values and keys put in one request at most.
const REQUEST_BYTES_MAX: usize = 1 << 20;
/// Bytes of keyless records sent to one partition before moving on (Kafka's `batch.size`).
const STICKY_BATCH_BYTES: usize = 16 * 1024;
/// Attempts of a batch that failed with a retriable error.
const ATTEMPTS_MAX: u32 = 5;

pub struct ProduceOptions {
    pub topic: String,
    pub bootstrap: String,
    pub key_separator: Option<String>,
    pub headers: Vec<(String, String)>,
    pub partition: Option<i32>,
    pub acks: i16,
    pub compression: Compression,
}

pub fn parse_acks(s: &str) -> Result<i16> {
    Ok(match s {
        "all" | "-1" => -1,
        "1" => 1,
        "0" => 0,
        other => bail!("--acks takes all, 1 or 0, not '{other}'"),
    })
}

pub fn parse_compression(s: &str) -> Result<Compression> {
    Ok(match s {
        "none" => Compression::None,
        "gzip" => Compression::Gzip,
        "snappy" => Compression::Snappy,
        "lz4" => Compression::Lz4,
        "zstd" => Compression::Zstd,
        other => bail!("--compression takes none, gzip, snappy, lz4 or zstd, not '{other}'"),
    })
}

/// Parses `k=v` header arguments.
pub fn parse_headers(items: &[String]) -> Result<Vec<(String, String)>> {
    items
        .iter()
        .map(|h| match h.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => bail!("--header takes key=value, got '{h}'"),
        })
        .collect()
}

/// Kafka's murmur2 (the Java client's `Utils.murmur2`), for key partitioning.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    // Kafka hashes the length as an int; keys are far below 2 GiB.
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives a key.
pub fn partition_for_key(key: &[u8], partitions: usize) -> usize {
    ((murmur2(key) & 0x7fff_ffff) as usize) % partitions.max(1)
}

struct Line {
    key: Option<Bytes>,
    value: Bytes,
}

fn split_line(mut line: Vec<u8>, separator: Option<&[u8]>) -> Line {
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    let line = Bytes::from(line);
    if let Some(sep) = separator.filter(|s| !s.is_empty()) {
        if let Some(at) = line.windows(sep.len()).position(|w| w == sep) {
            return Line {
                key: Some(line.slice(..at)),
                value: line.slice(at + sep.len()..),
            };
        }
    }
    Line {
        key: None,
        value: line,
    }
}

/// Runs the producer until standard input ends; returns how many records failed.
pub fn run(options: &ProduceOptions) -> Result<u64> {
    let mut cluster = Cluster::new(&options.bootstrap)?;
    let mut layout = cluster.topic(&options.topic, true)?;
    if let Some(p) = options.partition {
        if !layout.partitions.contains(&p) {
            bail!(
                "topic {} has no partition {p} (it has {})",
                options.topic,
                layout.partitions.len()
            );
        }
    }
    let (tx, rx) = mpsc::sync_channel::<Line>(100_000);
    let separator = options.key_separator.clone().map(String::into_bytes);
    std::thread::Builder::new()
        .name("strom-produce-stdin".into())
        .spawn(move || {
            let stdin = std::io::stdin();
            let mut input = stdin.lock();
            loop {
                let mut line = Vec::new();
                match input.read_until(b'\n', &mut line) {
                    Ok(0) => return,
                    Ok(_) => {
                        if tx.send(split_line(line, separator.as_deref())).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        eprintln!("strom produce: reading standard input: {e}");
                        return;
                    }
                }
            }
        })?;
    let headers: IndexMap<StrBytes, Option<Bytes>> = options
        .headers
        .iter()
        .map(|(k, v)| {
            (
                StrBytes::from_string(k.clone()),
                Some(Bytes::from(v.clone())),
            )
        })
        .collect();
    let mut failed = 0u64;
    // Keyless records stick to one partition for a batch's worth of bytes, then move to the next
    // (Kafka's sticky partitioner, KIP-480), starting from a partition picked by the clock.
    let mut sticky = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as usize);
    let mut sticky_bytes = 0usize;
    // Blocks for the first line, then takes whatever else is already waiting.
    while let Ok(first) = rx.recv() {
        let mut lines = vec![first];
        let mut bytes = lines[0].value.len();
        while bytes < REQUEST_BYTES_MAX {
            match rx.try_recv() {
                Ok(l) => {
                    bytes += l.value.len() + l.key.as_ref().map_or(0, Bytes::len);
                    lines.push(l);
                }
                Err(_) => break,
            }
        }
        let mut by_partition: BTreeMap<i32, Vec<Line>> = BTreeMap::new();
        let n = layout.partitions.len().max(1);
        for line in lines {
            let partition = match (options.partition, &line.key) {
                (Some(p), _) => p,
                (None, Some(k)) => layout.partitions[partition_for_key(k, n)],
                (None, None) => {
                    sticky_bytes += line.value.len();
                    if sticky_bytes > STICKY_BATCH_BYTES {
                        sticky = (sticky + 1) % n;
                        sticky_bytes = line.value.len();
                    }
                    layout.partitions[sticky % n]
                }
            };
            by_partition.entry(partition).or_default().push(line);
        }
        failed += send(&mut cluster, &mut layout, options, &headers, by_partition)?;
    }
    Ok(failed)
}

/// Sends the records of each partition to its leader, retrying retriable errors; returns how many
/// records finally failed.
fn send(
    cluster: &mut Cluster,
    layout: &mut TopicLayout,
    options: &ProduceOptions,
    headers: &IndexMap<StrBytes, Option<Bytes>>,
    by_partition: BTreeMap<i32, Vec<Line>>,
) -> Result<u64> {
    let now = crate::storage::partition::now_ms() as i64;
    let encode = RecordEncodeOptions {
        version: 2,
        compression: options.compression,
    };
    let mut batches: BTreeMap<i32, (Bytes, u64)> = BTreeMap::new();
    for (partition, lines) in by_partition {
        let records: Vec<Record> = lines
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                let mut r =
                    crate::storage::records::plain_record(i as i64, now, l.key, Some(l.value));
                r.headers = headers.clone();
                r
            })
            .collect();
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(&mut buf, &records, &encode)?;
        batches.insert(partition, (buf.freeze(), records.len() as u64));
    }
    let mut failed = 0;
    let mut attempt = 0;
    while !batches.is_empty() {
        attempt += 1;
        let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for p in batches.keys() {
            let leader = layout.leaders.get(p).copied().unwrap_or(-1);
            by_leader.entry(leader).or_default().push(*p);
        }
        let mut retry: Vec<(i32, String)> = Vec::new();
        for (leader, partitions) in by_leader {
            if leader < 0 {
                retry.extend(partitions.iter().map(|p| (*p, "no leader".to_string())));
                continue;
            }
            let mut td = TopicProduceData::default();
            td.name = TopicName(StrBytes::from_string(options.topic.clone()));
            for p in &partitions {
                let mut pd = PartitionProduceData::default();
                pd.index = *p;
                pd.records = batches.get(p).map(|(b, _)| b.clone());
                td.partition_data.push(pd);
            }
            let mut req = ProduceRequest::default();
            req.acks = options.acks;
            req.timeout_ms = 30_000;
            req.topic_data = vec![td];
            let outcome = match cluster.broker(leader) {
                Ok(b) if options.acks == 0 => b.send(ApiKey::Produce, &req).map(|()| None),
                Ok(b) => b
                    .call::<_, ProduceResponse>(ApiKey::Produce, &req)
                    .map(Some),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(None) => {
                    for p in &partitions {
                        batches.remove(p);
                    }
                }
                Ok(Some(resp)) => {
                    for t in resp.responses {
                        for pr in t.partition_responses {
                            let p = pr.index;
                            if pr.error_code == 0 {
                                batches.remove(&p);
                                continue;
                            }
                            let mut why = ErrorCode(pr.error_code).name().to_string();
                            if let Some(m) = pr.error_message.as_ref().filter(|m| !m.is_empty()) {
                                why = format!("{why}: {m}");
                            }
                            if retriable(pr.error_code) {
                                retry.push((p, why));
                            } else if let Some((_, n)) = batches.remove(&p) {
                                eprintln!(
                                    "strom produce: {n} records to {}-{p} failed: {why}",
                                    options.topic
                                );
                                failed += n;
                            }
                        }
                    }
                }
                Err(e) => {
                    cluster.drop_broker(leader);
                    let why = format!("{e:#}");
                    retry.extend(partitions.iter().map(|p| (*p, why.clone())));
                }
            }
        }
        // Partitions the answer did not mention are retried like failures.
        if retry.is_empty() && !batches.is_empty() {
            retry.extend(batches.keys().map(|p| (*p, "no answer".to_string())));
        }
        if retry.is_empty() {
            break;
        }
        if attempt >= ATTEMPTS_MAX {
            for (p, why) in retry {
                if let Some((_, n)) = batches.remove(&p) {
                    eprintln!(
                        "strom produce: {n} records to {}-{p} failed after {attempt} attempts: {why}",
                        options.topic
                    );
                    failed += n;
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(100 * u64::from(attempt)));
        match cluster.topic(&options.topic, false) {
            Ok(l) => *layout = l,
            Err(e) => eprintln!("strom produce: refreshing metadata: {e:#}"),
        }
    }
    Ok(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafkas() {
        // The cases of Kafka's own UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"),
            -58_897_971
        );
        assert_eq!(murmur2(b"abc"), 479_470_107);
    }

    #[test]
    fn key_separator_splits_at_the_first_one() {
        let l = split_line(b"k1:v:1\n".to_vec(), Some(b":"));
        assert_eq!(l.key.as_deref(), Some(&b"k1"[..]));
        assert_eq!(&l.value[..], b"v:1");
        let l = split_line(b"novalue\n".to_vec(), Some(b":"));
        assert_eq!(l.key, None);
        assert_eq!(&l.value[..], b"novalue");
    }
}
