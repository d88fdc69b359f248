"""Per-replica resource accounting on one machine: what the machine has, where a replica goes.

Deployments declare what one replica needs in ``ray_actor_options`` (``num_cpus``,
``num_gpus``, ``memory``, ``resources``). The controller turns those into a :class:`Request`
and asks a :class:`Ledger` to place it::

    ledger = Ledger(detect())
    result = ledger.place("Model#abc123", Request.of(options.ray_actor_options))
    if isinstance(result, Pending):
        ...  # keep the replica pending, show result.reason; result.can_never_fit says "forever"
    else:
        env.update(ledger.cuda_env(result))  # pins the replica to its GPUs
    ...
    ledger.release("Model#abc123")  # when the replica's process is gone

Rules, following Ray's single-node semantics:

* **GPUs** are per device. A fractional request (``0 < num_gpus < 1``) shares one device with
  other fractional requests and goes to the *fullest* device that still has room (best fit), so
  four ``0.25`` replicas share GPU 0 before GPU 1 is touched. A whole request (``num_gpus >= 1``,
  an integer) takes that many *entirely free* devices, lowest indices first. Fractions are kept
  exact (:class:`fractions.Fraction`), so ten ``0.1`` replicas fill exactly one GPU.
* **memory** and **custom resources** are enforced: a replica is placed only if they fit (and the
  controller replaces a running replica whose resident memory exceeds its `memory`).
* **CPUs** are recorded but, by default, not enforced: a 2-core laptop must still run an app
  of four deployments that each reserve one CPU. Oversubscription is reported
  (:attr:`Ledger.cpu_oversubscribed`, :meth:`Ledger.summary`). ``Ledger(strict_cpus=True)``
  enforces CPUs like everything else.

Everything here is pure accounting: no clocks, no processes. The one exception is
:func:`detect`, which reads the machine (CPU affinity, ``/proc/meminfo``, ``nvidia-smi``).
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from shoal.config import RayActorOptions

__all__ = [
    "GPU",
    "Ledger",
    "MachineResources",
    "Pending",
    "Placement",
    "Request",
    "detect",
    "parse_nvidia_smi",
]

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"]
NVIDIA_SMI_TIMEOUT_S = 5.0
NEVER_FIT_PREFIX = "can never fit: "

# Quantities are turned into exact fractions with this largest denominator: 0.1 becomes 1/10
# (not the binary float just above it), 1/3 stays 1/3, and sums compare exactly.
_MAX_DENOMINATOR = 1_000_000
_GIB = 1024**3
_MIB = 1024**2


def _exact(x: float) -> Fraction:
    return Fraction(x).limit_denominator(_MAX_DENOMINATOR)


def _num(x: Fraction | float) -> str:
    """A quantity for messages: ``1`` not ``1.0``, ``0.25``, ``0.3333``."""
    f = float(x)
    if f.is_integer():
        return str(int(f))
    return f"{f:.4g}"


def _bytes(x: Fraction | float) -> str:
    f = float(x)
    if abs(f) >= _GIB:
        return f"{f / _GIB:.1f} GiB"
    return f"{f / _MIB:.1f} MiB"


# --------------------------------------------------------------------------------------------
# What the machine has
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    """One device as ``nvidia-smi`` numbers it (the index ``CUDA_VISIBLE_DEVICES`` takes)."""

    index: int
    name: str
    memory_mb: int


@dataclass(frozen=True)
class MachineResources:
    """What replicas may be placed on: the totals, never what is in use."""

    num_cpus: float
    gpus: tuple[GPU, ...] = ()
    memory_bytes: int = 0
    custom: dict[str, float] = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)


def parse_nvidia_smi(text: str) -> tuple[GPU, ...]:
    """Parse ``nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader,nounits``.

    Raises ``ValueError`` on a line it cannot read. A memory of ``[N/A]`` reads as 0.
    """
    gpus: list[GPU] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        index = int(parts[0])
        name = ", ".join(parts[1:-1])  # a name with a comma in it survives
        try:
            memory_mb = int(float(parts[-1]))
        except ValueError:
            memory_mb = 0
        gpus.append(GPU(index=index, name=name, memory_mb=memory_mb))
    return tuple(sorted(gpus, key=lambda g: g.index))


def _run_nvidia_smi(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=True).stdout


def _detect_gpus(run: Callable[[list[str]], str] | None) -> tuple[GPU, ...]:
    if run is None:
        if shutil.which("nvidia-smi") is None:
            return ()
        run = _run_nvidia_smi
    try:
        return parse_nvidia_smi(run(list(NVIDIA_SMI_QUERY)))
    except Exception:  # any failure (missing driver, timeout, odd output) means no GPUs
        return ()


def _detect_cpus() -> float:
    try:
        return float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return float(os.cpu_count() or 1)


def _detect_memory_bytes(meminfo: str = "/proc/meminfo") -> int:
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        return 0


def detect(
    num_gpus: int | None = None,
    num_cpus: float | None = None,
    *,
    run: Callable[[list[str]], str] | None = None,
    custom: Mapping[str, float] | None = None,
    memory_bytes: int | None = None,
) -> MachineResources:
    """Read what this machine offers.

    * CPUs: the CPUs this process may run on (``os.sched_getaffinity``, so ``taskset`` and
      container CPU sets count), else ``os.cpu_count()``; ``num_cpus`` overrides.
    * memory: ``MemTotal`` from ``/proc/meminfo``, not ``MemAvailable``. ``memory`` in
      ``ray_actor_options`` is a reservation made up front; measuring it against a number that
      moves with whatever else runs (the replicas themselves included) would make placement
      flap. ``memory_bytes`` overrides.
    * GPUs: ``nvidia-smi`` (5 s timeout) when the binary is on ``PATH``; any failure means no
      GPUs. ``run`` replaces the runner (it gets the argv, returns stdout) and is used even
      without the binary, which is how tests feed sample output. ``num_gpus`` declares the
      count instead and skips ``nvidia-smi``: the devices are named ``declared-0``,
      ``declared-1``... with ``memory_mb=0`` (``num_gpus=0`` hides real GPUs).
    * custom: whatever the caller declares (``{"TPU": 4}``); nothing is discovered.
    """
    if num_gpus is not None:
        if num_gpus < 0:
            raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
        gpus = tuple(GPU(index=i, name=f"declared-{i}", memory_mb=0) for i in range(num_gpus))
    else:
        gpus = _detect_gpus(run)
    if num_cpus is not None and num_cpus < 0:
        raise ValueError(f"num_cpus must be >= 0, got {num_cpus}")
    return MachineResources(
        num_cpus=float(num_cpus) if num_cpus is not None else _detect_cpus(),
        gpus=gpus,
        memory_bytes=memory_bytes if memory_bytes is not None else _detect_memory_bytes(),
        custom=dict(custom or {}),
    )


# --------------------------------------------------------------------------------------------
# What a replica asks for, and the answers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What one replica needs. Build it from ``ray_actor_options`` with :meth:`of`."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_bytes: float = 0.0
    custom: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        amounts = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "memory": self.memory_bytes}
        amounts.update({f"resource {k!r}": v for k, v in self.custom.items()})
        for what, v in amounts.items():
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{what} must be a finite number >= 0, got {v}")
        if self.num_gpus > 1 and not float(self.num_gpus).is_integer():
            raise ValueError(f"num_gpus above 1 must be a whole number, got {self.num_gpus}")

    @classmethod
    def of(cls, options: RayActorOptions | Mapping[str, Any] | None) -> Request:
        """The request for ``ray_actor_options`` (the model, a plain dict, or ``None``).

        Unset ``num_cpus`` means 1 (Ray's default for a replica), unset ``num_gpus`` and
        ``memory`` mean 0.
        """
        if options is None:
            options = RayActorOptions()
        elif not isinstance(options, RayActorOptions):
            options = RayActorOptions.model_validate(dict(options))
        return cls(
            num_cpus=float(options.effective_num_cpus),
            num_gpus=float(options.num_gpus or 0.0),
            memory_bytes=float(options.memory or 0.0),
            custom={k: float(v) for k, v in options.resources.items()},
        )


@dataclass(frozen=True)
class Placement:
    """Where a replica went.

    ``gpus`` are device indices; ``gpu_fraction`` is the share of each held (``1`` for a whole
    request, ``0`` when no GPU was asked for).

    ``cuda_visible_devices`` is the comma-separated indices, and ``""`` when no GPU was asked
    for. The empty string means "no GPU for this replica", not "leave it unset": use
    :meth:`Ledger.cuda_env`, which sets ``CUDA_VISIBLE_DEVICES=""`` only when the machine has
    GPUs (so a replica that asked for none cannot grab one) and leaves the variable alone on a
    machine without GPUs.
    """

    replica_id: str
    request: Request
    gpus: tuple[int, ...] = ()
    gpu_fraction: float = 0.0

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(str(i) for i in self.gpus)


@dataclass(frozen=True)
class Pending:
    """Why a replica cannot be placed now, in words naming the resource and the numbers.

    A reason starting with ``"can never fit: "`` means the request exceeds the empty machine:
    waiting for other replicas to go will not help.
    """

    reason: str

    @property
    def can_never_fit(self) -> bool:
        return self.reason.startswith(NEVER_FIT_PREFIX)


# --------------------------------------------------------------------------------------------
# The ledger
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Allocation:
    placement: Placement
    cpus: Fraction
    gpu_share: Fraction
    memory: Fraction
    custom: dict[str, Fraction]


class Ledger:
    """Allocations per replica id against one machine's totals. See the module docstring."""

    def __init__(self, machine: MachineResources | None = None, *, strict_cpus: bool = False) -> None:
        self.machine = machine if machine is not None else detect()
        self.strict_cpus = strict_cpus
        self._gpus = tuple(sorted(self.machine.gpus, key=lambda g: g.index))
        self._gpu_used: dict[int, Fraction] = {g.index: Fraction(0) for g in self._gpus}
        self._cpus_total = _exact(self.machine.num_cpus)
        self._cpus_used = Fraction(0)
        self._memory_total = Fraction(self.machine.memory_bytes)
        self._memory_used = Fraction(0)
        self._custom_total = {k: _exact(v) for k, v in self.machine.custom.items()}
        self._custom_used: dict[str, Fraction] = {k: Fraction(0) for k in self._custom_total}
        self._allocations: dict[str, _Allocation] = {}

    # -- placing -------------------------------------------------------------------------------

    def place(self, replica_id: str, request: Request, pin: tuple[int, ...] | None = None) -> Placement | Pending:
        """Reserve ``request`` for replica ``replica_id``, or say why not. Nothing is held on Pending.

        ``pin`` names the GPU indices to use when they have room (a restarted controller
        adopting a replica that already runs on them); otherwise devices are picked as usual.
        Raises ``ValueError`` if ``replica_id`` already holds an allocation (release it first).
        """
        if replica_id in self._allocations:
            raise ValueError(f"replica {replica_id!r} is already placed; release it first")
        cpus = _exact(request.num_cpus)
        gpus = _exact(request.num_gpus)
        memory = _exact(request.memory_bytes)
        custom = {k: _exact(v) for k, v in request.custom.items() if v > 0}

        never = self._never_fits(cpus, gpus, memory, custom)
        if never:
            return Pending(NEVER_FIT_PREFIX + "; ".join(never))

        missing: list[str] = []
        chosen: tuple[int, ...] = ()
        if gpus > 0:
            share_each = gpus if gpus < 1 else Fraction(1)
            pinned_ok = pin is not None and len(pin) == max(1, int(gpus)) and all(
                i in self._gpu_used and 1 - self._gpu_used[i] >= share_each for i in pin)
            picked = tuple(pin) if pin is not None and pinned_ok else self._pick_gpus(gpus)
            if picked is None:
                missing.append(self._gpu_shortage(gpus))
            else:
                chosen = picked
        if memory > 0 and memory > self._memory_total - self._memory_used:
            free = self._memory_total - self._memory_used
            missing.append(f"needs memory={_bytes(memory)} but only {_bytes(free)} is unallocated")
        for name, amount in custom.items():
            free = self._custom_total[name] - self._custom_used[name]
            if amount > free:
                missing.append(
                    f"needs resource {name!r}={_num(amount)} but only {_num(free)} of "
                    f"{_num(self._custom_total[name])} is unallocated"
                )
        if self.strict_cpus and cpus > 0 and cpus > self._cpus_total - self._cpus_used:
            free = self._cpus_total - self._cpus_used
            missing.append(
                f"needs num_cpus={_num(cpus)} but only {_num(free)} of {_num(self._cpus_total)} CPUs are unallocated"
            )
        if missing:
            return Pending("; ".join(missing))

        share = gpus if gpus < 1 else Fraction(1)
        for i in chosen:
            self._gpu_used[i] += share
        self._memory_used += memory
        for name, amount in custom.items():
            self._custom_used[name] += amount
        self._cpus_used += cpus
        placement = Placement(replica_id=replica_id, request=request, gpus=chosen,
                              gpu_fraction=float(share) if chosen else 0.0)
        self._allocations[replica_id] = _Allocation(placement, cpus, share if chosen else Fraction(0), memory, custom)
        return placement

    def _never_fits(self, cpus: Fraction, gpus: Fraction, memory: Fraction, custom: dict[str, Fraction]) -> list[str]:
        reasons: list[str] = []
        n = len(self._gpus)
        if gpus > 0 and n == 0:
            reasons.append(f"needs num_gpus={_num(gpus)} but the machine has no GPUs")
        elif gpus > n:
            reasons.append(f"needs num_gpus={_num(gpus)} but the machine has {n} GPU{'s' if n != 1 else ''}")
        if memory > self._memory_total:
            reasons.append(f"needs memory={_bytes(memory)} but the machine has {_bytes(self._memory_total)} in total")
        for name, amount in custom.items():
            total = self._custom_total.get(name)
            if total is None or total == 0:
                reasons.append(f"needs resource {name!r}={_num(amount)} but the machine declares none")
            elif amount > total:
                reasons.append(f"needs resource {name!r}={_num(amount)} but the machine declares only {_num(total)}")
        if self.strict_cpus and cpus > self._cpus_total:
            reasons.append(f"needs num_cpus={_num(cpus)} but the machine has {_num(self._cpus_total)} CPUs")
        return reasons

    def _pick_gpus(self, gpus: Fraction) -> tuple[int, ...] | None:
        if gpus < 1:
            # Best fit: the fullest device that still has room; ties go to the lowest index.
            fits = [g.index for g in self._gpus if 1 - self._gpu_used[g.index] >= gpus]
            if not fits:
                return None
            return (max(fits, key=lambda i: (self._gpu_used[i], -i)),)
        free = [g.index for g in self._gpus if self._gpu_used[g.index] == 0]
        want = int(gpus)
        return tuple(free[:want]) if len(free) >= want else None

    def _gpu_usage(self) -> str:
        return ", ".join(f"GPU {g.index}: {_num(self._gpu_used[g.index])} used of 1" for g in self._gpus)

    def _gpu_shortage(self, gpus: Fraction) -> str:
        if gpus < 1:
            return f"needs num_gpus={_num(gpus)} but no GPU has {_num(gpus)} free ({self._gpu_usage()})"
        free = sum(1 for g in self._gpus if self._gpu_used[g.index] == 0)
        return (
            f"needs num_gpus={_num(gpus)} but only {free} GPU{'s are' if free != 1 else ' is'} "
            f"entirely free ({self._gpu_usage()})"
        )

    # -- releasing and reading -------------------------------------------------------------------

    def release(self, replica_id: str) -> Placement | None:
        """Give back what ``replica_id`` holds; the placement it had, or ``None`` if it held nothing."""
        alloc = self._allocations.pop(replica_id, None)
        if alloc is None:
            return None
        for i in alloc.placement.gpus:
            self._gpu_used[i] -= alloc.gpu_share
        self._memory_used -= alloc.memory
        for name, amount in alloc.custom.items():
            self._custom_used[name] -= amount
        self._cpus_used -= alloc.cpus
        return alloc.placement

    def allocations(self) -> dict[str, Placement]:
        return {replica_id: a.placement for replica_id, a in self._allocations.items()}

    def cuda_env(self, placement: Placement) -> dict[str, str]:
        """``{"CUDA_VISIBLE_DEVICES": ...}`` for the replica's environment, or ``{}``.

        Empty on a machine without GPUs (nothing to hide, and the user's own setting stays);
        otherwise the placement's devices, ``""`` for a replica that asked for no GPU.
        """
        if not self._gpus:
            return {}
        return {"CUDA_VISIBLE_DEVICES": placement.cuda_visible_devices}

    @property
    def cpu_oversubscribed(self) -> bool:
        """True when the replicas placed reserve more CPUs than the machine has."""
        return self._cpus_used > self._cpus_total

    def available(self) -> dict[str, Any]:
        """What is unallocated, for status display (plain floats, JSON-friendly).

        ``num_cpus`` goes negative when CPUs are oversubscribed.
        """
        return {
            "num_cpus": float(self._cpus_total - self._cpus_used),
            "gpus": [
                {"index": g.index, "name": g.name, "free": float(1 - self._gpu_used[g.index])} for g in self._gpus
            ],
            "memory_bytes": float(self._memory_total - self._memory_used),
            "custom": {k: float(self._custom_total[k] - self._custom_used[k]) for k in sorted(self._custom_total)},
        }

    def summary(self) -> str:
        """A few lines of ``allocated of total`` per resource, flagging CPU oversubscription."""
        lines = [f"CPUs: {_num(self._cpus_used)} of {_num(self._cpus_total)} allocated"]
        if self.cpu_oversubscribed:
            lines[0] += " (oversubscribed: replicas share cores)"
        lines.extend(f"GPU {g.index} ({g.name}): {_num(self._gpu_used[g.index])} of 1 allocated" for g in self._gpus)
        lines.append(f"memory: {_bytes(self._memory_used)} of {_bytes(self._memory_total)} allocated")
        lines.extend(
            f"{k}: {_num(self._custom_used[k])} of {_num(self._custom_total[k])} allocated"
            for k in sorted(self._custom_total)
        )
        return "\n".join(lines)

    def replica_ids_on_gpu(self, index: int) -> list[str]:
        """The replicas holding a share of GPU ``index``."""
        return [replica_id for replica_id, a in self._allocations.items() if index in a.placement.gpus]
