"""Per-replica and per-request context, readable from user code."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

__all__ = ["ReplicaContext", "RequestContext", "get_replica_context", "get_request_context"]


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
    # Gang replicas: this process's rank and the gang's size (0 and 1 otherwise).
    rank: int = 0
    world_size: int = 1

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
