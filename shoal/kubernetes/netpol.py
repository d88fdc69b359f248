"""The NetworkPolicy evaluator the compiler's tests use: may this pod open that connection?

The evaluator itself is :mod:`shoal.kubernetes.sim.policy` (the pod simulation enforces the
same semantics on real connections); this module keeps the names the tests import. It follows
``networking.k8s.io/v1``: a pod selected by a policy of a type (Ingress or Egress) is isolated
in that direction, and then only what some selecting policy's rules allow gets through;
policies add up, they never subtract. A connection needs both the source's egress and the
destination's ingress to allow it. Traffic between a pod and its own node (kubelet probes) is
always allowed (an :class:`Endpoint` with ``node=True``).

Not modelled: what a policy does to traffic that was NATed on the way (a load balancer that keeps
or replaces the client address depends on the Service's ``externalTrafficPolicy`` and the plugin).
"""

from __future__ import annotations

from shoal.kubernetes.sim.policy import Decision, Endpoint, PolicyError, PolicySet, allowed, evaluate, selector_matches

__all__ = ["Decision", "Endpoint", "PolicyError", "PolicySet", "allowed", "evaluate", "selector_matches"]
