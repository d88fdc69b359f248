"""Gang replicas: one replica made of ``world_size`` rank processes (tensor or pipeline
parallel models).

The controller places every rank or none (``place_gang``), starts one process per rank with
the rendezvous environment ``torch.distributed.init_process_group()`` reads
(``rank_env``), and treats the gang as one replica: it is RUNNING once every rank is ready,
and if any rank dies the whole gang is replaced. Rank 0 is the replica callers see; it sends
each request to ranks 1..N-1 too (SPMD) and answers with its own result.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from shoal.serving.resources import NEVER_FIT_PREFIX, Ledger, Pending, Placement, Request


@dataclass(eq=False)
class RankRecord:
    """A rank 1..N-1 process of a gang replica (rank 0 is the replica's own record)."""

    replica_id: str  # its own: the replica's id + "-rank<N>"
    parent: str  # the replica's id (rank 0)
    rank: int
    socket_path: str
    proc: Any  # processes.Proc
    conn: Any = None  # FramedProtocol once it said hello
    ready: bool = False


def rank_replica_id(replica_id: str, rank: int) -> str:
    return f"{replica_id}-rank{rank}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now, for the gang's rendezvous (rank 0 listens on it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def place_gang(ledger: Ledger, replica_id: str, requests: list[Request]) -> list[Placement] | Pending:
    """Place every rank (rank 0 under the replica's id) or none; a rank that does not fit
    makes the whole gang pending, with the rank named in the reason."""
    n = len(requests)
    total_gpus = sum(r.num_gpus for r in requests)
    if total_gpus > ledger.machine.num_gpus:
        return Pending(f"{NEVER_FIT_PREFIX}gang of {n} ranks needs num_gpus={total_gpus:g} in all "
                       f"but the machine has {ledger.machine.num_gpus} GPU(s)")
    placed: list[Placement] = []
    for rank, request in enumerate(requests):
        rank_id = replica_id if rank == 0 else rank_replica_id(replica_id, rank)
        got = ledger.place(rank_id, request)
        if isinstance(got, Pending):
            for p in placed:
                ledger.release(p.replica_id)
            prefix = NEVER_FIT_PREFIX if got.can_never_fit else ""
            return Pending(f"{prefix}gang of {n} ranks: rank {rank} {got.reason.removeprefix(NEVER_FIT_PREFIX)}")
        placed.append(got)
    return placed


def rank_env(rank: int, world_size: int, master_port: int, master_addr: str = "127.0.0.1") -> dict[str, str]:
    """The rendezvous variables of ``torch.distributed``'s ``env://`` method."""
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(world_size),
        "GROUP_RANK": "0",
    }


class GangPeers:
    """Rank 0's links to ranks 1..N-1: every request is sent to each of them too, one request
    at a time for the whole gang (so collectives run in the same order on every rank), and
    rank 0's own result is the answer. A rank's failure fails the request."""

    def __init__(self, paths: tuple[str, ...], secret: bytes, max_ongoing: int) -> None:
        import asyncio

        from shoal.runtime.router import ReplicaConnection
        from shoal.runtime.wire import ReplicaEndpoint

        self.conns = [ReplicaConnection(ReplicaEndpoint(f"rank{i + 1}", path, max_ongoing), secret)
                      for i, path in enumerate(paths)]
        self.lock = asyncio.Lock()

    async def run(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: Any,
                  local: Any) -> Any:
        """Send the request to every other rank, run ``local()`` (rank 0's own execution) and
        wait for all; returns what ``local()`` returned."""
        import asyncio

        from shoal.exceptions import RayServeException
        from shoal.runtime.wire import END, ITEM

        async def drain(sink: Any) -> None:
            while True:
                kind, value = await sink.get()
                if kind == ITEM:
                    continue
                if kind == END:
                    return
                raise value if isinstance(value, BaseException) else RayServeException("a rank refused the request")

        async with self.lock:
            waits: list[Awaitable[Any]] = []
            for rank, conn in enumerate(self.conns, start=1):
                try:
                    await conn.connect()
                    if meta.stream or meta.http:
                        waits.append(drain(conn.send_stream(method, args, kwargs, meta)[1]))
                    else:
                        waits.append(conn.send_unary(method, args, kwargs, meta)[1])
                except Exception as e:
                    raise RayServeException(f"rank {rank} of this gang replica is unreachable: {e}") from None
            try:
                return await local()
            finally:
                results = await asyncio.gather(*waits, return_exceptions=True)
                for rank, r in enumerate(results, start=1):
                    if isinstance(r, BaseException):
                        raise RayServeException(f"rank {rank} of this gang replica failed: "
                                                f"{type(r).__name__}: {r}") from r
