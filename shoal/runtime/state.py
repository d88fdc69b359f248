"""A detached instance's desired and observed state, in an embedded SQLite file.

The controller of ``shoal start`` writes here every deployed application (its spec, with the
pickled code it was deployed with, so a restart does not re-import anything) and every
process it runs (replicas, the proxy, with their pids), plus a few instance facts such as the
HTTP port. A controller started later on the same directory reads it back: it redeploys the
applications and adopts the processes that are still alive instead of starting new ones.

Writes are small and synchronous (WAL mode, ``synchronous=NORMAL``); they happen on deploys
and on replica starts and stops, never on the request path.
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol

import cloudpickle

from shoal.deployment import AppSpec

SCHEMA_VERSION = 1

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

    def close(self) -> None:
        pass


class StateStore:
    """The SQLite file of one instance directory (``<run_dir>/state.db``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        fresh = not os.path.exists(path)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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

    # -- instance facts
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # -- applications
    def save_app(self, key: str, spec: AppSpec, deployed_at: float) -> None:
        # cloudpickle: an autoscaling policy given as a function object travels by value.
        blob = cloudpickle.dumps(portable(spec), protocol=5)
        self.db.execute("INSERT INTO apps (key, spec, deployed_at) VALUES (?, ?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET spec = excluded.spec, deployed_at = excluded.deployed_at",
                        (key, blob, deployed_at))

    def delete_app(self, key: str) -> None:
        self.db.execute("DELETE FROM apps WHERE key = ?", (key,))

    def load_apps(self) -> list[tuple[str, AppSpec, float]]:
        out = []
        for key, blob, deployed_at in self.db.execute("SELECT key, spec, deployed_at FROM apps ORDER BY rowid"):
            out.append((str(key), pickle.loads(blob), float(deployed_at)))
        return out

    # -- processes
    def save_process(self, process_id: str, role: str, pid: int, **info: Any) -> None:
        self.db.execute("INSERT INTO processes (ident, role, pid, info) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT(ident) DO UPDATE SET pid = excluded.pid, info = excluded.info",
                        (process_id, role, pid, json.dumps(info)))

    def delete_process(self, process_id: str) -> None:
        self.db.execute("DELETE FROM processes WHERE ident = ?", (process_id,))

    def load_processes(self) -> list[ProcessRow]:
        return [ProcessRow(str(i), str(r), int(p), json.loads(info))
                for i, r, p, info in self.db.execute("SELECT ident, role, pid, info FROM processes")]

    def clear(self) -> None:
        """Forget everything (``shoal shutdown``): the next start begins empty."""
        self.db.execute("DELETE FROM apps")
        self.db.execute("DELETE FROM processes")

    def close(self) -> None:
        self.db.close()


def portable(spec: AppSpec) -> AppSpec:
    """A copy of ``spec`` that pickles without user code objects: each deployment keeps its
    pickled bytes (``serialized()``) and drops the live class/function and arguments."""
    from dataclasses import replace

    deps = {}
    for name, d in spec.deployments.items():
        blob = d.serialized()
        deps[name] = replace(d, func_or_class=None, init_args=(), init_kwargs={}, _blob=blob)
    return replace(spec, deployments=deps)
