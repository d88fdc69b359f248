"""Per-pod resources and scheduling options of ``shoal k8s build``: memory and ephemeral storage
defaults, sized scratch volumes, the rollout strategy, node selectors, tolerations, runtime and
priority classes, zone spread and Ray's ``accelerator_type``.

Most options take an optional ``DEPLOYMENT:`` prefix (``--node-selector
Generator:nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB``): without it a value applies to every
deployment, with it to that one only (and, for single-valued options, wins over the unprefixed
value). A prefix naming no deployment of the build is an error naming the flag, so that a typo
never silently schedules pods somewhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.exceptions import CompileError
from shoal.kubernetes.compiler.common import CompileOptions, Obj, memory_quantity
from shoal.kubernetes.compiler.volumes import check_model_volume_targets, check_model_volumes

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "LOG_MARGIN",
    "ZONE_KEY",
    "accelerator_selector",
    "cache_size",
    "check_pod_options",
    "check_targets",
    "ephemeral_storage",
    "node_selector",
    "parse_quantity",
    "pod_class",
    "rollout",
    "tolerations",
    "zone_spread",
]

# sizeLimit of the cache emptyDir (HOME, XDG_CACHE_HOME and so HF_HOME: model downloads) unless
# --cache-size says otherwise.
DEFAULT_CACHE_SIZE = "10Gi"
# Ephemeral storage a container uses besides its emptyDirs: its logs and writable layer (the root
# filesystem is read-only, so mostly logs).
LOG_MARGIN = "1Gi"
ZONE_KEY = "topology.kubernetes.io/zone"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
WHENS = ("ScheduleAnyway", "DoNotSchedule")

_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
          "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50, "Ei": 1 << 60}
_BYTES = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_ROLL_VALUE = re.compile(r"^(0|[1-9][0-9]*|[1-9][0-9]?%|100%|0%)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Targeted:
    """One value of a per-deployment option: the flag, the deployment it targets (None: all), the value."""

    option: str
    deployment: str | None
    value: str


def parse_quantity(text: str, option: str) -> int:
    """A byte quantity (``512Mi``, ``2Gi``, ``1G``) as bytes; CompileError naming ``option``."""
    m = _BYTES.match(text)
    if m is None:
        raise CompileError(f"{option} {text!r} is not a quantity of bytes like 512Mi or 2Gi")
    n = round(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if n <= 0:
        raise CompileError(f"{option} {text!r} must be more than zero")
    return n


def _targets(option: str, values: Iterable[str]) -> list[Targeted]:
    """Split ``[DEPLOYMENT:]VALUE`` entries (the value itself never holds a colon)."""
    out = []
    for item in values:
        dep, sep, value = item.rpartition(":")
        if sep and not dep:
            raise CompileError(f"{option} {item!r}: empty deployment name before ':'")
        out.append(Targeted(option, dep or None, value))
    return out


def _toleration_targets(values: Iterable[str]) -> list[Targeted]:
    """``[DEPLOYMENT:]KEY[=VALUE][:EFFECT]``: a trailing part is the effect when it names one."""
    out = []
    for item in values:
        parts = item.split(":")
        if len(parts) > 3 or (len(parts) == 3 and parts[2] not in EFFECTS):
            raise CompileError(f"--toleration {item!r}: expected [DEPLOYMENT:]KEY[=VALUE][:EFFECT], "
                               f"EFFECT one of {', '.join(EFFECTS)}")
        dep = parts[0] if len(parts) == 3 or (len(parts) == 2 and parts[1] not in EFFECTS) else None
        body = parts[1:] if dep is not None else parts
        if dep == "":
            raise CompileError(f"--toleration {item!r}: empty deployment name before ':'")
        out.append(Targeted("--toleration", dep, ":".join(body)))
    return out


def _zone_targets(values: Iterable[str]) -> list[Targeted]:
    """``ScheduleAnyway``/``DoNotSchedule`` (every deployment), ``DEPLOYMENT`` or ``DEPLOYMENT:WHEN``."""
    out = []
    for item in values:
        if item in WHENS:
            out.append(Targeted("--zone-spread", None, item))
            continue
        dep, sep, when = item.rpartition(":")
        if not sep:
            dep, when = item, "ScheduleAnyway"
        if not dep or when not in WHENS:
            raise CompileError(f"--zone-spread {item!r}: expected [DEPLOYMENT:]ScheduleAnyway|DoNotSchedule "
                               "or a deployment name")
        out.append(Targeted("--zone-spread", dep, when))
    return out


def _all_targets(opts: CompileOptions) -> list[Targeted]:
    return [
        *_targets("--node-selector", opts.node_selectors),
        *_toleration_targets(opts.tolerations),
        *_targets("--runtime-class", opts.runtime_class),
        *_targets("--priority-class", opts.priority_class),
        *_zone_targets(opts.zone_spread),
        *_targets("--cache-size", opts.cache_size),
        *_targets("--rollout", opts.rollout),
    ]


def check_pod_options(opts: CompileOptions) -> None:
    """Raise CompileError naming the first malformed resource or scheduling option."""
    parse_quantity(opts.default_memory, "--default-memory")
    parse_quantity(opts.tmp_size, "--tmp-size")
    for t in _all_targets(opts):
        _check_value(t)
    check_model_volumes(opts)
    if opts.accelerator_label is not None and not _qualified_name(opts.accelerator_label):
        raise CompileError(f"--accelerator-label {opts.accelerator_label!r} is not a node label key "
                           "(prefix/name, e.g. nvidia.com/gpu.product)")


def _check_value(t: Targeted) -> None:
    where = f"{t.option} {((t.deployment + ':') if t.deployment else '') + t.value!r}"
    if t.option == "--node-selector":
        key, sep, value = t.value.partition("=")
        if not sep or not _qualified_name(key) or len(value) > 63 or not _LABEL_VALUE.match(value):
            raise CompileError(f"{where}: expected [DEPLOYMENT:]KEY=VALUE with a valid label key and value")
    elif t.option == "--toleration":
        body, _, _effect = t.value.partition(":")
        key, _, value = body.partition("=")
        if not _qualified_name(key) or len(value) > 63 or not _LABEL_VALUE.match(value):
            raise CompileError(f"{where}: expected [DEPLOYMENT:]KEY[=VALUE][:EFFECT] with a valid taint key")
    elif t.option in ("--runtime-class", "--priority-class"):
        if not _DNS1123_SUBDOMAIN.match(t.value) or len(t.value) > 253:
            raise CompileError(f"{where}: not a valid {t.option[2:].replace('-', ' ')} name")
    elif t.option == "--cache-size":
        parse_quantity(t.value, t.option)
    elif t.option == "--rollout":
        surge, sep, unavailable = t.value.partition("/")
        if not sep or not _ROLL_VALUE.match(surge) or not _ROLL_VALUE.match(unavailable):
            raise CompileError(f"{where}: expected [DEPLOYMENT:]MAX_SURGE/MAX_UNAVAILABLE, each a count or a "
                               "percentage, e.g. 0/1 or 25%/0")
        if surge.rstrip("%") == "0" and unavailable.rstrip("%") == "0":
            raise CompileError(f"{where}: MAX_SURGE and MAX_UNAVAILABLE cannot both be zero (nothing could roll)")


def check_targets(opts: CompileOptions, deployments: Iterable[str]) -> None:
    """Raise CompileError for a ``DEPLOYMENT:`` prefix that names no deployment of the build."""
    known = sorted(set(deployments))
    for t in _all_targets(opts):
        if t.deployment is not None and t.deployment not in known:
            raise CompileError(f"{t.option} {t.deployment + ':' + t.value!r}: no deployment named {t.deployment!r} "
                               f"(deployments: {', '.join(known)})")
    check_model_volume_targets(opts, known)


def _qualified_name(name: str) -> bool:
    prefix, _, rest = name.rpartition("/")
    if prefix and not _DNS1123_SUBDOMAIN.match(prefix):
        return False
    return bool(rest) and len(rest) <= 63 and bool(_LABEL_NAME.match(rest))


def _for(targets: list[Targeted], dep: str) -> list[str]:
    """The values that apply to ``dep``: unprefixed ones first, then its own."""
    return ([t.value for t in targets if t.deployment is None]
            + [t.value for t in targets if t.deployment == dep])


def _single(targets: list[Targeted], dep: str) -> str | None:
    values = _for(targets, dep)
    return values[-1] if values else None


# --- what a deployment's pods get --------------------------------------------------------------


def node_selector(opts: CompileOptions, dep: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in _for(_targets("--node-selector", opts.node_selectors), dep):
        key, _, val = value.partition("=")
        out[key] = val
    return out


def tolerations(opts: CompileOptions, dep: str) -> list[Obj]:
    """``KEY`` tolerates the taint whatever its value (Exists), ``KEY=VALUE`` only that value (Equal);
    without an effect, every effect."""
    out: list[Obj] = []
    for value in _for(_toleration_targets(opts.tolerations), dep):
        body, _, effect = value.partition(":")
        key, eq, val = body.partition("=")
        tol: Obj = {"key": key, "operator": "Equal" if eq else "Exists"}
        if eq:
            tol["value"] = val
        if effect:
            tol["effect"] = effect
        out.append(tol)
    return out


def pod_class(opts: CompileOptions, dep: str, kind: str) -> str | None:
    """The deployment's ``runtimeClassName`` (kind "runtime") or ``priorityClassName`` (kind "priority")."""
    values = opts.runtime_class if kind == "runtime" else opts.priority_class
    return _single(_targets(f"--{kind}-class", values), dep)


def zone_spread(opts: CompileOptions, dep: str) -> str | None:
    """``whenUnsatisfiable`` of the deployment's zone spread constraint, or None (no zone spread)."""
    return _single(_zone_targets(opts.zone_spread), dep)


def cache_size(opts: CompileOptions, dep: str) -> str:
    return _single(_targets("--cache-size", opts.cache_size), dep) or DEFAULT_CACHE_SIZE


def ephemeral_storage(opts: CompileOptions, dep: str) -> str:
    """Request and limit of ``ephemeral-storage``: the /tmp and cache volumes' size limits plus
    :data:`LOG_MARGIN`. Requested in full, so that the scheduler places the pod on a node with the
    disk its model download may take."""
    total = (parse_quantity(opts.tmp_size, "--tmp-size") + parse_quantity(cache_size(opts, dep), "--cache-size")
             + parse_quantity(LOG_MARGIN, "LOG_MARGIN"))
    return memory_quantity(total)


def rollout(opts: CompileOptions, dep: str, gpu: bool, surge: int | str = "25%") -> tuple[int | str, int | str]:
    """(maxSurge, maxUnavailable). Default: 0/1 for pods that ask for GPUs (a full GPU pool has no
    room for a surge pod, so a surge rollout would wait Pending forever), ``surge``/0 for the rest
    (25 % of a Deployment's pods; one group of a LeaderWorkerSet)."""
    value = _single(_targets("--rollout", opts.rollout), dep)
    if value is None:
        return (0, 1) if gpu else (surge, 0)
    surge, _, unavailable = value.partition("/")
    return _int_or_percent(surge), _int_or_percent(unavailable)


def _int_or_percent(text: str) -> int | str:
    return text if text.endswith("%") else int(text)


def accelerator_selector(opts: CompileOptions, dep: str, accelerator_type: str | None) -> dict[str, str]:
    """Ray's ``accelerator_type`` as a node selector on ``--accelerator-label`` (empty without one)."""
    if not accelerator_type or opts.accelerator_label is None:
        return {}
    if len(accelerator_type) > 63 or not _LABEL_VALUE.match(accelerator_type):
        raise CompileError(f"deployment {dep!r}: accelerator_type {accelerator_type!r} is not a valid label value "
                           f"for --accelerator-label {opts.accelerator_label}")
    return {opts.accelerator_label: accelerator_type}
