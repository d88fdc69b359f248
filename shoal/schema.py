"""The Serve config file (``serve deploy`` / ``serve run config.yaml``) as pydantic models.

The layout and field names are those of Ray Serve's documented config file::

    proxy_location: EveryNode
    http_options:
      host: 0.0.0.0
      port: 8000
    applications:
    - name: app1
      route_prefix: /app1
      import_path: my_module:app
      args: {model: small}
      deployments:
      - name: Model
        num_replicas: 2

Every model forbids unknown fields, so a misspelt option is reported instead of ignored.
Problems surface as a :class:`ConfigError` whose message names the file and the path of
each offending field, e.g. ``serve.yaml: applications[0].deployments[1].num_replicas:
Input should be greater than 0 (got -1)``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from shoal.config import (
    AutoscalingConfig,
    AutoscalingPolicy,
    DeploymentConfig,
    EncodingType,
    HTTPOptions,
    LoggingConfig,
    RayActorOptions,
    RequestRouterConfig,
    gRPCOptions,
    validate_route_prefix,
)
from shoal.context import ReplicaRank
from shoal.exceptions import ConfigError

# The status models, where Ray Serve's ``ray.serve.schema`` has them.
from shoal.status import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ProxyStatus,
    ReplicaState,
    ServeStatus,
)

__all__ = [
    "ApplicationStatus",
    "ApplicationStatusOverview",
    "ConfigError",
    "DeploymentSchema",
    "DeploymentStatus",
    "DeploymentStatusOverview",
    "EncodingType",
    "LoggingConfig",
    "ProxyStatus",
    "ReplicaRank",
    "ReplicaState",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "ServeStatus",
    "format_error_path",
    "load_config_file",
    "validation_error_to_config_error",
]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def format_error_path(parts: Iterable[int | str]) -> str:
    """``("applications", 0, "deployments", 1, "name")`` -> ``applications[0].deployments[1].name``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


# pydantic error types meaning "the input is not of this type" (as opposed to "of this type but
# out of range"). When one branch of a union fails on a constraint, the input had that
# branch's type, so the other branches' type mismatches are noise and are left out.
_TYPE_MISMATCH = frozenset(
    {
        "bool_parsing",
        "bool_type",
        "dict_type",
        "enum",
        "float_parsing",
        "float_type",
        "int_from_float",
        "int_parsing",
        "int_type",
        "is_instance_of",
        "list_type",
        "literal_error",
        "model_attributes_type",
        "model_type",
        "none_required",
        "string_type",
        "tuple_type",
    }
)


def _strip_annotated(tp: Any) -> Any:
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> list[Any] | None:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for m in typing.get_args(tp) if m is not type(None)]
    return None


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _walk_loc(root: Any, loc: Sequence[int | str]) -> tuple[list[int | str], type[BaseModel] | None]:
    """Remove pydantic's union-member tags from ``loc`` by walking the types it passes through.

    Returns the cleaned path and the model class the last element was looked up in (used to
    suggest the right spelling of an unknown field), or None when that is not known.
    """
    parts: list[int | str] = []
    tp: Any = root
    owner: type[BaseModel] | None = None
    i = 0
    while i < len(loc):
        part = loc[i]
        tp = _strip_annotated(tp)
        members = _union_members(tp)
        if members is not None:
            if len(members) == 1:
                tp = members[0]
                continue
            # A union that failed as a whole: pydantic adds the member's tag to the location.
            tp = next((m for m in members if _is_model(m) and m.__name__ == part), Any)
            i += 1
            continue
        owner = None
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if _is_model(tp):
            owner = tp
            field = tp.model_fields.get(part) if isinstance(part, str) else None
            tp = field.annotation if field is not None else Any
        elif origin in (list, tuple, set, frozenset, Sequence) or tp in (list, tuple):
            tp = args[0] if args else Any
        elif origin in (dict, Mapping):
            tp = args[1] if len(args) == 2 else Any
        else:
            tp = Any
        parts.append(part)
        i += 1
    return parts, owner


def _describe_input(value: Any) -> str:
    if isinstance(value, bool | int | float | str) or value is None:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return ""


def _problems(err: ValidationError, root: Any, prefix: Sequence[int | str] = ()) -> list[tuple[str, str]]:
    grouped: dict[str, list[tuple[str, str, Any]]] = {}
    order: list[str] = []
    for e in err.errors():
        parts, owner = _walk_loc(root, tuple(e["loc"]))
        path = format_error_path([*prefix, *parts])
        msg = e["msg"]
        for noise in ("Value error, ", "Assertion failed, "):
            msg = msg.removeprefix(noise)
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
            if owner is not None and parts and isinstance(parts[-1], str):
                close = difflib.get_close_matches(parts[-1], list(owner.model_fields), n=1)
                if close:
                    msg += f" (did you mean {close[0]!r}?)"
                else:
                    msg += f"; valid fields are: {', '.join(owner.model_fields)}"
        if path not in grouped:
            grouped[path] = []
            order.append(path)
        grouped[path].append((e["type"], msg, e.get("input")))

    problems: list[tuple[str, str]] = []
    for path in order:
        entries = grouped[path]
        specific = [x for x in entries if x[0] not in _TYPE_MISMATCH]
        if specific and len(specific) < len(entries):
            entries = specific
        msgs: list[str] = []
        for _, m, _ in entries:
            if m not in msgs:
                msgs.append(m)
        lead = "Input should be "
        if len(msgs) > 1 and all(m.startswith(lead) for m in msgs):
            text = lead + " or ".join(m[len(lead) :].split(", ")[0] for m in msgs)
        else:
            text = "; ".join(msgs)
        etype, _, value = entries[0]
        if etype not in ("missing", "extra_forbidden", "config_error"):
            shown = _describe_input(value)
            if shown and f"got {shown}" not in text:
                text += f" (got {shown})"
        problems.append((path, text))
    return problems


def validation_error_to_config_error(
    err: ValidationError, source: str, root: Any = None, prefix: Sequence[int | str] = ()
) -> ConfigError:
    """Turn a pydantic error into a :class:`ConfigError` with readable field paths.

    ``root`` is the model (or type) that was validated, used to tidy the paths; ``prefix`` is
    prepended to every path (e.g. ``("applications", 0, "args")``).
    """
    return ConfigError(source, _problems(err, root if root is not None else Any, prefix))


def _located_error(title: str, problems: list[tuple[tuple[int | str, ...], str, Any]]) -> ValidationError:
    """A ValidationError whose entries point at specific fields (nested into the outer path)."""
    details: list[InitErrorDetails] = [
        {"type": PydanticCustomError("config_error", msg), "loc": loc, "input": value} for loc, msg, value in problems
    ]
    return ValidationError.from_exception_data(title, details)


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


_IMPORT_SEGMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_import_path(value: str) -> str:
    text = value.strip()
    problem = ""
    if not text or text != value or any(c.isspace() for c in text):
        problem = "must not be empty or contain whitespace"
    elif text.count(":") > 1:
        problem = "may contain at most one ':'"
    elif ":" in text:
        module, attr = text.split(":")
        if not module or not attr:
            problem = "needs a module before ':' and an attribute after it"
        elif not all(_IMPORT_SEGMENT.fullmatch(s) for s in [*module.split("."), *attr.split(".")]):
            problem = "has an empty or invalid name segment"
    elif "." not in text:
        problem = "names no attribute"
    elif not all(_IMPORT_SEGMENT.fullmatch(s) for s in text.split(".")):
        problem = "has an empty or invalid name segment"
    if problem:
        raise ValueError(f"import_path {problem}; expected 'module:attribute' or 'module.attribute', got {value!r}")
    return value


class DeploymentSchema(_Schema):
    """Overrides for one deployment of an application, matched by ``name``.

    Every option is optional: only the options written in the file replace the values given
    in code (``@serve.deployment(...)`` or ``.options(...)``); see :meth:`options`.
    """

    name: str
    num_replicas: PositiveInt | Literal["auto"] | None = None
    max_ongoing_requests: PositiveInt | None = None
    max_queued_requests: int | None = None
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    health_check_period_s: PositiveFloat | None = None
    health_check_timeout_s: PositiveFloat | None = None
    graceful_shutdown_wait_loop_s: PositiveFloat | None = None
    graceful_shutdown_timeout_s: NonNegativeFloat | None = None
    ray_actor_options: RayActorOptions | None = None
    logging_config: LoggingConfig | None = None
    placement_group_bundles: list[dict[str, NonNegativeFloat]] | None = None
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    num_ranks: PositiveInt | None = None
    replica_start_timeout_s: PositiveFloat | None = None
    max_queue_wait_s: PositiveFloat | None = None
    request_router_config: RequestRouterConfig | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v:
            raise ValueError("deployment name must not be empty")
        return v

    @model_validator(mode="after")
    def _valid_as_options(self) -> DeploymentSchema:
        # The options given must also be valid together and under DeploymentConfig's own checks
        # (e.g. explicit nulls, max_queued_requests, num_replicas vs autoscaling_config).
        DeploymentConfig.model_validate(self.options())
        return self

    def options(self) -> dict[str, Any]:
        """The options written in the file (and only those), ready for ``Deployment.options``."""
        return self.model_dump(exclude_unset=True, exclude={"name"})


class ServeApplicationSchema(_Schema):
    """One application of the config file.

    ``runtime_env`` is accepted so that Ray configs load unchanged, but it is ignored: shoal
    runs replicas in the environment of the process that starts it.
    """

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    args: dict[str, Any] = Field(default_factory=dict)
    deployments: list[DeploymentSchema] = Field(default_factory=list)
    external_scaler_enabled: bool = False
    logging_config: LoggingConfig | None = None
    # An application-level autoscaling policy (Ray's): one decision for every autoscaling
    # deployment of the app; see shoal.serving.app_policy. Same forms as a deployment's policy.
    autoscaling_policy: AutoscalingPolicy | None = None

    @field_validator("autoscaling_policy", mode="before")
    @classmethod
    def _policy_forms(cls, v: Any) -> Any:
        if isinstance(v, str) or (callable(v) and not isinstance(v, AutoscalingPolicy)):
            return AutoscalingPolicy(policy_function=v)
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v:
            raise ValueError("application name must not be empty")
        return v

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, v: str | None) -> str | None:
        return validate_route_prefix(v)

    @field_validator("import_path")
    @classmethod
    def _import_path(cls, v: str) -> str:
        return _check_import_path(v)

    @model_validator(mode="after")
    def _unique_deployments(self) -> ServeApplicationSchema:
        first: dict[str, int] = {}
        dups: list[tuple[tuple[int | str, ...], str, Any]] = []
        for j, dep in enumerate(self.deployments):
            if dep.name in first:
                dups.append(
                    (
                        ("deployments", j, "name"),
                        f"deployment {dep.name!r} is listed twice (also at deployments[{first[dep.name]}])",
                        dep.name,
                    )
                )
            else:
                first[dep.name] = j
        if dups:
            raise _located_error(type(self).__name__, dups)
        return self

    def deployment_overrides(self) -> dict[str, dict[str, Any]]:
        """``{deployment name: options written in the file}``."""
        return {d.name: d.options() for d in self.deployments}


class ServeDeploySchema(_Schema):
    """The whole config file: proxy and logging settings plus one or more applications.

    ``grpc_options`` configures the gRPC ingress (:class:`shoal.config.gRPCOptions`; the servicer
    functions are imported when shoal starts). ``target_capacity`` (a percentage, 0-100) is
    accepted for compatibility with Ray's schema.
    """

    proxy_location: Literal["Disabled", "HeadOnly", "EveryNode"] = "EveryNode"
    http_options: HTTPOptions = Field(default_factory=HTTPOptions)
    grpc_options: gRPCOptions = Field(default_factory=gRPCOptions)
    logging_config: LoggingConfig | None = None
    target_capacity: float | None = Field(default=None, ge=0, le=100)
    applications: list[ServeApplicationSchema] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_apps(self) -> ServeDeploySchema:
        names: dict[str, int] = {}
        prefixes: dict[str, int] = {}
        problems: list[tuple[tuple[int | str, ...], str, Any]] = []
        for i, app in enumerate(self.applications):
            if app.name in names:
                problems.append(
                    (
                        ("applications", i, "name"),
                        f"application name {app.name!r} is used twice (also by applications[{names[app.name]}])",
                        app.name,
                    )
                )
            else:
                names[app.name] = i
            prefix = app.route_prefix
            if prefix is None:
                continue
            if prefix in prefixes:
                problems.append(
                    (
                        ("applications", i, "route_prefix"),
                        (
                            f"route_prefix {prefix!r} is used twice (also by applications[{prefixes[prefix]}]); "
                            "give each application its own route_prefix"
                        ),
                        prefix,
                    )
                )
            else:
                prefixes[prefix] = i
        if problems:
            raise _located_error(type(self).__name__, problems)
        return self

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> ServeDeploySchema:
        """Validate already-parsed config data; problems raise :class:`ConfigError` naming ``source``."""
        if data is None:
            raise ConfigError(source, "the config is empty; it needs at least an 'applications' list")
        if not isinstance(data, Mapping):
            raise ConfigError(
                source, f"the config must be a mapping with an 'applications' list, got {type(data).__name__}"
            )
        if "import_path" in data and "applications" not in data:
            raise ConfigError(
                source,
                "this looks like a single-application config; move the application's fields "
                "(import_path, route_prefix, deployments, ...) into a list under 'applications:'",
            )
        try:
            return cls.model_validate(dict(data))
        except ValidationError as e:
            raise validation_error_to_config_error(e, source, cls) from None

    def application(self, name: str) -> ServeApplicationSchema:
        for app in self.applications:
            if app.name == name:
                return app
        raise KeyError(name)


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


class _StrictYAMLLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


# A document's size counted with every alias expanded (a "billion laughs" file is small on disk).
MAX_CONFIG_NODES = 1_000_000


def _check_shape(data: Any, source: str) -> None:
    """Refuse documents that refer to themselves (recursive aliases) or that expand past
    :data:`MAX_CONFIG_NODES` values: later steps (validation, JSON, pickling) would loop or blow up."""
    sizes: dict[int, int] = {}
    # Iterative post-order walk; a node on the current path seen again is a cycle.
    stack: list[tuple[Any, bool]] = [(data, False)]
    on_path: set[int] = set()
    while stack:
        node, done = stack.pop()
        if not isinstance(node, dict | list):
            continue
        key = id(node)
        children = list(node.values()) if isinstance(node, dict) else node
        if done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[key] > MAX_CONFIG_NODES:
                raise ConfigError(source, f"the document has over {MAX_CONFIG_NODES} values once its aliases "
                                  "are expanded")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise ConfigError(source, "the document contains itself (a recursive alias)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children)


def _parse(text: str, source: str, as_json: bool) -> Any:
    try:
        data = _parse_text(text, source, as_json)
    except RecursionError:
        raise ConfigError(source, "the document is nested too deeply") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(source, f"invalid {'JSON' if as_json else 'YAML'}: {e}") from None
    _check_shape(data, source)
    return data


def _parse_text(text: str, source: str, as_json: bool) -> Any:
    if as_json:
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(source, f"line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
    try:
        return yaml.load(text, Loader=_StrictYAMLLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(p for p in (e.context, e.problem) if p)
        raise ConfigError(source, f"{where}invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source, f"invalid YAML: {e}") from None


def load_config_file(path: str | os.PathLike[str]) -> ServeDeploySchema:
    """Read and validate a Serve config file (YAML, or JSON when it ends in ``.json``).

    Every problem raises :class:`ConfigError`, whose message starts with the file's name:
    a missing or unreadable file, a syntax error (with line and column), or a schema error
    (with the path of each offending field).
    """
    source = os.fspath(path)
    p = Path(source)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(source, "is a directory, not a config file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ConfigError(source, f"cannot read: {e.strerror or e}") from None
    data = _parse(text, source, as_json=p.suffix.lower() == ".json")
    return ServeDeploySchema.from_dict(data, source=source)


if not typing.TYPE_CHECKING:  # hidden from mypy, which would accept any name here

    def __getattr__(name: str) -> Any:
        # A Ray Serve name that shoal does not support raises NotSupportedError with the reason, not an
        # AttributeError (the table is shoal/_compat.py, imported only here: this module stays light;
        # the import system's probes such as __path__ do not load it).
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from shoal._compat import missing_attribute
        from shoal.exceptions import NotSupportedError

        return missing_attribute(__name__, name, NotSupportedError)
