"""Gang replicas in pods: one rank per pod of a LeaderWorkerSet group.

``shoal replica --rank-from-env`` takes its rank and the gang's size from ``RANK`` and
``WORLD_SIZE`` (which the compiled pod template sets from LWS's ``LWS_WORKER_INDEX`` and
``LWS_GROUP_SIZE``), so user code sees them in ``serve.get_replica_context()`` and
``torch.distributed.init_process_group()`` finds its rendezvous (``MASTER_ADDR`` is the leader).

Rank 0 (the leader pod, the only one behind the deployment's Service) runs every request on
ranks 1..N-1 too, with :class:`~shoal.runtime.gang.GangPeers` as in local mode. It finds them
by name: LWS names rank i's pod ``<leader pod>-<i>`` with that hostname under the headless
Service named after the LWS, so its DNS name is ``<leader pod>-<i>.<lws>.<ns>.svc.<domain>``
(:func:`shoal.kubernetes.names.rank_dns`; the pod simulation publishes the same names in its
resolver file). :class:`GangLeader` resolves those names and polls each rank's ``/-/ready``;
rank 0 is ready only while every rank is, and until the gang is assembled it refuses requests
(:class:`Unassembled`) rather than run one on rank 0 alone, whose collectives would then wait
forever for peers that never got it.

Ranks 1..N-1 serve the RPC port (NetworkPolicy admits only their gang's pods) and, on SIGTERM,
keep serving what rank 0 sends until rank 0 disconnects (:func:`linger`), so that requests rank
0 accepted before the group went down still complete on every rank.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from shoal.exceptions import RayServeException
from shoal.kubernetes import names
from shoal.runtime.gang import GangPeers
from shoal.runtime.wire import join_host_port

__all__ = ["GangHost", "GangLeader", "Unassembled", "linger", "ranks_from_env"]

logger = logging.getLogger("shoal.pod")

POLL_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 2.0


class _Resolver(Protocol):
    async def resolve(self, name: str) -> list[str] | None: ...


class GangHost(Protocol):
    """The replica core of rank 0 (or of any rank, for :func:`linger`)."""

    gang: Any  # the fan-out to ranks 1..N-1: GangPeers, or Unassembled
    conns: set[Any]  # the callers' open connections


def ranks_from_env(environ: Mapping[str, str]) -> tuple[int, int, str]:
    """``(rank, world_size, gang)`` from ``RANK``, ``WORLD_SIZE`` and ``$SHOAL_GANG``; ValueError says what is wrong."""
    try:
        rank = int(environ.get("RANK", ""))
        world_size = int(environ.get("WORLD_SIZE", ""))
    except ValueError:
        raise ValueError("--rank-from-env needs RANK and WORLD_SIZE set to integers (in a LeaderWorkerSet: "
                         f"$({names.ENV_LWS_WORKER_INDEX}) and $({names.ENV_LWS_GROUP_SIZE}))") from None
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world_size}: need 0 <= RANK < WORLD_SIZE")
    gang = environ.get(names.ENV_GANG, "")
    if rank == 0 and world_size > 1 and not gang:
        raise ValueError(f"rank 0 of a gang needs {names.ENV_GANG} (the LeaderWorkerSet's name) to find its ranks")
    return rank, world_size, gang


class Unassembled:
    """Rank 0's stand-in for :class:`~shoal.runtime.gang.GangPeers` until every rank is found and ready."""

    def __init__(self, why: str) -> None:
        self.why = why

    async def run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any, local: Any) -> Any:
        raise RayServeException(f"this gang replica is not assembled yet ({self.why})")


class GangLeader:
    """Rank 0's watch over ranks 1..N-1: their addresses, their readiness, and the links to them.

    ``server.gang`` (the replica core's fan-out) is an :class:`Unassembled` until every rank
    answers ``/-/ready``, then a ``GangPeers`` over their RPC addresses; it is rebuilt if a link
    died and the ranks are ready again.
    """

    def __init__(self, server: GangHost, *, pod_name: str, gang: str, namespace: str, cluster_domain: str,
                 world_size: int, resolver: _Resolver, secret: bytes, max_ongoing: int,
                 rpc_port: int = names.RPC_PORT, admin_port: int = names.ADMIN_PORT,
                 interval: float = POLL_INTERVAL_S) -> None:
        self.server = server
        self.names = [names.rank_dns(pod_name, r, gang, namespace, cluster_domain) for r in range(1, world_size)]
        self.resolver = resolver
        self.secret = secret
        self.max_ongoing = max_ongoing
        self.rpc_port = rpc_port
        self.admin_port = admin_port
        self.interval = interval
        self.ready = False
        self.why = f"waiting for ranks 1..{world_size - 1}"
        self.addresses: tuple[str, ...] = ()
        self.task: asyncio.Task[None] | None = None
        server.gang = Unassembled(self.why)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        while True:
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # never let the watch die: report it as the reason instead
                logger.exception("checking the gang's ranks failed")
                self._unready(f"checking the ranks failed: {e}")
            await asyncio.sleep(self.interval)

    async def check(self) -> None:
        """One round: resolve every rank, ask each whether it is ready, (re)wire the links."""
        addresses: list[str] = []
        for rank, name in enumerate(self.names, start=1):
            ips = await self.resolver.resolve(name)
            if not ips:
                self._unready(f"rank {rank} ({name}) is not in DNS yet")
                return
            ok, detail = await probe_ready(ips[0], self.admin_port)
            if not ok:
                self._unready(f"rank {rank} is not ready: {detail}")
                return
            addresses.append(join_host_port(ips[0], self.rpc_port))
        gang = self.server.gang
        dead = any(getattr(c, "dead", False) for c in getattr(gang, "conns", ()))
        if isinstance(gang, Unassembled) or dead or tuple(addresses) != self.addresses:
            self.server.gang = GangPeers(tuple(addresses), self.secret, self.max_ongoing)
            logger.info("gang assembled: ranks 1..%d at %s", len(addresses), ", ".join(addresses))
        self.addresses = tuple(addresses)
        if not self.ready:
            logger.info("every rank is ready")
        self.ready = True
        self.why = ""

    def _unready(self, why: str) -> None:
        if self.ready or why != self.why:
            logger.info("gang not ready: %s", why)
        self.ready = False
        self.why = why
        if isinstance(self.server.gang, Unassembled):
            self.server.gang.why = why


async def probe_ready(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> tuple[bool, str]:
    """GET ``/-/ready`` on a rank's admin port: (ready, what it said)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as e:
        return False, f"{type(e).__name__}: {e}"
    try:
        writer.write(b"GET /-/ready HTTP/1.1\r\nHost: rank\r\nConnection: close\r\n\r\n")
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)  # the admin port closes after answering
    except (OSError, TimeoutError) as e:
        return False, f"{type(e).__name__}: {e}"
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    status = parts[1] if len(parts) > 1 else b""
    return status == b"200", body.decode("latin-1", "replace").strip() or head[:60].decode("latin-1", "replace")


async def linger(server: GangHost, timeout: float) -> None:
    """Ranks 1..N-1 after SIGTERM: keep serving rank 0 until it disconnects (it drains first), at most ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while server.conns and loop.time() < deadline:
        await asyncio.sleep(0.05)
