"""The controller of a detached instance (``shoal start``), as a process of its own.

``shoal start`` runs ``python -m shoal.runtime.daemon '<json options>'`` in a new session with
its output appended to the instance's log file. The process keeps desired state in
``<run_dir>/state.db``; replicas and the proxy do not exit with it, so when it dies (a crash,
``kill -9``) they keep serving, and the next ``shoal start`` on the same directory adopts them.
``shoal shutdown`` (or SIGTERM) stops everything and forgets the state.

Before a controller starts on a directory, :func:`prepare_start` (run by ``shoal start``, and
again by the daemon itself) checks the state file: one that cannot be read is moved aside,
and the instance's processes that the state does not record (all of them, then) are stopped,
so that none of them holds the HTTP port or serves stale code behind the new controller's back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from shoal.config import HTTPOptions, gRPCOptions
from shoal.runtime.backend import new_event_loop
from shoal.runtime.controller import Controller, Settings
from shoal.runtime.controller.gcpolicy import GcPolicy
from shoal.runtime.httpguard import exposure_warning
from shoal.runtime.rundir import RunDir
from shoal.runtime.state import damage, known_pids, set_aside
from shoal.runtime.wire import new_secret

logger = logging.getLogger("shoal.daemon")

STATE_FILE = "state.db"
PID_FILE = "controller.pid"
LOG_FILE = "controller.log"
# Stopping the processes a lost controller left behind: SIGTERM, this long to exit, then SIGKILL
# and this long again.
ORPHAN_TERM_WAIT_S = 5.0
ORPHAN_KILL_WAIT_S = 5.0
_POLL_S = 0.05


def _signal(rd: RunDir, pid: int, sig: int) -> bool:
    """Send ``sig`` to ``pid`` if it is still a process of ``rd``'s instance (through a pidfd
    where there is one, so a pid reused in between is never hit)."""
    fd = -1
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        fd = -1
    try:
        if not rd.owns(pid):
            return False
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def _wait_gone(rd: RunDir, pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = [p for p in pids if rd.owns(p)]
    while left and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        left = [p for p in left if rd.owns(p)]
    return left


def stop_processes(rd: RunDir, pids: list[int], term_wait_s: float = ORPHAN_TERM_WAIT_S,
                   kill_wait_s: float = ORPHAN_KILL_WAIT_S) -> list[int]:
    """Stop processes of ``rd``'s instance (SIGTERM, then SIGKILL); the pids still alive after."""
    for pid in pids:
        _signal(rd, pid, signal.SIGTERM)
    left = _wait_gone(rd, pids, term_wait_s)
    for pid in left:
        _signal(rd, pid, signal.SIGKILL)
    return _wait_gone(rd, left, kill_wait_s)


def stop_orphans(rd: RunDir) -> tuple[list[int], list[int]]:
    """Stop every process of the instance at ``rd`` (no controller runs there): (stopped, left)."""
    found = rd.processes()
    left = stop_processes(rd, found) if found else []
    return [p for p in found if p not in left], left


def prepare_start(rd: RunDir) -> list[str]:
    """Make ``rd`` ready for a new controller (none runs there): set a damaged state file
    aside, stop the instance's processes the state does not record. What was done, as
    sentences for the user; raises ``RuntimeError`` when a process would not stop."""
    said: list[str] = []
    others = rd.controllers()
    if others:
        raise RuntimeError(f"a controller process of {rd.path} runs but does not answer (pid "
                           f"{', '.join(map(str, others))}: starting, or hung); wait, or stop it and start again")
    state = rd.state_db
    reason = damage(state)
    if reason is not None:
        moved = set_aside(state)
        said.append(f"the state file {state} is damaged ({reason}); moved it aside to {moved}. "
                    "The instance starts empty: deploy your applications again.")
    try:
        os.unlink(rd.controller_pid)  # a dead controller's
    except OSError:
        pass
    known = known_pids(state) or set()
    orphans = [p for p in rd.processes() if p not in known]
    if orphans:
        left = stop_processes(rd, orphans)
        stopped = [p for p in orphans if p not in left]
        if stopped:
            said.append(f"stopped {len(stopped)} process(es) left running by the previous controller of {rd.path} "
                        f"that its state does not record (pids {', '.join(map(str, stopped))})")
        if left:
            raise RuntimeError(f"processes of the previous controller of {rd.path} would not stop "
                               f"(pids {', '.join(map(str, left))}); stop them and start again")
    return said


def instance_secret(rd: RunDir) -> bytes:
    """The instance's secret: kept across controller restarts (adopted replicas and the proxy
    authenticate with it), created on first start. The file is 0600, read and written through
    the checked directory (one that is not this user's file is replaced)."""
    try:
        secret = rd.read_secret()
        if len(secret) >= 32:
            return secret
    except OSError:
        pass
    secret = new_secret()
    rd.write_secret(secret)
    return secret


async def serve(opts: dict[str, Any]) -> int:
    # Handed a path by `shoal start`: checked again here (created if needed), and its
    # descriptor kept for the secret and the pid file.
    from shoal.runtime.ownership import InstanceBusyError, begin_session
    from shoal.runtime.state import known_pids

    rd = RunDir(os.path.abspath(str(opts["run_dir"])))
    try:
        rd.create_private()
        lock = rd.lock()  # one instance per directory: held until this process ends
    except (OSError, InstanceBusyError) as e:
        logger.error("could not start: %s", e)
        return 1
    try:
        # The session's logs go on where replicas this controller adopts still write them.
        begin_session(rd.path, rd.dir_fd(), reuse=bool(known_pids(rd.state_db)))
        return await _serve(opts, rd)
    except OSError as e:
        logger.error("could not start: %s", e)
        return 1
    finally:
        lock.release()
        rd.close()


async def _serve(opts: dict[str, Any], rd: RunDir) -> int:
    run_dir = rd.path
    try:
        for sentence in prepare_start(rd):
            logger.warning("%s", sentence)
    except (OSError, RuntimeError) as e:
        logger.error("could not start: %s", e)
        return 1
    settings = Settings(
        run_dir=run_dir,
        http=HTTPOptions(**opts.get("http", {})),
        num_gpus=opts.get("num_gpus"),
        strict_cpus=bool(opts.get("strict_cpus", False)),
        grpc=gRPCOptions(**opts["grpc"]) if opts.get("grpc") else None,  # checked by `shoal start`
        die_with_parent=False,
        state_path=rd.state_db,
    )
    try:
        controller = Controller(settings, instance_secret(rd))
        controller.gc_policy = GcPolicy()  # this process is the controller's own
    except Exception as e:  # the state file (disk full, unreadable) or the secret
        logger.error("could not start: %s", e)
        return 1
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, controller.shutdown_requested.set)
    try:
        await controller.start()
        await controller.wait_proxy()
    except Exception as e:
        logger.error("could not start: %s", e)
        await controller.shutdown()
        return 1
    try:
        rd.write_controller_pid(os.getpid())
    except OSError as e:  # serving matters more: `shoal start` will say it could not confirm
        logger.error("cannot write %s (%s); serving anyway", rd.controller_pid, e.strerror or e)
    logger.info("controller pid %d serving %s; HTTP on %s://%s:%d", os.getpid(), run_dir, settings.http.scheme,
                settings.http.host, controller.http_port)
    if controller.front.grpc_port:
        logger.info("gRPC on %s:%d", settings.http.host, controller.front.grpc_port)
    warning = exposure_warning(settings.http)
    if warning:
        logger.warning("%s", warning)
    await controller.shutdown_requested.wait()
    logger.info("shutting down")
    await controller.shutdown()
    for path in (rd.controller_pid, rd.secret):
        try:
            os.unlink(os.path.basename(path), dir_fd=rd.dir_fd())
        except OSError:
            pass
    return 0


def main() -> None:
    opts = json.loads(sys.argv[1])
    logging.basicConfig(level=opts.get("log_level", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    code = loop.run_until_complete(serve(opts))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
