"""Who owns an instance directory, and which session's logs it writes.

One instance per directory: two controllers on one directory would share one control socket
path (the second binds over the first's, and deletes it when it stops, so ``shoal status`` says
nothing runs while the first keeps serving). So ``shoal run`` and a detached controller
(``shoal start``) hold an exclusive ``flock`` on ``<run dir>/instance.lock``, which holds the
owner's pid. The kernel lets go of the lock when the owner dies however it dies, so a crashed
owner never blocks the next start; a lock that is held names the pid that holds it.

Logs per session: each owner starts a session, ``session_<UTC date>_<time>_<pid>``, whose
replica and proxy logs live in ``<run dir>/logs/<session>/``. The file ``<run dir>/session``
names the current one (:attr:`RunDir.logs_dir` reads it), so ``shoal logs`` reads the current
session by default. The :data:`KEEP_SESSIONS` newest session folders are kept; older ones are
deleted when a session starts (never one whose files a live process still writes).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import time

from shoal.observability.logs import is_live

__all__ = ["KEEP_SESSIONS", "LOCK_FILE", "SESSION_FILE", "InstanceBusyError", "InstanceLock", "begin_session",
           "held_here", "lock_holder", "read_session", "sessions"]

# The directories this process holds (by real path): a second lock on one of them from this
# process would conflict with the first (flock locks belong to the open file, not the process).
_HELD: dict[str, InstanceLock] = {}


def held_here(path: str) -> bool:
    """Whether this process already holds the instance directory ``path``."""
    return os.path.realpath(path) in _HELD

LOCK_FILE = "instance.lock"
SESSION_FILE = "session"
# How many sessions' log folders a directory keeps (the current one included).
KEEP_SESSIONS = 5
SESSION_NAME = re.compile(r"session_[0-9]{8}_[0-9]{6}_[0-9]+")


class InstanceBusyError(RuntimeError):
    """Another live process owns the instance directory; ``pid`` is that process (None when
    the lock file does not say)."""

    def __init__(self, path: str, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"another shoal instance ({who}) is already running on {path}; stop it first (Ctrl-C in its terminal, "
            f"or `shoal shutdown --address {path}`), or use another directory with --address or $SHOAL_RUN_DIR")
        self.path = path
        self.pid = pid


def _read_pid(fd: int) -> int | None:
    try:
        data = os.pread(fd, 64, 0)
    except OSError:
        return None
    text = data.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


class InstanceLock:
    """The exclusive hold of one instance directory by this process, until :meth:`release`
    (or this process's exit). ``dir_fd`` is the checked directory's descriptor."""

    def __init__(self, path: str, dir_fd: int) -> None:
        self.path = path
        self.fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            st = os.fstat(self.fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise PermissionError(f"{os.path.join(path, LOCK_FILE)} is not a file of this user; "
                                      "shoal will not use it: remove it")
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InstanceBusyError(path, _read_pid(self.fd)) from None
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise
        _HELD[os.path.realpath(path)] = self

    def release(self) -> None:
        """Let go of the directory (the file stays: removing it would race the next owner)."""
        fd, self.fd = self.fd, -1
        if _HELD.get(os.path.realpath(self.path)) is self:
            del _HELD[os.path.realpath(self.path)]
        if fd >= 0:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            os.close(fd)


def lock_holder(path: str) -> int | None:
    """The pid of the live process that owns the directory ``path`` (0 when its lock file does
    not say which), or None when nobody holds it."""
    try:
        fd = os.open(os.path.join(path, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or 0
        return None
    finally:
        os.close(fd)


def read_session(path: str) -> str | None:
    """The current session's name in the directory ``path``, if it names a well-formed one."""
    try:
        fd = os.open(os.path.join(path, SESSION_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        name = os.read(fd, 128).decode("ascii", "replace").strip()
    except OSError:
        return None
    finally:
        os.close(fd)
    return name if SESSION_NAME.fullmatch(name) else None


def sessions(logs_root: str) -> list[str]:
    """The session folders under ``logs_root``, oldest first (their names sort by start time)."""
    try:
        names = os.listdir(logs_root)
    except OSError:
        return []
    out = []
    for name in names:
        if SESSION_NAME.fullmatch(name):
            try:
                st = os.lstat(os.path.join(logs_root, name))
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                out.append(name)
    return sorted(out, key=lambda n: (n[:24], int(n[24:]) if n[24:].isdigit() else 0))


def _writes_live(folder: str) -> bool:
    for base, _dirs, files in os.walk(folder):
        if any(f.endswith(".log") and is_live(os.path.join(base, f)) for f in files):
            return True
    return False


def _write_pointer(dir_fd: int, name: str) -> None:
    """``<dir>/session`` names ``name``, written whole (a temporary file renamed over it)."""
    tmp = f"{SESSION_FILE}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.write(fd, f"{name}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, SESSION_FILE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def begin_session(path: str, dir_fd: int, *, keep: int = KEEP_SESSIONS, reuse: bool = False,
                  now: float | None = None) -> str:
    """Start a session in the instance directory ``path`` (its checked descriptor ``dir_fd``):
    make its log folder, point ``<path>/session`` at it, and delete all but the ``keep`` newest
    sessions. With ``reuse`` the current session goes on when there is one (a detached
    controller adopting the replicas that write there). Returns the session's name."""
    current = read_session(path) if reuse else None
    name = current or time.strftime("session_%Y%m%d_%H%M%S", time.gmtime(now)) + f"_{os.getpid()}"
    logs_root = os.path.join(path, "logs")
    os.makedirs(os.path.join(logs_root, name), mode=0o700, exist_ok=True)
    _write_pointer(dir_fd, name)
    old = [s for s in sessions(logs_root) if s != name]
    for victim in old[:max(len(old) - max(keep - 1, 0), 0)]:
        folder = os.path.join(logs_root, victim)
        if not _writes_live(folder):
            shutil.rmtree(folder, ignore_errors=True)
    return name
