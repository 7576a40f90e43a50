"""piagent — a small agent server in front of Ollama, for a Raspberry Pi.

Run it:
    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
    .venv/bin/python piagent.py                 # listens on 127.0.0.1:8000
    .venv/bin/python piagent.py --host 0.0.0.0 --port 8000 --env-file /etc/piagent/piagent.env

Endpoints:
    GET  /health   liveness only: {"status": "ok"} (never calls Ollama)
    GET  /agents   {"agents": ["general", ...]}
    POST /chat     {"message", "agent"="general", "stream"=false, "conversation_id"?}
                   -> {"reply", "conversation_id", "model", "provider"}, or with "stream": true a chunked
                      text/plain stream of tokens and the id in the X-Conversation-Id header.

Config comes from, highest first: the real environment, the env file (PIAGENT_ENV_FILE, or piagent.env beside
this file, or --env-file), then the defaults in `Config`. piagent.env lists every variable with a comment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict, deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, NamedTuple, Protocol, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

# ---------------------------------------------------------------------------
# Config: typed settings from the environment and an optional env file
# ---------------------------------------------------------------------------

#: Name of the env file looked for beside this module when PIAGENT_ENV_FILE is not set.
DEFAULT_ENV_FILE_NAME = "piagent.env"
#: System prompt of an agent that has no AGENT_<NAME>_SYSTEM.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant running on a small computer. Answer clearly and briefly."
)
#: Agent names become parts of variable names (OLLAMA_MODEL_<NAME>), so they must be identifier-like.
AGENT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: Ollama's keep_alive: seconds as a number, or a Go duration such as "30m", "1h30m", "-1".
KEEP_ALIVE_PATTERN = re.compile(r"^-?\d+$|^-?(\d+(\.\d+)?(ns|us|ms|s|m|h))+$")
#: A key in an env file: what systemd and a POSIX shell both accept.
ENV_KEY_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: Values of PROVIDER; each names a class in the PROVIDERS mapping of the Providers section.
PROVIDER_NAMES = ("ollama",)
OLLAMA_APIS = ("chat", "generate")


class ConfigError(Exception):
    """A setting or env-file line piagent cannot use; the message names it and says what is expected."""


@dataclass(frozen=True)
class Agent:
    """A named persona: which model answers and with what system prompt."""

    name: str
    model: str
    system: str


@dataclass(frozen=True)
class Config:
    """Every setting piagent reads, with the default used when the variable is not set."""

    provider: str = "ollama"  # which entry of PROVIDERS talks to the model
    ollama_host: str = "http://127.0.0.1:11434"  # Ollama's base URL (loopback: Ollama's own default)
    ollama_api: str = "chat"  # "chat" applies the model's template; "generate" for models without one
    ollama_keep_alive: str | None = None  # e.g. "30m" so the Pi does not unload the model between chats
    ollama_connect_timeout_s: float = 5.0  # a local Ollama answers a connect at once or not at all
    ollama_timeout_s: float = 300.0  # first byte may take minutes while a Pi loads a model
    ctx_tokens: int = 2048  # options.num_ctx: the context window Ollama allocates
    max_tokens: int = 200  # options.num_predict: bounds every reply, so the Pi is never stuck on one
    temperature: float = 0.7  # options.temperature
    enable_memory: bool = True  # keep a short history per conversation_id
    memory_max_turns: int = 8  # turns (user + reply) kept per conversation: bounds prompt size
    memory_ttl_min: float = 60.0  # idle conversations are forgotten after this
    memory_max_conversations: int = 500  # least recently used beyond this are forgotten: bounds RAM
    host: str = "127.0.0.1"  # loopback by default: exposing it on the LAN is a choice
    port: int = 8000
    log_level: str = "info"
    agents: tuple[Agent, ...] = field(
        default=(Agent("general", "qwen2.5:3b-instruct", DEFAULT_SYSTEM_PROMPT),)
    )

    def agent(self, name: str) -> Agent | None:
        """The agent called `name`, or None."""
        return next((a for a in self.agents if a.name == name), None)


def parse_env_file(text: str, source: str = "env file") -> dict[str, str]:
    """Parse the KEY=value subset that systemd's EnvironmentFile= and piagent read alike.

    Whole-line `#` comments and blank lines are skipped; a value is quoted whole or not at all.
    Example: 'A=1\\n# note\\nB="two words"\\n' -> {'A': '1', 'B': 'two words'}
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        where = f"{source} line {number}"
        if not sep or not ENV_KEY_PATTERN.match(key):
            hint = " (drop 'export')" if key.startswith("export ") else ""
            raise ConfigError(f"{where}: expected KEY=value, got {raw.strip()!r}{hint}")
        values[key] = _env_file_value(value, where, key)
    return values


def _env_file_value(value: str, where: str, key: str) -> str:
    """Unquote one value, refusing what systemd would read differently from piagent."""
    if value == "":
        raise ConfigError(f"{where}: {key}= is empty; delete the line to use the default")
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1]
    elif value[0] in "\"'" or value[-1] in "\"'":
        raise ConfigError(f"{where}: {key} has an unmatched quote; quote the whole value or none of it")
    if "\\" in value or "$" in value or '"' in value:
        raise ConfigError(
            f"{where}: {key} contains a backslash, '$' or '\"', which systemd would rewrite; write the value plainly"
        )
    return value


def read_env_file(path: Path) -> dict[str, str]:
    """Read and parse an env file; a missing or unreadable file is a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror or exc}") from None
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

    def raw(self, key: str) -> str | None:
        value = self.values.get(key)
        return None if value is None or value.strip() == "" else value.strip()

    def fail(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{key}={self.values.get(key)!r} is not valid: expected {expected}")

    def text(self, key: str, default: str | None) -> str | None:
        value = self.raw(key)
        return default if value is None else value

    def choice(self, key: str, default: str, options: tuple[str, ...]) -> str:
        value = self.raw(key)
        if value is None:
            return default
        if value.lower() not in options:
            raise self.fail(key, "one of " + ", ".join(options))
        return value.lower()

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self.raw(key)
        if value is None:
            return default
        if not re.fullmatch(r"-?\d+", value) or not low <= int(value) <= high:
            raise self.fail(key, f"a whole number from {low} to {high}")
        return int(value)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise self.fail(key, f"a number from {low:g} to {high:g}") from None
        if not low <= number <= high:
            raise self.fail(key, f"a number from {low:g} to {high:g}")
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        if value.lower() not in ("true", "false", "1", "0"):
            raise self.fail(key, "true, false, 1 or 0")
        return value.lower() in ("true", "1")

    def url(self, key: str, default: str) -> str:
        value = self.text(key, default) or default
        parsed = httpx.URL(value) if re.match(r"^https?://[^/\s]+", value) else None
        if parsed is None or not parsed.host:
            raise self.fail(key, "a URL with scheme and host, like http://127.0.0.1:11434")
        return value.rstrip("/")


def _read_agents(settings: _Settings, default_model: str) -> tuple[Agent, ...]:
    """AGENTS=a,b plus OLLAMA_MODEL_<NAME> and AGENT_<NAME>_SYSTEM for each."""
    names = [n.strip().lower() for n in (settings.text("AGENTS", "general") or "general").split(",")]
    if not all(AGENT_NAME_PATTERN.match(n) for n in names) or len(set(names)) != len(names):
        raise settings.fail("AGENTS", "distinct comma-separated names of lowercase letters, digits and _")
    agents = []
    for name in names:
        upper = name.upper()
        model = settings.text(f"OLLAMA_MODEL_{upper}", default_model) or default_model
        system = settings.text(f"AGENT_{upper}_SYSTEM", DEFAULT_SYSTEM_PROMPT) or DEFAULT_SYSTEM_PROMPT
        agents.append(Agent(name, model, system))
    return tuple(agents)


def load_config(environ: Mapping[str, str], env_file: Path | None = None) -> Config:
    """Build Config from the real environment over the env file over the defaults.

    Raises ConfigError with one line naming the variable (or file line) at fault.
    """
    file_values = read_env_file(env_file) if env_file is not None else {}
    s = _Settings({**file_values, **environ})
    d = Config()
    keep_alive = s.text("OLLAMA_KEEP_ALIVE", None)
    if keep_alive is not None and not KEEP_ALIVE_PATTERN.match(keep_alive):
        raise s.fail("OLLAMA_KEEP_ALIVE", "seconds or a duration such as 30m, 1h, -1 (forever)")
    return Config(
        provider=s.choice("PROVIDER", d.provider, PROVIDER_NAMES),
        ollama_host=s.url("OLLAMA_HOST", d.ollama_host),
        ollama_api=s.choice("OLLAMA_API", d.ollama_api, OLLAMA_APIS),
        ollama_keep_alive=keep_alive,
        ollama_connect_timeout_s=s.number("OLLAMA_CONNECT_TIMEOUT_S", d.ollama_connect_timeout_s, 0.1, 600),
        ollama_timeout_s=s.number("OLLAMA_TIMEOUT_S", d.ollama_timeout_s, 0.1, 86400),
        ctx_tokens=s.integer("CTX_TOKENS", d.ctx_tokens, 128, 1_048_576),
        max_tokens=s.integer("MAX_TOKENS", d.max_tokens, 1, 1_048_576),
        temperature=s.number("TEMPERATURE", d.temperature, 0.0, 2.0),
        enable_memory=s.boolean("ENABLE_MEMORY", d.enable_memory),
        memory_max_turns=s.integer("MEMORY_MAX_TURNS", d.memory_max_turns, 1, 1000),
        memory_ttl_min=s.number("MEMORY_TTL_MIN", d.memory_ttl_min, 0.01, 525_600),
        memory_max_conversations=s.integer("MEMORY_MAX_CONVERSATIONS", d.memory_max_conversations, 1, 1_000_000),
        host=s.text("HOST", d.host) or d.host,
        port=s.integer("PORT", d.port, 1, 65535),
        log_level=s.choice("LOG_LEVEL", d.log_level, LOG_LEVELS),
        agents=_read_agents(s, s.text("OLLAMA_MODEL_GENERAL", d.agents[0].model) or d.agents[0].model),
    )


# ---------------------------------------------------------------------------
# Memory: conversation store and per-conversation locks
# ---------------------------------------------------------------------------


class Turn(NamedTuple):
    """One exchange: the user's message and the assistant's reply."""

    user: str
    assistant: str


class MemoryStore(Protocol):
    """Where conversation history lives. A new backend is one class here plus one line in MEMORY_STORES."""

    async def history(self, conversation_id: str) -> list[Turn]:
        """The kept turns, oldest first; [] for an unknown or expired conversation."""

    async def append(self, conversation_id: str, turn: Turn) -> None:
        """Store one completed turn."""


@dataclass
class _Conversation:
    turns: deque[Turn]
    last_used: float


class InProcessStore:
    """Turns per conversation in RAM, capped three ways: turns (FIFO), idle time (TTL), count (LRU).

    The OrderedDict is kept in last-use order, so both the TTL sweep and LRU eviction pop from the
    front: every operation is O(1) amortised and memory is bounded by the caps whatever the traffic.
    """

    def __init__(self, max_turns: int, ttl_s: float, max_conversations: int, clock: Callable[[], float]):
        self.max_turns = max_turns
        self.ttl_s = ttl_s
        self.max_conversations = max_conversations
        self.clock = clock
        self._conversations: OrderedDict[str, _Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._conversations)

    def _sweep(self, now: float) -> None:
        """Forget conversations idle longer than the TTL; they sit at the front."""
        while self._conversations:
            oldest = next(iter(self._conversations.values()))
            if now - oldest.last_used < self.ttl_s:
                return
            self._conversations.popitem(last=False)

    def _touch(self, conversation_id: str, now: float) -> _Conversation | None:
        conversation = self._conversations.get(conversation_id)
        if conversation is not None:
            conversation.last_used = now
            self._conversations.move_to_end(conversation_id)
        return conversation

    async def history(self, conversation_id: str) -> list[Turn]:
        now = self.clock()
        self._sweep(now)
        conversation = self._touch(conversation_id, now)
        return list(conversation.turns) if conversation else []

    async def append(self, conversation_id: str, turn: Turn) -> None:
        now = self.clock()
        self._sweep(now)
        conversation = self._touch(conversation_id, now)
        if conversation is None:
            while len(self._conversations) >= self.max_conversations:
                self._conversations.popitem(last=False)
            conversation = _Conversation(deque(maxlen=self.max_turns), now)
            self._conversations[conversation_id] = conversation
        conversation.turns.append(turn)


#: MEMORY_BACKEND name -> store class (only the in-process store so far).
MEMORY_STORES: dict[str, type] = {"memory": InProcessStore}


class ConversationLocks:
    """One asyncio.Lock per conversation in use, so two requests on one conversation never interleave.

    An entry lives only while someone holds or waits for it, so this is bounded by in-flight requests.
    """

    def __init__(self) -> None:
        self._entries: dict[str, list[Any]] = {}  # id -> [lock, holders + waiters]

    def __len__(self) -> int:
        return len(self._entries)

    def users(self, conversation_id: str) -> int:
        """How many requests hold or wait for this conversation."""
        entry = self._entries.get(conversation_id)
        return entry[1] if entry else 0

    async def acquire(self, conversation_id: str) -> None:
        entry = self._entries.setdefault(conversation_id, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._forget(conversation_id)
            raise

    def release(self, conversation_id: str) -> None:
        self._entries[conversation_id][0].release()
        self._forget(conversation_id)

    def _forget(self, conversation_id: str) -> None:
        entry = self._entries[conversation_id]
        entry[1] -= 1
        if entry[1] == 0:
            del self._entries[conversation_id]


class PendingTurn:
    """The life of one request's turn: lock the conversation, read history, store the outcome, unlock.

    With memory off it does nothing: no lock, no history, nothing stored.
    """

    def __init__(self, store: MemoryStore | None, locks: ConversationLocks, conversation_id: str, user: str):
        self.store, self.locks = store, locks
        self.conversation_id, self.user = conversation_id, user
        self._held = False

    async def begin(self) -> list[Turn]:
        """Wait for the conversation to be free; return its history."""
        if self.store is None:
            return []
        await self.locks.acquire(self.conversation_id)
        self._held = True
        try:
            return await self.store.history(self.conversation_id)
        except BaseException:
            await self.finish(None)
            raise

    async def finish(self, reply: str | None) -> None:
        """Store (user, reply) unless reply is None or empty, then unlock. Safe to call twice."""
        if not self._held:
            return
        self._held = False
        try:
            if reply:
                await self.store.append(self.conversation_id, Turn(self.user, reply))
        finally:
            self.locks.release(self.conversation_id)


# ---------------------------------------------------------------------------
# Prompt: system prompt + history + new message -> upstream messages
# ---------------------------------------------------------------------------


class Prompt(NamedTuple):
    """What an agent is asked: its system prompt, the kept history and the new message."""

    system: str
    history: list[Turn]
    message: str


def build_messages(prompt: Prompt) -> list[dict[str, str]]:
    """Chat messages for /api/chat (the model's own template renders them).

    Example: Prompt("Be brief.", [Turn("hi", "hello")], "bye") ->
      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
       {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]
    """
    messages = [{"role": "system", "content": prompt.system}]
    for turn in prompt.history:
        messages.append({"role": "user", "content": turn.user})
        messages.append({"role": "assistant", "content": turn.assistant})
    messages.append({"role": "user", "content": prompt.message})
    return messages


def render_prompt(prompt: Prompt) -> str:
    """One text prompt for /api/generate, for models without a chat template (system goes separately).

    Example: Prompt("Be brief.", [Turn("hi", "hello")], "bye") ->
      "<user>\\nhi\\n</user>\\n<assistant>\\nhello\\n</assistant>\\n<user>\\nbye\\n</user>\\n<assistant>\\n"
    """
    blocks = [f"<user>\n{t.user}\n</user>\n<assistant>\n{t.assistant}\n</assistant>\n" for t in prompt.history]
    blocks.append(f"<user>\n{prompt.message}\n</user>\n<assistant>\n")
    return "".join(blocks)


# ---------------------------------------------------------------------------
# Providers: Ollama (NDJSON)
# ---------------------------------------------------------------------------


class PiagentError(Exception):
    """An error a caller can act on; API maps it to `status` and {"error": {"code", "message"}}."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class UpstreamFailure(PiagentError):
    """The model server failed; nothing from this request is stored."""


class UpstreamUnavailable(UpstreamFailure):
    status, code = 503, "upstream_unavailable"


class ModelNotFound(UpstreamFailure):
    status, code = 502, "model_not_found"


class UpstreamBusy(UpstreamFailure):
    status, code = 503, "upstream_busy"


class UpstreamTimeout(UpstreamFailure):
    status, code = 504, "upstream_timeout"


class UpstreamError(UpstreamFailure):
    status, code = 502, "upstream_error"


#: Seconds a client is told to wait when the upstream is busy and gives no Retry-After of its own.
DEFAULT_RETRY_AFTER_S = 5


@dataclass
class Usage:
    """What the upstream reported about one generation, for the request log."""

    model: str = ""
    done_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    eval_duration_ns: int | None = None


class Provider(Protocol):
    """Talks to one kind of model server. A new provider is one class here plus one line in PROVIDERS."""

    name: str

    async def complete(self, agent: Agent, prompt: Prompt, usage: Usage) -> str:
        """The whole reply at once."""

    def stream(self, agent: Agent, prompt: Prompt, usage: Usage) -> AsyncIterator[str]:
        """The reply as text pieces, each yielded as soon as it arrives; raises UpstreamFailure."""


class OllamaProvider:
    """Ollama's native API: /api/chat (or /api/generate), streamed as NDJSON."""

    name = "ollama"

    def __init__(self, client: httpx.AsyncClient, config: Config):
        self.client = client
        self.config = config

    def _request(self, agent: Agent, prompt: Prompt, stream: bool) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) for one generation."""
        c = self.config
        body: dict[str, Any] = {
            "model": agent.model,
            "stream": stream,
            "options": {"num_ctx": c.ctx_tokens, "num_predict": c.max_tokens, "temperature": c.temperature},
        }
        if c.ollama_keep_alive is not None:
            ka = c.ollama_keep_alive
            body["keep_alive"] = int(ka) if re.fullmatch(r"-?\d+", ka) else ka
        if c.ollama_api == "generate":
            body.update(system=prompt.system, prompt=render_prompt(prompt))
            return "/api/generate", body
        body["messages"] = build_messages(prompt)
        return "/api/chat", body

    async def _raise_for_status(self, response: httpx.Response, model: str) -> None:
        """Turn an HTTP error from Ollama into the typed error a caller can act on."""
        if response.status_code < 400:
            return
        detail = _error_text(await response.aread(), response.status_code)
        if response.status_code == 404:  # both "model 'x' not found" and the older wording exist
            raise ModelNotFound(f"model {model!r} is not available in Ollama; run: ollama pull {model}")
        if response.status_code in (429, 503):
            retry = response.headers.get("retry-after", str(DEFAULT_RETRY_AFTER_S))
            raise UpstreamBusy(f"Ollama is busy ({detail}); retry shortly", {"Retry-After": retry})
        raise UpstreamError(f"Ollama answered HTTP {response.status_code}: {detail}")

    def _transport_error(self, exc: httpx.HTTPError, started: bool) -> UpstreamFailure:
        host = self.config.ollama_host
        if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
            return UpstreamUnavailable(f"cannot reach Ollama at {host}; start it (systemctl start ollama or ollama serve)")
        if isinstance(exc, httpx.ReadTimeout):
            wait = self.config.ollama_timeout_s
            if started:
                return UpstreamError(f"Ollama at {host} stopped sending for {wait:g} s mid-reply")
            return UpstreamTimeout(f"Ollama at {host} sent nothing for {wait:g} s (OLLAMA_TIMEOUT_S); is the model too big for this machine?")
        return UpstreamError(f"connection to Ollama at {host} failed: {exc.__class__.__name__}")

    async def complete(self, agent: Agent, prompt: Prompt, usage: Usage) -> str:
        path, body = self._request(agent, prompt, stream=False)
        try:
            response = await self.client.post(path, json=body)
            await self._raise_for_status(response, agent.model)
            data = response.json()
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, started=False) from None
        except ValueError:
            raise UpstreamError("Ollama sent a reply that is not JSON") from None
        if data.get("error"):
            raise UpstreamError(f"Ollama: {data['error']}")
        _record_usage(usage, data)
        return _chunk_text(data)

    async def stream(self, agent: Agent, prompt: Prompt, usage: Usage) -> AsyncIterator[str]:
        path, body = self._request(agent, prompt, stream=True)
        started = False
        try:
            async with self.client.stream("POST", path, json=body) as response:
                await self._raise_for_status(response, agent.model)
                async for line in response.aiter_lines():
                    chunk = _parse_ndjson_line(line)
                    if chunk is None:
                        continue
                    text = _chunk_text(chunk)
                    if text:
                        started = True
                        yield text
                    if chunk.get("done"):
                        _record_usage(usage, chunk)
                        return
        except httpx.HTTPError as exc:
            raise self._transport_error(exc, started) from None
        raise UpstreamError(f"Ollama at {self.config.ollama_host} ended the reply early (no done line)")


def _error_text(body: bytes, status: int) -> str:
    """The message inside an Ollama error body {"error": "..."}, else the body's start.

    Example: b'{"error":"model \\'x\\' not found"}' -> "model 'x' not found"
    """
    try:
        data = json.loads(body)
        if isinstance(data, dict) and data.get("error"):
            error = data["error"]
            return error if isinstance(error, str) else str(error.get("message", error))
    except (ValueError, AttributeError):
        pass
    return body[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"


def _parse_ndjson_line(line: str) -> dict[str, Any] | None:
    """One NDJSON line -> dict; None for a blank line; an {"error"} line raises UpstreamError."""
    if not line.strip():
        return None
    try:
        chunk = json.loads(line)
    except ValueError:
        raise UpstreamError(f"Ollama sent a line that is not JSON: {line[:80]!r}") from None
    if not isinstance(chunk, dict):
        raise UpstreamError(f"Ollama sent an unexpected line: {line[:80]!r}")
    if chunk.get("error"):
        raise UpstreamError(f"Ollama: {chunk['error']}")
    return chunk


def _chunk_text(chunk: Mapping[str, Any]) -> str:
    """The text in a chat chunk (message.content) or a generate chunk (response)."""
    message = chunk.get("message")
    if isinstance(message, dict):
        return message.get("content") or ""
    return chunk.get("response") or ""


def _record_usage(usage: Usage, final: Mapping[str, Any]) -> None:
    usage.model = final.get("model") or usage.model
    usage.done_reason = final.get("done_reason")
    usage.prompt_tokens = final.get("prompt_eval_count")
    usage.completion_tokens = final.get("eval_count")
    usage.eval_duration_ns = final.get("eval_duration")


#: PROVIDER name -> class, built as cls(httpx.AsyncClient, Config). Keys are Config's PROVIDER_NAMES.
PROVIDERS: dict[str, type] = {"ollama": OllamaProvider}


# ---------------------------------------------------------------------------
# API: request/response models, create_app(config, transport=None), routes
# ---------------------------------------------------------------------------

#: What a client may send as conversation_id (also safe in a header and a log line).
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
#: Headers that keep reverse proxies and browsers from holding streamed tokens back.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
#: The ASGI scope key where a request's log fields are gathered.
LOG_FIELDS_KEY = "piagent.log"

log = logging.getLogger("piagent")
T = TypeVar("T")


class ChatRequest(BaseModel):
    """POST /chat body."""

    message: str = Field(min_length=1, pattern=r"\S", description="the user's message; not blank")
    agent: str = Field("general", max_length=64)
    stream: bool = False
    conversation_id: str | None = Field(None, pattern=CONVERSATION_ID_PATTERN)


class ChatResponse(BaseModel):
    """POST /chat reply when not streaming."""

    reply: str
    conversation_id: str
    model: str | None = None
    provider: str | None = None


class UnknownAgent(PiagentError):
    status, code = 404, "unknown_agent"


class ClientGone(Exception):
    """The client hung up before the reply was ready; nothing is sent back."""


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it the moment the client disconnects (then raise ClientGone).

    This is what stops Ollama generating for a client that has gone while it waited for a reply.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request.receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _wait_for_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class TokenStream(Response):
    """ASGI response that writes each text piece the moment it arrives.

    Unlike Starlette's StreamingResponse it can end WITHOUT the closing zero-length chunk, so a client
    sees an upstream failure mid-reply as an incomplete transfer, never as a clean end; and it stops
    the source (closing the upstream request) the instant the client disconnects.
    """

    def __init__(self, pieces: AsyncIterator[str], headers: dict[str, str], fields: dict[str, Any]):
        self.pieces = pieces
        self.status_code, self.background = 200, None
        self.raw_headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        self.fields = fields  # request log fields; set "error" when the stream is cut

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        watcher.cancel()
        if not pump.done():
            self.fields["error"] = "client_gone"
            pump.cancel()
        (outcome,) = await asyncio.gather(pump, return_exceptions=True)
        if isinstance(outcome, Exception):  # a bug, not an upstream failure: say so, cut the stream
            self.fields["error"] = "internal_error"
            log.error("stream failed", exc_info=outcome)

    async def _pump(self, send: Callable) -> None:
        try:
            async for piece in self.pieces:
                await send({"type": "http.response.body", "body": piece.encode(), "more_body": True})
        except PiagentError as exc:
            self.fields["error"] = exc.code
            log.warning("stream cut after it began: %s: %s", exc.code, exc.message)
            return  # no closing chunk: the client must see this reply as incomplete
        finally:
            await self.pieces.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def relay(first: str | None, rest: AsyncIterator[str], turn: PendingTurn, fields: dict[str, Any]) -> AsyncIterator[str]:
    """Yield the first piece and the rest; store the turn when done or when the client left mid-way.

    An upstream failure stores nothing, so a retry never sees half a turn.
    """
    sent: list[str] = []
    failed = False
    try:
        if first:
            sent.append(first)
            yield first
        async for piece in rest:
            sent.append(piece)
            yield piece
    except UpstreamFailure:
        failed = True
        raise
    finally:
        fields["tokens"] = len(sent)
        await rest.aclose()
        await turn.finish(None if failed else "".join(sent))


def _error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def install_error_handlers(app: FastAPI) -> None:
    """The one place where errors become HTTP: every JSON error is {"error": {"code", "message"}}."""

    @app.exception_handler(PiagentError)
    async def piagent_error(request: Request, exc: PiagentError) -> JSONResponse:
        request.scope[LOG_FIELDS_KEY]["error"] = exc.code
        return JSONResponse(_error_body(exc.code, exc.message), exc.status, headers=exc.headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone) -> Response:
        request.scope[LOG_FIELDS_KEY]["error"] = "client_gone"
        return Response(status_code=499)  # nginx's code for "client closed request"; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse(_error_body("invalid_request", problems), 422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(_error_body("internal_error", "piagent hit a bug; see its log"), 500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(_error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)


class RequestLog:
    """ASGI middleware: one INFO line per request, written when the response (or stream) ends."""

    def __init__(self, app: Callable):
        self.app = app

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
        finally:
            log.info(_log_line(scope["method"], scope["path"], fields))


def _log_line(method: str, path: str, fields: dict[str, Any]) -> str:
    """Example: POST /chat 200 1234ms agent=general model=m conversation=ab12 tokens=40 ttft_ms=310"""
    ms = round((time.perf_counter() - fields["start"]) * 1000)
    extra = " ".join(
        f"{k}={fields[k]}" for k in ("agent", "model", "conversation", "tokens", "ttft_ms", "prompt_tokens", "error")
        if fields.get(k) is not None
    )
    return f"{method} {path} {fields['status'] or '-'} {ms}ms {extra}".rstrip()


def create_app(config: Config, transport: httpx.AsyncBaseTransport | None = None,
               clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """Build a piagent app for `config`. Its lifespan owns the upstream client and the memory store.

    `transport` replaces httpx's network transport (tests); `clock` drives memory TTLs (tests).
    """

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeout = httpx.Timeout(config.ollama_timeout_s, connect=config.ollama_connect_timeout_s)
        async with httpx.AsyncClient(base_url=config.ollama_host, timeout=timeout, transport=transport) as client:
            app.state.provider = PROVIDERS[config.provider](client, config)
            app.state.store = (
                MEMORY_STORES["memory"](config.memory_max_turns, config.memory_ttl_min * 60,
                                        config.memory_max_conversations, clock)
                if config.enable_memory else None
            )
            app.state.locks = ConversationLocks()
            yield

    app = FastAPI(title="piagent", lifespan=asynccontextmanager(lifespan), docs_url=None, redoc_url=None)
    app.state.config = config
    install_error_handlers(app)
    add_routes(app, config)
    app.add_middleware(RequestLog)
    return app


def add_routes(app: FastAPI, config: Config) -> None:
    """Attach /health, /agents and /chat to `app`."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/agents")
    async def agents() -> dict[str, list[str]]:
        return {"agents": [a.name for a in config.agents]}

    @app.post("/chat", response_model=ChatResponse)
    async def chat(body: ChatRequest, request: Request) -> Any:
        agent = config.agent(body.agent)
        if agent is None:
            names = ", ".join(a.name for a in config.agents)
            raise UnknownAgent(f"no agent named {body.agent!r}; available: {names}")
        conversation_id = body.conversation_id or uuid.uuid4().hex
        fields = request.scope[LOG_FIELDS_KEY]
        fields.update(agent=agent.name, model=agent.model, conversation=conversation_id)
        state = request.app.state
        turn = PendingTurn(state.store, state.locks, conversation_id, body.message)
        history = await until_disconnect(request, turn.begin())
        prompt = Prompt(agent.system, history, body.message)
        usage = Usage(model=agent.model)
        if body.stream:
            return await _start_stream(request, state.provider, agent, prompt, usage, turn, fields)
        try:
            reply = await until_disconnect(request, state.provider.complete(agent, prompt, usage))
        except BaseException:
            await turn.finish(None)
            raise
        await turn.finish(reply)
        fields.update(tokens=usage.completion_tokens, prompt_tokens=usage.prompt_tokens)
        return JSONResponse(
            ChatResponse(reply=reply, conversation_id=conversation_id, model=usage.model or agent.model,
                         provider=state.provider.name).model_dump(),
            headers={"X-Conversation-Id": conversation_id},
        )


async def _start_stream(request: Request, provider: Provider, agent: Agent, prompt: Prompt, usage: Usage,
                        turn: PendingTurn, fields: dict[str, Any]) -> TokenStream:
    """Wait for the first piece (so an early failure is still a proper HTTP error), then stream the rest."""
    pieces = provider.stream(agent, prompt, usage)
    try:
        first = await until_disconnect(request, anext(pieces, None))
    except BaseException:
        await pieces.aclose()
        await turn.finish(None)
        raise
    fields["ttft_ms"] = round((time.perf_counter() - fields["start"]) * 1000)
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Conversation-Id": turn.conversation_id,
               **STREAM_HEADERS}
    return TokenStream(relay(first, pieces, turn, fields), headers, fields)


# ---------------------------------------------------------------------------
# Entry point: main(argv=None) -> int
# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Parse flags, load config, run the server. Exit 2 with one line on a config error."""
    import argparse
    import sys

    import uvicorn

    parser = argparse.ArgumentParser(prog="piagent", description="A small agent server in front of Ollama.")
    parser.add_argument("--host", help="address to listen on (overrides HOST)")
    parser.add_argument("--port", help="port to listen on (overrides PORT)")
    parser.add_argument("--env-file", type=Path, help="env file to read (overrides PIAGENT_ENV_FILE)")
    args = parser.parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    overrides = {k: v for k, v in (("HOST", args.host), ("PORT", args.port)) if v is not None}
    try:
        env_file = args.env_file or default_env_file(environ)
        config = load_config({**environ, **overrides}, env_file)
    except ConfigError as exc:
        print(f"piagent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("piagent on http://%s:%d -> %s %s, agents: %s", config.host, config.port, config.provider,
             config.ollama_host, ", ".join(f"{a.name}={a.model}" for a in config.agents))
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
