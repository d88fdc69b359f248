"""From a config file's application entry to a bound :class:`Application`, and back.

``build_application`` imports an application (or calls an application builder with the
entry's ``args``) and applies the entry's per-deployment overrides; ``build_config_dict`` is
the reverse direction used by ``shoal build``: it describes a bound application in the
config-file schema, listing every deployment with the options set in code.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from shoal.config import HTTPOptions, validate_route_prefix
from shoal.deployment import Application, Deployment
from shoal.schema import (
    ConfigError,
    DeploymentSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    format_error_path,
    validation_error_to_config_error,
)

__all__ = [
    "apply_deployment_overrides",
    "build_application",
    "build_applications",
    "build_config_dict",
    "graph_deployments",
    "import_attr",
]


# --------------------------------------------------------------------------------------------
# Importing "module:attr" paths
# --------------------------------------------------------------------------------------------


def _ensure_cwd_on_path() -> None:
    """Make modules in the working directory importable, as ``serve run`` does."""
    cwd = os.getcwd()
    for entry in sys.path:
        # "" stands for the working directory, whatever it is at import time.
        if entry == "" or os.path.abspath(entry) == cwd:
            return
    sys.path.insert(0, cwd)


def _candidates(path: str) -> list[tuple[str, list[str]]]:
    """``(module, attribute chain)`` splits of ``path`` to try, in order."""
    if ":" in path:
        module, attrs = path.split(":", 1)
        return [(module, attrs.split("."))]
    parts = path.split(".")
    # "a.b.c" means module "a.b", attribute "c"; shorter modules allow "a.b.Class.attr".
    return [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]


def _is_missing(err: ModuleNotFoundError, module: str) -> bool:
    """Whether ``err`` says ``module`` itself (or a package above it) does not exist."""
    return err.name is not None and (module == err.name or module.startswith(err.name + "."))


def import_attr(path: str, *, field: str | None = None, source: str = "<config>") -> Any:
    """Import ``"pkg.module:attr.sub"`` or ``"pkg.module.attr"`` and return the object.

    The working directory is put on ``sys.path`` first (once). Failures raise ImportError
    (bad path, module not found, module failed to import) or AttributeError (no such
    attribute), saying what was tried; with ``field`` (the config-file field the path came
    from, e.g. ``"applications[0].import_path"``) they raise :class:`ConfigError` naming
    ``source`` and ``field`` instead.
    """

    def fail(kind: type[Exception], msg: str) -> Exception:
        text = f"cannot import {path!r}: {msg}"
        if field is not None:
            return ConfigError(source, [(field, text)])
        return kind(text)

    if not isinstance(path, str):
        raise fail(ImportError, f"expected a string, got {type(path).__name__}")
    segments = [s for chunk in path.split(":") for s in chunk.split(".")]
    if path.count(":") > 1 or not all(s.isidentifier() for s in segments) or len(segments) < 2:
        raise fail(ImportError, "expected 'module:attribute' or 'module.attribute'")

    _ensure_cwd_on_path()
    tried: list[str] = []
    missing = ""
    for module_name, attrs in _candidates(path):
        tried.append(module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if _is_missing(e, module_name):
                missing = e.name or module_name
                continue
            raise fail(ImportError, f"importing module {module_name!r} failed: {e}") from e
        except Exception as e:
            raise fail(ImportError, f"importing module {module_name!r} raised {type(e).__name__}: {e}") from e

        obj: Any = module
        for k, attr in enumerate(attrs):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                owner = module_name + "".join(f".{a}" for a in attrs[:k])
                kind = "module" if k == 0 else "object"
                msg = f"{kind} {owner!r} has no attribute {attr!r}"
                close = difflib.get_close_matches(attr, [n for n in dir(obj) if not n.startswith("_")], n=1)
                if close:
                    msg += f" (did you mean {close[0]!r}?)"
                raise fail(AttributeError, msg) from None
        return obj

    modules = ", ".join(repr(m) for m in tried)
    raise fail(
        ImportError,
        f"no module named {missing!r} (tried module{'s' if len(tried) > 1 else ''} {modules}; "
        f"sys.path includes the working directory {os.getcwd()!r})",
    )


# --------------------------------------------------------------------------------------------
# Walking bound graphs
# --------------------------------------------------------------------------------------------


def _nested_apps(value: Any) -> Iterator[Application]:
    """Applications inside a bound argument (directly or in lists, tuples and dicts)."""
    if isinstance(value, Application):
        yield value
    elif type(value) in (list, tuple):
        for v in value:
            yield from _nested_apps(v)
    elif type(value) is dict:
        for v in value.values():
            yield from _nested_apps(v)


def _graph_nodes(app: Application) -> list[Application]:
    """Every node reachable from ``app`` once, dependencies before the nodes that bind them."""
    seen: set[int] = set()
    order: list[Application] = []

    def visit(node: Application) -> None:
        if id(node) in seen:
            return
        seen.add(id(node))
        for arg in (*node._args, *node._kwargs.values()):
            for child in _nested_apps(arg):
                visit(child)
        order.append(node)

    visit(app)
    return order


def graph_deployments(app: Application) -> list[Deployment]:
    """The distinct deployments of a bound graph, dependencies first and the ingress last."""
    out: list[Deployment] = []
    for node in _graph_nodes(app):
        if not any(d is node.deployment for d in out):
            out.append(node.deployment)
    return out


def _rebuild(app: Application, replace: Callable[[Deployment], Deployment]) -> Application:
    """A copy of the graph with each deployment passed through ``replace``; originals untouched.

    A node reached along several paths is copied once, so shared nodes stay shared.
    """
    nodes: dict[int, Application] = {}
    deps: dict[int, Deployment] = {}

    def convert(value: Any) -> Any:
        if isinstance(value, Application):
            return node_copy(value)
        if type(value) in (list, tuple):
            items = [convert(v) for v in value]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
        if type(value) is dict:
            converted = {k: convert(v) for k, v in value.items()}
            return value if all(converted[k] is v for k, v in value.items()) else converted
        return value

    def node_copy(node: Application) -> Application:
        if id(node) in nodes:
            return nodes[id(node)]
        dep = node.deployment
        if id(dep) not in deps:
            deps[id(dep)] = replace(dep)
        new = copy.copy(node)
        new._bound_deployment = deps[id(dep)]
        new._args = tuple(convert(a) for a in node._args)
        new._kwargs = {k: convert(v) for k, v in node._kwargs.items()}
        nodes[id(node)] = new
        return new

    return node_copy(app)


def apply_deployment_overrides(
    app: Application,
    deployments: Sequence[DeploymentSchema],
    *,
    source: str = "<config>",
    prefix: Sequence[int | str] = ("applications", 0),
    app_name: str = "default",
) -> Application:
    """A copy of ``app`` where each deployment named in ``deployments`` has those options set.

    Only the options written in each entry are applied (``Deployment.options``). An entry
    naming no deployment of the graph is a :class:`ConfigError` listing the names that exist.
    """
    if not deployments:
        return app
    existing = [d.name for d in graph_deployments(app)]
    overrides: dict[str, tuple[int, dict[str, Any]]] = {}
    problems: list[tuple[str, str]] = []
    for j, entry in enumerate(deployments):
        if entry.name not in existing:
            msg = f"application {app_name!r} has no deployment named {entry.name!r}"
            close = difflib.get_close_matches(entry.name, existing, n=1)
            if close:
                msg += f" (did you mean {close[0]!r}?)"
            msg += f"; its deployments are: {', '.join(repr(n) for n in existing)}"
            problems.append((format_error_path([*prefix, "deployments", j, "name"]), msg))
        else:
            overrides[entry.name] = (j, entry.options())
    if problems:
        raise ConfigError(source, problems)

    def replace(dep: Deployment) -> Deployment:
        if dep.name not in overrides:
            return dep
        j, options = overrides[dep.name]
        try:
            return dep.options(**options)
        except (TypeError, ValueError) as e:
            raise ConfigError(source, [(format_error_path([*prefix, "deployments", j]), str(e))]) from None

    return _rebuild(app, replace)


# --------------------------------------------------------------------------------------------
# Config entry -> Application
# --------------------------------------------------------------------------------------------


def _args_model(builder: Callable[..., Any], first: inspect.Parameter) -> type[BaseModel] | None:
    """The pydantic model the builder's first parameter is annotated with, if any."""
    try:
        hints = typing.get_type_hints(builder, include_extras=False)
    except (NameError, TypeError, AttributeError, SyntaxError):
        # Annotations that cannot be resolved: fall back to the raw ones below.
        hints = {}
    annotation = hints.get(first.name, first.annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    # `Args | dict[str, Any]`: a builder that also takes plain dicts from Python callers.
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def _call_builder(
    builder: Callable[..., Any], app_schema: ServeApplicationSchema, source: str, prefix: tuple[int | str, ...]
) -> Any:
    path = app_schema.import_path
    args = app_schema.args
    try:
        sig: inspect.Signature | None = inspect.signature(builder)
    except (TypeError, ValueError):
        sig = None
    if sig is None:
        return builder(args)
    positional = [
        p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if not positional:
        if args:
            raise ConfigError(
                source,
                [(format_error_path([*prefix, "args"]), f"the application builder {path!r} takes no arguments")],
            )
        return builder()
    model = _args_model(builder, positional[0]) if positional[0].kind is not inspect.Parameter.VAR_POSITIONAL else None
    if model is None:
        return builder(dict(args))
    try:
        validated = model.model_validate(args)
    except ValidationError as e:
        raise validation_error_to_config_error(e, source, model, prefix=(*prefix, "args")) from None
    return builder(validated)


def build_application(app_schema: ServeApplicationSchema, source: str = "<config>", *, index: int = 0) -> Application:
    """Import the entry's ``import_path`` and return the bound application it describes.

    ``import_path`` may name a bound :class:`Application` (then ``args`` must be empty) or an
    application builder: a function called with ``args``, validated first into the pydantic
    model its first parameter is annotated with, if any, and otherwise passed as a dict. The
    entry's ``deployments`` overrides are then applied to a copy of the graph (the imported
    objects are not changed). ``index`` is the entry's position in ``applications``, used in
    error paths. Problems raise :class:`ConfigError` naming ``source`` and the field.
    """
    prefix: tuple[int | str, ...] = ("applications", index)
    path_field = format_error_path([*prefix, "import_path"])
    target = import_attr(app_schema.import_path, field=path_field, source=source)
    app = _application_of(target, app_schema, source, prefix)
    built = apply_deployment_overrides(
        app, app_schema.deployments, source=source, prefix=prefix, app_name=app_schema.name
    )
    if built is app:  # never change the imported (or builder-cached) object
        built = copy.copy(built)
    if app_schema.autoscaling_policy is not None:
        built._autoscaling_policy = app_schema.autoscaling_policy
    built._source = {"import_path": app_schema.import_path, "args": dict(app_schema.args)}
    return built


def _application_of(target: Any, app_schema: ServeApplicationSchema, source: str,
                    prefix: tuple[int | str, ...]) -> Application:
    """The application an imported ``target`` stands for: itself, or what the builder returns."""
    path = app_schema.import_path
    path_field = format_error_path([*prefix, "import_path"])

    def problem(field: str, message: str) -> ConfigError:
        return ConfigError(source, [(field, message)])

    if isinstance(target, Application):
        if app_schema.args:
            raise problem(format_error_path([*prefix, "args"]),
                          f"{path!r} is an already bound application, so it takes no args; "
                          "point import_path at an application builder function to pass args")
        return target
    if isinstance(target, Deployment):
        raise problem(path_field,
                      f"{path!r} is the deployment {target.name!r}, not an application; bind it "
                      f"(app = {target.name}.bind(...)) and point import_path at the result")
    if inspect.isclass(target) or not callable(target):
        raise problem(path_field,
                      f"{path!r} is a {type(target).__name__}; expected a bound application "
                      "(made with .bind()) or a function that builds one")
    built = _call_builder(target, app_schema, source, prefix)
    if not isinstance(built, Application):
        hint = (
            f" (call {built.name}.bind(...) in the builder)"
            if isinstance(built, Deployment)
            else " (did the builder forget to return .bind(...)?)"
        )
        raise problem(path_field,
                      f"the application builder {path!r} returned {type(built).__name__}, "
                      f"expected an Application{hint}")
    return built


def build_applications(config: ServeDeploySchema, source: str = "<config>") -> list[Application]:
    """:func:`build_application` for every entry of a config, in order."""
    return [build_application(a, source, index=i) for i, a in enumerate(config.applications)]


# --------------------------------------------------------------------------------------------
# Application -> config dict (shoal build)
# --------------------------------------------------------------------------------------------


def _explicit_options(dep: Deployment) -> dict[str, Any]:
    try:
        return dep.config.model_dump(mode="json", exclude_unset=True)
    except PydanticSerializationError as e:
        raise ValueError(f"deployment {dep.name!r}: its options cannot be written to a config file: {e}") from None


def build_config_dict(app: Application, name: str, route_prefix: str | None, import_path: str) -> dict[str, Any]:
    """The config-file description of ``app`` (what ``shoal build`` writes).

    Every deployment of the graph is listed (dependencies first, the ingress last) with the
    options set in code, in JSON/YAML-friendly form; ``args`` is empty. The result is valid
    input for :meth:`ServeDeploySchema.model_validate`.
    """
    if not isinstance(app, Application):
        raise TypeError(f"expected an Application built with .bind(), got {type(app).__name__}")
    route_prefix = validate_route_prefix(route_prefix)
    entries: dict[str, dict[str, Any]] = {}
    for dep in graph_deployments(app):
        entry = {"name": dep.name, **_explicit_options(dep)}
        if dep.name in entries and entries[dep.name] != entry:
            raise ValueError(
                f"application {name!r} binds two different deployments named {dep.name!r}; "
                f"give one of them another name with .options(name=...)"
            )
        entries[dep.name] = entry
    http = HTTPOptions()
    result: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": http.host, "port": http.port},
        "applications": [
            {
                "name": name,
                "route_prefix": route_prefix,
                "import_path": import_path,
                "args": {},
                "deployments": list(entries.values()),
            }
        ],
    }
    # Fail here, not when the file is deployed, if something does not round-trip.
    ServeDeploySchema.from_dict(result, source="<shoal build>")
    return result
