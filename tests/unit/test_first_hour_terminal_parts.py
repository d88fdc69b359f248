"""The pure parts behind issue 19's terminal items: bounded replica lines, the instance lock
and log sessions, what Ctrl-C says, the progress note, the port check."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shoal.cli.devloop import SLOW_AFTER_S, progress_note
from shoal.cli.replica_output import LineSplitter, ReplicaOutput
from shoal.cli.runcmd import check_port
from shoal.cli.stopping import describe_drain
from shoal.runtime.ownership import InstanceBusyError, begin_session, lock_holder, read_session, sessions
from shoal.runtime.rundir import RunDir


def test_lines_are_bounded_and_cut_lines_say_so() -> None:
    split = LineSplitter(max_line=10)
    assert split.feed(b"ab") == []
    assert split.feed(b"c\nde") == ["abc"]
    for _ in range(1000):  # a 100 kB line arriving in pieces: never held whole
        assert split.feed(b"x" * 100) == []
        assert len(split.partial) <= 10
    assert split.feed(b"\nnext\n") == ["dexxxxxxxx ... [line cut: 99992 more bytes]", "next"]
    assert split.feed(b"tail") == [] and split.flush() == ["tail"]


def test_replica_output_prefixes_escapes_and_follows_new_files(tmp_path: Path) -> None:
    files: list[tuple[str, str]] = []
    written: list[str] = []
    out = ReplicaOutput(lambda: list(files), written.append)
    a = tmp_path / "a.log"
    a.write_bytes(b"2026-01-01 10:00:00,000 INFO replica app/Embed/Embed-1 pid=4242 me: hello\nprinted \x1b[2J\n")
    files.append(("app/Embed", str(a)))
    out.poll()
    assert written == ["(Embed pid=4242) 2026-01-01 10:00:00,000 INFO me: hello", "(Embed pid=4242) printed \\x1b[2J"]
    assert out.last_line("app/Embed") == "printed \\x1b[2J"
    with a.open("ab") as f:
        f.write(b"partial")
    out.poll()
    assert len(written) == 2  # no half line
    out.stop()
    assert written[-1] == "(Embed pid=4242) partial"


def test_second_owner_is_refused_naming_the_pid(tmp_path: Path) -> None:
    rd = RunDir(str(tmp_path / "inst"))
    lock = rd.lock()
    assert lock_holder(rd.path) == os.getpid()
    code = textwrap.dedent(f"""
        from shoal.runtime.rundir import RunDir
        try:
            RunDir({rd.path!r}).lock()
        except Exception as e:
            print(type(e).__name__, e)
    """)
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert got.stdout.startswith("InstanceBusyError"), got.stderr
    assert f"pid {os.getpid()}" in got.stdout and rd.path in got.stdout
    lock.release()
    assert lock_holder(rd.path) is None
    rd.lock().release()  # free again


def test_a_dead_owner_does_not_block(tmp_path: Path) -> None:
    rd = RunDir(str(tmp_path / "inst"))
    code = f"from shoal.runtime.rundir import RunDir; import os; RunDir({rd.path!r}).lock(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (tmp_path / "inst" / "instance.lock").exists()
    rd.lock().release()


def test_busy_error_names_pid() -> None:
    assert "pid 77" in str(InstanceBusyError("/x", 77))


def test_sessions_pruned_to_the_newest(tmp_path: Path) -> None:
    rd = RunDir(str(tmp_path / "inst")).create_private()
    names = [begin_session(rd.path, rd.dir_fd(), keep=3, now=1_700_000_000 + i) for i in range(5)]
    assert sessions(rd.logs_root) == names[-3:]
    assert read_session(rd.path) == names[-1]
    assert rd.logs_dir == os.path.join(rd.logs_root, names[-1])
    assert begin_session(rd.path, rd.dir_fd(), keep=3, reuse=True) == names[-1]


def test_what_ctrl_c_says() -> None:
    text = describe_drain({"app/Slow": {"STARTING": 1}, "app/Fast": {"RUNNING": 2}}, 25.0, 0.0)
    assert "3 replica(s)" in text and "app/Slow (1 starting)" in text and "app/Fast (2 running)" in text
    assert "at most 25s" in text and "Ctrl-C again" in text


def test_progress_note_moves_and_shows_the_last_line() -> None:
    dep = {"status": "UPDATING", "message": ""}
    assert progress_note(dep, 0, 1, 1.2, None) == "1s"
    assert progress_note(dep, 0, 1, 2.4, None) == "2s"
    line = "2026-01-01 10:00:00,000 INFO my.module: downloading shard 3 of 9"
    assert progress_note(dep, 0, 1, 4.0, line).endswith("| downloading shard 3 of 9[/dim]")
    assert "slow" in progress_note(dep, 0, 1, SLOW_AFTER_S + 1, None)
    assert progress_note(dep, 1, 1, 99.0, line) == ""


def test_port_in_use_names_the_flag() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        why = check_port("127.0.0.1", port)
    assert why is not None and "--port" in why and str(port) in why
    assert check_port("127.0.0.1", 0) is None




def test_path_hint_when_shoal_is_not_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import shutil

    from shoal.cli import runcmd

    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "shoal").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    hint = runcmd.path_hint()
    assert hint is not None and "venv/bin/shoal status" in hint and "source venv/bin/activate" in hint
    monkeypatch.setattr(shutil, "which", lambda name: str(bin_dir / "shoal"))
    assert runcmd.path_hint() is None


def test_make_run_takes_a_port() -> None:
    if shutil_which("make") is None:
        pytest.skip("no make")
    got = subprocess.run(["make", "-n", "run", "PORT=8001"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert "shoal run --port 8001 " in got.stdout, got.stdout + got.stderr


def shutil_which(name: str) -> str | None:
    import shutil

    return shutil.which(name)


@pytest.mark.parametrize("tailed", ["1", ""])
def test_a_tailed_replica_leaves_the_terminal_to_shoal_run(tmp_path: Path, tailed: str) -> None:
    code = textwrap.dedent(f"""
        import logging, os
        from shoal.observability import logs
        logs.setup(logs.Identity("replica", "D-1", "app", "D"), path={str(tmp_path / "D-1.log")!r})
        logging.getLogger("x").warning("careful")
        kinds = [type(h).__name__ for h in logging.getLogger().handlers]
        open({str(tmp_path / "kinds")!r}, "w").write(",".join(kinds))
    """)
    env = {**os.environ, "SHOAL_REPLICA_OUTPUT_TAILED": tailed}
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert got.returncode == 0, got.stderr
    assert "careful" in (tmp_path / "D-1.log").read_text()
    assert ("careful" in got.stderr) is (not tailed)
    assert ("StreamHandler" in (tmp_path / "kinds").read_text()) is (not tailed)


def test_a_traceback_record_is_shown_as_lines_each_prefixed(tmp_path: Path) -> None:
    written: list[str] = []
    a = tmp_path / "a.log"
    record = ("2026-01-01 10:00:00,000 ERROR replica app/Front/Front-1 pid=77 shoal.proxy: request failed: boom"
              "\\nTraceback (most recent call last):\\n  File \"/home/me/app.py\", line 26, in __call__\\n"
              "    return 1 / 0\\nZeroDivisionError: division by zero\n"
              "2026-01-01 10:00:01,000 INFO replica app/Front/Front-1 pid=77 me: a\\nb stays one line\n")
    a.write_bytes(record.encode())
    out = ReplicaOutput(lambda: [("app/Front", str(a))], written.append)
    out.poll()
    out.stop()
    assert written == [
        "(Front pid=77) 2026-01-01 10:00:00,000 ERROR shoal.proxy: request failed: boom",
        "(Front pid=77) Traceback (most recent call last):",
        '(Front pid=77)   File "/home/me/app.py", line 26, in __call__',
        "(Front pid=77)     return 1 / 0",
        "(Front pid=77) ZeroDivisionError: division by zero",
        "(Front pid=77) 2026-01-01 10:00:01,000 INFO me: a\\nb stays one line",
    ]
