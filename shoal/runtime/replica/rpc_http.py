"""An HTTP response sent back over RPC: the ASGI messages of a request a router forwarded.

A response whose body comes in one message goes back as one ``OK`` frame holding every
message; a streamed one as ``ITEM`` frames (each holding the messages since the last) and a
final ``END``. ASGI messages are plain data: they go as plain pickle (see ``Router._send``).
With a :class:`~shoal.runtime.flow.SendWindow`, ``send`` waits for the caller's credit before
an ``ITEM`` that would overrun the stream's window: the application is held back by a slow
client instead of its response piling up in the front.
"""

from __future__ import annotations

from typing import Any

from shoal.runtime.flow import SendWindow
from shoal.runtime.wire import END, ITEM, OK, FramedProtocol, dumps

__all__ = ["RPCResponse"]


class RPCResponse:
    """Collects one request's ASGI messages and sends them to the caller (see the module docstring)."""

    __slots__ = ("done", "pending", "proto", "rid", "status", "streaming", "window")

    def __init__(self, proto: FramedProtocol, rid: int, window: SendWindow | None = None) -> None:
        self.proto = proto
        self.rid = rid
        self.window = window
        self.pending: list[dict[str, Any]] = []
        self.streaming = False
        self.done = False
        self.status = 500

    async def send(self, message: dict[str, Any]) -> None:
        """The application's ASGI ``send``."""
        if self.done:
            return
        if message["type"] == "http.response.start":
            self.status = message["status"]
        self.pending.append(message)
        if message["type"] != "http.response.body":
            return
        more = message.get("more_body", False)
        messages, self.pending = self.pending, []
        if not self.streaming and not more:
            self.proto.send((OK, self.rid, messages))
            self.done = True
            return
        self.streaming = True
        if not more:
            self.done = True  # nothing the application sends from now on goes out
        await self._item(messages)
        if not more:
            self.proto.send((END, self.rid))

    async def _item(self, messages: list[dict[str, Any]]) -> None:
        window = self.window
        if window is None:
            self.proto.send((ITEM, self.rid, messages))
            return
        payload = dumps((ITEM, self.rid, messages))
        try:
            await window.reserve(len(payload))
        except BaseException:
            self.done = True  # stalled or cancelled: the response ends here
            raise
        self.proto.send_bytes(payload)

    def finish(self) -> None:
        """The application returned: end the response if it did not."""
        if self.done:
            return
        if self.streaming:
            if self.pending:
                self.proto.send((ITEM, self.rid, list(self.pending)))
            self.proto.send((END, self.rid))
        else:
            self.pending.append({"type": "http.response.body", "body": b"", "more_body": False})
            self.proto.send((OK, self.rid, list(self.pending)))
        self.done = True
