"""A misbehaving Streamable HTTP MCP "server" for piagent's MCP client tests (stdlib only, loopback only).

    python bad_http.py PORT MODE

A handshake-era server (server/discover is "method not found"; initialize, then tools/list with one tool `x`).
MODE says how it misbehaves:
    endless-answer   tools/call is answered 200 application/json with a body of "x" that goes on (64 MiB at most)
    endless-line     tools/call is answered as an SSE stream whose first line goes on with no newline (64 MiB)
    endless-event    tools/call is answered as an SSE stream of data lines with no blank line (64 MiB)
    mute-notify      the POST of notifications/initialized is never answered (60 s at most)
    gzip-answer      tools/call is answered with a gzip-compressed JSON body (Content-Encoding: gzip), whatever the
                     request's Accept-Encoding said
Each caps what it sends and how long it waits, so a test can never hang on it.
"""

import asyncio
import gzip
import json
import sys

LIMIT = 64 << 20
CHUNK = b"x" * (64 << 10)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mode: str) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        message = json.loads(await reader.readexactly(length)) if length else {}
        method = message.get("method")
        if method == "notifications/initialized" and mode == "mute-notify":
            await asyncio.sleep(60)
            return
        if "id" not in message:
            writer.write(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if method == "tools/call" and mode.startswith("endless"):
            kind = b"application/json" if mode == "endless-answer" else b"text/event-stream"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nConnection: close\r\n\r\n")
            writer.write({"endless-answer": b'{"jsonrpc": "2.0", "id": 1, "result": "',
                          "endless-line": b"data: ", "endless-event": b""}[mode])
            for _ in range(LIMIT // len(CHUNK)):
                writer.write(b"data: " + CHUNK + b"\n" if mode == "endless-event" else CHUNK)
                await writer.drain()
            return
        if method == "tools/call" and mode == "gzip-answer":
            result = {"content": [{"type": "text", "text": "unpacked"}]}
            body = gzip.compress(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": result}).encode())
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                         b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()
            return
        params = message.get("params") or {}
        result = {"server/discover": None,
                  "initialize": {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {}},
                                 "serverInfo": {"name": "bad-http", "version": "0"}},
                  "tools/list": {"tools": [{"name": "x", "inputSchema": {"type": "object"}}]}}.get(method)
        answer = {"jsonrpc": "2.0", "id": message["id"]}
        answer.update({"result": result} if result is not None else
                      {"error": {"code": -32601, "message": f"no method {method}"}})
        body = json.dumps(answer).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def main(port: int, mode: str) -> None:
    server = await asyncio.start_server(lambda r, w: handle(r, w, mode), "127.0.0.1", port)
    async with server:
        await asyncio.sleep(600)  # a test stops it long before


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
