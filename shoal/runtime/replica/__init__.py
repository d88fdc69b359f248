"""A replica: one instance of one deployment.

* :mod:`~shoal.runtime.replica.core` -- :class:`ReplicaCore`, what every runtime shares: the
  user callable, its slots, the bookkeeping of every request, gang fan-out, health, drain;
* :mod:`~shoal.runtime.replica.slots`, :mod:`~shoal.runtime.replica.accounting`,
  :mod:`~shoal.runtime.replica.rpc_http` -- its parts;
* :mod:`~shoal.runtime.replica.ports` -- what a runtime gives the core (transport, control channel);
* :mod:`~shoal.runtime.replica.process` -- the local replica process the controller starts
  (``python -m shoal.runtime.replica``); a Kubernetes pod composes the core in
  :mod:`shoal.kubernetes.pod`.
"""

from __future__ import annotations

from shoal.runtime.lifeline import ORPHAN_TIMEOUT_S, die_with_parent
from shoal.runtime.replica.accounting import RequestCounters
from shoal.runtime.replica.core import ReplicaCore
from shoal.runtime.replica.logconfig import apply_logging_config
from shoal.runtime.replica.process import Bootstrap, ReplicaProcess, main

__all__ = [
    "ORPHAN_TIMEOUT_S",
    "Bootstrap",
    "ReplicaCore",
    "ReplicaProcess",
    "RequestCounters",
    "apply_logging_config",
    "die_with_parent",
    "main",
]
