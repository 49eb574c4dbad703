"""Hand-made Kafka frames for the bad-input tests: these must be wrong on purpose, so no client
library would send them. Valid record batches come from kafka-python's own batch builder."""

import socket
import struct

from kafka.record.default_records import DefaultRecordBatchBuilder


def frame(body: bytes) -> bytes:
    return struct.pack(">i", len(body)) + body


def request_header(api_key, version, correlation_id=1, client_id=b"strom-test"):
    return struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id


def kstring(s: bytes) -> bytes:
    return struct.pack(">h", len(s)) + s


def api_versions_v0(correlation_id=1, version=0):
    return frame(request_header(18, version, correlation_id))


def metadata_v1(topics, correlation_id=1):
    body = request_header(3, 1, correlation_id) + struct.pack(">i", len(topics))
    for t in topics:
        body += kstring(t)
    return frame(body)


def record_batch(values, key=b"k", producer=None):
    """A batch of `values`; with `producer` (id, epoch, base sequence), a transactional one."""
    pid, epoch, seq = producer if producer else (-1, -1, -1)
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=producer is not None, producer_id=pid,
        producer_epoch=epoch, base_sequence=seq, batch_size=1 << 20)
    for i, v in enumerate(values):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=key, value=v, headers=[])
    return bytes(builder.build())


def produce_v3(topic: bytes, partition: int, records: bytes, acks=1, correlation_id=1,
               transactional_id: bytes = None):
    body = request_header(0, 3, correlation_id)
    body += kstring(transactional_id) if transactional_id is not None else struct.pack(">h", -1)
    body += struct.pack(">hi", acks, 5000)
    body += struct.pack(">i", 1) + kstring(topic)
    body += struct.pack(">i", 1) + struct.pack(">i", partition)
    body += struct.pack(">i", len(records)) + records
    return frame(body)


def produce_v3_partitions(topic: bytes, batches, acks=1, correlation_id=1):
    """One Produce v3 request for one topic: `batches` lists (partition, records)."""
    body = request_header(0, 3, correlation_id)
    body += struct.pack(">h", -1)
    body += struct.pack(">hi", acks, 5000)
    body += struct.pack(">i", 1) + kstring(topic)
    body += struct.pack(">i", len(batches))
    for partition, records in batches:
        body += struct.pack(">ii", partition, len(records)) + records
    return frame(body)


def parse_produce_v3(resp: bytes):
    """Returns (correlation_id, [(topic, partition, error_code, base_offset)])."""
    cid, = struct.unpack_from(">i", resp, 0)
    pos = 4
    out = []
    n_topics, = struct.unpack_from(">i", resp, pos); pos += 4
    for _ in range(n_topics):
        nlen, = struct.unpack_from(">h", resp, pos); pos += 2
        name = resp[pos:pos + nlen]; pos += nlen
        n_parts, = struct.unpack_from(">i", resp, pos); pos += 4
        for _ in range(n_parts):
            idx, err, base, _append_time = struct.unpack_from(">ihqq", resp, pos); pos += 22
            out.append((name, idx, err, base))
    return cid, out


def connect(bootstrap, timeout=5):
    host, port = bootstrap.split(":")
    s = socket.create_connection((host, int(port)), timeout=timeout)
    return s


def read_frame(sock):
    """Reads one response frame; returns None when the broker closed the connection."""
    head = recv_exact(sock, 4)
    if head is None:
        return None
    size, = struct.unpack(">i", head)
    return recv_exact(sock, size)


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


def closed_by_peer(sock, timeout=5):
    sock.settimeout(timeout)
    try:
        data = sock.recv(1)
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    return data == b""


def put_varint(v: int) -> bytes:
    """A zig-zag varint as Kafka's records use."""
    z = (v << 1) ^ (v >> 63)
    out = b""
    while z >= 0x80:
        out += bytes([(z & 0x7F) | 0x80])
        z >>= 7
    return out + bytes([z])


def raw_batch(records_section: bytes, record_count: int, last_offset_delta: int, codec=0,
              timestamp=1_700_000_000_000) -> bytes:
    """A v2 batch around an already encoded (and possibly compressed) records section, with the
    header's count and offset span set as given (lies included) and a CRC that matches."""
    from kafka.record.util import calc_crc32c
    after_crc = struct.pack(">hiqqqhii", codec, last_offset_delta, timestamp, timestamp, -1, -1, -1,
                            record_count) + records_section
    crc = calc_crc32c(after_crc)
    head = struct.pack(">qiib", 0, 4 + 1 + 4 + len(after_crc), 0, 2) + struct.pack(">I", crc)
    return head + after_crc


def raw_record(offset_delta: int, key: bytes, value_len: int, value: bytes = b"") -> bytes:
    """One record; `value_len` may exceed `value` when the caller streams the rest after it."""
    body = b"\x00" + put_varint(0) + put_varint(offset_delta) + put_varint(len(key)) + key
    body += put_varint(value_len) + value
    return body


def read_produce_error(sock, correlation_id):
    cid, [(_, _, err, base)] = parse_produce_v3(read_frame(sock))
    assert cid == correlation_id
    return err, base


def fetch_v4(topic: bytes, partition: int, offset: int, max_bytes: int, partition_max_bytes: int,
             correlation_id=1, max_wait_ms=0):
    body = request_header(1, 4, correlation_id)
    body += struct.pack(">iiiib", -1, max_wait_ms, 0, max_bytes, 0)
    body += struct.pack(">i", 1) + kstring(topic)
    body += struct.pack(">i", 1) + struct.pack(">iqi", partition, offset, partition_max_bytes)
    return frame(body)


def fetch_v4_topics(topics, correlation_id=1, partition_max_bytes=1 << 20, max_wait_ms=0,
                    min_bytes=0):
    """A Fetch v4 for `topics`: a list of (topic, [(partition, offset)]), in that order, a topic
    possibly named twice."""
    body = request_header(1, 4, correlation_id)
    body += struct.pack(">iiiib", -1, max_wait_ms, min_bytes, 8 << 20, 0)
    body += struct.pack(">i", len(topics))
    for topic, partitions in topics:
        body += kstring(topic) + struct.pack(">i", len(partitions))
        for partition, offset in partitions:
            body += struct.pack(">iqi", partition, offset, partition_max_bytes)
    return frame(body)


def parse_fetch_v4(resp: bytes):
    """Returns (correlation_id, [(topic, partition, error_code, high_watermark, records)])."""
    cid, _throttle, n_topics = struct.unpack_from(">iii", resp, 0)
    pos = 12
    out = []
    for _ in range(n_topics):
        nlen, = struct.unpack_from(">h", resp, pos); pos += 2
        name = resp[pos:pos + nlen]; pos += nlen
        n_parts, = struct.unpack_from(">i", resp, pos); pos += 4
        for _ in range(n_parts):
            idx, err, hw, _lso, n_aborted = struct.unpack_from(">ihqqi", resp, pos); pos += 26
            pos += 16 * max(n_aborted, 0)
            size, = struct.unpack_from(">i", resp, pos); pos += 4
            records = resp[pos:pos + max(size, 0)]; pos += max(size, 0)
            out.append((name, idx, err, hw, records))
    return cid, out
