"""A process's link to the controller: membership for its routers, control messages, admin calls.

Replica processes, proxy processes, the driver (the process that called ``serve.run``) and
the CLI each hold one :class:`ControllerClient`. It is the process-runtime implementation
of :class:`~shoal.runtime.backend.Backend`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from shoal.exceptions import ControllerError
from shoal.runtime.router import Router
from shoal.runtime.wire import (
    Call,
    FramedProtocol,
    HandleStats,
    Hello,
    Membership,
    Reply,
    Role,
    Subscribe,
    connect_unix,
)

__all__ = ["ControllerClient", "ControllerError"]  # ControllerError: its old path

logger = logging.getLogger("shoal.client")


class ControllerClient:
    def __init__(
        self,
        controller_path: str,
        secret: bytes,
        role: Role,
        process_id: str,
        loop: asyncio.AbstractEventLoop,
        on_control: Callable[[Any], None] | None = None,
        *,
        reconnect_s: float = 0.0,
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self.path = controller_path
        self.secret = secret
        self.role = role
        self.process_id = process_id
        self.loop = loop
        self.on_control = on_control
        self._proto: FramedProtocol | None = None
        self._routers: dict[tuple[str, str], Router] = {}
        self._lock = threading.Lock()
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self.closed: asyncio.Event = asyncio.Event()
        self._reporter: asyncio.Task[None] | None = None
        # A detached instance's replicas and proxy outlive their controller: when the
        # connection drops they keep serving and try to reconnect for this long (0: give up
        # at once, ``closed`` is set), telling a restarted controller they are resuming.
        self.reconnect_s = reconnect_s
        self.on_reconnect = on_reconnect
        self.resumed = False
        self._closing = False
        self._reconnecting: asyncio.Task[None] | None = None
        # Handles for app X resolve to another app key here (a canary replica calls its own
        # versions of the app's deployments): visible app name -> app key.
        self.app_alias: dict[str, str] = {}

    async def connect(self, timeout: float = 10.0) -> None:
        self._proto = await connect_unix(self.path, self.secret, self._on_message, self._on_close, timeout=timeout)
        self._proto.send(Hello(self.role, self.process_id, os.getpid(), self.resumed))
        for app, dep in list(self._routers):
            self._proto.send(Subscribe(app, dep))
        if self._reporter is None:
            self._reporter = self.loop.create_task(self._report_loop())

    @property
    def connected(self) -> bool:
        return self._proto is not None and not self._proto.closed

    # -- Backend
    def router(self, app: str, deployment: str) -> Router:
        if self.app_alias:
            app = self.app_alias.get(app, app)
        key = (app, deployment)
        router = self._routers.get(key)
        if router is not None:
            return router
        with self._lock:
            router = self._routers.get(key)
            if router is None:
                router = Router(app, deployment, self.secret)
                router.on_cold_wait = self._report_now
                self._routers[key] = router
                self._call_in_loop(self._subscribe, key)
        return router

    def routers(self) -> list[tuple[tuple[str, str], Router]]:
        """This process's routers by (app, deployment) (read for metrics)."""
        return list(self._routers.items())

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    # -- load reports for autoscaling
    def _report_now(self, router: Router) -> None:
        self._report(router)

    def _report(self, router: Router) -> None:
        if self._proto is None or self._proto.closed:
            return
        try:
            self._proto.send(HandleStats(router.app, router.deployment, router.num_queued, router.num_in_flight))
        except ConnectionError:
            pass

    async def _report_loop(self) -> None:
        """Report every autoscaling deployment's load at its metrics interval."""
        due: dict[tuple[str, str], float] = {}
        while not self.closed.is_set():
            now = self.loop.time()
            nap = 1.0  # idle processes wake rarely; autoscaling deployments set the pace
            for key, router in list(self._routers.items()):
                interval = router.metrics_interval_s
                if interval <= 0:
                    continue
                if now >= due.get(key, 0.0):
                    self._report(router)
                    due[key] = now + interval
                nap = min(nap, max(0.01, due[key] - now))
            await asyncio.sleep(nap)

    def _subscribe(self, key: tuple[str, str]) -> None:
        if self._proto is not None and not self._proto.closed:
            self._proto.send(Subscribe(*key))

    # -- messages
    def send(self, msg: Any) -> None:
        if self._proto is None:
            raise ConnectionError("not connected to the controller")
        self._proto.send(msg)

    async def call(self, op: str, timeout: float | None = 30.0, **args: Any) -> Any:
        """An admin request to the controller (status, delete, shutdown, ...)."""
        if self._proto is None or self._proto.closed:
            raise ConnectionError("not connected to the controller")
        cid = next(self._ids)
        fut: asyncio.Future[Any] = self.loop.create_future()
        self._calls[cid] = fut
        try:
            self._proto.send(Call(cid, op, args))
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._calls.pop(cid, None)

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        if isinstance(msg, Membership):
            router = self._routers.get((msg.app, msg.deployment))
            if router is not None:
                router.update(msg)
        elif isinstance(msg, Reply) and msg.id in self._calls:
            fut = self._calls.pop(msg.id)
            if not fut.done():
                if msg.ok:
                    fut.set_result(msg.value)
                else:
                    fut.set_exception(ControllerError(msg.error))
        elif self.on_control is not None:
            self.on_control(msg)

    def _on_close(self, proto: FramedProtocol, exc: BaseException | None) -> None:
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ConnectionError("lost the connection to the controller"))
        self._calls.clear()
        if self.reconnect_s > 0 and not self._closing and self._reconnecting is None:
            logger.warning("lost the connection to the controller; serving on and reconnecting for up to %.0fs",
                           self.reconnect_s)
            self._reconnecting = self.loop.create_task(self._reconnect())
            return
        self.closed.set()

    async def _reconnect(self) -> None:
        deadline = self.loop.time() + self.reconnect_s
        delay = 0.05
        try:
            while not self._closing and self.loop.time() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                try:
                    await self.connect(timeout=2.0)
                except (OSError, ConnectionError, TimeoutError):
                    continue
                logger.info("reconnected to the controller")
                if self.on_reconnect is not None:
                    self.on_reconnect()
                return
            if not self._closing:
                logger.error("no controller came back within %.0fs; giving up", self.reconnect_s)
            self.closed.set()
        finally:
            self._reconnecting = None

    def close(self) -> None:
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._reporter is not None:
            self._reporter.cancel()
        for router in self._routers.values():
            router.close()
        if self._proto is not None:
            self._proto.close()
