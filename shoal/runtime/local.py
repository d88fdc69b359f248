"""Local testing mode: every deployment in the caller's process, called directly.

``serve.run(app, _local_testing_mode=True)`` uses this backend. Requests go through the
same :class:`UserCallable` code as in a replica process, and errors come back wrapped the
same way, so a test written against one mode passes in the other.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator
from typing import Any

from shoal.context import ReplicaContext
from shoal.deployment import AppSpec
from shoal.exceptions import DeploymentUnavailableError, RayServeException, wrap_remote_exception
from shoal.runtime.callable import UserCallable
from shoal.runtime.router import resolve_arguments
from shoal.runtime.wire import RequestMeta
from shoal.serving.batching import BatchClock, set_loop_clock


class LocalRouter:
    def __init__(self, backend: LocalBackend, app: str, deployment: str) -> None:
        self._backend = backend
        self._key = (app, deployment)

    def _target(self) -> UserCallable:
        inst = self._backend.instances.get(self._key)
        if inst is None:
            app, dep = self._key
            raise DeploymentUnavailableError(f"deployment {dep!r} of application {app!r} does not exist")
        return inst

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any:
        args, kwargs = await resolve_arguments(args, kwargs)
        try:
            return await self._target().call(method, args, kwargs, meta)
        except (asyncio.CancelledError, RayServeException):
            raise
        except Exception as e:
            raise wrap_remote_exception(e, "".join(traceback.format_exception(e))) from None

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[Any]:
        args, kwargs = await resolve_arguments(args, kwargs)
        try:
            async for item in self._target().stream(method, args, kwargs, meta):
                yield item
        except (asyncio.CancelledError, RayServeException, GeneratorExit):
            raise
        except Exception as e:
            raise wrap_remote_exception(e, "".join(traceback.format_exception(e))) from None


class LocalBackend:
    def __init__(self, loop: asyncio.AbstractEventLoop, *, clock: BatchClock | None = None) -> None:
        self.loop = loop
        # A fake clock (shoal.testing) drives @serve.batch's wait timeout on this loop.
        if clock is not None:
            set_loop_clock(loop, clock)
        self.instances: dict[tuple[str, str], UserCallable] = {}
        self.apps: dict[str, AppSpec] = {}

    def router(self, app: str, deployment: str) -> LocalRouter:
        return LocalRouter(self, app, deployment)

    async def deploy(self, spec: AppSpec) -> None:
        await self.delete(spec.name)
        created: dict[tuple[str, str], UserCallable] = {}
        for name, dspec in spec.deployments.items():
            ctx = ReplicaContext(spec.name, name, f"{name}-local")
            inst = UserCallable(dspec.func_or_class, dspec.init_args, dspec.init_kwargs,
                                is_function=dspec.is_function, context=ctx)
            await inst.initialize(dspec.config.user_config)
            created[(spec.name, name)] = inst
        self.instances.update(created)
        self.apps[spec.name] = spec

    async def delete(self, name: str) -> None:
        self.apps.pop(name, None)
        for key in [k for k in self.instances if k[0] == name]:
            await self.instances.pop(key).shutdown()

    async def shutdown(self) -> None:
        for name in list(self.apps):
            await self.delete(name)
