"""Issue 15: the controller's watch over replicas that cannot serve (stopped, over their memory,
never ready), a failed deployment refused at once, and the proxy's stand-in. Fakes and an
injected clock; no replica processes."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from shoal import serve
from shoal.config import DeploymentConfig
from shoal.deployment import AppSpec, build_app_spec
from shoal.runtime.controller.availability import FAULT_SHOWN_S, Supply, progress, status_message, unavailable
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.core import Controller
from shoal.runtime.controller.health import first_check, phase
from shoal.runtime.controller.records import MAX_START_FAILURES, Settings
from shoal.runtime.controller.standin import StandIn, answer
from shoal.runtime.controller.watchdog import (
    DEFAULT_START_TIMEOUT_S,
    MEMORY_POLL_S,
    START_TIMEOUT_ENV,
    STOPPED_AFTER_S,
    Watchdog,
    Watched,
    read_rss,
    read_state,
    start_timeout,
)
from shoal.runtime.wire import Membership, ReplicaReady
from shoal.status import ApplicationStatus, DeploymentStatus, ReplicaState
from tests.unit.fixtures.fake_processes import FakeProc

MB = 1024 * 1024


# ---- the readers ------------------------------------------------------------------------------
def test_readers_of_a_live_and_a_missing_process() -> None:
    assert read_state(os.getpid()) in {"R", "S", "D"}
    rss = read_rss(os.getpid())
    assert rss is not None and rss > MB
    assert read_state(2 ** 22 + 7) is None and read_rss(2 ** 22 + 7) is None


# ---- the watchdog -----------------------------------------------------------------------------
class Fake:
    def __init__(self) -> None:
        self.state = "S"
        self.rss = 50 * MB
        self.state_reads = 0
        self.rss_reads = 0

    def read_state(self, pid: int) -> str | None:
        self.state_reads += 1
        return self.state

    def read_rss(self, pid: int) -> int | None:
        self.rss_reads += 1
        return self.rss


def _dog(fake: Fake) -> Watchdog:
    return Watchdog(read_state=fake.read_state, read_rss=fake.read_rss)


def test_a_stopped_process_is_named_after_the_grace_and_once() -> None:
    fake = Fake()
    dog = _dog(fake)
    w = [Watched("A-1", 10)]
    assert dog.scan(w, 0.0) == []
    fake.state = "T"
    assert dog.scan(w, 0.5) == []  # first seen stopped at 0.5
    assert dog.scan(w, 0.5 + STOPPED_AFTER_S - 0.1) == []
    (found,) = dog.scan(w, 0.5 + STOPPED_AFTER_S + 0.5)
    assert found.kind == "stopped" and found.replica_id == "A-1"
    assert found.message == "replica A-1 process stopped (SIGSTOP) for 2 s"
    assert dog.scan(w, 10.0) == []  # reported once


def test_a_short_stop_is_tolerated_and_tracing_stops_count() -> None:
    fake = Fake()
    dog = _dog(fake)
    w = [Watched("A-1", 10)]
    fake.state = "t"  # stopped by a tracer
    dog.scan(w, 0.0)
    fake.state = "R"  # SIGCONT
    dog.scan(w, 1.0)
    fake.state = "t"
    assert dog.scan(w, 1.5) == [] and dog.scan(w, 1.5 + STOPPED_AFTER_S - 0.1) == []
    assert [f.kind for f in dog.scan(w, 1.5 + STOPPED_AFTER_S)] == ["stopped"]


def test_state_is_read_at_most_every_poll() -> None:
    fake = Fake()
    dog = _dog(fake)
    for i in range(10):
        dog.scan([Watched("A-1", 10)], i * 0.05)  # half a second of ticks
    assert fake.state_reads == 1 and fake.rss_reads == 0  # no memory limit: RSS never read


def test_memory_over_the_limit_is_named() -> None:
    fake = Fake()
    dog = _dog(fake)
    w = [Watched("A-1", 10, memory_limit=200 * MB)]
    first = phase("A-1") * MEMORY_POLL_S  # replicas are read at their own phase of the period
    assert dog.scan(w, 0.0) == [] and dog.scan(w, first) == []
    fake.rss = 644 * MB
    assert dog.scan(w, first + MEMORY_POLL_S / 2) == []  # not polled yet
    (found,) = dog.scan(w, first + MEMORY_POLL_S)
    assert found.kind == "memory" and found.message == "replica A-1 exceeded memory 200 MB (resident 644 MB)"


def test_replicas_started_together_are_read_at_spread_times() -> None:
    reads: list[int] = []

    def state(pid: int) -> str:
        reads.append(pid)
        return "S"

    dog = Watchdog(read_state=state, read_rss=lambda pid: 0)
    watched = [Watched(f"Dep-{i:04x}", i) for i in range(200)]
    per_tick = []
    for tick in range(10):  # 0.1 s ticks: one STOP_POLL_S is five of them
        reads.clear()
        dog.scan(watched, tick * 0.1)
        per_tick.append(len(reads))
    # each read within its first period and then every period, never all in one tick
    assert sum(per_tick) >= 300 and max(per_tick) < 120
    assert len({phase(w.replica_id) for w in watched}) > 150
    assert first_check("Dep-0001", 100.0, 10.0) == first_check("Dep-0001", 100.0, 10.0)
    assert all(105.0 <= first_check(w.replica_id, 100.0, 10.0) < 110.0 for w in watched)


def test_replicas_that_left_are_forgotten_and_a_new_pid_starts_over() -> None:
    fake = Fake()
    dog = _dog(fake)
    fake.state = "T"
    dog.scan([Watched("A-1", 10)], 0.0)
    assert dog.scan([Watched("A-1", 11)], STOPPED_AFTER_S + 1) == []  # another process: grace again
    dog.scan([], 5.0)
    assert dog._seen == {}


def test_start_timeout_comes_from_the_deployment_the_variable_or_the_default() -> None:
    assert start_timeout(DeploymentConfig(), {}) == DEFAULT_START_TIMEOUT_S
    assert start_timeout(DeploymentConfig(), {START_TIMEOUT_ENV: "7.5"}) == 7.5
    assert start_timeout(DeploymentConfig(), {START_TIMEOUT_ENV: "soon"}) == DEFAULT_START_TIMEOUT_S
    assert start_timeout(DeploymentConfig(replica_start_timeout_s=3), {START_TIMEOUT_ENV: "7.5"}) == 3.0


# ---- availability and status text --------------------------------------------------------------
R, S, X = ReplicaState.RUNNING, ReplicaState.STARTING, ReplicaState.STOPPING


def test_unavailable_only_when_nothing_runs_or_comes() -> None:
    tb = "Traceback (most recent call last):\n  File ...\nValueError: no model file\n"
    failed = Supply((), 1, True, f"replica constructor failed: {tb}")
    assert unavailable("a", "D", failed) == \
        "deployment 'D' of application 'a' failed to deploy: ValueError: no model file"
    assert unavailable("a", "D", Supply((R,), 1, True, "x")) == ""  # the old version still serves
    assert unavailable("a", "D", Supply((S,), 1, False)) == ""  # one is starting: wait for it
    crash_loop = Supply((S,), 1, False, "replica constructor failed: OSError: disk gone", failing=True)
    assert unavailable("a", "D", crash_loop) == (
        "deployment 'D' of application 'a' has no running replica "
        "and its last starts failed: replica constructor failed: OSError: disk gone")
    assert unavailable("a", "D", Supply((X,), 1, False, "pending", True)) == ""  # room is being made
    assert unavailable("a", "D", Supply((), 0, False)) == ""  # scales from zero on demand
    pending = Supply((), 1, False, "replica pending: needs num_gpus=1 but the machine has 0", True)
    assert unavailable("a", "D", pending) == ("deployment 'D' of application 'a' has no running replica: "
                                              "replica pending: needs num_gpus=1 but the machine has 0")


def test_progress_and_status_messages() -> None:
    assert progress([100.0, 95.0], running=0, target=2, now=107.0) == \
        "waiting for 2 replicas: constructor running for 12 s"
    assert progress([100.0], running=1, target=2, now=101.0) == "waiting for 1 replica: constructor running for 1 s"
    assert progress([], running=0, target=1, now=1.0) == "" and progress([1.0], 2, 2, 5.0) == ""
    assert status_message("boom", "waiting for 1 replica: x", "", 0) == "boom; waiting for 1 replica: x"
    assert status_message("", "", "replica A stopped", 12.4) == "replica A stopped, 12 s ago"
    assert status_message("", "", "replica A stopped", FAULT_SHOWN_S) == ""


# ---- the controller: start deadline, eviction, DEPLOY_FAILED -> refused -------------------------
@serve.deployment
class Slow:
    def __call__(self, x: Any) -> Any:
        return x


def _spec(**options: Any) -> AppSpec:
    return build_app_spec(Slow.options(**options).bind(), "app", "/app")


class Sub:
    """A router subscribed to the deployment: records the memberships it is sent."""

    closed = False

    def __init__(self) -> None:
        self.got: list[Membership] = []

    def send(self, m: Any) -> None:
        if isinstance(m, Membership):
            self.got.append(m)


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.now = 1000.0
        self.procs: list[FakeProc] = []
        self.fake = Fake()
        self.ctl = Controller(Settings(run_dir=str(tmp), num_gpus=0, spare_replicas=0, start_proxy=False),
                              b"s" * 32, clock=Clock(monotonic=lambda: self.now, wall_ns=lambda: 0),
                              factory=self._spawn)
        self.ctl.guard.watchdog = _dog(self.fake)
        self.sub = Sub()
        self.ctl.publisher.subscribe("app", "Slow", self.sub)  # type: ignore[arg-type]

    def _spawn(self, argv: list[str], stdin_data: bytes, pass_fds: tuple[int, ...] = (),
               env: dict[str, str] | None = None) -> FakeProc:
        self.procs.append(FakeProc(5000 + len(self.procs)))
        return self.procs[-1]

    def tick(self, dt: float = 0.0) -> None:
        self.now += dt
        self.ctl._tick()

    def replica(self) -> Any:
        (rec,) = [r for r in self.ctl.replicas.values() if r.state != ReplicaState.STOPPING]
        return rec

    def deployment(self) -> Any:
        return self.ctl.apps["app"].deployments["Slow"]


def test_a_constructor_past_its_deadline_fails_the_deploy_and_routers_refuse(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path)
        await rig.ctl.deploy(_spec(replica_start_timeout_s=5))
        rig.tick()
        rec = rig.replica()
        rig.tick(4.0)
        st = rig.ctl.status().applications["app"]
        assert st.status == ApplicationStatus.DEPLOYING
        assert st.deployments["Slow"].message == "waiting for 1 replica: constructor running for 4 s"
        assert "constructor running for 4 s" in st.message
        rig.tick(1.0)  # 5 s: killed, a failed start, replaced
        assert rec.proc.killed and rec.state == ReplicaState.STOPPING
        dep = rig.deployment()
        assert dep.failures == 1 and dep.message == "replica constructor did not finish within 5 s"
        for _ in range(MAX_START_FAILURES - 1):
            rig.tick()
            rig.tick(5.0)
        rig.tick()
        assert dep.failures == MAX_START_FAILURES and not [r for r in rig.ctl.replicas.values()]
        st = rig.ctl.status().applications["app"]
        assert st.status == ApplicationStatus.DEPLOY_FAILED
        assert "replica constructor did not finish within 5 s" in st.message
        last = rig.sub.got[-1]
        assert last.gone == ("deployment 'Slow' of application 'app' failed to deploy: "
                             "replica constructor did not finish within 5 s")
        # Redeployed (a constructor that finishes): routers are told to wait for it again.
        await rig.ctl.deploy(_spec(replica_start_timeout_s=60))
        rig.tick()
        assert rig.sub.got[-1].gone == ""
        rec = rig.replica()
        rig.ctl.lifecycle.ready(ReplicaReady(rec.replica_id, rec.proc.pid))
        rig.tick()
        assert [r.replica_id for r in rig.sub.got[-1].replicas] == [rec.replica_id]
        assert rig.ctl.status().applications["app"].status == ApplicationStatus.RUNNING

    asyncio.run(scenario())


def test_a_stopped_replica_leaves_the_membership_at_once_and_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path)
        await rig.ctl.deploy(_spec(num_replicas=2))
        rig.tick()
        for rec in list(rig.ctl.replicas.values()):
            rig.ctl.lifecycle.ready(ReplicaReady(rec.replica_id, rec.proc.pid))
        rig.tick()
        assert rig.ctl.status().applications["app"].status == ApplicationStatus.RUNNING
        victim = sorted(rig.ctl.replicas.values(), key=lambda r: r.replica_id)[0]
        states = {5000 + i: "S" for i in range(10)}
        states[victim.proc.pid] = "T"
        rig.ctl.guard.watchdog.read_state = lambda pid: states.get(pid)
        for _ in range(int(STOPPED_AFTER_S / 0.5) + 2):
            rig.tick(0.5)
        assert victim.proc.killed and victim.replica_id not in rig.ctl.replicas
        assert victim.replica_id not in [r.replica_id for r in rig.sub.got[-1].replicas]
        dep = rig.deployment()
        assert dep.failures == 0 and dep.status == DeploymentStatus.UNHEALTHY
        assert dep.message.startswith(f"replica {victim.replica_id} process stopped (SIGSTOP) for ")
        assert len([r for r in rig.ctl.replicas.values() if r.state == ReplicaState.STARTING]) == 1  # replacement
        st = rig.ctl.status().applications["app"]
        assert st.status == ApplicationStatus.UNHEALTHY and "process stopped (SIGSTOP)" in st.message
        for rec in list(rig.ctl.replicas.values()):
            rig.ctl.lifecycle.ready(ReplicaReady(rec.replica_id, rec.proc.pid))
        rig.tick(1.0)
        st = rig.ctl.status().applications["app"]
        assert st.status == ApplicationStatus.RUNNING and st.deployments["Slow"].status == DeploymentStatus.HEALTHY
        # Healthy again, the last fault stays visible for a while.
        assert "process stopped (SIGSTOP)" in st.deployments["Slow"].message

    asyncio.run(scenario())


def test_a_replica_over_its_memory_is_replaced_with_the_reason(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path)
        await rig.ctl.deploy(_spec(ray_actor_options={"memory": 200 * MB}))
        rig.tick()
        rec = rig.replica()
        rig.ctl.lifecycle.ready(ReplicaReady(rec.replica_id, rec.proc.pid))
        rig.tick(1.0)
        rig.fake.rss = 644 * MB
        rig.tick(1.0)
        assert rec.proc.killed
        dep = rig.deployment()
        assert dep.message == f"replica {rec.replica_id} exceeded memory 200 MB (resident 644 MB); replacing it"
        assert rig.sub.got[-1].gone == ""  # a replacement is starting: requests wait for it

    asyncio.run(scenario())


def test_resource_pending_with_nothing_running_is_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        rig = Rig(tmp_path)
        await rig.ctl.deploy(_spec(ray_actor_options={"resources": {"TPU": 1}}))
        rig.tick()
        rig.tick(0.1)
        assert "application 'app' failed to deploy: " in rig.sub.got[-1].gone or \
            "has no running replica" in rig.sub.got[-1].gone

    asyncio.run(scenario())


# ---- the proxy's stand-in ----------------------------------------------------------------------
def test_answer_is_a_complete_503() -> None:
    raw = answer(2.2, "restarts in 2 s")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 3" in head and b"connection: close" in head
    assert f"content-length: {len(body)}".encode() in head and b'"error": "proxy restarting"' in body


def test_standin_answers_on_a_duplicate_and_stops(tmp_path: Path) -> None:
    async def scenario() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        standin = StandIn(lambda: (4.0, "restarts in 4 s"))
        standin.start(listener)
        for _ in range(100):
            if standin._server is not None:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        assert data.startswith(b"HTTP/1.1 503") and b"retry-after: 4" in data
        writer.close()
        standin.stop()
        assert not standin.running and listener.fileno() >= 0
        # The listening socket stays open: a connection now waits in its backlog.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.2)
        writer.close()
        listener.close()

    asyncio.run(scenario())
