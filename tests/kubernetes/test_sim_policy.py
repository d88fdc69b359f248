"""The NetworkPolicy evaluator (shoal.kubernetes.sim.policy) against the API's semantics: isolation,
default allow and deny, each kind of peer, ports (numbers, ranges, names, protocols), both
directions needed, node traffic, and the errors malformed policies get."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.kubernetes import netpol
from shoal.kubernetes.sim.policy import (
    Endpoint,
    PolicyError,
    PolicySet,
    allowed,
    evaluate,
    named_ports,
    selector_matches,
)

Obj = dict[str, Any]

WEB = Endpoint(labels={"app": "web"}, namespace="shop", ip="10.0.1.5", ports={"http": 8080}, name="web")
DB = Endpoint(labels={"app": "db", "tier": "data"}, namespace="shop", ip="10.0.1.6",
              ports={"pg": 5432, "metrics": (9187, "TCP"), "stats": (9999, "UDP")}, name="db")
OTHER_WEB = Endpoint(labels={"app": "web"}, namespace="blog", ip="10.0.2.5", name="blog-web")
PROM = Endpoint(labels={"app": "prometheus"}, namespace="monitoring", ip="10.0.3.5",
                namespace_labels={"team": "ops"}, name="prom")
OUTSIDE = Endpoint(pod=False, ip="203.0.113.7")
NODE = Endpoint(node=True)


def pol(spec: Obj, ns: str = "shop", name: str = "p") -> Obj:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def sel(**labels: str) -> Obj:
    return {"matchLabels": labels}


DENY_INGRESS = pol({"podSelector": {}, "policyTypes": ["Ingress"]}, name="deny-in")
DENY_EGRESS = pol({"podSelector": {}, "policyTypes": ["Egress"]}, name="deny-out")


def test_no_policy_allows_everything() -> None:
    for src, dst in ((WEB, DB), (OTHER_WEB, DB), (OUTSIDE, DB), (DB, OUTSIDE), (PROM, WEB)):
        assert allowed([], src, dst, 5432)
    # Objects that are not NetworkPolicies are ignored.
    assert allowed([{"kind": "Service", "metadata": {"name": "s"}, "spec": {}}], WEB, DB, 1)


def test_default_deny_isolates_only_its_namespace_and_direction() -> None:
    assert not allowed([DENY_INGRESS], WEB, DB, 5432)
    assert not allowed([DENY_INGRESS], OUTSIDE, DB, 5432)
    assert allowed([DENY_INGRESS], DB, OTHER_WEB, 80)  # blog is not isolated
    assert allowed([DENY_INGRESS], DB, OUTSIDE, 443)  # egress is not isolated
    assert not allowed([DENY_EGRESS], WEB, DB, 5432)
    assert not allowed([DENY_EGRESS], WEB, OUTSIDE, 443)
    assert allowed([DENY_EGRESS], OTHER_WEB, DB, 5432)  # blog's egress is free, shop's ingress too


def test_policy_types_default_from_the_sections() -> None:
    only_ingress = pol({"podSelector": sel(app="db")})  # no policyTypes, no egress: Ingress only
    assert not allowed([only_ingress], WEB, DB, 5432)
    assert allowed([only_ingress], DB, WEB, 8080)
    with_egress = pol({"podSelector": sel(app="db"), "egress": []})  # an egress section: both, nothing allowed
    assert not allowed([with_egress], DB, WEB, 8080)
    assert not allowed([with_egress], WEB, DB, 5432)
    egress_only = pol({"podSelector": sel(app="db"), "policyTypes": ["Egress"], "ingress": [{}]})
    assert allowed([egress_only], WEB, DB, 5432)  # an ingress section it does not isolate for is inert
    assert PolicySet([with_egress]).policies[0].types == {"Ingress", "Egress"}


def test_empty_rules_match_every_peer_and_port() -> None:
    open_rule = pol({"podSelector": sel(app="db"), "ingress": [{}]})
    assert allowed([DENY_INGRESS, open_rule], OUTSIDE, DB, 1)
    empty_lists = pol({"podSelector": sel(app="db"), "ingress": [{"from": [], "ports": []}]})
    assert allowed([DENY_INGRESS, empty_lists], OTHER_WEB, DB, 65535)
    no_rules = pol({"podSelector": sel(app="db"), "ingress": []})
    assert not allowed([no_rules], WEB, DB, 5432)


def test_pod_selector_peers_are_in_the_policy_namespace() -> None:
    p = pol({"podSelector": sel(app="db"), "ingress": [{"from": [{"podSelector": sel(app="web")}]}]})
    assert allowed([p], WEB, DB, 5432)
    assert not allowed([p], OTHER_WEB, DB, 5432)  # same labels, other namespace
    assert not allowed([p], PROM, DB, 5432)
    assert not allowed([p], OUTSIDE, DB, 5432)  # selectors never match addresses outside the pods
    everyone_here = pol({"podSelector": sel(app="db"), "ingress": [{"from": [{"podSelector": {}}]}]})
    assert allowed([everyone_here], WEB, DB, 1) and not allowed([everyone_here], OTHER_WEB, DB, 1)


def test_namespace_selector_peers() -> None:
    by_label = pol({"podSelector": sel(app="db"), "ingress": [{"from": [{"namespaceSelector": sel(team="ops")}]}]})
    assert allowed([by_label], PROM, DB, 9187)
    assert not allowed([by_label], WEB, DB, 9187)
    by_name = pol({"podSelector": sel(app="db"), "ingress": [{"from": [
        {"namespaceSelector": sel(**{"kubernetes.io/metadata.name": "blog"})}]}]})
    assert allowed([by_name], OTHER_WEB, DB, 1) and not allowed([by_name], WEB, DB, 1)
    any_namespace = pol({"podSelector": sel(app="db"), "ingress": [{"from": [{"namespaceSelector": {}}]}]})
    assert all(allowed([any_namespace], s, DB, 1) for s in (WEB, OTHER_WEB, PROM))
    assert not allowed([any_namespace], OUTSIDE, DB, 1)


def test_both_selectors_in_one_peer_is_and_in_two_peers_is_or() -> None:
    one_peer = pol({"podSelector": sel(app="db"), "ingress": [{"from": [
        {"namespaceSelector": sel(team="ops"), "podSelector": sel(app="web")}]}]})
    two_peers = pol({"podSelector": sel(app="db"), "ingress": [{"from": [
        {"namespaceSelector": sel(team="ops")}, {"podSelector": sel(app="web")}]}]})
    ops_web = Endpoint(labels={"app": "web"}, namespace="monitoring", namespace_labels={"team": "ops"})
    assert allowed([one_peer], ops_web, DB, 1)
    assert not allowed([one_peer], PROM, DB, 1)  # ops namespace, wrong pod
    assert not allowed([one_peer], WEB, DB, 1)  # right pod, wrong namespace
    assert allowed([two_peers], PROM, DB, 1) and allowed([two_peers], WEB, DB, 1)
    assert not allowed([two_peers], OTHER_WEB, DB, 1)


def test_ip_blocks_with_except() -> None:
    egress = pol({"podSelector": sel(app="web"), "policyTypes": ["Egress"], "egress": [{"to": [
        {"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.0/30"]}},
        {"ipBlock": {"cidr": "10.0.1.0/24"}}]}]})
    assert allowed([egress], WEB, OUTSIDE, 443)
    assert not allowed([egress], WEB, Endpoint(pod=False, ip="203.0.113.3"), 443)  # in the except block
    assert not allowed([egress], WEB, Endpoint(pod=False, ip="198.51.100.1"), 443)
    assert allowed([egress], WEB, DB, 5432)  # a pod whose address is in a block
    assert not allowed([egress], WEB, OTHER_WEB, 80)
    assert not allowed([egress], WEB, Endpoint(pod=False, ip="2001:db8::1"), 443)  # other family
    ingress = pol({"podSelector": sel(app="db"), "ingress": [{"from": [{"ipBlock": {"cidr": "203.0.113.7/32"}}]}]})
    assert allowed([ingress], OUTSIDE, DB, 5432)
    assert not allowed([ingress], Endpoint(pod=False, ip="203.0.113.8"), DB, 5432)
    assert not allowed([ingress], Endpoint(pod=False), DB, 5432)  # no address known


def test_ports_numbers_ranges_protocols() -> None:
    p = pol({"podSelector": sel(app="db"), "ingress": [{"ports": [
        {"port": 5432}, {"protocol": "UDP", "port": 9999}, {"port": 7000, "endPort": 7002}]}]})
    assert allowed([p], WEB, DB, 5432)
    assert not allowed([p], WEB, DB, 5432, "UDP")  # protocol defaults to TCP and must match
    assert allowed([p], WEB, DB, 9999, "UDP") and not allowed([p], WEB, DB, 9999)
    assert [allowed([p], WEB, DB, n) for n in (6999, 7000, 7001, 7002, 7003)] == [False, True, True, True, False]
    any_udp = pol({"podSelector": sel(app="db"), "ingress": [{"ports": [{"protocol": "UDP"}]}]})
    assert allowed([any_udp], WEB, DB, 53, "UDP") and not allowed([any_udp], WEB, DB, 53)
    assert allowed([any_udp], WEB, DB, 1, "UDP") and allowed([any_udp], WEB, DB, 65535, "UDP")


def test_named_ports_are_the_destination_pods() -> None:
    ingress = pol({"podSelector": sel(app="db"), "ingress": [{"ports": [{"port": "pg"}, {"port": "metrics"}]}]})
    assert allowed([ingress], WEB, DB, 5432) and allowed([ingress], WEB, DB, 9187)
    assert not allowed([ingress], WEB, DB, 5433)
    udp_name = pol({"podSelector": sel(app="db"), "ingress": [{"ports": [{"port": "stats"}]}]})  # TCP by default
    assert not allowed([udp_name], WEB, DB, 9999, "UDP") and not allowed([udp_name], WEB, DB, 9999)
    udp_named = pol({"podSelector": sel(app="db"), "ingress": [{"ports": [{"protocol": "UDP", "port": "stats"}]}]})
    assert allowed([udp_named], WEB, DB, 9999, "UDP")
    # Egress: the name is looked up on the pod being called, not on the caller.
    egress = pol({"podSelector": sel(app="web"), "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "pg"}]}]})
    assert allowed([egress], WEB, DB, 5432)
    assert not allowed([egress], WEB, OTHER_WEB, 5432)  # blog-web has no port called pg
    assert not allowed([egress], WEB, OUTSIDE, 5432)  # nor has an outside address


def test_both_directions_must_allow() -> None:
    web_out = pol({"podSelector": sel(app="web"), "policyTypes": ["Egress"],
                   "egress": [{"to": [{"podSelector": sel(app="db")}], "ports": [{"port": 5432}]}]}, name="web-out")
    db_in = pol({"podSelector": sel(app="db"), "ingress": [{"from": [{"podSelector": sel(app="web")}]}]},
                name="db-in")
    assert allowed([web_out, db_in], WEB, DB, 5432)
    d = evaluate([web_out, db_in, DENY_INGRESS], WEB, DB, 5433)
    assert not d and d.reason.startswith("egress of pod shop/web (isolated by shop/web-out)"), d.reason
    d = evaluate([web_out, DENY_INGRESS], WEB, DB, 5432)  # egress fine, ingress not
    assert not d and d.reason.startswith("ingress of pod shop/db (isolated by shop/deny-in)"), d.reason
    d = evaluate([web_out, db_in], WEB, DB, 5432)
    assert d and "shop/web-out egress[0]" in d.reason and "shop/db-in ingress[0]" in d.reason, d.reason


def test_policies_add_up() -> None:
    http = pol({"podSelector": sel(app="web"), "ingress": [{"ports": [{"port": 8080}]}]}, name="http")
    https = pol({"podSelector": sel(app="web"), "ingress": [{"ports": [{"port": 8443}]}]}, name="https")
    assert allowed([http, https, DENY_INGRESS], DB, WEB, 8080)
    assert allowed([http, https, DENY_INGRESS], DB, WEB, 8443)
    assert not allowed([http, https, DENY_INGRESS], DB, WEB, 9090)


def test_node_traffic_is_always_allowed() -> None:
    deny_all = [DENY_INGRESS, DENY_EGRESS]
    assert allowed(deny_all, NODE, DB, 5432) and allowed(deny_all, DB, NODE, 10250)
    assert not allowed(deny_all, WEB, DB, 5432)
    only_ips = pol({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]})
    assert allowed([only_ips], NODE, DB, 1)


def test_selectors() -> None:
    labels = {"a": "1", "b": "2"}
    assert selector_matches({}, labels) and selector_matches(None, labels)
    assert selector_matches({"matchLabels": {"a": "1"}}, labels)
    assert not selector_matches({"matchLabels": {"a": "1", "c": "3"}}, labels)
    cases = [("In", ["1", "9"], "a", True), ("In", ["9"], "a", False), ("In", ["1"], "z", False),
             ("NotIn", ["2"], "b", False), ("NotIn", ["9"], "b", True), ("NotIn", ["1"], "z", True),
             ("Exists", None, "a", True), ("Exists", None, "z", False),
             ("DoesNotExist", None, "z", True), ("DoesNotExist", None, "a", False)]
    for op, values, key, want in cases:
        expr: Obj = {"key": key, "operator": op, **({"values": values} if values else {})}
        assert selector_matches({"matchExpressions": [expr]}, labels) is want, expr
    both = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "In", "values": ["3"]}]}
    assert not selector_matches(both, labels)  # every requirement must hold


@pytest.mark.parametrize(("spec", "message"), [
    ({"policyTypes": ["Ingress"]}, "spec.podSelector: required"),
    ({"podSelector": {}, "policyTypes": ["ingress"]}, "spec.policyTypes[0]: 'ingress' is not Ingress or Egress"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["1"]}]}},
     "spec.podSelector.matchExpressions[0].operator: 'Equals'"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "matchExpressions[0].values: In needs at least one value"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["1"]}]}},
     "matchExpressions[0].values: Exists takes no values"),
    ({"podSelector": {}, "ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]: a peer needs"),
    ({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0]: ipBlock cannot be combined"),
    ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
     "spec.egress[0].to[0].ipBlock.except[0]: 11.0.0.0/16 is outside the cidr 10.0.0.0/8"),
    ({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.1"}}]}]},
     "spec.egress[0].to[0].ipBlock.cidr: '10.0.0.1' is not a CIDR"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort: needs a numeric port"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 90, "endPort": 80}]}]},
     "spec.ingress[0].ports[0].endPort: 80 must be a number from port (90)"),
    ({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP"}]}]},
     "spec.ingress[0].ports[0].protocol: 'ICMP' is not one of TCP, UDP, SCTP"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": "8080"}]}]}, "spec.ingress[0].ports[0].port: '8080'"),
    ({"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}, "port: 70000 is outside 1-65535"),
    ({"podSelector": {}, "ingress": [{"to": []}]}, "spec.ingress[0]: unknown field(s) to"),
    ({"podSelector": {}, "ingres": []}, "spec: unknown field(s) ingres"),
])
def test_malformed_policies_name_the_field(spec: Obj, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        PolicySet([pol(spec, name="bad")])
    assert str(e.value).startswith("NetworkPolicy shop/bad: ") and message in str(e.value), str(e.value)


def test_named_ports_of_containers_and_the_compat_module() -> None:
    containers: list[Obj] = [{"ports": [{"name": "rpc", "containerPort": 9000}, {"containerPort": 1}]},
                  {"ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]
    assert named_ports(containers) == {"rpc": (9000, "TCP"), "dns": (53, "UDP")}
    assert netpol.allowed is allowed and netpol.Endpoint is Endpoint  # the compiler tests' names
    with pytest.raises(PolicyError, match="protocol 'HTTP'"):
        PolicySet().decide(WEB, DB, 80, "HTTP")
