"""Ray's replica ranks in a plain Deployment's pods: ``serve.get_replica_context().rank``.

A pod has no controller to hand out ranks, so each pod derives its own from what cluster DNS
says about its deployment (the ready pods behind the deployment's headless Service, the lookup
callers' handles use): the members are those pods plus the pod itself (ready or not yet),
ordered by address (numerically, IPv4 before IPv6); the pod's rank is its place in that order,
``world_size`` the number of members. Every pod that sees the same set computes the same ranks,
so they are distinct and contiguous (0..N-1) without any coordination.

The rank is looked up once before the deployment's constructor runs (so ``__init__`` sees it),
then on the resolver's interval (1 s in a cluster). It stays the same while the set of pods
stays the same; it changes when that set changes: a pod added by a scale-up, removed by a
scale-down, replaced (a new pod usually has another address) or leaving DNS while not ready
(a failed readiness probe, a drain). Pods whose address sorts after the changed one keep
their rank; those before it move by one. While pods disagree about the set (DNS caches,
readiness changing), two pods may briefly report the same rank.

Ray keeps a replica's rank for its whole life and renumbers only to fill the hole a stopped
replica leaves; shoal's local runtime does the same. Here a rank can move without the pod
restarting, so code that shards by rank should read ``get_replica_context()`` when it needs
the rank rather than keep the value from ``__init__``. Gang pods (LeaderWorkerSets) keep their
rank in the gang, as locally.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

__all__ = ["INITIAL_LOOKUP_S", "RankTracker", "own_address", "pod_rank"]

logger = logging.getLogger("shoal.pod")

# The lookup before the constructor waits at most this long (then rank 0 of 1 until the next).
INITIAL_LOOKUP_S = 3.0


class _Resolver(Protocol):
    interval: float

    async def resolve(self, name: str) -> list[str] | None: ...


def _address_key(address: str) -> tuple[int, int, str]:
    """Sort key: IPv4 addresses numerically, then IPv6, then anything else by its text."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (7, 0, address)
    return (ip.version, int(ip), "")


def pod_rank(own: str, ready: Iterable[str]) -> tuple[int, int]:
    """``(rank, world_size)`` of the pod at address ``own`` among the ``ready`` pods of its
    deployment (itself counted whether listed or not)."""
    members = sorted(set(ready) | {own}, key=_address_key)
    return members.index(own), len(members)


def own_address(host: str) -> str | None:
    """The pod's address as DNS lists it: ``host`` (``$SHOAL_POD_IP``) when it is one address;
    None for a wildcard (``0.0.0.0``, ``::``) or a name, where the pod cannot find itself."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return None if ip.is_unspecified else str(ip)


class RankTracker:
    """Keeps ``(rank, world_size)`` of one pod current with its deployment's ready pods.

    ``changed(rank, world_size)`` runs on each change after :meth:`first` returned. A lookup
    that fails (DNS does not answer) keeps the last value.
    """

    def __init__(self, resolver: _Resolver, dns_name: str, own: str,
                 changed: Callable[[int, int], None] | None = None) -> None:
        self.resolver = resolver
        self.dns_name = dns_name
        self.own = own
        self.changed = changed
        self.current = (0, 1)
        self.started = False  # first() returned: changes are announced

    async def refresh(self) -> tuple[int, int]:
        """Look the deployment's pods up once; the (possibly new) ``(rank, world_size)``."""
        try:
            ready = await self.resolver.resolve(self.dns_name)
        except Exception as e:
            logger.warning("cannot look up the pods of %s for this pod's rank: %s: %s", self.dns_name,
                           type(e).__name__, e)
            ready = None
        if ready is None:
            return self.current
        new = pod_rank(self.own, ready)
        if new != self.current:
            old, self.current = self.current, new
            if self.started:
                logger.info("replica rank %d of %d (was %d of %d): the deployment's ready pods changed",
                            new[0], new[1], old[0], old[1])
                if self.changed is not None:
                    self.changed(*new)
        return self.current

    async def first(self, timeout: float = INITIAL_LOOKUP_S) -> tuple[int, int]:
        """The first lookup, bounded by ``timeout`` (rank 0 of 1 when it does not answer in time)."""
        try:
            await asyncio.wait_for(self.refresh(), timeout)
        except TimeoutError:
            logger.warning("cluster DNS did not list the pods of %s within %gs; rank 0 of 1 until it does",
                           self.dns_name, timeout)
        self.started = True
        return self.current

    async def run(self) -> None:
        """Look up on the resolver's interval until cancelled."""
        while True:
            await asyncio.sleep(self.resolver.interval)
            await self.refresh()
