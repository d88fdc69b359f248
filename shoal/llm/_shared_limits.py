"""A gateway replica's rate limits: shared with the deployment's other replicas, or its share.

Budgets (requests per minute, tokens per minute, reservations settled at the end; see
:mod:`shoal.llm._ratelimit`) are kept where the replica runs allows:

* **Shared** (a replica of a local instance, which has a controller): every admission of a
  limited tenant asks the controller (:mod:`shoal.llm._limit_store`), which holds one set of
  buckets for the whole gateway deployment, so N replicas admit what one would; the request's
  settlement goes there too. Each call has a deadline of :data:`CALL_TIMEOUT_S`. When the
  controller cannot answer in time (not connected, restarting, busy), the replica admits from
  buckets of its own holding its *share* of each limit (the limit divided by the deployment's
  replica count, as the controller last said; at least one request per minute), logs a
  warning once, and asks the controller again :data:`RETRY_S` later. It never waits longer
  than the deadline, and never admits without a limit. (An admission whose answer came too
  late may have reserved at the controller: that reservation is never settled, and refills
  like any other.)
* **Per-pod share** (Kubernetes, where there is no controller): each pod admits its share of
  each limit, the replica count being the ready pods behind the deployment's headless Service
  in cluster DNS (this pod counted even before it is ready), looked up every
  :data:`PEERS_REFRESH_S`. Until the first answer, and when DNS cannot answer, the last count
  holds (1 at first: the full limit).
* **Own buckets** (local testing mode, a gateway built by hand): the full limits, as before.

Weighted fair queuing (:mod:`shoal.llm._fairness`) stays per replica in every mode: it orders
the requests waiting at one replica's gate, and a gate's ``max_in_flight_per_model`` is per
replica.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from shoal.llm._config import GatewayConfig, TenantConfig
from shoal.llm._limit_store import OP_ADMIT, OP_SETTLE
from shoal.llm._ratelimit import Decision, RateLimiter

__all__ = ["CALL_TIMEOUT_S", "PEERS_REFRESH_S", "RETRY_S", "GatewayLimits", "LimitChannel", "share_of"]

logger = logging.getLogger("shoal.llm.gateway")

#: The deadline of each call to the controller (an admission waits at most this long for it).
CALL_TIMEOUT_S = 1.0
#: After a failed call, admissions use the replica's share this long before asking again.
RETRY_S = 5.0
#: How often a pod looks up how many replicas its gateway deployment has.
PEERS_REFRESH_S = 5.0

PeerCount = Callable[[], Awaitable[int | None]]


class LimitChannel(Protocol):
    """The link to the controller (:class:`~shoal.runtime.client.ControllerClient`, or a fake)."""

    @property
    def connected(self) -> bool: ...

    async def call(self, op: str, timeout: float | None = ..., **args: Any) -> Any: ...


def share_of(config: GatewayConfig, replicas: int) -> GatewayConfig:
    """``config`` with every limit divided by ``replicas`` (requests per minute at least 1: a
    bucket shallower than one request would never admit one)."""
    if replicas <= 1:
        return config

    def part(t: TenantConfig) -> TenantConfig:
        rpm = max(1.0, t.requests_per_minute / replicas) if t.requests_per_minute else None
        tpm = t.tokens_per_minute / replicas if t.tokens_per_minute else None
        return t.model_copy(update={"requests_per_minute": rpm, "tokens_per_minute": tpm})

    return config.model_copy(update={"tenants": {name: part(t) for name, t in config.tenants.items()},
                                     "default_tenant": part(config.default_tenant)})


def _decision(answer: Any) -> Decision:
    """The controller's answer to an admission, checked."""
    if not isinstance(answer, dict) or not isinstance(answer.get("headers"), dict):
        raise ValueError(f"unexpected answer from the controller: {answer!r}")
    return Decision(bool(answer["allowed"]), float(answer["retry_after_s"]), str(answer["limit"]),
                    float(answer["limit_value"]), {str(k): str(v) for k, v in answer["headers"].items()},
                    float(answer["reserved"]), shared=True)


class GatewayLimits:
    """Admission (:meth:`admit`) and settlement (:meth:`settle`) of one gateway replica; see
    the module docstring. ``channel``: shared budgets through the controller, for the gateway
    deployment ``scope`` (application, deployment) of ``replicas`` replicas; ``peers``: a
    pod's share, the replica count from this lookup; neither: the replica's own buckets."""

    def __init__(self, config: GatewayConfig, clock: Callable[[], float], *, channel: LimitChannel | None = None,
                 scope: tuple[str, str] = ("", ""), replicas: int = 1, peers: PeerCount | None = None) -> None:
        self.config = config
        self.clock = clock
        self.channel = channel
        self.scope = scope
        self.peers = peers
        self.replicas = max(1, replicas)
        self.mode = "shared" if channel is not None else "pod" if peers is not None else "replica"
        self._own = RateLimiter(config) if self.mode == "replica" else None
        self._share: RateLimiter | None = None
        self._share_of = 0
        self._retry_at = -math.inf  # no call to the controller before this (after a failure)
        self.degraded = False  # the last call to the controller failed: admitting from the share
        self._tasks: set[asyncio.Future[Any]] = set()
        self._peers_at = -math.inf
        self._peers_task: asyncio.Future[None] | None = None
        self._peers_asked = False

    @classmethod
    def for_process(cls, config: GatewayConfig, clock: Callable[[], float]) -> GatewayLimits:
        """The limits for a gateway constructed in this process (see the module docstring)."""
        from shoal import context
        from shoal.runtime import backend as backend_mod

        ctx = context._get_internal_replica_context()
        try:
            current: Any = backend_mod.current()
        except Exception:
            current = None
        # Only in a replica process or a pod: local testing mode may run in a driver whose
        # current backend is an instance's controller, and must not share that instance's budgets.
        if ctx is None or current is None or context._worker_process not in ("replica", "pod"):
            return cls(config, clock)
        from shoal.runtime.client import ControllerClient

        if isinstance(current, ControllerClient):
            return cls(config, clock, channel=current, scope=(ctx.app_name, ctx.deployment),
                       replicas=ctx.world_size)
        peers = _pod_peers(current, ctx.app_name, ctx.deployment)
        return cls(config, clock, peers=peers) if peers is not None else cls(config, clock)

    # -- admission
    def local(self) -> RateLimiter:
        """The buckets this replica admits from itself: its own, or its share."""
        if self._own is not None:
            return self._own
        if self._share is None or self._share_of != self.replicas:
            self._share = RateLimiter(share_of(self.config, self.replicas))
            self._share_of = self.replicas
        return self._share

    async def admit(self, tenant: str, reserve: int = 1) -> Decision:
        """Admit one request of ``tenant`` reserving ``reserve`` tokens, or say which limit refuses it."""
        limits = self.config.tenant(tenant)
        if self.mode == "shared" and (limits.requests_per_minute or limits.tokens_per_minute):
            decision = await self._admit_shared(tenant, limits, reserve)
            if decision is not None:
                return decision
        elif self.mode == "pod":
            await self._refresh_peers()
        return self.local().admit(tenant, self.clock(), reserve)

    def _args(self, tenant: str, limits: TenantConfig) -> dict[str, Any]:
        return {"app": self.scope[0], "deployment": self.scope[1], "tenant": tenant,
                "requests_per_minute": limits.requests_per_minute, "tokens_per_minute": limits.tokens_per_minute}

    async def _admit_shared(self, tenant: str, limits: TenantConfig, reserve: int) -> Decision | None:
        assert self.channel is not None
        if self.clock() < self._retry_at:
            return None
        try:
            if not self.channel.connected:
                raise ConnectionError("not connected to the controller")
            answer = await self.channel.call(OP_ADMIT, CALL_TIMEOUT_S, **self._args(tenant, limits), reserve=reserve)
            decision = _decision(answer)
        except Exception as e:  # no answer in time, or a refusal: this replica's share
            self._failed(e)
            return None
        if isinstance(answer.get("replicas"), int) and answer["replicas"] > 0:
            self.replicas = answer["replicas"]
        if self.degraded:
            self.degraded = False
            logger.info("gateway %s/%s: rate limits are shared through the controller again", *self.scope)
        return decision

    def _failed(self, e: BaseException) -> None:
        self._retry_at = self.clock() + RETRY_S
        if not self.degraded:
            self.degraded = True
            why = "no answer in time" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"
            logger.warning("gateway %s/%s: the controller did not answer a rate-limit call (%s); this replica "
                           "admits from its own share of each limit (1/%d) until it answers again",
                           *self.scope, why, self.replicas)

    # -- settlement
    def settle(self, tenant: str, decision: Decision, used: int) -> None:
        """A request admitted by ``decision`` ended having used ``used`` tokens: give back what
        it reserved and did not use, or charge what it used beyond (where it was admitted)."""
        if not decision.shared:
            self.local().settle(tenant, decision.reserved, used, self.clock())
            return
        limits = self.config.tenant(tenant)
        if self.channel is None or not limits.tokens_per_minute or used == decision.reserved:
            return
        args = {**self._args(tenant, limits), "reserved": decision.reserved, "used": used}
        try:
            task = asyncio.get_running_loop().create_task(self._settle_shared(args))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_shared(self, args: dict[str, Any]) -> None:
        assert self.channel is not None
        try:
            await self.channel.call(OP_SETTLE, CALL_TIMEOUT_S, **args)
        except Exception as e:  # the bucket refills anyway; nothing else to do
            logger.debug("settling a reservation with the controller failed: %r", e)

    async def drain(self) -> None:
        """Wait for the settlements on their way (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- a pod's share
    async def _refresh_peers(self) -> None:
        now = self.clock()
        if now >= self._peers_at + PEERS_REFRESH_S and (self._peers_task is None or self._peers_task.done()):
            self._peers_at = now
            self._peers_task = asyncio.ensure_future(self._count_peers())
        if not self._peers_asked and self._peers_task is not None:
            self._peers_asked = True  # the first admission waits for the first answer (bounded)
            await asyncio.wait({self._peers_task}, timeout=CALL_TIMEOUT_S)

    async def _count_peers(self) -> None:
        assert self.peers is not None
        try:
            n = await asyncio.wait_for(self.peers(), CALL_TIMEOUT_S)
        except Exception as e:
            logger.debug("counting the gateway's pods failed: %r", e)
            return
        if n is not None and n > 0:
            self.replicas = n


def _pod_peers(backend: Any, app: str, deployment: str) -> PeerCount | None:
    """In a Kubernetes pod: how many pods the deployment has (ready ones, and this one)."""
    try:
        from shoal.kubernetes import names
        from shoal.kubernetes.pod.discovery import PodBackend
    except ImportError:  # pragma: no cover - part of shoal
        return None
    if not isinstance(backend, PodBackend):
        return None
    dns = names.service_dns(app, deployment, backend.namespace, backend.cluster_domain)
    me = os.environ.get(names.ENV_POD_IP, "")

    async def count() -> int | None:
        ips = await backend.resolver.resolve(dns)
        if ips is None:
            return None
        return len(ips) + (0 if me and me in ips else 1)  # this pod, ready or not yet

    return count
