"""The model server's serving metrics, under vLLM's metric names (so dashboards made for vLLM's
server read them): per model replica, labelled ``model_name``.

* ``vllm:time_to_first_token_seconds``: from the request reaching the model server to its first
  generated text;
* ``vllm:time_per_output_token_seconds``: between tokens after the first (one observation per
  request: its mean);
* ``vllm:e2e_request_latency_seconds``: the whole generation, however it ended;
* ``vllm:request_queue_time_seconds``: how long the request waited for the engine to start it
  (engines that queue report it; others count 0);
* ``vllm:num_requests_running`` / ``vllm:num_requests_waiting``: gauges, set on every change;
* ``vllm:request_success_total``: finished requests by ``finished_reason`` (``stop``,
  ``length``, ``abort`` for a cancelled or failed one).

They go through :mod:`shoal.metrics`, so they show on the instance's ``/metrics`` page locally and
on a pod's admin port on Kubernetes, with shoal's ``application``/``deployment``/``replica`` labels.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from shoal import metrics

__all__ = ["EXPOSED", "GenerationTimer", "ServingMetrics"]

#: The names as exported (a counter gets ``_total``): the Grafana dashboard's LLM panels use them.
EXPOSED = ("vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
           "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds", "vllm:num_requests_running",
           "vllm:num_requests_waiting", "vllm:request_success_total")

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
            20.0, 40.0, 80.0)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TAGS = ("model_name",)


class ServingMetrics:
    """The metrics of one model server (``model_name`` set as its default tag)."""

    def __init__(self, model_name: str, waiting: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        tags = {"model_name": model_name}
        self.clock = clock
        self.waiting = waiting
        self.running = 0
        self.ttft = metrics.Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                                      _LATENCY, _TAGS).set_default_tags(tags)
        self.tpot = metrics.Histogram("vllm:time_per_output_token_seconds", "Time per output token.",
                                      _PER_TOKEN, _TAGS).set_default_tags(tags)
        self.e2e = metrics.Histogram("vllm:e2e_request_latency_seconds", "End-to-end generation latency.",
                                     _LATENCY, _TAGS).set_default_tags(tags)
        self.queue = metrics.Histogram("vllm:request_queue_time_seconds", "Time waiting for the engine.",
                                       _LATENCY, _TAGS).set_default_tags(tags)
        self.running_gauge = metrics.Gauge("vllm:num_requests_running", "Requests generating now.",
                                           _TAGS).set_default_tags(tags)
        self.waiting_gauge = metrics.Gauge("vllm:num_requests_waiting", "Requests waiting for the engine.",
                                           _TAGS).set_default_tags(tags)
        self.success = metrics.Counter("vllm:request_success", "Finished requests by finished_reason.",
                                       ("model_name", "finished_reason")).set_default_tags(tags)
        self._gauges()

    def _gauges(self) -> None:
        self.running_gauge.set(self.running)  # type: ignore[attr-defined]
        if self.waiting is not None:
            try:
                self.waiting_gauge.set(float(self.waiting()))  # type: ignore[attr-defined]
            except Exception:  # an engine's counter must never fail a request
                pass

    def start(self) -> GenerationTimer:
        self.running += 1
        self._gauges()
        return GenerationTimer(self, self.clock())


class GenerationTimer:
    """One generation's timings, recorded once at :meth:`finish`."""

    def __init__(self, owner: ServingMetrics, started: float) -> None:
        self.owner = owner
        self.started = started
        self.first: float | None = None
        self.queue_s: float | None = None
        self.done = False

    def token(self, queue_s: float | None = None) -> None:
        """Generated text arrived (the first call sets the time to first token)."""
        if self.first is None:
            self.first = self.owner.clock()
            self.owner.ttft.observe(self.first - self.started)  # type: ignore[attr-defined]
            self.queue_s = queue_s

    def finish(self, reason: str, completion_tokens: int) -> None:
        if self.done:
            return
        self.done = True
        m, now = self.owner, self.owner.clock()
        m.running -= 1
        m.e2e.observe(now - self.started)  # type: ignore[attr-defined]
        m.queue.observe(self.queue_s or 0.0)  # type: ignore[attr-defined]
        if self.first is not None and completion_tokens > 1:
            m.tpot.observe((now - self.first) / (completion_tokens - 1))  # type: ignore[attr-defined]
        m.success.inc(1.0, {"finished_reason": reason})  # type: ignore[attr-defined]
        m._gauges()


def waiting_from_stats(engine: Any) -> Callable[[], int] | None:
    """The engine's waiting count, when its ``stats()`` has one."""
    stats = getattr(engine, "stats", None)
    if stats is None:
        return None
    def waiting() -> int:
        got = stats()
        return int(got.get("waiting", got.get("batch_waiting", 0)))  # the batching scheduler's queue

    return waiting
