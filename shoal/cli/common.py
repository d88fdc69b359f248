"""What every ``shoal`` command that talks to a running instance shares: finding it, calling it."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import click

from shoal.runtime.rundir import InstanceNotFoundError, RunDir


def resolve_address(address: str | None, *, stop_orphans: bool = False) -> str:
    """The run directory of the instance to talk to, or a clear error.

    When no controller runs there but processes of the instance still do (their controller
    died), the error says so; with ``stop_orphans`` (``shoal shutdown``) they are stopped
    instead and the command ends.

    Every directory is checked on the way (:func:`shoal.runtime.rundir.open_private_dir`): one
    another user could have made or could swap is refused with an error that names it."""
    try:
        with RunDir.find_running(address) as found:
            return found.path
    except PermissionError as e:
        raise click.ClickException(str(e)) from None
    except InstanceNotFoundError as e:
        rd = RunDir.for_start(address)
        try:
            orphans = rd.open().processes()
        except FileNotFoundError:
            orphans = []
        except PermissionError as refused:
            raise click.ClickException(str(refused)) from None
        finally:
            rd.close()
        if not orphans:
            raise click.ClickException(str(e)) from None
        pids = ", ".join(map(str, orphans))
        if not stop_orphans:
            raise click.ClickException(
                f"no controller runs at {rd.path}, but {len(orphans)} of its processes still do (pids {pids}): "
                f"its controller died. `shoal start --address {rd.path}` takes them over (or stops them if its "
                f"state file is damaged); `shoal shutdown --address {rd.path}` stops them.") from None
        from shoal.runtime.daemon import stop_orphans as stop

        stopped, left = stop(rd)
        if left:
            raise click.ClickException(f"no controller runs at {rd.path}; stopped pids {stopped or '-'} of its "
                                       f"processes but {', '.join(map(str, left))} would not stop") from None
        click.echo(f"no controller ran at {rd.path}; stopped the {len(stopped)} process(es) it left behind "
                   f"(pids {', '.join(map(str, stopped))})")
        raise SystemExit(0) from None


def _admin(address: str, op: str, timeout: float = 30.0, **args: Any) -> Any:
    from shoal.runtime.attach import open_controller
    from shoal.runtime.backend import new_event_loop
    from shoal.runtime.client import ControllerClient, ControllerError
    from shoal.runtime.wire import Role

    try:
        # Checked (a directory another user made could hold their secret and socket); the
        # secret and the socket are then reached through the checked directory's descriptor.
        ctl = open_controller(address)
    except PermissionError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:
        raise click.ClickException(f"cannot read the instance secret in {address}: {e.strerror}") from None
    run_dir, path, secret = ctl.run_dir, ctl.path, ctl.secret

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
    except (ConnectionError, OSError) as e:  # (the socket named by its real path, not the /proc one)
        why = str(e).replace(path, run_dir.controller_socket)
        raise click.ClickException(f"cannot reach the shoal instance at {address}: {why}") from None
    finally:
        loop.close()
        run_dir.close()
