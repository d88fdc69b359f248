"""``shoal start``, ``shoal deploy``, ``shoal promote`` and ``shoal rollback``: a long-running
local instance driven declaratively by config files, with canary releases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import click

from shoal.observability import safefiles
from shoal.observability.safetext import escape

WAIT_START_S = 30.0


def _tail(path: str, lines: int = 20) -> str:
    """The last ``lines`` of the controller's log, control characters escaped (never through
    another user's link)."""
    try:
        with os.fdopen(safefiles.open_for_reading(path), errors="replace") as f:
            return "".join(escape(line.rstrip("\n")) + "\n" for line in f.readlines()[-lines:])
    except OSError:
        return ""


def _open_log(path: str) -> int:
    """A descriptor to append the controller's log to, never through a symbolic link."""
    dir_fd = safefiles.open_dir(os.path.dirname(os.path.abspath(path)), create=True)
    try:
        fd, _ = safefiles.open_log(dir_fd, os.path.basename(path), path)
    finally:
        os.close(dir_fd)
    return fd


@click.command()
@click.option("--address", default=None,
              help="Instance directory (default $SHOAL_RUN_DIR, else $XDG_RUNTIME_DIR/shoal/default "
                   "or /tmp/shoal-<uid>/default).")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP host of the proxy.")
@click.option("-p", "--port", type=int, default=8000, show_default=True, help="HTTP port (0 picks a free port).")
@click.option("--num-gpus", type=int, default=None,
              help="Declare this many GPUs instead of asking nvidia-smi (fractional num_gpus share them).")
@click.option("--strict-cpus", is_flag=True, help="Refuse to oversubscribe CPUs (num_cpus is enforced).")
@click.option("--log-file", default=None,
              help="Where the controller writes its log (default <address>/controller.log).")
@click.option("--no-dashboard", is_flag=True, help="Do not serve /-/dashboard and /-/status.json.")
def start(address: str | None, host: str, port: int, num_gpus: int | None, strict_cpus: bool,
          log_file: str | None, no_dashboard: bool) -> None:
    """Start a long-running local instance in the background.

    Deploy to it with ``shoal deploy config.yaml``; watch it with ``shoal status``; stop it
    with ``shoal shutdown``. Its state lives in ``<address>/state.db``: if the controller
    process dies, the replicas and the proxy keep serving, and running ``shoal start`` again
    on the same address adopts them without dropping traffic. A state file that cannot be
    read is moved aside (``state.db.damaged-<time>``, named in a warning) and the processes
    nobody can adopt then are stopped before the port is bound.
    """
    from shoal.config import HTTPOptions
    from shoal.runtime.rundir import RunDir

    chosen = RunDir.for_start(address)
    rd = chosen if os.path.isabs(chosen.path) else RunDir(os.path.abspath(chosen.path))
    run_dir = rd.path
    try:
        http = HTTPOptions(host=host, port=port)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:  # checked before anything in it is used: another user's directory is refused
        rd.create_private()
    except PermissionError as e:
        raise click.ClickException(str(e)) from None
    owner = rd.owner()
    if owner is not None:  # a `shoal run`, or another controller (starting or serving), owns it
        from shoal.runtime.ownership import InstanceBusyError

        raise click.ClickException(str(InstanceBusyError(run_dir, owner or None)))
    if rd.is_live():
        raise click.ClickException(f"a shoal instance is already running at {run_dir} "
                                   "(`shoal status` shows it, `shoal shutdown` stops it)")
    from shoal.runtime.daemon import prepare_start

    try:  # a damaged state file, processes a dead controller left behind
        for sentence in prepare_start(rd):
            click.echo(f"warning: {sentence}", err=True)
    except (OSError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None
    log_path = log_file or rd.controller_log
    opts = {"run_dir": run_dir, "http": {"host": http.host, "port": http.port, "dashboard": not no_dashboard},
            "num_gpus": num_gpus,
            "strict_cpus": strict_cpus}
    try:
        log_fd = _open_log(log_path)
    except OSError as e:
        raise click.ClickException(f"cannot write the controller's log {log_path}: {e}") from None
    with os.fdopen(log_fd, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "shoal.runtime.daemon", json.dumps(opts)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + WAIT_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise click.ClickException(f"the controller exited with code {proc.returncode}; "
                                       f"the end of {log_path}:\n{_tail(log_path)}")
        if rd.is_live() and os.path.exists(rd.controller_pid):
            break
        time.sleep(0.05)
    else:
        if rd.is_live():
            raise click.ClickException(f"the controller (pid {proc.pid}) runs but did not confirm that it serves "
                                       f"within {WAIT_START_S:.0f}s (is the disk full?); see {log_path}")
        raise click.ClickException(f"the controller did not start within {WAIT_START_S:.0f}s; see {log_path}")
    from shoal.cli.common import _admin

    st = _admin(run_dir, "status")
    apps = [a for a in st.applications]
    click.echo(f"started shoal at {run_dir} (controller pid {proc.pid})")
    click.echo(f"  http: {st.http_address}")
    click.echo(f"  log:  {log_path}")
    if apps:
        click.echo(f"  restored: {', '.join(apps)}")


def _build_specs(config_path: str) -> tuple[list[Any], Any]:
    from shoal.deployment import build_app_spec
    from shoal.loader import build_application
    from shoal.runtime.state import portable
    from shoal.schema import ConfigError, load_config_file

    try:
        config = load_config_file(config_path)
        specs = []
        for i, app_schema in enumerate(config.applications):
            application = build_application(app_schema, source=config_path, index=i)
            spec = build_app_spec(application, app_schema.name, app_schema.route_prefix)
            spec.sys_path = tuple(sys.path)
            spec.cwd = os.getcwd()
            specs.append(portable(spec))
    except (ConfigError, ImportError, AttributeError, ValueError, TypeError) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None
    return specs, config


@click.command()
@click.argument("config_file")
@click.option("--address", default=None, help="Instance directory (default: the one running instance).")
@click.option("--canary", type=float, default=None,
              help="Run changed apps as a canary beside the current version with this percent of their "
                   "HTTP traffic (sticky per x-session-id); finish with `shoal promote` or `shoal rollback`.")
@click.option("--no-wait", is_flag=True, help="Return once the instance accepted the config.")
@click.option("--timeout", default=300.0, show_default=True, help="Seconds to wait for the apps to run.")
def deploy(config_file: str, address: str | None, canary: float | None, no_wait: bool, timeout: float) -> None:
    """Make a running instance serve exactly the apps in CONFIG_FILE.

    Declarative and idempotent: apps in the file are created or updated (replicas roll, new
    ones ready before old ones stop; num_replicas, user_config and autoscaling apply in place),
    apps not in the file are deleted, and deploying the same file again changes nothing.
    The file is a serve config (``shoal build`` writes one); its code is imported here, from
    the current directory, and replicas import it from the same place.
    """
    from shoal.cli.common import _admin, resolve_address

    if not config_file.endswith((".yaml", ".yml", ".json")):
        raise click.UsageError(f"{config_file} is not a config file (.yaml/.yml/.json); "
                               "`shoal build module:app -o serve.yaml` writes one")
    if canary is not None and not 0 < canary < 100:
        raise click.BadParameter("must be between 0 and 100 (exclusive)", param_hint="--canary")
    addr = resolve_address(address)
    specs, config = _build_specs(config_file)
    results: dict[str, str] = _admin(addr, "apply", timeout=120.0, specs=specs, canary=canary)
    for name, what in results.items():
        click.echo(f"{name}: {what}")
    current = _admin(addr, "status")
    http = config.http_options
    if current.http_address and current.http_address != f"{http.scheme}://{http.host}:{http.port}" \
            and "http_options" in (getattr(config, "model_fields_set", set()) or set()):
        click.echo(f"note: the instance serves {current.http_address}; http_options apply at `shoal start`",
                   err=True)
    if config.grpc_options.grpc_servicer_functions:
        click.echo("note: grpc_options apply when an instance starts (`shoal run serve.yaml`, or "
                   "serve.start(grpc_options=...)); `shoal deploy` leaves the running gRPC server as it is",
                   err=True)
    if no_wait:
        return
    live = [n for n, what in results.items() if what != "deleted"]
    from rich.console import Console

    from shoal.cli.devloop import show_progress

    console = Console(stderr=True)
    try:
        problems = show_progress(console, lambda: _admin(addr, "status").to_dict(), live, timeout)
    except TimeoutError as e:
        raise click.ClickException(str(e)) from None
    data = _admin(addr, "status").to_dict()
    for name in live:
        app = data["applications"].get(name, {})
        line = f"{name}: {app.get('status')}"
        if app.get("route_prefix") is not None and data.get("http_address"):
            line += f"  {data['http_address']}{app['route_prefix']}"
        if app.get("canary"):
            line += f"  (canary {app['canary']['weight']:g}%: {app['canary']['status']})"
        click.echo(line)
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    failed = bool(problems)
    if failed:
        raise SystemExit(1)


@click.command()
@click.argument("name")
@click.option("--address", default=None, help="Instance directory (default: the one running instance).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds to wait for the roll-out.")
def promote(name: str, address: str | None, timeout: float) -> None:
    """Finish application NAME's canary release: roll the app to the canary's version
    (zero downtime), then remove the canary."""
    from shoal.cli.common import _admin, resolve_address

    addr = resolve_address(address)
    _admin(addr, "promote", timeout=timeout, name=name)
    click.echo(f"promoted the canary of {name!r}: it is now the app's only version")


@click.command()
@click.argument("name")
@click.option("--address", default=None, help="Instance directory (default: the one running instance).")
def rollback(name: str, address: str | None) -> None:
    """Undo application NAME's canary release: all traffic goes back to the current version
    and the canary's replicas drain and stop."""
    from shoal.cli.common import _admin, resolve_address

    addr = resolve_address(address)
    _admin(addr, "rollback", timeout=120.0, name=name)
    click.echo(f"rolled back the canary of {name!r}")
