"""What every ``shoal`` command that talks to a running instance shares: finding it, calling it."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import click

from shoal.runtime.rundir import InstanceNotFoundError, RunDir


def resolve_address(address: str | None) -> str:
    """The run directory of the instance to talk to, or a clear error."""
    try:
        return RunDir.find_running(address).path
    except InstanceNotFoundError as e:
        raise click.ClickException(str(e)) from None


def _admin(address: str, op: str, timeout: float = 30.0, **args: Any) -> Any:
    from shoal.runtime.backend import new_event_loop
    from shoal.runtime.client import ControllerClient, ControllerError
    from shoal.runtime.wire import Role

    run_dir = RunDir(address)
    path = run_dir.controller_socket
    try:
        run_dir.check_private()  # a directory another user made could hold their secret and socket
        secret = run_dir.read_secret()
    except PermissionError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot read the instance secret in {address}: {e.strerror}") from None

    async def go() -> Any:
        client = ControllerClient(path, secret, Role.CLIENT, f"cli-{os.getpid()}", asyncio.get_running_loop())
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
