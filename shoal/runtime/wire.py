"""Wire format shared by every cross-process hop (Unix sockets locally, TCP in a cluster).

A connection carries length-prefixed frames: a 4-byte big-endian length, then the payload.
It opens with a mutual HMAC handshake on the instance secret (or, during a rotation, on one
of the secrets both peers accept); until it succeeds, frames are compared as raw bytes and
nothing is unpickled. Over TCP (between pods) the connection may run inside mutual TLS
(:class:`TcpSecurity`), the handshake then running inside it. After it, payloads are pickles (protocol 5,
cloudpickle for user values so classes from ``__main__`` travel by value); on a Unix socket, user
values with large buffers (numpy arrays, tensors) travel through shared memory (:mod:`shoal.runtime.shm`).

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
                                                  (flow control: shoal.runtime.flow); from a
                                                  replica: its app took nbytes of WS_IN frames
    (WS_IN, rid, message)                         a WebSocket's client message (an ASGI
                                                  websocket.receive or .disconnect) for the
                                                  running websocket request rid, caller to replica
                                                  (shoal.runtime.wschannel)
    (PING, 0) / (PONG, 0)                         liveness probe from a router; the replica answers

Control-plane messages (controller <-> replicas, proxies, clients, CLI) are the frozen
dataclasses of :mod:`shoal.runtime.wire_messages` (re-exported here), each carrying an id for
tracing and request/reply matching.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import pickle
import ssl
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from shoal.runtime.shm import ShmLink, attach
from shoal.runtime.wire_address import join_host_port as join_host_port
from shoal.runtime.wire_address import split_host_port as split_host_port
from shoal.runtime.wire_auth import HANDSHAKE_MAX, KEY_ID, NONCE, mac, refusals, tcp_ring
from shoal.runtime.wire_auth import MAC as MAC
from shoal.runtime.wire_auth import MAX_SECRETS as MAX_SECRETS
from shoal.runtime.wire_auth import AuthError as AuthError
from shoal.runtime.wire_auth import TcpSecurity as TcpSecurity
from shoal.runtime.wire_auth import key_id as key_id
from shoal.runtime.wire_auth import new_secret as new_secret
from shoal.runtime.wire_auth import peer_uid as peer_uid
from shoal.runtime.wire_auth import same_user_only as same_user_only
from shoal.runtime.wire_auth import secret_ring as secret_ring
from shoal.runtime.wire_auth import set_tcp_security as set_tcp_security
from shoal.runtime.wire_auth import tcp_security as tcp_security
from shoal.runtime.wire_codec import IN_PLACE_BYTES, OOB, OOB_HEAD, OOB_LEN, PICKLE, decode
from shoal.runtime.wire_codec import dumps as dumps
from shoal.runtime.wire_codec import dumps_user as dumps_user
from shoal.runtime.wire_messages import LATENCY_BUCKETS_MS as LATENCY_BUCKETS_MS
from shoal.runtime.wire_messages import Call as Call
from shoal.runtime.wire_messages import HandleStats as HandleStats
from shoal.runtime.wire_messages import Hello as Hello
from shoal.runtime.wire_messages import Membership as Membership
from shoal.runtime.wire_messages import ProxyReady as ProxyReady
from shoal.runtime.wire_messages import ReplicaEndpoint as ReplicaEndpoint
from shoal.runtime.wire_messages import ReplicaFailed as ReplicaFailed
from shoal.runtime.wire_messages import ReplicaInit as ReplicaInit
from shoal.runtime.wire_messages import ReplicaModels as ReplicaModels
from shoal.runtime.wire_messages import ReplicaReady as ReplicaReady
from shoal.runtime.wire_messages import ReplicaRoutingStats as ReplicaRoutingStats
from shoal.runtime.wire_messages import ReplicaStats as ReplicaStats
from shoal.runtime.wire_messages import Reply as Reply

# The control-plane messages live in wire_messages; re-exported: import them from either.
from shoal.runtime.wire_messages import Role as Role
from shoal.runtime.wire_messages import Routes as Routes
from shoal.runtime.wire_messages import Stop as Stop
from shoal.runtime.wire_messages import Subscribe as Subscribe
from shoal.runtime.wire_messages import SubscribeRoutes as SubscribeRoutes

logger = logging.getLogger("shoal.wire")

REQUEST, OK, ITEM, END, ERR, REJECT, CANCEL = range(7)
CREDIT = 7
# A WebSocket client's message, toward the replica running that websocket (shoal.runtime.wschannel).
WS_IN = 8
# A router's liveness probe and the replica's answer (numbered apart from the request kinds).
PING, PONG = 16, 17
# A caller asks a replica for what its record_routing_stats() last returned (pods: no controller relays it).
STATS, STATS_REPLY = 18, 19
_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 31
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


# ---- serialization -------------------------------------------------------------------------


class FramedProtocol(asyncio.Protocol):
    """A framed, authenticated, pickled message connection.

    ``on_message(msg)`` runs for every message after the handshake; ``on_close(exc)`` once
    when the connection ends. ``ready`` resolves when the handshake succeeded.
    """

    # Set by the owner: runs when the connection is made, before any frame is written or
    # read; a reason to refuse the peer (closes the connection, fails ``ready`` with
    # AuthError) or None. Unix sockets refuse peers of another user (:func:`same_user_only`).
    peer_check: Callable[[asyncio.BaseTransport], str | None] | None = None
    # Local (Unix-socket) connections: large user values travel through shared memory (shoal.runtime.shm).
    shm: ShmLink | None = None

    def __init__(
        self,
        secret: bytes | Sequence[bytes],
        server_side: bool,
        on_message: Callable[[FramedProtocol, Any], None] | None = None,
        on_close: Callable[[FramedProtocol, BaseException | None], None] | None = None,
        on_ready: Callable[[FramedProtocol], None] | None = None,
    ) -> None:
        self._keys = secret_ring(secret)
        self._key_ids = [key_id(k) for k in self._keys]
        self._hello = b""  # the server's hello, which both MACs cover
        self._chosen = b""  # client: the secret picked from the server's hello
        self._answer = b""  # client: its nonce and the id of that secret
        self._on_ready = on_ready
        self._server = server_side
        self.on_message = on_message
        self.on_close = on_close
        self._buf = bytearray()
        self._nonce = os.urandom(NONCE)
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
        if self.peer_check is not None and (refused := self.peer_check(transport)) is not None:
            self._fail(refused)
            return
        if self._server:
            self._hello = self._nonce + b"".join(self._key_ids)
            self._write_raw(self._hello)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _HEADER.unpack_from(buf, pos)
            if self._state != 2 and size > HANDSHAKE_MAX:
                # Handshake frames are tiny: never buffer a large frame from an unauthenticated peer.
                self._fail("bad handshake frame")
                return
            if n - pos - 4 < size:
                break
            start = pos + 4
            pos = start + size
            if self._state == 2:
                try:
                    if size < IN_PLACE_BYTES:
                        f = buf[start:pos]
                        msg = pickle.loads(f) if f[0] == PICKLE else decode(memoryview(f), 0, size, self.shm)
                    else:
                        # Decoded in place: a large frame is not copied whole before unpickling.
                        with memoryview(buf) as view:
                            msg = decode(view, start, pos, self.shm)
                except Exception:
                    logger.exception("undecodable frame; closing connection")
                    self._abort()
                    return
                self.frame_size = size
                if self.on_message is not None and msg is not None:
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
        if self.shm is not None:
            self.shm.lost()
        if not self.ready.done():
            self.ready.set_exception(exc or ConnectionError("connection closed during handshake"))
            self.ready.exception()  # mark retrieved
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb(self, exc)

    # -- handshake. Server: hello = nonce_s + the ids of its secrets (primary first). Client:
    #    picks the first of its own secrets (primary first) whose id is in the hello, sends
    #    nonce_c + id + mac(k, "c" + hello + nonce_c + id). Server: checks it, sends
    #    mac(k, "s" + hello + nonce_c + id). Client checks that. Both nonces are in both MACs
    #    (no replay), and the whole hello too (a relay cannot strip ids to force an old secret).
    def _handshake(self, frame: bytes) -> bool:
        if self._server:
            if self._state != 0 or len(frame) != NONCE + KEY_ID + MAC:
                return self._fail("bad handshake frame")
            answer, given = frame[:NONCE + KEY_ID], frame[NONCE + KEY_ID:]
            chosen = answer[NONCE:]
            if chosen not in self._key_ids:
                return self._fail("authentication failed (the peer uses an RPC secret this side does not accept)")
            key = self._keys[self._key_ids.index(chosen)]
            if not hmac.compare_digest(given, mac(key, b"c", self._hello + answer)):
                return self._fail("authentication failed")
            self._write_raw(mac(key, b"s", self._hello + answer))
            self._authenticated()
            return True
        if self._state == 0:
            n = len(frame) - NONCE
            if n < KEY_ID or n > KEY_ID * MAX_SECRETS or n % KEY_ID:
                return self._fail("bad handshake frame")
            offered = {frame[i:i + KEY_ID] for i in range(NONCE, len(frame), KEY_ID)}
            shared = [i for i, kid in enumerate(self._key_ids) if kid in offered]
            if not shared:
                return self._fail("authentication failed: the server accepts none of this side's RPC secrets")
            self._chosen = self._keys[shared[0]]
            self._hello = frame
            answer = self._nonce + self._key_ids[shared[0]]
            self._answer = answer
            self._write_raw(answer + mac(self._chosen, b"c", frame + answer))
            self._state = 1
            return True
        if len(frame) != MAC or not hmac.compare_digest(frame, mac(self._chosen, b"s", self._hello + self._answer)):
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
        if self._server and not self.ready.done():
            refusals.note(why)  # unauthenticated peers: a flood must not flood the log too
        else:
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
        """Send a message that carries user values (large ones through shared memory, where local)."""
        if self.shm is not None:
            self.shm.send(msg)
        else:
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
        prefix = OOB_HEAD.pack(OOB, len(head), len(raws)) + b"".join(OOB_LEN.pack(r.nbytes) for r in raws)
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
    """Connect to the Unix socket ``path`` and authenticate. A server run by another user is
    refused (:func:`same_user_only`) before anything it sends is read: ``AuthError``."""
    loop = asyncio.get_running_loop()

    def factory() -> FramedProtocol:
        proto = FramedProtocol(secret, False, on_message, on_close)
        proto.peer_check = same_user_only(path, server_side=False)
        attach(proto, path)
        return proto

    return await _handshaken(loop.create_unix_connection(factory, path), timeout)


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
    """Listen on ``path`` (mode 0600); ``on_connect`` runs for each authenticated peer.
    A client run by another user is disconnected before the handshake (:func:`same_user_only`)."""
    loop = asyncio.get_running_loop()

    def factory() -> FramedProtocol:
        proto = FramedProtocol(secret, True, on_ready=on_connect)
        proto.peer_check = same_user_only(path, server_side=True)  # before the nonce is sent
        attach(proto, path)
        return proto

    if os.path.exists(path):
        os.unlink(path)
    old = os.umask(0o177)
    try:
        server = await loop.create_unix_server(factory, path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server


async def connect_tcp(
    host: str,
    port: int,
    secret: bytes | Sequence[bytes],
    on_message: Callable[[FramedProtocol, Any], None] | None = None,
    on_close: Callable[[FramedProtocol, BaseException | None], None] | None = None,
    timeout: float = 10.0,
    *,
    tls: ssl.SSLContext | None = None,
) -> FramedProtocol:
    """Like :func:`connect_unix`, over TCP (between pods in a cluster).

    With ``tls`` (default: the process's :class:`TcpSecurity`) the connection is TLS first,
    the server's certificate checked by the context, then the HMAC handshake inside it; both
    within ``timeout`` each. A TLS failure raises ``ssl.SSLError`` (an ``OSError``).
    """
    loop = asyncio.get_running_loop()
    ring = tcp_ring(secret)
    ctx = tls if tls is not None else tcp_security().client_tls

    def factory() -> FramedProtocol:
        return FramedProtocol(ring, False, on_message, on_close)

    if ctx is None:
        return await _handshaken(loop.create_connection(factory, host, port), timeout)
    return await _handshaken(loop.create_connection(factory, host, port, ssl=ctx, ssl_handshake_timeout=timeout),
                             timeout)


async def connect_endpoint(
    endpoint: str,
    secret: bytes | Sequence[bytes],
    on_message: Callable[[FramedProtocol, Any], None] | None = None,
    on_close: Callable[[FramedProtocol, BaseException | None], None] | None = None,
    timeout: float = 10.0,
) -> FramedProtocol:
    """Connect to a replica's endpoint: a Unix socket path, or ``host:port`` over TCP (with the
    process's :class:`TcpSecurity`)."""
    hp = split_host_port(endpoint)
    if hp is None:
        # One machine, one instance secret: the primary is the only one a Unix socket knows.
        return await connect_unix(endpoint, secret_ring(secret)[0], on_message, on_close, timeout)
    return await connect_tcp(hp[0], hp[1], secret, on_message, on_close, timeout)


async def serve_tcp(
    host: str,
    port: int,
    secret: bytes | Sequence[bytes],
    on_connect: Callable[[FramedProtocol], None],
    handshake_timeout: float = HANDSHAKE_TIMEOUT_S,
    *,
    tls: ssl.SSLContext | None = None,
) -> asyncio.AbstractServer:
    """Listen on ``host:port``; ``on_connect`` runs for each authenticated peer.

    With ``tls`` (default: the process's :class:`TcpSecurity`) peers must complete a TLS
    handshake first (the context decides whether they need a certificate). Peers that do not
    complete TLS and the HMAC handshake within ``handshake_timeout`` are dropped.
    """
    loop = asyncio.get_running_loop()
    ring = tcp_ring(secret)
    ctx = tls if tls is not None else tcp_security().server_tls
    from shoal.runtime.handshake_gate import HandshakeGate

    # At most gate.max_pending connections in handshake at once (a flood of peers that never
    # authenticate must not exhaust the process's descriptors); the rest are closed at once,
    # before any TLS (the gate starts TLS itself, once it admitted a connection).
    gate = HandshakeGate()
    handshake_timeout = gate.handshake_timeout(handshake_timeout)

    def factory() -> FramedProtocol:
        proto = FramedProtocol(ring, True, on_ready=on_connect)
        timer = loop.call_later(handshake_timeout, _drop_unauthenticated, proto)
        proto.ready.add_done_callback(lambda _f: timer.cancel())
        return proto

    return await loop.create_server(gate.admission(factory, ctx, handshake_timeout), host, port, reuse_address=True)


def _drop_unauthenticated(proto: FramedProtocol) -> None:
    if not proto.ready.done():
        proto._fail("no handshake in time")
