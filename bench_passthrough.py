"""The benchmark's baseline: the FastAPI + httpx passthrough a developer would write in front of Ollama.

    python bench_passthrough.py --port 8001 --upstream http://127.0.0.1:11434

POST /api/chat sends the same body on to the upstream's /api/chat and streams its NDJSON back as it comes.
No checks, no memory, no log: what piagent's added time-to-first-token is compared with (bench_piagent.py). It
runs uvicorn as piagent does: the same HTTP implementation (uvicorn's default choice), no access log, log
level warning.
"""

import argparse
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask


def create_app(upstream: str) -> FastAPI:
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(300, connect=5))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with client:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/chat")
    async def chat(request: Request) -> StreamingResponse:
        upstream_request = client.build_request("POST", "/api/chat", json=await request.json())
        response = await client.send(upstream_request, stream=True)
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code,
                                 media_type="application/x-ndjson", background=BackgroundTask(response.aclose))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(create_app(args.upstream), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
