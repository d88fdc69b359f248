"""The admin RPC (the CLI's and ``serve.*``'s calls on the controller socket) as a table of
handlers: operation name -> coroutine taking the call's arguments."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from shoal.deployment import AppSpec
from shoal.observability.controller_metrics import ControllerMetrics
from shoal.runtime.controller.availability import status_message
from shoal.runtime.controller.canary import AppKey
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.records import AppRecord, DeploymentRecord, ReplicaRecord
from shoal.runtime.controller.shared_limits import shared_limit_handlers
from shoal.runtime.wire import Call, FramedProtocol, Reply
from shoal.status import ReplicaState, ServeStatus

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class UnknownOperation(ValueError):
    """The call named an operation the table does not have."""


async def dispatch(handlers: Mapping[str, Handler], call: Call) -> Reply:
    """Run the call's handler; any exception becomes a failed :class:`Reply` carrying its text."""
    try:
        handler = handlers.get(call.op)
        if handler is None:
            raise UnknownOperation(f"unknown operation {call.op!r}")
        value = await handler(call.args)
        return Reply(call.id, True, value)
    except Exception as e:
        return Reply(call.id, False, error=str(e))


async def serve_call(handlers: Mapping[str, Handler], proto: FramedProtocol, call: Call) -> None:
    """Dispatch ``call`` and send the reply back (the caller may have gone)."""
    reply = await dispatch(handlers, call)
    try:
        proto.send(reply)
    except ConnectionError:
        pass


class AdminTarget(Protocol):
    """What the admin operations act on (the controller)."""

    shutdown_requested: asyncio.Event
    metrics: ControllerMetrics
    settings: Any  # its Settings (``http``: the HTTPOptions)
    clock: Clock

    @property
    def http_port(self) -> int: ...

    @property
    def apps(self) -> dict[str, AppRecord]: ...

    @property
    def replicas(self) -> dict[str, ReplicaRecord]: ...

    def status(self) -> ServeStatus: ...

    async def delete(self, name: str, wait: bool = True) -> None: ...

    async def apply(self, specs: list[AppSpec], canary: float | None = None) -> dict[str, str]: ...

    async def promote(self, name: str, timeout: float | None = 600.0) -> None: ...

    async def rollback(self, name: str) -> None: ...


# The longest application or deployment name a detail request may carry.
MAX_NAME = 1024


def replica_health(rec: ReplicaRecord) -> str:
    """What the controller knows of a replica's health, in a few words."""
    code = rec.proc.poll()
    if code is not None:
        return f"exited (code {code})"
    if rec.adopted:
        return "waiting for it to reconnect"
    if rec.conn is None:
        return "not connected"
    if rec.health_failures:
        return f"{rec.health_failures} failed health check{'s' if rec.health_failures > 1 else ''} in a row"
    return "ok" if rec.state == ReplicaState.RUNNING else rec.state.value.lower()


def replica_rows(replicas: list[ReplicaRecord], now: float, wall: float) -> list[dict[str, Any]]:
    """The detail view's replica table: id, pid, state, version, start time and age, health."""
    return [{"replica_id": r.replica_id, "pid": r.proc.pid, "state": r.state.value, "version": r.version,
             "started": wall - (now - r.started_at), "age_s": max(0.0, now - r.started_at),
             "health": replica_health(r), "health_failures": r.health_failures, "serves_http": r.serves_http,
             "ongoing": r.ongoing} for r in replicas]


def _detail_head(ctl: AdminTarget, app: str, name: str) -> tuple[dict[str, Any], DeploymentRecord | None]:
    rec = ctl.apps.get(app)
    if rec is None or rec.deleting:
        return {"missing": "app", "error": f"no application {app!r}"}, None
    dep = rec.deployments.get(name)
    if dep is None:
        return {"missing": "deployment", "error": f"no deployment {name!r} in application {app!r}"}, None
    now = ctl.clock.monotonic()
    return {"app": app, "deployment": name, "status": dep.status.value, "version": dep.version,
            "target_replicas": dep.target, "ingress": rec.spec.ingress == name,
            "message": status_message(dep.message, dep.waiting, dep.fault, now - dep.fault_at)}, dep


def admin_table(ctl: AdminTarget) -> dict[str, Handler]:
    """The operations of the controller socket's admin RPC."""

    async def status(_: dict[str, Any]) -> Any:
        return ctl.status()

    async def delete(args: dict[str, Any]) -> None:
        await ctl.delete(args["name"], wait=bool(args.get("wait", True)))

    async def shutdown(_: dict[str, Any]) -> None:
        ctl.shutdown_requested.set()

    async def app_info(_: dict[str, Any]) -> Any:
        return {n: (a.spec.ingress, a.spec.route_prefix) for n, a in ctl.apps.items()
                if not a.deleting and not AppKey.parse(n).is_canary}

    async def apply(args: dict[str, Any]) -> Any:
        return await ctl.apply(list(args["specs"]), args.get("canary"))

    async def promote(args: dict[str, Any]) -> None:
        await ctl.promote(str(args["name"]))

    async def rollback(args: dict[str, Any]) -> None:
        await ctl.rollback(str(args["name"]))

    async def metrics(_: dict[str, Any]) -> Any:  # the controller's part of a local /metrics page
        return ctl.metrics.render(ctl)

    async def app_graphs(_: dict[str, Any]) -> Any:  # the dashboard's call graphs and deployment options
        from shoal.observability.dashboard import describe_apps

        return describe_apps(a.spec for a in ctl.apps.values() if not a.deleting)

    async def config(_: dict[str, Any]) -> Any:  # `shoal config`: what runs, as a serve config file
        from shoal.runtime.controller.running_config import running_config

        specs = [a.spec for n, a in ctl.apps.items() if not a.deleting and not AppKey.parse(n).is_canary]
        return running_config(specs, ctl.settings.http, ctl.http_port)

    async def deployment_detail(args: dict[str, Any]) -> Any:  # the dashboard's view of one deployment
        from shoal.observability.deployment_detail import MAX_TRACEBACK, collect
        from shoal.observability.safetext import escape
        from shoal.runtime.rundir import RunDir

        app, name = str(args.get("app", ""))[:MAX_NAME], str(args.get("deployment", ""))[:MAX_NAME]
        head, dep = _detail_head(ctl, app, name)
        if dep is None:
            return head
        now, wall = ctl.clock.monotonic(), ctl.clock.wall()
        mine = [r for r in ctl.replicas.values() if r.app == app and r.deployment == name]
        head["message"] = escape(head["message"][:2 * MAX_TRACEBACK])  # a constructor's traceback
        head["replicas"] = replica_rows(mine, now, wall)
        head["time"] = wall
        logs_dir = RunDir(ctl.settings.run_dir).logs_dir
        head.update(await asyncio.to_thread(collect, logs_dir, app, name, {r.replica_id: r.proc.pid for r in mine}))
        return head

    return {"status": status, "delete": delete, "shutdown": shutdown, "app_info": app_info, "apply": apply,
            "promote": promote, "rollback": rollback, "metrics": metrics, "app_graphs": app_graphs,
            "config": config, "deployment_detail": deployment_detail, **shared_limit_handlers(ctl)}
