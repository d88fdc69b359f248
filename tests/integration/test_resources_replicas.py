"""Resource accounting on real processes, with declared GPUs (this machine has none)."""

from __future__ import annotations

import os

import pytest
from conftest import child_pids, wait_until

from shoal import serve
from shoal.runtime.controller import DeployError


@serve.deployment(num_replicas=4, ray_actor_options={"num_gpus": 0.5})
class HalfGPU:
    def devices(self) -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture
def gpu_instance(run_dir: str):  # type: ignore[no-untyped-def]
    before = child_pids()
    serve.start(http_options={"port": 0}, num_gpus=2, _run_dir=run_dir)
    try:
        yield
    finally:
        serve.shutdown()
    assert wait_until(lambda: not (child_pids() - before), 10)


def test_fractional_gpus_are_packed(gpu_instance: None) -> None:
    h = serve.run(HalfGPU.options(max_ongoing_requests=1).bind())
    # max_ongoing_requests=1 spreads concurrent calls over all four replicas.
    devices = [r.result() for r in [h.devices.remote() for _ in range(40)]]
    assert set(devices) == {"0", "1"}  # two replicas share each GPU
    assert "GPU" in serve.status().resources


def test_update_makes_room_when_resources_are_full(gpu_instance: None) -> None:
    h = serve.run(HalfGPU.bind())
    serve.run(HalfGPU.options(max_ongoing_requests=2).bind(), timeout_s=60)  # a restart-requiring change
    dep = serve.status().applications["default"].deployments["HalfGPU"]
    assert dep.replica_states == {"RUNNING": 4}
    assert {r.result() for r in [h.devices.remote() for _ in range(20)]} <= {"0", "1"}


def test_pending_replica_names_the_missing_resource(gpu_instance: None) -> None:
    with pytest.raises(TimeoutError):
        serve.run(HalfGPU.options(num_replicas=5).bind(), timeout_s=5)
    dep = serve.status().applications["default"].deployments["HalfGPU"]
    assert dep.replica_states == {"RUNNING": 4}
    assert "num_gpus=0.5" in dep.message and "pending" in dep.message


def test_request_that_can_never_fit_fails(gpu_instance: None) -> None:
    with pytest.raises(DeployError, match="can never fit"):
        serve.run(HalfGPU.options(num_replicas=1, ray_actor_options={"num_gpus": 4}).bind(), timeout_s=30)


def test_cpus_oversubscribed_by_default(gpu_instance: None) -> None:
    serve.run(HalfGPU.options(num_replicas=3, ray_actor_options={"num_cpus": 2}).bind())
    assert "oversubscribed" in serve.status().resources
