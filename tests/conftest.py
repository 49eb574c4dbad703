"""Fixtures that run the real `strom` binary on loopback ports with a fresh data directory.

The binary is taken from $STROM_BIN, else target/debug/strom (built by `cargo build`).
Each broker prints `strom listening on HOST:PORT` on stdout once every shard serves.
"""

import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
STROM_BIN = os.environ.get("STROM_BIN", str(ROOT / "target" / "debug" / "strom"))


class Broker:
    def __init__(self, data_dir, extra_args=(), cores=None, log_level="info", nofile=None):
        self.data_dir = pathlib.Path(data_dir)
        self.nofile = nofile
        self.extra_args = list(extra_args)
        self.cores = cores
        self.log_level = log_level
        self.proc = None
        self.port = 0
        self.admin = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.stderr_log = None

    @property
    def bootstrap(self):
        return f"127.0.0.1:{self.port}"

    def start(self, port=None):
        port = self.port if port is None else port
        args = [STROM_BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(self.data_dir),
                "--admin-listen", "127.0.0.1:0"]
        if self.cores:
            args += ["--cores", self.cores]
        args += self.extra_args
        env = dict(os.environ, RUST_LOG=self.log_level)
        self.stderr_log = open(self.log_path, "ab")
        preexec = None
        if self.nofile:
            import resource
            preexec = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self.stderr_log, env=env,
                                     preexec_fn=preexec)
        deadline = time.time() + 30
        line = b""
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"strom admin on"):
                self.admin = line.strip().split(b" on ")[1].decode()
            if line.startswith(b"strom listening on"):
                self.port = int(re.search(rb":(\d+)$", line.strip()).group(1))
                return self
            if self.proc.poll() is not None:
                break
        raise RuntimeError(f"strom did not start (last line {line!r}); log:\n{self.log()}")

    def log(self):
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.stderr_log:
            self.stderr_log.close()
            self.stderr_log = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def broker_factory(tmp_path):
    brokers = []

    def make(extra_args=(), cores="0-1", log_level="info", name="data", nofile=None):
        b = Broker(tmp_path / name, extra_args=extra_args, cores=cores, log_level=log_level,
                   nofile=nofile)
        brokers.append(b)
        return b.start()

    yield make
    for b in brokers:
        b.stop()


@pytest.fixture
def broker(broker_factory):
    """A two-shard broker (more than one shard, so cross-shard routing is always exercised)."""
    return broker_factory()


def wait_port_free(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
                return
            except OSError:
                time.sleep(0.1)
