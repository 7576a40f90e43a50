"""Misbehaving stdio "servers" for piagent's MCP client tests (stdlib only).

    python bad_server.py silent [--stubborn] [--pids FILE]
        reads stdin, never answers; --stubborn also ignores SIGTERM and stdin closing and starts a grandchild
        that does the same; --pids writes "<own pid> <grandchild pid>" to FILE once both run.
    python bad_server.py noisy LINES -- COMMAND...
        writes LINES lines of garbage to stdout and LINES lines to stderr, then becomes COMMAND (exec).
    python bad_server.py unusable
        a handshake-era server with tools `odd`, `deep`, `asks` and `plain`: odd's answer is valid JSON that holds
        a lone surrogate ("\\ud800", which is not text), deep's nests 100 levels; asks first sends the client a
        ping whose params hold a lone surrogate and answers "pinged" once the client answered it; plain's is
        "fine".
    python bad_server.py chatty
        a handshake-era server listing 50 tools piagent cannot call (taskSupport required) and `flood`, which
        sends 500 notifications/tools/list_changed before it answers "flooded".
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


def unusable(argv: list[str]) -> None:
    """Answer like a server of the handshake era; tools/call of `odd` gets a result piagent cannot pass on."""
    tools = [{"name": name, "inputSchema": {"type": "object"}} for name in ("odd", "deep", "asks", "plain")]
    for line in sys.stdin:
        request = json.loads(line)
        method, params = request.get("method"), request.get("params") or {}
        if "id" not in request:
            continue  # a notification
        if method == "initialize":
            answer = {"result": {"protocolVersion": params["protocolVersion"], "capabilities": {"tools": {}},
                                 "serverInfo": {"name": "unusable", "version": "0"}}}
        elif method == "tools/list":
            answer = {"result": {"tools": tools}}
        elif method == "tools/call" and params.get("name") == "deep":
            deep: list = []
            for _ in range(99):
                deep = [deep]
            answer = {"result": {"content": [{"type": "text", "text": "deep"}], "structuredContent": {"d": deep}}}
        elif method == "tools/call" and params.get("name") == "asks":
            sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": "p1", "method": "ping", "params": {"x": "\ud800"}})
                             + "\n")
            sys.stdout.flush()
            for reply in sys.stdin:  # the client's answer to the ping (the call waits for it)
                if json.loads(reply).get("id") == "p1":
                    break
            answer = {"result": {"content": [{"type": "text", "text": "pinged"}]}}
        elif method == "tools/call":
            text = "\ud800" if params.get("name") == "odd" else "fine"  # json.dumps writes it as the escape \ud800
            answer = {"result": {"content": [{"type": "text", "text": text}]}}
        else:
            answer = {"error": {"code": -32601, "message": f"no method {method}"}}
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], **answer}) + "\n")
        sys.stdout.flush()


def chatty(argv: list[str]) -> None:
    """Many tools piagent must leave out, and a flood of list changes."""
    tools = [{"name": f"task{i}", "inputSchema": {"type": "object"}, "execution": {"taskSupport": "required"}}
             for i in range(50)] + [{"name": "flood", "inputSchema": {"type": "object"}}]
    for line in sys.stdin:
        request = json.loads(line)
        method, params = request.get("method"), request.get("params") or {}
        if "id" not in request:
            continue
        if method == "tools/call":
            for _ in range(500):
                sys.stdout.write(json.dumps({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}) + "\n")
            answer = {"result": {"content": [{"type": "text", "text": "flooded"}]}}
        elif method == "tools/list":
            answer = {"result": {"tools": tools}}
        elif method == "initialize":
            answer = {"result": {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {
                "listChanged": True}}, "serverInfo": {"name": "chatty", "version": "0"}}}
        else:
            answer = {"error": {"code": -32601, "message": f"no method {method}"}}
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], **answer}) + "\n")
        sys.stdout.flush()


def deaf(argv: list[str]) -> None:
    """Ask the client again and again, and never read its answers."""
    for line in sys.stdin:
        request = json.loads(line)
        method, params = request.get("method"), request.get("params") or {}
        if "id" not in request:
            continue
        if method == "tools/call":
            for i in range(200):
                sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": f"{i}-" + "x" * (1 << 19), "method": "ping"}) + "\n")
                sys.stdout.flush()
            time.sleep(60)
            return
        answer = {"result": {"tools": [{"name": "pings", "inputSchema": {"type": "object"}}]}} if method == "tools/list" \
            else {"result": {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {}},
                             "serverInfo": {"name": "deaf", "version": "0"}}}
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], **answer}) + "\n")
        sys.stdout.flush()


def gone(argv: list[str]) -> None:
    """Stop answering mid-call while the pipes stay open: exit, leaving a child holding them; or close stdout."""
    tools = [{"name": name, "inputSchema": {"type": "object"}} for name in ("dies", "mute")]
    for line in sys.stdin:
        request = json.loads(line)
        method, params = request.get("method"), request.get("params") or {}
        if "id" not in request:
            continue
        if method == "tools/call" and params.get("name") == "dies":
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdin=subprocess.DEVNULL)
            os._exit(3)
        if method == "tools/call":
            os.close(1)
            time.sleep(60)
            return
        answer = {"result": {"tools": tools}} if method == "tools/list" else {"result": {
            "protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {}},
            "serverInfo": {"name": "gone", "version": "0"}}}
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], **answer}) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    {"silent": silent, "noisy": noisy, "unusable": unusable, "gone": gone, "chatty": chatty,
     "deaf": deaf}[sys.argv[1]](sys.argv[2:])
