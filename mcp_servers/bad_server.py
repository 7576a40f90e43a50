"""Misbehaving stdio "servers" for piagent's MCP client tests (stdlib only).

    python bad_server.py silent [--stubborn] [--pids FILE]
        reads stdin, never answers; --stubborn also ignores SIGTERM and stdin closing and starts a grandchild
        that does the same; --pids writes "<own pid> <grandchild pid>" to FILE once both run.
    python bad_server.py noisy LINES -- COMMAND...
        writes LINES lines of garbage to stdout and LINES lines to stderr, then becomes COMMAND (exec).
    python bad_server.py unusable
        a handshake-era server with tools `odd`, `deep`, `asks`, `listid` and `plain`: odd's answer is valid JSON
        that holds a lone surrogate ("\\ud800", which is not text), deep's nests 100 levels; asks first sends the
        client a ping whose params hold a lone surrogate and answers "pinged" once the client answered it; listid
        first sends an answer whose id is a list, then its own, "fine"; plain's is "fine".
    python bad_server.py chatty
        a handshake-era server listing 50 tools piagent cannot call (taskSupport required) and `flood`, which
        sends 500 notifications/tools/list_changed before it answers "flooded".
    python bad_server.py churn FILE
        a handshake-era server with tool `plain` that announces a tool-list change after every tools/list answer,
        and appends the time (time.monotonic()) of each listing to FILE.
    python bad_server.py deaf
        a handshake-era server with tool `pings`: on it, it sends 200 pings with 512 KiB ids and reads nothing more
        (60 s at most).
    python bad_server.py gone
        a handshake-era server with tools `dies` and `mute`: on `dies` it starts a child that keeps its stdout and
        stderr open for 60 s, and exits with code 3; on `mute` it closes its stdout and lives on (60 s at most).
"""

import json
import os
import signal
import subprocess
import sys
import time


def silent(argv: list[str]) -> None:
    """Never answer; with --stubborn, never exit either unless killed."""
    stubborn = "--stubborn" in argv
    pids = argv[argv.index("--pids") + 1] if "--pids" in argv else None
    if stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time\n"
                                  "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                  "while True: time.sleep(1)"], stdin=subprocess.DEVNULL)
    if pids:
        with open(pids + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {child.pid if stubborn else 0}")
        os.replace(pids + ".tmp", pids)
    for _ in sys.stdin:
        pass
    while stubborn:  # stdin closed: a well-behaved server exits here; this one does not
        time.sleep(1)


def noisy(argv: list[str]) -> None:
    """Garbage on stdout and a flood on stderr, then the real server."""
    count, command = int(argv[0]), argv[argv.index("--") + 1:]
    for i in range(count):
        sys.stdout.write(f"garbage line {i} {{not json\n")
        sys.stderr.write(f"chatty stderr line {i}\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def send(message: dict) -> None:
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
    sys.stdout.flush()


def text(words: str) -> dict:
    return {"result": {"content": [{"type": "text", "text": words}]}}


def handshake_server(name: str, tools: list[dict], call, list_changed: bool = False, after_list=None) -> None:
    """Answer initialize and tools/list as a server of the handshake era would; tools/call's answer is
    call(tool name) (which may also misbehave, or never return); after_list() runs after each tools/list answer."""
    for line in sys.stdin:
        request = json.loads(line)
        method, params = request.get("method"), request.get("params") or {}
        if "id" not in request:
            continue  # a notification
        if method == "initialize":
            answer = {"result": {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {
                "listChanged": list_changed}}, "serverInfo": {"name": name, "version": "0"}}}
        elif method == "tools/list":
            answer = {"result": {"tools": tools}}
        elif method == "tools/call":
            answer = call(params.get("name"))
        else:
            answer = {"error": {"code": -32601, "message": f"no method {method}"}}
        send({"id": request["id"], **answer})
        if method == "tools/list" and after_list is not None:
            after_list()


def plain_tools(*names: str) -> list[dict]:
    return [{"name": name, "inputSchema": {"type": "object"}} for name in names]


def unusable(argv: list[str]) -> None:
    """tools/call of `odd` gets a result piagent cannot pass on; `deep` one nested 100 levels; `asks` pings first."""
    def call(tool: str) -> dict:
        if tool == "deep":
            deep: list = []
            for _ in range(99):
                deep = [deep]
            return {"result": {"content": [{"type": "text", "text": "deep"}], "structuredContent": {"d": deep}}}
        if tool == "asks":
            send({"id": "p1", "method": "ping", "params": {"x": "\ud800"}})
            for reply in sys.stdin:  # the client's answer to the ping (the call waits for it)
                if json.loads(reply).get("id") == "p1":
                    break
            return text("pinged")
        if tool == "listid":
            send({"id": [1], **text("an answer to no call")})
        return text("\ud800" if tool == "odd" else "fine")  # json.dumps writes it as the escape \ud800

    handshake_server("unusable", plain_tools("odd", "deep", "asks", "listid", "plain"), call)


def chatty(argv: list[str]) -> None:
    """Many tools piagent must leave out, and a flood of list changes."""
    def call(tool: str) -> dict:
        for _ in range(500):
            sys.stdout.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}) + "\n")
        return text("flooded")

    tasks = [{"name": f"task{i}", "inputSchema": {"type": "object"}, "execution": {"taskSupport": "required"}}
             for i in range(50)]
    handshake_server("chatty", tasks + plain_tools("flood"), call, list_changed=True)


def churn(argv: list[str]) -> None:
    """Announce a tool-list change after every listing, and append the time of each listing to the file argv[0]."""
    def after_list() -> None:
        with open(argv[0], "a") as times:
            times.write(f"{time.monotonic()}\n")
        send({"method": "notifications/tools/list_changed"})

    handshake_server("churn", plain_tools("plain"), lambda tool: text("fine"), list_changed=True, after_list=after_list)


def deaf(argv: list[str]) -> None:
    """Ask the client again and again, and never read its answers."""
    def call(tool: str) -> dict:
        for i in range(200):
            send({"id": f"{i}-" + "x" * (1 << 19), "method": "ping"})
        time.sleep(60)
        sys.exit(0)

    handshake_server("deaf", plain_tools("pings"), call)


def gone(argv: list[str]) -> None:
    """Stop answering mid-call while the pipes stay open: exit, leaving a child holding them; or close stdout."""
    def call(tool: str) -> dict:
        if tool == "dies":
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
            os._exit(3)
        os.close(1)
        time.sleep(60)
        sys.exit(0)

    handshake_server("gone", plain_tools("dies", "mute"), call)


if __name__ == "__main__":
    {"silent": silent, "noisy": noisy, "unusable": unusable, "gone": gone, "chatty": chatty,
     "deaf": deaf, "churn": churn}[sys.argv[1]](sys.argv[2:])
