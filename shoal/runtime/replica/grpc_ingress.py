"""gRPC served by an ingress replica itself, on the instance's shared gRPC port.

As HTTP does (:meth:`ReplicaCore.serve_http`), each ingress replica of a local instance that
serves gRPC (``grpc_options.ingress_serves_grpc``, the default) runs the gRPC ingress every
shoal process shares (:class:`~shoal.runtime.grpc_front.GRPCFront`) on the gRPC port, next to
the proxy's server: every server binds the port with ``SO_REUSEPORT``, so the kernel spreads
new connections over the proxy and the replicas. A call for this replica's own application
runs here, in-process (no hop, no pickling of the request message), under the same rules as a
call that came through a router: a ``max_ongoing_requests`` slot (waiting in line for one, up to
``max_queued_requests``, then ``RESOURCE_EXHAUSTED``), the replica's counters, metrics, access
log and trace span. Calls for other applications (and for a multiplexed model that another
replica holds and this one does not) go through the routers, as the proxy sends them. API
keys, TLS, ``request_timeout_s``, status codes, access-log lines and gRPC metrics are the
front's own, the same in every process.

On a drain the server stops taking calls at once (clients' channels reconnect to the other
servers on the port) and running calls get the graceful shutdown timeout to finish.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from shoal.context import RequestContext, _request_ctx
from shoal.exceptions import wrap_remote_exception
from shoal.runtime.http.admit import RouterSource, serves_here
from shoal.runtime.wire import RequestMeta, Routes

if TYPE_CHECKING:
    from shoal.runtime.grpc_front import GRPCFront
    from shoal.runtime.grpc_methods import GRPCFrontOptions
    from shoal.runtime.http.options import FrontOptions
    from shoal.runtime.replica.core import ReplicaCore

__all__ = ["LocalSource", "start_grpc"]

logger = logging.getLogger("shoal.replica")


class LocalSource:
    """The routers a replica's gRPC front calls through: this replica itself for its own
    deployment (see :class:`_HereFirst`), the process's routers for every other one."""

    def __init__(self, core: ReplicaCore, source: RouterSource) -> None:
        self.core = core
        self.source = source

    def router(self, app: str, deployment: str) -> Any:
        # A gang runs each request on every rank (GangPeers): its calls take the router's way.
        if self.core.key == (app, deployment) and self.core.gang is None:
            return _HereFirst(self.core, self.source, app, deployment)
        return self.source.router(app, deployment)


class _HereFirst:
    """Runs a call of the replica's own deployment in this process, unless it names a
    multiplexed model held by another replica (then the router sends it there)."""

    __slots__ = ("app", "core", "deployment", "source")

    def __init__(self, core: ReplicaCore, source: RouterSource, app: str, deployment: str) -> None:
        self.core = core
        self.source = source
        self.app = app
        self.deployment = deployment

    def _here(self, meta: RequestMeta) -> bool:
        return serves_here(self.core, self.source, self.app, self.deployment, meta.multiplexed_model_id)

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any:
        if not self._here(meta):
            return await self.source.router(self.app, self.deployment).call(method, args, kwargs, meta)
        core = self.core
        user = core._user()
        await core.slots.admit()
        ticket = core.accounts.open(meta, method)
        token = _request_ctx.set(RequestContext(meta.request_id, meta.multiplexed_model_id, meta.route))
        status = "ERROR"
        try:
            result = await user.call(method, args, kwargs, meta)
            status = "OK"
            return result
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        except Exception as e:
            raise _as_remote(e, meta, method) from None
        finally:
            core.slots.release()
            core.accounts.close(ticket, status == "ERROR", status, "CALL", method, "")
            _request_ctx.reset(token)

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[Any]:
        if not self._here(meta):
            async for item in self.source.router(self.app, self.deployment).stream(method, args, kwargs, meta):
                yield item
            return
        core = self.core
        user = core._user()
        await core.slots.admit()
        ticket = core.accounts.open(meta, method)
        status = "ERROR"
        items = user.stream(method, args, kwargs, meta)
        try:
            async for item in items:
                yield item
            status = "OK"
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled, or went away
            status = "CANCELLED"
            raise
        except Exception as e:
            raise _as_remote(e, meta, method) from None
        finally:
            try:
                await items.aclose()  # type: ignore[attr-defined]
            finally:
                core.slots.release()
                core.accounts.close(ticket, status == "ERROR", status, "STREAM", method, "")


def _as_remote(exc: Exception, meta: RequestMeta, method: str) -> BaseException:
    """A deployment's exception as a call through a router raises it (a RayTaskError with its
    cause; shoal's own errors unchanged), logged as the replica logs a failed call."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 400 <= status < 500:  # the caller asked for something wrong
        logger.warning("request %s to %s refused: %s: %s", meta.request_id, method, type(exc).__name__, exc)
    else:
        logger.error("request %s to %s failed:\n%s", meta.request_id, method, traceback.format_exc())
    return wrap_remote_exception(exc, "".join(traceback.format_exception(exc)))


async def start_grpc(core: ReplicaCore, source: RouterSource, options: GRPCFrontOptions,
                     front: FrontOptions, routes: Routes | None = None) -> GRPCFront:
    """Serve gRPC on the shared port (``options``) with the HTTP port's API keys, limits and
    TLS (``front``); the started front. Raises (RuntimeError, ValueError, OSError) when a
    servicer function cannot be used or the port cannot be opened."""
    from shoal.runtime.grpc_front import load_front, server_credentials

    grpc_front = load_front(LocalSource(core, source), options, front.api_keys, front.auth,
                            front.max_request_body_bytes, credentials=server_credentials(front))
    if routes is not None:
        grpc_front.set_routes(routes)
    await grpc_front.start()
    return grpc_front
