"""Ollama's own API on piagent's port (/api/...): every Ollama app gets piagent's agents.

The client is the official `ollama` Python library (what Home Assistant uses), and assertions are on what it
parses. piagent runs under uvicorn on a loopback port in front of fake_ollama.FakeOllama (PROVIDER=ollama, or its
/v1 for PROVIDER=openai); the end-to-end tests at the bottom put it in front of llama.cpp with a real model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import Any

import httpx
import pytest

import piagent

from fake_ollama import Script, _json
from test_piagent import (DEADLINE_S, MODEL, in_background, parse_metrics, raw_post, read_until, sample,
                          wait_until)
from test_piagent import fake, serve, serve_openai, servers  # noqa: F401

if os.environ.get("CI") == "true":  # under CI a missing library is a failure, never a skip
    import ollama
else:
    ollama = pytest.importorskip("ollama", reason="pip install -r requirements-dev.txt")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
VECTOR = [0.6, 0.8]


@pytest.fixture
def upstream(fake):  # noqa: F811
    """The fake, also answering Ollama's /api/show, /api/ps and /api/embed and /v1/embeddings (as Ollama does)."""
    original = fake._dispatch

    async def dispatch(req, reader, writer):
        body = req.body or {}
        answers = {
            "/api/show": lambda: _json(200, {"template": "{{ .Prompt }}", "capabilities": ["completion", "tools"],
                                             "model_info": {"general.architecture": "qwen2"},
                                             "details": {"family": "qwen2", "parameter_size": "3.1B"}}),
            "/api/ps": lambda: _json(200, {"models": [{"name": MODEL, "model": MODEL, "size": 5, "digest": "d" * 64,
                                                       "expires_at": "2030-01-01T00:00:00Z", "size_vram": 0,
                                                       "context_length": 4096}]}),
            "/api/embed": lambda: _json(200, {"model": body.get("model"), "prompt_eval_count": 3,
                                              "embeddings": [VECTOR for _ in body.get("input", [])]}),
            "/v1/embeddings": lambda: _json(200, {"object": "list", "usage": {"prompt_tokens": 4, "total_tokens": 4},
                                                  "data": [{"object": "embedding", "index": i, "embedding": VECTOR}
                                                           for i, _ in enumerate(body.get("input", []))]}),
        }
        if req.path not in answers:
            return await original(req, reader, writer)
        fake.requests.append(req)
        writer.write(answers[req.path]())
        await writer.drain()
        return True

    fake._dispatch = dispatch
    return fake


def client(server, **kwargs) -> "ollama.Client":
    return ollama.Client(host=server.url, timeout=DEADLINE_S, **kwargs)


def received(fake, path: str) -> list[dict]:
    return [r.body for r in list(fake.requests) if r.path == path]


# ---------------------------------------------------------------------------
# Model lists: tags, show, ps, version, the / probe
# ---------------------------------------------------------------------------


def test_list_shows_each_agent_as_a_tagged_model_with_its_models_details(serve, upstream):
    server = serve(AGENTS="general,coder")
    models = client(server).list().models
    assert [m.model for m in models] == ["general:latest", "coder:latest"]
    assert models[0].details.family == "qwen2" and models[0].details.parameter_size == "3.1B"
    assert models[0].size == 1_929_912_432 and len(models[0].digest) == 64 and models[0].modified_at
    raw = httpx.get(f"{server.url}/api/tags").json()["models"][0]
    assert raw["name"] == raw["model"] == "general:latest"  # Open WebUI reads both
    assert httpx.head(f"{server.url}/api/tags").status_code == 200


def test_list_answers_with_sane_details_when_the_upstream_is_down(serve, fake):  # noqa: F811
    server = serve(OLLAMA_HOST="http://127.0.0.1:9")
    (model,) = client(server).list().models
    assert model.model == "general:latest" and model.details.format == "gguf" and model.size == 0


def test_show_gives_details_model_info_capabilities_and_the_agents_prompt(serve, upstream):
    shown = client(server := serve(AGENT_GENERAL_SYSTEM="Be brief.")).show("general")
    assert shown.modelinfo == {"general.architecture": "qwen2"} and shown.details.family == "qwen2"
    assert shown.capabilities == ["completion", "tools"]
    assert httpx.post(f"{server.url}/api/show", json={"model": "general"}).json()["system"] == "Be brief."
    assert isinstance(shown.template, str) and "num_ctx 2048" in shown.parameters and shown.modified_at
    assert received(upstream, "/api/show")[0] == {"model": MODEL}
    with pytest.raises(ollama.ResponseError) as info:
        client(server).show("nope")
    assert info.value.status_code == 404 and info.value.error == "model 'nope' not found"


def test_show_is_a_read_free_of_the_rate_limit_as_the_model_list_is(serve, upstream):
    """Ollama's clients show a model before they chat with it: with 2 chats a minute, 2 chats still go through."""
    server = serve(RATE_LIMIT_PER_MIN=2)
    for _ in range(3):
        assert client(server).show("general").capabilities == ["completion", "tools"]
        assert client(server).list().models
    assert [client(server).chat("general", [{"role": "user", "content": "hi"}]).done for _ in range(2)] == [True] * 2
    with pytest.raises(ollama.ResponseError) as info:
        client(server).chat("general", [{"role": "user", "content": "hi"}])
    assert info.value.status_code == 429


def test_model_reads_reach_ollama_once_per_path_and_model_while_an_answer_is_fresh(serve, upstream):
    """/api/tags, /api/ps and /api/show are free of the rate limit, and each was a call to Ollama, which reads its
    model files for it: a helper's 600 of them in 1.4 s were 600 calls. Those asking while one call is out, or
    within MODEL_INFO_REUSE_S of its answer, now share that answer."""
    now = [1_000_000.0]
    server = serve(clock=lambda: now[0], AGENTS="general,coder", OLLAMA_MODEL_CODER="tiny")

    async def flood(times: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE_S) as c:
            return await asyncio.gather(*(call for _ in range(times) for call in (
                c.get("/api/tags"), c.get("/api/ps"), c.post("/api/show", json={"model": "general"}),
                c.post("/api/show", json={"model": "coder"}))))

    answers = asyncio.run(flood(20))
    assert [r.status_code for r in answers] == [200] * 80
    assert len({r.content for r in answers[2::4]}) == 1 and answers[2].json()["capabilities"] == ["completion", "tools"]
    counts = {path: len(received(upstream, path)) for path in ("/api/tags", "/api/ps", "/api/show")}
    assert counts == {"/api/tags": 1, "/api/ps": 1, "/api/show": 2}, counts
    assert sorted(body["model"] for body in received(upstream, "/api/show")) == [MODEL, "tiny"]
    asyncio.run(flood(1))  # still fresh
    now[0] += piagent.MODEL_INFO_REUSE_S  # then asked again
    assert httpx.get(f"{server.url}/api/tags", timeout=DEADLINE_S).json()["models"][0]["details"]["family"] == "qwen2"
    assert len(received(upstream, "/api/tags")) == 2 and len(received(upstream, "/api/show")) == 2
    now[0] -= 3600  # the wall clock stepped back (NTP, or a Pi with no clock set): no answer is kept the longer
    httpx.get(f"{server.url}/api/tags", timeout=DEADLINE_S).raise_for_status()
    assert len(received(upstream, "/api/tags")) == 3


def test_ready_polls_reach_the_upstream_once_while_an_answer_is_fresh(serve, upstream):
    """/ready is free of the rate limit too, and each poll probed the upstream (Ollama's version and model list): a
    helper's 300 polls were 300 probes, and a slow one held connections the generations use. They share an answer
    as the model reads do."""
    now = [1_000_000.0]
    server = serve(clock=lambda: now[0])

    async def flood(times: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=DEADLINE_S) as c:
            return await asyncio.gather(*(c.get("/ready") for _ in range(times)))

    answers = asyncio.run(flood(40))
    assert {r.json()["checks"]["upstream"]["ok"] for r in answers} == {True}, answers[0].text
    probes = len(received(upstream, "/api/version"))
    assert probes == 1, probes
    now[0] += piagent.MODEL_INFO_REUSE_S  # then asked again
    assert httpx.get(f"{server.url}/ready", timeout=DEADLINE_S).json()["checks"]["models"]["ok"]
    assert len(received(upstream, "/api/version")) == 2


def test_a_shared_call_given_up_by_its_asker_fails_the_waiting_once_and_the_next_asks_again():
    """shared(): when the caller that asked leaves (cancelled: shutdown, or its own time limit), those waiting on its
    answer get a typed 503 rather than hang or see a CancelledError, and the next caller asks afresh."""
    rt = piagent.create_app(piagent.load_config({})).state.runtime
    key, asked = ("probe",), []

    async def scenario() -> tuple[Any, Any]:
        started, never = asyncio.Event(), asyncio.Event()

        async def slow() -> str:
            asked.append("slow")
            started.set()
            await never.wait()
            return "never"

        async def fresh() -> str:
            asked.append("fresh")
            return "fresh"

        async def wait_on_it() -> str:
            entered.set()  # nothing between this and shared()'s wait on the answer yields to the loop
            return await piagent.shared(rt, key, fresh)

        first, entered = asyncio.create_task(piagent.shared(rt, key, slow)), asyncio.Event()
        await asyncio.wait_for(started.wait(), DEADLINE_S)
        waiting = asyncio.create_task(wait_on_it())
        await asyncio.wait_for(entered.wait(), DEADLINE_S)
        first.cancel()
        outcome = await asyncio.wait_for(asyncio.gather(first, waiting, return_exceptions=True), DEADLINE_S)
        return outcome, await piagent.shared(rt, key, fresh)

    (first, waiting), after = asyncio.run(scenario())
    assert isinstance(first, asyncio.CancelledError)
    assert isinstance(waiting, piagent.UpstreamUnavailable) and "ask again" in str(waiting)
    assert (after, asked) == ("fresh", ["slow", "fresh"])


def test_show_without_an_ollama_upstream_still_has_model_info(serve_openai):  # noqa: F811
    shown = client(serve_openai(AGENT_GENERAL_TOOLS="calc")).show("general:latest")
    assert shown.modelinfo == {} and shown.capabilities == ["completion", "tools"]


def test_ps_lists_the_agents_whose_model_is_loaded(serve, upstream):
    (loaded,) = client(serve(AGENTS="general,coder", OLLAMA_MODEL_CODER="tiny")).ps().models
    assert loaded.model == "general:latest" and loaded.context_length == 2048 and loaded.expires_at.year == 2030


def test_version_is_dotted_and_says_piagent(serve, fake):  # noqa: F811
    response = httpx.get(f"{serve().url}/api/version")
    assert response.json() == {"version": "0.12.6"} and response.headers["x-piagent"] == "1"


@pytest.mark.parametrize("ui", ["true", "false"])
def test_root_is_ollamas_probe_for_clients_and_the_page_for_browsers_without_a_key(serve, fake, ui):  # noqa: F811
    server = serve(ENABLE_UI=ui, API_KEYS="k" * 16)
    probe = httpx.get(server.url, headers={"Accept": "*/*"})
    assert (probe.status_code, probe.text, probe.headers["content-type"]) == (
        200, "Ollama is running", "text/plain; charset=utf-8")
    assert httpx.head(server.url).status_code == 200
    browser = httpx.get(server.url, headers={"Accept": "text/html,application/xhtml+xml"})
    assert browser.headers["content-type"].startswith("text/html" if ui == "true" else "text/plain")


# ---------------------------------------------------------------------------
# Chat and generate through the library
# ---------------------------------------------------------------------------


def test_chat_not_streamed_gives_the_reply_with_ollamas_counts(serve, fake):  # noqa: F811
    reply = client(serve(AGENT_GENERAL_SYSTEM="Be brief.")).chat(
        "general", messages=[{"role": "system", "content": "Mind the house."}, {"role": "user", "content": "hi"}])
    assert reply.message.role == "assistant" and reply.message.content == "Hello from the Pi!"
    assert reply.done and reply.done_reason == "stop" and reply.model == "general"
    assert reply.eval_count == 5 and reply.prompt_eval_count > 0 and reply.total_duration > 0
    (sent,) = fake.generations()
    assert sent.body["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "system", "content": "Mind the house."}, {"role": "user", "content": "hi"}]


def test_chat_streamed_arrives_piece_by_piece_and_ends_with_done(serve, fake):  # noqa: F811
    parts = list(client(serve()).chat("general:latest", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert [p.message.content for p in parts] == ["Hello", " from", " the", " Pi", "!", ""]
    assert [p.done for p in parts] == [False] * 5 + [True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == 5
    for name in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(last, name), int), name


def test_stream_is_the_default_ndjson_with_no_blank_line(serve, fake):  # noqa: F811
    # curl -d sends no JSON content type and no "stream": Ollama streams and reads the JSON anyway
    response = httpx.post(f"{serve().url}/api/chat", content=json.dumps(
        {"model": "general", "messages": [{"role": "user", "content": "hi"}]}),
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = response.text.split("\n")
    assert lines[-1] == "" and all(lines[:-1])
    assert [json.loads(line)["done"] for line in lines[:-1]] == [False] * 5 + [True]


def test_generate_streamed_and_not(serve, fake):  # noqa: F811
    c = client(serve())
    whole = c.generate("general", "hi", system="Short answers.")
    assert whole.response == "Hello from the Pi!" and whole.done and whole.done_reason == "stop"
    assert fake.generations()[0].body["messages"][:2] == [
        {"role": "system", "content": piagent_default_prompt()}, {"role": "system", "content": "Short answers."}]
    parts = list(c.generate("general", "hi", stream=True))
    assert "".join(p.response for p in parts) == "Hello from the Pi!" and parts[-1].done


def piagent_default_prompt() -> str:
    import piagent

    return piagent.DEFAULT_SYSTEM_PROMPT


def test_a_load_or_unload_answers_at_once_and_goes_nowhere(serve, fake):  # noqa: F811
    server = serve()
    loaded = httpx.post(f"{server.url}/api/generate", json={"model": "general"}).json()
    unloaded = httpx.post(f"{server.url}/api/generate", json={"model": "general", "keep_alive": 0, "prompt": ""})
    chat_load = client(server).chat("general", messages=[])
    assert (loaded["done_reason"], unloaded.json()["done_reason"], chat_load.done_reason) == ("load", "unload", "load")
    assert not fake.requests


@pytest.mark.parametrize("stream", [False, True])
def test_the_models_calls_of_the_clients_tools_come_back_whole_and_a_tool_round_passes_through(serve, fake, stream):  # noqa: F811,E501
    fake.script = Script(tool_rounds=[[("get_weather", {"city": "Paris"})]], echo_tools=True)
    c = client(serve(AGENT_GENERAL_TOOLS="calc"))  # the agent's own tools stay out when the client brings some
    messages = [{"role": "user", "content": "weather in Paris?"}]
    reply = c.chat("general", messages=messages, tools=[WEATHER], stream=stream)
    message = list(reply)[-2].message if stream else reply.message
    (call,) = message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    assert fake.generations()[0].body["tools"] == [WEATHER]
    # the client runs it and sends the result back, as Home Assistant does (tool_name, no id)
    messages += [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"data": "sunny"}', "tool_name": "get_weather"}]
    answer = c.chat("general", messages=messages, tools=[WEATHER])
    assert answer.message.content == 'results: {"data": "sunny"}' and not answer.message.tool_calls
    sent = fake.generations()[-1].body["messages"]
    assert sent[-2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert sent[-1]["tool_name"] == "get_weather" and sent[-1]["content"] == '{"data": "sunny"}'


def test_an_agents_own_tools_run_when_the_client_sends_none(serve, fake):  # noqa: F811
    fake.script = Script(tool_rounds=[[("calc", {"expression": "6*7"})]], echo_tools=True)
    reply = client(serve(AGENT_GENERAL_TOOLS="calc")).chat("general", messages=[{"role": "user", "content": "6*7?"}],
                                                          tools=[])  # the library always sends "tools": []
    assert reply.message.content == "results: 42" and not reply.message.tool_calls


def test_embed_uses_the_agents_model_or_embed_model(serve, upstream):
    server = serve()
    result = client(server).embed("general", ["a", "b"])
    assert result.embeddings == [VECTOR, VECTOR] and result.prompt_eval_count == 3
    assert received(upstream, "/api/embed") == [{"model": MODEL, "input": ["a", "b"]}]
    other = serve(EMBED_MODEL="nomic-embed-text")
    legacy = httpx.post(f"{other.url}/api/embeddings", json={"model": "general", "prompt": "a"}).json()
    assert legacy == {"embedding": VECTOR} and received(upstream, "/api/embed")[-1]["model"] == "nomic-embed-text"


@pytest.mark.parametrize("asked, sent", [(1024, 1024), (8192, 2048), (True, 2048), (-1, 2048), ("big", 2048)])
def test_embed_keeps_num_ctx_within_ctx_tokens_as_chat_does(serve, upstream, asked, sent):
    response = httpx.post(f"{serve().url}/api/embed", json={"model": "general", "input": "a",
                                                             "options": {"num_ctx": asked}})
    assert response.status_code == 200
    assert received(upstream, "/api/embed")[-1]["options"] == {"num_ctx": sent}


def test_an_embed_whose_client_leaves_frees_its_place_in_line_and_its_call_upstream(serve, upstream):
    """An embed is run as a generation is: a client that leaves while it waits for the slot takes its place in line
    with it (the upstream never hears of it), and one that leaves mid-call closes the upstream request."""
    answering, inner = [], upstream._dispatch

    async def dispatch(req, reader, writer):  # "held": the upstream answers only once piagent hangs up
        if req.path == "/api/embed" and (req.body or {}).get("input") == ["held"]:
            upstream.requests.append(req)
            answering.append(req)
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), DEADLINE_S)  # b"": piagent closed the connection
            upstream.hangups.append(time.monotonic())
            return False
        return await inner(req, reader, writer)

    upstream._dispatch = dispatch
    upstream.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1, MAX_QUEUE=1)
    gate = server.app.state.runtime.gate
    with httpx.stream("POST", f"{server.url}/chat", json={"message": "a", "stream": True}, timeout=DEADLINE_S) as held:
        pieces = held.iter_text()  # kept: a dropped iterator would close the response
        assert next(pieces) == "A1"  # the slot is taken
        waiting = raw_post(server.port, "/api/embed", {"model": "general", "input": ["queued"]})
        wait_until(lambda: gate.queued == 1, what="the embed to wait in line")
        waiting.close()
        wait_until(lambda: gate.queued == 0, what="the embed to leave the line with its client")
        upstream.script.release.set()
        assert "".join(pieces) == "A2"
    mid_call = raw_post(server.port, "/api/embed", {"model": "general", "input": ["held"]})
    wait_until(lambda: answering, what="the embed to reach the upstream")
    mid_call.close()
    wait_until(lambda: upstream.hangups, what="piagent to close the upstream embed request")
    wait_until(lambda: gate.active == 0, what="the slot to be free")
    assert [r.body["input"] for r in upstream.requests if r.path == "/api/embed"] == [["held"]]  # never ["queued"]
    assert client(server).embed("general", "next").embeddings == [VECTOR]


def test_an_embed_takes_long_texts_and_many_as_ollama_does_within_the_body_limit(serve, upstream):
    server = serve(MAX_MESSAGE_CHARS=100)  # what a person types; a document's chunks are not that
    paragraph = "The Pi sits next to the router. " * 60  # 1,920 characters: a RAG chunk, one text
    assert client(server).embed("general", paragraph).embeddings == [VECTOR]  # was refused as "1920 items"
    assert received(upstream, "/api/embed")[-1]["input"] == [paragraph]
    chunks = [f"chunk {i}" for i in range(300)]  # LangChain sends a whole document's chunks at once
    assert client(server).embed("general", chunks).embeddings == [VECTOR] * 300  # was a 400 past 256
    assert received(upstream, "/api/embed")[-1]["input"] == chunks
    with pytest.raises(ollama.ResponseError) as info:
        client(server).embed("general", ["x" * 1000] * 70)  # 70 KB: over MAX_BODY_BYTES
    assert info.value.status_code == 413 and "MAX_BODY_BYTES" in info.value.error
    assert len(received(upstream, "/api/embed")) == 2

def test_embed_with_an_openai_upstream_uses_v1_embeddings(serve_openai, upstream):
    assert client(serve_openai()).embed("general", "a").embeddings == [VECTOR]
    assert received(upstream, "/v1/embeddings") == [{"model": MODEL, "input": ["a"]}]


@pytest.mark.parametrize("path", ["/api/pull", "/api/push", "/api/create", "/api/copy"])
def test_model_management_is_refused_saying_what_to_do(serve, fake, path):  # noqa: F811
    response = httpx.post(f"{serve().url}{path}", json={"model": "llama3.2"})
    assert response.status_code == 403 and "ollama pull llama3.2" in response.json()["error"]
    odd = httpx.post(f"{serve().url}{path}", json={"model": {"a": 1}})  # no name: the placeholder, not a repr
    assert odd.status_code == 403 and "ollama pull <model>" in odd.json()["error"], odd.text
    assert not fake.requests


def test_a_refused_pull_names_the_providers_model_setting(serve_openai):  # noqa: F811
    error = httpx.post(f"{serve_openai().url}/api/pull", json={"model": "general"}).json()["error"]
    assert f"load {MODEL} in the model server" in error and "OPENAI_MODEL_<AGENT>" in error, error


def test_the_library_sees_a_refused_pull_and_delete(serve, fake):  # noqa: F811
    c = client(serve())
    with pytest.raises(ollama.ResponseError) as info:
        c.pull("general")
    assert info.value.status_code == 403 and f"ollama pull {MODEL}" in info.value.error  # general's model
    assert "OLLAMA_MODEL_<AGENT>" in info.value.error
    with pytest.raises(ollama.ResponseError):
        c.delete("general")
    assert httpx.post(f"{serve().url}/api/blobs/sha256:{'0' * 64}", content=b"x").status_code == 403
    assert httpx.head(f"{serve().url}/api/blobs/sha256:{'0' * 64}").status_code == 403  # was 405
    assert not fake.requests


def test_a_key_goes_through_headers_and_errors_are_ollamas_shape(serve, fake):  # noqa: F811
    server = serve(API_KEYS="a-long-test-key")
    with pytest.raises(ollama.ResponseError) as info:
        client(server).list()
    assert info.value.status_code == 401 and "API key" in info.value.error
    keyed = client(server, headers={"Authorization": "Bearer a-long-test-key"})
    assert keyed.list().models and keyed.chat("general", messages=[{"role": "user", "content": "hi"}]).message.content
    assert httpx.get(f"{server.url}/api/tags", headers={"X-API-Key": "a-long-test-key"}).status_code == 200
    bad = httpx.post(f"{server.url}/api/chat", json={"messages": []}, headers={"X-API-Key": "a-long-test-key"})
    assert bad.status_code == 400 and set(bad.json()) == {"error"} and "model" in bad.json()["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_think_the_model_refuses_is_ollamas_own_400_not_a_502(serve, fake, stream):  # noqa: F811
    fake.script = Script(status=400, error_text=f'"{MODEL}" does not support thinking')
    server = serve()
    with pytest.raises(ollama.ResponseError) as info:
        list(client(server).chat("general", messages=[{"role": "user", "content": "hi"}], think=True, stream=True)) \
            if stream else client(server).chat("general", messages=[{"role": "user", "content": "hi"}], think=True)
    assert info.value.status_code == 400 and "does not support thinking" in info.value.error
    fake.script = Script()
    assert client(server).chat("general", messages=[{"role": "user", "content": "hi"}]).message.content


def test_a_refusal_of_what_the_model_cannot_do_stays_the_operators_502_whatever_the_client_sent(serve, fake):  # noqa: F811,E501
    """Home Assistant always sends keep_alive, options.num_ctx and think: false; none of them is why an agent whose
    model is embedding-only is refused, and the fix (the agent's model) is the operator's."""
    fake.script = Script(status=400, error_text=f'"{MODEL}" does not support chat')
    server = serve()
    with pytest.raises(ollama.ResponseError) as info:
        client(server).chat("general", messages=[{"role": "user", "content": "hi"}], keep_alive="5m", think=False,
                            options={"num_ctx": 8192, "temperature": 0.1})
    assert info.value.status_code == 502 and "does not support chat" in info.value.error
    metrics = parse_metrics(httpx.get(f"{server.url}/metrics").text)
    assert sample(metrics, "piagent_upstream_errors_total", "piagent_upstream_errors", code="upstream_error") == 1
    fake.script = Script()
    assert client(server).chat("general", messages=[{"role": "user", "content": "hi"}]).message.content


def test_an_embed_input_the_upstream_refuses_is_a_400_and_frees_the_slot(serve, upstream):
    inner = upstream._dispatch

    async def dispatch(req, reader, writer):  # Ollama's answer to an over-long input with truncate: false
        if req.path == "/api/embed" and (req.body or {}).get("truncate") is False:
            upstream.requests.append(req)
            writer.write(_json(400, {"error": "the input length exceeds the context length"}))
            await writer.drain()
            return True
        return await inner(req, reader, writer)

    upstream._dispatch = dispatch
    server = serve(MAX_CONCURRENT=1, MAX_QUEUE=0)
    with pytest.raises(ollama.ResponseError) as info:
        client(server).embed("general", "a" * 3000, truncate=False)
    assert info.value.status_code == 400 and "exceeds the context length" in info.value.error
    assert client(server).embed("general", "short").embeddings == [VECTOR]  # the only slot is free


def test_an_apps_long_system_prompt_and_tool_results_are_bounded_by_the_context_not_max_message_chars(serve, fake):  # noqa: F811,E501
    """Home Assistant's system prompt lists the house (thousands of characters) and its tools answer at length:
    each was a 413 past MAX_MESSAGE_CHARS, which bounds what a person types, the newest user message."""
    server, house = serve(MAX_MESSAGE_CHARS=100, CTX_TOKENS=8192), "light.kitchen: on\n" * 300  # 5,400 characters
    call = {"function": {"name": "GetLiveContext", "arguments": {}}}
    messages = [{"role": "system", "content": house}, {"role": "user", "content": "lights?"},
                {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": house}]
    assert client(server).chat("general", messages=messages, tools=[WEATHER]).message.content
    assert [m["content"] for m in fake.generations()[-1].body["messages"]].count(house) == 2  # whole, both
    with pytest.raises(ollama.ResponseError) as info:
        client(server).chat("general", messages=[{"role": "user", "content": "x" * 101}])
    assert info.value.status_code == 413 and "MAX_MESSAGE_CHARS" in info.value.error
    with pytest.raises(ollama.ResponseError) as info:  # past the context: refused, with the setting to raise
        client(serve(CTX_TOKENS=1024)).chat("general", messages=messages)
    assert info.value.status_code == 413 and "CTX_TOKENS" in info.value.error
    assert len(fake.generations()) == 1


def test_nulls_and_a_capitalised_role_are_read_as_ollamas_go_server_reads_them(serve, upstream):
    """A null is a field not sent (stream null streams, content null is empty) and roles are lower-cased, as
    Ollama's encoding/json decode does; each was a 400."""
    url = serve().url
    chat = httpx.post(f"{url}/api/chat", timeout=DEADLINE_S, json={
        "model": "general", "stream": None, "format": None, "messages": [
            {"role": "User", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "USER", "content": "and?"}]})
    assert chat.status_code == 200 and chat.headers["content-type"] == "application/x-ndjson", chat.text
    assert [m["role"] for m in upstream.generations()[-1].body["messages"]][-3:] == ["user", "assistant", "user"]
    loaded = httpx.post(f"{url}/api/generate", json={"model": "general", "prompt": None, "stream": False})
    assert loaded.status_code == 200 and loaded.json()["done_reason"] == "load"
    embedded = httpx.post(f"{url}/api/embed", json={"model": "general", "input": None})
    assert embedded.status_code == 200 and embedded.json()["embeddings"] == []
    assert httpx.post(f"{url}/api/chat", json={"model": None, "messages": []}).status_code == 400  # still required


def test_client_tools_on_api_chat_follow_ollamas_rules_not_openais(serve, fake):  # noqa: F811
    """Dotted names (MCP bridges), no "type", long descriptions and more than 64 tools (Home Assistant, a script
    each) are Ollama's to take; each was a 400 under /v1's rules."""
    tools = [{"function": {"name": f"house.script_{i}", "description": "d" * 5000 if i == 0 else "a script",
                           "parameters": {"type": "object"}}} for i in range(80)]
    tools[1]["type"] = None  # as not sent
    reply = client(serve(MAX_BODY_BYTES=200_000, CTX_TOKENS=16384)).chat("general", messages=[{"role": "user", "content": "hi"}],
                                                       tools=tools)
    assert reply.message.content == "Hello from the Pi!"
    sent = fake.generations()[-1].body["tools"]
    assert len(sent) == 80 and sent[0] == {"type": "function", **tools[0]} and sent[1]["type"] == "function"


@pytest.mark.parametrize("fields", [{"suffix": "\nprint(add(1, 2))\n"}, {"raw": True}, {"template": "{{ .Prompt }}"}])
def test_fill_in_the_middle_and_raw_prompts_are_refused_not_dropped_unsaid(serve, fake, fields):  # noqa: F811
    """An editor's autocomplete (suffix) got a chat reply to the prefix alone, with the suffix dropped unsaid."""
    server = serve()
    with pytest.raises(ollama.ResponseError) as info:
        client(server).generate("general", "def add(a, b):\n    ", **fields)
    assert info.value.status_code == 400 and next(iter(fields)) in info.value.error and "Ollama" in info.value.error
    assert fake.generations() == []
    assert client(server).generate("general", "hi").response == "Hello from the Pi!"


def test_unknown_model_is_ollamas_404(serve, fake):  # noqa: F811
    with pytest.raises(ollama.ResponseError) as info:
        client(serve()).chat("nope:7b", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404 and info.value.error == "model 'nope:7b' not found"


# ---------------------------------------------------------------------------
# What reaches the upstream (PROVIDER=ollama, and translated for PROVIDER=openai)
# ---------------------------------------------------------------------------

CLIENT_OPTIONS = {"num_ctx": 8192, "num_predict": 5000, "temperature": 0.2, "top_k": 7, "top_p": 0.5, "seed": 3,
                  "stop": ["\n\n"]}


def test_options_keep_alive_format_and_think_reach_ollama_within_the_ceilings(serve, fake):  # noqa: F811
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    client(serve(MAX_TOKENS=100, CTX_TOKENS=2048)).chat(
        "general", messages=[{"role": "user", "content": "hi"}], options=CLIENT_OPTIONS, keep_alive=-1,
        format=schema, think=False, tools=[WEATHER])
    (sent,) = fake.generations()
    assert sent.body["options"] == {**CLIENT_OPTIONS, "num_ctx": 2048, "num_predict": 100}  # lowered, not raised
    assert (sent.body["keep_alive"], sent.body["format"], sent.body["think"]) == (-1, schema, False)
    assert sent.body["tools"] == [WEATHER]


def test_a_lower_num_ctx_and_num_predict_are_the_clients_to_choose(serve, fake):  # noqa: F811
    client(serve(OLLAMA_KEEP_ALIVE="30m")).generate("general", "hi", options={"num_ctx": 1024, "num_predict": 9})
    (sent,) = fake.generations()
    assert (sent.body["options"]["num_ctx"], sent.body["options"]["num_predict"], sent.body["keep_alive"]) == (
        1024, 9, "30m")  # with no keep_alive of the client's, OLLAMA_KEEP_ALIVE applies


def test_openai_upstream_gets_the_options_it_has_an_equivalent_for(serve_openai, fake):  # noqa: F811
    client(serve_openai(MAX_TOKENS=100)).chat("general", messages=[{"role": "user", "content": "hi"}],
                                              options=CLIENT_OPTIONS, format="json", keep_alive="5m")
    (sent,) = fake.generations()
    body = {k: v for k, v in sent.body.items() if k != "messages"}
    assert body == {"model": MODEL, "stream": False, "max_tokens": 100, "temperature": 0.2, "top_p": 0.5, "seed": 3,
                    "stop": ["\n\n"], "response_format": {"type": "json_object"}}


def test_conversation_header_uses_piagents_memory(serve, fake):  # noqa: F811
    c = client(serve(), headers={"X-Conversation-Id": "kitchen"})
    c.chat("general", messages=[{"role": "user", "content": "I am Ada."}])
    c.chat("general", messages=[{"role": "user", "content": "Who am I?"}])
    assert [m["content"] for m in fake.generations()[1].body["messages"][1:]] == [
        "I am Ada.", "Hello from the Pi!", "Who am I?"]


# ---------------------------------------------------------------------------
# Failures, the queue, a client leaving, metrics
# ---------------------------------------------------------------------------


def test_mid_stream_failure_is_an_error_line_and_a_clean_end(serve, fake):  # noqa: F811
    fake.script = Script(error_after=2)
    server = serve()
    with httpx.stream("POST", f"{server.url}/api/chat", json={
            "model": "general", "messages": [{"role": "user", "content": "hi"}]}) as response:
        lines = [json.loads(line) for line in response.iter_lines()]  # a cut transfer would raise here
    assert [line.get("message", {}).get("content") for line in lines[:2]] == ["Hello", " from"]
    assert set(lines[2]) == {"error"} and "error was encountered" in lines[2]["error"] and len(lines) == 3
    with pytest.raises(ollama.ResponseError) as info:
        list(client(server).chat("general", messages=[{"role": "user", "content": "hi"}], stream=True))
    assert "error was encountered" in info.value.error


def test_queue_full_is_503_with_retry_after_in_ollamas_shape(serve, fake):  # noqa: F811
    fake.script = Script(tokens=["A1", "A2"], hold_after=1)
    server = serve(MAX_CONCURRENT=1, MAX_QUEUE=1)
    gate = server.app.state.runtime.gate
    ask = {"model": "general", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    with httpx.stream("POST", f"{server.url}/api/chat", json={**ask, "stream": True}) as first:
        lines = first.iter_lines()
        assert json.loads(next(lines))["message"]["content"] == "A1"
        waiter, result = in_background(httpx.post, f"{server.url}/api/chat", json=ask, timeout=DEADLINE_S)
        wait_until(lambda: gate.queued == 1, what="the second request to queue")
        refused = httpx.post(f"{server.url}/api/chat", json=ask)
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0
        assert set(refused.json()) == {"error"} and "MAX_QUEUE" in refused.json()["error"]
        fake.script.release.set()
        list(lines)
    waiter.join(DEADLINE_S)
    assert result["value"].status_code == 200


def test_client_leaving_mid_stream_hangs_up_on_the_upstream_within_a_second(serve, fake):  # noqa: F811
    fake.script = Script(tokens=["Hello", " there"] + [" more"] * 50, token_delay_s=0.05, hold_after=2)
    server = serve()
    sock = raw_post(server.port, "/api/chat", {"model": "general", "messages": [{"role": "user", "content": "hi"}]})
    read_until(sock, b"there")
    sock.close()
    gone_at = time.monotonic()
    wait_until(lambda: fake.hangups, timeout=1.0, what="the fake to see the hang-up")
    assert fake.hangups[0] - gone_at < 1.0 and fake.completed == 0


def test_requests_are_counted_under_their_route(serve, fake):  # noqa: F811
    server = serve()
    client(server).chat("general", messages=[{"role": "user", "content": "hi"}])
    client(server).list()
    families = None

    def counted() -> bool:
        nonlocal families
        families = parse_metrics(httpx.get(f"{server.url}/metrics").text)
        return any(s.labels.get("route") == "/api/tags" for s in families["piagent_requests"].samples)

    wait_until(counted, what="both requests counted")
    assert sample(families, "piagent_requests_total", "piagent_requests", route="/api/chat", status="200") == 1


# ---------------------------------------------------------------------------
# End to end: the ollama library -> piagent -> llama.cpp with SmolLM2 (test_e2e.py's server)
# ---------------------------------------------------------------------------

LLAMA_CPP = pytest.mark.xdist_group("llama.cpp")  # test_e2e.py's group: on the worker that runs its tests


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from test_e2e import run_llm

    yield from run_llm(tmp_path_factory)


@pytest.fixture(scope="module")
def real(llm):
    from test_e2e import serve_piagent

    yield from serve_piagent(llm)


@LLAMA_CPP
def test_e2e_ollama_library_chats_through_piagent_with_a_real_model(real, llm):
    from test_e2e import prime

    c = ollama.Client(host=real, timeout=120)
    messages = [{"role": "user", "content": "Say something about the sea."}]
    prime(llm)
    whole = c.chat("general", messages=messages)
    assert whole.message.content.strip() and whole.done_reason in ("stop", "length") and whole.eval_count > 0
    prime(llm)
    parts = list(c.chat("general", messages=messages, stream=True))
    assert len(parts) > 3 and parts[-1].done and "".join(p.message.content for p in parts) == whole.message.content
    assert c.generate("general", "Name a fruit.").response.strip()


@LLAMA_CPP
def test_e2e_client_leaving_mid_stream_frees_llama_cpp_at_once(llm):
    from test_e2e import assert_leaving_frees_the_llm_server

    assert_leaving_frees_the_llm_server(llm, "/api/chat", {"model": "general", "messages": [
        {"role": "user", "content": "Write a very long story about a dragon."}]})
