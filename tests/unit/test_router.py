from __future__ import annotations

import asyncio
import random

import pytest

from shoal.exceptions import BackPressureError, DeploymentUnavailableError
from shoal.runtime.router import Router
from shoal.runtime.wire import Membership, ReplicaEndpoint, RequestMeta


def membership(n: int, epoch: int, max_ongoing: int = 2, max_queued: int = -1, gone: str = "") -> Membership:
    reps = tuple(ReplicaEndpoint(f"r{i}", f"/nonexistent/r{i}.sock", max_ongoing) for i in range(n))
    return Membership("app", "dep", epoch, reps, max_queued, gone)


async def test_power_of_two_choices_prefers_less_loaded() -> None:
    router = Router("app", "dep", b"s", rng=random.Random(0))
    router.update(membership(2, 1, max_ongoing=10))
    slots = router._slots
    slots["r0"].in_flight = 5
    picks = [router._choose(0.0) for _ in range(20)]
    assert all(p is slots["r1"] for p in picks)


async def test_full_replicas_are_not_chosen() -> None:
    router = Router("app", "dep", b"s")
    router.update(membership(2, 1, max_ongoing=1))
    for s in router._slots.values():
        s.in_flight = 1
    assert router._choose(0.0) is None


async def test_waits_then_back_pressure() -> None:
    router = Router("app", "dep", b"s")
    router.update(membership(0, 1, max_queued=1))  # no replica yet
    meta = RequestMeta("r1")
    first = asyncio.ensure_future(router.call("m", (), {}, meta))
    await asyncio.sleep(0.01)
    assert router.num_queued == 1
    with pytest.raises(BackPressureError):
        await router.call("m", (), {}, meta)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert router.num_queued == 0


async def test_gone_deployment_fails_waiters() -> None:
    router = Router("app", "dep", b"s")
    router.update(membership(0, 1))
    waiting = asyncio.ensure_future(router.call("m", (), {}, RequestMeta("r")))
    await asyncio.sleep(0.01)
    router.update(membership(0, 2, gone="application deleted"))
    with pytest.raises(DeploymentUnavailableError, match="deleted"):
        await waiting


async def test_stale_membership_is_ignored() -> None:
    router = Router("app", "dep", b"s")
    router.update(membership(2, 5))
    router.update(membership(1, 3))
    assert router.num_replicas == 2


async def test_unreachable_replica_is_kept_and_request_waits() -> None:
    router = Router("app", "dep", b"s")
    router.update(membership(1, 1))
    call = asyncio.ensure_future(router.call("m", (), {}, RequestMeta("r")))
    await asyncio.sleep(0.2)
    # The socket does not exist: the replica is kept (skipped, reconnected with back-off)
    # and the call waits for it (tests/unit/test_router_liveness.py covers the rest).
    assert router.num_replicas == 1 and not router._slots["r0"].health.usable and not call.done()
    call.cancel()
    router.close()


def test_blocked_replica_is_retried_after_its_backoff() -> None:
    # A replica that refused a request is skipped briefly; a waiting caller must get it back
    # once the block ends (uvloop's millisecond clock once made this spin forever).
    from shoal.runtime.backend import new_event_loop

    async def scenario() -> bool:
        router = Router("app", "dep", b"s")
        router.update(membership(1, 1, max_ongoing=1))
        slot = router._slots["r0"]
        loop = asyncio.get_running_loop()
        for _ in range(20):
            slot.blocked_until = loop.time() + 0.0101
            router._schedule_unblock(loop)
            got = await asyncio.wait_for(router._acquire(), 1.0)
            assert got is slot
            router._release(got)
        return True

    loop = new_event_loop()
    try:
        assert loop.run_until_complete(scenario())
    finally:
        loop.close()
