"""Bounds the connections a TCP RPC port holds before they authenticate.

A pod's RPC port is reachable by anything on the pod network, and a connection costs the pod
a file descriptor and some memory from the moment it is accepted until its handshake ends
(success, failure, or :data:`~shoal.runtime.wire.HANDSHAKE_TIMEOUT_S`). Without a bound, a
flood of connections that never authenticate exhausts the pod's descriptors, and then every
port of the process stops accepting, the probes' included. A :class:`HandshakeGate` counts the
connections of one listening port that are still in their (TLS and HMAC) handshake; beyond
``max_pending`` a new connection is closed at once, counted, and reported in a warning at
most every :data:`WARN_EVERY_S`. Authenticated connections are not counted: callers are
other pods of the application, which hold few long-lived connections.

The process's settings (:func:`configure`, from ``shoal replica --rpc-max-handshakes`` and
``--rpc-handshake-timeout``) apply to every port :func:`shoal.runtime.wire.serve_tcp` opens
after the call; :class:`HandshakeCollector` exports the counts to Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, cast

__all__ = [
    "DEFAULT_MAX_PENDING",
    "METRIC_PENDING",
    "METRIC_REFUSED",
    "WARN_EVERY_S",
    "GateSettings",
    "HandshakeCollector",
    "HandshakeGate",
    "configure",
    "settings",
]

logger = logging.getLogger("shoal.wire")

DEFAULT_MAX_PENDING = 64
# At most one warning about refused connections per this many seconds (a flood must not
# become a flood of log lines).
WARN_EVERY_S = 10.0
METRIC_PENDING = "shoal_rpc_handshakes_pending"
METRIC_REFUSED = "shoal_rpc_handshakes_refused"  # a counter: exported with _total


@dataclass(frozen=True)
class GateSettings:
    """The process's bounds on unauthenticated connections, for every TCP RPC port.

    ``max_pending``: connections of one port in handshake at once. ``timeout_s``: the longest
    any handshake may take (None: what the caller of ``serve_tcp`` asks for; otherwise the
    smaller of the two).
    """

    max_pending: int = DEFAULT_MAX_PENDING
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int) or self.max_pending < 1:
            raise ValueError(f"max_pending (--rpc-max-handshakes) must be an integer >= 1, got {self.max_pending!r}")
        if self.timeout_s is not None and not (isinstance(self.timeout_s, int | float) and 0 < self.timeout_s < 3600):
            raise ValueError(f"timeout_s (--rpc-handshake-timeout) must be in (0, 3600) seconds, "
                             f"got {self.timeout_s!r}")


_settings = GateSettings()
_gates: weakref.WeakSet[HandshakeGate] = weakref.WeakSet()
_refused_total = 0


def configure(max_pending: int = DEFAULT_MAX_PENDING, timeout_s: float | None = None) -> GateSettings:
    """Set the process's bounds (ValueError naming the option when one is out of range)."""
    global _settings
    _settings = GateSettings(max_pending, timeout_s)
    return _settings


def settings() -> GateSettings:
    return _settings


class _ReadyProtocol(Protocol):
    """What :meth:`HandshakeGate.admission` needs of the protocol it hands a connection to."""

    ready: asyncio.Future[None]

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...


P = TypeVar("P", bound=_ReadyProtocol)


class HandshakeGate:
    """Counts one port's connections in handshake; :meth:`admit` refuses beyond the bound.

    Used from the event loop's thread only (protocol factories and their callbacks).
    """

    def __init__(self, max_pending: int | None = None, timeout_s: float | None = None) -> None:
        s = _settings
        self.settings = GateSettings(s.max_pending if max_pending is None else max_pending,
                                     s.timeout_s if timeout_s is None else timeout_s)
        self.pending = 0
        self.refused = 0
        self._warned_at = -WARN_EVERY_S
        self._unwarned = 0
        _gates.add(self)

    @property
    def max_pending(self) -> int:
        return self.settings.max_pending

    def handshake_timeout(self, requested: float) -> float:
        """The handshake deadline for this port: ``requested``, lowered to the process's bound."""
        bound = self.settings.timeout_s
        return requested if bound is None else min(requested, bound)

    def admit(self) -> bool:
        """Take a slot for a new connection (True), or count it as refused (False)."""
        global _refused_total
        if self.pending < self.settings.max_pending:
            self.pending += 1
            return True
        self.refused += 1
        _refused_total += 1
        self._unwarned += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            logger.warning("RPC port: refused %d connection(s): %d already in handshake (the bound; "
                           "--rpc-max-handshakes); unauthenticated peers are flooding the port?",
                           self._unwarned, self.pending)
            self._warned_at = now
            self._unwarned = 0
        return False

    def release(self) -> None:
        """A connection's handshake ended (either way): its slot is free."""
        if self.pending > 0:
            self.pending -= 1

    def watch(self, ready: asyncio.Future[None]) -> None:
        """Free the slot taken by :meth:`admit` when ``ready`` (the handshake's outcome) is done."""
        ready.add_done_callback(lambda _f: self.release())

    def admission(self, factory: Callable[[], P], tls: ssl.SSLContext | None,
                  tls_timeout: float) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` (without ``ssl=``): each accepted
        connection is admitted or closed at once; an admitted one gets ``factory()``'s
        protocol, after a TLS handshake (server side, within ``tls_timeout``) when ``tls``.

        TLS is started here, not by the server, so that a refused connection costs neither a
        TLS handshake nor a descriptor held until the handshake times out. The protocol's
        ``ready`` future (its authentication) frees the slot.
        """
        return lambda: _Admission(self, factory, tls, tls_timeout)


class _Admission(asyncio.Protocol):
    """The first protocol of an accepted connection (see :meth:`HandshakeGate.admission`)."""

    def __init__(self, gate: HandshakeGate, factory: Callable[[], _ReadyProtocol], tls: ssl.SSLContext | None,
                 tls_timeout: float) -> None:
        self._gate = gate
        self._factory = factory
        self._tls = tls
        self._tls_timeout = tls_timeout

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports do not subclass asyncio's
        if not self._gate.admit():
            transport.abort()
            return
        if self._tls is None:
            proto = self._factory()
            self._gate.watch(proto.ready)
            transport.set_protocol(cast(asyncio.BaseProtocol, proto))
            proto.connection_made(transport)
            return
        # TLS: a new transport on a duplicate of the socket starts with the handshake. This one
        # is closed before it reads anything (both loops start reading after connection_made,
        # and uvloop even if it was paused there, so ``start_tls`` on it could lose the hello).
        try:
            sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        except OSError as e:  # out of descriptors
            logger.warning("RPC port: cannot take an admitted connection: %s", e)
            self._gate.release()
            transport.abort()
            return
        transport.abort()
        task = asyncio.get_running_loop().create_task(self._start_tls(sock, self._tls))
        _upgrades.add(task)
        task.add_done_callback(_upgrades.discard)

    async def _start_tls(self, sock: socket.socket, tls: ssl.SSLContext) -> None:
        made: list[_ReadyProtocol] = []

        def factory() -> asyncio.BaseProtocol:
            proto = self._factory()
            self._gate.watch(proto.ready)
            made.append(proto)
            return cast(asyncio.BaseProtocol, proto)

        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                factory, sock, ssl=tls, ssl_handshake_timeout=self._tls_timeout)
        except asyncio.CancelledError:
            sock.close()
            raise
        except Exception as e:  # the peer's TLS failed or timed out: free its slot now
            logger.debug("RPC connection failed its TLS handshake: %r", e)
            sock.close()
            if not made:
                self._gate.release()
            elif not made[0].ready.done():
                made[0].connection_lost(e if isinstance(e, OSError) else ConnectionError(f"TLS failed: {e!r}"))


# Connections in their TLS handshake (strong references to the tasks).
_upgrades: set[asyncio.Task[None]] = set()


class HandshakeCollector:
    """A ``prometheus_client`` collector: connections in handshake now (all TCP RPC ports of
    the process) and connections refused since it started."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        yield GaugeMetricFamily(METRIC_PENDING, "RPC connections in their handshake (not yet authenticated)",
                                value=sum(g.pending for g in list(_gates)))
        yield CounterMetricFamily(METRIC_REFUSED, "RPC connections closed at once: too many in handshake",
                                  value=_refused_total)
