"""Issue 15: a replica blocks its event loop while the proxy is restarted. The new proxy's
first connection to it times out; its router keeps the replica, sends requests to the other
one meanwhile and reconnects with back-off, so that the replica serves again once its loop
runs. Nothing hangs."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
from conftest import Instance, wait_until
from loadgen import Load, report, running

from shoal import api, serve
from shoal.runtime.controller.records import ProxyRecord

BLOCK_S = 10.0


@serve.deployment(num_replicas=2, max_ongoing_requests=8)
class Blocky:
    async def __call__(self, request: object) -> str:
        q = request.query_params  # type: ignore[attr-defined]
        if "block" in q:
            _write(q["marker"] + ".tmp", q["marker"], str(os.getpid()))
            time.sleep(float(q["block"]))  # blocks this replica's event loop
            _write(q["marker"] + ".tmp", q["marker"] + ".done", str(os.getpid()))
            return "unblocked"
        return str(os.getpid())


def _write(tmp: str, path: str, text: str) -> None:
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _proxy() -> ProxyRecord:
    assert api._instance is not None
    proxy = api._instance.controller.proxy
    assert proxy is not None
    return proxy


def _serves(url: str) -> bool:
    try:
        return httpx.get(url + "/-/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_replica_blocked_during_a_proxy_restart_is_reconnected(proxied: Instance) -> None:
    url = proxied.url
    serve.run(Blocky.bind())
    assert api._instance is not None
    pids = {r.proc.pid for r in api._instance.controller.replicas.values() if r.deployment == "Blocky"}
    assert len(pids) == 2, pids
    answers: list[tuple[float, str]] = []  # (when, which replica's pid) of each success

    def ok(r: httpx.Response) -> bool:
        if r.status_code != 200:
            return False
        answers.append((time.monotonic(), r.text))
        return True

    def served_by(pid: int, after: float, before: float = float("inf")) -> int:
        return sum(1 for t, who in list(answers) if who == str(pid) and after <= t < before)

    marker = os.path.join(proxied.run_dir, "blocked")

    def block() -> None:
        try:  # its proxy is killed under it: the answer never comes back
            httpx.get(url + "/", params={"block": str(BLOCK_S), "marker": marker}, timeout=BLOCK_S + 10)
        except httpx.HTTPError:
            pass

    load = Load(url + "/", clients=3, hung_after_s=30.0, pause_s=0.02, ok=ok)
    with running(load):
        assert load.wait_ok(20, timeout=30)
        blocker = threading.Thread(target=block, daemon=True)
        blocker.start()
        assert wait_until(lambda: os.path.exists(marker), 15)
        with open(marker) as f:
            blocked = int(f.read())
        other = (pids - {blocked}).pop()

        # kill -9 of the proxy while the replica's loop is blocked; wait for the new one.
        old = _proxy()
        t0 = load.mark()
        os.kill(old.proc.pid, signal.SIGKILL)
        assert wait_until(lambda: _proxy() is not old and _proxy().ready and _serves(url), 20, 0.05), (
            "the proxy was not back")
        back = time.monotonic()

        # Requests go to the other replica while the first is blocked.
        assert wait_until(lambda: served_by(other, back) >= 10, 15), answers[-5:]
        assert wait_until(lambda: os.path.exists(marker + ".done"), BLOCK_S + 10), "the block never ended"
        unblocked = time.monotonic()
        during = served_by(other, back, unblocked)

        # Its loop runs again: the new proxy reconnects and it serves requests again.
        assert wait_until(lambda: served_by(blocked, unblocked) >= 3, 20), (
            f"replica {blocked} never served again after its block ended")
        again = next(t for t, who in list(answers) if who == str(blocked) and t >= unblocked) - unblocked
        recovery = load.wait_recovered(streak=20, timeout=30)
        counts = load.stop()
    blocker.join(BLOCK_S + 15)
    print(f"blocked loop during a proxy restart: {counts}, proxy back after {back - t0:.2f} s, "
          f"{during} requests served by the other replica meanwhile, blocked replica serving again "
          f"{again:.2f} s after its block ended; recovery {recovery}")
    assert counts.hung == 0, counts
    assert recovery is not None, counts
    report(f"replica blocks its loop {BLOCK_S:g} s during a proxy restart", counts, recovery,
           "requests go to the other replica; reconnect after",
           notes=f"proxy back after {back - t0:.1f} s; blocked replica serving again {again:.1f} s "
                 "after its block ended")
