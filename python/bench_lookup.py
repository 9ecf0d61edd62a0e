"""Latency of a 1000-key lookup from Python vs from the Rust client, in the same run.

Both clients share one connection to one node: the Python side is `hopps.Client.lookup` (argument
conversion, GIL release, result arrays); the baseline is a loop of `hopps_client::Client::lookup`
calls made in Rust on the same runtime (`hopps._hopps.rust_lookup_latencies`). Rounds alternate
between the two (interleaved, the order swapped each round) so drift on the machine hits both;
the figures are medians over all calls.

    python python/bench_lookup.py                      # starts its own node (target/release/hopps)
    python python/bench_lookup.py --addr HOST:PORT --model M --table T   # an existing node
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import hopps
from hopps import _hopps

ROOT = Path(__file__).resolve().parents[1]


def start_node(repo: Path, workdir: Path, binary: Path) -> tuple[subprocess.Popen, str]:
    ready = workdir / "ready.json"
    process = subprocess.Popen(
        [
            str(binary), "serve", "--repo", str(repo), "--listen", "127.0.0.1:0",
            "--admin-listen", "127.0.0.1:0", "--data-dir", str(workdir / "node"),
            "--ready-file", str(ready),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "serve.log", "wb"),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"hopps serve exited with {process.returncode}; see {workdir / 'serve.log'}")
        if ready.exists():
            return process, json.loads(ready.read_text())["grpc"]
        time.sleep(0.05)
    process.kill()
    raise SystemExit("hopps serve did not start within 120 s")


def wait_ready(client: hopps.Client, model: str, deadline_s: float = 300) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        status = client.status()
        if status["ready"] and any(m["name"] == model and m["serving_version"] for m in status["models"]):
            return
        time.sleep(0.05)
    raise SystemExit(f"model {model} was not served within {deadline_s} s")


def python_latencies(client: hopps.Client, model: str, table: str, keys: np.ndarray, n: int) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        start = clock()
        client.lookup(model, table, keys)
        out.append(clock() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--addr", help="an existing node; default: start one on a fresh repository")
    parser.add_argument("--hopps-bin", default=str(ROOT / "target" / "release" / "hopps"))
    parser.add_argument("--model", default="bench_python")
    parser.add_argument("--table", default="emb")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows published when starting a node")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=250, help="calls per client per round")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    process = None
    with tempfile.TemporaryDirectory(prefix="hopps-bench-") as tmp:
        addr = args.addr
        rng = np.random.default_rng(0)
        if addr is None:
            repo = Path(tmp) / "repo"
            keys = np.arange(1, args.rows + 1, dtype=np.uint64)
            values = rng.standard_normal((args.rows, args.dim)).astype(np.float32)
            hopps.publish(str(repo), args.model, args.table, keys, values, shards=8)
            del values
            process, addr = start_node(repo, Path(tmp), Path(args.hopps_bin))
            universe = args.rows
        else:
            universe = None
        try:
            client = hopps.Client(addr)
            wait_ready(client, args.model)
            if universe is None:
                tables = [t for m in client.list_models() if m["name"] == args.model for t in m["tables"]]
                universe = max(1, next(t["rows"] for t in tables if t["name"] == args.table))
            batch = rng.integers(1, universe + 1, size=args.batch).astype(np.uint64)
            rows = client.lookup(args.model, args.table, batch)
            dim = rows.dim
            # Warm both paths (connection, allocator, caches).
            python_latencies(client, args.model, args.table, batch, 200)
            _hopps.rust_lookup_latencies(client, args.model, args.table, batch, 200)
            py_all: list[int] = []
            rust_all: list[int] = []
            for round_ in range(args.rounds):
                order = [0, 1] if round_ % 2 == 0 else [1, 0]
                for which in order:
                    if which == 0:
                        py_all += python_latencies(client, args.model, args.table, batch, args.calls)
                    else:
                        rust_all += _hopps.rust_lookup_latencies(client, args.model, args.table, batch, args.calls)
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)

    py = np.array(py_all) / 1000.0
    rust = np.array(rust_all) / 1000.0
    result = {
        "batch": args.batch,
        "dim": dim,
        "calls_each": len(py_all),
        "python_p50_us": round(float(np.median(py)), 1),
        "rust_p50_us": round(float(np.median(rust)), 1),
        "python_p99_us": round(float(np.percentile(py, 99)), 1),
        "rust_p99_us": round(float(np.percentile(rust, 99)), 1),
        "python_over_rust_p50": round(float(np.median(py) / np.median(rust)), 3),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, Python {platform.python_version()}",
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.batch}-key lookup, dim {dim}, {len(py_all)} calls each, interleaved in {args.rounds} rounds")
        print(f"  rust client   p50 {result['rust_p50_us']:8.1f} us   p99 {result['rust_p99_us']:8.1f} us")
        print(f"  python client p50 {result['python_p50_us']:8.1f} us   p99 {result['python_p99_us']:8.1f} us")
        over = (result["python_over_rust_p50"] - 1) * 100
        print(f"  python / rust (p50) = {result['python_over_rust_p50']:.3f}  ({over:+.1f}%; goal <= +30%)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
