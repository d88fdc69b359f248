"""The accept loop of a front on a shared listening socket: an accept limit, and standing by."""

from __future__ import annotations

import asyncio
import os
import socket

from shoal.runtime.http.acceptor import Acceptor


class Counting(asyncio.Protocol):
    """A protocol that notes its connections in ``into`` while they are open."""

    def __init__(self, into: set[asyncio.BaseTransport]) -> None:
        self.into = into
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.into.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.transport is not None
        self.into.discard(self.transport)


async def _until(cond, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return bool(cond())


async def test_a_limited_front_leaves_connections_to_the_one_standing_by() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    limited: set[asyncio.BaseTransport] = set()
    standby: set[asyncio.BaseTransport] = set()
    a = Acceptor(loop, socket.socket(fileno=os.dup(listener.fileno())), lambda: Counting(limited),
                 admit=lambda: len(limited) < 2)
    b = Acceptor(loop, socket.socket(fileno=os.dup(listener.fileno())), lambda: Counting(standby), delay_s=0.05)
    a.start()
    b.start()
    clients = []
    try:
        for _ in range(5):
            clients.append(await asyncio.open_connection("127.0.0.1", port))
            await _until(lambda n=len(clients): len(limited) + len(standby) == n)
        assert await _until(lambda: len(limited) + len(standby) == 5)
        assert len(limited) == 2 and len(standby) == 3, (len(limited), len(standby))
        assert not a.watching  # held back at its limit

        # One of the limited front's connections closes: it accepts the next one itself.
        next(iter(limited)).close()
        assert await _until(lambda: len(limited) == 1)
        a.start()  # what the front does when a connection closes
        clients.append(await asyncio.open_connection("127.0.0.1", port))
        assert await _until(lambda: len(limited) == 2)
        assert len(standby) == 3
    finally:
        for _, w in clients:
            w.close()
        a.close()
        b.close()
        listener.close()
    assert a.sock.fileno() == -1 and b.sock.fileno() == -1


async def test_standing_by_takes_what_nobody_else_takes() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: set[asyncio.BaseTransport] = set()
    b = Acceptor(loop, socket.socket(fileno=os.dup(listener.fileno())), lambda: Counting(got), delay_s=0.02)
    b.start()
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
        assert await _until(lambda: len(got) == 1)
        w.close()
    finally:
        b.close()
        listener.close()


async def _burst(spread: bool) -> tuple[int, int]:
    """Eight connections already waiting in the backlog when two fronts start accepting."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]  # in the backlog now
    first: set[asyncio.BaseTransport] = set()
    second: set[asyncio.BaseTransport] = set()
    fronts = [Acceptor(loop, socket.socket(fileno=os.dup(listener.fileno())), lambda into=into: Counting(into),
                       load=(lambda into=into: len(into)) if spread else None) for into in (first, second)]
    try:
        for front in fronts:
            front.start()
        assert await _until(lambda: len(first) + len(second) == 8)
        return len(first), len(second)
    finally:
        for front in fronts:
            front.close()
        for t in first | second:
            t.close()
        for c in clients:
            c.close()
        listener.close()


async def test_spreading_fronts_share_a_burst_of_connections() -> None:
    a, b = await _burst(spread=True)
    assert abs(a - b) <= 2, (a, b)  # the front holding fewer connections takes the next one
    # Without spreading, whichever front wakes first takes the whole burst.
    assert sorted(await _burst(spread=False)) == [0, 8]


async def test_a_spreading_front_still_keeps_its_accept_limit() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
    limited: set[asyncio.BaseTransport] = set()
    standby: set[asyncio.BaseTransport] = set()
    a = Acceptor(loop, socket.socket(fileno=os.dup(listener.fileno())), lambda: Counting(limited),
                 admit=lambda: len(limited) < 2, load=lambda: len(limited))
    b = Acceptor(loop, socket.socket(fileno=os.dup(listener.fileno())), lambda: Counting(standby), delay_s=0.05)
    try:
        a.start()
        b.start()
        assert await _until(lambda: len(limited) + len(standby) == 5)
        assert len(limited) == 2 and not a.watching
        a.close()  # closed while a spread timer may be pending: nothing fires afterwards
        await asyncio.sleep(0.02)
    finally:
        a.close()
        b.close()
        for t in limited | standby:
            t.close()
        for c in clients:
            c.close()
        listener.close()
