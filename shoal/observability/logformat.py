"""The identity every log record carries and the two line formats (``TEXT``, ``JSON``) of
:mod:`shoal.observability.logs`, which re-exports them. Client data and user output may hold
terminal escapes: every line is escaped (:mod:`shoal.observability.safetext`)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shoal.context import _request_ctx
from shoal.observability.safetext import escape, escape_line

__all__ = ["EscapingFormatter", "Identity", "JSONFormatter", "RecordContext", "Stamp", "TextFormatter"]

# Attributes every LogRecord has; anything else in a record's __dict__ came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_OWN = frozenset({"application", "deployment", "replica", "component", "request_id", "route"})


@dataclass(frozen=True)
class Identity:
    """Who writes a process's log records."""

    component: str  # "replica" | "proxy"
    replica: str = ""  # the replica's id, or the proxy's id
    application: str = ""
    deployment: str = ""

    @property
    def label(self) -> str:
        if self.application or self.deployment:
            return f"{self.component} {self.application}/{self.deployment}/{self.replica}"
        return f"{self.component} {self.replica}"


class RecordContext(logging.Filter):
    """Stamps each record with the process's identity and the request being served.

    Installed on handlers (not loggers), so that records of every logger, the user's own
    ``logging.getLogger(__name__)`` included, get the fields.
    """

    def __init__(self, who: Identity) -> None:
        super().__init__()
        self.who = who

    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        if not d.get("request_id"):
            ctx = _request_ctx.get()
            d["request_id"] = ctx.request_id
            d.setdefault("route", ctx.route)
        d.setdefault("route", "")
        d.setdefault("application", self.who.application)
        d.setdefault("deployment", self.who.deployment)
        d.setdefault("replica", self.who.replica)
        d.setdefault("component", self.who.component)
        return True


class Stamp:
    """``2026-11-27 10:26:19,406``, as ``logging.Formatter.formatTime`` writes it, with the
    date and time part computed once a second."""

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def __call__(self, t: float) -> str:
        second = int(t)
        if second != self.second:
            self.second, self.text = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self.text},{int((t - second) * 1000):03d}"


class EscapingFormatter(logging.Formatter):
    """A plain ``logging.Formatter`` (any ``fmt``) whose lines carry no terminal escapes
    (:func:`~shoal.observability.safetext.escape`): for stderr before :func:`setup` runs."""

    def format(self, record: logging.LogRecord) -> str:
        return escape(super().format(record))


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <who> pid=<pid> <logger> request_id=<id>: <message>``.

    With ``one_line`` (files), a traceback or multi-line message is folded into the same line
    (newlines written as ``\\n``), so that each line is one event.
    """

    def __init__(self, who: Identity, *, one_line: bool = True, extra_attrs: Sequence[str] = ()) -> None:
        super().__init__()
        self.prefix = f"{who.label} pid={os.getpid()}"
        self.one_line = one_line
        self.extra_attrs = tuple(extra_attrs)
        self.stamp = Stamp()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created) if datefmt is None else super().formatTime(record, datefmt)

    def access_line(self, t: float, method: str, path: str, status: int | str, ms: float, request_id: str,
                    route: str) -> str:
        """What :meth:`format` makes of :func:`log_access`'s record, without making one."""
        text = f"{self.stamp(t)} INFO {self.prefix} shoal.access"
        if request_id:
            text += f" request_id={request_id}"
        text += f": {method} {path} {status} {ms:.2f}ms"
        return escape_line(text) if self.one_line else escape(text)

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", "")
        head = f"{self.formatTime(record)} {record.levelname} {self.prefix} {record.name}"
        if rid:
            head += f" request_id={rid}"
        for attr in self.extra_attrs:
            head += f" {attr}={getattr(record, attr, '')}"
        text = f"{head}: {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        # Client data (a path, a request id) and user output may hold terminal escapes.
        return escape_line(text) if self.one_line else escape(text)


class JSONFormatter(logging.Formatter):
    """One JSON object per line (``logging_config.encoding: JSON``): time, level, logger,
    message, application, deployment, replica, request_id, and what the call passed in
    ``extra=`` (the access log's method, path, status and latency_ms)."""

    def __init__(self, who: Identity | Any, *, extra_attrs: Sequence[str] = ()) -> None:
        super().__init__()
        if not isinstance(who, Identity):  # a ReplicaContext (the pre-file API)
            who = Identity("replica", who.replica_tag, who.app_name, who.deployment)
        self.who = who
        self.extra_attrs = tuple(extra_attrs)
        self.stamp = Stamp()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created) if datefmt is None else super().formatTime(record, datefmt)

    def access_line(self, t: float, method: str, path: str, status: int | str, ms: float, request_id: str,
                    route: str) -> str:
        """What :meth:`format` makes of :func:`log_access`'s record, without making one."""
        w = self.who
        out: dict[str, Any] = {
            "asctime": self.stamp(t), "levelname": "INFO", "name": "shoal.access",
            "message": f"{method} {path} {status} {ms:.2f}ms", "application": w.application,
            "deployment": w.deployment, "replica": w.replica, "component": w.component, "request_id": request_id,
        }
        if route:
            out["route"] = route
        out.update(method=method, path=path, status=status, latency_ms=round(ms, 3))
        return _json_line(out)

    def format(self, record: logging.LogRecord) -> str:
        d = record.__dict__
        out: dict[str, Any] = {
            "asctime": self.formatTime(record), "levelname": record.levelname, "name": record.name,
            "message": record.getMessage(),
            "application": d.get("application", self.who.application),
            "deployment": d.get("deployment", self.who.deployment),
            "replica": d.get("replica", self.who.replica),
            "component": d.get("component", self.who.component),
            "request_id": d.get("request_id", "") or _request_ctx.get().request_id,
        }
        if d.get("route"):
            out["route"] = d["route"]
        for key, value in d.items():
            if key not in _STANDARD and key not in _OWN and key not in out:
                out[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        for attr in self.extra_attrs:
            out[attr] = getattr(record, attr, None)
        if record.exc_info:
            out["exc_text"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_text"] = record.exc_text
        return _json_line(out)


def _json_line(out: dict[str, Any]) -> str:
    """One JSON object as ASCII: json.dumps escapes the controls and everything non-ASCII
    (C1 and bidi controls included) but DEL, which is done here."""
    text = json.dumps(out, default=str)
    return text.replace("\x7f", "\\u007f") if "\x7f" in text else text
