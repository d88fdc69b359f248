"""Custom request routers (Ray's ``ray.serve.request_router``): the mixins and base-class
helpers, ``RequestRouterConfig`` validation, the controller's side (membership carrying the
router and the replicas' routing stats), and the router using a custom class against fake
replicas on real Unix sockets: ranks in order, room respected, the queue bound kept, and a
router that raises, returns garbage, hangs or cannot be loaded falls back to the default."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import cloudpickle
import pytest

from shoal import serve
from shoal.config import DeploymentConfig, RequestRouterConfig
from shoal.context import ReplicaID, _get_internal_replica_context
from shoal.exceptions import BackPressureError
from shoal.request_router import (
    DeploymentID,
    FIFOMixin,
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaResult,
    RequestMetadata,
    RequestRouter,
    RunningReplica,
)
from shoal.runtime.controller.membership import Publisher
from shoal.runtime.custom_routing import check_ranks, request_router_blob
from shoal.runtime.router import Router
from shoal.runtime.wire import OK, REQUEST, FramedProtocol, Membership, ReplicaEndpoint, RequestMeta
from shoal.schema import DeploymentSchema

SECRET = b"s" * 32
PATIENCE_S = 10.0


def rep(uid: str, models: tuple[str, ...] = (), node: str = "n1", zone: str | None = None,
        stats: dict[str, Any] | None = None, available: bool = True) -> RunningReplica:
    return RunningReplica(ReplicaID(uid, "dep", "app"), max_ongoing_requests=2, multiplexed_model_ids=models,
                          node_id=node, availability_zone=zone, routing_stats=stats,
                          available=lambda: available)


def ids(replicas: list[RunningReplica]) -> list[str]:
    return [r.replica_id.unique_id for r in replicas]


class Mixed(FIFOMixin, MultiplexMixin, LocalityMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [candidate_replicas]


# ---- the mixins and helpers -----------------------------------------------------------------


def test_multiplex_ranks_holding_then_fewest_models_then_the_rest() -> None:
    a, b, c, d = rep("a", ("m1", "m2")), rep("b", ("m3",)), rep("c", ()), rep("d", ("m1",))
    ranks = Mixed().rank_replicas_via_multiplex([a, b, c, d], "m1")
    assert [ids(r) for r in ranks] == [["a", "d"], ["c"], ["b"]]


def test_locality_ranks_node_then_zone_then_others_and_unknown_matches_nothing() -> None:
    router = Mixed(self_node_id="n1", self_availability_zone="z1")
    reps = [rep("a", node="n2", zone="z1"), rep("b", node="n1"), rep("c", node="n3", zone="z2"), rep("d", node="")]
    assert [ids(r) for r in router.rank_replicas_via_locality(reps)] == [["b"], ["a"], ["c", "d"]]
    # A router that does not know its node puts everything last.
    assert [ids(r) for r in Mixed().rank_replicas_via_locality(reps)] == [[], [], ["a", "b", "c", "d"]]


def test_apply_routing_picks_the_first_non_empty_rank() -> None:
    router = Mixed(self_node_id="n9")
    router.update_replicas([rep("a", ("m1",), node="n1"), rep("b", node="n9"), rep("c", node="n1")])
    meta = RequestMetadata(multiplexed_model_id="m1")
    assert router.apply_multiplex_routing(PendingRequest([], {}, meta)) == {ReplicaID("a", "dep", "app")}
    assert len(router.apply_multiplex_routing(None)) == 3
    assert router.apply_locality_routing() == {ReplicaID("b", "dep", "app")}


def test_select_available_replicas_and_base_class_state() -> None:
    router = Mixed(deployment_id=DeploymentID("dep", "app"))
    assert router.app_name == "app" and router.deployment_id.name == "dep"
    a, b = rep("a"), rep("b", available=False)
    router.update_replicas([a, b])
    assert ids(router.select_available_replicas()) == ["a"]
    assert ids(router.select_available_replicas([b])) == []
    router.on_replica_actor_died(a.replica_id)
    assert list(router.curr_replicas) == [b.replica_id]
    with pytest.raises(TypeError):
        RequestRouter()  # type: ignore[abstract]


def test_check_ranks_accepts_lists_of_replicas_only() -> None:
    a = rep("a")
    assert check_ranks([[a], []]) == [[a], []]
    assert check_ranks(([a],)) == [[a]]
    for garbage in (None, a, [a], [["x"]], "a", [[a], None]):
        assert check_ranks(garbage) is None


def test_internal_replica_context_is_none_outside_a_replica() -> None:
    assert _get_internal_replica_context() is None


# ---- configuration --------------------------------------------------------------------------


def test_config_accepts_import_paths_classes_and_dicts() -> None:
    rc = RequestRouterConfig(request_router_class="pkg.mod:Cls", request_router_kwargs={"k": 1})
    assert rc.is_custom and rc.class_name == "pkg.mod:Cls"
    assert RequestRouterConfig(request_router_class=Mixed).is_custom
    assert not RequestRouterConfig().is_custom
    cfg = DeploymentConfig(request_router_config={"request_router_class": "a.b", "request_routing_stats_period_s": 1})
    assert cfg.custom_router() is not None and cfg.request_router_config is not None
    assert DeploymentConfig(request_router_config=RequestRouterConfig()).custom_router() is None


@pytest.mark.parametrize(("options", "field", "says"), [
    ({"request_router_class": "no_attribute"}, "request_router_class", "import path"),
    ({"request_router_class": "a:b:c"}, "request_router_class", "import path"),
    ({"request_router_class": 42}, "request_router_class", "got int"),
    ({"request_router_class": dict}, "request_router_class", "not a subclass"),
    ({"request_routing_stats_period_s": 0}, "request_routing_stats_period_s", "greater than 0"),
    ({"request_routing_stats_timeout_s": -1}, "request_routing_stats_timeout_s", "greater than 0"),
    ({"choose_replicas_timeout_s": 0}, "choose_replicas_timeout_s", "greater than 0"),
    ({"request_router_kwargs": "x"}, "request_router_kwargs", "dictionary"),
    ({"request_router_klass": "a:b"}, "request_router_klass", "Extra inputs"),
])
def test_config_errors_name_the_field(options: dict[str, Any], field: str, says: str) -> None:
    @serve.deployment
    class D:
        pass

    with pytest.raises(ValueError) as caught:
        D.options(request_router_config=options)
    text = str(caught.value)
    assert f"request_router_config.{field}" in text and says in text, text
    with pytest.raises(ValueError, match=field):
        DeploymentSchema(name="D", request_router_config=options)


def test_deployment_option_decorator_options_and_config_file() -> None:
    @serve.deployment(request_router_config=RequestRouterConfig(request_router_class="m:R"))
    class D:
        pass

    assert D.config.custom_router() is not None
    assert D.options(request_router_config=None).config.custom_router() is None
    schema = DeploymentSchema(name="D", request_router_config={"request_router_class": "m:S"})
    changed = D.options(**schema.options()).config.request_router_config
    assert changed is not None and changed.request_router_class == "m:S"


# ---- the controller's side ------------------------------------------------------------------


def test_membership_carries_the_router_and_latest_routing_stats() -> None:
    cfg = DeploymentConfig(request_router_config=RequestRouterConfig(request_router_class=Mixed))
    blob = request_router_blob(cfg, "dep")
    assert isinstance(cloudpickle.loads(blob), RequestRouterConfig)
    assert request_router_blob(DeploymentConfig(), "dep") == b""
    pub = Publisher(1)
    m = Membership("app", "dep", 5, (ReplicaEndpoint("r1", "/x", 2),), request_router=blob)
    assert pub.record_routing_stats("app", "dep", "r1", {"load": 3}, ["r1", "r2"])
    assert not pub.record_routing_stats("app", "dep", "r1", {"load": 3}, ["r1", "r2"])  # unchanged
    assert pub.record_routing_stats("app", "dep", "r2", {"load": 1}, ["r1", "r2"])
    assert pub.with_routing_stats(m).routing_stats == {"r1": {"load": 3}}  # r2 is not listed yet
    pub.record_routing_stats("app", "dep", "r2", {"load": 2}, ["r2"])  # r1 is gone
    assert pub.routing_stats[("app", "dep")] == {"r2": {"load": 2}}
    # Deployments without a custom router get no stats; a gone deployment forgets them.
    assert pub.with_routing_stats(Membership("app", "dep", 6, ())).routing_stats == {}
    pub.with_routing_stats(Membership("app", "dep", 7, (), gone="deleted"))
    assert ("app", "dep") not in pub.routing_stats


# ---- the router with a custom class, against fake replicas --------------------------------------


class FakeReplica:
    """Answers every request with its name; method "hold" waits until released."""

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.conns: list[FramedProtocol] = []
        self.held: list[tuple[FramedProtocol, int]] = []

    async def start(self) -> FakeReplica:
        def factory() -> asyncio.Protocol:
            return FramedProtocol(SECRET, True, on_ready=self._on_connect)

        self.server = await asyncio.get_running_loop().create_unix_server(factory, self.path)
        return self

    def endpoint(self, max_ongoing: int = 4) -> ReplicaEndpoint:
        return ReplicaEndpoint(self.name, self.path, max_ongoing)

    def _on_connect(self, proto: FramedProtocol) -> None:
        self.conns.append(proto)
        proto.on_message = self._on_message

    def _on_message(self, proto: FramedProtocol, msg: Any) -> None:
        if msg[0] == REQUEST and msg[2] == "hold":
            self.held.append((proto, msg[1]))
        elif msg[0] == REQUEST:
            proto.send((OK, msg[1], self.name))

    def release(self) -> None:
        held, self.held = self.held, []
        for proto, rid in held:
            proto.send((OK, rid, self.name))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="shoal-rr", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def fakes(sock_dir: str) -> AsyncIterator[list[FakeReplica]]:
    made = [await FakeReplica(f"r{i}", f"{sock_dir}/r{i}.sock").start() for i in range(3)]
    yield made
    for f in made:
        f.close()


class Lowest(RequestRouter):
    """Ranks replicas by their routing stat "load", lowest first, one per rank; records what it saw."""

    seen: list[tuple[str, str, str]] = []

    def initialize_state(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.routing_stats.get("load", 1e9))
        return [[r] for r in ordered]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        Lowest.seen.append((pending_request.metadata.request_id, replica_id.unique_id, result.request_id))


class Raises(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        raise RuntimeError("router bug")


class Garbage(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> Any:
        return candidate_replicas[0]


class Hangs(RequestRouter):
    calls = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        Hangs.calls += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:  # ignores the router's cancellation (not the test loop's)
            await asyncio.sleep(3600)
        return []


class Nobody(RequestRouter):
    """Never offers a replica: requests wait, bounded by max_queue_wait_s."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [[]]


def router_for(cls: Any, fakes: list[FakeReplica], stats: dict[str, dict[str, Any]] | None = None,
               max_ongoing: int = 4, max_queue_wait_s: float = 0.0, **config: Any) -> Router:
    r = Router("app", "dep", SECRET, rng=random.Random(0))
    blob = cloudpickle.dumps(RequestRouterConfig(request_router_class=cls, **config))
    r.update(Membership("app", "dep", 1, tuple(f.endpoint(max_ongoing) for f in fakes), request_router=blob,
                        routing_stats=stats or {}, max_queue_wait_s=max_queue_wait_s))
    return r


async def call(r: Router, method: str = "m", rid: str = "req") -> Any:
    return await asyncio.wait_for(r.call(method, (), {}, RequestMeta(rid)), PATIENCE_S)


async def test_requests_go_to_the_first_rank_and_on_request_routed_is_told(fakes: list[FakeReplica]) -> None:
    Lowest.seen = []
    stats = {"r0": {"load": 5}, "r1": {"load": 1}, "r2": {"load": 3}}
    r = router_for(Lowest, fakes, stats, request_router_kwargs={"alpha": 1})
    assert r._policy is not None and r._policy.router.kwargs == {"alpha": 1}  # type: ignore[attr-defined]
    assert [await call(r, rid=f"q{i}") for i in range(5)] == ["r1"] * 5
    assert Lowest.seen == [(f"q{i}", "r1", f"q{i}") for i in range(5)]
    # New stats come with the next membership.
    r.update(Membership("app", "dep", 2, tuple(f.endpoint() for f in fakes), request_router=r._policy_blob,
                        routing_stats={"r0": {"load": 0}}))
    assert await call(r) == "r0"
    r.close()


async def test_a_full_replica_is_skipped_for_the_next_rank(fakes: list[FakeReplica]) -> None:
    r = router_for(Lowest, fakes, {"r0": {"load": 0}, "r1": {"load": 1}, "r2": {"load": 2}}, max_ongoing=1)
    held = asyncio.ensure_future(call(r, "hold"))
    await asyncio.wait_for(_until(lambda: len(fakes[0].held) == 1), PATIENCE_S)
    assert await call(r) == "r1"  # r0 is at max_ongoing_requests
    fakes[0].release()
    assert await held == "r0"
    r.close()


async def test_waiting_for_the_chosen_replica_is_bounded_by_max_queue_wait(fakes: list[FakeReplica]) -> None:
    r = router_for(Nobody, fakes, max_queue_wait_s=0.3)
    with pytest.raises(BackPressureError, match="max_queue_wait_s"):
        await call(r)
    assert r.num_queued == 0
    r.close()


async def test_a_waiting_request_takes_the_chosen_replica_once_it_has_room(fakes: list[FakeReplica]) -> None:
    r = router_for(Lowest, fakes[:1], {"r0": {"load": 0}}, max_ongoing=1)
    held = asyncio.ensure_future(call(r, "hold"))
    await asyncio.wait_for(_until(lambda: len(fakes[0].held) == 1), PATIENCE_S)
    waiting = asyncio.ensure_future(call(r))
    await asyncio.wait_for(_until(lambda: r.num_queued == 1), PATIENCE_S)
    fakes[0].release()
    assert await held == "r0" and await waiting == "r0"
    r.close()


class NeedsStats(RequestRouter):
    """Offers only replicas that reported routing stats; the test decides when an answer returns."""

    entered: asyncio.Event
    answer: asyncio.Event

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ready = [r for r in candidate_replicas if r.routing_stats]
        NeedsStats.entered.set()
        await NeedsStats.answer.wait()
        return [ready]


async def test_stats_that_arrive_while_the_router_is_asked_are_not_missed(fakes: list[FakeReplica]) -> None:
    # No max_queue_wait_s: a lost wake-up would leave the request waiting for good.
    NeedsStats.entered, NeedsStats.answer = asyncio.Event(), asyncio.Event()
    r = router_for(NeedsStats, fakes[:1])
    request = asyncio.ensure_future(call(r))
    await asyncio.wait_for(NeedsStats.entered.wait(), PATIENCE_S)
    # The first stats come while choose_replicas() is still deciding on the old (empty) ones.
    r.update(Membership("app", "dep", 2, (fakes[0].endpoint(),), request_router=r._policy_blob,
                        routing_stats={"r0": {"load": 1}}))
    NeedsStats.answer.set()
    assert await request == "r0"
    r.close()


class NotYet(RequestRouter):
    """Offers nothing until its own state says so (nothing shoal sees changes)."""

    open_at = 0.0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        return [candidate_replicas] if asyncio.get_running_loop().time() >= NotYet.open_at else [[]]


async def test_a_router_that_offers_nothing_is_asked_again(fakes: list[FakeReplica]) -> None:
    NotYet.open_at = asyncio.get_running_loop().time() + 0.2
    r = router_for(NotYet, fakes)
    assert await call(r) in {"r0", "r1", "r2"}
    r.close()


@pytest.mark.parametrize(("cls", "says"), [(Raises, "raised RuntimeError: router bug"), (Garbage, "not a list")])
async def test_a_failing_router_falls_back_to_the_default_choice(fakes: list[FakeReplica], cls: Any, says: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.router")
    r = router_for(cls, fakes)
    answers = {await call(r) for _ in range(6)}
    assert answers <= {"r0", "r1", "r2"} and answers
    assert says in caplog.text and "default choice" in caplog.text
    assert r._policy is not None and r._policy.fallbacks == 6
    r.close()


async def test_a_router_that_never_answers_is_timed_out_then_skipped(fakes: list[FakeReplica],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.router")
    Hangs.calls = 0
    r = router_for(Hangs, fakes, choose_replicas_timeout_s=0.2)
    assert await call(r) in {"r0", "r1", "r2"}
    assert "did not return within 0.2 s" in caplog.text
    # The next requests do not wait out the timeout again: the router is left out for a while.
    assert [await call(r) for _ in range(3)] and Hangs.calls == 1
    r.close()


async def test_a_router_that_cannot_be_loaded_leaves_default_routing(fakes: list[FakeReplica],
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="shoal.router")
    r = router_for("no_such_module_xyz:Router", fakes)
    assert r._policy is None and "cannot import request_router_class" in caplog.text
    assert await call(r) in {"r0", "r1", "r2"}
    r.close()


async def test_routing_stats_and_replica_facts_reach_the_router(fakes: list[FakeReplica]) -> None:
    r = router_for(Lowest, fakes, {"r2": {"load": 7, "tag": "x"}}, max_ongoing=3)
    assert r._policy is not None
    replicas = {v.replica_id.unique_id: v for v in r._policy.router.curr_replicas.values()}
    assert replicas["r2"].routing_stats == {"load": 7, "tag": "x"} and replicas["r0"].routing_stats == {}
    view = replicas["r0"]
    assert view.max_ongoing_requests == 3 and view.node_id and view.replica_id == ReplicaID("r0", "dep", "app")
    assert view.queue_len == 0 and view.is_available
    r.close()


async def test_deployments_without_a_custom_router_build_nothing(fakes: list[FakeReplica]) -> None:
    r = Router("app", "dep", SECRET)
    r.update(Membership("app", "dep", 1, tuple(f.endpoint() for f in fakes)))
    assert r._policy is None and r._views == [] and not r._custom_possible
    assert await call(r) in {"r0", "r1", "r2"}
    r.close()


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.01)


# ---- the replica's side: record_routing_stats() ------------------------------------------------


class StatsUser:
    def __init__(self) -> None:
        self.value: Any = {"load": 1}
        self.calls = 0

    def record_routing_stats(self) -> Any:
        self.calls += 1
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class NoStats:
    pass


class SlowStats:
    async def record_routing_stats(self) -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}


async def _user(cls: Any) -> Any:
    from shoal.context import ReplicaContext
    from shoal.runtime.callable import UserCallable

    user = UserCallable(cls, (), {}, is_function=False, context=ReplicaContext("app", "dep", "r1"))
    await user.initialize(None)
    return user


async def test_routing_stats_are_sent_when_they_change_and_bad_answers_warn(
        caplog: pytest.LogCaptureFixture) -> None:
    from shoal.runtime.replica.routing_stats import RoutingStatsReporter, routing_stats_method
    from shoal.runtime.wire import ReplicaRoutingStats

    caplog.set_level(logging.WARNING, logger="shoal.replica")
    user = await _user(StatsUser)
    fn = routing_stats_method(user)
    assert fn is not None
    sent: list[Any] = []
    reporter = RoutingStatsReporter("r1", user, fn, RequestRouterConfig(request_router_class="m:R"), sent.append)
    await reporter.once()
    await reporter.once()  # unchanged: not sent again
    assert sent == [ReplicaRoutingStats("r1", {"load": 1})] and user.instance.calls == 2
    user.instance.value = ["not", "a", "dict"]
    await reporter.once()
    assert "returned list; expected a dict" in caplog.text and len(sent) == 1
    reporter._warned_at = -1e9
    user.instance.value = {1: "x"}
    await reporter.once()
    assert "non-string key 1" in caplog.text and len(sent) == 1
    user.instance.value = {"load": 2}
    await reporter.once()
    reporter.resend()  # a restarted controller: the same answer goes out again
    await reporter.once()
    assert [m.stats for m in sent] == [{"load": 1}, {"load": 2}, {"load": 2}]
    await user.shutdown()
    plain = await _user(NoStats)
    assert routing_stats_method(plain) is None
    await plain.shutdown()


async def test_a_late_record_routing_stats_is_bounded(caplog: pytest.LogCaptureFixture) -> None:
    from shoal.runtime.replica.routing_stats import RoutingStatsReporter, routing_stats_method

    caplog.set_level(logging.WARNING, logger="shoal.replica")
    user = await _user(SlowStats)
    fn = routing_stats_method(user)
    assert fn is not None
    sent: list[Any] = []
    config = RequestRouterConfig(request_router_class="m:R", request_routing_stats_timeout_s=0.1)
    await asyncio.wait_for(RoutingStatsReporter("r1", user, fn, config, sent.append).once(), PATIENCE_S)
    assert sent == [] and "did not return within 0.1 s (request_routing_stats_timeout_s)" in caplog.text
    await user.shutdown()


def test_a_router_class_from_a_script_travels_by_value() -> None:
    import pickle

    from shoal.config import _PickledClass

    rc = RequestRouterConfig(request_router_class=Mixed)
    state = rc.__getstate__()
    assert isinstance(state["__dict__"]["request_router_class"], _PickledClass)
    back = pickle.loads(pickle.dumps(DeploymentConfig(request_router_config=rc)))
    assert back.request_router_config is not None and back.request_router_config.request_router_class is Mixed


class Slow(RequestRouter):
    started = 0
    cancelled = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        Slow.started += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            Slow.cancelled += 1
            raise
        return []


async def test_cancelling_a_request_cancels_its_routing(fakes: list[FakeReplica]) -> None:
    Slow.started = Slow.cancelled = 0
    r = router_for(Slow, fakes, choose_replicas_timeout_s=60)
    pending = asyncio.ensure_future(r.call("m", (), {}, RequestMeta("q")))
    await asyncio.wait_for(_until(lambda: Slow.started == 1), PATIENCE_S)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await asyncio.wait_for(_until(lambda: Slow.cancelled == 1), PATIENCE_S)
    assert r.num_queued == 0 and r.num_in_flight == 0
    r.close()
