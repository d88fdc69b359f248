"""The ``shoal`` command line: a thin layer over the Python API."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any, NoReturn

import click

import shoal.cli.config_cmd as config_cli
import shoal.cli.lifecycle as lifecycle_cli
import shoal.cli.logs as logs_cli
from shoal.cli.common import _admin, resolve_address
from shoal.runtime.rundir import RunDir


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _is_config_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml", ".json")) and ":" not in os.path.basename(target)


class _LazyGroup(click.Group):
    """The Kubernetes commands are imported when they are used (or listed by ``--help``): they
    import the pod runtime, which would add about 0.1 s to every ``shoal run``."""

    lazy = {"k8s": ("shoal.kubernetes.cli", "k8s"), "replica": ("shoal.kubernetes.pod", "replica"),
            "front": ("shoal.kubernetes.pod.front", "front")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            module, attr = self.lazy[cmd_name]
            self.add_command(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shoal")
def cli() -> None:
    """shoal: serve Ray Serve-style applications on one machine, or compile them for Kubernetes."""


@cli.command()
@click.argument("target")
@click.argument("builder_args", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--name", default=None, help="Application name (default: 'default'; ignored for config files).")
@click.option("--route-prefix", default=None, help="HTTP route prefix of the app (default '/').")
@click.option("--host", default=None, help="Proxy host (default 127.0.0.1; config file: http_options.host).")
@click.option("-p", "--port", type=int, default=None,
              help="Proxy port (default 8000, or the config file's http_options.port; 0 picks a free port).")
@click.option("--address", default=None, envvar="SHOAL_RUN_DIR",
              help="Instance directory for the control socket (default $SHOAL_RUN_DIR, else "
                   "$XDG_RUNTIME_DIR/shoal/default or /tmp/shoal-<uid>/default).")
@click.option("--num-gpus", type=int, default=None,
              help="Declare this many GPUs instead of asking nvidia-smi (fractional num_gpus share them).")
@click.option("--strict-cpus", is_flag=True, help="Refuse to oversubscribe CPUs (num_cpus is enforced).")
@click.option("--reload", is_flag=True,
              help="Watch the app's files; on a change redeploy in place (rolling), keeping the proxy up.")
@click.option("-q", "--quiet-replicas", is_flag=True,
              help="Do not show the replicas' output (print(), log records) here; `shoal logs` still has it.")
def run(target: str, builder_args: tuple[str, ...], name: str | None, route_prefix: str | None,
        host: str | None, port: int | None, address: str | None, num_gpus: int | None, strict_cpus: bool,
        reload: bool, quiet_replicas: bool) -> None:
    """Run TARGET in the foreground until Ctrl-C.

    TARGET is an import path to a bound application or an app builder
    (``module:app``, ``package.module:build``) or a serve config file (``serve.yaml``).
    ``KEY=VALUE`` arguments after TARGET are passed to an app builder as its ``args`` dict
    (``shoal run mod:build model=small``).
    Replica output (``print()``, log records at the deployment's level) is shown here,
    prefixed ``(Deployment pid=N)``, unless ``--quiet-replicas``. The first Ctrl-C drains
    the replicas and says what it waits for; a second one kills everything at once.
    """
    from shoal import api
    from shoal.cli.devloop import deploy_with_progress, load_error_details
    from shoal.cli.runcmd import check_port, claim_run_dir, path_hint, start_output, stop_instance
    from shoal.config import HTTPOptions
    from shoal.observability.logs import TAILED_ENV
    from shoal.runtime.controller import DeployError
    from shoal.schema import ConfigError

    console = _console()
    t0 = time.monotonic()
    try:
        http0 = _http_options(target).model_copy(update={k: v for k, v in (("host", host), ("port", port))
                                                          if v is not None})
        HTTPOptions.model_validate(http0.model_dump())
        parsed_args = parse_builder_args(target, builder_args)
    except (ConfigError, ValueError, TypeError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from None
    busy = check_port(http0.host, http0.port)  # before the app is imported: said at once
    if busy:
        console.print(f"[red]error:[/red] {busy}", markup=True, highlight=False)
        raise SystemExit(1)
    rd, _lock = claim_run_dir(address)
    if quiet_replicas:
        os.environ.pop(TAILED_ENV, None)
    else:
        os.environ[TAILED_ENV] = "1"  # replicas leave their terminal output to this process
    output = None
    _install_sigterm()  # SIGTERM stops as Ctrl-C does, also while replicas start
    try:
        # The instance first: its proxy and a spare replica process boot while the app's modules import.
        api.start(http_options=http0, grpc_options=_grpc_options(target), num_gpus=num_gpus,
                  strict_cpus=strict_cpus, _run_dir=rd.path)
    except (KeyboardInterrupt, Exception) as e:
        _give_up(console, rd, None, e)
    built: list[tuple[str, Any, Any]] = []
    failed = False  # under --reload, a first version that fails keeps shoal up, watching for a fix
    try:
        _, built = _load_and_build(target, name, route_prefix, parsed_args)
        # The baseline is taken before deploying: an edit made while replicas start still counts.
        watcher = _watcher(target) if reload else None
    except (ConfigError, ImportError, AttributeError, ValueError, TypeError, SyntaxError) as e:
        details, files = load_error_details(e, _watch_roots(target))
        console.print(f"[red]error:[/red] {e}")
        if details:
            console.print(details, markup=False, highlight=False)
        if not reload:
            api.shutdown()  # nothing was deployed: the proxy and the spare stop at once
            raise SystemExit(2) from None
        watcher = _watcher(target)
        watcher.watch(files)
        failed = True
    except KeyboardInterrupt:  # while the app's modules import
        stop_instance(console, rd, None)
        raise SystemExit(130) from None
    try:
        output = None if quiet_replicas else start_output(console, rd)
        for app_name, prefix, application in built:
            console.print(f"deploying application [bold]{app_name}[/bold]")
            try:
                deploy_with_progress(console, application, app_name, prefix,
                                     last_line=output.last_line if output is not None else None)
            except DeployError as e:
                if not reload:
                    raise
                console.print(f"[red]error:[/red] {e}", highlight=False)
                failed = True
        if output is not None:
            output.poll()  # what the replicas wrote while starting comes before "ready"
    except (KeyboardInterrupt, Exception) as e:
        _give_up(console, rd, output, e)
    base = api.http_address()
    if failed:
        console.print(f"[yellow]not serving yet[/yellow]: the app failed to start (above); the proxy is up at "
                      f"{base}. Save a fix to retry.", highlight=False)
    else:
        console.print(f"[green]ready[/green] in {time.monotonic() - t0:.2f}s")
    for app_name, prefix, application in built:
        if prefix is not None and not failed:
            docs = api_docs_path(application)
            extra = f"   (API docs: {base}{prefix.rstrip('/')}{docs})" if docs else ""
            console.print(f"  {app_name}: {base}{prefix}{extra}", highlight=False)
    if _grpc_options(target) is not None:
        console.print(f"  gRPC: {api.grpc_address()}", highlight=False)
    hint = path_hint()
    if hint:
        console.print(hint, markup=False, highlight=False)
    console.print("Press Ctrl-C to stop." + (" Watching the app's files for changes." if reload else ""))
    if reload:
        assert watcher is not None
        _reload_loop(console, target, name, route_prefix, watcher, parsed_args)
    else:
        _wait_for_stop()
    stop_instance(console, rd, output)
    console.print("stopped")


def _give_up(console: Any, rd: RunDir, output: Any, e: BaseException) -> NoReturn:
    """Stop the instance after Ctrl-C (exit 130) or an error (said first; exit 1)."""
    from shoal.cli.runcmd import stop_instance

    if not isinstance(e, KeyboardInterrupt):
        console.print(f"[red]error:[/red] {e}")
    stop_instance(console, rd, output)
    raise SystemExit(130 if isinstance(e, KeyboardInterrupt) else 1) from None


def _http_options(target: str) -> Any:
    """The HTTP options TARGET asks for (a config file's ``http_options``), without importing its code."""
    from shoal.config import HTTPOptions
    from shoal.schema import load_config_file

    return load_config_file(target).http_options if _is_config_file(target) else HTTPOptions()


def _grpc_options(target: str) -> Any:
    """A config file's ``grpc_options`` when it names servicer functions (None: no gRPC server)."""
    from shoal.schema import load_config_file

    if not _is_config_file(target):
        return None
    grpc = load_config_file(target).grpc_options
    return grpc if grpc.grpc_servicer_functions else None


def _wait_for_stop() -> None:
    """Until Ctrl-C, SIGTERM or ``shoal shutdown``."""
    from shoal import api

    inst = api._require()
    try:
        while not inst.controller.shutdown_requested.is_set() and not inst.controller.stopped.is_set():
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass


def parse_builder_args(target: str, pairs: tuple[str, ...] | list[str]) -> dict[str, str] | None:
    """``KEY=VALUE`` command-line arguments as an app builder's ``args`` (None when there are none)."""
    if not pairs:
        return None
    if _is_config_file(target):
        raise ValueError(f"KEY=VALUE arguments ({' '.join(pairs)}) apply to an import path, not to a "
                         f"config file; set them under the application's `args:` in {target}")
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"builder argument {pair!r} is not KEY=VALUE (e.g. `shoal run {target} model=small`)")
        key = key.strip()
        if key in out:
            raise ValueError(f"builder argument {key!r} is given twice")
        out[key] = value
    return out


def api_docs_path(application: Any) -> str | None:
    """The interactive API docs path (FastAPI's ``docs_url``) of an app whose ingress is a FastAPI app."""
    target = getattr(getattr(application, "deployment", None), "func_or_class", None)
    asgi = getattr(target, "__shoal_asgi_app__", None)
    docs = getattr(asgi, "docs_url", None)
    return docs if isinstance(docs, str) and docs else None


def _load_and_build(target: str, name: str | None, route_prefix: str | None,
                    builder_args: dict[str, str] | None = None) -> tuple[Any, list[tuple[str, Any, Any]]]:
    """The HTTP options and (name, route prefix, bound application) of each app of TARGET
    (importing its code)."""
    from shoal.config import HTTPOptions
    from shoal.loader import build_application
    from shoal.schema import ServeDeploySchema, load_config_file

    if _is_config_file(target):
        config = load_config_file(target)
        http = config.http_options
        source = target
    else:
        http = HTTPOptions()
        app_schema: dict[str, Any] = {"import_path": target, "name": name or "default"}
        if route_prefix is not None:
            app_schema["route_prefix"] = None if route_prefix.lower() == "none" else route_prefix
        if builder_args:
            app_schema["args"] = builder_args
        config = ServeDeploySchema.from_dict({"applications": [app_schema]}, source="command line")
        source = "command line"
    built = [(a.name, a.route_prefix, build_application(a, source=source, index=i))
             for i, a in enumerate(config.applications)]
    return http, built


def _watch_roots(target: str) -> list[str]:
    return [os.getcwd()] + ([os.path.dirname(os.path.abspath(target))] if _is_config_file(target) else [])


def _watcher(target: str) -> Any:
    from shoal.cli.devloop import SourceWatcher

    return SourceWatcher(_watch_roots(target), [target] if _is_config_file(target) else [])


def _reload_loop(console: Any, target: str, name: str | None, route_prefix: str | None, watcher: Any,
                 builder_args: dict[str, str] | None = None) -> None:
    """Redeploy in place whenever the app's files change, until Ctrl-C / shutdown.

    Changed code rolls the affected deployments (new replicas ready before old ones stop);
    the proxy stays up. A file that fails to import keeps the previous version serving.
    """
    from shoal import api
    from shoal.cli.devloop import deploy_with_progress, describe_changes, forget_modules, load_error_details
    from shoal.deployment import build_app_spec

    roots = _watch_roots(target)
    inst = api._require()
    try:
        while not inst.controller.shutdown_requested.is_set() and not inst.controller.stopped.is_set():
            time.sleep(0.5)
            changed = watcher.changed()
            if not changed:
                continue
            rel = ", ".join(os.path.relpath(f) for f in changed)
            console.print(f"[cyan]changed:[/cyan] {rel}; reloading")
            forget_modules(roots)
            t0 = time.monotonic()
            try:
                _, built = _load_and_build(target, name, route_prefix, builder_args)
            except Exception as e:
                details, files = load_error_details(e, roots)
                console.print(f"[red]reload failed[/red], the previous version keeps serving: {e}", highlight=False)
                if details:
                    console.print(details, markup=False, highlight=False)
                watcher.rescan()
                watcher.watch(files)  # a module whose import failed is not in sys.modules
                continue
            watcher.rescan()
            ok = True
            for app_name, prefix, application in built:
                current = inst.controller.apps.get(app_name)
                try:
                    new_spec = build_app_spec(application, app_name, prefix)
                except Exception as e:
                    console.print(f"[red]reload failed[/red] for {app_name}: {e}", highlight=False)
                    ok = False
                    continue
                for line in describe_changes(current.spec if current is not None else None, new_spec):
                    console.print(f"  {line}", highlight=False)
                try:
                    deploy_with_progress(console, application, app_name, prefix)
                except Exception as e:
                    ok = False
                    console.print(f"[red]redeploy of {app_name} failed:[/red] {e}", highlight=False)
                    console.print("the previous version's replicas that still run keep serving; save a fix to retry",
                                  highlight=False)
            if ok:
                console.print(f"[green]reloaded[/green] in {time.monotonic() - t0:.2f}s")
    except KeyboardInterrupt:
        pass


@cli.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("-o", "--output", "output", default=None, help="Write the config file here (default: stdout).")
@click.option("--name", default=None, help="Application name (one target only; default 'default').")
@click.option("--route-prefix", default=None, help="Route prefix (one target only; default '/').")
def build(targets: tuple[str, ...], output: str | None, name: str | None, route_prefix: str | None) -> None:
    """Write a serve config file for the bound apps at TARGETS (``module:app``).

    The file lists every deployment with the options set in code, ready to edit and to pass to
    ``shoal run``. With several targets, apps are named after their modules and routed at
    ``/<module>``.
    """
    import yaml

    from shoal.config import HTTPOptions
    from shoal.deployment import Application
    from shoal.loader import build_config_dict, import_attr

    if len(targets) > 1 and (name or route_prefix):
        raise click.UsageError("--name and --route-prefix apply to a single target")
    apps: list[dict[str, Any]] = []
    for target in targets:
        try:
            app = import_attr(target)
        except (ImportError, AttributeError) as e:
            raise click.ClickException(str(e)) from None
        if not isinstance(app, Application):
            raise click.ClickException(f"{target} is not a bound application (call .bind() on a deployment)")
        module = target.split(":")[0].rsplit(".", 1)[-1]
        app_name = name or ("default" if len(targets) == 1 else module)
        prefix = route_prefix or ("/" if len(targets) == 1 else f"/{module}")
        try:
            apps.extend(build_config_dict(app, app_name, prefix, target)["applications"])
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    http = HTTPOptions()
    doc = {"http_options": {"host": http.host, "port": http.port}, "applications": apps}
    text = yaml.safe_dump(doc, sort_keys=False)
    if output:
        with open(output, "w") as f:
            f.write(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


@cli.command()
@click.argument("target")
@click.option("-f", "--format", "fmt", type=click.Choice(["mermaid", "dot", "svg", "png"]), default=None,
              help="Output format (default: from the -o file's extension, else mermaid). "
                   "svg and png need Graphviz's `dot`.")
@click.option("-o", "--output", "output", default=None, help="Write the graph here (default: stdout).")
@click.option("--name", default=None, help="Application name (import paths only; default 'default').")
@click.option("--route-prefix", default=None, help="Route prefix (import paths only; default '/').")
def graph(target: str, fmt: str | None, output: str | None, name: str | None, route_prefix: str | None) -> None:
    """Draw the deployment graph of TARGET (``module:app`` or a serve config file).

    Each deployment shows its replicas (a fixed count, or the autoscaling range and target),
    its resources, max_ongoing_requests, and whether it is the ingress and at which route;
    arrows are handle calls. Config files are drawn with their deployment overrides applied.
    """
    from shoal.graph import GraphvizNotFoundError, load_app_specs, render
    from shoal.schema import ConfigError

    if fmt is None:
        ext = os.path.splitext(output or "")[1].lower()
        fmt = {".svg": "svg", ".png": "png", ".dot": "dot", ".gv": "dot"}.get(ext, "mermaid")
    try:
        specs = load_app_specs(target, name=name, route_prefix=route_prefix)
        data = render(specs, fmt)
    except (ConfigError, ImportError, AttributeError, ValueError, TypeError, GraphvizNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if output:
        with open(output, "wb") as f:
            f.write(data)
        click.echo(f"wrote {output}", err=True)
    elif fmt == "png":
        sys.stdout.buffer.write(data)
    else:
        click.echo(data.decode(), nl=False)


def _install_sigterm() -> None:
    import signal

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)


@cli.command()
@click.option("--address", default=None, help="Instance directory (default: the one running instance).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-w", "--watch", is_flag=True,
              help="Live view, redrawn every --interval: replicas, req/s, p50/p99, errors, canaries. Ctrl-C exits.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes of --watch.")
@click.option("--iterations", type=click.IntRange(min=1), default=None,
              help="With --watch: stop after this many refreshes (default: until Ctrl-C).")
def status(address: str | None, as_json: bool, watch: bool, interval: float, iterations: int | None) -> None:
    """Show applications, deployments and replica states of a running instance."""
    addr = resolve_address(address)
    if watch:
        from shoal.observability import watch as live_view

        try:
            live_view.run(lambda: dict(_admin(addr, "status", timeout=5.0).to_dict()), interval=interval,
                          iterations=iterations, address=addr)
        except KeyboardInterrupt:
            pass
        return
    st = _admin(addr, "status")
    data = st.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console

    print_status(Console(), addr, data)


# A status message is cut to its first line, at most this many characters (the JSON has all of it).
STATUS_MESSAGE_CHARS = 160


def _first_line(message: str) -> str:
    line = message.split("\n", 1)[0]
    return line if len(line) <= STATUS_MESSAGE_CHARS else line[:STATUS_MESSAGE_CHARS - 1] + "…"


def print_status(console: Any, addr: str, data: dict[str, Any]) -> None:
    """``shoal status`` as text: the proxy, then a table of apps, deployments and messages."""
    from rich.table import Table

    console.print(f"instance: {addr}   http: {data['http_address'] or '(no proxy)'}")
    if data.get("resources"):
        console.print(data["resources"])
    for proxy_id, message in (data.get("proxy_messages") or {}).items():
        console.print(f"proxy {proxy_id}: {data['proxies'].get(proxy_id, '')} {message}")
    if not data["applications"]:
        console.print("no applications deployed")
        return
    table = Table("application", "status", "route", "deployment", "deployment status", "replicas")
    messages: list[str] = []
    for app_name, app in data["applications"].items():
        first = True
        for dep_name, dep in app["deployments"].items():
            replicas = ", ".join(f"{k}: {v}" for k, v in sorted(dep["replica_states"].items())) or "-"
            table.add_row(app_name if first else "", app["status"] if first else "",
                          str(app["route_prefix"]) if first else "", dep_name, dep["status"], replicas)
            first = False
            if dep["message"]:
                messages.append(f"{app_name}/{dep_name}: {_first_line(dep['message'])}")
        if app["message"] and not any(d["message"] == app["message"] for d in app["deployments"].values()):
            messages.append(f"{app_name}: {_first_line(app['message'])}")
    console.print(table)
    for line in messages:  # under the table: a traceback never squeezes it (`--json` has the whole message)
        console.print(line, markup=False, highlight=False)
    _print_versions(console, data["applications"])


def _metrics_line(m: dict[str, Any]) -> str:
    if not m or not m.get("requests"):
        return "no requests yet"

    def ms(v: float | None) -> str:
        return "-" if v is None else (">30s" if v == float("inf") else f"<={v:g}ms")

    return (f"{m['requests']} requests, {m['errors']} errors ({m['error_rate']:.2%}), "
            f"p50 {ms(m['p50_ms'])}, p95 {ms(m['p95_ms'])}, p99 {ms(m['p99_ms'])}")


def _print_versions(console: Any, apps: dict[str, Any]) -> None:
    """Per-version request metrics; for apps in a canary release, both versions side by side."""
    for name, app in apps.items():
        canary = app.get("canary")
        if canary is None:
            if app.get("metrics", {}).get("requests"):
                console.print(f"{name} version {app.get('version', '')}: {_metrics_line(app['metrics'])}")
            continue
        console.print(f"[bold]{name}[/bold]: canary release, {canary['weight']:g}% of HTTP traffic to the canary")
        console.print(f"  current {app.get('version', '')}: {_metrics_line(app.get('metrics', {}))}")
        console.print(f"  canary  {canary['version']} ({canary['status']}): {_metrics_line(canary['metrics'])}")
        if canary.get("message"):
            console.print(f"  {canary['message']}")
        console.print(f"  finish with `shoal promote {name}` or `shoal rollback {name}`")


@cli.command()
@click.option("--address", default=None, help="Instance directory (default: the one running instance).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for it to stop.")
def shutdown(address: str | None, timeout: float) -> None:
    """Stop a running instance: its replicas, proxy and controller."""
    addr = resolve_address(address, stop_orphans=True)  # no controller: stop what it left running
    _admin(addr, "shutdown")
    deadline = time.monotonic() + timeout
    while RunDir(addr).is_live() and time.monotonic() < deadline:
        time.sleep(0.1)
    if RunDir(addr).is_live():
        raise click.ClickException(f"the instance at {addr} is still running after {timeout}s")
    click.echo(f"shut down {addr}")


@cli.command()
@click.argument("name")
@click.option("--address", default=None, help="Instance directory (default: the one running instance).")
def delete(name: str, address: str | None) -> None:
    """Delete application NAME from a running instance."""
    addr = resolve_address(address)
    _admin(addr, "delete", name=name)
    click.echo(f"deleted application {name!r}")


cli.add_command(logs_cli.logs)
cli.add_command(config_cli.config)
cli.add_command(lifecycle_cli.start)
cli.add_command(lifecycle_cli.deploy)
cli.add_command(lifecycle_cli.promote)
cli.add_command(lifecycle_cli.rollback)


def main() -> None:
    sys.path.insert(0, os.getcwd()) if os.getcwd() not in sys.path else None
    cli(prog_name="shoal")


if __name__ == "__main__":
    main()
