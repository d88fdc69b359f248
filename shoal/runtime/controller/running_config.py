"""The running configuration of an instance, as a serve config file (``shoal config``).

Built from what the controller deployed: each application's name, route prefix, the import
path and builder ``args`` it came from (when it came from a config file or ``shoal run``), and
each deployment's options that differ from the defaults. Apps deployed from Python
(``serve.run``) have no import path; they are listed apart. Secrets stay out: API keys given
inline and the TLS key password are left out (``notes`` says so), and ``runtime_env``
environment variables show ``<set>`` instead of their values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shoal.deployment import AppSpec

__all__ = ["running_config"]

# http_options fields never shown (secrets, or where they are kept).
_SECRET_HTTP = frozenset({"api_keys", "ssl_keyfile_password"})


def _jsonable(value: Any) -> Any:
    """Plain YAML/JSON data; anything else (a policy class, a callable) by its import path or repr."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    module, qual = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if module and qual:
        return f"{module}:{qual}"
    return repr(value)


def _deployment_options(config: Any) -> dict[str, Any]:
    options = config.model_dump(mode="python", exclude_defaults=True)
    env = (options.get("ray_actor_options") or {}).get("runtime_env") or {}
    if isinstance(env, dict) and env.get("env_vars"):
        env = {**env, "env_vars": {k: "<set>" for k in env["env_vars"]}}
        options["ray_actor_options"] = {**options["ray_actor_options"], "runtime_env": env}
    return {k: _jsonable(v) for k, v in options.items()}


def running_config(specs: Iterable[AppSpec], http: Any, http_port: int | None) -> dict[str, Any]:
    """``{"http_options": ..., "applications": [...], "from_python": [names], "notes": [...]}``: the
    config file that would deploy what runs (apps from Python have no import path: named in
    ``from_python``); ``notes`` says what was left out."""
    http_options = {k: _jsonable(v) for k, v in http.model_dump(mode="python", exclude_defaults=True).items()
                    if k not in _SECRET_HTTP}
    notes = [f"http_options.{k} is set but not shown (a secret)" for k in sorted(_SECRET_HTTP) if getattr(http, k)]
    http_options["host"] = http.host
    http_options["port"] = http_port if http_port else http.port
    apps: list[dict[str, Any]] = []
    from_python: list[str] = []
    for spec in specs:
        source = getattr(spec, "source", None) or {}
        entry: dict[str, Any] = {"name": spec.name, "route_prefix": spec.route_prefix}
        if source.get("import_path"):
            entry["import_path"] = source["import_path"]
            if source.get("args"):
                entry["args"] = _jsonable(source["args"])
        else:
            from_python.append(spec.name)
        entry["deployments"] = [{"name": name, **_deployment_options(d.config)}
                                for name, d in spec.deployments.items()]
        apps.append(entry)
    return {"http_options": http_options, "applications": apps, "from_python": from_python, "notes": notes}
