"""The chat page at /, in a real browser: Debian's chromium driven by Python Playwright.

piagent runs under uvicorn on a loopback port in front of the fake Ollama. Each test saves a screenshot in its
temp folder (the path is printed) so a person can look at the page when something fails.
Skips without chromium or playwright, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

import httpx
import pytest

from fake_ollama import FakeOllama, Script
from piagent import create_app, load_config
from test_piagent import DEADLINE_S, MODEL, LiveServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def require_browser() -> None:
    missing = [what for what, ok in (("chromium (apt-get install chromium)", shutil.which(CHROMIUM)),
                                     ("playwright (pip install playwright)", importlib.util.find_spec("playwright")))
               if not ok]
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true and missing: " + ", ".join(missing))
        pytest.skip("missing: " + ", ".join(missing))


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield instance
        instance.close()


@pytest.fixture
def fake():
    server = FakeOllama(models=[MODEL]).start()
    yield server
    server.stop()


@pytest.fixture
def page_of(browser, fake, tmp_path):
    """page_of(**env) -> (Playwright page on piagent's /, the LiveServer); screenshot saved at the end."""
    opened = []

    def open_page(**env):
        config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false", **env})
        server = LiveServer(create_app(config)).__enter__()
        context = browser.new_context(viewport={"width": 390, "height": 760})  # a phone in portrait
        page = context.new_page()
        page.set_default_timeout(DEADLINE_S * 1000)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        opened.append((server, context, page, errors))
        return page, server

    yield open_page
    for server, context, page, errors in opened:
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot))
        print(f"screenshot: {shot}")
        context.close()
        server.__exit__(None, None, None)
        assert errors == [], errors  # no script error on the page


def assistant_texts(page) -> list[str]:
    return page.locator(".msg.assistant").all_text_contents()


def expect(locator):
    """Playwright's auto-waiting assertions (they work under the page's strict CSP, unlike string evals)."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def done_replies(page):
    return page.locator(".msg.assistant:not(.pending)")


def send(page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def test_page_is_small_self_contained_and_locked_down(page_of):
    page, server = page_of()
    response = httpx.get(server.url + "/")
    assert response.headers["content-type"] == "text/html; charset=utf-8" and len(response.content) < 20_000
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "http://" not in response.text and "https://" not in response.text  # no CDN, fonts or scripts
    assert page.locator("#agent option").all_text_contents() == ["general"]


def test_chat_streams_continues_and_survives_a_reload(page_of, fake):
    page, server = page_of()
    fake.script = Script(tokens=["Hello", " from", " the", " Pi", "!"], hold_after=2)
    send(page, "first question")
    expect(page.locator(".msg.assistant.pending")).to_have_text("Hello from")  # shown while the rest is not made
    fake.script.release.set()
    expect(done_replies(page)).to_have_text(["Hello from the Pi!"])

    fake.script = Script(tokens=["Second", " answer"])
    page.fill("#text", "second question")
    page.click("#send")
    expect(done_replies(page)).to_have_count(2)
    history = [m["content"] for m in fake.generations()[1].body["messages"][1:]]
    assert history == ["first question", "Hello from the Pi!", "second question"]

    page.reload()
    expect(page.locator(".msg")).to_have_count(4)
    assert page.locator(".msg.user").all_text_contents() == ["first question", "second question"]
    assert assistant_texts(page) == ["Hello from the Pi!", "Second answer"]

    page.click("#new")
    expect(page.locator(".msg")).to_have_count(0)
    fake.script = Script(tokens=["Fresh"])
    send(page, "new topic")
    expect(done_replies(page)).to_have_text(["Fresh"])
    assert len(fake.generations()[-1].body["messages"]) == 2  # a new conversation: no history


def test_model_output_is_shown_as_text_never_run(page_of, fake):
    page, _ = page_of()
    hostile = ["<script>document.title = 'pwned'</script>", '<img src=x onerror="document.title = \'pwned\'">',
               "<b>bold?</b>"]
    fake.script = Script(tokens=hostile)
    send(page, "say something nasty")
    expect(done_replies(page)).to_have_text(["".join(hostile)])  # the markup, shown as text
    assert page.title() == "piagent"  # nothing in it ran
    expect(page.locator(".msg.assistant img, .msg.assistant script, .msg.assistant b")).to_have_count(0)


def test_errors_are_told_in_plain_words(page_of, fake):
    page, _ = page_of(OLLAMA_HOST="http://127.0.0.1:9")  # nothing listens there
    send(page, "hello?")
    expect(page.locator(".msg.error")).to_have_text(
        "Ollama is not running (or piagent cannot reach it). Start it, then try again.")


def test_key_field_appears_when_the_server_needs_one(page_of, fake):
    page, _ = page_of(API_KEYS="kitchen-pi-key-1")
    expect(page.locator("#keyrow")).to_be_visible()
    expect(page.locator(".msg.error")).to_have_text("This piagent needs an API key: enter it above.")
    expect(page.locator("#agent option")).to_have_count(0)
    page.fill("#key", "kitchen-pi-key-1")
    page.click("#savekey")
    expect(page.locator("#agent option")).to_have_count(1)
    fake.script = Script(tokens=["Keyed"])
    send(page, "hi")
    expect(done_replies(page)).to_have_text(["Keyed"])
    assert fake.generations()[0].body["messages"][-1]["content"] == "hi"


def test_ui_off_serves_404(fake):
    config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false", "ENABLE_UI": "false"})
    with LiveServer(create_app(config)) as server:
        response = httpx.get(server.url + "/")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_tool_calls_show_above_the_answer_as_text(page_of, fake):
    page, _ = page_of(AGENT_GENERAL_TOOLS="calc")
    fake.script = Script(tool_rounds=[[("calc", {"expression": "6 * 7"}), ("calc", {"expression": "<b>1</b>"})]],
                         echo_tools=True)
    send(page, "what is 6 times 7?")
    expect(done_replies(page)).to_have_count(1)
    expect(page.locator(".msg.tool")).to_have_text([
        'calc {"expression":"6 * 7"} \u2192 42',
        'calc {"expression":"<b>1</b>"} \u2192 error: not an arithmetic expression; calc understands numbers, '
        '+ - * / // % ** and parentheses, pi, e, sqrt(), abs(), round(), floor(), ceil(), min(), max()'])
    assert page.locator(".msg").evaluate_all("ms => ms.map(m => m.className)") == [
        "msg user", "msg tool", "msg tool", "msg assistant"]
    expect(page.locator(".msg.tool b")).to_have_count(0)
