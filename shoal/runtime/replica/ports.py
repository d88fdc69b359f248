"""What a replica core is given by the runtime it runs in (local process, Kubernetes pod, gang rank).

* a :class:`Transport`: where callers reach it (a Unix socket the controller named, or the
  pod's TCP RPC port);
* a :class:`ControlChannel`: who is told about changes (the controller, or nobody in a pod);
* a :class:`~shoal.runtime.http.admit.RouterSource` for its membership (the routers to the
  deployments it calls: pushed by the controller, or found in cluster DNS), used by the HTTP
  front it may serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from shoal.runtime.wire import FramedProtocol, serve_tcp, serve_unix

__all__ = ["ControlChannel", "NoControl", "TcpTransport", "Transport", "UnixTransport"]

OnConnect = Callable[[FramedProtocol], None]


class Transport(Protocol):
    """Listens for callers' connections (the framed protocol of :mod:`shoal.runtime.wire`)."""

    async def listen(self, on_connect: OnConnect) -> asyncio.AbstractServer: ...


class ControlChannel(Protocol):
    """Who hears about what changes in the replica."""

    def models_changed(self, ids: tuple[str, ...]) -> None:
        """The multiplexed models loaded here are now ``ids``."""


@dataclass(frozen=True)
class UnixTransport:
    """A local replica's socket, its path chosen by the controller."""

    path: str
    secret: bytes

    async def listen(self, on_connect: OnConnect) -> asyncio.AbstractServer:
        return await serve_unix(self.path, self.secret, on_connect)


@dataclass(frozen=True)
class TcpTransport:
    """A pod's RPC port."""

    host: str
    port: int
    secret: bytes

    async def listen(self, on_connect: OnConnect) -> asyncio.AbstractServer:
        return await serve_tcp(self.host, self.port, self.secret, on_connect)


class NoControl:
    """A pod's control channel: there is no controller to tell anything."""

    def models_changed(self, ids: tuple[str, ...]) -> None:
        pass
