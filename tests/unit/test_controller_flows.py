"""Canary releases, a replica's life and replica placement, driven with fakes (no processes)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from shoal import serve
from shoal.deployment import AppSpec, build_app_spec
from shoal.exceptions import DeployError
from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime.controller.canary import CanaryTable
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.health import first_check
from shoal.runtime.controller.lifecycle import Lifecycle
from shoal.runtime.controller.placement import Launcher
from shoal.runtime.controller.records import AppRecord, DeploymentRecord, ReplicaRecord, Settings
from shoal.runtime.controller.registry import Registry
from shoal.runtime.controller.releases import Releases
from shoal.runtime.controller.supervisor import Supervisor
from shoal.runtime.state import MemoryStore
from shoal.runtime.wire import ReplicaFailed, ReplicaReady
from shoal.serving.resources import Ledger, detect
from shoal.status import ReplicaState
from tests.unit.fixtures.fake_processes import FakeProc


@serve.deployment
class Echo:
    def __call__(self, x: Any) -> Any:
        return x


@serve.deployment(num_replicas=2)
class Echo2:
    def __call__(self, x: Any) -> Any:
        return x


def spec(name: str = "shop", version: int = 1) -> AppSpec:
    dep: Any = Echo if version == 1 else Echo2
    return build_app_spec(dep.bind(), name, f"/{name}")


class FakeDeployer:
    """Records deploys and deletes; apps appear and vanish at once."""

    def __init__(self) -> None:
        self._apps: dict[str, AppRecord] = {}
        self.log: list[str] = []
        self.routes_published = 0

    @property
    def apps(self) -> dict[str, AppRecord]:
        return self._apps

    async def deploy(self, s: AppSpec) -> None:
        self.log.append(f"deploy {s.name} {s.route_prefix}")
        self._apps[s.name] = AppRecord(s, {})

    async def delete(self, name: str, wait: bool = True) -> None:
        self.log.append(f"delete {name}")
        self._apps.pop(name, None)

    async def wait_running(self, name: str, timeout: float | None = None) -> None:
        self.log.append(f"wait {name}")

    def publish_routes(self) -> None:
        self.routes_published += 1


async def no_sleep(_: float) -> None:
    return None


def test_canary_release_bookkeeping() -> None:
    ctl = FakeDeployer()
    canaries = CanaryTable(MemoryStore())
    rel = Releases(ctl, canaries, sleep=no_sleep)

    async def scenario() -> None:
        assert await rel.apply([spec()]) == {"shop": "created"}
        assert await rel.apply([spec()], canary=10) == {"shop": "unchanged"}
        assert await rel.apply([spec(version=2)], canary=10) == {"shop": "canary started with 10% of traffic"}
        assert ctl.log[-1] == "deploy shop#canary None" and canaries.get("shop") == 10.0
        assert await rel.apply([spec(version=2)], canary=25) == {"shop": "canary weight 25%"}
        assert canaries.get("shop") == 25.0
        with pytest.raises(DeployError, match="canary release in progress"):
            await rel.apply([spec(version=2)])
        await rel.promote("shop")
        assert ctl.log[-3:] == ["deploy shop /shop", "wait shop", "delete shop#canary"]
        assert "shop" not in canaries and set(ctl.apps) == {"shop"}
        with pytest.raises(DeployError, match="no canary release to roll back"):
            await rel.rollback("shop")

    asyncio.run(scenario())


def test_apply_deletes_unlisted_apps_and_validates() -> None:
    ctl = FakeDeployer()
    rel = Releases(ctl, CanaryTable(MemoryStore()), sleep=no_sleep)

    async def scenario() -> None:
        await rel.apply([spec("a"), spec("b")])
        assert await rel.apply([spec("a")]) == {"a": "unchanged", "b": "deleted"}
        with pytest.raises(DeployError, match="between 0 and 100"):
            await rel.apply([spec("a")], canary=100)
        with pytest.raises(DeployError, match="more than once"):
            await rel.apply([spec("a"), spec("a")])

    asyncio.run(scenario())


# ---- lifecycle and placement ----------------------------------------------------------------
class World:
    def __init__(self, tmp: str) -> None:
        self.now = 50.0
        self.clock = Clock(monotonic=lambda: self.now, wall_ns=lambda: 0)
        self.started: list[FakeProc] = []
        self.registry = Registry()
        self.store = MemoryStore()
        self.metrics = ControllerMetrics(tmp)
        self.ledger = Ledger(detect(num_gpus=0))
        self.supervisor = Supervisor("/py", dict, self.factory, monotonic=self.clock.monotonic)
        self.published: list[str] = []
        self.kicks = 0
        self.lifecycle = Lifecycle(self.registry, self.supervisor, self.ledger, self.store, self.metrics,
                                   self.clock, lambda a, d, _dep: self.published.append(f"{a}/{d}"), self.kick)
        self.adopted: list[str] = []
        self.launcher = Launcher(Settings(run_dir=tmp, num_gpus=0), b"s" * 32, self.ledger, self.supervisor,
                                 self.registry, self.store, self.metrics, self.clock, lambda: None,
                                 lambda _conn, replica_id: self.adopted.append(replica_id))

    def factory(self, argv: list[str], stdin_data: bytes, pass_fds: tuple[int, ...] = (),
                env: dict[str, str] | None = None) -> FakeProc:
        self.started.append(FakeProc(1000 + len(self.started)))
        return self.started[-1]

    def kick(self) -> None:
        self.kicks += 1

    def deploy(self, s: AppSpec) -> DeploymentRecord:
        dspec = s.deployments[s.ingress]
        dep = DeploymentRecord(dspec, dspec.code_version, 1)
        self.registry.apps[s.name] = AppRecord(s, {dspec.name: dep})
        return dep


def test_start_ready_fail_and_exit(tmp_path: Any) -> None:
    w = World(str(tmp_path))
    dep = w.deploy(spec())
    w.launcher.start_replica("shop", dep, serves_http=False)
    (rec,) = w.registry.of("shop", "Echo")
    assert rec.state == ReplicaState.STARTING and rec.started_at == 50.0 and len(w.started) == 1
    assert w.store.load_processes()[0].process_id == rec.replica_id
    w.lifecycle.ready(ReplicaReady(rec.replica_id, rec.proc.pid))
    rec = w.registry.replicas[rec.replica_id]  # (its state changed)
    assert rec.state == ReplicaState.RUNNING and dep.ready_once and w.published == ["shop/Echo"]
    period = dep.spec.config.health_check_period_s  # the first check: at the replica's phase of it
    assert 50.0 + period / 2 <= rec.next_health == first_check(rec.replica_id, 50.0, period) <= 50.0 + period
    w.lifecycle.stop(rec, "scaling down", w.now)
    rec = w.registry.replicas[rec.replica_id]
    proc = w.started[0]
    assert rec.state == ReplicaState.STOPPING and proc.signals == [15]  # no connection: SIGTERM
    w.now = rec.stop_deadline + 1
    assert w.lifecycle.reap(w.now)  # overdue: killed and gone
    assert proc.killed and not w.registry.has_replicas("shop") and w.store.load_processes() == []


def test_constructor_failure_counts_against_the_version(tmp_path: Any) -> None:
    w = World(str(tmp_path))
    dep = w.deploy(spec())
    w.launcher.start_replica("shop", dep, serves_http=False)
    (rec,) = w.registry.of("shop", "Echo")
    w.lifecycle.failed(ReplicaFailed(rec.replica_id, "boom\n"))
    assert dep.failures == 1 and dep.message == "replica constructor failed: boom" and w.kicks == 1
    assert isinstance(rec.proc, FakeProc)
    rec.proc.code = 1
    w.lifecycle.reap(w.now)
    assert dep.failures == 1  # already reported: the exit does not count twice


def test_a_connected_spare_becomes_the_replica(tmp_path: Any) -> None:
    w = World(str(tmp_path))
    w.launcher.spawn_spare()
    (spare,) = w.launcher.spares.values()
    spare.conn = _OpenConn()  # type: ignore[assignment]
    dep = w.deploy(spec())
    w.launcher.start_replica("shop", dep, serves_http=False)
    (rec,) = w.registry.of("shop", "Echo")
    assert rec.proc is spare.proc and not w.launcher.spares and w.adopted == [rec.replica_id]
    assert len(w.started) == 1  # no new process


def test_a_spare_that_has_not_connected_is_aliased(tmp_path: Any) -> None:
    w = World(str(tmp_path))
    w.launcher.spawn_spare()
    (process_id,) = w.launcher.spares
    dep = w.deploy(spec())
    w.launcher.start_replica("shop", dep, serves_http=False)
    (rec,) = w.registry.of("shop", "Echo")
    assert w.launcher.spare_alias == {process_id: rec.replica_id} and w.adopted == []


class _OpenConn:
    closed = False


def test_spares_are_released_when_no_replica_starts_and_come_back_with_the_next(tmp_path: Any) -> None:
    w = World(str(tmp_path))
    idle = w.launcher.settings.spare_idle_s
    w.launcher.tend_spares()  # a fresh instance: one spare
    (spare,) = w.launcher.spares.values()
    dep = w.deploy(spec())
    w.now += idle - 1
    w.launcher.start_replica("shop", dep, serves_http=False)  # takes the spare; a start is recent again
    (rec,) = w.registry.of("shop", "Echo")
    assert rec.proc is spare.proc and not w.launcher.spares
    w.launcher.tend_spares()
    assert not w.launcher.spares  # not while a replica is starting
    w.lifecycle.ready(ReplicaReady(rec.replica_id, rec.proc.pid))
    w.launcher.tend_spares()
    (refill,) = w.launcher.spares.values()
    w.now += idle - 1
    w.launcher.tend_spares()
    assert w.launcher.waiting_spares() == [refill] and refill.proc.signals == []  # type: ignore[attr-defined]
    w.now += 1  # idle for spare_idle_s: released (SIGTERM: it has no connection yet)
    w.launcher.tend_spares()
    assert w.launcher.waiting_spares() == [] and refill.proc.signals == [15]  # type: ignore[attr-defined]
    w.launcher.tend_spares()
    assert refill.proc.signals == [15] and len(w.started) == 2  # released once, and not refilled
    refill.proc.code = 0  # type: ignore[attr-defined]
    w.launcher.reap_spares()
    assert not w.launcher.spares
    # A released spare is never handed a deployment: the next replica starts a new process.
    w.launcher.start_replica("shop", dep, serves_http=False)
    assert len(w.started) == 3 and w.started[-1] is not refill.proc


def test_a_released_spare_that_does_not_exit_is_killed(tmp_path: Any) -> None:
    w = World(str(tmp_path))
    w.launcher.spawn_spare()
    (spare,) = w.launcher.spares.values()
    w.now += w.launcher.settings.spare_idle_s
    w.launcher.tend_spares()
    w.launcher.reap_spares()
    assert spare.stop_deadline is not None and not spare.proc.killed  # type: ignore[attr-defined]
    w.now = spare.stop_deadline
    w.launcher.reap_spares()
    assert spare.proc.killed and not w.launcher.spares  # type: ignore[attr-defined]


@pytest.mark.parametrize(("text", "expected"), [("", 30.0), ("5", 5.0), ("0", 0.0), (" never ", float("inf"))])
def test_spare_idle_seconds_from_the_environment(monkeypatch: pytest.MonkeyPatch, text: str, expected: float) -> None:
    monkeypatch.setenv("SHOAL_SPARE_IDLE_S", text)
    assert Settings(run_dir="/x").spare_idle_s == expected


@pytest.mark.parametrize("text", ["-1", "soon", "nan"])
def test_a_bad_spare_idle_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("SHOAL_SPARE_IDLE_S", text)
    message = f"SHOAL_SPARE_IDLE_S must be a number of seconds >= 0 or 'never', got '{text}'"
    with pytest.raises(ValueError, match=message):
        Settings(run_dir="/x")


def test_replica_record_unused_in_gone_twice(tmp_path: Any) -> None:
    w = World(str(tmp_path))
    dep = w.deploy(spec())
    rec = ReplicaRecord("Echo-x", "shop", "Echo", dep.version, str(tmp_path / "x.sock"), FakeProc(5))
    w.registry.add(rec)
    w.lifecycle.gone(rec, "exited with code 1")
    w.lifecycle.gone(rec, "exited with code 1")
    assert dep.failures == 1 and "before it was ready" in dep.message


# ---- restore ------------------------------------------------------------------------------
class FakeAdopter:
    def __init__(self, alive: set[int]) -> None:
        self.live = alive
        self.procs: dict[int, FakeProc] = {}

    def alive(self, pid: int) -> bool:
        return pid in self.live

    def adopt(self, pid: int) -> FakeProc:
        return self.procs.setdefault(pid, FakeProc(pid))


def test_restore_redeploys_apps_and_adopts_live_replicas() -> None:
    from shoal.runtime.controller.deployments import plan_deployment
    from shoal.runtime.controller.restore import restore

    store = MemoryStore()
    s = spec()
    store.save_app("shop", s, 3.0)
    store.save_app("shop#canary", spec(version=2), 4.0)
    store.set_meta("canaries", '{"shop": 20.0, "gone": 5.0}')
    dspec = s.deployments["Echo"]
    common = {"app": "shop", "deployment": "Echo", "version": dspec.code_version, "socket_path": "/x.sock"}
    store.save_process("Echo-1", "replica", 11, **common)
    store.save_process("Echo-2", "replica", 12, **common)  # dead
    store.save_process("Echo-3", "replica", 13, gang=True, **common)  # gangs start afresh
    store.save_process("proxy-1", "proxy", 14)  # alive but will not hand its socket over
    adopter = FakeAdopter({11, 13, 14})
    registry = Registry()
    canaries = CanaryTable(store)
    sup = Supervisor("/py", dict, adopter=adopter)
    got = restore(store, registry, canaries, sup, Ledger(detect(num_gpus=0)),
                  lambda app, d: plan_deployment(app, d, None), lambda row: False, now=7.0)
    assert got.adopted == 1 and set(registry.apps) == {"shop", "shop#canary"}
    (rec,) = registry.of("shop", "Echo")
    assert rec.replica_id == "Echo-1" and rec.adopted and rec.adopt_deadline == 17.0
    assert dict(canaries.items()) == {"shop": 20.0}
    assert adopter.procs[13].killed and adopter.procs[14].killed
    assert {r.process_id for r in store.load_processes()} == {"Echo-1"}


# ---- membership and routes ------------------------------------------------------------------
def test_membership_lists_running_replicas_sorted() -> None:
    from shoal.runtime.controller.membership import build_membership

    s = spec()
    dep = DeploymentRecord(s.deployments["Echo"], "v1", 2)
    reps = [ReplicaRecord(t, "shop", "Echo", "v1", f"/{t}.sock", FakeProc(1), state=st)
            for t, st in (("b", ReplicaState.RUNNING), ("a", ReplicaState.RUNNING), ("c", ReplicaState.STARTING))]
    m = build_membership("shop", "Echo", dep, reps, epoch=9)
    assert [r.replica_id for r in m.replicas] == ["a", "b"] and m.epoch == 9
    assert m.max_queued_requests == s.deployments["Echo"].config.max_queued_requests


def test_routes_split_canary_traffic_and_step_the_proxy_aside() -> None:
    from shoal.runtime.controller.membership import build_routes

    stable, canary = spec(), spec(version=2)
    canary_spec = dataclasses.replace(canary, name="shop#canary", route_prefix=None)
    apps = {"shop": AppRecord(stable, {}), "shop#canary": AppRecord(canary_spec, {})}
    table = CanaryTable(MemoryStore())
    table.set("shop", 30.0)
    serving = ReplicaRecord("t", "shop", stable.ingress, "v1", "/t.sock", FakeProc(1), state=ReplicaState.RUNNING,
                            serves_http=True)
    routes = build_routes(apps, [serving], table)
    assert routes.table == {"/shop": ("shop", "Echo")}
    assert routes.split == {"/shop": ("shop#canary", "Echo2", 30.0)}
    assert routes.proxy_accepts is False  # every routed app's ingress serves HTTP itself
    assert build_routes(apps, [], table).proxy_accepts is True
