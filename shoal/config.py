"""Configuration models, declared once and shared by the API, the config file and the runtime.

Field names and defaults follow Ray Serve's documentation so that options written for Ray
Serve mean the same thing here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

__all__ = [
    "AggregationFunction",
    "AutoscalingConfig",
    "DeploymentConfig",
    "HTTPOptions",
    "LoggingConfig",
    "RayActorOptions",
    "auto_autoscaling_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AggregationFunction(StrEnum):
    MEAN = "mean"
    MAX = "max"
    MIN = "min"


class AutoscalingConfig(_Strict):
    """Autoscaling settings of one deployment (Ray Serve's ``autoscaling_config``)."""

    min_replicas: NonNegativeInt = 1
    initial_replicas: NonNegativeInt | None = None
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = 2.0
    metrics_interval_s: PositiveFloat = 10.0
    look_back_period_s: PositiveFloat = 30.0
    smoothing_factor: PositiveFloat = 1.0
    upscale_smoothing_factor: PositiveFloat | None = None
    downscale_smoothing_factor: PositiveFloat | None = None
    upscaling_factor: PositiveFloat | None = None
    downscaling_factor: PositiveFloat | None = None
    downscale_delay_s: NonNegativeFloat = 600.0
    downscale_to_zero_delay_s: NonNegativeFloat | None = None
    upscale_delay_s: NonNegativeFloat = 30.0
    aggregation_function: AggregationFunction = AggregationFunction.MEAN
    # Import path ("module:function" or "module.function") of a custom policy. Ray's object
    # form, {"policy_function": "module:function"}, is accepted too.
    policy: str | None = None

    @field_validator("policy", mode="before")
    @classmethod
    def _policy_path(cls, v: Any) -> Any:
        if isinstance(v, dict):
            extra = set(v) - {"policy_function"}
            if extra:
                raise ValueError(f"unsupported policy option(s): {', '.join(sorted(extra))}")
            return v.get("policy_function")
        return v

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be less than or equal to max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must be between min_replicas and max_replicas")
        return self


def auto_autoscaling_config(**overrides: Any) -> AutoscalingConfig:
    """The configuration ``num_replicas="auto"`` stands for, with user overrides applied."""
    base: dict[str, Any] = {"min_replicas": 1, "max_replicas": 100, "target_ongoing_requests": 2.0}
    base.update(overrides)
    return AutoscalingConfig(**base)


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

    @field_validator("root_path")
    @classmethod
    def _root(cls, v: str) -> str:
        if v and (not v.startswith("/") or v.endswith("/")):
            raise ValueError("root_path must start with '/' and must not end with '/'")
        return v


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
