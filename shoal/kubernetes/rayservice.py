"""Read a KubeRay ``RayService`` and hand back its Serve config (``spec.serveConfigV2``).

``serveConfigV2`` is the Ray Serve config file embedded as a YAML string inside the
RayService manifest; shoal compiles its applications exactly as it compiles a config file.
The Ray cluster part (``rayClusterConfig``) has no counterpart: Kubernetes itself schedules
shoal's pods.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from shoal.schema import ConfigError, ServeDeploySchema

__all__ = ["load_rayservice", "rayservice_config"]


def rayservice_config(documents: list[Any], source: str) -> ServeDeploySchema:
    """The Serve config of the one RayService among ``documents`` (parsed YAML documents)."""
    docs = [d for d in documents if d is not None]
    if not docs:
        raise ConfigError(source, "the file is empty; expected a RayService (apiVersion ray.io/v1)")
    services = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RayService"]
    if not services:
        first = docs[0]
        what = (f"kind {first.get('kind')!r} (apiVersion {first.get('apiVersion')!r})" if isinstance(first, dict)
                else f"a {type(first).__name__}")
        raise ConfigError(source, f"expected a RayService (apiVersion ray.io/v1, kind RayService), got {what}")
    if len(services) > 1:
        raise ConfigError(source, f"the file holds {len(services)} RayServices; give one per file")
    rs = services[0]
    api_version = str(rs.get("apiVersion", ""))
    if not api_version.startswith("ray.io/"):
        raise ConfigError(source, f"apiVersion: expected ray.io/v1 for a RayService, got {api_version!r}")
    spec = rs.get("spec")
    if not isinstance(spec, dict):
        raise ConfigError(source, "spec: missing; a RayService needs spec.serveConfigV2")
    raw = spec.get("serveConfigV2")
    where = f"{source}: spec.serveConfigV2"
    if raw is None:
        if "serveConfig" in spec:
            raise ConfigError(source, "spec.serveConfig (the v1 format) is not supported; convert it to serveConfigV2")
        raise ConfigError(source, "spec.serveConfigV2: missing; it holds the Serve config that shoal compiles")
    if isinstance(raw, str):
        try:
            data = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            raise ConfigError(where, f"{at}invalid YAML: {getattr(e, 'problem', None) or e}") from None
    elif isinstance(raw, dict):
        data = raw
    else:
        raise ConfigError(source, f"spec.serveConfigV2: expected a YAML string, got {type(raw).__name__}")
    return ServeDeploySchema.from_dict(data, source=where)


def load_rayservice(path: str | os.PathLike[str]) -> tuple[ServeDeploySchema, str]:
    """Read ``path`` and return its Serve config and the source name to use in errors."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(source, "no such file") from None
    except OSError as e:
        raise ConfigError(source, f"cannot read: {e.strerror or e}") from None
    try:
        documents = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {e}") from None
    return rayservice_config(documents, source), f"{source}: spec.serveConfigV2"
