"""A deployment's custom request router inside one caller's :class:`~shoal.runtime.router.Router`.

The router class (``RequestRouterConfig.request_router_class``) comes with the deployment's
membership, is built once per caller process and deployment, and is asked for every request
(:meth:`CustomRouting.choose`). Nothing it does may hang or fail a request:

* ``choose_replicas()`` that raises, or returns anything but a list of lists of
  :class:`~shoal.request_router.RunningReplica`: the request is routed by shoal's default
  choice (power of two choices, model-aware), and a warning is logged (at most every
  :data:`WARN_EVERY_S`).
* ``choose_replicas()`` that does not return within ``choose_replicas_timeout_s``: the call is
  cancelled (and left behind should it ignore the cancellation), the request is routed by the
  default choice, and the router is left out for :data:`SKIP_AFTER_TIMEOUT_S` so that requests
  do not each wait out the timeout; then it is asked again.
* A class that cannot be imported or built, or whose ``initialize_state`` raises: logged once,
  and the deployment is routed by the default choice in this process.
* ``on_request_routed`` or ``update_replicas`` that raises: logged; routing goes on.

A router that blocks the event loop (sync code that sleeps or spins inside ``choose_replicas``)
blocks every request of its process: that cannot be bounded from the same thread.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import time
from typing import Any

import cloudpickle

from shoal.config import DeploymentConfig, RequestRouterConfig
from shoal.context import ReplicaID
from shoal.request_router import (
    DeploymentHandleSource,
    DeploymentID,
    PendingRequest,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
    local_node_id,
)

__all__ = ["SKIP_AFTER_TIMEOUT_S", "WARN_EVERY_S", "CustomRouting", "RouterLoadError", "check_ranks",
           "load_router_class", "request_router_blob"]

logger = logging.getLogger("shoal.router")

# After choose_replicas() timed out, requests skip the custom router for this long.
SKIP_AFTER_TIMEOUT_S = 10.0
# A misbehaving router is reported at most this often (per deployment and process).
WARN_EVERY_S = 30.0


class RouterLoadError(Exception):
    """The configured request router class cannot be used."""


def request_router_blob(config: DeploymentConfig, deployment: str) -> bytes:
    """A deployment's custom request router config as :class:`~shoal.runtime.wire.Membership`
    carries it to routers (b"": shoal's own routing). cloudpickle: a class defined in a script
    travels by value, one from a module by reference (routers import it)."""
    rc = config.custom_router()
    if rc is None:
        return b""
    try:
        blob: bytes = cloudpickle.dumps(rc, protocol=5)
    except Exception as e:  # e.g. request_router_kwargs that cannot be pickled
        logger.error("deployment %s: cannot pass request_router_config on to its callers (%s: %s); "
                     "they route with shoal's default choice", deployment, type(e).__name__, e)
        return b""
    return blob


def load_router_class(spec: Any) -> type[RequestRouter]:
    """The class ``spec`` names (an import path ``module:Class`` / ``module.Class``, or the
    class itself); it must subclass :class:`~shoal.request_router.RequestRouter`."""
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":")
        if not sep:
            module_name, _, attr = spec.rpartition(".")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as e:
            raise RouterLoadError(f"cannot import request_router_class {spec!r}: {type(e).__name__}: {e}") from None
    else:
        obj = spec
    if not (isinstance(obj, type) and issubclass(obj, RequestRouter)):
        raise RouterLoadError(f"request_router_class {spec!r} is not a subclass of "
                              "shoal.request_router.RequestRouter")
    return obj


def check_ranks(result: Any) -> list[list[RunningReplica]] | None:
    """``result`` as ranks (lists of replicas), or None when it is not a list of lists of
    :class:`RunningReplica`."""
    if not isinstance(result, list | tuple):
        return None
    ranks: list[list[RunningReplica]] = []
    for rank in result:
        if not isinstance(rank, list | tuple) or not all(isinstance(r, RunningReplica) for r in rank):
            return None
        ranks.append(list(rank))
    return ranks


def _handle_source() -> DeploymentHandleSource:
    from shoal import context

    return DeploymentHandleSource.REPLICA if context._get_internal_replica_context() is not None \
        else DeploymentHandleSource.UNKNOWN


class CustomRouting:
    """One deployment's router instance in this process, called with bounds (module docstring)."""

    def __init__(self, config: RequestRouterConfig, router: RequestRouter, name: str) -> None:
        self.config = config
        self.router = router
        self.name = name  # "app/deployment", for messages
        self.timeout_s = float(config.choose_replicas_timeout_s)
        self._skip_until = 0.0
        self._warned_at = -1e9
        self.fallbacks = 0  # requests routed by the default choice because the router failed

    @classmethod
    def load(cls, blob: bytes, app: str, deployment: str) -> CustomRouting | None:
        """Build the router from a membership's ``request_router``; None (logged) if it cannot be."""
        name = f"{app}/{deployment}"
        try:
            config = cloudpickle.loads(blob)
            if not isinstance(config, RequestRouterConfig):
                raise RouterLoadError(f"expected a RequestRouterConfig, got {type(config).__name__}")
            router_cls = load_router_class(config.request_router_class)
            router = router_cls(deployment_id=DeploymentID(deployment, app.split("#", 1)[0]),
                                handle_source=_handle_source(), self_actor_id=None, self_actor_handle=None,
                                use_replica_queue_len_cache=False, get_curr_time_s=time.time,
                                create_replica_wrapper_func=None, self_node_id=local_node_id(),
                                prefer_local_node_routing=False, prefer_local_az_routing=False,
                                self_availability_zone=None)
            router.initialize_state(**config.request_router_kwargs)
        except Exception as e:
            logger.error("the request router of %s cannot be used (%s: %s); routing with shoal's default choice",
                         name, type(e).__name__, e)
            return None
        logger.info("routing %s with %s", name, config.class_name)
        return cls(config, router, name)

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now >= self._warned_at + WARN_EVERY_S:
            self._warned_at = now
            logger.warning("request router of %s: %s", self.name, what)

    def update(self, replicas: list[RunningReplica]) -> None:
        try:
            self.router.update_replicas(replicas)
        except Exception as e:
            self._warn(f"update_replicas() raised {type(e).__name__}: {e}")

    async def choose(self, candidates: list[RunningReplica],
                     pending: PendingRequest) -> list[list[RunningReplica]] | None:
        """The router's ranks for ``pending``; None: use the default choice (it failed or is
        being skipped)."""
        loop = asyncio.get_running_loop()
        if loop.time() < self._skip_until:
            self.fallbacks += 1
            return None
        try:
            result: Any = self.router.choose_replicas(candidates, pending)
            if inspect.isawaitable(result):
                result = await self._bounded(result)
        except TimeoutError:
            self._skip_until = loop.time() + SKIP_AFTER_TIMEOUT_S
            self.fallbacks += 1
            self._warn(f"choose_replicas() did not return within {self.timeout_s:g} s (choose_replicas_timeout_s); "
                       f"requests use shoal's default choice for the next {SKIP_AFTER_TIMEOUT_S:g} s")
            return None
        except Exception as e:
            self.fallbacks += 1
            self._warn(f"choose_replicas() raised {type(e).__name__}: {e}; the request uses shoal's default choice")
            return None
        ranks = check_ranks(result)
        if ranks is None:
            self.fallbacks += 1
            self._warn(f"choose_replicas() returned {type(result).__name__} {str(result)[:80]!r}, not a list of "
                       "lists of RunningReplica; the request uses shoal's default choice")
        return ranks

    async def _bounded(self, awaitable: Any) -> Any:
        """Await the router's answer for at most ``timeout_s``. A task, not ``wait_for``: a router
        that swallows its cancellation must not hold the request."""
        task = asyncio.ensure_future(awaitable)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        except asyncio.CancelledError:  # the request was cancelled: so is its routing
            task.cancel()
            task.add_done_callback(_consume)
            raise
        if not done:
            task.cancel()
            task.add_done_callback(_consume)
            raise TimeoutError
        return task.result()

    def routed(self, pending: PendingRequest, replica_id: ReplicaID, request_id: str, streaming: bool) -> None:
        try:
            hook: Any = self.router.on_request_routed  # a subclass may make it async
            out = hook(pending, replica_id, ReplicaResult(replica_id, request_id, streaming))
            if inspect.isawaitable(out):
                task = asyncio.ensure_future(out)
                task.add_done_callback(self._routed_done)
        except Exception as e:
            self._warn(f"on_request_routed() raised {type(e).__name__}: {e}")

    def _routed_done(self, task: asyncio.Future[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            self._warn(f"on_request_routed() raised {type(e).__name__}: {e}")


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
