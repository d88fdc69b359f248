"""Wire format shared by every cross-process hop (Unix sockets locally, TCP in a cluster).

A connection carries length-prefixed frames: a 4-byte big-endian length, then the payload.
It opens with a mutual HMAC handshake on the instance secret; until it succeeds, frames are
compared as raw bytes and nothing is unpickled. After it, payloads are pickles (protocol 5,
cloudpickle for user values so classes from ``__main__`` travel by value).

Data-plane messages are plain tuples (cheap to pickle), their first two fields always the
kind and the per-connection request id:

    (REQUEST, rid, method, args, kwargs, meta)   meta: RequestMeta
    (OK, rid, value)                              unary result
    (ITEM, rid, value)                            one streamed item
    (END, rid)                                    end of a stream
    (ERR, rid, exception, traceback_text)
    (REJECT, rid)                                 replica at max_ongoing_requests; try elsewhere
    (CANCEL, rid)                                 caller gave up; replica cancels the task
    (CREDIT, rid, nbytes)                         the caller consumed nbytes of a stream's frames
                                                  (flow control: shoal.runtime.flow)
    (PING, 0) / (PONG, 0)                         liveness probe from a router; the replica answers

Control-plane messages (controller <-> replicas, proxies, clients, CLI) are the frozen
dataclasses below, each carrying an id for tracing and request/reply matching.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import cloudpickle

from shoal.observability.buckets import LATENCY_BUCKETS_MS as _LATENCY_BUCKETS_MS

logger = logging.getLogger("shoal.wire")

REQUEST, OK, ITEM, END, ERR, REJECT, CANCEL = range(7)
CREDIT = 7
# A router's liveness probe and the replica's answer (numbered apart from the request kinds).
PING, PONG = 16, 17
_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 31
_NONCE = 32
_MAC = 32
# A TCP peer that has not authenticated within this long is disconnected.
HANDSHAKE_TIMEOUT_S = 10.0


class RequestMeta(NamedTuple):
    request_id: str
    stream: bool = False
    # True when args are (asgi_scope, body) and the reply is a stream of ASGI messages.
    http: bool = False
    multiplexed_model_id: str = ""
    route: str = ""
    # W3C traceparent of the caller's span when tracing is on (shoal.observability.tracing); "" when off.
    trace: str = ""


# ---- control plane -------------------------------------------------------------------------


class Role(StrEnum):
    """What a process connecting to the controller is (the first field of its ``Hello``)."""

    REPLICA = "replica"  # a replica process, a spare or a rank of a gang
    PROXY = "proxy"
    CLIENT = "client"  # a driver (``serve.run``) or the CLI


@dataclass(frozen=True, slots=True)
class Hello:
    role: Role
    process_id: str  # replica id, proxy id, or a client name
    pid: int = 0
    # A replica or proxy reconnecting to a restarted controller, already serving (adoption).
    resumed: bool = False


@dataclass(frozen=True, slots=True)
class ReplicaInit:
    app: str
    deployment: str
    replica_id: str
    blob: bytes
    config: Any  # DeploymentConfig
    is_function: bool
    socket_path: str
    serves_http: bool = False  # an ingress replica given the HTTP socket
    # Where the app's code was deployed from (``shoal deploy``): prepended to sys.path / the cwd.
    sys_path: tuple[str, ...] = ()
    cwd: str = ""
    # Gang replicas: this process's rank, the gang's size, and (rank 0 only) the sockets of
    # ranks 1..N-1, to which rank 0 sends every request it gets.
    rank: int = 0
    world_size: int = 1
    peers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplicaReady:
    replica_id: str
    pid: int


@dataclass(frozen=True, slots=True)
class ReplicaFailed:
    replica_id: str
    error: str


@dataclass(frozen=True, slots=True)
class ReplicaModels:
    """A replica's multiplexed models changed (loaded or evicted)."""

    replica_id: str
    model_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Subscribe:
    app: str
    deployment: str


@dataclass(frozen=True, slots=True)
class ReplicaEndpoint:
    replica_id: str
    endpoint: str  # where it listens: a Unix socket path, or host:port in a cluster
    max_ongoing: int
    model_ids: tuple[str, ...] = ()  # multiplexed models the replica holds


@dataclass(frozen=True, slots=True)
class Membership:
    app: str
    deployment: str
    # Grows with every push, across controller restarts too: a router ignores an older epoch.
    epoch: int
    replicas: tuple[ReplicaEndpoint, ...]
    max_queued_requests: int = -1
    # The deployment no longer exists (app deleted or instance shutting down).
    gone: str = ""
    # How often callers report their load for autoscaling (0: the deployment does not autoscale).
    metrics_interval_s: float = 0.0
    # How long a request may wait for a free replica before BackPressureError (0: no bound).
    max_queue_wait_s: float = 0.0


@dataclass(frozen=True, slots=True)
class HandleStats:
    """A caller's load on one deployment: requests waiting for a replica, and in flight."""

    app: str
    deployment: str
    queued: int
    in_flight: int


@dataclass(frozen=True, slots=True)
class Routes:
    # route_prefix -> (app name, ingress deployment name)
    table: dict[str, tuple[str, str]] = field(default_factory=dict)
    # False while every routed app has ingress replicas serving HTTP themselves.
    proxy_accepts: bool = True
    # Canary releases: route_prefix -> (canary app key, its ingress, percent of traffic).
    split: dict[str, tuple[str, str, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SubscribeRoutes:
    """An ingress replica that serves HTTP itself wants the route table too."""


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """A replica's load (requests running or waiting in it, for autoscaling) and, since it
    started, the requests it finished: count, failures and a latency histogram
    (``LATENCY_BUCKETS_MS``), from which per-version metrics are summed."""

    replica_id: str
    ongoing: int
    requests: int = 0
    errors: int = 0
    latency_hist: tuple[int, ...] = ()


# Upper bounds (ms) of the latency histogram replicas report (the same as the Prometheus
# histograms'); the last bucket is open. Re-exported here: replicas import it from this module.
LATENCY_BUCKETS_MS = _LATENCY_BUCKETS_MS


@dataclass(frozen=True, slots=True)
class ProxyReady:
    process_id: str
    port: int


@dataclass(frozen=True, slots=True)
class Call:
    """A request/reply on the control plane (health checks, reconfigure, admin commands)."""

    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    id: int
    ok: bool
    value: Any = None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Stop:
    """Ask a replica or proxy to drain and exit."""

    reason: str = ""


# ---- serialization -------------------------------------------------------------------------


def dumps(msg: Any) -> bytes:
    """Pickle a message; user values may need cloudpickle (classes defined in __main__)."""
    try:
        return pickle.dumps(msg, protocol=5)
    except (pickle.PicklingError, TypeError, AttributeError):
        return dumps_user(msg)


def dumps_user(msg: Any) -> bytes:
    data: bytes = cloudpickle.dumps(msg, protocol=5)
    return data


# A frame whose first byte is _OOB (never the first byte of a pickle, b"\x80") carries
# out-of-band buffers: (_OOB, pickle length, buffer count), each buffer's length, the pickle,
# then the buffers (FramedProtocol.send_oob).
_OOB = 0
# Frames from this size on are unpickled in place in the receive buffer (smaller ones are copied).
_IN_PLACE_BYTES = 64 * 1024
_OOB_HEAD = struct.Struct(">BII")
_OOB_LEN = struct.Struct(">Q")


def _decode(view: memoryview, start: int, end: int) -> Any:
    """The message in ``view[start:end]``, a frame's payload."""
    if view[start] != _OOB:
        return pickle.loads(view[start:end])
    _, head_len, count = _OOB_HEAD.unpack_from(view, start)
    at = start + _OOB_HEAD.size
    lengths = [_OOB_LEN.unpack_from(view, at + i * _OOB_LEN.size)[0] for i in range(count)]
    at += count * _OOB_LEN.size
    head = view[at:at + head_len]
    at += head_len
    buffers: list[bytes] = []
    for length in lengths:
        buffers.append(bytes(view[at:at + length]))
        at += length
    if at != end:
        raise ValueError("malformed out-of-band frame")
    try:
        return pickle.loads(head, buffers=buffers)
    finally:
        head.release()


def new_secret() -> bytes:
    return os.urandom(32)


def _mac(secret: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, label + nonce, hashlib.sha256).digest()


class AuthError(ConnectionError):
    pass


class FramedProtocol(asyncio.Protocol):
    """A framed, authenticated, pickled message connection.

    ``on_message(msg)`` runs for every message after the handshake; ``on_close(exc)`` once
    when the connection ends. ``ready`` resolves when the handshake succeeded.
    """

    def __init__(
        self,
        secret: bytes,
        server_side: bool,
        on_message: Callable[[FramedProtocol, Any], None] | None = None,
        on_close: Callable[[FramedProtocol, BaseException | None], None] | None = None,
        on_ready: Callable[[FramedProtocol], None] | None = None,
    ) -> None:
        self._secret = secret
        self._on_ready = on_ready
        self._server = server_side
        self.on_message = on_message
        self.on_close = on_close
        self._buf = bytearray()
        self._nonce = os.urandom(_NONCE)
        self._state = 0  # 0: handshake step 1, 1: step 2, 2: authenticated
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.peer: Any = None  # set by the owner (e.g. the Hello it received)
        # The size of the frame whose message ``on_message`` is handling (stream flow control).
        self.frame_size = 0

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._server:
            self._write_raw(self._nonce)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if self._state != 2 and size > _NONCE + _MAC:
                # Handshake frames are tiny: never buffer a large frame from an unauthenticated peer.
                self._fail("bad handshake frame")
                return
            if n - pos - 4 < size:
                break
            start = pos + 4
            pos = start + size
            if self._state == 2:
                try:
                    if size < _IN_PLACE_BYTES:
                        frame = buf[start:pos]
                        msg = pickle.loads(frame) if frame[0] != _OOB else _decode(memoryview(frame), 0, size)
                    else:
                        # Decoded in place: a large frame is not copied whole before unpickling.
                        with memoryview(buf) as view:
                            msg = _decode(view, start, pos)
                except Exception:
                    logger.exception("undecodable frame; closing connection")
                    self._abort()
                    return
                self.frame_size = size
                if self.on_message is not None:
                    try:
                        self.on_message(self, msg)
                    except Exception:
                        logger.exception("error handling message %r", type(msg))
            else:
                if not self._handshake(bytes(buf[start:pos])):
                    return
            if self.closed:
                return
        if pos:
            del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("connection closed during handshake"))
            self.ready.exception()  # mark retrieved
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb(self, exc)

    # -- handshake: server sends nonce_s; client sends nonce_c + mac("c", nonce_s);
    #    server checks it and sends mac("s", nonce_c); client checks that.
    def _handshake(self, frame: bytes) -> bool:
        if self._server:
            if self._state != 0 or len(frame) != _NONCE + _MAC:
                return self._fail("bad handshake frame")
            nonce_c, mac = frame[:_NONCE], frame[_NONCE:]
            if not hmac.compare_digest(mac, _mac(self._secret, b"c", self._nonce)):
                return self._fail("authentication failed")
            self._write_raw(_mac(self._secret, b"s", nonce_c))
            self._authenticated()
            return True
        if self._state == 0:
            if len(frame) != _NONCE:
                return self._fail("bad handshake frame")
            self._write_raw(self._nonce + _mac(self._secret, b"c", frame))
            self._state = 1
            return True
        if len(frame) != _MAC or not hmac.compare_digest(frame, _mac(self._secret, b"s", self._nonce)):
            return self._fail("server failed authentication")
        self._authenticated()
        return True

    def _authenticated(self) -> None:
        self._state = 2
        if not self.ready.done():
            self.ready.set_result(None)
        if self._on_ready is not None:
            # Synchronously, so that handlers are in place before the next frame is parsed.
            self._on_ready(self)

    def _fail(self, why: str) -> bool:
        logger.warning("closing connection: %s", why)
        if not self.ready.done():
            self.ready.set_exception(AuthError(why))
            self.ready.exception()
        self._abort()
        return False

    def _abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _write_raw(self, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(_HEADER.pack(len(payload)) + payload)

    # -- sending
    def send(self, msg: Any) -> None:
        """Send a control message (std pickle, cloudpickle fallback)."""
        self.send_bytes(dumps(msg))

    def send_user(self, msg: Any) -> None:
        """Send a message that carries user values."""
        self.send_bytes(dumps_user(msg))

    def send_oob(self, msg: Any) -> None:
        """Send a message of plain data whose ``pickle.PickleBuffer`` values (request bodies)
        travel after its pickle without being copied into it (see :func:`_decode`)."""
        buffers: list[pickle.PickleBuffer] = []
        try:
            head = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
        except (pickle.PicklingError, TypeError, AttributeError):
            self.send_bytes(dumps_user(msg))  # buffers in band
            return
        if not buffers:
            self.send_bytes(head)
            return
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection is closed")
        raws = [b.raw() for b in buffers]
        prefix = _OOB_HEAD.pack(_OOB, len(head), len(raws)) + b"".join(_OOB_LEN.pack(r.nbytes) for r in raws)
        n = len(prefix) + len(head) + sum(r.nbytes for r in raws)
        if n >= MAX_FRAME:
            raise ValueError("message too large for one frame")
        self.transport.writelines([_HEADER.pack(n) + prefix + head, *raws])

    def send_bytes(self, payload: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionError("connection is closed")
        n = len(payload)
        if n >= MAX_FRAME:
            raise ValueError("message too large for one frame")
        if n < 65536:  # one small write beats a gather of two buffers
            self.transport.write(_HEADER.pack(n) + payload)
        else:
            self.transport.writelines((_HEADER.pack(n), payload))

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


async def connect_unix(
    path: str,
    secret: bytes,
    on_message: Callable[[FramedProtocol, Any], None] | None = None,
    on_close: Callable[[FramedProtocol, BaseException | None], None] | None = None,
    timeout: float = 10.0,
) -> FramedProtocol:
    loop = asyncio.get_running_loop()
    return await _handshaken(
        loop.create_unix_connection(lambda: FramedProtocol(secret, False, on_message, on_close), path), timeout)


async def _handshaken(connecting: Any, timeout: float) -> FramedProtocol:
    """Await a connection's creation, then its handshake, each within ``timeout``."""
    _, proto = await asyncio.wait_for(connecting, timeout)
    assert isinstance(proto, FramedProtocol)
    try:
        await asyncio.wait_for(proto.ready, timeout)
    except BaseException:
        # Close it: a peer that wakes up later must not complete a handshake nobody awaits.
        proto.on_close = None
        proto._abort()
        raise
    return proto


async def serve_unix(
    path: str,
    secret: bytes,
    on_connect: Callable[[FramedProtocol], None],
) -> asyncio.AbstractServer:
    """Listen on ``path`` (mode 0600); ``on_connect`` runs for each authenticated peer."""
    loop = asyncio.get_running_loop()

    def factory() -> FramedProtocol:
        return FramedProtocol(secret, True, on_ready=on_connect)

    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        server = await loop.create_unix_server(factory, path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


def split_host_port(address: str) -> tuple[str, int] | None:
    """``("host", port)`` for a ``host:port`` (or ``[v6]:port``) address; None for a Unix socket path."""
    if address.startswith("/") or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    """The ``host:port`` form of an address (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def connect_tcp(
    host: str,
    port: int,
    secret: bytes,
    on_message: Callable[[FramedProtocol, Any], None] | None = None,
    on_close: Callable[[FramedProtocol, BaseException | None], None] | None = None,
    timeout: float = 10.0,
) -> FramedProtocol:
    """Like :func:`connect_unix`, over TCP (between pods in a cluster)."""
    loop = asyncio.get_running_loop()
    return await _handshaken(
        loop.create_connection(lambda: FramedProtocol(secret, False, on_message, on_close), host, port), timeout)


async def connect_endpoint(
    endpoint: str,
    secret: bytes,
    on_message: Callable[[FramedProtocol, Any], None] | None = None,
    on_close: Callable[[FramedProtocol, BaseException | None], None] | None = None,
    timeout: float = 10.0,
) -> FramedProtocol:
    """Connect to a replica's endpoint: a Unix socket path, or ``host:port`` over TCP."""
    hp = split_host_port(endpoint)
    if hp is None:
        return await connect_unix(endpoint, secret, on_message, on_close, timeout)
    return await connect_tcp(hp[0], hp[1], secret, on_message, on_close, timeout)


async def serve_tcp(
    host: str,
    port: int,
    secret: bytes,
    on_connect: Callable[[FramedProtocol], None],
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
) -> asyncio.AbstractServer:
    """Listen on ``host:port``; ``on_connect`` runs for each authenticated peer.

    Peers that do not complete the handshake within ``handshake_timeout`` are dropped.
    """
    loop = asyncio.get_running_loop()

    def factory() -> FramedProtocol:
        proto = FramedProtocol(secret, True, on_ready=on_connect)
        timer = loop.call_later(handshake_timeout, _drop_unauthenticated, proto)
        proto.ready.add_done_callback(lambda _f: timer.cancel())
        return proto

    return await loop.create_server(factory, host, port, reuse_address=True)


def _drop_unauthenticated(proto: FramedProtocol) -> None:
    if not proto.ready.done():
        proto._fail("no handshake in time")
