"""A pod simulation: run generated Kubernetes objects as local processes, for tests.

:class:`PodSim` takes the objects ``shoal k8s build`` writes (a list of dicts) and plays the
parts of the cluster that matter to shoal's pods, on this machine:

* **kubelet**: each pod of a ``Deployment`` runs its container's ``command``/``args`` with its
  ``env`` as a local process (``shoal`` maps to the current environment's executable). The
  downward API is filled in (namespace, pod name, pod IP, labels), ``secretKeyRef`` from the
  objects' Secrets or a generated test secret (an ``optional`` key of a Secret that lacks it
  leaves the variable out; ``tls.crt``/``tls.key``/``ca.crt`` of an unknown Secret are a test CA
  and pod certificate, see ``PodSim.client_tls``), and volumes become per-pod directories
  (``configMap``/``secret`` data written into them, ``emptyDir`` empty); paths under a mount
  in env values and args are rewritten to those directories. Every pod gets its own loopback
  address (127.x.y.z; Linux routes all of 127/8 to lo), so every pod listens on the very
  ports the objects declare. Probes (``httpGet``, ``tcpSocket``, ``exec``, ``grpc``) run every
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
  environment, whole-group recreation, scaling by groups (:mod:`shoal.kubernetes.sim.lws`).
* **NetworkPolicies**, enforced: every connection to a pod's declared TCP ports (directly or
  through a ClusterIP Service) is checked against the objects' NetworkPolicies, with the source
  pod found by who holds the client socket; a denied one is reset (or dropped) and counted in
  ``sim.firewall.denied`` (:mod:`shoal.kubernetes.sim.firewall`, the evaluator
  :mod:`shoal.kubernetes.sim.policy`). The containers then listen on a private second address.

Every process the simulation starts is tracked by PID and stopped by :meth:`PodSim.close`
(and, on Linux, killed if the simulating process dies). Use it as a context manager or from
a fixture with a finalizer.

The package's parts: :mod:`~shoal.kubernetes.sim.objects` (pods, ReplicaSets, what every part
shares), :mod:`~shoal.kubernetes.sim.core` (:class:`PodSim`: objects, the Deployment controller,
what tests use), :mod:`~shoal.kubernetes.sim.kubelet`, :mod:`~shoal.kubernetes.sim.network`
(endpoints, DNS, the ClusterIP front), :mod:`~shoal.kubernetes.sim.lws`,
:mod:`~shoal.kubernetes.sim.policy` (NetworkPolicy semantics, pure) and
:mod:`~shoal.kubernetes.sim.firewall` (their enforcement).
"""

from __future__ import annotations

from shoal.exceptions import SimError
from shoal.kubernetes.sim.core import PodSim
from shoal.kubernetes.sim.lws import LeaderWorkerSets
from shoal.kubernetes.sim.objects import Obj, Pod, template_hash

__all__ = ["LeaderWorkerSets", "Obj", "Pod", "PodSim", "SimError", "template_hash"]
