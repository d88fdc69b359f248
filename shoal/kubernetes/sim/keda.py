"""KEDA and the HPA, as the simulation plays them: every ScaledObject with a ``metrics-api``
trigger is read every polling interval and its target scaled the way KEDA and the HPA would.

The pure part, :func:`keda_replicas`, is one poll's decision (spec facts from the KEDA and
Kubernetes documentation): the HPA's desired count for an ``AverageValue`` external metric is
``ceil(value / target)``, left alone while ``value / (target * current)`` is within the HPA's
10 % tolerance of 1, and bounded by ``[max(minReplicaCount, 1), maxReplicaCount]``; KEDA itself
activates a deployment at zero when the value exceeds ``activationTargetValue`` and takes it back
to zero once it has been inactive for ``cooldownPeriod``; after ``fallback.failureThreshold``
failed reads in a row it sets ``fallback.replicas``. :class:`KedaStandIn` is the thread that
polls (the URL's Service host is resolved the simulation's way: its virtual IP) and scales the
simulated workload without waiting for pods. Started by tests (:meth:`KedaStandIn.start`), stopped
by :meth:`PodSim.close`.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from shoal.kubernetes.sim.objects import Obj, SimHost

__all__ = ["HPA_TOLERANCE", "KedaStandIn", "ScaledState", "keda_replicas"]

logger = logging.getLogger("shoal.sim")

HPA_TOLERANCE = 0.1  # the HPA's default --horizontal-pod-autoscaler-tolerance


@dataclass
class ScaledState:
    """What the stand-in remembers of one ScaledObject between polls."""

    name: str
    target: str  # the scaled workload (Deployment or LeaderWorkerSet name)
    url: str
    value_location: str
    target_value: float
    activation: float
    min_replicas: int
    max_replicas: int
    polling_s: float
    cooldown_s: float
    fallback: tuple[int, int] | None  # (failureThreshold, replicas)
    failures: int = 0
    last_active: float | None = None
    next_poll: float = 0.0
    last_value: float | None = None
    last_error: str | None = None
    events: list[tuple[float, int, int, str]] = field(default_factory=list)


def keda_replicas(st: ScaledState, current: int, value: float | None, now: float) -> tuple[int, str]:
    """One poll's replica count for a target running ``current`` replicas; ``value`` None: the
    read failed (``st.failures`` already counts it). Returns (replicas, why)."""
    if value is None:
        if st.fallback is not None and st.failures >= st.fallback[0]:
            return st.fallback[1], "fallback"
        return current, "read failed"
    active = value > st.activation
    if active:
        st.last_active = now
    floor = max(st.min_replicas, 1)
    if current == 0:
        if active or st.min_replicas > 0:
            return min(st.max_replicas, max(floor, _hpa(value, st.target_value, floor))), "activated"
        return 0, "inactive"
    cooled = st.last_active is None or now - st.last_active >= st.cooldown_s
    if not active and st.min_replicas == 0 and cooled:
        return 0, "cooled down"
    desired = _hpa(value, st.target_value, current)
    return max(floor, min(st.max_replicas, desired)), "hpa"


def _hpa(value: float, target: float, current: int) -> int:
    if current > 0 and abs(value / (target * current) - 1.0) <= HPA_TOLERANCE:
        return current
    return math.ceil(value / target)


def scaled_state(obj: Obj, polling_s: float | None = None) -> ScaledState | None:
    """The stand-in's view of a ScaledObject (None unless its first trigger is metrics-api)."""
    spec = obj.get("spec", {})
    triggers = spec.get("triggers") or []
    if not triggers or triggers[0].get("type") != "metrics-api":
        return None
    md = triggers[0].get("metadata", {})
    fb = spec.get("fallback")
    return ScaledState(
        name=obj["metadata"]["name"], target=spec["scaleTargetRef"]["name"], url=md["url"],
        value_location=md.get("valueLocation", ""), target_value=float(md["targetValue"]),
        activation=float(md.get("activationTargetValue", 0)), min_replicas=int(spec.get("minReplicaCount", 0)),
        max_replicas=int(spec.get("maxReplicaCount", 100)),
        polling_s=polling_s if polling_s is not None else float(spec.get("pollingInterval", 30)),
        cooldown_s=float(spec.get("cooldownPeriod", 300)),
        fallback=(int(fb["failureThreshold"]), int(fb["replicas"])) if fb else None)


def json_value(doc: Any, location: str) -> float:
    """The number at a dotted path (the subset of GJSON paths shoal's objects use)."""
    for part in location.split(".") if location else []:
        doc = doc[int(part)] if isinstance(doc, list) else doc[part]
    if isinstance(doc, bool) or not isinstance(doc, int | float):
        raise ValueError(f"{location!r} is {doc!r}, not a number")
    return float(doc)


class KedaStandIn:
    """Polls the simulation's ScaledObjects and scales their targets (see the module docstring)."""

    def __init__(self, sim: SimHost, timeout_s: float = 2.0) -> None:
        self.sim = sim
        self.timeout_s = timeout_s
        self.states: dict[str, ScaledState] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, polling_s: float | None = None, cooldown_s: float | None = None) -> None:
        """Start polling every ScaledObject the simulation holds; ``polling_s`` / ``cooldown_s``
        shorten the objects' own (tests)."""
        for name, obj in getattr(self.sim, "scaled_objects", {}).items():
            st = scaled_state(obj, polling_s)
            if st is not None:
                if cooldown_s is not None:
                    st.cooldown_s = cooldown_s
                self.states[name] = st
        self._thread = threading.Thread(target=self._run, daemon=True, name="sim-keda")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for st in list(self.states.values()):
                if now >= st.next_poll:
                    st.next_poll = now + st.polling_s
                    self.poll(st)
            waits = [st.next_poll for st in self.states.values()]
            self._stop.wait(max(0.01, min(waits, default=now + 1.0) - time.monotonic()))

    def poll(self, st: ScaledState) -> None:
        """Read one ScaledObject's metric and scale its target accordingly."""
        value: float | None = None
        try:
            value = self._read(st)
            st.failures, st.last_error = 0, None
        except (OSError, ValueError, KeyError, IndexError, http.client.HTTPException) as e:
            st.failures += 1
            st.last_error = f"{type(e).__name__}: {e}"
        st.last_value = value
        sim: Any = self.sim
        with sim.lock:
            current = self._current(st.target)
            if current is None:
                return
            replicas, why = keda_replicas(st, current, value, time.monotonic())
            if replicas != current:
                st.events.append((time.monotonic(), current, replicas, why))
                logger.info("keda stand-in: %s %d -> %d (%s, value %s)", st.target, current, replicas, why, value)
                sim.scale(st.target, replicas, wait=False)

    def _current(self, target: str) -> int | None:
        sim: Any = self.sim
        if target in sim.lws.sets:
            return int(sim.lws.sets[target].replicas)
        dep = sim.deployments.get(target)
        return None if dep is None else int(dep.replicas)

    def _read(self, st: ScaledState) -> float:
        parts = urllib.parse.urlsplit(st.url)
        host = parts.hostname or ""
        sim: Any = self.sim
        vip = sim.network.vips.get(host.split(".", 1)[0])
        if vip is None:
            raise OSError(f"no Service for {host!r}")
        conn = http.client.HTTPConnection(vip, parts.port or 80, timeout=self.timeout_s)
        try:
            conn.request("GET", parts.path or "/", headers={"connection": "close"})
            resp = conn.getresponse()
            body = resp.read(1 << 20)
        finally:
            conn.close()
        if resp.status != 200:
            raise ValueError(f"HTTP {resp.status}: {body[:200]!r}")
        return json_value(json.loads(body), st.value_location)
