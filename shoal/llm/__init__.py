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

import typing as _typing

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


if not _typing.TYPE_CHECKING:  # hidden from mypy, which would accept any name here

    def __getattr__(name: str) -> _typing.Any:
        # A Ray Serve name that shoal does not support raises NotSupportedError with the reason, not an
        # AttributeError (the table is shoal/_compat.py, imported only here: this module stays light;
        # the import system's probes such as __path__ do not load it).
        if name.startswith("_"):
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from shoal._compat import missing_attribute
        from shoal.exceptions import NotSupportedError

        return missing_attribute(__name__, name, NotSupportedError)
