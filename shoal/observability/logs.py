"""How replica and proxy processes log: one line per event, in a file per process.

A local instance gives every replica its own file, ``<run_dir>/logs/<app>/<deployment>/<replica id>.log``,
and the proxy ``<run_dir>/logs/proxy.log``. The process's standard output and error are
redirected into that file too (``print()``, warnings, a crash's traceback), while records of
level WARNING and above still reach the terminal the process was started from. Files rotate
at :data:`MAX_BYTES` and keep :data:`BACKUPS` old generations; of the replicas that are gone,
each deployment keeps the :data:`KEEP_GONE` newest files.

Every record carries the process's identity (application, deployment, replica) and the id of
the request being served, if any (``shoal.context``), in both encodings: ``TEXT`` (one line,
``request_id=`` before the message) and ``JSON`` (one object per line). Requests finished are
logged by ``shoal.access`` (:func:`log_access`). This module is imported by the proxy process,
so it stays light: no pydantic.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from logging.handlers import RotatingFileHandler
from typing import Any

from shoal.context import _request_ctx

__all__ = [
    "BACKUPS",
    "KEEP_GONE",
    "MAX_BYTES",
    "DiskFullTolerant",
    "Identity",
    "JSONFormatter",
    "LogFile",
    "RecordContext",
    "TextFormatter",
    "is_live",
    "log_access",
    "proxy_log_path",
    "replica_log_path",
    "safe_name",
    "setup",
]

MAX_BYTES = 50 * 1024 * 1024
BACKUPS = 3
KEEP_GONE = 10
# How often a file that grows by print() alone (no log record to trigger it) is checked for rotation.
CHECK_EVERY_S = 5.0
# A full disk: records that cannot be written are dropped; the terminal hears of it at most this often.
DROP_WARN_EVERY_S = 60.0
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

access_logger = logging.getLogger("shoal.access")

# Attributes every LogRecord has; anything else in a record's __dict__ came from ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_OWN = frozenset({"application", "deployment", "replica", "component", "request_id", "route"})


def safe_name(name: str) -> str:
    """An application or deployment name as one path component."""
    name = name.replace(os.sep, "_").replace("\0", "_")
    return "_" + name if name in ("", ".", "..") else name


def replica_log_path(root: str, app: str, deployment: str, replica_id: str) -> str:
    return os.path.join(root, safe_name(app), safe_name(deployment), f"{safe_name(replica_id)}.log")


def proxy_log_path(root: str) -> str:
    return os.path.join(root, "proxy.log")


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


class _Stamp:
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
        self.stamp = _Stamp()

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created) if datefmt is None else super().formatTime(record, datefmt)

    def access_line(self, t: float, method: str, path: str, status: int | str, ms: float, request_id: str,
                    route: str) -> str:
        """What :meth:`format` makes of :func:`log_access`'s record, without making one."""
        text = f"{self.stamp(t)} INFO {self.prefix} shoal.access"
        if request_id:
            text += f" request_id={request_id}"
        text += f": {method} {path} {status} {ms:.2f}ms"
        return text.replace("\n", "\\n").replace("\r", "\\r") if self.one_line else text

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
        return text.replace("\n", "\\n").replace("\r", "\\r") if self.one_line else text


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
        self.stamp = _Stamp()

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
        return json.dumps(out, default=str)

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
        return json.dumps(out, default=str)


class LogFile(RotatingFileHandler):
    """A rotating log file that can also be this process's stdout and stderr.

    With ``capture``, file descriptors 1 and 2 point at the file (and again at the new one
    after each rotation), so that output which bypasses ``logging`` lands in it too and is
    counted towards the size limit. The file is held with a shared ``flock`` while the process
    lives: :func:`is_live` tells a running replica's file from a dead one's.
    """

    def __init__(self, path: str, *, capture: bool = False, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS) -> None:
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", errors="backslashreplace")
        self.capture = capture
        # The size is looked at every this many writes (and every CHECK_EVERY_S by a thread).
        self.check_every = 16
        self._writes = 0
        # A full disk: records dropped since writing last worked, and when the terminal was told.
        self.dropped = 0
        self._failed = False
        self._warned_at = -DROP_WARN_EVERY_S
        self._claim()

    def _claim(self) -> None:
        if self.stream is None:
            return
        fd = self.stream.fileno()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            pass
        if self.capture:
            for stream in (sys.stdout, sys.stderr):
                if stream is not None:
                    stream.flush()
            os.dup2(fd, 1)
            os.dup2(fd, 2)

    def shouldRollover(self, record: logging.LogRecord | None) -> bool:
        # The file's real size (print() output included), without formatting the record twice,
        # and not on every write.
        self._writes += 1
        if self.stream is None or self.maxBytes <= 0 or (record is not None and self._writes % self.check_every):
            return False
        try:
            return os.fstat(self.stream.fileno()).st_size >= self.maxBytes
        except OSError:
            return False

    def write_line(self, line: str) -> None:
        """Append one formatted line, as ``emit`` would (the access log's short cut)."""
        with self.lock:  # type: ignore[union-attr]
            try:
                if self.shouldRollover(_NO_RECORD):
                    self.doRollover()
                stream = self.stream
                if stream is None:
                    return
                stream.write(line + "\n")
                stream.flush()
            except OSError as e:
                self._dropped(e)
                return
            except Exception:
                return
            self._written()

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)
        if not self._failed:
            self._written()

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            self._dropped(error)  # not a traceback per record into a file that cannot grow
            return
        super().handleError(record)

    def _dropped(self, error: OSError) -> None:
        self._failed = True
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at < DROP_WARN_EVERY_S:
            return
        self._warned_at = now
        stream = _terminal()
        if stream is not None:
            try:
                stream.write(f"shoal pid={os.getpid()}: log records dropped: cannot write {self.baseFilename} "
                             f"({error.strerror or error}); {self.dropped} dropped so far\n")
            except (OSError, ValueError):
                pass

    def _written(self) -> None:
        """A write worked: say in the file how many records were dropped before it."""
        if not self.dropped or self.stream is None:
            return
        n, self.dropped = self.dropped, 0
        self._warned_at = -DROP_WARN_EVERY_S
        try:
            self.stream.write(f"{_Stamp()(time.time())} WARNING pid={os.getpid()} shoal.logs: {n} log records "
                              "dropped while this file could not be written (disk full)\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.dropped += n

    def doRollover(self) -> None:
        super().doRollover()
        self._claim()

    def check(self) -> None:
        """Rotate if output written without ``logging`` made the file too big."""
        with self.lock:  # type: ignore[union-attr]
            if self.shouldRollover(None):
                self.doRollover()


class DiskFullTolerant:
    """This process's stdout or stderr once they point at its log file: a write the disk
    refuses (full) is dropped instead of raising into the caller (a ``print()`` in a request
    handler); everything else is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def is_live(path: str) -> bool:
    """Whether a process still writes the log file at ``path`` (it holds a lock on it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def prune(directory: str, keep: int = KEEP_GONE) -> None:
    """Delete the files of replicas that are gone, all but the ``keep`` newest, with their
    rotated generations."""
    gone: list[tuple[float, str]] = []
    for path in glob.glob(os.path.join(glob.escape(directory), "*.log")):
        if is_live(path):
            continue
        try:
            gone.append((os.lstat(path).st_mtime, path))
        except OSError:
            continue
    gone.sort(reverse=True)
    for _, path in gone[keep:]:
        target = os.path.realpath(path) if os.path.islink(path) else ""
        for victim in [path, *glob.glob(glob.escape(path) + ".[0-9]*")]:
            try:
                os.unlink(victim)
            except OSError:
                pass
        if target:
            for victim in [target, *glob.glob(glob.escape(target) + ".[0-9]*")]:
                try:
                    os.unlink(victim)
                except OSError:
                    pass


_terminal_stream: io.TextIOWrapper | None = None


def _terminal() -> io.TextIOWrapper | None:
    """A stream on a duplicate of the stderr the process started with (the terminal), taken
    before stderr is redirected into the log file."""
    global _terminal_stream
    if _terminal_stream is None:
        try:
            raw = os.fdopen(os.dup(2), "wb", buffering=0)
        except OSError:
            return None
        _terminal_stream = io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace",
                                            line_buffering=True, write_through=True)
    return _terminal_stream


def _watch_size(handler: LogFile) -> None:
    def loop() -> None:
        while handler.stream is not None:
            time.sleep(CHECK_EVERY_S)
            try:
                handler.check()
            except Exception:
                pass

    threading.Thread(target=loop, name="shoal-log-rotation", daemon=True).start()


_current: LogFile | None = None
# The access log's short cut: (its file, the formatter, the root handlers it is valid for).
_fast: tuple[LogFile, TextFormatter | JSONFormatter, list[logging.Handler]] | None = None
_NO_RECORD = logging.makeLogRecord({})


def setup(who: Identity, *, path: str = "", link: str = "", encoding: str = "TEXT", level: str | int = "INFO",
          shoal_level: str | int | None = None, extra_attrs: Sequence[str] = (),
          terminal_level: int = logging.WARNING) -> LogFile | None:
    """Send this process's log records (and, with ``path``, its stdout and stderr) where they belong.

    With ``path``: records of every level from ``level`` up go to that rotating file, one line
    each, in ``encoding``; WARNING and above also to the terminal (readable, multi-line); stdout
    and stderr are redirected into the file. ``link`` names a symlink to create to ``path``
    (a file kept in ``logging_config.logs_dir`` is found from the instance's log folder).
    Without ``path``: records go to stderr in ``encoding``. Idempotent per process.
    """
    global _current, _fast
    made: LogFile | None = None
    if path:
        stream = _terminal()
        made = LogFile(path, capture=True)  # may raise OSError: then nothing changed
    _fast = None
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    context = RecordContext(who)
    fmt: logging.Formatter = (JSONFormatter(who, extra_attrs=extra_attrs) if encoding == "JSON"
                              else TextFormatter(who, extra_attrs=extra_attrs))
    if made is not None:
        if _current is not None:  # reconfigured: write to the new file from now on
            _current.close()
        made.setFormatter(fmt)
        made.addFilter(context)
        root.addHandler(made)
        if stream is not None:
            terminal = logging.StreamHandler(stream)
            terminal.setLevel(terminal_level)
            terminal.setFormatter(TextFormatter(who, one_line=False))
            terminal.addFilter(context)
            root.addHandler(terminal)
        try:
            sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
            sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            pass
        if sys.stdout is not None and not isinstance(sys.stdout, DiskFullTolerant):
            sys.stdout = DiskFullTolerant(sys.stdout)
        if sys.stderr is not None and not isinstance(sys.stderr, DiskFullTolerant):
            sys.stderr = DiskFullTolerant(sys.stderr)
        if link and os.path.abspath(link) != os.path.abspath(path):
            try:
                os.makedirs(os.path.dirname(link), mode=0o700, exist_ok=True)
                os.symlink(os.path.abspath(path), link)
            except FileExistsError:
                pass
            except OSError as e:
                logging.getLogger("shoal.logs").warning("cannot link %s to %s: %s", link, path, e)
        # Only the instance's own folder: a logs_dir may hold other files; the links lead there.
        prune(os.path.dirname(link or path))
        _current = made
        _watch_size(made)
        if not extra_attrs and isinstance(fmt, (TextFormatter, JSONFormatter)):
            _fast = (made, fmt, list(root.handlers))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(fmt)
        handler.addFilter(context)
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("shoal").setLevel(shoal_level if shoal_level is not None else level)
    return made


def log_access(method: str, path: str, status: int | str, started: float, request_id: str,
               route: str = "") -> None:
    """One access-log line for a finished request: ``GET /path 200 1.2ms`` (HTTP) or
    ``CALL method OK 0.3ms`` (handle calls). ``started`` is a ``time.monotonic()`` reading."""
    if not access_logger.isEnabledFor(logging.INFO):
        return
    ms = (time.monotonic() - started) * 1000.0
    fast = _fast
    # While records of shoal.access would only reach this process's own file (nobody added a
    # handler), write the line straight there: a fifth of the cost of a log record.
    if fast is not None and not access_logger.handlers and fast[2] == logging.getLogger().handlers \
            and fast[0].stream is not None:
        fast[0].write_line(fast[1].access_line(time.time(), method, path, status, ms, request_id, route))
        return
    # On the request path: build the record directly, skipping logging's search of the stack
    # for the caller's file and line (a third of the cost of a plain logger.info()).
    record = access_logger.makeRecord(
        "shoal.access", logging.INFO, __file__, 0, "%s %s %s %.2fms", (method, path, status, ms), None,
        extra={"method": method, "path": path, "status": status, "latency_ms": round(ms, 3),
               "request_id": request_id, "route": route})
    access_logger.handle(record)
