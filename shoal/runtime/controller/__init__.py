"""The controller of a local instance, made of parts with one job each (see ``core.py`` for
how they are composed). The names other modules import live here."""

from __future__ import annotations

from shoal.exceptions import DeployError
from shoal.runtime.controller.canary import CANARY_SUFFIX, AppKey, Track
from shoal.runtime.controller.clock import Clock
from shoal.runtime.controller.core import Controller
from shoal.runtime.controller.records import (
    ADOPT_WAIT_S,
    MAX_HEALTH_FAILURES,
    MAX_PROXY_RESTARTS,
    MAX_START_FAILURES,
    TICK_S,
    AppRecord,
    DeploymentRecord,
    ProxyRecord,
    ReplicaRecord,
    RequestTotals,
    Settings,
    SpareRecord,
    fingerprint,
)

__all__ = [
    "ADOPT_WAIT_S",
    "CANARY_SUFFIX",
    "MAX_HEALTH_FAILURES",
    "MAX_PROXY_RESTARTS",
    "MAX_START_FAILURES",
    "TICK_S",
    "AppKey",
    "AppRecord",
    "Clock",
    "Controller",
    "DeployError",
    "DeploymentRecord",
    "ProxyRecord",
    "ReplicaRecord",
    "RequestTotals",
    "Settings",
    "SpareRecord",
    "Track",
    "fingerprint",
]
