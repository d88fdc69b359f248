"""The LLM gateway's configuration: pydantic models, validated once, read everywhere.

Names follow Ray Serve LLM (``LLMConfig``, ``ModelLoadingConfig``, ``LoraConfig``,
``LLMServingArgs`` with ``llm_configs``) so that its configs carry over; shoal adds
``embedding_configs`` and ``gateway`` (API keys, tenants, rate limits).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator, model_validator

from shoal.config import DeploymentConfig

__all__ = [
    "ANONYMOUS_TENANT",
    "EmbeddingConfig",
    "GatewayConfig",
    "LLMConfig",
    "LLMServingArgs",
    "LoraConfig",
    "ModelLoadingConfig",
    "TenantConfig",
    "hash_api_key",
]

#: The tenant of every request when no API keys are configured (the gateway is open).
ANONYMOUS_TENANT = "anonymous"

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@]*$")
_ENGINES = ("auto", "transformers", "vllm", "mock")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _check_model_id(v: str) -> str:
    # ":" separates a base model from a LoRA adapter ("base:adapter"), so it cannot be in an id.
    if not _MODEL_ID.match(v):
        raise ValueError(
            f"model_id {v!r} must start with a letter or digit and contain only letters, digits and . _ - / @"
        )
    return v


class ModelLoadingConfig(_Strict):
    """Which model to load and the name clients use for it."""

    #: The name clients pass as ``model`` (and ``/v1/models`` lists).
    model_id: str
    #: Where the weights are: a local directory or a Hugging Face repo id (defaults to ``model_id``).
    model_source: str | None = None

    @field_validator("model_id")
    @classmethod
    def _id(cls, v: str) -> str:
        return _check_model_id(v)

    @property
    def source(self) -> str:
        return self.model_source or self.model_id


class LoraConfig(_Strict):
    """LoRA adapters served on top of a base model, one per multiplexed model id ``base:adapter``."""

    #: Directory holding one sub-directory per adapter (``<path>/<adapter>``).
    dynamic_lora_loading_path: str | None = None
    #: How many adapters one replica keeps loaded (least recently used ones are unloaded).
    max_num_adapters_per_replica: PositiveInt = 16


class LLMConfig(_Strict):
    """One language model served by its own :class:`~shoal.llm.LLMServer` deployment.

    Example::

        LLMConfig(
            model_loading_config={"model_id": "tiny-chat", "model_source": "/models/tiny-chat"},
            llm_engine="transformers",
            engine_kwargs={"device": "auto"},
            deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
        )
    """

    model_loading_config: ModelLoadingConfig
    #: ``auto`` (vLLM when importable and a GPU is visible, else transformers), ``transformers``,
    #: ``vllm``, ``mock`` (a deterministic stand-in that needs no model, for tests and demos), or
    #: the import path of an engine class (``"my_pkg.engines:MyEngine"``).
    llm_engine: str = "auto"
    #: Passed to the engine: for transformers ``device``, ``dtype``, ``max_concurrency``,
    #: ``trust_remote_code``, ``default_max_tokens``; for vLLM, its ``AsyncEngineArgs``.
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    #: Deployment options of the model's deployment (``num_replicas``, ``autoscaling_config``,
    #: ``ray_actor_options``, ...), validated as ``@serve.deployment`` validates them.
    deployment_config: DeploymentConfig = Field(default_factory=DeploymentConfig)
    lora_config: LoraConfig | None = None
    #: Accepted for Ray Serve compatibility; set ``ray_actor_options.num_gpus`` to place a model on a GPU.
    accelerator_type: str | None = None
    #: Extra fields ``/v1/models`` reports for this model (e.g. ``{"owned_by": "my-team"}``).
    model_metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("llm_engine")
    @classmethod
    def _engine(cls, v: str) -> str:
        if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", v):
            return v  # a custom engine class, imported in the replica that loads the model
        name = v.lower()
        if name not in _ENGINES:
            raise ValueError(f"unknown engine {v!r}; choose one of {', '.join(_ENGINES)}, or 'module:EngineClass'")
        return name

    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id


class EmbeddingConfig(_Strict):
    """One embedding model behind ``/v1/embeddings``, served by an ``EmbeddingServer`` deployment."""

    model_loading_config: ModelLoadingConfig
    #: ``transformers`` (mean pooling over the last hidden state, then L2 normalisation: the
    #: all-MiniLM-L6-v2 recipe), ``sentence-transformers`` (the model's own pipeline), or ``mock``.
    engine: Literal["transformers", "sentence-transformers", "mock"] = "transformers"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    deployment_config: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @property
    def model_id(self) -> str:
        return self.model_loading_config.model_id


class TenantConfig(_Strict):
    """Limits and rights of one tenant. A limit left out is no limit."""

    #: Requests per minute (a token bucket of this size, refilled continuously).
    requests_per_minute: PositiveFloat | None = None
    #: Prompt plus completion tokens per minute; charged when a request ends, admitted while positive.
    tokens_per_minute: PositiveFloat | None = None
    #: Models (and ``base:adapter`` ids) this tenant may use; ``None`` allows all.
    allowed_models: list[str] | None = None
    #: May read ``/v1/usage`` and ``/metrics``.
    admin: bool = False
    #: This tenant's share of a busy model, against the others' (weighted fair queuing).
    weight: PositiveFloat = 1.0


def hash_api_key(key: str) -> str:
    """The form a key can be written in config files without revealing it: ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class GatewayConfig(_Strict):
    """API keys, tenants and their limits. With no ``api_keys`` the gateway is open: every
    request belongs to the ``anonymous`` tenant (whose limits ``tenants.anonymous`` may set)."""

    #: API key -> tenant name. A key may be given as ``sha256:<hex digest>`` (see ``hash_api_key``).
    api_keys: dict[str, str] = Field(default_factory=dict)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    #: Limits of tenants named by a key but absent from ``tenants``.
    default_tenant: TenantConfig = Field(default_factory=TenantConfig)
    #: Generations a gateway replica runs at once per model; beyond, requests wait at the gateway
    #: and take turns by tenant ``weight`` (weighted fair queuing). ``None``: no gate (first come,
    #: first served in the engine's queue).
    max_in_flight_per_model: PositiveInt | None = 64
    #: How long a request waits for its turn at a busy model before a 503.
    queue_timeout_s: PositiveFloat = 60.0

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, v: dict[str, str]) -> dict[str, str]:
        for key, tenant in v.items():
            if not key:
                raise ValueError("an API key may not be empty")
            if key.startswith("sha256:") and not re.fullmatch(r"sha256:[0-9a-f]{64}", key):
                raise ValueError("a hashed key must be 'sha256:' followed by 64 lowercase hex digits")
            if not tenant:
                raise ValueError(f"the tenant of key {_redact(key)} may not be empty")
        return v

    @property
    def open(self) -> bool:
        return not self.api_keys

    def key_hashes(self) -> dict[str, str]:
        """``sha256:<hex>`` of every key -> tenant (keys are compared by hash only)."""
        return {k if k.startswith("sha256:") else hash_api_key(k): t for k, t in self.api_keys.items()}

    def tenant(self, name: str) -> TenantConfig:
        return self.tenants.get(name, self.default_tenant)


def _redact(key: str) -> str:
    return repr(key[:3] + "..." if len(key) > 6 else "...")


class LLMServingArgs(_Strict):
    """The arguments of :func:`~shoal.llm.build_openai_app` (and of its ``args:`` in a config file)."""

    llm_configs: list[LLMConfig] = Field(default_factory=list)
    embedding_configs: list[EmbeddingConfig] = Field(default_factory=list)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    #: Deployment options of the ``OpenAiIngress`` deployment.
    ingress_deployment_config: DeploymentConfig = Field(default_factory=DeploymentConfig)

    @model_validator(mode="after")
    def _unique_ids(self) -> LLMServingArgs:
        if not self.llm_configs and not self.embedding_configs:
            raise ValueError("give at least one model in llm_configs or embedding_configs")
        seen: dict[str, str] = {}
        ids = [(f"llm_configs[{i}]", c.model_id) for i, c in enumerate(self.llm_configs)]
        ids += [(f"embedding_configs[{i}]", c.model_id) for i, c in enumerate(self.embedding_configs)]
        for where, model_id in ids:
            if model_id in seen:
                raise ValueError(f"model_id {model_id!r} of {where} is already used by {seen[model_id]}")
            seen[model_id] = where
        return self
