"""Resource accounting: GPU sharing and whole GPUs, memory, custom resources, CPUs, detection."""

from __future__ import annotations

import subprocess

import pytest

from shoal.config import RayActorOptions
from shoal.serving.resources import (
    GPU,
    NVIDIA_SMI_QUERY,
    Ledger,
    MachineResources,
    Pending,
    Placement,
    Request,
    detect,
    parse_nvidia_smi,
)

GIB = 1024**3


def machine(gpus: int = 2, cpus: float = 8, memory: int = 16 * GIB, **custom: float) -> MachineResources:
    return MachineResources(
        num_cpus=cpus,
        gpus=tuple(GPU(i, f"fake-{i}", 80_000) for i in range(gpus)),
        memory_bytes=memory,
        custom=dict(custom),
    )


def placed(result: Placement | Pending) -> Placement:
    assert isinstance(result, Placement), result
    return result


def pending(result: Placement | Pending) -> Pending:
    assert isinstance(result, Pending), result
    return result


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def test_request_of_defaults_and_values() -> None:
    assert Request.of(None) == Request(num_cpus=1.0, num_gpus=0.0, memory_bytes=0.0, custom={})
    opts = RayActorOptions(num_cpus=0.5, num_gpus=0.25, memory=2 * GIB, resources={"TPU": 1})
    assert Request.of(opts) == Request(num_cpus=0.5, num_gpus=0.25, memory_bytes=2 * GIB, custom={"TPU": 1.0})
    assert Request.of({"num_gpus": 2}) == Request(num_cpus=1.0, num_gpus=2.0)


@pytest.mark.parametrize("kwargs", [{"num_gpus": 1.5}, {"num_cpus": -1}, {"memory_bytes": float("nan")}])
def test_request_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Request(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# GPUs
# --------------------------------------------------------------------------------------------


def test_four_quarter_replicas_share_gpu0_and_the_fifth_goes_to_gpu1() -> None:
    ledger = Ledger(machine(gpus=2))
    quarter = Request(num_gpus=0.25)
    first_four = [placed(ledger.place(f"r{i}", quarter)) for i in range(4)]
    assert {p.cuda_visible_devices for p in first_four} == {"0"}
    assert all(p.gpu_fraction == 0.25 for p in first_four)
    fifth = placed(ledger.place("r4", quarter))
    assert fifth.cuda_visible_devices == "1"
    assert ledger.replica_ids_on_gpu(0) == ["r0", "r1", "r2", "r3"]


def test_fractional_best_fit_prefers_the_fullest_gpu_that_fits() -> None:
    ledger = Ledger(machine(gpus=3))
    placed(ledger.place("a", Request(num_gpus=0.5)))  # GPU 0 at 0.5
    placed(ledger.place("big", Request(num_gpus=0.75)))  # doesn't fit GPU 0: GPU 1 at 0.75
    # 0.25 fits both; GPU 1 is fuller.
    assert placed(ledger.place("b", Request(num_gpus=0.25))).cuda_visible_devices == "1"
    # 0.5 fits only GPU 0 now.
    assert placed(ledger.place("c", Request(num_gpus=0.5))).cuda_visible_devices == "0"


def test_whole_request_takes_entirely_free_gpus_lowest_first() -> None:
    ledger = Ledger(machine(gpus=4))
    placed(ledger.place("frac", Request(num_gpus=0.1)))  # GPU 0 partly used
    two = placed(ledger.place("two", Request(num_gpus=2)))
    assert two.gpus == (1, 2)
    assert two.cuda_visible_devices == "1,2"
    assert two.gpu_fraction == 1.0


def test_num_gpus_two_gets_two_whole_gpus() -> None:
    ledger = Ledger(machine(gpus=2))
    assert placed(ledger.place("r", Request(num_gpus=2))).cuda_visible_devices == "0,1"
    reason = pending(ledger.place("s", Request(num_gpus=0.5))).reason
    assert "num_gpus=0.5" in reason
    assert "GPU 0: 1 used of 1" in reason


def test_fractional_does_not_land_on_a_gpu_taken_whole() -> None:
    ledger = Ledger(machine(gpus=2))
    assert placed(ledger.place("whole", Request(num_gpus=1))).gpus == (0,)
    assert placed(ledger.place("frac", Request(num_gpus=0.5))).gpus == (1,)
    # And a whole request does not land on a partly used GPU.
    reason = pending(ledger.place("whole2", Request(num_gpus=1))).reason
    assert reason.startswith("needs num_gpus=1 but only 0 GPUs are entirely free")
    assert not pending(ledger.place("whole3", Request(num_gpus=1))).can_never_fit


def test_a_tenth_times_ten_fills_exactly_one_gpu() -> None:
    ledger = Ledger(machine(gpus=2))
    for i in range(10):
        assert placed(ledger.place(f"r{i}", Request(num_gpus=0.1))).gpus == (0,)
    assert ledger.available()["gpus"][0]["free"] == 0.0
    assert placed(ledger.place("r10", Request(num_gpus=0.1))).gpus == (1,)


def test_thirds_fill_exactly_one_gpu() -> None:
    ledger = Ledger(machine(gpus=1))
    for i in range(3):
        placed(ledger.place(f"r{i}", Request(num_gpus=1 / 3)))
    assert isinstance(ledger.place("r3", Request(num_gpus=0.01)), Pending)


def test_pending_gpu_message_names_the_resource_and_numbers() -> None:
    ledger = Ledger(machine(gpus=1))
    placed(ledger.place("a", Request(num_gpus=0.75)))
    reason = pending(ledger.place("b", Request(num_gpus=0.5))).reason
    assert reason == "needs num_gpus=0.5 but no GPU has 0.5 free (GPU 0: 0.75 used of 1)"


def test_release_frees_capacity() -> None:
    ledger = Ledger(machine(gpus=1, memory=4 * GIB, TPU=1))
    request = Request(num_gpus=1, memory_bytes=3 * GIB, custom={"TPU": 1})
    first = placed(ledger.place("a", request))
    assert isinstance(ledger.place("b", request), Pending)
    assert ledger.release("a") == first
    assert ledger.release("a") is None  # idempotent
    assert ledger.allocations() == {}
    assert placed(ledger.place("b", request)).gpus == (0,)
    assert list(ledger.allocations()) == ["b"]


def test_placing_the_same_tag_twice_is_a_bug() -> None:
    ledger = Ledger(machine())
    placed(ledger.place("a", Request()))
    with pytest.raises(ValueError, match="already placed"):
        ledger.place("a", Request())


def test_pending_holds_nothing() -> None:
    ledger = Ledger(machine(gpus=1, memory=GIB))
    # The GPU would fit but memory does not: the GPU share must not be taken.
    assert isinstance(ledger.place("a", Request(num_gpus=0.5, memory_bytes=2 * GIB)), Pending)
    assert ledger.available()["gpus"][0]["free"] == 1.0
    assert ledger.allocations() == {}


# --------------------------------------------------------------------------------------------
# Can never fit
# --------------------------------------------------------------------------------------------


def test_can_never_fit() -> None:
    ledger = Ledger(machine(gpus=1, memory=8 * GIB))
    gpu = pending(ledger.place("a", Request(num_gpus=2)))
    assert gpu.can_never_fit
    assert gpu.reason == "can never fit: needs num_gpus=2 but the machine has 1 GPU"

    no_gpus = Ledger(machine(gpus=0))
    frac = pending(no_gpus.place("a", Request(num_gpus=0.5)))
    assert frac.reason == "can never fit: needs num_gpus=0.5 but the machine has no GPUs"

    mem = pending(ledger.place("b", Request(memory_bytes=16 * GIB)))
    assert mem.reason == "can never fit: needs memory=16.0 GiB but the machine has 8.0 GiB in total"

    tpu = pending(ledger.place("c", Request(custom={"TPU": 1})))
    assert tpu.reason == "can never fit: needs resource 'TPU'=1 but the machine declares none"
    assert ledger.allocations() == {}


def test_can_never_fit_wins_over_busy() -> None:
    ledger = Ledger(machine(gpus=1))
    placed(ledger.place("a", Request(num_gpus=1)))
    assert pending(ledger.place("b", Request(num_gpus=3))).can_never_fit


# --------------------------------------------------------------------------------------------
# Memory and custom resources
# --------------------------------------------------------------------------------------------


def test_memory_is_enforced() -> None:
    ledger = Ledger(machine(gpus=0, memory=6 * GIB))
    placed(ledger.place("a", Request(memory_bytes=4 * GIB)))
    p = pending(ledger.place("b", Request(memory_bytes=4 * GIB)))
    assert p.reason == "needs memory=4.0 GiB but only 2.0 GiB is unallocated"
    assert not p.can_never_fit
    placed(ledger.place("c", Request(memory_bytes=2 * GIB)))
    assert ledger.available()["memory_bytes"] == 0.0


def test_custom_resources_are_enforced() -> None:
    ledger = Ledger(machine(gpus=0, TPU=2))
    placed(ledger.place("a", Request(custom={"TPU": 1.5})))
    p = pending(ledger.place("b", Request(custom={"TPU": 1})))
    assert p.reason == "needs resource 'TPU'=1 but only 0.5 of 2 is unallocated"
    placed(ledger.place("c", Request(custom={"TPU": 0.5})))
    big = pending(ledger.place("d", Request(custom={"TPU": 3})))
    assert big.reason == "can never fit: needs resource 'TPU'=3 but the machine declares only 2"
    # A zero amount of an undeclared resource asks for nothing.
    placed(ledger.place("e", Request(custom={"other": 0})))
    assert ledger.available()["custom"] == {"TPU": 0.0}


def test_several_shortages_are_all_named() -> None:
    ledger = Ledger(machine(gpus=1, memory=2 * GIB, TPU=1))
    placed(ledger.place("a", Request(num_gpus=1, memory_bytes=2 * GIB, custom={"TPU": 1})))
    reason = pending(ledger.place("b", Request(num_gpus=0.5, memory_bytes=GIB, custom={"TPU": 1}))).reason
    assert "num_gpus=0.5" in reason
    assert "memory=1.0 GiB" in reason
    assert "'TPU'=1" in reason


# --------------------------------------------------------------------------------------------
# CPUs
# --------------------------------------------------------------------------------------------


def test_cpus_oversubscribed_by_default_but_reported() -> None:
    ledger = Ledger(machine(gpus=0, cpus=2))
    for i in range(4):
        placed(ledger.place(f"r{i}", Request(num_cpus=1)))
    assert ledger.cpu_oversubscribed
    assert ledger.available()["num_cpus"] == -2.0
    assert "CPUs: 4 of 2 allocated (oversubscribed" in ledger.summary()
    ledger.release("r0")
    ledger.release("r1")
    assert not ledger.cpu_oversubscribed
    assert "oversubscribed" not in ledger.summary()


def test_strict_cpus_are_enforced() -> None:
    ledger = Ledger(machine(gpus=0, cpus=2), strict_cpus=True)
    placed(ledger.place("a", Request(num_cpus=1.5)))
    p = pending(ledger.place("b", Request(num_cpus=1)))
    assert p.reason == "needs num_cpus=1 but only 0.5 of 2 CPUs are unallocated"
    assert pending(ledger.place("c", Request(num_cpus=4))).reason == (
        "can never fit: needs num_cpus=4 but the machine has 2 CPUs"
    )
    placed(ledger.place("d", Request(num_cpus=0.5)))
    assert not ledger.cpu_oversubscribed


# --------------------------------------------------------------------------------------------
# Display and environment
# --------------------------------------------------------------------------------------------


def test_summary_and_available() -> None:
    ledger = Ledger(machine(gpus=2, cpus=4, memory=8 * GIB, TPU=2))
    placed(ledger.place("a", Request(num_cpus=1, num_gpus=0.5, memory_bytes=GIB, custom={"TPU": 1})))
    assert ledger.available() == {
        "num_cpus": 3.0,
        "gpus": [{"index": 0, "name": "fake-0", "free": 0.5}, {"index": 1, "name": "fake-1", "free": 1.0}],
        "memory_bytes": float(7 * GIB),
        "custom": {"TPU": 1.0},
    }
    assert ledger.summary().splitlines() == [
        "CPUs: 1 of 4 allocated",
        "GPU 0 (fake-0): 0.5 of 1 allocated",
        "GPU 1 (fake-1): 0 of 1 allocated",
        "memory: 1.0 GiB of 8.0 GiB allocated",
        "TPU: 1 of 2 allocated",
    ]


def test_cuda_env() -> None:
    gpu_ledger = Ledger(machine(gpus=2))
    cpu_only = placed(gpu_ledger.place("cpu", Request()))
    assert cpu_only.cuda_visible_devices == ""
    assert gpu_ledger.cuda_env(cpu_only) == {"CUDA_VISIBLE_DEVICES": ""}
    assert gpu_ledger.cuda_env(placed(gpu_ledger.place("g", Request(num_gpus=2)))) == {"CUDA_VISIBLE_DEVICES": "0,1"}
    no_gpu_ledger = Ledger(machine(gpus=0))
    assert no_gpu_ledger.cuda_env(placed(no_gpu_ledger.place("cpu", Request()))) == {}


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------

SAMPLE_SMI = "0, NVIDIA H100 80GB HBM3, 81559\n1, NVIDIA H100 80GB HBM3, 81559\n"


def test_detect_with_fake_nvidia_smi() -> None:
    seen: list[list[str]] = []

    def run(argv: list[str]) -> str:
        seen.append(argv)
        return SAMPLE_SMI

    found = detect(run=run, num_cpus=3, memory_bytes=GIB)
    assert seen == [NVIDIA_SMI_QUERY]
    assert found.gpus == (GPU(0, "NVIDIA H100 80GB HBM3", 81559), GPU(1, "NVIDIA H100 80GB HBM3", 81559))
    assert found.num_gpus == 2
    assert found.num_cpus == 3.0
    assert found.memory_bytes == GIB


def test_detect_with_failing_runner_means_no_gpus() -> None:
    def boom(argv: list[str]) -> str:
        raise subprocess.TimeoutExpired(argv, 5)

    assert detect(run=boom).gpus == ()
    assert detect(run=lambda argv: "garbage\n").gpus == ()


def test_detect_with_declared_gpus_skips_nvidia_smi() -> None:
    def never(argv: list[str]) -> str:
        raise AssertionError("nvidia-smi must not run when num_gpus is declared")

    found = detect(num_gpus=2, run=never)
    assert [g.name for g in found.gpus] == ["declared-0", "declared-1"]
    assert [g.index for g in found.gpus] == [0, 1]
    assert detect(num_gpus=0, run=never).gpus == ()


def test_detect_reads_this_machine() -> None:
    found = detect(num_gpus=0, custom={"TPU": 1})
    assert found.num_cpus >= 1
    assert found.memory_bytes > 0
    assert found.custom == {"TPU": 1}


def test_parse_nvidia_smi() -> None:
    assert parse_nvidia_smi("1, B, [N/A]\n\n0, A, 100\n") == (GPU(0, "A", 100), GPU(1, "B", 0))
    with pytest.raises(ValueError):
        parse_nvidia_smi("x, A, 100")
