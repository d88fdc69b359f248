"""The in-process path of gRPC calls an ingress replica serves itself
(:mod:`shoal.runtime.replica.grpc_ingress`), with a stand-in replica core and routers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shoal.exceptions import BackPressureError, RayTaskError, gRPCStatusError
from shoal.runtime.replica.accounting import Accounts, Sinks
from shoal.runtime.replica.grpc_ingress import LocalSource
from shoal.runtime.replica.slots import Slots
from shoal.runtime.wire import RequestMeta

KEY = ("app", "Ingress")


class User:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any:
        await self.gate.wait()
        if method == "fail":
            raise ValueError("bad")
        if method == "refuse":
            raise gRPCStatusError(ValueError("no"), 9, "not ready")
        return ("here", method, args)

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[Any]:
        for i in range(3):
            yield i


class Router:
    def __init__(self, holds: set[str] = set()) -> None:  # noqa: B006 - never mutated
        self.holds = holds
        self.calls: list[str] = []

    def holds_model(self, model_id: str) -> bool:
        return model_id in self.holds

    async def call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], meta: RequestMeta) -> Any:
        self.calls.append(method)
        return ("there", method, args)

    async def stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                     meta: RequestMeta) -> AsyncIterator[Any]:
        self.calls.append(method)
        yield "there"


class Routers:
    def __init__(self, router: Router) -> None:
        self.r = router

    def router(self, app: str, deployment: str) -> Router:
        return self.r


class Core:
    def __init__(self, limit: int = 5, max_queued: int = -1) -> None:
        self.key = KEY
        self.model_ids: tuple[str, ...] = ()
        self.gang: Any = None
        self.slots = Slots(limit, max_queued)
        self.access: list[tuple[str, str, Any]] = []
        self.accounts = Accounts(Sinks(metrics=lambda *_a: None,
                                       access=lambda verb, target, status, *_r: self.access.append(
                                           (verb, target, status))))
        self.user = User()

    def _user(self) -> User:
        return self.user


def _source(core: Core, router: Router | None = None) -> tuple[LocalSource, Router]:
    router = router or Router()
    return LocalSource(core, Routers(router)), router  # type: ignore[arg-type]


async def test_own_calls_run_here_and_others_go_through_the_router() -> None:
    core = Core()
    source, router = _source(core)
    meta = RequestMeta("r1")
    assert await source.router(*KEY).call("Say", (1,), {}, meta) == ("here", "Say", (1,))
    assert await source.router("other", "Ingress").call("Say", (2,), {}, meta) == ("there", "Say", (2,))
    assert router.calls == ["Say"]
    assert core.access == [("CALL", "Say", "OK")] and core.slots.ongoing == 0
    assert core.accounts.counters.requests == 1


async def test_a_model_held_only_by_another_replica_goes_there() -> None:
    core = Core()
    source, _ = _source(core, Router(holds={"m1"}))
    assert (await source.router(*KEY).call("Say", (), {}, RequestMeta("r", multiplexed_model_id="m1")))[0] == "there"
    core.model_ids = ("m1",)
    assert (await source.router(*KEY).call("Say", (), {}, RequestMeta("r", multiplexed_model_id="m1")))[0] == "here"


async def test_a_gang_takes_the_routers_way() -> None:
    core = Core()
    core.gang = object()
    source, _ = _source(core)
    assert (await source.router(*KEY).call("Say", (), {}, RequestMeta("r")))[0] == "there"


async def test_admission_waits_for_a_slot_then_refuses_past_max_queued() -> None:
    core = Core(limit=1, max_queued=1)
    core.user.gate.clear()
    source, _ = _source(core)
    here = source.router(*KEY)
    first = asyncio.ensure_future(here.call("Say", (), {}, RequestMeta("a")))
    second = asyncio.ensure_future(here.call("Say", (), {}, RequestMeta("b")))
    await asyncio.sleep(0.01)
    assert core.slots.ongoing == 1 and len(core.slots.waiters) == 1
    with pytest.raises(BackPressureError, match="max_queued_requests=1"):  # RESOURCE_EXHAUSTED at the front
        await here.call("Say", (), {}, RequestMeta("c"))
    core.user.gate.set()
    assert (await first)[0] == (await second)[0] == "here"
    assert core.slots.ongoing == 0 and core.slots.idle.is_set()


async def test_errors_come_out_as_through_a_router() -> None:
    core = Core()
    source, _ = _source(core)
    with pytest.raises(ValueError, match="bad") as err:
        await source.router(*KEY).call("fail", (), {}, RequestMeta("r"))
    assert isinstance(err.value, RayTaskError) and isinstance(err.value.cause, ValueError)
    with pytest.raises(gRPCStatusError) as status:
        await source.router(*KEY).call("refuse", (), {}, RequestMeta("r"))
    assert status.value.grpc_details == "not ready" and not isinstance(status.value, RayTaskError)
    assert [a[2] for a in core.access] == ["ERROR", "ERROR"] and core.accounts.counters.errors == 2
    assert core.slots.ongoing == 0


async def test_a_cancelled_call_frees_its_slot() -> None:
    core = Core()
    core.user.gate.clear()
    source, _ = _source(core)
    task = asyncio.ensure_future(source.router(*KEY).call("Say", (), {}, RequestMeta("r")))
    await asyncio.sleep(0.01)
    assert core.slots.ongoing == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert core.slots.ongoing == 0 and core.access == [("CALL", "Say", "CANCELLED")]
    assert core.accounts.counters.errors == 0


async def test_streams_run_here_and_a_stream_closed_early_frees_its_slot() -> None:
    core = Core()
    source, _ = _source(core)
    items = [i async for i in source.router(*KEY).stream("Repeat", (), {}, RequestMeta("r", stream=True))]
    assert items == [0, 1, 2] and core.access == [("STREAM", "Repeat", "OK")]
    stream = source.router(*KEY).stream("Repeat", (), {}, RequestMeta("r2", stream=True))
    assert await stream.__anext__() == 0
    assert core.slots.ongoing == 1
    await stream.aclose()  # type: ignore[attr-defined]
    assert core.slots.ongoing == 0 and core.access[-1] == ("STREAM", "Repeat", "CANCELLED")
