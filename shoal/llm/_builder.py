"""Application builders: LLM configs in, a bound OpenAI-compatible application out."""

from __future__ import annotations

import os
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError

from shoal.deployment import Application, Deployment
from shoal.llm._config import EmbeddingConfig, LLMConfig, LLMServingArgs, ModelLoadingConfig
from shoal.llm._embeddings import EmbeddingServer
from shoal.llm._gateway import OpenAiIngress
from shoal.llm._server import LLMServer
from shoal.schema import validation_error_to_config_error

__all__ = ["build_embedding_deployment", "build_llm_deployment", "build_openai_app"]

_M = TypeVar("_M", bound=BaseModel)


def _validate(model: type[_M], value: _M | dict[str, Any], source: str) -> _M:
    if isinstance(value, model):
        return value
    try:
        return model.model_validate(value)
    except ValidationError as e:
        # The same "field.path: message" lines as config-file errors.
        raise validation_error_to_config_error(e, source, model) from None


def _absolute(path: str | None) -> str | None:
    """Relative local paths are resolved now, against the directory the app is built in.

    A path is local when it exists, starts with ``./`` or ``../``, or has more than one ``/``
    (Hugging Face ids, ``org/name``, have one).
    """
    if not path or os.path.isabs(path):
        return path
    if os.path.exists(path) or path.startswith(("./", "../")) or path.count("/") > 1:
        return os.path.abspath(path)
    return path


def _deployment_name(prefix: str, model_id: str) -> str:
    return f"{prefix}:{model_id.replace('/', '--')}"


def _loading(cfg: ModelLoadingConfig) -> ModelLoadingConfig:
    return cfg.model_copy(update={"model_source": _absolute(cfg.model_source)})


def build_llm_deployment(llm_config: LLMConfig | dict[str, Any], *, name_prefix: str = "LLMServer") -> Application:
    """One :class:`~shoal.llm.LLMServer` deployment (named ``LLMServer:<model_id>``), bound to its config."""
    cfg = _validate(LLMConfig, llm_config, "llm_config")
    update: dict[str, Any] = {"model_loading_config": _loading(cfg.model_loading_config)}
    if cfg.lora_config is not None:
        path = _absolute(cfg.lora_config.dynamic_lora_loading_path)
        update["lora_config"] = cfg.lora_config.model_copy(update={"dynamic_lora_loading_path": path})
    cfg = cfg.model_copy(update=update)
    options = cfg.deployment_config.model_dump(exclude_unset=True)
    return cast(Deployment, LLMServer).options(name=_deployment_name(name_prefix, cfg.model_id), **options).bind(cfg)


def build_embedding_deployment(config: EmbeddingConfig | dict[str, Any], *,
                               name_prefix: str = "EmbeddingServer") -> Application:
    """One :class:`~shoal.llm.EmbeddingServer` deployment (named ``EmbeddingServer:<model_id>``)."""
    cfg = _validate(EmbeddingConfig, config, "embedding_config")
    cfg = cfg.model_copy(update={"model_loading_config": _loading(cfg.model_loading_config)})
    options = cfg.deployment_config.model_dump(exclude_unset=True)
    name = _deployment_name(name_prefix, cfg.model_id)
    return cast(Deployment, EmbeddingServer).options(name=name, **options).bind(cfg)


def build_openai_app(llm_serving_args: LLMServingArgs | dict[str, Any]) -> Application:
    """An OpenAI-compatible application: one deployment per model behind an ``OpenAiIngress``.

    Usable from Python and as a config file's application builder::

        applications:
          - name: llm
            route_prefix: /
            import_path: shoal.llm:build_openai_app
            args:
              llm_configs:
                - model_loading_config: {model_id: tiny-chat, model_source: ./models/tiny-chat}
                  llm_engine: transformers

    ``args`` is validated into :class:`~shoal.llm.LLMServingArgs`; a problem raises a
    :class:`~shoal.schema.ConfigError` naming the field (``llm_configs[0].model_loading_config.model_id``).
    """
    args = _validate(LLMServingArgs, llm_serving_args, "build_openai_app")
    llms = {cfg.model_id: build_llm_deployment(cfg) for cfg in args.llm_configs}
    embedders = {cfg.model_id: build_embedding_deployment(cfg) for cfg in args.embedding_configs}
    options = args.ingress_deployment_config.model_dump(exclude_unset=True)
    return cast(Deployment, OpenAiIngress).options(**options).bind(llms, embedders, args.gateway)
