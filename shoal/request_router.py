"""Custom request routers (Ray Serve's ``ray.serve.request_router``).

A deployment configured with ``request_router_config=RequestRouterConfig(request_router_class=...)``
is routed by an instance of that class in every process that calls it (one per caller process
and deployment, like shoal's own router). For each request the router calls
:meth:`RequestRouter.choose_replicas` with the replicas it can reach and a
:class:`PendingRequest`; the answer is a list of ranks (lists of :class:`RunningReplica`), the
most preferred first. shoal takes a replica with room (fewer requests in flight than its
``max_ongoing_requests``) from the first rank that has one, sends the request, and calls
:meth:`RequestRouter.on_request_routed`. When no rank has room, the request waits in line as
any request does (``max_queued_requests``, ``max_queue_wait_s``) and the router is asked again.

What shoal does when a router misbehaves (raises, returns something that is not a list of
ranks, or does not answer within ``RequestRouterConfig.choose_replicas_timeout_s``) is in
:mod:`shoal.runtime.custom_routing`: the request is routed by shoal's default choice instead.

This module is light on purpose: routers import it in every caller process.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shoal.config import DeploymentID
from shoal.context import ReplicaID

__all__ = [
    "DeploymentHandleSource",
    "DeploymentID",
    "FIFOMixin",
    "LocalityMixin",
    "MultiplexMixin",
    "PendingRequest",
    "ReplicaID",
    "ReplicaResult",
    "RequestMetadata",
    "RequestRouter",
    "RequestRoutingContext",
    "RunningReplica",
    "local_node_id",
]


def local_node_id() -> str:
    """This machine's node id: its host name (every local replica runs on it)."""
    return socket.gethostname()


class DeploymentHandleSource(enum.StrEnum):
    """Where the router runs (Ray's ``DeploymentHandleSource``)."""

    UNKNOWN = "UNKNOWN"
    PROXY = "PROXY"
    REPLICA = "REPLICA"


@dataclass
class RequestMetadata:
    """What is known about a request before it is sent (Ray's ``RequestMetadata``, the fields
    routers read)."""

    request_id: str = ""
    internal_request_id: str = ""
    call_method: str = "__call__"
    route: str = ""
    multiplexed_model_id: str = ""
    is_streaming: bool = False
    is_http_request: bool = False
    app_name: str = ""


@dataclass
class RequestRoutingContext:
    """Bookkeeping a router may keep on a request across routing attempts (Ray's field names;
    shoal's mixins are stateless and do not use them)."""

    multiplexed_start_matching_time: float | None = None
    tried_fewest_multiplexed_models: bool = False
    tried_first_multiplexed_models: bool = False
    tried_same_node: bool = False
    tried_same_az: bool = False
    should_backoff: bool = False


@dataclass
class PendingRequest:
    """A request waiting for a replica. ``args`` and ``kwargs`` are the call's arguments, already
    resolved (for an HTTP request: the ASGI scope and the body; empty while the body is still
    being read); ``metadata`` says what is known about it."""

    args: list[Any]
    kwargs: dict[Any, Any]
    metadata: RequestMetadata
    created_at: float = field(default_factory=time.time)
    future: asyncio.Future[Any] | None = None
    routing_context: RequestRoutingContext = field(default_factory=RequestRoutingContext)
    resolved: bool = True

    def reset_future(self) -> None:
        """A fresh future (Ray resets it when a request is routed again)."""
        self.future = asyncio.get_running_loop().create_future()


class ReplicaResult:
    """What :meth:`RequestRouter.on_request_routed` is given about the request just sent: the
    replica, the request's id and whether it streams. (Ray's is a handle on the response;
    shoal's response belongs to the caller and is not shared with the router.)"""

    __slots__ = ("is_streaming", "replica_id", "request_id")

    def __init__(self, replica_id: ReplicaID, request_id: str = "", is_streaming: bool = False) -> None:
        self.replica_id = replica_id
        self.request_id = request_id
        self.is_streaming = is_streaming

    def __repr__(self) -> str:
        return f"ReplicaResult(replica_id={self.replica_id!r}, request_id={self.request_id!r})"


def _zero() -> int:
    return 0


def _yes() -> bool:
    return True


class RunningReplica:
    """A replica as a router sees it: its id, limit, models, routing stats and location.

    ``routing_stats`` is the dict the replica's ``record_routing_stats()`` last returned (empty
    until it reported). The queue length is the number of this process's requests in flight
    there; a replica is available while that is below ``max_ongoing_requests`` and it has not
    just refused a request. Instances are made by the router (tests may make their own).
    """

    def __init__(self, replica_id: ReplicaID, *, max_ongoing_requests: int = 5,
                 multiplexed_model_ids: Iterable[str] = (), routing_stats: Mapping[str, Any] | None = None,
                 node_id: str = "", availability_zone: str | None = None,
                 queue_len: Callable[[], int] = _zero, available: Callable[[], bool] = _yes) -> None:
        self._replica_id = replica_id
        self._max_ongoing = max_ongoing_requests
        self._model_ids = frozenset(multiplexed_model_ids)
        self._stats: dict[str, Any] = dict(routing_stats or {})
        self._node_id = node_id
        self._az = availability_zone
        self._queue_len = queue_len
        self._available = available

    @property
    def replica_id(self) -> ReplicaID:
        return self._replica_id

    @property
    def actor_id(self) -> str:
        """Ray's actor id; shoal replicas are processes: the replica's unique id."""
        return self._replica_id.unique_id

    @property
    def max_ongoing_requests(self) -> int:
        return self._max_ongoing

    @property
    def multiplexed_model_ids(self) -> frozenset[str]:
        return self._model_ids

    @property
    def routing_stats(self) -> dict[str, Any]:
        return self._stats

    @property
    def node_id(self) -> str:
        """The node the replica runs on ("" when unknown, as for pods on Kubernetes)."""
        return self._node_id

    @property
    def availability_zone(self) -> str | None:
        return self._az

    @property
    def is_cross_language(self) -> bool:
        return False

    @property
    def queue_len(self) -> int:
        """This process's requests in flight at the replica."""
        return self._queue_len()

    @property
    def is_available(self) -> bool:
        """Whether this process may send the replica another request now."""
        return self._available()

    async def get_queue_len(self, *, deadline_s: float = 0.0) -> int:
        """The queue length as this process knows it (no probe is sent)."""
        return self._queue_len()

    def __repr__(self) -> str:
        return f"RunningReplica({self._replica_id.unique_id!r}, max_ongoing_requests={self._max_ongoing})"


class RequestRouter(ABC):
    """The base class of custom request routers. Subclasses implement :meth:`choose_replicas`.

    shoal constructs the class with keyword arguments only (``deployment_id``,
    ``handle_source``, ``self_node_id``, ``self_availability_zone``, ...; unknown keywords
    are accepted and ignored, so mixins may take theirs), then calls
    :meth:`initialize_state` with ``request_router_kwargs``.
    """

    def __init__(self, deployment_id: DeploymentID | None = None,
                 handle_source: DeploymentHandleSource = DeploymentHandleSource.UNKNOWN,
                 self_actor_id: str | None = None, self_actor_handle: Any = None,
                 use_replica_queue_len_cache: bool = False, get_curr_time_s: Callable[[], float] | None = None,
                 create_replica_wrapper_func: Any = None, *args: Any, **kwargs: Any) -> None:
        self._deployment_id = deployment_id or DeploymentID("", "")
        self._handle_source = handle_source
        self._self_actor_id = self_actor_id
        self._get_curr_time_s = get_curr_time_s or time.time
        self._replicas: dict[ReplicaID, RunningReplica] = {}

    @property
    def deployment_id(self) -> DeploymentID:
        return self._deployment_id

    @property
    def app_name(self) -> str:
        """Name of the app this router is serving."""
        return self._deployment_id.app_name

    @property
    def curr_replicas(self) -> dict[ReplicaID, RunningReplica]:
        """The replicas the router knows, by id."""
        return self._replicas

    def initialize_state(self, **kwargs: Any) -> None:  # noqa: B027 - an optional hook
        """Called once after construction with ``RequestRouterConfig.request_router_kwargs``."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The set of replicas changed (or their models or routing stats did)."""
        self._replicas = {r.replica_id: r for r in replicas}

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Drop a replica that died from the set until membership lists it again."""
        self._replicas.pop(replica_id, None)

    def on_replica_actor_unavailable(self, replica_id: ReplicaID) -> None:  # noqa: B027 - an optional hook
        """A replica could not be reached (shoal skips it until it can be)."""

    def on_new_queue_len_info(self, replica_id: ReplicaID, queue_len_info: Any) -> None:  # noqa: B027 - an optional hook
        """Accepted for compatibility: shoal counts in-flight requests itself."""

    def on_send_request(self, replica_id: ReplicaID) -> None:  # noqa: B027 - an optional hook
        """Accepted for compatibility: shoal counts in-flight requests itself."""

    @abstractmethod
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas for the request, most preferred first."""

    def on_request_routed(  # noqa: B027 - an optional hook
            self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult) -> None:
        """Called after the request was sent to ``replica_id``."""

    def select_available_replicas(self, candidates: list[RunningReplica] | None = None) -> list[RunningReplica]:
        """The candidates (all known replicas if None) that may take another request now."""
        pool = list(self._replicas.values()) if candidates is None else candidates
        return [r for r in pool if r.is_available]


class FIFOMixin:
    """Requests are routed in arrival order. shoal's router always queues requests in FIFO
    order, so this mixin only documents the intent."""


class MultiplexMixin:
    """Helpers to prefer replicas that hold a request's multiplexed model."""

    def rank_replicas_via_multiplex(self, replicas: list[RunningReplica],
                                    multiplexed_model_id: str) -> list[list[RunningReplica]]:
        """Three ranks: the replicas holding the model; of the others, those holding the fewest
        models; then the rest."""
        holding = [r for r in replicas if multiplexed_model_id in r.multiplexed_model_ids]
        others = [r for r in replicas if multiplexed_model_id not in r.multiplexed_model_ids]
        fewest_count = min((len(r.multiplexed_model_ids) for r in others), default=0)
        fewest = [r for r in others if len(r.multiplexed_model_ids) == fewest_count]
        rest = [r for r in others if len(r.multiplexed_model_ids) != fewest_count]
        return [holding, fewest, rest]

    def apply_multiplex_routing(self, pending_request: PendingRequest | None = None) -> set[ReplicaID]:
        """The ids of the first non-empty rank for the request's model (all replicas without one)."""
        known = _known_replicas(self)
        model_id = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not model_id:
            return {r.replica_id for r in known}
        return _first_non_empty(self.rank_replicas_via_multiplex(known, model_id))


class LocalityMixin:
    """Helpers to prefer replicas near the caller: same node, then same availability zone.

    Locally every replica runs on the caller's machine, so every replica is on the same node."""

    def __init__(self, self_node_id: str | None = None, prefer_local_node_routing: bool = False,
                 prefer_local_az_routing: bool = False, self_availability_zone: str | None = None,
                 *args: Any, **kwargs: Any) -> None:
        self._self_node_id = self_node_id
        self._prefer_local_node_routing = prefer_local_node_routing
        self._prefer_local_az_routing = prefer_local_az_routing
        self._self_availability_zone = self_availability_zone
        super().__init__(*args, **kwargs)

    def rank_replicas_via_locality(self, replicas: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Three ranks: replicas on this node, in this availability zone, and the others.
        An unknown node or zone ("" or None) matches nothing."""
        node = getattr(self, "_self_node_id", None)
        zone = getattr(self, "_self_availability_zone", None)
        same_node: list[RunningReplica] = []
        same_zone: list[RunningReplica] = []
        others: list[RunningReplica] = []
        for r in replicas:
            if node and r.node_id == node:
                same_node.append(r)
            elif zone and r.availability_zone == zone:
                same_zone.append(r)
            else:
                others.append(r)
        return [same_node, same_zone, others]

    def apply_locality_routing(self, pending_request: PendingRequest | None = None) -> set[ReplicaID]:
        """The ids of the first non-empty locality rank."""
        return _first_non_empty(self.rank_replicas_via_locality(_known_replicas(self)))


def _known_replicas(router: object) -> list[RunningReplica]:
    replicas: dict[ReplicaID, RunningReplica] = getattr(router, "_replicas", {})
    return list(replicas.values())


def _first_non_empty(ranks: list[list[RunningReplica]]) -> set[ReplicaID]:
    for rank in ranks:
        if rank:
            return {r.replica_id for r in rank}
    return set()
