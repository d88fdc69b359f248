"""The controller's parts, driven with fakes: no processes, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
import logging
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from shoal.exceptions import DeployError, RayServeException
from shoal.runtime.controller import Controller, ReplicaRecord, Settings
from shoal.runtime.controller.admin import dispatch
from shoal.runtime.controller.canary import CANARY_SUFFIX, AppKey, CanaryTable, Track
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.health import due, record
from shoal.runtime.controller.records import AppRecord, DeploymentRecord
from shoal.runtime.controller.registry import Registry
from shoal.runtime.controller.supervisor import Supervisor
from shoal.runtime.reconcile import DeploymentFacts, application_status, deployment_status
from shoal.runtime.state import MemoryStore
from shoal.runtime.wire import Call
from shoal.status import ApplicationStatus, DeploymentStatus, ReplicaState
from tests.unit.fixtures.fake_processes import FakeProc


def replica(replica_id: str, app: str = "a", dep: str = "D",
            state: ReplicaState = ReplicaState.RUNNING) -> ReplicaRecord:
    return ReplicaRecord(replica_id, app, dep, "v1", f"/tmp/{replica_id}.sock", FakeProc(1), state=state)


# ---- registry ---------------------------------------------------------------------------
def test_registry_indexes_replicas_by_deployment_and_app() -> None:
    reg = Registry()
    for rec in (replica("D-1"), replica("E-1", dep="E"), replica("D-2"), replica("X-1", app="b", dep="D")):
        reg.add(rec)
    assert [r.replica_id for r in reg.of("a", "D")] == ["D-1", "D-2"]
    assert [r.replica_id for r in reg.of("b", "D")] == ["X-1"]
    assert reg.has_replicas("a") and reg.has_replicas("a", "E") and not reg.has_replicas("c")
    assert reg.remove("D-1") is not None and reg.remove("D-1") is None
    assert [r.replica_id for r in reg.of("a", "D")] == ["D-2"]
    reg.remove("E-1")
    assert not reg.has_replicas("a", "E") and reg.of("a", "E") == []
    reg.remove("D-2")
    assert not reg.has_replicas("a")
    assert set(reg.replicas) == {"X-1"}


def test_registry_finds_retiring_deployments() -> None:
    reg = Registry()
    dep = DeploymentRecord(SimpleNamespace(name="Old"), "v1", 0)  # type: ignore[arg-type]
    reg.retiring[("a", "Old")] = dep
    assert reg.deployment("a", "Old") is dep
    assert reg.deployment("a", "Missing") is None


# ---- health -----------------------------------------------------------------------------
def test_health_due_and_three_failures_replace() -> None:
    rec = replica("D-1")
    assert not due(rec, 0.0)  # not connected
    rec.conn = object()  # type: ignore[assignment]
    assert due(rec, 0.0)
    rec.health_busy = True
    assert not due(rec, 0.0)
    verdicts = [record(rec, False, now=float(i), period_s=10.0) for i in range(3)]
    assert [v.failures for v in verdicts] == [1, 2, 3]
    assert [v.replace for v in verdicts] == [False, False, True]
    assert rec.next_health == 12.0 and not rec.health_busy
    assert not due(rec, 11.0) and due(rec, 12.0)
    assert record(rec, True, now=20.0, period_s=10.0).failures == 0


def test_health_does_not_replace_a_stopping_replica() -> None:
    rec = replica("D-1", state=ReplicaState.STOPPING)
    rec.health_failures = 5
    assert not record(rec, False, now=0.0, period_s=1.0).replace


# ---- status decisions ---------------------------------------------------------------------
def test_deployment_and_application_status_decisions() -> None:
    healthy = DeploymentFacts(2, True, 0, "", running=2, current=2, others=0)
    assert deployment_status(healthy, 3) == DeploymentStatus.HEALTHY
    failed = DeploymentFacts(2, False, 3, "", running=0, current=0, others=0)
    assert deployment_status(failed, 3) == DeploymentStatus.DEPLOY_FAILED
    scaling = DeploymentFacts(3, True, 0, "UPSCALING", running=2, current=3, others=0)
    assert deployment_status(scaling, 3) == DeploymentStatus.UPSCALING
    down = DeploymentFacts(2, True, 0, "", running=0, current=2, others=0)
    assert deployment_status(down, 3) == DeploymentStatus.UNHEALTHY
    rolling = DeploymentFacts(2, True, 0, "", running=2, current=2, others=1)
    assert deployment_status(rolling, 3) == DeploymentStatus.UPDATING
    assert application_status(ApplicationStatus.RUNNING, {DeploymentStatus.UPDATING}) == ApplicationStatus.RUNNING
    assert application_status(ApplicationStatus.DEPLOYING, {DeploymentStatus.UPDATING}) == \
        ApplicationStatus.DEPLOYING
    assert application_status(ApplicationStatus.RUNNING, {DeploymentStatus.UNHEALTHY, DeploymentStatus.HEALTHY}) \
        == ApplicationStatus.UNHEALTHY


# ---- admin ------------------------------------------------------------------------------
def test_admin_dispatch_table() -> None:
    async def echo(args: dict[str, Any]) -> Any:
        return args["x"]

    async def boom(args: dict[str, Any]) -> Any:
        raise DeployError("no room")

    table = {"echo": echo, "boom": boom}
    ok = asyncio.run(dispatch(table, Call(1, "echo", {"x": 5})))
    assert ok.ok and ok.value == 5 and ok.id == 1
    failed = asyncio.run(dispatch(table, Call(2, "boom", {})))
    assert not failed.ok and failed.error == "no room"
    unknown = asyncio.run(dispatch(table, Call(3, "frobnicate", {})))
    assert not unknown.ok and unknown.error == "unknown operation 'frobnicate'"


def test_controller_admin_table_has_every_operation(tmp_path: Path) -> None:
    ctl = Controller(Settings(run_dir=str(tmp_path), num_gpus=0), b"s" * 32)
    assert set(ctl.admin) == {"status", "delete", "shutdown", "app_info", "apply", "promote", "rollback",
                              "metrics", "app_graphs", "config", "deployment_detail", "llm_limits_admit",
                              "llm_limits_settle"}


# ---- canary -----------------------------------------------------------------------------
def test_app_key_keeps_the_persisted_string_form() -> None:
    key = AppKey.canary("shop")
    assert key.key == "shop" + CANARY_SUFFIX == "shop#canary"
    assert AppKey.parse("shop#canary") == key and key.track is Track.CANARY and key.is_canary
    assert AppKey.parse("shop") == AppKey("shop", Track.STABLE) and not AppKey("shop").is_canary


def test_canary_table_persists_and_reloads_only_complete_pairs() -> None:
    store = MemoryStore()
    table = CanaryTable(store)
    table.set("shop", 10.0)
    table.set("blog", 5.0)
    table.drop("blog")
    assert "shop" in table and "blog" not in table and table.get("shop") == 10.0
    again = CanaryTable(store)
    again.load({"shop", "shop#canary"})
    assert dict(again.items()) == {"shop": 10.0}
    gone = CanaryTable(store)
    gone.load({"shop"})  # the canary record is gone: no split
    assert dict(gone.items()) == {}


# ---- persistence ------------------------------------------------------------------------
def test_memory_store_round_trip() -> None:
    store = MemoryStore()
    spec: Any = SimpleNamespace(name="a")
    store.save_app("a", spec, 12.5)
    store.set_meta("http_port", "8000")
    store.save_process("D-1", "replica", 42, app="a", deployment="D")
    assert store.load_apps() == [("a", spec, 12.5)]
    assert store.get_meta("http_port") == "8000" and store.get_meta("nope") is None
    (row,) = store.load_processes()
    assert (row.process_id, row.role, row.pid, row.info) == ("D-1", "replica", 42, {"app": "a", "deployment": "D"})
    store.delete_process("D-1")
    store.delete_app("a")
    assert store.load_apps() == [] and store.load_processes() == []
    store.save_app("b", spec, 1.0)
    store.clear()
    assert store.load_apps() == []


def test_deploy_error_is_a_shoal_exception() -> None:
    from shoal.runtime.controller import DeployError as Reexported

    assert Reexported is DeployError
    assert issubclass(DeployError, RayServeException) and issubclass(DeployError, RuntimeError)


# ---- supervisor -------------------------------------------------------------------------
def test_supervisor_spawns_through_the_factory() -> None:
    started: list[tuple[list[str], bytes, tuple[int, ...], dict[str, str] | None]] = []

    def factory(argv: list[str], stdin_data: bytes, pass_fds: tuple[int, ...] = (),
                env: dict[str, str] | None = None) -> FakeProc:
        started.append((argv, stdin_data, pass_fds, env))
        return FakeProc(100 + len(started))

    sup = Supervisor("/py", lambda: {"M": "dir"}, factory)
    proc = sup.spawn("shoal.runtime.replica", {"boot": 1}, pass_fds=(7,), env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.pid == 101
    argv, data, fds, env = started[0]
    assert argv == ["/py", "-m", "shoal.runtime.replica"] and fds == (7,)
    assert pickle.loads(data) == {"boot": 1}
    assert env == {"M": "dir", "CUDA_VISIBLE_DEVICES": ""}


def test_supervisor_stop_and_kill() -> None:
    running, done = FakeProc(1), FakeProc(2, code=0)
    Supervisor.stop(running, None)
    Supervisor.stop(done, None)
    assert running.signals == [15] and done.signals == []
    Supervisor.kill(running)
    assert running.killed and running.returncode == -9
    Supervisor.kill(done)
    assert not done.killed


def test_supervisor_wait_exit_uses_the_injected_clock() -> None:
    times = iter([0.0, 10.0])
    sup = Supervisor("/py", dict, monotonic=lambda: next(times))
    proc = FakeProc(1)
    asyncio.run(sup.wait_exit(proc, 5.0))  # the deadline has passed at the first look: no sleep
    assert proc.killed


# ---- the tick ---------------------------------------------------------------------------
def _app(name: str, dep_spec: Any) -> AppRecord:
    spec: Any = SimpleNamespace(name=name, route_prefix=None, ingress="D")
    return AppRecord(spec, {"D": DeploymentRecord(dep_spec, "v1", 0)})


def test_one_failing_app_does_not_stop_the_others(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock(monotonic=lambda: 100.0, wall_ns=lambda: 1_000_000_000)
    ctl = Controller(Settings(run_dir=str(tmp_path), num_gpus=0, spare_replicas=0), b"s" * 32, clock=clock,
                     factory=lambda *a, **k: FakeProc(1))
    broken: Any = object()  # no .name, no .config: reconciling it raises
    ctl.apps["bad"] = _app("bad", broken)
    ctl.apps["good"] = _app("good", SimpleNamespace(name="D", ingress=True))
    with caplog.at_level(logging.ERROR, logger="shoal.controller"):
        assert ctl._tick() is True
    assert ctl.apps["good"].status == ApplicationStatus.RUNNING  # still reconciled and its status updated
    assert any("application 'bad'" in r.getMessage() for r in caplog.records)


def test_make_room_retires_one_old_replica_at_a_time() -> None:
    from shoal.runtime.reconcile import ReplicaView, make_room

    views = [ReplicaView("b", "v1", ReplicaState.RUNNING), ReplicaView("c", "v1", ReplicaState.STARTING),
             ReplicaView("a", "v2", ReplicaState.STARTING)]
    assert make_room("v2", views) == "c"  # starting before serving
    assert make_room("v2", views[:1]) == "b"
    assert make_room("v2", [*views, ReplicaView("d", "v1", ReplicaState.STOPPING)]) is None
    assert make_room("v1", views[:2]) is None


# ---- the HTTP front ----------------------------------------------------------------------
def test_front_start_fails_when_the_proxy_never_serves(tmp_path: Path) -> None:
    from shoal.observability.controller_metrics import ControllerMetrics
    from shoal.runtime.controller.front import Front
    from shoal.runtime.controller.records import MAX_PROXY_RESTARTS, ProxyRecord

    front = Front(Settings(run_dir=str(tmp_path)), b"s", "", Supervisor("/py", dict), MemoryStore(),
                  ControllerMetrics(str(tmp_path)), Clock(monotonic=lambda: 0.0))
    front.watch()  # no proxy: nothing to do
    proc = FakeProc(7, code=1)
    front.proxy = ProxyRecord("proxy-1", proc, ready=True, restarts=MAX_PROXY_RESTARTS - 1)
    front.watch()
    assert front.proxy.restarts == MAX_PROXY_RESTARTS and not front.proxy.ready
    front.watch()  # given up: no restart
    assert front.proxy.proc is proc
    with pytest.raises(RuntimeError, match="failed to start"):
        asyncio.run(front.wait_ready(30.0))
