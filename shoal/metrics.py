"""Metrics of your own, from inside a deployment: ``from shoal import metrics`` (Ray Serve's
``ray.serve.metrics``).

:class:`Counter`, :class:`Gauge` and :class:`Histogram` take a name, a description and
``tag_keys`` (a tuple of label names); ``set_default_tags`` gives values used when a call does
not pass them. Inside a replica every series also gets the labels ``application``,
``deployment`` and ``replica`` (reserved: using them as tag keys is a ``ValueError``), and a
``route`` tag key, when declared and not given, takes the route of the request being served.

Where the values go: locally, replica processes write prometheus-client's multiprocess files,
so the instance's ``/metrics`` page (proxy, ingress replicas) shows them next to shoal's own;
in a Kubernetes pod they are exported on the pod's admin port with the pod's metrics. A
counter named ``my_counter`` appears as ``my_counter_total`` (Prometheus' convention; Ray
exports the same ``_total`` counter, with a ``ray_`` prefix that shoal does not add).

Misuse fails where it happens, with Ray's errors: a name that is not a Prometheus name, a
``tag_keys`` that is not a tuple of strings, a missing or undeclared tag, a counter increased
by zero or less, a histogram without boundaries. A sample that cannot be written (a full disk
under the metrics directory) is dropped and counted; the request never fails because of it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Counter", "Gauge", "Histogram", "registry"]

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_TAG = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Labels shoal adds inside a replica; a user's tag keys may not use them.
SERVE_TAGS = ("application", "deployment", "replica")
ROUTE_TAG = "route"

_lock = threading.Lock()
_REGISTRY: Any = None
# name -> (kind, label names, prometheus-client metric): a deployment constructed twice in one
# process (a redeploy in local testing mode) gets the same series back instead of a clash.
_made: dict[str, tuple[str, tuple[str, ...], Any]] = {}


def registry() -> Any:
    """The prometheus-client registry holding every user metric of this process (a pod's
    admin port exports it; locally the multiprocess files carry the values)."""
    global _REGISTRY
    with _lock:
        if _REGISTRY is None:
            from prometheus_client import CollectorRegistry

            _REGISTRY = CollectorRegistry(auto_describe=True)
        return _REGISTRY


def _serve_tags() -> dict[str, str]:
    from shoal import context

    ctx = context._replica_ctx.get() or context._process_replica_ctx
    if ctx is None:
        return {}
    return {"application": ctx.app_name, "deployment": ctx.deployment, "replica": ctx.replica_tag}


class _Metric:
    _kind = ""

    def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("Empty name is not allowed. Please provide a metric name.")
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a valid Prometheus name ([a-zA-Z_:][a-zA-Z0-9_:]*)")
        if tag_keys is None:
            tag_keys = ()
        if not isinstance(tag_keys, tuple):
            raise TypeError(f"tag_keys should be a tuple type, got: {type(tag_keys).__name__}")
        for key in tag_keys:
            if not isinstance(key, str):
                raise TypeError(f"Tag keys must be str, got {type(key).__name__}.")
            if not _TAG.match(key) or key.startswith("__"):
                raise ValueError(f"tag key {key!r} is not a valid Prometheus label name")
        if len(set(tag_keys)) != len(tag_keys):
            raise ValueError(f"tag_keys has duplicates: {tag_keys}")
        self._serve = _serve_tags()
        for key in tag_keys:
            if key in SERVE_TAGS and self._serve:
                raise ValueError(f"'{key}' tag is reserved for Serve metrics")
        self._name = name
        self._description = description
        self._tag_keys = tag_keys
        self._default_tags: dict[str, str] = {}
        self._labels = (*self._serve, *tag_keys)
        self._metric = self._register()
        self._children: dict[tuple[str, ...], Any] = {}
        self.dropped = 0

    @property
    def info(self) -> dict[str, Any]:
        """Name, description, tag keys and default tags (Ray's ``Metric.info``)."""
        return {"name": self._name, "description": self._description, "tag_keys": self._tag_keys,
                "default_tags": dict(self._default_tags)}

    def set_default_tags(self, default_tags: Mapping[str, str]) -> _Metric:
        """Tag values used when a call does not give them; returns the metric itself."""
        for key, value in default_tags.items():
            if key not in self._tag_keys:
                raise ValueError(f"Unrecognized tag key {key!r}; the metric declares {self._tag_keys}")
            if not isinstance(value, str):
                raise TypeError(f"Tag values must be str, got {type(value).__name__} for {key!r}")
        self._default_tags = dict(default_tags)
        return self

    def _create(self, labels: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def _register(self) -> Any:
        with _lock:
            known = _made.get(self._name)
            if known is not None:
                kind, labels, metric = known
                if kind != self._kind or labels != self._labels:
                    raise ValueError(f"a metric named {self._name!r} already exists in this process as a {kind} with "
                                     f"labels {labels}")
                return metric
        metric = self._create(self._labels)
        with _lock:
            _made[self._name] = (self._kind, self._labels, metric)
        return metric

    def _child(self, tags: Mapping[str, str] | None) -> Any:
        values = dict(self._default_tags)
        if tags:
            for tag, value in tags.items():
                if tag not in self._tag_keys:
                    raise ValueError(f"Unrecognized tag key {tag!r}; the metric declares {self._tag_keys}")
                if not isinstance(value, str):
                    raise TypeError(f"Tag values must be str, got {type(value).__name__} for {tag!r}")
                values[tag] = value
        if ROUTE_TAG in self._tag_keys and ROUTE_TAG not in values and self._serve:
            from shoal.context import get_request_context

            values[ROUTE_TAG] = get_request_context().route
        missing = [k for k in self._tag_keys if k not in values]
        if missing:
            raise ValueError(f"Missing value for tag key(s): {', '.join(missing)}.")
        key = (*self._serve.values(), *(values[k] for k in self._tag_keys))
        child = self._children.get(key)
        if child is None:
            try:
                child = self._metric.labels(*key) if self._labels else self._metric
            except OSError:  # a new series on a full disk: drop the sample
                self.dropped += 1
                return None
            self._children[key] = child
        return child

    def _record(self, method: str, value: float, tags: Mapping[str, str] | None) -> None:
        child = self._child(tags)
        if child is None:
            return
        try:
            getattr(child, method)(value)
        except OSError:
            self.dropped += 1


def _multiprocess() -> bool:
    import os

    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def _prepare() -> None:
    if _multiprocess():
        from shoal.observability.multiproc import install_safe_files

        install_safe_files()


class Counter(_Metric):
    """A value that only goes up (exported as ``<name>_total``)."""

    _kind = "counter"

    def _create(self, labels: tuple[str, ...]) -> Any:
        _prepare()
        from prometheus_client import Counter as PromCounter

        return PromCounter(self._name, self._description or self._name, labels, registry=registry())

    def inc(self, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        """Add ``value`` (> 0) to the series of ``tags`` (over the default tags)."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"value must be int or float, got {type(value).__name__}")
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")
        self._record("inc", float(value), tags)


class Gauge(_Metric):
    """The last value set."""

    _kind = "gauge"

    def _create(self, labels: tuple[str, ...]) -> Any:
        _prepare()
        from prometheus_client import Gauge as PromGauge

        # Across processes, a replica's series is its own (the replica label); a gauge of a
        # process that exited leaves the page.
        return PromGauge(self._name, self._description or self._name, labels, registry=registry(),
                         multiprocess_mode="livemostrecent")

    def set(self, value: float | None, tags: Mapping[str, str] | None = None) -> None:
        """Set the series of ``tags`` to ``value`` (``None`` is ignored, as Ray does)."""
        if value is None:
            return
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"value must be int or float, got {type(value).__name__}")
        self._record("set", float(value), tags)


class Histogram(_Metric):
    """Observations counted into buckets: ``boundaries`` are the buckets' upper bounds (> 0)."""

    _kind = "histogram"

    def __init__(self, name: str, description: str = "", boundaries: Sequence[float] | None = None,
                 tag_keys: tuple[str, ...] | None = None) -> None:
        if not boundaries:
            raise ValueError("boundaries argument should be provided when using the Histogram class. "
                             "e.g., Histogram(\"name\", boundaries=[1.0, 2.0])")
        for b in boundaries:
            if not isinstance(b, int | float) or isinstance(b, bool) or b <= 0:
                raise ValueError(f"Invalid `boundaries` argument at index {list(boundaries).index(b)}, {boundaries}. "
                                 "Use positive values for the arguments.")
        self._boundaries = sorted(float(b) for b in boundaries)
        super().__init__(name, description, tag_keys)

    @property
    def info(self) -> dict[str, Any]:
        return {**super().info, "boundaries": list(self._boundaries)}

    def _create(self, labels: tuple[str, ...]) -> Any:
        _prepare()
        from prometheus_client import Histogram as PromHistogram

        return PromHistogram(self._name, self._description or self._name, labels, registry=registry(),
                             buckets=[*self._boundaries, float("inf")])

    def observe(self, value: float, tags: Mapping[str, str] | None = None) -> None:
        """Count ``value`` into the series of ``tags``."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise TypeError(f"value must be int or float, got {type(value).__name__}")
        self._record("observe", float(value), tags)
