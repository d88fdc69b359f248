"""A detached instance's desired and observed state, in an embedded SQLite file.

The controller of ``shoal start`` writes here every deployed application (its spec, with the
pickled code it was deployed with, so a restart does not re-import anything) and every
process it runs (replicas, the proxy, with their pids), plus a few instance facts such as the
HTTP port. A controller started later on the same directory reads it back: it redeploys the
applications and adopts the processes that are still alive instead of starting new ones.

Writes are small and synchronous (WAL mode, ``synchronous=NORMAL``); they happen on deploys
and on replica starts and stops, never on the request path.

**Failures.** A write that fails (a full disk, an I/O error) never fails the controller: the
controller's memory stays the truth, the write is kept (the latest per application, process
or fact), a warning says so (at most every :data:`WARN_EVERY_S`), and it is retried before the
next write and whenever the controller calls :meth:`StateStore.retry`. A file that cannot be
read at all (truncated, not a database, failing SQLite's check) is found by :func:`damage`
before a controller opens it and moved aside by :func:`set_aside`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Protocol

import cloudpickle

from shoal.deployment import AppSpec

logger = logging.getLogger("shoal.state")

SCHEMA_VERSION = 1
# At most one warning about failing writes this often.
WARN_EVERY_S = 60.0
# Writes that failed are tried again at most this often.
RETRY_EVERY_S = 1.0
# The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"
# SQLite's primary result codes for a file whose content is bad.
SQLITE_CORRUPT = 11
SQLITE_NOTADB = 26
_TABLES = ("meta", "apps", "processes")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS apps (
    key TEXT PRIMARY KEY,          -- application name, or "<name>#canary"
    spec BLOB NOT NULL,            -- pickled AppSpec (code as pickled bytes, never imported here)
    deployed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS processes (
    ident TEXT PRIMARY KEY,        -- replica tag or proxy id
    role TEXT NOT NULL,            -- "replica" | "proxy"
    pid INTEGER NOT NULL,
    info TEXT NOT NULL             -- JSON: app, deployment, version, socket_path, serves_http
);
"""


@dataclass(frozen=True)
class ProcessRow:
    process_id: str  # a replica id, rank id or proxy id; the column is still named "ident"
    role: str
    pid: int
    info: dict[str, Any]


class Store(Protocol):
    """Where the controller keeps what a later controller needs: :class:`StateStore` (a
    detached instance's SQLite file) or :class:`MemoryStore` (an embedded instance)."""

    path: str

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...

    def save_app(self, key: str, spec: AppSpec, deployed_at: float) -> None: ...

    def delete_app(self, key: str) -> None: ...

    def load_apps(self) -> list[tuple[str, AppSpec, float]]: ...

    def save_process(self, process_id: str, role: str, pid: int, **info: Any) -> None: ...

    def delete_process(self, process_id: str) -> None: ...

    def load_processes(self) -> list[ProcessRow]: ...

    def clear(self) -> None: ...

    def retry(self, force: bool = False) -> None: ...

    def close(self) -> None: ...


class MemoryStore:
    """The store of an embedded instance: nothing outlives the process, so it only keeps the
    values in dictionaries (specs are not pickled)."""

    def __init__(self) -> None:
        self.path = ":memory:"
        self.meta: dict[str, str] = {}
        self.apps: dict[str, tuple[AppSpec, float]] = {}
        self.processes: dict[str, ProcessRow] = {}

    def get_meta(self, key: str) -> str | None:
        return self.meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self.meta[key] = value

    def save_app(self, key: str, spec: AppSpec, deployed_at: float) -> None:
        self.apps[key] = (spec, deployed_at)

    def delete_app(self, key: str) -> None:
        self.apps.pop(key, None)

    def load_apps(self) -> list[tuple[str, AppSpec, float]]:
        return [(key, spec, at) for key, (spec, at) in self.apps.items()]

    def save_process(self, process_id: str, role: str, pid: int, **info: Any) -> None:
        self.processes[process_id] = ProcessRow(process_id, role, pid, dict(info))

    def delete_process(self, process_id: str) -> None:
        self.processes.pop(process_id, None)

    def load_processes(self) -> list[ProcessRow]:
        return list(self.processes.values())

    def clear(self) -> None:
        self.apps.clear()
        self.processes.clear()

    def retry(self, force: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


# A write: its statements, run in one transaction.
_Write = tuple[tuple[str, tuple[Any, ...]], ...]


class StateStore:
    """The SQLite file of one instance directory (``<run_dir>/state.db``).

    Opening it raises when the file cannot be opened (check it with :func:`damage` first);
    writes never raise (see the module's docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        fresh = not os.path.exists(path)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        # Writes not in the file yet, oldest first: key ("app", name) ... -> statements.
        self.pending: dict[tuple[str, ...], _Write] = {}
        self.failures = 0  # writes that failed since the store was opened
        self._warned_at = -math.inf
        self._tried_at = -math.inf
        if fresh:
            os.chmod(path, 0o600)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        version = self.get_meta("schema_version")
        if version is None:
            self.set_meta("schema_version", str(SCHEMA_VERSION))
        elif int(version) != SCHEMA_VERSION:
            raise RuntimeError(f"{path}: state schema version {version}, this shoal reads {SCHEMA_VERSION}; "
                               "remove the file to start empty")

    # -- writing, with failures kept for later
    def _write(self, key: tuple[str, ...], *statements: tuple[str, tuple[Any, ...]]) -> None:
        if self.pending:
            self.retry()
        if self.pending:  # still failing: keep the order, this one after the others
            self.pending.pop(key, None)
            self.pending[key] = statements
            return
        try:
            self._run(statements)
        except sqlite3.Error as e:
            self.pending[key] = statements
            self._tried_at = time.monotonic()
            self._failed(e)

    def _run(self, statements: _Write) -> None:
        if len(statements) == 1:
            self.db.execute(*statements[0])
            return
        self.db.execute("BEGIN")
        try:
            for sql, params in statements:
                self.db.execute(sql, params)
            self.db.execute("COMMIT")
        except sqlite3.Error:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            raise

    def _failed(self, error: sqlite3.Error) -> None:
        self.failures += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            logger.warning("cannot write the state file %s (%s): the controller goes on with the state in memory "
                           "and retries; %d change(s) not saved yet (a restarted controller would not know them)",
                           self.path, error, len(self.pending))

    def retry(self, force: bool = False) -> None:
        """Write what failed before, oldest first; stop at the first that still fails. At
        most every :data:`RETRY_EVERY_S` unless ``force``."""
        if not self.pending:
            return
        now = time.monotonic()
        if not force and now - self._tried_at < RETRY_EVERY_S:
            return
        self._tried_at = now
        while self.pending:
            key = next(iter(self.pending))
            try:
                self._run(self.pending[key])
            except sqlite3.Error as e:
                self._failed(e)
                return
            del self.pending[key]
        logger.warning("the state file %s is written again; every change is saved", self.path)
        self._warned_at = -math.inf

    # -- instance facts
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._write(("meta", key), ("INSERT INTO meta (key, value) VALUES (?, ?) "
                                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value)))

    # -- applications
    def save_app(self, key: str, spec: AppSpec, deployed_at: float) -> None:
        # cloudpickle: an autoscaling policy given as a function object travels by value.
        blob = cloudpickle.dumps(portable(spec), protocol=5)
        self._write(("app", key), ("INSERT INTO apps (key, spec, deployed_at) VALUES (?, ?, ?) "
                                   "ON CONFLICT(key) DO UPDATE SET spec = excluded.spec, "
                                   "deployed_at = excluded.deployed_at", (key, blob, deployed_at)))

    def delete_app(self, key: str) -> None:
        self._write(("app", key), ("DELETE FROM apps WHERE key = ?", (key,)))

    def load_apps(self) -> list[tuple[str, AppSpec, float]]:
        """The saved applications; one that cannot be read back is left out (with an error)."""
        out = []
        for key, blob, deployed_at in self.db.execute("SELECT key, spec, deployed_at FROM apps ORDER BY rowid"):
            try:
                spec = pickle.loads(blob)
            except Exception as e:
                logger.error("cannot read application %r back from %s (%s: %s); deploy it again",
                             key, self.path, type(e).__name__, e)
                continue
            out.append((str(key), spec, float(deployed_at)))
        return out

    # -- processes
    def save_process(self, process_id: str, role: str, pid: int, **info: Any) -> None:
        self._write(("process", process_id),
                    ("INSERT INTO processes (ident, role, pid, info) VALUES (?, ?, ?, ?) "
                     "ON CONFLICT(ident) DO UPDATE SET pid = excluded.pid, info = excluded.info",
                     (process_id, role, pid, json.dumps(info))))

    def delete_process(self, process_id: str) -> None:
        self._write(("process", process_id), ("DELETE FROM processes WHERE ident = ?", (process_id,)))

    def load_processes(self) -> list[ProcessRow]:
        return [ProcessRow(str(i), str(r), int(p), json.loads(info))
                for i, r, p, info in self.db.execute("SELECT ident, role, pid, info FROM processes")]

    def clear(self) -> None:
        """Forget everything (``shoal shutdown``): the next start begins empty."""
        self.pending = {k: w for k, w in self.pending.items() if k[0] == "meta"}
        self._write(("clear",), ("DELETE FROM apps", ()), ("DELETE FROM processes", ()))

    def close(self) -> None:
        self.retry(force=True)
        if self.pending:
            logger.error("closing the state file %s with %d change(s) not saved", self.path, len(self.pending))
        self.db.close()


# ---- a damaged file ---------------------------------------------------------------------------


def _corrupt(error: sqlite3.Error) -> bool:
    """Whether ``error`` says the file's content is bad (not that it could not be reached)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code is None:
        return "malformed" in str(error) or "not a database" in str(error)
    return code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


def damage(path: str) -> str | None:
    """Why the state file at ``path`` cannot be used (truncated, not a database, failing
    SQLite's check, tables missing or unreadable); None when it can, or when there is none.
    Raises ``RuntimeError`` when it cannot be checked (the file cannot be opened or read: a
    full disk, permissions), which says nothing about its content. Call it while no
    controller has the file open."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RuntimeError(f"cannot check the state file {path}: {e.strerror or e}") from None
    if not head:
        return "the file is empty"
    if head != SQLITE_HEADER:
        return "not an SQLite database"
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise RuntimeError(f"cannot check the state file {path}: {e}") from None
    try:
        problems = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            return "SQLite's check failed: " + "; ".join(problems[:3])
        names = {str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in _TABLES if t not in names]
        if missing:
            return f"tables missing: {', '.join(missing)}"
        db.execute("SELECT key, value FROM meta").fetchall()
        db.execute("SELECT key, length(spec), deployed_at FROM apps").fetchall()
        for (info,) in db.execute("SELECT info FROM processes"):
            json.loads(info)
    except ValueError as e:
        return f"cannot be read: {e}"
    except sqlite3.Error as e:
        if _corrupt(e):
            return f"cannot be read: {e}"
        raise RuntimeError(f"cannot check the state file {path}: {e}") from None
    finally:
        db.close()
    return None


def set_aside(path: str, now: float | None = None) -> str:
    """Move a damaged state file (and its WAL files) to ``<path>.damaged-<time>``; the new
    path. The next controller starts with an empty state."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    target = f"{path}.damaged-{stamp}"
    n = 1
    while os.path.exists(target):
        n += 1
        target = f"{path}.damaged-{stamp}-{n}"
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        try:
            os.replace(path + suffix, target + suffix)
        except FileNotFoundError:
            pass
    return target


def known_pids(path: str) -> set[int] | None:
    """The pids the state file at ``path`` records (a controller restarted on it adopts them);
    None when there is no readable file."""
    try:
        if not os.path.exists(path) or damage(path) is not None:
            return None
    except RuntimeError:
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        return {int(p) for (p,) in db.execute("SELECT pid FROM processes")}
    except sqlite3.Error:
        return None
    finally:
        db.close()


def portable(spec: AppSpec) -> AppSpec:
    """A copy of ``spec`` that pickles without user code objects: each deployment keeps its
    pickled bytes (``serialized()``) and drops the live class/function and arguments."""
    from dataclasses import replace

    deps = {}
    for name, d in spec.deployments.items():
        blob = d.serialized()
        deps[name] = replace(d, func_or_class=None, init_args=(), init_kwargs={}, _blob=blob)
    return replace(spec, deployments=deps)
