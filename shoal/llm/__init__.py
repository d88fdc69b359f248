"""Serve language models behind an OpenAI-compatible API: ``from shoal import llm``.

The names follow Ray Serve LLM (``ray.serve.llm``)::

    from shoal.llm import LLMConfig, build_openai_app

    app = build_openai_app({"llm_configs": [
        LLMConfig(model_loading_config={"model_id": "tiny-chat", "model_source": "./models/tiny-chat"}),
    ]})

Importing this package imports no ML library: torch, transformers and vLLM are imported by
an engine when a model loads, in the replica that serves it.
"""

from __future__ import annotations

from shoal.llm._builder import build_embedding_deployment, build_llm_deployment, build_openai_app
from shoal.llm._config import (
    ANONYMOUS_TENANT,
    EmbeddingConfig,
    GatewayConfig,
    LLMConfig,
    LLMServingArgs,
    LoraConfig,
    ModelLoadingConfig,
    TenantConfig,
    hash_api_key,
)
from shoal.llm._embeddings import EmbeddingResult, EmbeddingServer
from shoal.llm._gateway import OpenAiIngress
from shoal.llm._protocol import OpenAIError
from shoal.llm._server import LLMServer
from shoal.llm.engines import GenerationChunk, GenerationRequest, SamplingParams

#: Ray Serve LLM's former name of the ingress deployment.
LLMRouter = OpenAiIngress

__all__ = [
    "ANONYMOUS_TENANT",
    "EmbeddingConfig",
    "EmbeddingResult",
    "EmbeddingServer",
    "GatewayConfig",
    "GenerationChunk",
    "GenerationRequest",
    "LLMConfig",
    "LLMRouter",
    "LLMServer",
    "LLMServingArgs",
    "LoraConfig",
    "ModelLoadingConfig",
    "OpenAIError",
    "OpenAiIngress",
    "SamplingParams",
    "TenantConfig",
    "build_embedding_deployment",
    "build_llm_deployment",
    "build_openai_app",
    "hash_api_key",
]
