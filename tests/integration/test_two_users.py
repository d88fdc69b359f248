"""Another local user attacks the instance directory (issue 16): pre-creating the instances
root, swapping directories, serving a decoy controller with a secret of their own. Real users:
the test runs as root, makes a second user, and runs the attacker's code as that user.

The attacker's code runs in a forked child that drops to the attacker's uid and gid (it cannot
exec this interpreter: it may live under a home directory the attacker cannot enter). The
victim is this process (root) and ``python -m shoal.cli`` subprocesses whose ``$TMPDIR`` is a
fresh sticky, world-writable directory made for the test, so the real ``/tmp`` is untouched."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import os
import pickle
import pwd
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until

from shoal.runtime import wire
from shoal.runtime.rundir import RunDir

pytestmark = [
    pytest.mark.skipif(os.getuid() != 0, reason="needs root: it creates a second user and runs code as that user"),
    pytest.mark.skipif(shutil.which("useradd") is None, reason="needs useradd to create the attacking user"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="runs the attacker's code in a forked child"),
]

CHILD_TIMEOUT_S = 30.0
RENAME_EXCHANGE = 2


@dataclass
class User:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="module")
def attacker() -> Iterator[User]:
    name = f"shoal-attacker-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                   capture_output=True, timeout=30)
    try:
        pw = pwd.getpwnam(name)
        yield User(name, pw.pw_uid, pw.pw_gid)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


@pytest.fixture
def tmpdir_env() -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh sticky 1777 directory (like /tmp) and the environment that makes it the
    temporary directory of the shoal commands, with no $SHOAL_RUN_DIR / $XDG_RUNTIME_DIR."""
    top = Path(tempfile.mkdtemp(prefix="shoal-tu", dir="/tmp"))  # short: socket paths
    os.chmod(top, 0o1777)
    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_RUN_DIR", "XDG_RUNTIME_DIR")}
    env.update(TMPDIR=str(top), HF_HUB_OFFLINE="1")
    try:
        yield top, env
    finally:
        _stop_instances(top)
        shutil.rmtree(top, ignore_errors=True)


def _stop_instances(top: Path) -> None:
    """Whatever a shoal command started under ``top`` (should a refusal ever let one through)."""
    for rd in [RunDir(str(d)) for d in top.glob("*/*") if d.is_dir()]:
        for pid in rd.controllers() + rd.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def as_user(user: User, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child as ``user``; what it returns (JSON) comes back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the attacker
        code, out = 1, b"{}"
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            out = json.dumps({"ok": fn()}).encode()
            code = 0
        except BaseException as e:  # reported to the test
            out = json.dumps({"error": repr(e)}).encode()
        finally:
            try:
                while out:
                    out = out[os.write(w, out):]
            finally:
                os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    try:
        while (left := deadline - time.monotonic()) > 0:
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
            raise TimeoutError(f"the attacker's code did not finish within {CHILD_TIMEOUT_S}s")
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b"{}")
    assert "ok" in result, f"the attacker's code failed: {result}"
    return result["ok"]


def shoal(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def _errno_of(action: Callable[[], object]) -> str:
    try:
        action()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "done"


# -- (a) the instances root made by the attacker first -------------------------------------------

@pytest.mark.parametrize("planted", ["directory", "symlink"])
def test_an_instances_root_the_attacker_made_is_refused_by_every_command(
        attacker: User, tmpdir_env: tuple[Path, dict[str, str]], planted: str) -> None:
    top, env = tmpdir_env
    root = top / f"shoal-{os.getuid()}"

    def plant() -> str:
        if planted == "directory":  # inviting: open to everyone, the victim's directory made in it
            os.mkdir(root, 0o777)
            os.chmod(root, 0o777)
        else:
            os.mkdir(top / "mine", 0o777)
            os.chmod(top / "mine", 0o777)
            os.symlink(top / "mine", root)
        return "planted"

    assert as_user(attacker, plant) == "planted"
    why = (f"belongs to another user (uid {attacker.uid})" if planted == "directory"
           else "is a symbolic link, not a directory")
    config = top / "serve.yaml"
    config.write_text("applications:\n- name: a\n  import_path: nowhere:app\n")
    commands = [["start", "--port", "0"], ["status"], ["logs"], ["deploy", str(config)], ["delete", "a"],
                ["shutdown"]]
    for args in commands:
        p = shoal(env, *args)
        assert p.returncode != 0, f"shoal {args[0]} accepted the planted directory: {p.stdout}{p.stderr}"
        assert f"{root} {why}" in p.stderr, f"shoal {args[0]}: {p.stderr}"
        assert "--address or $SHOAL_RUN_DIR" in p.stderr
    embedded = subprocess.run([sys.executable, "-c", "from shoal import serve; serve.start(http_options={'port': 0})"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert embedded.returncode != 0 and f"PermissionError: {root} {why}" in embedded.stderr, embedded.stderr
    victims = [p for p in top.rglob("*") if p.exists() and p.stat().st_uid == 0 and p != config]
    assert victims == [], f"the victim made files in the attacker's directory: {victims}"


# -- (b) a legitimate instance: nothing on its path can be swapped; a decoy socket is refused ------

def _try_to_swap(root: Path, top: Path) -> dict[str, str]:
    """Everything the attacker would do to put a decoy in place of the victim's directory."""
    decoy = top / "decoy"
    os.mkdir(decoy, 0o777)
    libc = ctypes.CDLL(None, use_errno=True)

    def exchange(a: Path, b: Path) -> None:
        at_fdcwd = -100
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return {
        "exchange root": _errno_of(lambda: exchange(root, decoy)),
        "rename root": _errno_of(lambda: os.rename(root, top / "moved")),
        "exchange instance": _errno_of(lambda: exchange(root / "default", decoy)),
        "list root": _errno_of(lambda: os.listdir(root)),
        "create in root": _errno_of(lambda: os.mkdir(root / "i-1")),
        "remove root": _errno_of(lambda: os.rmdir(root)),
    }


class _Marker:
    """A pickle that makes a file when it is loaded: the decoy's payload."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        return (os.open, (self.path, os.O_CREAT | os.O_WRONLY))


def _decoy_controller(directory: Path, secret: bytes, marker: Path) -> int:
    """Fork the attacker's decoy controller: its own secret (readable by anyone) and a socket
    that sends the marker pickle to whoever authenticates. Returns its pid."""
    pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        user = directory.stat()
        os.setgroups([])
        os.setgid(user.st_gid)
        os.setuid(user.st_uid)
        (directory / "secret").write_bytes(secret)
        os.chmod(directory / "secret", 0o644)
        sock = str(directory / "controller.sock")

        async def serve() -> None:
            def decoy() -> wire.FramedProtocol:  # the attacker's own code: no peer check
                payload = pickle.dumps(_Marker(str(marker)))
                return wire.FramedProtocol(secret, True, on_ready=lambda p: p.send_bytes(payload))

            server = await asyncio.get_running_loop().create_unix_server(decoy, sock)
            os.chmod(sock, 0o777)
            async with server:
                await asyncio.sleep(CHILD_TIMEOUT_S * 2)  # bounded: the test kills it first

        asyncio.run(serve())
        code = 0
    finally:
        os._exit(code)


@pytest.fixture
def decoy(attacker: User, tmpdir_env: tuple[Path, dict[str, str]]) -> Iterator[tuple[Path, bytes, Path]]:
    """The attacker's decoy controller in a directory of theirs, and the marker file it tries
    to make the victim create."""
    top, _ = tmpdir_env
    directory = top / "att"

    def make() -> str:
        os.mkdir(directory, 0o755)
        os.chmod(directory, 0o755)
        return "made"

    assert as_user(attacker, make) == "made"
    secret, marker = b"d" * 32, top / "pwned"
    pid = _decoy_controller(directory, secret, marker)
    try:
        assert wait_until(lambda: (directory / "controller.sock").exists(), 15), "the decoy did not start"
        yield directory, secret, marker
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_the_attacker_cannot_swap_a_legitimate_instance(
        attacker: User, tmpdir_env: tuple[Path, dict[str, str]]) -> None:
    top, env = tmpdir_env
    started = shoal(env, "start", "--port", "0")
    assert started.returncode == 0, started.stderr
    try:
        root = top / f"shoal-{os.getuid()}"
        assert f"started shoal at {root}/default" in started.stdout
        tried = as_user(attacker, lambda: _try_to_swap(root, top))
        assert all(result in ("EPERM", "EACCES") for result in tried.values()), tried
        status = shoal(env, "status", "--json")
        assert status.returncode == 0, status.stderr
    finally:
        stopped = shoal(env, "shutdown")
    assert stopped.returncode == 0, stopped.stderr


def test_a_decoy_controller_of_another_user_is_refused_before_its_reply_is_read(
        attacker: User, decoy: tuple[Path, bytes, Path]) -> None:
    directory, secret, marker = decoy
    sock = str(directory / "controller.sock")

    async def connect() -> None:
        await wire.connect_unix(sock, secret, on_message=lambda p, m: None, timeout=5)

    with pytest.raises(wire.AuthError, match=f"the socket {sock} is served by uid {attacker.uid}, not this user"):
        asyncio.run(connect())
    assert not marker.exists(), "the decoy's pickle was loaded"


def test_the_command_line_refuses_a_decoy_socket_and_the_attackers_directory(
        attacker: User, tmpdir_env: tuple[Path, dict[str, str]], decoy: tuple[Path, bytes, Path]) -> None:
    top, env = tmpdir_env
    directory, secret, marker = decoy
    p = shoal(env, "status", "--address", str(directory))
    assert p.returncode != 0 and f"{directory} belongs to another user (uid {attacker.uid})" in p.stderr, p.stderr
    # A directory of the victim's that passes every check but whose socket leads to the decoy
    # (and holds the decoy's secret): the peer's uid is what refuses it.
    mine = top / "mine"
    mine.mkdir(mode=0o700)
    (mine / "secret").write_bytes(secret)
    os.chmod(mine / "secret", 0o600)
    os.symlink(directory / "controller.sock", mine / "controller.sock")
    for args in (["status"], ["delete", "a"], ["shutdown"]):
        p = shoal(env, *args, "--address", str(mine))
        assert p.returncode != 0, p.stdout
        assert f"is served by uid {attacker.uid}, not this user" in p.stderr, p.stderr
    assert not marker.exists(), "the decoy's pickle was loaded"
