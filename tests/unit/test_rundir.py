"""The instance directory is private: created 0700, and one made by another user is refused."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.exceptions import InstanceNotFoundError
from shoal.runtime.rundir import RunDir, check_private_dir, private_dir


def test_created_private_and_loosened_ones_tightened(tmp_path: Path) -> None:
    created = private_dir(str(tmp_path / "a" / "inst"))
    assert stat.S_IMODE(os.stat(created).st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)
    private_dir(str(loose))
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o700


def test_symbolic_links_and_files_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(str(link))
    (tmp_path / "file").write_text("x")
    with pytest.raises((PermissionError, FileExistsError)):
        private_dir(str(tmp_path / "file"))


@pytest.mark.skipif(os.getuid() != 0, reason="making a directory of another user needs root")
def test_another_users_directory_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(PermissionError, match="belongs to another user"):
        check_private_dir(str(theirs))
    with pytest.raises(PermissionError):
        private_dir(str(theirs))


# -- RunDir: the layout and the choice of directory -------------------------------------------



def test_layout_names_every_file(tmp_path: Path) -> None:
    rd = RunDir(str(tmp_path))
    assert rd.controller_socket == str(tmp_path / "controller.sock")
    assert rd.secret == str(tmp_path / "secret")
    assert rd.state_db == str(tmp_path / "state.db")
    assert rd.http_fd_socket == str(tmp_path / "http-fd.sock")
    assert rd.controller_log == str(tmp_path / "controller.log")
    assert rd.controller_pid == str(tmp_path / "controller.pid")
    assert rd.logs_dir == str(tmp_path / "logs")
    assert rd.metrics_dir == str(tmp_path / "metrics")
    assert rd.replica_socket("ab12") == str(tmp_path / "r-ab12.sock")
    assert rd.replica_socket("ab12", 3) == str(tmp_path / "r-ab12-3.sock")
    assert RunDir(str(tmp_path)) == rd and len({rd, RunDir(str(tmp_path))}) == 1


def test_secret_written_private_and_read_back(tmp_path: Path) -> None:
    rd = RunDir(str(tmp_path / "inst")).create_private()
    rd.write_secret(b"s" * 32)
    assert rd.read_secret() == b"s" * 32
    assert stat.S_IMODE(os.stat(rd.secret).st_mode) == 0o600


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty instances root under tmp_path, and no $SHOAL_RUN_DIR."""
    monkeypatch.delenv("SHOAL_RUN_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield Path(RunDir.instances_root())


def _listen(rd: RunDir) -> socket.socket:
    rd.create_private()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(rd.controller_socket)
    s.listen()
    return s


def test_instances_root_is_per_user(root: Path) -> None:
    assert root.name == f"shoal-{os.getuid()}"
    assert RunDir.default().path == str(root / "default")


def test_new_instance_takes_default_unless_live(root: Path) -> None:
    assert RunDir.for_new_instance() == RunDir.default()
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700
    with _listen(RunDir.default()):
        assert RunDir.for_new_instance().path == str(root / f"i-{os.getpid()}")


def test_env_wins_everywhere(root: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHOAL_RUN_DIR", str(tmp_path / "env"))
    assert RunDir.for_new_instance().path == str(tmp_path / "env")
    assert RunDir.for_start(None).path == str(tmp_path / "env")
    assert RunDir.for_start("/x").path == "/x"
    assert RunDir.find_for_logs(None).path == str(tmp_path / "env")
    with pytest.raises(InstanceNotFoundError, match="SHOAL_RUN_DIR="):
        RunDir.find_running(None)


def test_find_running(root: Path) -> None:
    with pytest.raises(InstanceNotFoundError, match="no running shoal instance found"):
        RunDir.find_running(None)
    with pytest.raises(InstanceNotFoundError, match="no running shoal instance at /nowhere"):
        RunDir.find_running("/nowhere")
    a, b = RunDir(str(root / "a")), RunDir(str(root / "b"))
    with _listen(a):
        assert RunDir.find_running(None) == a
        assert RunDir.find_running(a.path) == a
        with _listen(b):
            with pytest.raises(InstanceNotFoundError, match="several shoal instances"):
                RunDir.find_running(None)
            with _listen(RunDir.default()):
                assert RunDir.find_running(None) == RunDir.default()


def test_find_for_logs_reads_stopped_default(root: Path, tmp_path: Path) -> None:
    with pytest.raises(InstanceNotFoundError, match="no shoal instance directory at"):
        RunDir.find_for_logs(str(tmp_path / "missing"))
    assert RunDir.find_for_logs(str(tmp_path)).path == str(tmp_path)
    with pytest.raises(InstanceNotFoundError):
        RunDir.find_for_logs(None)
    os.makedirs(RunDir.default().logs_dir)
    assert RunDir.find_for_logs(None) == RunDir.default()
