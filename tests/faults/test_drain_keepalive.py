"""Issue 15: a rolling redeploy and a scale-down under keep-alive clients lose no request.

Fronts drain as Envoy drains HTTP/1.1: from the moment a front drains (an ingress replica
stopping, the proxy stepping aside) its responses carry ``Connection: close``, idle keep-alive
connections close only after a grace, and no connection is closed under a request. Run with
ingress replicas serving the port (``instance``) and with the proxy serving it (``proxied``),
with 6 keep-alive httpx clients and with wrk.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable

import httpx
import pytest
from conftest import Instance, wait_until
from loadgen import Counts, Load, report, running
from starlette.requests import Request

from shoal import api, serve
from shoal.runtime.controller.records import ReplicaRecord, ReplicaState

WRK = shutil.which("wrk") or "/usr/bin/wrk"
CLIENTS = 6


@serve.deployment(num_replicas=2, graceful_shutdown_timeout_s=10)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self, request: Request) -> str:
        return f"{self.version} {os.getpid()}"


@pytest.fixture(params=["instance", "proxied"])
def front(request: pytest.FixtureRequest) -> Instance:
    """Ingress replicas serving the port ("instance"), or the proxy serving it ("proxied")."""
    inst: Instance = request.getfixturevalue(request.param)
    return inst


def _kind(request: pytest.FixtureRequest) -> str:
    return "direct" if request.node.callspec.params["front"] == "instance" else "proxied"


class Seen:
    """The replica pids that answered (the body says "<version> <pid>")."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.answered: set[int] = set()

    def ok(self, r: httpx.Response) -> bool:
        if r.status_code != 200:
            return False
        with self.lock:
            self.answered.add(int(r.text.split()[1]))
        return True


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def _replica_pids() -> set[int]:
    """The pids of Versioned's running replicas (the controller's records)."""
    assert api._instance is not None
    replicas = api._instance.controller.registry.replicas.values()
    return {r.proc.pid for r in replicas if r.deployment == "Versioned" and r.state == ReplicaState.RUNNING}


def _under_load(front: Instance, change: Callable[[], None], gone: int | None = None) -> Counts:
    """Run 6 keep-alive clients, ``change`` the app, wait until ``gone`` (default: all) of the
    replicas that ran before are gone, and the load runs on; the counts since the change."""
    seen = Seen()
    load = Load(front.url + "/", clients=CLIENTS, hung_after_s=15, ok=seen.ok)
    with running(load):
        assert load.wait_ok(50, 20)
        before = _replica_pids()
        assert before
        load.mark()
        change()
        want = len(before) if gone is None else gone
        assert wait_until(lambda: sum(_gone(p) for p in before) >= want, 30), "old replicas still running"
        n = load.counts().ok
        assert load.wait_ok(n + 50, 20)  # and on after the change
        if gone is None:
            assert seen.answered - before, "no new replica answered"
        counts = load.stop()
    return counts


def test_rolling_redeploy_with_keepalive_clients_fails_nothing(front: Instance,
                                                              request: pytest.FixtureRequest) -> None:
    serve.run(Versioned.bind("v1"))
    counts = _under_load(front, lambda: serve.run(Versioned.bind("v2")))
    report(f"rolling redeploy, {CLIENTS} keep-alive clients ({_kind(request)})", counts, 0.0,
           "zero failures: drained connections close after Connection: close")
    assert counts.hung == 0 and counts.failed == 0, counts.details


def test_scale_down_with_keepalive_clients_fails_nothing(front: Instance, request: pytest.FixtureRequest) -> None:
    serve.run(Versioned.options(num_replicas=3).bind("v1"))
    counts = _under_load(front, lambda: serve.run(Versioned.options(num_replicas=1).bind("v1")), gone=2)
    report(f"scale-down 3 -> 1, {CLIENTS} keep-alive clients ({_kind(request)})", counts, 0.0, "zero failures")
    assert counts.hung == 0 and counts.failed == 0, counts.details


def _wrk_errors(out: str) -> tuple[int, int, int]:
    """(requests, non-2xx/3xx responses, socket errors) from wrk's report."""
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return requests, int(non2xx.group(1)) if non2xx else 0, sum(map(int, sock.groups())) if sock else 0


def _workers() -> list[ReplicaRecord]:
    assert api._instance is not None
    return [r for r in api._instance.controller.replicas.values() if r.deployment == "Versioned"]


def _served() -> int:
    """Requests the deployment's replicas finished, as their last stats said (about once a second)."""
    return sum(r.requests for r in _workers())


def test_wrk_through_a_redeploy_and_a_scale_down_sees_no_error(front: Instance,
                                                              request: pytest.FixtureRequest) -> None:
    if not os.access(WRK, os.X_OK):
        pytest.skip("wrk is not installed")
    serve.run(Versioned.options(num_replicas=2).bind("v1"))
    assert wait_until(lambda: httpx.get(front.url + "/", timeout=5).status_code == 200, 20)
    wrk = subprocess.Popen([WRK, "-t2", f"-c{CLIENTS}", "-d30s", "--latency", front.url + "/"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: _served() >= 200, 15), "wrk's requests did not arrive"
        serve.run(Versioned.options(num_replicas=2).bind("v2"))  # rolling redeploy
        serve.run(Versioned.options(num_replicas=1).bind("v2"))  # scale-down
        assert wait_until(lambda: len(_workers()) == 1, 20), "the scale-down did not finish"
        done = _served()
        assert wait_until(lambda: _served() >= done + 200, 15)  # wrk goes on against what is left
        wrk.send_signal(signal.SIGINT)  # wrk stops and prints its report
        out, _ = wrk.communicate(timeout=40)
    finally:
        if wrk.poll() is None:
            wrk.kill()
            wrk.wait()
    requests, non2xx, errors = _wrk_errors(out)
    counts = Counts(ok=requests - non2xx, failed=non2xx + errors)
    report(f"wrk -c{CLIENTS} through a redeploy and a scale-down ({_kind(request)})", counts, 0.0,
           "no non-2xx, no socket errors")
    assert requests > 0 and non2xx == 0 and errors == 0, out
    print(out)
