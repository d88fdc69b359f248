"""Starting, adopting, stopping and killing the instance's processes (replicas, spares, gang
ranks, the proxy), through an injected process factory."""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

from shoal.runtime.processes import AdoptedProcess, Proc, is_shoal_process, spawn
from shoal.runtime.wire import FramedProtocol, Stop

logger = logging.getLogger("shoal.controller")


class ProcessFactory(Protocol):
    """Starts ``argv`` with ``stdin_data`` on its stdin (:func:`shoal.runtime.processes.spawn`)."""

    def __call__(self, argv: list[str], stdin_data: bytes, pass_fds: tuple[int, ...] = (),
                 env: dict[str, str] | None = None) -> Proc: ...


class Adopter(Protocol):
    """Finds a process an earlier controller started: whether it still runs shoal, and a handle."""

    def alive(self, pid: int) -> bool: ...

    def adopt(self, pid: int) -> Proc: ...


class PidAdopter:
    """The real :class:`Adopter`: ``/proc`` and :class:`AdoptedProcess`."""

    def alive(self, pid: int) -> bool:
        return is_shoal_process(pid)

    def adopt(self, pid: int) -> Proc:
        return AdoptedProcess(pid)


class Supervisor:
    """Process control for the controller. ``base_env`` is read at each start (the metrics
    directory every child writes into)."""

    def __init__(self, python: str, base_env: Callable[[], dict[str, str]], factory: ProcessFactory = spawn,
                 adopter: Adopter | None = None, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.python = python
        self.base_env = base_env
        self.factory = factory
        self.adopter: Adopter = adopter or PidAdopter()
        self.monotonic = monotonic

    def spawn(self, module: str, boot: object, pass_fds: tuple[int, ...] = (),
              env: dict[str, str] | None = None) -> Proc:
        """Run ``python -m module`` with the pickled ``boot`` as its trusted bootstrap."""
        return self.factory([self.python, "-m", module], pickle.dumps(boot), pass_fds,
                            {**self.base_env(), **(env or {})})

    def alive(self, pid: int) -> bool:
        return self.adopter.alive(pid)

    def adopt(self, pid: int) -> Proc:
        return self.adopter.adopt(pid)

    @staticmethod
    def stop(proc: Proc, conn: FramedProtocol | None) -> None:
        """Ask a process to stop: a Stop message when connected, else SIGTERM."""
        if proc.poll() is not None:
            return
        try:
            if conn is not None and not conn.closed:
                conn.send(Stop("shutdown"))
            else:
                proc.send_signal(signal.SIGTERM)
        except (ConnectionError, ProcessLookupError):
            pass

    @staticmethod
    def kill(proc: Proc) -> None:
        """SIGKILL and reap (no-op if it already exited)."""
        if proc.poll() is None:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.error("process %d did not exit after SIGKILL", proc.pid)

    async def wait_exit(self, proc: Proc, timeout: float) -> None:
        """Wait up to ``timeout`` for the process to exit, then kill it."""
        deadline = self.monotonic() + timeout
        while proc.poll() is None and self.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self.kill(proc)
