"""A pod's admin port: ``/-/healthz``, ``/-/ready`` and ``/metrics`` (see :mod:`shoal.kubernetes.pod`).

The kubelet restarts a pod whose liveness probe fails and takes it out of its Services while
its readiness probe fails, so the probes must be answered promptly whatever else the process
is doing. The admin server therefore runs on its own thread with its own event loop: a flood
of connections to the RPC port, or user code blocking the replica's loop, does not delay it.
It never runs user code: the probes' handler reads plain fields the replica's loop updates,
and a handler that needs the replica's loop (``/metrics``) returns a future, waited for at
most ``answer_timeout_s``. A :class:`LoopHeartbeat` lets the probes still notice a replica
loop that has stopped turning.

The port also bounds what one client can hold: one deadline for the whole request head
(``head_timeout_s``, 408 after it), a cap on its size (``max_head_bytes``, 431), a cap on
connections served at once (``max_connections``; beyond it a 503 and the connection closed
without reading), a strict request line (400) and ``Connection: close`` on every answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ANSWER_TIMEOUT_S",
    "HEAD_TIMEOUT_S",
    "LOOP_STALL_S",
    "MAX_CONNECTIONS",
    "MAX_HEAD_BYTES",
    "AdminAnswer",
    "AdminHandler",
    "AdminLimits",
    "AdminServer",
    "LoopHeartbeat",
    "needs_loopback",
    "starting",
]

logger = logging.getLogger("shoal.pod")

# (status, content type, body)
AdminAnswer = tuple[int, str, bytes]
# (method, path) -> an answer now, or a future of one (computed on another loop). Called on
# the admin server's thread: it must only read state that is safe to read from another thread.
AdminHandler = Callable[[str, str], AdminAnswer | concurrent.futures.Future[AdminAnswer]]

HEAD_TIMEOUT_S = 5.0  # the whole request head, from the connection's accept
MAX_HEAD_BYTES = 8192
MAX_CONNECTIONS = 32  # kubelet (three probes) and Prometheus need a handful
ANSWER_TIMEOUT_S = 5.0  # a future answer (/metrics), then writing the answer
# The probes fail once the replica's loop has not turned for this long (the liveness probe then
# restarts a pod whose loop is stuck; a loop busy for a few seconds is not stuck).
LOOP_STALL_S = 10.0
_WARN_EVERY_S = 10.0
_LINGER_S = 1.0

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (/[!-~]*) HTTP/1\.[01]")
_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class _HeadTooLarge(Exception):
    pass


@dataclass(frozen=True)
class AdminLimits:
    """What one client may hold on the admin port, and how long the probes trust a silent
    replica loop (``shoal replica --admin-*`` and ``--loop-stall-timeout``)."""

    head_timeout_s: float = HEAD_TIMEOUT_S
    max_head_bytes: int = MAX_HEAD_BYTES
    max_connections: int = MAX_CONNECTIONS
    answer_timeout_s: float = ANSWER_TIMEOUT_S
    loop_stall_s: float = LOOP_STALL_S

    def __post_init__(self) -> None:
        for name, value in (("head_timeout_s (--admin-head-timeout)", self.head_timeout_s),
                            ("answer_timeout_s", self.answer_timeout_s),
                            ("loop_stall_s (--loop-stall-timeout)", self.loop_stall_s)):
            if not 0 < value <= 3600:
                raise ValueError(f"admin port: {name} must be in (0, 3600] seconds, got {value!r}")
        if not 256 <= self.max_head_bytes <= 1 << 20:
            raise ValueError(f"admin port: max_head_bytes must be in [256, 1048576], got {self.max_head_bytes!r}")
        if not 1 <= self.max_connections <= 10000:
            raise ValueError(f"admin port: max_connections (--admin-max-connections) must be in [1, 10000], "
                             f"got {self.max_connections!r}")


class AdminServer:
    """A small HTTP/1.1 server for probes and metrics (one request per connection), on its own
    thread and event loop (see the module docstring).

    Deliberately separate from the app's HTTP server: it starts before the app is imported,
    keeps answering while the replica drains or its loop is busy, and never touches user code.
    ``handler`` may be replaced at any time (the replica takes over from :func:`starting`).
    """

    def __init__(self, handler: AdminHandler, limits: AdminLimits | None = None) -> None:
        self.handler = handler
        self.limits = limits = limits or AdminLimits()
        self.head_timeout_s = limits.head_timeout_s
        self.max_head_bytes = limits.max_head_bytes
        self.max_connections = limits.max_connections
        self.answer_timeout_s = limits.answer_timeout_s
        self.loop_stall_s = limits.loop_stall_s
        # Started on the replica's loop once it is constructed (PodReplica.run).
        self.heartbeat = LoopHeartbeat()
        self.servers: list[asyncio.AbstractServer] = []
        self.connections = 0  # being served now (admin thread only)
        self.refused = 0  # answered 503 at once: max_connections reached
        self.timed_out = 0  # cut at the head deadline
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._warned_at = -_WARN_EVERY_S
        self._unwarned = 0
        self._lingering = 0  # refused connections waiting for their client to close

    def loop_stall(self) -> str | None:
        """Why the probes fail because the replica's loop stopped turning, or None (any thread)."""
        stalled = self.heartbeat.stalled_for()
        if stalled > self.loop_stall_s:
            return f"event loop stalled for {stalled:.1f}s"
        return None

    # -- lifecycle (from the owner's thread)
    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (and 127.0.0.1 in a cluster, :func:`needs_loopback`); OSError
        when the port cannot be bound."""
        loop = self._ensure_thread()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._listen(host, port), loop))

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening, drop open connections and end the thread (waiting at most ``timeout``)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = None
        try:
            loop.call_soon_threadsafe(self._shutdown)
        except RuntimeError:  # the loop is already closed
            return
        if thread is not threading.current_thread():
            thread.join(timeout)

    def _ensure_thread(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                tasks = asyncio.all_tasks(loop)
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
                loop.close()

        self._thread = threading.Thread(target=run, name="shoal-admin", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the admin server's thread did not start within 10 s")
        self._loop = loop
        return loop

    async def _listen(self, host: str, port: int) -> None:
        self.servers.append(await asyncio.start_server(self._client, host, port, reuse_address=True))
        if needs_loopback(host):
            try:
                self.servers.append(await asyncio.start_server(self._client, "127.0.0.1", port, reuse_address=True))
            except OSError as e:
                logger.warning("cannot also listen on 127.0.0.1:%d: %s", port, e)

    def _shutdown(self) -> None:
        for server in self.servers:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        asyncio.get_running_loop().stop()

    # -- serving (on the admin thread)
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.max_connections:
            await self._refuse(reader, writer)
            return
        self.connections += 1
        self._writers.add(writer)
        try:
            method, answer = await self._answer(reader)
            writer.write(_response(*answer, method))
            await asyncio.wait_for(writer.drain(), self.answer_timeout_s)
        except (TimeoutError, ConnectionError):
            pass
        except Exception:
            logger.exception("admin request failed")
        finally:
            self.connections -= 1
            self._writers.discard(writer)
            writer.close()

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer 503 without reading the request. The connection lingers (reading and dropping
        what comes, at most ``_LINGER_S``) until the client closes, so that the close does not
        reset the connection before the client read the answer; beyond ``max_connections``
        lingering ones, a connection is reset at once."""
        self.refused += 1
        self._warn_busy()
        if self._lingering >= self.max_connections:
            writer.transport.abort()
            return
        self._lingering += 1
        try:
            writer.write(_response(503, "text/plain", b"admin port busy\n", "GET"))
            writer.write_eof()
            async with asyncio.timeout(_LINGER_S):
                while await reader.read(4096):
                    pass
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._lingering -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, AdminAnswer]:
        """The request's method and the answer to it."""
        try:
            async with asyncio.timeout(self.head_timeout_s):
                head = await self._read_head(reader)
        except TimeoutError:
            self.timed_out += 1
            return "GET", (408, "text/plain", b"request head not received in time\n")
        except _HeadTooLarge:
            return "GET", (431, "text/plain", f"request head over {self.max_head_bytes} bytes\n".encode())
        lines = head.split(b"\n")
        lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
        request = _REQUEST_LINE.fullmatch(lines[0])
        if request is None or not all(_HEADER_LINE.fullmatch(line) for line in lines[1:]):
            return "GET", (400, "text/plain", b"bad request\n")
        method, target = request.group(1).decode("ascii"), request.group(2).decode("ascii")
        if method not in ("GET", "HEAD"):
            return "GET", (405, "text/plain", b"method not allowed\n")
        answer = self.handler(method, target.split("?", 1)[0])
        if not isinstance(answer, concurrent.futures.Future):
            return method, answer
        try:
            return method, await asyncio.wait_for(asyncio.wrap_future(answer), self.answer_timeout_s)
        except TimeoutError:
            answer.cancel()
            return method, (503, "text/plain", b"the replica's event loop did not answer in time\n")

    async def _read_head(self, reader: asyncio.StreamReader) -> bytes:
        """The request line and headers, without the blank line that ends them (everything
        received, if the client closed its side first)."""
        buf = bytearray()
        searched = 0
        while True:
            for end in (b"\r\n\r\n", b"\n\n"):
                at = buf.find(end, max(0, searched - 3))
                if at >= 0:
                    if at > self.max_head_bytes:
                        raise _HeadTooLarge
                    return bytes(buf[:at])
            if len(buf) > self.max_head_bytes:
                raise _HeadTooLarge
            searched = len(buf)
            chunk = await reader.read(4096)
            if not chunk:
                return bytes(buf).rstrip(b"\r\n")
            buf += chunk

    def _warn_busy(self) -> None:
        """At most one warning every few seconds, however many connections are refused."""
        self._unwarned += 1
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY_S:
            logger.warning("admin port: %d connection(s) answered 503 at once: %d already being served "
                           "(--admin-max-connections)", self._unwarned, self.connections)
            self._warned_at = now
            self._unwarned = 0


def _response(status: int, ctype: str, body: bytes, method: str) -> bytes:
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Allow: GET, HEAD\r\n" if status == 405 else "")
            + "Connection: close\r\n\r\n").encode("latin-1")
    return head if method == "HEAD" else head + body


class LoopHeartbeat:
    """Tells the admin thread whether the replica's event loop still turns.

    The loop records the time every ``interval_s``; :meth:`stalled_for` (from any thread) is
    how long past its due time the latest beat is. The liveness probe fails once that exceeds
    the pod's bound, as it did when the probes were answered on that loop — but not because a
    single slow callback held it for a second or two.
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.last = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start beating on ``loop`` (from that loop's thread)."""
        self.last = time.monotonic()
        self._handle = loop.call_later(self.interval_s, self._beat, loop)

    def _beat(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last = time.monotonic()
        self._handle = loop.call_later(self.interval_s, self._beat, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def stalled_for(self) -> float:
        """Seconds the loop is late for its next beat (0 while it keeps time)."""
        return max(0.0, time.monotonic() - self.last - self.interval_s)


def needs_loopback(host: str) -> bool:
    """Whether to listen on 127.0.0.1 too: in a pod that listens on its IP, so that
    ``kubectl port-forward`` (which connects to the pod's loopback) reaches the HTTP and admin
    ports. Not when the pod IP is itself a loopback address (the pod simulation)."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    return not addr.is_loopback and not addr.is_unspecified


def starting(method: str, path: str) -> AdminAnswer:
    """The admin port's answers until the replica is constructed."""
    if path in ("/-/healthz", "/-/ready"):
        return 503, "text/plain", b"starting\n"
    return 404, "text/plain", b"not found\n"
