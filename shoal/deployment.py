"""Deployments, bound applications, and the graph build that turns them into an AppSpec."""

from __future__ import annotations

import hashlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import cloudpickle
from pydantic import ValidationError

from shoal import _codeship
from shoal._pickle_digest import pickle_digest
from shoal.config import DeploymentConfig, validate_route_prefix

__all__ = ["AppSpec", "Application", "Deployment", "DeploymentSpec", "build_app_spec", "deployment"]

T = TypeVar("T")

# cloudpickle gives each class it pickles by value a random tracking id (a 32-hex string,
# memoized, followed by None in the skeleton-class call). Masked for the version hash, so that
# the same code pickled in two processes (two `shoal deploy` runs) has the same version.
_TRACKER_ID = re.compile(rb"\x8c\x20[0-9a-f]{32}\x94N")

# Options whose change needs new replica processes; the others apply in place.
# request_router_config: callers get the router with the new replicas' membership, and replicas
# read its stats period when they start.
_RESTART_FIELDS = ("ray_actor_options", "max_ongoing_requests", "logging_config", "placement_group_bundles",
                   "placement_group_strategy", "num_ranks", "request_router_config")


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()


def format_validation_error(err: ValidationError, where: str) -> str:
    """One line per problem, each naming the field path, e.g. ``ray_actor_options.num_gpu``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(root)"
        lines.append(f"  {loc}: {e['msg']}")
    return f"invalid options for {where}:\n" + "\n".join(lines)


class Deployment:
    """A class or function made servable by :func:`deployment`. Use ``.bind()`` to build apps.

    Example::

        @serve.deployment(num_replicas=2)
        class Model:
            def __call__(self, request): ...

        app = Model.bind()
    """

    def __init__(
        self,
        func_or_class: Callable[..., Any],
        name: str,
        config: DeploymentConfig,
        *,
        explicit: frozenset[str] = frozenset(),
    ) -> None:
        if not name or not isinstance(name, str):
            raise ValueError("deployment name must be a non-empty string")
        if "#" in name or "/" in name:
            raise ValueError(f"deployment name {name!r} may not contain '#' or '/'")
        self._func_or_class = func_or_class
        self._name = name
        self._config = config
        # Options the user set explicitly; a config file only overrides these and the rest.
        self._explicit = explicit

    # Read-only views with Ray Serve's names.
    @property
    def name(self) -> str:
        return self._name

    @property
    def func_or_class(self) -> Callable[..., Any]:
        return self._func_or_class

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def num_replicas(self) -> int | str | None:
        return self._config.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def max_queued_requests(self) -> int:
        return self._config.max_queued_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def ray_actor_options(self) -> dict[str, Any]:
        return self._config.ray_actor_options.model_dump(exclude_defaults=True)

    @property
    def is_function(self) -> bool:
        return not inspect.isclass(self._func_or_class)

    def options(self, *, name: str = UNSET, **overrides: Any) -> Deployment:
        """A copy of this deployment with some options replaced (same names as the decorator)."""
        overrides = {k: v for k, v in overrides.items() if v is not UNSET}
        unknown = set(overrides) - set(DeploymentConfig.model_fields)
        if unknown:
            raise TypeError(f"unknown deployment option(s): {', '.join(sorted(unknown))}")
        new_name = self._name if name is UNSET else name
        merged = self._config.model_dump(exclude_unset=True)
        merged.update(overrides)
        # A fixed replica count and an autoscaling config exclude each other: the newer wins.
        if isinstance(overrides.get("num_replicas"), int) and "autoscaling_config" not in overrides:
            merged.pop("autoscaling_config", None)
        if overrides.get("autoscaling_config") is not None and "num_replicas" not in overrides \
                and isinstance(merged.get("num_replicas"), int):
            merged.pop("num_replicas", None)
        config = _make_config(merged, new_name)
        return Deployment(self._func_or_class, new_name, config, explicit=self._explicit | set(overrides))

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        """Bind constructor arguments; bound applications among them become handles."""
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"Deployment {self._name!r} cannot be called or constructed directly; "
            f"use {self._name}.bind(...) and serve.run(...)."
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self._name!r})"


def _make_config(options: dict[str, Any], where: str) -> DeploymentConfig:
    try:
        return DeploymentConfig(**options)
    except ValidationError as e:
        raise ValueError(format_validation_error(e, f"deployment {where!r}")) from None


@overload
def deployment(_func_or_class: Callable[..., Any]) -> Deployment: ...
@overload
def deployment(
    _func_or_class: None = None,
    *,
    name: str = ...,
    num_replicas: int | str | None = ...,
    max_ongoing_requests: int = ...,
    max_queued_requests: int = ...,
    ray_actor_options: dict[str, Any] | None = ...,
    user_config: Any = ...,
    autoscaling_config: dict[str, Any] | Any = ...,
    health_check_period_s: float = ...,
    health_check_timeout_s: float = ...,
    graceful_shutdown_wait_loop_s: float = ...,
    graceful_shutdown_timeout_s: float = ...,
    logging_config: dict[str, Any] | Any = ...,
    placement_group_bundles: list[dict[str, float]] | None = ...,
    placement_group_strategy: str | None = ...,
    num_ranks: int | None = ...,
    replica_start_timeout_s: float | None = ...,
    max_queue_wait_s: float | None = ...,
    request_router_config: dict[str, Any] | Any = ...,
) -> Callable[[Callable[..., Any]], Deployment]: ...


def deployment(
    _func_or_class: Callable[..., Any] | None = None,
    *,
    name: str = UNSET,
    num_replicas: int | str | None = UNSET,
    max_ongoing_requests: int = UNSET,
    max_queued_requests: int = UNSET,
    ray_actor_options: dict[str, Any] | None = UNSET,
    user_config: Any = UNSET,
    autoscaling_config: dict[str, Any] | Any = UNSET,
    health_check_period_s: float = UNSET,
    health_check_timeout_s: float = UNSET,
    graceful_shutdown_wait_loop_s: float = UNSET,
    graceful_shutdown_timeout_s: float = UNSET,
    logging_config: dict[str, Any] | Any = UNSET,
    placement_group_bundles: list[dict[str, float]] | None = UNSET,
    placement_group_strategy: str | None = UNSET,
    num_ranks: int | None = UNSET,
    replica_start_timeout_s: float | None = UNSET,
    max_queue_wait_s: float | None = UNSET,
    request_router_config: dict[str, Any] | Any = UNSET,
) -> Deployment | Callable[[Callable[..., Any]], Deployment]:
    """Turn a class or function into a :class:`Deployment`; usable bare or with options.

    Example::

        @serve.deployment
        def hello(request) -> str:
            return "hello"

        @serve.deployment(num_replicas=2, ray_actor_options={"num_gpus": 0.5})
        class Model:
            async def __call__(self, request) -> dict: ...
    """
    given = {
        "num_replicas": num_replicas,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": max_queued_requests,
        "ray_actor_options": ray_actor_options,
        "user_config": user_config,
        "autoscaling_config": autoscaling_config,
        "health_check_period_s": health_check_period_s,
        "health_check_timeout_s": health_check_timeout_s,
        "graceful_shutdown_wait_loop_s": graceful_shutdown_wait_loop_s,
        "graceful_shutdown_timeout_s": graceful_shutdown_timeout_s,
        "logging_config": logging_config,
        "placement_group_bundles": placement_group_bundles,
        "placement_group_strategy": placement_group_strategy,
        "num_ranks": num_ranks,
        "replica_start_timeout_s": replica_start_timeout_s,
        "max_queue_wait_s": max_queue_wait_s,
        "request_router_config": request_router_config,
    }
    given = {k: v for k, v in given.items() if v is not UNSET}
    if given.get("ray_actor_options") is None:
        given.pop("ray_actor_options", None)

    def decorate(obj: Callable[..., Any]) -> Deployment:
        if isinstance(obj, Deployment):
            raise TypeError("@serve.deployment was applied twice")
        if not callable(obj):
            raise TypeError("@serve.deployment must decorate a class or a function")
        dep_name = getattr(obj, "__name__", None) if name is UNSET else name
        config = _make_config(given, str(dep_name))
        return Deployment(obj, str(dep_name), config, explicit=frozenset(given))

    if _func_or_class is not None:
        return decorate(_func_or_class)
    return decorate


class Application:
    """A deployment with bound constructor arguments: one node of an application graph."""

    # An application-level autoscaling policy (AutoscalingPolicy), set on the root of a graph
    # built from a config file entry's ``autoscaling_policy``; build_app_spec carries it over.
    _autoscaling_policy: Any = None
    # Where a config entry or `shoal run` imported it from: {"import_path": ..., "args": {...}}
    # (build_application sets it; `shoal config` shows it).
    _source: dict[str, Any] | None = None

    def __init__(self, dep: Deployment, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._bound_deployment = dep
        self._args = args
        self._kwargs = kwargs

    @property
    def deployment(self) -> Deployment:
        return self._bound_deployment

    def __repr__(self) -> str:
        return f"Application({self._bound_deployment.name})"


@dataclass
class DeploymentSpec:
    """One deployment of a built application: plain data plus the live objects it came from."""

    name: str
    app_name: str
    config: DeploymentConfig
    func_or_class: Any
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    is_function: bool
    ingress: bool
    # Names of the deployments this one holds handles to (the call graph's edges).
    calls: list[str] = field(default_factory=list)
    _blob: bytes | None = None
    # The hash of the code and arguments pickled wholly by value (see code_version); computed
    # with _blob and kept with it (a portable copy has no code left to hash).
    _code_digest: bytes | None = None

    def serialized(self) -> bytes:
        """The class/function and its constructor arguments as the replicas unpickle them: by
        reference to an importable module (tracebacks show its file), else by value with file
        names and source lines (see shoal/_codeship.py)."""
        if self._blob is None:
            target = (self.func_or_class, self.init_args, self.init_kwargs)
            self._blob = _pickle_for_replicas(self.name, target, _codeship.dumps)
            # Hashed by value: the version changes when the code does, wherever it lives.
            plain = _pickle_for_replicas(self.name, target, lambda t: cloudpickle.dumps(t, protocol=5))
            # By content, not by object identity (a reload re-imports modules; see _pickle_digest).
            self._code_digest = pickle_digest(plain)
        return self._blob

    @property
    def code_version(self) -> str:
        """Changes when the code, the constructor arguments or a restart-requiring option does."""
        blob = self.serialized()
        # A spec restored from an older state file has only its blob: hashed as it was then.
        h = hashlib.sha256(self._code_digest) if self._code_digest is not None \
            else hashlib.sha256(_TRACKER_ID.sub(b"<class>", blob))
        for f in _RESTART_FIELDS:
            h.update(repr(getattr(self.config, f)).encode())
        return h.hexdigest()[:16]


def _pickle_for_replicas(name: str, target: tuple[Any, Any, Any], dumps: Callable[[Any], bytes]) -> bytes:
    """``dumps(target)``; when that fails, a TypeError naming the deployment and the first bind
    argument (or the class itself) that cannot be pickled, and why."""
    try:
        return dumps(target)
    except Exception as e:
        func_or_class, args, kwargs = target
        parts: list[tuple[str, Any]] = [(f"positional bind argument {i}", a) for i, a in enumerate(args)]
        parts += [(f"bind argument {k!r}", v) for k, v in kwargs.items()]
        parts.append(("its class or function (or a global it uses)", func_or_class))
        for label, value in parts:
            try:
                dumps(value)
            except Exception as part_error:
                raise TypeError(
                    f"deployment {name!r}: {label} ({type(value).__name__}) cannot be sent to the replicas, "
                    f"which run in other processes: {part_error}. Pass something picklable (e.g. a path or "
                    "settings) and create the object in the constructor instead") from e
        raise TypeError(f"deployment {name!r} cannot be sent to the replicas: {e}") from e


@dataclass
class AppSpec:
    name: str
    route_prefix: str | None
    ingress: str
    deployments: dict[str, DeploymentSpec]
    # Where the app was deployed from (``shoal deploy``): replicas add these to sys.path and
    # change into cwd before unpickling the code. Empty: the instance's own.
    sys_path: tuple[str, ...] = ()
    cwd: str = ""
    # The application-level autoscaling policy (an AutoscalingPolicy; config files only, as in Ray).
    autoscaling_policy: Any = None
    # The import path and builder args it was deployed from (None: from Python, e.g. serve.run).
    source: dict[str, Any] | None = None

    def edges(self) -> list[tuple[str, str]]:
        return [(d.name, callee) for d in self.deployments.values() for callee in d.calls]


def build_app_spec(
    app: Application,
    name: str = "default",
    route_prefix: str | None = "/",
    make_handle: Callable[[str, str], Any] | None = None,
) -> AppSpec:
    """Walk the bound graph from its ingress; nested applications become handles.

    ``make_handle(deployment_name, app_name)`` creates the handle objects that replace
    nested applications (the default makes a plain :class:`~shoal.handle.DeploymentHandle`).
    """
    if not isinstance(app, Application):
        if isinstance(app, Deployment):
            raise TypeError(f"serve.run expects a bound application; call {app.name}.bind() first")
        raise TypeError(f"expected an Application built with .bind(), got {type(app).__name__}")
    route_prefix = validate_route_prefix(route_prefix)
    if make_handle is None:
        from shoal.handle import DeploymentHandle

        def make_handle(dep: str, app_name: str) -> Any:
            return DeploymentHandle(dep, app_name)

    specs: dict[str, DeploymentSpec] = {}
    seen: dict[int, str] = {}

    def visit(node: Application, is_ingress: bool) -> str:
        if id(node) in seen:
            return seen[id(node)]
        dep = node.deployment
        # As Ray does: a deployment bound more than once (or two deployments with one name)
        # gets a unique name for each further binding: Adder, Adder_1, Adder_2, ...
        unique = dep.name
        suffix = 0
        while unique in specs:
            suffix += 1
            unique = f"{dep.name}_{suffix}"
        seen[id(node)] = unique
        calls: list[str] = []

        def convert(value: Any) -> Any:
            if isinstance(value, Application):
                callee = visit(value, False)
                if callee not in calls:
                    calls.append(callee)
                return make_handle(callee, name)
            if isinstance(value, Deployment):
                raise TypeError(f"pass {value.name}.bind(), not the deployment itself, as an argument")
            if type(value) in (list, tuple):
                return type(value)(convert(v) for v in value)
            if type(value) is dict:
                return {k: convert(v) for k, v in value.items()}
            return value

        specs[unique] = DeploymentSpec(name=unique, app_name=name, config=dep.config,
                                       func_or_class=dep.func_or_class, init_args=(), init_kwargs={},
                                       is_function=dep.is_function, ingress=is_ingress, calls=calls)
        spec = specs[unique]
        spec.init_args = tuple(convert(a) for a in node._args)
        spec.init_kwargs = {k: convert(v) for k, v in node._kwargs.items()}
        return unique

    ingress = visit(app, True)
    return AppSpec(name=name, route_prefix=route_prefix, ingress=ingress, deployments=specs,
                   autoscaling_policy=app._autoscaling_policy, source=app._source)
