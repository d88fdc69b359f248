"""Child processes of the controller, and processes it adopted from a previous controller.

Both kinds offer the few ``subprocess.Popen`` methods the controller uses (``pid``,
``poll()``, ``send_signal()``, ``kill()``, ``wait()``, ``returncode``), so the controller
treats a replica it started and one it adopted alike.
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


def spawn(argv: list[str], stdin_data: bytes, pass_fds: tuple[int, ...] = (),
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start ``argv`` with ``stdin_data`` written to its stdin (its trusted bootstrap)."""
    full_env = {**os.environ, **env} if env else None
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
