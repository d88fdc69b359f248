from __future__ import annotations

import asyncio
import os
import pickle
import struct
import tempfile
from typing import Any

import pytest

from shoal.runtime.wire import AuthError, FramedProtocol, connect_unix, serve_unix


class Boom:
    """Unpickling this would run code: it must never happen before authentication."""

    ran = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_mark, ())


def _mark() -> None:
    Boom.ran = True


@pytest.fixture
def sock_path() -> str:
    d = tempfile.mkdtemp(prefix="shoal-w", dir="/tmp")
    return os.path.join(d, "s.sock")


async def test_round_trip_and_permissions(sock_path: str) -> None:
    secret = os.urandom(32)
    got: list[Any] = []

    def on_connect(proto: FramedProtocol) -> None:
        proto.on_message = lambda p, m: (got.append(m), p.send(("echo", m)))

    server = await serve_unix(sock_path, secret, on_connect)
    assert oct(os.stat(sock_path).st_mode & 0o777) == "0o600"
    replies: list[Any] = []
    client = await connect_unix(sock_path, secret, lambda p, m: replies.append(m))
    client.send({"hello": [1, 2, 3]})
    client.send_user(b"x" * 1_000_000)
    for _ in range(100):
        if len(replies) == 2:
            break
        await asyncio.sleep(0.01)
    assert replies == [("echo", {"hello": [1, 2, 3]}), ("echo", b"x" * 1_000_000)]
    client.close()
    server.close()


async def test_wrong_secret_is_rejected(sock_path: str) -> None:
    server = await serve_unix(sock_path, os.urandom(32), lambda p: None)
    with pytest.raises((AuthError, ConnectionError)):
        await connect_unix(sock_path, os.urandom(32), timeout=2)
    server.close()


async def test_nothing_unpickled_before_authentication(sock_path: str) -> None:
    messages: list[Any] = []

    def on_connect(proto: FramedProtocol) -> None:
        proto.on_message = lambda p, m: messages.append(m)

    server = await serve_unix(sock_path, os.urandom(32), on_connect)
    reader, writer = await asyncio.open_unix_connection(sock_path)
    await reader.readexactly(4 + 32)  # the server's nonce
    payload = pickle.dumps(Boom())
    writer.write(struct.pack(">I", len(payload)) + payload)
    await writer.drain()
    data = await reader.read()  # the server hangs up on us
    assert data == b""
    assert not Boom.ran and messages == []
    writer.close()
    server.close()
