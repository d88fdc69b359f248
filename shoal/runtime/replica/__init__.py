"""A replica: one instance of one deployment.

* :mod:`~shoal.runtime.replica.core` -- :class:`ReplicaCore`, what every runtime shares: the
  user callable, its slots, the bookkeeping of every request, gang fan-out, health, drain;
* :mod:`~shoal.runtime.replica.slots`, :mod:`~shoal.runtime.replica.accounting`,
  :mod:`~shoal.runtime.replica.rpc_http` -- its parts;
* :mod:`~shoal.runtime.replica.ports` -- what a runtime gives the core (transport, control channel);
* :mod:`~shoal.runtime.replica.process` -- the local replica process the controller starts
  (``python -m shoal.runtime.replica``, with a :mod:`~shoal.runtime.replica.bootstrap` on its
  stdin); a Kubernetes pod composes the core in :mod:`shoal.kubernetes.pod`.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

# Imported on first use, not with the package: the controller imports ``bootstrap`` from here
# to start replicas, and must not pay for the replica runtime (core, uvicorn, ...) to do so.
_EXPORTS = {
    "ORPHAN_TIMEOUT_S": "shoal.runtime.lifeline",
    "die_with_parent": "shoal.runtime.lifeline",
    "RequestCounters": "shoal.runtime.replica.accounting",
    "ReplicaCore": "shoal.runtime.replica.core",
    "apply_logging_config": "shoal.runtime.replica.logconfig",
    "Bootstrap": "shoal.runtime.replica.bootstrap",
    "ReplicaProcess": "shoal.runtime.replica.process",
    "main": "shoal.runtime.replica.process",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)
