"""The pod simulation's LeaderWorkerSet controller (leaderworkerset.x-k8s.io/v1).

:class:`~shoal.kubernetes.sim.PodSim` hands it the ``LeaderWorkerSet`` objects; it plays what
the LWS controller and its webhook do for shoal's gang pods:

* **groups**: ``spec.replicas`` groups of ``leaderWorkerTemplate.size`` pods, named
  ``<lws>-<group>`` (the leader, worker index 0, from ``leaderTemplate``) and
  ``<lws>-<group>-<index>`` (from ``workerTemplate``), each on its own loopback address. Workers
  are created with their leader (``startupPolicy: LeaderCreated``; ``LeaderReady`` is refused).
* **what the webhook injects**: the labels ``leaderworkerset.sigs.k8s.io/{name, group-index,
  worker-index, group-key, template-revision-hash}`` and, prepended to every container's
  environment (so ``$(VAR)`` references to them expand), ``LWS_LEADER_ADDRESS``,
  ``LWS_GROUP_SIZE`` and ``LWS_WORKER_INDEX``. ``LWS_LEADER_ADDRESS`` is the leader's IP here:
  the processes resolve it with the system resolver, which knows no pod names.
* **the headless Service named after the LWS**: every pod of it, ready or not, is published in
  the resolver file as ``<pod>.<lws>.<namespace>.svc.<domain>`` (and the Service name lists them
  all), which is how rank 0 finds its ranks.
* **RecreateGroupOnPodRestart**: a pod deleted (``PodSim.kill``) or a container that exits takes
  its group with it: the group's other pods terminate gracefully and, once all are gone, the
  group is created afresh (same names, new addresses). With restartPolicy ``None`` a container
  restarts in place as in any pod.
* **scaling** (``PodSim.scale``): groups are added or terminated whole, highest index first.
* **rolling updates** (``PodSim.apply`` with a changed template): one group at a time, highest
  index first, each recreated from the new templates and ready before the next (maxSurge is not
  simulated).

One thing stands in for the network namespaces pods would have: a port a rank binds on *every*
interface (torch's TCPStore on ``MASTER_PORT``) would collide between simulated groups, so each
group gets a free port in place of the one its pods declare in ``MASTER_PORT``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field

from shoal.exceptions import SimError
from shoal.kubernetes import names
from shoal.kubernetes.sim.objects import Obj, Pod, SimHost

_RECREATE = ("RecreateGroupOnPodRestart", "RecreateGroupAfterStart")


@dataclass
class _LWS:
    obj: Obj
    replicas: int
    current: str  # revision hash of the current templates
    templates: dict[str, tuple[Obj, Obj]] = field(default_factory=dict)  # revision -> (leader, worker)
    revision_of: dict[int, str] = field(default_factory=dict)  # group -> revision its pods come from
    recreating: set[int] = field(default_factory=set)  # groups going away, created again once gone

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def size(self) -> int:
        return int(self.obj["spec"]["leaderWorkerTemplate"].get("size", 1))

    @property
    def restart_policy(self) -> str:
        return str(self.obj["spec"]["leaderWorkerTemplate"].get("restartPolicy", "RecreateGroupOnPodRestart"))


def _revision(lwt: Obj) -> str:
    return hashlib.sha256(json.dumps(lwt, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LeaderWorkerSets:
    """The LWS controller of one :class:`PodSim` (every method but the waits runs under its lock)."""

    def __init__(self, sim: SimHost) -> None:
        self.sim = sim
        self.sets: dict[str, _LWS] = {}

    # -- objects ------------------------------------------------------------------------------

    def load(self, obj: Obj) -> bool:
        """Take a LeaderWorkerSet; True when an existing one's templates changed (a rollout is due)."""
        spec = obj["spec"]
        if spec.get("startupPolicy", "LeaderCreated") != "LeaderCreated":
            raise SimError(f"LeaderWorkerSet {obj['metadata']['name']}: only startupPolicy LeaderCreated is simulated")
        lwt = spec["leaderWorkerTemplate"]
        rev = _revision(lwt)
        worker = copy.deepcopy(lwt["workerTemplate"])
        leader = copy.deepcopy(lwt.get("leaderTemplate") or worker)
        name = obj["metadata"]["name"]
        lws = self.sets.get(name)
        if lws is None:
            self.sets[name] = _LWS(copy.deepcopy(obj), int(spec.get("replicas", 1)), rev, {rev: (leader, worker)})
            return False
        lws.obj = copy.deepcopy(obj)
        if "replicas" in spec:
            lws.replicas = int(spec["replicas"])
        lws.templates.setdefault(rev, (leader, worker))
        changed = rev != lws.current
        lws.current = rev
        return changed

    # -- the controller -----------------------------------------------------------------------

    def pods(self, lws: _LWS, group: int | None = None) -> list[Pod]:
        """Pods of an LWS (or of one group) not gone yet, terminating ones included."""
        return [p for p in self.sim.pods if p.deployment == lws.name and not p.gone
                and (group is None or p.group == group)]

    def reconcile(self) -> None:
        for lws in self.sets.values():
            live = self.pods(lws)
            for group in sorted({p.group for p in live if p.group >= lws.replicas}, reverse=True):
                lws.recreating.discard(group)
                lws.revision_of.pop(group, None)
                for p in live:
                    if p.group == group:
                        self.sim.terminate_pod(p)
            for group in range(lws.replicas):
                members = [p for p in live if p.group == group]
                if group in lws.recreating:
                    if members:
                        continue  # a fresh group comes up once every old pod is gone
                    lws.recreating.discard(group)
                if not members:
                    self._create_group(lws, group)

    def _create_group(self, lws: _LWS, group: int) -> None:
        rev = lws.revision_of.setdefault(group, lws.current)
        leader_tmpl, worker_tmpl = lws.templates[rev]
        size = lws.size
        leader_name = f"{lws.name}-{group}"
        group_key = hashlib.sha1(f"{self.sim.namespace}/{leader_name}".encode()).hexdigest()
        port = _free_port()
        leader_ip = ""
        for index in range(size):
            template = copy.deepcopy(leader_tmpl if index == 0 else worker_tmpl)
            name = leader_name if index == 0 else f"{leader_name}-{index}"
            ip = self.sim.allocate_ip()
            leader_ip = leader_ip or ip
            labels = dict(template.get("metadata", {}).get("labels", {}))
            labels.update({
                names.LWS_LABEL_NAME: lws.name,
                names.LWS_LABEL_GROUP_INDEX: str(group),
                names.LWS_LABEL_WORKER_INDEX: str(index),
                names.LWS_LABEL_GROUP_KEY: group_key,
                names.LWS_LABEL_REVISION: rev,
            })
            injected = {
                names.ENV_LWS_LEADER_ADDRESS: leader_ip,
                names.ENV_LWS_GROUP_SIZE: str(size),
                names.ENV_LWS_WORKER_INDEX: str(index),
            }
            declared = {e["name"] for c in template["spec"]["containers"] for e in c.get("env", [])}
            overrides = {"MASTER_PORT": str(port)} if "MASTER_PORT" in declared else {}
            pod = Pod(name=name, deployment=lws.name, template_hash=rev, ip=ip, labels=labels, template=template,
                      dir=self.sim.workdir / "pods" / f"{name}-{time.monotonic_ns()}", group=group,
                      injected_env=injected, env_overrides=overrides)
            self.sim.add_pod(pod)
        self.sim.update_endpoints()

    def recreate_group(self, pod: Pod) -> None:
        """A pod of the group was deleted or restarted: the whole group goes, and comes back."""
        lws = self.sets[pod.deployment]
        lws.recreating.add(pod.group)
        for p in self.pods(lws, pod.group):
            if p is not pod:
                self.sim.terminate_pod(p)

    def container_exited(self, pod: Pod) -> bool:
        """A container of an LWS pod exited: True when the group is recreated (the pod is deleted)."""
        lws = self.sets.get(pod.deployment)
        if lws is None or pod.group < 0 or lws.restart_policy not in _RECREATE:
            return False
        pod.deleted = True
        self.recreate_group(pod)
        return True

    def records(self, namespace: str, domain: str) -> dict[str, list[str]]:
        """DNS of each LWS's headless Service (publishNotReadyAddresses): every pod by hostname."""
        out: dict[str, list[str]] = {}
        for lws in self.sets.values():
            pods = [p for p in self.pods(lws) if not p.deleted]
            out[f"{lws.name}.{namespace}.svc.{domain}"] = sorted(p.ip for p in pods)
            for p in pods:
                out[f"{p.name}.{lws.name}.{namespace}.svc.{domain}"] = [p.ip]
        return out

    # -- what tests use -------------------------------------------------------------------------

    def scale(self, name: str, replicas: int) -> None:
        self.sets[name].replicas = replicas
        self.sim.reconcile()

    def groups_ready(self, lws: _LWS) -> list[int]:
        """Groups whose every pod is ready and of the current revision."""
        out = []
        for group in range(lws.replicas):
            members = [p for p in self.pods(lws, group) if not p.terminating and not p.deleted]
            if (len(members) == lws.size and all(p.ready for p in members)
                    and all(p.template_hash == lws.current for p in members)):
                out.append(group)
        return out

    def wait_groups(self, name: str, count: int, timeout: float) -> list[Pod]:
        """Wait until ``count`` groups are ready (and no pods of other groups are live); their pods."""
        deadline = time.monotonic() + timeout
        while True:
            with self.sim.lock:
                lws = self.sets[name]
                ready = self.groups_ready(lws)
                live = [p for p in self.pods(lws) if not p.terminating and not p.deleted]
                if len(ready) >= count and len(live) == count * lws.size:
                    return live
            if time.monotonic() > deadline:
                raise SimError(f"{name}: {len(ready)} of {count} groups ready after {timeout}s\n" + self.sim.describe())
            time.sleep(0.02)

    def rollout(self, name: str, timeout: float) -> None:
        """Recreate every group of an old revision from the current templates, one at a time."""
        deadline = time.monotonic() + timeout
        while not self.sim.closed and time.monotonic() < deadline:
            with self.sim.lock:
                lws = self.sets[name]
                old = sorted((g for g in range(lws.replicas) if lws.revision_of.get(g, lws.current) != lws.current),
                             reverse=True)
                if not old:
                    return
                group = old[0]
                lws.revision_of[group] = lws.current
                lws.recreating.add(group)
                for p in self.pods(lws, group):
                    self.sim.terminate_pod(p)
                self.sim.reconcile()
            while not self.sim.closed and time.monotonic() < deadline:
                with self.sim.lock:
                    if group in self.groups_ready(lws):
                        break
                time.sleep(self.sim.probe_period_s / 2)


def start_rollouts(sets: LeaderWorkerSets, changed: list[str], timeout: float) -> list[threading.Thread]:
    threads = [threading.Thread(target=sets.rollout, args=(name, timeout), daemon=True, name=f"lws-rollout-{name}")
               for name in changed]
    for t in threads:
        t.start()
    return threads
