"""Issue 15: the state store of a detached instance never fails the controller on a failed
write, and a damaged state file is recognised, set aside, and the instance's processes found."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from shoal.deployment import AppSpec
from shoal.runtime.rundir import PROCESS_MARKER_ENV, RunDir
from shoal.runtime.state import StateStore, damage, known_pids, set_aside


class FlakyDB:
    """A connection whose statements fail while ``failing`` (as on a full disk)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.failing = False

    def execute(self, sql: str, params: Any = ()) -> Any:
        if self.failing and not sql.lstrip().upper().startswith(("SELECT", "ROLLBACK")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, params)

    def close(self) -> None:
        self.db.close()


def _rows(path: str) -> tuple[set[str], set[str], dict[str, str]]:
    with sqlite3.connect(path) as db:
        return ({str(k) for (k,) in db.execute("SELECT key FROM apps")},
                {str(i) for (i,) in db.execute("SELECT ident FROM processes")},
                {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")})


def test_failed_writes_are_kept_retried_in_order_and_warned_once(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    path = str(tmp_path / "state.db")
    store = StateStore(path)
    flaky = FlakyDB(store.db)
    store.db = flaky  # type: ignore[assignment]
    store.save_process("r1", "replica", 11, app="a")
    flaky.failing = True
    with caplog.at_level(logging.WARNING, logger="shoal.state"):
        store.save_process("r2", "replica", 12, app="a")  # never raises
        store.set_meta("http_port", "8000")
        store.delete_process("r1")
        store.save_process("r2", "replica", 13, app="a")  # the latest per process wins
        store.retry(force=True)
    assert list(store.pending) == [("meta", "http_port"), ("process", "r1"), ("process", "r2")]
    assert sum("cannot write the state file" in r.message for r in caplog.records) == 1
    assert _rows(path)[1] == {"r1"}

    flaky.failing = False
    store.retry(force=True)
    assert not store.pending
    assert _rows(path)[1] == {"r2"} and _rows(path)[2]["http_port"] == "8000"
    assert [r.pid for r in store.load_processes()] == [13]
    store.close()


def test_clear_while_failing_wins_over_older_writes(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = StateStore(path)
    store.save_process("r1", "replica", 11)
    flaky = FlakyDB(store.db)
    store.db = flaky  # type: ignore[assignment]
    flaky.failing = True
    store.save_process("r2", "replica", 12)
    store.clear()
    flaky.failing = False
    store.close()  # retries what is pending
    assert _rows(path)[1] == set()


def test_an_app_that_cannot_be_unpickled_is_left_out(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    store = StateStore(path)
    store.save_app("good", AppSpec(name="good", route_prefix="/", ingress="", deployments={}), 1.0)
    store.db.execute("INSERT INTO apps (key, spec, deployed_at) VALUES ('bad', x'00112233', 2.0)")
    assert [k for k, _, _ in store.load_apps()] == ["good"]
    store.close()


def _written_and_abandoned(path: str) -> None:
    """A controller that wrote its state and died without closing the file (kill -9)."""
    code = (f"from shoal.runtime.state import StateStore\ns = StateStore({path!r})\n"
            "for i in range(50):\n    s.save_process(f'r{i}', 'replica', 1000 + i, app='x' * 200)\n"
            "s.db.execute('PRAGMA wal_checkpoint(TRUNCATE)')\nimport os\nos._exit(0)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_damage_finds_truncated_empty_and_foreign_files(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    assert damage(path) is None and known_pids(path) is None  # no file: nothing to say
    _written_and_abandoned(path)
    assert damage(path) is None
    assert known_pids(path) == set(range(1000, 1050))
    with open(path, "r+b") as f:
        f.truncate(100)
    assert "malformed" in (damage(path) or "")
    assert known_pids(path) is None
    open(path, "wb").close()
    assert damage(path) == "the file is empty"
    Path(path).write_text("not sqlite at all, just text" * 10)
    assert damage(path) == "not an SQLite database"


def test_set_aside_moves_the_file_and_its_wal(tmp_path: Path) -> None:
    path = str(tmp_path / "state.db")
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).write_bytes(b"x")
    moved = set_aside(path, now=0.0)
    again = Path(path)
    again.write_bytes(b"y")
    moved_again = set_aside(path, now=0.0)
    assert moved != moved_again and moved.startswith(path + ".damaged-")
    assert sorted(os.listdir(tmp_path)) == sorted(
        [os.path.basename(moved), os.path.basename(moved) + "-wal", os.path.basename(moved) + "-shm",
         os.path.basename(moved_again)])


def test_the_instance_processes_are_found_by_their_marker_only(tmp_path: Path) -> None:
    rd = RunDir(str(tmp_path / "inst"))
    other = RunDir(str(tmp_path / "other"))
    sleeper = "import time; time.sleep(60)"
    # A runtime module name in the command line and the instance's marker: ours. The same
    # without the marker, or with another instance's: not ours.
    argv = [sys.executable, "-c", sleeper, "shoal.runtime.replica"]
    mine = subprocess.Popen(argv, env={**os.environ, PROCESS_MARKER_ENV: rd.metrics_dir})
    theirs = subprocess.Popen(argv, env={**os.environ, PROCESS_MARKER_ENV: other.metrics_dir})
    plain = subprocess.Popen([sys.executable, "-c", sleeper], env={**os.environ, PROCESS_MARKER_ENV: rd.metrics_dir})
    try:
        # Until a child has exec'd, /proc shows the parent's command line and environment.
        assert wait_until(lambda: rd.processes() == [mine.pid], 10), rd.processes()
        assert rd.owns(mine.pid) and not rd.owns(theirs.pid) and not rd.owns(plain.pid)
        from shoal.runtime.daemon import stop_processes

        assert stop_processes(rd, [mine.pid, theirs.pid], term_wait_s=5, kill_wait_s=5) == []
        mine.wait(5)
        assert theirs.poll() is None, "another instance's process was signalled"
        assert not rd.owns(mine.pid)
    finally:
        for p in (mine, theirs, plain):
            p.kill()
            p.wait()


def test_a_controller_that_does_not_answer_blocks_a_new_start(tmp_path: Path) -> None:
    from shoal.runtime.daemon import prepare_start

    rd = RunDir(str(tmp_path / "inst"))
    os.makedirs(rd.path)
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "shoal.runtime.daemon",
            json.dumps({"run_dir": rd.path})]
    other = subprocess.Popen([*argv[:-1], json.dumps({"run_dir": str(tmp_path / "other")})])
    assert prepare_start(rd) == []
    hung = subprocess.Popen(argv)
    try:
        # Until the child has exec'd, /proc shows the parent's command line.
        assert wait_until(lambda: rd.controllers() == [hung.pid], 10), rd.controllers()
        with pytest.raises(RuntimeError, match="does not answer"):
            prepare_start(rd)
    finally:
        for p in (hung, other):
            p.kill()
            p.wait()
