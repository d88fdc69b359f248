"""A WebSocket's client-to-application direction across the router-to-replica hop.

The front reads the client's messages (ASGI ``websocket.receive`` and ``websocket.disconnect``)
into a :class:`ClientMessages` and passes it as the body of the websocket request it sends to
the ingress replica. :class:`~shoal.runtime.replica_connection.ReplicaConnection` sends the
request with an empty body and then :meth:`ClientMessages.attach`\\ es it to the request's id:
a pump task sends each message as a ``(WS_IN, rid, message)`` frame on the same connection.

Both hops are bounded, so a client that sends faster than its application reads is simply not
read (the WebSocket's own back-pressure, down to TCP):

* at most :data:`QUEUED_MESSAGES` messages wait in the front (:meth:`ClientMessages.put` waits
  for room, and the front reads the client no further meanwhile);
* the pump sends within a credit window (:class:`~shoal.runtime.flow.SendWindow`, no stall
  limit: an application may leave its socket unread as long as it likes); the replica gives
  bytes back with ``(CREDIT, rid, nbytes)`` frames as the application's ``receive()`` takes
  messages.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from shoal.runtime.flow import STREAM_WINDOW_BYTES, SendWindow
from shoal.runtime.wire import WS_IN, dumps

__all__ = ["QUEUED_MESSAGES", "ClientMessages"]

# A WebSocket's client messages the front holds, at most, while the pump waits for credit.
QUEUED_MESSAGES = 16


class ClientMessages:
    """The client's messages of one WebSocket, on their way to the replica running it."""

    __slots__ = ("pump", "queue", "window")

    def __init__(self, maxsize: int = QUEUED_MESSAGES, window: int = STREAM_WINDOW_BYTES) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.window = SendWindow(window, stall_s=None)
        self.pump: asyncio.Task[None] | None = None

    async def put(self, message: dict[str, Any]) -> None:
        """Queue a client message; waits while :data:`QUEUED_MESSAGES` are queued."""
        await self.queue.put(message)

    def attach(self, send_bytes: Callable[[bytes], None], rid: int) -> None:
        """Start sending the queued messages as request ``rid``'s WS_IN frames through
        ``send_bytes`` (a connection's; raises ``ConnectionError`` once it closed)."""
        self.detach()
        self.window = SendWindow(self.window.window, stall_s=None)
        self.pump = asyncio.get_running_loop().create_task(self._pump(send_bytes, rid))

    def credit(self, nbytes: int) -> None:
        """The replica's application took ``nbytes`` of the WS_IN frames."""
        self.window.credit(nbytes)

    def detach(self) -> None:
        """Stop sending (the request is over, or its connection closed)."""
        pump, self.pump = self.pump, None
        if pump is not None and not pump.done():
            pump.cancel()

    async def _pump(self, send_bytes: Callable[[bytes], None], rid: int) -> None:
        while True:
            message = await self.queue.get()
            payload = dumps((WS_IN, rid, message))
            await self.window.reserve(len(payload))
            with contextlib.suppress(ConnectionError):
                send_bytes(payload)
            if message["type"] == "websocket.disconnect":
                return  # the last one: the client is gone
