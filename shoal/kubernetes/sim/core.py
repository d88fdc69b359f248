"""The pod simulation itself: the objects, the Deployment controller, and what tests use."""

from __future__ import annotations

import base64
import copy
import ipaddress
import logging
import os
import random
import secrets
import shutil
import signal
import ssl
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from shoal.exceptions import SimError
from shoal.kubernetes import names
from shoal.kubernetes.sim.firewall import Firewall
from shoal.kubernetes.sim.keda import KedaStandIn
from shoal.kubernetes.sim.kubelet import Kubelet
from shoal.kubernetes.sim.lws import LeaderWorkerSets, start_rollouts
from shoal.kubernetes.sim.network import Services
from shoal.kubernetes.sim.objects import Deployment, Obj, Pod, ReplicaSet, int_or_percent, template_hash

logger = logging.getLogger("shoal.sim")

_TLS_KEYS = ("tls.crt", "tls.key", "ca.crt")


def _tls_volumes(obj: object) -> set[str]:
    """Names of the Secrets mounted with a tls.crt item anywhere in a workload object."""
    found: set[str] = set()
    if isinstance(obj, dict):
        sec = obj.get("secret")
        if isinstance(sec, dict) and any(i.get("key") == "tls.crt" for i in sec.get("items") or ()):
            found.add(str(sec.get("secretName")))
        for value in obj.values():
            found |= _tls_volumes(value)
    elif isinstance(obj, list):
        for value in obj:
            found |= _tls_volumes(value)
    return found


class PodSim:
    """Runs the Deployments among ``objects`` as local processes (see the module docstring).

    ``cwd`` is the pods' working directory (the image's WORKDIR; default: this process's),
    ``python_path`` is prepended to their ``PYTHONPATH``, ``env`` is added to every
    container's environment (the container's own variables win), ``secrets`` gives Secret
    data by name (``{"name": {"key": "value"}}``; a Secret that is neither there nor among
    the objects gets a random value per key). ``executables`` maps command names to paths
    (default: ``shoal`` and ``python`` of this environment).

    NetworkPolicies among the objects are enforced on every connection to a pod's address
    (:mod:`~shoal.kubernetes.sim.firewall`; ``network_policies=False`` turns that off): a denied
    connection is reset (``denied_connections="reset"``) or held silent until the caller times out
    (``"drop"``), and counted in ``sim.firewall.denied``. The objects' first namespace is the
    simulation's; a Deployment in another namespace runs its pods there (for namespaceSelectors,
    whose namespaces carry ``kubernetes.io/metadata.name`` plus ``namespace_labels``).

    Probes run every ``probe_period_s`` (startup and readiness) and, for ``livenessProbe``, every
    ``liveness_period_s`` (None: never): ``failureThreshold`` failures in a row restart the
    container in place, as the kubelet does (``pod.restarts`` counts it; its log says why).
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
        liveness_period_s: float | None = 2.0,
        cluster_domain: str = "cluster.local",
        network: str | None = None,
        network_policies: bool = True,
        denied_connections: Literal["reset", "drop"] = "reset",
        namespace_labels: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="shoal-sim-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cwd = str(cwd or os.getcwd())
        self.python_path = list(python_path)
        self.extra_env = dict(env or {})
        self.probe_period_s = probe_period_s
        self.probe_timeout_s = probe_timeout_s
        self.prestop_max_s = prestop_max_s
        self.liveness_period_s = liveness_period_s
        self.cluster_domain = cluster_domain
        bindir = Path(sys.executable).parent
        self.executables = {"shoal": str(bindir / "shoal"), "python": sys.executable, "python3": sys.executable}
        self.executables.update(executables or {})
        self.given_secrets = {k: dict(v) for k, v in (secrets or {}).items()}
        self._generated_secrets: dict[tuple[str, str], str] = {}
        # Addresses: a random /16 of 127/8, so that simulations running side by side never meet.
        if network is None:
            network = f"127.{random.randint(16, 250)}.0.0/16"
        self._net = ipaddress.IPv4Network(network)
        self._next_ip = 1
        self.resolver_file = self.workdir / "resolver.json"
        self.deployments: dict[str, Deployment] = {}
        self.services: dict[str, Obj] = {}
        self.config_maps: dict[str, Obj] = {}
        self.secret_objs: dict[str, Obj] = {}
        self.tls_secrets: set[str] = set()  # kubernetes.io/tls Secrets the pods mount
        self.namespace = "default"
        self._namespace_set = False
        self.pods: list[Pod] = []
        self.closed = False
        self.network_policies: dict[tuple[str, str], Obj] = {}
        self.firewall = Firewall(self, enabled=network_policies, denied=denied_connections,
                                 namespace_labels=namespace_labels)
        self.network = Services(self, self.resolver_file)
        self.kubelet = Kubelet(self)
        self.lws = LeaderWorkerSets(self)
        # KEDA/HPA stand-in for the ScaledObjects (sim.keda): started by tests that want autoscaling.
        self.scaled_objects: dict[str, Obj] = {}
        self.keda = KedaStandIn(self)
        self.network.write_resolver({})
        self._load(objects)

    # -- objects ----------------------------------------------------------------------------

    def _load(self, objects: Sequence[Obj]) -> list[str]:
        """Take the objects; the LeaderWorkerSets whose templates changed."""
        changed: list[str] = []
        for obj in objects:
            kind = obj.get("kind")
            if kind in ("Deployment", "LeaderWorkerSet"):
                self.tls_secrets.update(_tls_volumes(obj))
            meta = obj.get("metadata", {})
            name = meta.get("name", "")
            if meta.get("namespace") and not self._namespace_set:
                self.namespace = meta["namespace"]
                self._namespace_set = True
            if kind == "NetworkPolicy":
                self.network_policies[(meta.get("namespace") or self.namespace, name)] = copy.deepcopy(obj)
            elif kind == "ConfigMap":
                self.config_maps[name] = copy.deepcopy(obj)
            elif kind == "Secret":
                self.secret_objs[name] = copy.deepcopy(obj)
            elif kind == "Service":
                self.services[name] = copy.deepcopy(obj)
                spec = obj.get("spec", {})
                routed = spec.get("type", "ClusterIP") in ("ClusterIP", "NodePort", "LoadBalancer")
                if routed and spec.get("clusterIP") != "None" and name not in self.network.vips:
                    self.network.vips[name] = self.allocate_ip()
            elif kind == "Deployment":
                template = copy.deepcopy(obj["spec"]["template"])
                h = template_hash(template)
                replicas = obj["spec"].get("replicas", 1)
                existing = self.deployments.get(name)
                if existing is None:
                    dep = Deployment(copy.deepcopy(obj), int(replicas), h)
                    dep.sets[h] = ReplicaSet(name, h, template, 0)
                    self.deployments[name] = dep
                else:
                    existing.obj = copy.deepcopy(obj)
                    if "replicas" in obj["spec"]:
                        existing.replicas = int(replicas)
                    if h not in existing.sets:
                        existing.sets[h] = ReplicaSet(name, h, template, 0)
            elif kind == "ScaledObject":
                self.scaled_objects[name] = copy.deepcopy(obj)
            elif kind == "LeaderWorkerSet" and self.lws.load(obj):
                changed.append(name)
        self.firewall.set_policies(self.network_policies.values())
        return changed

    def allocate_ip(self) -> str:
        while True:
            addr = self._net.network_address + self._next_ip
            self._next_ip += 1
            if addr not in self._net or addr == self._net.broadcast_address:
                raise SimError(f"out of addresses in {self._net}")
            if int(addr) & 0xFF not in (0, 255):
                return str(addr)

    def secret_value(self, name: str, key: str) -> str:
        """The value a ``secretKeyRef`` to ``name``/``key`` gets (generated on first use if unknown)."""
        given = self.given_secrets.get(name)
        if given is not None and key in given:
            return given[key]
        obj = self.secret_objs.get(name)
        if obj is not None:
            if key in obj.get("stringData", {}):
                return str(obj["stringData"][key])
            if key in obj.get("data", {}):
                return base64.b64decode(obj["data"][key]).decode()
        with self.lock:
            value = self._generated_secrets.get((name, key))
            if value is None:
                if key in _TLS_KEYS:
                    # A kubernetes.io/tls Secret nobody made: a test CA and pod certificate, like cert-manager's.
                    from shoal.kubernetes.certs import new_material

                    data = new_material(name, self.namespace).secret_data()
                    for k, v in data.items():
                        self._generated_secrets[(name, k)] = v
                    value = data[key]
                else:
                    value = secrets.token_hex(32)
                    self._generated_secrets[(name, key)] = value
            return value

    def client_tls(self, secret: str | None = None) -> ssl.SSLContext | None:
        """A client TLS context holding the pods' certificate (of ``secret``; default: the only
        kubernetes.io/tls Secret the pods mount), for a test talking to a pod's RPC port like a
        pod would; None when the pods mount none (``--tls off``)."""
        if secret is None:
            if not self.tls_secrets:
                return None
            if len(self.tls_secrets) > 1:
                raise SimError(f"several TLS Secrets ({', '.join(sorted(self.tls_secrets))}): say which")
            secret = next(iter(self.tls_secrets))
        d = self.workdir / "client-tls" / secret
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for key in _TLS_KEYS:
            (d / key).write_text(self.secret_value(secret, key), encoding="utf-8")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = False
        ctx.load_cert_chain(d / "tls.crt", d / "tls.key")
        ctx.load_verify_locations(cafile=d / "ca.crt")
        return ctx

    def has_secret_key(self, name: str, key: str) -> bool:
        """Whether Secret ``name`` (given, or among the objects) has ``key``; False for an unknown
        Secret (whose values the simulation generates)."""
        obj = self.secret_objs.get(name, {})
        return key in self.given_secrets.get(name, {}) or key in obj.get("data", {}) or key in obj.get("stringData", {})

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> PodSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, *, wait: bool = True, timeout: float = 60.0, replicas: Mapping[str, int] | None = None) -> None:
        """Create every Deployment's pods (``replicas`` overrides counts by Deployment name)."""
        self.network.start_front()
        with self.lock:
            for name, dep in self.deployments.items():
                if replicas is not None and name in replicas:
                    dep.replicas = replicas[name]
                dep.sets[dep.current_hash].desired = dep.replicas
            for name, lws in self.lws.sets.items():  # a LeaderWorkerSet's replicas are groups
                if replicas is not None and name in replicas:
                    lws.replicas = replicas[name]
            self.reconcile()
        if wait:
            for name, dep in self.deployments.items():
                self.wait_ready(name, dep.replicas, timeout=timeout)
            for name, lws in self.lws.sets.items():
                self.wait_ready(name, lws.replicas, timeout=timeout)

    def close(self) -> None:
        """Stop every process this simulation started (SIGTERM, then SIGKILL), by PID."""
        if self.closed:
            return
        self.closed = True
        self.keda.stop()
        with self.lock:
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
            self.kubelet.kill_proc(pod)
        for pod in pods:
            if pod._thread is not None:
                pod._thread.join(5)
            self.kubelet.kill_proc(pod)  # a restart that raced with close
        self.network.close_front()
        self.firewall.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- what tests use ---------------------------------------------------------------------

    def pods_of(self, deployment: str, *, ready: bool | None = None, include_terminating: bool = False) -> list[Pod]:
        with self.lock:
            out = [p for p in self.pods if p.deployment == deployment and not p.deleted
                   and (include_terminating or not p.terminating)]
            if ready is not None:
                out = [p for p in out if p.ready == ready]
            return out

    def pod(self, name: str) -> Pod:
        """The newest pod of that name (a recreated LeaderWorkerSet group reuses its names)."""
        with self.lock:
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
        return self.network.vips[service], int(svc["spec"]["ports"][0]["port"])

    def http_url(self, service: str | None = None) -> str:
        """``http://vip:port`` of a ClusterIP Service (default: the only one)."""
        if service is None:
            if len(self.network.vips) != 1:
                raise SimError(f"several ClusterIP Services ({', '.join(self.network.vips)}); name one")
            service = next(iter(self.network.vips))
        host, port = self.service_address(service)
        return f"http://{host}:{port}"

    def endpoints(self, service: str) -> list[str]:
        """``ip:port`` of the ready pods behind a Service (its first port)."""
        svc = self.services[service]
        port_spec = svc["spec"]["ports"][0]
        target = port_spec.get("targetPort", port_spec["port"])
        with self.lock:
            pods = self.network.service_pods(svc)
            return [f"{p.ip}:{p.port(target)}" for p in pods]

    def wait_ready(self, deployment: str, count: int, timeout: float = 60.0) -> list[Pod]:
        """Wait until ``count`` pods of the current template are ready (and no more pods are live).

        For a LeaderWorkerSet ``count`` is in groups: each with every pod ready; returns their pods.
        """
        if deployment in self.lws.sets:
            return self.lws.wait_groups(deployment, count, timeout)
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
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
            with self.lock:
                left = [p for p in self.pods if (p.terminating or p.deleted) and not p.gone]
            if not left:
                return
            if time.monotonic() > deadline:
                raise SimError(f"pods still terminating after {timeout}s: {', '.join(p.name for p in left)}")
            time.sleep(0.02)

    def describe(self) -> str:
        """One line per pod (for failure messages)."""
        with self.lock:
            lines = []
            for p in self.pods:
                state = ("gone" if p.gone else "terminating" if p.terminating else "ready" if p.ready
                         else "started" if p.started else "starting")
                lines.append(f"  {p.name} {p.ip} {state} restarts={p.restarts} exits={p.exit_codes}")
            return "\n".join(lines)

    def logs(self, tail: int = 30) -> str:
        """The last lines of every pod's log."""
        out = []
        with self.lock:
            pods = list(self.pods)
        for p in pods:
            lines = p.logs().splitlines()[-tail:]
            out.append(f"--- {p.name} ({p.ip})\n" + "\n".join(lines))
        return "\n".join(out)

    def scale(self, deployment: str, replicas: int, *, wait: bool = True, timeout: float = 60.0) -> None:
        """Set a Deployment's replica count (pods start, or terminate gracefully); a LeaderWorkerSet's
        count of groups."""
        if deployment in self.lws.sets:
            with self.lock:
                self.lws.scale(deployment, replicas)
            if wait:
                self.wait_ready(deployment, replicas, timeout=timeout)
            return
        with self.lock:
            dep = self.deployments[deployment]
            dep.replicas = replicas
            rs = dep.sets[dep.current_hash]
            rs.desired = replicas
            self.reconcile()
        if wait:
            self.wait_ready(deployment, replicas, timeout=timeout)

    def kill(self, pod: Pod | str, *, replace: bool = True) -> Pod:
        """``kill -9`` a pod and delete it; its ReplicaSet starts a replacement (``replace``).

        A LeaderWorkerSet pod takes its whole group with it, and the group is recreated.
        """
        with self.lock:
            p = self.pod(pod) if isinstance(pod, str) else pod
            if p.group >= 0 and not replace:
                raise SimError(f"pod {p.name} belongs to a LeaderWorkerSet group: scale the groups instead")
            p.deleted = True
            p.ready = False
            self.update_endpoints()
            if p.proc is not None and p.proc.poll() is None:
                try:
                    p.proc.kill()
                except OSError:
                    pass
            p._terminate.set()
            if p.group >= 0:
                self.lws.recreate_group(p)
            elif not replace:
                dep = self.deployments[p.deployment]
                rs = dep.sets.get(p.template_hash)
                if rs is not None and rs.desired > 0:
                    rs.desired -= 1
                    if p.template_hash == dep.current_hash:
                        dep.replicas = rs.desired
            self.reconcile()
            return p

    def terminate(self, pod: Pod | str) -> Pod:
        """Delete a pod gracefully (its ReplicaSet starts a replacement)."""
        with self.lock:
            p = self.pod(pod) if isinstance(pod, str) else pod
            self.terminate_pod(p)
            self.reconcile()
            return p

    def apply(self, objects: Sequence[Obj], *, wait: bool = True, timeout: float = 120.0) -> None:
        """Apply new versions of the objects: changed pod templates roll out (maxSurge/maxUnavailable).

        With ``wait``, returns once every rollout finished (new pods ready, old ones terminating).
        """
        with self.lock:
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
            self.reconcile()
        threads = [threading.Thread(target=self._rollout, args=(name, timeout), daemon=True,
                                    name=f"rollout-{name}") for name in rolling]
        for t in threads:
            t.start()
        threads += start_rollouts(self.lws, changed_sets, timeout)
        if wait:
            for t in threads:
                t.join(timeout + 5)
            for name in rolling:
                self.wait_ready(name, self.deployments[name].replicas, timeout=timeout)
            for name in changed_sets:
                self.wait_ready(name, self.lws.sets[name].replicas, timeout=timeout)

    # -- the Deployment controller ----------------------------------------------------------

    def _rollout(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            with self.lock:
                dep = self.deployments[name]
                want = dep.replicas
                strategy = dep.obj["spec"].get("strategy", {})
                ru = strategy.get("rollingUpdate", {})
                if strategy.get("type") == "Recreate":
                    surge, unavailable = 0, want
                else:
                    surge = int_or_percent(ru.get("maxSurge"), want, True, "25%")
                    unavailable = int_or_percent(ru.get("maxUnavailable"), want, False, "25%")
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
                self.reconcile()
                new_ready = sum(1 for p in live if p.ready and p.template_hash == dep.current_hash)
                if all(rs.desired == 0 for rs in olds) and new.desired == want and new_ready >= want:
                    for h in [h for h, rs in dep.sets.items() if h != dep.current_hash and rs.desired == 0]:
                        if not any(p.template_hash == h and not p.gone for p in self.pods if p.deployment == name):
                            del dep.sets[h]
                    return
            time.sleep(self.probe_period_s / 2)

    def reconcile(self) -> None:
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
                        self.terminate_pod(p)
        self.lws.reconcile()

    def _create_pod(self, dep: Deployment, rs: ReplicaSet) -> Pod:
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        name = f"{dep.name}-{rs.template_hash}-{suffix}"
        labels = dict(rs.template.get("metadata", {}).get("labels", {}))
        labels["pod-template-hash"] = rs.template_hash
        pod = Pod(name=name, deployment=dep.name, template_hash=rs.template_hash, ip=self.allocate_ip(),
                  labels=labels, template=rs.template, dir=self.workdir / "pods" / name,
                  namespace=dep.obj["metadata"].get("namespace") or self.namespace)
        return self.add_pod(pod)

    def add_pod(self, pod: Pod) -> Pod:
        """Register a new pod and start its kubelet."""
        pod.dir.mkdir(parents=True, exist_ok=True)
        self.firewall.attach(pod)
        self.pods.append(pod)
        pod._thread = threading.Thread(target=self.kubelet.run, args=(pod,), daemon=True, name=f"kubelet-{pod.name}")
        pod._thread.start()
        return pod

    def terminate_pod(self, pod: Pod) -> None:
        if pod.terminating or pod.deleted:
            return
        pod.terminating = True
        pod.ready = False
        self.update_endpoints()
        pod._terminate.set()


    def update_endpoints(self) -> None:
        """Called with the lock held whenever a pod's readiness or existence changes."""
        self.network.update()

    def resolver_records(self) -> dict[str, list[str]]:
        """The records of the resolver file the pods read (cluster DNS)."""
        return self.network.records()
