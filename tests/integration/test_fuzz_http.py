"""Fuzzing the HTTP port, on both fronts: the proxy process (``ingress_serves_http: false``) and
an ingress replica serving HTTP itself.

Raw sockets send garbage, truncated requests, oversized heads, broken chunked bodies, odd
methods, versions and paths (not UTF-8 among them), smuggling attempts and pipelines. The
oracle: nothing hangs (every attempt has a socket timeout, and a request left incomplete is
followed by end-of-input, which must close the connection), every malformed complete request
gets a 4xx (or 5xx) answer, and afterwards the processes are the same ones and still serve.
Then schemathesis generates requests from the OpenAPI schema of a FastAPI ingress served by
shoal (valid and invalid ones) and no 5xx may come back except from the endpoint that fails
on purpose. Deterministic (``derandomize=True``) and bounded (fixed example counts).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import child_pids, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from sec_apps import Shop
from starlette.requests import Request

from shoal import serve

FUZZ = settings(max_examples=100, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
HEAD_LIMIT = 8192


@serve.deployment
class Sized:
    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"size": len(await request.body()), "path": request.url.path}


@pytest.fixture(scope="module", params=["replica", "proxy"])
def front(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def port(front: str) -> Iterator[int]:
    """An instance serving ``Sized`` at / and the FastAPI ``Shop`` at /api, shared by the tests
    of one front; yields its port."""
    run_dir = tempfile.mkdtemp(prefix="shoal-t", dir="/tmp")
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": front == "replica",
                              "max_header_bytes": HEAD_LIMIT, "max_request_body_bytes": 1 << 20}, _run_dir=run_dir)
    try:
        serve.run(Sized.bind())
        serve.run(Shop.bind(), name="shop", route_prefix="/api")
        yield int(serve.http_address().rsplit(":", 1)[1])
    finally:
        serve.shutdown()
        shutil.rmtree(run_dir, ignore_errors=True)
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def _response_complete(data: bytes) -> bool:
    """Whether ``data`` holds at least one whole HTTP response."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    headers = head.lower()
    if b"transfer-encoding: chunked" in headers:
        return body.endswith(b"0\r\n\r\n")
    for line in headers.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":", 1)[1])
    return False


def attempt(port: int, payload: bytes, answer_within: float = 0.5, timeout: float = 5.0) -> bytes:
    """Send ``payload``; return what came back. If no whole response came within
    ``answer_within`` (an incomplete request, say), end our side: the server must then finish
    and close within ``timeout``. Raises ``socket.timeout`` if it does not (a hang)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused mid-send (e.g. an oversized head); the read below sees the rest
        out = b""
        deadline = time.monotonic() + answer_within
        half_closed = False
        while True:
            if not half_closed and time.monotonic() > deadline:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                half_closed = True
            s.settimeout(max(0.05, deadline - time.monotonic()) if not half_closed else timeout)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                if half_closed:
                    raise
                continue
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
            if _response_complete(out):
                return out


def status_of(response: bytes) -> int:
    if not response.startswith(b"HTTP/1."):
        return 0
    return int(response.split(b" ", 2)[1])


def _ok(port: int) -> None:
    r = httpx.post(f"http://127.0.0.1:{port}/x", content=b"12345", timeout=10)
    assert r.status_code == 200 and r.json() == {"size": 5, "path": "/x"}
    r = httpx.get(f"http://127.0.0.1:{port}/api/items/7", params={"q": "a"}, timeout=10)
    assert r.json() == {"id": 7, "q": "a"}


BIG = b"a" * (HEAD_LIMIT + 100)

# (request bytes, the statuses it may get; () means "no answer is fine, just no hang")
MALFORMED: list[tuple[bytes, tuple[int, ...]]] = [
    (b"\x00\xff\xfe garbage\r\n\r\n", (400,)),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)), (400,)),  # a TLS ClientHello
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400, 404, 405, 505)),
    (b"GET / HTTP/1.1\r\n", ()),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", ()),
    (b"GET / HTTP/1.1\r\nHost: x\r\nx-big: " + BIG + b"\r\n\r\n", (431,)),
    (b"GET /" + BIG + b" HTTP/1.1\r\nHost: x\r\n\r\n", (431,)),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"x-h: v\r\n" * 1500 + b"\r\n", (431,)),
    (b"GET / HTTP/1.1\r\nHost: x\r\nx-big: " + BIG, (431,)),  # oversized and never finished
    (b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", (400,)),
    (b"GET / HTTP/1.1\r\nHost: x\r\nbad\x01name: v\r\n\r\n", (400,)),
    (b"GET / HTTP/1.1\r\nHost: x\r\nx-ctl: a\x00b\r\n\r\n", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n0\r\n\r\n", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nabc\r\n", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabc", ()),  # truncated chunk
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcXX\r\n0\r\n\r\n", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", (400,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n", (400, 413)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\r\n", (413,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nExpect: 100-continue\r\n\r\n", (413,)),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-part", ()),  # truncated body
    (b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    (b"GETT\xff / HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    (b"A" * 5000 + b" / HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),
    (b"GET /\xff\xfe\x80 HTTP/1.1\r\nHost: x\r\n\r\n", (400,)),  # a path that is not UTF-8
    (b"GET /%ff%fe%80 HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n", (200, 400)),
    (b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", (400, 505)),
    (b"GET / HTTX/1.1\r\nHost: x\r\n\r\n", (400,)),
    (b"GET /\r\n\r\n", (200, 400)),  # HTTP/0.9: llhttp takes it as a request
    (b"GET / HTTP/1.1\nHost: x\n\n", (200, 400)),  # bare LF
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded: header\r\n\r\n", (400,)),
    (b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: x\r\n\r\n", (400, 404, 405)),
    (b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n", (200, 400, 404)),
    (b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n", (200, 400, 404)),
    (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", (400, 403, 426)),
    (b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n", (200, 400)),
    (b"\r\n" * 2000, ()),
]


def test_malformed_http(port: int, front: str) -> None:
    pids = child_pids()
    tried = 0
    for payload, allowed in MALFORMED:
        got = attempt(port, payload)
        tried += 1
        code = status_of(got)
        if allowed and not (code in allowed or (code == 0 and got == b"" and 400 in allowed)):
            raise AssertionError(f"{payload[:60]!r}: expected {allowed}, got {got[:200]!r}")
        if code:
            assert code >= 400 or code in allowed, payload[:60]
            assert b"Traceback" not in got
    # 100 pipelined requests in one write: all answered, in order.
    pipeline = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(100))
    got = attempt(port, pipeline + b"GET /last HTTP/1.1\r\nHost: x\r\nconnection: close\r\n\r\n", answer_within=10)
    assert got.count(b"HTTP/1.1 200 ") >= 1
    tried += 1
    print(f"\nHTTP fuzzing ({front} front): {tried} curated requests")
    _ok(port)
    assert child_pids() == pids, "a process died or was replaced"


methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE", b"FOO"]) \
    | st.binary(min_size=1, max_size=12)
paths = st.sampled_from([b"/", b"/x", b"/api/items", b"/api/items/1", b"/api/fail", b"/-/routes", b"/-/healthz"]) \
    | st.text(max_size=30).map(lambda t: b"/" + t.encode()) | st.binary(max_size=40).map(lambda b: b"/" + b)
header_names = st.sampled_from([b"content-type", b"x-request-id", b"transfer-encoding", b"content-length", b"host",
                                b"serve_multiplexed_model_id", b"x-session-id", b"expect", b"connection"]) \
    | st.binary(min_size=1, max_size=12)
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.encode) \
    | st.binary(max_size=40)
headers = st.lists(st.tuples(header_names, header_values), max_size=6)


sane_headers = st.lists(st.tuples(st.sampled_from([b"content-type", b"x-request-id", b"accept", b"x-session-id",
                                                   b"serve_multiplexed_model_id", b"cookie", b"x-api-key"]),
                                   st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=30)
                                   .map(str.encode)), max_size=4)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """An HTTP/1.x request: half of them well-formed (odd values in sane places), half with
    random bytes anywhere; a third cut short."""
    if draw(st.booleans()):
        method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS"]))
        path = draw(paths.filter(lambda p: all(32 < c < 127 for c in p)))
        version, host, extra = b"HTTP/1.1", True, draw(sane_headers)
    else:
        method, path, extra = draw(methods), draw(paths), draw(headers)
        version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b""]) | st.binary(max_size=8))
        host = draw(st.booleans())
    body = draw(st.binary(max_size=200))
    lines = [method + b" " + path + (b" " + version if version else b"")]
    if host:
        lines.append(b"Host: x")
    lines += [name + b": " + value for name, value in extra]
    chunked = draw(st.booleans())
    if chunked:
        lines.append(b"Transfer-Encoding: chunked")
        payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
    else:
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    raw = b"\r\n".join(lines) + b"\r\n\r\n" + payload
    cut = draw(st.none() | st.none() | st.integers(0, len(raw)))
    return raw if cut is None else raw[:cut]


def test_generated_http(port: int, front: str) -> None:
    pids = child_pids()
    tried = {"requests": 0, "garbage": 0}
    statuses: dict[str, dict[int, int]] = {"requests": {}, "garbage": {}}

    @FUZZ
    @given(requests())
    def structured(payload: bytes) -> None:
        tried["requests"] += 1
        got = attempt(port, payload, answer_within=0.3)
        code = status_of(got)
        statuses["requests"][code] = statuses["requests"].get(code, 0) + 1
        assert b"Traceback" not in got
        # Only the endpoint that fails on purpose may answer 5xx.
        assert code < 500 or b"/api/fail" in payload, got[:300]

    @FUZZ
    @given(st.binary(min_size=1, max_size=300))
    def garbage(payload: bytes) -> None:
        tried["garbage"] += 1
        got = attempt(port, payload, answer_within=0.3)
        code = status_of(got)
        statuses["garbage"][code] = statuses["garbage"].get(code, 0) + 1
        assert code == 0 or code >= 400, got[:300]

    structured()
    garbage()
    print(f"\nHTTP fuzzing ({front} front): {tried} inputs; statuses (0: closed without one) {statuses}")
    _ok(port)
    assert child_pids() == pids, "a process died or was replaced"


def test_openapi_fuzzing_with_schemathesis(port: int, front: str) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{port}/api/openapi.json")
    tried = 0
    statuses: dict[int, int] = {}

    def run(strategy: Any, label: str) -> None:
        @settings(max_examples=25, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case: Any) -> None:
            nonlocal tried
            tried += 1
            response = case.call(timeout=10)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            assert "Traceback" not in response.text
            if label != "GET /fail":  # the endpoint that fails on purpose
                assert response.status_code < 500, (label, response.status_code, response.text[:300])

        check()

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:  # valid and invalid requests
            try:
                run(operation.as_strategy(generation_mode=mode), operation.label)
            except Unsatisfiable:  # e.g. no invalid request exists for an endpoint without parameters
                pass
    print(f"\nschemathesis ({front} front): {tried} cases; statuses {dict(sorted(statuses.items()))}")
    assert tried > 50
