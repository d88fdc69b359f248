"""What every ``shoal`` command that talks to a running instance shares: finding it, calling it."""

from __future__ import annotations

import asyncio
import glob
import os
from typing import Any

import click

from shoal.api import _is_live, instances_root


def resolve_address(address: str | None) -> str:
    """The run directory of the instance to talk to, or a clear error."""
    if address:
        if not _is_live(address):
            raise click.ClickException(f"no running shoal instance at {address}")
        return address
    env = os.environ.get("SHOAL_RUN_DIR")
    if env:
        if not _is_live(env):
            raise click.ClickException(f"no running shoal instance at SHOAL_RUN_DIR={env}")
        return env
    root = instances_root()
    default = os.path.join(root, "default")
    if _is_live(default):
        return default
    live = sorted(d for d in glob.glob(os.path.join(root, "*")) if _is_live(d))
    if len(live) == 1:
        return live[0]
    if not live:
        raise click.ClickException("no running shoal instance found (start one with `shoal run`)")
    raise click.ClickException("several shoal instances are running; pick one with --address:\n  " + "\n  ".join(live))


def _admin(address: str, op: str, timeout: float = 30.0, **args: Any) -> Any:
    from shoal.runtime.backend import new_event_loop
    from shoal.runtime.client import ControllerClient, ControllerError
    from shoal.runtime.rundir import check_private_dir

    path = os.path.join(address, "controller.sock")
    try:
        check_private_dir(address)  # a directory another user made could hold their secret and socket
        with open(os.path.join(address, "secret"), "rb") as f:
            secret = f.read()
    except PermissionError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot read the instance secret in {address}: {e.strerror}") from None

    async def go() -> Any:
        client = ControllerClient(path, secret, "client", f"cli-{os.getpid()}", asyncio.get_running_loop())
        try:
            await client.connect(timeout=5)
            return await client.call(op, timeout, **args)
        finally:
            client.close()

    loop = new_event_loop()
    try:
        return loop.run_until_complete(go())
    except ControllerError as e:
        raise click.ClickException(str(e)) from None
    except TimeoutError:
        raise click.ClickException(f"the shoal instance at {address} did not answer within {timeout:.0f}s") from None
    except (ConnectionError, OSError) as e:
        raise click.ClickException(f"cannot reach the shoal instance at {address}: {e}") from None
    finally:
        loop.close()
