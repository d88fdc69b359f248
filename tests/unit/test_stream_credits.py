"""Per-stream flow control (shoal.runtime.flow): the pure parts with fakes, then a replica core
and a router connection over a real Unix socket in this process."""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shoal.context import ReplicaContext
from shoal.runtime.callable import UserCallable
from shoal.runtime.flow import CREDIT_BATCH_BYTES, STREAM_WINDOW_BYTES, CreditCounter, SendWindow, StreamSink
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.replica.ports import UnixTransport
from shoal.runtime.router import ReplicaConnection, Router
from shoal.runtime.wire import END, ERR, ITEM, Membership, ReplicaEndpoint, RequestMeta, new_secret

KIB = 1024
CHUNK = 64 * KIB


# ---- the pure parts --------------------------------------------------------------------------


async def test_a_window_sends_one_message_of_any_size_then_waits_for_credit() -> None:
    w = SendWindow(window=100, batch=25, stall_s=10)
    await w.reserve(1000)  # nothing unacknowledged: always at least one message
    assert w.unacked == 1000 and not w.fits(1)
    waiting = asyncio.ensure_future(w.reserve(10))
    await asyncio.sleep(0)
    assert not waiting.done()
    w.credit(900)  # 100 unacknowledged: a full window
    await asyncio.sleep(0)
    assert not waiting.done()
    w.credit(80)  # 20 < one batch: the producer may go on, whatever the size
    await waiting
    assert w.unacked == 30 and w.fits(70) and w.fits(1) is True


async def test_within_the_window_reserving_never_waits() -> None:
    w = SendWindow(window=100, batch=25)
    for _ in range(10):
        await w.reserve(10)
    assert w.unacked == 100 and not w.fits(1)


async def test_no_credit_for_the_stall_timeout_gives_up() -> None:
    w = SendWindow(window=10, batch=5, stall_s=0.05)
    await w.reserve(10)
    with pytest.raises(TimeoutError):
        await w.reserve(10)
    assert w.stalled


async def test_a_cancelled_wait_ends_without_a_stall() -> None:
    w = SendWindow(window=10, batch=5, stall_s=10)
    await w.reserve(10)
    waiting = asyncio.ensure_future(w.reserve(10))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not w.stalled and w.waiter is None


def test_credit_is_returned_in_batches() -> None:
    sent: list[int] = []
    c = CreditCounter(sent.append, batch=100)
    for n in (30, 30, 30):
        c.took(n)
    assert sent == []
    c.took(30)
    assert sent == [120] and c.taken == 0


async def test_the_sink_returns_credit_as_items_are_taken_and_tells_the_end() -> None:
    sent: list[int] = []
    ended: list[bool] = []
    sink = StreamSink()
    sink.credits = CreditCounter(sent.append, batch=100)
    sink.on_end = lambda: ended.append(True)
    sink.put_nowait((ITEM, "a"), 60)
    sink.put_nowait((ITEM, "b"), 60)
    sink.end((END, None))
    assert ended == [True] and sent == []  # the end is told on arrival, before it is taken
    assert await sink.get() == (ITEM, "a") and sent == []
    assert await sink.get() == (ITEM, "b") and sent == [120]
    assert await sink.get() == (END, None)


@pytest.mark.parametrize("seed", range(5))
async def test_any_item_sizes_flow_through_without_a_deadlock(seed: int) -> None:
    """A producer and a consumer joined by a window: every item arrives, the consumer's queue
    never holds more than a window (plus one message), whatever the sizes."""
    rng = random.Random(seed)
    window, batch = 1000, 250
    sizes = [rng.choice([1, 10, 100, 240, 260, 700, 999, 1000, 1500, 5000]) for _ in range(300)]
    w = SendWindow(window=window, batch=batch, stall_s=5)
    sink = StreamSink()
    sink.credits = CreditCounter(lambda n: asyncio.get_running_loop().call_soon(w.credit, n), batch=batch)
    most = [0]

    async def produce() -> None:
        for i, n in enumerate(sizes):
            await w.reserve(n)
            sink.put_nowait((ITEM, i), n)
            most[0] = max(most[0], sum(x[2] for x in sink.items))
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        sink.end((END, None))

    async def consume() -> list[int]:
        got = []
        while True:
            kind, value = await sink.get()
            if kind == END:
                return got
            got.append(value)
            if rng.random() < 0.5:
                await asyncio.sleep(0)

    got, _ = await asyncio.wait_for(asyncio.gather(consume(), produce()), 10)
    assert got == list(range(len(sizes)))
    assert most[0] <= window + max(sizes)


# ---- a replica core and a router connection over a real socket -------------------------------


class Producer:
    def __init__(self) -> None:
        self.yielded: dict[str, int] = {}
        self.running: set[str] = set()

    async def chunks(self, name: str, count: int, size: int = CHUNK) -> AsyncIterator[bytes]:
        self.running.add(name)
        try:
            for _ in range(count):
                yield b"x" * size
                self.yielded[name] = self.yielded.get(name, 0) + size
        finally:
            self.running.discard(name)

    async def __call__(self, request: Any) -> Any:  # an HTTP response streamed in 64 KiB pieces
        from starlette.responses import StreamingResponse

        async def body() -> AsyncIterator[bytes]:
            self.running.add("http")
            try:
                for _ in range(1000):
                    yield b"y" * CHUNK
                    self.yielded["http"] = self.yielded.get("http", 0) + CHUNK
            finally:
                self.running.discard("http")

        return StreamingResponse(body())


class Rig:
    def __init__(self, core: ReplicaCore, producer: Producer, conn: ReplicaConnection, path: str,
                 secret: bytes) -> None:
        self.core, self.producer, self.conn, self.path, self.secret = core, producer, conn, path, secret

    def stream(self, name: str, count: int) -> tuple[int, StreamSink]:
        return self.conn.send_stream("chunks", (name, count), {}, RequestMeta(request_id=name, stream=True))


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    d = tempfile.mkdtemp(prefix="shoal-c", dir="/tmp")
    path, secret = f"{d}/r.sock", new_secret()
    core = ReplicaCore(channel=None, routers=None, replica_id="r1")  # type: ignore[arg-type]
    core.slots.limit = 10
    user = UserCallable(Producer, (), {}, is_function=False, context=ReplicaContext("app", "dep", "r1"))
    await user.initialize(None)
    core.user = user
    await core.listen(UnixTransport(path, secret))
    conn = ReplicaConnection(ReplicaEndpoint("r1", path, 10), secret)
    await conn.connect()
    yield Rig(core, user.instance, conn, path, secret)
    conn.close()
    assert core.server is not None
    core.server.close()
    for task in list(core.tasks.values()):
        task.cancel()
    await asyncio.sleep(0.01)


async def quiet(producer: Producer, name: str, for_s: float = 0.1, within_s: float = 5.0) -> int:
    """Wait until ``name`` has yielded nothing for ``for_s``; what it yielded by then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    last = -1
    while loop.time() < deadline:
        now = producer.yielded.get(name, 0)
        if now == last:
            return now
        last = now
        await asyncio.sleep(for_s)
    raise AssertionError(f"{name} kept producing: {last} bytes")


async def until(cond: Any, within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def drain(sink: StreamSink) -> Iterator[Any]:
    items = []
    while True:
        kind, value = await sink.get()
        if kind != ITEM:
            assert kind == END, value
            return iter(items)
        items.append(value)


async def test_a_stream_nobody_reads_stops_at_about_the_window_while_another_flows(rig: Rig) -> None:
    _, idle = rig.stream("idle", 10_000)  # 640 MB if nothing held it back
    await until(lambda: "idle" in rig.producer.running)
    produced = await quiet(rig.producer, "idle")
    # About a window unacknowledged (frames are a little larger than their 64 KiB), plus the
    # item in hand (yielded, waiting for room; counted once the generator resumes).
    assert STREAM_WINDOW_BYTES - 2 * CHUNK <= produced <= STREAM_WINDOW_BYTES + 2 * CHUNK, produced
    assert sum(x[2] for x in idle.items) <= STREAM_WINDOW_BYTES + CHUNK

    # A second stream on the same connection flows to its end (8 windows), the first stays put.
    _, busy = rig.stream("busy", 128)
    items = list(await drain(busy))
    assert len(items) == 128 and rig.producer.yielded["busy"] == 128 * CHUNK
    assert rig.producer.yielded["idle"] == produced

    # Reading the first one lets it go on.
    for _ in range(CREDIT_BATCH_BYTES // CHUNK + 1):
        await idle.get()
    await until(lambda: rig.producer.yielded["idle"] > produced)


async def test_a_cancelled_stream_releases_its_waiting_producer(rig: Rig) -> None:
    rid, _ = rig.stream("cancelled", 10_000)
    await until(lambda: "cancelled" in rig.producer.running)
    await quiet(rig.producer, "cancelled")
    assert rig.core.ongoing == 1 and len(rig.core.windows) == 1
    rig.conn.cancel(rid)
    await until(lambda: rig.core.ongoing == 0 and "cancelled" not in rig.producer.running)
    assert rig.core.windows == {}


async def test_a_closed_connection_releases_its_waiting_producers(rig: Rig) -> None:
    rig.stream("a", 10_000)
    rig.stream("b", 10_000)
    await until(lambda: {"a", "b"} <= rig.producer.running)
    await quiet(rig.producer, "a")
    assert rig.core.ongoing == 2
    rig.conn.close()
    await until(lambda: rig.core.ongoing == 0 and not rig.producer.running)
    assert rig.core.windows == {}


async def test_a_stalled_stream_is_cancelled_on_the_replica_and_logged(rig: Rig,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    rig.core.stream_stall_s = 0.2
    _, sink = rig.stream("stalled", 10_000)
    with caplog.at_level(logging.WARNING, logger="shoal.replica"):
        await until(lambda: "stalled" in rig.producer.running)
        await until(lambda: rig.core.ongoing == 0 and "stalled" not in rig.producer.running)
    assert any("stalled" in r.getMessage() and "took nothing" in r.getMessage() for r in caplog.records)
    await until(lambda: sink.items[-1][0] != ITEM)
    kinds = [x[0] for x in sink.items]
    assert kinds[-1] == ERR and set(kinds[:-1]) == {ITEM}
    assert isinstance(sink.items[-1][1], TimeoutError)


async def test_an_http_response_nobody_reads_stops_at_about_the_window(rig: Rig) -> None:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    _, sink = rig.conn.send_stream("__call__", (scope, b""), {}, RequestMeta(request_id="h", http=True))
    await until(lambda: "http" in rig.producer.running)
    produced = await quiet(rig.producer, "http")
    assert produced <= STREAM_WINDOW_BYTES + 3 * CHUNK, produced
    # Taken, it goes on to its end.
    total = 0
    while True:
        kind, value = await sink.get()
        if kind == END:
            break
        assert kind == ITEM
        total += sum(len(m.get("body", b"")) for m in value)
    assert total == 1000 * CHUNK


async def test_a_reserved_slot_is_used_by_the_stream_and_freed_when_the_replica_ends(rig: Rig) -> None:
    router = Router("app", "dep", rig.secret)
    router.update(Membership("app", "dep", 1, (ReplicaEndpoint("r1", rig.path, 10),)))
    try:
        reserved = await router.reserve()
        assert router.num_in_flight == 1
        reserved.release()
        reserved.release()  # twice: a no-op
        assert router.num_in_flight == 0

        # A long stream: in flight until its replica sends the end.
        reserved = await router.reserve()
        stream = router.stream("chunks", ("long", 64), {}, RequestMeta(request_id="l", stream=True), reserved)
        assert await stream.__anext__() == b"x" * CHUNK
        await quiet(rig.producer, "long")
        assert router.num_in_flight == 1
        reserved.release()  # taken by the stream: a no-op
        assert router.num_in_flight == 1
        assert len([item async for item in stream]) == 63 and router.num_in_flight == 0

        # A short one: once its end arrived, the slot counts as free before the items are taken.
        stream = router.stream("chunks", ("short", 3), {}, RequestMeta(request_id="s", stream=True))
        assert await stream.__anext__() == b"x" * CHUNK
        await until(lambda: router.num_in_flight == 0)
        assert len([item async for item in stream]) == 2 and router.num_in_flight == 0
    finally:
        router.close()
