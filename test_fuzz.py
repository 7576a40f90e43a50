"""Property-based fuzzing of piagent's HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

piagent runs under uvicorn on a loopback port in front of the fake Ollama. For every generated request, no
response may be a server error, and every response must match what the schema documents (status, content type,
body). Skips without schemathesis, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("schemathesis", reason="schemathesis is not installed: pip install -r requirements-dev.txt")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import (content_type_conformance, not_a_server_error,  # noqa: E402
                                 response_schema_conformance, status_code_conformance)

from fake_ollama import FakeOllama, Script  # noqa: E402
from piagent import create_app, load_config  # noqa: E402
from test_piagent import MODEL, LiveServer  # noqa: E402

#: Rate limits and the queue off the path: the fuzzer sends hundreds of requests from one address, one at a time.
FUZZ_ENV = {"RATE_LIMIT_PER_MIN": "0", "MAX_TOKENS": "16", "SSE_PING_S": "5"}

# The schema comes from a freshly built app: the same document the live server serves at /openapi.json.
schema = schemathesis.openapi.from_dict(create_app(load_config(FUZZ_ENV)).openapi())


@pytest.fixture(scope="module")
def live_url():
    fake = FakeOllama(models=[MODEL]).start()
    fake.script = Script(tokens=["fuzz", "ed"])
    try:
        with LiveServer(create_app(load_config({**FUZZ_ENV, "OLLAMA_HOST": fake.url}))) as server:
            yield server.url
    finally:
        fake.stop()


#: Random examples per operation, after schemathesis's deterministic coverage cases (boundary values, missing and
#: wrong-typed fields), which run whatever this is: the suite's time goes on generating bodies, not on requests.
FUZZ_EXAMPLES = 50


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_errors_and_always_matches_its_schema(case, live_url):
    response = case.call(base_url=live_url, timeout=30)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                            content_type_conformance, response_schema_conformance])
