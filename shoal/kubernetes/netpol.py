"""A small evaluator of Kubernetes NetworkPolicies: may this pod open that connection?

It follows the semantics of ``networking.k8s.io/v1``: a pod selected by a policy of a type
(Ingress or Egress) is isolated in that direction, and then only what some selecting
policy's rules allow gets through; policies add up, they never subtract. A connection needs
both the source's egress and the destination's ingress to allow it. Used by the tests (and
usable by the pod simulation) to prove the generated policies admit exactly the call graph.

Traffic between a pod and its own node (kubelet probes, hostNetwork pods there) is always
allowed, whatever the policies say, as the NetworkPolicy API specifies: an :class:`Endpoint`
with ``node=True`` stands for that node. Not modelled: ``ipBlock`` ``except`` lists beyond a
plain containment test, and what a policy does to traffic that was NATed on the way (a
load balancer that keeps or replaces the client address depends on the Service's
``externalTrafficPolicy`` and the plugin).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Endpoint", "allowed", "selector_matches"]

Obj = dict[str, Any]


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection: a pod (labels, namespace), with ``pod=False`` an outside address, with
    ``node=True`` the node the other side runs on."""

    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "default"
    namespace_labels: Mapping[str, str] | None = None
    ip: str | None = None
    # Named container ports of the pod (for policies that name ports).
    ports: Mapping[str, int] = field(default_factory=dict)
    pod: bool = True
    # The node the other side runs on (the kubelet probing it): never subject to NetworkPolicy.
    node: bool = False

    def ns_labels(self) -> Mapping[str, str]:
        labels = dict(self.namespace_labels or {})
        labels.setdefault("kubernetes.io/metadata.name", self.namespace)
        return labels


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels; ``{}`` matches everything."""
    if selector is None:
        return True
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _policy_types(spec: Mapping[str, Any]) -> list[str]:
    if spec.get("policyTypes"):
        return list(spec["policyTypes"])
    return ["Ingress", "Egress"] if "egress" in spec else ["Ingress"]


def _peer_matches(peer: Mapping[str, Any], other: Endpoint, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        if other.ip is None:
            return False
        addr = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        if addr not in ipaddress.ip_network(block["cidr"], strict=False):
            return False
        return not any(addr in ipaddress.ip_network(c, strict=False) for c in block.get("except") or [])
    if not other.pod:
        return False
    ns_sel = peer.get("namespaceSelector")
    pod_sel = peer.get("podSelector")
    if ns_sel is None:
        # podSelector alone: pods of the policy's own namespace.
        return other.namespace == policy_ns and selector_matches(pod_sel, other.labels)
    if not selector_matches(ns_sel, other.ns_labels()):
        return False
    return selector_matches(pod_sel, other.labels)


def _port_matches(rule_ports: Iterable[Mapping[str, Any]] | None, port: int, protocol: str,
                  named: Mapping[str, int]) -> bool:
    ports = list(rule_ports or [])
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = named.get(want)
            if want is None:
                continue
        end = p.get("endPort", want)
        if want <= port <= end:
            return True
    return False


def _direction_allows(policies: Iterable[Obj], subject: Endpoint, peer: Endpoint, port: int, protocol: str,
                      direction: str, named_ports: Mapping[str, int]) -> bool:
    selecting = [
        p for p in policies
        if p.get("kind") == "NetworkPolicy"
        and p["metadata"].get("namespace", "default") == subject.namespace
        and selector_matches(p["spec"].get("podSelector") or {}, subject.labels)
        and direction in _policy_types(p["spec"])
    ]
    if not selecting:
        return True  # not isolated in this direction
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for policy in selecting:
        ns = policy["metadata"].get("namespace", "default")
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(pr, peer, ns) for pr in peers):
                continue
            if _port_matches(rule.get("ports"), port, protocol, named_ports):
                return True
    return False


def allowed(policies: Iterable[Obj], src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> bool:
    """Whether ``src`` may connect to ``dst`` on ``port`` under ``policies`` (other objects are ignored)."""
    if src.node or dst.node:
        return True  # "traffic to and from the node where a Pod is running is always allowed"
    pols = [p for p in policies if p.get("kind") == "NetworkPolicy"]
    if src.pod and not _direction_allows(pols, src, dst, port, protocol, "Egress", dst.ports):
        return False
    return not dst.pod or _direction_allows(pols, dst, src, port, protocol, "Ingress", dst.ports)
