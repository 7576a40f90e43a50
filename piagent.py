"""piagent — a small agent server in front of Ollama, for a Raspberry Pi.

Run it:
    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python piagent.py                 # listens on 127.0.0.1:8000
    .venv/bin/python piagent.py --host 0.0.0.0 --port 8000 --env-file /etc/piagent/piagent.env

Endpoints: GET /health (liveness, never calls Ollama), GET /agents, POST /chat {"message", "agent"="general",
"stream"=false, "conversation_id"?} -> {"reply", "conversation_id", "model", "provider"} (or with "stream": true,
a stream of tokens); the same agents for OpenAI clients at /v1/ and for Ollama clients at /api/. More: README.md.

Config comes from, highest first: the real environment, the env file (PIAGENT_ENV_FILE, or piagent.env beside
this file, or --env-file), then the defaults in `Config`. piagent.env lists every variable with a comment.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import contextlib
import difflib
import errno
import hashlib
import hmac
import inspect
import ipaddress
import itertools
import json
import logging
import math
import operator
import os
import re
import shlex
import signal
import sqlite3
import ssl
import sys
import threading
import time
import uuid
import zoneinfo
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import (Annotated, Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator, Literal,
                    Mapping, MutableMapping, NamedTuple, Protocol, TypeVar)

import httpx
from fastapi import FastAPI, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

# ---------------------------------------------------------------------------
# Config: typed settings from the environment and an optional env file
# ---------------------------------------------------------------------------

T = TypeVar("T")
log = logging.getLogger("piagent")

#: Name of the env file looked for beside this module when PIAGENT_ENV_FILE is not set.
DEFAULT_ENV_FILE_NAME = "piagent.env"
#: System prompt of an agent that has no AGENT_<NAME>_SYSTEM.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant running on a small computer. Answer clearly and briefly."
#: Agent names become parts of variable names (OLLAMA_MODEL_<NAME>), so they must be identifier-like.
AGENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Ollama's keep_alive: seconds as a number, or a Go duration such as "30m", "1h30m", "-1".
KEEP_ALIVE_PATTERN = re.compile(r"^-?\d+$|^-?(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
#: A key in an env file: what systemd and a POSIX shell both accept.
ENV_KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("auto", "text", "json")
#: A CORS origin: scheme, host and optional port, nothing else (and never "*").
ORIGIN_PATTERN = re.compile(r"^https?://[A-Za-z0-9.-]+(:\d{1,5})?$")
#: A tool name in AGENT_<NAME>_TOOLS: a built-in (calc), one of an MCP server's (files.read_text_file) or all (time.*).
TOOL_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$|^[a-z][a-z0-9_]{0,31}\.(\*|[A-Za-z0-9_./-]{1,128})$")
#: MCP_SERVERS names become parts of variable names (MCP_<NAME>_URL) and prefixes of tool names.
MCP_SERVER_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
OLLAMA_APIS = ("chat", "generate")
#: HOST: an IPv4 or IPv6 address (fe80::1%eth0 with its interface), or a host name (letters, digits, '-' and '.').
HOST_PATTERN = re.compile(r"^[0-9A-Za-z.-]{1,253}$|^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(%[0-9A-Za-z_.-]{1,15})?$")


class ConfigError(Exception):
    """A setting or env-file line piagent cannot use; the message names it and says what is expected."""


class StoreError(Exception):
    """The memory store cannot start (bad path, corrupt file, no Redis): one line, and whether retrying may help."""

    def __init__(self, message: str, retry_may_help: bool = False):
        super().__init__(message)
        self.retry_may_help = retry_may_help


class ToolError(Exception):
    """A tool refused its input; the message goes back to the model as the call's result."""


class ToolTimeout(ToolError):
    """A tool (or its MCP server) did not answer in time: the rest of the reply does not wait on it again."""


class ClientGone(Exception):
    """The client hung up (or stopped reading) before the reply was whole; nothing more is sent."""


class PiagentError(Exception):
    """An error a caller can act on: `status`, `code`, a message that says what to do, and `headers` to send."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class UpstreamFailure(PiagentError):
    """The model server failed; nothing from this request is stored."""


# The whole error table: every failure a client can act on, with its HTTP status and code.
class InvalidRequest(PiagentError): status, code = 422, "invalid_request"  # noqa: E701
class UnknownAgent(PiagentError): status, code = 404, "unknown_agent"  # noqa: E701
class ConversationNotFound(PiagentError): status, code = 404, "conversation_not_found"  # noqa: E701
class MessageTooLong(PiagentError): status, code = 413, "message_too_long"  # noqa: E701
class PromptTooLarge(PiagentError): status, code = 413, "prompt_too_large"  # noqa: E701
class BodyTooLarge(PiagentError): status, code = 413, "body_too_large"  # noqa: E701
class BodyTimeout(PiagentError): status, code = 408, "request_timeout"  # noqa: E701
class Unauthorized(PiagentError): status, code = 401, "unauthorized"  # noqa: E701
class RateLimited(PiagentError): status, code = 429, "rate_limited"  # noqa: E701
class HostNotAllowed(PiagentError): status, code = 400, "host_not_allowed"  # noqa: E701
class OriginNotAllowed(PiagentError): status, code = 403, "origin_not_allowed"  # noqa: E701
class QueueFull(PiagentError): status, code = 503, "queue_full"  # noqa: E701
class ShuttingDown(PiagentError): status, code = 503, "shutting_down"  # noqa: E701
class MemoryUnavailable(PiagentError): status, code = 503, "memory_unavailable"  # noqa: E701
class ModelsNotManaged(PiagentError): status, code = 403, "models_not_managed"  # noqa: E701
class UpstreamUnavailable(UpstreamFailure): status, code = 503, "upstream_unavailable"  # noqa: E701
class UpstreamBusy(UpstreamFailure): status, code = 503, "upstream_busy"  # noqa: E701
class UpstreamTimeout(UpstreamFailure): status, code = 504, "upstream_timeout"  # noqa: E701
class ModelNotFound(UpstreamFailure): status, code = 502, "model_not_found"  # noqa: E701
class UpstreamAuth(UpstreamFailure): status, code = 502, "upstream_auth"  # noqa: E701
class UpstreamError(UpstreamFailure): status, code = 502, "upstream_error"  # noqa: E701
class RequestRefused(PiagentError): status, code = 400, "request_refused"  # noqa: E701


class UpstreamRefused(UpstreamError):
    """The upstream's HTTP 400: a 502 unless the client asked for what it refused (Exchange.events tells)."""

    def __init__(self, message: str, refused: str, tools: bool):
        super().__init__(message)
        self.refused, self.tools = refused, tools  # the upstream's words; whether they are about tools

    def names(self, fields: Iterable[str]) -> list[str]:
        """Those of `fields` (a client's own) the refusal's words name; none when they say what the model cannot do
        (`"m" does not support chat`: the operator's model), but thinking or tools, which a client asks for."""
        words = self.refused.lower()
        capability = "does not support" in words and not re.search(r"does not support (thinking|tools)", words)
        return [] if capability else [f for f in fields if f.lower() in words]

    def theirs(self, remedy: str) -> RequestRefused:
        """The same refusal as the client's own 400, when it was the client's field."""
        return RequestRefused(f"{self.refused}; {remedy}")


#: Seconds a client is told to wait when the model or the memory is busy and no better figure is known.
DEFAULT_RETRY_AFTER_S = 5


@dataclass(frozen=True)
class Agent:
    """A named persona: which model answers, with what system prompt, and which tools it may use."""

    name: str
    model: str
    system: str
    tools: tuple[str, ...] = ()  # names in TOOLS (Tools section) the model is offered; none by default


@dataclass(frozen=True)
class McpServerConfig:
    """One server named in MCP_SERVERS: how to reach it and how long one request may take."""

    name: str                       # prefixes its tools' names for the model
    command: tuple[str, ...] = ()   # a stdio server's argv (MCP_<NAME>_COMMAND, shlex-split), or
    url: str | None = None          # a Streamable HTTP endpoint (MCP_<NAME>_URL)
    token: str | None = None        # sent as Authorization: Bearer, to this server only
    timeout_s: float = 30.0         # each request: a tool call, and each step of connecting


@dataclass(frozen=True)
class Config:
    """Every setting piagent reads, with the default used when the variable is not set."""

    provider: str = "ollama"  # which entry of PROVIDERS talks to the model
    openai_base_url: str = "http://127.0.0.1:8080/v1"  # for PROVIDER=openai: llama.cpp's server by default
    openai_api_key: str | None = None  # sent as Authorization: Bearer; local servers need none
    ollama_host: str = "http://127.0.0.1:11434"  # Ollama's base URL (loopback: Ollama's own default)
    ollama_api: str = "chat"  # "chat" applies the model's template; "generate" for models without one
    ollama_keep_alive: str | None = None  # e.g. "30m" so the Pi does not unload the model between chats
    upstream_connect_timeout_s: float = 5.0  # a local model server answers a connect at once or not at all
    upstream_timeout_s: float = 300.0  # first byte may take minutes while a Pi loads a model
    ctx_tokens: int = 2048  # options.num_ctx: the context window Ollama allocates
    max_tokens: int = 200  # options.num_predict: bounds every reply, so the Pi is never stuck on one
    temperature: float = 0.7  # options.temperature
    enable_memory: bool = True  # keep a short history per conversation_id
    memory_max_turns: int = 8  # turns (user + reply) kept per conversation: bounds prompt size
    memory_ttl_min: float = 60.0  # idle conversations are forgotten after this
    memory_max_conversations: int = 500  # least recently used beyond this are forgotten: bounds RAM
    memory_backend: str = "memory"  # memory (fastest, forgets on restart), sqlite (a file), redis (shared)
    memory_path: str = "piagent.db"  # sqlite file; default $STATE_DIRECTORY/piagent.db under systemd
    redis_url: str = "redis://127.0.0.1:6379/0"
    workers: int = 1  # uvicorn worker processes; more than 1 needs a shared memory (sqlite or redis)
    host: str = "127.0.0.1"  # loopback by default: exposing it on the LAN is a choice
    port: int = 8000
    log_level: str = "info"
    sse_ping_s: float = 15.0  # SSE comment heartbeat while waiting for the first token, so proxies don't time out
    log_format: str = "auto"  # text on a terminal, json otherwise (journald, files)
    log_prompts: bool = False  # put message text in request logs: off, logs often outlive conversations
    api_keys: tuple[str, ...] = ()  # empty: no auth (fine on loopback, loud warning otherwise)
    rate_limit_per_min: int = 30  # per key (or per client address without keys); 0 = off
    trust_proxy: bool = False  # take the client address from X-Forwarded-For (only behind your own proxy)
    max_body_bytes: int = 65_536  # larger bodies are refused before parsing
    max_message_chars: int = 4000  # a longer newest user message is refused: a Pi cannot read a novel per request
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; empty = no CORS headers
    allowed_hosts: tuple[str, ...] = ()  # Host names a keyless server on loopback answers to, besides loopback
    max_concurrent: int = 1  # generations at once: a Pi runs one well
    max_queue: int = 8  # more requests than this waiting -> 503 queue_full instead of piling up
    shutdown_grace_s: float = 10.0  # on SIGTERM, in-flight streams get this long to finish
    write_timeout_s: float = 30.0  # a client that reads nothing of a stream for this long is dropped
    max_connections: int = 256  # open client connections; more are answered 503 at once and closed
    header_timeout_s: float = 10.0  # a connection must send a whole request head within this, then its body
    enable_ui: bool = True  # the chat page at /
    metrics_public: bool = False  # /metrics without a key (for a Prometheus on the LAN)
    warmup: bool = True  # load each agent's model at start-up (Ollama only), so the first chat is not cold
    max_tool_rounds: int = 3  # model calls that may ask for tools per reply; then it must answer without them
    embed_model: str | None = None  # the model of /api/embed for every agent; unset: the agent's own model
    mcp_servers: tuple[McpServerConfig, ...] = ()  # MCP servers whose tools agents may list (MCP_SERVERS)
    mcp_max_result_chars: int = 8000  # an MCP tool's result is cut to this before the model reads it
    agents: tuple[Agent, ...] = field(default=(Agent("general", "qwen2.5:3b-instruct", DEFAULT_SYSTEM_PROMPT),))
    unread: tuple[str, ...] = ()  # not a setting: env-file names nothing read (typos), each with a likely fix

    def agent(self, name: str) -> Agent | None:
        """The agent called `name`, or None."""
        return next((a for a in self.agents if a.name == name), None)


def parse_env_file(text: str, source: str = "env file") -> dict[str, str]:
    """Parse KEY=value lines as systemd does. Example: 'A=1\\n# note\\nB="two words"' -> {'A': '1', 'B': 'two words'}"""
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        where = f"{source} line {number}"
        if not sep or not ENV_KEY_PATTERN.match(key):
            hint = (" (drop 'export')" if key.startswith("export ") else " (no spaces around '=')"
                    if sep and ENV_KEY_PATTERN.match(key.rstrip()) else "")
            raise ConfigError(f"{where}: expected KEY=value, got {raw.strip()!r}{hint}")
        values[key] = _env_file_value(value, where, key)
    return values


def _env_file_value(value: str, where: str, key: str) -> str:
    """Unquote one value, refusing what systemd would read differently from piagent."""
    if value == "":
        raise ConfigError(f"{where}: {key}= is empty; delete the line to use the default")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        if value[0] in value[1:-1]:  # systemd's quote ends there, and what follows is read on from it
            raise ConfigError(f"{where}: {key} has its quote character inside its quotes; use the other quote, or "
                              f"none (an apostrophe needs no quotes: You're kind)")
        value = value[1:-1]
    elif value[0] in "\"'" or value[-1] in "\"'":
        raise ConfigError(f"{where}: {key} has an unmatched quote; quote the whole value or none of it")
    elif re.search(r"\s#", value):  # systemd would keep it as part of the value
        raise ConfigError(f"{where}: {key} has a comment after its value; put comments on a line of their own "
                          "(or quote the whole value if the '#' belongs to it)")
    if "\\" in value or "$" in value or '"' in value:
        raise ConfigError(
            f"{where}: {key} contains a backslash, '$' or '\"', which systemd would rewrite; write the value plainly"
        )
    return value


def read_env_file(path: Path) -> dict[str, str]:
    """Read and parse an env file; a missing or unreadable file is a ConfigError."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror or exc}") from None
    if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):  # UTF-8's or UTF-16's byte-order mark
        raise ConfigError(f"{path} starts with a byte-order mark, which systemd would read as part of the first "
                          "line; save it as UTF-8 without BOM")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path} line {line}: not UTF-8 text; save the file as UTF-8") from None
    return parse_env_file(text, source=str(path))


def default_env_file(environ: Mapping[str, str]) -> Path | None:
    """PIAGENT_ENV_FILE if set, else piagent.env beside this module if it exists, else None."""
    if environ.get("PIAGENT_ENV_FILE"):
        return Path(environ["PIAGENT_ENV_FILE"])
    beside = Path(__file__).resolve().with_name(DEFAULT_ENV_FILE_NAME)
    return beside if beside.is_file() else None


class _Settings:
    """Typed, strict reads from merged sources; every error names the key, the value and what is expected."""

    def __init__(self, values: Mapping[str, str]):
        self.values = values
        self.asked: set[str] = set()  # every name read: what an env file sets beyond these is a typo

    def raw(self, key: str) -> str | None:
        self.asked.add(key)
        return (self.values.get(key) or "").strip() or None

    def named(self, key: str, *aliases: str) -> str:
        """`key`, or the first of its older names that is set (old env files keep working)."""
        self.asked.update(aliases)  # an old name beside the new one is known, though the new one wins
        return next((k for k in (key, *aliases) if self.raw(k) is not None), key)

    def fail(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{key}={self.values.get(key)!r} is not valid: expected {expected}")

    def text(self, key: str, default: str | None) -> str | None:
        return self.raw(key) or default

    def parsed(self, key: str, default: T, expected: str, parse: Callable[[str], T | None]) -> T:
        """parse(value), or the default when unset; an error saying `expected` if parse gives None or ValueError."""
        value = self.raw(key)
        if value is None:
            return default
        with contextlib.suppress(ValueError):  # not a number at all: the same error as one out of range
            if (result := parse(value)) is not None:
                return result
        raise self.fail(key, expected)

    def matching(self, key: str, default: str | None, pattern: re.Pattern, expected: str) -> str | None:
        """The value if it matches `pattern` (else an error saying `expected`), or the default when unset."""
        return self.parsed(key, default, expected, lambda v: v if pattern.match(v) else None)

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        return self.parsed(key, default, "one of " + ", ".join(options),
                           lambda v: v.lower() if v.lower() in options else None)

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        return self.parsed(key, default, f"a whole number from {low} to {high}",
                           lambda v: int(v) if re.fullmatch(r"-?\d+", v) and low <= int(v) <= high else None)

    def items(self, key: str, pattern: re.Pattern, expected: str) -> tuple[str, ...]:
        """A comma-separated list, each item matching `pattern`; empty or unset -> ()."""
        items = tuple(i.strip() for i in (self.raw(key) or "").split(",") if i.strip())
        if not all(pattern.match(i) for i in items):
            raise self.fail(key, expected)
        return items

    def number(self, key: str, default: float, low: float, high: float) -> float:
        return self.parsed(key, default, f"a number from {low:g} to {high:g}",
                           lambda v: n if low <= (n := float(v)) <= high else None)

    def boolean(self, key: str, default: bool) -> bool:
        return self.parsed(key, default, "true, false, 1 or 0",
                           lambda v: {"true": True, "1": True, "false": False, "0": False}.get(v.lower()))

    def url(self, key: str, default: str) -> str:
        value = self.text(key, default)
        parsed = httpx.URL(value) if re.match(r"^https?://[^/\s]+", value) else None
        if parsed is None or not parsed.host:
            raise self.fail(key, "a URL with scheme and host, like http://127.0.0.1:11434")
        return value.rstrip("/")


def without_credentials(url: str) -> str:
    """A URL as piagent shows it (messages, logs, --check): a user and password in it replaced by ***.
    Example: "http://me:secret@proxy:8080" -> "http://***@proxy:8080"."""
    return re.sub(r"(?<=//)[^@/]*@", "***@", url, count=1)


# ---------------------------------------------------------------------------
# Memory: conversation stores (in-process, SQLite, Redis)
# ---------------------------------------------------------------------------

#: Redis keys start with this, so piagent can share a Redis with other programs.
REDIS_PREFIX = "piagent:"
#: Redis EXPIREs a conversation this long after its TTL: a backstop, the TTL itself is checked on every read.
REDIS_EXPIRE_MARGIN_S = 60
#: The conversation list API returns at most this many per page.
MAX_PAGE = 100
#: A listed conversation's preview: its first kept user message, cut to this many characters.
PREVIEW_CHARS = 80


class Turn(NamedTuple):
    """One exchange: the user's message and the assistant's reply."""

    user: str
    assistant: str
    created_at: float = 0.0  # when it was stored, epoch seconds
    index: int = 0  # its number in the conversation: 0 for the first turn ever, even once that was forgotten


class Listed(NamedTuple):
    """A conversation as the list shows it, before it is opened."""

    conversation_id: str
    agent: str
    last_used: float
    preview: str  # the first kept user message, at most PREVIEW_CHARS characters


@dataclass
class Conversation:
    """What the conversation API shows of one conversation."""

    conversation_id: str
    agent: str
    last_used: float
    turns: list[Turn]


class MemoryStore(Protocol):
    """Where conversations live (within CappedStore's caps); a new backend is a class and a MEMORY_STORES line."""

    async def open(self) -> None:
        """Connect / create; raise StoreError if that is impossible."""

    async def close(self) -> None:
        """Release files and connections."""

    async def history(self, conversation_id: str) -> list[Turn]:
        """The kept turns, oldest first; [] for an unknown or expired conversation. A use (see CappedStore)."""

    async def append(self, conversation_id: str, agent: str, user: str, assistant: str) -> None:
        """Store one completed turn, atomically. A use."""

    async def get(self, conversation_id: str) -> Conversation | None:
        """The conversation, or None if unknown or expired. Not a use."""

    async def delete(self, conversation_id: str) -> None:
        """Forget the conversation (nothing happens if it is unknown)."""

    async def recent(self, limit: int, before: float | None, owner: str = "") -> list[Listed]:
        """Live conversations used before `before`, owned by `owner`, newest first."""

    async def count(self) -> int:
        """How many live conversations are kept."""

    async def check(self) -> None:
        """A cheap write and read, for /ready; raises MemoryUnavailable naming the cause."""


class CappedStore:
    """The caps every store keeps: the last max_turns turns, conversations idle ttl_s forgotten, at most
    max_conversations (least recently used first; reading history or storing a turn is a use); and its clock."""

    def __init__(self, config: Config, clock: Callable[[], float]):
        self.max_turns, self.ttl_s = config.memory_max_turns, config.memory_ttl_min * 60
        self.max_conversations, self.clock = config.memory_max_conversations, clock


@dataclass
class _Kept:
    agent: str
    turns: deque[Turn]
    last_used: float
    total: int = 0  # turns ever stored: the next turn's index


class InProcessStore(CappedStore):
    """Conversations in RAM, in last-use order: the TTL sweep and LRU eviction pop from the front (O(1) amortised)."""

    def __init__(self, config: Config, clock: Callable[[], float]):
        super().__init__(config, clock)
        self._kept: OrderedDict[str, _Kept] = OrderedDict()

    async def open(self) -> None:
        """Nothing to connect, release or probe: open, close and check do nothing."""

    close = check = open

    def _sweep(self) -> float:
        """Forget conversations idle for the TTL or longer (they sit at the front); return the time now."""
        now = self.clock()
        while self._kept and now - next(iter(self._kept.values())).last_used >= self.ttl_s:
            self._kept.popitem(last=False)
        return now

    def _use(self, conversation_id: str) -> _Kept | None:
        now = self._sweep()
        kept = self._kept.get(conversation_id)
        if kept is not None:
            kept.last_used = now
            self._kept.move_to_end(conversation_id)
        return kept

    async def history(self, conversation_id: str) -> list[Turn]:
        kept = self._use(conversation_id)
        return list(kept.turns) if kept else []

    async def append(self, conversation_id: str, agent: str, user: str, assistant: str) -> None:
        kept = self._use(conversation_id)
        if kept is None:
            while len(self._kept) >= self.max_conversations:
                self._kept.popitem(last=False)
            kept = self._kept[conversation_id] = _Kept(agent, deque(maxlen=self.max_turns), self.clock())
        kept.agent = agent
        kept.turns.append(Turn(user, assistant, kept.last_used, kept.total))
        kept.total += 1

    async def get(self, conversation_id: str) -> Conversation | None:
        self._sweep()
        kept = self._kept.get(conversation_id)
        return Conversation(conversation_id, kept.agent, kept.last_used, list(kept.turns)) if kept else None

    async def delete(self, conversation_id: str) -> None:
        self._kept.pop(conversation_id, None)

    async def count(self) -> int:
        self._sweep()
        return len(self._kept)

    async def recent(self, limit: int, before: float | None, owner: str = "") -> list[Listed]:
        self._sweep()
        found = (Listed(cid, kept.agent, kept.last_used, kept.turns[0].user[:PREVIEW_CHARS] if kept.turns else "")
                 for cid, kept in reversed(self._kept.items())  # newest first
                 if (before is None or kept.last_used < before) and kept.agent.startswith(owner))
        return list(itertools.islice(found, limit))


@contextmanager
def storage_errors(path: Path = Path("MEMORY_PATH"), kinds: tuple = (sqlite3.Error, OSError)) -> Iterator[None]:
    """A storage error of `kinds` (a disk's OSError, a database's) as MemoryUnavailable, its cause told for `path`."""
    try:
        yield
    except kinds as exc:
        raise MemoryUnavailable(sqlite_problem(exc, path), {"Retry-After": str(DEFAULT_RETRY_AFTER_S)}) from None


def sqlite_problem(exc: sqlite3.Error | OSError, path: Path) -> str:
    """What a SQLite error means and what to do. Example: "database or disk is full" -> "the disk is full ...\""""
    text = str(exc).lower()
    if "full" in text or getattr(exc, "errno", None) == errno.ENOSPC:
        return (f"the disk is full (MEMORY_PATH={path}): free some space (DELETE /conversations/<id> frees a "
                f"little; old logs and files more)")
    if "readonly" in text or "read-only" in text:
        return f"MEMORY_PATH={path} is read-only: let piagent's user write it and its folder (check the owner)"
    if "disk i/o" in text:
        return f"the disk holding MEMORY_PATH={path} failed to read or write: is the SD card failing?"
    if "malformed" in text or "not a database" in text or "no such table" in text:
        return (f"MEMORY_PATH={path} is not a usable SQLite database ({exc}): it is damaged or was replaced; stop "
                f"piagent, move the file aside, and start it again with an empty memory")
    return f"the SQLite memory at {path} failed: {exc}"


#: Bytes kept free beside the SQLite file (in <file>-reserve): room for a DELETE when the disk is full.
SQLITE_RESERVE_BYTES = 64 << 10
#: Seconds between /ready's write probes of the SQLite file (a write: not on every poll of a monitor).
SQLITE_PROBE_S = 30.0
#: A conversation's turns, oldest first.
SQLITE_TURNS = "SELECT user, assistant, created_at, number FROM turns WHERE conversation_id = ? ORDER BY seq"
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY, agent TEXT NOT NULL, last_used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS conversations_by_last_use ON conversations(last_used);
CREATE TABLE IF NOT EXISTS turns (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    user TEXT NOT NULL, assistant TEXT NOT NULL, created_at REAL NOT NULL, number INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS turns_by_conversation ON turns(conversation_id, seq);
CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, at REAL NOT NULL);
"""


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a file made by an older piagent up to SQLITE_SCHEMA: its turns had no number (the kept ones are
    numbered in order, from 0; which of them came first is all that is used)."""
    def numbered() -> bool:
        return "number" in {row[1] for row in db.execute("PRAGMA table_info(turns)")}

    if numbered():
        return
    db.execute("BEGIN IMMEDIATE")  # then look again: another worker may have done it meanwhile
    try:
        if not numbered():
            db.execute("ALTER TABLE turns ADD COLUMN number INTEGER NOT NULL DEFAULT 0")
            db.execute("UPDATE turns SET number = (SELECT COUNT(*) FROM turns AS older WHERE older.conversation_id "
                       "= turns.conversation_id AND older.seq < turns.seq)")
            log.info("the SQLite memory was made by an older piagent; its turns are numbered now")
        db.execute("COMMIT")
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")


class SQLiteStore(CappedStore):
    """Conversations in one SQLite file (WAL), shared by workers; calls run on a thread, so the loop never waits."""

    def __init__(self, config: Config, clock: Callable[[], float]):
        super().__init__(config, clock)
        self.path = Path(config.memory_path)
        self.reserve = self.path.with_name(self.path.name + "-reserve")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="piagent-sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, work: Callable[..., T], *args: Any) -> T:
        with storage_errors(self.path, (sqlite3.Error,)):  # an OSError goes on to the caller's storage_errors()
            return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._thread, self._connect)

    def _connect(self) -> None:
        where = f"MEMORY_PATH={self.path}"
        if not self.path.parent.is_dir():
            raise StoreError(f"{where}: the folder {self.path.parent} does not exist; create it or change MEMORY_PATH")
        try:
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None)  # explicit transactions below
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL: a crash loses nothing committed, never corrupts
            db.execute("PRAGMA foreign_keys=ON")
            db.executescript(SQLITE_SCHEMA)
            _migrate(db)
        except sqlite3.Error as exc:
            raise StoreError(sqlite_problem(exc, self.path)) from None
        self._db, self._inode, self._probed = db, self.path.stat().st_ino, -math.inf
        self._keep_reserve()

    def _keep_reserve(self) -> None:
        """Keep SQLITE_RESERVE_BYTES of disk beside the database, for a DELETE to use when the disk is full."""
        try:
            if not self.reserve.exists():
                self.reserve.write_bytes(bytes(SQLITE_RESERVE_BYTES))
        except OSError:
            self.reserve.unlink(missing_ok=True)  # no room now: try again at the next check

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
        self._thread.shutdown(wait=True)

    def _transaction(self, work: Callable[[sqlite3.Connection, float], T]) -> T:
        """Run work(db, now) in one write transaction, after forgetting expired conversations."""
        db, now = self._db, self.clock()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM conversations WHERE last_used <= ?", (now - self.ttl_s,))
            result = work(db, now)
            db.execute("COMMIT")
            return result
        except BaseException:  # in the store's own thread: whatever stopped the work, the transaction must end
            if db.in_transaction:  # a full disk may have ended it already: keep its error, not ROLLBACK's
                db.execute("ROLLBACK")
            raise

    async def history(self, conversation_id: str) -> list[Turn]:
        def read(db: sqlite3.Connection, now: float) -> list[Turn]:
            if db.execute("UPDATE conversations SET last_used = ? WHERE id = ?", (now, conversation_id)).rowcount == 0:
                return []
            return [Turn(*row) for row in db.execute(SQLITE_TURNS, (conversation_id,))]

        return await self._run(self._transaction, read)

    async def append(self, conversation_id: str, agent: str, user: str, assistant: str) -> None:
        def write(db: sqlite3.Connection, now: float) -> None:
            db.execute("INSERT INTO conversations (id, agent, last_used) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE "
                       "SET agent = excluded.agent, last_used = excluded.last_used", (conversation_id, agent, now))
            db.execute("INSERT INTO turns (conversation_id, user, assistant, created_at, number) VALUES (?, ?, ?, ?, "
                       "(SELECT COALESCE(MAX(number) + 1, 0) FROM turns WHERE conversation_id = ?))",
                       (conversation_id, user, assistant, now, conversation_id))
            db.execute("DELETE FROM turns WHERE conversation_id = ? AND seq <= (SELECT seq FROM turns WHERE "
                       "conversation_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
                       (conversation_id, conversation_id, self.max_turns))
            db.execute("DELETE FROM conversations WHERE id IN (SELECT id FROM conversations "
                       "ORDER BY last_used DESC, rowid DESC LIMIT -1 OFFSET ?)", (self.max_conversations,))

        await self._run(self._transaction, write)

    async def get(self, conversation_id: str) -> Conversation | None:
        def read() -> Conversation | None:
            row = self._db.execute("SELECT agent, last_used FROM conversations WHERE id = ? AND last_used > ?",
                                   (conversation_id, self.clock() - self.ttl_s)).fetchone()
            if row is None:
                return None
            turns = self._db.execute(SQLITE_TURNS, (conversation_id,))
            return Conversation(conversation_id, row[0], row[1], [Turn(*t) for t in turns])

        return await self._run(read)

    async def delete(self, conversation_id: str) -> None:
        def forget() -> None:
            try:
                self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            except sqlite3.OperationalError as exc:  # a full disk: spend the reserve, so that space can be freed
                if "full" not in str(exc) or not self.reserve.exists():
                    raise
                self.reserve.unlink()
                self._db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

        await self._run(forget)

    async def count(self) -> int:
        def read() -> int:
            return self._db.execute("SELECT COUNT(*) FROM conversations WHERE last_used > ?",
                                    (self.clock() - self.ttl_s,)).fetchone()[0]

        return await self._run(read)

    async def check(self) -> None:
        def probe() -> None:
            try:  # every time: the file is still the one opened, and still looks like a database
                with self.path.open("rb") as file:
                    if os.fstat(file.fileno()).st_ino != self._inode or file.read(16) != b"SQLite format 3\x00":
                        raise sqlite3.DatabaseError("file is not a database: it was replaced or overwritten")
            except FileNotFoundError:
                raise sqlite3.OperationalError("unable to open: the file was deleted") from None
            if time.monotonic() - self._probed >= SQLITE_PROBE_S:  # a real write, now and then (SD cards wear)
                self._transaction(lambda db, now: db.execute("INSERT OR REPLACE INTO probe VALUES (1, ?)", (now,)))
                self._probed = time.monotonic()
                self._keep_reserve()

        try:
            await self._run(probe)
        except MemoryUnavailable as exc:
            if "deleted" in exc.message or "unable to open" in exc.message:
                exc.message = (f"MEMORY_PATH={self.path} was deleted while piagent ran; turns are going nowhere: "
                               f"restart piagent (sudo systemctl restart piagent) to start a new memory")
            raise

    async def recent(self, limit: int, before: float | None, owner: str = "") -> list[Listed]:
        def read() -> list[Listed]:
            # the preview is cut here: SQLite's substr() stops at a NUL character
            return [Listed(cid, agent, used, first[:PREVIEW_CHARS]) for cid, agent, used, first in self._db.execute(
                "SELECT id, agent, last_used, coalesce((SELECT user FROM turns WHERE conversation_id = "
                "conversations.id ORDER BY seq LIMIT 1), '') FROM conversations WHERE last_used > ? AND last_used < ? "
                "AND substr(agent, 1, ?) = ? ORDER BY last_used DESC LIMIT ?",
                (self.clock() - self.ttl_s, math.inf if before is None else before, len(owner), owner, limit))]

        return await self._run(read)


#: Store one turn atomically. KEYS: turns list, meta hash, recent zset. ARGV: turn JSON, max turns, expire s,
#: now, agent, max conversations, key prefix, id, ttl s. Also forgets expired and least recently used ones.
REDIS_APPEND = """
local turn = cjson.decode(ARGV[1])
turn['index'] = redis.call('HINCRBY', KEYS[2], 'turns', 1) - 1
redis.call('RPUSH', KEYS[1], cjson.encode(turn))
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('HSET', KEYS[2], 'agent', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[8])
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', tonumber(ARGV[4]) - tonumber(ARGV[9]))
local extra = redis.call('ZCARD', KEYS[3]) - #gone - tonumber(ARGV[6])
if extra > 0 then
  for _, id in ipairs(redis.call('ZRANGE', KEYS[3], #gone, #gone + extra - 1)) do table.insert(gone, id) end
end
for _, id in ipairs(gone) do
  redis.call('DEL', ARGV[7] .. 'turns:' .. id, ARGV[7] .. 'meta:' .. id)
  redis.call('ZREM', KEYS[3], id)
end
"""
#: Read (and use) one conversation. KEYS as above. ARGV: now, ttl s, id, expire s. Returns the turns list.
REDIS_HISTORY = """
local used = redis.call('ZSCORE', KEYS[3], ARGV[3])
if not used then return {} end
if tonumber(ARGV[1]) - tonumber(used) >= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('DEL', KEYS[1], KEYS[2])
  return {}
end
redis.call('ZADD', KEYS[3], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return redis.call('LRANGE', KEYS[1], 0, -1)
"""


class RedisStore(CappedStore):
    """Conversations in Redis, for several piagent instances; each change is one Lua script, so atomic."""

    def __init__(self, config: Config, clock: Callable[[], float]):
        super().__init__(config, clock)
        self.url = config.redis_url
        self.expire_s = math.ceil(self.ttl_s) + REDIS_EXPIRE_MARGIN_S
        self._redis: Any = None

    def _keys(self, conversation_id: str) -> list[str]:
        return [f"{REDIS_PREFIX}turns:{conversation_id}", f"{REDIS_PREFIX}meta:{conversation_id}",
                f"{REDIS_PREFIX}recent"]

    async def open(self) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise StoreError(f"MEMORY_BACKEND=redis needs the redis package: {sys.executable} -m pip install "
                             f"redis") from None
        self._redis = aioredis.from_url(self.url, socket_connect_timeout=3, socket_timeout=5, decode_responses=True)
        self._append = self._redis.register_script(REDIS_APPEND)
        self._history = self._redis.register_script(REDIS_HISTORY)
        try:
            await self._redis.ping()
        except Exception as exc:  # redis raises its own ConnectionError, TimeoutError, AuthenticationError...
            await self._redis.aclose()
            raise StoreError(f"cannot reach Redis at REDIS_URL={without_credentials(self.url)} ({exc}); start it or "
                             f"fix REDIS_URL",
                             retry_may_help=True) from None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()

    async def _call(self, work: Awaitable[T]) -> T:
        import redis.exceptions

        try:
            return await work
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise MemoryUnavailable(f"Redis at {without_credentials(self.url)} is unreachable ({exc}); retry when it "
                                    f"is back",
                                    {"Retry-After": str(DEFAULT_RETRY_AFTER_S)}) from None

    async def history(self, conversation_id: str) -> list[Turn]:
        rows = await self._call(self._history(keys=self._keys(conversation_id), args=[
            self.clock(), self.ttl_s, conversation_id, self.expire_s]))
        return [_turn_from_json(row) for row in rows]

    async def append(self, conversation_id: str, agent: str, user: str, assistant: str) -> None:
        now = self.clock()
        turn = json.dumps({"user": user, "assistant": assistant, "created_at": now})
        await self._call(self._append(keys=self._keys(conversation_id), args=[
            turn, self.max_turns, self.expire_s, now, agent, self.max_conversations, REDIS_PREFIX, conversation_id,
            self.ttl_s]))

    async def get(self, conversation_id: str) -> Conversation | None:
        turns_key, meta_key, recent_key = self._keys(conversation_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zscore(recent_key, conversation_id).hget(meta_key, "agent").lrange(turns_key, 0, -1)
            used, agent, rows = await self._call(pipe.execute())
        if used is None or self.clock() - used >= self.ttl_s:
            return None
        return Conversation(conversation_id, agent or "", used, [_turn_from_json(r) for r in rows])

    async def delete(self, conversation_id: str) -> None:
        turns_key, meta_key, recent_key = self._keys(conversation_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(turns_key, meta_key).zrem(recent_key, conversation_id)
            await self._call(pipe.execute())

    async def check(self) -> None:
        await self._call(self._redis.set(f"{REDIS_PREFIX}probe", self.clock(), ex=60))

    async def count(self) -> int:
        return await self._call(self._redis.zcount(f"{REDIS_PREFIX}recent", f"({self.clock() - self.ttl_s!r}", "+inf"))

    async def recent(self, limit: int, before: float | None, owner: str = "") -> list[Listed]:
        low, high, rows = self.clock() - self.ttl_s, "+inf" if before is None else f"({before!r}", []
        for start in range(0, self.max_conversations, MAX_PAGE):  # pages, until `limit` of this owner's
            found = await self._call(self._redis.zrevrangebyscore(
                f"{REDIS_PREFIX}recent", high, f"({low!r}", start=start, num=MAX_PAGE, withscores=True))
            async with self._redis.pipeline(transaction=False) as pipe:
                for conversation_id, _ in found:
                    pipe.hget(f"{REDIS_PREFIX}meta:{conversation_id}", "agent")
                agents = await self._call(pipe.execute())
            mine = [(cid, a, used) for (cid, used), a in zip(found, agents) if (a or "").startswith(owner)]
            async with self._redis.pipeline(transaction=False) as pipe:  # the first turns of this owner's only
                for conversation_id, _, _ in mine[:limit - len(rows)]:
                    pipe.lindex(f"{REDIS_PREFIX}turns:{conversation_id}", 0)
                firsts = await self._call(pipe.execute())
            rows += [Listed(cid, a or "", used, _turn_from_json(first).user[:PREVIEW_CHARS] if first else "")
                     for (cid, a, used), first in zip(mine, firsts)]
            if len(rows) >= limit or len(found) < MAX_PAGE:
                return rows[:limit]
        return rows[:limit]


def _turn_from_json(text: str) -> Turn:
    data = json.loads(text)
    return Turn(data["user"], data["assistant"], data["created_at"], data.get("index", 0))


def owned(agent: str, owner: str | None) -> str:
    """A stored conversation's agent, owning key's id first. Example: ("general", "1a2b3c4d") -> "1a2b3c4d/general\""""
    return f"{owner}/{agent}" if owner else agent


#: MEMORY_BACKEND name -> store class, built as cls(Config, clock); MEMORY_BACKEND's choices are its keys.
MEMORY_STORES: dict[str, type] = {"memory": InProcessStore, "sqlite": SQLiteStore, "redis": RedisStore}


# ---------------------------------------------------------------------------
# Prompt: system prompt + history + new message -> upstream messages
# ---------------------------------------------------------------------------

#: A chat message in OpenAI's shape: {"role": "user" | "assistant" | "system", "content": "..."}; tool traffic
#: adds {"role": "assistant", "content": "", "tool_calls": [...]} and {"role": "tool", "tool_call_id", "content"}
#: (arguments as a JSON string). A provider that speaks another dialect converts (ollama_messages).
Message = dict[str, Any]


class Prompt(NamedTuple):
    """What an agent is asked: its system prompt, the history as messages, the new user message."""

    system: str
    history: list[Message]
    message: str
    tail: tuple[Message, ...] = ()  # the tool traffic of this reply so far
    tools: tuple[dict[str, Any], ...] = ()  # the functions the model is offered (JSON-schema specs)
    tool_choice: str | dict[str, Any] | None = None  # a client's, for OpenAI-compatible upstreams (Ollama has none)


class Sampling(NamedTuple):
    """How long and how random a reply may be (config defaults, or a client's own within bounds)."""

    max_tokens: int
    temperature: float
    # a client's own fields, in Ollama's terms ("options" and OLLAMA_PASSED_FIELDS): providers bound or translate them
    # (and /v1's response_format.json_schema as sent, "json_schema": an OpenAI upstream gets its name and strict)
    extra: Mapping[str, Any] = MappingProxyType({})


#: The fields of Sampling.extra an Ollama request takes as they are (its "options" are merged by ollama_options).
OLLAMA_PASSED_FIELDS = ("keep_alive", "format", "think")
#: Ollama options piagent sets itself (a client's only within the ceilings): their refusal is not the client's.
PIAGENT_OPTIONS = ("num_ctx", "num_predict", "temperature")
#: Ollama options an OpenAI-style request has under the same name (num_predict and temperature go by Sampling).
OPENAI_SAME_OPTIONS = ("top_p", "seed", "stop", "presence_penalty", "frequency_penalty")


def context_tokens(config: Config, asked: Any) -> int:
    """A client's num_ctx if it is a whole number from 1 to CTX_TOKENS, else CTX_TOKENS (never raised past it)."""
    fits = isinstance(asked, int) and not isinstance(asked, bool) and 0 < asked < config.ctx_tokens
    return asked if fits else config.ctx_tokens


def ollama_options(config: Config, sampling: Sampling) -> dict[str, Any]:
    """Ollama's `options`: the client's own, with the sampling's num_predict and temperature, num_ctx <= CTX_TOKENS."""
    options = dict(sampling.extra.get("options") or {})
    return {**options, "num_ctx": context_tokens(config, options.get("num_ctx")), "num_predict": sampling.max_tokens,
            "temperature": sampling.temperature}


def openai_options(extra: Mapping[str, Any]) -> dict[str, Any]:
    """A client's Ollama fields (Sampling.extra) that an OpenAI-style request can say, in its terms; not the rest."""
    options = extra.get("options") or {}
    out = {name: options[name] for name in OPENAI_SAME_OPTIONS if options.get(name) is not None}
    form = extra.get("format")
    if form == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(form, dict):
        out["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": form,
                                                                         **extra.get("json_schema", {})}}
    return out


def turns_as_messages(turns: list[Turn]) -> list[Message]:
    """Turns as messages: [Turn("hi", "yo")] -> [{"role": "user", "content": "hi"}, {"role": "assistant", ...}]"""
    return [{"role": role, "content": text} for turn in turns
            for role, text in (("user", turn.user), ("assistant", turn.assistant))]


#: ASCII characters per token, counted low so the estimate errs high (see estimate_tokens).
ASCII_CHARS_PER_TOKEN = 2.5
#: Tokens per non-ASCII character (accents, CJK, emoji), counted high: small English tokenizers split them.
TOKENS_PER_OTHER_CHAR = 2
#: Tokens a chat template adds around each message (role markers, separators), counted high.
TOKENS_PER_MESSAGE = 6


def estimate_tokens(messages: list[Message]) -> int:
    """A cheap guess of the tokens `messages` cost, erring high . Example: [{"content": "hello there"}] -> 11"""
    total = 0
    for message in messages:
        text = message.get("content") or ""
        if message.get("tool_calls"):
            text += json.dumps(message["tool_calls"])
        ascii_chars = len(text.encode("ascii", "ignore"))
        total += (math.ceil(ascii_chars / ASCII_CHARS_PER_TOKEN) + TOKENS_PER_OTHER_CHAR * (len(text) - ascii_chars)
                  + TOKENS_PER_MESSAGE)
    return total


def stable_window(turns: list[Turn], max_turns: int) -> list[Turn]:
    """Turns to send, in a window moving by blocks to keep the prefix: (max_turns=8) 2..9 -> 4..9, 5..12 -> 8..12"""
    if not turns or turns[-1].index < max_turns:
        return turns[-max_turns:]
    half = max(1, max_turns // 2)
    start = half * ((turns[-1].index - max_turns) // half + 1)
    return [t for t in turns if t.index >= start]


def fit_history(history: list[Message], fixed: list[Message], budget_tokens: int,
                reply_tokens: int = 0) -> tuple[list[Message], int]:
    """(the newest turns of `history` that fit the budget beside `fixed`, how many older turns were dropped); the
    budget is what CTX_TOKENS leaves after the `reply_tokens` kept for the reply."""
    fixed_tokens = estimate_tokens(fixed)
    if fixed_tokens > budget_tokens:
        system = estimate_tokens(fixed[:1])  # the agent's system prompt, with its tools' descriptions
        fix = ("ask for a shorter reply (the request's max_tokens or num_predict, or MAX_TOKENS)"
               if reply_tokens > fixed_tokens else
               "offer the agent fewer tools (AGENT_<NAME>_TOOLS: an MCP server's may be many and long)"
               if system > budget_tokens else "shorten the message")
        raise PromptTooLarge(f"the message needs about {fixed_tokens} tokens with the system prompt and tools (about "
                             f"{system} of them), more than the {budget_tokens} left of CTX_TOKENS after the "
                             f"{reply_tokens or 'MAX_TOKENS'} kept for the reply; {fix}, or raise CTX_TOKENS")
    kept, dropped = list(history), 0
    while kept and fixed_tokens + estimate_tokens(kept) > budget_tokens:
        # up to the next user message: a turn goes whole, tool calls and their results with it
        cut = next((i for i in range(1, len(kept)) if kept[i]["role"] == "user"), len(kept))
        kept, dropped = kept[cut:], dropped + 1
    return kept, dropped


def build_messages(prompt: Prompt) -> list[Message]:
    """Chat messages for /api/chat or /v1/chat/completions: system, history, the new message, then `tail`."""
    return [{"role": "system", "content": prompt.system}, *prompt.history, {"role": "user", "content": prompt.message},
            *prompt.tail]


def render_prompt(prompt: Prompt) -> str:
    """The text prompt of /api/generate. Example: message "hi" -> "<user>\\nhi\\n</user>\\n<assistant>\\n\""""
    history = "".join(f"<{m['role']}>\n{m['content']}\n</{m['role']}>\n" for m in prompt.history)
    return f"{history}<user>\n{prompt.message}\n</user>\n<assistant>\n"


# ---------------------------------------------------------------------------
# Providers: Ollama (NDJSON) and OpenAI-compatible servers (SSE)
# ---------------------------------------------------------------------------

#: Seconds a readiness probe or --check waits for the upstream (a healthy one answers at once).
PROBE_TIMEOUT_S = 10.0


class ToolCall(NamedTuple):
    """One function call a model asked for, in OpenAI's terms: `arguments` is JSON text (Ollama's object, dumped)."""

    id: str  # the upstream's, or made up when it gave none (Ollama before 0.12)
    name: str
    arguments: str

    def parsed_arguments(self) -> Any:
        """The arguments as JSON (raises ValueError). Not strict: a model may put a raw line break in a string."""
        return external_json(self.arguments or "{}", strict=False)

    def as_message_part(self) -> dict[str, Any]:
        """The call as an assistant message's tool_calls item (OpenAI's shape)."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def tool_call_message(text: str, calls: list[dict[str, Any]]) -> Message:
    """An assistant message asking for tool calls; its content is never null (llama.cpp's Python server refuses it)."""
    return {"role": "assistant", "content": text, "tool_calls": calls}


def new_call_id() -> str:
    """A tool call id in the shape Ollama and OpenAI use: call_ and random letters and digits."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class Usage:
    """What the upstream reported about one generation, for logs and the end of a stream."""

    model: str = ""
    done_reason: str | None = None  # "stop", "length", "tool_calls", ...
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)  # what the model asked to run, in order


class Provider(Protocol):
    """Talks to one kind of model server: a new provider is one class here plus one line in PROVIDERS."""

    name: str  # the PROVIDER value that picks it
    label: str  # how messages name the server, e.g. "Ollama"
    model_prefix: str  # an agent's model comes from <model_prefix><AGENT>, e.g. OLLAMA_MODEL_GENERAL
    warm_by_default: bool  # WARMUP's default: load each model at start-up
    base_url: str

    async def complete(self, agent: Agent, prompt: Prompt, sampling: Sampling, usage: Usage) -> str:
        """The whole reply at once; raises UpstreamFailure."""

    def stream(self, agent: Agent, prompt: Prompt, sampling: Sampling, usage: Usage) -> AsyncIterator[str]:
        """The reply as text pieces, each yielded as soon as it arrives; raises UpstreamFailure."""

    async def probe(self) -> tuple[str, set[str]]:
        """(server description, names of the models it has); raises UpstreamFailure."""

    async def warm(self, model: str) -> None:
        """Ask the server to load `model` now; raises UpstreamFailure."""

    def not_found(self, model: str) -> str:
        """What to do when the server does not know `model`."""


def has_model(model: str, available: set[str]) -> bool:
    """Whether `model` is available, no tag meaning ":latest". Example: ("llama3.2", {"llama3.2:latest"}) -> True"""
    return model in available or (":" not in model and f"{model}:latest" in available)


def missing_model(provider: Provider, model: str, available: set[str]) -> str:
    """The provider's fix for a model it lacks, and the nearest name it has (else a few it has): a near miss such as
    qwen2.5:3b for qwen2.5:3b-instruct should not send anyone to download gigabytes."""
    near = difflib.get_close_matches(model, sorted(available), n=1, cutoff=0.6)
    if near:
        return f"{provider.not_found(model)}; or did you mean {near[0]}, which it has?"
    some = sorted(available)[:5]
    return provider.not_found(model) + (f" (it has {', '.join(some)}{', ...' if len(available) > 5 else ''})"
                                        if some else "")


#: The longest line piagent reads from an upstream stream (a token's chunk is a few hundred bytes).
MAX_UPSTREAM_LINE_BYTES = 1 << 20
#: Lines piagent reads after a reply's end (the closing chunk, a trailing [DONE]), and how long it waits for them;
#: then it closes the request (the reply stands): a server's closing chunk follows its last line at once.
MAX_LINES_AFTER_END, AFTER_END_WAIT_S = 8, 1.0
#: The largest non-streamed upstream body piagent reads.
MAX_UPSTREAM_BODY_BYTES = 4 << 20
#: How much of an upstream's error reply piagent reads for its message (an error page may be huge, or endless).
MAX_UPSTREAM_ERROR_BYTES = 64 << 10
JSON_KINDS = {str: "a string", int: "a whole number", float: "a number", dict: "an object", list: "a list",
              bool: "true or false"}


def json_path(keys: tuple) -> str:
    """Where a value is in a body. Example: json_path(("messages", 0, "content")) -> "messages.0.content" """
    return ".".join(map(str, keys)) or "body"


#: What the error messages call a string that is not text.
LONE_SURROGATE = "a lone surrogate (an unpaired \\ud800-\\udfff escape)"


def is_text(value: str) -> bool:
    """False for a string holding a lone surrogate (from a \\ud800-\\udfff escape): it cannot be sent on or stored."""
    try:
        return value.isascii() or bool(value.encode())
    except UnicodeEncodeError:
        return False


def lone_surrogate(value: Any) -> str | None:
    """Where a JSON value holds a string that is not text, or None. Example: {"a": ["\\ud800"]} -> "a.0" """
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str) and not is_text(value):
            return json_path(where)
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if isinstance(key, str) and not is_text(key):
                return f"a key in {json_path(where)}"
            stack.append(((*where, key), item))
    return None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


#: The deepest nesting accepted in JSON from anywhere (a request, an upstream, an MCP server): real ones nest a few
#: levels, and a value nested near Python's limit parses but fails later, when piagent sends it on.
MAX_JSON_DEPTH = 64


def too_deep(value: Any, limit: int) -> str | None:
    """Where a JSON value nests lists and objects more than `limit` deep (its first levels), or None."""
    stack: list[tuple[tuple, Any]] = [((), value)] if isinstance(value, (dict, list)) else []
    while stack:
        where, value = stack.pop()
        for key, child in value.items() if isinstance(value, dict) else enumerate(value):
            if isinstance(child, (dict, list)):
                if len(where) + 1 >= limit:  # named by its first levels: the field that holds it
                    return json_path((*where, key)[:6]) + "..."
                stack.append(((*where, key), child))
    return None


#: What a lone surrogate looks like in JSON text: a \ud800-\udfff escape, or (in bytes) its UTF-8 form.
SURROGATE_HINT, SURROGATE_HINT_BYTES = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]"), re.compile(
    rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def external_json(raw: str | bytes, strict: bool = True) -> Any:
    """JSON from outside (an upstream, an MCP server, a model's tool arguments) as values piagent can send on and
    store; else ValueError saying why (not JSON, nested too deep, NaN or Infinity, a lone surrogate)."""
    try:
        value = json.loads(raw, strict=strict, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("nested too deep") from None
    opening = ("[", "{") if isinstance(raw, str) else (b"[", b"{")
    if raw.count(opening[0]) + raw.count(opening[1]) > MAX_JSON_DEPTH and (
            where := too_deep(value, MAX_JSON_DEPTH)) is not None:
        raise ValueError(f"{where} is nested deeper than {MAX_JSON_DEPTH} levels")
    hint = SURROGATE_HINT if isinstance(raw, str) else SURROGATE_HINT_BYTES
    if hint.search(raw) and (where := lone_surrogate(value)) is not None:
        raise ValueError(f"{where} holds {LONE_SURROGATE}, which is not text")
    return value


async def read_at_most(response: httpx.Response, limit: int) -> bytes:
    """A body's first `limit` bytes, and one more when it has more: the rest (maybe endless) is never read."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            break
    return bytes(body[:limit + 1])


def typed(value: Any, kind: type, field_name: str, label: str) -> Any:
    """`value` when it is null or of `kind` (bools are not numbers); otherwise UpstreamError naming the field."""
    if value is None or (isinstance(value, kind) and (kind is bool or not isinstance(value, bool))):
        return value
    sent = next((name for k, name in JSON_KINDS.items() if type(value) is k), type(value).__name__)
    raise UpstreamError(f"{label} sent {field_name} as {sent}, not {JSON_KINDS[kind]}; is it a compatible server "
                        f"and version?")


class NoCookies(httpx.Cookies):
    """A cookie jar that keeps nothing."""

    def extract_cookies(self, response: httpx.Response) -> None:
        pass


class CompressedReply(httpx.DecodingError):
    """A reply with a compressed body, which piagent asked not to get: it is closed unread."""


async def refuse_compressed(response: httpx.Response) -> None:
    """An httpx response hook: it runs before any of the body is read, and httpx closes a reply it refuses."""
    encoding = response.headers.get("content-encoding", "")
    if encoding.strip().lower() not in ("", "identity"):
        raise CompressedReply(f"a compressed reply (Content-Encoding: {encoding[:40]!r}), though piagent asks for none "
                              f"and does not unpack one", request=response.request)


class UpstreamClient(httpx.AsyncClient):
    """The HTTP client for every upstream (providers, MCP servers), made for the base `url` it is sent to. It asks for
    replies uncompressed and refuses any other unread (CompressedReply): httpx would unpack one with no limit, a whole
    network read at a time, and 200 KB of gzip is 200 MiB of text. It keeps no cookies: an upstream is an API, and
    httpx reads every reply's headers into its cookie jar (~16 us of each reply's time to first token on a PC) with no
    setting to stop it. Only an https:// client loads the CA certificates (22 ms a client on a PC, at every start and
    --check): an http:// one gets a TLS context that trusts nothing, so https would fail, never go unchecked."""

    def __init__(self, url: str, **options: Any):
        self.jar = NoCookies()
        if not url.startswith("https://"):
            options.setdefault("verify", ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
        super().__init__(**options, event_hooks={"response": [refuse_compressed]})
        self.headers["Accept-Encoding"] = "identity"

    cookies = property(lambda self: self.jar, lambda self, value: None)  # httpx's own jar is never set


def untrusted_certificate(server: str, exc: BaseException | None) -> str | None:
    """What to do when `server` sent a TLS certificate piagent refused, if that is what an httpx error comes from."""
    for _ in range(8):  # httpx's error, httpcore's, then ssl's
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"{server} sent a TLS certificate piagent does not trust ({exc.verify_message}); give it one from "
                    f"a CA this machine trusts, or set SSL_CERT_FILE in piagent's environment to its CA's certificate")
        exc = exc and (exc.__cause__ or exc.__context__)
    return None


class HTTPProvider:
    """What both providers share: the client, the error mapping, one loop reading a streamed reply. A subclass gives
    request (path and body), read (a streamed line's text), end (was the reply whole?), whole (a body's text)."""

    name = label = model_prefix = url_field = url_hint = ""
    warm_by_default = False
    start_hint = "start it"  # what to do when it cannot be reached
    key_hint = "check its settings"  # what to do when it refuses piagent's credentials

    def __init__(self, client: httpx.AsyncClient, config: Config):
        self.client, self.config = client, config
        self._address = getattr(config, self.url_field)  # what requests go to; base_url is what messages show
        self.base_url = without_credentials(self._address)
        self._urls: dict[str, httpx.URL] = {}

    def url(self, path: str) -> httpx.URL:
        """The configured address + path (credentials and all), parsed once: parsing a URL is a measurable part of
        every request's time to first token."""
        if path not in self._urls:
            self._urls[path] = httpx.URL(self._address + path)
        return self._urls[path]

    def headers(self) -> dict[str, str]:
        return {}

    async def complete(self, agent: Agent, prompt: Prompt, sampling: Sampling, usage: Usage) -> str:
        path, body = self.request(agent, prompt, sampling, stream=False)
        return self.whole(await self.post_json(path, body, agent.model), usage)

    async def stream(self, agent: Agent, prompt: Prompt, sampling: Sampling, usage: Usage) -> AsyncIterator[str]:
        path, body = self.request(agent, prompt, sampling, stream=True)
        reply: dict[str, Any] = {"done": False}  # what `read` keeps between lines
        async with aclosing(self.stream_lines(path, body, agent.model)) as lines:
            async for line in lines:
                if text := self.read(line, reply, usage):
                    yield text
                if reply["done"]:
                    await self._after_end(lines)
                    break
        self.end(reply, usage)

    @staticmethod
    async def _after_end(lines: AsyncIterator[bytes]) -> None:
        """Read on a little after the reply's end (its body's closing chunk), so the connection goes back to the pool.
        An upstream that goes on, or holds the connection open, is not waited for: leaving `stream` closes it."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(AFTER_END_WAIT_S):
                for _ in range(MAX_LINES_AFTER_END):
                    if await anext(lines, None) is None:
                        return

    async def raise_for_status(self, response: httpx.Response, model: str) -> None:
        """Turn an HTTP error from the upstream into the typed error a caller can act on."""
        status = response.status_code
        if response.headers.get("x-piagent"):  # a piagent (this one, or another) would ask itself: no model there
            raise UpstreamError(f"{self.url_field.upper()}={self.base_url} is a piagent, not {self.label}: set it to "
                                f"{self.label}'s own address")
        if 300 <= status < 400:  # httpx does not follow them: a POST would not survive most
            where = without_credentials(response.headers.get("location") or "no address")[:200]
            added = response.request.url.path.removeprefix(httpx.URL(self._address).path.rstrip("/"))
            base = where.split("?")[0].removesuffix(added) if added and where.split("?")[0].endswith(added) else ""
            raise UpstreamError(f"{self.label} at {self.base_url} redirects to {where} (HTTP {status}); set "
                                f"{self.url_field.upper()}={base or '<the address it should be>'}")
        if status < 400:
            return
        head = await read_at_most(response, MAX_UPSTREAM_ERROR_BYTES)
        detail = upstream_error_text(head[:MAX_UPSTREAM_ERROR_BYTES], status)
        if status == 400:  # whose field it refused, a client's or piagent's own, only the exchange knows
            tools = "does not support tools" in detail
            raise UpstreamRefused(f"{self.label}: {detail}; give this agent a model with tool calling (see the README) "
                                  f"or remove its AGENT_<NAME>_TOOLS" if tools else
                                  f"{self.label} answered HTTP {status}: {detail}", f"{self.label}: {detail}", tools)
        if status == 404 and not model:  # a probe's path (models, version): the address is wrong, not a model
            raise UpstreamError(f"{self.label} has nothing at {self.base_url}{response.request.url.path} (404): is "
                                f"{self.url_field.upper()}={self.base_url} its address{self.url_hint}?")
        if status == 404:  # the wording varies between servers and versions: never parse it
            raise ModelNotFound(self.not_found(model))
        if status in (401, 403):
            raise UpstreamAuth(f"{self.label} refused the credentials ({detail}); {self.key_hint}")
        if status in (429, 503):
            retry = response.headers.get("retry-after", "")  # passed on only as plain seconds: never odd bytes
            retry = retry if re.fullmatch(r"[0-9]{1,5}", retry) else str(DEFAULT_RETRY_AFTER_S)
            raise UpstreamBusy(f"{self.label} is busy ({detail}); retry shortly", {"Retry-After": retry})
        raise UpstreamError(f"{self.label} answered HTTP {status}: {detail}")

    def transport_error(self, exc: httpx.HTTPError, started: bool) -> UpstreamFailure:
        """The typed error for a connection that failed or went quiet."""
        url = self.base_url
        if refused := untrusted_certificate(f"{self.label} at {url}", exc):
            return UpstreamUnavailable(refused)
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return UpstreamUnavailable(f"cannot reach {self.label} at {url}; {self.start_hint}")
        if isinstance(exc, httpx.ReadTimeout):
            wait = self.config.upstream_timeout_s
            if started:
                return UpstreamError(f"{self.label} at {url} stopped sending for {wait:g} s mid-reply")
            return UpstreamTimeout(f"{self.label} at {url} sent nothing for {wait:g} s (UPSTREAM_TIMEOUT_S); "
                                   f"is the model too big for this machine?")
        if isinstance(exc, CompressedReply):
            return UpstreamError(f"{self.label} at {url} sent {exc}; is a proxy between them compressing it?")
        return UpstreamError(f"connection to {self.label} at {url} failed: {exc.__class__.__name__}")

    async def post_json(self, path: str, body: dict[str, Any], model: str) -> dict[str, Any]:
        """POST a non-streaming request and return its JSON object (at most MAX_UPSTREAM_BODY_BYTES read)."""
        data = await self._json("POST", path, model, body)
        if data.get("error"):
            raise UpstreamError(f"{self.label}: {upstream_error_text(json.dumps(data).encode(), 200)}")
        return data

    async def get_json(self, path: str) -> dict[str, Any]:
        """GET a JSON object (for probes)."""
        return await self._json("GET", path, "", None, timeout=PROBE_TIMEOUT_S)

    async def _json(self, method: str, path: str, model: str, body: dict[str, Any] | None,
                    timeout: Any = httpx.USE_CLIENT_DEFAULT) -> dict[str, Any]:
        try:
            async with self.client.stream(method, self.url(path), json=body, headers=self.headers(),
                                          timeout=timeout) as response:
                await self.raise_for_status(response, model)
                raw = await read_at_most(response, MAX_UPSTREAM_BODY_BYTES)
                if len(raw) > MAX_UPSTREAM_BODY_BYTES:
                    raise UpstreamError(f"{self.label} sent a reply larger than {MAX_UPSTREAM_BODY_BYTES >> 20} "
                                        f"MiB; piagent stopped reading")
        except httpx.HTTPError as exc:
            raise self.transport_error(exc, started=False) from None
        try:
            data = external_json(raw)
        except ValueError as exc:
            raise UpstreamError(f"{self.label} sent a reply piagent cannot use ({exc})") from None
        return typed(data, dict, "its reply", self.label) or {}

    async def stream_lines(self, path: str, body: dict[str, Any], model: str) -> AsyncIterator[bytes]:
        """POST a streaming request; yield its body's lines as bytes (split here, not by httpx: the per-token path)."""
        started, pending = False, bytearray()
        try:
            async with self.client.stream("POST", self.url(path), json=body, headers=self.headers()) as response:
                await self.raise_for_status(response, model)
                async for chunk in response.aiter_bytes():
                    started = True
                    pending += chunk
                    if b"\n" in chunk:
                        *lines, rest = pending.split(b"\n")
                        pending = bytearray(rest)
                        for line in lines:
                            yield bytes(line.removesuffix(b"\r"))
                    if len(pending) > MAX_UPSTREAM_LINE_BYTES:
                        raise UpstreamError(f"{self.label} sent a line longer than {MAX_UPSTREAM_LINE_BYTES >> 20} "
                                            f"MiB; piagent stopped reading")
                if pending:
                    yield bytes(pending)
        except httpx.HTTPError as exc:
            raise self.transport_error(exc, started) from None


class OllamaProvider(HTTPProvider):
    """Ollama's native API: /api/chat (or /api/generate), streamed as NDJSON."""

    name, label, model_prefix, url_field = "ollama", "Ollama", "OLLAMA_MODEL_", "ollama_host"
    warm_by_default = True
    start_hint = ("start it (sudo systemctl start ollama, or ollama serve), fix OLLAMA_HOST if it runs elsewhere, or "
                  "use another model server (PROVIDER)")
    key_hint = "Ollama itself needs no key: is OLLAMA_HOST really Ollama?"

    def not_found(self, model: str) -> str:
        return f"model {model!r} is not available in Ollama; run: ollama pull {model}"

    def request(self, agent: Agent, prompt: Prompt, sampling: Sampling, stream: bool) -> tuple[str, dict[str, Any]]:
        c = self.config
        body: dict[str, Any] = {"model": agent.model, "stream": stream, "options": ollama_options(c, sampling)}
        body.update((k, sampling.extra[k]) for k in OLLAMA_PASSED_FIELDS if sampling.extra.get(k) is not None)
        body |= {k: v for k, v in self.keep_alive.items() if k not in body}  # a client's own keep_alive wins
        if c.ollama_api == "generate":
            body.update(system=prompt.system, prompt=render_prompt(prompt))
            return "/api/generate", body
        body["messages"] = ollama_messages(build_messages(prompt))
        if prompt.tools:
            body["tools"] = list(prompt.tools)
        return "/api/chat", body

    async def probe(self) -> tuple[str, set[str]]:
        version = (await self.get_json("/api/version")).get("version", "?")
        models = typed((await self.get_json("/api/tags")).get("models"), list, "models", self.label) or []
        return f"Ollama {version}", {str(m.get("name", "")) for m in models if isinstance(m, dict)}

    async def warm(self, model: str) -> None:
        # no prompt: Ollama just loads the model
        await self.post_json("/api/generate", {"model": model, "stream": False, **self.keep_alive}, model)

    @property
    def keep_alive(self) -> dict[str, int | str]:
        """OLLAMA_KEEP_ALIVE as Ollama's field ({} when unset): a number is seconds, anything else a duration string."""
        ka = self.config.ollama_keep_alive
        return {} if ka is None else {"keep_alive": int(ka) if re.fullmatch(r"-?\d+", ka) else ka}

    def end(self, reply: dict[str, Any], usage: Usage) -> None:
        if not reply["done"]:
            raise UpstreamError(f"Ollama at {self.base_url} ended the reply early (no done line)")

    def read(self, line: bytes, reply: dict[str, Any], usage: Usage) -> str:
        if not line.strip():
            return ""
        try:
            chunk = external_json(line)
        except ValueError as exc:
            raise UpstreamError(f"Ollama sent a line piagent cannot use ({exc}): {line[:80]!r}") from None
        if not isinstance(chunk, dict):
            raise UpstreamError(f"Ollama sent an unexpected line: {line[:80]!r}")
        if chunk.get("error"):
            raise UpstreamError(f"Ollama: {str(chunk['error'])[:500]}")  # as an error reply's is cut
        text = self.whole(chunk, usage)
        reply["done"] = chunk.get("done") is True  # whole() refused one that is not a boolean
        return text

    def whole(self, chunk: dict[str, Any], usage: Usage) -> str:
        """The text of a chat or generate chunk, every field type-checked; tool calls and final counts go to `usage`."""
        message = typed(chunk.get("message"), dict, "message", self.label)
        if message is None:
            text = typed(chunk.get("response"), str, "response", self.label)
        else:
            text = typed(message.get("content"), str, "message.content", self.label)
            usage.tool_calls += ollama_tool_calls(typed(message.get("tool_calls"), list, "message.tool_calls",
                                                        self.label) or [])
        if typed(chunk.get("done"), bool, "done", self.label):
            usage.model = typed(chunk.get("model"), str, "model", self.label) or usage.model
            usage.done_reason = typed(chunk.get("done_reason"), str, "done_reason", self.label)
            usage.prompt_tokens = typed(chunk.get("prompt_eval_count"), int, "prompt_eval_count", self.label)
            usage.completion_tokens = typed(chunk.get("eval_count"), int, "eval_count", self.label)
        return text or ""


def upstream_error_text(body: bytes, status: int) -> str:
    """The message in an error body: Ollama's {"error": "..."} or OpenAI's {"error": {"message": ...}}."""
    with contextlib.suppress(ValueError, AttributeError):
        error = external_json(body).get("error")
        if isinstance(error, dict):
            error = error.get("message") or json.dumps(error)
        if error:
            return str(error)[:500]
    return body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"


def ollama_tool_calls(items: list[Any]) -> list[ToolCall]:
    """The tool calls in a chat chunk's message.tool_calls, whose arguments are a JSON object (OpenAI: text)."""
    calls = []
    for item in items:
        function = item.get("function") if isinstance(item, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        text = arguments if isinstance(arguments, str) else json.dumps(arguments or {}, ensure_ascii=False)
        calls.append(ToolCall(str(item.get("id") or new_call_id()), str(function.get("name") or ""), text))
    return calls


def ollama_messages(messages: list[Message]) -> list[Message]:
    """Messages in Ollama's dialect: call arguments as objects, a tool result named by its tool (Ollama ignores ids)."""
    names: dict[str, str] = {}
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function") or {}
                names[call.get("id") or ""] = function.get("name") or ""
                calls.append({"id": call.get("id"), "function": {"name": function.get("name") or "",
                                                                 "arguments": json_object(function.get("arguments"))}})
            m = {"role": "assistant", "content": m.get("content") or "", "tool_calls": calls}
        elif m["role"] == "tool":
            m = {"role": "tool", "content": m.get("content") or "", "tool_call_id": m.get("tool_call_id"),
                 "tool_name": names.get(m.get("tool_call_id") or "", "")}
        out.append(m)
    return out


def json_object(text: Any) -> dict[str, Any]:
    """`text` parsed as a JSON object; {} when it is not one (a model's broken arguments)."""
    try:
        value = external_json(text, strict=False) if isinstance(text, str) else text
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class SSEDecoder:
    """Server-sent events from lines. Example: feed("event: done"), feed("data: {}"), feed("") -> ("done", "{}")"""

    def __init__(self, limit: int) -> None:
        self.event, self.limit, self.size = "", limit, 0  # an event's data past `limit` characters: ValueError
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        """Take one line (without its line ending); return (event, data) when an event is complete."""
        if line == "":
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self.size += len(value) + 1
            if self.size > self.limit:
                raise ValueError(f"an event longer than {self.limit >> 20} MiB with no end")
            self.data.append(value)
        elif name == "event":
            self.event = value
        return None

    def flush(self) -> tuple[str, str] | None:
        """The pending event, if any (also used at end of stream, for a last event with no blank line)."""
        if not self.data:
            self.event = ""
            return None
        event = (self.event or "message", "\n".join(self.data))
        self.event, self.data, self.size = "", [], 0
        return event


def sse_event(data: Any, event: str | None = None) -> str:
    """One SSE event. Example: sse_event({"text": "hi"}, "token") -> 'event: token\\ndata: {"text":"hi"}\\n\\n'"""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    lines = "".join(f"data: {line}\n" for line in text.split("\n"))
    return (f"event: {event}\n" if event else "") + lines + "\n"


class ToolCallParts:
    """Tool calls from OpenAI's streamed fragments: a call's first fragment (by `index`) brings its id and name."""

    def __init__(self, label: str) -> None:
        self.parts: dict[int, tuple[list[str], list[str]]] = {}  # index -> ([id, name], argument pieces)
        self.label = label  # who sent them, for an error naming a field

    def feed(self, fragments: Any) -> None:
        for fragment in fragments if isinstance(fragments, list) else []:
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index")
            if not isinstance(index, int):  # some servers leave it out: a new id starts a new call
                index = len(self.parts) if fragment.get("id") or not self.parts else max(self.parts)
            (head, arguments) = self.parts.setdefault(index, (["", ""], []))
            function = typed(fragment.get("function"), dict, "tool_calls[].function", self.label) or {}
            head[0] = head[0] or str(fragment.get("id") or "")  # the first counts (llama.cpp's repeats them)
            head[1] = head[1] or str(function.get("name") or "")
            piece = function.get("arguments")
            arguments.append(piece if isinstance(piece, str) else json.dumps(piece) if piece else "")

    def calls(self) -> list[ToolCall]:
        return [ToolCall(head[0] or new_call_id(), head[1], "".join(arguments))
                for _, (head, arguments) in sorted(self.parts.items())]


class OpenAIProvider(HTTPProvider):
    """An OpenAI-style /v1/chat/completions: OpenAI, llama.cpp's server, LM Studio, vLLM, Ollama's /v1."""

    name, label, model_prefix, url_field = "openai", "the OpenAI-compatible server", "OPENAI_MODEL_", "openai_base_url"
    start_hint = "start it, check OPENAI_BASE_URL, or use another model server (PROVIDER)"
    url_hint = " (it usually ends in /v1)"
    key_hint = "check OPENAI_API_KEY"

    def headers(self) -> dict[str, str]:
        key = self.config.openai_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def not_found(self, model: str) -> str:
        return (f"model {model!r} was not found at {self.base_url} (or OPENAI_BASE_URL is wrong: it usually ends "
                f"in /v1); set OPENAI_MODEL_<AGENT> to one of {self.base_url}/models")

    async def probe(self) -> tuple[str, set[str]]:
        listed = typed((await self.get_json("/models")).get("data"), list, "data", self.label) or []
        return "an OpenAI-compatible server", {str(m.get("id", "")) for m in listed if isinstance(m, dict)}

    async def warm(self, model: str) -> None:
        """OpenAI-style servers have no load call; their models load as they see fit."""

    def request(self, agent: Agent, prompt: Prompt, sampling: Sampling, stream: bool) -> tuple[str, dict[str, Any]]:
        body = {"model": agent.model, "messages": build_messages(prompt), "stream": stream,
                "max_tokens": sampling.max_tokens, "temperature": sampling.temperature}
        body.update(openai_options(sampling.extra))
        if prompt.tools:
            body["tools"] = list(prompt.tools)
            if prompt.tool_choice is not None:
                body["tool_choice"] = prompt.tool_choice
        if stream:
            body["stream_options"] = {"include_usage": True}  # servers that do not know it ignore it
        return "/chat/completions", body

    def whole(self, data: dict[str, Any], usage: Usage) -> str:
        message = typed(self._choice(data, usage).get("message"), dict, "choices[0].message", self.label) or {}
        parts = ToolCallParts(self.label)
        parts.feed(typed(message.get("tool_calls"), list, "choices[0].message.tool_calls", self.label))
        usage.tool_calls += parts.calls()
        return typed(message.get("content"), str, "choices[0].message.content", self.label) or ""

    def read(self, line: bytes, reply: dict[str, Any], usage: Usage) -> str:
        try:
            event = reply.setdefault("sse", SSEDecoder(MAX_UPSTREAM_LINE_BYTES)).feed(line.decode("utf-8", "replace"))
        except ValueError as exc:
            raise UpstreamError(f"{self.label} sent {exc}; piagent stopped reading") from None
        if event is None:
            return ""
        if event[1].strip() == "[DONE]":
            reply["done"] = True
            return ""
        try:
            chunk = external_json(event[1])
        except ValueError as exc:
            raise UpstreamError(f"{self.label} sent an event piagent cannot use ({exc}): {event[1][:80]!r}") from None
        if not isinstance(chunk, dict) or chunk.get("error"):
            raise UpstreamError(f"{self.label}: {upstream_error_text(event[1].encode(), 200)}")
        delta = typed(self._choice(chunk, usage).get("delta"), dict, "choices[0].delta", self.label) or {}
        calls = typed(delta.get("tool_calls"), list, "choices[0].delta.tool_calls", self.label)
        reply.setdefault("parts", ToolCallParts(self.label)).feed(calls)
        return typed(delta.get("content"), str, "choices[0].delta.content", self.label) or ""

    def end(self, reply: dict[str, Any], usage: Usage) -> None:
        usage.tool_calls += reply["parts"].calls() if "parts" in reply else []
        last = reply["sse"].flush() if "sse" in reply else None
        done = reply["done"] or (last is not None and last[1].strip() == "[DONE]")
        if not done and usage.done_reason is None:  # some servers end with no [DONE] after the finish_reason
            raise UpstreamError(f"{self.label} at {self.base_url} ended the reply early (no [DONE])")

    def _choice(self, data: dict[str, Any], usage: Usage) -> dict[str, Any]:
        """The first choice (an empty one for a usage-only chunk), with the reason and counts noted in `usage`."""
        choices = typed(data.get("choices"), list, "choices", self.label) or [{}]
        choice = typed(choices[0], dict, "choices[0]", self.label) or {}
        usage.done_reason = typed(choice.get("finish_reason"), str, "finish_reason", self.label) or usage.done_reason
        counts = typed(data.get("usage"), dict, "usage", self.label) or {}
        for name in ("prompt_tokens", "completion_tokens"):
            if counts.get(name) is not None:
                setattr(usage, name, typed(counts[name], int, f"usage.{name}", self.label))
        return choice


#: PROVIDER name -> class, built as cls(httpx.AsyncClient, Config); PROVIDER's choices are its keys.
PROVIDERS: dict[str, type[HTTPProvider]] = {"ollama": OllamaProvider, "openai": OpenAIProvider}


def upstream_url(config: Config) -> str:
    """The configured provider's base URL, e.g. OLLAMA_HOST's value."""
    return getattr(config, PROVIDERS[config.provider].url_field)


# ---------------------------------------------------------------------------
# Tools: what an agent may run (calc, now, MCP servers' tools), and the loop that runs a model's tool calls
# ---------------------------------------------------------------------------
# A tool is one function taking its parsed arguments and returning text for the model, plus its entry in TOOLS
# with a JSON-schema description of those arguments. It may raise ToolError to refuse; nothing else escapes.


#: Longest expression calc reads, in characters; longer ones are refused before parsing.
CALC_MAX_CHARS = 200
#: Largest whole number calc computes or returns, in bits (about 308 digits, the size of a float's range).
CALC_MAX_INT_BITS = 1024
#: Deepest nesting of operations calc follows.
CALC_MAX_DEPTH = 40
#: Digits round() may be asked for, either way.
CALC_MAX_ROUND_DIGITS = 100
CALC_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
CALC_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
#: name -> (function, fewest arguments, most arguments)
CALC_FUNCTIONS: dict[str, tuple[Callable[..., Any], int, int]] = {
    "sqrt": (math.sqrt, 1, 1), "abs": (abs, 1, 1), "round": (round, 1, 2), "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1), "min": (min, 2, 20), "max": (max, 2, 20)}
CALC_CONSTANTS = {"pi": math.pi, "e": math.e}
CALC_HELP = "numbers, + - * / // % ** and parentheses, pi, e, " + ", ".join(f"{f}()" for f in CALC_FUNCTIONS)
#: What makes Python's parser print a SyntaxWarning (a string's escape, a keyword glued to a number as in "1if");
#: refused before parsing, so nothing reaches the log (silencing warnings instead is not thread-safe).
CALC_WARNS = re.compile(r"['\"\\]|[0-9a-fA-F_.jJ](?:and|else|for|if|in|is|not|or)")


def calc(arguments: dict[str, Any]) -> str:
    """Exact arithmetic on an allowlist of syntax, never eval. Example: {"expression": "2 ** 10 / 4"} -> "256.0\""""
    expression = str(arguments["expression"]).strip()
    if len(expression) > CALC_MAX_CHARS:
        raise ToolError(f"the expression is longer than {CALC_MAX_CHARS} characters; split the calculation")
    if CALC_WARNS.search(expression):
        raise ToolError(f"calc understands only {CALC_HELP}")
    try:
        value = _calc_node(ast.parse(expression, mode="eval").body, 0)
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression; calc understands {CALC_HELP}") from None
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large") from None
    except (ArithmeticError, ValueError, TypeError) as exc:  # sqrt(-1), floor of a float too big, ...
        raise ToolError(f"cannot compute that: {exc}") from None
    except (RecursionError, MemoryError):
        raise ToolError("the expression is too complex") from None
    return str(value)


def _calc_node(node: ast.AST, depth: int) -> int | float:
    """The value of one allowed node; any other node is refused, naming what calc understands."""
    if depth > CALC_MAX_DEPTH:
        raise ToolError(f"the expression nests deeper than {CALC_MAX_DEPTH} levels")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _calc_checked(node.value)
    if isinstance(node, ast.Name) and node.id in CALC_CONSTANTS:
        return CALC_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in CALC_UNARY:
        return _calc_checked(CALC_UNARY[type(node.op)](_calc_node(node.operand, depth + 1)))
    if isinstance(node, ast.BinOp) and type(node.op) in CALC_BINARY:
        left, right = _calc_node(node.left, depth + 1), _calc_node(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            _calc_check_power(left, right)
        return _calc_checked(CALC_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in CALC_FUNCTIONS:
        function, low, high = CALC_FUNCTIONS[node.func.id]
        if node.keywords or not low <= len(node.args) <= high:
            raise ToolError(f"{node.func.id}() takes {low}" + (f" to {high}" if high > low else "") + " numbers")
        args = [_calc_node(a, depth + 1) for a in node.args]
        if function is round and len(args) == 2 and (type(args[1]) is not int or abs(args[1]) > CALC_MAX_ROUND_DIGITS):
            raise ToolError(f"round()'s second number must be a whole number from -{CALC_MAX_ROUND_DIGITS} to "
                            f"{CALC_MAX_ROUND_DIGITS}")
        return _calc_checked(function(*args))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("^ is not a power here; write 2 ** 10")
    raise ToolError(f"calc understands only {CALC_HELP}")


def _calc_check_power(base: int | float, exponent: int | float) -> None:
    """Refuse a whole-number power whose result would have more than CALC_MAX_INT_BITS bits, before computing it."""
    if type(base) is int and type(exponent) is int and exponent > 0 and abs(base) > 1:
        if (abs(base).bit_length() - 1) * exponent >= CALC_MAX_INT_BITS:
            raise ToolError(f"the result would be larger than 2**{CALC_MAX_INT_BITS}")


def _calc_checked(value: Any) -> int | float:
    """`value` if it is a finite real number of bounded size; ToolError otherwise."""
    if type(value) not in (int, float):
        raise ToolError("the result is not a real number")  # e.g. (-8) ** (1/3) is complex
    if type(value) is int and value.bit_length() > CALC_MAX_INT_BITS:
        raise ToolError(f"the result would be larger than 2**{CALC_MAX_INT_BITS}")
    if type(value) is float and not math.isfinite(value):
        raise ToolError("the result is not a finite number")
    return value


def now(arguments: dict[str, Any]) -> str:
    """The time and weekday, in an IANA timezone or the Pi's: "2026-11-24T01:29:13+01:00 (Tuesday, Europe/Berlin)\""""
    name = arguments.get("timezone")
    if name is None:
        moment = datetime.now().astimezone()
        name = moment.tzname() or "local time"
    else:
        try:
            moment = datetime.now(zoneinfo.ZoneInfo(name))
        except (KeyError, ValueError, OSError):  # not an IANA name (ZoneInfoNotFoundError is a KeyError)
            raise ToolError(f"unknown timezone {name!r}; use an IANA name such as Europe/London, "
                            f"America/New_York or UTC") from None
    return f"{moment.isoformat(timespec='seconds')} ({moment.strftime('%A')}, {name})"


class Tool(NamedTuple):
    """A tool's function, the description the model reads, and its arguments' JSON schema."""

    run: Callable[[dict[str, Any]], str | Awaitable[str]]  # a plain function runs in a thread, a coroutine on the loop
    description: str
    parameters: dict[str, Any]
    timeout_s: float = 2.0  # the call is answered with an error after this long
    max_result_chars: int | None = None  # the result is cut to this; None: MAX_TOOL_RESULT_CHARS


#: The built-in tools, by name (read-only: an app's own set is create_app's `tools`).
TOOLS: Mapping[str, Tool] = MappingProxyType({
    "calc": Tool(calc, "Compute an arithmetic expression exactly. Use it for any calculation.", {
        "type": "object", "additionalProperties": False, "required": ["expression"],
        "properties": {"expression": {"type": "string", "maxLength": CALC_MAX_CHARS,
                                      "description": f"e.g. (17.5 * 3) / 2 or sqrt(2); allowed: {CALC_HELP}"}}}),
    "now": Tool(now, "Get the current date, time and weekday.", {
        "type": "object", "additionalProperties": False, "properties": {"timezone": {
            "type": "string", "maxLength": 64,
            "description": "IANA timezone such as Europe/London; leave out for the local time"}}}),
})
#: Calls run per model reply; more in one reply are answered with an error.
MAX_TOOL_CALLS_PER_ROUND = 8
#: A tool's result is cut to this many characters before the model reads it.
MAX_TOOL_RESULT_CHARS = 2000
JSON_TYPES: dict[str, type | tuple[type, ...]] = {"string": str, "number": (int, float), "integer": int,
                                                   "boolean": bool, "object": dict, "array": list}


def argument_problem(schema: dict[str, Any], arguments: Any) -> str | None:
    """What is wrong with `arguments` for a flat object schema, or None. Example: calc, {} -> "missing 'expression'\""""
    if not isinstance(arguments, dict):
        return "arguments must be a JSON object"
    # only what is understood is checked: an MCP server's schema (anyOf, type lists, $ref) is the server's to enforce
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    for name in schema.get("required") if isinstance(schema.get("required"), list) else []:
        if name not in arguments:
            return f"missing {name!r}"
    for name, value in arguments.items():
        rule = properties.get(name)
        if not isinstance(rule, dict):
            if schema.get("additionalProperties", True) is False:
                return f"unexpected {name!r}; expected only: {', '.join(properties) or 'no arguments'}"
            continue
        kind = JSON_TYPES.get(rule["type"], object) if isinstance(rule.get("type"), str) else object
        if not isinstance(value, kind) or (kind is not object and rule["type"] != "boolean" and type(value) is bool):
            article = "an" if rule["type"][:1] in ("a", "e", "i", "o", "u") else "a"
            return f"{name!r} must be {article} {rule['type']}"
        limit = rule.get("maxLength")
        if isinstance(value, str) and isinstance(limit, int) and len(value) > limit:
            return f"{name!r} is longer than {limit} characters"
    return None


class ToolEvent(NamedTuple):
    """One call that was run (or refused): what the model asked, and the result or the error it is told."""

    call: ToolCall
    result: str | None
    error: str | None
    timed_out: bool = False  # then the same reply calls neither this tool nor its MCP server's others again

    def as_message(self) -> Message:
        """The result as the `tool` message the model reads next."""
        return {"role": "tool", "tool_call_id": self.call.id,
                "content": self.result if self.error is None else f"error: {self.error}"}

    def arguments(self) -> Any:
        """The arguments as JSON (or the text the model sent, when it is not JSON), for clients and logs."""
        try:
            return self.call.parsed_arguments()
        except ValueError:
            return self.call.arguments


class ToolSource(Protocol):
    """Tools that come and go while piagent runs (an MCP server): `name` prefixes them in AGENT_<NAME>_TOOLS."""

    name: str
    calls: int  # tool calls made, and of those failed (for /metrics)
    failures: int

    def tools(self) -> Mapping[str, Tool]:
        """Its tools now, by their own names."""

    async def settled(self) -> None:
        """Return once it is not starting: up, or failed (bounded by its own time-out)."""

    def status(self) -> tuple[bool, str]:
        """(usable, "3 tools" or why not), for /ready."""


class Toolbox:
    """The tools of one app: the built-ins (or a test's own set) by name, and sources by name (MCP servers)."""

    def __init__(self, tools: Mapping[str, Tool], sources: tuple[ToolSource, ...] = ()):
        self.tools = dict(tools)
        self.sources = {source.name: source for source in sources}

    def allowed(self, patterns: tuple[str, ...]) -> dict[str, Tool]:
        """The tools AGENT_<NAME>_TOOLS allows now, by the model's names. Example: ("time.*",) -> {"time__...": ...}"""
        found: dict[str, Tool] = {}
        for pattern in patterns:
            source, dot, wanted = pattern.partition(".")
            if not dot:
                found.update({pattern: self.tools[pattern]} if pattern in self.tools else {})
            elif source in self.sources:
                found.update({model_tool_name(source, name): tool for name, tool in self.sources[source].tools().items()
                              if wanted in ("*", name)})
        return found

    async def settle(self, patterns: tuple[str, ...]) -> None:
        """Wait for the sources these patterns name to finish starting: a chat just after start-up is offered their
        tools, not only the built-ins (the model would call a tool that is not there)."""
        names = {pattern.partition(".")[0] for pattern in patterns if "." in pattern}
        await asyncio.gather(*(self.sources[name].settled() for name in names if name in self.sources))

    def check(self, config: Config) -> None:
        """Raise ConfigError if an agent's AGENT_<NAME>_TOOLS names a built-in tool that is not here."""
        for agent in config.agents:
            unknown = [name for name in agent.tools if "." not in name and name not in self.tools]
            if unknown:
                raise ConfigError(f"AGENT_{agent.name.upper()}_TOOLS={','.join(agent.tools)!r} is not valid: no tool "
                                  f"named {unknown[0]!r}; piagent has: {', '.join(self.tools)}")

    def holder(self, name: str) -> str:
        """What a time-out of the model's tool `name` shows to be stuck: its source (an MCP server), or the tool."""
        return max((s for s in self.sources if name.startswith(f"{s}__")), key=len, default=name)

    def specs(self, patterns: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
        """The function specs the model is offered, in the shape both Ollama and OpenAI take."""
        return tuple({"type": "function", "function": {"name": name, "description": tool.description,
                                                       "parameters": tool.parameters}}
                     for name, tool in self.allowed(patterns).items())

    async def run(self, call: ToolCall, patterns: tuple[str, ...]) -> ToolEvent:
        """Run one call if allowed and its arguments fit, within its time limit; any failure is the event's error."""
        allowed = self.allowed(patterns)
        tool = allowed.get(call.name)
        if tool is None:
            return ToolEvent(call, None, f"there is no tool {call.name!r}; the tools are: {', '.join(allowed)}")
        try:
            arguments = call.parsed_arguments()
        except ValueError:
            return ToolEvent(call, None, f"the arguments for {call.name} are not valid JSON")
        problem = argument_problem(tool.parameters, arguments)
        if problem is not None:
            return ToolEvent(call, None, f"bad arguments for {call.name}: {problem}")
        try:
            async with asyncio.timeout(tool.timeout_s):
                if inspect.iscoroutinefunction(tool.run):
                    result = await tool.run(arguments)
                else:  # in a thread, so a slow tool never stalls the streams of others
                    result = await asyncio.to_thread(tool.run, arguments)
        except ToolError as exc:
            return ToolEvent(call, None, str(exc), isinstance(exc, ToolTimeout))
        except TimeoutError:
            return ToolEvent(call, None, f"{call.name} took longer than {tool.timeout_s:g} s", True)
        except Exception:  # a bug in the tool: the model hears it failed, the log has the traceback
            log.exception("tool %s failed", call.name)
            return ToolEvent(call, None, f"{call.name} failed")
        return ToolEvent(call, str(result)[:tool.max_result_chars or MAX_TOOL_RESULT_CHARS], None)


async def tool_loop(provider: Provider, toolbox: Toolbox, agent: Agent, prompt: Prompt, sampling: Sampling,
                    usage: Usage, max_rounds: int, stream: bool) -> AsyncIterator[str | ToolEvent]:
    """An agent's reply with its tools run: text pieces, a ToolEvent per call; `usage` sums the rounds' token counts."""
    specs, counts, slow = toolbox.specs(agent.tools), [0, 0, False], set()  # slow: holders (Toolbox.holder) stuck
    for round_number in range(max_rounds + 1):
        offer = specs if round_number < max_rounds else ()  # the last round has no tools: a reply ends in text
        said: list[str] = []
        usage.tool_calls = []
        ask = prompt._replace(tools=offer)
        if stream:
            async with aclosing(provider.stream(agent, ask, sampling, usage)) as pieces:
                async for piece in pieces:
                    said.append(piece)
                    yield piece
        else:
            said.append(await provider.complete(agent, ask, sampling, usage))
            if said[0]:
                yield said[0]
        if usage.prompt_tokens is not None or usage.completion_tokens is not None:
            counts = [counts[0] + (usage.prompt_tokens or 0), counts[1] + (usage.completion_tokens or 0), True]
        if not usage.tool_calls or not offer:
            break
        events = []
        # one call past the limit is answered as refused; any after it are dropped, not each made an event for the
        # client and a message in the next prompt (a broken upstream sent 5,000 in one line)
        for i, call in enumerate(usage.tool_calls[:MAX_TOOL_CALLS_PER_ROUND + 1]):
            holder = toolbox.holder(call.name)
            if i >= MAX_TOOL_CALLS_PER_ROUND:
                event = ToolEvent(call, None, f"more than {MAX_TOOL_CALLS_PER_ROUND} calls at once; this one and any "
                                              f"after it were not run")
            elif holder in slow:  # each wait holds the model's slot: one time-out a reply is enough
                event = ToolEvent(call, None, f"{call.name} timed out earlier in this reply; not run again"
                                  if holder == call.name else
                                  f"{call.name} not run: MCP server {holder} timed out earlier in this reply")
            else:
                event = await toolbox.run(call, agent.tools)
            slow.update([holder] if event.timed_out else [])
            events.append(event)
            yield event
        turn = tool_call_message("".join(said), [e.call.as_message_part() for e in events])
        prompt = prompt._replace(tail=(*prompt.tail, turn, *(e.as_message() for e in events)))
    if counts[2]:
        usage.prompt_tokens, usage.completion_tokens = counts[0], counts[1]


class Background:
    """One long-lived task beside the requests (warm-up, an MCP server's), that stop() cancels and waits for."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._task: asyncio.Task | None = None

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in its own task (the caller checked running() where one at a time matters)."""
        self._task = asyncio.get_running_loop().create_task(work, name=self.name)
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:  # a bug: said once, with its traceback
            log.error("background task %s failed", self.name, exc_info=task.exception())

    async def stop(self) -> None:
        """Cancel the task and wait until it has cleaned up; safe to call when it is not running."""
        if self.running():
            self._task.cancel()
            await asyncio.wait({self._task})  # not `await task`: a cancelled stop() must not cut the cleanup short


# MCP servers as tool sources (MCP_SERVERS; issue 16): design and protocol notes in DEVELOPING.md, "MCP".
#: Handshake-era versions piagent accepts in an initialize reply; it proposes the first (ref §1).
MCP_HANDSHAKE_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05")
#: The stateless revision: no initialize, version and capabilities in every request's params._meta (ref §10).
MCP_MODERN_VERSION = "2026-07-28"
#: Errors only a 2026-07-28 server sends (header mismatch, missing capability, unsupported version): such a
#: server is modern even though it refused us, so never fall back to initialize on them (ref §10).
MCP_MODERN_ERRORS = (-32020, -32021, -32022)
MCP_CLIENT_INFO = {"name": "piagent", "version": "1.0"}
#: Longest line read from a stdio server: a base64 image is one line (asyncio's default limit is 64 KiB).
MCP_MAX_LINE_BYTES = 32 * 2**20
#: Pages of tools/list followed; a server whose cursor never ends is cut off there.
MCP_MAX_LIST_PAGES = 50
#: After the n-th failure in a row a server is not started again for min(MAX, MIN * 2 ** (n - 1)) seconds.
MCP_RESTART_MIN_S = 1.0
MCP_RESTART_MAX_S = 300.0
#: Seconds before a dropped list-change stream (HTTP) is opened again.
MCP_LISTEN_RETRY_S = 5.0
#: After a re-listing of its tools, a server's next is this long away at least: one announcing a change after each
#: listing had piagent list it ~1,200 times a second, a core's CPU taken from the model.
MCP_RELIST_PAUSE_S = 1.0
#: Lines of a server's stderr (and of garbage on its stdout) logged per minute, and the characters kept of each.
MCP_LOG_LINES_PER_MIN = 20
MCP_LOG_LINE_CHARS = 300
#: Seconds a stdio server gets to exit at each step of stop: stdin closed, then SIGTERM, then SIGKILL (ref §3.5).
MCP_STOP_GRACE_S = 2.0
#: Seconds a stdio server's pending calls wait, once its stdout has ended or it has exited, for its last lines on
#: stderr (often why) and its exit code: a server that exits closes its pipes at once; only a child holding them, or
#: a server living on without stdout, makes piagent wait this long to fail the calls.
MCP_LAST_WORDS_S = 0.5
#: What a stdio server inherits from piagent's environment: never piagent's keys or the other servers' tokens.
#: NODE_OPTIONS: the unit's --jitless, without which node cannot run under its MemoryDenyWriteExecute.
MCP_CHILD_ENV = ("HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR",
                 "NODE_OPTIONS")


def model_tool_name(server: str, tool: str) -> str:
    """The name the model calls an MCP tool by: ^[A-Za-z0-9_-]{1,64}$, ending with the tool's own name if it can."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", tool)
    plain = f"{server}__{safe}"
    if safe == tool and 0 < len(plain) <= 64:
        return plain
    digest = hashlib.sha256(tool.encode()).hexdigest()[:6]
    return f"{server}__{digest}_{safe[-(64 - len(server) - 9):]}"[:64]


def result_text(result: Mapping[str, Any], max_chars: int) -> str:
    """What the model reads of a tools/call result: text blocks joined, other blocks named, cut to max_chars."""
    blocks = result.get("content")
    parts = [_block_text(block) for block in blocks if isinstance(block, dict)] if isinstance(blocks, list) else []
    if not parts and result.get("structuredContent") is not None:
        parts = [json.dumps(result["structuredContent"], ensure_ascii=False)]
    text = "\n".join(parts)
    if len(text) > max_chars:
        note = f"\n[cut: the result has {len(text)} characters; only the first {max_chars} are shown]"
        text = text[:max(0, max_chars - len(note))] + note
    return text


def _block_text(block: Mapping[str, Any]) -> str:
    """One content block as text; images, audio and resources are named, never inlined (ref §6)."""
    kind = str(block.get("type"))[:40]
    if kind == "text":
        return str(block.get("text", ""))
    if kind in ("image", "audio"):
        size = len(str(block.get("data", "")).rstrip("=")) * 3 // 4  # base64: 4 characters per 3 bytes
        shown = f"{size} bytes" if size < 1024 else f"{size // 1024} KB"
        return f"[{str(block.get('mimeType', kind))[:80]}, {shown}, not shown]"
    if kind in ("resource", "resource_link"):
        resource = block.get("resource") if isinstance(block.get("resource"), dict) else block
        uri, kind = str(resource.get("uri", "?"))[:200], str(resource.get("mimeType", "unknown type"))[:80]
        return f"[resource {uri}, {kind}, not shown]"
    return f"[{kind} content, not shown]"


def mcp_answer(request: Mapping[str, Any]) -> dict[str, Any]:
    """Our answer to a request from a server: `ping` gets {}; anything else (sampling, roots, ...) is refused."""
    if request.get("method") == "ping":
        return {"jsonrpc": "2.0", "id": request["id"], "result": {}}
    return {"jsonrpc": "2.0", "id": request["id"], "error": {"code": -32601, "message": "piagent only calls tools"}}


def mcp_message(raw: str | bytes) -> dict[str, Any] | None:
    """A JSON-RPC message from a server, or None if the text is none. An answer piagent cannot pass on (a lone
    surrogate, NaN, deep nesting) becomes an error answer to its call: the call fails now, not at its time-out; a
    request with such params is still answered (by its method alone). (One nested past Python's reader cannot be read
    even for its id: it is skipped, and its call times out.)"""
    try:
        message = external_json(raw)
    except ValueError as exc:
        with contextlib.suppress(ValueError, RecursionError):
            loose = json.loads(raw)
            ident = loose.get("id") if isinstance(loose, dict) else None
            if type(ident) is int or (type(ident) is str and is_text(ident)):
                if "method" in loose:  # a request to us: mcp_answer reads only its method
                    return {"jsonrpc": "2.0", "id": ident, "method": str(loose["method"])}
                return {"jsonrpc": "2.0", "id": ident, "error": {"code": -32603, "message": f"its answer is "
                                                                 f"unusable: {exc}"}}
        return None
    # JSON-RPC ids are strings or numbers: one that is a list or object is not a message piagent could answer or match
    return message if isinstance(message, dict) and not isinstance(message.get("id"), (list, dict)) else None


class McpError(Exception):
    """A server answered a request with a JSON-RPC error (or an HTTP error standing for one)."""

    def __init__(self, method: str, error: Any):
        error = error if isinstance(error, dict) else {"message": str(error)}
        self.code, self.data = error.get("code"), error.get("data")
        self.message = str(error.get("message", "no message"))[:500]
        super().__init__(f"the server answered {method} with an error: {self.message}")


class McpSessionLost(ConnectionError):
    """An HTTP server answered 404 to our session id: it forgot the session, so we must start over (ref §5)."""


class LogBudget:
    """At most MCP_LOG_LINES_PER_MIN lines a minute from one server reach the log; the rest are only counted."""

    def __init__(self, name: str) -> None:
        self.name, self.start, self.used, self.dropped = name, time.monotonic(), 0, 0

    def line(self, text: str) -> None:
        """Log one line of the server's if this minute's budget allows."""
        if time.monotonic() - self.start >= 60:
            if self.dropped:
                log.warning("MCP server %s: %d more lines not logged", self.name, self.dropped)
            self.start, self.used, self.dropped = time.monotonic(), 0, 0
        self.used += 1
        if self.used > MCP_LOG_LINES_PER_MIN:
            self.dropped += 1
        else:
            log.info("MCP server %s: %s", self.name, text[:MCP_LOG_LINE_CHARS])


async def _drain(pipe: asyncio.StreamReader) -> None:
    """Read a pipe to its end, keeping nothing."""
    while await pipe.read(1 << 16):
        pass


def pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when process `pid` exits (Linux 5.3+); None where there is none. One that
    has already gone gets a descriptor readable at once."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        read, write = os.pipe()  # gone already: an end that reads as closed
        os.close(write)
        return read
    except OSError:  # a kernel without it
        return None


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A pipe's lines until it closes; a line over MCP_MAX_LINE_BYTES comes out as a marker (asyncio drops it)."""
    while True:
        try:
            line = await stream.readline()
        except ValueError:
            line = b"<a line longer than MCP_MAX_LINE_BYTES>\n"
        if not line:
            return
        yield line


class StdioTransport:
    """A server run as a child in its own process group, with newline-delimited JSON-RPC on stdin/stdout (ref §4)."""

    version: str | None = None  # the negotiated handshake version (only HTTP sends it)

    def __init__(self, name: str, argv: tuple[str, ...], deliver: Callable[[dict[str, Any]], None]):
        self.name, self.argv, self.deliver = name, argv, deliver
        self.stderr_log, self.garbage_log = LogBudget(name), LogBudget(name)  # one flood must not hide the other
        self.process: asyncio.subprocess.Process | None = None
        self.pending: dict[Any, asyncio.Future] = {}
        self.closed: str | None = None  # why the server can no longer answer, once it cannot
        self.last_words = ""  # its last line on stderr: often why it stopped (for the operator: --check, the log)

    async def open(self) -> None:
        """Start the server; never through a shell, with a trimmed environment, in a new process group."""
        env = {key: os.environ[key] for key in MCP_CHILD_ENV if key in os.environ}
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, limit=MCP_MAX_LINE_BYTES, start_new_session=True)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request and wait for the answer with its id (the pump hands it over)."""
        if self.closed:
            raise ConnectionError(self.closed)
        future = asyncio.get_running_loop().create_future()
        self.pending[message["id"]] = future
        try:
            await self.notify(message)
            return await future
        finally:
            self.pending.pop(message["id"], None)

    async def notify(self, message: dict[str, Any]) -> None:
        """Write one message as one line (json.dumps escapes newlines inside strings)."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(json.dumps(message).encode() + b"\n")
        await self.process.stdin.drain()

    def listen(self, message: dict[str, Any] | None) -> None:
        """Ask for list changes (2026-07-28; before, they come unasked); its answer only comes when it ends."""
        if message is not None and self.process is not None and self.process.stdin is not None:
            self._send_now(message)

    def _send_now(self, message: dict[str, Any]) -> None:
        """Write without waiting (from the reader, which must not block); a server that reads nothing while its
        unread input passes MCP_MAX_LINE_BYTES is cut off, rather than piagent's memory growing for it."""
        stdin = self.process.stdin
        if stdin.transport.get_write_buffer_size() > MCP_MAX_LINE_BYTES:
            self.closed = "the server reads nothing of what piagent sends"
            self._signal_group(signal.SIGKILL)
            return
        stdin.write(json.dumps(message).encode() + b"\n")

    async def pump(self, changed: asyncio.Event) -> None:
        """Read stdout and stderr until stdout ends or the server exits (a child of its own may hold the pipes open
        for ever), then fail whatever still waits for an answer."""
        process, loop = self.process, asyncio.get_running_loop()
        assert process is not None and process.stdout is not None and process.stderr is not None
        # its exit, whoever holds its pipes: asyncio's process.wait() waits for them too (Linux's pidfd; elsewhere
        # that wait it is); and both pipes at once: a child blocked on a full stderr pipe would never answer
        exited, watch = loop.create_future(), pidfd(process.pid)
        if watch is not None:
            loop.add_reader(watch, lambda: exited.done() or exited.set_result(None))
        tasks = [loop.create_task(work) for work in (self._read_stdout(process.stdout), self._read_stderr(
            process.stderr), *(() if watch is not None else (process.wait(),)))]
        try:
            await asyncio.wait({tasks[0], exited if watch is not None else tasks[2]},
                               return_when=asyncio.FIRST_COMPLETED)
            with contextlib.suppress(TimeoutError):  # its last words on stderr (often why), and its exit code
                await asyncio.wait_for(asyncio.gather(tasks[1], process.wait()), MCP_LAST_WORDS_S)
        finally:
            if watch is not None:
                loop.remove_reader(watch)
                os.close(watch)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # no reader left behind: close() drains the pipes
            code = process.returncode
            self.closed = self.closed or (
                f"the server exited with code {code}" if code is not None and code >= 0 else
                f"the server was killed by signal {-code}" if code is not None else "the server closed stdout")
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(self.closed))
            changed.set()  # wakes the runner, which sees the pump has ended

    async def _read_stdout(self, stdout: asyncio.StreamReader) -> None:
        """Hand answers to their waiters, requests to mcp_answer, notifications to `deliver`; skip non-JSON-RPC."""
        async for line in _lines(stdout):
            message = mcp_message(line)
            if message is None:
                self.garbage_log.line(f"not JSON-RPC on stdout, skipped: {line[:100]!r}")
            elif "method" not in message:  # an answer; a late one (cancelled, timed out) finds no waiter
                future = self.pending.get(message.get("id"))
                if future is not None and not future.done():
                    future.set_result(message)
            elif "id" in message:
                self._send_now(mcp_answer(message))
            else:
                self.deliver(message)

    async def _read_stderr(self, stderr: asyncio.StreamReader) -> None:
        """Forward the server's stderr to piagent's log, within the log budget."""
        async for line in _lines(stderr):
            text = line.decode("utf-8", "replace").strip()
            self.stderr_log.line(text)
            if text and not re.match(r"at |Node\.js v\d|\^+$", text):  # node ends with its stack and version
                self.last_words = text[:MCP_LOG_LINE_CHARS]

    async def close(self) -> None:
        """Close stdin and wait; then SIGTERM the process group and wait; then SIGKILL it (ref §3.5)."""
        process = self.process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                self._signal_group(sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), MCP_STOP_GRACE_S)
                break
        self._signal_group(signal.SIGKILL)  # whatever the server left in its group (npx's node) goes with it
        with contextlib.suppress(TimeoutError):  # its pipes end with the last of that group: asyncio then lets it go
            await asyncio.wait_for(asyncio.gather(*(_drain(pipe) for pipe in (process.stdout, process.stderr)
                                                    if pipe is not None)), MCP_STOP_GRACE_S)

    def _signal_group(self, sig: int) -> None:
        """Signal the server's process group, if any of it is left."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


def http_failure(url: str, exc: httpx.HTTPError) -> ConnectionError:
    """Why a request to an MCP server failed: it could not be reached, or its reply was refused unread."""
    return ConnectionError(f"{url} sent {exc}" if isinstance(exc, CompressedReply) else
                           untrusted_certificate(url, exc) or f"cannot reach {url}: {exc or type(exc).__name__}")


class HttpTransport:
    """A Streamable HTTP server: one POST per message, answered with JSON or an SSE stream (ref §5, §10)."""

    def __init__(self, config: McpServerConfig, deliver: Callable[[dict[str, Any]], None],
                 transport: httpx.AsyncBaseTransport | None = None):
        self.config, self.deliver = config, deliver
        self.shown = without_credentials(config.url)  # the URL in messages: they reach the model and the client
        # no read timeout: the list-change stream is quiet for hours; each request has the session's own timeout
        self.client = UpstreamClient(config.url, transport=transport,
                                     timeout=httpx.Timeout(config.timeout_s, read=None))
        self.session_id: str | None = None
        self.version: str | None = None
        self.listen_message: dict[str, Any] | None = None
        self.listening = asyncio.Event()

    async def open(self) -> None:
        """Nothing to start: the server runs on its own."""

    def _headers(self, message: Mapping[str, Any], accept: str = "application/json, text/event-stream") -> dict:
        """Headers for one message: 2026-07-28 mirrors its _meta into headers; before, the session and version."""
        headers = {"Accept": accept, "Content-Type": "application/json"}
        if self.config.token:
            headers["Authorization"] = f"Bearer {self.config.token}"
        meta = (message.get("params") or {}).get("_meta") or {}
        if "io.modelcontextprotocol/protocolVersion" in meta:
            headers["MCP-Protocol-Version"] = meta["io.modelcontextprotocol/protocolVersion"]
            headers["Mcp-Method"] = message["method"]
            if message["method"] == "tools/call":
                headers["Mcp-Name"] = _header_value(message["params"]["name"])
            return headers
        if self.session_id:
            headers["Mcp-Session-Id"] = self.session_id
        if self.version and message.get("method") != "initialize":
            headers["MCP-Protocol-Version"] = self.version
        return headers

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """POST a request; its answer is the JSON body or the first answer on the SSE stream, tied to this POST."""
        sent_session = self.session_id
        try:
            request = self.client.stream("POST", self.config.url, json=message, headers=self._headers(message))
            async with request as reply:
                if reply.status_code == 404 and sent_session:
                    self.session_id = self.version = None
                    raise McpSessionLost(f"{self.shown} forgot the session")
                if message["method"] == "initialize":
                    self.session_id = reply.headers.get("mcp-session-id")
                if reply.is_success and reply.headers.get("content-type", "").startswith("text/event-stream"):
                    async for incoming in self._stream(reply):
                        if "method" not in incoming:
                            return incoming
                    raise ConnectionError(f"{self.shown} ended the stream without an answer")
                body = await read_at_most(reply, MCP_MAX_LINE_BYTES)  # a body that never ends must not fill memory
                if len(body) > MCP_MAX_LINE_BYTES:
                    raise ConnectionError(f"{self.shown} sent an answer over {MCP_MAX_LINE_BYTES >> 20} MiB")
                where = reply.headers.get("location") if reply.is_redirect else None  # not followed: see below
                return _http_answer(reply.status_code, body, self.config.name,
                                    where and without_credentials(str(reply.url.join(where)))[:200])
        except httpx.HTTPError as exc:
            raise http_failure(self.shown, exc) from None

    async def notify(self, message: dict[str, Any]) -> None:
        """POST a notification (or an answer to a server's request) within timeout_s; the server owes only 202, and
        what else it sends is not read."""
        try:
            async with self.client.stream("POST", self.config.url, json=message, headers=self._headers(message),
                                          timeout=self.config.timeout_s):
                pass
        except httpx.HTTPError as exc:
            raise http_failure(self.shown, exc) from None

    async def _lines(self, reply: httpx.Response) -> AsyncIterator[str]:
        """An SSE body's lines (\n or \r\n); one that never ends past MCP_MAX_LINE_BYTES ends the stream."""
        pending = bytearray()
        async for chunk in reply.aiter_bytes():
            pending += chunk
            if b"\n" in chunk:
                *lines, rest = pending.split(b"\n")
                pending = bytearray(rest)
                for line in lines:
                    yield line.removesuffix(b"\r").decode("utf-8", "replace")
            if len(pending) > MCP_MAX_LINE_BYTES:
                raise ConnectionError(f"{self.shown} sent a line over {MCP_MAX_LINE_BYTES >> 20} MiB")
        if pending:
            yield bytes(pending).removesuffix(b"\r").decode("utf-8", "replace")

    async def _stream(self, reply: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        """The JSON-RPC messages of an SSE reply; notifications are delivered, server requests answered, on the way."""
        decoder = SSEDecoder(MCP_MAX_LINE_BYTES)
        async for line in self._lines(reply):
            try:
                event = decoder.feed(line)
            except ValueError as exc:
                raise ConnectionError(f"{self.shown} sent {exc}") from None
            incoming = mcp_message(event[1]) if event is not None and event[0] == "message" else None
            if incoming is None:
                continue
            if "method" in incoming and "id" in incoming:
                await self.notify(mcp_answer(incoming))
            elif "method" in incoming:
                self.deliver(incoming)
            yield incoming

    def listen(self, message: dict[str, Any] | None) -> None:
        """Open the list-change stream from now on: subscriptions/listen (2026-07-28), or GET (a session's)."""
        self.listen_message = message
        self.listening.set()

    async def pump(self, changed: asyncio.Event) -> None:
        """Hold the list-change stream open, reopening it after a drop; never ends by itself (stop cancels it)."""
        await self.listening.wait()
        while True:
            try:
                if not await self._listen_once():
                    await asyncio.Event().wait()  # the server has no such stream: changes come only with answers
            except (httpx.HTTPError, ConnectionError) as exc:
                log.debug("MCP server %s: list-change stream: %s", self.config.name, exc)
            changed.set()  # changes may have been missed while the stream was down: list again
            await asyncio.sleep(MCP_LISTEN_RETRY_S)

    async def _listen_once(self) -> bool:
        """Read the list-change stream until it ends; False if the server offers none."""
        message = self.listen_message
        if message is None and not self.session_id:
            return False
        request = (self.client.stream("POST", self.config.url, json=message, headers=self._headers(message)) if message
                   else self.client.stream("GET", self.config.url, headers=self._headers({}, "text/event-stream")))
        async with request as reply:
            if not reply.is_success:
                return reply.status_code not in (400, 405)
            async for _ in self._stream(reply):
                pass
        return True

    async def close(self) -> None:
        """End our session (DELETE, if we have one) and close the connections."""
        if self.session_id:
            with contextlib.suppress(httpx.HTTPError):
                await self.client.delete(self.config.url, headers=self._headers({}), timeout=MCP_STOP_GRACE_S)
        await self.client.aclose()


def _header_value(text: str) -> str:
    """A value fit for an Mcp-Name header: as is if plain ASCII, else =?base64?...?= (2026-07-28)."""
    if text.isascii() and text.isprintable() and text == text.strip() and not text.startswith("=?base64?"):
        return text
    return f"=?base64?{base64.b64encode(text.encode()).decode()}?="


def _http_answer(status: int, body: bytes, name: str, redirect: str | None = None) -> dict[str, Any]:
    """The JSON-RPC answer in an HTTP reply; if there is none, an error naming the HTTP status (and, for a redirect,
    the URL to set: the SDK's servers send /mcp/ to /mcp; following would send the token wherever it points)."""
    answer = mcp_message(body) or {}
    if status < 300 and ("result" in answer or "error" in answer):
        return answer
    error = answer["error"] if "error" in answer else {"message": body[:200].decode("utf-8", "replace") or "no body"}
    error = error if isinstance(error, dict) else {"message": str(error)}
    hint = f"; check MCP_{name.upper()}_TOKEN" if status in (401, 403) else ""
    hint = f"; it redirects to {redirect}: set MCP_{name.upper()}_URL={redirect}" if redirect else hint
    return {"error": {**error, "message": f"HTTP {status}: {error.get('message')}{hint}"}}


class McpServer:
    """One MCP server as a tool source: connects in the background, lists its tools, calls them, restarts it."""

    def __init__(self, config: McpServerConfig, *, max_result_chars: int = Config.mcp_max_result_chars,
                 transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.monotonic):
        self.config, self.name, self.max_result_chars = config, config.name, max_result_chars
        self._http, self._clock = transport, clock  # collaborators for tests: an httpx transport, a clock
        self.calls = self.failures = 0
        self._tools: dict[str, Tool] = {}
        self._ids = itertools.count(1)
        self._transport: StdioTransport | HttpTransport | None = None
        self._runner = Background(f"mcp-{config.name}")
        self._era: str | None = None         # MCP_MODERN_VERSION, or the negotiated handshake version
        self._up, self._why = False, "not started"
        self._stopped, self._failed_starts, self._retry_at = False, 0, 0.0
        self._changed = asyncio.Event()  # set when the tool list changed, or the connection ended
        self._changes_log = LogBudget(config.name)
        self._settled = asyncio.Event()  # set when the tools are listed, or the attempt failed
        self.last_words = ""  # a stdio server's last stderr line when it went down: for --check and the log

    async def start(self) -> None:
        """Connect and list the tools in a task of its own: returns at once; a slow or broken server delays no other."""
        if not self._stopped and not self._runner.running():
            self._settled.clear()
            self._changed.clear()
            self._up, self._why = False, "starting"
            self._runner.start(self._run())

    async def ready(self, timeout_s: float) -> bool:
        """Wait up to timeout_s until the tools are listed or connecting failed; whether it is usable."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._settled.wait()
        return self.status()[0]

    def tools(self) -> dict[str, Tool]:
        """MCP tool name -> Tool, as last listed (kept while the server restarts)."""
        return dict(self._tools)

    async def settled(self) -> None:
        """Wait for its first start only (at most its time-out): a restart keeps the tools last listed."""
        if self._why == "starting" and self._failed_starts == 0 and not self._tools:
            await self.ready(self.config.timeout_s)

    def status(self) -> tuple[bool, str]:
        """(usable, "3 tools" or why not), for /ready."""
        if self._up and self._why is None:
            return True, f"{len(self._tools)} tools"
        return False, self._why or "starting"

    async def stop(self) -> None:
        """Stop for good: the connection ends, a stdio server's whole process group exits; bounded in time."""
        self._stopped = True
        await self._runner.stop()
        self._up, self._why = False, "stopped"

    async def _run(self) -> None:
        """Own one connection: open, pick the era, list tools, re-list on changes, until it ends or stop()."""
        transport = self._transport = (HttpTransport(self.config, self._on_notification, self._http) if self.config.url
                                       else StdioTransport(self.name, self.config.command, self._on_notification))
        pump = Background(f"mcp-{self.name}-pump")
        try:
            await transport.open()
            # the server's messages are read while we send: stdio answers come that way, and list changes
            pump.start(transport.pump(self._changed))
            await self._connect()
            self._up, self._why = True, None
            self._settled.set()
            log.info("MCP server %s: %d tools (protocol %s)", self.name, len(self._tools), self._era)
            while True:
                await self._changed.wait()
                self._changed.clear()
                if not pump.running():
                    raise ConnectionError(getattr(transport, "closed", None) or "the connection ended")
                await self._relist()
                await asyncio.sleep(MCP_RELIST_PAUSE_S)  # a pause, not synchronisation: changes meanwhile wait
        except Exception as exc:  # whatever the server did, piagent goes on; status() says why
            self._why = str(exc) or type(exc).__name__
        finally:
            self._up = False
            await pump.stop()  # first: its readers must be gone before close() drains what is left
            await transport.close()
            self.last_words = getattr(transport, "last_words", "")  # not in _why: that reaches the model too
            if not self._stopped:
                self._failed_starts += 1
                delay_s = min(MCP_RESTART_MAX_S, MCP_RESTART_MIN_S * 2 ** (self._failed_starts - 1))
                self._retry_at = self._clock() + delay_s
                log.warning("MCP server %s is down: %s%s; started again on next use, not before %g s",
                            self.name, self._why, f" ({self.last_words})" if self.last_words else "", delay_s)
            self._settled.set()

    async def _connect(self) -> None:
        """Pick the era (ref §10), list the tools, and ask to hear when they change."""
        self._era = MCP_MODERN_VERSION
        try:
            found = await self._request("server/discover")
            modern = MCP_MODERN_VERSION in (found.get("supportedVersions") or ())
        except (McpError, TimeoutError) as exc:  # a handshake-era server refuses it, or may leave it unanswered
            if isinstance(exc, McpError) and exc.code in MCP_MODERN_ERRORS:  # modern: never fall back (ref §10)
                raise McpError("server/discover", {"message": f"{exc.message} (piagent speaks {MCP_MODERN_VERSION} "
                                                              f"and {', '.join(MCP_HANDSHAKE_VERSIONS)})"}) from None
            modern, found = False, {}
        capabilities = found.get("capabilities") if modern else await self._initialize()
        await self._list_tools()
        tools = capabilities.get("tools") if isinstance(capabilities, dict) else None
        if not modern:  # a handshake-era server may announce changes it did not declare (mcp 2.3.0 over HTTP does)
            self._transport.listen(None)
        elif isinstance(tools, dict) and tools.get("listChanged"):
            self._transport.listen(self._message("subscriptions/listen", {"notifications": {"toolsListChanged": True}}))

    async def _initialize(self) -> dict[str, Any]:
        """The handshake era's start (ref §3): initialize, check the version, notifications/initialized."""
        self._era = None
        result = await self._request("initialize", {"protocolVersion": MCP_HANDSHAKE_VERSIONS[0],
                                                    "capabilities": {}, "clientInfo": MCP_CLIENT_INFO})
        version = result.get("protocolVersion")
        if version not in MCP_HANDSHAKE_VERSIONS:
            ours = f"{MCP_MODERN_VERSION} and {', '.join(MCP_HANDSHAKE_VERSIONS)}"
            raise McpError("initialize", {"message": f"it speaks protocol version {str(version)[:40]!r}; piagent "
                                                     f"speaks {ours}"})
        self._era = self._transport.version = version
        await self._transport.notify({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return result.get("capabilities") or {}

    async def _list_tools(self) -> None:
        """tools/list, page by page; a tool that needs tasks, or HTTP headers piagent does not send, is left out."""
        tools, cursor, left_out = {}, None, []
        for _ in range(MCP_MAX_LIST_PAGES):
            page = await self._request("tools/list", {"cursor": cursor} if cursor else None)
            for tool in page.get("tools") or []:
                if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                    continue
                schema = tool.get("inputSchema") if isinstance(tool.get("inputSchema"), dict) else {"type": "object"}
                needs_task = (tool.get("execution") or {}).get("taskSupport") == "required"
                mirrored = self.config.url and self._era == MCP_MODERN_VERSION and "x-mcp-header" in json.dumps(schema)
                if needs_task or mirrored:
                    left_out.append(tool["name"][:64])
                    continue
                tools[tool["name"]] = self._tool(tool["name"], str(tool.get("description") or ""), schema)
            cursor = page.get("nextCursor")
            if not cursor:
                break
        if left_out:  # one line a listing, however many
            log.warning("MCP server %s: %d tools left out, piagent cannot call them: %s%s", self.config.name,
                        len(left_out), ", ".join(left_out[:5]), " ..." if len(left_out) > 5 else "")
        self._tools = tools

    async def _relist(self) -> None:
        """List the tools again after a change; on failure keep the old list (the next change tries again)."""
        try:
            await self._list_tools()
            self._changes_log.line(f"tool list changed, {len(self._tools)} tools")  # a flood of changes: bounded
        except (McpError, TimeoutError) as exc:
            log.warning("MCP server %s: listing tools again failed: %s", self.config.name, exc)

    def _tool(self, name: str, description: str, schema: dict[str, Any]) -> Tool:
        """One listed tool as the Toolbox runs it: bounded by the server's timeout, cut to MCP_MAX_RESULT_CHARS."""
        async def run(arguments: dict[str, Any]) -> str:
            return await self.call(name, arguments)
        # a backstop: call() answers first (waiting for a start, then the request, each within timeout_s)
        return Tool(run, description, schema, 2 * self.config.timeout_s + MCP_STOP_GRACE_S, self.max_result_chars)

    def _on_notification(self, message: dict[str, Any]) -> None:
        """A notification from the server: only a tool-list change matters to a tools-only client."""
        if message.get("method") == "notifications/tools/list_changed":
            self._changed.set()

    def _message(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A request with a new id; in the 2026-07-28 era its params carry version, capabilities and identity."""
        if self._era == MCP_MODERN_VERSION:
            params = {**(params or {}), "_meta": {"io.modelcontextprotocol/protocolVersion": MCP_MODERN_VERSION,
                                                  "io.modelcontextprotocol/clientCapabilities": {},
                                                  "io.modelcontextprotocol/clientInfo": MCP_CLIENT_INFO}}
        message = {"jsonrpc": "2.0", "id": next(self._ids), "method": method}
        return message if params is None else {**message, "params": params}

    async def _request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request's result within timeout_s (McpError if refused); one given up on is cancelled at the server."""
        message = self._message(method, params)
        try:
            async with asyncio.timeout(self.config.timeout_s):
                try:
                    answer = await self._transport.request(message)
                except McpSessionLost:  # the HTTP server forgot us (404): start over, then ask once more (ref §5)
                    await self._initialize()
                    self._changed.set()
                    message = self._message(method, params)
                    answer = await self._transport.request(message)
        except TimeoutError:
            await self._cancel(message)
            raise TimeoutError(f"no answer to {method} within {self.config.timeout_s:g} s") from None
        except asyncio.CancelledError:
            await self._cancel(message)
            raise
        if "error" in answer:
            raise McpError(method, answer["error"])
        result = answer.get("result")
        return result if isinstance(result, dict) else {}

    async def _cancel(self, message: dict[str, Any]) -> None:
        """Tell the server we stopped waiting (best effort); not for initialize or the probe, nor on 2026-07-28 HTTP."""
        if message["method"] in ("initialize", "server/discover") or (
                self.config.url and self._era == MCP_MODERN_VERSION):
            return
        notice = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                  "params": {"requestId": message["id"], "reason": "piagent stopped waiting"}}
        with contextlib.suppress(ConnectionError, TimeoutError):  # the server is gone or stuck: nothing to cancel
            async with asyncio.timeout(MCP_STOP_GRACE_S):
                await self._transport.notify(notice)

    async def call(self, tool: str, arguments: dict[str, Any]) -> str:
        """Call one tool: the text for the model, or ToolError with a sentence the model can read."""
        self.calls += 1
        try:
            await self._ensure_running()
            result = await self._request("tools/call", {"name": tool, "arguments": arguments})
            if result.get("resultType", "complete") != "complete":
                raise ToolError(f"{tool} asked for input that piagent cannot give")
            text = result_text(result, self.max_result_chars)
            if result.get("isError"):
                raise ToolError(text or f"{tool} failed and did not say why")
        except (ToolError, McpError, TimeoutError, ConnectionError) as exc:
            self.failures += 1
            if isinstance(exc, ConnectionError):
                self._why = str(exc)
            kind = ToolTimeout if isinstance(exc, TimeoutError) else ToolError
            raise exc if isinstance(exc, ToolError) else kind(f"MCP server {self.config.name}: {exc}") from None
        self._why, self._failed_starts = None, 0
        return text

    async def _ensure_running(self) -> None:
        """Start the server again if it is down and its back-off has passed, and wait (bounded) for its tools."""
        if self._stopped:
            raise ToolError(f"MCP server {self.name} has been stopped")
        if not self._runner.running():
            wait_s = self._retry_at - self._clock()
            if wait_s > 0:
                raise ToolError(f"MCP server {self.name} is not running ({self._why}); piagent tries again in "
                                f"{math.ceil(wait_s)} s")
            await self.start()
        await self.ready(self.config.timeout_s)
        if not self._settled.is_set():
            raise ToolError(f"MCP server {self.name} is still starting after {self.config.timeout_s:g} s")
        if not self._up:
            raise ToolError(f"MCP server {self.name} is not usable: {self._why}")


# ---------------------------------------------------------------------------
# Guards: API keys, rate limits, body size, a bounded queue, graceful drain
# ---------------------------------------------------------------------------

#: The ASGI scope key where a request's log fields are gathered (by Guards, the routes and RequestLog).
LOG_FIELDS_KEY = "piagent.log"
#: The ASGI scope key where Guards leave a JSON body parsed, so that it is parsed once (read_body validates it).
BODY_KEY = "piagent.body"
#: Paths anyone may call without a key or a rate limit (liveness must work for systemd and monitors).
OPEN_PATHS = frozenset({"/health", "/"})
#: Requests that only read, though not GET: free of the rate limit as GETs are (Ollama's "show model", which its
#: apps call to describe a model).
READ_POSTS = frozenset({"/api/show"})
#: At most this many rate-limit buckets are kept; the least recently used go first.
MAX_RATE_BUCKETS = 10_000
#: What a client may send as X-Request-Id; anything else gets a fresh id.
REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Wrong keys one client address may send a minute before it is refused with 429 (key guessing is slow).
AUTH_FAILURES_PER_MIN = 10
#: Host names a keyless server on loopback answers to (with ALLOWED_HOSTS): a web page that points its own
#: DNS name at 127.0.0.1 (DNS rebinding) is refused.
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def on_loopback(host: str) -> bool:
    """Whether HOST reaches this machine only: localhost or a loopback address. Example: "127.0.0.2" -> True."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or an address with a zone
        return False


def json_media_type(content_type: str) -> bool:
    """Whether a Content-Type declares JSON: application/json or application/*+json, any case, any parameters."""
    main, _, sub = content_type.partition(";")[0].strip().lower().partition("/")
    return main == "application" and "/" not in sub and (sub == "json" or sub.endswith("+json"))


def json_body(body: bytes) -> tuple[bool, Any]:
    """(True, the value) of a JSON body, parsed once for every route (read_body); (False, None) when it is not JSON
    at all (the route says what is wrong). InvalidRequest, naming where, for JSON piagent must not take: a lone
    surrogate, NaN or Infinity, deep nesting, a whole number past what Python reads."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise InvalidRequest(f"body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False, None
    except ValueError:
        raise InvalidRequest(f"body: a number longer than {sys.get_int_max_str_digits()} digits; send shorter "
                             f"numbers") from None
    problem = json_problem(value)
    if problem is not None:
        raise InvalidRequest(problem)
    return True, value


def json_problem(value: Any) -> str | None:
    """What makes a JSON value unsafe (a lone surrogate, NaN or Infinity, deep nesting), naming where; else None."""
    # (where, value, depth); `where` is a tuple of keys, joined only for the message: this runs on every body
    stack: list[tuple[tuple, Any, int]] = [((), value, 0)]
    while stack:
        where, value, depth = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return f"{json_path(where)}: {value} is not a JSON number; send finite numbers"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for key, item in items:
            if depth >= MAX_JSON_DEPTH:
                return f"{json_path((*where, key))}: nested deeper than {MAX_JSON_DEPTH} levels"
            if isinstance(key, str) and not is_text(key):
                return f"a key in {json_path(where)}: {LONE_SURROGATE} is not text"
            if isinstance(item, str) and not is_text(item):
                return f"{json_path((*where, key))}: {LONE_SURROGATE} is not text; send UTF-8"
            if isinstance(item, (dict, list, float)):
                stack.append(((*where, key), item, depth + 1))
    return None


def key_id(key: str) -> str:
    """A short, non-reversible name for a key, safe for logs. Example: key_id("s3cret-key") -> 8 hex digits"""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>` (any case, any spacing) or `X-API-Key: <key>`."""
    scheme, _, value = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip() or None


def match_key(presented: str, keys: tuple[str, ...]) -> str | None:
    """The configured key equal to `presented`, compared in constant time against every key."""
    found = None
    for key in keys:  # no early exit: timing must not tell which key, or how much of it, matched
        if hmac.compare_digest(presented.encode(), key.encode()):
            found = key
    return found


def client_ip(scope: Mapping[str, Any], headers: Mapping[str, str], trust_proxy: bool) -> str:
    """The caller's address; behind a trusted proxy, the last X-Forwarded-For entry (the proxy's), if an address."""
    if trust_proxy:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(headers.get("x-forwarded-for", "").split(",")[-1].strip()))
    return (scope.get("client") or ("unknown", 0))[0]


def host_name(headers: Mapping[str, str]) -> str:
    """The Host header's name, without port or brackets. Example: "[::1]:8000" -> "::1"; "Pi.local" -> "pi.local"."""
    host = headers.get("host", "").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class TokenBuckets:
    """Token buckets of `rate_per_min` a minute per identity; full idle ones are dropped, at most max_buckets kept."""

    def __init__(self, rate_per_min: int, clock: Callable[[], float], max_buckets: int = MAX_RATE_BUCKETS):
        self.capacity, self.per_s = float(rate_per_min), rate_per_min / 60.0
        self.clock, self.max_buckets = clock, max_buckets
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # identity -> [tokens, last update]

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, identity: str) -> tuple[bool, int, int]:
        """Spend one token: (allowed, tokens left, seconds until the next token if refused)."""
        now = self.clock()
        self._forget_idle(now)
        tokens, last = self._buckets.pop(identity, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.per_s)
        allowed = tokens >= 1
        tokens -= 1 if allowed else 0
        self._buckets[identity] = [tokens, now]
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        retry_s = 0 if allowed else math.ceil((1 - tokens) / self.per_s)
        return allowed, int(tokens), retry_s

    def _forget_idle(self, now: float) -> None:
        full_after_s = self.capacity / self.per_s
        while self._buckets:
            _, last = next(iter(self._buckets.values()))
            if now - last < full_after_s:
                return
            self._buckets.popitem(last=False)


def shutting_down() -> ShuttingDown:
    """The refusal of a request that comes, or a stream that is still running, when piagent is stopping."""
    return ShuttingDown("piagent is shutting down; retry in a few seconds", {"Retry-After": str(DEFAULT_RETRY_AFTER_S)})


class Ticket:
    """One request's place at the gate: waiting, then holding (a slot and its conversation), then gone."""

    def __init__(self, conversation: str | None, slot: bool, future: asyncio.Future):
        self.conversation, self.slot, self.future = conversation, slot, future
        self.granted = False
        self.active_at = time.monotonic()  # last sign of life from the upstream (for /ready's stall check)


class Gate:
    """Who may generate now: at most `limit` at once and one per conversation; the rest wait in one FIFO queue of at
    most `max_queue` (beyond it, QueueFull). A ticket without a slot (a forget) waits for its conversation only."""

    def __init__(self, limit: int, max_queue: int):
        self.limit, self.max_queue = limit, max_queue
        self.active = 0
        self.busy: set[str] = set()  # conversations held by a ticket
        self.holders: set[Ticket] = set()
        self.closed = False  # set while draining for shutdown: no new entries
        self._waiting: deque[Ticket] = deque()
        self._changed: asyncio.Future | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for the model (a forget, waiting for its conversation only, is not one)."""
        return sum(t.slot for t in self._waiting)

    def changed(self) -> asyncio.Future:
        """A future resolved the next time queue positions change."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        return self._changed

    def enter(self, conversation: str | None, slot: bool = True) -> Ticket:
        """A ticket, granted at once if it may go now, else queued. Raises QueueFull or ShuttingDown."""
        if self.closed:
            raise shutting_down()
        ticket = Ticket(conversation, slot, asyncio.get_running_loop().create_future())
        if self._may_go(ticket):
            self._grant(ticket)
        elif ticket.slot and self.queued >= self.max_queue:
            raise QueueFull(f"the model is busy and {self.max_queue} requests already wait (MAX_QUEUE); retry shortly",
                            {"Retry-After": str(DEFAULT_RETRY_AFTER_S)})
        else:
            self._waiting.append(ticket)
        return ticket

    async def positions(self, ticket: Ticket) -> AsyncIterator[int]:
        """The ticket's place in the queue (1 = next) each time it changes, until it is granted."""
        shown = 0
        while not ticket.granted:
            position = 1 + sum(t.slot for t in itertools.takewhile(lambda t: t is not ticket, self._waiting))
            if position != shown:
                shown = position
                yield position
            await asyncio.wait({ticket.future, self.changed()}, return_when=asyncio.FIRST_COMPLETED)

    def leave(self, ticket: Ticket) -> None:
        """Give back what the ticket holds, or take it out of the queue; then let the next ones in."""
        if ticket.granted:
            ticket.granted = False
            self.holders.discard(ticket)
            self.active -= ticket.slot
            self.busy.discard(ticket.conversation)
        elif ticket in self._waiting:
            self._waiting.remove(ticket)
        ticket.future.cancel()
        for waiting in list(self._waiting):  # in order: nobody passes a waiter that may go
            if waiting.future.done():  # cancelled with its task; that task's own leave() is still to come
                self._waiting.remove(waiting)
            elif self._may_go(waiting):
                self._waiting.remove(waiting)
                self._grant(waiting)
        self.changed().set_result(None)

    def stalled(self, limit_s: float) -> int:
        """How many slots have been held with no upstream activity for longer than `limit_s`."""
        now = time.monotonic()
        return sum(1 for t in self.holders if t.slot and now - t.active_at > limit_s)

    def _may_go(self, ticket: Ticket) -> bool:
        return (not ticket.slot or self.active < self.limit) and ticket.conversation not in self.busy

    def _grant(self, ticket: Ticket) -> None:
        ticket.granted, ticket.active_at = True, time.monotonic()
        self.holders.add(ticket)
        self.active += ticket.slot
        if ticket.conversation is not None:
            self.busy.add(ticket.conversation)
        ticket.future.set_result(None)


class Drain:
    """Graceful shutdown: begin() closes the gate, and `grace_s` later `expired` stops the exchanges still running."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.loop: asyncio.AbstractEventLoop | None = None  # set by the app's lifespan
        self.expired: asyncio.Future | None = None
        self.expires_at = math.inf  # the loop's time when `expired` is set, once begun
        self.writes: set[asyncio.Timeout] = set()  # the time limits of writes in progress: the grace ends them too

    def start(self) -> None:
        """Called by the lifespan, on the loop that serves requests."""
        self.loop = asyncio.get_running_loop()
        self.expired = self.loop.create_future()

    def begin(self, gate: Gate) -> None:
        """Called on the event loop when the server is told to stop."""
        gate.closed = True
        self.expires_at = asyncio.get_running_loop().call_later(self.grace_s, self._expire).when()

    def end_now(self) -> None:
        """Called on the event loop at a second Ctrl-C: the grace ends at once, and its usual way (streams cut and
        saved, waiters 503, the lifespan's clean-up): uvicorn's own forced exit would skip that clean-up."""
        if not self.expired.done():
            log.warning("stopping now: replies still running are cut (Ctrl-C once more quits without cleaning up)")
            self.expires_at = self.loop.time()
            self._expire()

    def _expire(self) -> None:
        if not self.expired.done():
            self.expired.set_result(None)
        for limit in self.writes:  # a write blocked on a slow client ends now (its stream gets ShuttingDown)
            limit.reschedule(self.loop.time())


#: OpenAI error "type" by HTTP status, for the /v1 front door.
OPENAI_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                      422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(path: str, status: int, code: str, message: str) -> dict[str, Any]:
    """The error body for `path`: {"error": {"code", "message"}}, or OpenAI's under /v1/, or Ollama's under /api/."""
    if path.startswith("/api/"):
        return {"error": message}
    if path.startswith("/v1/"):
        kind = OPENAI_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"error": {"code": code, "message": message}}


def error_response(scope: MutableMapping[str, Any], exc: PiagentError) -> JSONResponse:
    """The one place a typed error becomes HTTP (guards, routes, streams that had not begun); noted for the log."""
    scope.get(LOG_FIELDS_KEY, {})["error"] = exc.code
    status = 400 if exc.status == 422 and scope["path"].startswith("/api/") else exc.status  # Ollama's bad request
    return JSONResponse(error_body(scope["path"], status, exc.code, exc.message), status, headers=exc.headers)


class Guards:
    """ASGI middleware in front of the routes: request id, client address, body size, API key, rate limit."""

    def __init__(self, app: Callable, config: Config, buckets: TokenBuckets | None, clock: Callable[[], float]):
        self.app, self.config, self.buckets = app, config, buckets
        self.failures = TokenBuckets(AUTH_FAILURES_PER_MIN, clock)
        # a keyless server on loopback trusts whoever reaches it, so only loopback names may reach it
        self.hosts = LOOPBACK_NAMES | {config.host} | set(config.allowed_hosts) if (
            not config.api_keys and on_loopback(config.host)) else None
        # the page itself holds no data (it asks for the key), and a public /metrics is the operator's choice
        self.open_paths = OPEN_PATHS | ({"/metrics"} if config.metrics_public else set())

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        fields = scope.setdefault(LOG_FIELDS_KEY, {})
        given = headers.get("x-request-id", "")
        fields["request_id"] = given if REQUEST_ID_PATTERN.match(given) else uuid.uuid4().hex
        fields["client"] = client_ip(scope, headers, self.config.trust_proxy)
        extra_headers = [(b"x-request-id", fields["request_id"].encode()), (b"x-piagent", b"1")]  # see raise_for_status
        head = scope["method"] == "HEAD"  # answered as GET, without the body
        scope["method"] = "GET" if head else scope["method"]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra_headers]}
            elif head:
                message = {**message, "body": b""}
            await send(message)

        try:
            if self.hosts is not None and host_name(headers) not in self.hosts:
                raise HostNotAllowed(f"this piagent answers only to {', '.join(sorted(self.hosts))}; to reach it by "
                                     f"another name, add that name to ALLOWED_HOSTS (or set API_KEYS)")
            if scope["method"] == "POST" and (origin := self._unasked_cross_site(headers)) is not None:
                fix = ("if that page may use piagent, add its origin to CORS_ORIGINS" if ORIGIN_PATTERN.match(origin)
                       else "if it may use piagent, send Content-Type: application/json")  # an extension, an app
                raise OriginNotAllowed(f"a page at {origin[:100]!r} sent this from another site, and its browser asked "
                                       f"nobody first (the body is not declared JSON); {fix}",
                                       {"Connection": "close"})  # its body is not read: not even to skip it
            receive = await self._bounded_body(scope, headers, receive)
            if scope["path"] not in self.open_paths and scope["method"] != "OPTIONS":
                identity = self._authorize(headers, fields)
                if scope["method"] != "GET" and scope["path"] not in READ_POSTS:  # reads (and HEAD) are free: a
                    extra_headers.extend(self._limit(identity))  # page or app polling /ready spends no chat
        except PiagentError as exc:
            return await error_response(scope, exc)(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)

    def _unasked_cross_site(self, headers: Mapping[str, str]) -> str | None:
        """The Origin of a POST that another site's page (not in CORS_ORIGINS) made a browser send without asking
        first (a CORS preflight), else None. A browser sends any page's form or text/plain POST so: JSON is read
        from such bodies by the Ollama door (Ollama's docs use curl -d), and without keys any web page could have
        made piagent generate. A request with a JSON Content-Type from elsewhere was asked about (and only
        CORS_ORIGINS are answered); clients that are not browsers send no Origin."""
        origin = headers.get("origin")
        if origin is None or json_media_type(headers.get("content-type", "")) or origin in self.config.cors_origins:
            return None
        return None if origin.partition("://")[2].lower() == headers.get("host", "").lower() else origin

    async def _bounded_body(self, scope: dict, headers: Mapping[str, str], receive: Callable) -> Callable:
        """Read the body (refusing it past MAX_BODY_BYTES before any parsing), parse it if it is JSON (into
        scope[BODY_KEY]), and replay it to the app."""
        limit = self.config.max_body_bytes
        # Connection: close, or the server would go on reading (and discarding) the rest of a huge body
        too_large = BodyTooLarge(f"the request body is larger than {limit} bytes (MAX_BODY_BYTES)",
                                 {"Connection": "close"})
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        body, more = bytearray(), True
        try:  # a body that stalls would hold its connection (and a MAX_CONNECTIONS place) for ever
            async with asyncio.timeout(self.config.header_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        raise ClientGone()  # it left mid-body: nobody to answer
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > limit:
                        raise too_large
        except TimeoutError:
            raise BodyTimeout(f"the request body did not arrive within {self.config.header_timeout_s:g} s "
                              f"(HEADER_TIMEOUT_S): send it whole, at once", {"Connection": "close"}) from None
        if body:  # whatever the first byte (a space, a BOM): a route may parse it
            is_json, value = json_body(body)
            if is_json:
                scope[BODY_KEY] = value
        first = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay() -> dict:
            return first.pop() if first else await receive()

        return replay

    def _authorize(self, headers: Mapping[str, str], fields: dict[str, Any]) -> str:
        """The identity to rate-limit: the key's id when keys are set (else 401), or the client address."""
        keys = self.config.api_keys
        if not keys:
            return f"ip:{fields['client']}"
        key = match_key(presented_key(headers) or "", keys)
        if key is None:
            allowed, _, retry_s = self.failures.take(f"ip:{fields['client']}")
            if not allowed:
                raise RateLimited(f"more than {AUTH_FAILURES_PER_MIN} wrong keys a minute from {fields['client']}; "
                                  f"retry in {retry_s} s", {"Retry-After": str(retry_s)})
            raise Unauthorized("missing or wrong API key: send Authorization: Bearer <key> or X-API-Key: <key>",
                               {"WWW-Authenticate": "Bearer"})
        fields["key"] = key_id(key)
        return f"key:{fields['key']}"

    def _limit(self, identity: str) -> list[tuple[bytes, bytes]]:
        """Spend a token for `identity`: the X-RateLimit-Remaining header, or RateLimited."""
        if self.buckets is None:
            return []
        allowed, left, retry_s = self.buckets.take(identity)
        if not allowed:
            raise RateLimited(f"more than {self.config.rate_limit_per_min} requests a minute (RATE_LIMIT_PER_MIN); "
                              f"retry in {retry_s} s", {"Retry-After": str(retry_s), "X-RateLimit-Remaining": "0"})
        return [(b"x-ratelimit-remaining", str(left).encode())]


#: Fewer tokens than this left for the prompt (CTX_TOKENS - MAX_TOKENS) is a start-up warning: a system prompt and a
#: question alone take about as many.
MIN_PROMPT_ROOM_TOKENS = 256


def startup_warnings(config: Config) -> list[str]:
    """What an operator must hear at start-up. Example: HOST=0.0.0.0 with no API_KEYS -> one loud warning."""
    warnings = [f"the env file sets {name}, which piagent does not read" for name in config.unread]
    if (room := config.ctx_tokens - config.max_tokens) < MIN_PROMPT_ROOM_TOKENS:
        warnings.append(f"MAX_TOKENS={config.max_tokens} leaves {room} tokens of CTX_TOKENS={config.ctx_tokens} for "
                        f"the prompt: most requests will be refused as too large; lower MAX_TOKENS")
    if not on_loopback(config.host) and not config.api_keys:
        warnings.append(f"!!! piagent listens on {config.host} with NO API_KEYS: anyone who can reach this "
                        f"machine can use the model. Set API_KEYS (see README, 'Safe on the LAN'). !!!")
    return warnings


# ---------------------------------------------------------------------------
# Streaming: one exchange per request (a scope that owns and releases everything),
#            and the adapters that render its events for each front door
# ---------------------------------------------------------------------------
# A generation request, start to end: DEVELOPING.md, "Code layout".

#: Headers that keep reverse proxies and browsers from holding streamed tokens back.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: Events that may wait for a slow client; then the exchange, and so the upstream, waits too (back-pressure).
RELAY_BUFFER = 32
#: Characters of reply piecewise per MAX_TOKENS token, at most: an upstream that ignores the limit is cut there.
REPLY_CHARS_PER_TOKEN = 32
#: The least a reply may be before it is cut, in characters (a small MAX_TOKENS still allows a paragraph).
MIN_REPLY_CAP_CHARS = 4096


class Ask(NamedTuple):
    """What a request asks, before memory and the context budget are applied."""

    system: list[Message]  # the client's own system messages (OpenAI front door)
    history: list[Message] | None  # the client's own history; None: piagent's memory, by conversation_id
    message: str  # the new user message
    tail: tuple[Message, ...] = ()  # the client's tool calls and their results after that message
    tools: tuple[dict[str, Any], ...] = ()  # the client's own tools (their calls go back to the client)
    tool_choice: str | dict[str, Any] | None = None  # and the client's tool_choice for them


class Queued(NamedTuple):
    """The exchange waits for the model, at `position` in the queue (1 = next)."""

    position: int


class Signal(NamedTuple):
    """What Relay hands over besides events: PING (nothing for a while) and END (the exchange is over)."""

    name: str


PING, END = Signal("ping"), Signal("end")


@dataclass
class Runtime:
    """Everything requests share, made once per app by create_app and passed explicitly (never a global)."""

    config: Config
    provider: Provider
    store: MemoryStore | None
    toolbox: Toolbox
    gate: Gate
    drain: Drain
    buckets: TokenBuckets | None
    metrics: Metrics  # this and warmup are the Operations section's: nothing above it uses them
    warmup: Warmup
    clock: Callable[[], float]
    streams: int = 0  # streamed responses in progress (a gauge in /metrics)
    #: Ollama's answers at a model-list path, by (path, model): (reused until, the answer or the call in flight)
    model_info: dict[tuple[str, str], tuple[float, asyncio.Future]] = field(default_factory=dict)


class Exchange:
    """One generation, from its place in the queue to its log fields: `async with Exchange(...) as x`. What it takes
    goes on `held` the moment it is taken (the gate's ticket); the upstream lives inside `events`. Leaving the
    block by any road stores what a stream cut short (the client left, the shutdown grace ended) had given, then
    closes `held`, once."""

    def __init__(self, rt: Runtime, agent: Agent, ask: Ask, sampling: Sampling, conversation_id: str | None,
                 stream: bool, fields: dict[str, Any]):
        self.rt, self.agent, self.ask, self.sampling = rt, agent, ask, sampling
        self.stream, self.fields = stream, fields
        self.conversation_id = conversation_id or ""
        self.remember = bool(conversation_id) and ask.history is None and rt.store is not None
        self.owner = fields.get("key")  # with API keys, the key's id: it owns the conversations it makes
        self.usage = Usage(model=agent.model)
        self.sent: list[str] = []  # text pieces the client was given: what memory keeps
        self.tool_events: list[ToolEvent] = []  # the agent's tool calls, as they ran
        self.history_truncated = 0  # stored turns left out to fit CTX_TOKENS
        self.saved: bool | None = None  # whether the turn was stored (None: nothing to store)
        self.capped: str | None = None  # "length" when piagent cut a reply longer than MAX_TOKENS allows
        self.started = fields.get("start", time.perf_counter())
        self.generating_at: float | None = None
        self.first_at: float | None = None
        self.held = AsyncExitStack()

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if self.stream and kind in (None, ClientGone, ShuttingDown):  # a stream cut keeps what was received
                await self.save()
        finally:
            await self.held.aclose()
            self.fields.update(self.record())

    async def events(self) -> AsyncIterator[Queued | str | ToolEvent]:
        """What a door shows, in order: queue positions, then text pieces and tool calls (cut at the reply's cap)."""
        if not self.ask.tools:  # before its place in line: the slot is not held while an MCP server starts
            await self.rt.toolbox.settle(self.agent.tools)
        ticket = self.rt.gate.enter(self.conversation_id if self.remember else None)
        self.held.callback(self.rt.gate.leave, ticket)
        async for position in self.rt.gate.positions(ticket):
            yield Queued(position)
        self.generating_at = time.perf_counter()
        prompt = await self.prompt()
        room = max(MIN_REPLY_CAP_CHARS, REPLY_CHARS_PER_TOKEN * self.sampling.max_tokens)
        try:
            async with aclosing(self.generate(prompt)) as pieces:
                async for item in pieces:
                    ticket.active_at = time.monotonic()
                    if isinstance(item, str):
                        item, room = item[:room], room - len(item)
                        if room < 0:
                            self.usage.done_reason = self.capped = "length"
                            yield item
                            return  # leaving `aclosing` closes the upstream request
                    yield item
        except UpstreamRefused as exc:  # a client's own tools or settings: its to change, and not worth a retry
            if exc.tools and self.ask.tools:  # without them, the agent's own would go (to the same model)
                raise exc.theirs("send it to an agent whose model calls tools" + (
                    "" if self.agent.tools else ", or without tools")) from None
            if not exc.tools and (named := exc.names(self.client_fields())):
                raise exc.theirs(f"change its {', '.join(named)} and send it again") from None
            raise

    def client_fields(self) -> list[str]:
        """The fields of the client's own that could be refused: not keep_alive, nor the options piagent sets."""
        extra, fields = self.sampling.extra, ["think", "format", "schema"]
        options = [k for k, v in (extra.get("options") or {}).items() if k not in PIAGENT_OPTIONS and v is not None]
        given = [f for f in fields if extra.get("json_schema" if f == "schema" else f) not in (None, "", False)]
        return given + options

    async def prompt(self) -> Prompt:
        """The prompt with as much history as fits CTX_TOKENS after the reply's tokens (and the tool specs: the template
        puts them in the prompt; the agent's own tool results, small and bounded, are not counted ahead)."""
        ask, config = self.ask, self.rt.config
        if ask.history is None:
            with storage_errors():
                if self.remember and self.owner:  # another key's conversation is not there, for this key
                    found = await self.rt.store.get(self.conversation_id)
                    if found is not None and not found.agent.startswith(f"{self.owner}/"):
                        raise ConversationNotFound(f"no conversation {self.conversation_id!r} for this key")
                turns = await self.rt.store.history(self.conversation_id) if self.remember else []
            ask = ask._replace(history=turns_as_messages(stable_window(turns, config.memory_max_turns)))
        tools = ask.tools or self.rt.toolbox.specs(self.agent.tools)
        fixed = [{"role": "system", "content": self.agent.system + (json.dumps(tools) if tools else "")},
                 *ask.system, {"role": "user", "content": ask.message}, *ask.tail]
        reply = self.sampling.max_tokens
        kept, self.history_truncated = fit_history(ask.history, fixed, config.ctx_tokens - reply, reply)
        return Prompt(self.agent.system, ask.system + kept, ask.message, ask.tail, ask.tools, ask.tool_choice)

    def generate(self, prompt: Prompt) -> AsyncIterator[str | ToolEvent]:
        """The provider's reply; through the tool loop when piagent runs the agent's tools (not the client's own)."""
        provider, agent = self.rt.provider, self.agent
        if agent.tools and not prompt.tools:
            return tool_loop(provider, self.rt.toolbox, agent, prompt, self.sampling, self.usage,
                             self.rt.config.max_tool_rounds, self.stream)
        if self.stream:
            return provider.stream(agent, prompt, self.sampling, self.usage)
        return self._whole(prompt)

    async def _whole(self, prompt: Prompt) -> AsyncIterator[str]:
        text = await self.rt.provider.complete(self.agent, prompt, self.sampling, self.usage)
        if text:
            yield text

    def note(self, event: str | ToolEvent) -> None:
        """Keep an event the door has written (text is what memory stores); a stream's first one is its TTFT."""
        if self.stream and self.first_at is None:
            self.first_at = time.perf_counter()
        (self.sent if isinstance(event, str) else self.tool_events).append(event)

    async def save(self) -> None:
        """Store (message, what the client got) once; a failure is logged and noted, not raised: the reply stands."""
        if not self.remember or self.saved is not None or not self.sent:
            return
        try:
            with storage_errors():
                await self.rt.store.append(self.conversation_id, owned(self.agent.name, self.owner), self.ask.message,
                                           "".join(self.sent))
            self.saved = True
        except MemoryUnavailable as exc:
            self.saved, self.fields["memory_error"] = False, exc.message
            log.warning("the reply was delivered but not stored: %s", exc.message)

    def client_tool_calls(self) -> list[dict[str, Any]]:
        """The model's calls of the client's own tools, for the client to run (OpenAI's shape)."""
        return [call.as_message_part() for call in self.usage.tool_calls] if self.ask.tools else []

    def headers(self) -> dict[str, str]:
        """X-Conversation-Id, X-History-Truncated (turns left out to fit) and X-Memory-Saved (when it failed)."""
        headers = {"X-Conversation-Id": self.conversation_id} if self.conversation_id else {}
        if self.history_truncated:
            headers["X-History-Truncated"] = str(self.history_truncated)
        if self.saved is False:
            headers["X-Memory-Saved"] = "false"
        return headers

    def timings(self) -> dict[str, Any]:
        """queue_wait_ms, ttft_ms, duration_ms and tokens_per_s (from the first token; for a whole reply, from the
        start of generation), as far as known."""
        now = time.perf_counter()
        out: dict[str, Any] = {"duration_ms": round((now - self.started) * 1000)}
        for key, moment in (("queue_wait_ms", self.generating_at), ("ttft_ms", self.first_at)):
            if moment is not None:
                out[key] = round((moment - self.started) * 1000)
        # a stream's pieces, or the upstream's count for a whole reply (one piece, and no first token)
        since = self.first_at or self.generating_at
        tokens = len(self.sent) if self.stream else self.usage.completion_tokens or len(self.sent)
        if tokens and since is not None and now > since:
            out["tokens_per_s"] = round(tokens / (now - since), 2)
        return out

    def record(self) -> dict[str, Any]:
        """What the request log says of this exchange."""
        u, timings = self.usage, self.timings()
        del timings["duration_ms"]
        return {"agent": self.agent.name, "model": self.agent.model, "provider": self.rt.provider.name,
                "conversation_id": self.conversation_id or None, "capped": self.capped,
                "tokens": len(self.sent) if self.stream else u.completion_tokens, "prompt_tokens": u.prompt_tokens,
                "history_truncated": self.history_truncated or None, "tool_calls": len(self.tool_events) or None,
                "saved": False if self.saved is False else None,
                "prompt": self.ask.message if self.rt.config.log_prompts else None, **timings}


class Relay:
    """An exchange's events, produced in a task of their own and handed to the request's task, which so stays free to
    ping, to notice the client leaving or the shutdown grace ending, and to stop everything at once."""

    def __init__(self, events: AsyncIterator[Any], receive: Callable[[], Awaitable[dict]], expired: asyncio.Future):
        self.source, self.receive, self.expired = events, receive, expired
        self.buffer: deque[Any] = deque()
        self.ready: asyncio.Future | None = None  # resolved when the buffer gains an event
        self.room: asyncio.Future | None = None  # resolved when the buffer has room again

    async def __aenter__(self) -> Relay:
        loop = asyncio.get_running_loop()
        # the exchange runs apart from the request's task, so that this task can always answer the client
        self.producer = loop.create_task(self._produce())
        # reading from the client is the only way to learn it left while nothing is being sent to it
        self.gone = loop.create_task(self._until_disconnect())
        for done in (self.producer, self.gone, self.expired):  # each wakes next() itself: one future to await
            done.add_done_callback(self._wake)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.expired.remove_done_callback(self._wake)  # shared by every request: leave nothing on it
        self.producer.cancel()
        self.gone.cancel()
        interrupted = False
        while not self.producer.done():  # its `finally`s close the upstream: only then may the slot pass on
            try:
                await asyncio.wait({self.producer})
            except asyncio.CancelledError:  # cancelled again (server shutdown): finish this first, then obey
                interrupted = True
        if interrupted:
            raise asyncio.CancelledError()

    def _wake(self, why: Any = None) -> None:
        """Resolve `ready` (with PING when it is the ping timer), if it is still waiting."""
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(why if why is PING else None)

    async def _produce(self) -> None:
        first = True
        async with aclosing(self.source) as events:
            async for event in events:
                self.buffer.append(event)
                self._wake()
                if first and isinstance(event, str):  # the first token: the request's task writes it at once,
                    first = False  # not after this task has gone back to the upstream for more (~60 us of TTFT)
                    await asyncio.sleep(0)
                while len(self.buffer) >= RELAY_BUFFER:
                    self.room = asyncio.get_running_loop().create_future()
                    await self.room

    async def _until_disconnect(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass

    async def next(self, ping_s: float | None) -> Any:
        """The next event, PING after `ping_s` idle, or END; raises the exchange's error, ClientGone or ShuttingDown.
        The client leaving and the grace ending are checked on every call, even with events buffered: a slow reader
        must not keep its stream past the grace, nor be credited with what it never got."""
        woken_by = None
        while True:
            if self.gone.done():
                raise ClientGone()
            if self.expired.done():
                raise shutting_down()
            if self.buffer:
                break
            if self.producer.done():
                self.producer.result()
                return END
            if woken_by is PING:
                return PING
            loop = asyncio.get_running_loop()
            self.ready = loop.create_future()
            ping = None if ping_s is None else loop.call_later(ping_s, self._wake, PING)
            woken_by = await self.ready
            if ping is not None:
                ping.cancel()
        if self.room is not None and not self.room.done():
            self.room.set_result(None)
        return self.buffer.popleft()


class Door:
    """How a front door shows an exchange (a stream's events, or one JSON body); this base is /chat's plain text."""

    media_type = "text/plain; charset=utf-8"
    ping_s: float | None = None  # send `ping` after this long with nothing else to send (None: wait silently)
    ping = ""

    def queued(self, position: int) -> str:
        return ""

    def text(self, piece: str, index: int) -> str:
        return piece

    def tool(self, event: ToolEvent) -> str:
        return ""

    def end(self, x: Exchange) -> str:
        return ""

    def failure(self, exc: PiagentError) -> str | None:
        """What ends a stream that fails after it began; None: cut it (no closing chunk)."""
        return None

    def whole(self, x: Exchange) -> dict[str, Any]:
        """The JSON body of a reply that is not streamed."""
        raise NotImplementedError


def tool_out(event: ToolEvent) -> dict[str, Any]:
    """A tool call as clients see it (SSE `tool` event, `tools` in a JSON reply)."""
    out = {"name": event.call.name, "arguments": event.arguments()}
    return {**out, "result": event.result} if event.error is None else {**out, "error": event.error}


class ChatDoor(Door):
    """/chat: SSE (`queued`, `token`, `tool`, then `done` with counts and timings, or `error`), or one JSON reply."""

    media_type = "text/event-stream; charset=utf-8"
    ping = ": ping\n\n"

    def __init__(self, ping_s: float):
        self.ping_s = ping_s

    def queued(self, position: int) -> str:
        return sse_event({"position": position}, "queued")

    def text(self, piece: str, index: int) -> str:
        return sse_event({"text": piece}, "token")

    def tool(self, event: ToolEvent) -> str:
        return sse_event(tool_out(event), "tool")

    def end(self, x: Exchange) -> str:
        u = x.usage
        return sse_event({"conversation_id": x.conversation_id, "agent": x.agent.name,
                          "model": u.model or x.agent.model, "provider": x.rt.provider.name,
                          "done_reason": u.done_reason, "tokens": len(x.sent), "prompt_tokens": u.prompt_tokens,
                          "completion_tokens": u.completion_tokens, "history_truncated": x.history_truncated,
                          "saved": x.saved, "ttft_ms": None, **x.timings()}, "done")

    def failure(self, exc: PiagentError) -> str:
        return sse_event(error_body("/chat", exc.status, exc.code, exc.message), "error")

    def whole(self, x: Exchange) -> dict[str, Any]:
        reply = {"reply": "".join(x.sent), "conversation_id": x.conversation_id,
                 "model": x.usage.model or x.agent.model, "provider": x.rt.provider.name}
        return {**reply, "tools": [tool_out(e) for e in x.tool_events]} if x.tool_events else reply


def finish_reason(x: Exchange) -> str:
    """OpenAI's finish_reason: "tool_calls" when the client's tools were called, else the upstream's reason."""
    if x.client_tool_calls():
        return "tool_calls"
    reason = x.usage.done_reason or "stop"
    return "stop" if reason == "tool_calls" else reason  # a call of piagent's own tools was answered already


def openai_usage(x: Exchange) -> dict[str, int] | None:
    """OpenAI's usage object, when the upstream reported counts."""
    prompt, completion = x.usage.prompt_tokens, x.usage.completion_tokens
    if prompt is None or completion is None:
        return None
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class OpenAIDoor(Door):
    """/v1/chat/completions: chat.completion.chunk events (then usage if asked, and [DONE]), or one chat.completion."""

    media_type = "text/event-stream; charset=utf-8"
    ping = ": ping\n\n"

    def __init__(self, ping_s: float, model: str, include_usage: bool):
        self.ping_s, self.model, self.include_usage = ping_s, model, include_usage
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        return sse_event({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                          "model": self.model, "choices": choices, **extra})

    def text(self, piece: str, index: int) -> str:
        delta = {"role": "assistant", "content": piece} if index == 0 else {"content": piece}
        return self._chunk([{"index": 0, "delta": delta, "finish_reason": None}])

    def end(self, x: Exchange) -> str:
        calls, out = x.client_tool_calls(), ""
        if calls:  # each call whole, in one fragment: valid for every OpenAI client
            delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
            head = {} if x.sent else {"role": "assistant", "content": None}
            out = self._chunk([{"index": 0, "delta": {**head, **delta}, "finish_reason": None}])
        delta = {} if x.sent or calls else {"role": "assistant", "content": ""}
        out += self._chunk([{"index": 0, "delta": delta, "finish_reason": finish_reason(x)}])
        if self.include_usage:
            out += self._chunk([], usage=openai_usage(x))
        return out + sse_event("[DONE]")

    def failure(self, exc: PiagentError) -> str:
        return sse_event(error_body("/v1/", exc.status, exc.code, exc.message))  # and no [DONE]

    def whole(self, x: Exchange) -> dict[str, Any]:
        reply = "".join(x.sent)
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        if x.client_tool_calls():
            message.update(content=reply or None, tool_calls=x.client_tool_calls())
        result = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                  "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(x)}]}
        return {**result, "usage": openai_usage(x)} if openai_usage(x) else result


#: Ollama's API version piagent speaks at /api/version (clients such as Open WebUI want a plain dotted number).
OLLAMA_API_VERSION = "0.12.6"
#: What Ollama answers at / to a client that is not a browser.
OLLAMA_PROBE_TEXT = "Ollama is running"


def ollama_time() -> str:
    """Now, in RFC 3339 in UTC with a Z, as Ollama writes created_at: "1970-01-01T00:00:00.000000Z"."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def ollama_tool_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """A tool call in OpenAI's shape (see Message) as Ollama writes it: arguments as an object, and an index."""
    function = call["function"]
    return {"id": call["id"], "function": {"index": index, "name": function["name"],
                                           "arguments": json_object(function["arguments"])}}


class OllamaDoor(Door):
    """/api/chat and /api/generate: NDJSON lines (text, the client's tool calls, a `done` line), or one object."""

    media_type = "application/x-ndjson"

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat

    def reply(self, text: str, x: Exchange | None = None, **extra: Any) -> dict[str, Any]:
        """One reply object: the text as message.content (chat) or response (generate), and `extra`."""
        body: dict[str, Any] = {"model": self.model, "created_at": ollama_time()}
        if not self.chat:
            return {**body, "response": text, **extra}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = x.client_tool_calls() if x is not None else []
        if calls:
            message["tool_calls"] = [ollama_tool_call(call, i) for i, call in enumerate(calls)]
        return {**body, "message": message, **extra}

    def _line(self, value: dict[str, Any]) -> str:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n"

    def text(self, piece: str, index: int) -> str:
        return self._line(self.reply(piece, done=False))

    def end(self, x: Exchange) -> str:
        calls = self._line(self.reply("", x, done=False)) if x.client_tool_calls() else ""
        return calls + self._line(self.reply("", done=True, **self.counts(x)))

    def failure(self, exc: PiagentError) -> str:
        return self._line({"error": exc.message})  # then the stream ends: Ollama sends no done line after it

    def whole(self, x: Exchange) -> dict[str, Any]:
        return self.reply("".join(x.sent), x, done=True, **self.counts(x))

    def counts(self, x: Exchange) -> dict[str, Any]:
        """done_reason, and Ollama's counts and durations (ns, measured at piagent: the queue counts as loading)."""
        ns = lambda s: max(0, round(s * 1e9))  # noqa: E731
        now, began = time.perf_counter(), x.generating_at or time.perf_counter()
        first = x.first_at or began  # a whole reply has no first token: all of it is evaluation
        u = x.usage
        reason = "length" if (x.capped or u.done_reason == "length") else "stop"
        return {"done_reason": reason, "total_duration": ns(now - x.started), "load_duration": ns(began - x.started),
                "prompt_eval_count": u.prompt_tokens or 0, "prompt_eval_duration": ns(first - began),
                "eval_count": u.completion_tokens or len(x.sent), "eval_duration": ns(now - first)}


async def embed(rt: Runtime, model: str, texts: list[str], extra: dict[str, Any],
                receive: Callable[[], Awaitable[dict]]) -> tuple[list[Any], int | None]:
    """(one vector per text, prompt tokens) from the upstream, in a slot of the gate; only Ollama takes `extra`.
    Run as an exchange's events are (Relay): a client that leaves, in line or mid-call, stops it and frees the slot."""
    provider = rt.provider
    if not isinstance(provider, HTTPProvider):  # a provider of another kind would say how it embeds
        raise InvalidRequest(f"PROVIDER={provider.name} has no embeddings")

    async def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await provider.post_json(path, body, model)
        except UpstreamRefused as exc:  # the input and its settings are the client's, what the model can do is not
            if exc.names(["input", "truncate", "dimensions", "option"]):
                raise exc.theirs("change its input or options and send it again") from None
            raise

    async def vectors() -> AsyncIterator[tuple[list[Any], int | None]]:
        ticket = rt.gate.enter(None)
        try:
            await ticket.future
            if isinstance(provider, OllamaProvider):
                data = await post("/api/embed", {**extra, "model": model, "input": texts})
                found = typed(data.get("embeddings"), list, "embeddings", provider.label) or []
                yield found, typed(data.get("prompt_eval_count"), int, "prompt_eval_count", provider.label)
                return
            data = await post("/embeddings", {"model": model, "input": texts})
            items = [i for i in typed(data.get("data"), list, "data", provider.label) or [] if isinstance(i, dict)]
            order = [typed(i.get("index"), int, "data[].index", provider.label) or 0 for i in items]
            found = [i.get("embedding") for _, i in sorted(zip(order, items), key=lambda pair: pair[0])]
            used = typed(data.get("usage"), dict, "usage", provider.label) or {}
            yield found, typed(used.get("prompt_tokens"), int, "usage.prompt_tokens", provider.label)
        finally:
            rt.gate.leave(ticket)

    async with Relay(vectors(), receive, rt.drain.expired) as relay:
        return await relay.next(None)


#: Seconds /api/tags and /api/show wait for the upstream's own model details (Home Assistant allows 5 in all).
MODEL_INFO_TIMEOUT_S = 2.0
#: Seconds an answer of Ollama's at /api/tags, /api/ps or /api/show is reused. Those reads are free of the rate
#: limit, and Ollama reads its model files for each: without this, a flood of them (or an app showing every model
#: on each page load) made Ollama read them as often, beside the model's own work.
MODEL_INFO_REUSE_S = 2.0


async def shared(rt: Runtime, key: tuple[str, ...], ask: Callable[[], Awaitable[Any]]) -> Any:
    """ask(), one call at a time per key: those asking meanwhile, or within MODEL_INFO_REUSE_S of its end, share its
    answer or its PiagentError (by rt.clock, the wall clock: a step back of it ends the reuse, rather than lengthen
    it). If the caller asking leaves, those waiting get UpstreamUnavailable, and the next one asks again."""
    kept = rt.model_info.get(key)
    if kept is None or (kept[1].done() and not kept[0] - MODEL_INFO_REUSE_S <= rt.clock() < kept[0]):
        outcome = asyncio.get_running_loop().create_future()  # (answer, None) or (None, failure): never unretrieved
        rt.model_info[key] = (math.inf, outcome)
        result: tuple[Any, PiagentError | None] | None = None
        try:
            try:
                result = (await ask(), None)
            except PiagentError as exc:
                result = (None, exc)
        finally:
            outcome.set_result(result or (None, UpstreamUnavailable("the upstream call was given up; ask again")))
            rt.model_info[key] = (0.0 if result is None else rt.clock() + MODEL_INFO_REUSE_S, outcome)
        kept = rt.model_info[key]
    answer, failure = await asyncio.shield(kept[1])  # shielded: one of them leaving does not cancel the others' answer
    if failure is not None:
        raise failure
    return answer


async def upstream_info(rt: Runtime, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """What Ollama says at `path` (GET, or POST `body`), shared per path and model; {} from another upstream, on a
    failure or in no time: the lists answer anyway."""
    provider = rt.provider
    if not isinstance(provider, OllamaProvider):
        return {}
    model = "" if body is None else str(body.get("model", ""))

    async def ask() -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MODEL_INFO_TIMEOUT_S):
                return await (provider.get_json(path) if body is None else provider.post_json(path, body, model))
        return {}

    with contextlib.suppress(PiagentError):
        return await shared(rt, (path, model), ask) or {}
    return {}


class Generation(Response):
    """A generation route's response: the exchange's whole life, written through its door (failures too, once begun)."""

    def __init__(self, x: Exchange, door: Door):
        self.x, self.door, self.started = x, door, False
        self.status_code, self.background, self.raw_headers = 200, None, []  # what FastAPI reads of a Response

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        x, door = self.x, self.door
        try:
            async with x, Relay(x.events(), receive, x.rt.drain.expired) as relay:
                await (self._stream(relay, send) if x.stream else self._whole(relay))
            if not x.stream:
                await JSONResponse(door.whole(x), headers=x.headers())(scope, receive, send)
        except ClientGone:
            x.fields["error"] = "client_gone"  # nothing more can be sent
        except PiagentError as exc:
            if not self.started:
                return await error_response(scope, exc)(scope, receive, send)
            x.fields["error"] = exc.code
            log.warning("stream ended by a failure after it began: %s: %s", exc.code, exc.message)
            tail = door.failure(exc)
            if tail is not None:  # else no closing chunk: the client must see this reply as incomplete
                with contextlib.suppress(ClientGone, ShuttingDown):  # it stopped reading too: the error stands
                    await self._write(send, tail)
                    await self._write(send, "", more=False)
        finally:
            x.rt.streams -= self.started

    async def _whole(self, relay: Relay) -> None:
        while (event := await relay.next(None)) is not END:
            if isinstance(event, (str, ToolEvent)):
                self.x.note(event)
        await self.x.save()

    async def _stream(self, relay: Relay, send: Callable) -> None:
        x, door = self.x, self.door
        while (event := await relay.next(door.ping_s)) is not END:
            if event is PING:
                out = door.ping
            elif isinstance(event, Queued):
                out = door.queued(event.position)
            elif isinstance(event, ToolEvent):
                out = door.tool(event)
            else:
                out = door.text(event, len(x.sent))
            if out:
                await self._write(send, out)
            if isinstance(event, (str, ToolEvent)):
                if relay.gone.done():  # the server drops what is sent after the client left: it was not given
                    raise ClientGone()
                x.note(event)  # after it was written: memory keeps what the client was given
        await x.save()  # before the client hears the reply is done
        await self._write(send, door.end(x))
        await self._write(send, "", more=False)

    async def _write(self, send: Callable, text: str, more: bool = True) -> None:
        if not self.started:
            headers = {"Content-Type": self.door.media_type, **STREAM_HEADERS, **self.x.headers()}
            await send({"type": "http.response.start", "status": 200, "headers": [
                *((k.lower().encode(), v.encode()) for k, v in headers.items()), *self.raw_headers]})
            self.started = True
            self.x.rt.streams += 1
        # a write waits WRITE_TIMEOUT_S for a client that stopped reading, and never past the shutdown grace
        drain = self.x.rt.drain
        deadline = asyncio.get_running_loop().time() + self.x.rt.config.write_timeout_s
        try:
            async with asyncio.timeout_at(min(deadline, drain.expires_at)) as limit:
                drain.writes.add(limit)
                try:
                    await send({"type": "http.response.body", "body": text.encode(), "more_body": more})
                finally:
                    drain.writes.discard(limit)
        except (TimeoutError, OSError):  # it stopped reading, or it is gone (the server's ClientDisconnected)
            if drain.expired.done():
                raise shutting_down() from None
            raise ClientGone() from None


# ---------------------------------------------------------------------------
# Operations: metrics, readiness, warm-up, the request log
# ---------------------------------------------------------------------------

#: Histogram bounds in seconds: a Pi answers in a fraction of a second or in minutes.
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
#: Error codes that mean the upstream failed (counted in piagent_upstream_errors_total).
UPSTREAM_CODES = frozenset({"upstream_unavailable", "model_not_found", "upstream_auth", "upstream_busy",
                            "upstream_timeout", "upstream_error", "request_refused"})


class Histogram:
    """A Prometheus histogram: counts per upper bound, sum and count."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S):
        self.bounds, self.counts = bounds, [0] * len(bounds)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                return

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append(f'{name}_bucket{{{labels}le="{bound:g}"}} {running}')
        out.append(f'{name}_bucket{{{labels}le="+Inf"}} {self.count}')
        tail = f"{{{labels.rstrip(',')}}}" if labels else ""
        return out + [f"{name}_sum{tail} {self.sum:.6f}", f"{name}_count{tail} {self.count}"]


def _label(value: Any) -> str:
    """Escape a label value: backslash, double quote and newline (the exposition format's rule)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _rss_bytes() -> int:
    """This process's resident memory, from /proc (Linux, so a Pi); 0 elsewhere."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class Metrics:
    """Counters and histograms piagent keeps for /metrics (one set per app; gauges are read when scraped)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.tokens = self.tool_calls = 0
        self.upstream_errors: dict[str, int] = {}

    def observe(self, route: str, record: Mapping[str, Any]) -> None:
        """Count one finished request (its record as RequestLog made it)."""
        key = (route, record["status"])
        self.requests[key] = self.requests.get(key, 0) + 1
        self.durations.setdefault(route, Histogram()).observe(record["duration_ms"] / 1000)
        if "ttft_ms" in record:
            self.ttft.observe(record["ttft_ms"] / 1000)
        self.tokens += record.get("tokens") or 0
        self.tool_calls += record.get("tool_calls") or 0
        if record.get("error") in UPSTREAM_CODES:
            self.upstream_errors[record["error"]] = self.upstream_errors.get(record["error"], 0) + 1

    def render(self, queued: int, generating: int, streams: int, conversations: int | None,
               mcp: Mapping[str, tuple[int, int]] = MappingProxyType({})) -> str:
        """The Prometheus text exposition format (version 0.0.4); `mcp`: server -> (calls, failures)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str] | int) -> None:
            samples = samples if isinstance(samples, list) else [f"{name} {samples}"]  # an int: its one sample
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

        family("piagent_requests_total", "counter", "Requests answered, by route and status.",
               [f'piagent_requests_total{{route="{_label(r)}",status="{s}"}} {n}'
                for (r, s), n in sorted(self.requests.items())])
        family("piagent_request_duration_seconds", "histogram", "Time to answer a request (to the end of a stream).",
               [line for r, h in sorted(self.durations.items())
                for line in h.lines("piagent_request_duration_seconds", f'route="{_label(r)}",')])
        family("piagent_time_to_first_token_seconds", "histogram", "Time from request to the first streamed token.",
               self.ttft.lines("piagent_time_to_first_token_seconds"))
        family("piagent_tokens_generated_total", "counter", "Text pieces (about tokens) sent to clients.", self.tokens)
        family("piagent_tool_calls_total", "counter", "Tool calls agents made (run or answered with an error).",
               self.tool_calls)
        family("piagent_upstream_errors_total", "counter", "Upstream failures, by error code.",
               [f'piagent_upstream_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.upstream_errors.items())])
        if mcp:
            family("piagent_mcp_calls_total", "counter", "Calls of MCP tools, by server.",
                   [f'piagent_mcp_calls_total{{server="{_label(n)}"}} {c}' for n, (c, _) in sorted(mcp.items())])
            family("piagent_mcp_failures_total", "counter",
                   "MCP calls that failed (the model read an error), by server.",
                   [f'piagent_mcp_failures_total{{server="{_label(n)}"}} {f}' for n, (_, f) in sorted(mcp.items())])
        family("piagent_queue_depth", "gauge", "Requests waiting for a generation slot.", queued)
        family("piagent_generations_active", "gauge", "Generations holding a slot.", generating)
        family("piagent_active_streams", "gauge", "Streamed responses in progress.", streams)
        if conversations is not None:
            family("piagent_conversations", "gauge", "Conversations kept in memory.", conversations)
        family("process_resident_memory_bytes", "gauge", "Resident memory of the piagent process.", _rss_bytes())
        return "\n".join(lines) + "\n"


class Warmup:
    """At start-up: find the upstream (said once if unreachable, then retried quietly: at boot the model server may
    start after piagent), then load each agent's model, so the first chat does not pay a cold load."""

    pause_s = 3.0

    def __init__(self) -> None:
        self.state = "off"  # off | warming | done (only with WARMUP)
        self.problems: list[str] = []
        self.task = Background("warmup")  # stop() it to cancel the warm-up

    def start(self, provider: Provider, models: list[str]) -> None:
        """Begin in the background, so that /health answers at once however slow the model server is."""
        self.state = "warming"
        self.task.start(self._run(provider, models))

    async def _run(self, provider: Provider, models: list[str]) -> None:
        try:
            for attempt in itertools.count():
                try:
                    await provider.probe()
                    break
                except UpstreamUnavailable as exc:
                    if attempt == 0:
                        log.warning("%s; piagent keeps trying in the background", exc.message)
                    await asyncio.sleep(self.pause_s)  # a pause between retries, not synchronisation
                except UpstreamFailure:
                    break  # reachable; what is wrong shows in the loads below and in /ready
            for model in models:
                try:
                    started = time.perf_counter()
                    await provider.warm(model)
                    log.info("model %s is loaded (%.1f s)", model, time.perf_counter() - started)
                except UpstreamFailure as exc:
                    self.problems.append(f"{model}: {exc.message}")
                    log.warning("could not load %s: %s", model, exc.message)
        finally:
            self.state = "done"


async def readiness(rt: Runtime) -> tuple[bool, dict[str, Any]]:
    """(ready, body) for /ready: upstream, models, memory, MCP servers, warm-up, and no generation stalled."""
    checks: dict[str, dict[str, Any]] = {}
    config, provider = rt.config, rt.provider
    try:
        description, available = await shared(rt, ("probe",), provider.probe)  # free of the rate limit, as a poll
        checks["upstream"] = {"ok": True, "detail": f"{description} at {provider.base_url}"}
        missing = sorted({a.model for a in config.agents if not has_model(a.model, available)})
        fix = "; ".join(missing_model(provider, m, available) for m in missing)
        checks["models"] = {"ok": not missing, "detail": fix or "all agents' models are available"}
    except UpstreamFailure as exc:
        checks["upstream"] = {"ok": False, "detail": exc.message}
    if rt.store is not None:  # the store's own check is cheap: it rate-limits its write probe
        try:
            with storage_errors():
                await rt.store.check()
            checks["memory"] = {"ok": True, "detail": "the memory store reads and writes"}
        except MemoryUnavailable as exc:
            checks["memory"] = {"ok": False, "detail": exc.message}
    stalled = rt.gate.stalled(config.upstream_timeout_s)
    if stalled:
        checks["generation"] = {"ok": False, "detail": f"{stalled} generation(s) hold the model with no word from "
                                f"{provider.label} for over {config.upstream_timeout_s:g} s; restart piagent "
                                f"(sudo systemctl restart piagent) if this lasts"}
    for name, source in rt.toolbox.sources.items():  # a server that is down fails its own check, and only it
        ok, detail = source.status()
        checks[f"mcp:{name}"] = {"ok": ok, "detail": detail}
    warmup = rt.warmup
    if warmup.state != "off":
        checks["warmup"] = {"ok": warmup.state == "done" and not warmup.problems,
                            "detail": "loading models" if warmup.state == "warming" else
                            "; ".join(warmup.problems) or "models loaded"}
    ready = all(c["ok"] for c in checks.values())
    only_warming = not ready and all(c["ok"] for k, c in checks.items() if k != "warmup")
    status = "ready" if ready else "warming" if only_warming and warmup.state == "warming" else "not_ready"
    return ready, {"status": status, "checks": checks, "warnings": startup_warnings(config)}


#: The fields of a request record, in the order a text line shows them (after method, path, status, duration).
LOG_RECORD_FIELDS = ("request_id", "client", "key", "agent", "model", "provider", "conversation_id",
                     "queue_wait_ms", "ttft_ms", "tokens", "tokens_per_s", "prompt_tokens", "history_truncated",
                     "tool_calls", "saved", "capped", "memory_error", "error", "prompt")


class AcceptErrors:
    """The loop's exception handler: a failed accept() (out of fds) is logged once a minute, not once per attempt with
    a traceback, which would fill a Pi's SD card; anything else goes to asyncio's own handler."""

    interval_s = 60.0

    def __init__(self) -> None:
        self.last, self.since = -math.inf, 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if "accept" not in context.get("message", ""):
            return loop.default_exception_handler(context)
        self.since += 1
        if time.monotonic() - self.last >= self.interval_s:
            log.error("cannot accept connections (%s; %d times since the last report): raise LimitNOFILE in the "
                      "unit or lower MAX_CONNECTIONS", context.get("exception"), self.since)
            self.last, self.since = time.monotonic(), 0


class RequestLog:
    """The outermost middleware: one INFO record per request (its `request` dict for TextLog and JsonLog) when its
    response ends, and the one place a bug becomes a 500: logged once, and nothing re-raised to the server."""

    def __init__(self, app: Callable, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        fields: dict[str, Any] = {"start": time.perf_counter(), "status": None}
        scope[LOG_FIELDS_KEY] = fields

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                fields["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except ClientGone:  # it left before its answer (mid-body, or waiting for a slot): logged as 499
            fields["error"] = "client_gone"
        except asyncio.CancelledError:
            if not asyncio.current_task().cancelling():  # not this request's own cancellation: a bug, shown
                raise
            # uvicorn stopped waiting (its graceful-shutdown limit, with WORKERS > 1; a forced exit): everything the
            # request held was released on the way out, and a traceback would say nothing more
            if fields["status"] is None:  # else uvicorn answers a plain-text 500 itself
                await error_response(scope, shutting_down())(scope, receive, send_and_note)
            fields["error"] = "shutting_down"
        except Exception as exc:  # a bug: whatever the routes and streams did not turn into a response
            log.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=exc)
            if fields["status"] is None:
                bug = PiagentError("piagent hit a bug; see its log")
                await error_response(scope, bug)(scope, receive, send_and_note)
            fields["error"] = "internal_error"  # a stream that had begun is cut
        finally:
            record = request_record(scope["method"], scope["path"], fields)
            log.info("%s %s %s", scope["method"], scope["path"], record["status"], extra={"request": record})
            route = scope.get("route")  # the matched template, so labels stay few whatever the paths
            self.metrics.observe(getattr(route, "path", "other"), record)


def request_record(method: str, path: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The finished request as a flat dict: method, path, status, duration_ms, then the fields that are set."""
    duration_ms = round((time.perf_counter() - fields["start"]) * 1000)
    record = {"method": method, "path": path, "status": fields["status"] or 499, "duration_ms": duration_ms}
    record.update((k, fields[k]) for k in LOG_RECORD_FIELDS if fields.get(k) is not None)
    return record


#: What a text log value may not hold bare (it is then written as a JSON string): one record stays one line.
UNSAFE_IN_LOG = r'[\s"=\\]|[^\x21-\x7e]'


def text_log_value(value: Any) -> Any:
    """A value as a text log writes it: as a JSON string if bare it could end the line or read as another field."""
    return json.dumps(value) if isinstance(value, str) and re.search(UNSAFE_IN_LOG, value) else value


class TextLog(logging.Formatter):
    """Human lines. Example: ... INFO piagent: POST /chat 200 1234ms request_id=ab.. agent=general tokens=40"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        """One line per record, whatever a client or an upstream put in it (a path, an error text)."""
        request = getattr(record, "request", None)
        if request is not None:
            pairs = " ".join(f"{k}={text_log_value(v)}" for k, v in request.items() if k in LOG_RECORD_FIELDS)
            head = (f"{text_log_value(request['method'])} {text_log_value(request['path'])} {request['status']} "
                    f"{request['duration_ms']}ms")
            record.message = f"{head} {pairs}"
        else:
            record.message = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m[0]):02x}", record.message)
        return super().formatMessage(record)


class JsonLog(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a request's fields at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "request", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


# ---------------------------------------------------------------------------
# API: request/response models, error handlers, create_app(config, ...), routes
# ---------------------------------------------------------------------------

#: What a client may send as conversation_id (also safe in a header and a log line).
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"


class ChatRequest(BaseModel):
    """POST /chat body."""

    message: str = Field(min_length=1, pattern=r"\S", description="the user's message; not blank")
    agent: str = Field("general", max_length=64)
    stream: bool = False
    conversation_id: str | None = Field(None, pattern=CONVERSATION_ID_PATTERN)


class TextPart(BaseModel):
    """One part of an OpenAI message's content list; only text is supported."""

    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field("{}", max_length=65_536)  # JSON text, as OpenAI sends it


class ClientToolCall(BaseModel):
    """A tool call in an assistant message a client sends back (its own tools' calls)."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: CalledFunction


class OpenAIMessage(BaseModel):
    """One message of an OpenAI chat request."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ClientToolCall] | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)

    @field_validator("content", mode="before")
    @classmethod
    def text_only(cls, value: Any) -> Any:
        """An image part is refused in words, not as the two shapes content may have (a string, or text parts)."""
        other = [part["type"] for part in (value if isinstance(value, list) else ())
                 if isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] != "text"]
        if other:
            raise ValueError(f"has a part of type {other[0][:40]!r}; piagent's agents read text only")
        return value

    def text(self) -> str:
        return "".join(part.text for part in self.content) if isinstance(self.content, list) else self.content or ""

    def as_message(self) -> Message:
        """This message as piagent passes it upstream (OpenAI's shape; see Message)."""
        if self.tool_calls:
            return tool_call_message(self.text(), [call.model_dump() for call in self.tool_calls])
        if self.role == "tool":
            return {"role": "tool", "tool_call_id": self.tool_call_id or "", "content": self.text()}
        return {"role": self.role, "content": self.text()}


class FunctionSpec(BaseModel):
    """A client tool's function: passed to the model as sent (fields piagent does not know included)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(None, max_length=4000)
    parameters: dict[str, Any] | None = None


class ClientTool(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["function"]
    function: FunctionSpec


class ChosenFunction(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class ToolChoice(BaseModel):
    """A client's tool_choice naming one of its functions."""

    type: Literal["function"]
    function: ChosenFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class SchemaFormat(BaseModel):
    """response_format.json_schema: its schema is what the reply must fit (Ollama's `format`)."""

    model_config = ConfigDict(extra="allow")  # name, strict, ...: OpenAI's, not Ollama's
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(BaseModel):
    """A client's response_format: text, any JSON object, or JSON that fits json_schema.schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: SchemaFormat | None = None


#: A stop sequence: the reply ends before it (Ollama's options.stop).
StopText = Annotated[str, Field(min_length=1, max_length=256)]


class OpenAIChatRequest(BaseModel):
    """POST /v1/chat/completions body (the fields piagent uses; others are ignored)."""

    model: str = Field(min_length=1, max_length=64)
    messages: list[OpenAIMessage] = Field(min_length=1, max_length=1000)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # numbers strictly, as OpenAI takes them: true, "7" or 4096.0 are a 422, not quietly 1, 7 or 4096
    n: int | None = Field(None, strict=True, description="piagent gives one choice: leave n out, or send 1")
    max_tokens: int | None = Field(None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(None, ge=0, le=2, strict=True)
    top_p: float | None = Field(None, ge=0, le=1, strict=True)
    seed: int | None = Field(None, ge=-2**63, lt=2**63, strict=True)
    stop: Annotated[list[StopText], Field(max_length=16, description="a string, or up to 16")] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, strict=True)
    response_format: ResponseFormat | None = None
    tools: list[ClientTool] | None = Field(None, max_length=64,
                                           description="the client's own tools: their calls come back to the client")
    tool_choice: Literal["none", "auto", "required"] | ToolChoice | None = Field(
        None, description="passed on with `tools` to OpenAI-compatible upstreams; Ollama's API has no such field")

    @field_validator("n")
    @classmethod
    def one_choice(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("piagent gives one choice; leave n out, or send 1")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def stop_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else None if value == [] else value


# Response shapes, for the OpenAPI schema (/openapi.json) and the fuzz tests that read it.
class ErrorDetail(BaseModel): code: str; message: str  # noqa: E701, E702
class ErrorBody(BaseModel): error: ErrorDetail  # noqa: E701
class OpenAIErrorDetail(BaseModel): message: str; type: str; param: str | None = None; code: str | None = None  # noqa
class OpenAIErrorBody(BaseModel): error: OpenAIErrorDetail  # noqa: E701
class AgentList(BaseModel): agents: list[str]; models: dict[str, str]  # noqa: E701, E702
class Health(BaseModel): status: Literal["ok"]  # noqa: E701
class ModelCard(BaseModel): id: str; object: Literal["model"]; created: int; owned_by: str  # noqa: E701, E702
class ModelList(BaseModel): object: Literal["list"]; data: list[ModelCard]  # noqa: E701, E702
class ToolOut(BaseModel): name: str; arguments: Any; result: str | None = None; error: str | None = None  # noqa
class TurnOut(BaseModel): user: str; assistant: str; created_at: str  # noqa: E701, E702
class ConversationOut(BaseModel): conversation_id: str; agent: str; turns: list[TurnOut]  # noqa: E701, E702
class ConversationSummary(BaseModel): conversation_id: str; agent: str; last_used: str; preview: str  # noqa


class ChatResponse(BaseModel):
    """POST /chat reply when not streaming (`tools` only when the agent used any)."""

    reply: str
    conversation_id: str
    model: str | None = None
    provider: str | None = None
    tools: list[ToolOut] | None = None


class ChatCompletion(BaseModel):
    """A non-streamed /v1/chat/completions reply."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, int] | None = None


class ConversationPage(BaseModel):
    """GET /conversations: newest first; pass `next` as `cursor` for the next page (safe to paste into a URL)."""

    conversations: list[ConversationSummary]
    next: str | None = None
    next_before: str | None = None  # the older cursor, an ISO time, for `before`


def documented(errors: type[BaseModel], statuses: tuple[int, ...],
               streams: tuple[str, ...] = ()) -> dict[int | str, Any]:
    """OpenAPI `responses` for a route: its error statuses, and the media types its 200 may stream besides JSON.
    The error model is named once and referred to after: FastAPI builds a validator for each `model` entry."""
    ref = {"$ref": f"#/components/schemas/{errors.__name__}"}
    responses: dict[int | str, Any] = {status: {"content": {"application/json": {"schema": dict(ref)}}}
                                       for status in statuses} | {statuses[0]: {"model": errors}}
    if streams:
        responses[200] = {"content": {media: {"schema": {"type": "string"}} for media in streams}}
    return responses


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """A route's `openapi_extra` naming `model` as its JSON body, which the route reads with read_body (FastAPI would
    parse and validate a body parameter again); openapi_with_bodies puts the model among the components."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"content": {"application/json": {"schema": ref}}, "required": True}}


def openapi_with_bodies(app: FastAPI, models: tuple[type[BaseModel], ...]) -> dict[str, Any]:
    """FastAPI's OpenAPI document, with the `models` of body_doc among its components."""
    if app.openapi_schema is None:
        schemas = FastAPI.openapi(app)["components"]["schemas"]
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, part in {**schema.pop("$defs", {}), model.__name__: schema}.items():
                schemas.setdefault(name, part)
    return app.openapi_schema


#: Statuses any guarded route may answer with, besides its own.
GUARD_STATUSES = (401, 413, 429)
#: Statuses a generation may end with (see the README's error table).
GENERATION_STATUSES = (*GUARD_STATUSES, 404, 422, 502, 503, 504)


def validation_problem(error: Mapping[str, Any]) -> str:
    """One of FastAPI's validation errors, naming the field. Example: single quotes -> "body is not JSON at..."."""
    if error["type"] == "json_invalid":  # FastAPI's reader gives the character; pydantic's says where in its text
        at = f" at character {error['loc'][-1]}" if isinstance(error["loc"][-1], int) else ""
        return f"body is not JSON{at}: {error.get('ctx', {}).get('error', error['msg'])}"
    message = str(error.get("ctx", {}).get("error", error["msg"])) if error["type"] == "value_error" else error["msg"]
    return f"{'.'.join(str(p) for p in error['loc'][1:]) or 'body'}: {message}"


M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, model: type[M], any_type: bool = False) -> M:
    """The body as `model`, validated from the JSON Guards parsed (a body is parsed once), with FastAPI's rules and
    errors: JSON only with a JSON Content-Type. With `any_type`, JSON whatever the type, and the errors of pydantic's
    JSON reader, as Ollama reads a body (its docs use curl -d)."""
    json_type = json_media_type(request.headers.get("content-type", ""))
    try:
        if BODY_KEY in request.scope and (json_type or any_type):
            try:
                return model.model_validate(request.scope[BODY_KEY], from_attributes=not any_type)
            except ValidationError:
                if not any_type:
                    raise
            raw = json.dumps(request.scope[BODY_KEY]).encode()  # as UTF-8, for pydantic's JSON reader to word it
        else:
            raw = await request.body()
        if any_type:
            return model.model_validate_json(raw or b"null")
        if not raw:
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
        if json_type:
            json.loads(raw)  # Guards found it is not JSON: this says where, or that it is not UTF-8
        return model.model_validate(raw, from_attributes=True)  # not an object: the error says so
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "ctx": {"error": exc.msg}}]) from None
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    except UnicodeDecodeError:
        raise InvalidRequest("body: There was an error parsing the body (send UTF-8 JSON)") from None


class DirectRoute(APIRoute):
    """A route whose endpoint takes the Request alone and returns a Response (it reads its body with read_body):
    FastAPI documents it, and calls it without its dependency machinery, which is ~0.1 ms of a generation's TTFT."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        d = self.dependant  # what FastAPI would solve, and this route would silently not
        if d.dependencies or d.path_params or d.query_params or d.header_params or d.cookie_params or d.body_params:
            raise TypeError(f"{self.path}: a DirectRoute's endpoint takes the Request alone, and no dependencies")
        return self.endpoint


def post(app: FastAPI, path: str, **options: Any) -> Callable[[Callable], Callable]:
    """@app.post(path, ...) for a DirectRoute."""

    def register(endpoint: Callable) -> Callable:
        app.router.add_api_route(path, endpoint, methods=["POST"], route_class_override=DirectRoute, **options)
        return endpoint

    return register


def install_error_handlers(app: FastAPI) -> None:
    """Route FastAPI's own errors through error_response too (bugs are RequestLog's: they become 500s there)."""

    @app.exception_handler(PiagentError)
    async def piagent_error(request: Request, exc: PiagentError) -> JSONResponse:
        return error_response(request.scope, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(validation_problem(e) for e in exc.errors())
        if "json" not in request.headers.get("content-type", "") and any(e["loc"] == ("body",) for e in exc.errors()):
            problems += " (send JSON with the header Content-Type: application/json, as curl's -H does)"
        return error_response(request.scope, InvalidRequest(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = {404: f"there is nothing at {request.url.path}; the API is in the README (POST /chat, ...)",
                  405: f"{request.method} is not allowed on {request.url.path}; use "
                       f"{(exc.headers or {}).get('Allow', 'another method')}"}.get(exc.status_code, str(exc.detail))
        error = PiagentError(detail, exc.headers)
        error.status = exc.status_code
        error.code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(request.scope, error)


def create_app(config: Config, *, transport: httpx.AsyncBaseTransport | None = None,
               tools: Mapping[str, Tool] | None = None, clock: Callable[[], float] | None = None,
               store: MemoryStore | None = None) -> FastAPI:
    """Build a piagent app for `config` (nothing starts until its lifespan); tests may pass an httpx `transport`,
    their own `tools`, a `clock` (memory TTLs, rate limits) and a `store`. ConfigError if an agent's tool is unknown."""
    clock = clock or time.time
    servers = tuple(McpServer(s, max_result_chars=config.mcp_max_result_chars) for s in config.mcp_servers)
    toolbox = Toolbox(TOOLS if tools is None else tools, servers)
    toolbox.check(config)
    timeout = httpx.Timeout(config.upstream_timeout_s, connect=config.upstream_connect_timeout_s)
    client = UpstreamClient(upstream_url(config), timeout=timeout, transport=transport)
    if store is None and config.enable_memory:
        store = MEMORY_STORES[config.memory_backend](config, clock)
    buckets = TokenBuckets(config.rate_limit_per_min, clock) if config.rate_limit_per_min else None
    rt = Runtime(config, PROVIDERS[config.provider](client, config), store, toolbox,
                 Gate(config.max_concurrent, config.max_queue), Drain(config.shutdown_grace_s), buckets, Metrics(),
                 Warmup(), clock)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            if rt.store is not None:
                await rt.store.open()
            rt.drain.start()
            loop, quiet = asyncio.get_running_loop(), AcceptErrors()
            handler, _ = loop.get_exception_handler(), loop.set_exception_handler(quiet)
            if config.warmup:
                rt.warmup.start(rt.provider, list(dict.fromkeys(a.model for a in config.agents)))
            for server in servers:  # each connects in the background: a slow one never delays /health
                await server.start()
            try:
                yield
            finally:
                loop.set_exception_handler(handler)
                await asyncio.gather(*(server.stop() for server in servers))  # no child outlives piagent
                await rt.warmup.task.stop()
                if rt.store is not None:
                    await rt.store.close()

    app = FastAPI(title="piagent", lifespan=lifespan, docs_url=None, redoc_url=None,
                  telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.runtime = rt
    install_error_handlers(app)
    for add in (add_routes, add_openai_routes, add_ollama_model_routes, add_ollama_routes, add_conversation_routes):
        add(app, rt)
    add_page_route(app, config)  # the one forward reference: the page is data, kept at the end of the file
    app.openapi = lambda: openapi_with_bodies(app, (ChatRequest, OpenAIChatRequest))  # the bodies of body_doc
    # added innermost first: RequestLog wraps CORS, which wraps Guards (so preflights need no key)
    app.add_middleware(Guards, config=config, buckets=buckets, clock=clock)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_credentials=False,
                           allow_methods=["GET", "POST", "DELETE"], max_age=600,
                           allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Conversation-Id",
                                          "X-Request-Id"],
                           expose_headers=["X-Conversation-Id", "X-Request-Id", "Retry-After",
                                           "X-RateLimit-Remaining", "X-Memory-Saved"])
    app.add_middleware(RequestLog, metrics=rt.metrics)
    return app


def find_agent(config: Config, name: str) -> Agent:
    """The agent called `name`, or UnknownAgent listing the ones there are."""
    agent = config.agent(name)
    if agent is None:
        raise UnknownAgent(f"no agent named {name!r}; available: {', '.join(a.name for a in config.agents)}")
    return agent


def check_length(config: Config, text: str) -> None:
    """MessageTooLong when `text` is over MAX_MESSAGE_CHARS."""
    if len(text) > config.max_message_chars:
        raise MessageTooLong(f"a message may be at most {config.max_message_chars} characters (MAX_MESSAGE_CHARS); "
                             f"this one has {len(text)}")


def add_routes(app: FastAPI, rt: Runtime) -> None:
    """Attach /health, /ready, /metrics, /agents and /chat to `app`."""
    config = rt.config
    defaults = Sampling(config.max_tokens, config.temperature)

    @app.get("/health", response_model=Health, responses=documented(ErrorBody, (413,)))
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", responses={**documented(ErrorBody, GUARD_STATUSES), 503: {"description": "not ready"}})
    async def ready() -> JSONResponse:
        is_ready, body = await readiness(rt)
        return JSONResponse(body, 200 if is_ready else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        try:  # the metrics never depend on the memory being up
            conversations = await rt.store.count() if rt.store is not None else None
        except PiagentError:
            conversations = None
        mcp = {name: (s.calls, s.failures) for name, s in rt.toolbox.sources.items()}
        text = rt.metrics.render(rt.gate.queued, rt.gate.active, rt.streams, conversations, mcp)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/agents", response_model=AgentList, responses=documented(ErrorBody, GUARD_STATUSES))
    async def agents() -> dict[str, Any]:
        return {"agents": [a.name for a in config.agents], "models": {a.name: a.model for a in config.agents}}

    @post(app, "/chat", response_model=ChatResponse, openapi_extra=body_doc(ChatRequest), responses=documented(
        ErrorBody, GENERATION_STATUSES, ("text/plain", "text/event-stream")))
    async def chat(request: Request) -> Generation:
        body = await read_body(request, ChatRequest)
        agent = find_agent(config, body.agent)
        check_length(config, body.message)
        x = Exchange(rt, agent, Ask([], None, body.message), defaults, body.conversation_id or uuid.uuid4().hex,
                     body.stream, request.scope[LOG_FIELDS_KEY])
        plain = body.stream and "text/event-stream" not in request.headers.get("accept", "")
        return Generation(x, Door() if plain else ChatDoor(config.sse_ping_s))


def split_openai_messages(body: OpenAIChatRequest) -> Ask:
    """An OpenAI request as an Ask: system messages, history, the last user message, the tool traffic after it."""
    messages = body.messages
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    tail = messages[last + 1:]
    if last < 0 or not messages[last].text().strip():
        raise InvalidRequest("the messages must include a non-empty user message")
    if tail and (tail[-1].role != "tool" or any(m.role not in ("assistant", "tool") for m in tail)):
        raise InvalidRequest("the last message must be a user message, or the results (role tool) of the "
                             "assistant's tool calls after it")
    before = messages[:last]
    system = [{"role": "system", "content": m.text()} for m in before if m.role in ("system", "developer")]
    history = [m.as_message() for m in before if m.role not in ("system", "developer")]
    tools = tuple(tool.model_dump(exclude_unset=True) for tool in body.tools or ())
    choice = body.tool_choice.model_dump() if isinstance(body.tool_choice, BaseModel) else body.tool_choice
    return Ask(system, history, messages[last].text(), tuple(m.as_message() for m in tail), tools, choice)


def openai_sampling(config: Config, body: OpenAIChatRequest) -> Sampling:
    """A /v1 request's sampling in Ollama's terms, as /api's: max_tokens at most MAX_TOKENS, stop, format, ..."""
    options = {name: value for name in OPENAI_SAME_OPTIONS if (value := getattr(body, name)) is not None}
    extra: dict[str, Any] = {"options": options}
    form = body.response_format
    if form and form.type == "json_schema":
        if form.json_schema is None:
            raise InvalidRequest("response_format.json_schema: send {\"name\": ..., \"schema\": {...}} with "
                                 "type json_schema, or use type json_object")
        # the schema is Ollama's format; json_schema goes whole to an OpenAI upstream (its name and strict)
        extra.update(format=form.json_schema.schema_, json_schema=form.json_schema.model_dump(by_alias=True))
    elif form and form.type == "json_object":
        extra["format"] = "json"
    asked = body.max_completion_tokens or body.max_tokens or config.max_tokens
    return Sampling(min(asked, config.max_tokens), config.temperature if body.temperature is None
                    else body.temperature, extra)


def history_exchange(rt: Runtime, agent: Agent, ask: Ask, sampling: Sampling, stream: bool,
                     request: Request) -> Exchange:
    """The exchange of a door whose client sends the history (/v1, /api); memory only with X-Conversation-Id."""
    config = rt.config
    check_length(config, ask.message)  # what a person typed: an app's system prompt and tool results may be long
    conversation_id = request.headers.get("x-conversation-id")
    if conversation_id is not None and not re.fullmatch(CONVERSATION_ID_PATTERN, conversation_id):
        raise InvalidRequest(f"X-Conversation-Id must match {CONVERSATION_ID_PATTERN}")
    if conversation_id is not None and (ask.tools or ask.tail):
        raise InvalidRequest("X-Conversation-Id cannot be used with the client's own tools; send the whole "
                             "history in messages instead")
    if ask.tools and config.provider == "ollama" and config.ollama_api == "generate":
        raise InvalidRequest("tools need OLLAMA_API=chat on this piagent")
    return Exchange(rt, agent, ask._replace(history=None) if conversation_id else ask, sampling, conversation_id,
                    stream, request.scope[LOG_FIELDS_KEY])


def add_openai_routes(app: FastAPI, rt: Runtime) -> None:
    """Attach the OpenAI-compatible front door: /v1/models and /v1/chat/completions (agents are models)."""
    config, created = rt.config, int(time.time())

    @app.get("/v1/models", response_model=ModelList, responses=documented(OpenAIErrorBody, GUARD_STATUSES))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": a.name, "object": "model", "created": created,
                                            "owned_by": "piagent"} for a in config.agents]}

    @post(app, "/v1/chat/completions", response_model=ChatCompletion, openapi_extra=body_doc(OpenAIChatRequest),
          responses=documented(OpenAIErrorBody, GENERATION_STATUSES, ("text/event-stream",)))
    async def completions(request: Request) -> Generation:
        body = await read_body(request, OpenAIChatRequest)
        agent = find_agent(config, body.model)
        x = history_exchange(rt, agent, split_openai_messages(body), openai_sampling(config, body), body.stream,
                             request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return Generation(x, OpenAIDoor(config.sse_ping_s, agent.name, include_usage))


class OllamaFunction(BaseModel):
    """The function of a tool call in Ollama's dialect."""

    name: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # an object in Ollama's dialect


class OllamaToolCall(BaseModel):
    """A tool call in an assistant message an Ollama client sends back (the id is optional there)."""

    id: str | None = Field(None, max_length=128)
    function: OllamaFunction


class OllamaFunctionSpec(FunctionSpec):
    """A client tool's function in Ollama's dialect: any name a call may carry back (MCP bridges send "fs.read")."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None


class OllamaTool(ClientTool):
    """A client tool as Ollama takes it: `type` may be left out; as many as MAX_BODY_BYTES holds."""

    function: OllamaFunctionSpec

    @model_validator(mode="before")
    @classmethod
    def _function_by_default(cls, data: Any) -> Any:  # kept when dumped: an OpenAI upstream needs it
        return {**data, "type": "function"} if isinstance(data, dict) and data.get("type") is None else data


class GoBody(BaseModel):
    """A body read as Ollama's Go server reads it: a field sent as null is a field not sent."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class OllamaMessage(GoBody):
    """One message of an Ollama chat request (the libraries leave out an empty content)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = Field(None, max_length=64)
    tool_name: str | None = Field(None, max_length=64)
    tool_call_id: str | None = Field(None, max_length=128)

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, role: Any) -> Any:  # Ollama lower-cases it: "User" is a user
        return role.lower() if isinstance(role, str) else role


class OllamaAsk(GoBody):
    """What /api/chat and /api/generate share (fields piagent does not use, such as truncate, are ignored)."""

    model: str = Field(min_length=1, max_length=128, description="an agent: <agent> or <agent>:latest")
    stream: bool = True  # Ollama streams unless told not to
    format: Literal["json", ""] | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: int | float | str | None = None
    think: bool | Literal["low", "medium", "high", "max"] | None = None


class OllamaChatRequest(OllamaAsk):
    """POST /api/chat body."""

    messages: list[OllamaMessage] = Field(default_factory=list, max_length=1000)
    tools: list[OllamaTool] | None = None


class OllamaGenerateRequest(OllamaAsk):
    """POST /api/generate body (context is ignored; suffix, raw and template are refused, see its route)."""

    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    suffix: str = ""
    raw: bool = False
    template: str = ""


class OllamaShowRequest(GoBody):
    """POST /api/show body."""

    model: str = Field("", max_length=128)
    name: str = Field("", max_length=128)  # the old name of `model`


class OllamaEmbedRequest(GoBody):
    """POST /api/embed; /api/embeddings (the older one) sends `prompt` instead of `input`."""

    model: str = Field(min_length=1, max_length=128)
    input: str | list[str] = Field(default_factory=list)  # as many, as long as MAX_BODY_BYTES allows, as Ollama
    prompt: str | None = None
    truncate: bool | None = None
    dimensions: int | None = Field(None, ge=1)
    keep_alive: int | float | str | None = None
    options: dict[str, Any] | None = None


#: What /api/tags and /api/show say of a model the upstream told nothing about.
OLLAMA_DETAILS = {"parent_model": "", "format": "gguf", "family": "unknown", "families": ["unknown"],
                  "parameter_size": "", "quantization_level": ""}
#: Ollama's model management, which piagent refuses: (path, methods).
OLLAMA_MANAGEMENT = (("/api/pull", ["POST"]), ("/api/push", ["POST"]), ("/api/create", ["POST"]),
                     ("/api/copy", ["POST"]), ("/api/delete", ["DELETE"]),
                     ("/api/blobs/{digest}", ["GET", "POST"]))  # GET: Guards answer a HEAD as a GET
def ollama_agent(config: Config, model: str) -> Agent:
    """The agent an Ollama client names as `model` (`<agent>` or `<agent>:latest`), or Ollama's 404."""
    name, _, tag = model.partition(":")
    agent = config.agent(name) if tag in ("", "latest") else None
    if agent is None:
        raise UnknownAgent(f"model '{model}' not found")
    return agent


def ollama_sampling(config: Config, body: OllamaAsk) -> Sampling:
    """The client's options: num_predict at most MAX_TOKENS, its temperature, the rest for the provider (`extra`)."""
    options = dict(body.options or {})
    asked, heat = options.get("num_predict"), options.get("temperature")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    max_tokens = min(int(asked), config.max_tokens) if number(asked) and asked >= 1 else config.max_tokens
    extra = {k: v for k, v in body.model_dump(include=set(OLLAMA_PASSED_FIELDS)).items() if v not in (None, "")}
    try:
        temperature = float(heat) if number(heat) else config.temperature
    except OverflowError:  # an integer past any float
        raise InvalidRequest(f"options.temperature: {str(heat)[:12]}... is too large; send a number such as "
                             f"{config.temperature:g}") from None
    return Sampling(max_tokens, temperature, {**extra, "options": options})


def ollama_as_openai(messages: list[OllamaMessage]) -> list[OpenAIMessage]:
    """Ollama chat messages as /v1's: a call without an id gets one, a result without one the first open call's."""
    out, open_calls = [], []  # open_calls: (id, name) of calls not answered yet
    for m in messages:
        if m.images:
            raise InvalidRequest("piagent's agents read text only: send no images")
        calls = []
        for call in m.tool_calls or []:
            arguments = call.function.arguments
            calls.append({"id": call.id or new_call_id(), "function": {"name": call.function.name, "arguments":
                          arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)}})
            open_calls.append((calls[-1]["id"], call.function.name))
        answered = m.tool_call_id
        if m.role == "tool" and not answered and open_calls:
            answered = next((i for i, name in open_calls if name == m.tool_name), open_calls[0][0])
        open_calls = [c for c in open_calls if c[0] != answered]
        try:
            out.append(OpenAIMessage(role=m.role, content=m.content, tool_calls=calls or None,
                                     tool_call_id=answered if m.role == "tool" else None))
        except ValueError as exc:  # pydantic's ValidationError
            raise InvalidRequest(f"messages: {exc.errors()[0]['msg']}") from None
    return out


def ollama_generation(rt: Runtime, agent: Agent, body: OllamaAsk, ask: Ask, request: Request) -> Generation:
    """The exchange of an Ollama chat or generate request, through the Ollama door."""
    x = history_exchange(rt, agent, ask, ollama_sampling(rt.config, body), body.stream, request)
    return Generation(x, OllamaDoor(body.model, isinstance(body, OllamaChatRequest)))


def ollama_loaded(body: OllamaAsk, chat: bool) -> JSONResponse:
    """Done at once, for a model load or unload: that is the operator's (WARMUP, OLLAMA_KEEP_ALIVE), not a client's."""
    reason = "unload" if body.keep_alive in (0, "0", "0s", "0m") else "load"
    return JSONResponse(OllamaDoor(body.model, chat).reply("", done=True, done_reason=reason))


def ollama_model(agent: Agent, upstream: Mapping[str, Any], modified_at: str) -> dict[str, Any]:
    """An agent as an /api/tags entry: its model's size and details when the upstream told them; its own digest."""
    told = upstream.get("details") if isinstance(upstream.get("details"), dict) else {}
    details = {**OLLAMA_DETAILS, **{k: v for k, v in told.items() if k in OLLAMA_DETAILS}}
    size = upstream.get("size") if isinstance(upstream.get("size"), int) else 0
    seed = json.dumps([agent.name, agent.model, agent.system, agent.tools, upstream.get("digest")])
    return {"name": f"{agent.name}:latest", "model": f"{agent.name}:latest", "modified_at": modified_at,
            "size": size, "digest": hashlib.sha256(seed.encode()).hexdigest(), "details": details}


def upstream_models(listed: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Ollama's model list ({"models": [...]}) by name, each also under its name without ":latest"."""
    found = {}
    entries = listed.get("models")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            found[entry["name"]] = found[entry["name"].removesuffix(":latest")] = entry
    return found


def embed_fields(config: Config, body: OllamaEmbedRequest) -> dict[str, Any]:
    """The client's own /api/embed fields for Ollama (truncate, dimensions, ...), num_ctx at most CTX_TOKENS."""
    fields = body.model_dump(include={"truncate", "dimensions", "keep_alive", "options"}, exclude_none=True)
    if "num_ctx" in fields.get("options", {}):
        fields["options"]["num_ctx"] = context_tokens(config, fields["options"]["num_ctx"])
    return fields


async def refuse_model_management(request: Request) -> Response:
    """Pull, push, create, copy, delete and blobs: refused in Ollama's shape, saying what to do instead."""
    try:
        sent = json.loads(await request.body() or b"{}")
        model = (sent.get("model") or sent.get("name") or sent.get("source")) if isinstance(sent, dict) else None
    except ValueError:
        model = None
    model = model if isinstance(model, str) else None  # a name, or no name: never an object's repr
    config = request.app.state.runtime.config
    agent = config.agent(str(model or "").partition(":")[0])  # an agent's name: its model is what to pull
    real = agent.model if agent else model or "<model>"
    how = f"run `ollama pull {real}`" if config.provider == "ollama" else f"load {real} in the model server"
    raise ModelsNotManaged(f"piagent does not manage models: on the Pi, {how} and set "
                           f"{PROVIDERS[config.provider].model_prefix}<AGENT>; piagent's models are its agents "
                           f"({', '.join(a.name for a in config.agents)})")


def add_ollama_routes(app: FastAPI, rt: Runtime) -> None:
    """Attach Ollama's API (/api/...), its agents as models; out of /openapi.json: Ollama documents its own API."""
    config, hidden = rt.config, {"include_in_schema": False}

    @post(app, "/api/chat", **hidden)
    async def ollama_chat(request: Request) -> Response:
        """A chat: the client's messages and tools after the agent's system prompt."""
        body = await read_body(request, OllamaChatRequest, any_type=True)
        agent = ollama_agent(config, body.model)
        if not body.messages:
            return ollama_loaded(body, chat=True)
        openai = OpenAIChatRequest.model_construct(messages=ollama_as_openai(body.messages), tool_choice=None,
                                                   tools=body.tools)
        return ollama_generation(rt, agent, body, split_openai_messages(openai), request)

    @post(app, "/api/generate", **hidden)
    async def ollama_generate(request: Request) -> Response:
        """A prompt (and the client's `system`, after the agent's) answered by the agent."""
        body = await read_body(request, OllamaGenerateRequest, any_type=True)
        agent = ollama_agent(config, body.model)
        if body.images:
            raise InvalidRequest("piagent's agents read text only: send no images")
        if own := [name for name in ("suffix", "raw", "template") if getattr(body, name)]:  # not to be dropped unsaid
            raise InvalidRequest(f"{', '.join(own)}: an agent answers a prompt in its own chat template, so an "
                                 f"editor's fill-in-the-middle or a raw prompt is not for it; send those to Ollama")
        if not body.prompt:
            return ollama_loaded(body, chat=False)
        system = [{"role": "system", "content": body.system}] if body.system else []
        return ollama_generation(rt, agent, body, Ask(system, [], body.prompt), request)

    @app.post("/api/embed", **hidden)
    @app.post("/api/embeddings", **hidden)
    async def ollama_embed(request: Request) -> dict[str, Any]:
        """Embeddings by the agent's model (or EMBED_MODEL); /api/embeddings is the older one, for one prompt."""
        body, began = await read_body(request, OllamaEmbedRequest, any_type=True), time.perf_counter()
        agent, legacy = ollama_agent(config, body.model), request.url.path.endswith("/embeddings")
        texts = [body.input] if isinstance(body.input, str) else body.input
        texts = ([body.prompt] if body.prompt else []) if legacy else texts
        model = config.embed_model or agent.model
        vectors, tokens = await embed(rt, model, texts, embed_fields(config, body), request.receive) if texts else (
            [], None)
        if legacy:
            return {"embedding": vectors[0] if vectors else []}
        return {"model": body.model, "embeddings": vectors, "prompt_eval_count": tokens or 0,
                "total_duration": round((time.perf_counter() - began) * 1e9)}

    for path, methods in OLLAMA_MANAGEMENT:
        app.add_api_route(path, refuse_model_management, methods=methods, **hidden)


def add_ollama_model_routes(app: FastAPI, rt: Runtime) -> None:
    """Attach Ollama's model lists (/api/tags, /api/ps, /api/show), /api/version, and its probe at HEAD /."""
    config, started, hidden = rt.config, ollama_time(), {"include_in_schema": False}

    @app.api_route("/api/tags", methods=["GET", "HEAD"], **hidden)
    async def ollama_tags() -> dict[str, Any]:
        """The agents as models, with their model's size and details when Ollama tells them."""
        known = upstream_models(await upstream_info(rt, "/api/tags"))
        return {"models": [ollama_model(a, known.get(a.model, {}), started) for a in config.agents]}

    @app.get("/api/ps", **hidden)
    async def ollama_ps() -> dict[str, Any]:
        """The agents whose model Ollama has loaded (none with another upstream)."""
        loaded, models = upstream_models(await upstream_info(rt, "/api/ps")), []
        for agent in (a for a in config.agents if a.model in loaded):
            up = loaded[agent.model]
            context = up.get("context_length") if isinstance(up.get("context_length"), int) else config.ctx_tokens
            expires, vram = up.get("expires_at"), up.get("size_vram")
            models.append({**ollama_model(agent, up, started), "expires_at": expires if isinstance(expires, str) else
                           started, "size_vram": vram if isinstance(vram, int) else 0,
                           "context_length": min(context, config.ctx_tokens)})
        return {"models": models}

    @app.post("/api/show", **hidden)
    async def ollama_show(request: Request) -> dict[str, Any]:
        """An agent as a model: its model's details, model_info and template, with piagent's prompt and limits."""
        body = await read_body(request, OllamaShowRequest, any_type=True)
        if not (body.model or body.name):
            raise InvalidRequest("model is required")
        agent = ollama_agent(config, body.model or body.name)
        shown = await upstream_info(rt, "/api/show", {"model": agent.model})
        can = shown.get("capabilities")
        tools = bool(agent.tools) or isinstance(can, list) and "tools" in can
        limits = f"num_ctx {config.ctx_tokens}\nnum_predict {config.max_tokens}\ntemperature {config.temperature:g}"
        return {"modelfile": f"FROM {agent.model}\nSYSTEM {json.dumps(agent.system)}\n", "parameters": limits,
                "template": shown.get("template") if isinstance(shown.get("template"), str) else "{{ .Prompt }}",
                "system": agent.system, "details": ollama_model(agent, shown, started)["details"],
                "model_info": shown.get("model_info") if isinstance(shown.get("model_info"), dict) else {},
                "capabilities": ["completion", "tools"] if tools else ["completion"], "modified_at": started}

    @app.api_route("/api/version", methods=["GET", "HEAD"], **hidden)
    async def ollama_version() -> dict[str, str]:
        """The Ollama API version piagent speaks (a plain dotted number); X-Piagent (every reply's) says who it is."""
        return {"version": OLLAMA_API_VERSION}

    @app.api_route("/", methods=["HEAD"] if config.enable_ui else ["GET", "HEAD"], **hidden)
    async def ollama_probe() -> Response:
        """Ollama's liveness probe (with the page on, GET / is add_page_route's, which answers non-browsers so)."""
        return Response(OLLAMA_PROBE_TEXT, media_type="text/plain; charset=utf-8")


def iso_time(epoch_s: float) -> str:
    """UTC ISO 8601, cut (not rounded) to the microsecond, so a page cursor never lands after its own row."""
    seconds, micros = divmod(math.floor(epoch_s * 1_000_000), 1_000_000)
    return datetime.fromtimestamp(seconds, timezone.utc).replace(microsecond=micros).isoformat(timespec="microseconds")


def add_conversation_routes(app: FastAPI, rt: Runtime) -> None:
    """Attach the conversation API: read, list and forget what piagent remembers."""
    conversation_id_path = FastAPIPath(pattern=CONVERSATION_ID_PATTERN)

    def mine(request: Request) -> str:
        """The agent prefix of the calling key's conversations ("" without API keys)."""
        owner = request.scope[LOG_FIELDS_KEY].get("key")
        return f"{owner}/" if owner else ""

    async def find(conversation_id: str, request: Request) -> Conversation:
        with storage_errors():
            found = await rt.store.get(conversation_id) if rt.store is not None else None
        if found is None or not found.agent.startswith(mine(request)):
            raise ConversationNotFound(f"no conversation {conversation_id!r} (never started, expired, or deleted)")
        return found

    @app.get("/conversations/{conversation_id}", response_model=ConversationOut,
             responses=documented(ErrorBody, (*GUARD_STATUSES, 404, 422, 503)))
    async def read_conversation(request: Request, conversation_id: str = conversation_id_path) -> Any:
        found = await find(conversation_id, request)
        return {"conversation_id": found.conversation_id, "agent": found.agent.split("/")[-1], "turns": [
            {"user": t.user, "assistant": t.assistant, "created_at": iso_time(t.created_at)} for t in found.turns]}

    @app.delete("/conversations/{conversation_id}", status_code=204,
                responses=documented(ErrorBody, (*GUARD_STATUSES, 404, 422, 503)))
    async def forget_conversation(request: Request, conversation_id: str = conversation_id_path) -> Response:
        if rt.store is not None:  # after a reply in progress, so that it cannot bring the conversation back
            ticket = rt.gate.enter(conversation_id, slot=False)
            try:
                await ticket.future
                if mine(request):  # with keys: only the owner's; unknown ids stay a no-op without keys
                    await find(conversation_id, request)
                with storage_errors():
                    await rt.store.delete(conversation_id)
            finally:
                rt.gate.leave(ticket)
        return Response(status_code=204)

    @app.get("/conversations", response_model=ConversationPage,
             responses=documented(ErrorBody, (*GUARD_STATUSES, 422, 503)))
    async def list_conversations(request: Request, limit: int = Query(20, ge=1, le=MAX_PAGE),
                                 cursor: float | None = Query(None, description="`next` of the previous page",
                                                              allow_inf_nan=False),
                                 before: datetime | None = Query(None, description="older form of `cursor`")) -> Any:
        if before is not None:
            cursor = (before if before.tzinfo else before.replace(tzinfo=timezone.utc)).timestamp()
        with storage_errors():
            rows = await rt.store.recent(limit, cursor, mine(request)) if rt.store is not None else []
        page = [{"conversation_id": row.conversation_id, "agent": row.agent.split("/")[-1],
                 "last_used": iso_time(row.last_used), "preview": row.preview} for row in rows]
        more = len(page) == limit
        return {"conversations": page, "next": repr(rows[-1].last_used) if more else None,
                "next_before": page[-1]["last_used"] if more else None}


# ---------------------------------------------------------------------------
# Page: the chat page at / (one HTML string: no CDN, no build step, under 20 KB)
# ---------------------------------------------------------------------------
# Placed last because it is mostly data; create_app (API, above) attaches it with add_page_route.

PAGE_STYLE = r"""
:root{color-scheme:light dark;--bg:#f4f4f1;--fg:#1d1d1b;--card:#fff;--line:#d9d9d4;--mute:#676762;--acc:#2d6a4f;
--on:#fff;--me:#d8f3dc;--code:#efefeb;--err:#fde8e8;--errfg:#8a1c1c}
@media (prefers-color-scheme:dark){:root{--bg:#121412;--fg:#e3e3de;--card:#1d201d;--line:#353935;--mute:#9c9c96;
--acc:#74c69d;--on:#0b1f14;--me:#1e3a2a;--code:#0c0e0c;--err:#3a1c1c;--errfg:#f5b5b5}}
*{box-sizing:border-box}body{margin:0;font:16px/1.5 system-ui,sans-serif;background:var(--bg);color:var(--fg);
display:flex;flex-direction:column;height:100vh;height:100dvh}
header,#keyrow,#chats,#log,#status,form{padding:.55em max(.75em,calc(50% - 24rem))}
header,#keyrow,form{display:flex;gap:.5em;align-items:center;background:var(--card);border-bottom:1px solid var(--line)}
header b{flex:1}
select,input,textarea,button{font:inherit;color:inherit;padding:.4em .65em;border:1px solid var(--line);
border-radius:.5em;background:var(--card)}:focus-visible{outline:2px solid var(--acc)}
button{background:var(--acc);color:var(--on);border-color:var(--acc);cursor:pointer;white-space:nowrap}
.plain,.open,.del{background:none;color:var(--acc)}#keyrow input{flex:1;min-width:0}
#chats{background:var(--card);border-bottom:1px solid var(--line);max-height:45vh;overflow-y:auto}
.chat{display:flex;gap:.3em;align-items:center}.open{flex:1;text-align:left;color:inherit;border-color:transparent;
display:flex;flex-direction:column;overflow:hidden}.on .open{border-color:var(--acc)}
.open span{white-space:nowrap;overflow:hidden;text-overflow:ellipsis;max-width:100%}
small,.mute{color:var(--mute);font-size:.8em}.del{color:var(--errfg);border-color:transparent}.sure{background:var(--err)}
#log{flex:1;overflow-y:auto;display:flex;flex-direction:column;gap:.7em;padding-block:1em}
#log:empty::before{content:"Ask anything. Enter sends, Shift+Enter adds a line; Chats has earlier ones.";
margin:auto;max-width:21em;text-align:center;color:var(--mute)}
.msg{max-width:88%;padding:.5em .85em;border-radius:1em;white-space:pre-wrap;overflow-wrap:anywhere}
.user{align-self:flex-end;background:var(--me);border-bottom-right-radius:.25em}
.assistant{align-self:flex-start;background:var(--card);border:1px solid var(--line);border-bottom-left-radius:.25em}
.assistant>*{margin:.5em 0}.assistant>:first-child{margin-top:0}.assistant>:last-child{margin-bottom:0}
ul,ol{padding-left:1.5em}.h{font-weight:700}a{color:var(--acc)}
code{font:.88em ui-monospace,Menlo,Consolas,monospace;background:var(--code);padding:.1em .3em;border-radius:.3em}
.code{position:relative}pre{margin:0;background:var(--code);padding:1.9em .8em .8em;border-radius:.5em;
overflow-x:auto;white-space:pre}pre code{padding:0}.copy{position:absolute;top:.35em;right:.35em;font-size:.75em;padding:.15em .5em}
.pending:empty::after,.pending>:last-child::after{content:" \2026";color:var(--mute)}
.stopped::after{content:"Stopped";display:block;color:var(--mute);font-size:.8em}
.error{align-self:center;background:var(--err);color:var(--errfg);border:1px solid var(--errfg)}
.tool{align-self:flex-start;color:var(--mute);font-size:.85em;padding:0 .85em}
#status{padding-block:.3em;color:var(--mute);font-size:.85em;border-top:1px solid var(--line)}
#state::before{content:"\25CF  ";color:var(--dot,var(--mute))}.ready{--dot:#40916c}.warming{--dot:#d4a017}
.not_ready,.down{--dot:#d9534f}
#note{float:right}form{border:0;align-items:flex-end}
textarea{flex:1;min-width:0;resize:none;field-sizing:content;min-height:2.6em;max-height:10em}
#stop{background:var(--fg);color:var(--bg);border-color:var(--fg)}[hidden],select:empty,#state:empty{display:none!important}
"""

PAGE_SCRIPT = r"""
const $ = (id) => document.getElementById(id);
const saved = (k, v) => v === undefined ? localStorage.getItem("piagent." + k) || ""
  : (v ? localStorage.setItem("piagent." + k, v) : localStorage.removeItem("piagent." + k));
const NET = "piagent is not reachable: is it running, and is this its address?";
const CUT = "The connection dropped before the reply was finished.";
const conv = (id) => "/conversations/" + encodeURIComponent(id);
const models = {}, st = {ready: "", rate: "", why: "", told: ""};
let epoch = 0, live = null, timer = 0, booting;  // a stream of an older epoch writes nothing
function el(tag, cls, text) {
  const e = document.createElement(tag);
  e.className = cls || "";
  if (text != null) e.textContent = text;  // model text is only ever text, never markup
  return e;
}
async function call(path, options = {}) {
  const h = options.headers = Object.assign({"Content-Type": "application/json"}, options.headers);
  if (saved("key")) h.Authorization = "Bearer " + saved("key");
  const r = await fetch(path, options);
  if (r.status === 401) $("keyrow").hidden = false;
  return r;
}
async function reason(r) {
  const b = await r.json().catch(() => null);
  return b?.error?.message || "piagent answered HTTP " + r.status + ".";
}
async function ask(path, options) {  // ok or 404; else null, shown
  let r;
  try { r = await call(path, options); } catch (e) { return fail(null, NET); }
  if (r.ok || r.status === 404) return r;
  if (r.status === 401) return note("Type this piagent's API key above.");
  fail(null, await reason(r));
}
function link(text, url) {
  if (!/^https?:\/\//i.test(url)) return el("span", "nolink", text);
  const a = el("a", "", text);
  a.href = url; a.target = "_blank"; a.rel = "noopener noreferrer";
  return a;
}
const INLINE = /`([^`\n]+)`|\*\*(\S(?:[^\n]*?\S)?)\*\*|\*(\S(?:[^*\n]*?\S)?)\*|\[([^\]\n]+)\]\(([^)\s]+)\)|(https?:\/\/[^\s<>"'()]*[^\s<>"'().,;:!?])/g;
function inline(parent, s) {
  const re = new RegExp(INLINE);
  let at = 0, m;
  while ((m = re.exec(s))) {
    parent.append(s.slice(at, m.index));
    if (m[1]) parent.append(el("code", "", m[1]));
    else if (m[2] || m[3]) inline(parent.appendChild(el(m[2] ? "strong" : "em")), m[2] || m[3]);
    else parent.append(link(m[4] || m[6], m[5] || m[6]));
    at = re.lastIndex;
  }
  parent.append(s.slice(at));
}
function copy(pre, b) {
  const said = (t) => { b.textContent = t; setTimeout(() => { b.textContent = "Copy"; }, 1500); };
  const select = () => { getSelection().selectAllChildren(pre); said("Selected"); };  // then Ctrl+C or long press
  try { navigator.clipboard.writeText(pre.textContent).then(() => said("Copied"), select); } catch (e) { select(); }
}
function md(box, text) {  // safe Markdown subset, as DOM nodes
  const out = document.createDocumentFragment(), lines = text.split("\n");
  let para = null, list = null, m;
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if ((m = /^\s*(```|~~~)/.exec(line))) {
      const code = [];
      while (++i < lines.length && !lines[i].trim().startsWith(m[1])) code.push(lines[i]);
      const pre = el("pre"), b = el("button", "copy", "Copy");
      pre.append(el("code", "", code.join("\n")));
      b.type = "button"; b.onclick = () => copy(pre, b);
      out.appendChild(el("div", "code")).append(pre, b); para = list = null;
    } else if (!line.trim()) para = list = null;
    else if ((m = /^\s*(?:([-*+])|(\d{1,9})[.)])\s+(.*)/.exec(line))) {
      const tag = m[1] ? "UL" : "OL";
      if (!list || list.tagName !== tag) {
        list = out.appendChild(el(tag));
        if (m[2] && m[2] !== "1") list.start = +m[2];
      }
      inline(list.appendChild(el("li")), m[3]); para = null;
    } else if ((m = /^#{1,6}\s+(.*)/.exec(line))) { inline(out.appendChild(el("p", "h")), m[1]); para = list = null; }
    else if (list && /^\s/.test(line)) inline(list.lastChild, " " + line.trim());
    else {
      if (para) para.append("\n"); else para = out.appendChild(el("p"));
      list = null; inline(para, line);
    }
  }
  box.replaceChildren(out);
}
function bubble(kind, text) {
  const d = el("div", "msg " + kind);
  if (kind === "assistant") md(d, text || ""); else d.textContent = text;
  $("log").append(d);
  d.scrollIntoView({block: "end"});
  return d;
}
const note = (text) => { $("note").textContent = text; };
function fail(out, text) {
  if (out && !out.textContent) out.remove(); else if (out) out.classList.remove("pending");
  bubble("error", text);
  told(text);
}
function told(text) {
  st.told = text; $("why").textContent = st.why !== text ? st.why : "";
}
function statusLine() {
  const a = $("agent").value;
  $("state").textContent = [a + (models[a] ? " \u2192 " + models[a] : ""), st.ready, st.rate].filter(Boolean).join(" \u00b7 ");
}
async function ready() {
  let d = {};
  if (!document.hidden) {
    try { d = await (await call("/ready")).json(); } catch (e) { d = {status: "down"}; }
    const c = d.checks || {}, bad = Object.values(c).find((x) => !x.ok) || {};
    st.ready = {ready: "ready", warming: "warming up", down: "piagent unreachable"}[d.status]
      || (c.upstream?.ok === false ? "upstream down" : d.status ? "not ready" : "");
    st.why = d.status === "not_ready" ? bad.detail || "" : "";
    told(st.told);
    $("status").className = d.status || "";
    statusLine();
  }
  clearTimeout(timer);  // one timer, however calls overlap
  timer = setTimeout(ready, d.status === "warming" ? 3000 : 30000);
}
const busy = (on) => { $("send").hidden = on; $("stop").hidden = !on; };
function stop() { if (live) { live.stopped = true; live.ac.abort(); } }
function reset(cid) {  // leave this chat and its stream
  if (live) live.ac.abort();
  live = null; epoch++; busy(false);
  saved("cid", cid); $("log").replaceChildren(); note(""); told("");
}
function handle(s, raw) {
  let event = "message"; const data = [];
  for (const line of raw.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
  }
  if (!data.length || s.e !== epoch) return;
  const d = JSON.parse(data.join("\n")), log = $("log");
  if (event === "token") {
    const near = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
    note(""); md(s.out, s.text += d.text);
    if (near) log.scrollTop = log.scrollHeight;
  } else if (event === "queued") note("Waiting: number " + d.position + " in line");
  else if (event === "tool") {  // asked and answered, above the answer
    const args = typeof d.arguments === "string" ? d.arguments : JSON.stringify(d.arguments);
    log.insertBefore(bubble("tool", d.name + " " + args + " \u2192 " + (d.error ? "error: " + d.error : d.result)), s.out);
  } else if (event === "done") {
    s.end = true; saved("cid", d.conversation_id); models[d.agent] = d.model; told("");
    const t = d.tokens_per_s != null ? d.tokens_per_s : d.tokens / ((d.duration_ms - d.ttft_ms) / 1000);
    st.rate = isFinite(t) && t > 0 ? t.toFixed(1) + " tok/s" : "";
    note(d.history_truncated ? "Older turns were left out to fit." : "");
    statusLine();
  } else if (event === "error") { s.end = true; fail(s.out, d.error?.message || "The model failed."); }
}
async function send(text) {
  const s = live = {e: epoch, ac: new AbortController(), text: ""}, mine = () => s.e === epoch;
  busy(true);
  bubble("user", text);
  const out = s.out = bubble("assistant", "");
  out.classList.add("pending");
  try {
    await booting;
    if (!mine()) return;
    const body = {message: text, agent: $("agent").value || saved("agent") || undefined, stream: true,
      conversation_id: saved("cid") || undefined};
    const r = await call("/chat", {method: "POST", body: JSON.stringify(body), signal: s.ac.signal,
      headers: {Accept: "text/event-stream"}});
    if (!r.ok) { const why = await reason(r); return mine() && fail(out, why); }
    if (mine() && r.headers.get("X-Conversation-Id")) saved("cid", r.headers.get("X-Conversation-Id"));
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) { handle(s, buffer.slice(0, end)); buffer = buffer.slice(end + 2); }
    }
    if (!s.end && mine()) fail(out, CUT);
  } catch (e) {
    if (!mine()) return;
    if (s.stopped) out.classList.add("stopped");
    else fail(out, s.text ? CUT : NET);
  } finally {
    out.classList.remove("pending");
    if (live === s) { live = null; busy(false); ready(); }
  }
}
async function showChat(cid) {
  const e = epoch;
  if (!cid) return;
  const r = await ask(conv(cid));
  if (!r || e !== epoch) return;
  if (r.status === 404) return live || saved("cid", null);
  const c = await r.json();
  if (e !== epoch) return;
  const a = $("agent"), was = a.value, sent = [...$("log").children];
  a.value = c.agent;
  if (!a.value) a.value = was;
  for (const t of c.turns) { bubble("user", t.user); bubble("assistant", t.assistant); }
  $("log").append(...sent);
  statusLine();
}
const openChat = (cid) => { reset(cid); return showChat(cid); };
async function chats() {
  const box = $("chats");
  const r = await ask("/conversations?limit=20");
  if (!r) return;
  const list = (await r.json()).conversations;
  box.replaceChildren();
  if (!list.length) box.append(el("p", "mute", "No saved chats yet."));
  for (const c of list) {
    const id = c.conversation_id, row = box.appendChild(el("div", "chat" + (id === saved("cid") ? " on" : "")));
    const open = row.appendChild(el("button", "open")), del = row.appendChild(el("button", "del", "Delete"));
    open.append(el("span", "", c.preview || "(empty)"));
    open.append(el("small", "", c.agent + " \u00b7 " + new Date(c.last_used).toLocaleString([], {dateStyle: "medium", timeStyle: "short"})));
    open.type = del.type = "button";
    open.onclick = () => { box.hidden = true; openChat(id); };
    del.onclick = async () => {
      if (!del.classList.contains("sure")) { del.classList.add("sure"); del.textContent = "Delete?"; return; }
      if (id === saved("cid")) reset(null);
      if (await ask(conv(id), {method: "DELETE"})) row.remove();
    };
  }
}
async function loadAgents(boot) {
  const e = epoch, r = await ask("/agents");
  if (!r) return;
  $("keyrow").hidden = true;
  const d = await r.json(), select = $("agent");
  Object.assign(models, d.models);
  select.replaceChildren(...d.agents.map((name) => new Option(name, name)));
  if (d.agents.includes(saved("agent"))) select.value = saved("agent");
  statusLine(); ready();
  if (!boot) await openChat(saved("cid"));
  else if (e === epoch) await showChat(saved("cid"));
}
$("form").onsubmit = (e) => {
  e.preventDefault();
  const text = $("text").value.trim();
  if (!text || live) return;
  $("text").value = "";
  $("chats").hidden = true;
  send(text);
};
$("text").onkeydown = (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("form").requestSubmit(); }
};
document.onkeydown = (e) => { if (e.key === "Escape") stop(); };
document.onvisibilitychange = () => { if (!document.hidden) ready(); };
$("stop").onclick = stop;
$("agent").onchange = () => { stop(); saved("agent", $("agent").value); statusLine(); };
$("new").onclick = () => { openChat(null); $("chats").hidden = true; $("text").focus(); };
$("chatsbtn").onclick = () => { if (!($("chats").hidden = !$("chats").hidden)) chats(); };
$("savekey").onclick = () => { saved("key", $("key").value.trim()); $("key").value = ""; loadAgents(); };
$("key").onkeydown = (e) => { if (e.key === "Enter") $("savekey").click(); };
booting = loadAgents(true);
"""

PAGE_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>piagent</title><style>{style}</style></head>
<body>
<header><b>piagent</b><select id="agent" aria-label="Agent"></select>
<button id="chatsbtn" class="plain" type="button">Chats</button>
<button id="new" class="plain" type="button">New chat</button></header>
<div id="keyrow" hidden><input id="key" type="password" placeholder="API key" aria-label="API key" autocomplete="off">
<button id="savekey" type="button">Save key</button></div>
<nav id="chats" hidden aria-label="Recent chats"></nav>
<main id="log" aria-live="polite"></main>
<div id="status"><span id="state"></span><span id="note"></span><div id="why"></div></div>
<form id="form"><textarea id="text" placeholder="Message" aria-label="Message" autofocus></textarea>
<button id="send">Send</button><button id="stop" type="button" hidden>Stop</button></form>
<script>{script}</script>
</body></html>
"""


def render_page() -> tuple[str, str]:
    """(the page, its Content-Security-Policy): only its own inline script and style may run, only / is called."""
    digest = lambda text: base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()  # noqa: E731
    csp = (f"default-src 'none'; script-src 'sha256-{digest(PAGE_SCRIPT)}'; style-src 'sha256-{digest(PAGE_STYLE)}'; "
           "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return PAGE_HTML.format(style=PAGE_STYLE, script=PAGE_SCRIPT), csp


def add_page_route(app: FastAPI, config: Config) -> None:
    """Serve the chat page at / to browsers, Ollama's probe to other clients (ENABLE_UI=false: only the probe)."""
    if not config.enable_ui:
        return
    page, csp = render_page()

    @app.get("/", include_in_schema=False)
    async def chat_page(request: Request) -> Response:
        if "text/html" not in request.headers.get("accept", ""):  # not a browser: Ollama's probe (add_ollama_routes)
            return Response(OLLAMA_PROBE_TEXT, media_type="text/plain; charset=utf-8")
        return Response(page, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"})


# ---------------------------------------------------------------------------
# Entry point: main(argv=None) -> int
# ---------------------------------------------------------------------------


def _read_mcp_server(s: _Settings, name: str) -> McpServerConfig:
    """MCP_<NAME>_COMMAND (split like a shell would, never run by one) or _URL (+ _TOKEN), and _TIMEOUT_S."""
    key = f"MCP_{name.upper()}_"
    command, url, token = s.raw(key + "COMMAND"), s.raw(key + "URL"), s.raw(key + "TOKEN")
    if (command is None) == (url is None):
        raise ConfigError(f"MCP server {name!r} needs exactly one of {key}COMMAND (a program that speaks MCP on "
                          f"stdin/stdout) or {key}URL (its Streamable HTTP address)")
    try:
        argv = tuple(shlex.split(command or ""))
    except ValueError as exc:
        raise s.fail(key + "COMMAND", f"a program and its arguments, quoted as a shell would ({exc})") from None
    if url is not None:
        url = s.url(key + "URL", url)
    if token is not None and url is None:
        raise s.fail(key + "TOKEN", f"no token: it is sent only to an HTTP server ({key}URL)")
    return McpServerConfig(name, argv, url, token, s.number(key + "TIMEOUT_S", McpServerConfig.timeout_s, 0.1, 3600))


def _read_agents(settings: _Settings, prefix: str, default_model: str, tools_ok: bool,
                 servers: tuple[McpServerConfig, ...] = ()) -> tuple[Agent, ...]:
    """AGENTS=a,b and for each <prefix><NAME> (the model, else <prefix>GENERAL's), AGENT_<NAME>_SYSTEM and _TOOLS."""
    names = [n.strip().lower() for n in (settings.text("AGENTS", "general") or "general").split(",")]
    if not all(AGENT_NAME_PATTERN.match(n) for n in names) or len(set(names)) != len(names):
        raise settings.fail("AGENTS", "distinct comma-separated names of lowercase letters, digits and _")
    agents = []
    general = settings.text(f"{prefix}GENERAL", default_model) or default_model
    for name in names:
        upper = name.upper()
        model = settings.text(f"{prefix}{upper}", general) or general
        system = settings.text(f"AGENT_{upper}_SYSTEM", DEFAULT_SYSTEM_PROMPT) or DEFAULT_SYSTEM_PROMPT
        tools = settings.items(f"AGENT_{upper}_TOOLS", TOOL_NAME_PATTERN, "comma-separated tool names such as calc,now")
        if tools and not tools_ok:
            raise settings.fail(f"AGENT_{upper}_TOOLS", "no tools with OLLAMA_API=generate (tools need /api/chat)")
        unknown = [t.split(".")[0] for t in tools if "." in t and t.split(".")[0] not in {m.name for m in servers}]
        if unknown:
            raise settings.fail(f"AGENT_{upper}_TOOLS", f"tools of servers in MCP_SERVERS; add {unknown[0]!r} there, "
                                                        f"with MCP_{unknown[0].upper()}_COMMAND or _URL")
        agents.append(Agent(name, model, system, tuple(dict.fromkeys(tools))))
    # the other providers' model names are settings too: a file may keep both, for a switch of PROVIDER
    settings.asked.update(f"{cls.model_prefix}{name}" for cls in PROVIDERS.values() for name in ("GENERAL", *(
        a.name.upper() for a in agents)))
    return tuple(agents)


def _read_memory(s: _Settings, d: Config) -> dict[str, Any]:
    """The memory settings, and WORKERS (several workers need a memory they share)."""
    state_dir = s.text("STATE_DIRECTORY", None)  # set by systemd's StateDirectory=
    backend = s.choice("MEMORY_BACKEND", "sqlite" if state_dir else d.memory_backend, tuple(MEMORY_STORES))
    workers = s.integer("WORKERS", d.workers, 1, 64)
    if workers > 1 and backend == "memory":
        raise s.fail("WORKERS", "1 with MEMORY_BACKEND=memory (each worker would keep its own memory); "
                                "use MEMORY_BACKEND=sqlite or redis for several workers")
    return dict(
        enable_memory=s.boolean("ENABLE_MEMORY", d.enable_memory),
        memory_max_turns=s.integer("MEMORY_MAX_TURNS", d.memory_max_turns, 1, 1000),
        memory_ttl_min=s.number("MEMORY_TTL_MIN", d.memory_ttl_min, 0.01, 525_600),
        memory_max_conversations=s.integer("MEMORY_MAX_CONVERSATIONS", d.memory_max_conversations, 1, 1_000_000),
        memory_backend=backend,
        memory_path=s.text("MEMORY_PATH", str(Path(state_dir) / "piagent.db") if state_dir else d.memory_path),
        redis_url=s.matching("REDIS_URL", d.redis_url, re.compile(r"^(redis|rediss|unix)://"),
                             "a URL such as redis://127.0.0.1:6379/0"),
        workers=workers,
    )


def _read_mcp_servers(s: _Settings) -> tuple[McpServerConfig, ...]:
    servers = tuple(_read_mcp_server(s, name) for name in s.items(
        "MCP_SERVERS", MCP_SERVER_NAME_PATTERN,
        "comma-separated names of lowercase letters, digits and _ (at most 32)"))
    if len({server.name for server in servers}) != len(servers):
        raise s.fail("MCP_SERVERS", "distinct names")
    return servers


def _read_context(s: _Settings, d: Config) -> dict[str, int]:
    """CTX_TOKENS, and MAX_TOKENS below it (else every request is a 413 saying a negative number of tokens is left);
    MAX_TOKENS defaults to half a context smaller than 400."""
    ctx_tokens = s.integer("CTX_TOKENS", d.ctx_tokens, 128, 1_048_576)
    max_tokens = s.integer("MAX_TOKENS", min(d.max_tokens, ctx_tokens // 2), 1, 1_048_576)
    if max_tokens >= ctx_tokens:
        raise s.fail("MAX_TOKENS", f"fewer than CTX_TOKENS={ctx_tokens}: the reply and the prompt share the context")
    return {"ctx_tokens": ctx_tokens, "max_tokens": max_tokens}


def load_config(environ: Mapping[str, str], env_file: Path | None = None) -> Config:
    """Config from the real environment over the env file over the defaults; a ConfigError names what is wrong."""
    file_values = read_env_file(env_file) if env_file is not None else {}
    s = _Settings({**file_values, **environ})
    d = Config()
    provider = s.choice("PROVIDER", d.provider, tuple(PROVIDERS))
    ollama_api = s.choice("OLLAMA_API", d.ollama_api, OLLAMA_APIS)
    keep_alive = s.matching("OLLAMA_KEEP_ALIVE", None, KEEP_ALIVE_PATTERN,
                            "seconds or a duration such as 30m, 1h, -1 (forever)")
    servers = _read_mcp_servers(s)
    return Config(
        provider=provider,
        openai_base_url=s.url("OPENAI_BASE_URL", d.openai_base_url),
        openai_api_key=s.text("OPENAI_API_KEY", None),
        ollama_host=s.url("OLLAMA_HOST", d.ollama_host),
        ollama_api=ollama_api,
        ollama_keep_alive=keep_alive,
        upstream_connect_timeout_s=s.number(s.named("UPSTREAM_CONNECT_TIMEOUT_S", "OLLAMA_CONNECT_TIMEOUT_S"),
                                            d.upstream_connect_timeout_s, 0.1, 600),
        upstream_timeout_s=s.number(s.named("UPSTREAM_TIMEOUT_S", "OLLAMA_TIMEOUT_S"), d.upstream_timeout_s, 0.1,
                                    86400),
        write_timeout_s=s.number("WRITE_TIMEOUT_S", d.write_timeout_s, 0.1, 3600),
        max_connections=s.integer("MAX_CONNECTIONS", d.max_connections, 1, 100_000),
        header_timeout_s=s.number("HEADER_TIMEOUT_S", d.header_timeout_s, 0.1, 3600),
        **_read_context(s, d),
        temperature=s.number("TEMPERATURE", d.temperature, 0.0, 2.0),
        **_read_memory(s, d),
        host=s.matching("HOST", d.host, HOST_PATTERN, "an address of this machine (127.0.0.1: this machine only; "
                        "0.0.0.0: the LAN too; IPv6 without brackets) or its name"),
        port=s.integer("PORT", d.port, 1, 65535),
        log_level=s.choice("LOG_LEVEL", d.log_level, LOG_LEVELS),
        sse_ping_s=s.number("SSE_PING_S", d.sse_ping_s, 0.01, 3600),
        log_format=s.choice("LOG_FORMAT", d.log_format, LOG_FORMATS),
        log_prompts=s.boolean("LOG_PROMPTS", d.log_prompts),
        api_keys=s.items("API_KEYS", re.compile(r"^[\x21-\x2b\x2d-\x7e]{8,256}$"),
                         "comma-separated keys of 8 to 256 printable characters, no spaces"),
        rate_limit_per_min=s.integer("RATE_LIMIT_PER_MIN", d.rate_limit_per_min, 0, 100_000),
        trust_proxy=s.boolean("TRUST_PROXY", d.trust_proxy),
        max_body_bytes=s.integer("MAX_BODY_BYTES", d.max_body_bytes, 1024, 16_777_216),
        max_message_chars=s.integer("MAX_MESSAGE_CHARS", d.max_message_chars, 1, 1_000_000),
        cors_origins=s.items("CORS_ORIGINS", ORIGIN_PATTERN,
                             "comma-separated origins such as http://pi.local:8000 (never *)"),
        allowed_hosts=tuple(h.lower() for h in s.items("ALLOWED_HOSTS", re.compile(r"^[A-Za-z0-9.:-]{1,253}$"),
                                                        "comma-separated host names such as pi.local")),
        max_concurrent=s.integer("MAX_CONCURRENT", d.max_concurrent, 1, 1024),
        max_queue=s.integer("MAX_QUEUE", d.max_queue, 0, 100_000),
        shutdown_grace_s=s.number("SHUTDOWN_GRACE_S", d.shutdown_grace_s, 0, 3600),
        enable_ui=s.boolean("ENABLE_UI", d.enable_ui),
        metrics_public=s.boolean("METRICS_PUBLIC", d.metrics_public),
        warmup=s.boolean("WARMUP", PROVIDERS[provider].warm_by_default),
        max_tool_rounds=s.integer("MAX_TOOL_ROUNDS", d.max_tool_rounds, 0, 10),
        embed_model=s.text("EMBED_MODEL", None),
        agents=_read_agents(s, PROVIDERS[provider].model_prefix, d.agents[0].model,
                            tools_ok=provider == "openai" or ollama_api == "chat", servers=servers),
        mcp_servers=servers,
        mcp_max_result_chars=s.integer("MCP_MAX_RESULT_CHARS", d.mcp_max_result_chars, 200, 1_000_000),
        unread=tuple(filter(None, (_unread(name, s.asked) for name in file_values if name not in s.asked))),
    )


def _unread(name: str, asked: set[str]) -> str | None:
    """An env-file name nothing read that looks like piagent's, with the likely fix; None for one of the process's
    own (TZ, HTTPS_PROXY, NODE_OPTIONS: the file is its environment too). Example: "API_KEY" -> "API_KEY (did you
    mean API_KEYS?)"."""
    like = difflib.get_close_matches(name.upper(), asked, n=1, cutoff=0.8)
    if like:
        return f"{name} (did you mean {like[0]}?)"
    if name.upper().split("_")[0] not in {known.split("_")[0] for known in asked}:
        return None
    return f"{name} (not a setting{'' if name.isupper() else ', and names are upper-case'}; for an agent or an MCP " \
           f"server, list it in AGENTS or MCP_SERVERS)"


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse flags, load config, run the server until SIGTERM/SIGINT. Exit 2 with one line on a config error."""
    import argparse

    parser = argparse.ArgumentParser(prog="piagent", description="A small agent server in front of Ollama.")
    parser.add_argument("--host", help="address to listen on (overrides HOST)")
    parser.add_argument("--port", help="port to listen on (overrides PORT)")
    parser.add_argument("--env-file", type=Path, help="env file to read (overrides PIAGENT_ENV_FILE)")
    parser.add_argument("--check", action="store_true",
                        help="print the effective settings, check upstream, models, memory and port, then exit")
    args = parser.parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    overrides = {k: v for k, v in (("HOST", args.host), ("PORT", args.port)) if v is not None}
    env_file = args.env_file or default_env_file(environ)
    try:
        config = load_config({**environ, **overrides}, env_file)
        Toolbox(TOOLS).check(config)
    except ConfigError as exc:  # --check reports it as a failed check (exit 1); start-up stops with exit 2
        print(f"✗ settings: {exc}" if args.check else f"piagent: {exc}",
              file=sys.stdout if args.check else sys.stderr)
        return 1 if args.check else 2
    if args.check:
        print_settings(config, env_file)
        # an MCP server down is in the results, with why: its log line would say it twice (other warnings stay)
        said_twice = lambda record: not str(record.msg).startswith("MCP server %s is down")  # noqa: E731
        log.addFilter(said_twice)
        try:
            results = asyncio.run(run_checks(config, env_file))
        finally:
            log.removeFilter(said_twice)  # main() leaves no trace in the process (the tests run --check in one)
        for ok, what, fix in results:
            print(f"✓ {what}" if ok else f"✗ {what} — {fix}")
        for warning in startup_warnings(config):  # what start-up would warn of: no ✗, but worth reading first
            print(f"⚠ {warning}")
        return 0 if all(ok for ok, _, _ in results) else 1
    _, what, fix, final = _port_free(config.host, config.port)
    if final:  # exit 2, as systemd would restart piagent every 3 s, each start seconds of a Pi's CPU, to no end
        print(f"piagent: {what}: {fix}", file=sys.stderr)
        return 2
    try:
        asyncio.run(check_memory(config))
    except StoreError as exc:
        print(f"piagent: {exc}", file=sys.stderr)
        return 1 if exc.retry_may_help else 2  # systemd restarts on 1 (Redis may come back), not on 2
    configure_logging(config, sys.stderr)
    raise_fd_limit()
    log.info("piagent on http://%s:%d -> %s %s, agents: %s, memory: %s", config.host, config.port,
             config.provider, without_credentials(upstream_url(config)),
             ", ".join(f"{a.name}={a.model}" for a in config.agents), _memory_description(config))
    for warning in startup_warnings(config):
        log.warning(warning)
    if not config.warmup:  # warm-up looks for the upstream itself; without it, look once, so a missing one is said
        missing = asyncio.run(unreachable(config))
        if missing is not None:
            log.warning("%s; piagent keeps trying on each request", missing)
    serve(config, env_file)
    return 0


def serve(config: Config, env_file: Path | None) -> None:
    """Run uvicorn until SIGTERM/SIGINT: this process with piagent's graceful drain, or WORKERS processes."""
    import uvicorn

    if config.workers > 1:  # each worker process builds its own app from the same environment
        if env_file is not None:
            os.environ["PIAGENT_ENV_FILE"] = str(env_file)
        uvicorn.run("piagent:app_from_environment", factory=True, workers=config.workers,
                    app_dir=str(Path(__file__).resolve().parent), host=config.host, port=config.port,
                    **uvicorn_options(config))
        return
    app = create_app(config)

    class Server(uvicorn.Server):
        cut = False

        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            # a closed terminal (SIGHUP) drains as SIGTERM does, where its default would end replies mid-way with no
            # clean stop of MCP servers (uvicorn hears only SIGINT and SIGTERM); an ignored one (nohup) stays ignored
            main_thread = threading.current_thread() is threading.main_thread()
            own = main_thread and signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
            if own:
                signal.signal(signal.SIGHUP, self.handle_exit)
            try:
                with super().capture_signals():
                    yield
            finally:
                if own:
                    signal.signal(signal.SIGHUP, signal.SIG_DFL)

        def handle_exit(self, sig: int, frame: Any) -> None:
            # first signal: close the gate and start the grace period on the loop, then let uvicorn drain; a second
            # Ctrl-C ends the grace now; only a third is uvicorn's forced exit (which skips the lifespan's clean-up)
            rt = app.state.runtime
            if rt.drain.loop is not None and not self.should_exit:
                rt.drain.loop.call_soon_threadsafe(rt.drain.begin, rt.gate)
            elif rt.drain.loop is not None and sig == signal.SIGINT and not self.cut:
                self.cut = True
                rt.drain.loop.call_soon_threadsafe(rt.drain.end_now)
                return
            super().handle_exit(sig, frame)

    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises a Ctrl-C once it has stopped: that is no error
        Server(uvicorn.Config(app, host=config.host, port=config.port, **uvicorn_options(config))).run()


async def unreachable(config: Config) -> str | None:
    """Why the upstream cannot be reached (with both fixes), or None when it answers (whatever it says)."""
    timeout = httpx.Timeout(PROBE_TIMEOUT_S, connect=config.upstream_connect_timeout_s)
    async with UpstreamClient(upstream_url(config), timeout=timeout) as c:
        try:
            await PROVIDERS[config.provider](c, config).probe()
        except UpstreamFailure as exc:
            return exc.message if isinstance(exc, UpstreamUnavailable) else None
    return None


def print_settings(config: Config, env_file: Path | None) -> None:
    """Every setting (VARIABLE=value), as piagent will use it; secrets shown only as short hashes."""
    source = f"{env_file} and the environment" if env_file else "the environment (no env file)"
    print(f"piagent settings, from {source}:")
    for f in (field for field in fields(Config) if field.name != "unread"):
        value = getattr(config, f.name)
        if f.name == "agents":
            print(f"  AGENTS={','.join(a.name for a in value)}")
            for a in value:
                print(f"    agent {a.name}: model {a.model}, tools {','.join(a.tools) or '(none)'}, "
                      f"system prompt {a.system[:60]!r}")
            continue
        if f.name == "mcp_servers":
            value = ", ".join(f"{m.name}: {shlex.join(m.command) or without_credentials(m.url)}" +
                              (" (token set)" if m.token else "")
                              for m in value) or "(none)"
        elif f.name == "api_keys":
            value = ", ".join(f"key {key_id(k)}" for k in value) or "(none: no auth)"
        elif f.name == "openai_api_key" and value:
            value = f"(set, {key_id(value)})"
        elif f.name in ("redis_url", "ollama_host", "openai_base_url"):
            value = without_credentials(value)
        elif isinstance(value, tuple):
            value = ",".join(value) or "(none)"
        elif isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, float):
            value = f"{value:g}"
        print(f"  {f.name.upper()}={'(unset)' if value is None else value}")
    print("checks:")


async def run_checks(config: Config, env_file: Path | None) -> list[tuple[bool, str, str]]:
    """(ok, what was checked, how to fix it) for: env file, upstream, each agent's model, memory, port."""
    results = [(True, f"env file {env_file} parsed" if env_file else "no env file; defaults and environment", "")]
    if config.unread:
        results = [(False, f"env file {env_file}: piagent does not read {', '.join(config.unread)}",
                    "fix the name, or remove the line")]
    async with UpstreamClient(upstream_url(config), timeout=PROBE_TIMEOUT_S) as client:
        provider = PROVIDERS[config.provider](client, config)
        try:
            description, available = await provider.probe()
        except UpstreamFailure as exc:
            results.append((False, f"upstream at {provider.base_url}", exc.message))
        else:
            results.append((True, f"{description} answers at {provider.base_url}", ""))
            for agent in config.agents:
                ok = has_model(agent.model, available)
                results.append((ok, f"agent {agent.name}: model {agent.model}" + (" is available" if ok else ""),
                                "" if ok else missing_model(provider, agent.model, available)))
    try:
        await check_memory(config)
        results.append((True, f"memory: {_memory_description(config)} opens", ""))
    except StoreError as exc:
        results.append((False, f"memory: {_memory_description(config)}", str(exc)))
    results.append(_port_free(config.host, config.port)[:3])
    return results + await check_mcp_servers(config)


async def check_mcp_servers(config: Config) -> list[tuple[bool, str, str]]:
    """Start each MCP server, list its tools and stop it; then each agent's MCP entries that match no tool."""
    servers = [McpServer(s) for s in config.mcp_servers]
    await asyncio.gather(*(server.start() for server in servers))
    try:
        await asyncio.gather(*(server.ready(2 * server.config.timeout_s) for server in servers))
        status = [server.status() for server in servers]
    finally:
        await asyncio.gather(*(server.stop() for server in servers))
    results = [(ok, f"MCP server {s.name}: " + (", ".join(s.tools()) if ok else "cannot start"), "" if ok else
                f"{why}{f' ({s.last_words})' if s.last_words else ''}; check MCP_{s.name.upper()}_COMMAND or _URL")
               for s, (ok, why) in zip(servers, status)]
    toolbox, down = Toolbox({}, tuple(servers)), {s.name for s, (ok, _) in zip(servers, status) if not ok}
    for agent in config.agents:  # an entry of a server that is down is that server's failure, said above
        for entry in (t for t in agent.tools if "." in t and t.split(".")[0] not in down and not toolbox.allowed((t,))):
            results.append((False, f"agent {agent.name}: {entry} matches no tool",
                            f"fix AGENT_{agent.name.upper()}_TOOLS (tools as listed above)"))
    return results


def _port_free(host: str, port: int) -> tuple[bool, str, str, bool]:
    """(ok, what was checked, how to fix it, whether a restart could not fix it) for HOST and PORT. An address not
    (yet) this machine's may be one at boot, before the network is up; a port taken or forbidden stays so."""
    import socket

    what = f"port {port} on {host}"
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind((host, port))
    except OSError as exc:
        final = {errno.EADDRINUSE: "is piagent already running (systemctl status piagent)? Or choose another PORT",
                 errno.EACCES: "a port below 1024 needs rights piagent's service does not have: choose PORT=8000 "
                               "or another from 1024 up"}
        fix = final.get(exc.errno, f"is HOST={host} an address of this machine? (127.0.0.1: this machine only; "
                                   f"0.0.0.0: the LAN too)")
        return False, what, f"cannot listen there ({exc.strerror}); {fix}", exc.errno in final
    return True, f"{what} is free", "", False


def _memory_description(config: Config) -> str:
    if not config.enable_memory:
        return "off"
    where = {"sqlite": config.memory_path, "redis": without_credentials(config.redis_url)}.get(config.memory_backend)
    return f"{config.memory_backend} {where}" if where else config.memory_backend


async def check_memory(config: Config) -> None:
    """Open and close the memory store once, so a bad path, a corrupt file or no Redis is one clear line."""
    if config.enable_memory:
        store = MEMORY_STORES[config.memory_backend](config, time.time)
        await store.open()
        await store.close()


def app_from_environment() -> FastAPI:
    """The app a uvicorn worker builds for itself when WORKERS > 1 (config as main() read it)."""
    config = load_config(os.environ, default_env_file(os.environ))
    configure_logging(config, sys.stderr)
    return create_app(config)


def uvicorn_options(config: Config) -> dict[str, Any]:
    """How piagent runs uvicorn (the tests use the same)."""
    # several workers get uvicorn's own cap (their config is pickled, and a class made here cannot be)
    guard = {"http": guarded_http(config)} if config.workers == 1 else {"limit_concurrency": config.max_connections}
    return {
        **guard,
        "log_level": config.log_level,
        "access_log": False,  # piagent writes its own record per request
        "log_config": None,  # keep piagent's logging set-up (text or JSON) for uvicorn's lines too
        "proxy_headers": False,  # X-Forwarded-For is piagent's business, and only with TRUST_PROXY=true
        # uvicorn's own limit comes a little after ours, so it never has to cancel (and 500) a request itself
        "timeout_graceful_shutdown": config.shutdown_grace_s + 2,
    }


class OneWriteHead:
    """A connection's transport that holds a response's head (status line and headers) until its first body bytes,
    which then leave with it in one write: a stream's client wakes once for its first token, not twice. A head is
    held to the end of the event loop's turn at most, and never past the connection's close."""

    def __init__(self, transport: asyncio.Transport):
        self.transport, self.head = transport, b""

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self.transport, name)

    def write(self, data: bytes) -> None:
        if self.head:  # a held head goes with these bytes; other writes pass untouched (each token is one)
            data, self.head = self.head + data, b""
        elif data.startswith(b"HTTP/"):
            self.head = data
            asyncio.get_running_loop().call_soon(self.write, b"")
            return
        self.transport.write(data)

    def close(self) -> None:
        self.write(b"")
        self.transport.close()


def guarded_http(config: Config) -> type:
    """uvicorn's HTTP/1.1 protocol, closing connections beyond MAX_CONNECTIONS (with a 503) and those that send no
    whole request head within HEADER_TIMEOUT_S of opening or of their last response, so idle ones cannot pile up;
    a response's head leaves with its first body bytes (OneWriteHead)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps(error_body("/", 503, "too_many_connections", "piagent has MAX_CONNECTIONS connections open; "
                                 "retry in a few seconds")).encode()
    refusal = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 5\r\n"
               b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))

    class GuardedH11(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = OneWriteHead(transport)  # type: ignore[assignment]
            if len(self.connections) > config.max_connections:
                transport.write(refusal)
                transport.close()
            else:
                self._await_request()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle and self.deadline is not None:  # a request head arrived whole
                self.deadline.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._await_request()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            super().connection_lost(exc)

        def _await_request(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
            self.deadline = self.loop.call_later(config.header_timeout_s, self._too_slow)

        def _too_slow(self) -> None:
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return GuardedH11


def raise_fd_limit() -> None:
    """Raise the soft limit of open files to the hard one (systemd's default, 1,024, would stop piagent accepting)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def configure_logging(config: Config, stream: Any) -> None:
    """Root logging to `stream` at LOG_LEVEL, as text or JSON lines (auto: text on a terminal)."""
    use_json = config.log_format == "json" or (config.log_format == "auto" and not stream.isatty())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLog() if use_json else TextLog())
    logging.basicConfig(level=config.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # piagent's own request record says it all
    # a stream piagent cut on purpose (the upstream failed mid-reply) has no closing chunk; piagent logs that itself
    logging.getLogger("uvicorn.error").addFilter(
        lambda record: "returned without completing response" not in record.getMessage())


if __name__ == "__main__":
    raise SystemExit(main())
