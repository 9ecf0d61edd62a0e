"""Fixtures that run a real `hopps serve` on 127.0.0.1 ports chosen by the OS.

The server binary is $HOPPS_BIN, or target/debug/hopps of this checkout (python/test.sh builds
it). Nothing is mocked: each test publishes into its own temporary repository and talks to its
own node (or, for the cluster tests, its own etcd and nodes).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import pytest

import hopps

ROOT = Path(__file__).resolve().parents[2]
START_DEADLINE_S = 60.0


def hopps_bin() -> Path:
    configured = os.environ.get("HOPPS_BIN")
    path = Path(configured) if configured else ROOT / "target" / "debug" / "hopps"
    if not path.exists():
        pytest.fail(
            f"the hopps server binary {path} does not exist; build it with `cargo build -p hopps-cli` "
            "or point HOPPS_BIN at it"
        )
    return path


def poll(what: str, check: Callable[[], Optional[object]], deadline_s: float = 30.0, every_s: float = 0.05):
    """Calls `check` until it returns something other than None or False; fails after the deadline."""
    deadline = time.monotonic() + deadline_s
    last_error: Optional[BaseException] = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result is not None and result is not False:
                return result
        except hopps.HoppsError as err:  # not ready yet: keep polling, report the last one
            last_error = err
        time.sleep(every_s)
    raise AssertionError(f"timed out after {deadline_s}s waiting for {what}; last error: {last_error}")


class Node:
    """One `hopps serve` process and a client connected to it."""

    def __init__(self, repo: Path, workdir: Path, extra_args: tuple = ()):
        self.repo = repo
        ready_file = workdir / "ready.json"
        self.log_path = workdir / "serve.log"
        self._log = open(self.log_path, "wb")
        args = [
            str(hopps_bin()),
            "serve",
            "--repo",
            str(repo),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            str(workdir / "node"),
            "--poll-interval",
            "100ms",
            "--ready-file",
            str(ready_file),
            *extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            addrs = poll("the ready file of hopps serve", lambda: self._read_ready(ready_file), START_DEADLINE_S)
            self.addr = addrs["grpc"]
            self.admin_addr = addrs["admin"]
            self.client = hopps.Client(self.addr)
            poll("the node to be ready", lambda: self.client.status()["ready"], START_DEADLINE_S)
        except BaseException:
            self.stop()
            raise

    def _read_ready(self, path: Path):
        if self.process.poll() is not None:
            raise AssertionError(f"hopps serve exited with {self.process.returncode}:\n{self.log()}")
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def serving_version(self, model: str) -> Optional[int]:
        for status in self.client.status()["models"]:
            if status["name"] == model:
                return status["serving_version"]
        return None

    def wait_serving(self, model: str, version: int, deadline_s: float = 30.0) -> None:
        poll(f"model {model!r} to serve version {version}", lambda: self.serving_version(model) == version, deadline_s)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    return path


@pytest.fixture
def serve(tmp_path: Path, repo: Path):
    """`serve()` starts a node on `repo` (publish into it first) and returns it; stopped after the test."""
    nodes = []

    def start(*extra_args: str) -> Node:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        node = Node(repo, workdir, extra_args)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """A real etcd (the `etcd` binary on PATH, or $HOPPS_TEST_ETCD) on ports the OS chose."""

    def __init__(self, workdir: Path):
        binary = os.environ.get("HOPPS_TEST_ETCD") or shutil.which("etcd")
        if not binary:
            pytest.fail(
                "the cluster tests need etcd: install it (apt-get install etcd-server) or point "
                "HOPPS_TEST_ETCD at the binary"
            )
        client, peer = free_port(), free_port()
        self.endpoint = f"127.0.0.1:{client}"
        self.log_path = workdir / "etcd.log"
        self._log = open(self.log_path, "wb")
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        self.process = subprocess.Popen(
            [
                binary,
                "--name", "test",
                "--data-dir", str(workdir / "etcd-data"),
                "--listen-client-urls", client_url,
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"test={peer_url}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        poll("etcd to answer", self._healthy, START_DEADLINE_S)

    def _healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"etcd exited with {self.process.returncode}:\n{self.log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as r:
                return json.loads(r.read()).get("health") == "true"
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def etcd(tmp_path: Path):
    """A real etcd for one test, killed after it."""
    server = Etcd(tmp_path)
    yield server
    server.stop()
