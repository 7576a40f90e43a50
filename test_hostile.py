"""Issue 13, as tests: what a hostile client, a broken upstream, a full disk or a flood of sockets does to piagent.

Everything goes through real HTTP on 127.0.0.1 (an in-thread uvicorn, or a real `python piagent.py` where the
process itself is the subject: file descriptors, its log, its memory). The upstream is fake_ollama.FakeOllama.
Failures are injected only through create_app's documented seams: `transport=` (an httpx transport), `tools=`
(a mapping name -> piagent.Tool) and `store=` (a MemoryStore, here a real InProcessStore wrapped by delegation).

Every test ends by checking that piagent is still whole: /health answers, a normal chat is served within a
deadline (the slot and the conversation are free), the gauges are back to 0, and nothing was stored that should
not have been.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gzip
import json
import os
import re
import resource
import signal
import shutil
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import piagent
from fake_ollama import FakeOllama, Script
from piagent import create_app, load_config
from test_piagent import (HERE, KEY, MODEL, OTHER_KEY, LiveServer, RedisServer, find_redis_server, free_port,
                          in_background, in_process, parse_metrics, piagent_command, piagent_process, piagent_records,
                          sample, wait_until)

DEADLINE = 5.0  # upper bound for polls and for "is served" in this file
REPLY = "Hello from the Pi!"  # what the fake's default Script answers
SSE = {"Accept": "text/event-stream"}
GAUGES = ("piagent_generations_active", "piagent_queue_depth", "piagent_active_streams")


# ---------------------------------------------------------------------------
# Harness
# ---------------------------------------------------------------------------


@pytest.fixture
def fake():
    server = FakeOllama(models=[MODEL]).start()
    yield server
    server.stop()


@pytest.fixture
def hserve(fake):
    """hserve(store=factory(config) | None, tools=..., transport=..., **env) -> LiveServer in front of the fake."""
    servers = []

    def start(*, store=None, tools=None, transport=None, **env):
        # no rate limit unless a test sets one: these tests poll /ready and /metrics
        config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false", "SHUTDOWN_GRACE_S": "1",
                              "RATE_LIMIT_PER_MIN": "0", **{k: str(v) for k, v in env.items()}})
        seams = {}
        if store is not None:
            seams["store"] = store(config)
        if tools is not None:
            seams["tools"] = tools
        if transport is not None:
            seams["transport"] = transport
        server = LiveServer(create_app(config, **seams)).__enter__()
        servers.append(server)
        return server

    yield start
    fake.script.release.set()  # a test that failed half-way must not leave the fake holding a stream
    for server in servers:
        server.__exit__(None, None, None)


class FlakyStore:
    """The memory-store protocol by delegation to a real store, raising a chosen exception at chosen calls.

    fail("append", lambda: OSError(...)) makes the next append raise; every other call goes to the real store.
    """

    def __init__(self, inner):
        self.inner = inner
        self.faults: dict[str, list] = {}

    def fail(self, method: str, make_exception, times: int = 1) -> "FlakyStore":
        self.faults.setdefault(method, []).extend([make_exception] * times)
        return self

    async def _call(self, method: str, *args):
        pending = self.faults.get(method)
        if pending:
            raise pending.pop(0)()
        return await getattr(self.inner, method)(*args)

    async def open(self):
        return await self._call("open")

    async def close(self):
        return await self._call("close")

    async def history(self, conversation_id):
        return await self._call("history", conversation_id)

    async def append(self, conversation_id, agent, user, assistant):
        return await self._call("append", conversation_id, agent, user, assistant)

    async def get(self, conversation_id):
        return await self._call("get", conversation_id)

    async def delete(self, conversation_id):
        return await self._call("delete", conversation_id)

    async def recent(self, limit, before):
        return await self._call("recent", limit, before)

    async def count(self):
        return await self._call("count")


def flaky(holder: dict):
    """A store factory for hserve that also hands the FlakyStore back in holder["store"]."""
    def build(config):
        holder["store"] = FlakyStore(piagent.InProcessStore(config, time.time))
        return holder["store"]
    return build


class FailingTransport(httpx.AsyncBaseTransport):
    """A real httpx transport to the fake, except that the next `fail_next` generation requests raise."""

    def __init__(self, exception_factory):
        self.real = httpx.AsyncHTTPTransport()
        self.make, self.fail_next = exception_factory, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.fail_next and request.url.path in ("/api/chat", "/api/generate", "/v1/chat/completions"):
            self.fail_next -= 1
            raise self.make()
        return await self.real.handle_async_request(request)

    async def aclose(self) -> None:
        await self.real.aclose()


def post(server, path, body=None, headers=None, raw: bytes | None = None, timeout=DEADLINE) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content,
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=timeout)


def chat(server, headers=None, **body) -> httpx.Response:
    return post(server, "/chat", body, headers)


def v1(server, headers=None, **body) -> httpx.Response:
    return post(server, "/v1/chat/completions", {"model": "general", **body}, headers)


def served_chat(server, conversation_id: str, headers=None, message: str = "normal") -> httpx.Response:
    """A normal chat that must be answered 200 within DEADLINE: the slot and the conversation are free."""
    try:
        response = chat(server, headers, message=message, conversation_id=conversation_id)
    except httpx.TimeoutException:
        raise AssertionError(f"a normal chat on {conversation_id!r} was not served within {DEADLINE} s: "
                             f"a generation slot or the conversation is still held") from None
    assert response.status_code == 200, (response.status_code, response.text)
    return response


def error_of(response: httpx.Response) -> dict:
    """The error object of either shape ({"error": {"code", "message"}} or OpenAI's)."""
    body = response.json()
    assert "error" in body and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def stored(server, conversation_id: str, headers=None) -> list[tuple[str, str]] | None:
    """The conversation's turns as (user, assistant) through the conversation API; None if it is 404."""
    response = httpx.get(f"{server.url}/conversations/{conversation_id}", headers=headers, timeout=DEADLINE)
    if response.status_code == 404:
        return None
    assert response.status_code == 200, (response.status_code, response.text)
    return [(t["user"], t["assistant"]) for t in response.json()["turns"]]


def metric_families(server, headers=None) -> dict:
    response = httpx.get(f"{server.url}/metrics", headers=headers, timeout=DEADLINE)
    assert response.status_code == 200, (response.status_code, response.text)
    return parse_metrics(response.text)


def metric_sum(families: dict, name: str, family: str, **labels) -> float:
    if family not in families:
        return 0.0
    return sum(s.value for s in families[family].samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def statuses_counted(server, status: str, headers=None) -> float:
    return metric_sum(metric_families(server, headers), "piagent_requests_total", "piagent_requests", status=status)


def upstream_errors_counted(server) -> float:
    return metric_sum(metric_families(server), "piagent_upstream_errors_total", "piagent_upstream_errors")


def gauges(server, headers=None) -> dict[str, float]:
    families = metric_families(server, headers)
    return {name: sample(families, name) for name in GAUGES}


def assert_idle(server, headers=None) -> None:
    """Within DEADLINE: nothing generating, nothing queued, no stream open."""
    last = {}

    def idle():
        last.update(gauges(server, headers))
        return all(v == 0 for v in last.values())

    try:
        wait_until(idle, timeout=DEADLINE, what="the gauges to return to 0")
    except AssertionError:
        raise AssertionError(f"gauges not back to 0 within {DEADLINE} s: {last}") from None


def assert_whole(server, fake, conversation_id: str, before: list | None, headers=None) -> None:
    """/health answers, the gauges are 0, the conversation holds exactly `before` (None: nothing), and a normal
    chat on it is served and stored after it."""
    assert httpx.get(f"{server.url}/health", timeout=DEADLINE).status_code == 200
    assert_idle(server, headers)
    assert stored(server, conversation_id, headers) == before
    fake.script = Script()
    served_chat(server, conversation_id, headers)
    assert stored(server, conversation_id, headers) == [*(before or []), ("normal", REPLY)]


def sse_events(response: httpx.Response) -> list[tuple[str, str]]:
    """(event name, data) of an SSE body; comments skipped, "message" when no event line."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line == "":
            if data:
                events.append((name or "message", "\n".join(data)))
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
    if data:
        events.append((name or "message", "\n".join(data)))
    return events


def nested_brackets(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> dict:
    """{"a": {"a": ... {}}}, `depth` objects deep."""
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# ---------------------------------------------------------------------------
# 4) Client bad input is refused at the door: 422 naming the field, never upstream, never counted as upstream
# ---------------------------------------------------------------------------

SURROGATE = "\\ud800"  # JSON text of a lone surrogate: valid JSON, not a valid Unicode string


def _v1_body(messages: str = '[{"role":"user","content":"hi"}]', tools: str | None = None) -> bytes:
    tools_part = f',"tools":{tools}' if tools is not None else ""
    return f'{{"model":"general","messages":{messages}{tools_part}}}'.encode()


def _tool(parameters: str, description: str = "d") -> str:
    return (f'[{{"type":"function","function":{{"name":"f","description":"{description}",'
            f'"parameters":{parameters}}}}}]')


DOOR_CASES = {
    "chat-message-surrogate": ("/chat", f'{{"message":"hi {SURROGATE}","conversation_id":"door"}}'.encode(), "message"),
    "chat-ignored-field-nan": ("/chat", b'{"message":"hi","conversation_id":"door","temperature":NaN}', "temperature"),
    "chat-ignored-field-deep": ("/chat", f'{{"message":"hi","conversation_id":"door","extra":{{"deep":'
                                         f'{nested_brackets(100)}}}}}'.encode(), "extra.deep"),
    "v1-content-surrogate": ("/v1/chat/completions", _v1_body(f'[{{"role":"user","content":"x{SURROGATE}"}}]'),
                             "messages.0.content"),
    "v1-text-part-surrogate": ("/v1/chat/completions",
                               _v1_body(f'[{{"role":"user","content":[{{"type":"text","text":"{SURROGATE}"}}]}}]'),
                               "messages.0.content.0.text"),
    "v1-tool-description-surrogate": ("/v1/chat/completions", _v1_body(tools=_tool('{"type":"object"}', SURROGATE)),
                                      "tools.0.function.description"),
    "v1-tool-schema-nan": ("/v1/chat/completions", _v1_body(tools=_tool(
        '{"type":"object","properties":{"n":{"type":"number","default":NaN}}}')), "tools.0.function.parameters"),
    "v1-tool-schema-infinity": ("/v1/chat/completions", _v1_body(tools=_tool(
        '{"type":"object","properties":{"n":{"type":"number","maximum":Infinity}}}')), "tools.0.function.parameters"),
    "v1-tool-schema-65-deep": ("/v1/chat/completions", _v1_body(tools=_tool(
        f'{{"type":"object","x":{nested_brackets(65)}}}')), "tools.0.function.parameters"),
    "v1-tool-schema-960-deep": ("/v1/chat/completions", _v1_body(tools=_tool(
        f'{{"type":"object","x":{nested_brackets(960)}}}')), "tools.0.function.parameters"),
    # whatever comes before the JSON (a space, a UTF-8 byte order mark), a route may still read it: checked as well
    "v1-content-surrogate-after-a-space": ("/v1/chat/completions", b" " + _v1_body(
        f'[{{"role":"user","content":"x{SURROGATE}"}}]'), "messages.0.content"),
    # not UTF-8: never taken for the number case below
    "chat-latin-1-body": ("/chat", b'{"message":"caf\xe9","conversation_id":"door"}', "UTF-8"),
    # valid JSON that Python will not read (a whole number past 4300 digits): it was "error parsing the body"
    "chat-number-of-5000-digits": ("/chat", b'{"message":"hi","conversation_id":"door","temperature":' + b"7" * 5000
                                   + b"}", "body: a number longer than 4300 digits"),
    "v1-number-of-5000-digits": ("/v1/chat/completions",
                                 _v1_body('[{"role":"user","content":"hi"}],"seed":' + "7" * 5000),
                                 "body: a number longer than 4300 digits"),
    "chat-ignored-field-nan-after-a-bom": ("/chat", b'\xef\xbb\xbf{"message":"hi","conversation_id":"door",'
                                                    b'"temperature":NaN}', "temperature"),
}


@pytest.mark.parametrize("case", list(DOOR_CASES))
def test_bad_client_json_is_422_naming_the_field_and_never_reaches_the_upstream(hserve, fake, case):
    path, raw, field_path = DOOR_CASES[case]
    server = hserve()
    response = post(server, path, raw=raw)
    assert response.status_code == 422, (response.status_code, response.text)
    error = error_of(response)
    assert error["code"] == "invalid_request" and field_path in error["message"], error
    assert fake.generations() == []
    assert upstream_errors_counted(server) == 0 and statuses_counted(server, "500") == 0
    assert_whole(server, fake, "door", None)


def test_nesting_up_to_64_levels_is_still_accepted(hserve, fake):
    # the limit is on depth, not on having nesting at all: about 56 levels in a client tool schema are fine
    server = hserve()
    response = post(server, "/v1/chat/completions", raw=_v1_body(tools=_tool(
        f'{{"type":"object","x":{nested_brackets(50)}}}')))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("cursor", ["nan", "inf", "-inf", "1e999"])
def test_a_page_cursor_that_is_no_number_is_422_naming_it(hserve, fake, cursor):
    # Redis read it as a bound it refused (a 500); the other stores gave an empty page as if it were one
    server = hserve()
    served_chat(server, "listed")
    response = httpx.get(f"{server.url}/conversations", params={"cursor": cursor}, timeout=DEADLINE)
    assert response.status_code == 422 and "cursor" in error_of(response)["message"], response.text
    assert statuses_counted(server, "500") == 0
    assert_whole(server, fake, "listed", [("normal", REPLY)])


# ---------------------------------------------------------------------------
# 3) Broken upstream data: 502 upstream_error naming the field, never a 500, never a stored turn
# ---------------------------------------------------------------------------


def _change(kinds: set[str], change):
    return lambda obj, kind: change(obj) if kind in kinds else obj


def _with_message(**values):
    return lambda o: {**o, "message": {**o["message"], **values}}


BROKEN = {  # name: (Script.mangle, a field path the error message names)
    "content-int": (_change({"piece", "whole"}, _with_message(content=123)), "message.content"),
    "content-list": (_change({"piece", "whole"}, _with_message(content=["Hello"])), "message.content"),
    "message-int": (_change({"piece", "whole"}, lambda o: {**o, "message": 5}), "message"),
    "model-int": (_change({"final", "whole"}, lambda o: {**o, "model": 123}), "model"),
    "eval-count-str": (_change({"final", "whole"}, lambda o: {**o, "eval_count": "manylots"}), "eval_count"),
    "prompt-count-str": (_change({"final", "whole"}, lambda o: {**o, "prompt_eval_count": "12"}),
                         "prompt_eval_count"),
    # valid JSON, not text: it can be neither stored nor sent on (the fake sends it as an escape in a whole body,
    # in UTF-8's form in a streamed line: Python's JSON reader takes both)
    "content-lone-surrogate": (_change({"piece", "whole"}, _with_message(content="bad \ud800 text")),
                               "message.content"),
    # readable, but nested past what piagent sends on (near Python's limit it would fail later, sending it on)
    "tool-arguments-100-deep": (_change({"piece", "whole"}, _with_message(tool_calls=[
        {"function": {"name": "calc", "arguments": nested_object(100)}}])), "message.tool_calls.0.function.arguments"),
}


def _assert_upstream_error(error: dict, field: str) -> None:
    assert error["code"] == "upstream_error", error
    assert field in error["message"], f"the message does not name {field!r}: {error}"


def _v1_chunks_are_well_typed(chunks: list[dict]) -> None:
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            content = (choice.get("delta") or {}).get("content")
            assert content is None or isinstance(content, str), chunk
        usage = chunk.get("usage")
        if usage:
            assert all(type(v) is int for v in usage.values()), chunk


@pytest.mark.parametrize("mode", ["json", "sse", "v1", "v1-stream"])
@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_upstream_data_is_502_naming_the_field_and_stores_nothing(hserve, fake, case, mode):
    mangle, field = BROKEN[case]
    server = hserve()
    cid = f"broken-{case}-{mode}"
    fake.script = Script(mangle=mangle)
    if mode in ("json", "v1"):
        response = chat(server, message="hi", conversation_id=cid) if mode == "json" else \
            v1(server, {"X-Conversation-Id": cid}, messages=[{"role": "user", "content": "hi"}])
        assert response.status_code == 502, (response.status_code, response.text)
        _assert_upstream_error(error_of(response), field)
    else:
        path, body, headers = ("/chat", {"message": "hi", "stream": True, "conversation_id": cid}, SSE) \
            if mode == "sse" else ("/v1/chat/completions", {"model": "general", "stream": True, "messages": [
                {"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}},
                {"X-Conversation-Id": cid})
        with httpx.stream("POST", f"{server.url}{path}", json=body, headers=headers, timeout=DEADLINE) as response:
            if response.status_code != 200:  # broken before the first token: an HTTP error
                response.read()
                assert response.status_code == 502, (response.status_code, response.text)
                _assert_upstream_error(error_of(response), field)
            else:  # broken after tokens went out: the stream's own error path
                events = sse_events(response)
                if mode == "sse":
                    assert "done" not in [e for e, _ in events], events
                    name, data = events[-1]
                    assert name == "error", events
                    _assert_upstream_error(json.loads(data)["error"], field)
                else:
                    assert events and events[-1][1] != "[DONE]", events
                    chunks = [json.loads(d) for _, d in events]
                    _v1_chunks_are_well_typed(chunks[:-1])
                    _assert_upstream_error(chunks[-1]["error"], field)
    assert statuses_counted(server, "500") == 0
    assert_whole(server, fake, cid, None)


class CannedTransport(httpx.AsyncBaseTransport):
    """A real transport to the fake, except that the next requests to a path in `answers` get its canned responses
    (each a function of the request, used once) instead."""

    def __init__(self, answers: dict[str, list]):
        self.real, self.answers = httpx.AsyncHTTPTransport(), answers

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        canned = self.answers.get(request.url.path)
        if canned:
            return canned.pop(0)(request)
        return await self.real.handle_async_request(request)

    async def aclose(self) -> None:
        await self.real.aclose()


def _openai_reply(message: dict, delta: dict):
    """The same odd reply whole (a JSON body) or streamed (SSE), as the request asks."""
    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            event = {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            return httpx.Response(200, headers={"Content-Type": "text/event-stream"},
                                  content=f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
        return httpx.Response(200, json={"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})
    return answer


ODD_OPENAI = {  # name: (path, canned answer, the door's request (path, body), the field the 502 names)
    "tool-call-function-a-list": ("/v1/chat/completions", _openai_reply(
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": ["x"]}]},
        {}), ("/chat", {"message": "hi", "conversation_id": "odd"}), "tool_calls[].function"),
    "streamed-tool-call-function-a-string": ("/v1/chat/completions", _openai_reply(
        {}, {"tool_calls": [{"index": 0, "id": "c1", "function": "oops"}]}),
        ("/v1/chat/completions", {"model": "general", "stream": True, "messages": [
            {"role": "user", "content": "hi"}]}), "tool_calls[].function"),
    "embedding-index-a-string": ("/v1/embeddings", lambda request: httpx.Response(200, json={"data": [
        {"index": "1", "embedding": [0.5]}, {"index": 0, "embedding": [0.25]}]}),
        ("/api/embed", {"model": "general", "input": ["a", "b"]}), "data[].index"),
}


@pytest.mark.parametrize("case", list(ODD_OPENAI))
def test_odd_fields_from_an_openai_style_upstream_are_502_naming_them(hserve, fake, case):
    """A tool call whose function is not an object, an embedding's index that is not a number: each was a 500."""
    path, answer, (door, body), field = ODD_OPENAI[case]
    transport = CannedTransport({path: [answer]})
    server = hserve(transport=transport, PROVIDER="openai", OPENAI_BASE_URL=f"{fake.url}/v1")
    response = post(server, door, body, {"X-Conversation-Id": "odd"} if door.startswith("/v1") else None)
    if response.status_code == 200:  # streamed: the error is the stream's last event
        (last,) = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")][-1:]
        error = last["error"]
    else:
        assert response.status_code == 502, (response.status_code, response.text)
        error = response.json()["error"]
    assert field in (error if isinstance(error, str) else error["message"]), error
    assert statuses_counted(server, "500") == 0 and transport.answers[path] == []
    assert_whole(server, fake, "odd", None)


def test_an_upstream_error_page_is_read_only_so_far(hserve, fake):
    """An upstream that answers an error with an endless body: piagent reads enough for the message and closes it,
    where it read it whole into memory (hundreds of MiB on a Pi)."""
    sent = [0]

    async def endless():
        for _ in range(4096):  # at most 256 MiB, were it all read
            sent[0] += 65536
            yield b"x" * 65536

    transport = CannedTransport({"/api/chat": [lambda request: httpx.Response(500, content=endless())]})
    server = hserve(transport=transport)
    response = chat(server, message="hi", conversation_id="paged")
    assert response.status_code == 502 and error_of(response)["code"] == "upstream_error", response.text
    assert sent[0] <= 1 << 20, f"piagent read {sent[0]} bytes of an error page"
    assert_whole(server, fake, "paged", None)


def test_an_upstreams_cookies_are_not_kept_nor_sent_back(hserve, fake):
    """An upstream is an API, not a browser session: a cookie one reply sets is not sent with the next request
    (httpx's cookie jar read every reply's headers, a part of each reply's time to first token)."""
    done = {"model": MODEL, "created_at": "2026-11-25T00:00:00Z", "message": {"role": "assistant", "content": "hi"},
            "done": True, "done_reason": "stop"}
    transport = CannedTransport({"/api/chat": [lambda request: httpx.Response(
        200, headers={"Content-Type": "application/x-ndjson", "Set-Cookie": "session=s3cret; Path=/"},
        content=json.dumps(done).encode() + b"\n")]})
    server = hserve(transport=transport)
    first = chat(server, message="hi", conversation_id="cookie")
    assert first.status_code == 200 and first.json()["reply"] == "hi" and transport.answers["/api/chat"] == []
    assert_whole(server, fake, "cookie", [("hi", "hi")])
    (sent,) = fake.generations()
    assert "cookie" not in sent.headers, sent.headers


@pytest.mark.parametrize("stream", [False, True])
def test_a_compressed_upstream_reply_is_refused_unread(hserve, fake, stream):
    """httpx unpacked a gzip reply with no limit, a whole network read at a time: 200 KB of it (200 MiB of newlines)
    took piagent to 4.8 GiB and stalled /health for a minute. piagent asks every upstream for replies uncompressed,
    and a compressed one, however small and well-formed, is closed unread: a 502 naming Content-Encoding."""
    done = {"model": MODEL, "created_at": "2026-11-25T00:00:00Z", "message": {"role": "assistant", "content": "hi"},
            "done": True, "done_reason": "stop"}
    asked = []

    def gzipped(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers.get("accept-encoding"))
        return httpx.Response(200, headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
                              content=gzip.compress(json.dumps(done).encode() + b"\n"))

    transport = CannedTransport({"/api/chat": [gzipped]})
    server = hserve(transport=transport)
    refused = chat(server, message="hi", conversation_id="gz", stream=stream)
    assert asked == ["identity"] and transport.answers["/api/chat"] == []
    # streamed or not, it failed before the first token: the reply's status says so
    assert refused.status_code == 502 and error_of(refused)["code"] == "upstream_error", refused.text
    assert "sent a compressed reply (Content-Encoding: 'gzip')" in error_of(refused)["message"], refused.text
    assert_whole(server, fake, "gz", None)
    assert fake.generations()[-1].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("streamed", [True, False])
def test_the_upstream_client_refuses_a_compressed_reply_before_reading_any_of_it(streamed):
    """Asked without stream=True (as MCP's closing DELETE is), httpx reads a whole reply before handing it over: the
    refusal must come before that, not after it unpacked the lot."""
    pulled, asked = [], []

    class Bomb(httpx.AsyncByteStream):
        async def __aiter__(self):
            pulled.append("a chunk")
            yield gzip.compress(b"\n" * (8 << 20))

    def bomb(request: httpx.Request) -> httpx.Response:
        asked.append(request.headers["accept-encoding"])
        return httpx.Response(200, headers={"Content-Encoding": "gzip"}, stream=Bomb())

    async def scenario() -> None:
        async with piagent.UpstreamClient("http://127.0.0.1:9", transport=httpx.MockTransport(bomb)) as client:
            with pytest.raises(piagent.CompressedReply, match=r"Content-Encoding: 'gzip'"):
                if streamed:
                    async with client.stream("POST", "http://127.0.0.1:9/api/chat", json={}):
                        pass
                else:
                    await client.delete("http://127.0.0.1:9/mcp")

    asyncio.run(scenario())
    assert pulled == [] and asked == ["identity"]


def self_signed(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A certificate for 127.0.0.1 made with openssl, and a server TLS context presenting it."""
    openssl = shutil.which("openssl")
    if openssl is None and os.environ.get("CI") != "true":
        pytest.skip("openssl is not installed: sudo apt install openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl or "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    return cert, server


def test_an_https_upstream_is_checked_and_an_http_client_trusts_no_certificate(tmp_path, monkeypatch):
    """Only a client made for an https:// URL loads the CA certificates (22 ms a client, at each start and --check).
    An https upstream is still checked against them; one made for http:// trusts nothing, so if it ever met https
    it would fail, not go unchecked."""
    cert, server_tls = self_signed(tmp_path)
    fake = FakeOllama(models=[MODEL], tls=server_tls).start()
    try:
        assert fake.url.startswith("https://")
        config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false", "ENABLE_MEMORY": "false",
                              "MCP_SERVERS": "web", "MCP_WEB_URL": f"{fake.url}/mcp"})
        with LiveServer(create_app(config)) as server:  # the certificate is not trusted
            refused = chat(server, message="hi")
            assert refused.status_code == 503, refused.text
            assert "sent a TLS certificate piagent does not trust" in refused.json()["error"]["message"], refused.text
            assert "SSL_CERT_FILE" in refused.json()["error"]["message"], refused.text

            def mcp_check() -> str:
                return httpx.get(f"{server.url}/ready").json()["checks"]["mcp:web"]["detail"]

            wait_until(lambda: "sent a TLS certificate piagent does not trust" in mcp_check(), what="the MCP check")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx's way to trust another CA, read when a client is made
        with LiveServer(create_app(config)) as server:
            served = chat(server, message="hi")
            assert served.status_code == 200 and served.json()["reply"] == REPLY, served.text

        async def through(client_url: str) -> int:
            async with piagent.UpstreamClient(client_url, timeout=DEADLINE) as client:
                return (await client.get(f"{fake.url}/api/version")).status_code

        assert asyncio.run(through(fake.url)) == 200
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            asyncio.run(through(fake.url.replace("https://", "http://")))
        assert len(fake.generations()) == 1  # the refused chat never reached it
    finally:
        fake.stop()


def test_an_upstream_that_redirects_says_where_to_rather_than_not_json(hserve, fake):
    """A proxy sending http to https answers 301: piagent read its body as the reply ("not JSON", or a stream that
    "ended early"), and /ready said so too, with nothing pointing at the address. httpx does not follow it (a POST
    would not survive most redirects), so piagent names where it points: a 502, the slot free, nothing stored."""
    server = hserve()
    fake.redirect = elsewhere = "https://127.0.0.1:11443"
    told = (f"Ollama at {fake.url} redirects to {elsewhere}/api/chat (HTTP 301); set OLLAMA_HOST={elsewhere}"
            .replace("(", r"\(").replace(")", r"\)"))
    answers = [chat(server, message="hi", conversation_id="moved"), v1(server, stream=True, messages=[
        {"role": "user", "content": "hi"}]), post(server, "/api/chat", {"model": "general", "messages": [
            {"role": "user", "content": "hi"}]})]
    assert [a.status_code for a in answers] == [502, 502, 502], [a.text for a in answers]
    assert all(re.search(told + r"\W", a.text) for a in answers), [a.text for a in answers]
    wait_until(lambda: f"redirects to {elsewhere}/api/version (HTTP 301); set OLLAMA_HOST={elsewhere}\"" in
               httpx.get(f"{server.url}/ready").text, what="/ready naming the redirect")
    # OPENAI_BASE_URL keeps its path (/v1): only the part piagent added (/chat/completions) is taken off
    behind = hserve(PROVIDER="openai", OPENAI_BASE_URL=f"{fake.url}/v1", OPENAI_MODEL_GENERAL=MODEL)
    assert f"set OPENAI_BASE_URL={elsewhere}/v1\"" in chat(behind, message="hi").text
    fake.redirect = None
    assert served_chat(server, "moved").json()["reply"] == REPLY
    assert [m["content"] for m in fake.generations()[-1].body["messages"][1:]] == ["normal"]  # no "hi" kept


def test_a_password_in_an_upstream_url_is_used_but_never_shown(fake):
    """OLLAMA_HOST=http://user:password@proxy is how one reaches an Ollama behind a reverse proxy: the password went
    into error bodies, /ready (which the page shows), the start-up log and --check. So did one in an MCP server's URL
    (its errors reach the model and the client) and in REDIS_URL (its 503 reaches the client)."""
    secret = "s3cret-pw"

    def with_password(url: str) -> str:
        return url.replace("://", f"://me:{secret}@", 1)

    dead = f"http://127.0.0.1:{free_port()}"
    env = {"OLLAMA_HOST": with_password(fake.url), "WARMUP": "false", "ENABLE_MEMORY": "false", "MCP_SERVERS": "web",
           "MCP_WEB_URL": with_password(dead) + "/mcp", "AGENT_GENERAL_TOOLS": "web.*", "PIAGENT_ENV_FILE": ""}
    with LiveServer(create_app(load_config(env))) as server:  # used: sent as HTTP basic auth
        assert served_chat(server, "pw1").json()["reply"] == REPLY
        assert fake.requests[-1].headers["authorization"] == "Basic " + base64.b64encode(f"me:{secret}".encode()).decode()
    env.update(OLLAMA_HOST=with_password(dead), MEMORY_BACKEND="redis", REDIS_URL=with_password(f"redis://{dead[7:]}/0"))
    env.update(ENABLE_MEMORY="true")
    checked = in_process(["--check"], env)
    assert checked.returncode == 1 and "***@127.0.0.1" in checked.stdout, checked.stdout
    env.update(ENABLE_MEMORY="false")
    with piagent_process(env, capture=True) as (url, proc):
        refused = httpx.post(f"{url}/chat", json={"message": "hi"}, timeout=DEADLINE)
        assert refused.status_code == 503 and "***@127.0.0.1" in refused.text, refused.text
        wait_until(lambda: not httpx.get(f"{url}/ready").json()["checks"]["mcp:web"]["ok"], what="the MCP check")
        ready = httpx.get(f"{url}/ready").text
    logged = proc.stdout.read()
    for shown in (checked.stdout + checked.stderr, refused.text, ready, logged):
        assert secret not in shown, shown[-3000:]


@pytest.mark.parametrize("stream", [False, True])
def test_a_done_that_is_not_a_boolean_is_502_naming_it(hserve, fake, stream):
    """'"done": "false"' was read as true: a stream ended at its first line, and that cut reply was stored and
    reported whole. done is type-checked like every other field."""
    line = {"model": MODEL, "created_at": "2026-11-25T00:00:00Z", "message": {"role": "assistant", "content": "Hel"},
            "done": "false"}
    rest = {**line, "message": {"role": "assistant", "content": "lo"}, "done": True, "done_reason": "stop"}
    transport = CannedTransport({"/api/chat": [lambda request: httpx.Response(
        200, headers={"Content-Type": "application/x-ndjson"},
        content=b"".join(json.dumps(x).encode() + b"\n" for x in ((line, rest) if stream else (line,))))]})
    server = hserve(transport=transport)
    refused = chat(server, message="hi", conversation_id="done", stream=stream)
    assert refused.status_code == 502 and "sent done as a string, not true or false" in error_of(refused)["message"], \
        refused.text
    assert transport.answers["/api/chat"] == []
    assert_whole(server, fake, "done", None)


def test_an_error_line_mid_stream_reaches_the_client_cut_short(hserve, fake):
    """An upstream's {"error"} line mid-stream went to the client (and the log) whole, up to a 1 MiB line; an error
    reply's message is cut at 500 characters, and so is this one now."""
    token = {"model": MODEL, "created_at": "2026-11-25T00:00:00Z", "message": {"role": "assistant", "content": "Hel"},
             "done": False}
    transport = CannedTransport({"/api/chat": [lambda request: httpx.Response(
        200, headers={"Content-Type": "application/x-ndjson"},
        content=json.dumps(token).encode() + b"\n" + json.dumps({"error": "E" * 300_000}).encode() + b"\n")]})
    server = hserve(transport=transport)
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True, "conversation_id": "err"},
                      headers={"Accept": "text/event-stream"}, timeout=DEADLINE) as response:
        events = sse_events(response)
    name, data = events[-1]
    assert name == "error" and 0 < json.loads(data)["error"]["message"].count("E") <= 500, data[:200]
    assert_whole(server, fake, "err", None)  # a reply the upstream broke off is not stored


@pytest.mark.parametrize("retry_after", ["\u20ac", "999999999999", "Wed, 21 Oct 2026 07:28:00 GMT"])
def test_an_upstream_retry_after_is_passed_on_only_as_plain_seconds(hserve, fake, retry_after):
    # a non-latin-1 one was a 500 (the header could not be written); a date or a huge number is no use to a client
    server = hserve()
    fake.script = Script(status=503, error_text="server busy", retry_after=retry_after)
    for response in (chat(server, message="hi", conversation_id="busy"),
                     post(server, "/api/generate", {"model": "general", "prompt": "hi", "stream": False})):
        assert response.status_code == 503, (response.status_code, response.text)
        assert response.headers["retry-after"] == str(piagent.DEFAULT_RETRY_AFTER_S)
    fake.script = Script(status=503, error_text="server busy", retry_after="7")
    assert chat(server, message="hi", conversation_id="busy").headers["retry-after"] == "7"
    assert statuses_counted(server, "500") == 0
    assert_whole(server, fake, "busy", None)


ODD_LISTS = {  # Ollama's own answer with a field of the wrong type: piagent answers with what it knows
    "/api/tags": {"models": 5},
    "/api/ps": {"models": 1.5},
    "/api/show": {"capabilities": 5, "template": 7, "details": "big"},
}


@pytest.mark.parametrize("path", list(ODD_LISTS))
def test_ollamas_model_lists_with_odd_fields_still_answer_with_the_agents(hserve, fake, path):
    # the routes Home Assistant and Open WebUI call: each was a 500
    transport = CannedTransport({path: [lambda request: httpx.Response(200, json=ODD_LISTS[path])]})
    server = hserve(transport=transport)
    if path == "/api/show":
        response = post(server, path, {"model": "general"})
        assert response.status_code == 200 and response.json()["capabilities"] == ["completion"], response.text
    else:
        response = httpx.get(f"{server.url}{path}", timeout=DEADLINE)
        names = [m["name"] for m in response.json()["models"]]
        assert response.status_code == 200 and names == ([] if path == "/api/ps" else ["general:latest"]), names
    assert transport.answers[path] == [] and statuses_counted(server, "500") == 0
    assert_whole(server, fake, "lists", None)


def test_json_from_outside_that_python_reads_but_cannot_send_on_is_refused_saying_why():
    refused = {b'{"message": {"content": "a \\ud800 b"}}': "message.content holds a lone surrogate",
               b'{"a": "\xed\xa0\x80"}': "a holds a lone surrogate", '{"k\\udfff": 1}': "a key in body",
               b'{"eval_count": NaN}': "NaN is not a JSON number", b"[" * 100_000: "nested too deep"}
    for raw, why in refused.items():
        with pytest.raises(ValueError, match=re.escape(why)):
            piagent.external_json(raw)
    assert piagent.external_json('{"a": ["\\uD83D\\uDE00", "\\u00e9"]}') == {"a": ["\U0001F600", "\u00e9"]}


@pytest.mark.parametrize("door", ["sse", "v1-stream", "ollama-stream"])
def test_a_reply_whose_upstream_holds_the_connection_open_after_its_end_is_delivered_and_stored(hserve, fake, door):
    """The done line (or [DONE]) ends the reply: piagent does not wait UPSTREAM_TIMEOUT_S for the body's end."""
    server = hserve(UPSTREAM_TIMEOUT_S=60)
    fake.script = Script(hold_after_end=True)
    cid = f"held-{door}"
    messages = [{"role": "user", "content": "hi"}]
    path, body, headers = {
        "sse": ("/chat", {"message": "hi", "stream": True, "conversation_id": cid}, SSE),
        "v1-stream": ("/v1/chat/completions", {"model": "general", "stream": True, "messages": messages},
                      {"X-Conversation-Id": cid}),
        "ollama-stream": ("/api/chat", {"model": "general", "messages": messages}, {"X-Conversation-Id": cid})}[door]
    try:
        response = post(server, path, body, headers)
    except httpx.TimeoutException:
        raise AssertionError(f"the reply did not end within {DEADLINE} s of its done line") from None
    assert response.status_code == 200, response.text
    last = response.text.strip().splitlines()[-1]
    assert {"sse": '"done_reason":"stop"', "v1-stream": "data: [DONE]", "ollama-stream": '"done":true'}[door] in last
    # piagent reads on for at most AFTER_END_WAIT_S, then closes; the fake sees that within a few ms (it polls)
    wait_until(lambda: fake.hangups, timeout=DEADLINE, what="piagent to close the upstream's open connection")
    assert_whole(server, fake, cid, [("hi", REPLY)])


def test_text_written_after_the_client_left_is_not_stored_as_given(hserve, fake):
    """A client that stopped reading, then hung up: memory keeps at most what was written to its connection before
    it left (what the kernel could hold for it), never the rest of the reply, which the upstream had finished."""
    tokens = [f"<{i:03d}>" + "x" * 100_000 for i in range(79)] + ["<END>"]
    fake.script = Script(tokens=tokens)
    server = hserve(MAX_TOKENS=1_000_000, CTX_TOKENS=1_048_576)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(DEADLINE)
    try:
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(_post_bytes("/chat", {"message": "go", "stream": True, "conversation_id": "gone"}, server.port))
        assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        wait_until(lambda: fake.completed == 1, timeout=DEADLINE, what="the upstream to finish its reply")
    finally:  # a reset: what the kernel still holds for the client is thrown away
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    assert_idle(server)
    (turn,) = stored(server, "gone")
    # the most that can have left piagent: the kernel's largest send buffer, the transport's own, and a token
    sent_at_most = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2]) + 2 * 65_536 + 100_005
    assert turn[0] == "go" and "<END>" not in turn[1] and len(turn[1]) <= sent_at_most, (len(turn[1]), sent_at_most)
    fake.script = Script()
    served_chat(server, "gone")


# ---------------------------------------------------------------------------
# 3) Caps on what piagent takes from an upstream
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_tokens, cap", [(10, 4096), (300, 9600)])
def test_a_streamed_reply_longer_than_the_cap_is_cut_there_and_only_the_cut_text_is_stored(hserve, fake, max_tokens,
                                                                                           cap):
    # 32 characters per MAX_TOKENS token, at least 4096; the fake goes on past it, then holds (as a model would
    # that ignores num_predict): piagent must stop reading and hang up, not wait for more
    count = cap // 100 + 10
    fake.script = Script(tokens=["y" * 100] * (count + 5), hold_after=count, token_delay_s=0.001)
    server = hserve(MAX_TOKENS=max_tokens)
    try:
        with httpx.stream("POST", f"{server.url}/chat", json={"message": "long", "stream": True,
                                                               "conversation_id": "cap"}, headers=SSE,
                          timeout=DEADLINE) as response:
            assert response.status_code == 200
            events = sse_events(response)
    except httpx.ReadTimeout:
        pytest.fail(f"no end of the stream within {DEADLINE} s: piagent relayed past the {cap}-character cap and "
                    f"waited for more")
    finally:
        fake.script.release.set()
    text = "".join(json.loads(d)["text"] for e, d in events if e == "token")
    assert len(text) == cap and text == "y" * cap
    name, data = events[-1]
    assert name == "done" and json.loads(data)["done_reason"] == "length", events[-1]
    wait_until(lambda: fake.hangups, timeout=DEADLINE, what="the fake to see piagent hang up at the cap")
    assert stored(server, "cap") == [("long", "y" * cap)]
    assert_whole(server, fake, "cap", [("long", "y" * cap)])


def test_a_whole_v1_reply_longer_than_the_cap_is_cut_with_finish_reason_length(hserve, fake):
    fake.script = Script(tokens=["z" * 100] * 60)  # 6000 characters in one body, under the 4 MiB body cap
    server = hserve(MAX_TOKENS=10)
    response = v1(server, {"X-Conversation-Id": "capv1"}, messages=[{"role": "user", "content": "long"}])
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"] == "z" * 4096
    assert_whole(server, fake, "capv1", [("long", "z" * 4096)])


@pytest.mark.parametrize("blob_after", [0, 2])
def test_an_upstream_line_over_1_mib_is_an_upstream_error_and_the_connection_is_closed(hserve, fake, blob_after):
    fake.script = Script(tokens=["a", "b", "c"], blob_bytes=5 * 2**20, blob_after=blob_after)
    server = hserve()
    started = time.monotonic()
    try:
        with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True,
                                                               "conversation_id": "blob"}, headers=SSE,
                          timeout=DEADLINE) as response:
            if blob_after == 0:  # nothing sent yet: an HTTP error
                response.read()
                assert response.status_code == 502, (response.status_code, response.text)
                assert error_of(response)["code"] == "upstream_error"
            else:
                events = sse_events(response)
                assert [e for e, _ in events] == ["token", "token", "error"], events
                assert json.loads(events[-1][1])["error"]["code"] == "upstream_error"
    except httpx.ReadTimeout:
        pytest.fail(f"nothing within {DEADLINE} s: piagent kept buffering a line with no end")
    finally:
        fake.script.release.set()
    assert time.monotonic() - started < DEADLINE
    wait_until(lambda: fake.hangups, timeout=DEADLINE, what="the fake to see piagent close the connection")
    assert_whole(server, fake, "blob", None)


def test_a_whole_upstream_body_over_4_mib_is_502(hserve, fake):
    fake.script = Script(mangle=_change({"whole"}, lambda o: {**o, "padding": "p" * (5 * 2**20)}))
    server = hserve()
    response = chat(server, message="hi", conversation_id="bigbody")
    assert response.status_code == 502, (response.status_code, response.text[:200])
    assert error_of(response)["code"] == "upstream_error"
    assert_whole(server, fake, "bigbody", None)


# ---------------------------------------------------------------------------
# 5) A bug is one logged 500 (counted as 500) and the client's connection survives it
# ---------------------------------------------------------------------------


def _http(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send one HTTP/1.1 request on a kept-alive socket and read exactly its response."""
    sock.sendall(request)
    data, end = b"", time.monotonic() + DEADLINE
    while b"\r\n\r\n" not in data:
        assert time.monotonic() < end, data
        part = sock.recv(65536)
        assert part, f"the server closed the connection instead of answering: {data!r}"
        data += part
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    if "content-length" in headers:
        while len(body) < int(headers["content-length"]):
            assert time.monotonic() < end
            part = sock.recv(65536)
            assert part, "connection closed mid-body"
            body += part
    else:
        while not body.endswith(b"0\r\n\r\n"):
            assert time.monotonic() < end
            part = sock.recv(65536)
            assert part, "connection closed mid-body"
            body += part
    return status, headers, body


def _post_bytes(path: str, body: dict, port: int) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


@pytest.mark.parametrize("bug", [ZeroDivisionError, RecursionError, KeyError])
def test_a_bug_is_one_logged_500_counted_as_500_and_the_connection_survives(hserve, fake, caplog, bug):
    caplog.set_level("INFO")
    holder = {}
    server = hserve(store=flaky(holder))
    holder["store"].fail("history", lambda: bug("injected bug"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as sock:
        status, _, body = _http(sock, _post_bytes("/chat", {"message": "hi", "conversation_id": "bug"}, server.port))
        assert status == 500, body
        assert json.loads(body)["error"]["code"] == "internal_error"
        # the same connection serves the next request: the 500 was a response, not a dropped connection
        status, _, _ = _http(sock, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
        assert status == 200
    wait_until(lambda: any(r["path"] == "/chat" for r in piagent_records(caplog)), what="the request record")
    (record,) = [r for r in piagent_records(caplog) if r["path"] == "/chat"]
    assert record["status"] == 500, record
    tracebacks = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], bug)]
    assert len(tracebacks) == 1, [(r.name, r.getMessage()) for r in tracebacks]
    families = metric_families(server)
    assert metric_sum(families, "piagent_requests_total", "piagent_requests", route="/chat", status="500") == 1
    assert metric_sum(families, "piagent_requests_total", "piagent_requests", status="499") == 0
    assert_whole(server, fake, "bug", None)


def test_a_deliberately_cut_plain_stream_is_not_an_asgi_error_in_the_log(fake):
    fake.script = Script(error_after=2)
    with piagent_process({"OLLAMA_HOST": fake.url, "WARMUP": "false", "LOG_FORMAT": "text"},
                         capture=True) as (url, proc):
        with pytest.raises(httpx.RemoteProtocolError):  # the cut is how a plain-text client learns of the failure
            with httpx.stream("POST", f"{url}/chat", json={"message": "hi", "stream": True},
                              timeout=DEADLINE) as response:
                response.read()
        fake.script = Script()
        assert httpx.post(f"{url}/chat", json={"message": "again"}, timeout=DEADLINE).status_code == 200
    output = proc.stdout.read()
    assert "ASGI callable returned without completing response" not in output, output[-2000:]
    assert "Traceback" not in output, output[-2000:]


def test_a_text_log_line_cannot_be_forged_by_a_path_or_an_upstream_error(fake):
    """uvicorn decodes %0a in a path, and an upstream's error text may hold a line break: the text log wrote both
    as they came, so anyone who could send a request could write log lines of their choosing."""
    forged = "2026-01-01 00:00:00,000 WARNING piagent: forged"
    fake.script = Script(mangle=lambda o, kind: {"error": f"boom\n{forged} by the upstream"} if kind == "final" else o)
    with piagent_process({"OLLAMA_HOST": fake.url, "WARMUP": "false", "LOG_FORMAT": "text"},
                         capture=True) as (url, proc):
        assert httpx.get(f"{url}/x%0a{forged.replace(' ', '%20')}%20by%20a%20path", timeout=DEADLINE).status_code == 404
        with httpx.stream("POST", f"{url}/chat", json={"message": "hi", "stream": True, "conversation_id": "f1"},
                          timeout=DEADLINE) as response:
            with contextlib.suppress(httpx.RemoteProtocolError):
                response.read()
        fake.script = Script()
        assert served_chat(SimpleNamespace(url=url), "f2").json()["reply"] == REPLY
    output = proc.stdout.read()
    assert "by a path" in output and "by the upstream" in output, output[-3000:]  # both were logged
    assert not [line for line in output.splitlines() if line.startswith("2026-01-01")], output[-3000:]


# ---------------------------------------------------------------------------
# 6) Memory: a full disk, a vanished or corrupted file, a read-only file, Redis down
# ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), so SQLite meets a real "database or disk is full"."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the filesystem of `folder` to the last byte; returns the filler file (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            for _ in range(100_000):  # bounded: 1 MiB needs far fewer
                try:
                    f.write(b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    return filler


def test_disk_full_still_delivers_the_reply_marked_unsaved_and_delete_works(hserve, fake, small_disk):
    server = hserve(MEMORY_BACKEND="sqlite", MEMORY_PATH=small_disk / "memory.db")
    served_chat(server, "old", message="first")
    filler = fill(small_disk)
    # only storing fails: the reply the model already generated is delivered, and says it was not kept
    response = chat(server, message="hi", conversation_id="new-json")
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.json()["reply"] == REPLY and response.headers.get("x-memory-saved") == "false"
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True,
                                                           "conversation_id": "new-sse"}, headers=SSE,
                      timeout=DEADLINE) as streamed:
        events = sse_events(streamed)
    assert "".join(json.loads(d)["text"] for e, d in events if e == "token") == REPLY
    assert events[-1][0] == "done" and json.loads(events[-1][1])["saved"] is False, events[-1]
    # a turn on a conversation that has history: delivered unsaved, or refused before the model is asked
    asked = len(fake.generations())
    again = chat(server, message="second", conversation_id="old")
    if again.status_code == 503:
        error = error_of(again)
        assert error["code"] == "memory_unavailable" and "disk is full" in error["message"], error
        assert len(fake.generations()) == asked
    else:
        assert again.status_code == 200 and again.headers.get("x-memory-saved") == "false", again.text
    ready = httpx.get(f"{server.url}/ready", timeout=DEADLINE)
    assert ready.status_code == 503 and ready.json()["checks"]["memory"]["ok"] is False, ready.text
    assert "full" in ready.json()["checks"]["memory"]["detail"], ready.text
    # forgetting must work exactly when the disk is full
    assert httpx.delete(f"{server.url}/conversations/old", timeout=DEADLINE).status_code == 204
    assert stored(server, "old") is None
    filler.unlink()
    wait_until(lambda: httpx.get(f"{server.url}/ready", timeout=DEADLINE).status_code == 200,
               timeout=DEADLINE, what="/ready to recover once there is space")
    assert stored(server, "new-json") is None and stored(server, "new-sse") is None
    assert_whole(server, fake, "after", None)


def test_disk_full_from_the_store_is_503_saying_so_or_an_unsaved_reply(hserve, fake):
    holder = {}
    server = hserve(store=flaky(holder))
    full = lambda: sqlite3.OperationalError("database or disk is full")  # noqa: E731
    holder["store"].fail("history", full)
    refused = chat(server, message="hi", conversation_id="full")
    assert refused.status_code == 503, refused.text
    error = error_of(refused)
    assert error["code"] == "memory_unavailable" and "disk is full" in error["message"], error
    assert fake.generations() == []  # the model was not asked
    holder["store"].fail("append", full)
    kept = chat(server, message="hi", conversation_id="full")
    assert kept.status_code == 200 and kept.json()["reply"] == REPLY
    assert kept.headers.get("x-memory-saved") == "false"
    holder["store"].fail("append", full)
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "hi", "stream": True,
                                                           "conversation_id": "full"}, headers=SSE,
                      timeout=DEADLINE) as streamed:
        events = sse_events(streamed)
    assert events[-1][0] == "done" and json.loads(events[-1][1])["saved"] is False, events
    assert_whole(server, fake, "full", None)


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_the_sqlite_file_deleted_or_corrupted_while_running_is_reported_by_ready(hserve, fake, tmp_path, damage):
    path = tmp_path / "memory.db"
    server = hserve(MEMORY_BACKEND="sqlite", MEMORY_PATH=path)
    served_chat(server, "c")
    assert httpx.get(f"{server.url}/ready", timeout=DEADLINE).status_code == 200
    if damage == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        size = path.stat().st_size
        path.write_bytes(b"this is not a database, it was overwritten. " * (size // 44 + 1))
    last = {}

    def not_ready():
        response = httpx.get(f"{server.url}/ready", timeout=DEADLINE)
        last.update(status=response.status_code, body=response.text)
        return response.status_code == 503
    try:
        wait_until(not_ready, timeout=DEADLINE, what="/ready to notice")
    except AssertionError:
        raise AssertionError(f"/ready did not notice the memory file was {damage}: {last}") from None
    assert json.loads(last["body"])["checks"]["memory"]["ok"] is False
    assert httpx.get(f"{server.url}/health", timeout=DEADLINE).status_code == 200


@pytest.fixture
def read_only_db(small_disk):
    path = small_disk / "memory.db"
    db = sqlite3.connect(path)
    db.executescript(piagent.SQLITE_SCHEMA)
    db.close()
    result = subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot remount read-only: {result.stderr.strip()}")
    return path


def test_a_read_only_database_is_never_told_to_be_moved_aside(fake, read_only_db):
    env = {**os.environ, "OLLAMA_HOST": fake.url, "WARMUP": "false", "MEMORY_BACKEND": "sqlite",
           "MEMORY_PATH": str(read_only_db)}
    check = subprocess.run(piagent_command("--check"), cwd=HERE, env=env, capture_output=True,
                           text=True, timeout=30, stdin=subprocess.DEVNULL)
    (line,) = [line for line in check.stdout.splitlines() if "memory" in line and line.startswith(("✓", "✗"))]
    assert line.startswith("✗") and "move" not in line.lower() and "read" in line.lower(), line
    try:
        start = subprocess.run(piagent_command("--port", str(free_port())), cwd=HERE, env=env,
                               capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
        output = start.stdout + start.stderr
    except subprocess.TimeoutExpired as exc:  # it started serving: what it printed meanwhile must not say it either
        output = (exc.stdout or b"").decode() + (exc.stderr or b"").decode()
    assert "move it aside" not in output and "move" not in output.lower(), output


def test_metrics_answer_200_while_redis_is_down(hserve, fake, tmp_path):
    find_redis_server()
    redis = RedisServer(tmp_path).start()
    try:
        server = hserve(MEMORY_BACKEND="redis", REDIS_URL=redis.url)
        served_chat(server, "r")
    finally:
        redis.stop()
    response = httpx.get(f"{server.url}/metrics", timeout=DEADLINE)
    assert response.status_code == 200, response.text
    assert "piagent_requests_total" in response.text
    assert httpx.get(f"{server.url}/health", timeout=DEADLINE).status_code == 200
    ready = httpx.get(f"{server.url}/ready", timeout=DEADLINE)
    assert ready.status_code == 503 and ready.json()["checks"]["memory"]["ok"] is False, ready.text


# ---------------------------------------------------------------------------
# 7) Back-pressure: a client that stops reading is dropped; memory stays bounded; only what was written is kept
# ---------------------------------------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_stops_reading_is_dropped_and_memory_stays_bounded(fake):
    token, count = "x" * 1000, 60_000  # 60 MB offered by the upstream, as fast as it can
    fake.script = Script(tokens=[token] * count)
    env = {"OLLAMA_HOST": fake.url, "WARMUP": "false", "WRITE_TIMEOUT_S": "2", "MAX_TOKENS": "1000000",
           "CTX_TOKENS": "1048576", "RATE_LIMIT_PER_MIN": "0", "LOG_FORMAT": "text"}
    with piagent_process(env, capture=True) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        baseline = peak = _rss_bytes(proc.pid)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(DEADLINE)
        try:
            sock.connect(("127.0.0.1", port))
            sock.sendall(_post_bytes("/chat", {"message": "go", "stream": True, "conversation_id": "bp"}, port))
            received = b""
            while b"\r\n\r\n" not in received:
                part = sock.recv(4096)
                assert part, received
                received += part
            # ... and now the client reads nothing more

            def dropped():
                nonlocal peak
                peak = max(peak, _rss_bytes(proc.pid))
                return bool(fake.hangups)
            try:
                wait_until(dropped, timeout=15, what="the upstream to be let go")
            except AssertionError:
                raise AssertionError(f"15 s after the client stopped reading, piagent still reads the upstream "
                                     f"(WRITE_TIMEOUT_S=2); RSS grew {(peak - baseline) / 1e6:.0f} MB") from None
            assert peak - baseline < 20_000_000, f"RSS grew {(peak - baseline) / 1e6:.0f} MB"
            # the client now reads what is left in flight: the connection must have been closed by piagent
            end = time.monotonic() + DEADLINE
            closed = False
            while time.monotonic() < end:
                try:
                    part = sock.recv(65536)
                except ConnectionResetError:
                    closed = True
                    break
                if not part:
                    closed = True
                    break
                received += part
            assert closed, "piagent never closed the connection of the client that stopped reading"
        finally:
            sock.close()
        written = received.split(b"\r\n\r\n", 1)[1].count(b"x")
        response = httpx.get(f"{url}/conversations/bp", timeout=DEADLINE)
        assert response.status_code == 200, response.text
        (turn,) = response.json()["turns"]
        kept = turn["assistant"]
        assert set(kept) <= {"x"} and written <= len(kept) <= written + 8 * 2**20, (written, len(kept))
        assert len(kept) < len(token) * count // 2
        assert httpx.get(f"{url}/health", timeout=DEADLINE).status_code == 200
        fake.script = Script()
        assert httpx.post(f"{url}/chat", json={"message": "hi", "conversation_id": "bp"},
                          timeout=DEADLINE).status_code == 200


# ---------------------------------------------------------------------------
# 8) Keys, hosts, forwarded addresses, HEAD
# ---------------------------------------------------------------------------


def test_wrong_keys_from_one_address_are_limited_after_ten_a_minute(hserve, fake):
    server = hserve(API_KEYS=KEY, RATE_LIMIT_PER_MIN=0)  # the failure limit is independent of RATE_LIMIT_PER_MIN
    for i in range(10):
        response = chat(server, {"Authorization": f"Bearer wrong-key-{i:04d}"}, message="hi")
        assert response.status_code == 401, (i, response.status_code)
    eleventh = chat(server, {"Authorization": "Bearer wrong-key-9999"}, message="hi")
    assert eleventh.status_code == 429, (eleventh.status_code, eleventh.text)
    assert int(eleventh.headers["retry-after"]) > 0
    assert httpx.get(f"{server.url}/health", timeout=DEADLINE).status_code == 200
    assert fake.generations() == []


def test_a_conversation_belongs_to_the_key_that_made_it(hserve, fake):
    server = hserve(API_KEYS=f"{KEY},{OTHER_KEY}")
    owner, other = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {OTHER_KEY}"}
    served_chat(server, "mine", owner, message="secret plans")
    assert httpx.get(f"{server.url}/conversations/mine", headers=other, timeout=DEADLINE).status_code == 404
    listed = httpx.get(f"{server.url}/conversations", headers=other, timeout=DEADLINE)
    assert listed.status_code == 200 and "mine" not in [c["conversation_id"] for c in listed.json()["conversations"]]
    assert httpx.delete(f"{server.url}/conversations/mine", headers=other, timeout=DEADLINE).status_code == 404
    # as for an id nobody has (DEVELOPING.md, "Conversation API"): the answer does not tell the two apart
    assert httpx.delete(f"{server.url}/conversations/never-was", headers=other, timeout=DEADLINE).status_code == 404
    hijack = chat(server, other, message="and?", conversation_id="mine")
    assert hijack.status_code == 404 and error_of(hijack)["code"] == "conversation_not_found", hijack.text
    assert len(fake.generations()) == 1  # the model never saw the other key's request
    assert stored(server, "mine", owner) == [("secret plans", REPLY)]  # still there, untouched
    assert "mine" in [c["conversation_id"] for c in httpx.get(
        f"{server.url}/conversations", headers=owner, timeout=DEADLINE).json()["conversations"]]
    assert_whole(server, fake, "mine", [("secret plans", REPLY)], owner)


@pytest.mark.parametrize("path", ["/agents", "/conversations", "/v1/models"])
def test_a_keyless_loopback_server_refuses_a_foreign_host_header(hserve, path):
    server = hserve()
    refused = httpx.get(f"{server.url}{path}", headers={"Host": "evil.example"}, timeout=DEADLINE)
    assert refused.status_code == 400, (refused.status_code, refused.text)
    assert error_of(refused)["code"] == "host_not_allowed"
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}"):
        assert httpx.get(f"{server.url}{path}", headers={"Host": host}, timeout=DEADLINE).status_code == 200, host


def test_a_refused_host_never_reaches_the_model(hserve, fake):
    server = hserve()
    refused = chat(server, {"Host": "evil.example:8000"}, message="hi")
    assert refused.status_code == 400 and error_of(refused)["code"] == "host_not_allowed"
    assert fake.generations() == []


def test_allowed_hosts_widens_the_loopback_names(hserve):
    server = hserve(ALLOWED_HOSTS="pi.local")
    assert httpx.get(f"{server.url}/agents", headers={"Host": f"pi.local:{server.port}"},
                     timeout=DEADLINE).status_code == 200
    assert httpx.get(f"{server.url}/agents", headers={"Host": f"127.0.0.1:{server.port}"},
                     timeout=DEADLINE).status_code == 200
    assert httpx.get(f"{server.url}/agents", headers={"Host": "evil.example"}, timeout=DEADLINE).status_code == 400


EVIL_PAGE = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}


@pytest.mark.parametrize("path, body", [
    ("/api/chat", {"model": "general", "messages": [{"role": "user", "content": "hi"}], "stream": False}),
    ("/api/generate", {"model": "general", "prompt": "hi", "stream": False}),
    ("/chat", {"message": "hi", "conversation_id": "page"}),
])
def test_another_sites_page_cannot_make_a_keyless_piagent_generate(hserve, fake, path, body):
    """A page elsewhere made its visitor's browser POST text/plain JSON to 127.0.0.1: a browser sends such a request
    without asking (no CORS preflight), the Host is a loopback name, and the Ollama door reads JSON whatever the
    type (as Ollama does: its docs use curl -d). So any web page could keep the Pi's model busy and fill the queue.
    Now a POST from another site's page whose body is not declared JSON is refused unless CORS_ORIGINS has it."""
    server = hserve(MAX_QUEUE=2)
    text = json.dumps(body).encode()
    for kind in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        refused = post(server, path, raw=text, headers={**EVIL_PAGE, "Content-Type": kind})
        assert refused.status_code == 403 and refused.headers["connection"] == "close", (kind, refused.headers)
        message = refused.json()["error"] if path.startswith("/api/") else error_of(refused)["message"]
        assert "'https://evil.example'" in message and "CORS_ORIGINS" in message, message
    assert fake.generations() == []
    assert_idle(server)
    served = {"Content-Type": "text/plain"}
    if path.startswith("/api/"):  # the same body from a client that is no browser's page (curl -d), or this page
        for headers in (served, {**served, "Origin": f"http://127.0.0.1:{server.port}"}):
            assert post(server, path, raw=text, headers=headers).status_code == 200, headers
    # declared JSON, a browser would have asked first (a preflight only CORS_ORIGINS are answered): not refused here
    assert post(server, path, body, headers=EVIL_PAGE).status_code == 200
    allowed = hserve(CORS_ORIGINS="https://evil.example")  # /chat reads JSON only when it is declared so
    assert post(allowed, path, raw=text, headers={**EVIL_PAGE, **served}).status_code == (
        422 if path == "/chat" else 200)
    # an extension's or an app's origin cannot be put in CORS_ORIGINS: it is told what it can do instead
    app = post(server, path, raw=text, headers={"Origin": "chrome-extension://abcdef", **served})
    message = app.json()["error"] if path.startswith("/api/") else error_of(app)["message"]
    assert app.status_code == 403 and message.endswith("send Content-Type: application/json"), message
    assert post(server, path, body, headers={"Origin": "chrome-extension://abcdef"}).status_code == 200
    assert stored(server, "page") == ([("hi", REPLY), ("hi", REPLY)] if path == "/chat" else None)


GARBAGE_FORWARDED = ["not-an-ip", '1.2.3.4" key="forged', "999.1.1.1", "a" * 2000, "1.2.3.4 5.6.7.8",
                     "1.2.3.4\tinjected=1", "<script>"]


def test_forwarded_for_is_parsed_as_an_address_and_garbage_means_the_socket_peer(hserve, caplog):
    caplog.set_level("INFO", logger="piagent")
    server = hserve(TRUST_PROXY="true", RATE_LIMIT_PER_MIN=0)
    for value in GARBAGE_FORWARDED:
        assert httpx.get(f"{server.url}/agents", headers={"X-Forwarded-For": value},
                         timeout=DEADLINE).status_code == 200
    for value in ("203.0.113.9", "2001:db8::1"):
        assert httpx.get(f"{server.url}/agents", headers={"X-Forwarded-For": value},
                         timeout=DEADLINE).status_code == 200
    total = len(GARBAGE_FORWARDED) + 2
    wait_until(lambda: len([r for r in piagent_records(caplog) if r["path"] == "/agents"]) == total,
               what="a record per request")
    clients = [r["client"] for r in piagent_records(caplog) if r["path"] == "/agents"]
    assert clients == ["127.0.0.1"] * len(GARBAGE_FORWARDED) + ["203.0.113.9", "2001:db8::1"], clients
    text = "\n".join(caplog.messages)
    assert "forged" not in text and "injected" not in text and "<script>" not in text and "a" * 100 not in text


def test_garbage_forwarded_for_cannot_dodge_the_rate_limit(hserve):
    server = hserve(TRUST_PROXY="true", RATE_LIMIT_PER_MIN=5)
    statuses = [httpx.post(f"{server.url}/chat", json={"message": "hi"}, headers={"X-Forwarded-For": f"garbage-{i}"},
                           timeout=DEADLINE).status_code for i in range(6)]
    assert statuses == [200] * 5 + [429], statuses


@pytest.mark.parametrize("path", ["/health", "/agents", "/v1/models", "/conversations", "/ready", "/metrics"])
def test_head_works_wherever_get_does(hserve, path):
    server = hserve()
    got = httpx.get(f"{server.url}{path}", timeout=DEADLINE)
    head = httpx.head(f"{server.url}{path}", timeout=DEADLINE)
    assert head.status_code == got.status_code == 200, (head.status_code, got.status_code)
    assert head.content == b""


# ---------------------------------------------------------------------------
# 9) Turns on one conversation wait in the same bounded queue as everyone else
# ---------------------------------------------------------------------------


def test_turns_on_one_conversation_wait_in_the_bounded_queue_and_the_excess_is_refused(hserve, fake):
    held = Script(tokens=["A1", "A2"], hold_after=1)
    fake.script = held
    server = hserve(MAX_CONCURRENT=1, MAX_QUEUE=2, RATE_LIMIT_PER_MIN=0)
    waiters = []
    try:
        with httpx.stream("POST", f"{server.url}/chat", json={"message": "m0", "stream": True,
                                                               "conversation_id": "same"}, timeout=DEADLINE) as first:
            pieces = first.iter_text()
            assert next(pieces) == "A1"
            waiters = [in_background(chat, server, message=f"m{i}", conversation_id="same") for i in range(1, 5)]

            def refused():
                return [r["value"] for _, r in waiters if "value" in r and r["value"].status_code == 503]
            try:
                wait_until(lambda: len(refused()) == 2, timeout=DEADLINE, what="two turns refused")
            except AssertionError:
                raise AssertionError(f"5 concurrent turns on one conversation with MAX_QUEUE=2: expected 2 refused "
                                     f"with queue_full, got {len(refused())}; gauges {gauges(server)}") from None
            assert all(error_of(r)["code"] == "queue_full" for r in refused())
            assert gauges(server) == {"piagent_generations_active": 1, "piagent_queue_depth": 2,
                                      "piagent_active_streams": 1}
            fake.script = Script()
            held.release.set()
            assert "".join(pieces) == "A2"
    finally:
        held.release.set()
        for thread, _ in waiters:
            thread.join(DEADLINE)
    assert sorted(r["value"].status_code for _, r in waiters) == [200, 200, 503, 503]
    assert len(stored(server, "same")) == 3
    assert_idle(server)


def test_forgets_waiting_for_a_busy_conversation_take_no_place_in_the_queue(hserve, fake):
    """DELETE /conversations/{id} waits for the reply in progress on that conversation, not for the model: three of
    them took MAX_QUEUE's places, and another user's chat was refused queue_full."""
    held = Script(tokens=["A1", "A2"], hold_after=1)
    fake.script = held
    server = hserve(MAX_CONCURRENT=1, MAX_QUEUE=1, RATE_LIMIT_PER_MIN=0)
    forgets, other = [], None
    try:
        with httpx.stream("POST", f"{server.url}/chat", json={"message": "m0", "stream": True,
                                                               "conversation_id": "busy"}, timeout=DEADLINE) as first:
            pieces = first.iter_text()
            assert next(pieces) == "A1"
            forgets = [in_background(httpx.delete, f"{server.url}/conversations/busy", timeout=DEADLINE)
                       for _ in range(3)]
            wait_until(lambda: len(server.app.state.runtime.gate._waiting) == 3, what="the forgets to wait")
            assert gauges(server)["piagent_queue_depth"] == 0
            other = in_background(chat, server, message="mine", conversation_id="other")
            wait_until(lambda: gauges(server)["piagent_queue_depth"] == 1, what="the other chat to wait")
            fake.script = Script()
            held.release.set()
            assert "".join(pieces) == "A2"
    finally:
        held.release.set()
        for thread, _ in [*forgets, *([other] if other else [])]:
            thread.join(DEADLINE)
    assert [r["value"].status_code for _, r in forgets] == [204] * 3
    assert other[1]["value"].status_code == 200, other[1]["value"].text
    assert stored(server, "busy") is None and stored(server, "other") == [("mine", REPLY)]
    assert_whole(server, fake, "busy", None)


def test_an_sse_client_waiting_behind_its_own_conversation_gets_a_queued_event(hserve, fake):
    held = Script(tokens=["A1", "A2"], hold_after=1)
    fake.script = held
    server = hserve()
    try:
        with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True,
                                                               "conversation_id": "q"}, timeout=DEADLINE) as first:
            pieces = first.iter_text()
            assert next(pieces) == "A1"
            try:
                with httpx.stream("POST", f"{server.url}/chat", json={"message": "b", "stream": True,
                                                                       "conversation_id": "q"}, headers=SSE,
                                  timeout=DEADLINE) as second:
                    lines = second.iter_lines()
                    assert (next(lines), next(lines)) == ("event: queued", 'data: {"position":1}')
                    assert gauges(server)["piagent_queue_depth"] == 1
                    fake.script = Script(tokens=["B"])
                    held.release.set()
                    assert "".join(pieces) == "A2"
                    rest = list(lines)
            except httpx.ReadTimeout:
                pytest.fail(f"no response within {DEADLINE} s: the second turn waits on the conversation's lock "
                            f"without a word")
        assert "event: done" in rest
    finally:
        held.release.set()
    assert [u for u, _ in stored(server, "q")] == ["a", "b"]
    assert_idle(server)


# ---------------------------------------------------------------------------
# 2) Connections: a cap, a header timeout, idle keep-alive, file descriptors, a quiet log
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def piagent_with_log(env: dict, log_path: Path, preexec_fn=None):
    """A real piagent process on a free port, its output in a file (a pipe could fill and block it)."""
    port = free_port()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(piagent_command("--port", str(port)), cwd=HERE,
                                env={**os.environ, "WARMUP": "false", "LOG_FORMAT": "text", **env},
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                preexec_fn=preexec_fn)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, f"piagent exited: {log_path.read_text()[-2000:]}"
                return False
        wait_until(up, timeout=15, what="python piagent.py to answer /health")
        yield url, proc, port
    finally:
        proc.terminate()
        try:
            proc.wait(DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(DEADLINE)


@contextlib.contextmanager
def own_fd_limit(wanted: int):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard NOFILE limit {hard} is below {wanted}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _nofile_limits(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    raise AssertionError("no Max open files line")


def test_1100_half_open_connections_leave_piagent_reachable_and_its_log_small(fake, tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"the hard NOFILE limit {hard} is too low for this test")
    log_path = tmp_path / "piagent.log"

    def soft_1024():  # as a Pi's default: soft 1024, hard higher
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    # beyond MAX_CONNECTIONS (256) each is answered 503 and closed; the 256 held ones are dropped HEADER_TIMEOUT_S
    # after they opened: 2 s rather than the default 10, so piagent answers again well before the wait below ends
    env = {"OLLAMA_HOST": fake.url, "HEADER_TIMEOUT_S": "2"}
    with own_fd_limit(1400), piagent_with_log(env, log_path, soft_1024) as (url, proc, port):
        socks: list[socket.socket] = []
        started = time.monotonic()
        try:
            for _ in range(1100):
                if time.monotonic() - started > 15:
                    break
                s = socket.socket()
                s.settimeout(2)
                try:
                    s.connect(("127.0.0.1", port))
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0")  # a request that never finishes
                except OSError:
                    s.close()
                    continue
                socks.append(s)
            assert len(socks) >= 1050, f"only {len(socks)} connections could be opened"
            last = {}

            def answers():
                try:
                    last["status"] = httpx.get(f"{url}/health", timeout=2).status_code
                except httpx.TransportError as exc:
                    last["status"] = repr(exc)
                return last["status"] == 200
            try:
                wait_until(answers, timeout=10, what="/health")
            except AssertionError:
                raise AssertionError(f"/health did not answer with 1,100 half-open connections: {last}") from None
        finally:
            for s in socks:
                s.close()
        assert time.monotonic() - started < 30
        size = log_path.stat().st_size
        assert size < 100_000, f"{size} bytes of log: {log_path.read_text()[-1500:]}"
        soft_now, hard_now = _nofile_limits(proc.pid)
        assert soft_now == hard_now, f"piagent left its soft NOFILE limit at {soft_now} (hard {hard_now})"


def test_connections_over_max_connections_get_an_immediate_503(fake, tmp_path):
    env = {"OLLAMA_HOST": fake.url, "MAX_CONNECTIONS": "4", "HEADER_TIMEOUT_S": "30"}
    with piagent_with_log(env, tmp_path / "log", None) as (url, proc, port):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) for _ in range(4)]
        try:
            last = {}

            def refused_at_once():
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
                    data = b""
                    with contextlib.suppress(OSError):
                        while True:
                            part = s.recv(4096)
                            if not part:
                                last["closed"] = True
                                break
                            data += part
                    last["data"] = data[:200]
                    return data.startswith(b"HTTP/1.1 503") and last.get("closed", False)
            try:
                wait_until(refused_at_once, timeout=DEADLINE, what="a 503 and a close")
            except AssertionError:
                raise AssertionError(f"a 5th connection with MAX_CONNECTIONS=4 was not refused: {last}") from None
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, timeout=DEADLINE,
                   what="/health once the idle connections are gone")


def test_a_connection_that_never_finishes_its_headers_is_closed_after_header_timeout(fake, tmp_path):
    env = {"OLLAMA_HOST": fake.url, "HEADER_TIMEOUT_S": "1"}
    with piagent_with_log(env, tmp_path / "log", None) as (url, proc, port):
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as s:
            s.sendall(b"GET /health HTTP/1.1\r\n")
            started, closed = time.monotonic(), False
            for i in range(40):  # a slowloris: a header line every 0.1 s keeps an idle timer happy, not this one
                if time.monotonic() - started > 4:
                    break
                try:
                    s.sendall(f"X-Slow-{i}: a\r\n".encode())
                    s.settimeout(0.1)
                    if s.recv(4096) == b"":
                        closed = True
                        break
                except socket.timeout:
                    continue
                except OSError:
                    closed = True
                    break
            assert closed, "a connection trickling its headers was still open 4 s after HEADER_TIMEOUT_S=1"
        assert httpx.get(f"{url}/health", timeout=DEADLINE).status_code == 200


def test_an_idle_keep_alive_connection_is_closed_header_timeout_after_its_last_response(hserve):
    """HEADER_TIMEOUT_S counts again from each response, so a client that keeps a connection and never sends its next
    request lets it go after that long (uvicorn's own keep-alive limit, 5 s, would come later: 4 s is the bound)."""
    server = hserve(HEADER_TIMEOUT_S=0.5)
    with socket.create_connection(("127.0.0.1", server.port), timeout=4) as s:
        for _ in range(2):  # the timer restarts after every response, not only the first
            status, _, _ = _http(s, f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n\r\n".encode())
            assert status == 200
        try:
            assert s.recv(4096) == b""
        except socket.timeout:
            pytest.fail("an idle keep-alive connection was still open 4 s after HEADER_TIMEOUT_S=0.5")
        except ConnectionResetError:
            pass
    assert httpx.get(f"{server.url}/health", timeout=DEADLINE).status_code == 200


def test_the_service_unit_raises_the_file_limit():
    unit = (HERE / "piagent.service").read_text()
    assert re.search(r"^LimitNOFILE=\d+", unit, re.M), "piagent.service has no LimitNOFILE="


# ---------------------------------------------------------------------------
# 1) /ready tells the truth about a generation slot that is stuck
# ---------------------------------------------------------------------------


def test_ready_is_503_while_a_slot_is_held_with_no_upstream_activity_past_the_timeout(hserve, fake):
    unblock = threading.Event()

    def stuck(arguments):
        unblock.wait(20)
        return "late"

    tools = {"stuck": piagent.Tool(stuck, "Blocks.", {"type": "object", "properties": {}}, 30.0)}
    fake.script = Script(tool_rounds=[[("stuck", {})]], echo_tools=True)
    server = hserve(tools=tools, AGENT_GENERAL_TOOLS="stuck", OLLAMA_TIMEOUT_S=1, UPSTREAM_TIMEOUT_S=1)
    assert httpx.get(f"{server.url}/ready", timeout=DEADLINE).status_code == 200
    thread, result = in_background(chat, server, message="go", conversation_id="stuck")
    try:
        wait_until(lambda: gauges(server)["piagent_generations_active"] == 1, what="the generation to start")
        wait_until(lambda: httpx.get(f"{server.url}/ready", timeout=DEADLINE).status_code == 503, timeout=DEADLINE,
                   what="/ready to report the slot held with no upstream activity for over 1 s")
        assert httpx.get(f"{server.url}/health", timeout=DEADLINE).status_code == 200
    finally:
        unblock.set()
        thread.join(DEADLINE)
    wait_until(lambda: httpx.get(f"{server.url}/ready", timeout=DEADLINE).status_code == 200, timeout=DEADLINE,
               what="/ready to recover once the slot is free")


# ---------------------------------------------------------------------------
# 1) Leaks impossible by construction: a failure at every stage leaves the slot and the conversation free
# ---------------------------------------------------------------------------

SEED = [("seed", REPLY)]


def _tool_raising_in_round(n: int):
    calls = {"count": 0}

    def boom(arguments):
        calls["count"] += 1
        if calls["count"] == n:
            raise KeyError("injected")
        return "fine"

    return {"boom": piagent.Tool(boom, "Sometimes breaks.", {"type": "object", "properties": {}}, 2.0)}


def _stage_history_read(ctx):
    ctx.store.fail("history", lambda: RuntimeError("injected: history read"))
    return chat(ctx.server, message="go", conversation_id="leak")


def _stage_prompt_nested_tool(ctx):
    # around 960 levels, where JSON parsing still succeeds (how deep exactly depends on the stack) but building
    # the prompt recurses too deep; each is refused at the door in the end, so all are tried until one is not
    response = None
    for depth in range(1000, 900, -1):
        response = post(ctx.server, "/v1/chat/completions", raw=_v1_body(tools=_tool(
            f'{{"type":"object","x":{nested_brackets(depth)}}}')))
        if response.status_code != 422:
            break
    return response


def _stage_prompt_list_content(ctx):
    ctx.fake.script = Script(mangle=_change({"piece", "whole"}, _with_message(content=["poison"])))
    return chat(ctx.server, message="go", conversation_id="leak")


def _stage_provider_call(ctx):
    ctx.transport.fail_next = 1
    return chat(ctx.server, message="go", conversation_id="leak")


def _stage_tool_round(n):
    def stage(ctx):
        ctx.fake.script = Script(tool_rounds=[[("boom", {})], [("boom", {})]], echo_tools=True)
        with httpx.stream("POST", f"{ctx.server.url}/chat", json={"message": "go", "stream": True,
                                                                   "conversation_id": "leak"}, headers=SSE,
                          timeout=DEADLINE) as response:
            response.read()
        return response
    return stage


def _stage_relay_client_gone(ctx):
    ctx.fake.script = Script(tokens=["par", "tial"] + ["x"] * 20, hold_after=2)
    with socket.create_connection(("127.0.0.1", ctx.server.port), timeout=DEADLINE) as sock:
        sock.sendall(_post_bytes("/chat", {"message": "go", "stream": True, "conversation_id": "leak"},
                                 ctx.server.port))
        data, end = b"", time.monotonic() + DEADLINE
        while b"tial" not in data:
            assert time.monotonic() < end, data
            part = sock.recv(4096)
            assert part, data
            data += part
    wait_until(lambda: ctx.fake.hangups, timeout=DEADLINE, what="the fake to see the hang-up")
    return None


def _stage_memory_write(make):
    def stage(ctx):
        ctx.store.fail("append", make)
        return chat(ctx.server, message="go", conversation_id="leak")
    return stage


def _stage_log_record(ctx):
    ctx.fake.script = Script(mangle=_change({"final", "whole"}, lambda o: {**o, "eval_count": "manylots",
                                                                           "prompt_eval_count": "manylots"}))
    return chat(ctx.server, message="go", conversation_id="leak")


LEAK_STAGES = {  # stage: (what fails, the seams it needs)
    "history-read": (_stage_history_read, {"store"}),
    "prompt-build-nested-client-tool": (_stage_prompt_nested_tool, set()),
    "prompt-build-upstream-list-content": (_stage_prompt_list_content, set()),
    "provider-call-raises": (_stage_provider_call, {"transport"}),
    "tool-round-1-raises": (_stage_tool_round(1), {"tools-1"}),
    "tool-round-2-raises": (_stage_tool_round(2), {"tools-2"}),
    "relay-client-gone": (_stage_relay_client_gone, set()),
    "memory-write-oserror": (_stage_memory_write(lambda: OSError(errno.ENOSPC, "No space left on device")),
                             {"store"}),
    "memory-write-runtimeerror": (_stage_memory_write(lambda: RuntimeError("injected: append")), {"store"}),
    "log-record-count-as-text": (_stage_log_record, set()),
}


class _Ctx:
    pass


@pytest.mark.parametrize("stage", list(LEAK_STAGES))
def test_a_failure_at_any_stage_leaves_the_slot_and_the_conversation_free(hserve, fake, stage):
    run, seams = LEAK_STAGES[stage]
    ctx, holder = _Ctx(), {}
    ctx.fake = fake
    ctx.transport = FailingTransport(lambda: RuntimeError("injected: provider call"))
    env = {"MAX_CONCURRENT": 1, "RATE_LIMIT_PER_MIN": 0}
    tools = next((_tool_raising_in_round(int(s[-1])) for s in seams if s.startswith("tools-")), None)
    if tools is not None:
        env["AGENT_GENERAL_TOOLS"] = "boom"
    ctx.server = hserve(store=flaky(holder) if "store" in seams else None,
                        transport=ctx.transport if "transport" in seams else None, tools=tools, **env)
    ctx.store = holder.get("store")
    served_chat(ctx.server, "leak", message="seed")
    assert stored(ctx.server, "leak") == SEED
    try:
        response = run(ctx)
    except httpx.TimeoutException:
        raise AssertionError(f"the failing request itself got no answer within {DEADLINE} s") from None
    finally:
        fake.script.release.set()
    fake.script = Script()
    # what may be kept: nothing new, except a reply the client was given in full (tools answered with an error)
    # or what a client that left had received (the seed's rule for partial streams)
    after = stored(ctx.server, "leak")
    assert after[:1] == SEED, after
    extra = after[1:]
    if stage == "relay-client-gone":
        assert extra in ([], [("go", "partial")]), extra
    elif "tool" in stage and response is not None and response.status_code == 200:
        events = [line for line in response.text.splitlines() if line.startswith("event: ")]
        assert extra == [] or "event: done" in events, (extra, events)
    else:
        assert extra == [], extra
    assert_whole(ctx.server, fake, "leak", after)


def test_a_stream_blocked_on_a_slow_client_ends_when_the_shutdown_grace_does(fake, tmp_path):
    """SIGTERM while piagent waits to write to a client that reads nothing: the write ends with the grace, the stream
    ends as shutting_down and its request is logged, instead of waiting for the server's forced cancel."""
    fake.script = Script(tokens=["y" * 100_000] * 200)
    env = {"OLLAMA_HOST": fake.url, "SHUTDOWN_GRACE_S": "0.5", "WRITE_TIMEOUT_S": "60", "MAX_TOKENS": "1000000",
           "CTX_TOKENS": "1048576", "RATE_LIMIT_PER_MIN": "0"}
    log = tmp_path / "log"
    with piagent_with_log(env, log, None) as (url, proc, port):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(DEADLINE)
        with sock:
            sock.connect(("127.0.0.1", port))
            sock.sendall(_post_bytes("/chat", {"message": "go", "stream": True}, port))
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
            # the client reads no more: once the upstream stops too, piagent is blocked writing to the client
            seen: list[int] = []

            def held_back() -> bool:  # the upstream's count has not moved over the last three polls
                seen.append(fake.tokens_sent)
                return len(seen) > 3 and len(set(seen[-3:])) == 1

            wait_until(held_back, timeout=DEADLINE, what="the upstream to be held back")
            proc.send_signal(signal.SIGTERM)
            proc.wait(DEADLINE)
    text = log.read_text()
    assert re.search(r"POST /chat 200 .*error=shutting_down", text), text[-2000:]
    assert "Cancel 1 running task" not in text, text[-2000:]


# ---------------------------------------------------------------------------
# 11) What a hostile tester found: a body that never ends, a client leaving mid-body, numbers past a float
# ---------------------------------------------------------------------------

STALLED_BODIES = [  # a head, then part of a body (or none), then nothing
    b"POST /chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n"
    b'{"mess',
    b"POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nfff\r\n{\"model\"",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 10\r\n\r\n",
]


def _until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (within DEADLINE)."""
    data, end = b"", time.monotonic() + DEADLINE
    sock.settimeout(DEADLINE)
    while time.monotonic() < end:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            break
        if not part:
            break
        data += part
    else:
        raise AssertionError(f"the connection was still open after {DEADLINE} s: {data!r}")
    return data


def test_a_body_that_never_ends_is_408_after_header_timeout_and_frees_its_connection(hserve, fake):
    """Without it, MAX_CONNECTIONS such requests (no key needed: the body is read before the key is checked) held
    every connection for ever, and everyone else got 503 too_many_connections."""
    server = hserve(MAX_CONNECTIONS=len(STALLED_BODIES), HEADER_TIMEOUT_S=0.5)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) for _ in STALLED_BODIES]
    try:
        for sock, head in zip(socks, STALLED_BODIES):
            sock.sendall(head)
        for sock in socks:
            answer = _until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"HEADER_TIMEOUT_S" in answer and b"connection: close" in answer.lower(), answer
    finally:
        for sock in socks:
            sock.close()
    assert fake.generations() == [] and statuses_counted(server, "500") == 0
    assert_whole(server, fake, "after-stalls", None)


@pytest.mark.parametrize("path", ["/chat", "/v1/chat/completions", "/api/chat", "/api/generate", "/api/embed"])
def test_a_client_that_leaves_mid_body_is_logged_as_499_not_as_a_bug(hserve, fake, caplog, path):
    caplog.set_level("INFO", logger="piagent")
    server = hserve()
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: 100\r\n\r\n{{\"model\":".encode())
    wait_until(lambda: statuses_counted(server, "499") == 1, timeout=DEADLINE, what="the request to be logged as 499")
    assert statuses_counted(server, "500") == 0 and fake.generations() == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]
    (record,) = [r.request for r in caplog.records if getattr(r, "request", {}).get("path") == path]
    assert record["status"] == 499 and record["error"] == "client_gone"
    assert_whole(server, fake, "after-leaving", None)


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate"])
@pytest.mark.parametrize("stream", [True, False])
def test_ollama_options_past_a_float_are_refused_naming_the_option(hserve, fake, path, stream):
    server = hserve()
    ask = {"messages": [{"role": "user", "content": "hi"}]} if path == "/api/chat" else {"prompt": "hi"}
    huge = "1" + "0" * 400  # JSON allows it; as a float it is out of range
    cases = {"options.temperature": f'{{"temperature":{huge}}}',
             "options.num_predict": '{"num_predict":Infinity}'}
    for field, options in cases.items():
        for before in (b"", b" ", b"\xef\xbb\xbf"):  # whatever comes before the JSON
            body = json.dumps({"model": "general", "stream": stream, **ask})[:-1] + f',"options":{options}}}'
            response = post(server, path, raw=before + body.encode())
            assert response.status_code == 400, (field, before, response.status_code, response.text)
            if not before.startswith(b"\xef"):  # behind a byte order mark, the route's reader refuses the whole body
                assert field in response.json()["error"], response.text
    assert fake.generations() == [] and statuses_counted(server, "500") == 0
    assert_whole(server, fake, "after-options", None)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_arguments_nested_near_pythons_limit_are_a_502_not_a_bug(hserve, fake, stream):
    """Such arguments parse, but sending them back to the model in the next round recursed too deep (a 500, and a
    stream cut with no error event)."""
    server = hserve(AGENT_GENERAL_TOOLS="calc")
    fake.script = Script(tool_rounds=[[("calc", nested_object(900))]], echo_tools=True)
    body = {"message": "hi", "conversation_id": "deep-args", "stream": stream}
    if stream:
        with httpx.stream("POST", f"{server.url}/chat", json=body, headers=SSE, timeout=DEADLINE) as response:
            response.read()  # the calls come before any text: the failure is the reply's status, not an event
        assert response.status_code == 502, (response.status_code, response.text)
        _assert_upstream_error(error_of(response), "message.tool_calls")
    else:
        response = chat(server, **body)
        assert response.status_code == 502, (response.status_code, response.text)
        _assert_upstream_error(error_of(response), "message.tool_calls")
    assert statuses_counted(server, "500") == 0
    assert_whole(server, fake, "deep-args", None)
