"""A fake Ollama for piagent's tests and benchmark: a real HTTP/1.1 server on a loopback port.

It follows shared/reference/ollama-api.md: chunked NDJSON with one compact JSON object per line and a final
`done` line carrying metrics; no response headers until the first token (as Ollama, which commits the status on
the first write); 404 `{"error":"model 'x' not found"}`; 503 with Ollama's queue-full text; `{"error": ...}` lines
mid-stream; abrupt connection drops. It records every request it received and every client that hung up, and it
stops "generating" the moment its client goes away, as Ollama does.

    fake = FakeOllama(models=["qwen2.5:3b-instruct"]).start()
    fake.script = Script(tokens=["Hi", "!"], token_delay_s=0.01)
    ... fake.url, fake.requests, fake.hangups ...
    fake.stop()
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

#: Ollama's queue-full message, verbatim (note the two spaces).
BUSY_TEXT = "server busy, please try again.  maximum pending requests exceeded"
#: Upper bound for any wait inside the fake, so a broken test can never hang it forever.
MAX_WAIT_S = 30.0


@dataclass
class Script:
    """How the fake answers the next generation requests."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " Pi", "!"])
    token_delay_s: float = 0.0  # pause between tokens (decode speed)
    first_byte_delay_s: float = 0.0  # pause before headers + first token (model load, prompt eval)
    status: int | None = None  # answer every generation with this HTTP status and `error_text`
    error_text: str = "the model failed to generate a response"
    error_after: int | None = None  # after this many tokens, send an {"error"} line and end
    drop_after: int | None = None  # after this many tokens, close the socket with no done line
    hold_after: int | None = None  # after this many tokens, wait until `release` is set
    release: threading.Event = field(default_factory=threading.Event)
    retry_after: str | None = None  # Retry-After header sent with `status`
    sse_comments: bool = False  # /v1: put an SSE comment line before every event
    split_writes: bool = False  # write every line or event in two TCP writes, split mid-line
    echo: bool = False  # reply "echo: <the last user message>" instead of `tokens`
    sized: bool = False  # reply with as many tokens as the request asks (options.num_predict or max_tokens)
    # Tool calling: while a request offers `tools`, answer with round k's calls, where k is how many assistant
    # tool-call messages follow the last user message (rounds already done); each call is (name, arguments):
    # a dict (Ollama sends an object, /v1 its JSON text) or a str sent as the raw arguments text.
    tool_rounds: list[list[tuple[str, dict | str]]] = field(default_factory=list)
    calls_together: bool = True  # native: all of a round's calls in one chunk (False: a chunk per call)
    fragment_chars: int = 5  # /v1 streams arguments text in pieces of this many characters
    echo_tools: bool = False  # once the calls are done, reply "results: <each tool message's content> | ..."
    # Broken upstreams (native API only): mangle(obj, kind) returns what is sent instead of each JSON object of a
    # generation, kind "piece" (a streamed token line), "final" (the streamed done line) or "whole" (a non-stream
    # body); e.g. lambda o, k: {**o, "message": 5} if k == "piece" else o.
    mangle: Callable[[dict, str], Any] | None = None
    # A line that never ends: before token `blob_after`, stream the start of a line and then `blob_bytes` bytes
    # of "x" with no newline (in 64 KiB chunks), then wait like hold_after (until `release` or the client leaves).
    blob_bytes: int = 0
    blob_after: int = 0
    hold_after_end: bool = False  # after the reply's last line, keep the connection open (no closing chunk) until
    # `release` or the client leaves: the reply is whole, the body never ends


@dataclass
class Received:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict | None
    at: float


class FakeOllama:
    """A protocol-faithful stand-in for Ollama, run on its own thread and event loop."""

    def __init__(self, models: list[str] | None = None, version: str = "0.12.6", api_key: str | None = None,
                 no_tools: list[str] = (), tls: ssl.SSLContext | None = None):
        self.models = list(models or ["qwen2.5:3b-instruct"])
        self.no_tools = set(no_tools)  # models without the tools capability: a request with tools gets a 400
        self.api_key = api_key  # /v1 only: demand "Authorization: Bearer <key>" like a hosted server
        self.version = version
        self.tls = tls  # serve https with this server context (as Ollama behind a TLS proxy would)
        self.script = Script()
        self.redirect: str | None = None  # answer every request 301 to the same path there (http to https, say)
        self.requests: list[Received] = []
        self.hangups: list[float] = []  # monotonic times at which a client closed mid-response
        self.tokens_sent = 0
        self.completed = 0  # generations that reached their done line
        self.connections = 0  # TCP connections accepted (a client that reuses connections opens few)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def generations(self) -> list[Received]:
        """The generation requests received so far (chat, generate, /v1), not model loads."""
        return [r for r in list(self.requests)
                if r.path in ("/api/chat", "/api/generate", "/v1/chat/completions") and not _is_load(r)]

    def loads(self) -> list[Received]:
        """The model-load requests (empty prompt or no messages) received so far."""
        return [r for r in list(self.requests) if _is_load(r)]

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "FakeOllama":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=self.tls)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()
            # stop() cancelled the connections: let them end (bounded), then close the loop, which would otherwise
            # warn (ResourceWarning) whenever the garbage collector meets it, in whatever test runs then
            tasks = asyncio.all_tasks(self._loop)
            if tasks:
                self._loop.run_until_complete(asyncio.wait(tasks, timeout=5))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-ollama", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Ollama did not start")
        return self

    def stop(self) -> None:
        self.script.release.set()
        if self._loop is None:
            return

        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- HTTP plumbing -------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None or not await self._dispatch(request, reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, req: Received, reader, writer) -> bool:
        """Answer one request; False means the connection is finished."""
        self.requests.append(req)
        if self.redirect:
            writer.write(_head(301, "text/html", 0)[:-2] + f"Location: {self.redirect}{req.path}\r\n\r\n".encode())
            await writer.drain()
            return True
        routes = {
            ("GET", "/"): lambda: _text(200, "Ollama is running"),
            ("HEAD", "/"): lambda: _text(200, ""),
            ("GET", "/api/version"): lambda: _json(200, {"version": self.version}),
            ("GET", "/api/tags"): lambda: _json(200, {"models": [_tag(m) for m in self.models]}),
            ("GET", "/v1/models"): lambda: _json(200, {"object": "list", "data": [
                {"id": _tag(m)["name"], "object": "model", "created": 1746405464, "owned_by": "library"}
                for m in self.models]}),
        }
        if (req.method, req.path) in routes:
            writer.write(routes[(req.method, req.path)]())
            await writer.drain()
            return True
        if req.path in ("/api/chat", "/api/generate", "/v1/chat/completions"):
            if req.method != "POST":
                writer.write(_text(405, "405 method not allowed"))
                return True
            return await self._generate(req, reader, writer)
        writer.write(_text(404, "404 page not found"))
        await writer.drain()
        return True

    # -- generation ----------------------------------------------------------
    async def _generate(self, req: Received, reader, writer) -> bool:
        body, script, openai = req.body, self.script, req.path.startswith("/v1/")
        wire = OpenAIWire(req, script) if openai else NDJSONWire(req, script)
        if openai and self.api_key and req.headers.get("authorization") != f"Bearer {self.api_key}":
            writer.write(wire.error(401, "Incorrect API key provided", "invalid_api_key"))
            return True
        if not body:
            writer.write(wire.error(400, "missing request body"))
            return True
        model = body.get("model") or ""
        if not model:
            writer.write(wire.error(400, "model is required"))
            return True
        if model not in self.models and f"{model}:latest" not in self.models:
            writer.write(wire.error(404, f"model '{model}' not found"))
            return True
        if script.status is not None:
            writer.write(wire.error(script.status, script.error_text, retry_after=script.retry_after))
            return True
        if _is_load(req):  # Ollama loads the model and answers at once, done_reason "load"
            done = {"model": model, "created_at": _now(), "done": True, "done_reason": "load"}
            done.update({"message": {"role": "assistant", "content": ""}} if req.path == "/api/chat" else {"response": ""})
            writer.write(_json(200, done))
            return True
        if body.get("tools") and model in self.no_tools:
            writer.write(wire.error(400, f"registry.ollama.ai/library/{model} does not support tools"))
            return True
        done_rounds = _tool_rounds_done(body)
        if body.get("tools") and done_rounds < len(script.tool_rounds):
            wire.calls = script.tool_rounds[done_rounds]
            script = wire.script = Script(tokens=[], token_delay_s=script.token_delay_s,
                                          first_byte_delay_s=script.first_byte_delay_s,
                                          calls_together=script.calls_together, fragment_chars=script.fragment_chars)
        elif script.echo_tools:
            results = [m.get("content", "") for m in _after_last_user(body) if m.get("role") == "tool"]
            script = wire.script = Script(tokens=["results: ", " | ".join(results)])
        elif script.echo:
            last = (body.get("messages") or [{"content": body.get("prompt", "")}])[-1]["content"]
            script = wire.script = Script(tokens=["echo: ", last])
        elif script.sized:
            count = (body.get("options") or {}).get("num_predict") or body.get("max_tokens") or len(script.tokens)
            script = wire.script = Script(tokens=[f" w{i % 100}" for i in range(count)],
                                          token_delay_s=script.token_delay_s)
        gone = _Hangup()
        watcher = asyncio.ensure_future(_watch_hangup(reader, gone))
        try:
            if body.get("stream", not openai):  # native API streams by default, /v1 does not
                return await self._stream(wire, script, writer, gone)
            return await self._whole(wire, script, writer, gone)
        except ConnectionError:  # a write failed because the client hung up mid-response: that is a hang-up too
            gone.set()
            self._note_hangup(gone)
            raise
        finally:
            watcher.cancel()  # and wait for it: the next request on this connection reads the same stream
            await asyncio.gather(watcher, return_exceptions=True)

    async def _pause(self, seconds: float, gone: "_Hangup") -> bool:
        """Wait `seconds`; True if the client hung up meanwhile (recorded once)."""
        if seconds > 0 and not gone.is_set():
            try:
                await asyncio.wait_for(gone.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return self._note_hangup(gone)

    async def _hold(self, script: Script, gone: "_Hangup") -> bool:
        deadline = time.monotonic() + MAX_WAIT_S
        while not script.release.is_set() and not gone.is_set() and time.monotonic() < deadline:
            await self._pause(0.005, gone)
        return self._note_hangup(gone)

    def _note_hangup(self, gone: "_Hangup") -> bool:
        if gone.is_set() and not gone.recorded:
            self.hangups.append(time.monotonic())
            gone.recorded = True
        return gone.is_set()

    async def _stream(self, wire, script: Script, writer, gone: "_Hangup") -> bool:
        if await self._pause(script.first_byte_delay_s, gone):
            return False
        head = wire.head()  # like Ollama: no headers until the first token is ready
        for i, token in enumerate(script.tokens):
            if script.blob_bytes and i == script.blob_after:
                return await self._blob(wire, script, writer, gone, head)
            if i == script.hold_after and await self._hold(script, gone):
                return False
            if i and await self._pause(script.token_delay_s, gone):
                return False
            if i == script.error_after:
                if i == 0:  # nothing written yet: a real HTTP error, as Ollama does
                    writer.write(wire.error(500, "an error was encountered while running the model"))
                    return True
                writer.write(wire.chunk(wire.mid_stream_error()) + b"0\r\n\r\n")
                await writer.drain()
                return True
            if i == script.drop_after:
                await writer.drain()
                writer.transport.abort()
                return False
            for part in wire.piece(token, i, script.split_writes):
                writer.write(head + wire.chunk(part))
                head = b""
                await writer.drain()
            self.tokens_sent += 1
        for part in wire.tool_parts():
            if await self._pause(script.token_delay_s, gone):
                return False
            writer.write(head + wire.chunk(part))
            head = b""
            await writer.drain()
        if self._note_hangup(gone):
            return False
        writer.write(head + wire.chunk(wire.final()) + (b"" if script.hold_after_end else b"0\r\n\r\n"))
        await writer.drain()
        self.completed += 1
        if script.hold_after_end and not await self._hold(script, gone):
            writer.write(b"0\r\n\r\n")
        return True

    async def _blob(self, wire, script: Script, writer, gone: "_Hangup", head: bytes) -> bool:
        """Script.blob_bytes: the start of a line, then "x" * blob_bytes with no newline, then hold."""
        writer.write(head + wire.chunk(wire.blob_start()))
        await writer.drain()
        left, piece = script.blob_bytes, b"x" * 65536
        while left > 0:
            if self._note_hangup(gone):
                return False
            writer.write(wire.chunk(piece[:left]))
            left -= len(piece)
            try:
                await writer.drain()
            except ConnectionError:
                gone.set()
        await self._hold(script, gone)
        return False

    async def _whole(self, wire, script: Script, writer, gone: "_Hangup") -> bool:
        if await self._pause(script.first_byte_delay_s, gone):
            return False
        for i in range(len(script.tokens)):
            if i == script.error_after:
                writer.write(wire.error(500, "an error was encountered while running the model"))
                return True
            if i == script.drop_after:
                writer.transport.abort()
                return False
            if i == script.hold_after and await self._hold(script, gone):
                return False
            if i and await self._pause(script.token_delay_s, gone):
                return False
        writer.write(wire.whole())
        await writer.drain()
        self.tokens_sent += len(script.tokens)
        self.completed += 1
        return True


class NDJSONWire:
    """Ollama's native /api/chat and /api/generate framing."""

    def __init__(self, req: Received, script: Script):
        self.model, self.chat, self.body, self.script = req.body.get("model"), req.path == "/api/chat", req.body, script
        self.started = time.monotonic()
        self.calls: list[tuple[str, dict | str]] = []  # tool calls to answer with

    def _call(self, i: int, name: str, arguments: dict | str) -> dict:
        # Ollama's ToolCall: an id (0.12+), the function with its index, and the arguments as an object
        return {"id": f"call_{i:08d}", "function": {"index": i, "name": name, "arguments": arguments}}

    def tool_parts(self) -> list[bytes]:
        calls = [self._call(i, *c) for i, c in enumerate(self.calls)]
        groups = [calls] if self.script.calls_together else [[c] for c in calls]
        return [_line({"model": self.model, "created_at": _now(), "done": False,
                       "message": {"role": "assistant", "content": "", "tool_calls": g}}) for g in groups if g]

    def error(self, status: int, message: str, code: str | None = None, retry_after: str | None = None) -> bytes:
        return _json(status, {"error": message}, retry_after)

    def head(self) -> bytes:
        return _head(200, "application/x-ndjson", chunked=True)

    chunk = staticmethod(lambda data: _chunk(data))

    def _mangled(self, value: dict, kind: str) -> Any:
        return self.script.mangle(value, kind) if self.script.mangle else value

    def blob_start(self) -> bytes:
        return b'{"model":"' + str(self.model).encode() + b'","message":{"role":"assistant","content":"'

    def piece(self, token: str, i: int, split: bool) -> list[bytes]:
        return _split(_line(self._mangled(_piece(self.model, token, self.chat), "piece")), split)

    def mid_stream_error(self) -> bytes:
        return _line({"error": "an error was encountered while running the model"})

    def final(self) -> bytes:
        return _line(self._mangled(_final(self.model, "", self.chat, self.body, self.script.tokens, self.started),
                                   "final"))

    def whole(self) -> bytes:
        text = "".join(self.script.tokens)
        final = _final(self.model, text, self.chat, self.body, self.script.tokens, self.started)
        if self.calls:
            final["message"]["tool_calls"] = [self._call(i, *c) for i, c in enumerate(self.calls)]
        return _json(200, self._mangled(final, "whole"))


class OpenAIWire(NDJSONWire):
    """Ollama's /v1/chat/completions (OpenAI-compatible) framing: SSE, current (v0.32.6+) chunk format."""

    def __init__(self, req: Received, script: Script):
        super().__init__(req, script)
        self.id, self.created = "chatcmpl-42", int(time.time())

    def error(self, status: int, message: str, code: str | None = None, retry_after: str | None = None) -> bytes:
        kind = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
        return _json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}}, retry_after)

    def head(self) -> bytes:
        return _head(200, "text/event-stream", chunked=True)

    def _event(self, choices: list, **extra) -> bytes:
        value = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "system_fingerprint": "fp_ollama", "choices": choices, **extra}
        return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"

    def piece(self, token: str, i: int, split: bool) -> list[bytes]:
        delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
        event = self._event([{"index": 0, "delta": delta, "finish_reason": None}])
        if self.script.sse_comments:
            event = b": keep-alive\n\n" + event
        return _split(event, split)

    def blob_start(self) -> bytes:
        return b'data: {"choices":[{"index":0,"delta":{"content":"'

    def mid_stream_error(self) -> bytes:
        return b'data: {"error":{"message":"an error was encountered while running the model","type":"api_error"}}\n\n'

    def _call(self, i: int, name: str, arguments: dict | str) -> dict:
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        return {"id": f"call_{i:08d}", "type": "function", "function": {"name": name, "arguments": text}}

    def tool_parts(self) -> list[bytes]:
        """OpenAI's streamed tool calls: per call, a head fragment (id, name, empty arguments), then the
        arguments text in pieces, each fragment naming its call by index."""
        events = []
        for i, (name, arguments) in enumerate(self.calls):
            call = self._call(i, name, arguments)
            text, n = call["function"]["arguments"], self.script.fragment_chars
            head = {"index": i, **call, "function": {"name": name, "arguments": ""}}
            delta = {"role": "assistant", "content": None, "tool_calls": [head]} if i == 0 else {"tool_calls": [head]}
            events.append(self._event([{"index": 0, "delta": delta, "finish_reason": None}]))
            for start in range(0, len(text), n):
                piece = {"index": i, "function": {"arguments": text[start:start + n]}}
                events.append(self._event([{"index": 0, "delta": {"tool_calls": [piece]}, "finish_reason": None}]))
        return events

    def _usage(self) -> dict:
        prompt = max(1, len(json.dumps(self.body.get("messages"))) // 4)
        return {"prompt_tokens": prompt, "completion_tokens": len(self.script.tokens),
                "total_tokens": prompt + len(self.script.tokens)}

    def final(self) -> bytes:
        out = self._event([{"index": 0, "delta": {}, "finish_reason": "tool_calls" if self.calls else "stop"}])
        if (self.body.get("stream_options") or {}).get("include_usage"):
            out += self._event([], usage=self._usage())
        return out + b"data: [DONE]\n\n"

    def whole(self) -> bytes:
        return _json(200, {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                           "system_fingerprint": "fp_ollama",
                           "choices": [{"index": 0, "message": self._message(),
                                        "finish_reason": "tool_calls" if self.calls else "stop"}],
                           "usage": self._usage()})

    def _message(self) -> dict:
        if not self.calls:
            return {"role": "assistant", "content": "".join(self.script.tokens)}
        return {"role": "assistant", "content": None,
                "tool_calls": [self._call(i, *c) for i, c in enumerate(self.calls)]}


# -- wire helpers -------------------------------------------------------------


def _is_load(req: Received) -> bool:
    body = req.body or {}
    if req.path == "/api/generate":
        return not body.get("prompt") and not body.get("suffix")
    return req.path == "/api/chat" and not body.get("messages")


def _after_last_user(body: dict) -> list[dict]:
    messages = body.get("messages") or []
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    return messages[last + 1:]


def _tool_rounds_done(body: dict) -> int:
    """How many tool-call rounds this request already carries (assistant tool-call messages after the user's)."""
    return sum(1 for m in _after_last_user(body) if m.get("role") == "assistant" and m.get("tool_calls"))


class _Hangup(asyncio.Event):
    """Set when the client hangs up; `recorded` once the fake has counted it."""

    recorded = False


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    raw = await reader.readexactly(int(headers.get("content-length", "0")))
    try:
        body = json.loads(raw) if raw else None  # like gin: JSON whatever the Content-Type says
    except ValueError:
        body = None
    return Received(method, target.split("?")[0], headers, body, time.monotonic())


async def _watch_hangup(reader: asyncio.StreamReader, gone: asyncio.Event) -> None:
    """Set `gone` when the client closes its side (EOF) while the fake is answering."""
    try:
        while await reader.read(1024):
            pass
    except ConnectionError:
        pass
    gone.set()


def _head(status: int, content_type: str, length: int | None = None, chunked: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Type: {content_type}",
             "Date: " + datetime.now(timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")]
    lines.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {length or 0}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _json(status: int, value: dict, retry_after: str | None = None) -> bytes:
    # gin's c.JSON: compact, no trailing newline, charset in the type
    data = json.dumps(value, separators=(",", ":")).encode()
    head = _head(status, "application/json; charset=utf-8", len(data))
    if retry_after is not None:
        head = head[:-2] + f"Retry-After: {retry_after}\r\n\r\n".encode()
    return head + data


def _split(data: bytes, split: bool) -> list[bytes]:
    """One write, or two cut in the middle of the line (a client must reassemble lines)."""
    return [data[: len(data) // 2], data[len(data) // 2:]] if split else [data]


def _text(status: int, text: str) -> bytes:
    data = text.encode()
    return _head(status, "text/plain; charset=utf-8", len(data)) + data


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _line(value: dict) -> bytes:
    # Go's json.Marshal escapes <, > and & in strings; mimic it so clients must decode JSON properly
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    # a lone surrogate (a broken upstream's) goes out in UTF-8's form, which Python's JSON reader takes
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") + "\n").encode(
        "utf-8", "surrogatepass")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _piece(model: str, text: str, chat: bool) -> dict:
    if chat:
        return {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": text},
                "done": False}
    return {"model": model, "created_at": _now(), "response": text, "done": False}


def _final(model: str, text: str, chat: bool, body: dict, tokens: list[str], started: float) -> dict:
    final = _piece(model, text, chat)
    prompt = body.get("messages") or body.get("prompt") or ""
    eval_ns = int((time.monotonic() - started) * 1e9) or 1
    final.update(done=True, done_reason="stop", total_duration=eval_ns + 2_000_000, load_duration=1_334_875,
                 prompt_eval_count=max(1, len(json.dumps(prompt)) // 4), prompt_eval_duration=1_000_000,
                 eval_count=len(tokens), eval_duration=eval_ns)
    return final


def _tag(name: str) -> dict:
    full = name if ":" in name else f"{name}:latest"
    return {"name": full, "model": full, "modified_at": "2025-05-04T17:37:44.706015396-07:00",
            "size": 1_929_912_432, "digest": "0" * 64,
            "details": {"parent_model": "", "format": "gguf", "family": "qwen2", "families": ["qwen2"],
                        "parameter_size": "3.1B", "quantization_level": "Q4_K_M"}}


def main(argv: list[str] | None = None) -> int:
    """Run the fake on its own (for the benchmark): python fake_ollama.py --port 11435 [--token-ms 0]."""
    import argparse

    parser = argparse.ArgumentParser(description="A fake Ollama on 127.0.0.1, answering with num_predict tokens.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token-ms", type=float, default=0.0)
    parser.add_argument("--model", default="qwen2.5:3b-instruct")
    args = parser.parse_args(argv)
    fake = FakeOllama(models=[args.model])
    fake.script = Script(sized=True, token_delay_s=args.token_ms / 1000)
    fake.requests = _Forgetful()  # a long benchmark must not keep every request in memory

    async def serve() -> None:
        server = await asyncio.start_server(fake._connection, "127.0.0.1", args.port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(serve())
    return 0


class _Forgetful(list):
    """A request log that keeps nothing."""

    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    raise SystemExit(main())
