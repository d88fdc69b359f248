"""The state of one ``@serve.batch`` function: its settings, its queues (one per instance and
event loop) and how a batch is executed."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import threading
import weakref
from collections.abc import AsyncGenerator, Callable
from typing import Any

from shoal.exceptions import RayServeException
from shoal.serving.batching.calls import CallShape
from shoal.serving.batching.queue import BatchQueue, Item, oversized_error

logger = logging.getLogger("shoal.serving.batching")

_STREAM_END = (StopIteration, StopAsyncIteration)


def _defined_in_class(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` was defined in a class body (so its first argument is the instance)."""
    parts = getattr(fn, "__qualname__", "").split(".")
    if len(parts) >= 2 and parts[-2] != "<locals>":
        return True
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "self"


def validate(max_batch_size: Any, batch_wait_timeout_s: Any, max_concurrent_batches: Any,
              batch_size_fn: Any) -> None:
    _check_max_batch_size(max_batch_size)
    _check_timeout(batch_wait_timeout_s)
    if (not isinstance(max_concurrent_batches, int) or isinstance(max_concurrent_batches, bool)
            or max_concurrent_batches < 1):
        raise ValueError(f"max_concurrent_batches must be an integer >= 1, got {max_concurrent_batches!r}")
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise ValueError(f"batch_size_fn must be a callable or None, got {batch_size_fn!r}")


def _check_max_batch_size(value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {value!r}")


def _check_timeout(value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value) or value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a number >= 0, got {value!r}")


class Batcher:
    """Configuration of one decorated function, and its queues (one per instance and loop).

    Pickles without its queues: a class shipped to a replica creates fresh ones there.
    """

    def __init__(self, fn: Callable[..., Any], max_batch_size: int, batch_wait_timeout_s: float,
                 max_concurrent_batches: int, batch_size_fn: Callable[[list[Any]], int] | None) -> None:
        self.fn = fn
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.streaming = inspect.isasyncgenfunction(fn)
        self.is_method = _defined_in_class(fn)
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = float(batch_wait_timeout_s)
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_size_fn = batch_size_fn
        self._init_runtime()

    _RUNTIME = ("_lock", "_queues", "_shapes")

    def _init_runtime(self) -> None:
        # Reentrant: the weakref callback that forgets a dead instance's queue runs inside
        # garbage collection, which may happen while this thread holds the lock.
        self._lock = threading.RLock()
        self._queues: dict[tuple[int, int], BatchQueue] = {}
        self._shapes: dict[bool, CallShape] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self._RUNTIME}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    # -- settings
    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        """Change the batch size limit; applies to batches formed from now on."""
        _check_max_batch_size(new_max_batch_size)
        self.max_batch_size = new_max_batch_size
        self._poke_all()

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        """Change how long a partial batch waits; applies to the batch forming now too."""
        _check_timeout(new_batch_wait_timeout_s)
        self.batch_wait_timeout_s = float(new_batch_wait_timeout_s)
        self._poke_all()

    def get_max_batch_size(self) -> int:
        return self.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.batch_wait_timeout_s

    def _poke_all(self) -> None:
        # Setters may run on another thread (a sync reconfigure() runs on the user thread).
        for q in list(self._queues.values()):
            try:
                q.loop.call_soon_threadsafe(q.poke)
            except RuntimeError:  # its loop is closed
                pass

    # -- queues
    def shape(self, method: bool) -> CallShape:
        s = self._shapes.get(method)
        if s is None:
            s = self._shapes[method] = CallShape(self.fn, skip_first=method)
        return s

    def queue_for(self, owner: Any) -> BatchQueue:
        loop = asyncio.get_running_loop()
        key = (id(owner), id(loop))
        q = self._queues.get(key)
        if q is not None and q.loop is loop and (q.owner_ref is None or q.owner_ref() is owner):
            return q
        with self._lock:
            for k, old in list(self._queues.items()):
                if old.loop.is_closed() or (old.owner_ref is not None and old.owner_ref() is None):
                    old.close()
                    self._queues.pop(k, None)
            owner_ref: Callable[[], Any] | None = None
            if self.is_method:
                try:
                    owner_ref = weakref.ref(owner, functools.partial(self._forget, key))
                except TypeError:
                    # Not weak-referenceable (__slots__ without __weakref__): hold it, so its id
                    # can't be reused while the queue exists.
                    owner_ref = _strong_ref(owner)
            q = BatchQueue(self, loop, owner_ref)
            self._queues[key] = q
            return q

    def _forget(self, key: tuple[int, int], ref: Any) -> None:
        with self._lock:
            q = self._queues.get(key)
            if q is not None and q.owner_ref is ref:
                q.close()
                self._queues.pop(key, None)

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Item:
        if self.is_method:
            if not args:
                raise TypeError(f"@serve.batch method {self.name!r} called without its instance")
            owner: Any = args[0]
            args = args[1:]
        else:
            owner = None
        shape = self.shape(self.is_method)
        try:
            arguments = shape.bind(args, kwargs)
        except TypeError as e:
            raise TypeError(f"{self.name}(): {e}") from None
        if self.batch_size_fn is not None:
            # An item too big for any batch fails now, rather than after waiting in the queue.
            size = self.batch_size_fn([shape.first_value(arguments)])
            if size > self.max_batch_size:
                raise oversized_error(self)
        q = self.queue_for(owner)
        item = Item(q, owner, arguments, q.clock.time(), self.streaming)
        q.put(item)
        return item

    # -- execution
    def _call(self, items: list[Item]) -> Any:
        shape = self.shape(self.is_method)
        args, kwargs = shape.assemble([it.arguments for it in items])
        if self.is_method:
            return self.fn(items[0].owner, *args, **kwargs)
        return self.fn(*args, **kwargs)

    async def execute(self, items: list[Item]) -> Callable[[], None]:
        """Run one batch; returns what hands its outcome to the callers (run it next)."""
        if self.streaming:
            await self._execute_stream(items)
            return _nothing
        try:
            results = await self._call(items)
            _check_length(self.name, results, len(items))
        except Exception as e:
            error = e

            def fail() -> None:
                for it in items:
                    it.fail(error)

            return fail
        except BaseException:
            for it in items:
                it.cancel()
            raise

        def resolve() -> None:
            for it, result in zip(items, results, strict=False):
                it.resolve(result)

        return resolve

    async def _execute_stream(self, items: list[Item]) -> None:
        agen: AsyncGenerator[Any, None] | None = None
        try:
            agen = self._call(items)
            async for step in agen:
                _check_length(self.name, step, len(items))
                still_open = 0
                for it, value in zip(items, step, strict=False):
                    s = it.stream
                    assert s is not None
                    if s.closed:
                        continue
                    if value is StopIteration or value is StopAsyncIteration or isinstance(value, _STREAM_END):
                        s.finish()
                    else:
                        s.push(value)
                        still_open += 1
                if still_open == 0:
                    # Every caller has its end (or went away): stop producing for nobody.
                    break
        except Exception as e:
            for it in items:
                it.fail(e)
        except BaseException:
            for it in items:
                it.cancel()
            raise
        finally:
            if agen is not None:
                try:
                    await agen.aclose()
                except Exception:
                    logger.exception("closing the @serve.batch generator %s failed", self.name)
            for it in items:
                if it.stream is not None:
                    it.stream.finish()


def _nothing() -> None:
    pass


def _strong_ref(obj: Any) -> Callable[[], Any]:
    return lambda: obj


def _check_length(name: str, results: Any, expected: int) -> None:
    try:
        got = len(results)
    except TypeError:
        raise TypeError(
            f"@serve.batch function {name!r} must return (or yield) a list with one entry per request, "
            f"got {type(results).__name__}"
        ) from None
    if got != expected:
        raise RayServeException(
            f"@serve.batch function {name!r} doesn't preserve the batch size: it got {expected} requests "
            f"but returned {got} results"
        )
