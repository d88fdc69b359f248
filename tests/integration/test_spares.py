"""Spare replica processes with real processes: a spare becomes the first replica, an idle
instance releases its spare, and the next replica start still works and brings one back."""

from __future__ import annotations

import httpx
import pytest
from conftest import child_pids, wait_until

from shoal import api, serve


@serve.deployment
class Pid:
    async def __call__(self) -> int:
        import os

        return os.getpid()


def _spares() -> dict[str, int]:
    assert api._instance is not None
    return {pid: s.proc.pid for pid, s in dict(api._instance.controller.spares).items()}


def test_an_idle_instance_releases_its_spare(run_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_SPARE_IDLE_S", "1")
    before = child_pids()
    serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        (first_spare,) = _spares().values()
        serve.run(Pid.bind(), name="a", route_prefix="/a")
        url = serve.http_address()
        assert httpx.get(url + "/a", timeout=10).json() == first_spare  # the spare became the replica
        # No replica starts for 1 s: the spare (refilled after the start, or not yet) is released and exits.
        assert wait_until(lambda: not _spares(), 20, 0.05)
        left = child_pids() - before
        assert len(left) == 2, left  # the proxy and the replica are left
        serve.run(Pid.bind(), name="b", route_prefix="/b")  # a new process, no spare to take
        pid_b = httpx.get(url + "/b", timeout=10).json()
        assert pid_b not in left | {first_spare}
        assert httpx.get(url + "/a", timeout=10).json() == first_spare
        assert wait_until(lambda: not _spares() and len(child_pids() - before) == 3, 20, 0.05)
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"
