"""The simulation's objects: pods, ReplicaSets, Deployments, and what every part of it shares."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.exceptions import SimError

Obj = dict[str, Any]

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclass(eq=False)
class Pod:
    """One simulated pod: a process on its own loopback address."""

    name: str
    deployment: str  # the Kubernetes Deployment's name
    template_hash: str
    ip: str
    labels: dict[str, str]
    template: Obj
    dir: Path
    created: float = field(default_factory=time.monotonic)
    proc: subprocess.Popen[bytes] | None = None
    started: bool = False  # startupProbe passed (or none)
    ready: bool = False
    terminating: bool = False
    deleted: bool = False  # gone from the API: never restarted
    gone: bool = False  # its process exited for good
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    # LeaderWorkerSet pods: the group, the environment LWS prepends, and simulation overrides.
    group: int = -1
    injected_env: dict[str, str] = field(default_factory=dict)
    env_overrides: dict[str, str] = field(default_factory=dict)
    namespace: str = ""  # "": the simulation's namespace
    # Where the container listens when the simulation holds ``ip`` to enforce NetworkPolicies (sim.firewall).
    listen_ip: str = ""
    _fails: int = 0
    _passes: int = 0
    _live_fails: int = 0  # livenessProbe failures in a row (reset when the container restarts)
    _live_next: float = 0.0  # when the livenessProbe runs next (monotonic)
    _terminate: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def backend_ip(self) -> str:
        """The address the container itself listens on (its ``status.podIP`` as the downward API says)."""
        return self.listen_ip or self.ip

    @property
    def log_path(self) -> Path:
        return self.dir / "log.txt"

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def container(self) -> Obj:
        containers: list[Obj] = self.template["spec"]["containers"]
        return containers[0]

    def port(self, port: int | str) -> int:
        """A container port by number or name."""
        if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
            return int(port)
        for c in self.template["spec"]["containers"]:
            for p in c.get("ports", []):
                if p.get("name") == port:
                    return int(p["containerPort"])
        raise SimError(f"pod {self.name}: no container port named {port!r}")


@dataclass
class ReplicaSet:
    deployment: str
    template_hash: str
    template: Obj
    desired: int


@dataclass
class Deployment:
    obj: Obj
    replicas: int
    current_hash: str
    sets: dict[str, ReplicaSet] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])


def template_hash(template: Obj) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True, default=str).encode()).hexdigest()[:10]


def int_or_percent(value: Any, total: int, round_up: bool, default: str) -> int:
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        frac = float(value[:-1]) / 100.0 * total
        return math.ceil(frac) if round_up else math.floor(frac)
    return int(value)


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) references: defined variables expand, $$ escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


# --------------------------------------------------------------------------------------------
# What the parts (kubelet, Services, LeaderWorkerSets) see of the simulation
# --------------------------------------------------------------------------------------------


class GroupController(Protocol):
    """What the kubelet and the Services see of the LeaderWorkerSet controller."""

    def container_exited(self, pod: Pod) -> bool: ...

    def reconcile(self) -> None: ...

    def records(self, namespace: str, domain: str) -> dict[str, list[str]]: ...


class Gate(Protocol):
    """What the kubelet and the Services see of the NetworkPolicy enforcement (sim.firewall)."""

    def admit(self, peer: tuple[str, int], local: tuple[str, int], dst: Pod, port: int) -> bool: ...

    async def refused(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...

    def detach(self, pod: Pod) -> None: ...


class SimHost(Protocol):
    """The simulation as its parts see it: its lock (every change to pods happens under it),
    its objects and pods, its settings, and the few operations the parts call back."""

    lock: threading.RLock
    closed: bool
    pods: list[Pod]
    workdir: Path
    namespace: str
    cluster_domain: str
    services: dict[str, Obj]
    config_maps: dict[str, Obj]
    secret_objs: dict[str, Obj]
    given_secrets: dict[str, dict[str, str]]
    executables: dict[str, str]
    cwd: str
    python_path: list[str]
    extra_env: dict[str, str]
    resolver_file: Path
    probe_period_s: float
    probe_timeout_s: float
    prestop_max_s: float
    liveness_period_s: float | None

    @property
    def lws(self) -> GroupController: ...

    @property
    def firewall(self) -> Gate: ...

    def secret_value(self, name: str, key: str) -> str: ...

    def has_secret_key(self, name: str, key: str) -> bool: ...

    def allocate_ip(self) -> str: ...

    def add_pod(self, pod: Pod) -> Pod: ...

    def terminate_pod(self, pod: Pod) -> None: ...

    def update_endpoints(self) -> None: ...

    def reconcile(self) -> None: ...

    def describe(self) -> str: ...
