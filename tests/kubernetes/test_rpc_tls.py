"""Pod-to-pod RPC on the network path: mutual TLS (a relay can neither read nor alter frames,
and nothing it injects is ever unpickled), and the RPC secret's rotation overlap.

Run in-process on 127.x.y.z with the wire functions pods use (``serve_tcp``/``connect_tcp``)
and the contexts a pod builds from its mounted Secret (:class:`PodTls`)."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from k8s_relay import Relay, flip_middle_byte

from shoal.exceptions import PodConfigError
from shoal.kubernetes import names
from shoal.kubernetes.certs import new_material
from shoal.kubernetes.pod.tls import PodTls
from shoal.runtime.wire import (
    REQUEST,
    AuthError,
    FramedProtocol,
    RequestMeta,
    connect_tcp,
    key_id,
    secret_ring,
    serve_tcp,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="127.x.y.z addresses need Linux")

MARKER_TEXT = "request-payload-only-the-pods-may-read"


def _ip() -> str:
    return f"127.{random.randint(16, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"


def tls_dir(root: Path, name: str = "app") -> PodTls:
    """The contexts of a pod whose Secret holds a fresh CA's pod certificate."""
    d = root / name
    d.mkdir()
    for key, value in new_material(name, "default").secret_data().items():
        (d / key).write_text(value)
    return PodTls(str(d), f"{name}-rpc-tls")


class Touch:
    """Unpickling this creates ``path``: the proof that injected bytes were unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


class Server:
    """A pod's RPC port in-process: what it receives, and whether connections were dropped."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.server: asyncio.AbstractServer | None = None

    def on_connect(self, proto: FramedProtocol) -> None:
        proto.on_message = lambda p, m: self.messages.append(m)

    async def start(self, host: str, secret: bytes | tuple[bytes, ...], tls: PodTls | None) -> int:
        self.server = await serve_tcp(host, 0, secret, self.on_connect, handshake_timeout=5,
                                      tls=tls.server if tls else None)
        return int(self.server.sockets[0].getsockname()[1])


async def _through_relay(tmp_path: Path, *, tls: bool) -> tuple[Relay, Server, FramedProtocol, asyncio.Event]:
    ip, secret = _ip(), os.urandom(32)
    pod = tls_dir(tmp_path) if tls else None
    server = Server()
    port = await server.start(ip, secret, pod)
    relay = await Relay((ip, port)).start(ip)
    dropped = asyncio.Event()
    client = await connect_tcp(ip, relay.port, secret, on_close=lambda p, e: dropped.set(), timeout=5,
                               tls=pod.client if pod else None)
    return relay, server, client, dropped


def _evil_frame(marker: Path) -> bytes:
    payload = pickle.dumps(Touch(marker), protocol=5)
    return struct.pack(">I", len(payload)) + payload


async def test_plain_tcp_lets_a_relay_inject_code(tmp_path: Path) -> None:
    """The attack TLS closes: on plain TCP, after the HMAC handshake, bytes a relay puts in are
    unpickled by the server (here they only create a file)."""
    marker = tmp_path / "injected-code-ran"
    relay, server, client, _ = await _through_relay(tmp_path, tls=False)
    try:
        relay.tamper = lambda data: _evil_frame(marker)
        client.send(("hello",))
        await asyncio.wait_for(relay.tampered.wait(), 5)
        for _ in range(200):
            if marker.exists():
                break
            await asyncio.sleep(0.01)
        assert marker.exists()
    finally:
        client.close()
        relay.close()
        assert server.server is not None
        server.server.close()


@pytest.mark.parametrize("how", ["inject", "flip"])
async def test_tls_drops_a_tampered_frame_unread(tmp_path: Path, how: str) -> None:
    marker = tmp_path / "injected-code-ran"
    relay, server, client, dropped = await _through_relay(tmp_path, tls=True)
    try:
        client.send(("before",))
        for _ in range(500):
            if server.messages:
                break
            await asyncio.sleep(0.01)
        assert server.messages == [("before",)]  # the path works untouched
        relay.tamper = (lambda data: _evil_frame(marker)) if how == "inject" else flip_middle_byte
        client.send(Touch(marker) if how == "flip" else ("hello",))  # flip: the real bytes would create it
        await asyncio.wait_for(relay.tampered.wait(), 5)
        # The server's TLS layer rejects the record: the connection is dropped...
        await asyncio.wait_for(dropped.wait(), 10)
        # ... and nothing after the tampering was unpickled.
        assert server.messages == [("before",)]
        assert not marker.exists()
    finally:
        client.close()
        relay.close()
        assert server.server is not None
        server.server.close()


@pytest.mark.parametrize("tls", [False, True])
async def test_a_passive_relay_reads_no_request(tmp_path: Path, tls: bool) -> None:
    relay, server, client, _ = await _through_relay(tmp_path, tls=tls)
    try:
        client.send_user((REQUEST, 1, "generate", (MARKER_TEXT,), {}, RequestMeta("req-1")))
        for _ in range(500):
            if server.messages:
                break
            await asyncio.sleep(0.01)
        assert server.messages and server.messages[0][3] == (MARKER_TEXT,)
        seen = bytes(relay.captured)
        readable = [s for s in (MARKER_TEXT.encode(), b"generate", b"RequestMeta", b"shoal.runtime.wire")
                    if s in seen]
        if tls:
            assert readable == []
        else:  # what TLS hides: the request, and the pickle's class names, in the clear
            assert len(readable) == 4
    finally:
        client.close()
        relay.close()
        assert server.server is not None
        server.server.close()


async def test_tls_refuses_plain_clients_and_other_cas(tmp_path: Path) -> None:
    ip, secret = _ip(), os.urandom(32)
    pod, stranger = tls_dir(tmp_path, "app"), tls_dir(tmp_path, "other")
    server = Server()
    port = await server.start(ip, secret, pod)
    try:
        # Right secret, no TLS: the server waits for a TLS hello that never comes, then drops it.
        with pytest.raises((TimeoutError, OSError)):
            await connect_tcp(ip, port, secret, timeout=1.5)
        # Right secret, a certificate of another application's CA: refused in TLS.
        with pytest.raises(OSError):
            await connect_tcp(ip, port, secret, timeout=5, tls=stranger.client)
        # The pod's own certificate: in.
        ok = await connect_tcp(ip, port, secret, timeout=5, tls=pod.client)
        ok.close()
        # A server whose certificate the client's CA did not sign is refused by the client.
        other = Server()
        other_port = await other.start(ip, secret, stranger)
        with pytest.raises(OSError):
            await connect_tcp(ip, other_port, secret, timeout=5, tls=pod.client)
        assert other.server is not None
        other.server.close()
    finally:
        assert server.server is not None
        server.server.close()
    assert server.messages == []


# ---- rotation ------------------------------------------------------------------------------


@pytest.mark.parametrize(("server_keys", "client_keys"), [
    (("old",), ("new", "old")),  # a new pod calls a pod not yet rolled
    (("new", "old"), ("old",)),  # a pod not yet rolled calls a new one
    (("new", "old"), ("new", "old")),
    (("new",), ("new", "old")),  # after the previous secret is dropped
])
async def test_rotation_overlap_connects_both_ways(tmp_path: Path, server_keys: tuple[str, ...],
                                                   client_keys: tuple[str, ...]) -> None:
    keys = {"old": os.urandom(32), "new": os.urandom(32)}
    ip, pod = _ip(), tls_dir(tmp_path)
    server = Server()
    port = await server.start(ip, tuple(keys[k] for k in server_keys), pod)
    try:
        client = await connect_tcp(ip, port, [keys[k] for k in client_keys], timeout=5, tls=pod.client)
        # The client's primary wins when the server has it.
        chosen = "new" if "new" in server_keys and client_keys[0] == "new" else "old"
        assert client._chosen == keys[chosen]
        client.send(("after rotation",))
        for _ in range(500):
            if server.messages:
                break
            await asyncio.sleep(0.01)
        assert server.messages == [("after rotation",)]
        client.close()
    finally:
        assert server.server is not None
        server.server.close()


async def test_disjoint_secrets_are_refused(tmp_path: Path) -> None:
    ip, pod = _ip(), tls_dir(tmp_path)
    server = Server()
    port = await server.start(ip, (os.urandom(32), os.urandom(32)), pod)
    try:
        with pytest.raises((AuthError, ConnectionError)) as e:
            await connect_tcp(ip, port, [os.urandom(32), os.urandom(32)], timeout=5, tls=pod.client)
        assert "accepts none of this side's RPC secrets" in str(e.value)
    finally:
        assert server.server is not None
        server.server.close()
    assert server.messages == []


async def test_handshake_stays_tiny_and_names_no_secret() -> None:
    """The hello is a nonce and 8-byte ids (not the secrets), and frames beyond its bound are
    refused unread; at most a few secrets at once; no empty or repeated ones."""
    ip, a, b = _ip(), os.urandom(32), os.urandom(32)
    server = Server()
    port = await server.start(ip, (a, b), None)
    try:
        reader, writer = await asyncio.open_connection(ip, port)
        (size,) = struct.unpack(">I", await reader.readexactly(4))
        hello = await reader.readexactly(size)
        assert size == 24 + 2 * 8 and hello[24:] == key_id(a) + key_id(b)
        assert a not in hello and b not in hello
        writer.write(struct.pack(">I", 65) + b"x" * 65)  # one byte over the largest handshake frame
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        assert server.server is not None
        server.server.close()
    with pytest.raises(ValueError, match="between 1 and 4"):
        secret_ring([os.urandom(32) for _ in range(5)])
    with pytest.raises(ValueError, match="twice"):
        secret_ring([a, a])
    with pytest.raises(ValueError, match="empty"):
        secret_ring([a, b""])


def test_missing_or_bad_tls_files_name_the_secret(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PodConfigError, match=r"no tls\.crt in .*Secret 'pipe-rpc-tls'"):
        PodTls(str(empty), "pipe-rpc-tls")
    bad = tmp_path / "bad"
    bad.mkdir()
    for key in (names.TLS_CERT_FILE, names.TLS_KEY_FILE, names.TLS_CA_FILE):
        (bad / key).write_text("not a PEM\n")
    with pytest.raises(PodConfigError, match=r"not a usable certificate and key.*'pipe-rpc-tls'"):
        PodTls(str(bad), "pipe-rpc-tls")


def test_renewed_certificate_is_reloaded(tmp_path: Path) -> None:
    pod = tls_dir(tmp_path)
    assert not pod.reload_if_changed()
    fresh = new_material("app", "default")
    for key, value in fresh.secret_data().items():
        (pod.dir / key).write_text(value + "\n")  # a different size: a change even within one mtime tick
    assert pod.reload_if_changed()
    (pod.dir / names.TLS_KEY_FILE).write_text("garbage\n")
    assert not pod.reload_if_changed()  # a bad file keeps the loaded certificate
