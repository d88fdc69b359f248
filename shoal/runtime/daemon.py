"""The controller of a detached instance (``shoal start``), as a process of its own.

``shoal start`` runs ``python -m shoal.runtime.daemon '<json options>'`` in a new session with
its output appended to the instance's log file. The process keeps desired state in
``<run_dir>/state.db``; replicas and the proxy do not exit with it, so when it dies (a crash,
``kill -9``) they keep serving, and the next ``shoal start`` on the same directory adopts them.
``shoal shutdown`` (or SIGTERM) stops everything and forgets the state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from shoal.config import HTTPOptions
from shoal.runtime.backend import new_event_loop
from shoal.runtime.controller import Controller, Settings
from shoal.runtime.httpguard import exposure_warning
from shoal.runtime.rundir import RunDir, private_dir
from shoal.runtime.wire import new_secret

logger = logging.getLogger("shoal.daemon")

STATE_FILE = "state.db"
PID_FILE = "controller.pid"
LOG_FILE = "controller.log"


def instance_secret(run_dir: str) -> bytes:
    """The instance's secret: kept across controller restarts (adopted replicas and the proxy
    authenticate with it), created on first start. The file is 0600."""
    path = RunDir(run_dir).secret
    try:
        with open(path, "rb") as f:
            secret = f.read()
        if len(secret) >= 32:
            return secret
    except OSError:
        pass
    secret = new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, secret)
    finally:
        os.close(fd)
    return secret


def _write_pid(run_dir: str) -> None:
    with open(RunDir(run_dir).controller_pid, "w") as f:
        f.write(f"{os.getpid()}\n")


async def serve(opts: dict[str, Any]) -> int:
    run_dir = private_dir(str(opts["run_dir"]))
    settings = Settings(
        run_dir=run_dir,
        http=HTTPOptions(**opts.get("http", {})),
        num_gpus=opts.get("num_gpus"),
        strict_cpus=bool(opts.get("strict_cpus", False)),
        die_with_parent=False,
        state_path=RunDir(run_dir).state_db,
    )
    controller = Controller(settings, instance_secret(run_dir))
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
    _write_pid(run_dir)
    logger.info("controller pid %d serving %s; HTTP on %s://%s:%d", os.getpid(), run_dir, settings.http.scheme,
                settings.http.host, controller.http_port)
    warning = exposure_warning(settings.http)
    if warning:
        logger.warning("%s", warning)
    await controller.shutdown_requested.wait()
    logger.info("shutting down")
    await controller.shutdown()
    for path in (RunDir(run_dir).controller_pid, RunDir(run_dir).secret):
        try:
            os.unlink(path)
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
