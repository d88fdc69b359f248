"""A pod's admin port: ``/-/healthz``, ``/-/ready`` and ``/metrics`` (see :mod:`shoal.kubernetes.pod`)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable

__all__ = ["AdminServer", "needs_loopback", "starting"]

logger = logging.getLogger("shoal.pod")

# (method, path) -> (status, content type, body)
AdminHandler = Callable[[str, str], tuple[int, str, bytes]]


class AdminServer:
    """A small HTTP/1.1 server for probes and metrics (one request per connection).

    Deliberately separate from the app's HTTP server: it starts before the app is imported,
    keeps answering while the replica drains, and never touches user code.
    """

    def __init__(self, handler: AdminHandler) -> None:
        self.handler = handler
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, host: str, port: int) -> None:
        self.servers.append(await asyncio.start_server(self._client, host, port, reuse_address=True))
        if needs_loopback(host):
            try:
                self.servers.append(await asyncio.start_server(self._client, "127.0.0.1", port, reuse_address=True))
            except OSError as e:
                logger.warning("cannot also listen on 127.0.0.1:%d: %s", port, e)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 10)
            parts = line.decode("latin-1").split()
            for _ in range(100):  # headers: read and ignore
                header = await asyncio.wait_for(reader.readline(), 10)
                if header in (b"\r\n", b"\n", b""):
                    break
            if len(parts) != 3:
                status, ctype, body = 400, "text/plain", b"bad request\n"
                method = "GET"
            else:
                method, target = parts[0], parts[1]
                if method not in ("GET", "HEAD"):
                    status, ctype, body = 405, "text/plain", b"method not allowed\n"
                else:
                    status, ctype, body = self.handler(method, target.split("?", 1)[0])
            reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                      500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "")
            head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode("latin-1")
            writer.write(head if method == "HEAD" else head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except Exception:
            logger.exception("admin request failed")
        finally:
            writer.close()

    def close(self) -> None:
        for server in self.servers:
            server.close()


def needs_loopback(host: str) -> bool:
    """Whether to listen on 127.0.0.1 too: in a pod that listens on its IP, so that
    ``kubectl port-forward`` (which connects to the pod's loopback) reaches the HTTP and admin
    ports. Not when the pod IP is itself a loopback address (the pod simulation)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not addr.is_loopback and not addr.is_unspecified


def starting(method: str, path: str) -> tuple[int, str, bytes]:
    """The admin port's answers until the replica is constructed."""
    if path in ("/-/healthz", "/-/ready"):
        return 503, "text/plain", b"starting\n"
    return 404, "text/plain", b"not found\n"
