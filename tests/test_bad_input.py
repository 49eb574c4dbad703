"""Bad input gets the right Kafka error code or a closed connection, never a crash; a good
client is served afterwards each time."""

import random
import struct
import subprocess

import kafka_wire as kw


def assert_still_serves(broker):
    assert broker.alive(), "broker died"
    out = subprocess.run(["kcat", "-b", broker.bootstrap, "-L"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "broker 0 at" in out.stdout, out.stderr


def rss_kib(broker):
    for line in open(f"/proc/{broker.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def test_oversized_size_prefix_closes_the_connection(broker):
    for size in (0x7FFFFFFF, 100 * 1024 * 1024 + 1, -5):
        s = kw.connect(broker.bootstrap)
        s.sendall(struct.pack(">i", size) + b"\x00" * 16)
        assert kw.closed_by_peer(s), f"size prefix {size} was not refused"
        s.close()
    assert "socket.request.max.bytes" in broker.log()
    assert_still_serves(broker)


def test_large_prefix_then_silence_allocates_nothing(broker):
    before = rss_kib(broker)
    socks = []
    for _ in range(20):
        s = kw.connect(broker.bootstrap)
        s.sendall(struct.pack(">i", 90 * 1024 * 1024) + b"\x00" * 10)
        socks.append(s)
    assert_still_serves(broker)
    grown_mib = (rss_kib(broker) - before) / 1024
    assert grown_mib < 64, f"20 connections announcing 90 MiB frames grew RSS by {grown_mib:.0f} MiB"
    for s in socks:
        s.close()


def test_garbage_and_truncated_frames_close_only_that_connection(broker):
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    good = kw.connect(broker.bootstrap)
    for _ in range(50):
        s = kw.connect(broker.bootstrap)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
        s.sendall(kw.frame(body))
        s.close()
    s = kw.connect(broker.bootstrap)
    s.sendall(struct.pack(">i", 100) + b"\x00\x03\x00\x01")  # truncated, then hang up
    s.close()
    # The connection opened before the garbage still works.
    good.sendall(kw.api_versions_v0(correlation_id=77))
    resp = kw.read_frame(good)
    assert resp is not None and struct.unpack_from(">ih", resp) == (77, 0)
    assert_still_serves(broker)


def test_unknown_api_key_closes_with_a_log_line(broker):
    s = kw.connect(broker.bootstrap)
    s.sendall(kw.frame(kw.request_header(999, 0)))
    assert kw.closed_by_peer(s)
    assert "unknown API key 999" in broker.log()
    assert_still_serves(broker)


def test_unsupported_api_versions_version_gets_unsupported_version_with_ranges(broker):
    s = kw.connect(broker.bootstrap)
    s.sendall(kw.api_versions_v0(correlation_id=5, version=99))
    resp = kw.read_frame(s)
    cid, err, n = struct.unpack_from(">ihi", resp)
    assert (cid, err) == (5, 35)
    ranges = {struct.unpack_from(">hhh", resp, 10 + 6 * i)[0]: struct.unpack_from(">hhh", resp, 10 + 6 * i)[1:]
              for i in range(n)}
    assert ranges[18] == (0, 4)
    assert 0 in ranges and 1 in ranges and 3 in ranges
    assert_still_serves(broker)


def test_huge_array_count_in_a_tiny_request_is_refused_without_memory_growth(broker):
    before = rss_kib(broker)
    for count in (0x7FFFFFFF, 0x033C0C00):
        s = kw.connect(broker.bootstrap)
        s.sendall(kw.frame(kw.request_header(3, 1) + struct.pack(">i", count) + b"\x00\x01a"))
        assert kw.closed_by_peer(s)
        s.close()
    assert_still_serves(broker)
    assert (rss_kib(broker) - before) < 64 * 1024


def test_invalid_topic_name_in_metadata_gets_invalid_topic_exception(broker):
    s = kw.connect(broker.bootstrap)
    s.sendall(kw.metadata_v1([b"no spaces allowed"], correlation_id=9))
    resp = kw.read_frame(s)
    # v1: correlation id, brokers[], controller id, topics[]: skip brokers.
    pos = 4
    n_brokers, = struct.unpack_from(">i", resp, pos); pos += 4
    for _ in range(n_brokers):
        pos += 4
        hl, = struct.unpack_from(">h", resp, pos); pos += 2 + hl
        pos += 4
        rl, = struct.unpack_from(">h", resp, pos); pos += 2 + max(rl, 0)
    pos += 4
    n_topics, = struct.unpack_from(">i", resp, pos); pos += 4
    err, = struct.unpack_from(">h", resp, pos)
    assert (n_topics, err) == (1, 17)
    out = subprocess.run(["kcat", "-b", broker.bootstrap, "-L"], capture_output=True, text=True, timeout=30)
    assert "no spaces allowed" not in out.stdout


def test_batch_with_bad_crc_gets_corrupt_message_and_is_not_stored(broker):
    s = kw.connect(broker.bootstrap)
    # Create the topic through auto-creation, then send one good and one corrupted batch.
    s.sendall(kw.metadata_v1([b"crc-check"], correlation_id=1))
    assert kw.read_frame(s) is not None
    good = kw.record_batch([b"good"])
    s.sendall(kw.produce_v3(b"crc-check", 0, good, correlation_id=2))
    _, [(_, _, err, base)] = kw.parse_produce_v3(kw.read_frame(s))
    assert (err, base) == (0, 0)
    bad = bytearray(kw.record_batch([b"evil"]))
    bad[-3] ^= 0x40
    s.sendall(kw.produce_v3(b"crc-check", 0, bytes(bad), correlation_id=3))
    cid, [(_, _, err, _)] = kw.parse_produce_v3(kw.read_frame(s))
    assert (cid, err) == (3, 2), "CORRUPT_MESSAGE expected"
    out = subprocess.run(["kcat", "-b", broker.bootstrap, "-t", "crc-check", "-C", "-e", "-f", "%s\n"],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.split() == ["good"]
    assert_still_serves(broker)
