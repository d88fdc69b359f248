"""``shoal config``: the running instance's configuration, as a serve config file."""

from __future__ import annotations

import json
from typing import Any

import click

from shoal.cli.common import _admin, resolve_address


def render_config(data: dict[str, Any], address: str) -> str:
    """The YAML ``shoal config`` prints: a config file for ``shoal run``/``shoal deploy``, with
    comments saying where it came from and what could not be included."""
    import yaml

    doc = {"http_options": data["http_options"], "applications": data["applications"]}
    lines = [f"# the running configuration of the shoal instance at {address}"]
    lines += [f"# note: {n}" for n in data.get("notes", [])]
    if data.get("from_python"):
        names = ", ".join(data["from_python"])
        lines.append(f"# deployed from Python (serve.run), so without an import_path: {names}; "
                     "add one to deploy this file")
    if not data["applications"]:
        lines.append("# no applications are deployed")
    return "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False)


@click.command("config")
@click.option("--address", default=None, help="Instance directory (default: the one running instance).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of YAML.")
@click.option("-n", "--name", "app_name", default=None, help="Only this application.")
def config(address: str | None, as_json: bool, app_name: str | None) -> None:
    """Print the running configuration as a serve config file (YAML).

    Each application's route prefix, the import path and builder args it was deployed from,
    and every deployment's options that differ from the defaults, as the running instance has
    them (config-file overrides and `shoal run` arguments applied). Secrets are left out.
    """
    addr = resolve_address(address)
    data = dict(_admin(addr, "config"))
    if app_name is not None:
        known = [a["name"] for a in data["applications"]]
        if app_name not in known:
            raise click.ClickException(f"no application {app_name!r} is deployed "
                                       f"(deployed: {', '.join(map(repr, known)) or 'none'})")
        data["applications"] = [a for a in data["applications"] if a["name"] == app_name]
        data["from_python"] = [n for n in data.get("from_python", []) if n == app_name]
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(render_config(data, addr), nl=False)
