"""Gang replicas: one replica made of several rank processes (tensor parallel on CPU with gloo),
whole-gang replacement when a rank dies, and pending gangs."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx
import pytest
from conftest import Instance, wait_until
from starlette.requests import Request

from shoal import serve
from shoal.deployment import build_app_spec

torch = pytest.importorskip("torch")


@serve.deployment(num_ranks=2, max_ongoing_requests=4, graceful_shutdown_timeout_s=2)
class TPLinear:
    """A linear layer whose output rows are split between the ranks; an all_gather joins them."""

    def __init__(self) -> None:
        import torch.distributed as dist

        ctx = serve.get_replica_context()
        self.rank, self.world_size = ctx.rank, ctx.world_size
        dist.init_process_group("gloo")  # MASTER_ADDR/PORT, RANK and WORLD_SIZE come from shoal
        gen = torch.Generator().manual_seed(0)
        self.full = torch.randn(6, 4, generator=gen)  # the same on every rank
        self.shard = self.full.chunk(self.world_size, dim=0)[self.rank]

    def _forward(self, x: list[float]) -> list[float]:
        import torch.distributed as dist

        v = torch.tensor(x)
        part = self.shard @ v
        parts = [torch.empty_like(part) for _ in range(self.world_size)]
        dist.all_gather(parts, part)
        return [float(f) for f in torch.cat(parts)]

    def _pids(self) -> list[int]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, os.getpid())
        return out

    async def pids(self) -> list[int]:
        return await asyncio.to_thread(self._pids)

    async def __call__(self, request: Request) -> dict[str, Any]:
        x = (await request.json())["x"]
        y = await asyncio.to_thread(self._forward, x)
        return {"y": y, "rank": self.rank, "world_size": self.world_size,
                "reference": [float(f) for f in self.full @ torch.tensor(x)]}


def test_tensor_parallel_linear_over_http_matches_the_unsplit_layer(instance: Instance) -> None:
    h = serve.run(TPLinear.bind(), timeout_s=120)
    st = serve.status().applications["default"].deployments["TPLinear"]
    assert st.replica_states == {"RUNNING": 1}
    for x in ([1.0, 2.0, 3.0, 4.0], [0.5, -1.0, 0.0, 2.5]):
        r = httpx.post(instance.url + "/", json={"x": x}, timeout=60)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rank"] == 0 and body["world_size"] == 2
        assert body["y"] == pytest.approx(body["reference"], abs=1e-5)
        assert len(body["y"]) == 6
    pids = h.pids.remote().result(timeout_s=60)
    assert len(set(pids)) == 2  # two processes, one replica


def test_a_dead_rank_replaces_the_whole_gang(instance: Instance) -> None:
    h = serve.run(TPLinear.bind(), timeout_s=120)
    rank0, rank1 = h.pids.remote().result(timeout_s=60)
    os.kill(rank1, signal.SIGKILL)

    def replaced() -> bool:
        try:
            new = h.pids.remote().result(timeout_s=30)
        except Exception:
            return False
        return rank0 not in new and rank1 not in new

    assert wait_until(replaced, 120)
    assert wait_until(lambda: not os.path.exists(f"/proc/{rank0}") or _zombie(rank0), 15)
    r = httpx.post(instance.url + "/", json={"x": [1.0, 0.0, 0.0, 0.0]}, timeout=60)
    assert r.status_code == 200 and r.json()["y"] == pytest.approx(r.json()["reference"], abs=1e-5)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] == "Z"
    except OSError:
        return True


@serve.deployment
class HoldsGPU:
    def __call__(self) -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")


@serve.deployment(placement_group_bundles=[{"CPU": 1, "GPU": 1}, {"CPU": 1, "GPU": 1}])
class GPUGang:
    def __call__(self) -> dict[str, str]:
        ctx = serve.get_replica_context()
        return {"rank": str(ctx.rank), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                "env_rank": os.environ.get("RANK", ""), "world": os.environ.get("WORLD_SIZE", "")}

    def env(self) -> dict[str, str]:
        return {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                   "MASTER_PORT", "CUDA_VISIBLE_DEVICES")}


def test_gang_stays_pending_until_every_rank_fits(run_dir: str) -> None:
    from shoal import api

    serve.start(http_options={"port": 0}, num_gpus=2, _run_dir=run_dir)
    try:
        serve.run(HoldsGPU.options(ray_actor_options={"num_gpus": 1}).bind(), name="holder", route_prefix="/h")
        inst = api._require()
        inst.loop.run(inst.controller.deploy(build_app_spec(GPUGang.bind(), "gang", "/g")))

        def message() -> str:
            return serve.status().applications["gang"].deployments["GPUGang"].message

        assert wait_until(lambda: "pending" in message(), 15)
        assert "gang of 2 ranks: rank 1" in message() and "num_gpus=1" in message()
        assert serve.status().applications["gang"].deployments["GPUGang"].replica_states == {}
        serve.delete("holder")
        assert wait_until(lambda: serve.status().applications["gang"].status == "RUNNING", 60)
        env = serve.get_app_handle("gang").env.remote().result(timeout_s=30)
        assert env["RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "0"
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
        assert env["CUDA_VISIBLE_DEVICES"] in ("0", "1")
        # A gang needing more GPUs than the machine has can never fit: the deploy fails, clearly.
        big = GPUGang.options(name="Big", placement_group_bundles=[{"GPU": 1}] * 3)
        with pytest.raises(Exception, match="gang of 3 ranks needs num_gpus=3"):
            serve.run(big.bind(), name="big", route_prefix="/big", timeout_s=30)
    finally:
        serve.shutdown()


def test_gang_options_are_validated() -> None:
    with pytest.raises(ValueError, match="num_ranks"):
        serve.deployment(num_ranks=3, placement_group_bundles=[{"CPU": 1}])(HoldsGPU.func_or_class)
    assert TPLinear.options(num_ranks=4).config.world_size == 4


@serve.deployment(num_ranks=3, num_replicas=2)
class Trio:
    def __call__(self) -> dict[str, int]:
        ctx = serve.get_replica_context()
        return {"rank": ctx.rank, "world_size": ctx.world_size}


def test_scaling_adds_and_removes_whole_gangs(instance: Instance) -> None:
    from shoal import api

    controller = api._require().controller
    h = serve.run(Trio.bind(), timeout_s=60)
    assert h.remote().result(timeout_s=30) == {"rank": 0, "world_size": 3}

    def processes() -> tuple[int, int]:
        async def count() -> tuple[int, int]:
            return len(controller.replicas), len(controller.ranks)

        return api._require().loop.run(count())

    assert processes() == (2, 4)  # two gangs: two rank-0 replicas, each with ranks 1 and 2
    serve.run(Trio.options(num_replicas=1).bind(), timeout_s=60)
    assert wait_until(lambda: processes() == (1, 2), 30)
    serve.run(Trio.options(num_replicas=3).bind(), timeout_s=60)
    assert wait_until(lambda: processes() == (3, 6), 30)
    assert serve.status().applications["default"].deployments["Trio"].replica_states == {"RUNNING": 3}
