"""What the dashboard's detail view of one deployment shows from its replicas' log files: the
recent errors (ERROR and CRITICAL records, and tracebacks written to stderr) and the tail of
the logs across its replicas.

Every read is bounded: at most :data:`MAX_FILES` files (the running replicas' first, then
the newest of those that are gone), the last :data:`TAIL_BYTES` of each, lines cut at
:data:`MAX_LINE` characters and tracebacks at :data:`MAX_TRACEBACK`. Files are opened as
``shoal logs`` opens them (:func:`~shoal.observability.safefiles.open_for_reading`: never
through another user's link, never a FIFO). What comes out is escaped
(:mod:`shoal.observability.safetext`) but still untrusted: user code wrote it, and it can
hold secrets. :func:`scan` is the pure part (file contents in, entries out).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.observability.logs import safe_name
from shoal.observability.safefiles import log_files, open_for_reading
from shoal.observability.safetext import escape, escape_line

__all__ = [
    "MAX_ERRORS",
    "MAX_FILES",
    "MAX_LINE",
    "MAX_TAIL_LINES",
    "MAX_TRACEBACK",
    "TAIL_BYTES",
    "LogText",
    "collect",
    "deployment_files",
    "read_tail",
    "scan",
]

MAX_FILES = 12
TAIL_BYTES = 64 * 1024
MAX_TAIL_LINES = 100
MAX_ERRORS = 20
MAX_LINE = 2000
MAX_TRACEBACK = 8000

_TEXT_HEAD = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ([A-Z]+) (.*)", re.S)
_WHO = re.compile(r" pid=(\d+) (\S+)")
_ERROR_LEVELS = frozenset({"ERROR", "CRITICAL", "FATAL"})
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


@dataclass(frozen=True)
class LogText:
    """The end of one replica's log file."""

    replica: str  # the replica id (the file's name)
    text: str
    complete: bool = True  # the text starts at the start of the file (no partial first line)
    pid: int | None = None  # the process, when the controller knows it
    mtime: float = 0.0  # when the file was last written (stamps lines that carry no time)


@dataclass
class _Line:
    text: str
    stamp: str  # "2026-11-27 10:26:19,406", or "" when the line carries none
    level: str = ""
    pid: int | None = None
    logger: str = ""
    message: str = ""
    exc_text: str = ""


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _parse(line: str) -> _Line:
    """One line of a log file: a ``TEXT`` record, a ``JSON`` record, or anything else (user output)."""
    if line.startswith("{"):
        try:
            d = json.loads(line)
        except ValueError:
            d = None
        if isinstance(d, dict) and isinstance(d.get("levelname"), str):
            exc = d.get("exc_text")
            return _Line(line, str(d.get("asctime", "")), d["levelname"], None, str(d.get("name", "")),
                         str(d.get("message", "")), exc if isinstance(exc, str) else "")
        return _Line(line, "")
    m = _TEXT_HEAD.match(line)
    if m is None:
        return _Line(line, "")
    stamp, level, rest = m.groups()
    who = _WHO.search(rest)
    if who is None:
        return _Line(line, stamp, level, message=rest.replace("\\n", "\n"))
    colon = rest.find(": ", who.start(2))
    message = rest[colon + 2:] if colon >= 0 else rest[who.end():].lstrip()
    # Files hold one line per record: a traceback's newlines were written as "\n".
    return _Line(line, stamp, level, int(who.group(1)), who.group(2).rstrip(":"), message.replace("\\n", "\n"))


def _raw_traceback_end(lines: Sequence[str], i: int) -> int:
    """Where the traceback written to stderr that starts at ``lines[i]`` ends (exclusive):
    its indented frames, the exception's line, and the tracebacks chained to it."""
    j = i + 1
    while j < len(lines):
        if lines[j].startswith((" ", "\t")):
            j += 1
            continue
        j += 1  # the exception's own line
        k = j
        while k < len(lines) and not lines[k].strip():
            k += 1
        if k < len(lines) and lines[k].startswith(_CHAINED):
            k += 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k < len(lines) and lines[k].startswith("Traceback (most recent call last)"):
                j = k + 1
                continue
        break
    return j


def _stamp_of(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int((t % 1) * 1000):03d}"


def _lines(log: LogText) -> list[str]:
    lines = log.text.split("\n")
    if not log.complete and lines:
        lines = lines[1:]  # cut in the middle by the read
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


_Stamped = list[tuple[str, dict[str, Any]]]


def _one_file(log: LogText, max_lines: int) -> tuple[_Stamped, _Stamped]:
    """The file's errors and its last ``max_lines`` lines, each with the stamp it sorts by."""
    raw = _lines(log)
    parsed = [_parse(x) for x in raw]
    # A line without a time (print() output, a raw traceback) takes the time of the record
    # before it; lines before the first record take that record's; a file without any, its mtime.
    first = next((p.stamp for p in parsed if p.stamp), "") or _stamp_of(log.mtime)
    stamps: list[str] = []
    current = first
    for p in parsed:
        current = p.stamp or current
        stamps.append(current)
    pid = log.pid
    if pid is None:
        pid = next((p.pid for p in reversed(parsed) if p.pid is not None), None)
    errors: list[tuple[str, dict[str, Any]]] = []
    i = 0
    while i < len(parsed):
        p = parsed[i]
        if p.level in _ERROR_LEVELS:
            message, _, rest = p.message.partition("\n")
            trace = "\n".join(x for x in (rest, p.exc_text) if x)
            errors.append((stamps[i], {"replica": log.replica, "pid": p.pid or pid, "time": p.stamp,
                                       "level": p.level, "logger": p.logger,
                                       "message": escape(_cut(message, MAX_LINE)),
                                       "traceback": escape(_cut(trace, MAX_TRACEBACK))}))
        elif not p.stamp and raw[i].startswith("Traceback (most recent call last)"):
            end = _raw_traceback_end(raw, i)
            block = raw[i:end]
            errors.append((stamps[i], {"replica": log.replica, "pid": pid, "time": stamps[i], "level": "STDERR",
                                       "logger": "", "message": escape(_cut(block[-1], MAX_LINE)),
                                       "traceback": escape(_cut("\n".join(block), MAX_TRACEBACK))}))
            i = end
            continue
        i += 1
    start = max(0, len(raw) - max_lines)
    tail = [(stamps[k], {"replica": log.replica, "pid": parsed[k].pid or pid, "time": stamps[k],
                         "line": escape_line(_cut(raw[k], MAX_LINE))}) for k in range(start, len(raw))]
    return errors, tail


def scan(logs: Sequence[LogText], *, max_lines: int = MAX_TAIL_LINES,
         max_errors: int = MAX_ERRORS) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The recent errors (newest first, at most ``max_errors``) and the last ``max_lines``
    lines across the files (oldest first, in time order; each names its replica and pid).

    An error is a record of level ERROR or CRITICAL (``TEXT`` or ``JSON``), its message's first
    line as ``message`` and the rest (the traceback) as ``traceback``, or a traceback the
    process wrote to stderr (level ``STDERR``)."""
    errors: list[tuple[str, int, int, dict[str, Any]]] = []
    tail: list[tuple[str, int, int, dict[str, Any]]] = []
    for n, log in enumerate(logs):
        errs, lines = _one_file(log, max_lines)
        errors.extend((s, n, k, e) for k, (s, e) in enumerate(errs))
        tail.extend((s, n, k, e) for k, (s, e) in enumerate(lines))
    errors.sort(key=lambda x: x[:3])
    tail.sort(key=lambda x: x[:3])
    return [e for *_, e in reversed(errors[-max_errors:])] if max_errors > 0 else [], \
        [e for *_, e in tail[-max_lines:]] if max_lines > 0 else []


def read_tail(path: str, limit: int = TAIL_BYTES) -> tuple[str, bool, float]:
    """The last ``limit`` bytes of a log file as text, whether that is the whole file, and its
    mtime; opened like ``shoal logs`` opens files (raises ``OSError`` for what it refuses)."""
    with open(open_for_reading(path), "rb") as f:
        st = os.fstat(f.fileno())
        start = max(0, st.st_size - limit)
        f.seek(start)
        data = f.read(limit)
    return data.decode("utf-8", "replace"), start == 0, st.st_mtime


def deployment_files(logs_dir: str, app: str, deployment: str, live: Sequence[str] = (),
                     limit: int = MAX_FILES) -> list[tuple[str, str, float]]:
    """``(replica id, path, mtime)`` of the deployment's log files in the session folder
    ``logs_dir``: those of the replicas in ``live`` first, then the newest others, at most
    ``limit``. Nothing through a linked folder; files are regular ones or links shoal made."""
    directory = os.path.join(logs_dir, safe_name(app), safe_name(deployment))
    if os.path.islink(directory) or os.path.islink(os.path.dirname(directory)) or not os.path.isdir(directory):
        return []
    found = [(os.path.basename(path)[:-4], path, mtime) for path, mtime in log_files(directory)]
    wanted = {safe_name(r) for r in live}
    found.sort(key=lambda f: (f[0] not in wanted, -f[2], f[0]))
    return found[:max(0, limit)]


def collect(logs_dir: str, app: str, deployment: str, pids: Mapping[str, int]) -> dict[str, Any]:
    """``errors``, ``logs`` (:func:`scan`) and ``files`` (the replica ids read) of a
    deployment; ``pids``: the running replicas' ids and processes. Blocking (file reads)."""
    logs: list[LogText] = []
    by_file = {safe_name(k): v for k, v in pids.items()}
    for replica, path, mtime in deployment_files(logs_dir, app, deployment, list(pids)):
        try:
            text, complete, mtime = read_tail(path)
        except OSError:
            continue
        logs.append(LogText(replica, text, complete, by_file.get(replica), mtime))
    errors, tail = scan(logs)
    return {"errors": errors, "logs": tail, "files": [x.replica for x in logs], "log_dir": logs_dir}
