"""The bookkeeping of every request a replica serves, whatever way it came in.

:class:`Accounts` opens a :class:`Ticket` when a request starts (its trace span, its start
time) and closes it when the request ends: the replica's own counters (reported to the
controller, or served as a pod's metrics), the process's Prometheus metrics, the trace span
and the access-log line. RPC calls, RPC-forwarded HTTP requests and HTTP requests served by
the replica's own front all go through it.
"""

from __future__ import annotations

import time
import traceback
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle

from shoal.exceptions import RayServeException
from shoal.observability import metrics as _metrics
from shoal.observability import tracing as _tracing
from shoal.observability.logs import log_access
from shoal.runtime.wire import LATENCY_BUCKETS_MS, RequestMeta

__all__ = ["Accounts", "RequestCounters", "Sinks", "Ticket", "error_payload"]


class RequestCounters:
    """Requests this replica finished: count, failures, latency histogram (LATENCY_BUCKETS_MS)."""

    __slots__ = ("clock", "errors", "hist", "requests")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.requests = 0
        self.errors = 0
        self.hist = [0] * (len(LATENCY_BUCKETS_MS) + 1)

    def record(self, started: float, failed: bool) -> None:
        self.requests += 1
        if failed:
            self.errors += 1
        self.hist[bisect_left(LATENCY_BUCKETS_MS, (self.clock() - started) * 1000.0)] += 1


def error_payload(exc: BaseException) -> tuple[BaseException, str]:
    """What to send a caller for a request that raised ``exc``: the exception itself when it
    pickles, else a RayServeException naming it; and its traceback."""
    tb = "".join(traceback.format_exception(exc))
    try:
        cloudpickle.dumps(exc)
        return exc, tb
    except Exception:
        return RayServeException(f"{type(exc).__name__}: {exc}"), tb


@dataclass(frozen=True)
class Sinks:
    """Where finished requests are reported beyond the replica's counters; shoal's metrics,
    tracing and access log by default (a test passes its own)."""

    # (meta, method, app, deployment, replica id) -> a span handle, or None
    start_span: Callable[[RequestMeta, str, str, str, str], Any] = _tracing.start_request
    end_span: Callable[[Any, bool], None] = _tracing.end_request
    # (route, started, failed)
    metrics: Callable[[str, float, bool], None] = _metrics.PROCESS.request_done
    # (verb, target, status, started, request id, route)
    access: Callable[[str, str, int | str, float, str, str], None] = log_access


@dataclass(slots=True)
class Ticket:
    """One request being served: what closing it needs."""

    meta: RequestMeta
    started: float
    span: Any


class Accounts:
    """Opens and closes the :class:`Ticket` of every request (see the module docstring)."""

    def __init__(self, sinks: Sinks | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.sinks = sinks or Sinks()
        self.clock = clock
        self.counters = RequestCounters(clock)
        self.access_log = True  # logging_config.enable_access_log
        self.key: tuple[str, str] = ("", "")  # (app, deployment), for trace spans
        self.replica_id = ""  # the replica's id, for trace spans

    def open(self, meta: RequestMeta, method: str) -> Ticket:
        span = self.sinks.start_span(meta, method, *self.key, self.replica_id) if meta.trace else None
        return Ticket(meta, self.clock(), span)

    def close(self, ticket: Ticket, failed: bool, status: int | str, verb: str, target: str, route: str) -> None:
        """The request ended with ``status``; ``verb`` and ``target`` name it in the access log
        (``GET /path``, ``CALL method``); ``route`` is its route prefix ("" for handle calls)."""
        meta = ticket.meta
        self.counters.record(ticket.started, failed)
        self.sinks.metrics(meta.route, ticket.started, failed)
        if ticket.span is not None:
            self.sinks.end_span(ticket.span, failed)
        if self.access_log:
            self.sinks.access(verb, target, status, ticket.started, meta.request_id, route)
