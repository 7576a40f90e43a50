"""Tests of piagent's MCP tool sources against real servers: ones built on the official `mcp` SDK (stdio and
Streamable HTTP), the published reference servers mcp-server-time (PyPI) and @modelcontextprotocol/server-filesystem
(npm), and small misbehaving stdio programs (mcp_servers/bad_server.py); then MCP tools end to end through piagent.

Needs: requirements-dev.txt (mcp, mcp-server-time) and (cd mcp_servers && npm ci --no-audit --no-fund).
Under CI=true a missing component fails the tests that need it; otherwise they are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import piagent as mcp_client
from piagent import ConfigError, McpServer, McpServerConfig, ToolError, load_config, model_tool_name, result_text

HERE = Path(__file__).resolve().parent
PY = sys.executable
SDK_SERVER = str(HERE / "mcp_servers" / "sdk_server.py")
BAD_SERVER = str(HERE / "mcp_servers" / "bad_server.py")
FILESYSTEM_SERVER = HERE / "mcp_servers" / "node_modules" / ".bin" / "mcp-server-filesystem"
TIME_SERVER = shutil.which("mcp-server-time", path=str(Path(PY).parent)) or shutil.which("mcp-server-time")
PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                        "0000000d4944415478da63f8cfc0f01f0005000201e4d7b33a0000000049454e44ae426082")


def need(ok: bool, what: str) -> None:
    """Skip a test whose component is missing, but fail it under CI=true, where everything must be installed."""
    if not ok:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"{what} is not installed")


def need_sdk() -> None:
    """The official mcp SDK (test servers only; piagent never imports it)."""
    need(importlib.util.find_spec("mcp") is not None, "the mcp SDK (pip install mcp)")


def run(scenario) -> None:
    """Run one async scenario, bounded in time."""
    asyncio.run(asyncio.wait_for(scenario, 60))


async def poll(condition, timeout_s: float = 10.0) -> None:
    """Wait until condition() is true, checking every 20 ms; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a zombie has exited; only its entry is left)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def sdk_stdio(tmp_path: Path, **settings) -> McpServer:
    """An McpServer for the SDK test server over stdio, recording its events in tmp_path/events."""
    need_sdk()
    config = McpServerConfig("sdk", (PY, SDK_SERVER, "stdio", "--events", str(tmp_path / "events")),
                             timeout_s=settings.pop("timeout_s", 15.0))
    return McpServer(config, **settings)


def events(tmp_path: Path) -> str:
    """What the SDK test server recorded so far."""
    path = tmp_path / "events"
    return path.read_text() if path.exists() else ""


@pytest.fixture
def http_server(tmp_path, request):
    """Start the SDK test server over HTTP on a free 127.0.0.1 port; yields its URL. Params: extra flags."""
    need_sdk()
    flags = getattr(request, "param", ())
    proc = subprocess.Popen([PY, SDK_SERVER, "http", "--events", str(tmp_path / "events"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready, "the HTTP test server did not start within 30 s"
        port = int(proc.stdout.readline().split()[1])
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


# --- settings ------------------------------------------------------------------------------------------------------

def read_mcp_servers(values):
    return load_config(values).mcp_servers


def test_servers_are_read_from_their_variables():
    servers = read_mcp_servers({"MCP_SERVERS": "files, web", "MCP_FILES_COMMAND": "npx -y 'my server' /srv/notes",
                                "MCP_WEB_URL": "http://127.0.0.1:8931/mcp", "MCP_WEB_TOKEN": "s3cret",
                                "MCP_WEB_TIMEOUT_S": "5"})
    assert servers == (McpServerConfig("files", ("npx", "-y", "my server", "/srv/notes")),
                       McpServerConfig("web", url="http://127.0.0.1:8931/mcp", token="s3cret", timeout_s=5.0))
    assert read_mcp_servers({}) == ()
    assert load_config({}).mcp_max_result_chars == 8000


@pytest.mark.parametrize("values, variable", [
    ({"MCP_SERVERS": "Files", "MCP_FILES_COMMAND": "x"}, "MCP_SERVERS"),
    ({"MCP_SERVERS": "a,a", "MCP_A_COMMAND": "x"}, "MCP_SERVERS"),
    ({"MCP_SERVERS": "files"}, "MCP_FILES_COMMAND"),
    ({"MCP_SERVERS": "files", "MCP_FILES_COMMAND": "x", "MCP_FILES_URL": "http://127.0.0.1/"}, "MCP_FILES_URL"),
    ({"MCP_SERVERS": "files", "MCP_FILES_COMMAND": "npx 'unclosed"}, "MCP_FILES_COMMAND"),
    ({"MCP_SERVERS": "files", "MCP_FILES_COMMAND": "  "}, "MCP_FILES_COMMAND"),
    ({"MCP_SERVERS": "web", "MCP_WEB_URL": "127.0.0.1:8931"}, "MCP_WEB_URL"),
    ({"MCP_SERVERS": "files", "MCP_FILES_COMMAND": "x", "MCP_FILES_TOKEN": "t"}, "MCP_FILES_TOKEN"),
    ({"MCP_SERVERS": "files", "MCP_FILES_COMMAND": "x", "MCP_FILES_TIMEOUT_S": "soon"}, "MCP_FILES_TIMEOUT_S"),
    ({"MCP_SERVERS": "files", "MCP_FILES_COMMAND": "x", "MCP_FILES_TIMEOUT_S": "0"}, "MCP_FILES_TIMEOUT_S"),
])
def test_bad_settings_name_the_variable(values, variable):
    with pytest.raises(ConfigError, match=variable):
        read_mcp_servers(values)


def test_bad_result_cap_names_the_variable():
    with pytest.raises(ConfigError, match="MCP_MAX_RESULT_CHARS='lots'"):
        load_config({"MCP_MAX_RESULT_CHARS": "lots"})


def test_model_tool_names_are_safe_and_end_with_the_tool_name():
    assert model_tool_name("files", "read_text_file") == "files__read_text_file"
    odd, long = model_tool_name("web", "get.page"), model_tool_name("a" * 32, "b" * 128)
    assert odd.startswith("web__") and odd.endswith("_get_page") and odd != model_tool_name("web", "get_page")
    for name in (odd, long, model_tool_name("x", "ü"), model_tool_name("x", "")):
        assert 1 <= len(name) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in name)
    assert long.endswith("bbbb") and long != model_tool_name("a" * 32, "c" + "b" * 127)


def test_result_text_names_non_text_parts_and_says_when_it_cut():
    result = {"content": [{"type": "text", "text": "hello"}, {"type": "audio", "mimeType": "audio/wav", "data": "A" * 4096},
                          {"type": "resource_link", "uri": "file:///a.txt", "name": "a"}]}
    assert result_text(result, 8000) == "hello\n[audio/wav, 3 KB, not shown]\n[resource file:///a.txt, unknown type, not shown]"
    cut = result_text({"content": [{"type": "text", "text": "x" * 10000}]}, 1000)
    assert len(cut) <= 1000 and "cut" in cut and "10000 characters" in cut
    assert result_text({"content": [], "structuredContent": {"a": 1}}, 100) == '{"a": 1}'


# --- the SDK test server over stdio (2026-07-28: it answers server/discover) ---------------------------------------

def test_stdio_server_starts_in_background_lists_all_pages_and_calls(tmp_path):
    async def scenario():
        server = sdk_stdio(tmp_path)
        started = time.monotonic()
        await server.start()
        assert time.monotonic() - started < 0.5 and server.status() == (False, "starting")
        try:
            assert await server.ready(20)
            # six tools served two per page: all of them means the client followed nextCursor
            assert sorted(server.tools()) == ["add", "big", "fail", "grow", "picture", "slow"]
            assert server.tools()["add"].parameters["required"] == ["a", "b"]
            assert server.status() == (True, "6 tools") and server._era == "2026-07-28"
            assert await server.call("add", {"a": 2, "b": 3}) == "5"
            assert await server.call("picture", {}) == "a dot\n[image/png, 70 bytes, not shown]"
            with pytest.raises(ToolError, match="Error executing tool fail"):  # isError: the model reads it
                await server.call("fail", {"message": "boom"})
            with pytest.raises(ToolError, match="Unknown tool"):  # a protocol error, also readable
                await server.call("nope", {})
            assert (server.calls, server.failures) == (4, 2)
        finally:
            await server.stop()
    run(scenario())


def test_huge_result_is_capped_and_says_so(tmp_path):
    async def scenario():
        server = sdk_stdio(tmp_path, max_result_chars=1000)
        await server.start()
        try:
            text = await server.call("big", {"size": 200_000})
            assert len(text) <= 1000 and text.startswith("xxx") and "200000 characters" in text
        finally:
            await server.stop()
    run(scenario())


def test_list_change_makes_the_new_tool_appear(tmp_path):
    async def scenario():
        server = sdk_stdio(tmp_path)
        await server.start()
        try:
            assert await server.ready(20) and "extra" not in server.tools()
            await server.call("grow", {})
            await poll(lambda: "extra" in server.tools())
            assert await server.call("extra", {}) == "extra here"
        finally:
            await server.stop()
    run(scenario())


def test_timeout_is_a_tool_error_and_cancels_at_the_server(tmp_path):
    async def scenario():
        server = sdk_stdio(tmp_path, timeout_s=3.0)
        await server.start()
        try:
            assert await server.ready(20)
            server.config = McpServerConfig(**{**server.config.__dict__, "timeout_s": 0.5})
            with pytest.raises(ToolError, match="no answer to tools/call within 0.5 s"):
                await server.call("slow", {"seconds": 30})
            await poll(lambda: "cancelled slow" in events(tmp_path))
        finally:
            await server.stop()
    run(scenario())


def test_cancelled_caller_cancels_the_call_at_the_server(tmp_path):
    async def scenario():
        server = sdk_stdio(tmp_path)
        await server.start()
        try:
            assert await server.ready(20)
            call = asyncio.ensure_future(server.call("slow", {"seconds": 30}))
            await poll(lambda: "started slow" in events(tmp_path))
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await poll(lambda: "cancelled slow" in events(tmp_path))  # the server saw notifications/cancelled
            assert await server.call("add", {"a": 1, "b": 1}) == "2"  # and the connection still works
        finally:
            await server.stop()
    run(scenario())


# --- the SDK test server over Streamable HTTP -----------------------------------------------------------------------

def test_http_modern_server_lists_calls_and_hears_list_changes(http_server, tmp_path):
    async def scenario():
        server = McpServer(McpServerConfig("web", url=http_server, timeout_s=10))
        await server.start()
        try:
            assert await server.ready(20) and server._era == "2026-07-28" and server._transport.session_id is None
            assert await server.call("add", {"a": 20, "b": 22}) == "42"
            with pytest.raises(ToolError, match="Error executing tool fail"):
                await server.call("fail", {"message": "boom"})
            await server.call("grow", {})
            await poll(lambda: "extra" in server.tools())  # heard on the subscriptions/listen stream
        finally:
            await server.stop()
    run(scenario())


def test_http_modern_cancel_closes_the_stream_and_the_server_sees_it(http_server, tmp_path):
    async def scenario():
        server = McpServer(McpServerConfig("web", url=http_server, timeout_s=10))
        await server.start()
        try:
            assert await server.ready(20)
            call = asyncio.ensure_future(server.call("slow", {"seconds": 30}))
            await poll(lambda: "started slow" in events(tmp_path))
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            await poll(lambda: "cancelled slow" in events(tmp_path))
        finally:
            await server.stop()
    run(scenario())


@pytest.mark.parametrize("http_server", [("--legacy",)], indirect=True)
def test_http_handshake_server_gets_a_session_and_reinitializes_after_404(http_server, tmp_path):
    async def scenario():
        server = McpServer(McpServerConfig("web", url=http_server, timeout_s=10))
        await server.start()
        try:
            assert await server.ready(20) and server._era == "2025-11-25"
            first = server._transport.session_id
            assert first and await server.call("add", {"a": 1, "b": 2}) == "3"
            await server.call("grow", {})
            await poll(lambda: "extra" in server.tools())  # heard on the session's GET stream
            # the server forgets the session (as after its restart): the next call gets 404, starts over, works
            async with httpx.AsyncClient() as client:
                assert (await client.delete(http_server, headers={"Mcp-Session-Id": first})).status_code == 200
            assert await server.call("add", {"a": 2, "b": 2}) == "4"
            assert server._transport.session_id not in (None, first)
            call = asyncio.ensure_future(server.call("slow", {"seconds": 30}))
            await poll(lambda: "started slow" in events(tmp_path))
            call.cancel()
            await asyncio.wait({call})
            await poll(lambda: "cancelled slow" in events(tmp_path))  # notifications/cancelled, POSTed
        finally:
            await server.stop()
    run(scenario())


@pytest.mark.parametrize("http_server", [("--token", "s3cret")], indirect=True)
def test_http_token_is_sent_and_a_wrong_one_is_named(http_server):
    async def scenario():
        good = McpServer(McpServerConfig("web", url=http_server, token="s3cret", timeout_s=10))
        bad = McpServer(McpServerConfig("web", url=http_server, token="wrong", timeout_s=10))
        for server in (good, bad):
            await server.start()
        try:
            assert await good.ready(20) and await good.call("add", {"a": 1, "b": 1}) == "2"
            assert not await bad.ready(20)
            assert "HTTP 401" in bad.status()[1] and "MCP_WEB_TOKEN" in bad.status()[1]
        finally:
            await good.stop()
            await bad.stop()
    run(scenario())


def test_an_http_url_the_server_redirects_says_which_url_to_set(http_server):
    """The SDK's server answers /mcp/ (a trailing slash, easily typed) with 307 to /mcp; it said only "HTTP 307"."""
    async def scenario():
        server = McpServer(McpServerConfig("web", url=f"{http_server}/", timeout_s=10))
        good = McpServer(McpServerConfig("web", url=http_server, timeout_s=10))
        for each in (server, good):
            await each.start()
        try:
            assert not await server.ready(20)
            assert f"redirects to {http_server}: set MCP_WEB_URL={http_server}" in server.status()[1], server.status()
            assert await good.ready(20) and await good.call("add", {"a": 1, "b": 1}) == "2"  # the URL it names works
        finally:
            await server.stop()
            await good.stop()
    run(scenario())


BAD_HTTP = HERE / "mcp_servers" / "bad_http.py"


def listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


CUT = r"over 1 MiB|longer than 1 MiB"


@pytest.mark.parametrize("mode, told", [("endless-answer", CUT), ("endless-line", CUT), ("endless-event", CUT),
                                        ("gzip-answer", r"sent a compressed reply \(Content-Encoding: 'gzip'\)")])
def test_an_http_answer_too_large_to_read_fails_its_call_and_never_fills_memory(mode, told, monkeypatch):
    """A body, an SSE line or an SSE event that goes on and on: read until MCP_MAX_LINE_BYTES (here 1 MiB), then the
    call fails; before, piagent read all of it (gigabytes, where the server did not stop). A gzip answer fails
    unread: httpx would unpack it with no limit, and a small one can hold gigabytes (piagent asks for none)."""
    port = free_port()
    proc = subprocess.Popen([PY, str(BAD_HTTP), str(port), mode], stdin=subprocess.DEVNULL)

    async def scenario():
        server = McpServer(McpServerConfig("bad", url=f"http://127.0.0.1:{port}/mcp", timeout_s=20))
        await server.start()
        try:
            assert await server.ready(20), server.status()
            with pytest.raises(ToolError, match=told):
                await server.call("x", {})
        finally:
            await server.stop()
    try:
        wait_until(lambda: listening(port), what="bad_http.py to listen")
        monkeypatch.setattr(mcp_client, "MCP_MAX_LINE_BYTES", 1 << 20)  # an injected cap: 1 MiB read, not 32
        run(scenario())
    finally:
        proc.kill()
        proc.wait()


def test_an_http_server_that_never_takes_the_initialized_notification_fails_its_start_in_time():
    port = free_port()
    proc = subprocess.Popen([PY, str(BAD_HTTP), str(port), "mute-notify"], stdin=subprocess.DEVNULL)

    async def scenario():
        server = McpServer(McpServerConfig("bad", url=f"http://127.0.0.1:{port}/mcp", timeout_s=1))
        await server.start()
        try:
            assert not await server.ready(15)  # it was "starting" for ever
            assert "cannot reach" in server.status()[1], server.status()
        finally:
            await server.stop()
    try:
        wait_until(lambda: listening(port), what="bad_http.py to listen")
        run(scenario())
    finally:
        proc.kill()
        proc.wait()


def test_http_server_that_is_down_gives_a_clear_error(dead_port):
    url = f"http://127.0.0.1:{dead_port}/mcp"

    async def scenario():
        now = [0.0]
        server = McpServer(McpServerConfig("web", url=url, timeout_s=5), clock=lambda: now[0])
        await server.start()
        assert not await server.ready(10)
        assert server.status()[1].startswith(f"cannot reach {url}")
        with pytest.raises(ToolError, match="cannot reach"):
            await server.call("add", {"a": 1, "b": 1})
        now[0] += 10
        with pytest.raises(ToolError, match="cannot reach"):  # tried again after the back-off: still down
            await server.call("add", {"a": 1, "b": 1})
        assert server.failures == 2
        await server.stop()
    run(scenario())


# --- published reference servers ------------------------------------------------------------------------------------

def test_mcp_server_time_speaks_2026_07_28():
    need(TIME_SERVER is not None, "mcp-server-time (pip install mcp-server-time)")

    async def scenario():
        server = McpServer(McpServerConfig("time", (TIME_SERVER,), timeout_s=15))
        await server.start()
        try:
            assert await server.ready(30) and server._era == "2026-07-28"  # it answered server/discover
            assert set(server.tools()) == {"get_current_time", "convert_time"}
            assert '"timezone": "Etc/UTC"' in await server.call("get_current_time", {"timezone": "Etc/UTC"})
            with pytest.raises(ToolError, match="Invalid timezone"):
                await server.call("get_current_time", {"timezone": "Mars/Base"})
        finally:
            await server.stop()
    run(scenario())


def test_filesystem_server_speaks_the_handshake_era(tmp_path):
    need(FILESYSTEM_SERVER.exists(), f"@modelcontextprotocol/server-filesystem (cd mcp_servers && npm ci)")
    (tmp_path / "note.txt").write_text("remember the milk\n")
    (tmp_path / "dot.png").write_bytes(PNG_1X1)

    async def scenario():
        server = McpServer(McpServerConfig("files", (str(FILESYSTEM_SERVER), str(tmp_path)), timeout_s=15))
        await server.start()
        try:
            assert await server.ready(30) and server._era == "2025-11-25"  # server/discover got -32601: fell back
            assert "read_text_file" in server.tools() and len(server.tools()) >= 10
            assert await server.call("read_text_file", {"path": str(tmp_path / "note.txt")}) == "remember the milk\n"
            assert await server.call("read_media_file", {"path": str(tmp_path / "dot.png")}) == \
                "[image/png, 70 bytes, not shown]"
            with pytest.raises(ToolError, match="Access denied"):
                await server.call("read_text_file", {"path": "/etc/passwd"})
        finally:
            await server.stop()
    run(scenario())


# --- failures: crashes, silence, garbage, stubborn processes --------------------------------------------------------

def test_dead_server_is_restarted_on_next_use_after_a_growing_back_off(tmp_path):
    async def scenario():
        now = [0.0]
        server = sdk_stdio(tmp_path, clock=lambda: now[0])
        await server.start()
        try:
            for back_off_s in (1, 2):
                assert await server.ready(20)
                pid = server._transport.process.pid
                os.kill(pid, signal.SIGKILL)
                await poll(lambda: not server.status()[0])
                assert "killed by signal 9" in server.status()[1] and "add" in server.tools()
                with pytest.raises(ToolError, match=f"tries again in {back_off_s} s"):  # no hot restart loop
                    await server.call("add", {"a": 1, "b": 1})
                assert server._transport.process.pid == pid  # not restarted during the back-off
                now[0] += back_off_s
                assert await server.call("add", {"a": 1, "b": 1}) == "2"
                assert server._transport.process.pid != pid and not alive(pid)
                server._failed_starts += 1  # as if it had not served a call: the next back-off doubles
        finally:
            await server.stop()
    run(scenario())


def call_fails_naming_why_and_server_goes_down(mode: str, tool: str, why: str) -> None:
    """Call `tool` of bad_server.py `mode` (time-out 30 s): it fails saying `why` (not "no answer ... within 30 s"),
    the server is seen down, and stopping it leaves no process."""
    async def scenario():
        server = McpServer(McpServerConfig(mode, (PY, BAD_SERVER, mode), timeout_s=30))
        await server.start()
        try:
            assert await server.ready(20)
            pid = server._transport.process.pid
            with pytest.raises(ToolError, match=why):
                await server.call(tool, {})
            await poll(lambda: not server.status()[0])
            assert why in server.status()[1]
        finally:
            await server.stop()
        assert not alive(pid)
    run(scenario())


@pytest.mark.parametrize("tool, why", [("dies", "exited with code 3"), ("mute", "closed stdout")])
def test_a_server_that_stops_answering_mid_call_fails_the_call_at_once_and_is_seen_down(tool, why):
    """It exits leaving a child that holds its pipes, or closes stdout and lives on: the reader used to wait for
    both pipes to end, so the call (and every later one) waited its whole time-out and /ready said all was well."""
    call_fails_naming_why_and_server_goes_down("gone", tool, why)


def test_server_that_never_answers_fails_in_bounded_time_and_says_why(tmp_path):
    async def scenario():
        server = McpServer(McpServerConfig("mute", (PY, BAD_SERVER, "silent"), timeout_s=0.5))
        started = time.monotonic()
        await server.start()
        assert not await server.ready(10)
        assert time.monotonic() - started < 5
        assert server.status() == (False, "no answer to initialize within 0.5 s")
        await server.stop()
    run(scenario())


def test_program_that_cannot_start_says_why():
    async def scenario():
        server = McpServer(McpServerConfig("gone", ("/nonexistent/mcp-server",)))
        await server.start()
        assert not await server.ready(5) and "No such file" in server.status()[1]
        await server.stop()
    run(scenario())


def test_a_server_announcing_a_change_after_every_listing_is_listed_once_a_pause(tmp_path, monkeypatch):
    """It had piagent list its tools about 1,200 times a second, a core's CPU taken from the model. The first change
    is listed at once; after that, at most one listing a MCP_RELIST_PAUSE_S (injected: 0.2 s here)."""
    monkeypatch.setattr(mcp_client, "MCP_RELIST_PAUSE_S", 0.2)
    listed = tmp_path / "listed"

    def times() -> list[float]:
        return [float(t) for t in listed.read_text().split()] if listed.exists() else []

    async def scenario():
        server = McpServer(McpServerConfig("churn", (PY, BAD_SERVER, "churn", str(listed)), timeout_s=10))
        await server.start()
        try:
            assert await server.ready(20)
            await poll(lambda: len(times()) >= 5)
            assert server.status() == (True, "1 tools") and await server.call("plain", {}) == "fine"
        finally:
            await server.stop()
    run(scenario())
    gaps = [later - earlier for earlier, later in zip(times(), times()[1:])]
    assert min(gaps[1:]) >= 0.19, gaps  # the loop's clock may wake a hair early; 1,200 a second was 0.001 s


def test_garbage_on_stdout_is_skipped_and_a_chatty_server_is_logged_bounded(tmp_path, caplog):
    need_sdk()

    async def scenario():
        command = (PY, BAD_SERVER, "noisy", "500", "--", PY, SDK_SERVER, "stdio")
        server = McpServer(McpServerConfig("noisy", command, timeout_s=15))
        await server.start()
        try:
            assert await server.ready(20) and await server.call("add", {"a": 1, "b": 1}) == "2"
        finally:
            await server.stop()
    with caplog.at_level(logging.INFO, logger="piagent"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MCP server noisy: ")]
    assert any("not JSON-RPC on stdout" in line for line in lines)
    assert any("chatty stderr line" in line for line in lines)
    for kind in ("garbage line", "chatty stderr line"):  # 500 of each were written
        assert len([line for line in lines if kind in line]) <= mcp_client.MCP_LOG_LINES_PER_MIN


def test_a_server_that_reads_nothing_of_piagents_answers_is_cut_off_not_buffered_for(monkeypatch):
    """It asks (pings with 512 KiB ids) and never reads the answers: they piled up in piagent's memory (hundreds of
    MiB) while the call waited its time-out. Past MCP_MAX_LINE_BYTES unread (here 1 MiB) the server is cut off."""
    monkeypatch.setattr(mcp_client, "MCP_MAX_LINE_BYTES", 1 << 20)
    call_fails_naming_why_and_server_goes_down("deaf", "pings", "reads nothing of what piagent sends")


def test_tools_left_out_and_a_flood_of_list_changes_are_logged_bounded(caplog):
    """50 tools piagent cannot call were 50 warnings a listing; 500 list changes were ~500 lines."""
    caplog.set_level("INFO", logger="piagent")

    async def scenario():
        server = McpServer(McpServerConfig("chatty", (PY, BAD_SERVER, "chatty"), timeout_s=20))
        await server.start()
        try:
            assert await server.ready(20)
            assert list(server.tools()) == ["flood"]
            assert await server.call("flood", {}) == "flooded"
            await poll(lambda: any("tool list changed" in r.getMessage() for r in caplog.records))
        finally:
            await server.stop()
    run(scenario())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MCP server chatty")]
    left_out = [line for line in lines if "left out" in line]
    assert left_out and all("50 tools left out" in line and "task0, task1" in line for line in left_out)
    assert len([line for line in lines if "tool list changed" in line]) <= mcp_client.MCP_LOG_LINES_PER_MIN


def test_an_answer_piagent_cannot_pass_on_fails_its_call_at_once_and_the_next_call_works():
    """A tools/call answer that is valid JSON but holds a lone surrogate is a tool error naming the field, given
    when the answer comes (it was skipped as not JSON-RPC, and the call failed only at its time-out); an answer with
    an id no call can have is skipped."""
    async def scenario():
        server = McpServer(McpServerConfig("odd", (PY, BAD_SERVER, "unusable"), timeout_s=8))
        await server.start()
        try:
            assert await server.ready(20)
            with pytest.raises(ToolError, match=r"unusable: result\.content\.0\.text holds a lone surrogate"):
                await server.call("odd", {})
            with pytest.raises(ToolError, match=r"unusable: result\.structuredContent\.d\.0.* nested deeper than 64"):
                await server.call("deep", {})
            assert await server.call("asks", {}) == "pinged"  # its ping, params unusable, was answered all the same
            # an answer whose id is a list is skipped: it took the reader down, and the server ("closed stdout") too
            assert await server.call("listid", {}) == "fine" and server.status()[0]
            assert await server.call("plain", {}) == "fine"
        finally:
            await server.stop()
    run(scenario())


def test_stop_leaves_no_process_even_one_ignoring_stdin_close_and_sigterm(tmp_path, monkeypatch):
    monkeypatch.setattr(mcp_client, "MCP_STOP_GRACE_S", 0.3)
    pids_file = tmp_path / "pids"

    async def scenario():
        command = (PY, BAD_SERVER, "silent", "--stubborn", "--pids", str(pids_file))
        server = McpServer(McpServerConfig("stubborn", command, timeout_s=30))
        await server.start()
        await poll(pids_file.exists)
        pids = [int(pid) for pid in pids_file.read_text().split()]
        assert all(alive(pid) for pid in pids)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 5
        await poll(lambda: not any(alive(pid) for pid in pids), 5)
        assert server.status() == (False, "stopped")
        with pytest.raises(ToolError, match="stopped"):
            await server.call("anything", {})
    run(scenario())


# --- end to end: MCP tools through piagent's tool loop, with the fake upstream calling them -------------------------

from fake_ollama import Script  # noqa: E402
from test_piagent import (DEADLINE_S, dead_port, fake, free_port, piagent_command, raw_post,  # noqa: E402,F401
                          run_piagent, serve, serve_openai, start_up, tool_reply, wait_until, servers)


def need_filesystem() -> None:
    need(FILESYSTEM_SERVER.exists(), "@modelcontextprotocol/server-filesystem (cd mcp_servers && npm ci)")


#: For a piagent whose /ready a test polls until its MCP servers are up: /ready counts against RATE_LIMIT_PER_MIN
#: (30 a minute), and a poll every few ms spends that before a slow server has listed its tools.
UNLIMITED = {"RATE_LIMIT_PER_MIN": "0"}


@pytest.fixture(params=["ollama", "openai"])
def serve_mcp(request, serve, serve_openai):
    """serve_mcp(**env) -> piagent in front of either provider, once its MCP servers have listed their tools."""
    def start(**env):
        env = {**UNLIMITED, **env}
        server = serve(**env) if request.param == "ollama" else serve_openai(**env)
        names = [n for n in env.get("MCP_SERVERS", "").split(",") if n]
        wait_until(lambda: all(httpx.get(f"{server.url}/ready").json()["checks"][f"mcp:{n}"]["ok"] for n in names),
                   timeout=30, what="the MCP servers to list their tools")
        return server
    return start


def metric(server, name: str) -> str:
    return next(line for line in httpx.get(f"{server.url}/metrics").text.splitlines() if line.startswith(name))


@pytest.mark.parametrize("mode", ["json", "sse"])
def test_an_mcp_tool_is_offered_by_its_model_name_and_run_through_the_loop(serve_mcp, fake, tmp_path, mode):
    need_filesystem()
    (tmp_path / "todo.txt").write_text("water the basil")
    fake.script = Script(tool_rounds=[[("files__read_text_file", {"path": str(tmp_path / "todo.txt")})]],
                         echo_tools=True)
    server = serve_mcp(MCP_SERVERS="files", MCP_FILES_COMMAND=f"{FILESYSTEM_SERVER} {tmp_path}",
                       AGENT_GENERAL_TOOLS="calc,files.read_text_file")
    text, tools = tool_reply(server, mode)
    assert text == "results: water the basil"
    assert tools == [{"name": "files__read_text_file", "arguments": {"path": str(tmp_path / "todo.txt")},
                      "result": "water the basil"}]
    offered = {t["function"]["name"]: t["function"] for t in fake.generations()[0].body["tools"]}
    assert list(offered) == ["calc", "files__read_text_file"]  # only the allowlist, never the other file tools
    assert "path" in offered["files__read_text_file"]["parameters"]["properties"]  # the server's own schema
    assert metric(server, "piagent_mcp_calls_total") == 'piagent_mcp_calls_total{server="files"} 1'
    assert metric(server, "piagent_mcp_failures_total") == 'piagent_mcp_failures_total{server="files"} 0'


def test_a_call_outside_the_allowlist_or_refused_by_the_server_is_an_error_for_the_model(serve_mcp, fake, tmp_path):
    need_filesystem()
    fake.script = Script(tool_rounds=[[("files__write_file", {"path": str(tmp_path / "x"), "content": "x"}),
                                       ("files__read_text_file", {"path": "/etc/passwd"})]], echo_tools=True)
    server = serve_mcp(MCP_SERVERS="files", MCP_FILES_COMMAND=f"{FILESYSTEM_SERVER} {tmp_path}",
                       AGENT_GENERAL_TOOLS="files.read_text_file")
    _, tools = tool_reply(server, "json")
    assert tools[0]["error"].startswith("there is no tool 'files__write_file'") and not (tmp_path / "x").exists()
    assert "Access denied" in tools[1]["error"]
    assert metric(server, "piagent_mcp_failures_total") == 'piagent_mcp_failures_total{server="files"} 1'


def test_a_star_allows_every_tool_of_a_server_and_a_dead_server_only_fails_its_own_check(serve, fake):
    need(TIME_SERVER is not None, "mcp-server-time (pip install mcp-server-time)")
    server = serve(MCP_SERVERS="time,broken", MCP_TIME_COMMAND=TIME_SERVER, MCP_BROKEN_COMMAND="/nonexistent/mcp",
                   AGENTS="general,clock", AGENT_CLOCK_TOOLS="time.*,broken.*", **UNLIMITED)
    wait_until(lambda: httpx.get(f"{server.url}/ready").json()["checks"]["mcp:time"]["ok"], timeout=30)
    checks = httpx.get(f"{server.url}/ready").json()["checks"]
    assert not checks["mcp:broken"]["ok"] and "No such file" in checks["mcp:broken"]["detail"]
    fake.script = Script(tool_rounds=[[("time__get_current_time", {"timezone": "UTC"})]], echo_tools=True)
    text, tools = tool_reply(server, "json", agent="clock")
    assert '"timezone": "UTC"' in tools[0]["result"] and text.startswith("results: {")
    offered = sorted(t["function"]["name"] for t in fake.generations()[0].body["tools"])
    assert offered == ["time__convert_time", "time__get_current_time"]
    assert httpx.post(f"{server.url}/chat", json={"message": "hi"}).status_code == 200  # other agents go on


def test_a_chat_just_after_start_up_waits_for_a_starting_server_and_is_offered_its_tools(serve, fake):
    """A chat in the first moments (here a server that takes two seconds to start) was offered only the tools already
    listed, so the model was told its time tool did not exist; now it waits, before its place in line."""
    need(TIME_SERVER is not None, "mcp-server-time (pip install mcp-server-time)")
    fake.script = Script(tool_rounds=[[("time__get_current_time", {"timezone": "UTC"})]], echo_tools=True)
    server = serve(MCP_SERVERS="time", MCP_TIME_COMMAND=f"sh -c 'sleep 2; exec {TIME_SERVER}'",
                   AGENT_GENERAL_TOOLS="time.*", **UNLIMITED)
    assert httpx.get(f"{server.url}/ready").json()["checks"]["mcp:time"]["detail"] == "starting"
    text, tools = tool_reply(server, "json")
    offered = sorted(t["function"]["name"] for t in fake.generations()[0].body["tools"])
    assert offered == ["time__convert_time", "time__get_current_time"]
    assert '"timezone": "UTC"' in tools[0]["result"] and text.startswith("results: {")


def test_a_client_leaving_during_a_slow_mcp_call_cancels_it_at_the_server(serve, fake, tmp_path):
    need_sdk()
    fake.script = Script(tool_rounds=[[("sdk__slow", {"seconds": 30})]], echo_tools=True)
    server = serve(MCP_SERVERS="sdk", MCP_SDK_COMMAND=f"{PY} {SDK_SERVER} stdio --events {tmp_path / 'events'}",
                   AGENT_GENERAL_TOOLS="sdk.slow", **UNLIMITED)
    wait_until(lambda: httpx.get(f"{server.url}/ready").json()["checks"]["mcp:sdk"]["ok"], timeout=30)
    sock = raw_post(server.port, "/chat", {"message": "hi", "stream": True})
    wait_until(lambda: "started slow" in events(tmp_path), what="the slow call to start")
    sock.close()
    wait_until(lambda: "cancelled slow" in events(tmp_path), what="the server to see notifications/cancelled")
    assert len(fake.generations()) == 1  # the answer round never ran


def test_a_tool_that_timed_out_is_not_called_again_in_the_same_reply(serve, fake, tmp_path):
    """Each wait holds the Pi's one generation slot: a model asking the same slow tool again (three times here, over
    two rounds) used to wait its whole time-out each time; and a stuck server (a hung mount under a filesystem
    server) was waited for again for each of its other tools."""
    need_sdk()
    fake.script = Script(tool_rounds=[[("sdk__slow", {"seconds": 30}), ("sdk__slow", {"seconds": 30})],
                                      [("sdk__slow", {"seconds": 30}), ("sdk__add", {"a": 1, "b": 2}),
                                       ("calc", {"expression": "6*7"})]], echo_tools=True)
    server = serve(MCP_SERVERS="sdk", MCP_SDK_COMMAND=f"{PY} {SDK_SERVER} stdio --events {tmp_path / 'events'}",
                   MCP_SDK_TIMEOUT_S="2", AGENT_GENERAL_TOOLS="sdk.slow,sdk.add,calc", **UNLIMITED)
    wait_until(lambda: httpx.get(f"{server.url}/ready").json()["checks"]["mcp:sdk"]["ok"], timeout=30)
    _, tools = tool_reply(server, "json")
    errors = [t.get("error") for t in tools]
    assert "no answer to tools/call within 2 s" in errors[0], errors
    assert errors[1:] == [f"{name} not run: MCP server sdk timed out earlier in this reply"
                          for name in ("sdk__slow", "sdk__slow", "sdk__add")] + [None], errors
    assert tools[4]["result"] == "42", tools  # a tool of another source still runs
    assert events(tmp_path).count("started slow") == 1
    assert httpx.get(f"{server.url}/ready").json()["checks"]["mcp:sdk"]["ok"]  # the server itself is fine


def descendants(pid: int) -> set[int]:
    """Every process started under `pid` (MCP servers run in their own sessions, so not found by group)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def test_sigterm_of_piagent_leaves_no_mcp_server_behind(fake, tmp_path):
    need_sdk()
    need_filesystem()
    port = free_port()
    env = {**os.environ, "OLLAMA_HOST": fake.url, "WARMUP": "false", "PORT": str(port), "PIAGENT_ENV_FILE": "",
           "MCP_SERVERS": "sdk,files", "MCP_SDK_COMMAND": f"{PY} {SDK_SERVER} stdio",
           "MCP_FILES_COMMAND": f"{FILESYSTEM_SERVER} {tmp_path}", "AGENT_GENERAL_TOOLS": "sdk.*,files.*", **UNLIMITED}
    proc = subprocess.Popen(piagent_command(), cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        def both_up():
            try:
                checks = httpx.get(f"http://127.0.0.1:{port}/ready").json()["checks"]
            except httpx.HTTPError:
                return False
            return checks["mcp:sdk"]["ok"] and checks["mcp:files"]["ok"]
        wait_until(both_up, timeout=30, what="both MCP servers")
        children = descendants(proc.pid)
        assert len(children) >= 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM once it has shut down
        assert [pid for pid in children if alive(pid)] == []
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("env, says", [
    ({"MCP_SERVERS": "files"}, "MCP_FILES_COMMAND"),
    ({"MCP_SERVERS": "files", "MCP_FILES_COMMAND": "npx 'oops"}, "MCP_FILES_COMMAND"),
    ({"MCP_SERVERS": "web", "MCP_WEB_URL": "localhost:8931"}, "MCP_WEB_URL"),
    ({"AGENT_GENERAL_TOOLS": "web.*"}, "AGENT_GENERAL_TOOLS='web.*' is not valid: expected tools of servers in MCP_SERVERS; add 'web'"),
])
def test_a_bad_mcp_setting_stops_start_up_with_exit_2_naming_the_variable(env, says):
    result = start_up(env={"PIAGENT_ENV_FILE": "", **env})
    assert result.returncode == 2 and says in result.stderr and "Traceback" not in result.stderr


#: Run a command as systemd's MemoryDenyWriteExecute=yes does (the kernel's PR_SET_MDWE, inherited by children):
#: no memory may become writable and executable. Exit 97: this kernel cannot (before Linux 6.3).
MDWE = ("import ctypes, os, sys\n"
        "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0): sys.exit(97)\n"
        "os.execv(sys.argv[1], sys.argv[1:])")


def test_a_node_server_runs_under_the_units_memory_deny_write_execute(fake, tmp_path):
    """The unit sets MemoryDenyWriteExecute=yes, which V8's JIT cannot live with: without the unit's NODE_OPTIONS
    (--jitless, passed on to the servers) the README's filesystem server is killed at start, on the Pi only."""
    need_filesystem()
    unit = (HERE / "piagent.service").read_text()
    assert re.search(r"^MemoryDenyWriteExecute=yes$", unit, re.M)
    unit_env = dict(pair.split("=", 1) for line in re.findall(r"^Environment=(.*)$", unit, re.M)
                    for pair in line.split())
    env = {"PIAGENT_ENV_FILE": "", "OLLAMA_HOST": fake.url, "MCP_SERVERS": "files",
           "MCP_FILES_COMMAND": f"{FILESYSTEM_SERVER} {tmp_path}", "AGENT_GENERAL_TOOLS": "files.*"}
    outcomes = {}
    for name, node_options in (("without", None), ("with the unit's", unit_env.get("NODE_OPTIONS"))):
        child_env = {k: v for k, v in os.environ.items() if k != "NODE_OPTIONS"}
        child_env.update(env, **({"NODE_OPTIONS": node_options} if node_options else {}))
        result = subprocess.run([PY, "-c", MDWE, PY, *piagent_command("--check")[1:]], capture_output=True,
                                text=True, cwd=HERE, env=child_env, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode == 97:
            need(False, "a kernel with PR_SET_MDWE (Linux 6.3 or later)")
        outcomes[name] = result.stdout
    assert "✗ MCP server files: cannot start" in outcomes["without"], outcomes["without"]  # the rule is enforced
    assert "✓ MCP server files: read_file" in outcomes["with the unit's"], outcomes["with the unit's"]


def test_check_lists_each_servers_tools_and_marks_entries_that_match_nothing(fake):
    need(TIME_SERVER is not None, "mcp-server-time (pip install mcp-server-time)")
    result = run_piagent("--check", env={"PIAGENT_ENV_FILE": "", "OLLAMA_HOST": fake.url, "PORT": str(free_port()),
                                         "MCP_SERVERS": "time,broken", "MCP_TIME_COMMAND": TIME_SERVER,
                                         "MCP_BROKEN_COMMAND": "/nonexistent/mcp",
                                         "AGENT_GENERAL_TOOLS": "time.get_current_time,time.nope"}, timeout=60)
    assert "✓ MCP server time: get_current_time, convert_time" in result.stdout
    assert "✗ MCP server broken: cannot start" in result.stdout and "MCP_BROKEN_COMMAND" in result.stdout
    assert "✗ agent general: time.nope matches no tool" in result.stdout
    assert "time.get_current_time matches" not in result.stdout and result.returncode == 1


def test_check_says_why_a_server_exited_in_its_own_words_once(fake):
    """Its last stderr line is the reason ('exited with code 1' alone hid it; node's is its error, not the stack and
    version it ends with), said in its check line only: not also in a stray log line, nor as 'matches no tool' for
    the agent's entries of that server."""
    need(TIME_SERVER is not None, "mcp-server-time (pip install mcp-server-time)")
    need(shutil.which("node") is not None, "node")
    result = run_piagent("--check", env={"PIAGENT_ENV_FILE": "", "OLLAMA_HOST": fake.url, "PORT": str(free_port()),
                                         "MCP_SERVERS": "time,js", "AGENT_GENERAL_TOOLS": "time.*,js.*",
                                         "MCP_TIME_COMMAND": f"{TIME_SERVER} --local-timezone Mars/Base",
                                         "MCP_JS_COMMAND": "node -e \"throw new Error('no folder /srv/notes')\""},
                         timeout=60)
    assert re.search(r"✗ MCP server time: cannot start — the server exited with code 1 \(.*Mars/Base.*\); check "
                     r"MCP_TIME_COMMAND", result.stdout), result.stdout
    assert ("✗ MCP server js: cannot start — the server exited with code 1 (Error: no folder /srv/notes); check "
            "MCP_JS_COMMAND") in result.stdout, result.stdout
    assert "matches no tool" not in result.stdout and result.stderr == "" and result.returncode == 1
