"""Issue 15: the router keeps replicas it cannot reach or that stop answering, skips them,
and takes them back (reconnect with back-off; liveness probe). The decisions are tested
with a fake clock; the wiring with real Unix sockets and fake replicas."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from shoal.exceptions import ReplicaDiedError
from shoal.runtime import liveness, replica_connection
from shoal.runtime.liveness import Backoff, Probe
from shoal.runtime.router import Router
from shoal.runtime.wire import OK, PING, PONG, REQUEST, FramedProtocol, Membership, ReplicaEndpoint, RequestMeta

SECRET = b"s" * 32
# Bounds on how long a test waits for something that should happen (never a timing assertion).
PATIENCE_S = 10.0


# ---- the pure decisions ---------------------------------------------------------------------


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = Backoff(0.1, 5.0, jitter=0.0)
    assert [round(b.next(), 3) for _ in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    b.reset()
    assert b.next() == pytest.approx(0.1)


def test_backoff_jitter_stays_within_bounds() -> None:
    b = Backoff(1.0, 1.0, jitter=0.2, rng=random.Random(1))
    waits = [b.next() for _ in range(200)]
    assert all(0.8 <= w <= 1.2 for w in waits) and len(set(waits)) > 1


def test_backoff_defaults_are_the_reconnect_constants() -> None:
    b = Backoff(jitter=0.0)
    assert (b.first, b.most) == (liveness.RECONNECT_FIRST_S, liveness.RECONNECT_MAX_S)
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)


def test_probe_pings_only_after_silence_while_busy() -> None:
    p = Probe(after_s=1.0, deadline_s=1.0, retry=Backoff(0.5, 4.0, jitter=0.0))
    assert p.check(10.0, busy=False).next_at is None  # idle: nothing to watch
    p.busy(10.0)
    step = p.check(10.5, busy=True)
    assert not step.ping and step.next_at == 11.0
    p.heard(10.8)  # an answer moves the silence window
    assert not p.check(11.0, busy=True).ping
    step = p.check(11.8, busy=True)
    assert step.ping and step.next_at == pytest.approx(12.8) and not step.unresponsive


def test_probe_marks_unresponsive_once_and_reprobes_with_backoff() -> None:
    p = Probe(after_s=1.0, deadline_s=1.0, retry=Backoff(0.5, 4.0, jitter=0.0))
    p.busy(0.0)
    assert p.check(1.0, busy=True).ping
    assert not p.check(1.5, busy=True).unresponsive  # the ping's deadline is not up yet
    step = p.check(2.0, busy=True)
    assert step.unresponsive and p.unresponsive and step.next_at == pytest.approx(2.5)
    # Re-probed with back-off, even when nothing of ours is in flight any more.
    pings = []
    now = 2.5
    for _ in range(4):
        step = p.check(now, busy=False)
        assert step.ping and not step.unresponsive  # reported once per outage
        pings.append(now)
        step = p.check(now + 1.0, busy=False)
        assert not step.ping and step.next_at is not None
        now = step.next_at
    gaps = [round(b - a - 1.0, 3) for a, b in itertools.pairwise(pings)]
    assert gaps == [1.0, 2.0, 4.0]
    # Any frame clears it and resets the back-off.
    assert p.heard(now) and not p.unresponsive
    assert not p.heard(now + 0.1)
    assert p.retry.failures == 0


def test_probe_defaults_are_the_probe_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "PROBE_AFTER_S", 0.25)
    monkeypatch.setattr(liveness, "PROBE_DEADLINE_S", 0.5)
    p = Probe()
    assert (p.after_s, p.deadline_s) == (0.25, 0.5)


# ---- fake replicas on real Unix sockets -----------------------------------------------------


class _Silent(asyncio.Protocol):
    """Accepts a connection and never says anything: a replica whose loop is blocked."""

    def __init__(self, fake: FakeReplica) -> None:
        self.fake = fake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.fake.silent_open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake.silent_open -= 1
        self.fake.silent_closed += 1


class FakeReplica:
    """Answers every request with its name (method "hang": never) and every ping with a pong.

    Its first ``silent`` connections never complete the handshake; while ``frozen`` it
    holds every frame it gets and handles them when thawed.
    """

    def __init__(self, name: str, path: str, silent: int = 0) -> None:
        self.name = name
        self.path = path
        self.silent = silent
        self.silent_open = 0
        self.silent_closed = 0
        self.frozen = False
        self.held: list[tuple[FramedProtocol, Any]] = []
        self.conns: list[FramedProtocol] = []
        self.pings = 0
        self.server: asyncio.AbstractServer | None = None

    @property
    def endpoint(self) -> ReplicaEndpoint:
        return ReplicaEndpoint(self.name, self.path, 4)

    async def start(self) -> FakeReplica:
        def factory() -> asyncio.Protocol:
            if self.silent > 0:
                self.silent -= 1
                return _Silent(self)
            return FramedProtocol(SECRET, True, on_ready=self._on_connect)

        self.server = await asyncio.get_running_loop().create_unix_server(factory, self.path)
        return self

    def _on_connect(self, proto: FramedProtocol) -> None:
        self.conns.append(proto)
        proto.on_message = self._on_message

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        if self.frozen:
            self.held.append((proto, msg))
            return
        if msg[0] == PING:
            self.pings += 1
            proto.send((PONG, msg[1]))
        elif msg[0] == REQUEST and msg[2] != "hang":
            proto.send((OK, msg[1], self.name))

    def thaw(self) -> None:
        self.frozen = False
        held, self.held = self.held, []
        for proto, msg in held:
            if not proto.closed:
                self._on_message(proto, msg)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="shoal-l", dir="/tmp")  # short: Unix socket paths are limited
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short connect timeout and probe times, so that the tests take a second or two."""
    monkeypatch.setattr(replica_connection, "CONNECT_TIMEOUT_S", 0.3)
    monkeypatch.setattr(liveness, "PROBE_AFTER_S", 0.2)
    monkeypatch.setattr(liveness, "PROBE_DEADLINE_S", 0.2)
    monkeypatch.setattr(liveness, "PROBE_RETRY_FIRST_S", 0.1)
    monkeypatch.setattr(liveness, "PROBE_RETRY_MAX_S", 0.4)


@pytest.fixture
async def fakes(sock_dir: str) -> AsyncIterator[list[FakeReplica]]:
    made: list[FakeReplica] = []
    yield made
    for f in made:
        f.close()


async def _fake(fakes: list[FakeReplica], sock_dir: str, name: str, silent: int = 0) -> FakeReplica:
    fake = await FakeReplica(name, f"{sock_dir}/{name}.sock", silent).start()
    fakes.append(fake)
    return fake


def _router(*replicas: FakeReplica, epoch: int = 1) -> Router:
    r = Router("app", "dep", SECRET, rng=random.Random(0))
    r.update(Membership("app", "dep", epoch, tuple(f.endpoint for f in replicas)))
    return r


async def _call(r: Router, method: str = "m") -> Any:
    return await asyncio.wait_for(r.call(method, (), {}, RequestMeta("req")), PATIENCE_S)


async def _until(cond: Any, timeout: float = PATIENCE_S) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ---- reconnect ------------------------------------------------------------------------------


@pytest.mark.usefixtures("fast")
async def test_reconnects_after_a_failed_handshake(sock_dir: str, fakes: list[FakeReplica],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shoal.router")
    # Its first two connections never finish the handshake (its loop is blocked), then it works.
    fake = await _fake(fakes, sock_dir, "r0", silent=2)
    drops: list[str] = []
    r = _router(fake)
    r.on_drop = lambda rep: drops.append(rep.replica_id)
    try:
        # The only replica: the request waits for the reconnect, then is served.
        assert await _call(r) == "r0"
        assert r.num_replicas == 1 and r._slots["r0"].health.usable
        await _until(lambda: fake.silent_closed == 2 and fake.silent_open == 0)  # timed-out attempts closed
        warnings = [m for m in caplog.messages if "cannot be reached" in m]
        assert len(warnings) == 1 and "r0" in warnings[0], caplog.messages  # one per outage
        assert any("r0" in m and "reachable again" in m for m in caplog.messages), caplog.messages
        assert drops == ["r0"]  # on_drop: once per outage
    finally:
        r.close()


@pytest.mark.usefixtures("fast")
async def test_requests_go_to_the_other_replica_while_one_is_unreachable(
        sock_dir: str, fakes: list[FakeReplica]) -> None:
    blocked = await _fake(fakes, sock_dir, "r0", silent=1000)  # never completes a handshake
    good = await _fake(fakes, sock_dir, "r1")
    r = _router(blocked, good)
    try:
        answers = await asyncio.gather(*(_call(r) for _ in range(20)))
        assert set(answers) == {"r1"}
        assert r.num_replicas == 2  # kept, not forgotten
        slot = r._slots["r0"]
        await _until(lambda: slot.health.down)
        # Its loop runs again: the next reconnect attempt succeeds and it serves again.
        blocked.silent = 0
        await _until(lambda: slot.health.usable)
        answers = await asyncio.gather(*(_call(r) for _ in range(40)))
        assert "r0" in answers
    finally:
        r.close()


@pytest.mark.usefixtures("fast")
async def test_a_connection_that_dies_fails_its_requests_then_reconnects(
        sock_dir: str, fakes: list[FakeReplica]) -> None:
    fake = await _fake(fakes, sock_dir, "r0")
    r = _router(fake)
    try:
        assert await _call(r) == "r0"
        hanging = asyncio.ensure_future(r.call("hang", (), {}, RequestMeta("h")))
        await _until(lambda: r.num_in_flight == 1)
        fake.conns[0].close()
        with pytest.raises(ReplicaDiedError):
            await asyncio.wait_for(hanging, PATIENCE_S)
        # Membership still lists it: the router reconnects (the replica is still there).
        assert await _call(r) == "r0"
        assert len(fake.conns) == 2
    finally:
        r.close()


async def test_removed_replica_stops_reconnecting(sock_dir: str) -> None:
    r = Router("app", "dep", SECRET)
    r.update(Membership("app", "dep", 1, (ReplicaEndpoint("r0", f"{sock_dir}/none.sock", 2),)))
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(r.call("m", (), {}, RequestMeta("r")), 0.3)
        slot = r._slots["r0"]
        assert slot.health.down and slot.health._task is not None
        r.update(Membership("app", "dep", 2, ()))
        await _until(lambda: slot.health._task is not None and slot.health._task.done())
        assert r.num_replicas == 0
    finally:
        r.close()


# ---- liveness probe -------------------------------------------------------------------------


@pytest.mark.usefixtures("fast")
async def test_unresponsive_replica_is_skipped_until_it_answers(
        sock_dir: str, fakes: list[FakeReplica], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="shoal.router")
    frozen = await _fake(fakes, sock_dir, "r0")
    r = _router(frozen)
    try:
        assert await _call(r) == "r0"
        frozen.frozen = True  # SIGSTOP, or a blocked event loop
        stuck = asyncio.ensure_future(r.call("m", (), {}, RequestMeta("stuck")))
        slot = r._slots["r0"]
        await _until(lambda: not slot.health.usable)
        assert slot.health.unresponsive and not stuck.done()  # in flight: not failed by the router
        assert sum("not answering" in m for m in caplog.messages) == 1

        good = await _fake(fakes, sock_dir, "r1")
        r.update(Membership("app", "dep", 2, (frozen.endpoint, good.endpoint)))
        answers = await asyncio.gather(*(_call(r) for _ in range(20)))
        assert set(answers) == {"r1"}
        assert any(m[0] == PING for _, m in frozen.held)

        frozen.thaw()  # answers everything it held: the stuck request and the pings
        assert await asyncio.wait_for(stuck, PATIENCE_S) == "r0"
        await _until(lambda: slot.health.usable)
        assert any("r0" in m and "answering again" in m for m in caplog.messages)
        answers = await asyncio.gather(*(_call(r) for _ in range(40)))
        assert "r0" in answers
    finally:
        r.close()


@pytest.mark.usefixtures("fast")
async def test_busy_but_answering_replica_stays_in_use(sock_dir: str, fakes: list[FakeReplica]) -> None:
    fake = await _fake(fakes, sock_dir, "r0")
    r = _router(fake)
    try:
        hanging = asyncio.ensure_future(r.call("hang", (), {}, RequestMeta("h")))  # a long request
        await _until(lambda: fake.pings >= 3)  # probed several times while it runs
        assert r._slots["r0"].health.usable
        assert await _call(r) == "r0"
        hanging.cancel()
    finally:
        r.close()


async def test_idle_connection_is_not_probed(sock_dir: str, fakes: list[FakeReplica],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "PROBE_AFTER_S", 0.05)
    fake = await _fake(fakes, sock_dir, "r0")
    r = _router(fake)
    try:
        assert await _call(r) == "r0"
        conn = r._slots["r0"].conn
        await _until(lambda: conn._watch is not None and conn._watch._timer is None, 2.0)
        assert fake.pings == 0
    finally:
        r.close()


# ---- nothing waits unbounded ----------------------------------------------------------------


@pytest.mark.usefixtures("fast")
async def test_waiting_for_unreachable_replicas_is_bounded_by_the_callers_deadline(
        sock_dir: str, fakes: list[FakeReplica]) -> None:
    blocked = await _fake(fakes, sock_dir, "r0", silent=1000)
    r = _router(blocked)
    try:
        calls = [asyncio.ensure_future(asyncio.wait_for(r.call("m", (), {}, RequestMeta(f"r{i}")), 1.0))
                 for i in range(5)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(x, TimeoutError) for x in results), results
        assert r.num_queued == 0 and r.num_in_flight == 0  # nothing left behind
        # Once it is reachable again, new requests are served.
        blocked.silent = 0
        assert await _call(r) == "r0"
    finally:
        r.close()


@pytest.mark.usefixtures("fast")
async def test_waiters_are_served_when_the_replica_comes_back(sock_dir: str, fakes: list[FakeReplica]) -> None:
    blocked = await _fake(fakes, sock_dir, "r0", silent=1000)
    r = _router(blocked)
    try:
        calls = [asyncio.ensure_future(_call(r)) for _ in range(6)]
        await _until(lambda: r._slots["r0"].health.down)
        await asyncio.sleep(0.2)
        assert not any(c.done() for c in calls)
        blocked.silent = 0
        assert await asyncio.gather(*calls) == ["r0"] * 6
    finally:
        r.close()
