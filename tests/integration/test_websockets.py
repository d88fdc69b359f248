"""WebSockets through a FastAPI ingress, on both fronts: the ingress replica's own front
("replica") and the proxy process ("proxy", which forwards the client's messages to the
replica over RPC). A real instance, the ``websockets`` sync client, a timeout on every recv.

No ``from __future__ import annotations``: FastAPI must see ``ws: WebSocket`` as the class
(a string annotation in a class pickled by value would make ``ws`` a query parameter).
"""

import os
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from starlette.requests import Request
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from shoal import serve
from tests.conftest import child_pids, wait_until

FRONTS = pytest.mark.parametrize("front", ["replica", "proxy"])
KEY = "test-key-0123456789abcdef"
RECV_S = 10.0  # every recv's bound

app = FastAPI()


@serve.deployment(max_ongoing_requests=8)
@serve.ingress(app)
class Echo:
    def __init__(self) -> None:
        self.disconnects = 0

    @app.websocket("/echo")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    raise WebSocketDisconnect(msg.get("code", 1000))
                text = msg.get("text")
                if text is None:
                    await ws.send_bytes(msg["bytes"])
                elif text.startswith("close:"):
                    await ws.close(code=int(text[6:]), reason="bye")
                    return
                elif text == "pid":
                    await ws.send_text(str(os.getpid()))
                else:
                    await ws.send_text(text)
        except WebSocketDisconnect:
            self.disconnects += 1

    @app.websocket("/never")
    async def never(self, ws: WebSocket) -> None:
        await ws.receive()  # the handshake: neither accepted nor refused, ever
        await ws.receive()

    @app.get("/disconnects")
    def count(self) -> int:
        return self.disconnects

    @app.get("/plain")
    def plain(self) -> str:
        return "plain"


@serve.deployment
class NotASGI:
    def __call__(self, request: Request) -> str:
        return "no websockets here"


@contextmanager
def shoal_instance(run_dir: str, front: str, **http: Any) -> Iterator[str]:
    """An instance on a free port with these http_options; no process left behind after it."""
    before = child_pids()
    serve.start(http_options={"port": 0, "ingress_serves_http": front == "replica", **http}, _run_dir=run_dir)
    try:
        yield serve.http_address()
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10), f"left behind: {child_pids() - before}"


def ws_url(url: str, path: str) -> str:
    return "ws" + url[len("http"):] + path


def open_ws(url: str, path: str = "/echo", **kwargs: Any) -> ClientConnection:
    return connect(ws_url(url, path), open_timeout=RECV_S, close_timeout=RECV_S, **kwargs)


def recv(ws: ClientConnection) -> Any:
    return ws.recv(timeout=RECV_S)


@FRONTS
def test_echo_text_bytes_many_and_large(run_dir: str, front: str) -> None:
    with shoal_instance(run_dir, front) as url:
        serve.run(Echo.bind())
        with open_ws(url, max_size=None) as ws:
            ws.send("hello")
            assert recv(ws) == "hello"
            ws.send(b"\x00\x01binary")
            assert recv(ws) == b"\x00\x01binary"
            for i in range(100):  # sent in a row, then read: the order holds
                ws.send(f"m{i}")
            assert [recv(ws) for _ in range(100)] == [f"m{i}" for i in range(100)]
            big = os.urandom(3 * 1024 * 1024 // 2)  # 1.5 MiB: over the stream window of one frame
            ws.send(big)
            assert recv(ws) == big
            big_text = "x" * (2 * 1024 * 1024)
            ws.send(big_text)
            assert recv(ws) == big_text
        # The client closed: the application's receive() got websocket.disconnect.
        assert wait_until(lambda: httpx.get(url + "/disconnects", timeout=10).json() == 1, 15)


@FRONTS
def test_server_close_code_and_two_concurrent_websockets(run_dir: str, front: str) -> None:
    with shoal_instance(run_dir, front) as url:
        serve.run(Echo.bind())
        with open_ws(url) as a, open_ws(url) as b:
            a.send("from a")
            b.send("from b")
            assert recv(b) == "from b"
            assert recv(a) == "from a"
            a.send("close:4001")
            with pytest.raises(ConnectionClosed) as closed:
                recv(a)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4001, "bye")
            b.send("still open")  # the other one is unaffected
            assert recv(b) == "still open"
        assert httpx.get(url + "/plain", timeout=10).json() == "plain"  # HTTP on the same app


@FRONTS
def test_refused_handshakes(run_dir: str, front: str) -> None:
    with shoal_instance(run_dir, front) as url:
        serve.run(Echo.bind(), name="echo", route_prefix="/app")
        serve.run(NotASGI.bind(), name="plain", route_prefix="/plain")
        cases = [("/app/no-such-route", 403),  # the app has no websocket route there (Starlette's 403)
                 ("/app/plain", 403),  # an HTTP route, no websocket one
                 ("/plain", 403),  # a deployment that is no ASGI app
                 ("/unrouted", 404)]  # no application at that path
        for path, status in cases:
            with pytest.raises(InvalidStatus) as refused:
                open_ws(url, path)
            assert refused.value.response.status_code == status, path
        with open_ws(url, "/app/echo") as ws:  # the routed one works, under its prefix
            ws.send("ok")
            assert recv(ws) == "ok"


@FRONTS
def test_api_keys_guard_the_handshake(run_dir: str, front: str) -> None:
    with shoal_instance(run_dir, front, api_keys=[KEY]) as url:
        serve.run(Echo.bind())
        for headers in ({}, {"authorization": "Bearer " + KEY[:-1] + "x"}):
            with pytest.raises(InvalidStatus) as refused:
                open_ws(url, additional_headers=headers)
            assert refused.value.response.status_code == 401
            assert b"unauthorized" in refused.value.response.body
        with open_ws(url, additional_headers={"authorization": "Bearer " + KEY}) as ws:
            ws.send("authorized")
            assert recv(ws) == "authorized"


@FRONTS
def test_idle_websocket_outlives_http_timeouts_but_a_handshake_does_not(run_dir: str, front: str) -> None:
    # Every HTTP timeout of the front far below the idle time below: none applies to an open WebSocket.
    with shoal_instance(run_dir, front, request_timeout_s=1.0, request_body_timeout_s=0.5,
                        request_header_timeout_s=0.5, keep_alive_timeout_s=0.5) as url:
        serve.run(Echo.bind())
        with open_ws(url) as ws:
            ws.send("before")
            assert recv(ws) == "before"
            time.sleep(2.5)  # idle on purpose: nothing to wait for but time
            ws.send("after")
            assert recv(ws) == "after"
        # An application that never accepts: the handshake is refused after request_timeout_s.
        with pytest.raises(InvalidStatus) as refused:
            open_ws(url, "/never")
        assert refused.value.response.status_code == 504


@FRONTS
def test_replica_killed_while_open_closes_the_client(run_dir: str, front: str) -> None:
    with shoal_instance(run_dir, front) as url:
        serve.run(Echo.bind())
        with open_ws(url) as ws:
            ws.send("pid")
            pid = int(recv(ws))
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ConnectionClosed) as closed:
                recv(ws)  # a close, promptly: never the recv timeout
            if front == "proxy":  # the proxy held the client's connection: it says why
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


@FRONTS
def test_client_gone_ends_the_application_promptly(run_dir: str, front: str) -> None:
    with shoal_instance(run_dir, front) as url:
        serve.run(Echo.bind())
        with ExitStack() as stack:
            sockets = [stack.enter_context(open_ws(url)) for _ in range(3)]
            for ws in sockets:
                ws.send("hi")
                assert recv(ws) == "hi"
            sockets[0].close()  # a clean close
            for ws in sockets[1:]:  # connections that just drop, without a close frame
                ws.socket.shutdown(socket.SHUT_RDWR)
            assert wait_until(lambda: httpx.get(url + "/disconnects", timeout=10).json() == 3, 15)
