"""Who may talk on a wire connection: the instance or application secrets and their handshake
ids, the peer-uid check of Unix sockets, and the TLS settings of TCP connections between pods.
:class:`~shoal.runtime.wire.FramedProtocol` runs the handshake with these."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger("shoal.wire")

# Handshake: the server's hello is a nonce and the ids of the secrets it accepts (its primary
# first); the client answers with its nonce, the id of the secret it picked and its MAC.
NONCE = 24
KEY_ID = 8
MAC = 32
MAX_SECRETS = 4  # secrets one side accepts at once (a rotation needs two)
HANDSHAKE_MAX = max(NONCE + KEY_ID * MAX_SECRETS, NONCE + KEY_ID + MAC)


def new_secret() -> bytes:
    return os.urandom(32)


def mac(secret: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, label + nonce, hashlib.sha256).digest()


def key_id(secret: bytes) -> bytes:
    """A secret's short public name in the handshake (it reveals nothing usable about the secret)."""
    return hmac.new(secret, b"shoal-key-id", hashlib.sha256).digest()[:KEY_ID]


def secret_ring(secret: bytes | Sequence[bytes]) -> tuple[bytes, ...]:
    """The secrets a connection accepts, the primary first: one secret, or several during a
    rotation (``(new, previous)``). Empty or duplicate secrets are refused."""
    ring = (secret,) if isinstance(secret, bytes | bytearray) else tuple(secret)
    if not ring or len(ring) > MAX_SECRETS:
        raise ValueError(f"between 1 and {MAX_SECRETS} secrets are accepted at once (got {len(ring)})")
    if any(not k for k in ring):
        raise ValueError("an RPC secret may not be empty")
    ids = [key_id(bytes(k)) for k in ring]
    if len(set(ids)) != len(ids):
        raise ValueError("the same RPC secret is given twice")
    return tuple(bytes(k) for k in ring)


class _Refusals:
    """Warnings about unauthenticated peers a server closed: the first at once, then at most
    one every ``every_s`` seconds, saying how many were closed meanwhile."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._next = 0.0
        self._quiet = 0

    def note(self, why: str) -> None:
        import time

        now = time.monotonic()
        if now < self._next:
            self._quiet += 1
            return
        more = f" ({self._quiet} more closed in the last {self.every_s:g} s)" if self._quiet else ""
        logger.warning("closing connection: %s%s", why, more)
        self._quiet = 0
        self._next = now + self.every_s


refusals = _Refusals()


class AuthError(ConnectionError):
    pass


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(transport: asyncio.BaseTransport) -> int:
    """The uid of the process at the other end of a Unix socket connection (``SO_PEERCRED``:
    the kernel's record of who connected, or who listened). ``OSError`` when unknown."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise OSError("the connection has no socket")
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


def same_user_only(path: str, *, server_side: bool) -> Callable[[asyncio.BaseTransport], str | None]:
    """A :attr:`FramedProtocol.peer_check` for Unix sockets: only a peer running as this user
    passes. A secret proves the peer read a file; this proves whose process it is, so a
    socket and a secret another user planted (or a client of theirs) are never talked to.
    Where the platform has no ``SO_PEERCRED`` nothing is checked."""

    def check(transport: asyncio.BaseTransport) -> str | None:
        if not hasattr(socket, "SO_PEERCRED"):
            return None
        me = os.geteuid()
        try:
            uid = peer_uid(transport)
        except OSError as e:
            return f"cannot tell which user is at the other end of {path} ({e}); refusing to talk to it"
        if uid == me:
            return None
        if server_side:
            return f"a process of uid {uid} connected to {path}, not one of this user (uid {me}); refused"
        return f"the socket {path} is served by uid {uid}, not this user (uid {me}); refusing to talk to it"

    return check


@dataclass(frozen=True)
class TcpSecurity:
    """What protects this process's TCP connections when a call does not say: mutual TLS
    contexts (None: plain TCP) and secrets accepted besides the ones a call passes (the previous
    secret during a rotation). A pod sets it once at startup, before it connects or listens
    (:mod:`shoal.kubernetes.pod`), so that every router and gang link of the process uses it."""

    client_tls: ssl.SSLContext | None = None
    server_tls: ssl.SSLContext | None = None
    also_accepted: tuple[bytes, ...] = ()


_tcp_security = TcpSecurity()


def set_tcp_security(security: TcpSecurity) -> None:
    """Make ``security`` the default of every later :func:`connect_tcp` and :func:`serve_tcp`."""
    global _tcp_security
    _tcp_security = security


def tcp_security() -> TcpSecurity:
    return _tcp_security


def tcp_ring(secret: bytes | Sequence[bytes]) -> tuple[bytes, ...]:
    """The secrets a TCP connection accepts: the call's, then the process's extra ones."""
    ring = secret_ring(secret)
    extra = tuple(k for k in _tcp_security.also_accepted if k not in ring)
    return secret_ring(ring + extra)
