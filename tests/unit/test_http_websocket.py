"""A front's WebSockets (shoal.runtime.http.websocket, shoal.runtime.wschannel) against a fake
router that plays the application: a ProxyApp under a real HTTPFront (uvicorn on a 127.0.0.1
socket) and the ``websockets`` asyncio client."""

from __future__ import annotations

import asyncio
import pickle
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from shoal.runtime.flow import STREAM_WINDOW_BYTES
from shoal.runtime.proxy import FrontOptions, HTTPFront, ProxyApp
from shoal.runtime.wire import WS_IN, RequestMeta, Routes
from shoal.runtime.wschannel import QUEUED_MESSAGES, ClientMessages

KEY = "k" * 12 + "-test-key-1"


class EchoRouter:
    """Accepts, then echoes the client's messages from the inbox until the client goes away;
    ``reads`` False: accepts and never reads (a slow application)."""

    def __init__(self, reads: bool = True) -> None:
        self.reads = reads
        self.inboxes: list[ClientMessages] = []
        self.disconnects = 0
        self.scopes: list[dict[str, Any]] = []

    def holds_model(self, model_id: str) -> bool:
        return False

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
        scope, inbox = args
        assert isinstance(inbox, ClientMessages) and meta.http
        self.scopes.append(scope)
        self.inboxes.append(inbox)
        yield [{"type": "websocket.accept"}]
        if not self.reads:
            await asyncio.get_running_loop().create_future()
        while True:
            message = await inbox.queue.get()
            if message["type"] == "websocket.disconnect":
                self.disconnects += 1
                return
            yield [{"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")}]


class Source:
    def __init__(self, router: EchoRouter) -> None:
        self.the_router = router

    def router(self, app: str, deployment: str) -> EchoRouter:
        return self.the_router


class Front:
    def __init__(self, options: FrontOptions, router: EchoRouter | None = None) -> None:
        self.router = router or EchoRouter()
        self.app = ProxyApp(Source(self.router), options)  # type: ignore[arg-type]
        self.app.set_routes(Routes({"/ws": ("app", "Ingress")}))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.front = HTTPFront(self.app, self.sock.fileno(), options)

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def __aenter__(self) -> Front:
        await self.front.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.front.stop(2)
        self.sock.close()


async def until(cond: Any, timeout: float = 5.0) -> bool:
    """Wait for ``cond()`` (polling the loop), at most ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)
    return True


async def test_echo_then_the_connection_is_counted_no_more() -> None:
    async with Front(FrontOptions()) as f:
        async with connect(f.url(), open_timeout=5) as ws:
            await ws.send("hi")
            assert await asyncio.wait_for(ws.recv(), 5) == "hi"
            assert len(f.front.connections.live) == 1  # an open WebSocket counts toward the cap
            assert f.router.scopes[0]["type"] == "websocket" and f.router.scopes[0]["root_path"] == "/ws"
        await until(lambda: f.router.disconnects == 1)  # the application saw the client go
        await until(lambda: not f.front.connections.live)  # released with the WebSocket's connection


async def test_unrouted_and_unauthorized_handshakes_are_refused_with_a_reason() -> None:
    async with Front(FrontOptions(api_keys=(KEY,))) as f:
        for path, headers, status in (("/ws", {}, 401), ("/nowhere", {"x-api-key": KEY}, 404),
                                      ("/-/routes", {"x-api-key": KEY}, 404)):
            with pytest.raises(InvalidStatus) as refused:
                await connect(f.url(path), open_timeout=5, additional_headers=headers)
            assert refused.value.response.status_code == status, path
            assert b'"error"' in refused.value.response.body and refused.value.response.headers["x-request-id"]
        async with connect(f.url(), open_timeout=5, additional_headers={"authorization": "Bearer " + KEY}) as ws:
            await ws.send(b"bytes")
            assert await asyncio.wait_for(ws.recv(), 5) == b"bytes"
        assert not f.router.inboxes[1:]  # the refused ones never reached the application


def team_hook(request: Any) -> bool:
    return bool(request.headers.get("x-team") == "blue" and request.url.path.startswith("/ws"))


async def test_the_auth_hook_sees_the_handshake() -> None:
    async with Front(FrontOptions(auth=f"{__name__}:team_hook")) as f:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f.url(), open_timeout=5, additional_headers={"x-team": "red"})
        assert refused.value.response.status_code == 401
        async with connect(f.url(), open_timeout=5, additional_headers={"x-team": "blue"}) as ws:
            await ws.send("blue")
            assert await asyncio.wait_for(ws.recv(), 5) == "blue"


async def test_a_client_is_not_read_while_its_application_does_not_read() -> None:
    async with Front(FrontOptions(), EchoRouter(reads=False)) as f, connect(f.url(), open_timeout=5) as ws:
        for i in range(QUEUED_MESSAGES * 4):
            await asyncio.wait_for(ws.send(f"m{i}"), 5)  # the socket buffers take them
        await until(lambda: bool(f.router.inboxes) and f.router.inboxes[0].queue.full())
        inbox = f.router.inboxes[0]
        assert inbox.queue.qsize() == QUEUED_MESSAGES  # bounded: the rest waits in the client's socket
        first = inbox.queue.get_nowait()
        assert first == {"type": "websocket.receive", "text": "m0"}
        await until(lambda: inbox.queue.full())  # room made: the front reads one more
        assert [inbox.queue.get_nowait()["text"] for _ in range(QUEUED_MESSAGES)] == \
                [f"m{i}" for i in range(1, QUEUED_MESSAGES + 1)]
        # Its close frame waits behind the unread messages, as under uvicorn alone: drop the connection.
        ws.transport.abort()


async def test_a_handshake_the_application_never_answers_is_refused() -> None:
    class Silent(EchoRouter):
        async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                         meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
            await asyncio.get_running_loop().create_future()
            yield []

    async with Front(FrontOptions(request_timeout_s=0.3), Silent()) as f:
        with pytest.raises(InvalidStatus) as refused:
            await connect(f.url(), open_timeout=5)
        assert refused.value.response.status_code == 504


async def test_an_application_failing_after_the_accept_closes_1011() -> None:
    class Failing(EchoRouter):
        async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                         meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
            yield [{"type": "websocket.accept"}]
            await args[1].queue.get()
            raise ConnectionError("replica died")

    async with Front(FrontOptions(), Failing()) as f, connect(f.url(), open_timeout=5) as ws:
        await ws.send("boom")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


async def test_the_pump_sends_within_the_credit_window() -> None:
    sent: list[bytes] = []
    inbox = ClientMessages()
    big = {"type": "websocket.receive", "bytes": b"x" * (STREAM_WINDOW_BYTES // 4 - 1024)}
    for _ in range(8):
        await inbox.put(big)
    inbox.attach(sent.append, 7)
    await until(lambda: len(sent) >= 4)  # four frames of just under a quarter window each
    for _ in range(20):  # loop turns in which a pump that ignored the window would send more
        await asyncio.sleep(0)
    assert len(sent) == 4  # a window's worth (1 MiB), then it waits for the replica's credit
    assert pickle.loads(sent[0])[:2] == (WS_IN, 7)
    inbox.credit(sum(map(len, sent)))
    await until(lambda: len(sent) == 8)
    inbox.detach()


async def test_a_client_that_reads_nothing_is_cut_after_the_write_timeout() -> None:
    ended: list[bool] = []

    class Flood(EchoRouter):
        async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                         meta: RequestMeta) -> AsyncIterator[list[dict[str, Any]]]:
            yield [{"type": "websocket.accept"}]
            await args[1].queue.get()  # the client's go
            try:
                while True:
                    yield [{"type": "websocket.send", "bytes": b"x" * 65536}]
            finally:
                ended.append(True)  # the front closed the stream: the request ends upstream

    options = FrontOptions(response_write_timeout_s=0.3)
    async with Front(options, Flood()) as f:
        # A raw client (a library's would keep reading): the handshake, one masked text frame
        # "go", then nothing read ever again.
        reader, writer = await asyncio.open_connection("127.0.0.1", f.port)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        mask = b"\x01\x02\x03\x04"
        writer.write(b"\x81\x82" + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(b"go")))
        writer.transport.pause_reading()
        await until(lambda: bool(ended), 10)  # aborted after the write timeout; the stream closed
        await until(lambda: not f.front.connections.live)
        writer.close()
