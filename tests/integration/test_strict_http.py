"""Strict request framing (RFC 9112 Host and Transfer-Encoding rules) on both HTTP fronts of a
real instance: the proxy process (``ingress_serves_http: false``) and an ingress replica
serving HTTP itself. Raw bytes over a socket; the status line and the JSON body are checked,
and a refused request never reaches the application."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import pytest
from conftest import child_pids, wait_until
from starlette.requests import Request

from shoal import serve

CHUNKED = b"3\r\nabc\r\n0\r\n\r\n"
REFUSED = [
    (b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host header"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n" + CHUNKED, 501,
     "transfer coding not implemented (only chunked is)"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED, 501,
     "transfer coding not implemented (only chunked is)"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n" + CHUNKED, 400,
     "Transfer-Encoding must be chunked"),
    (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED, 400,
     "Transfer-Encoding in an HTTP/1.0 request"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED, 400,
     "invalid HTTP request"),
]


@serve.deployment
class Counter:
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, request: Request) -> dict[str, Any]:
        self.bodies.append(await request.body())
        return {"size": len(self.bodies[-1])}

    def seen(self) -> list[bytes]:
        return self.bodies


def send(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` and read until the server closes the connection (each read bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
        raise TimeoutError(f"no close within {timeout}s after {out[:200]!r}")


@pytest.mark.parametrize("front", ["replica", "proxy"])
def test_faulty_framing_is_refused_on_both_fronts(run_dir: str, front: str) -> None:
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": front == "replica"}, _run_dir=run_dir)
    try:
        handle = serve.run(Counter.bind())
        port = int(serve.http_address().rsplit(":", 1)[1])
        for request, status, error in REFUSED:
            out = send(port, request)
            head, _, body = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 %d " % status), (request[:60], out[:200])
            assert b"connection: close" in head.lower().split(b"\r\n")
            assert json.loads(body) == {"error": error, "request_id": json.loads(body)["request_id"]}
        out = send(port, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                   + CHUNKED)
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b'{"size": 3}'), out[:300]
        assert handle.seen.remote().result() == [b"abc"]
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"
