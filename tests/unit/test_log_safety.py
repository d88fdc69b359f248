"""Log files never go through another user's symbolic link, and nothing logged can steer a terminal.

The attacks are real: links and folders are made the way another local user would make them
(owned by ``nobody``, which needs root to arrange; those tests are skipped otherwise), in front
of a root-only file that must survive.
"""

from __future__ import annotations

import logging
import os
import pty
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.observability.logs import (
    EscapingFormatter,
    Identity,
    JSONFormatter,
    LogFile,
    TextFormatter,
    UnsafeLogPath,
    is_live,
    prune,
)
from shoal.observability.safefiles import open_dir
from shoal.observability.safetext import escape, escape_line

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="making files owned by another user needs root")
WHO = Identity("replica", "D-1", "app", "D")
SECRET = "root only\n"


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A root-only file outside every log folder: what an attacker's link points at."""
    d = tmp_path / "etc"
    d.mkdir(mode=0o700)
    f = d / "shadow"
    f.write_text(SECRET)
    f.chmod(0o600)
    yield f


def others_link(link: Path, target: Path | str) -> None:
    """A symbolic link as another user would make it."""
    link.symlink_to(target)
    os.lchown(link, NOBODY, NOBODY)


def shared(d: Path, mode: int = 0o777) -> Path:
    """A folder every user can write (like a careless ``logs_dir``)."""
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(mode)
    return d


# --- prune -------------------------------------------------------------------------------


@as_root
def test_prune_leaves_the_target_of_another_users_link(tmp_path: Path, victim: Path) -> None:
    logs = shared(tmp_path / "logs")
    others_link(logs / "D-0.log", victim)
    os.utime(logs / "D-0.log", (1000, 1000), follow_symlinks=False)
    prune(str(logs), keep=0)
    assert victim.read_text() == SECRET
    assert (logs / "D-0.log").is_symlink()  # not ours either: left alone


@as_root
def test_prune_does_not_follow_a_logs_dir_file_swapped_for_a_link(tmp_path: Path, victim: Path) -> None:
    # A replica's file lives in a shared logs_dir, linked from the instance's own folder; another
    # user replaces the file there with a link to a root-only file. Pruning removes our link
    # and nothing the other user's link points at.
    own, logs_dir = tmp_path / "own", shared(tmp_path / "shared")
    own.mkdir()
    target = logs_dir / "replica_app_D_D-0.log"
    (own / "D-0.log").symlink_to(target)
    others_link(target, victim)
    others_link(Path(f"{target}.1"), victim)
    os.utime(own / "D-0.log", (1000, 1000), follow_symlinks=False)
    prune(str(own), keep=0)
    assert victim.read_text() == SECRET
    assert not (own / "D-0.log").exists() and not (own / "D-0.log").is_symlink()


@as_root
def test_prune_leaves_a_regular_file_of_another_user(tmp_path: Path) -> None:
    logs = shared(tmp_path / "logs")
    theirs = logs / "D-0.log"
    theirs.write_text("theirs")
    os.chown(theirs, NOBODY, NOBODY)
    os.utime(theirs, (1000, 1000))
    prune(str(logs), keep=0)
    assert theirs.read_text() == "theirs"


@as_root
def test_prune_does_not_descend_through_a_linked_folder(tmp_path: Path) -> None:
    # <logs>/app is another user's link to a folder of ours elsewhere: its files stay.
    elsewhere = tmp_path / "elsewhere" / "D"
    elsewhere.mkdir(parents=True)
    keep = elsewhere / "D-0.log"
    keep.write_text("keep me")
    os.utime(keep, (1000, 1000))
    logs = shared(tmp_path / "logs")
    others_link(logs / "app", tmp_path / "elsewhere")
    prune(str(logs / "app" / "D"), keep=0)
    assert keep.read_text() == "keep me"
    with pytest.raises(UnsafeLogPath, match="owned by uid 65534"):
        os.close(open_dir(str(logs / "app" / "D")))


def test_prune_deletes_our_own_gone_files_and_links(tmp_path: Path) -> None:
    own, logs_dir = tmp_path / "own", tmp_path / "logs_dir"
    own.mkdir()
    logs_dir.mkdir()
    for i in range(3):
        target = logs_dir / f"replica_app_D_D-{i}.log"
        target.write_text("x")
        Path(f"{target}.1").write_text("older")
        (own / f"D-{i}.log").symlink_to(target)
        os.utime(own / f"D-{i}.log", (1000 + i, 1000 + i), follow_symlinks=False)
    prune(str(own), keep=1)
    assert sorted(p.name for p in own.iterdir()) == ["D-2.log"]
    assert sorted(p.name for p in logs_dir.iterdir()) == ["replica_app_D_D-2.log", "replica_app_D_D-2.log.1"]


# --- writing -----------------------------------------------------------------------------


def _write_one(path: Path, text: str = "a line") -> LogFile:
    h = LogFile(str(path))
    h.setFormatter(TextFormatter(WHO))
    h.emit(logging.makeLogRecord({"msg": text, "levelname": "INFO", "levelno": logging.INFO}))
    h.flush()
    return h


@as_root
def test_a_log_file_that_is_a_link_is_not_written_through(tmp_path: Path, victim: Path) -> None:
    logs = shared(tmp_path / "logs", 0o1777)
    others_link(logs / "replica_app_D_D-1.log", victim)
    h = _write_one(logs / "replica_app_D_D-1.log")
    try:
        assert victim.read_text() == SECRET
        st = os.lstat(logs / "replica_app_D_D-1.log")
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o640
        assert "a line" in (logs / "replica_app_D_D-1.log").read_text()
        assert any("was a symbolic link" in n and str(victim) in n for n in h.notes), h.notes
    finally:
        h.close()


@as_root
def test_a_link_that_cannot_be_removed_gets_a_fresh_name_beside_it() -> None:
    """Run as ``nobody`` (a forked child: no exec needed), in a sticky folder where a third user
    put a link under the log file's name: it cannot be removed, so a fresh name is used."""
    base = Path(tempfile.mkdtemp(prefix="shoal-h4", dir="/tmp"))  # pytest's own folder is root-only
    try:
        base.chmod(0o755)
        victim = base / "victim"
        victim.write_text(SECRET)
        victim.chmod(0o666)  # even writable by nobody: still not written through the link
        logs = shared(base / "logs", 0o1777)
        (logs / "D-1.log").symlink_to(victim)
        os.lchown(logs / "D-1.log", NOBODY - 1, NOBODY - 1)
        said = _as_nobody(logs / "D-1.log")
        written, notes = said.split("\n", 1)
        assert victim.read_text() == SECRET and (logs / "D-1.log").is_symlink()
        assert Path(written).parent == logs and Path(written).name.startswith("D-1-") and written.endswith(".log")
        assert "written by nobody" in Path(written).read_text() and os.stat(written).st_uid == NOBODY
        assert "cannot be removed: not followed; writing D-1-" in notes, notes
    finally:
        shutil.rmtree(base)


def _as_nobody(path: Path) -> str:
    """Write one line to the log file ``path`` as ``nobody`` in a forked child; what it wrote
    to (and the notes), through a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            h = _write_one(path, "written by nobody")
            os.write(write_end, f"{h.baseFilename}\n{'|'.join(h.notes)}".encode())
            h.close()
            code = 0
        except BaseException as e:  # anything goes back to the parent
            os.write(write_end, repr(e).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        said = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, said
    return said


@as_root
def test_another_users_file_under_our_name_is_replaced_not_appended_to(tmp_path: Path) -> None:
    logs = shared(tmp_path / "logs")
    theirs = logs / "proxy.log"
    theirs.write_text("planted\n")
    os.chown(theirs, NOBODY, NOBODY)
    h = _write_one(theirs)
    try:
        assert os.stat(theirs).st_uid == os.geteuid() and "planted" not in theirs.read_text()
        assert any("owned by uid 65534" in n for n in h.notes)
    finally:
        h.close()


@as_root
def test_a_linked_folder_on_the_way_is_refused(tmp_path: Path, victim: Path) -> None:
    logs = shared(tmp_path / "logs")
    others_link(logs / "app", victim.parent)
    with pytest.raises(UnsafeLogPath, match="owned by uid 65534"):
        LogFile(str(logs / "app" / "shadow"))
    assert victim.read_text() == SECRET


def test_links_nobody_else_controls_are_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "mine").symlink_to("real")  # ours, in a folder only we write
    h = _write_one(tmp_path / "mine" / "sub" / "D-1.log")
    try:
        assert "a line" in (real / "sub" / "D-1.log").read_text() and not h.notes
    finally:
        h.close()


def test_a_fifo_under_the_name_blocks_nothing(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "D-1.log")
    script = textwrap.dedent('''
        import sys
        from shoal.observability.logs import LogFile, is_live
        from shoal.cli.logs import tail_lines
        assert tail_lines(sys.argv[1], 5) == [] and not is_live(sys.argv[1])
        h = LogFile(sys.argv[1]); print(h.notes); h.close()
    ''')
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "D-1.log")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert "not a regular file" in r.stdout and (tmp_path / "D-1.log").is_file()


@as_root
def test_rotation_renames_only_our_files_and_never_writes_through_a_link(tmp_path: Path, victim: Path) -> None:
    logs = shared(tmp_path / "logs", 0o1777)
    path = logs / "D-1.log"
    h = LogFile(str(path), max_bytes=10, backups=2)
    h.setFormatter(logging.Formatter("%(message)s"))
    try:
        others_link(Path(f"{path}.2"), victim)
        for i in range(4):
            h.emit(logging.makeLogRecord({"msg": f"line {i} " + "x" * 20}))
            h.doRollover()
        # The current name swapped for another user's link just before a rotation.
        path.unlink()
        others_link(path, victim)
        h.doRollover()
        h.emit(logging.makeLogRecord({"msg": "after the swap"}))
        h.flush()
    finally:
        h.close()
    assert victim.read_text() == SECRET
    assert path.is_file() and not path.is_symlink() and "after the swap" in path.read_text()
    assert all(p.is_file() and not p.is_symlink() for p in logs.iterdir())


def test_setup_warns_about_a_logs_dir_others_can_write(tmp_path: Path) -> None:
    script = textwrap.dedent('''
        import sys
        from shoal.observability import logs
        logs.setup(logs.Identity("replica", "D-1", "app", "D"), path=sys.argv[1])
    ''')
    for d, loose in ((shared(tmp_path / "open"), True), (shared(tmp_path / "sticky", 0o1777), False),
                     (shared(tmp_path / "closed", 0o755), False)):
        r = subprocess.run([sys.executable, "-c", script, str(d / "D-1.log")], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        said = f"{d} is writable by other users and has no sticky bit" in r.stderr
        assert said == loose, (d, r.stderr)
        if loose:
            assert said and "WARNING" in r.stderr and f"{d} is writable" in (d / "D-1.log").read_text()


def test_is_live_sees_through_our_own_link_only(tmp_path: Path) -> None:
    real = tmp_path / "real.log"
    h = LogFile(str(real))
    try:
        (tmp_path / "ours.log").symlink_to(real)
        assert is_live(str(tmp_path / "ours.log"))
        if os.geteuid() == 0:
            others_link(tmp_path / "theirs.log", real)
            assert not is_live(str(tmp_path / "theirs.log"))
    finally:
        h.close()


# --- escaping ----------------------------------------------------------------------------

NASTY = "a\x1b]0;pwned\x07b\x1b[2Jc\x9b31md\x7fe\u202ef\u2028g\x00h"


def test_escape_shows_every_control_and_keeps_text() -> None:
    assert escape(NASTY) == "a\\x1b]0;pwned\\x07b\\x1b[2Jc\\x9b31md\\x7fe\\u202ef\\u2028g\\x00h"
    assert escape("tab\tand\nnewline, é ü 日本 🙂") == "tab\tand\nnewline, é ü 日本 🙂"
    assert escape_line("one\ntwo\r\tthree") == "one\\ntwo\\r\tthree"
    assert escape(escape(NASTY)) == escape(NASTY)


def _raw_controls(text: str) -> list[str]:
    return [c for c in text if (ord(c) < 0x20 and c not in "\t\n") or 0x7f <= ord(c) <= 0x9f or c in "\u202e\u2028"]


def test_text_and_json_lines_carry_no_control_characters() -> None:
    record = logging.makeLogRecord({"msg": "user says %s", "args": (NASTY,), "levelname": "INFO",
                                    "request_id": NASTY, "name": "user"})
    for fmt in (TextFormatter(WHO), TextFormatter(WHO, one_line=False), JSONFormatter(WHO)):
        line = fmt.format(record)
        assert not _raw_controls(line) and "\n" not in line, (fmt, line)
        access = fmt.access_line(time.time(), NASTY, "/p" + NASTY, 404, 1.0, NASTY, NASTY)
        assert not _raw_controls(access) and "\n" not in access, (fmt, access)
    assert "pwned\\x07b\\x1b[2J" in TextFormatter(WHO).format(record)
    assert "\\u001b]0;pwned\\u0007" in JSONFormatter(WHO).format(record) and "\\u007f" in JSONFormatter(WHO).format(
        record)


def test_escaping_formatter_for_plain_stderr_lines() -> None:
    record = logging.makeLogRecord({"msg": "path %s", "args": (NASTY,), "levelname": "INFO", "name": "proxy"})
    line = EscapingFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert not _raw_controls(line) and line.startswith("INFO proxy: path a\\x1b]0;pwned")


# --- shoal logs --------------------------------------------------------------------------


def _instance_with_raw_escapes(tmp_path: Path) -> Path:
    d = tmp_path / "logs" / "app" / "D"
    d.mkdir(parents=True)
    # What a replica's own print() puts in its file: raw, shoal does not see it.
    (d / "D-1.log").write_bytes(b"printed \x1b]0;pwned\x07 and \x1b[2J\tcleared \xc2\x9b5m\n")
    return tmp_path


def test_shoal_logs_prints_escapes_as_text(tmp_path: Path) -> None:
    run_dir = _instance_with_raw_escapes(tmp_path)
    r = subprocess.run([sys.executable, "-m", "shoal.cli", "logs", "app/D", "--address", str(run_dir)],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert b"\x1b" not in r.stdout and b"\x07" not in r.stdout and b"\xc2\x9b" not in r.stdout
    assert r.stdout == b"[D-1] printed \\x1b]0;pwned\\x07 and \\x1b[2J\tcleared \\x9b5m\n"


def test_shoal_logs_on_a_terminal_prints_escapes_as_text(tmp_path: Path) -> None:
    """On a terminal (colors on: click strips nothing), only shoal's own color codes are raw."""
    run_dir = _instance_with_raw_escapes(tmp_path)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "logs", "app/D", "--address", str(run_dir)],
                            stdout=follower, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the other end closed
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(leader)
        assert proc.wait(60) == 0
    assert b"pwned" in out and b"\\x1b]0;pwned\\x07" in out
    assert b"\x07" not in out and b"\x1b]" not in out and b"\x1b[2J" not in out
    # The one raw ESC left is click's color for the label.
    assert out.count(b"\x1b[") == 2 and out.startswith(b"\x1b[")
