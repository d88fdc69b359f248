"""Kubernetes NetworkPolicy semantics (``networking.k8s.io/v1``) as a pure function: may this
source open that connection?

The rules, from the NetworkPolicy API reference:

* A pod is **isolated for ingress** when some policy of its namespace selects it
  (``spec.podSelector``; ``{}`` selects every pod of the namespace) and has ``Ingress`` among
  its ``policyTypes``; likewise for egress. Without ``policyTypes``, every policy affects
  ingress and those with an ``egress`` section affect egress too. A pod no policy isolates in a
  direction allows everything in that direction.
* An isolated pod allows what **any** rule of **any** policy selecting it allows: policies add
  up, they never subtract. A policy with no rules for a direction it isolates allows nothing.
* A rule matches when the traffic matches one of its peers (``from``/``to``; empty or missing:
  every peer) **and** one of its ports (``ports``; empty or missing: every port).
* A peer is ``podSelector`` alone (pods of the policy's own namespace), ``namespaceSelector``
  alone (every pod of the selected namespaces; ``{}`` = every namespace), both in one peer (the
  selected pods *in* the selected namespaces), or ``ipBlock`` alone (``cidr`` less the
  ``except`` blocks, which must lie inside it). Namespaces always carry the label
  ``kubernetes.io/metadata.name``.
* A port is ``protocol`` (default TCP) plus ``port``: a number, a number range up to ``endPort``
  (inclusive; numbers only), a container port *name* of the destination pod, or absent (every
  port of that protocol).
* A connection needs **both** the source's egress and the destination's ingress to allow it.
  Traffic between a pod and its own node (kubelet probes) is always allowed.

Policies are parsed and checked once (:class:`PolicySet`); a malformed one raises
:class:`PolicyError` naming the policy and the field. :func:`allowed` and :func:`evaluate` take
plain objects (anything that is not a ``NetworkPolicy`` is ignored). Used by the compiler's tests
(through :mod:`shoal.kubernetes.netpol`) and enforced by the pod simulation
(:mod:`shoal.kubernetes.sim.firewall`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Decision", "Endpoint", "LabelSelector", "Policy", "PolicyError", "PolicySet", "allowed",
           "evaluate", "selector_matches"]

Obj = dict[str, Any]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS = ("TCP", "UDP", "SCTP")
DIRECTIONS = ("Ingress", "Egress")
NS_NAME_LABEL = "kubernetes.io/metadata.name"
_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# IANA_SVC_NAME: what a container port's name (and so a named policy port) may be.
_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


class PolicyError(ValueError):
    """A NetworkPolicy the API server would reject (or that cannot be evaluated); names the field."""


@dataclass(frozen=True)
class Endpoint:
    """One side of a connection.

    A pod: its ``labels``, ``namespace`` (with ``namespace_labels``; the name label is implied),
    ``ip`` and named container ``ports`` (``{"rpc": 9000}``, or ``{"dns": (53, "UDP")}``). With
    ``pod=False`` an address outside the cluster's pods (only ``ip`` matters); with ``node=True``
    the node the other side runs on. ``name`` is only for messages.
    """

    labels: Mapping[str, str] = field(default_factory=dict)
    namespace: str = "default"
    namespace_labels: Mapping[str, str] | None = None
    ip: str | None = None
    ports: Mapping[str, int | tuple[int, str]] = field(default_factory=dict)
    pod: bool = True
    node: bool = False
    name: str = ""

    def ns_labels(self) -> Mapping[str, str]:
        labels = dict(self.namespace_labels or {})
        labels.setdefault(NS_NAME_LABEL, self.namespace)
        return labels

    def named_port(self, name: str, protocol: str) -> int | None:
        """The number of the container port called ``name`` with that protocol, if the pod has one."""
        found = self.ports.get(name)
        if found is None:
            return None
        number, proto = (found, "TCP") if isinstance(found, int) else found
        return int(number) if proto == protocol else None

    def describe(self) -> str:
        if self.node:
            return "the node"
        if not self.pod:
            return f"address {self.ip}"
        return f"pod {self.namespace}/{self.name or dict(self.labels)}"


@dataclass(frozen=True)
class Decision:
    """A verdict and why (the rule that allowed it, or the direction that denied it)."""

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed


# --- parsing ------------------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise PolicyError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise PolicyError(f"{where}: expected a list, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class LabelSelector:
    """A parsed ``LabelSelector``; the empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[tuple[str, str, frozenset[str]], ...] = ()

    @classmethod
    def parse(cls, obj: Any, where: str) -> LabelSelector:
        sel = _mapping(obj, where)
        unknown = set(sel) - {"matchLabels", "matchExpressions"}
        if unknown:
            raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        labels = _mapping(sel.get("matchLabels"), f"{where}.matchLabels")
        for k, v in labels.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise PolicyError(f"{where}.matchLabels: {k!r}: {v!r}: keys and values must be strings")
        exprs = []
        for i, e in enumerate(_list(sel.get("matchExpressions"), f"{where}.matchExpressions")):
            at = f"{where}.matchExpressions[{i}]"
            e = _mapping(e, at)
            key, op, values = e.get("key"), e.get("operator"), _list(e.get("values"), f"{at}.values")
            if not isinstance(key, str) or not key:
                raise PolicyError(f"{at}.key: required")
            if op not in _OPERATORS:
                raise PolicyError(f"{at}.operator: {op!r} is not one of {', '.join(_OPERATORS)}")
            if op in ("In", "NotIn") and not values:
                raise PolicyError(f"{at}.values: {op} needs at least one value")
            if op in ("Exists", "DoesNotExist") and values:
                raise PolicyError(f"{at}.values: {op} takes no values")
            exprs.append((key, str(op), frozenset(str(v) for v in values)))
        return cls(tuple(sorted(labels.items())), tuple(exprs))

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        for key, op, values in self.expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True


@dataclass(frozen=True)
class Peer:
    """One entry of a rule's ``from``/``to``."""

    pods: LabelSelector | None = None
    namespaces: LabelSelector | None = None
    cidr: IPNetwork | None = None
    excepts: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, obj: Any, where: str) -> Peer:
        peer = _mapping(obj, where)
        unknown = set(peer) - {"podSelector", "namespaceSelector", "ipBlock"}
        if unknown:
            raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if "ipBlock" in peer:
            if len(peer) > 1:
                raise PolicyError(f"{where}: ipBlock cannot be combined with podSelector or namespaceSelector")
            block = _mapping(peer["ipBlock"], f"{where}.ipBlock")
            cidr = _network(block.get("cidr"), f"{where}.ipBlock.cidr")
            excepts = []
            for i, text in enumerate(_list(block.get("except"), f"{where}.ipBlock.except")):
                net = _network(text, f"{where}.ipBlock.except[{i}]")
                if net.version != cidr.version or not net.subnet_of(cidr):  # type: ignore[arg-type]
                    raise PolicyError(f"{where}.ipBlock.except[{i}]: {text} is outside the cidr {cidr}")
                excepts.append(net)
            return cls(cidr=cidr, excepts=tuple(excepts))
        if not peer:
            raise PolicyError(f"{where}: a peer needs podSelector, namespaceSelector or ipBlock")
        pods = LabelSelector.parse(peer["podSelector"], f"{where}.podSelector") if "podSelector" in peer else None
        nss = (LabelSelector.parse(peer["namespaceSelector"], f"{where}.namespaceSelector")
               if "namespaceSelector" in peer else None)
        return cls(pods=pods, namespaces=nss)

    def matches(self, other: Endpoint, policy_namespace: str) -> bool:
        if self.cidr is not None:
            if other.ip is None or other.node:
                return False
            try:
                addr = ipaddress.ip_address(other.ip)
            except ValueError:
                return False
            if addr.version != self.cidr.version or addr not in self.cidr:
                return False
            return not any(addr in net for net in self.excepts)
        if not other.pod or other.node:
            return False
        if self.namespaces is None:
            in_namespace = other.namespace == policy_namespace
        else:
            in_namespace = self.namespaces.matches(other.ns_labels())
        return in_namespace and (self.pods is None or self.pods.matches(other.labels))


def _network(text: Any, where: str) -> IPNetwork:
    if not isinstance(text, str) or not text:
        raise PolicyError(f"{where}: required (a CIDR such as 10.0.0.0/8)")
    if "/" not in text:
        raise PolicyError(f"{where}: {text!r} is not a CIDR (it needs a /prefix length)")
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise PolicyError(f"{where}: {text!r} is not a CIDR ({e})") from None


@dataclass(frozen=True)
class PortRule:
    """One entry of a rule's ``ports``."""

    protocol: str = "TCP"
    port: int | str | None = None
    end_port: int | None = None

    @classmethod
    def parse(cls, obj: Any, where: str) -> PortRule:
        p = _mapping(obj, where)
        unknown = set(p) - {"protocol", "port", "endPort"}
        if unknown:
            raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        protocol = p.get("protocol", "TCP")
        if protocol not in PROTOCOLS:
            raise PolicyError(f"{where}.protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        port = p.get("port")
        end = p.get("endPort")
        if isinstance(port, bool) or (port is not None and not isinstance(port, int | str)):
            raise PolicyError(f"{where}.port: {port!r} is neither a number nor a port name")
        if isinstance(port, int) and not 1 <= port <= 65535:
            raise PolicyError(f"{where}.port: {port} is outside 1-65535")
        if isinstance(port, str) and not _PORT_NAME.match(port):
            raise PolicyError(f"{where}.port: {port!r} is not a port name (lowercase letters, digits and '-', "
                              "at most 15, with a letter; numbers are written without quotes)")
        if end is not None:
            if not isinstance(port, int):
                raise PolicyError(f"{where}.endPort: needs a numeric port (not a name, not absent)")
            if isinstance(end, bool) or not isinstance(end, int) or not port <= end <= 65535:
                raise PolicyError(f"{where}.endPort: {end!r} must be a number from port ({port}) to 65535")
        return cls(str(protocol), port, end)

    def matches(self, port: int, protocol: str, dst: Endpoint) -> bool:
        if protocol != self.protocol:
            return False
        if self.port is None:
            return True
        if isinstance(self.port, str):
            return dst.pod and not dst.node and dst.named_port(self.port, protocol) == port
        return self.port <= port <= (self.end_port if self.end_port is not None else self.port)


@dataclass(frozen=True)
class Rule:
    """An ingress or egress rule: ``peers`` None = every peer, ``ports`` empty = every port."""

    peers: tuple[Peer, ...] | None
    ports: tuple[PortRule, ...]

    def matches(self, peer: Endpoint, policy_namespace: str, port: int, protocol: str, dst: Endpoint) -> bool:
        if self.peers is not None and not any(p.matches(peer, policy_namespace) for p in self.peers):
            return False
        return not self.ports or any(p.matches(port, protocol, dst) for p in self.ports)


@dataclass(frozen=True)
class Policy:
    """A parsed NetworkPolicy."""

    name: str
    namespace: str
    selector: LabelSelector
    types: frozenset[str]
    ingress: tuple[Rule, ...]
    egress: tuple[Rule, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, obj: Mapping[str, Any], default_namespace: str = "default") -> Policy:
        meta = _mapping(obj.get("metadata"), "NetworkPolicy metadata")
        name = str(meta.get("name") or "?")
        namespace = str(meta.get("namespace") or default_namespace)
        where = f"NetworkPolicy {namespace}/{name}: spec"
        spec = _mapping(obj.get("spec"), where)
        unknown = set(spec) - {"podSelector", "policyTypes", "ingress", "egress"}
        if unknown:
            raise PolicyError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        if "podSelector" not in spec:
            raise PolicyError(f"{where}.podSelector: required ({{}} selects every pod of the namespace)")
        selector = LabelSelector.parse(spec["podSelector"], f"{where}.podSelector")
        types_given = _list(spec.get("policyTypes"), f"{where}.policyTypes")
        for i, t in enumerate(types_given):
            if t not in DIRECTIONS:
                raise PolicyError(f"{where}.policyTypes[{i}]: {t!r} is not Ingress or Egress")
        if types_given:
            types = frozenset(str(t) for t in types_given)
        else:  # the API's default: Ingress always, Egress when there is an egress section
            types = frozenset(("Ingress", "Egress") if "egress" in spec else ("Ingress",))
        rules: dict[str, tuple[Rule, ...]] = {}
        for key, peers_key in (("ingress", "from"), ("egress", "to")):
            parsed = []
            for i, r in enumerate(_list(spec.get(key), f"{where}.{key}")):
                at = f"{where}.{key}[{i}]"
                r = _mapping(r, at)
                extra = set(r) - {peers_key, "ports"}
                if extra:
                    raise PolicyError(f"{at}: unknown field(s) {', '.join(sorted(extra))} "
                                      f"({key} rules have {peers_key!r} and 'ports')")
                peers_obj = _list(r.get(peers_key), f"{at}.{peers_key}")
                peers = tuple(Peer.parse(p, f"{at}.{peers_key}[{j}]") for j, p in enumerate(peers_obj)) or None
                ports = tuple(PortRule.parse(p, f"{at}.ports[{j}]")
                              for j, p in enumerate(_list(r.get("ports"), f"{at}.ports")))
                parsed.append(Rule(peers, ports))
            rules[key] = tuple(parsed)
        return cls(name, namespace, selector, types, rules["ingress"], rules["egress"])

    def selects(self, ep: Endpoint) -> bool:
        return ep.pod and not ep.node and ep.namespace == self.namespace and self.selector.matches(ep.labels)


# --- evaluation ---------------------------------------------------------------------------------


class PolicySet:
    """Parsed NetworkPolicies (checked once), answering :meth:`decide` for any connection."""

    def __init__(self, objects: Iterable[Mapping[str, Any] | Policy] = (), *, default_namespace: str = "default"
                 ) -> None:
        self.policies: list[Policy] = [
            o if isinstance(o, Policy) else Policy.parse(o, default_namespace)
            for o in objects if isinstance(o, Policy) or o.get("kind") == "NetworkPolicy"]

    def __len__(self) -> int:
        return len(self.policies)

    def isolating(self, ep: Endpoint, direction: str) -> list[Policy]:
        """The policies that isolate ``ep`` in ``direction`` ("Ingress" or "Egress")."""
        return [p for p in self.policies if direction in p.types and p.selects(ep)]

    def _direction(self, subject: Endpoint, peer: Endpoint, dst: Endpoint, port: int, protocol: str,
                   direction: str) -> Decision:
        selecting = self.isolating(subject, direction)
        if not selecting:
            return Decision(True, f"{subject.describe()} is not isolated for {direction.lower()}")
        key = direction.lower()
        for policy in selecting:
            for i, rule in enumerate(policy.ingress if direction == "Ingress" else policy.egress):
                if rule.matches(peer, policy.namespace, port, protocol, dst):
                    return Decision(True, f"{policy.key} {key}[{i}]")
        names = ", ".join(p.key for p in selecting)
        return Decision(False, f"{direction.lower()} of {subject.describe()} (isolated by {names}): "
                               f"no rule admits {peer.describe()} on {port}/{protocol}")

    def decide(self, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP") -> Decision:
        """May ``src`` open a connection to ``dst`` on ``port``/``protocol``? Both the source's egress
        and the destination's ingress must allow it; node traffic always passes."""
        if protocol not in PROTOCOLS:
            raise PolicyError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if src.node or dst.node:
            return Decision(True, "traffic between a pod and its node is always allowed")
        egress = self._direction(src, dst, dst, port, protocol, "Egress") if src.pod else None
        if egress is not None and not egress.allowed:
            return egress
        ingress = self._direction(dst, src, dst, port, protocol, "Ingress") if dst.pod else None
        if ingress is not None and not ingress.allowed:
            return ingress
        reasons = [d.reason for d in (egress, ingress) if d is not None]
        return Decision(True, "; ".join(reasons) or "neither side is a pod")


def evaluate(objects: Iterable[Mapping[str, Any]], src: Endpoint, dst: Endpoint, port: int,
             protocol: str = "TCP") -> Decision:
    """:meth:`PolicySet.decide` over plain objects (anything but NetworkPolicies is ignored)."""
    return PolicySet(objects).decide(src, dst, port, protocol)


def allowed(objects: Iterable[Mapping[str, Any]], src: Endpoint, dst: Endpoint, port: int,
            protocol: str = "TCP") -> bool:
    """Whether ``src`` may connect to ``dst`` on ``port`` under the NetworkPolicies among ``objects``."""
    return evaluate(objects, src, dst, port, protocol).allowed


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels; ``{}`` or None match everything."""
    return LabelSelector.parse(selector, "selector").matches(labels)


def named_ports(containers: Sequence[Mapping[str, Any]]) -> dict[str, int | tuple[int, str]]:
    """The named container ports of a pod spec's containers, as :attr:`Endpoint.ports` wants them."""
    out: dict[str, int | tuple[int, str]] = {}
    for c in containers:
        for p in c.get("ports") or ():
            if p.get("name"):
                out[str(p["name"])] = (int(p["containerPort"]), str(p.get("protocol", "TCP")))
    return out
