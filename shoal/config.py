"""Configuration models, declared once and shared by the API, the config file and the runtime.

Field names and defaults follow Ray Serve's documentation so that options written for Ray
Serve mean the same thing here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from shoal._autoscaling_config import DEFAULT_AUTOSCALING_POLICY as DEFAULT_AUTOSCALING_POLICY
from shoal._autoscaling_config import DEFAULT_POLICY_PATHS as DEFAULT_POLICY_PATHS
from shoal._autoscaling_config import AggregationFunction as AggregationFunction
from shoal._autoscaling_config import AutoscalingConfig as AutoscalingConfig
from shoal._autoscaling_config import AutoscalingContext as AutoscalingContext
from shoal._autoscaling_config import AutoscalingPolicy as AutoscalingPolicy
from shoal._autoscaling_config import DeploymentID as DeploymentID
from shoal._autoscaling_config import auto_autoscaling_config as auto_autoscaling_config
from shoal._grpc_options import gRPCOptions as gRPCOptions
from shoal._model import Strict as _Strict

__all__ = [
    "AggregationFunction",
    "AutoscalingConfig",
    "AutoscalingContext",
    "AutoscalingPolicy",
    "DeploymentConfig",
    "EncodingType",
    "HTTPOptions",
    "LoggingConfig",
    "ProxyLocation",
    "RayActorOptions",
    "RequestRouterConfig",
    "auto_autoscaling_config",
    "gRPCOptions",
]

# How long a request may wait for a free replica slot, unless the deployment or
# $SHOAL_MAX_QUEUE_WAIT_S says otherwise (DeploymentConfig.max_queue_wait_s).
DEFAULT_MAX_QUEUE_WAIT_S = 120.0

class ProxyLocation(StrEnum):
    """Where Ray runs HTTP proxies (Ray's ``ProxyLocation``). Accepted in ``proxy_location``; shoal
    runs one HTTP front per machine whatever it says."""

    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


class EncodingType(StrEnum):
    """How log records are written (Ray's ``EncodingType``): ``LoggingConfig.encoding``."""

    TEXT = "TEXT"
    JSON = "JSON"


# Ray's default router, by the name Ray's configs use for it: shoal's own routing.
DEFAULT_REQUEST_ROUTER = "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"
_DEFAULT_ROUTER_NAMES = frozenset({
    DEFAULT_REQUEST_ROUTER,
    "ray.serve._private.request_router.PowerOfTwoChoicesRequestRouter",
    "ray.serve._private.request_router.pow_2_router:PowerOfTwoChoicesRequestRouter",
})
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*([:.][A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*)")


class _PickledClass:
    """A request router class, cloudpickled (see ``RequestRouterConfig.__getstate__``)."""

    __slots__ = ("blob",)

    def __init__(self, blob: bytes) -> None:
        self.blob = blob

    def __reduce__(self) -> tuple[Any, ...]:
        return (_PickledClass, (self.blob,))


class RequestRouterConfig(_Strict):
    """How a deployment's callers choose a replica (Ray Serve's ``RequestRouterConfig``).

    ``request_router_class`` is a :class:`shoal.request_router.RequestRouter` subclass, or its
    import path (``"module:Class"`` or ``"module.Class"``, imported in each caller process); the
    default is shoal's own routing (power of two choices, model-aware). The class is built in
    every process that calls the deployment and given ``request_router_kwargs`` through
    ``initialize_state``. Replicas of a deployment with a custom router call their
    ``record_routing_stats()`` every ``request_routing_stats_period_s`` (each call may take
    ``request_routing_stats_timeout_s``); routers see the result as ``RunningReplica.routing_stats``.
    """

    request_router_class: str | Callable[..., Any] = DEFAULT_REQUEST_ROUTER
    request_router_kwargs: dict[str, Any] = Field(default_factory=dict)
    request_routing_stats_period_s: PositiveFloat = 10.0
    request_routing_stats_timeout_s: PositiveFloat = 30.0
    # shoal: how long one choose_replicas() call may take before the request is routed by
    # shoal's default choice instead (and the router is left out for a while).
    choose_replicas_timeout_s: PositiveFloat = 1.0

    @field_validator("request_router_kwargs", mode="before")
    @classmethod
    def _kwargs(cls, v: Any) -> Any:
        return {} if v is None else v  # Ray's default is None

    @field_validator("request_router_class", mode="before")
    @classmethod
    def _router_class(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if not _IMPORT_PATH.fullmatch(text):
                raise ValueError(f"must be a RequestRouter subclass or its import path 'module:Class', got {v!r}")
            return text
        if not isinstance(v, type):
            raise ValueError(f"must be a RequestRouter subclass or its import path 'module:Class', "
                             f"got {type(v).__name__}")
        # Checked by shape, not by importing shoal.request_router (which imports this module).
        if not callable(getattr(v, "choose_replicas", None)):
            raise ValueError(f"{v.__qualname__} is not a subclass of shoal.request_router.RequestRouter "
                             "(it has no choose_replicas method)")
        return v

    # Pickling: a class object travels as cloudpickle bytes, so that a class defined in a script
    # (``__main__``) reaches replicas and routers by value instead of as a reference that only
    # the script's process could resolve.
    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        cls = self.request_router_class
        if not isinstance(cls, str):
            import cloudpickle

            fields = dict(state["__dict__"])
            fields["request_router_class"] = _PickledClass(cloudpickle.dumps(cls, protocol=5))
            state = {**state, "__dict__": fields}
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        fields = state.get("__dict__", {})
        packed = fields.get("request_router_class")
        if isinstance(packed, _PickledClass):
            import cloudpickle

            state = {**state, "__dict__": {**fields, "request_router_class": cloudpickle.loads(packed.blob)}}
        super().__setstate__(state)

    @property
    def is_custom(self) -> bool:
        """Whether a class other than shoal's default routing is configured."""
        return not (isinstance(self.request_router_class, str) and self.request_router_class in _DEFAULT_ROUTER_NAMES)

    @property
    def class_name(self) -> str:
        """The router's import path, or the name of the class given."""
        c = self.request_router_class
        if isinstance(c, str):
            return c
        return f"{getattr(c, '__module__', '?')}:{getattr(c, '__qualname__', '?')}"


class RayActorOptions(_Strict):
    """Per-replica resources. Unknown keys are rejected so typos surface at once."""

    num_cpus: NonNegativeFloat | None = None
    num_gpus: NonNegativeFloat | None = None
    memory: NonNegativeFloat | None = None
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    accelerator_type: str | None = None
    # Accepted for compatibility; shoal replicas run in the caller's environment.
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    object_store_memory: NonNegativeFloat | None = None

    @field_validator("num_gpus")
    @classmethod
    def _whole_above_one(cls, v: float | None) -> float | None:
        if v is not None and v > 1 and not float(v).is_integer():
            raise ValueError("num_gpus above 1 must be a whole number")
        return v

    @property
    def effective_num_cpus(self) -> float:
        # Ray reserves one CPU per replica when nothing is said.
        return 1.0 if self.num_cpus is None else self.num_cpus


class LoggingConfig(_Strict):
    encoding: Literal["TEXT", "JSON"] = "TEXT"
    log_level: str | int = "INFO"
    logs_dir: str | None = None
    enable_access_log: bool = True
    additional_log_standard_attrs: list[str] = Field(default_factory=list)

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str | int) -> str | int:
        if isinstance(v, str):
            v = v.upper()
            if v not in {"DEBUG", "INFO", "WARNING", "WARN", "ERROR", "CRITICAL"}:
                raise ValueError(f"unknown log level {v!r}")
        return v


class DeploymentConfig(_Strict):
    """Every option ``@serve.deployment`` accepts apart from ``name``."""

    num_replicas: PositiveInt | Literal["auto"] | None = None
    max_ongoing_requests: PositiveInt = 5
    max_queued_requests: int = -1
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    health_check_period_s: PositiveFloat = 10.0
    health_check_timeout_s: PositiveFloat = 30.0
    graceful_shutdown_wait_loop_s: PositiveFloat = 2.0
    graceful_shutdown_timeout_s: NonNegativeFloat = 20.0
    ray_actor_options: RayActorOptions = Field(default_factory=RayActorOptions)
    logging_config: LoggingConfig | None = None
    # Gang replicas: each replica is a gang of ranks, one process per bundle (Ray's spelling:
    # one resource dict per rank, e.g. {"CPU": 1, "GPU": 1}) or ``num_ranks`` processes with
    # ``ray_actor_options`` each (shoal's spelling). The strategy is accepted; locally every
    # rank is on this machine.
    placement_group_bundles: list[dict[str, NonNegativeFloat]] | None = None
    placement_group_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    num_ranks: PositiveInt | None = None
    # shoal: seconds a replica's constructor may run before the replica is killed and the start
    # counts as failed (None: $SHOAL_REPLICA_START_TIMEOUT_S, else 300 s).
    replica_start_timeout_s: PositiveFloat | None = None
    # shoal: seconds a request may wait for a free replica slot (in a router's queue, or on an
    # ingress replica's own front) before it is refused: HTTP 503, BackPressureError for
    # handles (None: $SHOAL_MAX_QUEUE_WAIT_S, else 120 s). A deployment's first replica is
    # waited for as long as its start takes (replica_start_timeout_s bounds that).
    max_queue_wait_s: PositiveFloat | None = None
    # A custom request router (Ray's request_router_config); None: shoal's own routing.
    request_router_config: RequestRouterConfig | None = None

    def custom_router(self) -> RequestRouterConfig | None:
        """The request router config when it names a custom router class, else None."""
        rc = self.request_router_config
        return rc if rc is not None and rc.is_custom else None

    def resolved_max_queue_wait_s(self) -> float:
        """:attr:`max_queue_wait_s`, else ``$SHOAL_MAX_QUEUE_WAIT_S``, else
        :data:`DEFAULT_MAX_QUEUE_WAIT_S`."""
        if self.max_queue_wait_s is not None:
            return float(self.max_queue_wait_s)
        env = os.environ.get("SHOAL_MAX_QUEUE_WAIT_S", "")
        try:
            return float(env) if env and float(env) > 0 else DEFAULT_MAX_QUEUE_WAIT_S
        except ValueError:
            return DEFAULT_MAX_QUEUE_WAIT_S

    @field_validator("placement_group_bundles")
    @classmethod
    def _bundles(cls, v: list[dict[str, float]] | None) -> list[dict[str, float]] | None:
        if v is not None and not v:
            raise ValueError("placement_group_bundles needs at least one bundle (one per rank)")
        return v

    @model_validator(mode="after")
    def _ranks_match_bundles(self) -> DeploymentConfig:
        if self.placement_group_bundles is not None and self.num_ranks is not None \
                and self.num_ranks != len(self.placement_group_bundles):
            raise ValueError(f"num_ranks ({self.num_ranks}) must equal the number of placement_group_bundles "
                             f"({len(self.placement_group_bundles)}): one bundle per rank")
        return self

    @property
    def world_size(self) -> int:
        """Processes per replica: 1, or the gang's number of ranks."""
        if self.placement_group_bundles is not None:
            return len(self.placement_group_bundles)
        return self.num_ranks or 1

    def rank_resources(self, rank: int) -> dict[str, Any]:
        """``ray_actor_options``-shaped resources of one rank (its bundle, if bundles are given)."""
        if self.placement_group_bundles is None:
            return self.ray_actor_options.model_dump(exclude_defaults=True)
        bundle = dict(self.placement_group_bundles[rank])
        out: dict[str, Any] = {"num_cpus": bundle.pop("CPU", 0.0), "num_gpus": bundle.pop("GPU", 0.0)}
        if "memory" in bundle:
            out["memory"] = bundle.pop("memory")
        if bundle:
            out["resources"] = bundle
        return out

    @field_validator("max_queued_requests")
    @classmethod
    def _queued(cls, v: int) -> int:
        if v == 0 or v < -1:
            raise ValueError("max_queued_requests must be -1 (no limit) or a positive integer")
        return v

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> DeploymentConfig:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError("num_replicas and autoscaling_config cannot both be set")
        return self

    def resolved_autoscaling(self) -> AutoscalingConfig | None:
        """The autoscaling config in force, with ``num_replicas="auto"`` expanded."""
        if self.num_replicas == "auto":
            given = self.autoscaling_config.model_dump(exclude_unset=True) if self.autoscaling_config else {}
            return auto_autoscaling_config(**given)
        return self.autoscaling_config

    def initial_target(self) -> int:
        """How many replicas to start with."""
        auto = self.resolved_autoscaling()
        if auto is None:
            return self.num_replicas if isinstance(self.num_replicas, int) else 1
        if auto.initial_replicas is not None:
            return auto.initial_replicas
        return auto.min_replicas


class HTTPOptions(_Strict):
    """Options of the HTTP proxy (Ray Serve's ``http_options``)."""

    # Error messages never repeat what was given: API keys and the key password are secrets.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True, defer_build=True)

    host: str = "127.0.0.1"
    # 0 asks the operating system for a free port; status reports the one chosen.
    port: int = Field(default=8000, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: PositiveFloat | None = None
    keep_alive_timeout_s: PositiveFloat = 5.0
    # Accepted for compatibility with Ray's config files; one machine has one proxy location.
    location: Literal["HeadOnly", "EveryNode", "NoServer", "Disabled"] = "HeadOnly"
    # shoal: ingress replicas accept HTTP connections on the shared port themselves, saving the
    # proxy hop; the proxy process steps aside while every routed app has such a replica.
    ingress_serves_http: bool = True
    # shoal: a read-only dashboard at /-/dashboard and the JSON it polls, /-/status.json
    # (off: both answer 404).
    dashboard: bool = True
    # shoal: request limits, enforced by every HTTP front before anything reaches a replica.
    # A larger body gets 413, a larger request head (request line and headers) 431.
    max_request_body_bytes: PositiveInt = 100 * 1024 * 1024
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    # shoal: API keys. When any is configured, every request but /-/healthz needs
    # "Authorization: Bearer <key>" or "x-api-key: <key>" (401 otherwise). Keys may be written
    # here, or kept out of the config file: a variable of the environment shoal starts in
    # (comma- or space-separated keys) or a file (one key per line, '#' comments).
    api_keys: list[str] = Field(default_factory=list, repr=False)
    api_keys_env: str | None = None
    api_keys_file: str | None = None
    # shoal: "module:function" called with each request (a Starlette Request without its body)
    # after the API keys passed; it returns True to let the request in (see docs/security.md).
    auth: str | None = None
    # Ray Serve's TLS options: with a certificate and its key, the port serves HTTPS only.
    # ssl_ca_certs turns on client certificate verification (mutual TLS) against those CAs.
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile_password: str | None = Field(default=None, repr=False)
    ssl_ca_certs: str | None = None
    # shoal: connection hygiene, on every HTTP front (see docs/reliability.md). A connection
    # must deliver a complete request head within request_header_timeout_s of opening (or of
    # the head's first byte on a kept-alive connection), else it is closed (408 when part of a
    # head arrived). A request body that brings no bytes for request_body_timeout_s gets 408
    # and the connection closes. A response that the client does not read for
    # response_write_timeout_s is cut: the connection is aborted and the request cancelled.
    request_header_timeout_s: PositiveFloat = 10.0
    request_body_timeout_s: PositiveFloat = 30.0
    response_write_timeout_s: PositiveFloat = 30.0
    # shoal: connections each front holds at once; the effective cap is also at most the
    # process's soft open-files limit less a reserve. A connection over it gets 503 and closes.
    max_connections: PositiveInt = 10_000
    # shoal: a front that drains (an ingress replica stopping, the proxy stepping aside) answers
    # every request with "Connection: close" from then on and closes idle keep-alive connections
    # after this grace (None: keep_alive_timeout_s); a connection under a request is never closed.
    drain_grace_s: NonNegativeFloat | None = None
    # shoal: request bodies each front holds at once (bytes). A body that does not fit waits
    # for room at most request_body_budget_wait_s, then gets 503 with Retry-After; a declared
    # body larger than the whole budget gets 413 (see docs/reliability.md).
    request_body_budget_bytes: PositiveInt = 512 * 1024 * 1024
    request_body_budget_wait_s: PositiveFloat = 10.0

    @field_validator("root_path")
    @classmethod
    def _root(cls, v: str) -> str:
        if v and (not v.startswith("/") or v.endswith("/")):
            raise ValueError("root_path must start with '/' and must not end with '/'")
        return v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        # Checked here, as a whole, so that no error message repeats a key.
        if not isinstance(v, list | tuple):
            raise ValueError("api_keys must be a list of strings")
        for i, key in enumerate(v):
            problem = api_key_problem(key)
            if problem:
                raise ValueError(f"api_keys[{i}] {problem}")
        return list(v)

    @field_validator("api_keys_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError("must be the name of an environment variable")
        return v

    @field_validator("api_keys_file", "ssl_keyfile", "ssl_certfile", "ssl_ca_certs")
    @classmethod
    def _file_exists(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isfile(v):
            raise ValueError(f"no such file (got {v!r})")
        return v

    @field_validator("auth")
    @classmethod
    def _auth_path(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z_][\w.]*[:.][A-Za-z_][\w.]*", v):
            raise ValueError(f"expected an import path 'module:function' (got {v!r})")
        return v

    @model_validator(mode="after")
    def _tls_pairs(self) -> HTTPOptions:
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("ssl_keyfile and ssl_certfile must be given together")
        if self.ssl_certfile is None and (self.ssl_keyfile_password is not None or self.ssl_ca_certs is not None):
            raise ValueError("ssl_keyfile_password and ssl_ca_certs need ssl_certfile and ssl_keyfile")
        return self

    @property
    def scheme(self) -> str:
        """``https`` when TLS is configured, else ``http``."""
        return "https" if self.ssl_certfile else "http"

    @property
    def requires_auth(self) -> bool:
        """Whether requests must pass API keys or an auth hook."""
        return bool(self.api_keys or self.api_keys_env or self.api_keys_file or self.auth)

    def resolved_api_keys(self) -> tuple[str, ...]:
        """Every configured key: ``api_keys``, then those from ``api_keys_env`` and ``api_keys_file``.

        Read when an instance starts (not when the config is loaded), so that the keys need only
        be present where shoal runs. A named variable or file that holds no key is an error.
        """
        keys = list(self.api_keys)
        sources: list[tuple[str, str]] = []
        if self.api_keys_env:
            sources.append((f"http_options.api_keys_env: environment variable {self.api_keys_env}",
                            os.environ.get(self.api_keys_env, "")))
        if self.api_keys_file:
            where = f"http_options.api_keys_file: {self.api_keys_file}"
            try:
                with open(self.api_keys_file, encoding="utf-8") as f:
                    text = "\n".join(line.split("#", 1)[0] for line in f)
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: cannot read: {e}") from None
            sources.append((where, text))
        for where, text in sources:
            found = text.replace(",", " ").split()
            if not found:
                raise ValueError(f"{where} holds no API key")
            for key in found:
                problem = api_key_problem(key)
                if problem:
                    raise ValueError(f"{where}: a key {problem}")
            keys.extend(found)
        return tuple(dict.fromkeys(keys))


MIN_API_KEY_LENGTH = 16


def api_key_problem(key: Any) -> str:
    """What is wrong with an API key ("" if nothing), without repeating the key."""
    if not isinstance(key, str):
        return f"must be a string, not {type(key).__name__}"
    if len(key) < MIN_API_KEY_LENGTH:
        return f"is too short: API keys need at least {MIN_API_KEY_LENGTH} characters"
    if not key.isascii() or not key.isprintable() or any(c.isspace() or c == "," for c in key):
        return "may hold only printable ASCII characters, without spaces or commas"
    return ""


def validate_route_prefix(prefix: str | None) -> str | None:
    """Ray's rules: None (no HTTP), or a path starting with '/' and not ending with one."""
    if prefix is None:
        return None
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"route_prefix must start with '/', got {prefix!r}")
    if prefix != "/" and prefix.endswith("/"):
        raise ValueError(f"route_prefix must not end with '/' unless it is '/', got {prefix!r}")
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"route_prefix may not contain wildcards, got {prefix!r}")
    return prefix


def __getattr__(name: str) -> Any:
    # A Ray Serve name that shoal does not support raises NotSupportedError with the reason, not an
    # AttributeError (the table is shoal/_compat.py, imported only here: this module stays light;
    # the import system's probes such as __path__ do not load it).
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from shoal._compat import missing_attribute
    from shoal.exceptions import NotSupportedError

    return missing_attribute(__name__, name, NotSupportedError)
