"""What ``shoal k8s build`` compiles: a ``module:app``, a serve config file, or a KubeRay RayService.

Each target turns into :class:`LoadedApp` values: the built graph (an
:class:`~shoal.deployment.AppSpec`) together with the serve-config entry that describes it.
The entry travels into the app's ConfigMap, and the pods rebuild the very same graph from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from shoal.deployment import Application, AppSpec, build_app_spec
from shoal.loader import build_application, build_config_dict, import_attr
from shoal.schema import ConfigError, ServeApplicationSchema, ServeDeploySchema, load_config_file

__all__ = ["LoadedApp", "grpc_options_of", "is_config_file", "load_apps", "load_schema", "schema_entry"]


@dataclass
class LoadedApp:
    spec: AppSpec
    # The application's serve-config entry in JSON-friendly form.
    entry: dict[str, Any]
    # runtime_env of the entry and of its deployments' ray_actor_options (for the Dockerfile).
    runtime_envs: list[dict[str, Any]] = field(default_factory=list)


def is_config_file(target: str) -> bool:
    return target.endswith((".yaml", ".yml", ".json")) and ":" not in os.path.basename(target)


def schema_entry(app: ServeApplicationSchema) -> dict[str, Any]:
    """The entry as written (unset options left out), with its name and route prefix explicit."""
    entry = app.model_dump(mode="json", exclude_unset=True)
    out: dict[str, Any] = {"name": app.name, "route_prefix": app.route_prefix, "import_path": app.import_path}
    for key, value in entry.items():
        if key not in out:
            out[key] = value
    return out


def _runtime_envs(app: ServeApplicationSchema) -> list[dict[str, Any]]:
    envs = [app.runtime_env] if app.runtime_env else []
    for dep in app.deployments:
        rao = dep.options().get("ray_actor_options") or {}
        env = rao.get("runtime_env") if isinstance(rao, dict) else None
        if env:
            envs.append(dict(env))
    return envs


def load_schema(target: str | None, *, rayservice: str | None = None, name: str | None = None,
                route_prefix: str | None = None) -> tuple[ServeDeploySchema, str]:
    """The serve config a target stands for, and the source to name in errors. Imports nothing."""
    if rayservice is not None:
        if target:
            raise ConfigError("command line", "give either TARGET or --from-rayservice, not both")
        from shoal.kubernetes.rayservice import load_rayservice

        return load_rayservice(rayservice)
    if not target:
        raise ConfigError("command line", "missing TARGET (module:app or a serve config file) or --from-rayservice")
    if is_config_file(target):
        if name is not None or route_prefix is not None:
            raise ConfigError("command line", "--name and --route-prefix apply to module:app targets only")
        return load_config_file(target), target
    entry: dict[str, Any] = {"import_path": target, "name": name or "default"}
    if route_prefix is not None:
        entry["route_prefix"] = None if route_prefix.lower() == "none" else route_prefix
    return ServeDeploySchema.from_dict({"applications": [entry]}, source="command line"), "command line"


def load_apps(target: str | None, *, rayservice: str | None = None, name: str | None = None,
              route_prefix: str | None = None) -> tuple[list[LoadedApp], dict[str, Any]]:
    """Import and build every application of a target; also returns the config's ``http_options``.

    A ``module:app`` target is described the way ``shoal build`` writes it (every deployment
    with the options set in code); a config file's entries are kept as written, so the pods
    apply the same overrides to the same code.
    """
    config, source = load_schema(target, rayservice=rayservice, name=name, route_prefix=route_prefix)
    http_options = config.http_options.model_dump(mode="json", exclude_unset=True)
    apps: list[LoadedApp] = []
    module_target = target is not None and rayservice is None and not is_config_file(target)
    for i, app_schema in enumerate(config.applications):
        app = build_application(app_schema, source=source, index=i)
        spec = build_app_spec(app, name=app_schema.name, route_prefix=app_schema.route_prefix)
        if module_target and isinstance(import_attr(app_schema.import_path), Application):
            entry = build_config_dict(app, app_schema.name, app_schema.route_prefix,
                                      app_schema.import_path)["applications"][0]
        else:
            entry = schema_entry(app_schema)
        apps.append(LoadedApp(spec=spec, entry=entry, runtime_envs=_runtime_envs(app_schema)))
    return apps, http_options


def grpc_options_of(target: str | None, *, rayservice: str | None = None) -> dict[str, Any] | None:
    """The target's ``grpc_options`` as written (JSON form), or None when it sets none (a
    ``module:app`` target never does). Imports nothing."""
    if target is not None and rayservice is None and not is_config_file(target):
        return None
    config, _ = load_schema(target, rayservice=rayservice)
    options = config.grpc_options.model_dump(mode="json", exclude_unset=True)
    return options or None
