"""A pod simulation: run generated Kubernetes objects as local processes, for tests.

:class:`PodSim` takes the objects ``shoal k8s build`` writes (a list of dicts) and plays the
parts of the cluster that matter to shoal's pods, on this machine:

* **kubelet**: each pod of a ``Deployment`` runs its container's ``command``/``args`` with its
  ``env`` as a local process (``shoal`` maps to the current environment's executable). The
  downward API is filled in (namespace, pod name, pod IP, labels), ``secretKeyRef`` from the
  objects' Secrets or a generated test secret, and volumes become per-pod directories
  (``configMap``/``secret`` data written into them, ``emptyDir`` empty); paths under a mount
  in env values and args are rewritten to those directories. Every pod gets its own loopback
  address (127.x.y.z; Linux routes all of 127/8 to lo), so every pod listens on the very
  ports the objects declare. Probes (``httpGet``, ``tcpSocket``, ``exec``) run every
  ``probe_period_s`` (the objects' periods are compressed), honouring failure and success
  thresholds; a container that exits is restarted in place with a back-off, like
  ``restartPolicy: Always``. Liveness failures are not acted upon.
* **endpoints and cluster DNS**: a pod is an endpoint of the Services that select it once its
  readiness probe passes, and stops being one as soon as it is unready, terminating or dead.
  Headless Services are published to a resolver file (``$SHOAL_RESOLVER_FILE``, read by the
  pods instead of DNS); ClusterIP Services get a virtual IP with a TCP forwarder that sends
  each new connection to a random ready endpoint (as kube-proxy does).
* **ReplicaSets and the Deployment controller**: ``scale``, pod deletion with replacement
  (``kill``), graceful termination (endpoints removed, ``preStop`` run, SIGTERM, SIGKILL after
  ``terminationGracePeriodSeconds``), and rolling updates (``apply`` with a changed pod
  template) following the strategy's ``maxSurge``/``maxUnavailable``.
* **LeaderWorkerSets** (gang deployments): groups of pods with LWS's names, labels and
  environment, whole-group recreation, scaling by groups (:mod:`shoal.kubernetes.sim_lws`).

Every process the simulation starts is tracked by PID and stopped by :meth:`PodSim.close`
(and, on Linux, killed if the simulating process dies). Use it as a context manager or from
a fixture with a finalizer.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import http.client
import ipaddress
import json
import logging
import math
import os
import random
import re
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.kubernetes import names
from shoal.kubernetes.sim_lws import LeaderWorkerSets, start_rollouts

logger = logging.getLogger("shoal.sim")

Obj = dict[str, Any]

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class SimError(RuntimeError):
    """The objects cannot be simulated, or a wait timed out (the message says which pods)."""


# --------------------------------------------------------------------------------------------
# Pods
# --------------------------------------------------------------------------------------------


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
    _fails: int = 0
    _passes: int = 0
    _terminate: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

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
class _ReplicaSet:
    deployment: str
    template_hash: str
    template: Obj
    desired: int


@dataclass
class _Deployment:
    obj: Obj
    replicas: int
    current_hash: str
    sets: dict[str, _ReplicaSet] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])


def template_hash(template: Obj) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _int_or_percent(value: Any, total: int, round_up: bool, default: str) -> int:
    value = default if value is None else value
    if isinstance(value, str) and value.endswith("%"):
        frac = float(value[:-1]) / 100.0 * total
        return math.ceil(frac) if round_up else math.floor(frac)
    return int(value)


def _matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) references: defined variables expand, $$ escapes, others stay."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


# --------------------------------------------------------------------------------------------
# The simulation
# --------------------------------------------------------------------------------------------


class PodSim:
    """Runs the Deployments among ``objects`` as local processes (see the module docstring).

    ``cwd`` is the pods' working directory (the image's WORKDIR; default: this process's),
    ``python_path`` is prepended to their ``PYTHONPATH``, ``env`` is added to every
    container's environment (the container's own variables win), ``secrets`` gives Secret
    data by name (``{"name": {"key": "value"}}``; a Secret that is neither there nor among
    the objects gets a random value per key). ``executables`` maps command names to paths
    (default: ``shoal`` and ``python`` of this environment).
    """

    def __init__(
        self,
        objects: Sequence[Obj],
        *,
        workdir: str | os.PathLike[str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        python_path: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, Mapping[str, str]] | None = None,
        executables: Mapping[str, str] | None = None,
        probe_period_s: float = 0.1,
        probe_timeout_s: float = 1.0,
        prestop_max_s: float = 1.0,
        cluster_domain: str = "cluster.local",
        network: str | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="shoal-sim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cwd = str(cwd or os.getcwd())
        self.python_path = list(python_path)
        self.extra_env = dict(env or {})
        self.probe_period_s = probe_period_s
        self.probe_timeout_s = probe_timeout_s
        self.prestop_max_s = prestop_max_s
        self.cluster_domain = cluster_domain
        bindir = Path(sys.executable).parent
        self.executables = {"shoal": str(bindir / "shoal"), "python": sys.executable, "python3": sys.executable}
        self.executables.update(executables or {})
        self._given_secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self._generated_secrets: dict[tuple[str, str], str] = {}
        # Addresses: a random /16 of 127/8, so that simulations running side by side never meet.
        if network is None:
            network = f"127.{random.randint(16, 250)}.0.0/16"
        self._net = ipaddress.IPv4Network(network)
        self._next_ip = 1
        self.resolver_file = self.workdir / "resolver.json"
        self._resolver_text = ""
        self.deployments: dict[str, _Deployment] = {}
        self.services: dict[str, Obj] = {}
        self.config_maps: dict[str, Obj] = {}
        self.secret_objs: dict[str, Obj] = {}
        self.namespace = "default"
        self.pods: list[Pod] = []
        self._vips: dict[str, str] = {}
        self._endpoints: dict[str, list[str]] = {}  # ClusterIP Service name -> ready pod IPs
        self._front_loop: asyncio.AbstractEventLoop | None = None
        self._front_thread: threading.Thread | None = None
        self._front_servers: list[asyncio.AbstractServer] = []
        self._closed = False
        self._lws = LeaderWorkerSets(self)
        self._write_resolver({})
        self._load(objects)

    # -- objects ----------------------------------------------------------------------------

    def _load(self, objects: Sequence[Obj]) -> list[str]:
        """Take the objects; the LeaderWorkerSets whose templates changed."""
        changed: list[str] = []
        for obj in objects:
            kind = obj.get("kind")
            meta = obj.get("metadata", {})
            name = meta.get("name", "")
            if meta.get("namespace"):
                self.namespace = meta["namespace"]
            if kind == "ConfigMap":
                self.config_maps[name] = copy.deepcopy(obj)
            elif kind == "Secret":
                self.secret_objs[name] = copy.deepcopy(obj)
            elif kind == "Service":
                self.services[name] = copy.deepcopy(obj)
                spec = obj.get("spec", {})
                routed = spec.get("type", "ClusterIP") in ("ClusterIP", "NodePort", "LoadBalancer")
                if routed and spec.get("clusterIP") != "None" and name not in self._vips:
                    self._vips[name] = self._allocate_ip()
            elif kind == "Deployment":
                template = copy.deepcopy(obj["spec"]["template"])
                h = template_hash(template)
                replicas = obj["spec"].get("replicas", 1)
                existing = self.deployments.get(name)
                if existing is None:
                    dep = _Deployment(copy.deepcopy(obj), int(replicas), h)
                    dep.sets[h] = _ReplicaSet(name, h, template, 0)
                    self.deployments[name] = dep
                else:
                    existing.obj = copy.deepcopy(obj)
                    if "replicas" in obj["spec"]:
                        existing.replicas = int(replicas)
                    if h not in existing.sets:
                        existing.sets[h] = _ReplicaSet(name, h, template, 0)
            elif kind == "LeaderWorkerSet" and self._lws.load(obj):
                changed.append(name)
        return changed

    def _allocate_ip(self) -> str:
        while True:
            addr = self._net.network_address + self._next_ip
            self._next_ip += 1
            if addr not in self._net or addr == self._net.broadcast_address:
                raise SimError(f"out of addresses in {self._net}")
            if int(addr) & 0xFF not in (0, 255):
                return str(addr)

    def secret_value(self, name: str, key: str) -> str:
        """The value a ``secretKeyRef`` to ``name``/``key`` gets (generated on first use if unknown)."""
        given = self._given_secrets.get(name)
        if given is not None and key in given:
            return given[key]
        obj = self.secret_objs.get(name)
        if obj is not None:
            if key in obj.get("stringData", {}):
                return str(obj["stringData"][key])
            if key in obj.get("data", {}):
                return base64.b64decode(obj["data"][key]).decode()
        with self._lock:
            value = self._generated_secrets.get((name, key))
            if value is None:
                value = secrets.token_hex(32)
                self._generated_secrets[(name, key)] = value
            return value

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> PodSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, *, wait: bool = True, timeout: float = 60.0, replicas: Mapping[str, int] | None = None) -> None:
        """Create every Deployment's pods (``replicas`` overrides counts by Deployment name)."""
        self._start_front()
        with self._lock:
            for name, dep in self.deployments.items():
                if replicas is not None and name in replicas:
                    dep.replicas = replicas[name]
                dep.sets[dep.current_hash].desired = dep.replicas
            for name, lws in self._lws.sets.items():  # a LeaderWorkerSet's replicas are groups
                if replicas is not None and name in replicas:
                    lws.replicas = replicas[name]
            self._reconcile()
        if wait:
            for name, dep in self.deployments.items():
                self.wait_ready(name, dep.replicas, timeout=timeout)
            for name, lws in self._lws.sets.items():
                self.wait_ready(name, lws.replicas, timeout=timeout)

    def close(self) -> None:
        """Stop every process this simulation started (SIGTERM, then SIGKILL), by PID."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            pods = list(self.pods)
            for pod in pods:
                pod.deleted = True
                pod._terminate.set()
        procs = [p.proc for p in pods if p.proc is not None and p.proc.poll() is None]
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
        deadline = time.monotonic() + 3.0
        for proc in procs:
            try:
                proc.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pod in pods:
            self._kill_proc(pod)
        for pod in pods:
            if pod._thread is not None:
                pod._thread.join(5)
            self._kill_proc(pod)  # a restart that raced with close
        if self._front_loop is not None:
            loop = self._front_loop

            def stop() -> None:
                for server in self._front_servers:
                    server.close()
                loop.stop()

            loop.call_soon_threadsafe(stop)
            if self._front_thread is not None:
                self._front_thread.join(5)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_proc(self, pod: Pod) -> None:
        proc = pod.proc
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.kill()
            except OSError:
                pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            logger.error("pod %s (pid %d) did not die", pod.name, proc.pid)

    # -- what tests use ---------------------------------------------------------------------

    def pods_of(self, deployment: str, *, ready: bool | None = None, include_terminating: bool = False) -> list[Pod]:
        with self._lock:
            out = [p for p in self.pods if p.deployment == deployment and not p.deleted
                   and (include_terminating or not p.terminating)]
            if ready is not None:
                out = [p for p in out if p.ready == ready]
            return out

    def pod(self, name: str) -> Pod:
        """The newest pod of that name (a recreated LeaderWorkerSet group reuses its names)."""
        with self._lock:
            for p in reversed(self.pods):
                if p.name == name:
                    return p
        raise KeyError(name)

    def deployment_name(self, app: str, deployment: str) -> str:
        """The Kubernetes Deployment of a shoal deployment."""
        return names.workload_name(app, deployment)

    def service_address(self, service: str) -> tuple[str, int]:
        """The virtual IP and (first) port of a ClusterIP Service."""
        svc = self.services[service]
        return self._vips[service], int(svc["spec"]["ports"][0]["port"])

    def http_url(self, service: str | None = None) -> str:
        """``http://vip:port`` of a ClusterIP Service (default: the only one)."""
        if service is None:
            if len(self._vips) != 1:
                raise SimError(f"several ClusterIP Services ({', '.join(self._vips)}); name one")
            service = next(iter(self._vips))
        host, port = self.service_address(service)
        return f"http://{host}:{port}"

    def endpoints(self, service: str) -> list[str]:
        """``ip:port`` of the ready pods behind a Service (its first port)."""
        svc = self.services[service]
        port_spec = svc["spec"]["ports"][0]
        target = port_spec.get("targetPort", port_spec["port"])
        with self._lock:
            pods = self._service_pods(svc)
            return [f"{p.ip}:{p.port(target)}" for p in pods]

    def wait_ready(self, deployment: str, count: int, timeout: float = 60.0) -> list[Pod]:
        """Wait until ``count`` pods of the current template are ready (and no more pods are live).

        For a LeaderWorkerSet ``count`` is in groups: each with every pod ready; returns their pods.
        """
        if deployment in self._lws.sets:
            return self._lws.wait_groups(deployment, count, timeout)
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                dep = self.deployments[deployment]
                live = self.pods_of(deployment)
                ready = [p for p in live if p.ready and p.template_hash == dep.current_hash]
                if len(ready) >= count and len(live) == count:
                    return ready
            if time.monotonic() > deadline:
                raise SimError(f"{deployment}: {len(ready)} of {count} pods ready after {timeout}s\n"
                               + self.describe())
            time.sleep(0.02)

    def wait_gone(self, timeout: float = 60.0) -> None:
        """Wait until every terminating pod's process has exited."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                left = [p for p in self.pods if (p.terminating or p.deleted) and not p.gone]
            if not left:
                return
            if time.monotonic() > deadline:
                raise SimError(f"pods still terminating after {timeout}s: {', '.join(p.name for p in left)}")
            time.sleep(0.02)

    def describe(self) -> str:
        """One line per pod (for failure messages)."""
        with self._lock:
            lines = []
            for p in self.pods:
                state = ("gone" if p.gone else "terminating" if p.terminating else "ready" if p.ready
                         else "started" if p.started else "starting")
                lines.append(f"  {p.name} {p.ip} {state} restarts={p.restarts} exits={p.exit_codes}")
            return "\n".join(lines)

    def logs(self, tail: int = 30) -> str:
        """The last lines of every pod's log."""
        out = []
        with self._lock:
            pods = list(self.pods)
        for p in pods:
            lines = p.logs().splitlines()[-tail:]
            out.append(f"--- {p.name} ({p.ip})\n" + "\n".join(lines))
        return "\n".join(out)

    def scale(self, deployment: str, replicas: int, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Set a Deployment's replica count (pods start, or terminate gracefully); a LeaderWorkerSet's
        count of groups."""
        if deployment in self._lws.sets:
            with self._lock:
                self._lws.scale(deployment, replicas)
            if wait:
                self.wait_ready(deployment, replicas, timeout=timeout)
            return
        with self._lock:
            dep = self.deployments[deployment]
            dep.replicas = replicas
            rs = dep.sets[dep.current_hash]
            rs.desired = replicas
            self._reconcile()
        if wait:
            self.wait_ready(deployment, replicas, timeout=timeout)

    def kill(self, pod: Pod | str, *, replace: bool = True) -> Pod:
        """``kill -9`` a pod and delete it; its ReplicaSet starts a replacement (``replace``).

        A LeaderWorkerSet pod takes its whole group with it, and the group is recreated.
        """
        with self._lock:
            p = self.pod(pod) if isinstance(pod, str) else pod
            if p.group >= 0 and not replace:
                raise SimError(f"pod {p.name} belongs to a LeaderWorkerSet group: scale the groups instead")
            p.deleted = True
            p.ready = False
            self._update_endpoints()
            if p.proc is not None and p.proc.poll() is None:
                try:
                    p.proc.kill()
                except OSError:
                    pass
            p._terminate.set()
            if p.group >= 0:
                self._lws.recreate_group(p)
            elif not replace:
                dep = self.deployments[p.deployment]
                rs = dep.sets.get(p.template_hash)
                if rs is not None and rs.desired > 0:
                    rs.desired -= 1
                    if p.template_hash == dep.current_hash:
                        dep.replicas = rs.desired
            self._reconcile()
            return p

    def terminate(self, pod: Pod | str) -> Pod:
        """Delete a pod gracefully (its ReplicaSet starts a replacement)."""
        with self._lock:
            p = self.pod(pod) if isinstance(pod, str) else pod
            self._terminate_pod(p)
            self._reconcile()
            return p

    def apply(self, objects: Sequence[Obj], *, wait: bool = True, timeout: float = 120.0) -> None:
        """Apply new versions of the objects: changed pod templates roll out (maxSurge/maxUnavailable).

        With ``wait``, returns once every rollout finished (new pods ready, old ones terminating).
        """
        with self._lock:
            before = {name: d.current_hash for name, d in self.deployments.items()}
            changed_sets = self._load(objects)
            rolling = []
            for name, dep in self.deployments.items():
                h = template_hash(dep.obj["spec"]["template"])
                if h != before.get(name, h) or (name not in before):
                    dep.current_hash = h
                    rolling.append(name)
                elif name in before:
                    dep.sets[dep.current_hash].desired = dep.replicas
            self._reconcile()
        threads = [threading.Thread(target=self._rollout, args=(name, timeout), daemon=True,
                                    name=f"rollout-{name}") for name in rolling]
        for t in threads:
            t.start()
        threads += start_rollouts(self._lws, changed_sets, timeout)
        if wait:
            for t in threads:
                t.join(timeout + 5)
            for name in rolling:
                self.wait_ready(name, self.deployments[name].replicas, timeout=timeout)
            for name in changed_sets:
                self.wait_ready(name, self._lws.sets[name].replicas, timeout=timeout)

    # -- the Deployment controller ----------------------------------------------------------

    def _rollout(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._closed and time.monotonic() < deadline:
            with self._lock:
                dep = self.deployments[name]
                want = dep.replicas
                strategy = dep.obj["spec"].get("strategy", {})
                ru = strategy.get("rollingUpdate", {})
                if strategy.get("type") == "Recreate":
                    surge, unavailable = 0, want
                else:
                    surge = _int_or_percent(ru.get("maxSurge"), want, True, "25%")
                    unavailable = _int_or_percent(ru.get("maxUnavailable"), want, False, "25%")
                    if surge == 0 and unavailable == 0:
                        surge = 1
                new = dep.sets[dep.current_hash]
                olds = [rs for h, rs in dep.sets.items() if h != dep.current_hash]
                total = sum(rs.desired for rs in dep.sets.values())
                if new.desired < want and total < want + surge:
                    new.desired += min(want + surge - total, want - new.desired)
                live = self.pods_of(name)
                ready = sum(1 for p in live if p.ready)
                removable = max(0, ready - (want - unavailable))
                # Old pods that are not ready cost no availability: they go first.
                for rs in olds:
                    unready_old = sum(1 for p in live if p.template_hash == rs.template_hash and not p.ready)
                    drop = min(rs.desired, unready_old)
                    rs.desired -= drop
                for rs in olds:
                    drop = min(rs.desired, removable)
                    rs.desired -= drop
                    removable -= drop
                self._reconcile()
                new_ready = sum(1 for p in live if p.ready and p.template_hash == dep.current_hash)
                if all(rs.desired == 0 for rs in olds) and new.desired == want and new_ready >= want:
                    for h in [h for h, rs in dep.sets.items() if h != dep.current_hash and rs.desired == 0]:
                        if not any(p.template_hash == h and not p.gone for p in self.pods if p.deployment == name):
                            del dep.sets[h]
                    return
            time.sleep(self.probe_period_s / 2)

    def _reconcile(self) -> None:
        """ReplicaSets: as many live pods of each template as desired."""
        for dep in self.deployments.values():
            for rs in dep.sets.values():
                live = [p for p in self.pods if p.deployment == dep.name and p.template_hash == rs.template_hash
                        and not p.deleted and not p.terminating]
                for _ in range(rs.desired - len(live)):
                    self._create_pod(dep, rs)
                extra = len(live) - rs.desired
                if extra > 0:
                    # Like a ReplicaSet: not-ready pods first, then the newest.
                    live.sort(key=lambda p: (p.ready, -p.created))
                    for p in live[:extra]:
                        self._terminate_pod(p)
        self._lws.reconcile()

    def _create_pod(self, dep: _Deployment, rs: _ReplicaSet) -> Pod:
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        name = f"{dep.name}-{rs.template_hash}-{suffix}"
        labels = dict(rs.template.get("metadata", {}).get("labels", {}))
        labels["pod-template-hash"] = rs.template_hash
        pod = Pod(name=name, deployment=dep.name, template_hash=rs.template_hash, ip=self._allocate_ip(),
                  labels=labels, template=rs.template, dir=self.workdir / "pods" / name)
        return self._add_pod(pod)

    def _add_pod(self, pod: Pod) -> Pod:
        """Register a new pod and start its kubelet."""
        pod.dir.mkdir(parents=True, exist_ok=True)
        self.pods.append(pod)
        pod._thread = threading.Thread(target=self._kubelet, args=(pod,), daemon=True, name=f"kubelet-{pod.name}")
        pod._thread.start()
        return pod

    def _terminate_pod(self, pod: Pod) -> None:
        if pod.terminating or pod.deleted:
            return
        pod.terminating = True
        pod.ready = False
        self._update_endpoints()
        pod._terminate.set()

    # -- the kubelet ------------------------------------------------------------------------

    def _kubelet(self, pod: Pod) -> None:
        try:
            with self._lock:
                if not (pod.deleted or pod.terminating or self._closed):
                    self._spawn(pod)
        except Exception as e:
            logger.error("pod %s could not start: %s", pod.name, e)
            with open(pod.log_path, "a") as f:
                f.write(f"[sim] could not start: {e}\n")
            with self._lock:
                pod.gone = True
            return
        spec = pod.template["spec"]
        container = pod.container()
        backoff = 0.5
        while True:
            if pod.deleted or pod.proc is None:
                self._wait_exit(pod)
                break
            if pod.terminating:
                self._graceful_stop(pod, spec, container)
                break
            proc = pod.proc
            code = proc.poll()
            if code is not None:
                with self._lock:
                    self._record_exit(pod)
                    pod.ready = pod.started = False
                    self._update_endpoints()
                    if self._lws.container_exited(pod):
                        continue  # its LeaderWorkerSet group is recreated instead
                if pod._terminate.wait(backoff):
                    continue
                backoff = min(backoff * 2, 5.0)
                with self._lock:
                    if pod.deleted or pod.terminating or self._closed:
                        continue
                    pod.restarts += 1
                    self._spawn(pod)
                continue
            self._probe(pod, container)
            pod._terminate.wait(self.probe_period_s)
        with self._lock:
            pod.gone = True
            pod.ready = False
            self._update_endpoints()
            if pod.group >= 0 and not self._closed:
                self._lws.reconcile()  # the last pod of a group going away brings the fresh group

    def _wait_exit(self, pod: Pod) -> None:
        if pod.proc is not None:
            try:
                pod.proc.wait(10)
            except subprocess.TimeoutExpired:
                self._kill_proc(pod)
            self._record_exit(pod)

    def _record_exit(self, pod: Pod) -> None:
        proc = pod.proc
        if proc is not None and proc.returncode is not None and len(pod.exit_codes) < len(pod.pids):
            pod.exit_codes.append(proc.returncode)

    def _graceful_stop(self, pod: Pod, spec: Obj, container: Obj) -> None:
        grace = float(spec.get("terminationGracePeriodSeconds", 30))
        deadline = time.monotonic() + grace
        pre_stop = container.get("lifecycle", {}).get("preStop")
        proc = pod.proc
        if pre_stop and proc is not None and proc.poll() is None:
            self._handler(pod, pre_stop, min(grace, self.prestop_max_s))
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except OSError:
                pass
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("pod %s did not stop within %ss: SIGKILL", pod.name, grace)
                self._kill_proc(pod)
        self._wait_exit(pod)

    def _handler(self, pod: Pod, handler: Obj, limit: float) -> bool:
        """Run a probe or lifecycle handler; True when it succeeded."""
        if "httpGet" in handler:
            hg = handler["httpGet"]
            conn = http.client.HTTPConnection(hg.get("host") or pod.ip, pod.port(hg["port"]), timeout=limit)
            try:
                conn.request("GET", hg.get("path", "/"))
                return 200 <= conn.getresponse().status < 400
            except (OSError, http.client.HTTPException):
                return False
            finally:
                conn.close()
        if "tcpSocket" in handler:
            ts = handler["tcpSocket"]
            try:
                with socket.create_connection((ts.get("host") or pod.ip, pod.port(ts["port"])), timeout=limit):
                    return True
            except OSError:
                return False
        if "exec" in handler:
            cmd = [self.executables.get(c, c) if i == 0 else c for i, c in enumerate(handler["exec"]["command"])]
            try:
                child = subprocess.Popen(cmd, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
            except OSError:
                return False
            try:
                return child.wait(limit) == 0
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                return False
        if "sleep" in handler:
            time.sleep(min(float(handler["sleep"].get("seconds", 0)), limit))
            return True
        return False

    def _probe(self, pod: Pod, container: Obj) -> None:
        if not pod.started:
            startup = container.get("startupProbe")
            if startup is not None and not self._handler(pod, startup, self._timeout(startup)):
                return
            pod.started = True
        readiness = container.get("readinessProbe")
        if readiness is None:
            ok = True
            threshold_fail = threshold_ok = 1
        else:
            ok = self._handler(pod, readiness, self._timeout(readiness))
            threshold_fail = int(readiness.get("failureThreshold", 3))
            threshold_ok = int(readiness.get("successThreshold", 1))
        with self._lock:
            if pod.terminating or pod.deleted:
                return
            if ok:
                pod._passes += 1
                pod._fails = 0
                if not pod.ready and pod._passes >= threshold_ok:
                    pod.ready = True
                    self._update_endpoints()
            else:
                pod._fails += 1
                pod._passes = 0
                if pod.ready and pod._fails >= threshold_fail:
                    pod.ready = False
                    self._update_endpoints()

    def _timeout(self, probe: Obj) -> float:
        return min(float(probe.get("timeoutSeconds", 1)), self.probe_timeout_s)

    def _spawn(self, pod: Pod) -> None:
        container = pod.container()
        spec = pod.template["spec"]
        mounts = self._volumes(pod, spec, container)
        env = self._env(pod, container, mounts)
        command = list(container.get("command") or [])
        if not command:
            raise SimError(f"pod {pod.name}: the container has no command (the image's entrypoint is unknown here)")
        args = [_expand(a, env) for a in container.get("args", [])]
        command = [_expand(c, env) for c in command]
        argv = [_remap(a, mounts) for a in command + args]
        # The executable is this machine's (e.g. the venv's `shoal`), never a path inside a
        # volume: map it after remapping, so a checkout under /tmp (an emptyDir mount) works.
        argv[0] = self.executables.get(command[0], argv[0])
        cwd = _remap(container["workingDir"], mounts) if container.get("workingDir") else self.cwd
        log = open(pod.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            log.write(f"[sim] starting {' '.join(argv)} (restart {pod.restarts})\n".encode())
            log.flush()
            pod.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        finally:
            log.close()
        pod.pids.append(pod.proc.pid)
        pod.started = False
        pod._fails = pod._passes = 0

    def _volumes(self, pod: Pod, spec: Obj, container: Obj) -> list[tuple[str, str]]:
        """Create the pod's volumes; (mountPath, local directory) pairs, longest path first."""
        local: dict[str, Path] = {}
        for vol in spec.get("volumes", []):
            d = pod.dir / "volumes" / vol["name"]
            if d.exists():
                local[vol["name"]] = d  # a restarted container keeps its pod's volumes
                continue
            d.mkdir(parents=True)
            local[vol["name"]] = d
            if "configMap" in vol:
                cm = self.config_maps.get(vol["configMap"]["name"])
                if cm is None:
                    raise SimError(f"pod {pod.name}: no ConfigMap {vol['configMap']['name']!r}")
                data = {k: v.encode() for k, v in cm.get("data", {}).items()}
                data.update({k: base64.b64decode(v) for k, v in cm.get("binaryData", {}).items()})
                _write_items(d, data, vol["configMap"].get("items"))
            elif "secret" in vol:
                sname = vol["secret"]["secretName"]
                obj = self.secret_objs.get(sname, {})
                keys = {*obj.get("data", {}), *obj.get("stringData", {}), *self._given_secrets.get(sname, {})}
                _write_items(d, {k: self.secret_value(sname, k).encode() for k in keys}, vol["secret"].get("items"))
            elif "emptyDir" in vol:
                pass
            else:
                raise SimError(f"pod {pod.name}: volume {vol['name']!r} has a type the simulation does not know")
        mounts = []
        for vm in container.get("volumeMounts", []):
            path = local[vm["name"]]
            if vm.get("subPath"):
                path = path / vm["subPath"]
            mounts.append((vm["mountPath"].rstrip("/") or "/", str(path)))
        mounts.sort(key=lambda m: -len(m[0]))
        return mounts

    def _env(self, pod: Pod, container: Obj, mounts: list[tuple[str, str]]) -> dict[str, str]:
        env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "HOSTNAME": pod.name,
        }
        pythonpath = [*self.python_path, *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env.update(self.extra_env)
        env[names.ENV_RESOLVER_FILE] = str(self.resolver_file)
        # What a mutating webhook prepends (LeaderWorkerSet's variables): the container's own may refer to it.
        declared: dict[str, str] = dict(pod.injected_env)
        for item in container.get("env", []):
            name = item["name"]
            if "value" in item:
                value = _expand(str(item["value"]), declared)
            else:
                value = self._value_from(pod, container, item.get("valueFrom", {}))
            declared[name] = _remap(value, mounts)
        env.update(declared)
        env.update(pod.env_overrides)
        return env

    def _value_from(self, pod: Pod, container: Obj, source: Obj) -> str:
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            fields = {
                "metadata.name": pod.name,
                "metadata.namespace": self.namespace,
                "metadata.uid": hashlib.sha256(pod.name.encode()).hexdigest()[:32],
                "status.podIP": pod.ip,
                "status.podIPs": pod.ip,
                "status.hostIP": "127.0.0.1",
                "status.hostIPs": "127.0.0.1",
                "spec.nodeName": "sim-node",
                "spec.serviceAccountName": str(pod.template["spec"].get("serviceAccountName", "default")),
            }
            if path in fields:
                return fields[path]
            m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
            if m:
                annotations = pod.template.get("metadata", {}).get("annotations", {})
                return str((pod.labels if m.group(1) == "labels" else annotations).get(m.group(2), ""))
            raise SimError(f"pod {pod.name}: fieldRef {path!r} is not simulated")
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            return self.secret_value(ref["name"], ref["key"])
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            return str(self.config_maps.get(ref["name"], {}).get("data", {}).get(ref["key"], ""))
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, what = ref["resource"].partition(".")
            return str(container.get("resources", {}).get(kind, {}).get(what, "0"))
        raise SimError(f"pod {pod.name}: env source {source!r} is not simulated")

    # -- endpoints, DNS and the Service front ------------------------------------------------

    def _service_pods(self, svc: Obj) -> list[Pod]:
        selector = svc.get("spec", {}).get("selector") or {}
        if not selector:
            return []
        publish_unready = bool(svc["spec"].get("publishNotReadyAddresses", False))
        return [p for p in self.pods if not p.deleted and not p.terminating and not p.gone
                and p.proc is not None and (p.ready or publish_unready) and _matches(selector, p.labels)]

    def _update_endpoints(self) -> None:
        """Called with the lock held whenever a pod's readiness or existence changes."""
        records: dict[str, list[str]] = {}
        for name, svc in self.services.items():
            ips = sorted(p.ip for p in self._service_pods(svc))
            if svc.get("spec", {}).get("clusterIP") == "None":
                records[f"{name}.{self.namespace}.svc.{self.cluster_domain}"] = ips
            elif name in self._vips:
                self._endpoints[name] = ips
        records.update(self._lws.records(self.namespace, self.cluster_domain))
        self._write_resolver(records)

    def _write_resolver(self, records: Mapping[str, list[str]]) -> None:
        text = json.dumps(dict(sorted(records.items())), indent=1)
        if text == self._resolver_text:
            return
        tmp = self.resolver_file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.resolver_file)
        self._resolver_text = text

    def resolver_records(self) -> dict[str, list[str]]:
        records: dict[str, list[str]] = json.loads(self._resolver_text or "{}")
        return records

    def _start_front(self) -> None:
        if self._front_thread is not None or not self._vips:
            return
        loop = asyncio.new_event_loop()
        started = threading.Event()
        errors: list[BaseException] = []

        async def setup() -> None:
            for name, vip in self._vips.items():
                for port in self.services[name]["spec"].get("ports", []):
                    server = await asyncio.start_server(
                        _forwarder(self, name, port.get("targetPort", port["port"])), vip, int(port["port"]),
                        reuse_address=True)
                    self._front_servers.append(server)

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(setup())
            except BaseException as e:
                errors.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            for server in self._front_servers:
                server.close()
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._front_loop = loop
        self._front_thread = threading.Thread(target=run, daemon=True, name="sim-services")
        self._front_thread.start()
        started.wait(10)
        if errors:
            raise SimError(f"cannot start the Service front: {errors[0]}")

    def _pick_endpoint(self, service: str, target: int | str) -> tuple[str, int] | None:
        with self._lock:
            svc = self.services[service]
            pods = self._service_pods(svc)
            if not pods:
                return None
            p = random.choice(pods)
            return p.ip, p.port(target)


def _forwarder(sim: PodSim, service: str, target: int | str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                                       Any]:
    """kube-proxy for one Service port: each connection goes to one random ready endpoint."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoint = sim._pick_endpoint(service, target)
        if endpoint is None:
            writer.transport.abort()  # no ready endpoint: the connection is refused
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*endpoint)
        except OSError:
            writer.transport.abort()
            return
        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the simulation is closing
        finally:
            up_writer.close()
            writer.close()

    return handle


def _write_items(directory: Path, data: Mapping[str, bytes], items: Iterable[Obj] | None) -> None:
    if items:
        for item in items:
            if item["key"] in data:
                path = directory / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data[item["key"]])
        return
    for key, value in data.items():
        (directory / key).write_bytes(value)


def _remap(value: str, mounts: Sequence[tuple[str, str]]) -> str:
    """A path under a volume mount, rewritten to the pod's local directory for that volume."""
    for mount, local in mounts:
        if value == mount:
            return local
        if value.startswith(mount + "/"):
            return local + value[len(mount):]
    return value


_prctl: Any = None
if sys.platform == "linux":
    try:
        import ctypes

        _prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except OSError:  # pragma: no cover
        _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: be killed if the simulating process dies (Linux)."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
