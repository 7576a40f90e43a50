"""The chat page at /, in a real browser: Debian's chromium driven by Python Playwright.

piagent runs under uvicorn on a loopback port in front of the fake Ollama. A test that fails (or whose page had a
script error) saves a screenshot of each page it opened in its temp folder (the path is printed).
test_readme_screenshot also rewrites docs/page.png (laptop, light + phone, dark), which the README shows.
Skips without chromium or playwright, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import httpx
import pytest

import conftest

from fake_ollama import FakeOllama, Script
from piagent import create_app, load_config
from test_piagent import DEADLINE_S, MODEL, LiveServer, wait_until

CHROMIUM = "/usr/bin/chromium"
#: The last flag: chromium 156 gives each new window an address-bar popup page (two WebUI pages in a renderer of their
#: own, ~0.45 CPU-s a test context), which a headless test never opens.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-features=WebUIOmniboxPopup,WebUIOmniboxAimPopup"]


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


PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}
PAGE_LIMIT = 16 * 1024  # the whole page, style and script included
DOCS_SHOT = Path(__file__).resolve().parent / "docs" / "page.png"  # shown in the README; test_readme_screenshot
#: Under pytest-xdist (pytest.ini), one worker runs this whole file: one chromium (the module-scoped browser).
pytestmark = pytest.mark.xdist_group("chromium")


@pytest.fixture
def fake():
    server = FakeOllama(models=[MODEL, "tiny:latest"]).start()
    yield server
    server.stop()


@pytest.fixture
def page_of(browser, fake, tmp_path, request):
    """page_of(viewport=PHONE, dark=False, **env) -> (Playwright page on piagent's /, the LiveServer).

    If the test failed, or a page had a script error, every page it opened is screenshotted into the test's temp
    folder (path printed)."""
    opened = []

    def open_page(viewport=PHONE, dark=False, server=None, **env):
        if server is None:
            config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false", **env})
            server = LiveServer(create_app(config)).__enter__()
        context = browser.new_context(viewport=viewport, color_scheme="dark" if dark else "light")
        page = context.new_page()
        page.set_default_timeout(DEADLINE_S * 1000)
        errors = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        opened.append((server, context, page, errors))
        return page, server

    yield open_page
    failed = request.node.stash.get(conftest.CALL_FAILED, True)
    for i, (server, context, page, errors) in enumerate(opened):
        page.evaluate("() => new Promise(requestAnimationFrame)")  # one more frame: a late script error shows
        if failed or errors:
            shot = tmp_path / ("page.png" if i == 0 else f"page-{i + 1}.png")
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
        context.close()
    for server in {id(o[0]): o[0] for o in opened}.values():
        server.__exit__(None, None, None)
    for *_, errors in opened:
        assert errors == [], errors  # no script error on the page


def assistant_texts(page) -> list[str]:
    return page.locator(".msg.assistant").all_text_contents()


def expect(locator):
    """Playwright's auto-waiting assertions (they work under the page's strict CSP, unlike string evals), polling
    up to DEADLINE_S like every other wait here (Playwright's own default is 5 s, short on a busy machine)."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=DEADLINE_S * 1000)
    return playwright_expect(locator)


def done_replies(page):
    return page.locator(".msg.assistant:not(.pending)")


def send(page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def hold(page, pattern: str) -> list:
    """The page's requests to `pattern`, held (not answered) until the test calls .continue_() on them."""
    held = []
    page.route(pattern, lambda route: held.append(route))
    return held


def pump_until(page, predicate, what: str) -> None:
    """Poll `predicate` up to DEADLINE_S while Playwright runs: under its sync API a route handler runs only while
    the test is inside a Playwright call, so wait_until, which only sleeps between polls, could wait in vain."""
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(20)


def two_chats(page, fake) -> None:
    """Two saved chats, each one turn: "about cats" (older), then "about dogs" (the one shown)."""
    for question, answer in (("about cats", "Cats purr."), ("about dogs", "Dogs bark.")):
        page.click("#new")
        fake.script = Script(tokens=[answer])
        send(page, question)
        expect(done_replies(page)).to_have_text([answer])


def stored_id(page) -> str | None:
    return page.evaluate("localStorage.getItem('piagent.cid')")


def test_page_is_small_self_contained_and_locked_down(page_of):
    page, server = page_of()
    response = httpx.get(server.url + "/", headers={"Accept": "text/html"})  # other clients get Ollama's probe
    assert response.headers["content-type"] == "text/html; charset=utf-8" and len(response.content) <= PAGE_LIMIT
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "http://" not in response.text and "https://" not in response.text  # no CDN, fonts or scripts
    assert "innerHTML" not in response.text and "insertAdjacentHTML" not in response.text
    expect(page.locator("#agent option")).to_have_text(["general"])  # filled from /agents after the page loads
    expect(page.locator("#log")).to_be_empty()  # the empty-state hint is CSS (#log:empty::before)


def test_chat_streams_continues_and_survives_a_reload(page_of, fake):
    page, server = page_of()
    fake.script = Script(tokens=["Hello", " from", " the", " Pi", "!"], hold_after=2)
    send(page, "first question")
    expect(page.locator(".msg.assistant.pending")).to_have_text("Hello from")  # shown while the rest is not made
    expect(page.locator("#stop")).to_be_visible()
    fake.script.release.set()
    expect(done_replies(page)).to_have_text(["Hello from the Pi!"])
    expect(page.locator("#send")).to_be_visible()

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


def test_shift_enter_makes_a_new_line_and_enter_sends(page_of, fake):
    page, _ = page_of()
    fake.script = Script(echo=True)
    page.fill("#text", "line one")
    page.press("#text", "Shift+Enter")
    page.type("#text", "line two")
    expect(page.locator(".msg")).to_have_count(0)
    page.press("#text", "Enter")
    expect(page.locator(".msg.user")).to_have_text(["line one\nline two"])
    expect(done_replies(page)).to_have_count(1)
    expect(page.locator("#text")).to_have_value("")


def test_stop_mid_stream_frees_the_upstream(page_of, fake):
    page, _ = page_of()
    fake.script = Script(tokens=["Partial", " answer"] + [" more"] * 20, hold_after=2)
    send(page, "tell me a long story")
    expect(page.locator(".msg.assistant.pending")).to_have_text("Partial answer")
    page.click("#stop")
    wait_until(lambda: fake.hangups, timeout=2.0, what="the fake to see the hang-up")
    assert fake.completed == 0
    expect(page.locator(".msg.assistant.stopped")).to_have_text("Partial answer")  # what came is kept, marked
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator(".msg.error")).to_have_count(0)

    fake.script = Script(tokens=["Next"])  # the conversation goes on, with what was shown before the stop
    send(page, "go on")
    expect(done_replies(page)).to_have_count(2)
    history = [m["content"] for m in fake.generations()[-1].body["messages"][1:]]
    assert history == ["tell me a long story", "Partial answer", "go on"]


def test_a_message_sent_before_the_page_has_loaded_is_sent_after_it_and_continues_the_chat(page_of, fake):
    page, _ = page_of()
    fake.script = Script(tokens=["Old", " answer"])
    send(page, "old topic")
    expect(done_replies(page)).to_have_text(["Old answer"])
    held = hold(page, "**/agents")  # a slow Pi, a busy browser: the page's load waits on /agents
    page.reload()
    pump_until(page, lambda: held, "the page to ask for /agents")
    expect(page.locator("#agent option")).to_have_count(0)
    fake.script = Script(tokens=["Next", " answer"])  # not held: its reply may be stored at once
    send(page, "next")
    expect(page.locator(".msg.user")).to_have_text(["next"])  # shown at once; sent once the page has loaded
    assert len(fake.generations()) == 1
    held[0].continue_()
    expect(page.locator(".msg")).to_have_text(["old topic", "Old answer", "next", "Next answer"])  # each once
    generation = fake.generations()[-1].body
    assert [m["content"] for m in generation["messages"][1:]] == ["old topic", "Old answer", "next"]
    assert generation["model"] == MODEL  # the agent the page loaded
    expect(page.locator(".msg.error")).to_have_count(0)
    page.unroute("**/agents")
    page.reload()
    expect(page.locator(".msg")).to_have_text(["old topic", "Old answer", "next", "Next answer"])


def test_a_chat_opened_before_the_page_has_loaded_is_shown_once(page_of, fake):
    page, _ = page_of()
    two_chats(page, fake)
    held = hold(page, "**/agents")
    page.reload()
    pump_until(page, lambda: held, "the page to ask for /agents")
    page.click("#chatsbtn")  # the older chat opened while the agents have not loaded
    page.locator("#chats .chat").nth(1).locator(".open").click()
    expect(page.locator(".msg")).to_have_text(["about cats", "Cats purr."])
    with page.expect_request(lambda request: request.url.endswith("/ready")):  # the page's load goes on from here
        held[0].continue_()
    fake.script = Script(tokens=["Still cats."])
    send(page, "more cats")
    expect(done_replies(page)).to_have_count(2)
    expect(page.locator(".msg")).to_have_text(["about cats", "Cats purr.", "more cats", "Still cats."])
    assert [m["content"] for m in fake.generations()[-1].body["messages"][1:]] == [
        "about cats", "Cats purr.", "more cats"]


def test_new_chat_mid_stream_really_starts_a_new_conversation(page_of, fake):
    page, _ = page_of(viewport=DESKTOP)
    fake.script = Script(tokens=["Old", " answer"])
    send(page, "old topic")
    expect(done_replies(page)).to_have_text(["Old answer"])
    old_id = stored_id(page)
    fake.script = Script(tokens=["Still", " going"] + [" on"] * 20, hold_after=2)
    send(page, "and more")
    expect(page.locator(".msg.assistant.pending")).to_have_text("Still going")
    page.click("#new")
    expect(page.locator(".msg")).to_have_count(0)
    wait_until(lambda: fake.hangups, timeout=2.0, what="the fake to see the hang-up")
    expect(page.locator("#send")).to_be_visible()
    assert stored_id(page) is None

    fake.script = Script(tokens=["Fresh", " start"])
    send(page, "new topic")
    expect(done_replies(page)).to_have_text(["Fresh start"])
    assert [m["content"] for m in fake.generations()[-1].body["messages"][1:]] == ["new topic"]  # no history
    assert stored_id(page) not in (None, old_id)
    page.reload()
    expect(page.locator(".msg.user")).to_have_text(["new topic"])  # the old one does not come back
    expect(page.locator(".msg.assistant")).to_have_text(["Fresh start"])
    expect(page.locator(".msg.error")).to_have_count(0)


def test_switching_agent_mid_stream_stops_and_goes_on_with_the_new_agent(page_of, fake):
    page, _ = page_of(AGENTS="general,coder", OLLAMA_MODEL_CODER="tiny:latest")
    expect(page.locator("#agent option")).to_have_count(2)
    fake.script = Script(tokens=["General", " says"] + [" more"] * 20, hold_after=2)
    send(page, "hello")
    expect(page.locator(".msg.assistant.pending")).to_have_text("General says")
    page.select_option("#agent", "coder")
    wait_until(lambda: fake.hangups, timeout=2.0, what="the fake to see the hang-up")
    expect(page.locator(".msg.assistant.stopped")).to_have_text("General says")
    expect(page.locator("#state")).to_contain_text("coder")
    fake.script = Script(tokens=["Coder", " here"])
    send(page, "now you")
    expect(done_replies(page)).to_have_count(2)
    assert fake.generations()[-1].body["model"] == "tiny:latest"
    expect(page.locator("#state")).to_contain_text("coder \u2192 tiny:latest")
    page.reload()
    expect(page.locator("#agent")).to_have_value("coder")


def test_model_output_is_shown_as_text_never_run(page_of, fake):
    page, _ = page_of()
    hostile = ["<script>document.title = 'pwned'</script>", '<img src=x onerror="document.title = \'pwned\'">',
               "<b>bold?</b>"]
    fake.script = Script(tokens=hostile)
    send(page, "say something nasty")
    expect(done_replies(page)).to_have_text(["".join(hostile)])  # the markup, shown as text
    assert page.title() == "piagent"  # nothing in it ran
    expect(page.locator(".msg.assistant img, .msg.assistant script, .msg.assistant b")).to_have_count(0)


MARKDOWN = """# A plan

Some **bold <b>x</b>** and *italic* and `<img src=x onerror="document.title='pwned'">` here.
A second line.

- one <script>document.title='pwned'</script>
- two with [a bad link](javascript:document.title='pwned') and [a good one](http://127.0.0.1:9/docs)

3. third
4. fourth

```html
<iframe src="javascript:document.title='pwned'"></iframe>
<b>not bold</b>
```
See https://example.org/page. <svg onload="document.title='pwned'"></svg>"""


def test_markdown_is_rendered_as_inert_nodes(page_of, fake):
    page, _ = page_of(viewport=DESKTOP)
    fake.script = Script(tokens=[MARKDOWN[i:i + 7] for i in range(0, len(MARKDOWN), 7)], token_delay_s=0.002)
    send(page, "show me markdown")
    reply = done_replies(page)
    expect(reply).to_have_count(1)
    expect(reply.locator("p.h")).to_have_text("A plan")
    expect(reply.locator("strong")).to_have_text("bold <b>x</b>")
    expect(reply.locator("em")).to_have_text("italic")
    expect(reply.locator("p code")).to_have_text('<img src=x onerror="document.title=\'pwned\'">')
    expect(reply.locator("p").nth(1)).to_contain_text("here.\nA second line.")
    expect(reply.locator("ul > li")).to_have_count(2)
    expect(reply.locator("ol > li")).to_have_text(["third", "fourth"])
    assert reply.locator("ol").get_attribute("start") == "3"
    expect(reply.locator("pre code")).to_have_text(
        "<iframe src=\"javascript:document.title='pwned'\"></iframe>\n<b>not bold</b>")
    # nothing from the reply became an element it asked for
    expect(reply.locator("img, script, iframe, svg, b")).to_have_count(0)
    # links: only http(s) are links; the javascript: one is plain text
    expect(reply.locator("a")).to_have_count(2)
    assert [reply.locator("a").nth(i).get_attribute("href") for i in range(2)] == [
        "http://127.0.0.1:9/docs", "https://example.org/page"]
    expect(reply.locator(".nolink")).to_have_text("a bad link")
    reply.locator(".nolink").click()
    assert page.title() == "piagent" and page.url.endswith("/")
    # the copy button: copies, or (no clipboard) selects the code; never throws
    reply.locator(".copy").click()
    expect(reply.locator(".copy")).to_have_text(re.compile("Copied|Selected"))


def test_copy_without_a_clipboard_selects_the_code(page_of, fake):
    page, _ = page_of()
    page.context.add_init_script("delete Navigator.prototype.clipboard")  # as on plain http (no secure context)
    page.reload()
    fake.script = Script(tokens=["Run:\n```\nsudo systemctl restart piagent\n```"])
    send(page, "how do I restart?")
    expect(done_replies(page)).to_have_count(1)
    assert page.evaluate("navigator.clipboard === undefined")
    page.click(".copy")
    expect(page.locator(".copy")).to_have_text(re.compile("Copied|Selected"))
    assert page.evaluate("getSelection().toString()").strip() == "sudo systemctl restart piagent"


def test_dark_mode_follows_the_system(page_of, fake):
    page, _ = page_of(viewport=DESKTOP, dark=True)
    fake.script = Script(tokens=["Dark **and** readable:\n```\ncode\n```"])
    send(page, "hello in the dark")
    expect(done_replies(page)).to_have_count(1)
    expect(page.locator("body")).to_have_css("background-color", "rgb(18, 20, 18)")
    expect(page.locator("body")).to_have_css("color", "rgb(227, 227, 222)")
    expect(page.locator(".msg.assistant")).to_have_css("background-color", "rgb(29, 32, 29)")


def test_wide_screens_get_a_readable_column(page_of, fake):
    page, _ = page_of(viewport={"width": 1600, "height": 900})
    fake.script = Script(tokens=["word " * 200])
    send(page, "a long answer please")
    expect(done_replies(page)).to_have_count(1)
    box = page.locator(".msg.assistant").bounding_box()
    assert box["width"] <= 48 * 16 and box["x"] > 300  # at most 48rem, centred


def test_recent_chats_reopen_and_delete(page_of, fake):
    page, server = page_of()
    two_chats(page, fake)
    asked = []
    page.on("request", lambda r: asked.append(r.url.split("/", 3)[3]))
    page.click("#chatsbtn")
    rows = page.locator("#chats .chat")
    expect(rows).to_have_count(2)
    expect(rows.locator(".open span")).to_have_text(["about dogs", "about cats"])  # newest first
    assert [p for p in asked if p.startswith("conversations")] == ["conversations?limit=20"]  # one request: the
    # list carries each chat's first message (a Pi with many chats is not asked for each one's whole history)
    expect(page.locator("#chats .chat.on .open span")).to_have_text("about dogs")  # the one shown
    rows.nth(1).locator(".open").click()
    expect(page.locator("#chats")).to_be_hidden()
    expect(page.locator(".msg")).to_have_text(["about cats", "Cats purr."])
    fake.script = Script(tokens=["Still cats."])
    send(page, "more cats")
    expect(done_replies(page)).to_have_count(2)
    assert [m["content"] for m in fake.generations()[-1].body["messages"][1:]] == [
        "about cats", "Cats purr.", "more cats"]

    cats = stored_id(page)
    page.click("#chatsbtn")
    expect(rows.locator(".open span")).to_have_text(["about cats", "about dogs"])
    delete = rows.nth(0).locator(".del")
    delete.click()
    expect(delete).to_have_text("Delete?")  # asks once more: a mis-tap on a phone deletes nothing
    delete.click()
    expect(rows).to_have_count(1)
    expect(page.locator(".msg")).to_have_count(0)  # the chat shown was the one deleted
    assert stored_id(page) is None
    assert httpx.get(f"{server.url}/conversations/{cats}").status_code == 404
    page.reload()
    expect(page.locator(".msg")).to_have_count(0)


def test_errors_show_the_servers_own_message(page_of, fake):
    page, server = page_of(OLLAMA_HOST="http://127.0.0.1:9")  # nothing listens there
    told = httpx.post(server.url + "/chat", json={"message": "hi"}).json()["error"]["message"]
    assert "cannot reach" in told
    expect(page.locator("#state")).to_contain_text("upstream down")
    expect(page.locator("#why")).to_have_text(re.compile("cannot reach"))
    send(page, "hello?")
    expect(page.locator(".msg.error")).to_have_text(told)
    expect(page.locator(".msg.assistant")).to_have_count(0)
    # said once: the chat shows the reason (readiness has been asked again after the reply), so the status line
    # keeps only its short state, until a new chat
    expect(page.locator("#state")).to_contain_text("upstream down")
    expect(page.locator("#why")).to_have_text("")
    page.click("#new")
    expect(page.locator("#why")).to_have_text(re.compile("cannot reach"))


def test_a_model_error_mid_stream_shows_the_servers_message(page_of, fake):
    page, server = page_of()
    fake.script = Script(tokens=["Half", " a", " b", " c"], error_after=2)
    send(page, "hi")
    expect(page.locator(".msg.error")).to_have_count(1)
    expect(page.locator(".msg.assistant")).to_have_text(["Half a"])  # what came stays
    stream = httpx.post(server.url + "/chat", json={"message": "hi", "stream": True},
                        headers={"Accept": "text/event-stream"}, timeout=DEADLINE_S).text
    told = json.loads(stream.split("event: error\ndata: ")[1].split("\n")[0])["error"]["message"]
    expect(page.locator(".msg.error")).to_have_text(told)


def test_only_a_network_failure_uses_the_pages_own_words(page_of, fake):
    page, server = page_of()
    expect(page.locator("#agent option")).to_have_count(1)
    server.__exit__(None, None, None)  # piagent goes away
    send(page, "anyone there?")
    expect(page.locator(".msg.error")).to_have_text(
        "piagent is not reachable: is it running, and is this its address?")
    expect(page.locator("#send")).to_be_visible()


def test_key_field_appears_when_the_server_needs_one(page_of, fake):
    page, server = page_of(API_KEYS="kitchen-pi-key-1")
    expect(page.locator("#keyrow")).to_be_visible()
    expect(page.locator("#note")).to_have_text("Type this piagent's API key above.")  # words, not HTTP headers
    expect(page.locator(".msg.error")).to_have_count(0)
    expect(page.locator("#agent option")).to_have_count(0)
    page.fill("#key", "wrong-key-000")
    page.click("#savekey")
    expect(page.locator("#keyrow")).to_be_visible()  # still asked
    expect(page.locator("#note")).to_have_text("Type this piagent's API key above.")
    page.fill("#key", "kitchen-pi-key-1")
    page.click("#savekey")
    expect(page.locator("#agent option")).to_have_count(1)
    expect(page.locator("#keyrow")).to_be_hidden()
    expect(page.locator("#note")).to_have_text("")
    expect(page.locator("#state")).to_contain_text("ready")  # /ready needs the key too
    fake.script = Script(tokens=["Keyed"])
    send(page, "hi")
    expect(done_replies(page)).to_have_text(["Keyed"])
    assert fake.generations()[0].body["messages"][-1]["content"] == "hi"


def test_ui_off_serves_no_page_only_ollamas_probe(fake):
    config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false", "ENABLE_UI": "false"})
    with LiveServer(create_app(config)) as server:
        response = httpx.get(server.url + "/", headers={"Accept": "text/html"})
    assert response.headers["content-type"].startswith("text/plain") and response.text == "Ollama is running"


@contextmanager
def site_of(html: str) -> Iterator[str]:
    """Another site: `html` served at / from another loopback port (so another origin); yields its URL."""
    body = html.encode()

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(DEADLINE_S)


def test_another_sites_page_cannot_make_piagent_generate(browser, fake):
    """test_hostile.py's cross-site attack in a real browser: a page on another origin posts JSON to piagent's Ollama
    door with fetch's defaults (text/plain, no-cors), which a browser sends without asking first. It reaches
    piagent, and is refused before the model: before, it was a generation."""
    config = load_config({"OLLAMA_HOST": fake.url, "WARMUP": "false"})
    with LiveServer(create_app(config)) as server:
        call = json.dumps({"model": "general", "prompt": "hi", "stream": False})
        script = (f"fetch({json.dumps(server.url + '/api/generate')}, {{method: 'POST', mode: 'no-cors', body: "
                  f"{json.dumps(call)}}}).finally(() => {{ document.getElementById('sent').textContent = 'sent'; }});")
        with site_of(f'<!doctype html><p id="sent"></p><script>{script}</script>') as elsewhere:
            context = browser.new_context()
            try:
                page = context.new_page()
                page.goto(elsewhere)
                expect(page.locator("#sent")).to_have_text("sent")  # piagent has answered the page's request
            finally:
                context.close()
        counted = httpx.get(server.url + "/metrics", timeout=DEADLINE_S).text
    assert 'piagent_requests_total{route="other",status="403"} 1' in counted, counted  # refused before routing
    assert fake.generations() == []


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


def test_status_line_shows_agent_model_readiness_and_speed(page_of, fake):
    page, _ = page_of()
    expect(page.locator("#status")).to_have_class("ready")
    expect(page.locator("#state")).to_have_text(f"general \u2192 {MODEL} \u00b7 ready")  # /agents names the model
    fake.script = Script(tokens=["One", " two", " three", " four", " five"], token_delay_s=0.02)
    send(page, "count")
    expect(done_replies(page)).to_have_count(1)
    expect(page.locator("#state")).to_have_text(
        re.compile(rf"^general \u2192 {re.escape(MODEL)} \u00b7 ready \u00b7 \d+\.\d tok/s$"))


def test_readme_screenshot(page_of, fake, browser):
    """docs/page.png (the README shows it): the page on a laptop, light, and on a phone, dark, side by side."""
    desktop, server = page_of(viewport={"width": 1100, "height": 720}, AGENT_GENERAL_TOOLS="calc")
    fake.script = Script(tool_rounds=[[("calc", {"expression": "2340 * 0.17"})]], echo_tools=True)
    send(desktop, "What is 17% of 2340?")
    expect(done_replies(desktop)).to_have_count(1)
    answer = ("To restart piagent after changing **piagent.env**:\n\n1. Save the file\n2. Run:\n\n"
              "```\nsudo systemctl restart piagent\n```\n\nThen check it with `piagent --check`. "
              "See *the README* for more.")
    fake.script = Script(tokens=[answer[i:i + 9] for i in range(0, len(answer), 9)], token_delay_s=0.01)
    send(desktop, "How do I restart it after editing the settings?")
    expect(done_replies(desktop)).to_have_count(2)
    expect(desktop.locator("#state")).to_contain_text("tok/s")

    phone, _ = page_of(viewport=PHONE, dark=True, server=server)
    phone.click("#chatsbtn")
    phone.locator("#chats .open").first.click()
    expect(done_replies(phone)).to_have_count(2)
    expect(phone.locator("#state")).to_contain_text("ready")
    shots = [base64.b64encode(p.screenshot()).decode() for p in (desktop, phone)]
    sheet = browser.new_page(viewport={"width": 1600, "height": 920})
    try:  # a plain page of two images (no CSP: it is not piagent's)
        sheet.set_content(
            '<body style="margin:0;background:#cfd4cc;display:flex;gap:48px;align-items:center;'
            'justify-content:center;height:100vh">'
            + "".join(f'<img style="border-radius:14px;box-shadow:0 6px 28px #0005" src="data:image/png;base64,{s}">'
                      for s in shots) + "</body>")
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        sheet.screenshot(path=str(DOCS_SHOT))
    finally:
        sheet.close()
    print(f"screenshot: {DOCS_SHOT}")
