"""Accepting connections on a listening socket that several processes share.

Every front of a local instance (the proxy, each ingress replica serving the port) listens on
one shared socket; the kernel gives a new connection to whichever process accepts it first.
:class:`Acceptor` is the accept loop of one front, with two knobs that decide which process
takes a connection:

* ``admit`` — the front accepts only while it says yes. An ingress replica holds at most as
  many connections as it can run requests (``max_ongoing_requests``), so that its death fails
  only the requests it was running; at its limit it leaves new connections to the others.
* ``delay_s`` — the front takes a connection only when it is still waiting after this long:
  the proxy, standing by while ingress replicas serve the port, picks up what they leave
  (they are all at their limit, or too busy to accept), and nothing waits in the backlog.
* ``load`` — spreading (ingress replicas of a deployment with several replicas): the number of
  connections the front holds, or None for no spreading. A front holding n connections takes a
  new one only if it is still there after n x :data:`SPREAD_DELAY_S`, and one per wake-up, so
  the least loaded front gets it: one replica taking every connection of a client's burst
  left the other replicas idle (a 2-replica echo ran at one replica's speed).

The accepted socket goes to ``factory``'s protocol (uvicorn's, extended by
:func:`shoal.runtime.httpguard.guarded_protocol`) through ``loop.connect_accepted_socket``.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl as _ssl
from collections.abc import Callable
from typing import Any

__all__ = ["ACCEPT_BATCH", "EMFILE_PAUSE_S", "STANDBY_DELAY_S", "Acceptor"]

logger = logging.getLogger("shoal.proxy")

# Connections accepted per wake-up at most (then the loop serves others first).
ACCEPT_BATCH = 32
# Out of file descriptors: accepting stops this long (the connection stays in the backlog).
EMFILE_PAUSE_S = 0.1
# The proxy standing by for ingress replicas accepts a connection still waiting after this long.
STANDBY_DELAY_S = 0.02
# Spreading connections over the fronts that share the port (``load``): a front holding n
# connections takes a new one only if it is still waiting after n times this (at most
# SPREAD_MAX_S, below the proxy's standby delay), one per wake-up: the least loaded wins.
SPREAD_DELAY_S = 0.00025
SPREAD_MAX_S = 0.005


class Acceptor:
    """The accept loop of one front on ``sock`` (a duplicate of the shared listening socket,
    owned and closed by the acceptor)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, factory: Callable[[], Any],
                 ssl: _ssl.SSLContext | None = None, admit: Callable[[], bool] | None = None,
                 delay_s: float = 0.0, load: Callable[[], int | None] | None = None) -> None:
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.ssl = ssl
        self.admit = admit or (lambda: True)
        self.delay_s = delay_s
        self.load = load
        self.watching = False  # registered for readability
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        sock.setblocking(False)

    def start(self) -> None:
        """Accept (again): called at first, and whenever ``admit`` may have turned to yes."""
        if self.closed or self.watching or self._timer is not None or not self.admit():
            return
        self.loop.add_reader(self.sock.fileno(), self._readable)
        self.watching = True

    def _unwatch(self) -> None:
        if self.watching:
            self.loop.remove_reader(self.sock.fileno())
            self.watching = False

    def _readable(self) -> None:
        if self.delay_s > 0:
            self._unwatch()
            self._timer = self.loop.call_later(self.delay_s, self._after_delay)
            return
        held = self.load() if self.load is not None else None
        if held is not None:
            if held > 0:
                self._unwatch()
                self._timer = self.loop.call_later(min(SPREAD_DELAY_S * held, SPREAD_MAX_S), self._after_spread)
                return
            self._accept_some(1)
            return
        self._accept_some()

    def _after_spread(self) -> None:
        self._timer = None
        if not self.closed:
            self._accept_some(1)
            self.start()

    def _after_delay(self) -> None:
        self._timer = None
        if not self.closed:
            self._accept_some()
            self.start()

    def _accept_some(self, most: int = ACCEPT_BATCH) -> None:
        for _ in range(most):
            if not self.admit():
                self._unwatch()  # start() resumes once the front has room again
                return
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    logger.warning("cannot accept connections (%s); trying again in %ss", e, EMFILE_PAUSE_S)
                    self._unwatch()
                    self._timer = self.loop.call_later(EMFILE_PAUSE_S, self._after_delay)
                    return
                if e.errno == errno.ECONNABORTED:
                    continue
                raise
            self._serve(conn)

    def _serve(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = self.loop.create_task(self._connect(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl)
        except (TimeoutError, OSError, _ssl.SSLError) as e:
            logger.debug("an accepted connection failed before it was served: %r", e)
            conn.close()

    def close(self) -> None:
        """Accept no more; close this front's duplicate of the listening socket (the other
        processes' go on accepting)."""
        if self.closed:
            return
        self.closed = True
        self._unwatch()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.sock.close()
