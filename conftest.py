"""pytest hooks for the whole suite; the fixtures live in the test files.

pytest.ini runs the tests in 3 pytest-xdist workers (`-n 3 --dist loadgroup`). xdist tells a worker which test to
run by its node id, and keeps the tests of one `xdist_group` on one worker by a suffix on the node id. Two things
break that on pytest 9.2, silently: schemathesis gives all of test_fuzz.py's per-operation tests one node id (so
only one of them would run), and xdist's suffix no longer reaches the node id (pytest-xdist issue 1386), so the
groups would be spread over every worker. The hook below fixes both and fails the run if node ids still repeat.
It also hands out the tests marked `slow` first, so that none of them starts last and finishes alone.
"""

from __future__ import annotations

import collections
import os
import py_compile
from pathlib import Path

import pytest


def _one_default_tls_context() -> None:
    """Every httpx client builds its TLS context, loading certifi's ~150 CA certificates: ~20 ms of CPU, for a
    client that then only speaks plain HTTP to 127.0.0.1. The tests (and the apps they run in process) make
    thousands of clients, a third of the suite's CPU, so each test process builds the default context once and
    shares it (an SSLContext is safe to share across threads). Anything but the default is built as before.
    piagent's own processes are untouched (and its clients for http:// build no such context anyway)."""
    from httpx._transports import default as transports

    build = transports.create_ssl_context
    built: dict[tuple, object] = {}

    def create_ssl_context(verify=True, cert=None, trust_env=True):
        if verify is not True or cert is not None:
            return build(verify=verify, cert=cert, trust_env=trust_env)
        key = (trust_env, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        if key not in built:
            built[key] = build(verify=verify, cert=cert, trust_env=trust_env)
        return built[key]

    transports.create_ssl_context = create_ssl_context


_one_default_tls_context()

#: item.stash[CALL_FAILED]: whether the test's own call failed (test_ui.py screenshots the pages of a failed one).
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


def pytest_configure(config: pytest.Config) -> None:
    """Compile piagent.py once, before the workers start, as the README's install does on the Pi: the tests start
    piagent as the unit does (`python -m piagent`, test_piagent.piagent_command), which then loads this bytecode,
    even where PYTHONDONTWRITEBYTECODE keeps Python from writing it (as on CI)."""
    if not hasattr(config, "workerinput"):
        py_compile.compile(str(Path(__file__).resolve().parent / "piagent.py"), doraise=True)


def _set_nodeid(item: pytest.Item, nodeid: str) -> None:
    if hasattr(item, "_id"):  # pytest >= 9.2 keeps it structured; parse() keeps the string exactly as given
        item._id = type(item._id).parse(nodeid)
    else:
        item._nodeid = nodeid
    assert item.nodeid == nodeid, (item.nodeid, nodeid)


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which adds the group suffix on older pytest
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    grouping = bool(getattr(config.option, "loadgroup", False))  # set by xdist in a worker under --dist loadgroup
    for item in items:
        label = getattr(item, "operation_label", None)  # a schemathesis test: one item per API operation
        if label is not None and f"[{label}]" not in item.nodeid:
            _set_nodeid(item, f"{item.nodeid}[{label}]")
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                         for m in item.iter_markers("xdist_group")})
        if grouping and groups and "@" not in item.nodeid.rpartition("]")[2]:
            _set_nodeid(item, f"{item.nodeid}@{'_'.join(groups)}")
    if hasattr(config, "workerinput"):  # an xdist worker: its order is the order tests are handed out in
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # slow ones first, else as collected
    repeated = [nodeid for nodeid, n in collections.Counter(item.nodeid for item in items).items() if n > 1]
    if repeated:
        raise pytest.UsageError(f"node ids must be unique (pytest-xdist runs one test per id): {repeated}")
