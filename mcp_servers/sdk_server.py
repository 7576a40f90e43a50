"""A test MCP server built on the official `mcp` SDK, for piagent's MCP client tests (never used at run time).

    python sdk_server.py stdio [--events FILE]
    python sdk_server.py http [--events FILE] [--legacy] [--json] [--token T]   # prints "PORT <n>", then serves

Tools: add (arguments), fail (an isError result), slow (for timeouts and cancellation: appends "cancelled slow"
to --events when the call is cancelled), grow (adds the tool "extra" and says the tool list changed), big (a
huge result), picture (text plus an image). tools/list is served two tools per page, so listing needs paging.

--legacy makes the HTTP server behave like a handshake-era (mcp 1.x) server: a request with a 2026-07-28
MCP-Protocol-Version header gets 400 and a plain -32600 error, as mcp 1.x answers an unknown version; so a client
falls back to `initialize` and gets a session (Mcp-Session-Id). --token T answers 401 unless the request has
"Authorization: Bearer T".
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import sys

import anyio
import mcp_types as types
import uvicorn
from mcp.server.mcpserver import Context, MCPServer

PAGE_SIZE = 2
HANDSHAKE_VERSIONS = {"2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"}
#: A 1x1 PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


class PagedServer(MCPServer):
    """MCPServer serves every tool in one page; this one pages them, to test a client's use of nextCursor."""

    async def _handle_list_tools(self, ctx, params):
        tools = await self.list_tools()
        start = int(params.cursor) if params is not None and params.cursor else 0
        page = tools[start:start + PAGE_SIZE]
        more = start + PAGE_SIZE < len(tools)
        return types.ListToolsResult(tools=page, next_cursor=str(start + PAGE_SIZE) if more else None)


def build(events: str | None) -> MCPServer:
    """The server and its tools; `events` is a file that records what the server saw (for the tests)."""
    server = PagedServer("piagent-test-server")

    def record(line: str) -> None:
        if events:
            with open(events, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    @server.tool(description="Add two whole numbers.")
    def add(a: int, b: int) -> str:
        return str(a + b)

    @server.tool(description="Always fails, with the given message.")
    def fail(message: str) -> str:
        raise ValueError(message)

    @server.tool(description="Wait for the given seconds, then answer.")
    async def slow(seconds: float) -> str:
        record("started slow")
        try:
            await anyio.sleep(seconds)
        except anyio.get_cancelled_exc_class():
            record("cancelled slow")
            raise
        return "slept"

    @server.tool(description="Add the tool 'extra' and announce that the tool list changed.")
    async def grow(ctx: Context) -> str:
        if server._tool_manager.get_tool("extra") is None:
            server.add_tool(lambda: "extra here", name="extra", description="Added by grow.")
        if ctx.protocol_version in HANDSHAKE_VERSIONS:
            await ctx.session.send_tool_list_changed()
        else:
            await ctx.notify_tools_changed()
        return "grown"

    @server.tool(description="Return `size` characters.")
    def big(size: int) -> str:
        return "x" * size

    @server.tool(description="A caption and a tiny picture.")
    def picture() -> list[types.TextContent | types.ImageContent]:
        return [types.TextContent(type="text", text="a dot"),
                types.ImageContent(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png")]

    return server


def legacy_only(app):
    """Wrap an ASGI app so that modern (2026-07-28) requests are refused the way a handshake-era server does."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            version = dict(scope["headers"]).get(b"mcp-protocol-version", b"").decode()
            if version and version not in HANDSHAKE_VERSIONS:
                body = json.dumps({"jsonrpc": "2.0", "id": "server-error", "error": {
                    "code": -32600, "message": f"Bad Request: Unsupported protocol version: {version}"}}).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await app(scope, receive, send)

    return wrapped


def token_required(app, token: str):
    """Wrap an ASGI app so that a request without "Authorization: Bearer <token>" gets 401."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != f"Bearer {token}".encode():
            await send({"type": "http.response.start", "status": 401, "headers": [(b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": b"missing or wrong token"})
            return
        await app(scope, receive, send)

    return wrapped


async def serve_http(server: MCPServer, legacy: bool, json_response: bool, token: str | None) -> None:
    """Serve on a free 127.0.0.1 port, printing it first so the test knows where to connect."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # before the port is printed: a client that connects at once is queued, not refused
    app = server.streamable_http_app(json_response=json_response, host="127.0.0.1")
    app = legacy_only(app) if legacy else app
    config = uvicorn.Config(token_required(app, token) if token else app, log_level="warning", lifespan="on")
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


def main() -> None:
    """Run over stdio or HTTP, as the first argument says."""
    parser = argparse.ArgumentParser()
    parser.add_argument("transport", choices=["stdio", "http"])
    parser.add_argument("--events")
    parser.add_argument("--legacy", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--token")
    args = parser.parse_args()
    server = build(args.events)
    print("sdk_server: starting", file=sys.stderr, flush=True)
    if args.transport == "stdio":
        server.run()
    else:
        asyncio.run(serve_http(server, args.legacy, args.json, args.token))


if __name__ == "__main__":
    main()
