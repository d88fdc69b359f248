"""Gang replicas on Kubernetes: the pieces of a ``LeaderWorkerSet`` (leaderworkerset.x-k8s.io/v1).

A deployment whose replicas are gangs (``num_ranks`` or ``placement_group_bundles``, world
size N > 1) compiles to one LeaderWorkerSet instead of a Deployment: each LWS *group* is one
replica, ``size`` N pods, the leader (worker index 0) is rank 0 and the workers are ranks
1..N-1. The compiler (:mod:`shoal.kubernetes.compiler`) builds the pod templates; this module
holds what is specific to gangs:

* the rendezvous environment of torch.distributed's ``env://`` method, written in terms of the
  variables LWS prepends to every container (``$(LWS_LEADER_ADDRESS)`` and friends expand
  because LWS's variables come first);
* the LeaderWorkerSet object itself: ``RecreateGroupOnPodRestart`` (one dead rank recreates the
  whole group, as a dead rank replaces the whole gang locally), ``startupPolicy: LeaderCreated``
  (the leader cannot become ready before its workers exist: its constructor waits for them in
  the rendezvous), group-by-group rolling updates;
* the placement strategy within a group, in forms every Kubernetes version the output targets
  honours (see :func:`placement_affinity`);
* the NetworkPolicy between the ranks of one gang. Collectives (gloo, NCCL) open connections
  on ephemeral ports chosen at run time, so ranks of the same LWS may reach each other on any
  TCP port; nothing else gains access.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shoal.kubernetes import names

__all__ = [
    "LWS_KIND",
    "gang_env",
    "gang_network_policy",
    "leader_worker_set",
    "placement_affinity",
    "placement_annotations",
]

Obj = dict[str, Any]

LWS_KIND = "LeaderWorkerSet"
# On a LeaderWorkerSet: LWS's pod webhook gives every pod of a group a required pod affinity to its
# own group (a labelSelector on the group's leaderworkerset.sigs.k8s.io/group-key value, which only
# exists once the leader pod does) and an anti-affinity to every other group, in this topology;
# the workers are created once the leader is scheduled, with a node selector for its domain.
ANNOTATION_EXCLUSIVE_TOPOLOGY = "leaderworkerset.sigs.k8s.io/exclusive-topology"
HOSTNAME = "kubernetes.io/hostname"


def gang_env(gang: str) -> list[Obj]:
    """The rendezvous variables of every rank's container (``shoal replica --rank-from-env``)."""
    return [
        {"name": names.ENV_GANG, "value": gang},
        # torch.distributed's env:// rendezvous: rank 0 serves it on MASTER_PORT.
        {"name": "MASTER_ADDR", "value": f"$({names.ENV_LWS_LEADER_ADDRESS})"},
        {"name": "MASTER_PORT", "value": str(names.RENDEZVOUS_PORT)},
        {"name": "RANK", "value": f"$({names.ENV_LWS_WORKER_INDEX})"},
        {"name": "WORLD_SIZE", "value": f"$({names.ENV_LWS_GROUP_SIZE})"},
        # One rank per pod: each pod is its own "node" to torchrun-style code.
        {"name": "LOCAL_RANK", "value": "0"},
        {"name": "LOCAL_WORLD_SIZE", "value": "1"},
        {"name": "GROUP_RANK", "value": f"$({names.ENV_LWS_WORKER_INDEX})"},
    ]


def placement_affinity(strategy: str | None, selector: Mapping[str, str]) -> tuple[Obj | None, list[Obj]]:
    """Ray's ``placement_group_strategy`` within one group, in the pod templates: (pod
    ``affinity``, extra topology spread constraints). ``selector`` selects the deployment's pods.

    A group is told apart by LWS's group-key label, whose value is known only at run time, so the
    templates use ``matchLabelKeys``. In topology spread constraints it is beta and on by default
    since Kubernetes 1.27; in pod (anti-)affinity only since 1.31 (alpha, off, on 1.29/1.30: the
    API server drops the field there). So:

    * SPREAD / STRICT_SPREAD: one rank per node, as topology spread (ScheduleAnyway /
      DoNotSchedule) over the group's pods: with more nodes than ranks, a skew of 1 allows no node
      a second rank.
    * STRICT_PACK: nothing here; :func:`placement_annotations` asks LWS itself to place the group
      (its webhook writes the group's key value into the selector).
    * PACK: a preferred affinity to the group's pods; where ``matchLabelKeys`` is dropped it
      degrades to preferring nodes with pods of the same deployment (never another app's).
    * None leaves placement to the scheduler.
    """
    keys = [names.LWS_LABEL_GROUP_KEY]
    group_selector: Obj = {"matchLabels": dict(selector)}
    if strategy == "PACK":
        term: Obj = {"labelSelector": group_selector, "matchLabelKeys": keys, "topologyKey": HOSTNAME}
        return {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": term}]}}, []
    if strategy in ("SPREAD", "STRICT_SPREAD"):
        return None, [{
            "maxSkew": 1,
            "topologyKey": HOSTNAME,
            "whenUnsatisfiable": "DoNotSchedule" if strategy == "STRICT_SPREAD" else "ScheduleAnyway",
            "labelSelector": group_selector,
            "matchLabelKeys": keys,
        }]
    return None, []


def placement_annotations(strategy: str | None) -> dict[str, str]:
    """The LeaderWorkerSet's annotations for ``strategy``: STRICT_PACK puts a group on one node
    through LWS's exclusive placement, which also keeps other groups (of any LeaderWorkerSet that
    uses it) off that node: a node per group, as a gang of GPU ranks usually wants anyway."""
    if strategy == "STRICT_PACK":
        return {ANNOTATION_EXCLUSIVE_TOPOLOGY: HOSTNAME}
    return {}


def leader_worker_set(metadata: Obj, *, replicas: int | None, size: int, leader_template: Obj,
                      worker_template: Obj, max_surge: int | str = 1, max_unavailable: int | str = 0) -> Obj:
    """The LeaderWorkerSet of a gang deployment: ``replicas`` groups (None when an autoscaler
    owns the count) of ``size`` pods, rolled ``max_surge``/``max_unavailable`` groups at a time."""
    spec: Obj = {}
    if replicas is not None:
        spec["replicas"] = replicas
    spec.update({
        # The leader's constructor waits for every rank in the rendezvous, so it cannot be ready
        # before its workers exist: workers are created as soon as the leader pod is.
        "startupPolicy": "LeaderCreated",
        # Group by group: with a spare group (never fewer ready gangs than asked for), or for GPU
        # gangs one group down at a time (a full GPU pool has no room for a spare).
        "rolloutStrategy": {
            "type": "RollingUpdate",
            "rollingUpdateConfiguration": {"maxUnavailable": max_unavailable, "maxSurge": max_surge},
        },
        # One headless Service named after the LWS: "<pod>.<lws>.<namespace>" for every rank.
        "networkConfig": {"subdomainPolicy": "Shared"},
        "leaderWorkerTemplate": {
            "size": size,
            # A rank that dies (or restarts) takes its group with it: the others are stuck in
            # collectives with a peer that is gone, and only a fresh rendezvous recovers.
            "restartPolicy": "RecreateGroupOnPodRestart",
            "leaderTemplate": leader_template,
            "workerTemplate": worker_template,
        },
    })
    return {"apiVersion": names.LWS_API_VERSION, "kind": LWS_KIND, "metadata": metadata, "spec": spec}


def gang_network_policy(metadata: Obj, selector: Mapping[str, str], *, metrics_from: Sequence[Obj],
                        callees: Sequence[Mapping[str, str]]) -> Obj:
    """Every rank of a gang deployment: any TCP port to and from the ranks of the same deployment
    (rendezvous, RPC from rank 0, the collectives' ephemeral ports), the metrics scraper on the
    admin port, and the deployment's callees on the RPC port (each rank runs every request)."""
    def peers() -> list[Obj]:  # fresh each time: shared objects would become YAML aliases
        return [{"podSelector": {"matchLabels": dict(selector)}}]

    # No port number: every TCP port.
    egress: list[Obj] = [{"to": peers(), "ports": [{"protocol": "TCP"}]}]
    if callees:
        egress.append({"to": [{"podSelector": {"matchLabels": dict(c)}} for c in callees],
                       "ports": [{"protocol": "TCP", "port": names.RPC_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata,
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": peers(), "ports": [{"protocol": "TCP"}]},
                {"from": list(metrics_from), "ports": [{"protocol": "TCP", "port": names.ADMIN_PORT}]},
            ],
            "egress": egress,
        },
    }
