from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from shoal import serve


def child_pids(pid: int | None = None) -> set[int]:
    """Live (non-zombie) children of this process, from /proc."""
    pid = pid or os.getpid()
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            pass
    live = set()
    for c in out:
        try:
            with open(f"/proc/{c}/stat") as f:
                if f.read().split(") ", 1)[1][0] != "Z":
                    live.add(c)
        except OSError:
            pass
    return live


def wait_until(cond, timeout: float = 15.0, interval: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


@pytest.fixture
def run_dir() -> Iterator[str]:
    # Short paths: Unix socket paths are limited to 108 bytes.
    d = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@dataclass
class Instance:
    url: str
    run_dir: str


@pytest.fixture
def instance(run_dir: str) -> Iterator[Instance]:
    """A running shoal instance on a free port; shut down afterwards, leaving no process."""
    before = child_pids()
    serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        yield Instance(serve.http_address(), run_dir)
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


@pytest.fixture(params=["process", "local"])
def mode(request: pytest.FixtureRequest, run_dir: str) -> Iterator[str]:
    """Run a test against real replica processes and against _local_testing_mode."""
    before = child_pids()
    if request.param == "process":
        serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        yield request.param
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def deploy(app: serve.Application, mode: str, **kwargs: object) -> serve.DeploymentHandle:
    return serve.run(app, _local_testing_mode=(mode == "local"), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def proxied(run_dir: str) -> Iterator[Instance]:
    """An instance whose ingress replicas do not serve HTTP: the proxy process answers everything."""
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": False}, _run_dir=run_dir)
    try:
        yield Instance(serve.http_address(), run_dir)
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """The fault suite's table (tests/faults/loadgen.py): fault -> ok / failed / hung, recovery."""
    loadgen = sys.modules.get("loadgen")
    if loadgen is not None and loadgen.TABLE:
        terminalreporter.section("fault table")
        terminalreporter.write_line(loadgen.format_table(loadgen.TABLE))
