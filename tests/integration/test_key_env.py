"""Processes the controller starts do not inherit the API keys variable
(``http_options.api_keys_env``): the keys reach the fronts over their authenticated socket, so
the variable is in no replica's or proxy's ``/proc/<pid>/environ``, and keys still work on both
fronts: the proxy process and an ingress replica serving HTTP itself."""

from __future__ import annotations

import os

import httpx
import pytest
from conftest import child_pids, wait_until
from starlette.requests import Request

from shoal import serve

KEY = "env-key-0123456789abcdef"
VARIABLE = "SHOAL_TEST_WITHHELD_KEYS"
PLAIN = "SHOAL_TEST_PLAIN_VARIABLE"  # not a secret: children still get it


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> str:
        return "ok"


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        entries = f.read().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in entries if b"=" in e)


@pytest.mark.parametrize("front", ["replica", "proxy"])
def test_the_api_keys_variable_is_withheld_from_children(run_dir: str, front: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, KEY)
    monkeypatch.setenv(PLAIN, "visible")
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": front == "replica", "api_keys_env": VARIABLE},
                _run_dir=run_dir)
    try:
        serve.run(Echo.bind())
        url = serve.http_address()
        with httpx.Client(base_url=url, timeout=10) as c:
            assert c.get("/").status_code == 401
            assert c.get("/", headers={"x-api-key": KEY}).text == "ok"
            assert c.get("/", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        children = child_pids() - before
        assert len(children) >= 2, children  # the proxy and the replica at least
        for pid in children:
            env = environ(pid)
            assert env.get(PLAIN) == "visible", pid
            assert VARIABLE not in env, f"pid {pid} inherited {VARIABLE}"
            assert KEY not in "\0".join(env.values()), pid
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"
    assert os.environ[VARIABLE] == KEY  # this process keeps it
