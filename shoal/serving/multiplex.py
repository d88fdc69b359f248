"""``@serve.multiplexed``: many models per replica, loaded on demand, least recently used evicted.

Example::

    @serve.deployment
    class Models:
        @serve.multiplexed(max_num_models_per_replica=3)
        async def get_model(self, model_id: str):
            return await load(model_id)

        async def __call__(self, request):
            model = await self.get_model(serve.get_multiplexed_model_id())
            return model.predict(await request.json())

Callers choose the model with the ``serve_multiplexed_model_id`` HTTP header or
``handle.options(multiplexed_model_id=...)``. Each replica reports the models it holds, and
routers prefer replicas that already hold the requested one.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.context import get_request_context
from shoal.observability import metrics as _metrics

__all__ = ["get_multiplexed_model_id", "multiplexed"]

# Set by the replica process: called with the model ids a replica holds after every change.
models_changed_hook: Callable[[tuple[str, ...]], None] | None = None


def get_multiplexed_model_id() -> str:
    """The model id of the request being served ("" when the caller named none)."""
    return get_request_context().multiplexed_model_id


class _ModelCache:
    """LRU cache of loaded models for one deployment instance. Runs on the replica's loop."""

    def __init__(self, load: Callable[[str], Awaitable[Any]], capacity: int) -> None:
        self._load = load
        self.capacity = capacity
        self.models: OrderedDict[str, Any] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Any]] = {}

    async def get(self, model_id: str) -> Any:
        _metrics.PROCESS.model_requested()
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        pending = self._loading.get(model_id)
        if pending is not None:  # another request is loading it: share that load
            return await asyncio.shield(pending)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._loading[model_id] = fut
        try:
            while len(self.models) >= self.capacity:
                self._evict()
            begun = time.perf_counter()
            model = await self._load(model_id)
            _metrics.PROCESS.model_loaded(time.perf_counter() - begun)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it
            raise
        else:
            fut.set_result(model)
            self.models[model_id] = model
            self._report()
            return model
        finally:
            del self._loading[model_id]

    def _evict(self) -> None:
        begun = time.perf_counter()
        _, model = self.models.popitem(last=False)
        self._report()
        # Dropping the last reference runs the model's __del__ (CPython frees it at once).
        del model
        _metrics.PROCESS.model_unloaded(time.perf_counter() - begun)

    def _report(self) -> None:
        if models_changed_hook is not None:
            models_changed_hook(tuple(self.models))


def multiplexed(
    func: Callable[..., Awaitable[Any]] | None = None, *, max_num_models_per_replica: int = 3
) -> Any:
    """Decorate the async method (or function) that loads one model by id; results are cached.

    ``max_num_models_per_replica`` bounds how many models one replica keeps (-1: no bound).
    """
    if max_num_models_per_replica != -1 and (
        not isinstance(max_num_models_per_replica, int) or max_num_models_per_replica < 1
    ):
        raise ValueError("max_num_models_per_replica must be a positive integer or -1")
    capacity = max_num_models_per_replica if max_num_models_per_replica != -1 else 1 << 62

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError("@serve.multiplexed must decorate an async function taking a model id")
        params = list(inspect.signature(fn).parameters)
        is_method = bool(params) and params[0] == "self"
        attr = f"__shoal_models_{fn.__name__}"
        # Plain functions keep one cache per process, created on first use.
        module_cache: list[_ModelCache] = []

        if is_method:
            @functools.wraps(fn)
            async def method_wrapper(self: Any, model_id: str | None = None) -> Any:
                cache = self.__dict__.get(attr)
                if cache is None:
                    cache = _ModelCache(functools.partial(fn, self), capacity)
                    self.__dict__[attr] = cache
                return await cache.get(_model_id(model_id))

            return method_wrapper

        @functools.wraps(fn)
        async def function_wrapper(model_id: str | None = None) -> Any:
            if not module_cache:
                module_cache.append(_ModelCache(fn, capacity))
            return await module_cache[0].get(_model_id(model_id))

        return function_wrapper

    if func is not None:
        return decorate(func)
    return decorate


def _model_id(given: str | None) -> str:
    model_id = given if given is not None else get_multiplexed_model_id()
    if not isinstance(model_id, str) or not model_id:
        raise ValueError("no model id: pass one, or send the request with a multiplexed model id")
    return model_id
