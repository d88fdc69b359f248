"""Every component of the instance directory's path is checked, through file descriptors: a
symbolic link, a directory others can write to, or one of another user on the way is refused
with an error naming it; the default place prefers this user's $XDG_RUNTIME_DIR; Unix socket
peers of another user are refused before anything they send is read."""

from __future__ import annotations

import asyncio
import os
import pickle
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.runtime import wire
from shoal.runtime.rundir import RunDir, open_private_dir

ROOT_ONLY = pytest.mark.skipif(os.getuid() != 0, reason="making a directory of another user needs root")
OTHER_UID = 65534  # nobody


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """tmp_path as the temporary directory (so the instances root is under it), no
    $SHOAL_RUN_DIR, no $XDG_RUNTIME_DIR."""
    monkeypatch.delenv("SHOAL_RUN_DIR", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    yield tmp_path


# -- each refusal ------------------------------------------------------------------------------

def test_a_symbolic_link_on_the_way_is_refused(tmp: Path) -> None:
    (tmp / "real").mkdir()
    (tmp / "link").symlink_to(tmp / "real")
    with pytest.raises(PermissionError, match=f"{tmp}/link is a symbolic link, not a directory") as e:
        RunDir(str(tmp / "link" / "inst")).create_private()
    assert "--address or $SHOAL_RUN_DIR" in str(e.value)
    assert not (tmp / "real" / "inst").exists()  # nothing was made through the link


def test_a_symbolic_link_as_the_instance_root_is_refused(tmp: Path) -> None:
    (tmp / "elsewhere").mkdir(mode=0o700)
    (tmp / f"shoal-{os.getuid()}").symlink_to(tmp / "elsewhere")
    with pytest.raises(PermissionError, match="is a symbolic link"):
        RunDir.for_new_instance()
    with pytest.raises(PermissionError, match="is a symbolic link"):
        RunDir.find_running(None)
    with pytest.raises(PermissionError, match="is a symbolic link"):
        RunDir.find_for_logs(None)


@pytest.mark.parametrize(("mode", "who"), [(0o775, "group"), (0o757, "other"), (0o777, "group and other")])
def test_a_directory_others_can_write_on_the_way_is_refused(tmp: Path, mode: int, who: str) -> None:
    shared = tmp / "shared"
    shared.mkdir()
    os.chmod(shared, mode)
    with pytest.raises(PermissionError, match=f"{shared} is writable by {who} \\(mode 0{mode:o}\\)"):
        RunDir(str(shared / "inst")).create_private()
    assert not (shared / "inst").exists()


def test_a_sticky_directory_is_accepted_only_when_root_owns_it(tmp: Path) -> None:
    sticky = tmp / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    rd = RunDir(str(sticky / "inst"))
    if os.getuid() == 0:  # like /tmp
        rd.create_private().close()
        assert stat.S_IMODE(os.stat(rd.path).st_mode) == 0o700
    else:
        with pytest.raises(PermissionError, match="is writable by group and other"):
            rd.create_private()


def test_a_file_on_the_way_is_refused(tmp: Path) -> None:
    (tmp / "file").write_text("x")
    with pytest.raises(PermissionError, match="file is not a directory"):
        open_private_dir(str(tmp / "file" / "inst"), create=True)


def test_a_missing_directory_is_not_made_unless_asked(tmp: Path) -> None:
    with pytest.raises(FileNotFoundError):
        RunDir(str(tmp / "a" / "b")).open()
    assert not (tmp / "a").exists()
    rd = RunDir(str(tmp / "a" / "b")).create_private()
    rd.close()
    assert stat.S_IMODE(os.stat(tmp / "a").st_mode) == 0o700


@ROOT_ONLY
def test_another_users_instances_root_is_refused_everywhere(tmp: Path) -> None:
    root = tmp / "shoal-0"
    root.mkdir(mode=0o777)
    os.chown(root, OTHER_UID, OTHER_UID)
    expected = f"{root} belongs to another user \\(uid {OTHER_UID}\\)"
    for choose in (RunDir.for_new_instance, lambda: RunDir.find_running(None), lambda: RunDir.find_for_logs(None),
                   lambda: RunDir.default().create_private()):
        with pytest.raises(PermissionError, match=expected) as e:
            choose()
        assert "remove it, or choose another directory with --address or $SHOAL_RUN_DIR" in str(e.value)


@ROOT_ONLY
def test_another_users_instance_directory_is_refused(tmp: Path) -> None:
    root = tmp / "shoal-0"
    root.mkdir(mode=0o700)
    leaf = root / "default"
    leaf.mkdir(mode=0o700)
    os.chown(leaf, OTHER_UID, OTHER_UID)
    with pytest.raises(PermissionError, match=f"{leaf} belongs to another user \\(uid {OTHER_UID}\\)"):
        RunDir.default().create_private()
    with pytest.raises(PermissionError, match="belongs to another user"):
        RunDir.find_running(str(leaf))
    with pytest.raises(PermissionError, match="belongs to another user"):
        RunDir.find_for_logs(str(leaf))


@ROOT_ONLY
def test_another_users_directory_on_the_way_is_refused(tmp: Path) -> None:
    home = tmp / "home-of-someone"
    home.mkdir(mode=0o755)
    os.chown(home, OTHER_UID, OTHER_UID)
    with pytest.raises(PermissionError, match=f"{home} belongs to another user \\(uid {OTHER_UID}\\), who could"):
        RunDir(str(home / "inst")).create_private()


@ROOT_ONLY
def test_a_secret_of_another_user_is_not_read(tmp: Path) -> None:
    rd = RunDir(str(tmp / "inst")).create_private()
    rd.write_secret(b"s" * 32)
    os.chown(rd.secret, OTHER_UID, OTHER_UID)
    with pytest.raises(PermissionError, match=f"is not a file of this user \\(uid {OTHER_UID}\\)"):
        rd.read_secret()


def test_a_symlinked_secret_is_not_followed(tmp: Path) -> None:
    rd = RunDir(str(tmp / "inst")).create_private()
    (tmp / "elsewhere").write_bytes(b"e" * 32)
    os.symlink(tmp / "elsewhere", rd.secret)
    with pytest.raises(OSError):
        rd.read_secret()


# -- what is checked is what is used -----------------------------------------------------------

def test_the_checked_directory_is_used_even_if_the_path_changes(tmp: Path) -> None:
    rd = RunDir(str(tmp / "inst")).create_private()
    rd.write_secret(b"a" * 32)
    os.rename(tmp / "inst", tmp / "moved")
    decoy = tmp / "inst"
    decoy.mkdir(mode=0o700)
    (decoy / "secret").write_bytes(b"d" * 32)
    assert rd.read_secret() == b"a" * 32  # through the descriptor: the checked directory
    assert os.path.samefile(rd.through_fd("secret"), tmp / "moved" / "secret")
    rd.write_controller_pid(42)
    assert (tmp / "moved" / "controller.pid").read_text() == "42\n"
    assert not (decoy / "controller.pid").exists()
    rd.close()
    assert rd.read_secret() == b"d" * 32  # closed: opened (and checked) again on next use
    rd.close()


def test_value_semantics_are_kept(tmp: Path) -> None:
    a = RunDir(str(tmp / "inst")).create_private()
    b = RunDir(str(tmp / "inst"))
    assert a == b and hash(a) == hash(b) and a.secret == str(tmp / "inst" / "secret")
    with a:
        assert a.through_fd("x").startswith("/proc/self/fd/")
    assert a._fd is None


# -- where the default directory is ------------------------------------------------------------

def test_xdg_runtime_dir_is_preferred_when_private(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp / "xdg"
    xdg.mkdir(mode=0o700)
    os.chmod(xdg, 0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert RunDir.instances_root() == str(xdg / "shoal")
    assert RunDir.for_new_instance().path == str(xdg / "shoal" / "default")
    assert stat.S_IMODE(os.stat(xdg / "shoal").st_mode) == 0o700


@pytest.mark.parametrize("kind", ["loose", "missing", "relative", "symlink", "file"])
def test_xdg_runtime_dir_is_ignored_unless_private(tmp: Path, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    xdg = tmp / "xdg"
    if kind == "loose":
        xdg.mkdir()
        os.chmod(xdg, 0o755)
    elif kind == "symlink":
        (tmp / "real").mkdir(mode=0o700)
        xdg.symlink_to(tmp / "real")
    elif kind == "file":
        xdg.write_text("x")
    value = "xdg" if kind == "relative" else str(xdg)
    monkeypatch.setenv("XDG_RUNTIME_DIR", value)
    assert RunDir.instances_root() == str(tmp / f"shoal-{os.getuid()}")


@ROOT_ONLY
def test_xdg_runtime_dir_of_another_user_is_ignored(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp / "xdg"
    xdg.mkdir(mode=0o700)
    os.chown(xdg, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert RunDir.instances_root() == str(tmp / f"shoal-{os.getuid()}")


def test_shoal_run_dir_still_wins_over_xdg(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    xdg = tmp / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.setenv("SHOAL_RUN_DIR", str(tmp / "env"))
    assert RunDir.for_new_instance().path == str(tmp / "env")
    assert RunDir.for_start(None).path == str(tmp / "env")


# -- Unix socket peers of another user -----------------------------------------------------------

class _Marker:
    """A pickle that creates a file when loaded: what a decoy server would send."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return (os.open, (self.path, os.O_CREAT | os.O_WRONLY))


def test_a_server_of_another_uid_is_refused_before_its_reply_is_read(
        tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server runs as this user here; this process pretends to be another one (its
    geteuid says so), which is what the client compares SO_PEERCRED with."""
    path, marker, secret = str(tmp / "decoy.sock"), tmp / "ran", b"k" * 32

    async def go() -> None:
        loop = asyncio.get_running_loop()

        payload = pickle.dumps(_Marker(str(marker)))

        def decoy() -> wire.FramedProtocol:  # no peer check, like an attacker's server
            return wire.FramedProtocol(secret, True, on_ready=lambda p: p.send_bytes(payload))

        server = await loop.create_unix_server(decoy, path)
        try:
            real_uid = os.geteuid()
            monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)
            with pytest.raises(wire.AuthError, match=f"the socket {path} is served by uid {real_uid}, not this user"):
                await wire.connect_unix(path, secret, on_message=lambda p, m: None, timeout=5)
            monkeypatch.undo()
        finally:
            server.close()

    asyncio.run(go())
    assert not marker.exists()


def test_a_client_of_another_uid_is_disconnected_before_the_handshake(
        tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, secret = str(tmp / "s.sock"), b"k" * 32
    connected: list[wire.FramedProtocol] = []

    async def go() -> None:
        server = await wire.serve_unix(path, secret, connected.append)
        try:
            real_uid = os.geteuid()
            monkeypatch.setattr(os, "geteuid", lambda: real_uid + 1)
            reader, writer = await asyncio.open_unix_connection(path)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed; no nonce was sent
            writer.close()
            monkeypatch.undo()
        finally:
            server.close()

    asyncio.run(go())
    assert connected == []
