"""Per-stream flow control between a router and a replica: credit windows, like HTTP/2's.

A replica sends the items of a stream (a ``stream=True`` call, or an HTTP response forwarded
over RPC) while it has fewer than :data:`STREAM_WINDOW_BYTES` of that stream's frames
unacknowledged; the router's :class:`CreditCounter` gives bytes back with a ``(CREDIT, rid,
nbytes)`` frame as its consumer takes items, once at least :data:`CREDIT_BATCH_BYTES` have
been taken. So a consumer that stops reading stops its own producer after about one window,
while the other requests on the same connection go on; and streams smaller than a batch never
send a credit frame at all.

The producer may always send when less than one batch is unacknowledged (however large the
item): every byte the consumer has taken but not yet credited is under one batch, so a
producer waiting for credit while its consumer waits for items cannot happen.

A producer that gets no credit for :data:`STREAM_STALL_TIMEOUT_S` gives up
(:meth:`SendWindow.reserve` raises ``TimeoutError`` and sets ``stalled``): its request is
cancelled on the replica and its slot freed, whatever the caller does later.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["CREDIT_BATCH_BYTES", "STREAM_STALL_TIMEOUT_S", "STREAM_WINDOW_BYTES", "CreditCounter", "SendWindow",
           "StreamSink"]

# Bytes of one stream's frames a replica may have sent and not had acknowledged.
STREAM_WINDOW_BYTES = 1 << 20
# A router acknowledges consumed bytes once this many have piled up.
CREDIT_BATCH_BYTES = STREAM_WINDOW_BYTES // 4
# Seconds a replica waits for credit before it cancels the stream.
STREAM_STALL_TIMEOUT_S = 60.0


class SendWindow:
    """The producer's side of one stream: how much is unacknowledged, and the wait for room."""

    __slots__ = ("batch", "stall_s", "stalled", "unacked", "waiter", "window")

    def __init__(self, window: int = STREAM_WINDOW_BYTES, batch: int = CREDIT_BATCH_BYTES,
                 stall_s: float | None = STREAM_STALL_TIMEOUT_S) -> None:
        self.window = window
        self.batch = min(batch, window)
        self.stall_s = stall_s
        self.unacked = 0
        self.stalled = False
        self.waiter: asyncio.Future[None] | None = None

    def fits(self, nbytes: int) -> bool:
        """Whether a frame of ``nbytes`` may be sent now."""
        return self.unacked < self.batch or self.unacked + nbytes <= self.window

    def credit(self, nbytes: int) -> None:
        """The consumer took ``nbytes`` more: wake a producer waiting for room."""
        self.unacked = max(0, self.unacked - nbytes)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def reserve(self, nbytes: int) -> None:
        """Wait until a frame of ``nbytes`` may be sent, then count it as sent.

        Raises ``TimeoutError`` (``stalled`` set) after ``stall_s`` without any credit (None:
        waits as long as it takes, e.g. a WebSocket's client messages toward an app that reads
        nothing for a while: the client is simply not read meanwhile); a cancellation (the
        caller's CANCEL, a closed connection) ends the wait too.
        """
        if not self.fits(nbytes):
            loop = asyncio.get_running_loop()
            while not self.fits(nbytes):
                self.waiter = loop.create_future()
                try:
                    async with asyncio.timeout(self.stall_s):
                        await self.waiter
                except TimeoutError:
                    self.stalled = True
                    raise TimeoutError(f"the stream's consumer took nothing for {self.stall_s:g} s") from None
                finally:
                    self.waiter = None
        self.unacked += nbytes


class CreditCounter:
    """The consumer's side of one stream: counts the bytes taken, and gives them back in batches
    through ``send_credit(nbytes)``."""

    __slots__ = ("batch", "send_credit", "taken")

    def __init__(self, send_credit: Callable[[int], None], batch: int = CREDIT_BATCH_BYTES) -> None:
        self.send_credit = send_credit
        self.batch = batch
        self.taken = 0

    def took(self, nbytes: int) -> None:
        """The consumer took an item of ``nbytes`` (its frame's size)."""
        self.taken += nbytes
        if self.taken >= self.batch:
            n, self.taken = self.taken, 0
            self.send_credit(n)


class StreamSink:
    """A minimal single-consumer queue of (kind, value) frames for one streamed request.

    Each item remembers its frame's size; taking it returns that much credit to the replica
    (``credits``, set once the request has an id), so the replica
    never has more than about a window of the stream waiting here. ``on_end`` runs when the
    replica's last frame of the request arrives (END, OK or ERR), before it is taken.
    """

    __slots__ = ("credits", "items", "on_end", "waiter")

    def __init__(self) -> None:
        self.items: deque[tuple[int, Any, int]] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.credits: CreditCounter | None = None
        self.on_end: Callable[[], None] | None = None

    def put_nowait(self, item: tuple[int, Any], nbytes: int = 0) -> None:
        self.items.append((item[0], item[1], nbytes))
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def end(self, item: tuple[int, Any]) -> None:
        """The replica is done with the request: ``item`` is its last frame's (kind, value)."""
        self.put_nowait(item)
        on_end, self.on_end = self.on_end, None
        if on_end is not None:
            on_end()

    async def get(self) -> tuple[int, Any]:
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        kind, value, nbytes = self.items.popleft()
        if nbytes and self.credits is not None:
            self.credits.took(nbytes)
        return kind, value
