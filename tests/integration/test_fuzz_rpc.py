"""Fuzzing the internal RPC sockets: the controller's and a replica's Unix sockets.

Unauthenticated peers send random bytes, frames of any declared length (up to 4 GiB),
truncated frames, handshakes made with a wrong secret, and pickles that would create a file
if anything unpickled them. Every connection must be closed by the server without anything
being unpickled, and the instance must go on serving, with no process replaced. Authenticated
peers sending undecodable or ill-shaped messages must not bring a process down either.
Deterministic (``derandomize=True``) and bounded (fixed example counts, 2 s socket timeouts).
"""

from __future__ import annotations

import asyncio
import glob
import hashlib
import hmac
import os
import pickle
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator

import httpx
import pytest
from conftest import Instance, child_pids
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal import serve
from shoal.runtime.wire import AuthError, FramedProtocol, connect_unix

FUZZ = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
FRAME = struct.Struct(">I")


# Two slots: a malformed request that leaked one (as it once did) would show as a hang.
@serve.deployment(max_ongoing_requests=2)
class Echo:
    def ping(self, x: int) -> int:
        return x + 1

    def __call__(self, request: object) -> str:
        return "pong"


@pytest.fixture
def marker() -> Iterator[str]:
    """A file path that only unpickling one of the planted pickles would create."""
    d = tempfile.mkdtemp(prefix="p", dir="/tmp")
    yield os.path.join(d, "m")
    shutil.rmtree(d, ignore_errors=True)


def planted_pickles(marker: str) -> list[bytes]:
    """Pickles whose unpickling calls ``open(marker, "w")``: one padded to exactly the size of a
    handshake frame (64 bytes), one as protocol 5 with a longer, harmless-looking payload."""
    small = f"cbuiltins\nopen\n(V{marker}\nVw\ntR.".encode()
    assert len(small) <= 64
    padded = small + b"." * (64 - len(small))

    class Plant:
        def __reduce__(self) -> tuple[object, ...]:
            return (open, (marker, "w"))

    big = pickle.dumps([Plant(), "x" * 100], protocol=5)
    return [padded, big]


def exchange(path: str, payload: bytes, timeout: float = 2.0) -> bytes:
    """Connect, read the server's nonce frame, send ``payload``, end our side, read until the
    server hangs up. Raises if the server keeps the connection open past ``timeout``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        got = b""
        while len(got) < 36:
            chunk = s.recv(36 - len(got))
            if not chunk:
                break
            got += chunk
        assert got[:4] == FRAME.pack(32), got
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return b""  # refused while we were still sending
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


def forged_handshake(nonce_s: bytes, secret: bytes) -> bytes:
    """The client's second handshake frame, made with ``secret``."""
    mac = hmac.new(secret, b"c" + nonce_s, hashlib.sha256).digest()
    return FRAME.pack(64) + os.urandom(32) + mac


def attack_with_wrong_secret(path: str, then: bytes) -> bytes:
    """A well-formed handshake with a wrong secret, followed by ``then`` in the same write."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        s.connect(path)
        header = s.recv(36, socket.MSG_WAITALL)
        try:
            s.sendall(forged_handshake(header[4:], os.urandom(32)) + then)
        except (BrokenPipeError, ConnectionResetError):
            return b""
        try:
            return s.recv(65536)
        except ConnectionResetError:
            return b""


frames = st.builds(
    lambda size, body: FRAME.pack(size) + body,
    st.sampled_from([0, 1, 31, 32, 63, 64, 65, 96, 4096, 1 << 20, (1 << 31) - 1, 1 << 31, (1 << 32) - 1])
    | st.integers(0, (1 << 32) - 1),
    st.binary(max_size=200),
)
garbage = st.binary(max_size=400) | frames | st.lists(frames, min_size=2, max_size=4).map(b"".join)


def _targets(run_dir: str) -> dict[str, str]:
    replicas = sorted(glob.glob(os.path.join(run_dir, "r-*.sock")))
    assert replicas, os.listdir(run_dir)
    return {"controller": os.path.join(run_dir, "controller.sock"), "replica": replicas[0]}


def _still_serving(instance: Instance, handle: serve.DeploymentHandle) -> None:
    assert handle.ping.remote(41).result(timeout_s=10) == 42
    assert httpx.get(instance.url + "/", timeout=10).text == "pong"
    assert serve.status().applications["default"].status == "RUNNING"


def test_unauthenticated_peers_are_refused_and_nothing_is_unpickled(instance: Instance, marker: str) -> None:
    handle = serve.run(Echo.bind())
    pids = child_pids()  # the proxy, the replica and a spare
    targets = _targets(instance.run_dir)
    plants = planted_pickles(marker)
    sent = {name: 0 for name in targets}

    curated = [
        b"", b"\x00", FRAME.pack(0xFFFFFFFF), FRAME.pack(1 << 31) + b"x" * 1000, FRAME.pack(64),
        FRAME.pack(64) + b"a" * 10,  # truncated handshake frame
        FRAME.pack(64) + b"a" * 64,  # a handshake frame with a wrong MAC
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"\x80\x05\x95" + os.urandom(50),
        *(FRAME.pack(len(p)) + p for p in plants), *plants,
    ]
    for name, path in targets.items():
        for payload in curated:
            exchange(path, payload)
            sent[name] += 1
            assert attack_with_wrong_secret(path, payload) == b""
            sent[name] += 1

    @FUZZ
    @given(garbage)
    def fuzz(payload: bytes) -> None:
        for name, path in targets.items():
            exchange(path, payload)
            sent[name] += 1

    fuzz()

    # Many half-open connections at once, then dropped.
    for path in targets.values():
        socks = []
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.sendall(FRAME.pack(64) + b"z" * 20)
            socks.append(s)
        for s in socks:
            s.close()

    print(f"\nRPC fuzzing (unauthenticated): {sum(sent.values())} connections {sent}")
    assert not os.path.exists(marker), "a planted pickle was unpickled"
    _still_serving(instance, handle)
    assert child_pids() == pids, "a process died or was replaced"


def test_a_wrong_secret_fails_the_handshake(instance: Instance) -> None:
    serve.run(Echo.bind())

    async def attempt(path: str) -> None:
        with pytest.raises((AuthError, ConnectionError)):
            await connect_unix(path, os.urandom(32), timeout=2)

    for path in _targets(instance.run_dir).values():
        asyncio.run(attempt(path))


def test_authenticated_garbage_does_not_bring_a_process_down(instance: Instance) -> None:
    handle = serve.run(Echo.bind())
    pids = child_pids()  # the proxy, the replica and a spare
    with open(os.path.join(instance.run_dir, "secret"), "rb") as f:
        secret = f.read()
    odd_messages = [None, 42, "hello", (), (0,), (0, 1), (0, 1, "ping"), (99, 1, 2, 3), (6, 12345), {"a": 1},
                    [1, 2, 3], b"bytes"]
    sent = 0

    async def poke(path: str, frames: list[bytes]) -> None:
        nonlocal sent
        closed = asyncio.Event()
        proto: FramedProtocol = await connect_unix(path, secret, on_close=lambda p, e: closed.set(), timeout=5)
        for payload in frames:
            if proto.closed:
                break
            proto.send_bytes(payload)
            sent += 1
        await asyncio.sleep(0.05)
        proto.close()

    async def run_all() -> None:
        for path in _targets(instance.run_dir).values():
            await poke(path, [pickle.dumps(m) for m in odd_messages])
            for junk in (b"", b"\x00", os.urandom(16), b"\x80\x05junk", b"\x80\x05\x95\xff\xff\xff\xff"):
                await poke(path, [junk])  # undecodable: the server drops the connection

    asyncio.run(run_all())
    print(f"\nRPC fuzzing (authenticated): {sent} frames")
    _still_serving(instance, handle)
    assert child_pids() == pids, "a process died or was replaced"
