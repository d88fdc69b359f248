"""A WebSocket run for a router's caller: the ASGI ``receive`` and ``send`` of its application.

The caller (a front) sends the client's messages as ``(WS_IN, rid, message)`` frames
(:mod:`shoal.runtime.wschannel`); they wait in a :class:`~shoal.runtime.flow.StreamSink` whose
consumer, the application's ``receive()``, gives their bytes back with ``(CREDIT, rid, nbytes)``
frames, so the caller never has more than about a window of them here. The application's
messages (accept, send, close) go back as ``ITEM`` frames of one message each, within the
stream's credit window like any streamed response, and ``END`` when the application returns.
"""

from __future__ import annotations

from typing import Any

from shoal.runtime.flow import CreditCounter, SendWindow, StreamSink
from shoal.runtime.wire import CREDIT, END, ITEM, FramedProtocol, dumps

__all__ = ["WebSocketRun", "ws_status"]

# What a websocket request is accounted with: accepted, refused before accepting, failed.
ACCEPTED, REFUSED, FAILED = 101, 403, 500


class WebSocketRun:
    """One websocket request's two directions on the replica (see the module docstring)."""

    __slots__ = ("connected", "done", "inbox", "proto", "rid", "status", "window")

    def __init__(self, proto: FramedProtocol, rid: int, window: SendWindow) -> None:
        self.proto = proto
        self.rid = rid
        self.window = window
        self.inbox = StreamSink()
        self.inbox.credits = CreditCounter(self._credit)
        self.connected = False
        self.done = False
        self.status = FAILED

    def _credit(self, nbytes: int) -> None:
        try:
            self.proto.send((CREDIT, self.rid, nbytes))
        except ConnectionError:
            pass

    def client_message(self, message: dict[str, Any], nbytes: int) -> None:
        """A WS_IN frame of ``nbytes`` arrived."""
        self.inbox.put_nowait((0, message), nbytes)

    async def receive(self) -> dict[str, Any]:
        """The application's ASGI ``receive``: the handshake first, then the client's messages."""
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        _kind, message = await self.inbox.get()
        result: dict[str, Any] = message
        return result

    async def send(self, message: dict[str, Any]) -> None:
        """The application's ASGI ``send``: one ITEM frame, within the credit window."""
        if self.done:
            raise RuntimeError("the websocket is closed")
        self.status = ws_status(message, self.status)
        if message["type"] == "websocket.close":
            self.done = True
        payload = dumps((ITEM, self.rid, [message]))
        await self.window.reserve(len(payload))
        self.proto.send_bytes(payload)

    def finish(self) -> None:
        """The application returned: the request ends."""
        self.done = True
        self.proto.send((END, self.rid))


def ws_status(message: dict[str, Any], status: int) -> int:
    """A websocket's status for the books once its application sent ``message``: 101
    accepted, 403 closed before accepting (or the status of a refusal's HTTP response)."""
    kind = message["type"]
    if kind == "websocket.accept":
        return ACCEPTED
    if kind == "websocket.http.response.start":
        return int(message.get("status", REFUSED))
    if kind == "websocket.close" and status == FAILED:
        return REFUSED
    return status
