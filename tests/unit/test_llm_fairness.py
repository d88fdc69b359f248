"""Weighted fair queuing between tenants at the gateway (issue 20 item 8)."""

from __future__ import annotations

import asyncio

import pytest

from shoal.llm._fairness import FairGate, QueueTimeout


async def _order(gate: FairGate, arrivals: list[tuple[str, float]]) -> list[str]:
    """Hold the one slot, queue ``arrivals`` in order, then release turn by turn: who got them."""
    await gate.acquire("holder")
    served: list[str] = []

    async def one(tenant: str, weight: float) -> None:
        await gate.acquire(tenant, weight)
        served.append(tenant)

    tasks = []
    for tenant, weight in arrivals:
        tasks.append(asyncio.create_task(one(tenant, weight)))
        await asyncio.sleep(0)  # each is queued before the next arrives
    for _ in arrivals:
        gate.release()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return served


def test_a_burst_does_not_starve_a_later_tenant() -> None:
    gate = FairGate(1, 10.0)
    arrivals = [("a", 1.0)] * 6 + [("b", 1.0)]
    served = asyncio.run(_order(gate, arrivals))
    # b arrived last, behind six of a's, and is served second: after one of a's, not after all six.
    assert served.index("b") <= 1, served
    assert served.count("a") == 6


def test_weights_share_turns() -> None:
    gate = FairGate(1, 10.0)
    arrivals = [("a", 1.0)] * 6 + [("b", 2.0)] * 6
    served = asyncio.run(_order(gate, arrivals))
    first6 = served[:6]
    assert first6.count("b") == 4 and first6.count("a") == 2, served  # twice the weight, twice the turns


def test_room_means_no_wait_and_a_full_gate_times_out() -> None:
    async def main() -> None:
        gate = FairGate(2, 0.05)
        await gate.acquire("a")
        await gate.acquire("b")
        assert gate.in_flight == 2
        with pytest.raises(QueueTimeout, match="busy model"):
            await gate.acquire("c")
        assert gate.waiting == 0 and gate.in_flight == 2
        gate.release()
        await gate.acquire("c")  # room again: at once
        assert gate.in_flight == 2

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_turn_on() -> None:
    async def main() -> None:
        gate = FairGate(1, 10.0)
        await gate.acquire("a")
        gone = asyncio.create_task(gate.acquire("b"))
        stays = asyncio.create_task(gate.acquire("c"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        gate.release()
        await asyncio.wait_for(stays, 1)
        assert gate.in_flight == 1 and gate.waiting == 0

    asyncio.run(main())
