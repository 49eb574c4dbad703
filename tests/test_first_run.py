"""The README's run command as a newcomer types it: the binary started from a fresh working
directory with no --data-dir stores its data under ./data and serves a real client."""

import pathlib
import re
import subprocess
import time

from conftest import STROM_BIN


def start_in(cwd, args):
    proc = subprocess.Popen([STROM_BIN, "serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0",
                             *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        m = re.match(rb"strom listening on (\S+):(\d+)", line)
        if m:
            return proc, f"127.0.0.1:{int(m.group(2))}"
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"strom did not start from {cwd}: {b''.join(lines).decode(errors='replace')}")


def round_trip(bootstrap, topic):
    records = "".join(f"key{i}:value{i}\n" for i in range(100))
    out = subprocess.run(["kcat", "-b", bootstrap, "-t", topic, "-P", "-K:"], input=records,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run(["kcat", "-b", bootstrap, "-t", topic, "-C", "-e", "-f", "%k=%s\n"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"key{i}=value{i}" for i in range(100)]


def test_default_data_dir_in_a_fresh_directory(tmp_path):
    proc, bootstrap = start_in(tmp_path, [])
    try:
        round_trip(bootstrap, "first-run")
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    assert (tmp_path / "data" / "first-run-0").is_dir(), list((tmp_path / "data").iterdir())
    logs = list((tmp_path / "data" / "first-run-0").glob("*.log"))
    assert logs and sum(p.stat().st_size for p in logs) > 0


def test_relative_data_dir_survives_a_restart(tmp_path):
    for _ in range(2):
        proc, bootstrap = start_in(tmp_path, ["--data-dir", "some/relative/dir"])
        try:
            out = subprocess.run(["kcat", "-b", bootstrap, "-L"], capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    assert (tmp_path / "some" / "relative" / "dir" / "meta").is_dir()
