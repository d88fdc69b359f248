"""LLM engines, chosen by name: ``transformers``, ``vllm``, ``mock``, ``auto`` — or your own.

Each engine module imports its ML library only when the engine loads, so importing this
package costs nothing. A custom engine is named by import path (``"my_pkg.engines:MyEngine"``):
a class built as ``MyEngine(model_source, **engine_kwargs)`` that implements :class:`Engine`
(subclassing one of the engines here is the easy way).
"""

from __future__ import annotations

from typing import Any

from shoal.llm.engines._base import (
    AdapterNotFoundError,
    ContextLengthError,
    Engine,
    EngineOutput,
    GenerationChunk,
    GenerationRequest,
    InvalidParameterError,
    SamplingParams,
    StopMatcher,
    fallback_chat_prompt,
)
from shoal.llm.engines._hf import TransformersEngine
from shoal.llm.engines._mock import MockEngine
from shoal.llm.engines._vllm import VLLMEngine

__all__ = [
    "BUILTIN_ENGINES",
    "AdapterNotFoundError",
    "ContextLengthError",
    "Engine",
    "EngineOutput",
    "GenerationChunk",
    "GenerationRequest",
    "InvalidParameterError",
    "MockEngine",
    "SamplingParams",
    "StopMatcher",
    "TransformersEngine",
    "VLLMEngine",
    "engine_class",
    "fallback_chat_prompt",
    "make_engine",
    "resolve_engine_name",
]

BUILTIN_ENGINES: dict[str, type] = {"transformers": TransformersEngine, "vllm": VLLMEngine, "mock": MockEngine}


def resolve_engine_name(name: str) -> str:
    """``auto`` -> ``vllm`` when vLLM is importable and a GPU is visible, else ``transformers``.
    Other built-in names are lower-cased; an import path is returned as it is."""
    if ":" in name:
        return name
    name = name.lower()
    if name != "auto":
        return name
    from shoal.llm.engines._vllm import vllm_available

    return "vllm" if vllm_available() else "transformers"


def engine_class(name: str) -> type:
    """The engine class for a built-in name (or ``auto``) or a ``"module:Class"`` import path."""
    kind = resolve_engine_name(name)
    if kind in BUILTIN_ENGINES:
        return BUILTIN_ENGINES[kind]
    if ":" in kind:
        from shoal.loader import import_attr

        cls = import_attr(kind)
        if not isinstance(cls, type):
            raise TypeError(f"engine {kind!r} is a {type(cls).__name__}, not a class")
        return cls
    raise ValueError(f"unknown engine {name!r}; choose one of auto, {', '.join(BUILTIN_ENGINES)} or 'module:Class'")


def make_engine(name: str, model_source: str, engine_kwargs: dict[str, Any] | None = None) -> Engine:
    """A new (not yet loaded) engine of kind ``name`` for ``model_source``."""
    engine: Engine = engine_class(name)(model_source, **dict(engine_kwargs or {}))
    return engine
