"""Attaching a plain Python process to the shoal instance running on this machine.

``serve.get_app_handle("app")`` (and ``get_deployment_handle``, ``status``) in a process that
neither started shoal nor runs inside it finds the running instance — ``$SHOAL_RUN_DIR``, the
default instance, or the only live one, as the ``shoal`` command does — and connects to its
controller with the instance's secret (readable only by its user, from a directory that passes
the same checks as the CLI's). Handles made there call the replicas directly, as the driver's
do. Nothing is started: when no instance runs, the caller gets an error that says so.

:func:`open_controller` is the checked way to the controller's socket and secret that the CLI
shares (``shoal status``, ``shoal config`` ...).
"""

from __future__ import annotations

import atexit
import os
import threading
from dataclasses import dataclass

from shoal.runtime.backend import LoopThread
from shoal.runtime.client import ControllerClient
from shoal.runtime.rundir import InstanceNotFoundError, RunDir
from shoal.runtime.wire import Role

__all__ = ["AttachError", "Attached", "attach", "attached", "detach", "open_controller"]

CONNECT_TIMEOUT_S = 5.0


class AttachError(Exception):
    """No running instance could be attached to (the message says why)."""


@dataclass
class ControllerAddress:
    run_dir: RunDir  # kept open: ``path`` goes through its descriptor
    path: str
    secret: bytes


def open_controller(address: str) -> ControllerAddress:
    """The controller socket and secret of the instance at ``address``, reached through the
    checked directory's descriptor (a directory another user made or could swap is refused
    with ``PermissionError``; an unreadable secret raises ``OSError``). Close ``run_dir``
    when done."""
    run_dir = RunDir(address)
    try:
        run_dir.check_private()
        secret = run_dir.read_secret()
        path = run_dir.through_fd(os.path.basename(run_dir.controller_socket))
    except BaseException:
        run_dir.close()
        raise
    return ControllerAddress(run_dir, path, secret)


@dataclass
class Attached:
    address: str
    loop: LoopThread
    client: ControllerClient
    run_dir: RunDir

    def close(self) -> None:
        try:
            self.loop.loop.call_soon_threadsafe(self.client.close)
        except RuntimeError:  # the loop already stopped
            pass
        self.loop.stop()
        self.run_dir.close()


_lock = threading.Lock()
_attached: Attached | None = None


def attached() -> Attached | None:
    return _attached


def attach(address: str | None = None) -> Attached:
    """Connect this process to the running instance (once; later calls return the same link).

    Raises :class:`AttachError` naming what was looked for when no instance runs, or why
    the one found cannot be reached."""
    global _attached
    with _lock:
        if _attached is not None and _attached.client.connected:
            return _attached
        if _attached is not None:  # the instance went away: look again
            _attached.close()
            _attached = None
        try:
            with RunDir.find_running(address) as found:
                where = found.path
        except (InstanceNotFoundError, PermissionError) as e:
            raise AttachError(str(e)) from None
        try:
            ctl = open_controller(where)
        except PermissionError as e:
            raise AttachError(str(e)) from None
        except OSError as e:
            raise AttachError(f"cannot read the secret of the shoal instance at {where}: {e.strerror}") from None
        loop = LoopThread("shoal-attached").start()
        client = ControllerClient(ctl.path, ctl.secret, Role.CLIENT, f"attached-{os.getpid()}", loop.loop)
        try:
            loop.run(client.connect(timeout=CONNECT_TIMEOUT_S), timeout=CONNECT_TIMEOUT_S + 1)
        except BaseException as e:
            loop.stop()
            ctl.run_dir.close()
            if isinstance(e, (OSError, TimeoutError)):
                why = str(e).replace(ctl.path, ctl.run_dir.controller_socket) or type(e).__name__
                raise AttachError(f"cannot reach the shoal instance at {where}: {why}") from None
            raise
        _attached = Attached(where, loop, client, ctl.run_dir)
        atexit.register(detach)
        return _attached


def detach() -> None:
    """Close this process's link to the instance (the instance keeps running)."""
    global _attached
    with _lock:
        link, _attached = _attached, None
    if link is not None:
        link.close()
