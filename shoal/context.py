"""Per-replica and per-request context, readable from user code."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

__all__ = ["ReplicaContext", "ReplicaRank", "RequestContext", "get_replica_context", "get_request_context"]


class ReplicaRank(int):
    """A replica's rank within its deployment (Ray Serve's ``ReplicaRank``): ``rank`` from 0 to
    N-1 across the deployment, ``node_rank`` (always 0 on one machine) and ``local_rank`` (the
    rank on that node, so equal to ``rank``).

    It is also the integer ``rank`` itself, so code that indexes with ``ctx.rank`` keeps
    working: ``ctx.rank.rank == int(ctx.rank)``."""

    node_rank: int
    local_rank: int

    def __new__(cls, rank: int = 0, node_rank: int = 0, local_rank: int | None = None) -> ReplicaRank:
        self = super().__new__(cls, rank)
        self.node_rank = int(node_rank)
        self.local_rank = int(rank if local_rank is None else local_rank)
        return self

    @property
    def rank(self) -> int:
        return int(self)

    def __repr__(self) -> str:
        return f"ReplicaRank(rank={int(self)}, node_rank={self.node_rank}, local_rank={self.local_rank})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ReplicaRank, (int(self), self.node_rank, self.local_rank))

    def model_dump(self) -> dict[str, int]:
        """The fields, as Ray's pydantic model would give them."""
        return {"rank": int(self), "node_rank": self.node_rank, "local_rank": self.local_rank}


@dataclass(frozen=True)
class ReplicaID:
    unique_id: str
    deployment: str
    app_name: str

    def to_full_id_str(self) -> str:
        return f"{self.app_name}#{self.deployment}#{self.unique_id}"


@dataclass(frozen=True)
class ReplicaContext:
    """What ``serve.get_replica_context()`` returns inside a replica."""

    app_name: str
    deployment: str
    replica_tag: str
    servable_object: Any = None
    # The replica's rank in its deployment and the deployment's replica count (Ray's replica
    # ranks). In a gang replica: this process's rank in the gang and the gang's size.
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.rank, ReplicaRank):
            object.__setattr__(self, "rank", ReplicaRank(int(self.rank)))

    @property
    def replica_id(self) -> ReplicaID:
        return ReplicaID(self.replica_tag, self.deployment, self.app_name)


@dataclass(frozen=True)
class RequestContext:
    request_id: str = ""
    multiplexed_model_id: str = ""
    route: str = ""
    app_name: str = ""


# In a replica process the process-wide value applies; in local testing mode several
# deployments share a process, so the context variable (set around each call) wins.
_replica_ctx: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar("shoal_replica", default=None)
_process_replica_ctx: ReplicaContext | None = None
_request_ctx: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "shoal_request", default=RequestContext()  # noqa: B039 - frozen, so safe to share
)


# What this process is when shoal started it ("replica", "pod", "scaler", "proxy"); None in a
# user's own program. serve.run/serve.start refuse to start an instance inside such a process.
_worker_process: str | None = None


def _mark_worker_process(kind: str) -> None:
    global _worker_process
    _worker_process = kind


def set_process_replica_context(ctx: ReplicaContext) -> None:
    global _process_replica_ctx
    _process_replica_ctx = ctx


def get_replica_context() -> ReplicaContext:
    """The context of the replica running this code; raises outside a replica (as Ray does)."""
    ctx = _replica_ctx.get() or _process_replica_ctx
    if ctx is None:
        from shoal.exceptions import RayServeException

        raise RayServeException("`serve.get_replica_context()` may only be called from within a replica.")
    return ctx


def get_request_context() -> RequestContext:
    return _request_ctx.get()


def _get_internal_replica_context() -> ReplicaContext | None:
    """The running replica's context, or None outside a replica (Ray's
    ``ray.serve.context._get_internal_replica_context``, which Ray's examples import)."""
    return _replica_ctx.get() or _process_replica_ctx
