"""The steps of ``shoal run`` around deploying: owning the instance directory, checking the
port before the app is imported, showing replica output, the hint for using ``shoal`` from
another terminal, and stopping on Ctrl-C (:mod:`shoal.cli.stopping`)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import time
from typing import Any

import click

from shoal.runtime.rundir import RunDir

__all__ = ["check_port", "claim_run_dir", "path_hint", "start_output", "stop_instance"]


def claim_run_dir(address: str | None) -> tuple[RunDir, Any]:
    """The instance directory of this ``shoal run``, owned (locked) and with a new log session;
    a clear error (exit 1) when another instance runs there, naming its pid."""
    from shoal.runtime.ownership import InstanceBusyError, begin_session

    try:
        rd = RunDir(address) if address else RunDir.for_new_instance()
        lock = rd.lock()
    except InstanceBusyError as e:
        raise click.ClickException(str(e)) from None
    except PermissionError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot use the instance directory {address or ''}: {e}") from None
    if rd.is_live():  # an instance of a Python program (serve.start) owns no lock but answers there
        lock.release()
        raise click.ClickException(f"a shoal instance already answers on {rd.path} (started by a Python program?); "
                                   "stop it, or use another directory with --address or $SHOAL_RUN_DIR")
    try:
        begin_session(rd.path, rd.dir_fd())
    except OSError as e:
        lock.release()
        raise click.ClickException(f"cannot make the log folder in {rd.path}: {e}") from None
    return rd, lock


def check_port(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (bound as the proxy binds it), or None. Checked
    before the app is imported, so a port in use is said at once."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(1)
    except OSError as e:
        return (f"cannot listen on http://{host}:{port}: {e.strerror or e}. Is another server (or another "
                f"`shoal run`) using it? Choose another port with --port (e.g. --port {port + 1}; "
                f"`make run PORT={port + 1}`).")
    return None


def path_hint() -> str | None:
    """How to reach this ``shoal`` from another terminal, when ``shoal`` on PATH is not it (a
    virtual environment that is not activated, as after ``make run``)."""
    here = os.path.join(os.path.dirname(sys.executable), "shoal")
    if not os.path.exists(here):
        return None
    found = shutil.which("shoal")
    if found and os.path.realpath(found) == os.path.realpath(here):
        return None
    rel = os.path.relpath(here)
    shown = rel if not rel.startswith("..") else here
    activate = os.path.join(os.path.dirname(shown), "activate")
    return f"From another terminal: {shown} status  (or: source {activate}; shoal status)"


def start_output(console: Any, rd: RunDir) -> Any:
    """Show every replica's output on this terminal, prefixed (:mod:`shoal.cli.replica_output`)."""
    from rich.text import Text

    from shoal.cli.replica_output import ReplicaOutput, replica_files

    def write(line: str) -> None:
        console.print(Text(line, style="dim" if " DEBUG " in line else ""), soft_wrap=True, highlight=False)

    return ReplicaOutput(replica_files(lambda: rd.logs_dir), write).start()


def stop_instance(console: Any, rd: RunDir, output: Any = None) -> None:
    """Stop the instance gracefully, saying what it waits for; a second Ctrl-C (or SIGTERM)
    kills every process it started and exits 130 (:mod:`shoal.cli.stopping`)."""
    from shoal import api
    from shoal.cli.stopping import DrainWatch, describe_drain, drain_budget, make_final, waiting_for

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)

    final = make_final(rd.processes, say)
    signal.signal(signal.SIGINT, final)
    signal.signal(signal.SIGTERM, final)
    inst = api._instance
    watch = None
    if inst is not None:
        budget = drain_budget(inst.controller)
        say(describe_drain(waiting_for(inst.controller), budget, time.time()))
        watch = DrainWatch(inst.controller, say, budget).start()
    try:
        api.shutdown()
    finally:
        if watch is not None:
            watch.stop()
        if output is not None:
            output.stop()
