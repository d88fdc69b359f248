"""The controller's part of the LLM gateway's shared rate limits: two admin operations.

Every replica of an ``OpenAiIngress`` deployment asks here before admitting a request
(``llm_limits_admit``) and says what the request used when it ends (``llm_limits_settle``), so
that the requests-per-minute and tokens-per-minute budgets of a tenant hold for the whole
deployment, not per replica (:mod:`shoal.llm._limit_store` has the budgets and the calls'
arguments). Each answer to an admission also carries ``replicas``, the deployment's target
replica count: a replica that cannot reach the controller falls back to that share of each
limit (:mod:`shoal.llm._shared_limits`).

The store is made on the first call, so a controller without an LLM gateway never imports
:mod:`shoal.llm`. A call for a deployment that does not exist is refused; budgets of deployments that are gone
are dropped on the next call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.records import AppRecord

if TYPE_CHECKING:
    from shoal.llm._limit_store import SharedLimitStore

__all__ = ["shared_limit_handlers"]

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class LimitHost(Protocol):
    """What the operations read of the controller."""

    clock: Clock

    @property
    def apps(self) -> dict[str, AppRecord]: ...


def _target(host: LimitHost, app: str, deployment: str) -> int | None:
    rec = host.apps.get(app)
    dep = rec.deployments.get(deployment) if rec is not None and not rec.deleting else None
    return dep.target if dep is not None else None


def shared_limit_handlers(host: LimitHost) -> dict[str, Handler]:
    """``llm_limits_admit`` and ``llm_limits_settle`` for the controller's admin table."""
    made: list[SharedLimitStore] = []

    def store() -> SharedLimitStore:
        if not made:
            from shoal.llm._limit_store import SharedLimitStore

            made.append(SharedLimitStore())
        made[0].prune(lambda app, dep: _target(host, app, dep) is not None)
        return made[0]

    def replicas(args: dict[str, Any]) -> int:
        app, deployment = args.get("app"), args.get("deployment")
        target = _target(host, app, deployment) if isinstance(app, str) and isinstance(deployment, str) else None
        if target is None:  # budgets for no deployment would never be dropped: refuse
            raise ValueError(f"no deployment {deployment!r} in application {app!r} to keep rate limits for")
        return target

    async def admit(args: dict[str, Any]) -> dict[str, Any]:
        target = replicas(args)
        answer = store().admit(args, host.clock.monotonic())
        answer["replicas"] = target
        return answer

    async def settle(args: dict[str, Any]) -> None:
        replicas(args)
        store().settle(args, host.clock.monotonic())

    return {"llm_limits_admit": admit, "llm_limits_settle": settle}
