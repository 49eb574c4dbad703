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


def record_batch(values, key=b"k"):
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=0, is_transactional=False, producer_id=-1,
        producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i, v in enumerate(values):
        builder.append(i, timestamp=1_700_000_000_000 + i, key=key, value=v, headers=[])
    return bytes(builder.build())


def produce_v3(topic: bytes, partition: int, records: bytes, acks=1, correlation_id=1):
    body = request_header(0, 3, correlation_id)
    body += struct.pack(">h", -1)  # transactional id: null
    body += struct.pack(">hi", acks, 5000)
    body += struct.pack(">i", 1) + kstring(topic)
    body += struct.pack(">i", 1) + struct.pack(">i", partition)
    body += struct.pack(">i", len(records)) + records
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
