"""One request's exchange with the client: forward the application's answer, honour the
request timeout and client disconnects, and answer errors.

Timeouts and client disconnects cancel the request's task (and with it the request
upstream). The disconnect watcher starts only for requests that take a while
(:data:`WATCH_AFTER_S`), so that fast requests cost no extra task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from shoal.exceptions import RayTaskError, ReplicaDiedError
from shoal.runtime.http.errors import error_answer, send_json
from shoal.runtime.http.response import DISCONNECT, TIMEOUT, ResponseState
from shoal.runtime.wire import RequestMeta

logger = logging.getLogger("shoal.proxy")

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Runner = Callable[[Send], Awaitable[None]]
# access(method, path, status, started, request_id, route): an access-log line
Access = Callable[[str, str, int, float, str, str], None]

# Requests still running after this long get a task that watches for the client going away.
WATCH_AFTER_S = 0.2


class Exchange:
    """Forwards one request's response; :meth:`run` returns the status it ended with
    (499: the client went away)."""

    __slots__ = ("access", "meta", "method", "path", "receive", "send", "started_at", "state", "task", "timeout",
                 "watcher")

    def __init__(self, meta: RequestMeta, scope: dict[str, Any], receive: Receive, send: Send,
                 timeout: float | None, access: Access, clock: Callable[[], float] = time.monotonic) -> None:
        self.meta = meta
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.receive = receive
        self.send = send
        self.timeout = timeout
        self.access = access
        self.state = ResponseState(meta.request_id, send)
        self.started_at = clock()
        self.task: asyncio.Task[Any] | None = None
        self.watcher: asyncio.Task[None] | None = None

    async def run(self, runner: Runner) -> int:
        loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        state = self.state
        timer = loop.call_later(self.timeout, self.stop, TIMEOUT) if self.timeout else None
        watch_timer = loop.call_later(WATCH_AFTER_S, self._start_watch, loop)
        try:
            await runner(state.send)
        except asyncio.CancelledError:
            if not state.why:
                raise  # the server itself is shutting down
            assert self.task is not None
            self.task.uncancel()
            await self._cancelled()
        except Exception as exc:
            await self._failed(exc)
        finally:
            state.finished = True
            if timer is not None:
                timer.cancel()
            watch_timer.cancel()
            if self.watcher is not None and not self.watcher.done():
                self.watcher.cancel()
        return state.status

    def stop(self, why: str) -> None:
        """Cancel the request (TIMEOUT or DISCONNECT) unless it is over already."""
        if self.state.cancel(why) and self.task is not None:
            self.task.cancel()

    def _start_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.state.finished:
            self.watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self.stop(DISCONNECT)
                return

    def _log_access(self, status: int) -> None:
        self.access(self.method, self.path, status, self.started_at, self.meta.request_id, self.meta.route)

    async def _cancelled(self) -> None:
        """The front cancelled the request: a timeout (408) or the client going away (499)."""
        state = self.state
        if state.why != TIMEOUT:
            state.status = 499
            return
        state.status = 408
        rid = self.meta.request_id
        logger.warning("request %s timed out after %ss", rid, self.timeout)
        if not state.started:
            await send_json(self.send, 408, {"error": "request timed out", "request_id": rid}, rid)
            self._log_access(408)

    async def _failed(self, exc: Exception) -> None:
        """The request raised: answer it with an error when its response has not started."""
        state, rid = self.state, self.meta.request_id
        if state.gone:  # most often the client hung up mid-response (e.g. a pipelining client)
            logger.warning("request %s: sending the response failed; did the client go away? %r", rid, exc)
            state.status = 499
            return
        if state.complete:
            # E.g. FastAPI's error middleware: it answers 500, then raises. The client has its
            # whole answer; keep the connection (re-raising would make uvicorn drop it).
            logger.error("request %s raised after its response was sent", rid,
                         exc_info=None if isinstance(exc, RayTaskError) else exc)
            return
        if state.started:
            logger.error("request %s failed after its response started: %r", rid, exc)
            raise exc
        status, body, extra = error_answer(exc, rid)
        state.status = status
        if status == 500:
            # A replica process logged its exception's traceback; one raised here (an app
            # served in this process, or shoal's own) gets it logged now.
            logger.error("request %s to %s failed: %s", rid, self.meta.route,
                         str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                         exc_info=None if isinstance(exc, (RayTaskError, ReplicaDiedError)) else exc)
        await send_json(self.send, status, body, rid, extra)
        if status != 500 or isinstance(exc, ReplicaDiedError):  # answered here: no replica logged it
            self._log_access(status)
