"""The seam between handles and whatever executes their calls.

A *backend* owns an event loop and hands out one router per deployment. The process
runtime (replica processes, proxies, the driver) and the in-process local testing mode are
the two implementations; handles never know which one they talk to.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Protocol, TypeVar

from shoal.runtime.wire import RequestMeta

T = TypeVar("T")


class RouterLike(Protocol):
    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any: ...

    def stream(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta
    ) -> AsyncIterator[Any]: ...


class Backend(Protocol):
    loop: asyncio.AbstractEventLoop

    def router(self, app: str, deployment: str) -> RouterLike: ...


_current: Backend | None = None


def set_current(backend: Backend | None) -> None:
    global _current
    _current = backend


def current() -> Backend:
    if _current is None:
        from shoal.exceptions import RayServeException

        raise RayServeException(
            "No shoal instance is running in this process: call serve.run(...) or serve.start() first."
        )
    return _current


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a core dependency on Linux
        return asyncio.new_event_loop()


class LoopThread:
    """An event loop on a daemon thread, so that shoal never shares the user's loop."""

    def __init__(self, name: str = "shoal-loop") -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._started.set)
        self.loop.run_forever()
        # Finish what is left so that nothing warns about pending tasks at exit.
        pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def start(self) -> LoopThread:
        self._thread.start()
        self._started.wait()
        return self

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop from another thread and wait for its result."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.run() called from its own loop; await instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
