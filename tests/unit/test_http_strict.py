"""Strict request framing (shoal.runtime.http.strict, applied by httpguard's protocol): Host
and Transfer-Encoding rules of RFC 9112, and the request head timeout over a whole head.

The pure check runs on header lists; the rest sends raw bytes to a ProxyApp with a fake router
under a real HTTPFront on 127.0.0.1 (no replicas) and reads the status lines that come back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.runtime.http.strict import head_fault
from shoal.runtime.proxy import FrontOptions, HTTPFront, ProxyApp
from shoal.runtime.wire import RequestMeta, Routes

# ---- the pure check ------------------------------------------------------------------------

H = (b"host", b"x")


@pytest.mark.parametrize(("headers", "version", "status"), [
    ([H], "1.1", None),
    ([H, (b"transfer-encoding", b"chunked")], "1.1", None),
    ([H, (b"transfer-encoding", b"  ChunKed ")], "1.1", None),
    ([H, (b"content-length", b"5")], "1.1", None),
    ([], "1.0", None),  # HTTP/1.0 has no Host
    ([H], "1.0", None),
    ([], "1.1", 400),
    ([H, (b"host", b"y")], "1.1", 400),
    ([H, (b"host", b"x")], "1.0", 400),
    ([H, (b"transfer-encoding", b"chunked")], "1.0", 400),
    ([H, (b"transfer-encoding", b"chunked"), (b"content-length", b"3")], "1.1", 400),
    ([H, (b"content-length", b"3"), (b"transfer-encoding", b"chunked")], "1.1", 400),
    ([H, (b"transfer-encoding", b"gzip")], "1.1", 400),
    ([H, (b"transfer-encoding", b"chunked, gzip")], "1.1", 400),
    ([H, (b"transfer-encoding", b"chunked, chunked")], "1.1", 400),
    ([H, (b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")], "1.1", 400),
    ([H, (b"transfer-encoding", b"chunked,")], "1.1", 400),
    ([H, (b"transfer-encoding", b"")], "1.1", 400),
    ([H, (b"transfer-encoding", b"identity, chunked")], "1.1", 501),
    ([H, (b"transfer-encoding", b"gzip, chunked")], "1.1", 501),
    ([H, (b"transfer-encoding", b"gzip"), (b"transfer-encoding", b"chunked")], "1.1", 501),
])
def test_head_fault(headers: list[tuple[bytes, bytes]], version: str, status: int | None) -> None:
    fault = head_fault(headers, version)
    assert (fault[0] if fault else None) == status, fault


def test_the_check_costs_a_few_comparisons() -> None:
    """A measurement, printed (no assertion on time): the check of a typical 10-header head."""
    headers = [(b"host", b"api.example.com"), (b"user-agent", b"curl/8"), (b"accept", b"*/*"),
               (b"content-type", b"application/json"), (b"content-length", b"120"), (b"x-request-id", b"r1"),
               (b"authorization", b"Bearer k"), (b"accept-encoding", b"gzip"), (b"connection", b"keep-alive"),
               (b"x-session-id", b"s")]
    n = 100_000
    started = time.perf_counter()
    for _ in range(n):
        head_fault(headers, "1.1")
    each = (time.perf_counter() - started) / n
    print(f"\nhead_fault on a 10-header head: {each * 1e9:.0f} ns per request")
    assert head_fault(headers, "1.1") is None


# ---- on a real front -----------------------------------------------------------------------


class FakeRouter:
    """Answers with the size of the body it was sent, and counts the requests."""

    def __init__(self) -> None:
        self.seen = 0

    def holds_model(self, model_id: str) -> bool:
        return False

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
        _scope, body = args
        self.seen += 1
        text = b"got %d" % len(body)
        yield [{"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(text))]},
               {"type": "http.response.body", "body": text, "more_body": False}]


class Source:
    def __init__(self) -> None:
        self.r = FakeRouter()

    def router(self, app: str, deployment: str) -> FakeRouter:
        return self.r


class Front:
    def __init__(self, **options: Any) -> None:
        self.source = Source()
        self.options = FrontOptions(**options)
        self.app = ProxyApp(self.source, self.options)  # type: ignore[arg-type]
        self.app.set_routes(Routes({"/": ("app", "Ingress")}))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.front = HTTPFront(self.app, self.sock.fileno(), self.options)

    async def __aenter__(self) -> Front:
        await self.front.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.front.stop(2)
        self.sock.close()


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``; what comes back until the server closes, or until one whole response
    with a body came (``timeout`` bounds the wait: TimeoutError)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        out = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                return out
            out += chunk
            head, sep, body = out.partition(b"\r\n\r\n")
            length = [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
            if sep and length and len(body) >= int(length[0].split(b":")[1]):
                return out
    finally:
        writer.close()


def refused_with(out: bytes, status: int, error: str) -> None:
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), out[:200]
    lines = head.lower().split(b"\r\n")
    assert b"connection: close" in lines and b"content-type: application/json" in lines
    parsed = json.loads(body)
    assert parsed["error"] == error and parsed["request_id"].encode() in head


CHUNKED_BODY = b"3\r\nabc\r\n0\r\n\r\n"

REFUSED = [
    (b"GET / HTTP/1.1\r\n\r\n", 400, "missing Host header"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "more than one Host header"),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400, "more than one Host header"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n" + CHUNKED_BODY, 501,
     "transfer coding not implemented (only chunked is)"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_BODY, 501,
     "transfer coding not implemented (only chunked is)"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n" + CHUNKED_BODY, 400,
     "Transfer-Encoding must be chunked"),
    (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY, 400,
     "Transfer-Encoding in an HTTP/1.0 request"),
    # Caught by the parser itself (llhttp) before the framing check: the same JSON answer.
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     + CHUNKED_BODY, 400, "invalid HTTP request"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY,
     400, "invalid HTTP request"),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n" + CHUNKED_BODY, 400,
     "invalid HTTP request"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nno colon\r\n\r\n", 400, "invalid HTTP request"),
]


async def test_faulty_framing_is_refused_and_never_forwarded() -> None:
    async with Front() as f:
        for request, status, error in REFUSED:
            refused_with(await exchange(f.port, request), status, error)
        assert f.source.r.seen == 0
        # Sound framing still goes through: chunked in any case, HTTP/1.0 without Host.
        out = await exchange(f.port, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked \r\n\r\n"
                             + CHUNKED_BODY)
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"got 3")
        out = await exchange(f.port, b"GET / HTTP/1.0\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200 ") and out.endswith(b"got 0")
        assert f.source.r.seen == 2


async def test_a_faulty_head_after_a_good_one_on_a_kept_alive_connection() -> None:
    async with Front() as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b"got 0"), 5)
            assert first.startswith(b"HTTP/1.1 200 ")
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            out = await asyncio.wait_for(reader.read(65536), 5)
            while not out.endswith(b"}"):
                more = await asyncio.wait_for(reader.read(65536), 5)
                assert more, out
                out += more
        finally:
            writer.close()
        refused_with(out, 400, "more than one Host header")
        assert f.source.r.seen == 1


async def test_the_head_timeout_covers_the_whole_head_not_each_read() -> None:
    """A client trickling a head one byte at a time, each byte well within the timeout, is cut
    once the whole head took longer than the timeout."""
    async with Front(request_header_timeout_s=0.5) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        head = b"GET / HTTP/1.1\r\nHost: a\r\nx-slow: " + b"s" * 1000 + b"\r\n\r\n"
        sent = 0
        out = b""
        try:
            for byte in head:
                writer.write(bytes([byte]))
                sent += 1
                try:
                    out = await asyncio.wait_for(reader.read(65536), 0.05)
                except TimeoutError:
                    continue
                break  # an answer (or the close) came while the head was still incomplete
        finally:
            writer.close()
        assert sent < len(head), "the whole head was accepted byte by byte"
        refused_with(out, 408, "request head timed out")
