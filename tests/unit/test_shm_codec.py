"""Large user values through shared memory (shoal.runtime.shm), over real sockets in one process."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import mmap
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from shoal.runtime import shm, shm_pool
from shoal.runtime.wire import FramedProtocol, connect_tcp, connect_unix, serve_tcp, serve_unix

MB = 1 << 20


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="shoal-m", dir="/tmp")
    yield d
    shm.remove_dir(d)
    shutil.rmtree(d, ignore_errors=True)


def segments(sock_dir: str) -> list[str]:
    try:
        return os.listdir(shm.segment_dir(sock_dir))
    except FileNotFoundError:
        return []


async def until(cond: Any, timeout: float = 10.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.01)
    return bool(cond())


@dataclass
class Pair:
    """A server that echoes every user message back, and a client connected to it."""

    client: FramedProtocol
    server: asyncio.AbstractServer
    replies: asyncio.Queue[Any]
    received: list[Any] = field(default_factory=list)
    server_side: list[FramedProtocol] = field(default_factory=list)

    async def round_trip(self, msg: Any) -> Any:
        self.client.send_user(msg)
        return await asyncio.wait_for(self.replies.get(), 30)


@contextlib.asynccontextmanager
async def _pair(connect: Any, serve: Any, echo: bool = True) -> AsyncIterator[Pair]:
    replies: asyncio.Queue[Any] = asyncio.Queue()
    received: list[Any] = []
    sides: list[FramedProtocol] = []

    def on_message(p: FramedProtocol, m: Any) -> None:
        received.append(m)
        if echo:
            p.send_user(m)

    def on_connect(p: FramedProtocol) -> None:
        sides.append(p)
        p.on_message = on_message

    secret = os.urandom(32)
    server = await serve(secret, on_connect)
    client = await connect(secret, lambda p, m: replies.put_nowait(m))
    pair = Pair(client, server, replies, received, sides)
    try:
        yield pair
    finally:
        client.close()
        server.close()


@pytest.fixture
async def unix_pair(sock_dir: str) -> AsyncIterator[Pair]:
    path = os.path.join(sock_dir, "s.sock")
    async with _pair(lambda s, cb: connect_unix(path, s, cb), lambda s, cb: serve_unix(path, s, cb)) as pair:
        yield pair


def _mapped(array: np.ndarray) -> bool:
    """Whether ``array``'s memory is a mapping (it aliases a shared-memory segment)."""
    base: Any = array
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        if isinstance(base, ctypes.Array):  # a pooled segment's per-message exporter
            base = next(iter(base._objects.values()))
            continue
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    return False


def fresh_segments(sock_dir: str) -> list[str]:
    """The segments not in a pool (pooled ones live as long as their connection)."""
    return [n for n in segments(sock_dir) if "-p" not in n]


def pooled_segments(sock_dir: str) -> list[str]:
    return [n for n in segments(sock_dir) if "-p" in n]


# ---- the threshold -------------------------------------------------------------------------------


def test_threshold_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(shm.THRESHOLD_ENV, raising=False)
    assert shm.threshold() == shm.DEFAULT_THRESHOLD == MB
    monkeypatch.setenv(shm.THRESHOLD_ENV, "0")
    assert shm.threshold() == 0
    monkeypatch.setenv(shm.THRESHOLD_ENV, "4096")
    assert shm.threshold() == 4096
    for bad in ("1MB", "-1", "1.5"):
        monkeypatch.setenv(shm.THRESHOLD_ENV, bad)
        with pytest.raises(ValueError, match=shm.THRESHOLD_ENV):
            shm.threshold()


# ---- the codec -----------------------------------------------------------------------------------


def test_small_messages_are_plain_pickles() -> None:
    msg = (0, 1, "add", (5, np.arange(10)), {"x": b"small"}, None)
    head, raws = shm.encode(msg, MB)
    assert raws == []
    got = pickle.loads(head)
    assert got[:3] == msg[:3] and np.array_equal(got[3][1], msg[3][1]) and got[4] == msg[4]


def test_buffers_below_the_threshold_stay_in_band() -> None:
    array = np.ones(200_000)  # 1.6 MB: out of band at a 1 MiB threshold, in band at 2 MiB
    head, raws = shm.encode((1, 2, array), 2 * MB)
    assert raws == [] and len(head) > array.nbytes
    assert np.array_equal(pickle.loads(head)[2], array)
    head, raws = shm.encode((1, 2, array), MB)
    assert [r.nbytes for r in raws] == [array.nbytes] and len(head) < 1000


def test_tensors_and_bytes_go_out_of_band() -> None:
    t = torch.arange(MB // 4, dtype=torch.float32)
    bf = torch.ones(MB, dtype=torch.bfloat16)
    data = b"x" * MB
    msg = (0, 1, "m", (t, data), {"b": bytearray(MB), "bf": bf}, None)
    head, raws = shm.encode(msg, MB)
    assert sorted(r.nbytes for r in raws) == [MB, MB, MB, 2 * MB]
    got = pickle.loads(head, buffers=[bytearray(r) for r in raws])
    assert torch.equal(got[3][0], t) and got[3][1] == data and type(got[3][1]) is bytes
    assert type(got[4]["b"]) is bytearray and got[4]["b"] == bytearray(MB)
    assert got[4]["bf"].dtype == torch.bfloat16 and torch.equal(got[4]["bf"], bf)


def test_tensors_that_need_their_own_pickling_keep_it() -> None:
    grad = torch.ones(MB // 4, requires_grad=True)
    head, raws = shm.encode((0, 1, grad), 1)
    assert raws == []
    got = pickle.loads(head)[2]
    assert got.requires_grad and torch.equal(got.detach(), grad.detach())


# ---- over a Unix socket --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [MB, 10 * MB, 100 * MB])
async def test_numpy_round_trip_through_shared_memory(unix_pair: Pair, sock_dir: str, size: int) -> None:
    before = shm.stats()
    array = np.random.default_rng(0).random(size // 8)
    got = await unix_pair.round_trip((1, 7, array))
    assert got[:2] == (1, 7) and np.array_equal(got[2], array)
    received = unix_pair.received[0][2]
    # Zero-copy: the replica's array aliases the mapping; it is writable (the sender's is not changed).
    assert _mapped(received) and _mapped(got[2]) and got[2].flags.writeable
    got[2][0] = -1.0
    assert array[0] != -1.0
    after = shm.stats()
    assert after["segments_sent"] - before["segments_sent"] == 2
    assert after["pooled_sent"] - before["pooled_sent"] == 2
    assert after["segments_received"] - before["segments_received"] == 2
    assert fresh_segments(sock_dir) == [] and len(pooled_segments(sock_dir)) == 2  # one per direction
    assert unix_pair.client.shm is not None and await until(lambda: not unix_pair.client.shm._pending)


async def test_segment_directory_is_private(unix_pair: Pair, sock_dir: str) -> None:
    await unix_pair.round_trip(np.zeros(MB))
    path = shm.segment_dir(sock_dir)
    assert path.startswith(f"{shm.SHM_ROOT}/shoal-{os.getuid()}/")
    for d in (path, os.path.dirname(path)):
        st = os.lstat(d)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.getuid()


async def test_mixed_small_and_large_values(unix_pair: Pair) -> None:
    big = np.arange(2 * MB // 8, dtype=np.int64)
    tensor = torch.randn(MB)
    msg = (0, 3, "f", (1, "two", big, b"y" * (3 * MB)), {"t": tensor, "small": np.arange(3), "s": b"s"}, None)
    got = await unix_pair.round_trip(msg)
    assert got[:3] == (0, 3, "f") and got[3][:2] == (1, "two") and np.array_equal(got[3][2], big)
    assert got[3][3] == b"y" * (3 * MB) and torch.equal(got[4]["t"], tensor)
    assert np.array_equal(got[4]["small"], np.arange(3)) and got[4]["s"] == b"s"


async def test_pooled_segment_is_reused_once_the_receiver_lets_go(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s.sock")
    async with _pair(lambda s, cb: connect_unix(path, s, cb), lambda s, cb: serve_unix(path, s, cb),
                     echo=False) as pair:
        assert pair.client.shm is not None
        pool = pair.client.shm._pool
        before = shm.stats()
        pair.client.send_user(np.full(MB, 1.0))
        assert await until(lambda: len(pair.received) == 1)
        pair.client.send_user(np.full(MB, 2.0))  # the first is still held: another segment
        assert await until(lambda: len(pair.received) == 2)
        assert len(pooled_segments(sock_dir)) == 2 and len(pool.names(busy=True)) == 2
        assert np.all(pair.received[0] == 1.0) and np.all(pair.received[1] == 2.0)
        kept = pair.received[1]
        pair.received.clear()
        gc.collect()
        assert await until(lambda: len(pool.names(busy=True)) == 1)  # the first was let go
        pair.client.send_user(np.full(MB, 3.0))
        assert await until(lambda: len(pair.received) == 1)
        assert np.all(pair.received[0] == 3.0) and np.all(kept == 2.0)  # the held array is untouched
        assert len(pooled_segments(sock_dir)) == 2
        assert shm.stats()["pooled_sent"] - before["pooled_sent"] == 3
    assert await until(lambda: segments(sock_dir) == [])  # the pool goes with its connection


async def test_pooled_segment_let_go_in_another_thread(sock_dir: str) -> None:
    """A replica's sync methods run in threads: the last array can go there (the ack goes from the loop)."""
    path = os.path.join(sock_dir, "s.sock")
    async with _pair(lambda s, cb: connect_unix(path, s, cb), lambda s, cb: serve_unix(path, s, cb),
                     echo=False) as pair:
        assert pair.client.shm is not None
        pool = pair.client.shm._pool
        pair.client.send_user([np.full(MB, 5.0)])
        assert await until(lambda: len(pair.received) == 1)
        holder = [pair.received.pop()]
        assert pool.names(busy=True) and holder[0][0][0] == 5.0

        def drop() -> None:
            holder[0][0][:] = 6.0  # written in place: shared with nobody who reads it
            holder.clear()
            gc.collect()

        await asyncio.get_running_loop().run_in_executor(None, drop)
        assert await until(lambda: not pool.names(busy=True))
        pair.client.send_user([np.full(MB, 7.0)])
        assert await until(lambda: len(pair.received) == 1)
        assert np.all(pair.received[0][0] == 7.0) and len(pooled_segments(sock_dir)) == 1


async def test_pool_budget_bounds_the_pool(sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    held = shm_pool.pooled_bytes()  # by pools of connections other tests left open
    monkeypatch.setenv(shm_pool.POOL_ENV, str(held + 3 * MB))
    path = os.path.join(sock_dir, "s.sock")
    async with _pair(lambda s, cb: connect_unix(path, s, cb), lambda s, cb: serve_unix(path, s, cb),
                     echo=False) as pair:
        before = shm.stats()
        for i in range(3):
            pair.client.send_user(np.full(2 * MB // 8, float(i)))
        assert await until(lambda: len(pair.received) == 3)
        assert [float(a[0]) for a in pair.received] == [0.0, 1.0, 2.0]
        assert shm.stats()["pooled_sent"] - before["pooled_sent"] == 1  # then no room: fresh segments
        assert shm_pool.pooled_bytes() <= held + 3 * MB and len(pooled_segments(sock_dir)) == 1
        monkeypatch.setenv(shm_pool.POOL_ENV, "0")
        pair.client.send_user(np.ones(2 * MB // 8))
        assert await until(lambda: len(pair.received) == 4)
        assert shm.stats()["pooled_sent"] - before["pooled_sent"] == 1
    monkeypatch.setenv(shm_pool.POOL_ENV, "much")
    with pytest.raises(ValueError, match=shm_pool.POOL_ENV):
        shm.prepare(sock_dir)


def test_size_classes() -> None:
    assert shm_pool.size_class(1) == MB and shm_pool.size_class(MB + 1) == MB + MB // 4
    assert shm_pool.size_class(100_000_000) == 96 * MB and shm_pool.size_class(101 * MB) == 112 * MB
    assert shm_pool.size_class(10 * MB) == 10 * MB


async def test_threshold_zero_keeps_everything_on_the_socket(
        unix_pair: Pair, sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shm.THRESHOLD_ENV, "0")
    before = shm.stats()
    array = np.ones(4 * MB // 8)
    got = await unix_pair.round_trip((1, 1, array))
    assert np.array_equal(got[2], array) and not _mapped(got[2])
    assert shm.stats() == before and segments(sock_dir) == []


async def test_no_usable_directory_falls_back_to_the_socket(
        unix_pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "SHM_ROOT", "/nonexistent-shm-root")
    before = shm.stats()
    array = np.ones(2 * MB // 8)
    got = await unix_pair.round_trip((1, 1, array))
    assert np.array_equal(got[2], array)
    after = shm.stats()
    assert after["fallbacks"] - before["fallbacks"] == 2 and after["segments_sent"] == before["segments_sent"]


async def test_unread_segment_is_removed_when_the_connection_ends(
        sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "UNACKED_GRACE_S", 0.05)
    path = os.path.join(sock_dir, "s.sock")
    async with _pair(lambda s, cb: connect_unix(path, s, cb), lambda s, cb: serve_unix(path, s, cb)) as pair:
        sides = pair.server_side
        assert await until(lambda: bool(sides))
        server_side = sides[0]
        assert server_side.transport is not None
        server_side.transport.pause_reading()  # the receiver never reads the frame
        pair.client.send_user((1, 1, np.ones(MB)))
        assert len(segments(sock_dir)) == 1
        server_side.transport.abort()
        assert await until(lambda: segments(sock_dir) == [])
        assert sides[0].closed and pair.received == []


@pytest.mark.parametrize("write", ["shm._write_segment(", "shm._write_pooled(shm.SendPool(), "])
async def test_segments_of_a_killed_peer_are_removed(sock_dir: str, write: str) -> None:
    """A peer killed while it wrote a segment (never sent) leaves nothing once its connection ends."""
    path = os.path.join(sock_dir, "s.sock")
    lost: list[int] = []

    def on_connect(p: FramedProtocol) -> None:
        p.on_close = lambda q, e: lost.append(1)

    server = await serve_unix(path, b"k" * 32, on_connect)
    child = textwrap.dedent(f"""
        import asyncio, sys
        import numpy as np
        from shoal.runtime import shm, shm_pool
        from shoal.runtime.wire import connect_unix
        async def main():
            proto = await connect_unix({path!r}, b"k" * 32)
            {write}shm.segment_dir({sock_dir!r}), [memoryview(np.ones(1000)).cast("B")])
            print("written", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline), 30)
        assert line.strip() == b"written"
        assert [n.split("-")[0] for n in segments(sock_dir)] == [str(proc.pid)]
        os.kill(proc.pid, signal.SIGKILL)
        assert await until(lambda: bool(lost))
        assert await until(lambda: segments(sock_dir) == [])
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        server.close()


def test_prepare_and_remove_dir(sock_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root_mode = os.stat(shm.SHM_ROOT).st_mode
    directory = shm.segment_dir(sock_dir)
    shm._write_segment(directory, [memoryview(b"a" * 100)])  # this process: alive, kept
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(os.path.join(directory, f"{int(dead.stdout)}-1-0123abcd"), "wb") as f:
        f.write(b"left by a process that is gone")
    shm.prepare(sock_dir)
    assert [n.split("-")[0] for n in os.listdir(directory)] == [str(os.getpid())]
    monkeypatch.setenv(shm.THRESHOLD_ENV, "lots")
    with pytest.raises(ValueError, match=shm.THRESHOLD_ENV):
        shm.prepare(sock_dir)
    shm.remove_dir(sock_dir)
    assert not os.path.exists(directory)
    # Only the instance's own directory went; /dev/shm (root's, shared) is untouched.
    assert os.stat(shm.SHM_ROOT).st_mode == root_mode and os.path.isdir(os.path.dirname(directory))


async def test_malformed_segment_frame_closes_the_connection(unix_pair: Pair, sock_dir: str) -> None:
    outside = os.path.join(sock_dir, "victim")
    with open(outside, "wb") as f:
        f.write(b"keep me")
    name = b"../../victim"
    unix_pair.client.send_bytes(bytes([shm.SHM, len(name)]) + (0).to_bytes(4, "big") + name + pickle.dumps(1))
    assert await until(lambda: unix_pair.client.closed)
    assert os.path.exists(outside)


# ---- over TCP (Kubernetes pods): always the socket ------------------------------------------------


async def test_tcp_connections_never_use_shared_memory() -> None:
    got: list[Any] = []
    sides: list[FramedProtocol] = []

    def on_connect(p: FramedProtocol) -> None:
        sides.append(p)
        p.on_message = lambda q, m: (got.append(m), q.send_user(m))

    secret = os.urandom(32)
    server = await serve_tcp("127.0.0.1", 0, secret, on_connect)
    port = server.sockets[0].getsockname()[1]
    replies: asyncio.Queue[Any] = asyncio.Queue()
    client = await connect_tcp("127.0.0.1", port, secret, lambda p, m: replies.put_nowait(m))
    try:
        before = shm.stats()
        array = np.arange(3 * MB // 8, dtype=np.float64)
        client.send_user((1, 2, array))
        reply = await asyncio.wait_for(replies.get(), 30)
        assert np.array_equal(reply[2], array) and client.shm is None and sides[0].shm is None
        assert shm.stats() == before
        # A shared-memory frame on a TCP connection is refused: the connection closes.
        client.send_bytes(bytes([shm.SHM, 3]) + (0).to_bytes(4, "big") + b"1-1" + pickle.dumps(1))
        assert await until(lambda: client.closed)
    finally:
        client.close()
        server.close()
