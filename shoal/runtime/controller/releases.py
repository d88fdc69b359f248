"""Declarative deploys (``shoal deploy``: make the instance run exactly these apps) and
canary releases (start, re-weight, promote, roll back), on top of the controller's
deploy/delete primitives."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from shoal.deployment import AppSpec
from shoal.exceptions import DeployError
from shoal.runtime.controller.canary import AppKey, CanaryTable
from shoal.runtime.controller.records import AppRecord, fingerprint


class Deployer(Protocol):
    """What releases need of the controller."""

    @property
    def apps(self) -> dict[str, AppRecord]: ...

    async def deploy(self, spec: AppSpec) -> None: ...

    async def delete(self, name: str, wait: bool = True) -> None: ...

    async def wait_running(self, name: str, timeout: float | None = None) -> None: ...

    def publish_routes(self) -> None: ...


def _same(a: AppSpec, b: AppSpec) -> bool:
    return fingerprint(a) == fingerprint(b) and a.route_prefix == b.route_prefix


class Releases:
    """``apply``, ``promote`` and ``rollback``. ``handover_s``: how long fronts that already
    picked the canary for a request get to hand it over before the canary drains."""

    def __init__(self, ctl: Deployer, canaries: CanaryTable,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, handover_s: float = 0.5) -> None:
        self.ctl = ctl
        self.canaries = canaries
        self.sleep = sleep
        self.handover_s = handover_s

    async def apply(self, specs: list[AppSpec], canary: float | None = None) -> dict[str, str]:
        """Make the instance run exactly ``specs`` (apps not listed are deleted). Returns what
        happened to each app: created, updated, unchanged, deleted, or a canary started.

        With ``canary`` (percent), an app that exists and changed is not replaced: the new
        version runs beside it as a canary taking that share of the app's HTTP traffic.
        """
        _validate(specs, canary)
        results: dict[str, str] = {}
        for spec in specs:
            results[spec.name] = await self._apply_one(spec, canary)
        for name, app in list(self.ctl.apps.items()):
            if AppKey.parse(name).is_canary or app.deleting or name in results:
                continue
            await self.end_canary(name)
            await self.ctl.delete(name, wait=False)
            results[name] = "deleted"
        return results

    async def _apply_one(self, spec: AppSpec, canary: float | None) -> str:
        cur = self.ctl.apps.get(spec.name)
        live = cur is not None and not cur.deleting
        in_canary = spec.name in self.canaries
        if canary is not None and cur is not None and live:
            canary_rec = self.ctl.apps.get(AppKey.canary(spec.name).key)
            if _same(cur.spec, spec) and not in_canary:
                return "unchanged"
            if in_canary and canary_rec is not None and fingerprint(canary_rec.spec) == fingerprint(spec):
                self.set_weight(spec.name, canary)
                return f"canary weight {canary:g}%"
            await self._deploy_canary(spec, cur, canary)
            return f"canary started with {canary:g}% of traffic"
        if in_canary:
            raise DeployError(f"application {spec.name!r} has a canary release in progress: "
                              f"run `shoal promote {spec.name}` or `shoal rollback {spec.name}` first, "
                              "or deploy with --canary to replace the canary")
        if live and cur is not None and _same(cur.spec, spec):
            return "unchanged"
        await self.ctl.deploy(spec)
        return "updated" if live else "created"

    async def _deploy_canary(self, spec: AppSpec, stable: AppRecord, weight: float) -> None:
        if stable.spec.route_prefix is None:
            raise DeployError(f"application {spec.name!r} has no route_prefix: a canary splits HTTP traffic")
        if spec.route_prefix != stable.spec.route_prefix:
            raise DeployError(f"application {spec.name!r}: a canary keeps the route_prefix "
                              f"{stable.spec.route_prefix!r} (got {spec.route_prefix!r})")
        await self.ctl.deploy(replace(spec, name=AppKey.canary(spec.name).key, route_prefix=None))
        self.set_weight(spec.name, weight)

    def set_weight(self, name: str, weight: float) -> None:
        self.canaries.set(name, weight)
        self.ctl.publish_routes()

    def has_canary(self, name: str) -> bool:
        return name in self.canaries or AppKey.canary(name).key in self.ctl.apps

    async def end_canary(self, name: str) -> None:
        """Stop splitting traffic, then delete the canary app (its replicas drain)."""
        if not self.has_canary(name):
            return
        self.canaries.drop(name)
        self.ctl.publish_routes()
        await self.sleep(self.handover_s)
        await self.ctl.delete(AppKey.canary(name).key, wait=True)

    async def promote(self, name: str, timeout: float | None = 600.0) -> None:
        """Make the canary the app's version: roll the app to it, then remove the canary."""
        canary = self.ctl.apps.get(AppKey.canary(name).key)
        stable = self.ctl.apps.get(name)
        if canary is None or stable is None or name not in self.canaries:
            raise DeployError(f"application {name!r} has no canary release to promote")
        await self.ctl.deploy(replace(canary.spec, name=name, route_prefix=stable.spec.route_prefix))
        await self.ctl.wait_running(name, timeout)
        await self.end_canary(name)

    async def rollback(self, name: str) -> None:
        """Send all traffic back to the app's version and remove the canary."""
        if not self.has_canary(name):
            raise DeployError(f"application {name!r} has no canary release to roll back")
        await self.end_canary(name)


def _validate(specs: list[AppSpec], canary: float | None) -> None:
    if canary is not None and not 0 < canary < 100:
        raise DeployError(f"canary weight must be between 0 and 100 (exclusive), got {canary}")
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise DeployError(f"application name(s) {', '.join(sorted(dupes))} appear more than once")
    if any("#" in n for n in names):
        raise DeployError("application names may not contain '#'")
