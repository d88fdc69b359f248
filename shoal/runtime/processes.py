"""Child processes of the controller, and processes it adopted from a previous controller.

Both kinds offer the few ``subprocess.Popen`` methods the controller uses (``pid``,
``poll()``, ``send_signal()``, ``kill()``, ``wait()``, ``returncode``), so the controller
treats a replica it started and one it adopted alike.

Children do not inherit secrets they do not need: the controller reads the API keys of the
HTTP port from the variable ``http_options.api_keys_env`` names and sends them to each front
over its authenticated socket, so that variable is removed from the environment of every
process started here (:func:`withhold_env`), and no replica's ``/proc/<pid>/environ`` shows it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Protocol


class Proc(Protocol):
    pid: int

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...


# Names of environment variables that children never get (see withhold_env).
_WITHHELD: set[str] = set()


def withhold_env(*names: str | None) -> None:
    """Keep the variables ``names`` (None and "" are skipped) out of every process
    :func:`spawn` starts from now on: secrets this process already read, e.g. the API keys
    variable, which fronts receive over their socket instead."""
    _WITHHELD.update(name for name in names if name)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: this process's, with ``env`` on top, without the withheld variables."""
    full = {**os.environ, **(env or {})}
    for name in _WITHHELD:
        full.pop(name, None)
    return full


def spawn(argv: list[str], stdin_data: bytes, pass_fds: tuple[int, ...] = (),
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with ``stdin_data`` written to its stdin (its trusted bootstrap), in
    :func:`child_env`."""
    full_env = child_env(env)
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, pass_fds=pass_fds, env=full_env)
    assert proc.stdin is not None
    proc.stdin.write(stdin_data)
    proc.stdin.close()
    return proc


def is_shoal_process(pid: int) -> bool:
    """Whether ``pid`` is alive and runs a shoal runtime module (guards against pid reuse)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return b"shoal.runtime." in cmdline


class AdoptedProcess:
    """A replica or proxy started by an earlier controller: not our child, so it is watched
    by pid (``kill(pid, 0)``) instead of ``waitpid``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._returncode: int | None = None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def poll(self) -> int | None:
        if self._returncode is None:
            try:
                os.kill(self.pid, 0)
                if not is_shoal_process(self.pid):  # exited and the pid was reused (or a zombie)
                    self._returncode = -1
            except ProcessLookupError:
                self._returncode = -1
            except PermissionError:
                self._returncode = -1
        return self._returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                self._returncode = -1

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.02)
        assert self._returncode is not None
        return self._returncode
