"""Connection hygiene of an HTTP front: head, body and write timeouts, the connection cap and
Envoy-style draining (shoal.runtime.http.connections, httpguard.guarded_protocol, HTTPFront).

The pure parts run with an injected clock; the rest runs a ProxyApp with a fake router under a
real HTTPFront on 127.0.0.1 with short limits (no replicas).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from shoal.config import HTTPOptions
from shoal.runtime.http.connections import (
    FD_RESERVE,
    MAX_CONNECTIONS,
    WARN_EVERY_S,
    ConnLimits,
    FrontConnections,
    Pool,
    Stall,
    StallTimer,
    connection_cap,
)
from shoal.runtime.proxy import FrontOptions, HTTPFront, ProxyApp
from shoal.runtime.wire import RequestMeta, Routes

# ---- pure parts ----------------------------------------------------------------------------


def test_connection_cap_is_the_configured_maximum_within_the_fd_limit() -> None:
    assert connection_cap(MAX_CONNECTIONS, 1_048_576) == MAX_CONNECTIONS
    assert connection_cap(MAX_CONNECTIONS, 1024) == 1024 - FD_RESERVE
    assert connection_cap(50, 1024) == 50
    assert connection_cap(MAX_CONNECTIONS, 100) == 50  # a tiny limit: half of it
    assert connection_cap(MAX_CONNECTIONS, -1) == MAX_CONNECTIONS  # no limit
    assert connection_cap(MAX_CONNECTIONS, 1) == 1


def test_limits_follow_the_options() -> None:
    opts = FrontOptions.of(HTTPOptions(request_header_timeout_s=3, request_body_timeout_s=4,
                                       response_write_timeout_s=5, max_connections=77, keep_alive_timeout_s=6))
    limits = ConnLimits.of(opts, fd_limit=20_000)
    assert limits == ConnLimits(3, 4, 5, 77, 6)  # the drain grace defaults to the keep-alive timeout
    assert ConnLimits.of(FrontOptions(drain_grace_s=0.5), fd_limit=256).drain_grace_s == 0.5
    assert ConnLimits.of(FrontOptions(), fd_limit=256).max_connections == 128


def test_stall_measures_the_time_since_the_last_progress() -> None:
    now = [100.0]
    stall = Stall(10.0, lambda: now[0])
    assert stall.remaining() is None and not stall.waiting
    stall.start()
    now[0] = 104.0
    assert stall.remaining() == 6.0
    stall.progress()
    now[0] = 113.0
    assert stall.remaining() == 1.0
    now[0] = 115.0
    assert stall.remaining() == -1.0
    stall.stop()
    stall.progress()  # progress while not waiting starts nothing
    assert stall.remaining() is None


async def test_stall_timer_fires_only_after_a_whole_limit_without_progress() -> None:
    fired = asyncio.Event()
    timer = StallTimer(asyncio.get_running_loop(), 0.2, fired.set)
    timer.start()
    for _ in range(4):  # progress every 0.1 s keeps it from firing
        await asyncio.sleep(0.1)
        timer.progress()
    assert not fired.is_set()
    await asyncio.wait_for(fired.wait(), 2)
    timer.start()
    timer.stop()
    fired.clear()
    await asyncio.sleep(0.3)
    assert not fired.is_set()


def test_cut_connections_are_warned_about_at_most_every_few_seconds_with_a_count() -> None:
    conns = FrontConnections()
    assert conns.note("head", 0.0) == 1  # the first at once
    assert [conns.note("head", t) for t in (1.0, 2.0, 3.0)] == [0, 0, 0]
    assert conns.note("body", 3.0) == 1  # each kind on its own
    assert conns.note("head", WARN_EVERY_S + 0.5) == 4  # the next one, with those held back


class FakeConn:
    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.events: list[str] = []

    def drain_started(self) -> None:
        self.events.append("drain")

    def grace_over(self) -> None:
        self.events.append("grace")


async def test_pool_drains_once_and_ends_the_grace_on_time() -> None:
    pool = Pool()
    a, b = FakeConn(False), FakeConn(True)
    pool.add(a)
    pool.add(b)
    assert not pool.empty.is_set()
    pool.drain(asyncio.get_running_loop(), 0.1)
    pool.drain(asyncio.get_running_loop(), 0.1)  # once
    assert a.events == ["drain"] and pool.draining and not pool.grace_done
    await asyncio.sleep(0.2)
    assert pool.grace_done and a.events == b.events == ["drain", "grace"]
    pool.discard(a)
    pool.discard(b)
    assert pool.empty.is_set()


# ---- a front on a real socket --------------------------------------------------------------


class Reserved:
    def take(self) -> None:
        return None

    def release(self) -> None:
        pass


class FakeRouter:
    """Answers with "ok", or (path /stream) with an endless stream of 64 KiB chunks."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.release: asyncio.Event | None = None  # path /slow waits for it
        self.slot_free: asyncio.Event | None = None  # reserve() waits for it

    def holds_model(self, model_id: str) -> bool:
        return False

    async def reserve(self, model_id: str = "") -> Reserved:
        """A slot taken before a large body is read (ProxyApp): after ``slot_free``, if set."""
        if self.slot_free is not None:
            await self.slot_free.wait()
        return Reserved()

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta, reserved: Any = None) -> AsyncIterator[list[dict[str, Any]]]:
        scope, body = args
        if scope["path"] == "/stream":
            yield [{"type": "http.response.start", "status": 200, "headers": []}]
            try:
                while True:
                    yield [{"type": "http.response.body", "body": b"x" * 65536, "more_body": True}]
                    await asyncio.sleep(0)
            except (asyncio.CancelledError, GeneratorExit):
                self.cancelled.set()
                raise
        if scope["path"] == "/slow" and self.release is not None:
            await self.release.wait()
        text = b"ok %d" % len(body)
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
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.front = HTTPFront(self.app, self.sock.fileno(), self.options)

    async def __aenter__(self) -> Front:
        await self.front.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.front.stop(2)
        self.sock.close()


async def read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server sends until it closes the connection."""
    out = b""
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), timeout)
        if not chunk:
            return out
        out += chunk


async def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout() -> None:
    async with Front(request_header_timeout_s=0.3) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        assert await read_all(reader, 5) == b""  # closed, nothing said
        writer.close()
        assert len(f.front.connections) == 0


async def test_half_a_head_gets_408_then_the_connection_closes() -> None:
    async with Front(request_header_timeout_s=0.3) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\nx-half: ")
        out = await read_all(reader, 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 408 ") and b"connection: close" in out
        assert b'"error": "request head timed out"' in out


async def test_a_kept_alive_connection_must_finish_its_next_head_in_time() -> None:
    async with Front(request_header_timeout_s=0.3, keep_alive_timeout_s=30) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"ok 0"), 5)
        assert first.startswith(b"HTTP/1.1 200 ")
        writer.write(b"GET / HTT")  # and nothing more
        out = await read_all(reader, 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 408 ")


async def test_half_a_body_gets_408_then_the_connection_closes() -> None:
    async with Front(request_body_timeout_s=0.3) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n" + b"y" * 40)
        out = await read_all(reader, 5)
        writer.close()
        assert out.startswith(b"HTTP/1.1 408 ") and b'"error": "request body timed out"' in out


async def test_a_slow_but_steady_body_is_not_cut() -> None:
    async with Front(request_body_timeout_s=0.4) as f, httpx.AsyncClient(base_url=f.url) as c:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(6):  # 6 x 0.15 s: longer than the timeout in all, never idle that long
                await asyncio.sleep(0.15)
                yield b"z" * 10

        r = await c.post("/", content=body(), headers={"content-length": "60"})
        assert r.status_code == 200 and r.text == "ok 60"


async def test_a_client_waiting_for_100_continue_is_not_blamed_for_a_slow_front() -> None:
    async with Front(request_body_timeout_s=0.3) as f:
        f.source.r.slot_free = asyncio.Event()
        size = 2 * 1024 * 1024  # large: the front waits for a replica slot before reading it
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"POST / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n" % size)
        await asyncio.sleep(0.8)  # the body timeout passes twice while the front waits
        f.source.r.slot_free.set()
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"b" * size)
        answer = await asyncio.wait_for(reader.readuntil(b"ok %d" % size), 5)
        assert answer.startswith(b"HTTP/1.1 200 ")
        writer.close()


async def test_a_connection_over_the_cap_gets_503_and_the_others_are_served() -> None:
    async with Front(max_connections=3) as f:
        held = [await asyncio.open_connection("127.0.0.1", f.port) for _ in range(3)]
        # Wait until the front counts them.
        for _ in range(200):
            if len(f.front.connections) == 3:
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f.url) as c:
            r = await c.get("/")
        assert r.status_code == 503 and r.json()["error"] == "too many connections"
        assert r.headers["connection"] == "close"
        # The held connections are still served.
        reader, writer = held[0]
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"ok 0"), 5)).startswith(b"HTTP/1.1 200 ")
        for _, w in held:
            w.close()
        for _ in range(200):
            if len(f.front.connections) == 0:
                break
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f.url) as c:
            assert (await c.get("/")).status_code == 200  # room again
        assert f.front.connections.refused == 1


async def test_a_client_that_does_not_read_is_cut_and_its_request_cancelled() -> None:
    async with Front(response_write_timeout_s=0.5) as f:
        s = socket.create_connection(("127.0.0.1", f.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")  # and never read
        await asyncio.wait_for(f.source.r.cancelled.wait(), 10)
        for _ in range(200):
            if len(f.front.connections) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(f.front.connections) == 0
        s.close()


# ---- draining ------------------------------------------------------------------------------


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/") -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    return await asyncio.wait_for(reader.readuntil(b"ok 0"), 5)


async def test_a_draining_front_answers_with_connection_close_and_closes_idle_ones_after_the_grace() -> None:
    async with Front(drain_grace_s=0.5, keep_alive_timeout_s=30) as f:
        active = await asyncio.open_connection("127.0.0.1", f.port)
        idle = await asyncio.open_connection("127.0.0.1", f.port)
        assert b"connection: close" not in await request(*active)
        assert b"connection: close" not in await request(*idle)
        loop = asyncio.get_running_loop()
        f.front.pause()
        t0 = loop.time()
        # Within the grace: a request is answered, with Connection: close, and the connection closes.
        answer = await request(*active)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"connection: close" in answer
        assert await read_all(active[0], 5) == b""
        # The idle one is closed only once the grace is over.
        assert await read_all(idle[0], 5) == b""
        assert loop.time() - t0 >= 0.4
        for _, w in (active, idle):
            w.close()


async def test_a_drain_never_closes_a_connection_under_a_request() -> None:
    async with Front(drain_grace_s=0.1, keep_alive_timeout_s=30) as f:
        f.source.r.release = asyncio.Event()
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        for _ in range(200):
            if f.app.ongoing:
                break
            await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(f.front.stop(5))
        await asyncio.sleep(0.4)  # well past the grace
        assert not stopping.done()
        f.source.r.release.set()
        out = await read_all(reader, 5)
        assert out.startswith(b"HTTP/1.1 200 ") and b"connection: close" in out and out.endswith(b"ok 0")
        await asyncio.wait_for(stopping, 5)
        writer.close()


async def test_an_idle_connection_closes_when_the_grace_ends() -> None:
    async with Front(drain_grace_s=0.3, keep_alive_timeout_s=30) as f:
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        await request(reader, writer)
        f.front.pause()
        await asyncio.sleep(0.5)
        assert await read_all(reader, 5) == b""
        writer.close()


async def test_resumed_front_accepts_while_the_paused_server_drains() -> None:
    async with Front(drain_grace_s=0.3, keep_alive_timeout_s=30) as f, httpx.AsyncClient(base_url=f.url) as c:
        assert (await c.get("/")).headers.get("connection") != "close"
        f.front.pause()
        r = await c.get("/")  # the kept-alive connection: told to close
        assert r.status_code == 200 and r.headers["connection"] == "close"
        await f.front.start()
        r = await c.get("/")  # a new connection, on the new server
        assert r.status_code == 200 and r.headers.get("connection") != "close"
        for _ in range(200):
            if not f.front.paused:
                break
            await asyncio.sleep(0.01)
        assert not f.front.paused  # the drained server retired


@pytest.mark.parametrize("grace", [0.0])
async def test_stop_with_no_connections_is_quick(grace: float) -> None:
    async with Front(drain_grace_s=grace) as f:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await f.front.stop(5)
        assert loop.time() - t0 < 4
