"""The vLLM engine: ``AsyncLLMEngine`` (``AsyncLLM`` in vLLM's V1 engine) with continuous batching.

Written against vLLM's documented async API — ``AsyncEngineArgs``,
``AsyncLLMEngine.from_engine_args``, ``generate(prompt, sampling_params, request_id,
lora_request=...)`` yielding ``RequestOutput``s, ``abort(request_id)`` — and **not tested
here**: shoal's test machines have no GPU and no vLLM. vLLM is imported when the engine
loads, never when shoal is imported.

Engine kwargs are vLLM's ``AsyncEngineArgs`` (``max_model_len``, ``gpu_memory_utilization``,
``dtype``, ``enable_lora``, ...); ``model`` defaults to the model source and ``enable_lora``
is switched on when the model has a ``lora_config``. ``default_max_tokens`` (shoal's, default
256) applies when a request gives no ``max_tokens``.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from shoal.llm.engines._base import (
    ContextLengthError,
    EngineOutput,
    SamplingParams,
    fallback_chat_prompt,
    hf_detokenize,
    hf_tokenize,
)

__all__ = ["VLLMEngine", "vllm_available"]

logger = logging.getLogger("shoal.llm")


def vllm_available() -> bool:
    """Whether vLLM is importable and a CUDA device is visible (what ``llm_engine: auto`` checks)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


class VLLMEngine:
    """vLLM's async engine behind shoal's engine interface (untested here; see the module docstring)."""

    name = "vllm"
    #: The optional sampling parameters passed on to vLLM (``logit_bias`` is not, yet: a 400).
    sampling_features = frozenset({"penalties"})

    def __init__(self, model_source: str, *, default_max_tokens: int = 256, **engine_args: Any) -> None:
        self.model_source = model_source
        self.default_max_tokens = default_max_tokens
        self.engine_args = {"model": model_source, **engine_args}
        self.engine: Any = None
        self.tokenizer: Any = None
        self._lora_ids = itertools.count(1)
        self._requests = 0
        self._running = 0
        self._cancelled = 0
        self._generated = 0

    def load(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        args = AsyncEngineArgs(**self.engine_args)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        # Chat templates come from the Hugging Face tokenizer vLLM itself uses.
        source = self.engine_args.get("tokenizer") or self.model_source
        self.tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=bool(self.engine_args.get("trust_remote_code", False)))
        logger.info("vLLM engine loaded %s", self.model_source)

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return str(self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))
        return fallback_chat_prompt(messages)

    @property
    def supports_adapters(self) -> bool:
        return bool(self.engine_args.get("enable_lora"))

    async def load_adapter(self, name: str, path: str) -> Any:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, next(self._lora_ids), path)
        add = getattr(self.engine, "add_lora", None)
        if add is not None:  # load now, so that a bad adapter fails this request, not a later one
            await add(request)
        return request

    def _sampling_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=1,
            max_tokens=params.max_tokens if params.max_tokens is not None else self.default_max_tokens,
            temperature=max(params.temperature, 0.0),
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )

    async def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                       *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        if self.engine is None:
            raise RuntimeError("the engine is not loaded; call load() first")
        vllm_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        self._requests += 1
        self._running += 1
        text = ""
        tokens = 0
        finished = False
        try:
            # A chat prompt already holds its special tokens (the template put them there), so it is
            # tokenized without adding any, as vLLM's own OpenAI server does.
            inputs: dict[str, Any] = (
                {"prompt_token_ids": self.tokenizer(prompt, add_special_tokens=False)["input_ids"]} if from_chat
                else {"prompt": prompt})
            stream = self.engine.generate(inputs, self._sampling_params(params), vllm_id, lora_request=adapter)
            async for out in stream:
                completion = out.outputs[0]
                prompt_tokens = len(out.prompt_token_ids or ())
                # The default output kind is cumulative: text and token ids so far.
                new_text = completion.text[len(text):]
                self._generated += len(completion.token_ids) - tokens
                text, tokens = completion.text, len(completion.token_ids)
                reason = completion.finish_reason if out.finished else None
                if reason == "abort":
                    reason = "stop"
                if new_text or reason:
                    yield EngineOutput(new_text, prompt_tokens, tokens, reason)
                if out.finished:
                    finished = True
        except ValueError as e:
            # vLLM rejects prompts longer than max_model_len with a ValueError saying so.
            if tokens == 0 and "context length" in str(e):
                raise ContextLengthError(str(e)) from e
            raise
        finally:
            self._running -= 1
            if not finished:
                self._cancelled += 1
                try:
                    await self.engine.abort(vllm_id)
                except Exception as e:  # the request may already be gone
                    logger.debug("abort of %s: %r", vllm_id, e)

    @property
    def max_model_len(self) -> int | None:
        """The context length vLLM serves (``max_model_len``, else the model config's)."""
        if self.engine_args.get("max_model_len"):
            return int(self.engine_args["max_model_len"])
        config = getattr(getattr(self.engine, "model_config", None), "max_model_len", None)
        return int(config) if config else None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As ``generate`` tokenizes: special tokens for a raw prompt, none for a rendered chat."""
        return hf_tokenize(self.tokenizer, text, add_special_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        return hf_detokenize(self.tokenizer, ids)

    def stats(self) -> dict[str, Any]:
        return {"engine": self.name, "requests": self._requests, "running": self._running,
                "generated_tokens": self._generated, "cancelled": self._cancelled}

    def shutdown(self) -> None:
        stop = getattr(self.engine, "shutdown", None)
        if stop is not None:
            stop()
