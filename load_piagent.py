"""Load test (not a unit test): many concurrent streams through piagent against the fake Ollama, on loopback.

    python load_piagent.py                     # 200 concurrent streams, 40 tokens each at 25 ms
    python load_piagent.py --streams 200 --tokens 40 --token-ms 25 --json

piagent runs as its own process (python piagent.py, MAX_CONCURRENT/MAX_QUEUE raised, rate limit off) so its
memory is measured alone; the fake Ollama runs in this process. It reports errors (must be 0), whether every
stream received every token, the time for all streams, and piagent's RSS idle and at its peak (VmHWM).
Every loop is bounded in count and time; only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from fake_ollama import FakeOllama, Script

HERE = Path(__file__).resolve().parent
MODEL = "qwen2.5:3b-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kb(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def start_piagent(upstream: str, streams: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OLLAMA_HOST": upstream, "MAX_CONCURRENT": str(streams), "MAX_QUEUE": str(streams),
           "RATE_LIMIT_PER_MIN": "0", "LOG_LEVEL": "warning", "PIAGENT_ENV_FILE": os.devnull}
    proc = subprocess.Popen([sys.executable, str(HERE / "piagent.py"), "--port", str(port)], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("piagent did not start")


async def one_stream(client: httpx.AsyncClient, url: str, i: int, expected: str) -> str | None:
    """None if the stream delivered exactly the expected text, else what went wrong."""
    try:
        async with client.stream("POST", f"{url}/chat", json={"message": f"load {i}", "stream": True}) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}"
            text = "".join([piece async for piece in r.aiter_text()])
            return None if text == expected else f"got {len(text)} chars, expected {len(expected)}"
    except httpx.HTTPError as exc:
        return exc.__class__.__name__


async def run_streams(url: str, streams: int, expected: str, timeout_s: float) -> list[str | None]:
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    async with httpx.AsyncClient(limits=limits, timeout=timeout_s) as client:
        return await asyncio.wait_for(
            asyncio.gather(*(one_stream(client, url, i, expected) for i in range(streams))), timeout_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200, help="concurrent streams (at most 1000)")
    parser.add_argument("--tokens", type=int, default=40, help="tokens per reply (at most 2000)")
    parser.add_argument("--token-ms", type=float, default=25.0, help="pause between tokens, ms")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    streams, tokens = min(args.streams, 1000), min(args.tokens, 2000)
    fake = FakeOllama(models=[MODEL]).start()
    fake.script = Script(tokens=[f" t{i}" for i in range(tokens)], token_delay_s=args.token_ms / 1000)
    proc, url = start_piagent(fake.url, streams)
    try:
        idle_kb = rss_kb(proc.pid, "VmRSS")
        started = time.perf_counter()
        errors = asyncio.run(run_streams(url, streams, "".join(fake.script.tokens), timeout_s=120))
        elapsed = time.perf_counter() - started
        peak_kb = rss_kb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(20)
        fake.stop()
    failed = [e for e in errors if e]
    result = {"streams": streams, "tokens_per_stream": tokens, "token_ms": args.token_ms, "errors": len(failed),
              "error_kinds": sorted(set(failed)), "wall_s": round(elapsed, 2),
              "ideal_wall_s": round(tokens * args.token_ms / 1000, 2), "idle_rss_mb": round(idle_kb / 1024, 1),
              "peak_rss_mb": round(peak_kb / 1024, 1), "python": sys.version.split()[0], "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>18}: {value}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
