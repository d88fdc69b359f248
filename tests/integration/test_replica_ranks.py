"""Ray's replica ranks on real replica processes: ranks 0..N-1 and world_size N in the replica
context, ``reconfigure(user_config, rank)`` given a ``ReplicaRank``, scaling down keeps the lowest
ranks, and a replica killed with SIGKILL is replaced under its rank."""

from __future__ import annotations

import os
import signal
from typing import Any

from conftest import Instance, wait_until

from shoal import serve
from shoal.schema import ReplicaRank


@serve.deployment(num_replicas=3, user_config={"name": "v1"})
class Ranked:
    def __init__(self) -> None:
        ctx = serve.get_replica_context()
        self.init_rank = ctx.rank.rank
        self.given: Any = None

    def reconfigure(self, user_config: dict[str, Any], rank: ReplicaRank) -> None:
        self.given = (user_config["name"], type(rank).__name__, rank.rank, rank.node_rank, rank.local_rank)

    def __call__(self) -> dict[str, Any]:
        ctx = serve.get_replica_context()
        return {"rank": ctx.rank.rank, "world_size": ctx.world_size, "init_rank": self.init_rank,
                "given": self.given, "pid": os.getpid()}


def sample(h: serve.DeploymentHandle, n: int = 40) -> dict[int, dict[str, Any]]:
    """rank -> the last answer of a replica with that rank, from ``n`` calls."""
    out: dict[int, dict[str, Any]] = {}
    for _ in range(n):
        r = h.remote().result()
        out[r["rank"]] = r
    return out


def test_ranks_world_size_reconfigure_scale_down_and_replacement(instance: Instance) -> None:
    h = serve.run(Ranked.bind())
    seen = sample(h)
    assert set(seen) == {0, 1, 2}
    for rank, r in seen.items():
        assert r["world_size"] == 3 and r["init_rank"] == rank
        assert tuple(r["given"]) == ("v1", "ReplicaRank", rank, 0, rank)
    assert len({r["pid"] for r in seen.values()}) == 3

    # Scale down to 2: rank 2 goes, the others learn the new world size.
    h = serve.run(Ranked.options(num_replicas=2).bind())

    def two() -> bool:
        s = sample(h, 20)
        return set(s) == {0, 1} and all(r["world_size"] == 2 for r in s.values())

    assert wait_until(two, 30, 0.2)
    survivors = {rank: r["pid"] for rank, r in sample(h).items()}

    # A replica killed with SIGKILL is replaced under the rank it held.
    os.kill(survivors[1], signal.SIGKILL)

    def replaced() -> bool:
        try:
            s = sample(h, 20)
        except Exception:
            return False
        return set(s) == {0, 1} and s[1]["pid"] != survivors[1] and s[0]["pid"] == survivors[0]

    assert wait_until(replaced, 60, 0.2)
