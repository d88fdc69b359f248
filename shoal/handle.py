"""Handles: how Python code calls a deployment (``await handle.method.remote(...)``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from shoal.context import get_request_context
from shoal.exceptions import RequestCancelledError
from shoal.observability import tracing as _tracing
from shoal.runtime import backend as _backend
from shoal.runtime import mailbox as _mailbox
from shoal.runtime.ids import new_request_id
from shoal.runtime.wire import RequestMeta

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]

_UNSET: Any = object()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class DeploymentHandle:
    """A client of one deployment. Picklable: pass it to other deployments freely.

    Example::

        result = await handle.predict.remote(x)          # in async code
        result = handle.predict.remote(x).result()       # in sync code
        async for token in handle.options(stream=True).generate.remote(prompt): ...
    """

    __slots__ = ("_app", "_backend", "_deployment", "_method", "_model_id", "_router", "_router_of", "_stream")

    def __init__(
        self,
        deployment_name: str,
        app_name: str = "default",
        *,
        method_name: str = "__call__",
        stream: bool = False,
        multiplexed_model_id: str = "",
        _backend: _backend.Backend | None = None,
    ) -> None:
        self._deployment = deployment_name
        self._app = app_name
        self._method = method_name
        self._stream = stream
        self._model_id = multiplexed_model_id
        self._backend = _backend
        self._router: Any = None
        self._router_of: Any = None

    @property
    def deployment_name(self) -> str:
        return self._deployment

    @property
    def app_name(self) -> str:
        return self._app

    @property
    def method_name(self) -> str:
        return self._method

    def options(
        self,
        *,
        method_name: str = _UNSET,
        stream: bool = _UNSET,
        multiplexed_model_id: str = _UNSET,
        use_new_handle_api: bool = _UNSET,
        _prefer_local_routing: bool = _UNSET,
        _by_reference: bool = _UNSET,
        **unsupported: Any,
    ) -> DeploymentHandle:
        """A copy with per-call options changed.

        Ray's ``_prefer_local_routing`` and ``_by_reference`` are accepted and change nothing:
        one machine has no remote node to avoid, and arguments and results always travel by
        value (there is no object store to pass references through)."""
        if unsupported:
            raise TypeError(f"unsupported handle option(s): {', '.join(sorted(unsupported))}")
        return DeploymentHandle(
            self._deployment,
            self._app,
            method_name=self._method if method_name is _UNSET else method_name,
            stream=self._stream if stream is _UNSET else bool(stream),
            multiplexed_model_id=self._model_id if multiplexed_model_id is _UNSET else multiplexed_model_id,
            _backend=self._backend,
        )

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def _get_router(self) -> tuple[_backend.Backend, Any]:
        backend = self._backend or _backend.current()
        if self._router_of is not backend:
            self._router = backend.router(self._app, self._deployment)
            self._router_of = backend
        return backend, self._router

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        """Send a request; returns at once with a response to await or ``.result()``."""
        backend, router = self._get_router()
        parent = get_request_context()
        meta = RequestMeta(request_id=parent.request_id or new_request_id(), stream=self._stream,
                           multiplexed_model_id=self._model_id)
        if _tracing.enabled:  # a client span, child of the span current here (see shoal.observability.tracing)
            router = _tracing.traced(router, self._app, self._deployment)
        loop = backend.loop
        if self._stream:
            return DeploymentResponseGenerator(router.stream(self._method, args, kwargs, meta), loop, meta.request_id)
        coro = router.call(self._method, args, kwargs, meta)
        if _running_loop() is loop:
            return DeploymentResponse(loop.create_task(coro), loop, meta.request_id)
        return DeploymentResponse(_mailbox.submit(coro, loop), loop, meta.request_id)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_handle, (self._deployment, self._app, self._method, self._stream, self._model_id))

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment={self._deployment!r}, app={self._app!r}, method={self._method!r})"


def _rebuild_handle(dep: str, app: str, method: str, stream: bool, model_id: str) -> DeploymentHandle:
    return DeploymentHandle(dep, app, method_name=method, stream=stream, multiplexed_model_id=model_id)


def _translate_cancel(fut: asyncio.Future[Any] | concurrent.futures.Future[Any], request_id: str) -> None:
    if fut.cancelled():
        task = asyncio.current_task() if _running_loop() else None
        if task is None or task.cancelling() == 0:
            raise RequestCancelledError(request_id) from None


class DeploymentResponse:
    """The future result of a handle call: ``await`` it, or call ``.result()`` in sync code."""

    __slots__ = ("_cfut", "_fut", "_loop", "request_id")

    def __init__(self, fut: asyncio.Future[Any] | concurrent.futures.Future[Any],
                 loop: asyncio.AbstractEventLoop, request_id: str) -> None:
        self._fut = fut
        self._loop = loop
        self._cfut: concurrent.futures.Future[Any] | None = fut if isinstance(fut, concurrent.futures.Future) else None
        self.request_id = request_id

    def _concurrent(self) -> concurrent.futures.Future[Any]:
        if self._cfut is None:
            cfut: concurrent.futures.Future[Any] = concurrent.futures.Future()
            task = self._fut
            assert isinstance(task, asyncio.Future)

            def copy(t: asyncio.Future[Any]) -> None:
                if t.cancelled():
                    cfut.cancel()
                elif t.exception() is not None:
                    cfut.set_exception(t.exception())
                else:
                    cfut.set_result(t.result())

            _mailbox.mailbox(self._loop).post(task.add_done_callback, copy)
            self._cfut = cfut
        return self._cfut

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Any:
        fut = self._fut
        try:
            if isinstance(fut, asyncio.Future) and _running_loop() is self._loop:
                return await fut
            return await _mailbox.wrap(self._concurrent())
        except asyncio.CancelledError:
            _translate_cancel(self._fut, self.request_id)
            raise

    def result(self, timeout_s: float | None = None, **_ignored: Any) -> Any:
        """Block until the result is ready. Not allowed on the loop that runs the request."""
        if _running_loop() is self._loop:
            raise RuntimeError(
                "DeploymentResponse.result() would block the event loop it needs; use `await response` instead."
            )
        cfut = self._concurrent()
        try:
            return cfut.result(timeout_s)
        except concurrent.futures.CancelledError:
            raise RequestCancelledError(self.request_id) from None
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout_s}s") from None

    def cancel(self) -> None:
        """Cancel the request; the replica sees ``asyncio.CancelledError``."""
        fut = self._fut
        if isinstance(fut, concurrent.futures.Future) or _running_loop() is self._loop:
            fut.cancel()
        else:
            self._loop.call_soon_threadsafe(fut.cancel)

    def done(self) -> bool:
        return self._fut.done()


class DeploymentResponseGenerator:
    """The result of a ``stream=True`` call: iterate it with ``async for`` (or ``for`` in sync code)."""

    def __init__(self, agen: AsyncIterator[Any], loop: asyncio.AbstractEventLoop, request_id: str) -> None:
        self._agen = agen
        self._loop = loop
        self.request_id = request_id
        self._closed = False

    def __aiter__(self) -> DeploymentResponseGenerator:
        return self

    async def __anext__(self) -> Any:
        if self._closed:
            raise StopAsyncIteration
        if _running_loop() is self._loop:
            return await self._agen.__anext__()
        return await _mailbox.wrap(_mailbox.submit(self._anext(), self._loop))

    async def _anext(self) -> Any:
        return await self._agen.__anext__()

    def __iter__(self) -> Iterator[Any]:
        if _running_loop() is self._loop:
            raise RuntimeError("iterate a streaming response with `async for` on its own event loop")
        while True:
            cfut: concurrent.futures.Future[Any] = asyncio.run_coroutine_threadsafe(self._anext(), self._loop)
            try:
                yield cfut.result()
            except StopAsyncIteration:
                return

    def cancel(self) -> None:
        """Stop the stream; the replica's generator is cancelled."""
        self._closed = True
        aclose = getattr(self._agen, "aclose", None)
        if aclose is None:
            return
        if _running_loop() is self._loop:
            self._loop.create_task(aclose())
        else:
            asyncio.run_coroutine_threadsafe(aclose(), self._loop)


if not TYPE_CHECKING:  # hidden from mypy, which would accept any name here

    def __getattr__(name: str) -> Any:
        # A Ray Serve name that shoal does not support raises NotSupportedError with the reason, not an
        # AttributeError (the table is shoal/_compat.py, imported only here: this module stays light;
        # the import system's probes such as __path__ do not load it).
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from shoal._compat import missing_attribute
        from shoal.exceptions import NotSupportedError

        return missing_attribute(__name__, name, NotSupportedError)
