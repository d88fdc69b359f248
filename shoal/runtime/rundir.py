"""The instance directory: where the control socket, replica sockets, the secret, the state,
the logs and the metrics of one shoal instance live.

:class:`RunDir` is the one object that knows the directory's layout (a property per file) and
how the default directory is chosen (class methods, one per situation: a new in-process
instance, ``shoal start``, a command that talks to a running instance, ``shoal logs``).

Every replica and proxy process of an instance is started with :data:`PROCESS_MARKER_ENV`
naming the directory's metrics folder: :meth:`RunDir.processes` finds them by it in ``/proc``
when no controller knows them any more (the controller died and its state file was lost).

It must be private to the user running shoal. Under a shared ``/tmp`` another user could
create ``/tmp/shoal-<uid>`` (or an instance directory in it) first, with a secret and a socket
of their own, or swap directories along the path in between a check and a use: a client that
trusted it would authenticate to their server and unpickle its replies. So every directory is
opened by :func:`open_private_dir`, which walks the path from ``/`` one component at a time
through file descriptors (``O_NOFOLLOW``, then ``fstat`` of what was opened) and accepts it only
when no other user can change any component: each is a real directory owned by root or by this
user, not writable by group or other unless it is root's and sticky (like ``/tmp``); the
instance directory itself (and the instances root, for the default directories) belongs to this
user and is made ``0700``. Once that holds, no other user can rename anything along the path, so
the path stays what was checked. A :class:`RunDir` also keeps the descriptor of its directory
once checked, and reads and writes its secret and pid file through it.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import socket
import stat
import tempfile
from typing import TYPE_CHECKING

from shoal.exceptions import InstanceNotFoundError

if TYPE_CHECKING:
    from shoal.runtime.ownership import InstanceLock

__all__ = ["ENV_VAR", "PROCESS_MARKER_ENV", "InstanceNotFoundError", "RunDir", "check_private_dir", "open_private_dir",
           "private_dir", "write_whole"]

ENV_VAR = "SHOAL_RUN_DIR"
DEFAULT_NAME = "default"
# The variable every replica and proxy process starts with (prometheus-client's multiprocess
# directory, ``<run dir>/metrics``): which instance a process belongs to.
PROCESS_MARKER_ENV = "PROMETHEUS_MULTIPROC_DIR"
# In the command line of every runtime process (``python -m shoal.runtime.<module>``).
_RUNTIME_MODULE = b"shoal.runtime."
_DAEMON_MODULE = b"shoal.runtime.daemon"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_ADVICE = "remove it, or choose another directory with --address or $SHOAL_RUN_DIR"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _refuse(path: str, why: str) -> PermissionError:
    return PermissionError(f"{path} {why}; shoal will not use it: {_ADVICE}")


def _check_on_the_way(path: str, st: os.stat_result) -> None:
    """A directory on the way to an instance directory: nobody but root and this user may be
    able to replace what it holds."""
    uid = st.st_uid
    if uid not in (0, os.getuid()):
        raise _refuse(path, f"belongs to another user (uid {uid}), who could replace what it holds")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and not (uid == 0 and mode & stat.S_ISVTX):
        who = "group and other" if mode & 0o022 == 0o022 else ("group" if mode & 0o020 else "other")
        raise _refuse(path, f"is writable by {who} (mode {mode:04o}), who could replace what it holds")


def _check_own(path: str, fd: int, st: os.stat_result) -> None:
    """The instance directory (or the instances root): this user's, and made 0700."""
    if st.st_uid != os.getuid():
        raise _refuse(path, f"belongs to another user (uid {st.st_uid}), not to this user (uid {os.getuid()})")
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o700)


def _open_component(parent_fd: int, name: str, path: str, create: bool) -> int:
    """Open directory ``name`` in ``parent_fd`` without following a symbolic link; create it
    (0700) when missing and ``create``."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, "no such directory", path) from None
    except NotADirectoryError:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        what = "is a symbolic link, not a directory" if stat.S_ISLNK(st.st_mode) else "is not a directory"
        raise _refuse(path, what) from None
    except PermissionError:  # a directory we may not search: say whose it is
        _check_on_the_way(path, os.stat(name, dir_fd=parent_fd, follow_symlinks=False))
        raise _refuse(path, "cannot be opened (permission denied)") from None
    try:
        os.mkdir(name, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        pass  # made in between: checked like any other
    return _open_component(parent_fd, name, path, False)


def open_private_dir(path: str, *, create: bool = False, private: int = 1) -> int:
    """Open directory ``path`` and return its descriptor, checking every component on the way
    from ``/`` (see the module's docstring); the last ``private`` components must be this
    user's and are made 0700. Missing components are created (0700) with ``create``, else
    ``FileNotFoundError``. A component that fails a check raises ``PermissionError`` naming it
    and why.

    Each component is opened relative to the descriptor of its parent and checked with
    ``fstat`` of what was opened, so what is checked is what is used."""
    path = os.path.abspath(path)
    names = [n for n in path.split("/") if n]
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_on_the_way("/", os.fstat(fd))
        current = ""
        for i, name in enumerate(names):
            current = f"{current}/{name}"
            child = _open_component(fd, name, current, create)
            os.close(fd)
            fd = child
            st = os.fstat(fd)
            if i >= len(names) - private:
                _check_own(current, fd, st)
            else:
                _check_on_the_way(current, st)
        return fd
    except BaseException:
        os.close(fd)
        raise


def check_private_dir(path: str) -> None:
    """Raise ``PermissionError`` unless ``path`` is a directory this user can trust (see
    :func:`open_private_dir`); remove group and other permissions from it."""
    os.close(open_private_dir(path))


def private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check it like :func:`check_private_dir`."""
    os.close(open_private_dir(path, create=True))
    return path


def _xdg_runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` when it is an absolute path to a directory of this user, mode 0700
    (as the login manager makes it); None otherwise, silently."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg or not os.path.isabs(xdg):
        return None
    try:
        st = os.lstat(xdg)
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700:
        return xdg
    return None


def _socket_accepts(path: str) -> bool:
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


class RunDir:
    """One instance directory. Cheap to build; nothing touches the disk until asked.

    Its first checked use (:meth:`open`, :meth:`create_private`, :meth:`read_secret` ...)
    checks it with :func:`open_private_dir` and keeps the directory's descriptor, until
    :meth:`close`. The file properties are the real paths (handed to other processes, named in
    messages); :meth:`through_fd` gives a path that resolves through the descriptor. Equal
    (and hashed) by path."""

    __slots__ = ("_fd", "_private", "path")

    def __init__(self, path: str, *, private: int = 1) -> None:
        self.path = path
        self._fd: int | None = None
        # How many trailing components must be this user's (2: the instances root too).
        self._private = private

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # late in interpreter shutdown
            pass

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDir({self.path!r})"

    def __str__(self) -> str:
        return self.path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    # -- the layout ------------------------------------------------------------------------

    @property
    def controller_socket(self) -> str:
        """The controller's admin/membership socket; an instance is live when it accepts."""
        return self._file("controller.sock")

    @property
    def secret(self) -> str:
        """The instance's shared secret (0600): every connection authenticates with it."""
        return self._file("secret")

    @property
    def state_db(self) -> str:
        """The desired state of a detached instance (``shoal start``)."""
        return self._file("state.db")

    @property
    def http_fd_socket(self) -> str:
        """Where the proxy hands its listening socket over to its successor."""
        return self._file("http-fd.sock")

    def replica_fd_socket(self, pid: int) -> str:
        """Where an ingress replica serving HTTP (process ``pid``) hands the listening socket
        over: a restarted controller takes it there when the proxy died too."""
        return self._file(f"http-fd-{pid}.sock")

    def fd_holders(self) -> list[str]:
        """Every hand-over socket of the listening socket: the proxy's first, then replicas'."""
        return [self.http_fd_socket, *sorted(glob.glob(self._file("http-fd-*.sock")))]

    @property
    def controller_log(self) -> str:
        """The log of a detached instance's controller process."""
        return self._file("controller.log")

    @property
    def controller_pid(self) -> str:
        """The pid file a detached controller writes once it serves."""
        return self._file("controller.pid")

    @property
    def logs_root(self) -> str:
        """The folder of every session's logs (``<logs root>/<session>/``)."""
        return self._file("logs")

    @property
    def logs_dir(self) -> str:
        """Replica and proxy log files: ``<logs>/<app>/<deployment>/<replica>.log``, ``proxy.log``;
        ``<logs>`` is the current session's folder when an owner started one
        (:mod:`shoal.runtime.ownership`), else the logs root itself (an in-process instance)."""
        from shoal.runtime.ownership import read_session

        session = read_session(self.path)
        return os.path.join(self.logs_root, session) if session else self.logs_root

    def lock(self) -> InstanceLock:
        """Own this directory (created and checked first) until the returned lock is released
        or this process exits; :class:`~shoal.runtime.ownership.InstanceBusyError` names the
        pid of a live owner."""
        from shoal.runtime.ownership import InstanceLock

        return InstanceLock(self.path, self.create_private().dir_fd())

    def owner(self) -> int | None:
        """The pid of the live process that owns this directory (0: unknown), or None."""
        from shoal.runtime.ownership import lock_holder

        return lock_holder(self.path)

    @property
    def metrics_dir(self) -> str:
        """The Prometheus multiprocess directory every replica and proxy writes into."""
        return self._file("metrics")

    def replica_socket(self, uid: str, rank: int | None = None) -> str:
        """The socket of replica ``uid`` (of rank ``rank`` of a gang replica)."""
        return self._file(f"r-{uid}.sock" if rank is None else f"r-{uid}-{rank}.sock")

    # -- the directory itself -------------------------------------------------------------

    def is_live(self) -> bool:
        """Whether a controller accepts connections on this directory's socket."""
        return _socket_accepts(self.controller_socket)

    def open(self, *, create: bool = False) -> RunDir:
        """Check the directory (:func:`open_private_dir`; created with ``create``) and keep its
        descriptor; returns ``self``. Once open, it is not checked again. ``PermissionError``
        names a component that fails the check; ``FileNotFoundError`` when it is missing."""
        if self._fd is None:
            self._fd = open_private_dir(self.path, create=create, private=self._private)
        return self

    def close(self) -> None:
        """Let go of the directory's descriptor (a later checked use opens it again)."""
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def dir_fd(self) -> int:
        """The checked directory's descriptor (opened and checked on first use)."""
        fd = self.open()._fd
        assert fd is not None
        return fd

    def through_fd(self, name: str) -> str:
        """A path to ``name`` in this directory that resolves through its checked descriptor
        (``/proc/self/fd/<fd>/<name>``: short enough for any socket name), so it names a file
        of the directory that was checked whatever happened to the path since; the plain
        path where there is no ``/proc``."""
        fd = self.dir_fd()
        via = f"/proc/self/fd/{fd}"
        return f"{via}/{name}" if os.path.isdir(via) else self._file(name)

    def check_private(self) -> None:
        """Check this directory (see :meth:`open`)."""
        self.open()

    def create_private(self) -> RunDir:
        """Create this directory (0700) if needed and check it (see :meth:`open`); returns ``self``."""
        return self.open(create=True)

    def read_secret(self) -> bytes:
        """The secret's bytes, read through the checked directory; ``PermissionError`` when the
        file is not a regular file of this user, ``OSError`` when it cannot be read."""
        fd = os.open("secret", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd())
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise _refuse(self.secret, f"is not a file of this user (uid {st.st_uid})")
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write_secret(self, secret: bytes) -> None:
        """Write the secret, readable by this user only: whole or not at all (``OSError`` on a
        full disk, leaving any previous secret as it was)."""
        write_whole("secret", secret, 0o600, dir_fd=self.dir_fd())

    def write_controller_pid(self, pid: int) -> None:
        """Write the controller's pid file whole, or raise ``OSError``."""
        write_whole("controller.pid", f"{pid}\n".encode(), 0o644, dir_fd=self.dir_fd())

    # -- the instance's processes -------------------------------------------------------------

    def owns(self, pid: int) -> bool:
        """Whether ``pid`` is a live (not zombie) replica or proxy process of this instance:
        it runs a shoal runtime module and its environment names this directory's metrics
        folder. Never decided by a process's name alone."""
        try:
            stat_line = _read(f"/proc/{pid}/stat")
            cmdline = _read(f"/proc/{pid}/cmdline")
            environ = _read(f"/proc/{pid}/environ")
        except OSError:
            return False
        state = stat_line.rsplit(b")", 1)[-1].split()[:1]
        if state in ([b"Z"], [b"X"]) or _RUNTIME_MODULE not in cmdline or _DAEMON_MODULE in cmdline:
            return False
        prefix = PROCESS_MARKER_ENV.encode() + b"="
        for entry in environ.split(b"\0"):
            if entry.startswith(prefix):
                value = os.fsdecode(entry[len(prefix):])
                return os.path.realpath(value) == os.path.realpath(self.metrics_dir)
        return False

    def controllers(self) -> list[int]:
        """Live detached controllers (``shoal.runtime.daemon``) started on this directory,
        answering or not, other than this process."""
        try:
            pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
        except OSError:
            return []
        found = []
        for pid in pids:
            if pid == os.getpid():
                continue
            try:
                argv = _read(f"/proc/{pid}/cmdline").split(b"\0")
                state = _read(f"/proc/{pid}/stat").rsplit(b")", 1)[-1].split()[:1]
            except OSError:
                continue
            if _DAEMON_MODULE not in argv or state in ([b"Z"], [b"X"]):
                continue
            try:
                opts = json.loads(argv[argv.index(_DAEMON_MODULE) + 1])
                run_dir = str(opts["run_dir"])
            except (ValueError, IndexError, KeyError, TypeError):
                continue
            if os.path.realpath(run_dir) == os.path.realpath(self.path):
                found.append(pid)
        return found

    def processes(self) -> list[int]:
        """The live replica and proxy processes of this instance (see :meth:`owns`), found in
        ``/proc``; none where there is no ``/proc``."""
        try:
            pids = [int(e) for e in os.listdir("/proc") if e.isdigit()]
        except OSError:
            return []
        me = os.getpid()
        return sorted(p for p in pids if p != me and self.owns(p))

    # -- choosing the directory -------------------------------------------------------------

    @staticmethod
    def instances_root() -> str:
        """The parent of every default instance directory: ``$XDG_RUNTIME_DIR/shoal`` when
        that variable names this user's private runtime directory, else ``/tmp/shoal-<uid>``
        (the temporary directory :mod:`tempfile` picks, ``$TMPDIR`` first)."""
        xdg = _xdg_runtime_dir()
        if xdg is not None:
            return os.path.join(xdg, "shoal")
        return os.path.join(tempfile.gettempdir(), f"shoal-{os.getuid()}")

    @classmethod
    def _open_root(cls, *, create: bool) -> str:
        """The instances root, checked (this user's, 0700); ``FileNotFoundError`` when missing
        and not ``create``."""
        root = cls.instances_root()
        os.close(open_private_dir(root, create=create))
        return root

    @classmethod
    def _under_root(cls, root: str, name: str) -> RunDir:
        return cls(os.path.join(root, name), private=2)

    @classmethod
    def from_env(cls) -> RunDir | None:
        """``$SHOAL_RUN_DIR``, when set."""
        explicit = os.environ.get(ENV_VAR)
        return cls(explicit) if explicit else None

    @classmethod
    def default(cls) -> RunDir:
        """``<instances root>/default``."""
        return cls._under_root(cls.instances_root(), DEFAULT_NAME)

    @classmethod
    def for_new_instance(cls) -> RunDir:
        """Where ``serve.start()`` puts a new instance: ``$SHOAL_RUN_DIR``, else
        ``<instances root>/default`` unless another instance holds it, else ``i-<pid>`` beside
        it. Raises ``PermissionError`` when the instances root fails the check."""
        explicit = cls.from_env()
        if explicit is not None:
            return explicit
        root = cls._open_root(create=True)
        default = cls._under_root(root, DEFAULT_NAME)
        if not default.is_live() and default.owner() is None:
            return default
        return cls._under_root(root, f"i-{os.getpid()}")

    @classmethod
    def for_start(cls, address: str | None) -> RunDir:
        """Where ``shoal start`` puts its instance: ``--address``, ``$SHOAL_RUN_DIR``, the default.
        Not checked yet: :meth:`create_private` does."""
        if address:
            return cls(address)
        return cls.from_env() or cls.default()

    @classmethod
    def _open_existing(cls, rd: RunDir, missing: str) -> RunDir:
        """``rd`` checked; :class:`InstanceNotFoundError` (``missing``) when it does not exist."""
        try:
            return rd.open()
        except FileNotFoundError:
            raise InstanceNotFoundError(missing) from None

    @classmethod
    def find_running(cls, address: str | None) -> RunDir:
        """The live instance a command talks to, checked: ``--address``, ``$SHOAL_RUN_DIR``, the
        default one, or the only live one under the instances root. Raises
        :class:`InstanceNotFoundError`, or ``PermissionError`` for a directory that fails the check."""
        if address:
            rd = cls._open_existing(cls(address), f"no running shoal instance at {address}")
            if not rd.is_live():
                raise InstanceNotFoundError(f"no running shoal instance at {address}")
            return rd
        explicit = cls.from_env()
        if explicit is not None:
            missing = f"no running shoal instance at {ENV_VAR}={explicit.path}"
            cls._open_existing(explicit, missing)
            if not explicit.is_live():
                raise InstanceNotFoundError(missing)
            return explicit
        none = "no running shoal instance found (start one with `shoal run`)"
        try:
            root = cls._open_root(create=False)
        except FileNotFoundError:
            raise InstanceNotFoundError(none) from None
        default = cls._under_root(root, DEFAULT_NAME)
        if os.path.isdir(default.path) and default.open().is_live():
            return default
        live = sorted(d for d in glob.glob(os.path.join(glob.escape(root), "*")) if cls(d).is_live())
        if len(live) == 1:
            return cls._under_root(root, os.path.basename(live[0])).open()
        if not live:
            raise InstanceNotFoundError(none)
        raise InstanceNotFoundError("several shoal instances are running; pick one with --address:\n  "
                                    + "\n  ".join(live))

    @classmethod
    def find_for_logs(cls, address: str | None) -> RunDir:
        """The instance whose logs to read, checked: a stopped instance's files can be read too.
        Raises :class:`InstanceNotFoundError`, or ``PermissionError`` (see :meth:`find_running`)."""
        if address:
            return cls._open_existing(cls(address), f"no shoal instance directory at {address}")
        explicit = cls.from_env()
        if explicit is not None:
            try:
                return explicit.open()
            except FileNotFoundError:
                return explicit  # nothing there yet: no logs to read
        try:
            return cls.find_running(None)
        except InstanceNotFoundError:
            default = cls.default()
            if os.path.isdir(default.logs_dir):
                return default.open()
            raise


def write_whole(path: str, data: bytes, mode: int, *, dir_fd: int | None = None) -> None:
    """Write ``path`` (relative to ``dir_fd`` when given) whole or not at all: a temporary file
    beside it, renamed over it. ``OSError`` (e.g. a full disk) leaves any previous file as it was."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(tmp, path, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def recheck_or_exit(controller_path: str, who: str) -> None:
    """In a replica or proxy process, before it uses anything in its instance directory:
    check the directory again (it was checked by whoever started the process) and exit with
    status 2 and the reason when it is not private to this user any more."""
    try:
        rd = RunDir(os.path.dirname(controller_path))
        rd.check_private()
        rd.close()
    except PermissionError as e:
        import logging

        logging.getLogger("shoal").error("%s: the instance directory is not safe to use: %s", who, e)
        raise SystemExit(2) from None
