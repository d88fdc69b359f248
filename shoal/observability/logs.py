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
import io
import logging
import os
import re
import stat
import sys
import threading
import time
from collections.abc import Sequence
from logging.handlers import RotatingFileHandler
from typing import Any

from shoal.observability.logformat import (
    EscapingFormatter,
    Identity,
    JSONFormatter,
    RecordContext,
    Stamp,
    TextFormatter,
)
from shoal.observability.safefiles import UnsafeLogPath, open_dir, open_for_reading, open_log, own_link_target
from shoal.observability.safetext import escape_line

__all__ = [
    "BACKUPS",
    "KEEP_GONE",
    "MAX_BYTES",
    "TAILED_ENV",
    "DiskFullTolerant",
    "EscapingFormatter",
    "Identity",
    "JSONFormatter",
    "LogFile",
    "RecordContext",
    "TextFormatter",
    "UnsafeLogPath",
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
# Set (to "1") by ``shoal run`` when it shows every replica's file on its terminal, prefixed
# (shoal.cli.replica_output): replicas then do not also write their warnings there themselves.
TAILED_ENV = "SHOAL_REPLICA_OUTPUT_TAILED"



def safe_name(name: str) -> str:
    """An application or deployment name as one path component."""
    name = name.replace(os.sep, "_").replace("\0", "_")
    return "_" + name if name in ("", ".", "..") else name


def replica_log_path(root: str, app: str, deployment: str, replica_id: str) -> str:
    return os.path.join(root, safe_name(app), safe_name(deployment), f"{safe_name(replica_id)}.log")


def proxy_log_path(root: str) -> str:
    return os.path.join(root, "proxy.log")


class LogFile(RotatingFileHandler):
    """A rotating log file that can also be this process's stdout and stderr.

    With ``capture``, file descriptors 1 and 2 point at the file (and again at the new one
    after each rotation), so that output which bypasses ``logging`` lands in it too and is
    counted towards the size limit. The file is held with a shared ``flock`` while the process
    lives: :func:`is_live` tells a running replica's file from a dead one's.

    The file and its rotated generations are opened and renamed relative to their folder's
    descriptor and never through a symbolic link (:mod:`shoal.observability.safefiles`); what
    was found unsafe on the way is in :attr:`notes` (``setup`` logs them as warnings).
    """

    def __init__(self, path: str, *, capture: bool = False, max_bytes: int = MAX_BYTES,
                 backups: int = BACKUPS) -> None:
        self.notes: list[str] = []
        path = os.path.abspath(path)
        self._dir_fd = open_dir(os.path.dirname(path), create=True, notes=self.notes)
        self._file_name = os.path.basename(path)
        self._ino = -1
        try:
            super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
                             errors="backslashreplace")
        except BaseException:
            os.close(self._dir_fd)
            raise
        self.capture = capture
        # The size is looked at every this many writes (and every CHECK_EVERY_S by a thread).
        self.check_every = 16
        self._writes = 0
        # A full disk: records dropped since writing last worked, and when the terminal was told.
        self.dropped = 0
        self._failed = False
        self._warned_at = -DROP_WARN_EVERY_S
        self._claim()

    def _open(self) -> io.TextIOWrapper:
        if self._dir_fd < 0:  # written to after close(), as logging.FileHandler allows
            self._dir_fd = open_dir(os.path.dirname(self.baseFilename), create=True, notes=self.notes)
        fd, name = open_log(self._dir_fd, self._file_name, self.baseFilename, self.notes)
        if name != self._file_name:  # the name was another user's: a fresh one beside it
            self._file_name = name
            self.baseFilename = os.path.join(os.path.dirname(self.baseFilename), name)
        self._ino = os.fstat(fd).st_ino
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

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
            self.stream.write(f"{Stamp()(time.time())} WARNING pid={os.getpid()} shoal.logs: {n} log records "
                              "dropped while this file could not be written (disk full)\n")
            self.stream.flush()
        except (OSError, ValueError):
            self.dropped += n

    def doRollover(self) -> None:
        """``name.log`` -> ``name.log.1`` -> ... as ``RotatingFileHandler`` does, but renaming
        only regular files of ours, relative to the folder, and the current name only while it
        is still the file we write."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.backupCount > 0:
            for i in range(self.backupCount - 1, 0, -1):
                self._shift(f"{self._file_name}.{i}", f"{self._file_name}.{i + 1}", -1)
            self._shift(self._file_name, f"{self._file_name}.1", self._ino)
        self.stream = self._open()
        self._claim()

    def _shift(self, src: str, dst: str, ino: int) -> None:
        try:
            st = os.stat(src, dir_fd=self._dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or (ino >= 0 and st.st_ino != ino):
                return
            # rename() replaces whatever ``dst`` is (a link included: the link, not its target).
            os.rename(src, dst, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError:
            pass

    def close(self) -> None:
        super().close()
        with self.lock:  # type: ignore[union-attr]
            if self._dir_fd >= 0:
                os.close(self._dir_fd)
                self._dir_fd = -1

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
    """Whether a process still writes the log file at ``path`` (it holds a lock on it).

    A link is followed only if shoal made it (:func:`~shoal.observability.safefiles.open_for_reading`),
    and a FIFO put there does not block the caller."""
    try:
        fd = open_for_reading(path)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


_GENERATION = re.compile(r"\.[0-9]+")


def prune(directory: str, keep: int = KEEP_GONE) -> None:
    """Delete the files of replicas that are gone, all but the ``keep`` newest, with their
    rotated generations.

    Only what this user owns is touched, and nothing through another user's symbolic link: the
    folder is entered without following such links, entries are looked at with ``lstat``, a
    regular file of ours is deleted, and a link of ours (into ``logging_config.logs_dir``) is
    deleted along with the regular files of ours it names, never with whatever the name there
    has become (:func:`_delete_target`)."""
    try:
        dir_fd = open_dir(directory)
    except OSError:
        return
    try:
        names = os.listdir(dir_fd)
        gone: list[tuple[float, str, str | None]] = []
        for name in names:
            if not name.endswith(".log"):
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if st.st_uid != os.geteuid():
                    continue  # not ours: never ours to delete
                target = own_link_target(os.path.join(directory, name), st)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) and target is None:
                continue
            if is_live(os.path.join(directory, name)):
                continue
            gone.append((st.st_mtime, name, target))
        gone.sort(reverse=True)
        for _, name, target in gone[keep:]:
            _delete_own(dir_fd, name, names)
            if target is not None:
                _delete_target(target)
    finally:
        os.close(dir_fd)


def _delete_own(dir_fd: int, name: str, names: Sequence[str]) -> None:
    """Unlink ``name`` in the folder and its generations (``name.1`` ...) that are regular
    files of ours; unlinkat() removes a name, never what a link points to."""
    for victim in [name, *(n for n in names if n.startswith(name) and _GENERATION.fullmatch(n[len(name):]))]:
        try:
            st = os.stat(victim, dir_fd=dir_fd, follow_symlinks=False)
            kind_ok = stat.S_ISREG(st.st_mode) or (victim == name and stat.S_ISLNK(st.st_mode))
            if st.st_uid == os.geteuid() and kind_ok:
                os.unlink(victim, dir_fd=dir_fd)
        except OSError:
            pass


def _delete_target(target: str) -> None:
    """The file a link of ours named, in a ``logs_dir``: deleted (with its generations) only if
    it is still a regular file of ours there, reached without following others' links."""
    if not target.endswith(".log"):
        return
    try:
        dir_fd = open_dir(os.path.dirname(target))
    except OSError:
        return
    try:
        name = os.path.basename(target)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            return
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid():
            _delete_own(dir_fd, name, os.listdir(dir_fd))
    finally:
        os.close(dir_fd)


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


def _link(target: str, link: str, notes: list[str]) -> None:
    """A symbolic link ``link`` -> ``target``, made in its folder (entered as log folders are)."""
    dir_fd = open_dir(os.path.dirname(os.path.abspath(link)), create=True, notes=notes)
    try:
        os.symlink(target, os.path.basename(link), dir_fd=dir_fd)
    finally:
        os.close(dir_fd)


def setup(who: Identity, *, path: str = "", link: str = "", encoding: str = "TEXT", level: str | int = "INFO",
          shoal_level: str | int | None = None, extra_attrs: Sequence[str] = (),
          terminal_level: int = logging.WARNING) -> LogFile | None:
    """Send this process's log records (and, with ``path``, its stdout and stderr) where they belong.

    With ``path``: records of every level from ``level`` up go to that rotating file, one line
    each, in ``encoding``; WARNING and above also to the terminal (readable, multi-line), unless
    this is a replica whose file ``shoal run`` shows there already (:data:`TAILED_ENV`); stdout
    and stderr are redirected into the file. ``link`` names a symlink to create to ``path``
    (a file kept in ``logging_config.logs_dir`` is found from the instance's log folder).
    The file is never opened through a symbolic link, and folders others could use to swap it
    are warned about (:class:`LogFile`, :mod:`shoal.observability.safefiles`).
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
        if stream is not None and not (who.component == "replica" and os.environ.get(TAILED_ENV) == "1"):
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
                _link(made.baseFilename, link, made.notes)
            except FileExistsError:
                pass
            except OSError as e:
                logging.getLogger("shoal.logs").warning("cannot link %s to %s: %s", link, path, e)
        for note in made.notes:  # what was unsafe on the way to the file (shoal.observability.safefiles)
            logging.getLogger("shoal.logs").warning("log file %s: %s", made.baseFilename, note)
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
    # The client chose the path and the request id: whatever handler gets them, no terminal
    # escape goes with them (the formatters escape whole lines too; this covers any other, and
    # keeps the short cut's JSON the same as a record's).
    method, path, request_id, route = escape_line(method), escape_line(path), escape_line(request_id), \
        escape_line(route)
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
