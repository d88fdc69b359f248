"""Real-GPU check for fractional GPUs: two replicas with ``num_gpus: 0.5`` on one GPU.

Run on a machine with an NVIDIA GPU and PyTorch (``python scripts/gpu_check.py [OUT.json]``).
It deploys:

* ``Half`` -- 2 replicas, ``num_gpus: 0.5``: each allocates 2 GiB on its GPU and reports its
  pid, ``CUDA_VISIBLE_DEVICES``, the device's UUID and the memory it holds;
* ``Whole`` -- 2 replicas, ``num_gpus: 1``, in a second app: while ``Half`` holds the GPU both
  stay pending, with a status message naming the GPU; once ``Half`` is deleted one starts and
  the other stays pending (on a one-GPU machine).

It then reads ``nvidia-smi`` for the processes holding memory on the GPU, and prints (and
writes) a JSON report with ``ok`` true when both Half replicas are distinct processes holding
memory on the same physical GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from shoal import serve

ALLOC_BYTES = 2 << 30
# GPU_CHECK_DRY=1: a rehearsal without a GPU (declare one: the allocation stays on the CPU).
DRY = os.environ.get("GPU_CHECK_DRY") == "1"


@serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": 0.5})
class Half:
    def __init__(self) -> None:
        import torch

        if DRY:
            self.block = torch.ones(ALLOC_BYTES // 4, dtype=torch.float32)
            return
        self.block = torch.ones(ALLOC_BYTES // 4, dtype=torch.float32, device="cuda")
        torch.cuda.synchronize()

    def __call__(self) -> dict[str, Any]:
        import torch

        if DRY:
            return {"pid": os.getpid(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                    "uuid": "dry", "allocated_bytes": self.block.numel() * 4}
        free, total = torch.cuda.mem_get_info()
        return {
            "pid": os.getpid(),
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": torch.cuda.get_device_name(0),
            "uuid": str(torch.cuda.get_device_properties(0).uuid),
            "allocated_bytes": torch.cuda.memory_allocated(),
            "sum_check": float(self.block[:1024].sum().item()),
            "gpu_free_bytes": free,
            "gpu_total_bytes": total,
        }


@serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": 1})
class Whole:
    def __call__(self) -> str:
        return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def nvidia_smi(*query: str) -> str:
    try:
        return subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"


def main() -> int:
    out_path = sys.argv[1] if len(sys.argv) > 1 else ""
    report: dict[str, Any] = {"gpus": nvidia_smi("--query-gpu=index,name,uuid,memory.total,memory.used",
                                                 "--format=csv,noheader")}
    t0 = time.monotonic()
    serve.start(http_options={"port": 0}, num_gpus=1 if DRY else None)
    handle = serve.run(Half.bind(), name="half", route_prefix="/half")
    report["half_deploy_s"] = round(time.monotonic() - t0, 2)
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(200):
        r = handle.remote().result(timeout_s=60)
        seen[r["pid"]] = r
        if len(seen) == 2:
            break
    report["half_replicas"] = list(seen.values())
    report["compute_apps"] = nvidia_smi("--query-compute-apps=pid,gpu_uuid,used_memory", "--format=csv,noheader")
    report["gpu_memory_used_after"] = nvidia_smi("--query-gpu=memory.used", "--format=csv,noheader")

    # Deploy without waiting for every replica: one of them cannot fit and stays pending.
    from shoal import api
    from shoal.deployment import build_app_spec

    inst = api._require()
    inst.loop.run(inst.controller.deploy(build_app_spec(Whole.bind(), "whole", "/whole")))
    def whole_status(until: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 90
        while True:
            app = serve.status().to_dict()["applications"].get("whole", {})
            dep = app.get("deployments", {}).get("Whole", {})
            if until(dep) or time.monotonic() > deadline:
                return app
            time.sleep(0.25)

    # Both halves hold GPU 0: no Whole replica fits.
    report["whole_while_half_runs"] = whole_status(lambda d: "pending" in d.get("message", ""))
    report["resources_while_half_runs"] = serve.status().resources
    # Free the GPU: one Whole replica starts, the second stays pending (one GPU on this machine).
    serve.delete("half")
    report["whole_after_half_deleted"] = whole_status(
        lambda d: d.get("replica_states", {}).get("RUNNING", 0) >= 1 and "pending" in d.get("message", ""))
    report["resources"] = serve.status().resources

    r0, r1 = (report["half_replicas"] + [{}, {}])[:2]
    report["ok"] = bool(
        len(seen) == 2
        and r0.get("uuid") == r1.get("uuid")
        and r0.get("allocated_bytes", 0) >= ALLOC_BYTES
        and r1.get("allocated_bytes", 0) >= ALLOC_BYTES
    )
    serve.shutdown()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if out_path:
        with open(out_path, "w") as f:
            f.write(text)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
