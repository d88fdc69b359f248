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
of their own: a client that trusted it would authenticate to their server and unpickle its
replies. So the directory is created ``0700``, and one that exists is used only if it is a
real directory owned by this user (group and other permissions are removed).
"""

from __future__ import annotations

import glob
import json
import os
import socket
import stat
import tempfile

from shoal.exceptions import InstanceNotFoundError

__all__ = ["ENV_VAR", "PROCESS_MARKER_ENV", "InstanceNotFoundError", "RunDir", "check_private_dir", "private_dir",
           "write_whole"]

ENV_VAR = "SHOAL_RUN_DIR"
DEFAULT_NAME = "default"
# The variable every replica and proxy process starts with (prometheus-client's multiprocess
# directory, ``<run dir>/metrics``): which instance a process belongs to.
PROCESS_MARKER_ENV = "PROMETHEUS_MULTIPROC_DIR"
# In the command line of every runtime process (``python -m shoal.runtime.<module>``).
_RUNTIME_MODULE = b"shoal.runtime."
_DAEMON_MODULE = b"shoal.runtime.daemon"


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def check_private_dir(path: str) -> None:
    """Raise ``PermissionError`` unless ``path`` is a directory (not a symbolic link) owned by
    this user; remove group and other permissions from it."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory (a symbolic link?); shoal will not use it")
    if st.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user (uid {st.st_uid}); shoal will not use it. "
                              "Remove it, or choose another directory (--address, $SHOAL_RUN_DIR)")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def private_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if needed and check it with :func:`check_private_dir`."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_private_dir(path)
    return path


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
    """One instance directory. Cheap to build; nothing touches the disk until asked."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path

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
    def logs_dir(self) -> str:
        """Replica and proxy log files: ``<logs>/<app>/<deployment>/<replica>.log``, ``proxy.log``."""
        return self._file("logs")

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

    def check_private(self) -> None:
        """:func:`check_private_dir` on this directory."""
        check_private_dir(self.path)

    def create_private(self) -> RunDir:
        """:func:`private_dir` on this directory; returns ``self``."""
        private_dir(self.path)
        return self

    def read_secret(self) -> bytes:
        """The secret's bytes (``OSError`` when it cannot be read)."""
        with open(self.secret, "rb") as f:
            return f.read()

    def write_secret(self, secret: bytes) -> None:
        """Write the secret, readable by this user only: whole or not at all (``OSError`` on a
        full disk, leaving any previous secret as it was)."""
        write_whole(self.secret, secret, 0o600)

    def write_controller_pid(self, pid: int) -> None:
        """Write the controller's pid file whole, or raise ``OSError``."""
        write_whole(self.controller_pid, f"{pid}\n".encode(), 0o644)

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
        """``/tmp/shoal-<uid>``: the parent of every default instance directory."""
        return os.path.join(tempfile.gettempdir(), f"shoal-{os.getuid()}")

    @classmethod
    def from_env(cls) -> RunDir | None:
        """``$SHOAL_RUN_DIR``, when set."""
        explicit = os.environ.get(ENV_VAR)
        return cls(explicit) if explicit else None

    @classmethod
    def default(cls) -> RunDir:
        """``/tmp/shoal-<uid>/default``."""
        return cls(os.path.join(cls.instances_root(), DEFAULT_NAME))

    @classmethod
    def for_new_instance(cls) -> RunDir:
        """Where ``serve.start()`` puts a new instance: ``$SHOAL_RUN_DIR``, else
        ``/tmp/shoal-<uid>/default`` unless another instance holds it, else ``i-<pid>`` beside it."""
        explicit = cls.from_env()
        if explicit is not None:
            return explicit
        root = private_dir(cls.instances_root())
        default = cls(os.path.join(root, DEFAULT_NAME))
        if not default.is_live():
            return default
        return cls(os.path.join(root, f"i-{os.getpid()}"))

    @classmethod
    def for_start(cls, address: str | None) -> RunDir:
        """Where ``shoal start`` puts its instance: ``--address``, ``$SHOAL_RUN_DIR``, the default."""
        if address:
            return cls(address)
        return cls.from_env() or cls.default()

    @classmethod
    def find_running(cls, address: str | None) -> RunDir:
        """The live instance a command talks to: ``--address``, ``$SHOAL_RUN_DIR``, the default
        one, or the only live one under the instances root. Raises :class:`InstanceNotFoundError`."""
        if address:
            if not cls(address).is_live():
                raise InstanceNotFoundError(f"no running shoal instance at {address}")
            return cls(address)
        explicit = cls.from_env()
        if explicit is not None:
            if not explicit.is_live():
                raise InstanceNotFoundError(f"no running shoal instance at {ENV_VAR}={explicit.path}")
            return explicit
        default = cls.default()
        if default.is_live():
            return default
        root = cls.instances_root()
        live = sorted(d for d in glob.glob(os.path.join(root, "*")) if cls(d).is_live())
        if len(live) == 1:
            return cls(live[0])
        if not live:
            raise InstanceNotFoundError("no running shoal instance found (start one with `shoal run`)")
        raise InstanceNotFoundError("several shoal instances are running; pick one with --address:\n  "
                                    + "\n  ".join(live))

    @classmethod
    def find_for_logs(cls, address: str | None) -> RunDir:
        """The instance whose logs to read: a stopped instance's files can be read too.
        Raises :class:`InstanceNotFoundError`."""
        if address:
            if not os.path.isdir(address):
                raise InstanceNotFoundError(f"no shoal instance directory at {address}")
            return cls(address)
        explicit = cls.from_env()
        if explicit is not None:
            return explicit
        try:
            return cls.find_running(None)
        except InstanceNotFoundError:
            default = cls.default()
            if os.path.isdir(default.logs_dir):
                return default
            raise


def write_whole(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, renamed over it.
    ``OSError`` (e.g. a full disk) leaves any previous file as it was."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        if fd >= 0:
            os.close(fd)
