"""The proxy's stand-in: while the proxy is down (crashed, waiting out its restart back-off)
and nobody else accepts on the HTTP socket, the controller answers each connection there
with a fast ``503 {"error": "proxy restarting"}`` (``Retry-After``, ``Connection: close``)
instead of leaving it in the socket's backlog until the proxy returns.

It accepts on a duplicate of the listening socket's descriptor, in the controller's event
loop, and stops (closing only the duplicate) before a new proxy is started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
from collections.abc import Callable
from typing import cast

logger = logging.getLogger("shoal.controller")

# The request head is read (so that closing does not reset the connection before the answer
# arrives) for at most this long and this many bytes; then the answer is sent regardless.
READ_HEAD_S = 1.0
MAX_HEAD_BYTES = 64 * 1024
BACKLOG = 2048


def answer(retry_after_s: float, message: str) -> bytes:
    """The whole HTTP/1.1 503 response."""
    retry = max(1, math.ceil(retry_after_s))
    body = json.dumps({"error": "proxy restarting", "message": message, "retry_after_s": retry}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nretry-after: {retry}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class _Answer(asyncio.Protocol):
    def __init__(self, payload: Callable[[], bytes]) -> None:
        self.payload = payload
        self.transport: asyncio.Transport | None = None
        self.seen = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
        self.timer = asyncio.get_running_loop().call_later(READ_HEAD_S, self._reply)

    def data_received(self, data: bytes) -> None:
        self.seen = (self.seen + data)[-MAX_HEAD_BYTES:]
        if b"\r\n\r\n" in self.seen or len(self.seen) >= MAX_HEAD_BYTES:
            self._reply()

    def eof_received(self) -> bool | None:
        self._reply()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None

    def _reply(self) -> None:
        transport, self.transport = self.transport, None
        if self.timer is not None:
            self.timer.cancel()
        if transport is None or transport.is_closing():
            return
        transport.write(self.payload())
        transport.close()  # after the buffer is written


class StandIn:
    """Answers the HTTP socket while it runs. ``message`` gives (seconds until the proxy is
    back, text) for each answer."""

    def __init__(self, message: Callable[[], tuple[float, str]]) -> None:
        self.message = message
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._server is not None or self._starting is not None

    def start(self, listen_sock: socket.socket) -> None:
        """Begin answering on a duplicate of ``listen_sock`` (no-op if already running)."""
        if self.running:
            return
        dup = listen_sock.dup()
        dup.setblocking(False)
        self._starting = asyncio.get_running_loop().create_task(self._serve(dup))

    async def _serve(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(lambda: _Answer(self._payload), sock=sock, backlog=BACKLOG)
        except (OSError, asyncio.CancelledError):
            sock.close()
            raise
        finally:
            self._starting = None
        self._server = server
        logger.info("the HTTP proxy is down: answering its port with 503 until it restarts")

    def _payload(self) -> bytes:
        wait, text = self.message()
        return answer(wait, text)

    def stop(self) -> None:
        """Stop accepting (the listening socket itself stays open for the new proxy)."""
        if self._starting is not None:
            self._starting.cancel()
            self._starting = None
        if self._server is not None:
            self._server.close()  # closes the duplicate only
            self._server = None
