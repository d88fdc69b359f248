"""Issue 15: clients that send nothing, half a request, too many connections, or never read.

Each front (the proxy, or an ingress replica serving the port itself) closes a connection whose
request head or body stalls (408 when part of it arrived), answers a connection over its cap
with 503, and cuts a response its client does not read, freeing the replica slot it held. The
load alongside keeps being served. Short limits are configured so that each test is quick.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from conftest import Instance, child_pids, wait_until
from loadgen import Load, report, running
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse

from shoal import serve

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
WRITE_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 40


@dataclass
class Front(Instance):
    kind: str = ""  # "direct" or "proxied"


@pytest.fixture(params=["direct", "proxied"])
def front(request: pytest.FixtureRequest, run_dir: str) -> Iterator[Front]:
    """An instance with short connection limits; "direct": ingress replicas serve the port,
    "proxied": the proxy process does."""
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": request.param == "direct",
                              "request_header_timeout_s": HEADER_TIMEOUT_S,
                              "request_body_timeout_s": BODY_TIMEOUT_S,
                              "response_write_timeout_s": WRITE_TIMEOUT_S,
                              "max_connections": MAX_CONNECTIONS}, _run_dir=run_dir)
    try:
        yield Front(serve.http_address(), run_dir, request.param)
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


@serve.deployment
class Echo:
    async def __call__(self, request: Request) -> str:
        await request.body()
        return "ok"


@serve.deployment(num_replicas=1, max_ongoing_requests=1)
class Big:
    """/stream: 200 MB in 64 KiB chunks; anything else: "ok" (needs the one slot too)."""

    async def __call__(self, request: Request) -> PlainTextResponse | StreamingResponse:
        if request.url.path.endswith("/stream"):
            async def chunks():  # type: ignore[no-untyped-def]
                for _ in range(200 * 16):
                    yield b"x" * 65536
                    await asyncio.sleep(0.01)

            return StreamingResponse(chunks(), media_type="application/octet-stream")
        return PlainTextResponse("ok")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _connect(port: int, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if data:
        s.sendall(data)
    return s


def _read_until_closed(socks: list[socket.socket], timeout: float) -> dict[socket.socket, bytes | None]:
    """What each socket received until the server closed it; None for those still open."""
    got: dict[socket.socket, bytes] = {s: b"" for s in socks}
    open_ = set(socks)
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while open_ and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            s = key.fileobj
            assert isinstance(s, socket.socket)
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                got[s] += chunk
            else:
                open_.discard(s)
                sel.unregister(s)
    sel.close()
    return {s: (None if s in open_ else got[s]) for s in socks}


def _serving(url: str, path: str = "/") -> bool:
    try:
        return httpx.get(url + path, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_silent_and_half_sent_connections_are_closed(front: Front) -> None:
    serve.run(Echo.bind())
    assert wait_until(lambda: _serving(front.url), 30)
    port = _port(front.url)
    with running(Load(front.url + "/", clients=2, hung_after_s=15)) as load:
        assert load.wait_ok(5)
        load.mark()
        silent = [_connect(port) for _ in range(8)]
        half_head = [_connect(port, b"GET / HTTP/1.1\r\nhost: x\r\nx-half: ") for _ in range(8)]
        half_body = [_connect(port, b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n" + b"y" * 100)
                     for _ in range(8)]
        t0 = time.monotonic()
        got = _read_until_closed(silent + half_head + half_body, 10 * HEADER_TIMEOUT_S)
        closed_after = time.monotonic() - t0
        assert load.wait_ok(load.counts().ok + 5, 10)  # served on meanwhile and after
        counts = load.stop()
    for s in got:
        s.close()
    still_open = [s for s, data in got.items() if data is None]
    assert not still_open, f"{len(still_open)} connections still open"
    assert all(got[s] == b"" for s in silent)
    assert all((got[s] or b"").startswith(b"HTTP/1.1 408 ") for s in half_head + half_body), got
    assert counts.hung == 0 and counts.failed == 0, counts
    report(f"idle / half-head / half-body connections x8 each ({front.kind})", counts, closed_after,
           "closed after the head/body timeout (408 when partial); others served")


def test_a_connection_over_the_cap_gets_503_and_others_are_served(front: Front) -> None:
    serve.run(Echo.bind())
    assert wait_until(lambda: _serving(front.url), 30)
    port = _port(front.url)
    with running(Load(front.url + "/", clients=2, hung_after_s=15)) as load:
        assert load.wait_ok(5)
        load.mark()
        # More than every accepting front's cap, opened within the head timeout.
        flood = [_connect(port) for _ in range(3 * MAX_CONNECTIONS)]
        got = _read_until_closed(flood, 10 * HEADER_TIMEOUT_S)
        ok_during = load.counts().ok
        assert load.wait_ok(ok_during + 5, 10)
        # The held connections timed out (head timeout): a new client gets in again.
        t0 = time.monotonic()
        assert wait_until(lambda: _serving(front.url), 10)
        counts = load.stop()
    for s in flood:
        s.close()
    refused = [d for d in got.values() if d and d.startswith(b"HTTP/1.1 503 ")]
    assert refused, "no connection was refused over the cap"
    assert all(b'"error": "too many connections"' in d and b"connection: close" in d for d in refused)
    assert all(d is not None for d in got.values()), "connections left open"
    assert counts.hung == 0 and counts.failed == 0, counts
    report(f"{3 * MAX_CONNECTIONS} connections against a cap of {MAX_CONNECTIONS} ({front.kind})", counts,
           time.monotonic() - t0, f"{len(refused)} got 503; kept-alive clients served throughout")


def test_a_client_that_never_reads_is_cut_and_frees_its_slot(front: Front) -> None:
    serve.run(Big.bind())
    assert wait_until(lambda: _serving(front.url, "/small"), 30)
    port = _port(front.url)
    reader = socket.socket()
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    reader.connect(("127.0.0.1", port))
    reader.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")  # and never read
    reader.settimeout(10)
    assert reader.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"  # streaming: it holds the only slot
    # A request that needs the slot waits until the non-reader is cut (after the write
    # timeout), then succeeds.
    load = Load(front.url + "/small", clients=1, hung_after_s=15)
    with running(load):
        t0 = load.mark()
        assert load.wait_recovered(streak=5, timeout=30) is not None, load.counts()
        counts = load.stop()
    first_ok = min(o.ended for o in load.since() if o.kind == "ok")
    recovered = first_ok - t0
    cut = _read_until_closed([reader], 5)[reader] is not None
    reader.close()
    assert recovered >= WRITE_TIMEOUT_S * 0.9  # it did wait for the slot: the stream held it
    assert cut, "the non-reading client's connection is still open"
    assert counts.hung == 0 and counts.failed == 0, counts
    report(f"a client that never reads a 200 MB stream, max_ongoing_requests=1 ({front.kind})", counts,
           recovered, "cut after the write timeout; its slot serves the next request")


