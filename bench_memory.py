"""Memory backends, measured (a script, not a test): per-turn store latency and memory per 1,000 conversations.

    python bench_memory.py            # all three backends; redis needs redis-server and `pip install redis`
    python bench_memory.py --json

For each backend it stores 1,000 conversations x 4 turns (a 200-character message and reply each), timing every
append and every history read, then reports the median and p99, and the memory those conversations take: Python
heap growth (tracemalloc) in process, file size for SQLite (after a WAL checkpoint), Redis's used_memory growth.
Redis is started on a free loopback port in a temp dir. Bounded: a fixed number of operations.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from piagent import MEMORY_STORES, load_config

CONVERSATIONS, TURNS, TEXT = 1000, 4, "x" * 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_used_memory(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            data += sock.recv(65536)
    line = next(l for l in data.decode().splitlines() if l.startswith("used_memory:"))
    return int(line.split(":")[1])


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


async def measure(backend: str, env: dict[str, str], memory_of) -> dict:
    config = load_config({"MEMORY_BACKEND": backend, "MEMORY_MAX_CONVERSATIONS": "100000", **env})
    store = MEMORY_STORES[backend](config, time.time)
    await store.open()
    try:
        before = memory_of(store)
        appends, reads = [], []
        for turn in range(TURNS):
            for c in range(CONVERSATIONS):
                started = time.perf_counter()
                await store.append(f"conv-{c}", "general", TEXT, TEXT)
                appends.append(time.perf_counter() - started)
        for c in range(CONVERSATIONS):
            started = time.perf_counter()
            await store.history(f"conv-{c}")
            reads.append(time.perf_counter() - started)
        used = memory_of(store) - before
    finally:
        await store.close()
    ms = lambda v: round(v * 1000, 3)  # noqa: E731
    return {"backend": backend, "append_p50_ms": ms(statistics.median(appends)), "append_p99_ms": ms(percentile(appends, .99)),
            "history_p50_ms": ms(statistics.median(reads)), "history_p99_ms": ms(percentile(reads, .99)),
            "kb_per_1000_conversations": round(used / 1024 * 1000 / CONVERSATIONS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = []
    tracemalloc.start()
    results.append(asyncio.run(measure("memory", {}, lambda s: tracemalloc.get_traced_memory()[0])))
    tracemalloc.stop()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.db"

        def sqlite_size(store) -> int:
            if store._db is not None:
                store._thread.submit(store._db.execute, "PRAGMA wal_checkpoint(TRUNCATE)").result()
            return sum(p.stat().st_size for p in Path(folder).glob("bench.db*"))

        results.append(asyncio.run(measure("sqlite", {"MEMORY_PATH": str(path)}, sqlite_size)))
        server = shutil.which("redis-server")
        if server:
            port = free_port()
            proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder,
                                     "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            try:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    try:
                        redis_used_memory(port)
                        break
                    except OSError:
                        time.sleep(0.05)
                results.append(asyncio.run(measure("redis", {"REDIS_URL": f"redis://127.0.0.1:{port}/0"},
                                                   lambda s: redis_used_memory(port))))
            finally:
                proc.terminate()
                proc.wait(10)
    if args.json:
        print(json.dumps(results))
    else:
        print(f"{'backend':8} {'append p50':>11} {'append p99':>11} {'history p50':>12} {'history p99':>12} {'KB/1000 conv':>13}")
        for r in results:
            print(f"{r['backend']:8} {r['append_p50_ms']:>9}ms {r['append_p99_ms']:>9}ms {r['history_p50_ms']:>10}ms "
                  f"{r['history_p99_ms']:>10}ms {r['kb_per_1000_conversations']:>13}")
        print(f"({CONVERSATIONS} conversations x {TURNS} turns of 2 x {len(TEXT)} characters; Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
