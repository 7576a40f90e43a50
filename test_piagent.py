"""piagent's specification, as tests. Sectioned like piagent.py.

Behaviour is tested through HTTP. Streams, disconnects and time-outs need real sockets: piagent runs under
uvicorn on a free loopback port (`serve`). Plain request/response runs the same app in process, inside its
lifespan, through httpx.ASGITransport (`serve_local`): no socket, no uvicorn start and stop. Either way piagent
talks to fake_ollama.FakeOllama, a real HTTP server on another port that follows the Ollama wire protocol and
records what it received and when a client hung up. Nothing here mocks piagent's own functions.
"""

from __future__ import annotations

import ast
import asyncio
import gc
import importlib
import importlib.util
import io
import itertools
import json
import logging
import math
import operator
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from contextlib import closing, contextmanager, redirect_stderr, redirect_stdout, suppress
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import uvicorn

import piagent
from fake_ollama import BUSY_TEXT, FakeOllama, Script
from piagent import (Config, ConfigError, Gate, InProcessStore, Prompt, Turn, build_messages,
                     create_app, load_config, parse_env_file, render_prompt)

HERE = Path(__file__).resolve().parent
MODEL = "qwen2.5:3b-instruct"
DEADLINE_S = 10.0  # upper bound for any poll in this file


def wait_until(predicate, timeout: float = DEADLINE_S, what: str = "condition") -> None:
    """Poll `predicate` until true; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _port_slice() -> range:
    """This process's ports for free_port(): a slice, its own among the xdist workers, of the ports below the kernel's
    ephemeral range (/proc/sys/net/ipv4/ip_local_port_range), which bind(0) and outgoing connections draw from."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low, high = 10000, max(10000 + 64 * 64, min(ephemeral_low, 32768))
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").lstrip("gw") or 0) % 64
    width = (high - low) // 64
    return range(low + worker * width, low + (worker + 1) * width)


_unused_ports = iter(_port_slice())


def free_port() -> int:
    """A loopback port for a server a test starts by number (a subprocess, redis-server). Not one from bind(0): that
    port is free only until the next bind(0) or outgoing connection anywhere on the machine, and a server another
    worker started meanwhile once took one. These come from this worker's slice below the ephemeral range, each
    handed out once, and are checked free now."""
    for port in _unused_ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # some other program's
            return port
    raise AssertionError("this test process has used up its slice of free ports")


@pytest.fixture
def dead_port():
    """A loopback port nothing listens on (a stopped upstream, Redis or MCP server): held bound but not listening for
    the whole test, so a connection is refused and no server another worker starts meanwhile can be given it (a
    port from free_port() once went to another test's fake Ollama, and a check for a stopped upstream passed)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


class Requests:
    """server.get("/agents"), server.post("/chat", json=...): the same calls whether piagent is live or in process."""

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        raise NotImplementedError

    def get(self, path: str, **kwargs) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def options(self, path: str, **kwargs) -> httpx.Response:
        return self.request("OPTIONS", path, **kwargs)


class WakeableServer(uvicorn.Server):
    """uvicorn's Server, whose main loop a stop wakes at once. uvicorn's looks at should_exit every 0.1 s, so each
    of the few hundred servers a run stops waited ~0.1 s for nothing; this one ticks the same otherwise."""

    async def main_loop(self) -> None:
        self.loop, self.wake = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.1)

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's shutdown, less its fixed 0.1 s pause for open connections to wind down when there are none."""
        if self.server_state.connections or self.server_state.tasks or self.force_exit:
            return await super().shutdown(sockets)
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()

    def stop(self) -> None:
        self.should_exit = True
        if hasattr(self, "wake"):
            with suppress(RuntimeError):  # the loop has closed already
                self.loop.call_soon_threadsafe(self.wake.set)


class LiveServer(Requests):
    """piagent's app under a real uvicorn on a free loopback port, in a thread."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        options = {**piagent.uvicorn_options(app.state.runtime.config), "log_level": "warning"}
        self.server = WakeableServer(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        wait_until(lambda: self.server.started, what="piagent to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self.thread.join(DEADLINE_S)
        self.sock.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.url}{path}", **{"timeout": DEADLINE_S, **kwargs})


class InProcessServer(Requests):
    """piagent's app in this process, for plain request/response: its lifespan runs on a private event loop in a
    thread, and requests go through httpx.ASGITransport from a loopback client address. That transport buffers
    whole bodies and never shows a disconnect, so streams, disconnects and time-outs use LiveServer."""

    def __init__(self, app):
        self.app = app
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        self.loop, self.stopping = asyncio.get_running_loop(), asyncio.Event()
        transport = httpx.ASGITransport(self.app, client=("127.0.0.1", 123))
        try:
            async with self.app.router.lifespan_context(self.app), httpx.AsyncClient(
                    transport=transport, base_url="http://127.0.0.1") as self.client:
                self.ready.set()
                await self.stopping.wait()
        except BaseException as exc:  # a start-up error: __enter__ raises it in the test
            self.failed = exc
        finally:
            self.ready.set()

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        assert self.ready.wait(DEADLINE_S), "piagent's lifespan did not start"
        if self.failed is not None:
            raise self.failed
        return self

    def __exit__(self, *exc) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(DEADLINE_S)

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        timeout = kwargs.pop("timeout", DEADLINE_S)  # the transport has no network time-outs: bound the wait here
        call = asyncio.run_coroutine_threadsafe(self.client.request(method, path, **kwargs), self.loop)
        try:
            return call.result(timeout)
        finally:
            call.cancel()  # a no-op once done; otherwise the request must not outlive the test


@pytest.fixture
def fake():
    server = FakeOllama(models=[MODEL, "tiny:latest"]).start()
    yield server
    server.stop()


@pytest.fixture
def servers():
    """The piagent servers a test started, stopped after it."""
    started = []
    yield started
    for server in started:
        server.__exit__(None, None, None)


def server_starter(kind, started: list, base: dict):
    """start(clock=time.time, tools=None, **env) -> a started `kind` of piagent configured from base + env."""

    def start(clock=time.time, tools=None, **env):
        config = load_config({**base, **{k: str(v) for k, v in env.items()}})
        server = kind(create_app(config, clock=clock, tools=tools)).__enter__()
        started.append(server)
        return server

    return start


def ollama_env(fake) -> dict[str, str]:
    # warm-up off unless a test asks: it loads models in the background, which other tests need not see
    return {"OLLAMA_HOST": fake.url, "WARMUP": "false"}


@pytest.fixture
def serve(fake, servers):
    """serve(**env) -> LiveServer of piagent configured from env (OLLAMA_HOST = the fake): real sockets."""
    return server_starter(LiveServer, servers, ollama_env(fake))


@pytest.fixture
def serve_local(fake, servers):
    """serve_local(**env) -> the same piagent as serve(**env), in process: for plain request/response."""
    return server_starter(InProcessServer, servers, ollama_env(fake))


def chat(server, **body) -> httpx.Response:
    return server.post("/chat", json=body)


def raw_post(port: int, path: str, body: dict, headers: str = "") -> socket.socket:
    """Send a POST on a raw socket (so the test can hang up whenever it likes)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{headers}"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    end = time.monotonic() + DEADLINE_S
    while marker not in data:
        assert time.monotonic() < end, f"never saw {marker!r} in {data!r}"
        part = sock.recv(4096)
        assert part, f"connection closed before {marker!r}: {data!r}"
        data += part
    return data


def assert_nothing_stored(server, fake, conversation_id: str) -> None:
    """The next message on the conversation reaches the model with no history: the failed turn left nothing."""
    fake.script = Script()
    chat(server, message="again", conversation_id=conversation_id)
    assert len(fake.generations()[-1].body["messages"]) == 2


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def test_defaults_are_the_documented_ones():
    c = load_config({})
    assert (c.provider, c.ollama_host, c.ctx_tokens, c.max_tokens, c.temperature) == (
        "ollama", "http://127.0.0.1:11434", 2048, 200, 0.7)
    assert (c.enable_memory, c.memory_max_turns, c.memory_ttl_min, c.memory_max_conversations) == (True, 8, 60, 500)
    assert (c.host, c.port, c.log_level, c.upstream_connect_timeout_s, c.upstream_timeout_s) == (
        "127.0.0.1", 8000, "info", 5, 300)
    assert [(a.name, a.model) for a in c.agents] == [("general", "qwen2.5:3b-instruct")]
    assert c.agents[0].system  # a sensible default prompt


def test_env_file_reads_values_quotes_and_whole_line_comments():
    text = ("# comment\n\nPORT=9000\nAGENT_GENERAL_SYSTEM=\"Be brief # not a comment\"\nOLLAMA_MODEL_GENERAL='tiny'\n"
            "AGENT_CODER_SYSTEM=You're kind. Don't ramble.\nAGENT_HELPER_SYSTEM=\"It's fine\"\n")
    assert parse_env_file(text) == {"PORT": "9000", "AGENT_GENERAL_SYSTEM": "Be brief # not a comment",
                                    "OLLAMA_MODEL_GENERAL": "tiny", "AGENT_CODER_SYSTEM": "You're kind. Don't ramble.",
                                    "AGENT_HELPER_SYSTEM": "It's fine"}  # as systemd reads them


@pytest.mark.parametrize("line", ["export PORT=1", "PORT = 1", "PORT", "PORT='1", "PORT=", "A=${B}", "A=x\\y",
                                  "9X=1", "OLLAMA_MODEL_GENERAL=qwen2.5:3b  # the small one",
                                  "AGENT_GENERAL_SYSTEM='You're kind. Don't ramble.'", "A='a' 'b'"])
def test_env_file_line_that_systemd_would_read_differently_is_an_error_naming_the_line(line):
    with pytest.raises(ConfigError, match=r"line 3"):
        parse_env_file(f"# ok\nHOST=127.0.0.1\n{line}\n")


def test_real_environment_beats_env_file_beats_default(tmp_path):
    env_file = tmp_path / "piagent.env"
    env_file.write_text("PORT=9001\nMAX_TOKENS=50\n")
    c = load_config({"PORT": "9002"}, env_file)
    assert (c.port, c.max_tokens, c.ctx_tokens) == (9002, 50, 2048)


def test_env_file_location_from_piagent_env_file(tmp_path):
    assert piagent.default_env_file({"PIAGENT_ENV_FILE": str(tmp_path / "x.env")}) == tmp_path / "x.env"
    assert piagent.default_env_file({}) == HERE / "piagent.env"  # the template beside piagent.py


@pytest.mark.parametrize("key,value", [("PORT", "abc"), ("PORT", "70000"), ("TEMPERATURE", "hot"),
                                       ("MEMORY_MAX_TURNS", "-1"), ("PROVIDER", "skynet"),
                                       ("OLLAMA_HOST", "127.0.0.1:11434"), ("ENABLE_MEMORY", "yes"),
                                       ("OLLAMA_KEEP_ALIVE", "forever"), ("AGENTS", "general,general"),
                                       ("LOG_LEVEL", "loud"), ("OLLAMA_API", "completions"),
                                       ("HOST", "127.0.0.1   # local only"), ("HOST", "http://127.0.0.1"),
                                       ("HOST", "[::1]"), ("PORT", "9" * 5000)])  # past int()'s 4,300 digits
def test_bad_value_is_one_error_naming_variable_value_and_expectation(key, value):
    with pytest.raises(ConfigError) as info:
        load_config({key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and "expected" in message and "\n" not in message


def test_max_tokens_must_leave_room_in_the_context_and_its_default_does():
    # MAX_TOKENS=5000 with CTX_TOKENS=2048 started, and every request was a 413 saying "-2048 left"
    with pytest.raises(ConfigError, match=r"MAX_TOKENS='5000' is not valid: expected fewer than CTX_TOKENS=2048"):
        load_config({"MAX_TOKENS": "5000"})
    with pytest.raises(ConfigError, match=r"MAX_TOKENS='1024' .* fewer than CTX_TOKENS=1024"):
        load_config({"MAX_TOKENS": "1024", "CTX_TOKENS": "1024"})
    assert load_config({"CTX_TOKENS": "128"}).max_tokens == 64  # the default 200 would not fit: half the context
    assert load_config({"CTX_TOKENS": "4096"}).max_tokens == Config.max_tokens
    # below it but leaving the prompt almost nothing: it starts (a client may ask for less), with a warning
    (warning,) = piagent.startup_warnings(load_config({"MAX_TOKENS": "1900"}))
    assert warning.startswith("MAX_TOKENS=1900 leaves 148 tokens of CTX_TOKENS=2048 for the prompt"), warning
    assert piagent.startup_warnings(load_config({"MAX_TOKENS": "1792"})) == []


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1%eth0", "localhost",
                                  "raspberrypi.lan"])
def test_host_takes_addresses_and_names(host):  # the setting only: nothing here binds
    assert load_config({"HOST": host}).host == host


def test_agents_have_their_own_model_and_system_prompt_with_fallbacks():
    c = load_config({"AGENTS": "general, Coder", "OLLAMA_MODEL_GENERAL": "tiny", "OLLAMA_MODEL_CODER": "coder:1b",
                     "AGENT_CODER_SYSTEM": "Write code."})
    assert [(a.name, a.model) for a in c.agents] == [("general", "tiny"), ("coder", "coder:1b")]
    assert c.agent("coder").system == "Write code." and c.agent("general").system == piagent.DEFAULT_SYSTEM_PROMPT
    assert load_config({"AGENTS": "poet", "OLLAMA_MODEL_GENERAL": "tiny"}).agent("poet").model == "tiny"


def test_env_template_parses_and_holds_exactly_the_defaults():
    # piagent.env is the file systemd reads too: it must parse, and change nothing from the defaults
    path = HERE / "piagent.env"
    assert load_config({}, path) == Config()
    keys = set(parse_env_file(path.read_text()))
    commented = set(re.findall(r"^#\s?([A-Z_]+)=", path.read_text(), re.M))
    documented = {"PROVIDER", "OLLAMA_HOST", "OLLAMA_API", "OLLAMA_MODEL_GENERAL", "OLLAMA_KEEP_ALIVE",
                  "UPSTREAM_CONNECT_TIMEOUT_S", "UPSTREAM_TIMEOUT_S", "CTX_TOKENS", "MAX_TOKENS", "TEMPERATURE",
                  "ENABLE_MEMORY", "MEMORY_MAX_TURNS", "MEMORY_TTL_MIN", "MEMORY_MAX_CONVERSATIONS", "HOST",
                  "PORT", "LOG_LEVEL", "AGENTS", "AGENT_GENERAL_SYSTEM", "OPENAI_BASE_URL", "OPENAI_API_KEY",
                  "OPENAI_MODEL_GENERAL", "SSE_PING_S", "LOG_FORMAT", "LOG_PROMPTS", "API_KEYS",
                  "RATE_LIMIT_PER_MIN", "TRUST_PROXY", "MAX_BODY_BYTES", "MAX_MESSAGE_CHARS", "CORS_ORIGINS",
                  "MAX_CONCURRENT", "MAX_QUEUE", "SHUTDOWN_GRACE_S", "MEMORY_BACKEND", "MEMORY_PATH", "REDIS_URL",
                  "WORKERS", "ENABLE_UI", "METRICS_PUBLIC", "WARMUP", "AGENT_GENERAL_TOOLS", "MAX_TOOL_ROUNDS",
                  "WRITE_TIMEOUT_S", "MAX_CONNECTIONS", "HEADER_TIMEOUT_S", "ALLOWED_HOSTS"}
    assert documented <= keys | commented


def test_provider_and_memory_choices_are_the_registries_names():
    for key, registry in (("PROVIDER", piagent.PROVIDERS), ("MEMORY_BACKEND", piagent.MEMORY_STORES)):
        with pytest.raises(ConfigError, match="expected one of " + ", ".join(registry)):
            load_config({key: "nonesuch"})


def test_the_old_timeout_names_still_work_and_the_new_ones_win():
    old = load_config({"OLLAMA_TIMEOUT_S": "7", "OLLAMA_CONNECT_TIMEOUT_S": "2"})
    assert (old.upstream_timeout_s, old.upstream_connect_timeout_s) == (7, 2)
    both = load_config({"OLLAMA_TIMEOUT_S": "7", "UPSTREAM_TIMEOUT_S": "9"})
    assert both.upstream_timeout_s == 9


def piagent_command(*args: str, script: bool = False) -> list[str]:
    """piagent as a process, started as the unit starts it (`python -m piagent`, run from HERE): it uses the bytecode
    conftest.py compiled once, where `python piagent.py` (the Quick start's way, `script=True`) compiles its 5,000
    lines in each process: ~70 ms of CPU in each of the suite's ~60."""
    return [sys.executable, *((str(HERE / "piagent.py"),) if script else ("-m", "piagent")), *args]


def run_piagent(*args, env=None, timeout=20) -> subprocess.CompletedProcess:
    return subprocess.run(piagent_command(*args), capture_output=True, text=True, cwd=HERE,
                          timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)


def in_process(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """piagent's main(args) in this process, with the environment plus `env` (PORT a free one unless given): what
    a process would print on stdout and stderr and exit with, which saves starting a Python each time. stderr also
    gets what a process would show there before its logging is set up (main()'s log records of WARNING and above)
    and the Python warnings it would print. An exception escaping main() is raised here; main() still running
    after DEADLINE_S (as when it goes on to serve) fails the test, its thread left running."""
    out, err, ended = io.StringIO(), io.StringIO(), {}
    environ = {**os.environ, "PORT": str(free_port()), **env}

    def run() -> None:
        try:
            ended["code"] = piagent.main(args, environ)
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which raises it
            ended["raised"] = exc

    shown = logging.StreamHandler(err)
    shown.setLevel(logging.WARNING)
    shown.addFilter(lambda record: record.thread == thread.ident)  # not another test's server thread
    thread = threading.Thread(target=run, daemon=True)
    # no collection meanwhile: it would run the finalizers of earlier tests' garbage (an unclosed socket's warning,
    # "Exception ignored in ...") into what main() printed. Disabling costs nothing; collecting first took 0.3 s.
    collecting = gc.isenabled()
    gc.disable()
    logging.getLogger().addHandler(shown)
    try:
        with redirect_stdout(out), redirect_stderr(err), warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")  # then Python's defaults: what a process would not print either
            for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", hidden)
            thread.start()
            thread.join(DEADLINE_S)
    finally:
        logging.getLogger().removeHandler(shown)
        if collecting:
            gc.enable()
    assert ended, f"main() did not return within {DEADLINE_S} s; it printed {out.getvalue() + err.getvalue()!r}"
    if "raised" in ended:
        raise ended["raised"]
    err.writelines(f"{w.category.__name__}: {w.message}\n" for w in warned)
    return subprocess.CompletedProcess(["piagent", *args], ended["code"], out.getvalue(), err.getvalue())


def start_up(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """How piagent's start-up stops (bad settings, env file, memory), in process; the test below runs such a stop
    as a real process."""
    return in_process(list(args), env or {})


@pytest.mark.parametrize("env", [{"PORT": "abc"}, {"TEMPERATURE": "hot"}, {"PIAGENT_ENV_FILE": "/nonexistent.env"}])
def test_start_up_with_bad_config_exits_2_with_one_line_and_no_traceback(env):
    result = run_piagent(env=env)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("piagent: ")


def test_a_port_another_program_listens_on_stops_start_up_with_one_line_and_exit_2():
    """uvicorn's own bind failure exited 3, which the unit restarted every 3 s for as long as the port stayed taken
    (each start seconds of a Pi's CPU, beside its model). Now piagent says it once, with the fix, and exits 2,
    which the unit does not restart."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = start_up(env={"HOST": "127.0.0.1", "PORT": str(port)})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == (f"piagent: port {port} on 127.0.0.1: cannot listen there (Address already in use); is "
                             "piagent already running (systemctl status piagent)? Or choose another PORT\n")
    assert re.search(r"^RestartPreventExitStatus=2$", (HERE / "piagent.service").read_text(), re.M)


def test_a_port_below_1024_without_the_right_to_it_stops_start_up_with_one_line_and_exit_2():
    """PORT=80 under the unit (a throw-away user, no capabilities) cannot be listened on however often it restarts.
    The process is run without CAP_NET_BIND_SERVICE as the unit runs it (or as this user, when not root)."""
    prefix = (["setpriv", "--bounding-set", "-net_bind_service", "--inh-caps", "-net_bind_service"]
              if os.geteuid() == 0 else [])
    if prefix and shutil.which("setpriv") is None and os.environ.get("CI") != "true":
        pytest.skip("setpriv (util-linux) is not installed")
    result = subprocess.run([*prefix, *piagent_command()], capture_output=True, text=True, cwd=HERE, timeout=20,
                            env={**os.environ, "HOST": "127.0.0.1", "PORT": "80", "OLLAMA_HOST": "http://127.0.0.1:9"},
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == ("piagent: port 80 on 127.0.0.1: cannot listen there (Permission denied); a port below "
                             "1024 needs rights piagent's service does not have: choose PORT=8000 or another from "
                             "1024 up\n")


@pytest.mark.parametrize("data, told", [
    ("PORT=8000\nAGENT_GENERAL_SYSTEM=Réponds en français\n".encode("latin-1"), "line 2: not UTF-8 text; save"),
    ("MAX_TOKENS=100\n".encode("utf-16"), "starts with a byte-order mark"),
    ("\ufeff# piagent settings\nMAX_TOKENS=100\n".encode(), "save it as UTF-8 without BOM"),
    (b"MAX_TOKENS = 100\n", "line 1: expected KEY=value, got 'MAX_TOKENS = 100' (no spaces around '=')"),
    (b"MAX_TOKENS=100 # shorter\n", "line 1: MAX_TOKENS has a comment after its value; put comments on a line"),
])
def test_an_env_file_from_a_windows_editor_or_with_a_comment_after_a_value_is_one_line_saying_the_fix(
        tmp_path, data, told):
    """Latin-1 or UTF-16 (a traceback and exit 1, so systemd restarted it every 3 s), a BOM (shown as '\\ufeff'),
    spaces around '=', a comment after a value (it became part of the value: 'ollama pull qwen # small')."""
    bad = tmp_path / "piagent.env"
    bad.write_bytes(data)
    result = start_up("--env-file", str(bad))
    assert result.returncode == 2 and told in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_malformed_env_file_line_stops_start_up_naming_the_line(tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("PORT=8000\nexport HOST=0.0.0.0\n")
    result = start_up("--env-file", str(bad))
    assert result.returncode == 2 and f"{bad} line 2" in result.stderr and "Traceback" not in result.stderr


def test_import_defines_things_and_does_nothing_else():
    code = "import threading, piagent; print(threading.active_count(), hasattr(piagent, 'app'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=20)
    assert result.returncode == 0 and result.stdout == "1 False\n" and result.stderr == ""


#: style.md's sections, in order; and the forward references piagent.py declares (each commented where it is)
SECTIONS = ("Config", "Memory", "Prompt", "Providers", "Tools", "Guards", "Streaming", "Operations", "API", "Page",
            "Entry")
DECLARED_FORWARD = {("Runtime", "Metrics"), ("Runtime", "Warmup"), ("create_app", "add_page_route")}


def module_names(tree: ast.Module) -> dict[str, int]:
    """Each name defined at piagent.py's top level, with its line."""
    names: dict[str, int] = {}
    for node in tree.body:
        targets = ([node.name] if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else
                   [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if isinstance(t, ast.Name)])
        for name in targets:
            names.setdefault(name, node.lineno)
    return names


def uses(node: ast.AST) -> set[str]:
    """The names `node` reads that are not its own (arguments, assignments, nested definitions)."""
    own = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    own |= {a.arg for n in ast.walk(node) if isinstance(n, ast.arguments) for a in
            (*n.posonlyargs, *n.args, *n.kwonlyargs, n.vararg, n.kwarg) if a is not None}
    own |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n is not node}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - own


def test_piagent_py_keeps_the_house_shape():
    """style.md: the sections in order, each using only those above it; no function over 60 lines; no line over 120
    columns outside the page's HTML."""
    source = (HERE / "piagent.py").read_text()
    lines, tree = source.splitlines(), ast.parse(source)
    starts = [next(i for i, line in enumerate(lines, 1) if line.startswith(f"# {name}")) for name in SECTIONS]
    assert starts == sorted(starts), "the sections are out of order"
    section = lambda line: sum(start <= line for start in starts)  # noqa: E731
    defined = module_names(tree)
    forward = {(node.name, name) for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                             ast.ClassDef))
               for name in uses(node) if name in defined and section(defined[name]) > section(node.lineno)}
    assert forward == DECLARED_FORWARD
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert long == []
    page = range(starts[SECTIONS.index("Page")], starts[SECTIONS.index("Entry")])
    wide = [i for i, line in enumerate(lines, 1) if len(line) > 120 and i not in page]
    assert wide == []


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


class Clock:
    """An injectable clock: tests move time instead of sleeping."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro):
    return asyncio.run(coro)


def find_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and redis-server is not installed (apt-get install redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    if importlib.util.find_spec("redis") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and the redis package is not installed (pip install redis)")
        pytest.skip("the redis package is not installed (pip install redis)")
    return path


class RedisServer:
    """A real redis-server on a free loopback port, data in a temp dir, nothing saved."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.folder = folder

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen([find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", str(self.folder), "--save", "", "--appendonly", "no"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, what="redis-server to start")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *words: str) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(" ".join(words).encode() + b"\r\n")
            return sock.recv(4096)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(DEADLINE_S)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


BACKENDS = ["memory", "sqlite", "redis"]


@pytest.fixture
def memory_env(request, tmp_path):
    """Env settings for the backend named by the test's `backend` parameter (Redis flushed first)."""

    def env(backend: str) -> dict[str, str]:
        if backend == "redis":
            server = request.getfixturevalue("redis_server")
            server.command("FLUSHALL")
            return {"MEMORY_BACKEND": "redis", "REDIS_URL": server.url}
        if backend == "sqlite":
            return {"MEMORY_BACKEND": "sqlite", "MEMORY_PATH": str(tmp_path / "memory.db")}
        return {"MEMORY_BACKEND": "memory"}

    return env


def with_store(env: dict[str, str], clock, scenario, **caps):
    """Run `await scenario(store)` against an opened store built from env and caps (MEMORY_* values)."""
    config = load_config({**env, **{k: str(v) for k, v in caps.items()}})

    async def run_it():
        store = piagent.MEMORY_STORES[config.memory_backend](config, clock)
        await store.open()
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(run_it())


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_keeps_the_last_max_turns_in_order(memory_env, backend):
    async def scenario(store):
        for i in range(5):
            await store.append("c", "general", f"u{i}", f"a{i}")
        return await store.history("c")

    turns = with_store(memory_env(backend), Clock(), scenario, MEMORY_MAX_TURNS=2)
    assert [(t.user, t.assistant, t.index) for t in turns] == [("u3", "a3", 3), ("u4", "a4", 4)]
    assert all(t.created_at == 1000.0 for t in turns)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_forgets_idle_conversations_after_ttl_and_a_read_is_a_use(memory_env, backend):
    clock = Clock()

    async def scenario(store):
        await store.append("old", "general", "u", "a")
        await store.append("used", "general", "u", "a")
        clock.now += 50
        assert await store.history("used")  # reading is a use: its idle time starts again
        clock.now += 15
        return (await store.history("old"), await store.history("used"), await store.get("old"),
                [row.conversation_id for row in await store.recent(10, None)])

    old, used, old_info, listed = with_store(memory_env(backend), clock, scenario, MEMORY_TTL_MIN=1)
    assert old == [] and [(t.user, t.assistant) for t in used] == [("u", "a")]
    assert old_info is None and listed == ["used"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_evicts_the_least_recently_used_beyond_max_conversations(memory_env, backend):
    clock = Clock()

    async def scenario(store):
        for cid in "abc":
            await store.append(cid, "general", cid, cid)
            clock.now += 1
        await store.history("a")  # a is now the most recently used, b the least
        clock.now += 1
        await store.append("d", "general", "d", "d")
        return [bool(await store.history(c)) for c in "abcd"]

    assert with_store(memory_env(backend), clock, scenario, MEMORY_MAX_CONVERSATIONS=3) == [True, False, True, True]


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_caps_hold_under_churn_keeping_the_most_recent(memory_env, backend):
    clock = Clock()

    async def scenario(store):
        for i in range(2_500):
            clock.now += 0.001
            await store.append(f"c{i}", "general", "u", "a")
        page, before = [], None
        for _ in range(10):  # bounded: 250 conversations at most, 100 a page
            rows = await store.recent(100, before)
            page += rows
            if len(rows) < 100:
                break
            before = rows[-1].last_used
        return page

    kept = [row.conversation_id for row in with_store(memory_env(backend), clock, scenario, MEMORY_MAX_CONVERSATIONS=250)]
    assert kept == [f"c{i}" for i in range(2499, 2249, -1)]  # exactly the 250 most recent, newest first


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_gets_lists_and_deletes_conversations(memory_env, backend):
    clock = Clock()

    async def scenario(store):
        await store.append("x", "coder", "u1", "a1")
        clock.now += 1
        await store.append("y", "general", "u2", "a2")
        got = await store.get("x")
        listed = await store.recent(10, None)
        older = await store.recent(10, 1000.5)
        clock.now += 1
        await store.append("z", "general", "\u00e9" * 100, "a")  # a preview is cut in characters, not bytes
        await store.append("z", "general", "later", "a")
        (long,) = await store.recent(1, None)
        clock.now += 1
        await store.append("nul", "general", "a\x00b", "a")  # SQLite's substr() stopped at the NUL
        (nul,) = await store.recent(1, None)
        assert nul.preview == "a\x00b"
        await store.delete("nul")
        await store.delete("x")
        await store.delete("never-was")
        return got, listed, older, long, await store.get("x"), await store.history("x")

    got, listed, older, long, after_delete, history = with_store(memory_env(backend), clock, scenario)
    assert long == ("z", "general", 1002.0, "\u00e9" * piagent.PREVIEW_CHARS)
    assert (got.conversation_id, got.agent, got.last_used) == ("x", "coder", 1000.0)
    assert [(t.user, t.assistant, t.created_at) for t in got.turns] == [("u1", "a1", 1000.0)]
    assert listed == [("y", "general", 1001.0, "u2"), ("x", "coder", 1000.0, "u1")]
    assert older == [("x", "coder", 1000.0, "u1")]
    assert after_delete is None and history == []


def test_sqlite_memory_in_a_missing_folder_is_one_clear_start_up_error(tmp_path):
    result = start_up(env={"MEMORY_BACKEND": "sqlite", "MEMORY_PATH": str(tmp_path / "no" / "such.db")})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr


def test_corrupt_sqlite_file_is_one_clear_start_up_error(tmp_path):
    bad = tmp_path / "memory.db"
    bad.write_bytes(b"this is not a database" * 100)
    result = start_up(env={"MEMORY_BACKEND": "sqlite", "MEMORY_PATH": str(bad)})
    assert result.returncode == 2 and "not a usable SQLite database" in result.stderr
    assert result.stderr.count("\n") == 1


#: The SQLite schema of the first piagent with SQLite memory (66750ea): its turns had no number.
FIRST_SQLITE_SCHEMA = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, agent TEXT NOT NULL, last_used REAL NOT NULL);
CREATE TABLE turns (seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    user TEXT NOT NULL, assistant TEXT NOT NULL, created_at REAL NOT NULL);
"""


def test_a_sqlite_file_from_the_first_piagent_is_brought_up_to_date_and_its_chats_go_on(serve_local, fake, tmp_path):
    """Updating from an early install, as the README says: its conversations read and continue, and new turns are
    stored (they were 503 'no such column: number', and a new chat's turn was silently not saved)."""
    path, now = tmp_path / "piagent.db", time.time()
    with closing(sqlite3.connect(path)) as db:
        db.executescript(FIRST_SQLITE_SCHEMA)
        db.execute("INSERT INTO conversations VALUES ('old', 'general', ?)", (now,))
        db.executemany("INSERT INTO turns (conversation_id, user, assistant, created_at) VALUES ('old', ?, ?, ?)",
                       [("u1", "a1", now), ("u2", "a2", now)])
        db.commit()
    server = serve_local(MEMORY_BACKEND="sqlite", MEMORY_PATH=str(path))
    assert [t["user"] for t in server.get("/conversations/old").json()["turns"]] == ["u1", "u2"]
    assert chat(server, message="u3", conversation_id="old").status_code == 200
    assert [m["content"] for m in fake.generations()[-1].body["messages"][1:]] == ["u1", "a1", "u2", "a2", "u3"]
    assert chat(server, message="new").status_code == 200
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT conversation_id, user, number FROM turns ORDER BY seq").fetchall() == [
            ("old", "u1", 0), ("old", "u2", 1), ("old", "u3", 2), (db.execute(
                "SELECT id FROM conversations WHERE id != 'old'").fetchone()[0], "new", 0)]


def test_unreachable_redis_is_one_clear_start_up_error_that_systemd_retries(dead_port):
    find_redis_server()
    result = start_up(env={"MEMORY_BACKEND": "redis", "REDIS_URL": f"redis://127.0.0.1:{dead_port}/0"})
    assert result.returncode == 1 and "cannot reach Redis" in result.stderr and result.stderr.count("\n") == 1


def test_state_directory_makes_sqlite_the_default_there():
    config = load_config({"STATE_DIRECTORY": "/var/lib/piagent"})
    assert (config.memory_backend, config.memory_path) == ("sqlite", "/var/lib/piagent/piagent.db")
    assert load_config({}).memory_backend == "memory"


def test_several_workers_need_a_shared_memory():
    with pytest.raises(ConfigError, match="WORKERS"):
        load_config({"WORKERS": "2", "MEMORY_BACKEND": "memory"})
    assert load_config({"WORKERS": "2", "MEMORY_BACKEND": "sqlite"}).workers == 2


def test_a_waiter_cancelled_with_its_task_is_never_granted_and_leaves_the_gate_clean():
    # a waiter's future is cancelled the moment its task is, before its own leave() runs (found in review)
    async def scenario():
        gate = Gate(limit=1, max_queue=8)
        first, waiter = gate.enter("x"), gate.enter("x", slot=False)
        waiter.future.cancel()
        gate.leave(first)  # must not try to grant the cancelled waiter
        gate.leave(waiter)
        assert (gate.active, gate.busy, gate.queued, gate.holders) == (0, set(), 0, set())

    run(scenario())


def test_forgetting_a_busy_conversation_is_not_refused_by_max_queue():
    async def scenario():
        gate = Gate(limit=1, max_queue=0)
        held = gate.enter("x")
        forget = gate.enter("x", slot=False)  # waits for the reply in progress; needs no slot, so no queue limit
        assert not forget.granted
        gate.leave(held)
        assert forget.granted and gate.busy == {"x"} and gate.active == 0
        gate.leave(forget)

    run(scenario())


def test_the_gate_serialises_one_conversation_and_leaves_no_entries():
    async def scenario():
        gate, order = Gate(limit=3, max_queue=8), []

        async def use(cid, tag, hold):
            ticket = gate.enter(cid)
            await ticket.future
            order.append(f"{tag}+")
            await hold.wait()
            order.append(f"{tag}-")
            gate.leave(ticket)

        gate_a, gate_other = asyncio.Event(), asyncio.Event()
        gate_other.set()
        a = asyncio.create_task(use("x", "a", gate_a))
        b = asyncio.create_task(use("x", "b", gate_other))
        c = asyncio.create_task(use("y", "c", gate_other))
        await asyncio.wait_for(c, DEADLINE_S)  # another conversation never waits for x
        assert order == ["a+", "c+", "c-"] and gate.busy == {"x"} and gate.queued == 1
        gate_a.set()
        await asyncio.wait_for(asyncio.gather(a, b), DEADLINE_S)
        assert order[3:] == ["a-", "b+", "b-"] and not gate.busy and gate.active == 0 and gate.queued == 0

    run(scenario())


# ---------------------------------------------------------------------------
# Memory: over HTTP, for every backend
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_stores_completed_partial_and_no_failed_turns(serve, fake, memory_env, backend):
    server = serve(**memory_env(backend))
    chat(server, message="done", conversation_id="c")  # completed: stored
    fake.script = Script(tokens=["part", "ial"] + ["x"] * 50, hold_after=2)
    sock = raw_post(server.port, "/chat", {"message": "left", "stream": True, "conversation_id": "c"})
    read_until(sock, b"ial")
    sock.close()  # left mid-stream: what it received is stored
    wait_until(lambda: not server.app.state.runtime.gate.busy, what="the partial turn to be stored")
    fake.script = Script(error_after=1)
    with pytest.raises(httpx.RemoteProtocolError):  # the upstream fails mid-way: the stream is cut
        chat(server, message="failed", conversation_id="c", stream=True)
    wait_until(lambda: not server.app.state.runtime.gate.busy, what="the failed turn to end")
    fake.script = Script()
    turns = httpx.get(f"{server.url}/conversations/c").json()["turns"]
    assert [(t["user"], t["assistant"]) for t in turns] == [("done", "Hello from the Pi!"), ("left", "partial")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_conversation_api_reads_lists_and_forgets(serve_local, fake, memory_env, backend):
    # a clock that only moves forward, a millisecond a reading: the newest-first order below then holds whatever
    # the machine's wall clock does between two chats (a step back, or two readings alike on a coarse clock)
    readings = itertools.count(time.time(), 0.001)
    server = serve_local(clock=lambda: next(readings), AGENTS="general,coder", **memory_env(backend))
    chat(server, message="one", conversation_id="first")
    chat(server, message="two", conversation_id="second", agent="coder")
    body = server.get("/conversations/first").json()
    assert body["conversation_id"] == "first" and body["agent"] == "general"
    (turn,) = body["turns"]
    assert (turn["user"], turn["assistant"]) == ("one", "Hello from the Pi!")
    assert datetime.fromisoformat(turn["created_at"]).tzinfo is not None
    listed = server.get("/conversations").json()
    assert [(c["conversation_id"], c["agent"], c["preview"]) for c in listed["conversations"]] == [
        ("second", "coder", "two"), ("first", "general", "one")]
    assert listed["next_before"] is None
    page = server.get("/conversations", params={"limit": 1}).json()
    assert [c["conversation_id"] for c in page["conversations"]] == ["second"]
    rest = server.get("/conversations", params={"limit": 1, "before": page["next_before"]}).json()
    assert [c["conversation_id"] for c in rest["conversations"]] == ["first"]
    assert server.delete("/conversations/first").status_code == 204
    assert server.delete("/conversations/first").status_code == 204  # idempotent
    missing = server.get("/conversations/first")
    assert missing.status_code == 404 and error_of(missing)["code"] == "conversation_not_found"


@pytest.mark.parametrize("path", ["/conversations?limit=0", "/conversations?limit=101", "/conversations?before=soon",
                                  "/conversations/has%20space"])
def test_conversation_api_validates_its_input(serve_local, path):
    response = serve_local().get(path)
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"


def test_conversation_api_needs_the_key_like_chat(serve_local):
    server = serve_local(API_KEYS=KEY)
    assert server.get("/conversations").status_code == 401
    assert server.delete("/conversations/x").status_code == 401
    assert server.get("/conversations", headers={"X-API-Key": KEY}).status_code == 200


def test_redis_going_away_is_503_memory_unavailable_and_piagent_recovers(serve_local, fake, tmp_path):
    find_redis_server()
    redis = RedisServer(tmp_path).start()
    server = serve_local(MEMORY_BACKEND="redis", REDIS_URL=redis.url)
    assert chat(server, message="one", conversation_id="r").status_code == 200
    redis.stop()
    down = chat(server, message="two", conversation_id="r")
    assert down.status_code == 503 and error_of(down)["code"] == "memory_unavailable"
    assert "retry-after" in down.headers and len(fake.generations()) == 1  # the model was not asked
    redis.start()  # same port, empty data
    assert chat(server, message="three", conversation_id="r").status_code == 200
    assert len(fake.generations()[-1].body["messages"]) == 2
    redis.stop()


# ---------------------------------------------------------------------------
# Memory: durability and sharing across processes (real processes)
# ---------------------------------------------------------------------------


def test_sqlite_memory_survives_kill_9_with_every_completed_turn_in_order(fake, tmp_path):
    env = {"OLLAMA_HOST": fake.url, "MEMORY_BACKEND": "sqlite", "MEMORY_PATH": str(tmp_path / "memory.db"),
           "MEMORY_MAX_TURNS": "60", "RATE_LIMIT_PER_MIN": "0"}
    fake.script = Script(echo=True)
    with piagent_process(env, capture=True) as (url, proc):
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
            for i in range(50):
                assert client.post("/chat", json={"message": f"m{i}", "conversation_id": "durable"}).status_code == 200
        proc.kill()  # SIGKILL: no shutdown, no flush
        proc.wait(DEADLINE_S)
    with piagent_process(env) as url:
        turns = httpx.get(f"{url}/conversations/durable").json()["turns"]
    assert [(t["user"], t["assistant"]) for t in turns] == [(f"m{i}", f"echo: m{i}") for i in range(50)]


def test_two_processes_sharing_redis_continue_one_conversation(fake, redis_server):
    redis_server.command("FLUSHALL")
    env = {"OLLAMA_HOST": fake.url, "MEMORY_BACKEND": "redis", "REDIS_URL": redis_server.url}
    with piagent_process(env) as first, piagent_process(env) as second:
        assert httpx.post(f"{first}/chat", json={"message": "on the first", "conversation_id": "shared"}).status_code == 200
        assert httpx.post(f"{second}/chat", json={"message": "on the second", "conversation_id": "shared"}).status_code == 200
        turns = httpx.get(f"{first}/conversations/shared").json()["turns"]
    assert [t["user"] for t in turns] == ["on the first", "on the second"]
    assert [m["content"] for m in fake.generations()[1].body["messages"][1:]] == [
        "on the first", "Hello from the Pi!", "on the second"]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_twenty_concurrent_turns_through_two_workers_are_all_kept_whole(fake, memory_env, backend):
    fake.script = Script(echo=True)
    env = {"OLLAMA_HOST": fake.url, "WORKERS": "2", "MEMORY_MAX_TURNS": "50", "RATE_LIMIT_PER_MIN": "0",
           "MAX_QUEUE": "50", **memory_env(backend)}
    with piagent_process(env) as url:
        threads = [in_background(httpx.post, f"{url}/chat", timeout=30,
                                 json={"message": f"m{i}", "conversation_id": "busy"}) for i in range(20)]
        for thread, _ in threads:
            thread.join(30)
        assert all(result["value"].status_code == 200 for _, result in threads)
        turns = httpx.get(f"{url}/conversations/busy").json()["turns"]
    assert len(turns) == 20 and sorted(t["user"] for t in turns) == sorted(f"m{i}" for i in range(20))
    assert all(t["assistant"] == f"echo: {t['user']}" for t in turns)  # never a reply stored with another message


# ---------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------


HI_HELLO = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_turns_become_alternating_user_and_assistant_messages():
    assert piagent.turns_as_messages([Turn("hi", "hello")]) == HI_HELLO


def test_build_messages_is_system_then_history_then_user():
    assert build_messages(Prompt("Be brief.", HI_HELLO, "bye")) == [
        {"role": "system", "content": "Be brief."}, *HI_HELLO, {"role": "user", "content": "bye"}]


def test_render_prompt_uses_user_and_assistant_blocks():
    assert render_prompt(Prompt("Be brief.", HI_HELLO, "bye")) == (
        "<user>\nhi\n</user>\n<assistant>\nhello\n</assistant>\n<user>\nbye\n</user>\n<assistant>\n")


def test_token_estimate_counts_ascii_other_characters_and_messages():
    assert piagent.estimate_tokens([{"role": "user", "content": "hello there"}]) == 5 + 6
    assert piagent.estimate_tokens([{"role": "user", "content": "日本語"}]) == 2 * 3 + 6
    assert piagent.estimate_tokens([{"role": "user", "content": "café"}, {"role": "user", "content": ""}]) == 2 + 2 + 12
    assert piagent.estimate_tokens([]) == 0


def turns_numbered(first: int, last: int) -> list[Turn]:
    return [Turn(f"u{i}", f"a{i}", 0.0, i) for i in range(first, last + 1)]


@pytest.mark.parametrize("stored,sent", [((0, 3), (0, 3)), ((0, 7), (0, 7)), ((1, 8), (4, 8)), ((2, 9), (4, 9)),
                                         ((4, 11), (4, 11)), ((5, 12), (8, 12)), ((22, 29), (24, 29))])
def test_stable_window_jumps_by_half_blocks_and_otherwise_only_grows(stored, sent):
    window = piagent.stable_window(turns_numbered(*stored), max_turns=8)
    assert [t.index for t in window] == list(range(sent[0], sent[1] + 1))


def test_stable_window_keeps_most_requests_a_prefix_of_the_next():
    stored, jumps, previous = [], 0, None
    for k in range(30):
        window = [t.index for t in piagent.stable_window(stored, max_turns=8)]
        assert len(window) <= 8 and (not stored or window[-1] == k - 1)  # never more than 8, always the latest
        if previous and window[:len(previous)] != previous:
            jumps += 1
            assert window[0] - previous[0] == 4  # a block of half the window at once
        previous = window
        stored = (stored + turns_numbered(k, k))[-8:]
    assert jumps == 6  # at turns 9, 13, 17, 21, 25, 29 the window starts later; otherwise it only grows


def test_fit_history_drops_oldest_whole_turns_and_never_the_message():
    fixed = [{"role": "system", "content": "s" * 30}, {"role": "user", "content": "new"}]
    history = [{"role": r, "content": "x" * 30} for r in ("user", "assistant") * 3]  # 3 turns
    budget = piagent.estimate_tokens(fixed) + piagent.estimate_tokens(history[:4])  # room for two of them
    kept, dropped = piagent.fit_history(history, fixed, budget)
    assert (len(kept), dropped) == (4, 1) and kept == history[2:]
    assert piagent.fit_history(history, fixed, 10_000) == (history, 0)
    with pytest.raises(piagent.PromptTooLarge, match="shorten the message"):
        piagent.fit_history(history, fixed, piagent.estimate_tokens(fixed) - 1)
    tools = [{"role": "system", "content": "tool description " * 300}, {"role": "user", "content": "hi"}]
    with pytest.raises(piagent.PromptTooLarge, match=r"offer the agent fewer tools \(AGENT_<NAME>_TOOLS"):
        piagent.fit_history([], tools, 500)  # the system prompt and tools alone are over the budget
    with pytest.raises(piagent.PromptTooLarge, match=r"after the 2047 kept for the reply; ask for a shorter reply"):
        piagent.fit_history(history, fixed, 1, 2047)  # a client asked for nearly all of CTX_TOKENS for its reply


def test_history_over_the_budget_is_trimmed_and_said(serve, fake, caplog):
    caplog.set_level("INFO", logger="piagent")
    fake.script = Script(tokens=["r" * 600])  # long replies: ~246 tokens each by the estimate
    server = serve(CTX_TOKENS=1024, MAX_TOKENS=200)
    # budget 1024 - 200 = 824 tokens; system + new message ~50; a turn ~253: three turns fit, not four
    for i in range(4):
        assert "x-history-truncated" not in chat(server, message=f"m{i}", conversation_id="long").headers
    response = chat(server, message="m4", conversation_id="long")
    sent = fake.generations()[-1].body["messages"]
    assert response.headers["x-history-truncated"] == "1" and len(sent) == 2 + 2 * 3
    assert [m["content"] for m in sent if m["role"] == "user"] == ["m1", "m2", "m3", "m4"]  # the oldest went
    assert piagent.estimate_tokens(sent) + 200 <= 1024
    with httpx.stream("POST", f"{server.url}/chat", headers=SSE,
                      json={"message": "m5", "stream": True, "conversation_id": "long"}) as r:
        done = json.loads(decode_sse(r.iter_lines())[-1][1])
    assert r.headers["x-history-truncated"] == "2" and done["history_truncated"] == 2
    wait_until(lambda: len(piagent_records(caplog)) == 6, what="six records")
    assert piagent_records(caplog)[-1]["history_truncated"] == 2


def test_a_message_too_large_for_the_context_is_413_with_the_numbers(serve_local, fake):
    response = chat(serve_local(CTX_TOKENS=256, MAX_TOKENS=200, MAX_MESSAGE_CHARS=4000), message="word " * 100)
    error = error_of(response)
    assert response.status_code == 413 and error["code"] == "prompt_too_large"
    assert re.search(r"about \d+ tokens", error["message"]) and "56 left" in error["message"]
    assert fake.generations() == []


def test_a_reply_that_would_take_the_whole_context_is_413_saying_to_ask_for_less(serve_local, fake):
    # it said to offer an agent with no tools fewer tools
    response = serve_local(MAX_TOKENS=2047).post("/v1/chat/completions", json={
        "model": "general", "max_tokens": 2047, "messages": [{"role": "user", "content": "hi"}]})
    message = response.json()["error"]["message"]
    assert response.status_code == 413 and "after the 2047 kept for the reply; ask for a shorter reply" in message
    assert "fewer tools" not in message and fake.generations() == []


def test_requests_after_the_window_fills_extend_the_previous_prompt(serve_local, fake):
    server = serve_local(MEMORY_MAX_TURNS=8)
    for k in range(14):
        chat(server, message=f"m{k}", conversation_id="stable")
    requests = [g.body["messages"] for g in fake.generations()]
    # request 9 (k=9) jumps, then 10, 11, 12 each start with the whole previous request
    assert requests[9][:2] != requests[8][:2]
    for k in (10, 11, 12):
        assert requests[k][:len(requests[k - 1])] == requests[k - 1]


# ---------------------------------------------------------------------------
# API: the seed's contract
# ---------------------------------------------------------------------------


def test_health_is_liveness_only_and_never_calls_upstream(serve_local, fake):
    server = serve_local()
    response = server.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert fake.requests == []


def test_health_answers_even_with_no_upstream(dead_port):
    config = load_config({"OLLAMA_HOST": f"http://127.0.0.1:{dead_port}"})
    with InProcessServer(create_app(config)) as server:
        assert server.get("/health").json() == {"status": "ok"}


def test_agents_lists_configured_agents(serve_local):
    server = serve_local(AGENTS="general,coder")
    assert server.get("/agents").json() == {"agents": ["general", "coder"], "models": {
        "general": MODEL, "coder": MODEL}}


def test_chat_returns_reply_new_conversation_id_model_and_provider(serve_local, fake):
    response = chat(serve_local(), message="say hello", agent="general", stream=False)
    assert response.status_code == 200
    body = response.json()
    assert body["reply"] == "Hello from the Pi!" and body["model"] == MODEL and body["provider"] == "ollama"
    assert re.fullmatch(r"[0-9a-f]{32}", body["conversation_id"])  # uuid4 hex
    assert response.headers["x-conversation-id"] == body["conversation_id"]


def test_chat_sends_system_and_user_with_configured_options(serve_local, fake):
    server = serve_local(CTX_TOKENS=1024, MAX_TOKENS=64, TEMPERATURE=0.2, AGENT_GENERAL_SYSTEM="Be terse.")
    chat(server, message="hi")
    (request,) = fake.generations()
    assert request.path == "/api/chat" and request.body["stream"] is False and request.body["model"] == MODEL
    assert request.body["messages"] == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
    assert request.body["options"] == {"num_ctx": 1024, "num_predict": 64, "temperature": 0.2}
    assert "keep_alive" not in request.body


@pytest.mark.parametrize("value,sent", [("30m", "30m"), ("-1", -1), ("600", 600)])
def test_keep_alive_is_sent_when_set(serve_local, fake, value, sent):
    chat(serve_local(OLLAMA_KEEP_ALIVE=value), message="hi")
    assert fake.generations()[0].body["keep_alive"] == sent


def test_stream_sends_tokens_as_plain_text_with_conversation_header(serve, fake):
    server = serve()
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "count", "stream": True}) as response:
        text = "".join(response.iter_text())
    assert response.status_code == 200 and text == "Hello from the Pi!"
    h = response.headers
    assert h["content-type"] == "text/plain; charset=utf-8" and h["transfer-encoding"] == "chunked"
    assert h["cache-control"] == "no-cache" and h["x-accel-buffering"] == "no"
    assert re.fullmatch(r"[0-9a-f]{32}", h["x-conversation-id"])
    assert fake.generations()[0].body["stream"] is True


def test_stream_writes_each_token_before_the_next_exists(serve, fake):
    # The fake holds token 2 until released; the client must already have token 1 by then.
    fake.script = Script(tokens=["first", " second"], hold_after=1)
    server = serve()
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "x", "stream": True}) as response:
        pieces = response.iter_text()
        assert next(pieces) == "first"
        fake.script.release.set()
        assert "".join(pieces) == " second"


def data_segments_in(sock: socket.socket) -> int:
    """How many segments with data this socket has received: Linux's tcp_info.tcpi_data_segs_in."""
    return int.from_bytes(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)[152:156], sys.byteorder)


def test_a_response_head_leaves_with_its_first_body_bytes(serve, fake):
    # one write: a stream's client wakes once for its first token, not for the head and then again for the token
    fake.script = Script(tokens=["first", " second"], hold_after=1)
    server = serve()
    with closing(raw_post(server.port, "/chat", {"message": "x", "stream": True})) as sock:
        assert read_until(sock, b"first").startswith(b"HTTP/1.1 200 ") and data_segments_in(sock) == 1
        fake.script.release.set()
        assert read_until(sock, b"0\r\n\r\n").endswith(b" second\r\n0\r\n\r\n")
    with closing(socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_until(sock, b'{"status":"ok"}').startswith(b"HTTP/1.1 200 ") and data_segments_in(sock) == 1


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_the_upstream_connection_is_reused_across_requests(serve_local, serve_openai_local, fake, provider):
    server = serve_local() if provider == "ollama" else serve_openai_local()
    for stream in (True, False, True, True, False):
        assert chat(server, message="hi", stream=stream).status_code == 200
    assert fake.connections == 1  # keep-alive: no new TCP connection per chat


def test_stream_decodes_go_escaped_json_and_utf8(serve, fake):
    fake.script = Script(tokens=["<think>", " café & ☕"])
    with httpx.stream("POST", f"{serve().url}/chat", json={"message": "x", "stream": True}) as response:
        assert response.read().decode() == "<think> café & ☕"


def test_second_turn_sends_first_turn_as_history(serve, fake):
    server = serve()
    cid = chat(server, message="one").json()["conversation_id"]
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "two", "stream": True,
                                                           "conversation_id": cid}) as r:
        r.read()
    assert r.headers["x-conversation-id"] == cid
    chat(server, message="three", conversation_id=cid)
    messages = fake.generations()[2].body["messages"]
    assert [m["content"] for m in messages[1:]] == ["one", "Hello from the Pi!", "two", "Hello from the Pi!", "three"]


def test_client_chosen_conversation_id_is_kept(serve_local, fake):
    body = chat(serve_local(), message="hi", conversation_id="kitchen-pi:chat.1").json()
    assert body["conversation_id"] == "kitchen-pi:chat.1"


def test_history_is_capped_at_max_turns(serve_local, fake):
    server = serve_local(MEMORY_MAX_TURNS=2)
    for i in range(4):
        chat(server, message=f"m{i}", conversation_id="c")
    users = [m["content"] for m in fake.generations()[3].body["messages"] if m["role"] == "user"]
    assert users == ["m1", "m2", "m3"]


def test_ttl_expiry_over_http_uses_the_injected_clock(serve_local, fake):
    clock = Clock()
    server = serve_local(clock=clock, MEMORY_TTL_MIN=1)
    chat(server, message="one", conversation_id="c")
    clock.now += 61
    chat(server, message="two", conversation_id="c")
    assert len(fake.generations()[1].body["messages"]) == 2  # system + new message: history forgotten


def test_memory_off_keeps_and_sends_no_history(serve_local, fake):
    server = serve_local(ENABLE_MEMORY="false")
    body = chat(server, message="one", conversation_id="c").json()
    chat(server, message="two", conversation_id=body["conversation_id"])
    assert len(fake.generations()[1].body["messages"]) == 2


def test_generate_mode_posts_rendered_prompt_with_system(serve, fake):
    server = serve(OLLAMA_API="generate", AGENT_GENERAL_SYSTEM="Be terse.")
    chat(server, message="one", conversation_id="g")
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "two", "stream": True,
                                                           "conversation_id": "g"}) as r:
        assert r.read().decode() == "Hello from the Pi!"
    first, second = fake.generations()
    assert first.path == second.path == "/api/generate"
    assert first.body["system"] == "Be terse." and first.body["prompt"] == "<user>\none\n</user>\n<assistant>\n"
    assert second.body["prompt"].startswith("<user>\none\n</user>\n<assistant>\nHello from the Pi!\n</assistant>\n")


def test_same_conversation_waits_its_turn_and_others_do_not(serve, fake):
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=2)  # room for two generations: only the conversation lock may hold b back
    gate = server.app.state.runtime.gate
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True,
                                                           "conversation_id": "x"}) as first:
        pieces = first.iter_text()
        assert next(pieces) == "A1"
        results = {}
        second = threading.Thread(target=lambda: results.update(b=chat(server, message="b", conversation_id="x")))
        second.start()
        wait_until(lambda: gate.queued == 1, what="second request to queue behind its conversation")
        assert len(fake.generations()) == 1  # it waits in piagent, not at the model
        fake.script = Script(tokens=["C"], hold_after=None, release=fake.script.release)
        assert chat(server, message="c", conversation_id="y").json()["reply"] == "C"  # y never waits for x
        fake.script.release.set()
        assert "".join(pieces) == "A2"
    second.join(DEADLINE_S)
    assert results["b"].status_code == 200
    history = [m["content"] for m in fake.generations()[2].body["messages"][1:]]
    assert history == ["a", "A1A2", "b"]


# ---------------------------------------------------------------------------
# API: errors (one shape, never a 500 with a stack trace)
# ---------------------------------------------------------------------------


def test_unknown_agent_is_404_listing_available_agents(serve_local):
    response = chat(serve_local(AGENTS="general,coder"), message="hi", agent="poet")
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "unknown_agent" and "general, coder" in error["message"]


@pytest.mark.parametrize("body", [{"message": ""}, {"message": "  \n\t"}, {}, {"message": "hi", "stream": "maybe"},
                                  {"message": "hi", "conversation_id": "has space"},
                                  {"message": "hi", "conversation_id": "x" * 129},
                                  {"message": "hi", "conversation_id": "../etc"}])
def test_invalid_body_is_422_in_the_error_shape(serve_local, fake, body):
    response = chat(serve_local(), **body)
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"
    assert fake.generations() == []


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b'{"message": "caf\xe9"}'])
def test_malformed_or_non_utf8_body_is_422_in_the_error_shape(serve_local, raw):
    response = serve_local().post("/chat", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422 and error_of(response)["code"] == "invalid_request"


def test_the_openapi_document_names_each_json_body_and_every_reference_resolves():
    # /chat and /v1 read their bodies themselves (parsed once, by the guards): the document must still show them
    schema = create_app(load_config({}, None)).openapi()
    components = schema["components"]["schemas"]
    bodies = {path: ops["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
              for path, ops in schema["paths"].items() if "requestBody" in ops.get("post", {})}
    assert bodies == {"/chat": "#/components/schemas/ChatRequest",
                      "/v1/chat/completions": "#/components/schemas/OpenAIChatRequest"}
    assert {"message", "agent", "conversation_id", "stream"} <= set(components["ChatRequest"]["properties"])
    assert components["OpenAIChatRequest"]["required"] == ["model", "messages"]
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(schema)))
    assert {"ChatRequest", "OpenAIMessage", "ClientTool"} <= refs <= set(components)


def test_a_direct_route_refuses_what_it_would_not_run():
    # a generation route skips FastAPI's dependency solving: a dependency or parameter given it would be documented
    # in /openapi.json and never run (an auth check among them), so registering one fails at once
    from fastapi import Depends, FastAPI

    async def alone(request: piagent.Request) -> None: ...  # (a name this module sees: annotations are strings here)

    async def with_limit(request: piagent.Request, limit: int = 1) -> None: ...

    app = FastAPI()
    with pytest.raises(TypeError, match="takes the Request alone"):
        piagent.post(app, "/x", dependencies=[Depends(lambda: None)])(alone)
    with pytest.raises(TypeError, match="takes the Request alone"):
        piagent.post(app, "/y")(with_limit)
    piagent.post(app, "/z")(alone)
    assert [route.path for route in app.routes if isinstance(route, piagent.DirectRoute)] == ["/z"]


@pytest.mark.parametrize("content_type,read", [("application/json", True), ("Application/JSON; charset=utf-8", True),
                                               ("application/vnd.api+json", True), ("application/x/y+json", False),
                                               ("application/json, application/ld+json", False), ("text/json", False)])
def test_a_body_is_read_as_json_for_one_json_media_type_only(serve_local, fake, content_type, read):
    # the guards parse the body; the routes then read it as FastAPI would have: JSON for one JSON media type
    server = serve_local()
    for path, body in (("/chat", {"message": "hi"}), ("/v1/chat/completions", {
            "model": "general", "messages": [{"role": "user", "content": "hi"}]})):
        response = server.post(path, content=json.dumps(body).encode(), headers={"Content-Type": content_type})
        assert response.status_code == (200 if read else 422), (path, response.text)
        if not read:
            assert response.json()["error"]["message"].startswith("body: Input should be a valid dictionary")
    assert len(fake.generations()) == (2 if read else 0)


def test_the_ollama_door_reads_json_whatever_its_encoding_and_names_a_wrong_field(serve_local, fake):
    server = serve_local()
    for encoded in (lambda text: text.encode("utf-16"), lambda text: b"\xef\xbb\xbf" + text.encode()):
        wrong = server.post("/api/show", content=encoded(json.dumps({"model": 5})))
        assert (wrong.status_code, wrong.json()) == (400, {"error": "model: Input should be a valid string"})
        assert server.post("/api/show", content=encoded(json.dumps({"model": "general"}))).status_code == 200
    assert fake.generations() == []


def test_unknown_route_and_wrong_method_use_the_error_shape_and_say_what_to_do(serve_local):
    server = serve_local()
    missing = error_of(server.get("/nope"))
    assert missing["code"] == "not_found" and "nothing at /nope" in missing["message"] and "README" in missing["message"]
    response = server.get("/chat")
    assert response.status_code == 405 and error_of(response)["code"] == "method_not_allowed"
    assert error_of(response)["message"] == "GET is not allowed on /chat; use POST"


def test_the_mistakes_of_a_first_curl_are_422_saying_how_to_send_the_body(serve_local, fake):
    server = serve_local()
    form = server.post("/chat", content=b'{"message":"hi"}',  # curl -d without -H: as a form
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422 and "Content-Type: application/json" in error_of(form)["message"]
    quoted = server.post("/chat", content=b"{'message':'hi'}", headers={"Content-Type": "application/json"})
    assert error_of(quoted)["message"] == "body is not JSON at character 1: Expecting property name enclosed in double quotes"
    ollama = server.post("/api/chat", content=b"{'model':'general'}").json()["error"]  # its reader says where
    assert ollama.startswith("body is not JSON: ") and "character" not in ollama, ollama
    typed = server.post("/chat", json={"message": 5})  # JSON sent as such: no hint about the header
    assert error_of(typed)["message"] == "message: Input should be a valid string"
    assert fake.generations() == []


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_unreachable_is_503_naming_the_url(stream, dead_port):
    host = f"http://127.0.0.1:{dead_port}"
    with InProcessServer(create_app(load_config({"OLLAMA_HOST": host}))) as server:
        response = chat(server, message="hi", stream=stream)
    error = error_of(response)
    assert response.status_code == 503 and error["code"] == "upstream_unavailable"
    assert host in error["message"] and "start" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("wording", ["model '{m}' not found", 'model "{m}" not found, try pulling it first'])
def test_model_not_pulled_is_502_with_the_pull_command(serve_local, fake, stream, wording):
    fake.script = Script(status=404, error_text=wording.format(m="missing:1b"))
    response = chat(serve_local(OLLAMA_MODEL_GENERAL="missing:1b"), message="hi", stream=stream)
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "model_not_found" and "ollama pull missing:1b" in error["message"]


def test_model_not_pulled_as_the_fake_reports_an_unknown_model(serve_local, fake):
    response = chat(serve_local(OLLAMA_MODEL_GENERAL="llama3.2"), message="hi")  # the fake has no such model
    assert response.status_code == 502 and "ollama pull llama3.2" in error_of(response)["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_busy_is_503_with_retry_after(serve_local, fake, stream):
    fake.script = Script(status=503, error_text=BUSY_TEXT)
    response = chat(serve_local(), message="hi", stream=stream)
    assert response.status_code == 503 and error_of(response)["code"] == "upstream_busy"
    assert int(response.headers["retry-after"]) > 0


@pytest.mark.parametrize("stream", [False, True])
def test_no_first_byte_in_time_is_504_and_the_upstream_is_let_go(serve, fake, stream):
    fake.script = Script(first_byte_delay_s=20)
    response = chat(serve(OLLAMA_TIMEOUT_S=0.5), message="hi", stream=stream)
    assert response.status_code == 504 and error_of(response)["code"] == "upstream_timeout"
    wait_until(lambda: len(fake.hangups) == 1, timeout=1.0, what="the fake to see piagent hang up")


@pytest.mark.parametrize("stream", [False, True])
def test_other_upstream_error_before_first_token_is_502_with_its_message(serve_local, fake, stream):
    fake.script = Script(status=500, error_text="model requires more system memory (5.6 GiB) than is available")
    response = chat(serve_local(), message="hi", stream=stream)
    error = error_of(response)
    assert response.status_code == 502 and error["code"] == "upstream_error"
    assert "more system memory" in error["message"]


def test_error_line_before_any_token_is_502(serve_local, fake):
    fake.script = Script(error_after=0)
    response = chat(serve_local(), message="hi", stream=True)
    assert response.status_code == 502 and "error was encountered" in error_of(response)["message"]


@pytest.mark.parametrize("fault", [{"error_after": 2}, {"drop_after": 2}])
def test_upstream_failure_mid_stream_ends_without_the_closing_chunk_and_stores_nothing(serve, fake, fault):
    fake.script = Script(**fault)
    server = serve()
    received = []
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True,
                                                           "conversation_id": "c"}) as response:
        with pytest.raises(httpx.RemoteProtocolError):  # incomplete chunked transfer, not a clean end
            for piece in response.iter_text():
                received.append(piece)
    assert "".join(received) == "Hello from"
    assert_nothing_stored(server, fake, "c")  # no half turn in history


def test_upstream_failure_without_stream_stores_nothing(serve_local, fake):
    fake.script = Script(error_after=3)
    server = serve_local()
    assert chat(server, message="hi", conversation_id="c").status_code == 502
    assert_nothing_stored(server, fake, "c")


# ---------------------------------------------------------------------------
# API: disconnects (real sockets; the fake must see the hang-up within a second)
# ---------------------------------------------------------------------------


def test_client_leaving_mid_stream_stops_the_upstream_and_keeps_what_it_received(serve, fake):
    fake.script = Script(tokens=["Hello", " there"] + [" more"] * 50, token_delay_s=0.05, hold_after=2)
    server = serve()
    sock = raw_post(server.port, "/chat", {"message": "tell me", "stream": True, "conversation_id": "c"})
    read_until(sock, b"there")
    sock.close()
    gone_at = time.monotonic()
    wait_until(lambda: fake.hangups, timeout=1.0, what="the fake to see the hang-up")
    assert fake.hangups[0] - gone_at < 1.0 and fake.completed == 0
    wait_until(lambda: not server.app.state.runtime.gate.busy, what="the turn to be stored")
    fake.script = Script()
    chat(server, message="next", conversation_id="c")
    history = [m["content"] for m in fake.generations()[1].body["messages"][1:]]
    assert history == ["tell me", "Hello there", "next"]


def test_client_leaving_before_first_token_stops_the_upstream(serve, fake):
    fake.script = Script(first_byte_delay_s=20)
    server = serve()
    sock = raw_post(server.port, "/chat", {"message": "hi", "stream": True})
    wait_until(lambda: fake.generations(), what="the request to reach the fake")
    sock.close()
    wait_until(lambda: fake.hangups, timeout=1.0, what="the fake to see the hang-up")


def test_client_leaving_a_non_stream_request_cancels_the_upstream_call(serve, fake):
    fake.script = Script(tokens=["t"] * 100, token_delay_s=0.05)
    server = serve()
    sock = raw_post(server.port, "/chat", {"message": "hi", "conversation_id": "c"})
    wait_until(lambda: fake.generations(), what="the request to reach the fake")
    sock.close()
    wait_until(lambda: fake.hangups, timeout=1.0, what="the fake to see the hang-up")
    assert fake.completed == 0
    wait_until(lambda: not server.app.state.runtime.gate.busy, what="the conversation to be released")
    fake.script = Script()
    chat(server, message="next", conversation_id="c")
    assert len(fake.generations()[1].body["messages"]) == 2  # nothing was delivered, nothing stored


# ---------------------------------------------------------------------------
# Providers: SSE decoding and encoding
# ---------------------------------------------------------------------------


def decode_sse(lines):
    decoder, events = piagent.SSEDecoder(1 << 20), []
    for line in lines:
        event = decoder.feed(line)
        if event:
            events.append(event)
    last = decoder.flush()
    return events + ([last] if last else [])


def test_sse_decoder_gathers_data_lines_skips_comments_and_reads_event_names():
    lines = [": keep-alive", "", "data: {\"a\":1}", "", "event: done", "data:line one", "data: line two", "",
             "id: 7", "retry: 10", "data: [DONE]", ""]
    assert decode_sse(lines) == [("message", '{"a":1}'), ("done", "line one\nline two"), ("message", "[DONE]")]


def test_sse_decoder_keeps_a_last_event_without_its_blank_line():
    assert decode_sse(["data: [DONE]"]) == [("message", "[DONE]")]


@pytest.mark.parametrize("data,event", [({"text": "héllo\n<b>"}, "token"), ("[DONE]", None), ("two\nlines", "x")])
def test_sse_encoder_output_decodes_back_to_the_same_event(data, event):
    encoded = piagent.sse_event(data, event)
    assert encoded.endswith("\n\n")
    (name, text), = decode_sse(encoded.split("\n")[:-1])
    assert name == (event or "message")
    assert (json.loads(text) if isinstance(data, dict) else text) == data


# ---------------------------------------------------------------------------
# Providers: OpenAI-compatible upstream (PROVIDER=openai)
# ---------------------------------------------------------------------------


def openai_env(fake) -> dict[str, str]:
    return {"PROVIDER": "openai", "OPENAI_BASE_URL": f"{fake.url}/v1", "OPENAI_MODEL_GENERAL": MODEL,
            "OLLAMA_HOST": "http://127.0.0.1:9"}  # the Ollama URL must not be used


@pytest.fixture
def serve_openai(fake, servers):
    """serve_openai(**env) -> LiveServer of piagent with PROVIDER=openai in front of the fake's /v1."""
    return server_starter(LiveServer, servers, openai_env(fake))


@pytest.fixture
def serve_openai_local(fake, servers):
    """serve_openai(**env), in process."""
    return server_starter(InProcessServer, servers, openai_env(fake))


def test_openai_provider_posts_chat_completions_with_mapped_options(serve_openai_local, fake):
    response = chat(serve_openai_local(MAX_TOKENS=64, TEMPERATURE=0.3, AGENT_GENERAL_SYSTEM="Be terse."), message="hi")
    assert response.status_code == 200
    assert response.json()["reply"] == "Hello from the Pi!" and response.json()["provider"] == "openai"
    (request,) = fake.generations()
    assert request.path == "/v1/chat/completions" and "authorization" not in request.headers
    assert request.body == {"model": MODEL, "stream": False, "max_tokens": 64, "temperature": 0.3,
                            "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]}


def test_openai_provider_sends_the_api_key_as_bearer(fake, serve_openai_local):
    fake.api_key = "sk-local-123"
    assert chat(serve_openai_local(OPENAI_API_KEY="sk-local-123"), message="hi").status_code == 200
    assert fake.generations()[0].headers["authorization"] == "Bearer sk-local-123"


@pytest.mark.parametrize("shape", [{}, {"sse_comments": True}, {"split_writes": True},
                                   {"sse_comments": True, "split_writes": True}])
def test_openai_provider_streams_deltas_across_comments_and_split_lines(serve_openai, fake, shape):
    fake.script = Script(**shape)
    server = serve_openai()
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True}) as response:
        assert "".join(response.iter_text()) == "Hello from the Pi!"
    body = fake.generations()[0].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}


def test_openai_provider_keeps_memory_like_ollama(serve_openai_local, fake):
    server = serve_openai_local()
    chat(server, message="one", conversation_id="o")
    chat(server, message="two", conversation_id="o")
    assert [m["content"] for m in fake.generations()[1].body["messages"][1:]] == ["one", "Hello from the Pi!", "two"]


def test_openai_upstream_refusing_the_key_is_502_upstream_auth(serve_openai_local, fake):
    fake.api_key = "sk-right"
    response = chat(serve_openai_local(OPENAI_API_KEY="sk-wrong"), message="hi")
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "upstream_auth" and "OPENAI_API_KEY" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_openai_upstream_unknown_model_is_502_model_not_found(serve_openai_local, fake, stream):
    response = chat(serve_openai_local(OPENAI_MODEL_GENERAL="gpt-nope"), message="hi", stream=stream)
    assert response.status_code == 502
    error = error_of(response)
    assert error["code"] == "model_not_found" and "OPENAI_MODEL_" in error["message"]


@pytest.mark.parametrize("status,retry", [(429, "7"), (503, None)])
def test_openai_upstream_429_or_503_is_503_busy_with_retry_after(serve_openai_local, fake, status, retry):
    fake.script = Script(status=status, error_text="Rate limit reached", retry_after=retry)
    response = chat(serve_openai_local(), message="hi", stream=True)
    assert response.status_code == 503 and error_of(response)["code"] == "upstream_busy"
    assert response.headers["retry-after"] == (retry or str(piagent.DEFAULT_RETRY_AFTER_S))


def test_openai_upstream_silent_past_the_timeout_is_504(serve_openai, fake):
    fake.script = Script(first_byte_delay_s=20)
    response = chat(serve_openai(OLLAMA_TIMEOUT_S=0.5), message="hi", stream=True)
    assert response.status_code == 504 and error_of(response)["code"] == "upstream_timeout"
    wait_until(lambda: len(fake.hangups) == 1, timeout=1.0, what="the fake to see piagent hang up")


def test_openai_upstream_unreachable_is_503(serve_openai_local, dead_port):
    url = f"http://127.0.0.1:{dead_port}/v1"
    response = chat(serve_openai_local(OPENAI_BASE_URL=url), message="hi")
    assert response.status_code == 503 and url in error_of(response)["message"]


def test_openai_upstream_error_before_first_token_is_502_with_its_message(serve_openai_local, fake):
    fake.script = Script(status=400, error_text="context length exceeded")
    response = chat(serve_openai_local(), message="hi", stream=True)
    assert response.status_code == 502 and "context length exceeded" in error_of(response)["message"]


@pytest.mark.parametrize("fault", [{"error_after": 2}, {"drop_after": 2}])
def test_openai_upstream_failure_mid_stream_cuts_the_plain_stream_and_stores_nothing(serve_openai, fake, fault):
    fake.script = Script(**fault)
    server = serve_openai()
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True,
                                                           "conversation_id": "c"}) as response:
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in response.iter_text():
                pass
    assert_nothing_stored(server, fake, "c")


def test_openai_upstream_is_let_go_when_the_client_leaves(serve_openai, fake):
    fake.script = Script(tokens=["a", "b"] + ["c"] * 50, token_delay_s=0.05, hold_after=2)
    server = serve_openai()
    sock = raw_post(server.port, "/chat", {"message": "hi", "stream": True})
    read_until(sock, b"b")
    sock.close()
    wait_until(lambda: fake.hangups, timeout=1.0, what="the fake to see the hang-up")


# ---------------------------------------------------------------------------
# API: SSE on /chat (Accept: text/event-stream)
# ---------------------------------------------------------------------------

SSE = {"Accept": "text/event-stream"}


def sse_events(response) -> list[tuple[str, str]]:
    return decode_sse(response.iter_lines())


def test_chat_sse_sends_token_events_then_done_with_counts_and_timings(serve, fake):
    server = serve()
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True,
                                                           "conversation_id": "s1"}, headers=SSE) as response:
        events = sse_events(response)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-conversation-id"] == "s1" and response.headers["cache-control"] == "no-cache"
    tokens = [json.loads(d)["text"] for e, d in events if e == "token"]
    assert "".join(tokens) == "Hello from the Pi!" and len(tokens) == 5
    (name, data) = events[-1]
    done = json.loads(data)
    assert name == "done" and done["conversation_id"] == "s1" and done["model"] == MODEL
    assert done["tokens"] == 5 and done["completion_tokens"] == 5 and done["prompt_tokens"] > 0
    assert done["done_reason"] == "stop" and done["ttft_ms"] >= 0 and done["duration_ms"] >= done["ttft_ms"]


def test_chat_stream_without_accept_stays_plain_text(serve):
    with httpx.stream("POST", f"{serve().url}/chat", json={"message": "hi", "stream": True}) as response:
        assert response.headers["content-type"] == "text/plain; charset=utf-8"


def test_chat_sse_reports_a_mid_stream_failure_as_an_error_event_and_stores_nothing(serve, fake):
    fake.script = Script(error_after=2)
    server = serve()
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True,
                                                           "conversation_id": "c"}, headers=SSE) as response:
        events = sse_events(response)  # a clean end: the error event is the report
    assert [e for e, _ in events] == ["token", "token", "error"]
    assert json.loads(events[-1][1])["error"]["code"] == "upstream_error"
    assert_nothing_stored(server, fake, "c")


def test_chat_sse_failure_before_first_token_is_still_an_http_error(serve_local, fake):
    response = chat(serve_local(OLLAMA_MODEL_GENERAL="missing"), message="hi", stream=True)
    assert response.status_code == 502 and error_of(response)["code"] == "model_not_found"


def test_chat_sse_pings_while_waiting_for_the_first_token(serve, fake):
    fake.script = Script(hold_after=0)  # the fake holds before its first token, like a Pi evaluating a long prompt
    server = serve(SSE_PING_S=0.02)
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True}, headers=SSE) as r:
        lines = r.iter_lines()
        assert next(lines) == ": ping"
        fake.script.release.set()
        events = decode_sse(lines)
    assert "".join(json.loads(d)["text"] for e, d in events if e == "token") == "Hello from the Pi!"
    assert events[-1][0] == "done"


def test_chat_sse_client_leaving_during_pings_stops_the_upstream(serve, fake):
    fake.script = Script(hold_after=0)
    server = serve(SSE_PING_S=0.02)
    sock = raw_post(server.port, "/chat", {"message": "hi", "stream": True}, "Accept: text/event-stream\r\n")
    read_until(sock, b": ping")
    sock.close()
    wait_until(lambda: fake.hangups, timeout=1.0, what="the fake to see the hang-up")


# ---------------------------------------------------------------------------
# API: the OpenAI-compatible front door (/v1)
# ---------------------------------------------------------------------------


def v1(server, headers=None, **body) -> httpx.Response:
    return server.post("/v1/chat/completions", json=body, headers=headers)


def openai_error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert {"message", "type", "code"} <= set(error), error
    return error


def test_v1_models_lists_the_agents_as_models(serve_local):
    body = serve_local(AGENTS='general,coder').get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [("general", "model"), ("coder", "model")]


def test_v1_chat_completion_applies_the_agent_and_uses_client_history(serve_local, fake):
    server = serve_local(AGENT_GENERAL_SYSTEM="Agent rules.")
    messages = [{"role": "system", "content": "Client rules."}, {"role": "user", "content": "one"},
                {"role": "assistant", "content": "uno"}, {"role": "user", "content": [{"type": "text", "text": "two"}]}]
    response = v1(server, model="general", messages=messages)
    body = response.json()
    assert response.status_code == 200 and body["object"] == "chat.completion" and body["model"] == "general"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello from the Pi!"},
                                "finish_reason": "stop"}]
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5
    sent = [(m["role"], m["content"]) for m in fake.generations()[0].body["messages"]]
    assert sent == [("system", "Agent rules."), ("system", "Client rules."), ("user", "one"),
                    ("assistant", "uno"), ("user", "two")]
    assert "x-conversation-id" not in response.headers


def test_v1_uses_no_server_memory_without_a_conversation_header(serve_local, fake):
    server = serve_local()
    v1(server, model="general", messages=[{"role": "user", "content": "one"}])
    v1(server, model="general", messages=[{"role": "user", "content": "two"}])
    assert len(fake.generations()[1].body["messages"]) == 2


def test_v1_with_conversation_header_uses_server_memory(serve_local, fake):
    server = serve_local()
    first = v1(server, {"X-Conversation-Id": "v1-conv"}, model="general", messages=[{"role": "user", "content": "one"}])
    assert first.headers["x-conversation-id"] == "v1-conv"
    # the client's own history is replaced by what piagent remembers
    v1(server, {"X-Conversation-Id": "v1-conv"}, model="general",
       messages=[{"role": "user", "content": "ignored"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "two"}])
    sent = [m["content"] for m in fake.generations()[1].body["messages"][1:]]
    assert sent == ["one", "Hello from the Pi!", "two"]
    assert chat(server, message="three", conversation_id="v1-conv").status_code == 200  # same memory as /chat
    assert len(fake.generations()[2].body["messages"]) == 6


def test_v1_stream_is_chat_completion_chunks_then_done(serve, fake):
    server = serve()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={
            "model": "general", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
        events = sse_events(response)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(d) for _, d in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "general" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello from the Pi!"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 5 + ["stop"]


def test_v1_stream_include_usage_adds_a_usage_chunk(serve, fake):
    with httpx.stream("POST", f"{serve().url}/v1/chat/completions", json={
            "model": "general", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}) as response:
        events = sse_events(response)
    usage_chunk = json.loads(events[-2][1])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5


def test_v1_stream_mid_stream_failure_sends_an_error_object_and_no_done(serve, fake):
    fake.script = Script(error_after=2)
    with httpx.stream("POST", f"{serve().url}/v1/chat/completions", json={
            "model": "general", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
        events = sse_events(response)
    assert "[DONE]" not in [d for _, d in events]
    assert json.loads(events[-1][1])["error"]["code"] == "upstream_error"


def test_v1_request_overrides_max_tokens_and_temperature(serve_local, fake):
    server = serve_local()
    v1(server, model="general", max_tokens=33, temperature=0.1, messages=[{"role": "user", "content": "hi"}])
    v1(server, model="general", max_completion_tokens=44, messages=[{"role": "user", "content": "hi"}])
    first, second = (g.body["options"] for g in fake.generations())
    assert (first["num_predict"], first["temperature"]) == (33, 0.1)
    assert (second["num_predict"], second["temperature"]) == (44, 0.7)


def test_v1_max_tokens_past_max_tokens_is_lowered_to_it_as_on_api(serve_local, fake):
    # it was refused at CTX_TOKENS or more (a client's default 4096 was a 422) and honoured below: 2,000 tokens
    # at 2-5 a second kept the Pi busy ten minutes past the operator's MAX_TOKENS
    server = serve_local(MAX_TOKENS=50)
    for asked in (4096, 1500, 50):
        assert v1(server, model="general", max_tokens=asked, messages=[{"role": "user", "content": "hi"}]).is_success
    assert [g.body["options"]["num_predict"] for g in fake.generations()] == [50, 50, 50]


def test_v1_sampling_fields_reach_ollama_in_its_terms(serve_local, fake):
    # they were dropped: a client's stop sequence was not sent, and the Pi generated on to max_tokens
    server = serve_local()
    hi = [{"role": "user", "content": "hi"}]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    v1(server, model="general", messages=hi, stop="\n", seed=7, top_p=0.5, presence_penalty=0.5,
       frequency_penalty=-1, response_format={"type": "json_object"})
    v1(server, model="general", messages=hi, stop=["END", "##"],
       response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema, "strict": True}})
    v1(server, model="general", messages=hi, response_format={"type": "text"}, stop=[])
    first, second, third = (g.body for g in fake.generations())
    assert {k: first["options"][k] for k in ("stop", "seed", "top_p", "presence_penalty", "frequency_penalty")} == {
        "stop": ["\n"], "seed": 7, "top_p": 0.5, "presence_penalty": 0.5, "frequency_penalty": -1}
    assert (first["format"], second["format"], second["options"]["stop"]) == ("json", schema, ["END", "##"])
    assert "format" not in third and "stop" not in third["options"]


def test_v1_sampling_fields_reach_an_openai_upstream_as_sent(serve_openai_local, fake):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    v1(serve_openai_local(), model="general", messages=[{"role": "user", "content": "hi"}], stop="END", seed=7,
       top_p=0.9, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema,
                                                                           "strict": True}})
    (sent,) = fake.generations()
    assert {k: sent.body.get(k) for k in ("stop", "seed", "top_p", "response_format")} == {
        "stop": ["END"], "seed": 7, "top_p": 0.9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}}}


@pytest.mark.parametrize("extra", [{"temperature": 2.5}, {"temperature": -1}, {"max_tokens": 0},
                                   {"top_p": 1.5}, {"seed": 2**63}, {"seed": True}, {"max_tokens": "12"},
                                   {"temperature": True}, {"top_p": "0.5"}, {"max_tokens": 12.0}, {"stop": ""}, {"stop": ["a"] * 17},
                                   {"stop": "x" * 257}, {"frequency_penalty": 3}, {"presence_penalty": -2.5},
                                   {"response_format": {"type": "xml"}}, {"response_format": {"type": "json_schema"}},
                                   {"response_format": {"type": "json_schema", "json_schema": {"name": "n"}}},
                                   {"messages": []},
                                   {"messages": [{"role": "assistant", "content": "hi"}]},
                                   {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
                                   {"messages": [{"role": "tool", "content": "x"}]}])
def test_v1_invalid_request_is_422_in_openai_error_shape(serve_local, fake, extra):
    body = {"model": "general", "messages": [{"role": "user", "content": "hi"}], **extra}
    response = v1(serve_local(), **body)
    assert response.status_code == 422 and openai_error_of(response)["type"] == "invalid_request_error"
    assert next(iter(extra)).removesuffix("s") in openai_error_of(response)["message"]  # the field (or "message")
    assert fake.generations() == []


@pytest.mark.parametrize("extra, told", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                {"type": "image_url", "image_url": {"url": "data:,"}}]}]},
     "messages.0.content: has a part of type 'image_url'; piagent's agents read text only"),
    ({"n": 2}, "n: piagent gives one choice; leave n out, or send 1")])
def test_v1_an_image_or_more_than_one_choice_is_refused_in_words(serve_local, fake, extra, told):
    """They were pydantic's account of content's two shapes, and n=2 was answered with one choice in silence."""
    response = v1(serve_local(), **{"model": "general", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert response.status_code == 422 and openai_error_of(response)["message"] == told
    assert fake.generations() == []


def test_v1_unknown_agent_is_404_not_found_error(serve_local):
    response = v1(serve_local(), model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    error = openai_error_of(response)
    assert response.status_code == 404 and error["type"] == "not_found_error" and "general" in error["message"]


def test_v1_upstream_errors_keep_their_status_in_openai_shape(dead_port):
    with InProcessServer(create_app(load_config({"OLLAMA_HOST": f"http://127.0.0.1:{dead_port}"}))) as server:
        response = v1(server, model="general", messages=[{"role": "user", "content": "hi"}])
    error = openai_error_of(response)
    assert response.status_code == 503 and error["type"] == "api_error" and error["code"] == "upstream_unavailable"


def test_official_openai_sdk_talks_to_piagent(serve, fake):
    openai = pytest.importorskip("openai") if os.environ.get("CI") != "true" else __import__("openai")
    client = openai.OpenAI(base_url=f"{serve().url}/v1", api_key="anything", max_retries=0)
    assert [m.id for m in client.models.list()] == ["general"]
    completion = client.chat.completions.create(model="general", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from the Pi!"
    stream = client.chat.completions.create(model="general", messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the Pi!"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    client.chat.completions.create(model="general", messages=[{"role": "user", "content": "hi"}], stop=["END"],
                                   seed=1, max_tokens=9, response_format={"type": "json_object"})
    sent = fake.generations()[-1].body
    assert (sent["options"]["stop"], sent["options"]["seed"], sent["options"]["num_predict"], sent["format"]) == (
        ["END"], 1, 9, "json")



def test_an_upstream_400_on_the_clients_own_settings_is_a_400_the_sdk_does_not_retry(serve, fake):
    openai = pytest.importorskip("openai") if os.environ.get("CI") != "true" else __import__("openai")
    server = serve()
    fake.script = Script(status=400, error_text="invalid JSON schema in format")
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="anything")  # 2 retries, by default
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="general", messages=[{"role": "user", "content": "hi"}],
                                       response_format={"type": "json_object"})
    message = info.value.message
    assert "invalid JSON schema in format" in message and "change its format and send it again" in message
    assert len(fake.generations()) == 1  # a 502 was asked again twice: the same refusal, three times
    # without a setting of the client's, the same refusal is piagent's request: a 502, as it was
    response = v1(server, model="general", messages=[{"role": "user", "content": "hi"}])
    assert response.status_code == 502 and openai_error_of(response)["code"] == "upstream_error"
    # a setting of the client's that the refusal does not name is not why: still piagent's (or its operator's)
    response = v1(server, model="general", messages=[{"role": "user", "content": "hi"}], seed=7, stop=["END"])
    assert response.status_code == 502 and openai_error_of(response)["code"] == "upstream_error"
    fake.script = Script()
    assert v1(server, model="general", messages=[{"role": "user", "content": "hi"}]).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_the_clients_own_tools_refused_by_the_model_are_a_400_that_names_them(serve, fake, stream):
    fake.no_tools = {MODEL}
    server = serve(AGENT_GENERAL_TOOLS="calc")
    response = v1(server, model="general", stream=stream, messages=[{"role": "user", "content": "hi"}],
                  tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}])
    error = openai_error_of(response)
    assert (response.status_code, error["type"], error["code"]) == (400, "invalid_request_error", "request_refused")
    assert "does not support tools" in error["message"] and "to an agent whose model calls tools" in error["message"]
    assert "AGENT_<NAME>_TOOLS" not in error["message"]  # the operator's remedy, not this client's
    assert "without tools" not in error["message"]  # then the agent's own tools would go to the same model
    assert v1(server, model="general", messages=[{"role": "user", "content": "hi"}]).status_code == 502  # its own
    fake.no_tools = set()
    assert chat(server, message="hi").status_code == 200


# ---------------------------------------------------------------------------
# Tools: calc and now, on their own
# ---------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from piagent import TOOLS, Tool, ToolCall, ToolError, Toolbox, calc, now  # noqa: E402

#: A hang guard, not a speed test: calc refuses by size before computing, and 9**9**9 would run for minutes.
HANG_S = 2.0
PY_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "floor": math.floor, "ceil": math.ceil,
                "min": min, "max": max, "pi": math.pi, "e": math.e}


@pytest.mark.parametrize("expression, result", [
    ("2 + 2", "4"), ("2 ** 10 / 4", "256.0"), ("7 // 2", "3"), ("-7 % 3", "2"), ("(1 + 2) * -3", "-9"),
    ("sqrt(2)", str(math.sqrt(2))), ("round(2.675, 2)", str(round(2.675, 2))), ("abs(-4.5)", "4.5"),
    ("max(1, 2.5, -3)", "2.5"), ("floor(-2.5) + ceil(2.1)", "0"), ("2 * pi", str(2 * math.pi)),
    ("0.1 + 0.2", str(0.1 + 0.2)), ("1_000 * 3", "3000"), ("+5", "5"),
])
def test_calc_computes_what_python_arithmetic_computes(expression, result):
    assert calc({"expression": expression}) == result


@pytest.mark.parametrize("expression, says", [
    ("9**9**9", "larger than 2**1024"), ("10**400", "larger than 2**1024"), ("1/0", "division by zero"),
    ("5 % 0", "division by zero"), ("sqrt(-1)", "cannot compute"), ("(-8) ** (1/3)", "not a real number"),
    ("2.0 ** 5000", "too large"), ("2 ^ 10", "write 2 ** 10"), ("1e999", "not a finite number"),
    ("__import__('os').system('id')", "calc understands only"), ("(1).__class__", "calc understands only"),
    ("x + 1", "calc understands only"), ("round(1.5, 10**9)", "round()'s second number"),
    ("sqrt(1, 2)", "sqrt() takes 1 numbers"), ("abs(x=1)", "abs() takes 1 numbers"),
    ("1 +", "not an arithmetic expression"), ("1" * 201, "longer than 200 characters"),
    ("-" * 150 + "1", "nests deeper than 40"), ("1 < 2", "calc understands only"), ("1j", "calc understands only"),
])
def test_calc_refuses_what_it_must_not_compute_with_a_message_for_the_model(expression, says):
    with pytest.raises(ToolError, match=re.escape(says)):
        calc({"expression": expression})


def _leaf():
    ints = st.integers(-1000, 1000).map(lambda n: (f"({n})" if n < 0 else str(n), n))
    floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).map(lambda f: (f"({f!r})", f))
    return ints | floats | st.sampled_from([("pi", math.pi), ("e", math.e)])


def _step(function, *args):
    """Python's own arithmetic for one node, or None where calc must refuse: an error, or a value out of calc's
    range. Checked at every node, as calc checks every step (1 / (1e300 * 1e10) is refused, not 0.0)."""
    if any(a is None for a in args):
        return None
    try:
        value = function(*args)
    except (ArithmeticError, ValueError):
        return None
    in_range = (type(value) is int and value.bit_length() <= piagent.CALC_MAX_INT_BITS) or (
        type(value) is float and math.isfinite(value))
    return value if in_range else None


def _grow(children):
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv, "//": operator.floordiv,
           "%": operator.mod}
    binary = st.tuples(children, st.sampled_from(sorted(ops)), children).map(
        lambda t: (f"({t[0][0]} {t[1]} {t[2][0]})", _step(ops[t[1]], t[0][1], t[2][1])))
    power = st.tuples(children, st.integers(0, 4)).map(
        lambda t: (f"({t[0][0]} ** {t[1]})", _step(operator.pow, t[0][1], t[1])))
    unary = children.map(lambda c: (f"(-{c[0]})", _step(operator.neg, c[1])))
    call = st.tuples(st.sampled_from(["abs", "round", "floor", "ceil"]), children).map(
        lambda t: (f"{t[0]}({t[1][0]})", _step(PY_FUNCTIONS[t[0]], t[1][1])))
    rounded = st.tuples(children, st.integers(-3, 5)).map(
        lambda t: (f"round({t[0][0]}, {t[1]})", _step(round, t[0][1], t[1])))
    extreme = st.tuples(st.sampled_from(["min", "max"]), st.lists(children, min_size=2, max_size=3)).map(
        lambda t: (f"{t[0]}({', '.join(c[0] for c in t[1])})", _step(PY_FUNCTIONS[t[0]], *(c[1] for c in t[1]))))
    root = children.map(lambda c: (f"sqrt(abs({c[0]}))", _step(lambda v: math.sqrt(abs(v)), c[1])))
    return binary | power | unary | call | rounded | extreme | root


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(_leaf(), _grow, max_leaves=8))
def test_calc_equals_python_arithmetic_on_generated_expressions(generated):
    text, expected = generated
    if expected is None or len(text) > piagent.CALC_MAX_CHARS:
        with pytest.raises(ToolError):
            calc({"expression": text})
    else:
        assert calc({"expression": text}) == str(expected)
        assert eval(text, {"__builtins__": {}}, PY_FUNCTIONS) == expected  # the oracle is Python's own arithmetic


@pytest.mark.parametrize("expression", ["1 / (1e300 * 1e10)", "(10 ** 300) ** 5 // 10 ** 1400"])
def test_calc_refuses_an_out_of_range_step_even_when_the_end_result_would_fit(expression):
    with pytest.raises(ToolError):
        calc({"expression": expression})


HOSTILE = st.one_of(
    st.sampled_from(["__import__('os').system('id')", "().__class__.__bases__[0].__subclasses__()",
                     "open('/etc/passwd').read()", "lambda: 1", "[1, 2]", "{1: 2}", "'a' * 10", "1 if 1 else 2",
                     "not 1", "1 and 2", "f'{1}'", "sqrt.__call__(4)", "abs(*[1])", "(yield)", "a := 1",
                     "9**9**9**9", "2**100000", "10**10**10", "(10**300)**1000", "99999999**99999999",
                     "1.5**1e300", "round(10**300, -100)", "max(" * 60 + "1" + ")" * 60]),
    st.tuples(st.integers(2, 10**9), st.integers(2, 10**9)).map(lambda t: f"{t[0]} ** {t[1]}"),
    st.integers(1, 5000).map(lambda n: "(" * n + "1" + ")" * n),
    st.integers(1, 5000).map(lambda n: "-" * n + "1"),
    st.integers(1, 3000).map(lambda n: "abs(" * n + "1" + ")" * n),
    st.integers(50, 5000).map(lambda n: "1+" * n + "1"),
    st.text(max_size=300),
    st.from_regex(r"[a-z_.()\[\]0-9*+/ -]{1,200}", fullmatch=True),
    st.from_regex(r"[0-9a-fx._j]{1,6}(and|else|for|if|in|is|not|or)[ 0-9a-z()]{0,12}", fullmatch=True),
    st.from_regex(r"[0-9+ ]{0,5}['\"][\\a-z0-9]{0,8}['\"]?", fullmatch=True),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(HOSTILE)
def test_calc_refuses_hostile_input_quickly_and_only_with_a_tool_error(text):
    started = time.monotonic()
    with warnings.catch_warnings(record=True) as printed:
        warnings.simplefilter("always")
        try:
            result = calc({"expression": text})
        except ToolError:
            result = None
    assert time.monotonic() - started < HANG_S
    # nothing for the log (Python's parser warns on "1if" or "'\\d'"); a ResourceWarning is the garbage collector's,
    # meeting an earlier test's leftovers while calc ran
    assert [w for w in printed if not issubclass(w.category, ResourceWarning)] == []
    if result is not None:  # something harmless that is valid arithmetic, such as "(1)"
        assert re.fullmatch(r"-?[0-9.e+-]+|-?inf|nan", result) or result.isdigit(), result


def test_calc_refuses_a_10_kb_expression_before_parsing_it():
    with pytest.raises(ToolError, match="longer than"):
        calc({"expression": "1+" * 5000 + "1"})


def test_now_is_iso_8601_in_the_asked_timezone_with_the_weekday():
    before = datetime.now(piagent.timezone.utc).replace(microsecond=0)
    text = now({"timezone": "Asia/Tokyo"})
    after = datetime.now(piagent.timezone.utc)
    stamp, rest = text.split(" ", 1)
    moment = datetime.fromisoformat(stamp)
    assert moment.utcoffset().total_seconds() == 9 * 3600 and before <= moment <= after
    assert rest == f"({moment.strftime('%A')}, Asia/Tokyo)"
    assert datetime.fromisoformat(now({}).split(" ")[0]).tzinfo is not None  # local time, with its offset


@pytest.mark.parametrize("zone", ["Mars/Olympus", "../../etc/passwd", "/etc/localtime", "", "Europe/"])
def test_now_refuses_a_timezone_that_is_not_an_iana_name(zone):
    with pytest.raises(ToolError, match="IANA name"):
        now({"timezone": zone})


def test_a_tool_call_over_its_time_limit_is_answered_with_an_error():
    release = threading.Event()
    toolbox = Toolbox({"slow": Tool(lambda args: str(release.wait(DEADLINE_S)), "waits", {
        "type": "object", "properties": {}}, timeout_s=0.05)})

    async def call_then_release():
        try:
            return await toolbox.run(ToolCall("call_1", "slow", "{}"), ("slow",))
        finally:  # let the tool's thread go before asyncio.run waits for it, not DEADLINE_S later
            release.set()

    event = asyncio.run(call_then_release())
    assert event.result is None and event.error == "slow took longer than 0.05 s"


@pytest.mark.parametrize("name, arguments, error", [
    ("calc", '{"expr": "1"}', "bad arguments for calc: missing 'expression'"),
    ("calc", '{"expression": 12}', "bad arguments for calc: 'expression' must be a string"),
    ("calc", '{"expression": "1", "mode": "x"}', "bad arguments for calc: unexpected 'mode'"),
    ("calc", '{"expression": ', "the arguments for calc are not valid JSON"),
    ("calc", '["1+1"]', "bad arguments for calc: arguments must be a JSON object"),
    ("now", '{"timezone": "' + "x" * 65 + '"}', "'timezone' is longer than 64 characters"),
    ("now", "{}", "there is no tool 'now'; the tools are: calc"),  # a real tool, but not this agent's
    ("shell", '{"cmd": "rm -rf /"}', "there is no tool 'shell'; the tools are: calc"),
])
def test_a_call_piagent_will_not_run_is_answered_with_an_error_for_the_model(name, arguments, error):
    allowed = ("calc", "now") if "longer" in error else ("calc",)
    event = asyncio.run(Toolbox(TOOLS).run(ToolCall("call_1", name, arguments), allowed))
    assert event.result is None and error in event.error
    assert event.as_message() == {"role": "tool", "tool_call_id": "call_1", "content": f"error: {event.error}"}


@pytest.mark.parametrize("kind, value, says", [("integer", "7", "an integer"), ("object", 1, "an object"),
                                               ("array", {}, "an array"), ("number", "1", "a number")])
def test_a_wrong_argument_type_is_named_with_its_article(kind, value, says):
    schema = {"type": "object", "properties": {"x": {"type": kind}}}
    assert piagent.argument_problem(schema, {"x": value}) == f"'x' must be {says}"


def test_agent_tools_come_from_agent_name_tools_and_default_to_none():
    config = load_config({"AGENTS": "general,maths", "AGENT_MATHS_TOOLS": "calc, now,calc"})
    assert config.agent("general").tools == () and config.agent("maths").tools == ("calc", "now")


@pytest.mark.parametrize("env, says", [
    ({"AGENT_GENERAL_TOOLS": "calc,shell"}, "AGENT_GENERAL_TOOLS='calc,shell' is not valid: no tool named 'shell'"),
    ({"AGENT_GENERAL_TOOLS": "Calc!"}, "AGENT_GENERAL_TOOLS='Calc!' is not valid"),
    ({"AGENT_GENERAL_TOOLS": "calc", "OLLAMA_API": "generate"}, "no tools with OLLAMA_API=generate"),
    ({"MAX_TOOL_ROUNDS": "11"}, "MAX_TOOL_ROUNDS='11' is not valid"),
])
def test_a_bad_tool_setting_stops_start_up_with_one_line(env, says):
    result = start_up(env={**env, "PIAGENT_ENV_FILE": os.devnull})
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_reports_an_unknown_tool_as_a_failed_setting_and_shows_each_agents_tools(fake):
    result = check({"OLLAMA_HOST": fake.url, "AGENT_GENERAL_TOOLS": "shell", "PIAGENT_ENV_FILE": os.devnull})
    assert result.returncode == 1 and "✗ settings: AGENT_GENERAL_TOOLS='shell' is not valid" in result.stdout
    result = check({"OLLAMA_HOST": fake.url, "AGENT_GENERAL_TOOLS": "calc,now", "PIAGENT_ENV_FILE": os.devnull})
    assert result.returncode == 0 and "tools calc,now" in result.stdout


def test_an_unknown_tool_is_refused_by_create_app_too():
    with pytest.raises(ConfigError, match="no tool named 'shell'; piagent has: calc, now"):
        create_app(load_config({"AGENT_GENERAL_TOOLS": "shell"}))


def test_openai_tool_call_fragments_are_put_together_by_index():
    parts = piagent.ToolCallParts("the server")
    parts.feed([{"index": 1, "id": "call_b", "type": "function", "function": {"name": "now", "arguments": ""}}])
    parts.feed([{"index": 0, "id": "call_a", "type": "function", "function": {"name": "calc", "arguments": '{"ex'}}])
    parts.feed([{"index": 0, "function": {"arguments": 'pression": "1+1"}'}}, {"index": 1, "function": {"arguments": "{}"}}])
    assert parts.calls() == [ToolCall("call_a", "calc", '{"expression": "1+1"}'), ToolCall("call_b", "now", "{}")]
    whole = piagent.ToolCallParts("the server")  # a server that leaves out the index and sends each call whole
    whole.feed([{"id": "c1", "function": {"name": "calc", "arguments": '{"expression":"2"}'}}])
    whole.feed([{"id": "c2", "function": {"name": "now", "arguments": "{}"}}])
    assert [(c.id, c.name) for c in whole.calls()] == [("c1", "calc"), ("c2", "now")]


def test_tool_traffic_is_sent_to_ollama_with_object_arguments_and_tool_names():
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "calc", "arguments": '{"expression":"1"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "1"}]
    assert piagent.ollama_messages(messages) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "function": {"name": "calc", "arguments": {"expression": "1"}}}]},
        {"role": "tool", "content": "1", "tool_call_id": "call_1", "tool_name": "calc"}]


# ---------------------------------------------------------------------------
# Tools: the loop, through real HTTP, with the fake calling tools as Ollama and OpenAI servers do
# ---------------------------------------------------------------------------


@pytest.fixture(params=["ollama", "openai"])
def serve_tools(request, serve, serve_openai, serve_local, serve_openai_local):
    """serve_tools(local=False, **env) -> piagent with AGENT_GENERAL_TOOLS=calc (unless given), in front of either
    provider; in process with local=True (for JSON answers, not streams)."""
    def start(local=False, **env):
        env = {"AGENT_GENERAL_TOOLS": "calc", **env}
        if request.param == "ollama":
            return (serve_local if local else serve)(**env)
        return (serve_openai_local if local else serve_openai)(**env)

    start.provider = request.param
    return start


def tool_reply(server, mode: str, **body):
    """(reply text, tool events) from /chat as JSON, SSE or plain text."""
    body = {"message": "compute", **body}
    if mode == "json":
        response = chat(server, **body)
        assert response.status_code == 200, response.text
        return response.json()["reply"], response.json().get("tools", [])
    with httpx.stream("POST", f"{server.url}/chat", json={**body, "stream": True}, timeout=DEADLINE_S,
                      headers=SSE if mode == "sse" else {}) as response:
        assert response.status_code == 200
        if mode == "plain":
            return response.read().decode(), None
        events = sse_events(response)
    assert events[-1][0] == "done", events
    text = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    tools = [json.loads(d) for e, d in events if e == "tool"]
    assert [e for e, _ in events if e != "tool"][-1] == "done"
    if tools:  # every tool event comes before the answer's first token
        assert max(i for i, (e, _) in enumerate(events) if e == "tool") < min(
            i for i, (e, _) in enumerate(events) if e in ("token", "done"))
    return text, tools


def tool_messages(fake, request_number: int) -> list[dict]:
    """The tool and tool-call messages the fake received in a generation request, after the user's message."""
    messages = fake.generations()[request_number].body["messages"]
    return messages[[m["role"] for m in messages].index("user", 1) + 1:]


@pytest.mark.parametrize("mode", ["json", "sse", "plain"])
def test_a_tool_call_is_run_and_its_result_sent_back_for_the_answer(serve_tools, fake, mode):
    fake.script = Script(tool_rounds=[[("calc", {"expression": "6 * 7"})]], echo_tools=True)
    text, tools = tool_reply(serve_tools(local=mode == "json"), mode)
    assert text == "results: 42"
    if mode != "plain":
        assert tools == [{"name": "calc", "arguments": {"expression": "6 * 7"}, "result": "42"}]
    first, second = fake.generations()
    assert [t["function"]["name"] for t in first.body["tools"]] == ["calc"]  # only the allowlist is offered
    assert first.body["tools"][0]["function"]["parameters"]["required"] == ["expression"]
    call, result = tool_messages(fake, 1)
    assert call["role"] == "assistant" and call["tool_calls"][0]["function"]["name"] == "calc"
    if serve_tools.provider == "ollama":  # Ollama's dialect: arguments as an object, results named by tool
        assert call["tool_calls"][0]["function"]["arguments"] == {"expression": "6 * 7"}
        assert result == {"role": "tool", "content": "42", "tool_call_id": "call_00000000", "tool_name": "calc"}
    else:  # OpenAI's: arguments as JSON text, results matched by id
        assert json.loads(call["tool_calls"][0]["function"]["arguments"]) == {"expression": "6 * 7"}
        assert result == {"role": "tool", "tool_call_id": call["tool_calls"][0]["id"], "content": "42"}


@pytest.mark.parametrize("together", [True, False])
def test_two_calls_in_one_round_are_both_run_in_order(serve_tools, fake, together):
    fake.script = Script(tool_rounds=[[("calc", {"expression": "1 + 1"}), ("calc", {"expression": "2 * 3"})]],
                         echo_tools=True, calls_together=together)
    text, tools = tool_reply(serve_tools(), "sse")
    assert text == "results: 2 | 6" and [t["result"] for t in tools] == ["2", "6"]
    call, *results = tool_messages(fake, 1)
    assert len(call["tool_calls"]) == 2 and [r["content"] for r in results] == ["2", "6"]
    assert len(fake.generations()) == 2


def test_chained_rounds_carry_every_earlier_call_and_result(serve_tools, fake):
    fake.script = Script(tool_rounds=[[("calc", {"expression": "2 + 3"})], [("calc", {"expression": "5 * 10"})]],
                         echo_tools=True)
    text, tools = tool_reply(serve_tools(local=True), "json")
    assert text == "results: 5 | 50" and [t["result"] for t in tools] == ["5", "50"]
    assert len(fake.generations()) == 3
    roles = [m["role"] for m in tool_messages(fake, 2)]
    assert roles == ["assistant", "tool", "assistant", "tool"]


@pytest.mark.parametrize("call, error", [
    (("shell", {"cmd": "rm -rf /"}), "there is no tool 'shell'; the tools are: calc"),
    (("now", {}), "there is no tool 'now'; the tools are: calc"),  # exists, but not on this agent's list
    (("calc", {"expr": "1 + 1"}), "bad arguments for calc: missing 'expression'"),
    (("calc", {"expression": "1 / 0"}), "division by zero"),
])
def test_a_bad_call_is_answered_to_the_model_as_an_error_and_the_reply_goes_on(serve_tools, fake, call, error):
    fake.script = Script(tool_rounds=[[call]], echo_tools=True)
    text, tools = tool_reply(serve_tools(), "sse")
    assert text == f"results: error: {error}"
    assert tools[0]["name"] == call[0] and tools[0]["error"] == error and "result" not in tools[0]


def test_openai_arguments_that_are_not_json_are_answered_as_an_error(serve_openai, fake):
    # only OpenAI-style servers send arguments as text; Ollama's are always a JSON object
    fake.script = Script(tool_rounds=[[("calc", '{"expression": "1 +')]], echo_tools=True)
    text, tools = tool_reply(serve_openai(AGENT_GENERAL_TOOLS="calc"), "sse")
    assert text == "results: error: the arguments for calc are not valid JSON"
    assert tools == [{"name": "calc", "arguments": '{"expression": "1 +', "error": tools[0]["error"]}]


@pytest.mark.parametrize("rounds", [3, 1, 0])
def test_after_max_tool_rounds_the_model_must_answer_without_tools(serve_tools, fake, rounds):
    fake.script = Script(tool_rounds=[[("calc", {"expression": f"{n} + 1"})] for n in range(6)],
                         tokens=["Done", "."])
    text, tools = tool_reply(serve_tools(MAX_TOOL_ROUNDS=str(rounds)), "sse")
    offered = ["tools" in g.body for g in fake.generations()]
    assert offered == [True] * rounds + [False] and text == "Done." and len(tools) == rounds


def test_a_flood_of_tool_calls_runs_eight_refuses_one_and_drops_the_rest(serve_tools, fake):
    """A broken upstream sent 5,000 calls in one line: each became an event for the client and a message in the next
    round's prompt (15,000 events, 3.3 MB bodies). Past MAX_TOOL_CALLS_PER_ROUND, one is refused; the rest are
    dropped."""
    limit = piagent.MAX_TOOL_CALLS_PER_ROUND
    fake.script = Script(tool_rounds=[[("calc", {"expression": f"{n} + 1"}) for n in range(500)]], tokens=["Done"])
    text, tools = tool_reply(serve_tools(local=True), "json")
    assert text == "Done" and len(tools) == limit + 1, len(tools)
    assert [t["result"] for t in tools[:limit]] == [str(n + 1) for n in range(limit)]
    assert tools[limit]["error"].startswith(f"more than {limit} calls at once"), tools[limit]
    second = fake.generations()[-1].body["messages"]
    assert [m["role"] for m in second[-(limit + 2):]] == ["assistant"] + ["tool"] * (limit + 1), second
    assert len(second[-(limit + 2)]["tool_calls"]) == limit + 1


def test_sse_pings_while_the_model_reads_a_tool_result(serve, fake):
    # on a Pi the next round can take many seconds before its first token: the stream must not look dead
    fake.script = Script(tool_rounds=[[("calc", {"expression": "1 + 1"})]], tokens=["Two", "."], hold_after=0)
    server = serve(AGENT_GENERAL_TOOLS="calc", SSE_PING_S="0.02")
    seen = []
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "1 + 1?", "stream": True}, headers=SSE,
                      timeout=DEADLINE_S) as response:
        for line in response.iter_lines():
            seen.append(line)
            if line == ": ping" and "event: tool" in seen:
                fake.script.release.set()  # the answer may come now
    after_tool = seen[seen.index("event: tool"):]
    assert ": ping" in after_tool and after_tool.index(": ping") < after_tool.index("event: token")
    assert seen[-3:-1] == ["event: done", seen[-2]] and '"tokens":2' in seen[-2]


def test_memory_keeps_the_user_message_and_final_answer_not_the_tool_traffic(serve_tools, fake):
    server = serve_tools(local=True)
    fake.script = Script(tool_rounds=[[("calc", {"expression": "6 * 7"})]], echo_tools=True)
    tool_reply(server, "json", conversation_id="t1")
    fake.script = Script()
    tool_reply(server, "json", conversation_id="t1", message="thanks")
    sent = [(m["role"], m.get("content")) for m in fake.generations()[-1].body["messages"]]
    assert sent == [("system", piagent.DEFAULT_SYSTEM_PROMPT), ("user", "compute"),
                    ("assistant", "results: 42"), ("user", "thanks")]
    stored = server.get("/conversations/t1").json()["turns"]
    assert [(t["user"], t["assistant"]) for t in stored] == [("compute", "results: 42"), ("thanks", "Hello from the Pi!")]


def test_now_is_wired_like_calc(serve_local, fake):
    fake.script = Script(tool_rounds=[[("now", {"timezone": "UTC"})]], echo_tools=True)
    text, tools = tool_reply(serve_local(AGENT_GENERAL_TOOLS="now"), "json")
    stamp = datetime.fromisoformat(tools[0]["result"].split(" ")[0])
    assert stamp.utcoffset().total_seconds() == 0 and text == f"results: {tools[0]['result']}"


def test_a_tool_added_to_tools_is_offered_and_run_like_the_built_in_ones(serve_local, fake):
    # what the README's "Adding a tool" says: one function, one entry in TOOLS, then AGENT_<NAME>_TOOLS lists it
    def reverse(arguments):
        return arguments["word"][::-1]

    tools = {**TOOLS, "reverse": Tool(reverse, "Reverse a word.", {
        "type": "object", "required": ["word"], "properties": {"word": {"type": "string"}}})}
    fake.script = Script(tool_rounds=[[("reverse", {"word": "piagent"})]], echo_tools=True)
    text, _ = tool_reply(serve_local(tools=tools, AGENT_GENERAL_TOOLS="reverse,calc"), "json")
    assert text == "results: tnegaip"
    assert [t["function"]["name"] for t in fake.generations()[0].body["tools"]] == ["reverse", "calc"]


def test_an_agent_without_tools_sends_no_tools(serve_local, fake):
    chat(serve_local(AGENTS="general,maths", AGENT_MATHS_TOOLS="calc"), message="hi")
    assert "tools" not in fake.generations()[0].body


def test_the_openai_front_door_runs_the_agents_tools_and_shows_only_the_answer(serve_tools, fake):
    fake.script = Script(tool_rounds=[[("calc", {"expression": "6 * 7"})]], echo_tools=True)
    server = serve_tools()
    body = v1(server, model="general", messages=[{"role": "user", "content": "6 * 7?"}]).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "results: 42"}
    assert body["choices"][0]["finish_reason"] == "stop"
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=DEADLINE_S, json={
            "model": "general", "messages": [{"role": "user", "content": "6 * 7?"}], "stream": True}) as response:
        chunks = [json.loads(d) for _, d in sse_events(response) if d != "[DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "results: 42"
    assert all("tool_calls" not in c["choices"][0]["delta"] for c in chunks)


def test_a_model_without_tool_calling_is_a_502_that_says_what_to_do(fake):
    fake.no_tools = {MODEL}
    with InProcessServer(create_app(load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false",
                                            "AGENT_GENERAL_TOOLS": "calc"}))) as server:
        response = chat(server, message="hi")
    assert response.status_code == 502 and "does not support tools" in error_of(response)["message"]
    assert "AGENT_<NAME>_TOOLS" in error_of(response)["message"]


def test_tool_calls_are_counted_in_the_request_log_and_metrics(serve_local, fake, caplog):
    caplog.set_level(logging.INFO, logger="piagent")
    fake.script = Script(tool_rounds=[[("calc", {"expression": "1"}), ("calc", {"expression": "2"})]])
    server = serve_local(AGENT_GENERAL_TOOLS="calc")
    chat(server, message="hi")
    assert piagent_records(caplog)[-1]["tool_calls"] == 2
    assert sample(parse_metrics(server.get("/metrics").text), "piagent_tool_calls_total", "piagent_tool_calls") == 2


def test_a_client_leaving_while_the_model_picks_its_tools_stops_it_and_runs_nothing(serve, fake):
    fake.script = Script(tool_rounds=[[("calc", {"expression": "1"})]], first_byte_delay_s=DEADLINE_S)
    sock = raw_post(serve(AGENT_GENERAL_TOOLS="calc").port, "/chat", {"message": "hi", "stream": True})
    wait_until(lambda: len(fake.generations()) == 1, what="the first request upstream")
    sock.close()
    wait_until(lambda: len(fake.hangups) == 1, what="the upstream to see the hang-up")
    assert len(fake.generations()) == 1


def test_a_client_leaving_during_the_answer_after_a_tool_round_stops_the_upstream(serve, fake):
    fake.script = Script(tool_rounds=[[("calc", {"expression": "1"})]], tokens=["zq"] * 50, hold_after=2)
    server = serve(AGENT_GENERAL_TOOLS="calc")
    sock = raw_post(server.port, "/chat", {"message": "hi", "stream": True})
    read_until(sock, b"zq")  # the answer has begun: the tool round is over
    sock.close()
    wait_until(lambda: len(fake.hangups) == 1, what="the upstream to see the hang-up")
    assert len(fake.generations()) == 2


# ---------------------------------------------------------------------------
# Tools: a client's own tools through /v1 (piagent passes them on and returns the calls)
# ---------------------------------------------------------------------------

CLIENT_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("stream", [False, True])
def test_client_tools_are_passed_on_and_the_models_calls_returned_unchanged(serve_tools, fake, stream):
    fake.script = Script(tool_rounds=[[("get_weather", {"city": "Tokyo"}), ("get_weather", {"city": "Oslo"})]])
    server = serve_tools(local=not stream)  # the agent has calc, but the client's tools replace it for this request
    body = {"model": "general", "messages": [{"role": "user", "content": "weather?"}], "tools": CLIENT_TOOLS}
    if stream:
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                          timeout=DEADLINE_S) as response:
            events = [d for _, d in sse_events(response)]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(d) for d in events[:-1]]
        parts = piagent.ToolCallParts("the server")
        for c in chunks:
            parts.feed(c["choices"][0]["delta"].get("tool_calls"))
        calls = [c.as_message_part() for c in parts.calls()]
        finish = chunks[-1]["choices"][0]["finish_reason"]
    else:
        message = v1(server, **body).json()["choices"][0]
        calls, finish = message["message"]["tool_calls"], message["finish_reason"]
        assert message["message"]["content"] is None
    assert finish == "tool_calls"
    assert [(c["id"], c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("call_00000000", "function", "get_weather", {"city": "Tokyo"}),
        ("call_00000001", "function", "get_weather", {"city": "Oslo"})]
    (generation,) = fake.generations()  # piagent ran nothing itself
    assert generation.body["tools"] == CLIENT_TOOLS


def test_a_client_tool_choice_goes_to_openai_servers_and_not_to_ollama(serve_tools, fake):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    response = v1(serve_tools(local=True), model="general", messages=[{"role": "user", "content": "hi"}],
                  tools=CLIENT_TOOLS, tool_choice=choice)
    assert response.status_code == 200
    sent = fake.generations()[0].body
    assert sent.get("tool_choice") == (choice if serve_tools.provider == "openai" else None)


def test_a_client_sends_its_tool_results_back_and_gets_the_answer(serve_tools, fake):
    fake.script = Script(echo_tools=True)
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_9", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city":"Tokyo"}'}}]},
                {"role": "tool", "tool_call_id": "call_9", "content": "sunny, 21 C"}]
    body = v1(serve_tools(local=True), model="general", messages=messages, tools=CLIENT_TOOLS).json()
    assert body["choices"][0]["message"]["content"] == "results: sunny, 21 C"
    call, result = tool_messages(fake, 0)
    if serve_tools.provider == "ollama":
        assert call["tool_calls"] == [{"id": "call_9", "function": {"name": "get_weather", "arguments": {"city": "Tokyo"}}}]
        assert result == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_9", "tool_name": "get_weather"}
    else:
        assert call == {**messages[1], "content": ""} and result == messages[2]  # "" for null: llama.cpp needs it


def test_the_official_openai_sdk_runs_its_own_tools_through_piagent(serve, fake):
    openai = pytest.importorskip("openai") if os.environ.get("CI") != "true" else __import__("openai")
    client = openai.OpenAI(base_url=f"{serve().url}/v1", api_key="anything", max_retries=0)
    fake.script = Script(tool_rounds=[[("get_weather", {"city": "Tokyo"})]], echo_tools=True)
    messages = [{"role": "user", "content": "weather in Tokyo?"}]
    stream = client.chat.completions.create(model="general", messages=messages, tools=CLIENT_TOOLS, stream=True)
    calls = {}
    for chunk in stream:
        for part in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            entry = calls.setdefault(part.index, {"id": part.id, "name": part.function.name, "arguments": ""})
            entry["arguments"] += part.function.arguments or ""
    assert list(calls.values()) == [{"id": "call_00000000", "name": "get_weather", "arguments": '{"city": "Tokyo"}'}]
    messages += [{"role": "assistant", "tool_calls": [{"id": "call_00000000", "type": "function", "function": {
        "name": "get_weather", "arguments": calls[0]["arguments"]}}]},
                 {"role": "tool", "tool_call_id": "call_00000000", "content": "sunny"}]
    answer = client.chat.completions.create(model="general", messages=messages, tools=CLIENT_TOOLS)
    assert answer.choices[0].message.content == "results: sunny"


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message must be"),
    ([{"role": "tool", "tool_call_id": "c", "content": "1"}], "non-empty user message"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "c", "content": "1"},
      {"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "last message must be"),
])
def test_v1_messages_must_end_with_the_user_or_tool_results(serve_local, messages, says):
    response = v1(serve_local(), model="general", messages=messages)
    assert response.status_code == 422 and says in openai_error_of(response)["message"]


def test_v1_client_tools_with_a_conversation_header_are_refused(serve_local):
    response = v1(serve_local(), {"X-Conversation-Id": "c1"}, model="general", tools=CLIENT_TOOLS,
                  messages=[{"role": "user", "content": "hi"}])
    assert response.status_code == 422 and "whole history" in openai_error_of(response)["message"]


# ---------------------------------------------------------------------------
# Guards: API keys
# ---------------------------------------------------------------------------

KEY, OTHER_KEY = "kitchen-pi-key-1", "garden-pi-key-22"


@pytest.mark.parametrize("headers", [{"Authorization": f"Bearer {KEY}"}, {"Authorization": f"bearer {KEY}"},
                                     {"Authorization": f"Bearer    {KEY}"}, {"X-API-Key": KEY},
                                     {"Authorization": f"Bearer {OTHER_KEY}"}])
def test_a_configured_key_in_any_accepted_form_is_let_in(serve_local, headers):
    server = serve_local(API_KEYS=f"{KEY},{OTHER_KEY}")
    assert server.post("/chat", json={"message": "hi"}, headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, {"X-API-Key": KEY[:-1]},
                                     {"Authorization": "Bearer"}])
def test_a_missing_or_wrong_key_is_401_with_www_authenticate(serve_local, fake, headers):
    server = serve_local(API_KEYS=KEY)
    for path, method in [("/chat", "POST"), ("/agents", "GET"), ("/v1/models", "GET")]:
        response = server.request(method, path, json={"message": "hi"}, headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert error["code"] == "unauthorized"
        assert error["type"] == "authentication_error" if path.startswith("/v1") else "type" not in error
    assert fake.generations() == []


def test_health_needs_no_key(serve_local):
    assert serve_local(API_KEYS=KEY).get("/health").status_code == 200


def test_keys_are_compared_in_constant_time_against_every_key(serve_local, monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    server = serve_local(API_KEYS=f"{KEY},{OTHER_KEY},third-key-333")
    assert server.get("/agents", headers={"X-API-Key": KEY}).status_code == 200
    # every key is compared (no early exit on the first match), and only through hmac.compare_digest
    assert sorted(b for _, b in compared) == sorted(k.encode() for k in (KEY, OTHER_KEY, "third-key-333"))
    assert all(a == KEY.encode() for a, _ in compared)


def test_keys_never_appear_in_logs_only_a_short_id(serve_local, fake, caplog):
    caplog.set_level("DEBUG")
    server = serve_local(API_KEYS=KEY)
    server.post("/chat", json={"message": "hi"}, headers={"X-API-Key": KEY})
    server.post("/chat", json={"message": "hi"}, headers={"X-API-Key": "wrong-key-but-long"})
    wait_until(lambda: len(piagent_records(caplog)) == 2, what="two request records")
    assert KEY not in caplog.text and "wrong-key-but-long" not in caplog.text
    assert piagent_records(caplog)[0]["key"] == piagent.key_id(KEY) and len(piagent.key_id(KEY)) == 8


def test_non_loopback_host_without_keys_warns_loudly():
    assert piagent.startup_warnings(load_config({"HOST": "0.0.0.0"}))[0].startswith("!!!")
    assert piagent.startup_warnings(load_config({"HOST": "0.0.0.0", "API_KEYS": KEY})) == []
    assert piagent.startup_warnings(load_config({})) == []
    assert piagent.startup_warnings(load_config({"HOST": "127.0.0.2"})) == []  # loopback too: this machine only


def test_a_keyless_server_on_any_loopback_address_refuses_a_foreign_host_header(serve_local):
    server = serve_local(HOST="127.0.0.2")  # in process: nothing binds it
    refused = server.get("/agents", headers={"Host": "evil.example"})
    assert refused.status_code == 400 and error_of(refused)["code"] == "host_not_allowed"
    assert server.get("/agents", headers={"Host": "127.0.0.2:8000"}).status_code == 200


@pytest.mark.parametrize("value", ["short", "has space-in-it", "*", "a,b"])
def test_weak_or_malformed_api_keys_are_a_config_error(value):
    with pytest.raises(ConfigError, match="API_KEYS"):
        load_config({"API_KEYS": value})


# ---------------------------------------------------------------------------
# Guards: rate limits, sizes, CORS
# ---------------------------------------------------------------------------


def test_rate_limit_refuses_the_excess_and_refills_with_time(serve_local):
    clock = Clock()
    server = serve_local(clock=clock, RATE_LIMIT_PER_MIN=3)
    remaining = [chat(server, message="hi").headers["x-ratelimit-remaining"] for _ in range(3)]
    assert remaining == ["2", "1", "0"]
    refused = chat(server, message="hi")
    assert refused.status_code == 429 and error_of(refused)["code"] == "rate_limited"
    assert refused.headers["retry-after"] == "20" and refused.headers["x-ratelimit-remaining"] == "0"
    assert server.delete("/conversations/some-chat").status_code == 429  # what changes things counts too
    clock.now += 19.9
    assert chat(server, message="hi").status_code == 429
    clock.now += 20.1  # one token every 20 s at 3 a minute
    assert chat(server, message="hi").status_code == 200


def test_rate_limit_is_per_key(serve_local):
    server = serve_local(API_KEYS=f"{KEY},{OTHER_KEY}", RATE_LIMIT_PER_MIN=1)
    ask = lambda key: server.post("/chat", json={"message": "hi"}, headers={"X-API-Key": key})  # noqa: E731
    assert [ask(KEY).status_code, ask(KEY).status_code, ask(OTHER_KEY).status_code] == [200, 429, 200]


@pytest.mark.parametrize("trust,separate", [("true", True), ("false", False)])
def test_forwarded_for_names_the_client_only_behind_a_trusted_proxy(serve_local, trust, separate):
    server = serve_local(RATE_LIMIT_PER_MIN=1, TRUST_PROXY=trust)
    first = server.post("/chat", json={"message": "hi"}, headers={"X-Forwarded-For": "10.0.0.1"})
    second = server.post("/chat", json={"message": "hi"}, headers={"X-Forwarded-For": "10.0.0.1, 10.0.0.2"})
    assert first.status_code == 200 and (second.status_code == 200) == separate


def test_rate_limit_off_and_reads_never_limited(serve_local):
    """The limit is on what runs the model or changes things; reading is free. The page polls /ready every 3 s while
    the model warms, and Ollama apps list models often: counted, they spent the chats of whoever had them open."""
    server = serve_local(RATE_LIMIT_PER_MIN=0)
    assert all(chat(server, message="hi").status_code == 200 for _ in range(40))
    limited = serve_local(RATE_LIMIT_PER_MIN=1)
    for path in ("/health", "/agents", "/ready", "/v1/models", "/api/tags", "/api/version", "/conversations"):
        assert all(limited.get(path).status_code == 200 for _ in range(5)), path
        assert "x-ratelimit-remaining" not in limited.get(path).headers
    assert all(limited.request("HEAD", "/agents").status_code == 200 for _ in range(3))
    assert [chat(limited, message="hi").status_code for _ in range(2)] == [200, 429]
    assert limited.get("/ready").status_code == 200  # and a limited key still reads


def test_rate_buckets_stay_bounded_and_idle_ones_are_forgotten():
    clock = Clock()
    buckets = piagent.TokenBuckets(rate_per_min=30, clock=clock, max_buckets=100)
    for i in range(5000):
        buckets.take(f"ip:{i}")
    assert len(buckets) == 100
    clock.now += 61  # full again after 60 s: the same as no bucket
    buckets.take("ip:new")
    assert len(buckets) == 1


def test_body_over_the_limit_is_413_before_parsing(serve_local, fake):
    server = serve_local(MAX_BODY_BYTES=2048)
    response = server.post("/chat", content=b"{" + b" " * 4096, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "body_too_large"
    assert "2048" in error_of(response)["message"]


def test_a_huge_chunked_body_is_refused_without_reading_it_all(serve):
    import resource

    server = serve()
    sent = []

    def body():  # 200 MB in 64 KB chunks, with no Content-Length: piagent must stop reading early
        for _ in range(3200):
            sent.append(1)
            yield b" " * 65536

    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        response = httpx.post(f"{server.url}/chat", content=body(), headers={"Content-Type": "application/json"})
        assert response.status_code == 413
    except httpx.WriteError:
        pass  # piagent answered 413 and closed while the client was still sending: also a refusal
    assert len(sent) < 3200  # it did not take all 200 MB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb < 50_000  # memory stayed flat (KB)


@pytest.mark.parametrize("path,body", [("/chat", {"message": "x" * 101}),
                                       ("/v1/chat/completions", {"model": "general", "messages": [
                                           {"role": "user", "content": "x" * 101}]})])
def test_message_over_max_chars_is_413_naming_the_limit(serve_local, fake, path, body):
    response = serve_local(MAX_MESSAGE_CHARS=100).post(path, json=body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "message_too_long"
    assert "100" in response.json()["error"]["message"] and fake.generations() == []


ORIGIN = "http://pi.local:8000"


def test_cors_preflight_from_an_allowed_origin_needs_no_key(serve_local):
    server = serve_local(CORS_ORIGINS=ORIGIN, API_KEYS=KEY)
    response = server.options("/chat", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in response.headers


def test_cors_preflight_from_another_origin_is_denied(serve_local):
    response = serve_local(CORS_ORIGINS=ORIGIN).options("/chat", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert response.status_code == 400 and "access-control-allow-origin" not in response.headers


def test_cors_response_exposes_the_conversation_id(serve_local):
    response = chat_with_headers(serve_local(CORS_ORIGINS=ORIGIN), {"Origin": ORIGIN}, message="hi")
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "x-conversation-id" in response.headers["access-control-expose-headers"].lower()


def test_no_cors_origins_means_no_cors_headers(serve_local):
    response = chat_with_headers(serve_local(), {"Origin": ORIGIN}, message="hi")
    assert not any(h.startswith("access-control-") for h in response.headers)


@pytest.mark.parametrize("value", ["*", "http://a.b/path", "pi.local"])
def test_cors_origins_must_be_explicit_origins(value):
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        load_config({"CORS_ORIGINS": value})


def chat_with_headers(server, headers, **body) -> httpx.Response:
    return server.post("/chat", json=body, headers=headers)


# ---------------------------------------------------------------------------
# Guards: the bounded queue in front of the model
# ---------------------------------------------------------------------------


def in_background(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def test_queue_serves_waiters_in_order_and_refuses_beyond_max_queue(serve, fake):
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1, MAX_QUEUE=2)
    gate = server.app.state.runtime.gate
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True}) as first:
        pieces = first.iter_text()
        assert next(pieces) == "A1"
        b, b_result = in_background(chat, server, message="b")
        wait_until(lambda: gate.queued == 1, what="b to queue")
        c, c_result = in_background(chat, server, message="c")
        wait_until(lambda: gate.queued == 2, what="c to queue")
        refused = chat(server, message="d")
        assert refused.status_code == 503 and error_of(refused)["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) > 0
        assert httpx.get(f"{server.url}/agents").status_code == 200  # never queued
        assert httpx.get(f"{server.url}/v1/models").status_code == 200
        assert len(fake.generations()) == 1
        fake.script.release.set()
        assert "".join(pieces) == "A2"
    b.join(DEADLINE_S)
    c.join(DEADLINE_S)
    assert b_result["value"].status_code == c_result["value"].status_code == 200
    assert [g.body["messages"][-1]["content"] for g in fake.generations()] == ["a", "b", "c"]  # FIFO


def test_the_openai_front_door_waits_in_the_same_queue(serve, fake):
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1, MAX_QUEUE=1)
    gate = server.app.state.runtime.gate
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True}) as first:
        pieces = first.iter_text()
        assert next(pieces) == "A1"
        waiter, result = in_background(v1, server, model="general", messages=[{"role": "user", "content": "b"}])
        wait_until(lambda: gate.queued == 1, what="the /v1 request to queue")
        refused = v1(server, model="general", messages=[{"role": "user", "content": "c"}])
        assert refused.status_code == 503 and openai_error_of(refused)["code"] == "queue_full"
        fake.script.release.set()
        "".join(pieces)
    waiter.join(DEADLINE_S)
    assert result["value"].status_code == 200


def test_a_queued_client_that_leaves_is_removed_and_never_reaches_the_model(serve, fake):
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1)
    gate = server.app.state.runtime.gate
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True}) as first:
        pieces = first.iter_text()
        assert next(pieces) == "A1"
        sock = raw_post(server.port, "/chat", {"message": "leaver"})
        wait_until(lambda: gate.queued == 1, what="the leaver to queue")
        sock.close()
        wait_until(lambda: gate.queued == 0, timeout=1.0, what="the leaver to leave the queue")
        fake.script.release.set()
        "".join(pieces)
    fake.script = Script()
    assert chat(server, message="next").status_code == 200
    assert [g.body["messages"][-1]["content"] for g in fake.generations()] == ["a", "next"]
    assert gate.active == 0 and gate.queued == 0


def test_sse_stream_waiting_in_the_queue_reports_its_position(serve, fake):
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1)
    gate = server.app.state.runtime.gate
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True}) as first:
        pieces = first.iter_text()
        assert next(pieces) == "A1"
        c, c_result = None, {}
        with httpx.stream("POST", f"{server.url}/chat", json={"message": "b", "stream": True},
                          headers=SSE) as second:
            lines = second.iter_lines()
            assert (next(lines), next(lines)) == ("event: queued", 'data: {"position":1}')
            c, c_result = in_background(chat, server, message="c")  # queues behind b
            wait_until(lambda: gate.queued == 2, what="c to queue")
            fake.script = Script(tokens=["B"], release=fake.script.release)
            fake.script.release.set()
            assert "".join(pieces) == "A2"
            events = decode_sse(lines)
        assert [e for e, _ in events] == ["token", "done"] and json.loads(events[0][1]) == {"text": "B"}
        assert json.loads(events[1][1])["tokens"] == 1
    c.join(DEADLINE_S)
    assert c_result["value"].status_code == 200


# ---------------------------------------------------------------------------
# Guards: graceful shutdown (a real process and a real SIGTERM)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_or_a_hangup_lets_an_in_flight_stream_finish_and_refuses_new_work(fake, sig):
    """SIGTERM is systemd's stop; SIGHUP is the terminal piagent runs in closing (an SSH session dropped): both
    drain. A hangup's default would end piagent mid-reply, with no clean stop of its MCP servers."""
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    with piagent_process({"OLLAMA_HOST": fake.url, "SHUTDOWN_GRACE_S": "20"}, capture=True) as (url, proc):
        assert caught_signals(proc.pid) & {signal.SIGTERM, signal.SIGINT, signal.SIGHUP} == {
            signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        client = httpx.Client(timeout=DEADLINE_S)
        with client.stream("POST", f"{url}/chat", json={"message": "a", "stream": True}) as response:
            pieces = response.iter_text()
            assert next(pieces) == "A1"
            proc.send_signal(sig)
            try:  # the listener closes: a new request is refused, or answered 503 shutting_down
                late = httpx.post(f"{url}/chat", json={"message": "late"}, timeout=DEADLINE_S)
                assert late.status_code == 503 and error_of(late)["code"] == "shutting_down"
            except httpx.ConnectError:
                pass
            fake.script.release.set()
            assert "".join(pieces) == "A2"  # finished cleanly: no RemoteProtocolError
        assert_stopped_gracefully(proc)
    assert len(fake.generations()) == 1


def assert_stopped_gracefully(proc: subprocess.Popen) -> None:
    # uvicorn re-raises the SIGTERM it caught once it has shut down; systemd counts that as a clean stop
    assert proc.wait(DEADLINE_S) in (0, -signal.SIGTERM)
    log_text = proc.stdout.read()
    assert "Application shutdown complete" in log_text and "Traceback" not in log_text, log_text


def caught_signals(pid: int, field: str = "SigCgt") -> set[int]:
    """The signals a process has a handler for (SigCgt) or ignores (SigIgn), from /proc/<pid>/status."""
    mask = next(int(line.split()[1], 16) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith(field + ":"))
    return {n for n in range(1, 65) if mask >> (n - 1) & 1}


def test_under_nohup_a_hangup_stays_ignored(fake):
    """nohup asks for a hangup to be ignored: piagent leaves it so, and serves on after one."""
    with piagent_process({"OLLAMA_HOST": fake.url}, capture=True, under=("nohup",)) as (url, proc):
        assert signal.SIGHUP in caught_signals(proc.pid, "SigIgn")
        assert signal.SIGHUP not in caught_signals(proc.pid) and signal.SIGTERM in caught_signals(proc.pid)
        proc.send_signal(signal.SIGHUP)  # an ignored signal is dropped as it is sent: nothing to wait for
        assert httpx.post(f"{url}/chat", json={"message": "still there?"}, timeout=DEADLINE_S).status_code == 200
        assert proc.poll() is None


def test_ctrl_c_drains_a_second_cuts_the_replies_at_once_and_neither_prints_a_traceback(fake):
    """In a terminal: the first Ctrl-C drains as SIGTERM does (here a 60 s grace), a second ends the grace at once
    the clean way (the stream cut, its upstream let go, the lifespan's clean-up run), and piagent exits 0. uvicorn's
    own second Ctrl-C skipped the clean-up and printed tracebacks, and even one Ctrl-C ended in KeyboardInterrupt's."""
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    with piagent_process({"OLLAMA_HOST": fake.url, "SHUTDOWN_GRACE_S": "60", "LOG_FORMAT": "text"},
                         capture=True) as (url, proc):
        with httpx.stream("POST", f"{url}/chat", json={"message": "a", "stream": True}, timeout=DEADLINE_S) as r:
            pieces = r.iter_text()
            assert next(pieces) == "A1"
            proc.send_signal(signal.SIGINT)
            try:  # the first one is heard: no new work
                late = httpx.post(f"{url}/chat", json={"message": "late"}, timeout=DEADLINE_S)
                assert late.status_code == 503 and error_of(late)["code"] == "shutting_down"
            except httpx.ConnectError:
                pass
            assert proc.poll() is None  # the stream has its grace
            proc.send_signal(signal.SIGINT)
            with pytest.raises(httpx.RemoteProtocolError):  # cut, never a clean end
                "".join(pieces)
        assert proc.wait(DEADLINE_S) == 0
        log_text = proc.stdout.read()
        assert "stopping now: replies still running are cut" in log_text, log_text
        assert "Application shutdown complete" in log_text and "Traceback" not in log_text, log_text
        wait_until(lambda: len(fake.hangups) == 1, timeout=2.0, what="the upstream request to be let go")
    assert len(fake.generations()) == 1


def test_requests_the_server_cancels_free_everything_and_each_is_one_record_or_a_503(serve, fake, caplog):
    """uvicorn cancels the requests still running at its graceful-shutdown limit (with WORKERS > 1, piagent's own
    drain does not run) and at a forced exit. The cancelled ones let go of the upstream, the slot and the
    conversation; one that had no answer yet gets 503 shutting_down (uvicorn's own was a plain-text 500); none is an
    'Exception in ASGI application' traceback."""
    caplog.set_level("INFO")
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1)
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True, "conversation_id": "cut"},
                      timeout=DEADLINE_S) as streamed:
        pieces = streamed.iter_text()
        assert next(pieces) == "A1"
        waiter, waited = in_background(chat, server, message="b")  # waits for the one slot
        wait_until(lambda: server.app.state.runtime.gate.queued == 1, what="b to wait for the slot")
        tasks = list(server.server.server_state.tasks)
        assert len(tasks) == 2
        for task in tasks:  # as uvicorn does at its limit
            server.server.loop.call_soon_threadsafe(task.cancel)
        with pytest.raises(httpx.RemoteProtocolError):  # cut, never a clean end
            "".join(pieces)
    waiter.join(DEADLINE_S)
    assert waited["value"].status_code == 503 and error_of(waited["value"])["code"] == "shutting_down"
    wait_until(lambda: len(fake.hangups) == 1, timeout=2.0, what="the upstream request to be let go")
    fake.script = Script()
    assert chat(server, message="next", conversation_id="cut").status_code == 200  # slot and conversation free
    assert [r.get("error") for r in piagent_records(caplog)].count("shutting_down") == 2
    # (a stream cut on purpose is "returned without completing response" to uvicorn: configure_logging drops it)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR
                and "returned without completing response" not in r.getMessage()], caplog.text


def test_after_the_grace_streams_are_cut_and_waiters_get_503_not_500(fake, serve_local, tmp_path):
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)  # every generation holds after its first token
    memory = {"MEMORY_BACKEND": "sqlite", "MEMORY_PATH": str(tmp_path / "memory.db")}
    env = {"OLLAMA_HOST": fake.url, "SHUTDOWN_GRACE_S": "0.5", "MAX_CONCURRENT": "2", **memory}
    with piagent_process(env, capture=True) as (url, proc):
        with httpx.stream("POST", f"{url}/chat", json={"message": "a", "stream": True, "conversation_id": "cut"},
                          timeout=DEADLINE_S) as r:
            pieces = r.iter_text()
            assert next(pieces) == "A1"
            waiter, waiter_result = in_background(httpx.post, f"{url}/chat", json={"message": "b"},
                                                  timeout=DEADLINE_S)
            wait_until(lambda: len(fake.generations()) == 2, what="b to wait on the model")
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):  # cut: an incomplete transfer, never a clean end
                "".join(pieces)
        waiter.join(DEADLINE_S)
        assert waiter_result["value"].status_code == 503
        assert error_of(waiter_result["value"])["code"] == "shutting_down"
        wait_until(lambda: len(fake.hangups) == 2, timeout=2.0, what="both upstream requests to be let go")
        assert_stopped_gracefully(proc)
    # the cut stream keeps what its client was given, as when a client leaves: after a restart, the chat goes on
    turns = serve_local(**memory).get("/conversations/cut").json()["turns"]
    assert [(t["user"], t["assistant"]) for t in turns] == [("a", "A1")]


# ---------------------------------------------------------------------------
# Readiness, metrics, a warm model
# ---------------------------------------------------------------------------


def test_ready_when_the_upstream_answers_and_every_model_is_there(serve_local, fake):
    response = serve_local(AGENTS='general,tiny', OLLAMA_MODEL_TINY='tiny').get("/ready")
    body = response.json()
    assert response.status_code == 200 and body["status"] == "ready"
    assert body["checks"]["upstream"]["ok"] and "Ollama 0.12.6" in body["checks"]["upstream"]["detail"]
    assert body["checks"]["models"]["ok"] and body["warnings"] == []


def test_not_ready_names_the_missing_model_and_the_fix(serve_local, fake):
    response = serve_local(AGENTS='general,coder', OLLAMA_MODEL_CODER='coder:7b').get("/ready")
    body = response.json()
    assert response.status_code == 503 and body["status"] == "not_ready"
    assert not body["checks"]["models"]["ok"] and "ollama pull coder:7b" in body["checks"]["models"]["detail"]


def test_not_ready_without_an_upstream_and_health_stays_200(dead_port):
    config = load_config({"OLLAMA_HOST": f"http://127.0.0.1:{dead_port}", "WARMUP": "false"})
    with InProcessServer(create_app(config)) as server:
        response = server.get("/ready")
        assert server.get("/health").status_code == 200
    assert response.status_code == 503 and not response.json()["checks"]["upstream"]["ok"]


def test_ready_repeats_the_start_up_warning_about_an_open_lan(dead_port):
    config = load_config({"HOST": "0.0.0.0", "OLLAMA_HOST": f"http://127.0.0.1:{dead_port}", "WARMUP": "false"})
    with InProcessServer(create_app(config)) as server:  # the app is served on loopback; only the setting says LAN
        assert "NO API_KEYS" in server.get("/ready").json()["warnings"][0]


def test_ready_works_for_an_openai_compatible_upstream(serve_openai_local, fake):
    body = serve_openai_local().get("/ready").json()
    assert body["status"] == "ready" and "OpenAI-compatible" in body["checks"]["upstream"]["detail"]


def test_warmup_loads_each_model_in_the_background_with_keep_alive(serve_local, fake):
    fake.script = Script(hold_after=0)  # not used by loads, which answer at once
    server = serve_local(WARMUP="true", AGENTS="general,tiny", OLLAMA_MODEL_TINY="tiny", OLLAMA_KEEP_ALIVE="30m")
    wait_until(lambda: len(fake.loads()) == 2, what="both models to be loaded")
    assert [(r.path, r.body) for r in fake.loads()] == [
        ("/api/generate", {"model": MODEL, "stream": False, "keep_alive": "30m"}),
        ("/api/generate", {"model": "tiny", "stream": False, "keep_alive": "30m"})]
    wait_until(lambda: server.app.state.runtime.warmup.state == "done", what="warm-up to finish")
    assert server.get("/ready").json()["checks"]["warmup"] == {"ok": True, "detail": "models loaded"}


def test_ready_says_warming_until_the_models_are_loaded(serve_local, fake):
    gate = threading.Event()
    original = fake._dispatch

    async def slow_loads(req, reader, writer):  # the fake holds load requests until the test lets them go
        if req.path == "/api/generate" and not (req.body or {}).get("prompt"):
            deadline = time.monotonic() + DEADLINE_S  # bounded: a broken test must not hang the fake
            while not gate.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        return await original(req, reader, writer)

    fake._dispatch = slow_loads
    server = serve_local(WARMUP="true")
    assert server.get("/health").status_code == 200  # never delayed by warm-up
    warming = server.get("/ready")
    assert warming.status_code == 503 and warming.json()["status"] == "warming"
    gate.set()
    wait_until(lambda: server.get("/ready").status_code == 200, what="ready after warm-up")


def test_warmup_is_off_by_default_for_openai_compatible_servers():
    assert load_config({"PROVIDER": "openai"}).warmup is False and load_config({}).warmup is True


def parse_metrics(text: str) -> dict:
    parser = pytest.importorskip("prometheus_client.parser") if os.environ.get("CI") != "true" else \
        importlib.import_module("prometheus_client.parser")
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def sample(families: dict, name: str, family: str | None = None, **labels) -> float:
    for s in families[family or name].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics_in_prometheus_format_count_requests_tokens_and_errors(serve, fake):
    server = serve()
    chat(server, message="hi")
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True}) as r:
        r.read()
    fake.script = Script(status=404)
    chat(server, message="hi")
    httpx.get(f"{server.url}/conversations/nope")
    wait_until(lambda: sum(piagent_requests(server).values()) >= 4, what="four requests counted")
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = parse_metrics(response.text)
    assert sample(families, "piagent_requests_total", "piagent_requests", route="/chat", status="200") == 2
    assert sample(families, "piagent_requests_total", "piagent_requests", route="/chat", status="502") == 1
    assert sample(families, "piagent_requests_total", "piagent_requests",
                  route="/conversations/{conversation_id}", status="404") == 1
    assert sample(families, "piagent_tokens_generated_total", "piagent_tokens_generated") == 10
    assert sample(families, "piagent_upstream_errors_total", "piagent_upstream_errors", code="model_not_found") == 1
    assert sample(families, "piagent_time_to_first_token_seconds_count", "piagent_time_to_first_token_seconds") == 1
    assert sample(families, "piagent_request_duration_seconds_bucket", "piagent_request_duration_seconds",
                  route="/chat", le="+Inf") == 3
    assert sample(families, "piagent_conversations") == 2
    assert sample(families, "piagent_queue_depth") == 0 and sample(families, "piagent_active_streams") == 0
    assert sample(families, "process_resident_memory_bytes") > 10_000_000


def piagent_requests(server) -> dict:
    return server.app.state.runtime.metrics.requests


def test_metrics_show_the_queue_and_active_streams(serve, fake):
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1)
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True}) as first:
        pieces = first.iter_text()
        next(pieces)
        waiter, _ = in_background(chat, server, message="b")
        wait_until(lambda: server.app.state.runtime.gate.queued == 1, what="b to queue")
        families = parse_metrics(httpx.get(f"{server.url}/metrics").text)
        assert sample(families, "piagent_queue_depth") == 1 and sample(families, "piagent_active_streams") == 1
        assert sample(families, "piagent_generations_active") == 1
        fake.script.release.set()
        "".join(pieces)
    waiter.join(DEADLINE_S)


def test_metrics_need_the_key_unless_public(serve_local):
    assert serve_local(API_KEYS=KEY).get("/metrics").status_code == 401
    assert serve_local(API_KEYS=KEY, METRICS_PUBLIC='true').get("/metrics").status_code == 200


# ---------------------------------------------------------------------------
# Entry point: python piagent.py --check
# ---------------------------------------------------------------------------


def check(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`piagent --check`, in process (see in_process); some tests below and in test_mcp.py run it as a process."""
    return in_process(["--check", *args], env)


def test_check_passes_against_a_healthy_upstream_and_masks_secrets(fake):
    result = check({"OLLAMA_HOST": fake.url, "API_KEYS": KEY, "OPENAI_API_KEY": "sk-very-secret"})
    assert result.returncode == 0, result.stdout
    assert KEY not in result.stdout and "sk-very-secret" not in result.stdout
    assert f"API_KEYS=key {piagent.key_id(KEY)}" in result.stdout and f"OLLAMA_HOST={fake.url}" in result.stdout
    checks = result.stdout.split("checks:\n")[1].splitlines()
    assert checks == [f"✓ env file {HERE / 'piagent.env'} parsed", f"✓ Ollama 0.12.6 answers at {fake.url}",
                      f"✓ agent general: model {MODEL} is available", "✓ memory: memory opens",
                      checks[-1]] and checks[-1].startswith("✓ port ")
    assert fake.generations() == []  # checking never generates


def test_check_ends_with_what_start_up_would_warn_of_without_failing(fake):
    result = check({"OLLAMA_HOST": fake.url, "MAX_TOKENS": "1900"})
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1].startswith("⚠ MAX_TOKENS=1900 leaves 148 tokens of CTX_TOKENS=2048")


def test_check_fails_with_the_fix_when_the_upstream_is_stopped(dead_port):
    result = check({"OLLAMA_HOST": f"http://127.0.0.1:{dead_port}"})
    assert result.returncode == 1 and "✗ upstream at" in result.stdout and "ollama serve" in result.stdout
    assert "fix OLLAMA_HOST if it runs elsewhere" in result.stdout


def test_check_fails_on_env_file_names_nothing_reads_and_names_the_setting_meant(fake, servers, tmp_path):
    """A typo in the env file used to be ignored in silence: API_KEY=... left the server without keys."""
    env_file = tmp_path / "typos.env"
    env_file.write_text("API_KEY=abcdefgh12345678\nOLAMA_HOST=http://127.0.0.1:1\nAGENT_GENRAL_SYSTEM=Be brief.\n"
                        "OLLAMA_MODEL_MATHS=tiny\nmax_tokens=64\nMAX_TOKENS=64\nOPENAI_MODEL_GENERAL=smollm2\n"
                        "TZ=Europe/London\nHTTPS_PROXY=http://127.0.0.1:9\nUPSTREAM_TIMEOUT_S=60\nOLLAMA_TIMEOUT_S=90\n")
    result = run_piagent("--check", "--env-file", str(env_file), env={"OLLAMA_HOST": fake.url, "PORT": str(free_port())})
    (line,) = [c for c in result.stdout.split("checks:\n")[1].splitlines() if c.startswith("✗ env file")]
    assert result.returncode == 1 and "✓ Ollama 0.12.6 answers" in result.stdout
    for said in ("API_KEY (did you mean API_KEYS?)", "OLAMA_HOST (did you mean OLLAMA_HOST?)",
                 "AGENT_GENRAL_SYSTEM (did you mean AGENT_GENERAL_SYSTEM?)", "OLLAMA_MODEL_MATHS (not a setting;",
                 "max_tokens (did you mean MAX_TOKENS?)"):
        assert said in line, line
    assert "MAX_TOKENS," not in line and "list it in AGENTS or MCP_SERVERS" in line
    assert "OPENAI_MODEL_GENERAL" not in line  # another provider's setting: kept for a switch of PROVIDER
    for name in ("TZ", "HTTPS_PROXY", "OLLAMA_TIMEOUT_S"):  # the process's own (the file is its environment too),
        assert name not in line, line  # and an old name beside its new one (which wins)
    # a server started so says it at /ready too (and in its log at start-up)
    config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false"}, env_file)
    server = LiveServer(create_app(config)).__enter__()
    servers.append(server)
    warnings = httpx.get(f"{server.url}/ready", timeout=DEADLINE_S).json()["warnings"]
    assert "the env file sets API_KEY (did you mean API_KEYS?), which piagent does not read" in warnings


def test_check_says_when_the_upstream_address_is_a_piagent(serve, fake):
    """OLLAMA_HOST (or OPENAI_BASE_URL) set to piagent's own port: it was "Ollama answers", then "ollama pull"."""
    other = serve()
    for env, name in (({"OLLAMA_HOST": other.url}, "OLLAMA_HOST"),
                      ({"PROVIDER": "openai", "OPENAI_BASE_URL": f"{other.url}/v1"}, "OPENAI_BASE_URL")):
        result = check(env)
        assert result.returncode == 1 and f"✗ upstream at {other.url}" in result.stdout, result.stdout
        assert f"{name}={other.url}" in result.stdout and "is a piagent, not" in result.stdout
    assert fake.generations() == []


def test_check_says_the_address_is_wrong_when_the_upstream_has_no_model_list(fake):
    """OPENAI_BASE_URL without its /v1: the model list is a 404, which used to read "model '' was not found"."""
    result = check({"PROVIDER": "openai", "OPENAI_BASE_URL": fake.url})
    assert result.returncode == 1 and f"has nothing at {fake.url}/models (404)" in result.stdout, result.stdout
    assert f"is OPENAI_BASE_URL={fake.url} its address (it usually ends in /v1)?" in result.stdout
    assert "model ''" not in result.stdout


def test_check_fails_with_the_pull_command_for_a_missing_model(fake):
    result = check({"OLLAMA_HOST": fake.url, "AGENTS": "general,coder", "OLLAMA_MODEL_CODER": "coder:7b"})
    assert result.returncode == 1
    assert "✓ agent general" in result.stdout and "✗ agent coder: model coder:7b — " in result.stdout
    assert "ollama pull coder:7b" in result.stdout and f"(it has {MODEL}, tiny:latest)" in result.stdout


@pytest.mark.parametrize("provider", ["ollama", "openai"])
def test_a_near_miss_model_name_is_answered_with_the_name_the_upstream_has(fake, serve_local, provider):
    """qwen2.5:3b where qwen2.5:3b-instruct is pulled: `ollama pull qwen2.5:3b` alone sent a new user to download
    another 2 GB (a new user's finding)."""
    near = {"PROVIDER": provider, "OPENAI_BASE_URL": f"{fake.url}/v1", "OLLAMA_MODEL_GENERAL": "qwen2.5:3b",
            "OPENAI_MODEL_GENERAL": "qwen2.5:3b"}
    result = check({"OLLAMA_HOST": fake.url, **near})
    assert result.returncode == 1 and f"did you mean {MODEL}, which it has?" in result.stdout, result.stdout
    models = serve_local(**near).get("/ready").json()["checks"]["models"]
    assert not models["ok"] and f"did you mean {MODEL}, which it has?" in models["detail"]


def test_check_fails_when_the_port_is_taken(fake):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = check({"OLLAMA_HOST": fake.url, "PORT": str(taken.getsockname()[1])})
    assert result.returncode == 1 and "✗ port" in result.stdout and "already running" in result.stdout


def test_check_fails_on_a_broken_env_file_and_a_memory_that_will_not_open(fake, tmp_path):
    bad = tmp_path / "bad.env"
    bad.write_text("PORT=8000\nexport HOST=x\n")
    broken = run_piagent("--check", "--env-file", str(bad))
    assert broken.returncode == 1 and broken.stdout.startswith("✗ settings:") and "line 2" in broken.stdout
    result = check({"OLLAMA_HOST": fake.url, "MEMORY_BACKEND": "sqlite", "MEMORY_PATH": str(tmp_path / "no/x.db")})
    assert result.returncode == 1 and "✗ memory: sqlite" in result.stdout and "does not exist" in result.stdout


# ---------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------


def piagent_records(caplog) -> list[dict]:
    return [r.request for r in caplog.records if r.name == "piagent" and hasattr(r, "request")]


def test_one_record_per_request_with_fields_and_never_the_message(serve, fake, caplog):
    caplog.set_level("INFO", logger="piagent")
    server = serve()
    chat(server, message="my secret words", conversation_id="log-1")
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "my secret words", "stream": True,
                                                           "conversation_id": "log-1"}) as r:
        r.read()
    wait_until(lambda: len(piagent_records(caplog)) == 2, what="two request records")
    assert "secret" not in caplog.text
    plain, streamed = piagent_records(caplog)
    expected = {"method": "POST", "path": "/chat", "status": 200, "agent": "general", "model": MODEL,
                "provider": "ollama", "conversation_id": "log-1", "tokens": 5, "client": "127.0.0.1"}
    assert expected.items() <= plain.items() and expected.items() <= streamed.items()
    assert plain["prompt_tokens"] > 0 and streamed["ttft_ms"] >= 0 and streamed["tokens_per_s"] > 0
    assert all(r["duration_ms"] >= 0 and re.fullmatch(r"[0-9a-f]{32}", r["request_id"]) and r["queue_wait_ms"] >= 0
               for r in (plain, streamed))


def test_tokens_per_s_of_a_whole_reply_counts_its_tokens_not_its_one_piece(serve_local, fake, caplog):
    """A reply not streamed reaches piagent as one piece: its rate was 1 piece over the whole time (0.02 for a
    200-token reply on a Pi). It is the upstream's token count over the time from the start of generation."""
    caplog.set_level("INFO", logger="piagent")
    fake.script = Script(tokens=["t"] * 40, token_delay_s=0.005)
    server = serve_local()
    chat(server, message="hi")
    chat(server, message="hi", stream=True)
    wait_until(lambda: len(piagent_records(caplog)) == 2, what="two request records")
    plain, streamed = piagent_records(caplog)
    assert plain["tokens"] == streamed["tokens"] == 40
    # its rate times its generation time gives back its 40 tokens (one piece gave 1), give or take what comes after
    generating_s = (plain["duration_ms"] - plain["queue_wait_ms"]) / 1000
    assert 20 <= plain["tokens_per_s"] * generating_s <= 60, plain  # the record ends a little after the rate


def test_text_log_line_shows_method_path_status_duration_and_fields():
    record = logging.LogRecord("piagent", logging.INFO, __file__, 1, "POST /chat 200", None, None)
    record.request = {"method": "POST", "path": "/chat", "status": 200, "duration_ms": 12, "request_id": "r1",
                      "agent": "general", "tokens": 3, "prompt": "a \"quoted\" text"}
    line = piagent.TextLog().format(record)
    assert line.endswith('piagent: POST /chat 200 12ms request_id=r1 agent=general tokens=3 prompt="a \\"quoted\\" text"')


def test_json_log_is_one_object_per_line_with_the_request_fields():
    record = logging.LogRecord("piagent", logging.INFO, __file__, 1, "POST /chat 200", None, None)
    record.request = {"method": "POST", "path": "/chat", "status": 200, "duration_ms": 12, "tokens": 3}
    data = json.loads(piagent.JsonLog().format(record))
    assert data["level"] == "info" and data["status"] == 200 and data["tokens"] == 3 and "T" in data["time"]


def test_log_prompts_puts_the_message_in_the_record(serve_local, fake, caplog):
    caplog.set_level("INFO", logger="piagent")
    chat(serve_local(LOG_PROMPTS="true"), message="visible words")
    wait_until(lambda: piagent_records(caplog), what="a request record")
    assert piagent_records(caplog)[0]["prompt"] == "visible words"


def test_request_id_is_taken_from_the_client_or_made_and_echoed(serve_local):
    server = serve_local()
    assert server.get("/agents", headers={"X-Request-Id": "trace-42"}).headers["x-request-id"] == "trace-42"
    made = server.get("/agents", headers={"X-Request-Id": "bad id!"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)


def test_json_logs_from_a_real_process_are_one_object_per_line(fake):
    with piagent_process({"OLLAMA_HOST": fake.url, "LOG_FORMAT": "json"}, capture=True) as (url, proc):
        httpx.post(f"{url}/chat", json={"message": "hi"})
    lines = [json.loads(line) for line in proc.stdout.read().splitlines() if line.strip()]
    assert any(r.get("path") == "/chat" and r.get("status") == 200 for r in lines)
    assert all({"time", "level", "message"} <= r.keys() for r in lines)


# ---------------------------------------------------------------------------
# Entry point and files, as a new user would meet them
# ---------------------------------------------------------------------------


@contextmanager
def piagent_process(env: dict, capture: bool = False, script: bool = False, under: tuple[str, ...] = ()):
    port = free_port()
    # an unread pipe can fill up and block the process: capture only when the test reads it at the end
    proc = subprocess.Popen([*under, *piagent_command("--port", str(port), script=script)], cwd=HERE,
                            env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            text=True)
    try:
        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, f"piagent exited with {proc.returncode}"
                return False
        wait_until(up, what="python piagent.py to answer /health")
        yield (f"http://127.0.0.1:{port}", proc) if capture else f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)


README_MAX_BYTES = 15_000  # the README is for the person with the Pi; the rest lives in DEVELOPING.md


def readme_section(readme: str, heading: str) -> str:
    """The text under a `## ` or `### ` heading of README.md, up to the next heading of any level."""
    match = re.search(rf"^#{{2,3}} {re.escape(heading)}\n(.*?)(?=^#{{2,3}} |\Z)", readme, re.S | re.M)
    assert match, f"README.md has no section {heading!r}"
    return match.group(1)


def seed_curls(readme: str) -> list[str]:
    """The three /chat curl commands of README.md's "Chat from a terminal", as written there."""
    section = readme_section(readme, "Chat from a terminal")
    commands = re.findall(r"^(curl .*?(?:\n  .*?)*)\n(?!  )", section, re.M)
    return [c for c in commands if "/chat" in c and "127.0.0.1:8000" in c]


def readme_test_command() -> str:
    readme = (HERE / "README.md").read_text()
    return re.search(r"Set up and run the tests.*?```bash\n(.*?)\n```", readme, re.S).group(1)


def test_ci_runs_the_readme_test_command():
    assert readme_test_command() in (HERE / ".ci/run").read_text().splitlines()


def test_readme_stays_short_and_the_rest_lives_in_developing_md():
    readme = (HERE / "README.md").read_bytes()
    assert len(readme) <= README_MAX_BYTES, f"README.md is {len(readme)} bytes; move detail to DEVELOPING.md"
    developing = (HERE / "DEVELOPING.md").read_text()
    for link in re.findall(r"\(DEVELOPING\.md#([a-z0-9-]+)\)", readme.decode()):  # its links land on a heading
        headings = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
                    for h in re.findall(r"^#+ (.*)$", developing, re.M)}
        assert link in headings, f"README links to DEVELOPING.md#{link}, which has no such heading"


def test_pytest_prints_why_a_test_was_skipped():
    # a bare `pytest -q` printing "sssss" tells a new user nothing: the README's test command must show reasons
    config = (HERE / "pytest.ini").read_text()
    (addopts,) = re.findall(r"^addopts\s*=\s*(.*)$", config, re.M)
    assert any(o.startswith("-r") and "s" in o for o in addopts.split()), addopts


@pytest.mark.skipif(shutil.which("curl") is None and os.environ.get("CI") != "true", reason="curl is not installed")
def test_readme_seed_curls_work_verbatim_against_python_piagent_py(fake):
    curls = seed_curls((HERE / "README.md").read_text())
    assert len(curls) == 3
    with piagent_process({"OLLAMA_HOST": fake.url}, script=True) as url:
        outputs = []
        for command in curls:
            if "<id>" in command:
                command = command.replace("<id>", json.loads(outputs[0])["conversation_id"])
            command = command.replace("http://127.0.0.1:8000", url)
            outputs.append(subprocess.run(command, shell=True, capture_output=True, text=True, timeout=20).stdout)
    assert json.loads(outputs[0])["reply"] == "Hello from the Pi!"
    assert "x-conversation-id:" in outputs[1].lower() and outputs[1].endswith("Hello from the Pi!")
    assert outputs[2] == "Hello from the Pi!"
    assert len(fake.generations()[2].body["messages"]) == 4  # the reused conversation carried history


def test_python_piagent_py_with_no_upstream_gives_the_documented_error(dead_port):
    with piagent_process({"OLLAMA_HOST": f"http://127.0.0.1:{dead_port}"}, script=True) as url:
        response = httpx.post(f"{url}/chat", json={"message": "hi"})
    assert response.status_code == 503 and error_of(response)["code"] == "upstream_unavailable"


@pytest.mark.parametrize("provider, fix", [("ollama", "sudo systemctl start ollama"), ("openai", "OPENAI_BASE_URL")])
def test_an_upstream_that_cannot_be_reached_at_start_is_said_at_once_with_both_fixes(provider, fix, dead_port):
    url = f"http://127.0.0.1:{dead_port}"
    env = {"PROVIDER": provider, "OLLAMA_HOST": url, "OPENAI_BASE_URL": f"{url}/v1", "LOG_FORMAT": "text"}
    with piagent_process(env, capture=True) as (_, proc):
        first = ""
        while "WARNING" not in first:  # bounded: the process writes little, and readline ends at exit
            first = proc.stdout.readline()
            assert first, "piagent ended without a warning"
        ready = httpx.get(f"{_}/ready").json()
    assert url in first and fix in first and "PROVIDER" in first and "keeps trying" in first, first
    assert not any(c["ok"] and "cannot reach" in c["detail"] for c in ready["checks"].values()), ready


def test_the_conversation_list_cursor_is_safe_to_paste_into_a_url(serve, fake):
    server = serve()
    for cid in ("a", "b", "c"):
        chat(server, message="hi", conversation_id=cid)
    first = httpx.get(f"{server.url}/conversations?limit=2").json()
    assert [c["conversation_id"] for c in first["conversations"]] == ["c", "b"]
    assert re.fullmatch(r"[0-9.e+-]+", first["next"]) and "+" not in first["next"]
    rest = httpx.get(f"{server.url}/conversations?limit=2&cursor={first['next']}").json()  # pasted as is
    assert [c["conversation_id"] for c in rest["conversations"]] == ["a"] and rest["next"] is None


def test_flags_override_environment(fake):
    port = free_port()
    env = {"OLLAMA_HOST": fake.url, "PORT": "1"}
    proc = subprocess.Popen(piagent_command("--host", "127.0.0.1", "--port", str(port)), cwd=HERE,
                            env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, what="piagent on the --port given")
    finally:
        proc.terminate()
        proc.wait(DEADLINE_S)


def test_requirements_are_the_three_runtime_packages_with_lower_bounds():
    lines = [l for l in (HERE / "requirements.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert sorted(re.match(r"[a-z]+", l).group() for l in lines) == ["fastapi", "httpx", "uvicorn"]
    assert all(">=" in l for l in lines)


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def test_service_unit_runs_the_venv_python_from_opt_with_the_optional_env_file():
    unit = (HERE / "piagent.service").read_text()
    # -m, so the bytecode compiled at install is used: a script run as `python piagent.py` is compiled every start
    assert "WorkingDirectory=/opt/piagent\nExecStart=/opt/piagent/.venv/bin/python -m piagent\n" in unit
    assert "EnvironmentFile=-/etc/piagent/piagent.env\n" in unit and "Restart=on-failure\n" in unit
    assert "Wants=ollama.service\n" in unit and "After=network.target ollama.service\n" in unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None and os.environ.get("CI") != "true", reason="no systemd-analyze")
def test_service_unit_verifies_clean(tmp_path):
    # verify insists that ExecStart exists, so check a copy whose /opt/piagent is a scratch folder
    opt = tmp_path / "opt-piagent"
    (opt / ".venv/bin").mkdir(parents=True)
    (opt / ".venv/bin/python").symlink_to(sys.executable)
    (opt / "piagent.py").write_text("")
    unit = tmp_path / "piagent.service"
    unit.write_text((HERE / "piagent.service").read_text().replace("/opt/piagent", str(opt)))
    result = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest.mark.skipif((SYSTEMD_ANALYZE is None or shutil.which("curl") is None) and os.environ.get("CI") != "true",
                    reason="needs systemd-analyze and curl")
@pytest.mark.slow  # a fresh venv and a pip install
def test_pi_install_rehearsal_runs_the_readme_steps_and_starts_like_the_unit():
    result = subprocess.run(["bash", str(HERE / "scripts/pi-install-check.sh")], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL,
                            env={**os.environ, "REHEARSAL_PORTS": f"{free_port()} {free_port()}"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    # the README's own install lines ran (its --check passed against a fake Ollama), then the unit's way of starting
    assert "--check passed" in result.stdout and "update passed" in result.stdout
    assert "exposure 1." in result.stdout and "OK: /health answered" in result.stdout


@pytest.mark.skipif(SYSTEMD_ANALYZE is None and os.environ.get("CI") != "true", reason="no systemd-analyze")
def test_service_unit_exposure_is_at_most_2(tmp_path):
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", str(HERE / "piagent.service")],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for piagent\.service: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout[-3000:]
