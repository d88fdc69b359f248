"""The vLLM engine: ``AsyncLLMEngine`` (``AsyncLLM`` in vLLM's V1 engine) with continuous batching.

Written against vLLM's documented async API — ``AsyncEngineArgs``,
``AsyncLLMEngine.from_engine_args``, ``generate(prompt, sampling_params, request_id,
lora_request=...)`` yielding ``RequestOutput``s, ``abort(request_id)`` — and **not tested
here**: shoal's test machines have no GPU and no vLLM. vLLM is imported when the engine
loads, never when shoal is imported.

Engine kwargs are vLLM's ``AsyncEngineArgs`` (``max_model_len``, ``gpu_memory_utilization``,
``dtype``, ``enable_lora``, ...); ``model`` defaults to the model source and ``enable_lora``
is switched on when the model has a ``lora_config``. ``default_max_tokens`` (shoal's, default
256) applies when a request gives no ``max_tokens``. ``tool_call_parser`` (shoal's; vLLM's
server flag of the same name, e.g. ``hermes``, ``llama3_json``) names the vLLM tool parser that
finds tool calls in the text for ``tool_choice: "auto"``.

Every sampling parameter is passed to vLLM's ``SamplingParams``: ``n`` (vLLM generates the
choices), ``logprobs``, ``logit_bias``, the penalties, ``top_k``, ``min_p``, ``min_tokens``,
``stop_token_ids``, ``skip_special_tokens``, ``include_stop_str_in_output``,
``allowed_token_ids``, and structured outputs (JSON mode, JSON schema, regex, choice, grammar)
as ``StructuredOutputsParams`` (vLLM >= 0.11) or ``GuidedDecodingParams`` (older).
"""

from __future__ import annotations

import itertools
import json
import logging
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

from shoal.llm.engines._base import (
    ContextLengthError,
    EngineOutput,
    SamplingParams,
    StructuredOutput,
    TokenLogprob,
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
    #: The optional sampling parameters passed on to vLLM: all of them.
    sampling_features = frozenset({"logit_bias", "penalties", "n", "logprobs", "json_object", "structured_outputs",
                                   "tools", "top_k", "min_p", "repetition_penalty", "min_tokens", "stop_token_ids",
                                   "skip_special_tokens", "allowed_token_ids"})

    def __init__(self, model_source: str, *, default_max_tokens: int = 256, tool_call_parser: str | None = None,
                 **engine_args: Any) -> None:
        self.model_source = model_source
        self.default_max_tokens = default_max_tokens
        self.tool_call_parser = tool_call_parser
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

        if self.tool_call_parser:  # an unknown parser fails the load, not the first request
            try:
                from vllm.tool_parsers import ToolParserManager
            except ImportError:
                from vllm.entrypoints.openai.tool_parsers import ToolParserManager
            ToolParserManager.get_tool_parser(self.tool_call_parser)
        args = AsyncEngineArgs(**self.engine_args)
        self.engine = AsyncLLMEngine.from_engine_args(args)
        # Chat templates come from the Hugging Face tokenizer vLLM itself uses.
        source = self.engine_args.get("tokenizer") or self.model_source
        self.tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=bool(self.engine_args.get("trust_remote_code", False)))
        logger.info("vLLM engine loaded %s", self.model_source)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] = ()) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            extra = {"tools": [dict(t) for t in tools]} if tools else {}
            return str(self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True,
                                                          **extra))
        return fallback_chat_prompt(messages)

    def extract_tool_calls(self, text: str, tools: Sequence[Mapping[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
        """The content and the tool calls (``{"name", "arguments"}``) in ``text``, found by vLLM's
        ``tool_call_parser``."""
        try:
            from vllm.tool_parsers import ToolParserManager
        except ImportError:  # vLLM before 0.12
            from vllm.entrypoints.openai.tool_parsers import ToolParserManager
        try:
            from vllm.entrypoints.openai.protocol import ChatCompletionRequest
        except ImportError:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        parser = ToolParserManager.get_tool_parser(self.tool_call_parser)(self.tokenizer)
        request = ChatCompletionRequest(model=self.model_source, messages=[{"role": "user", "content": ""}],
                                        tools=[dict(t) for t in tools], tool_choice="auto")
        info = parser.extract_tool_calls(text, request)
        if not info.tools_called:
            return text, []
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in info.tool_calls]
        return info.content or "", calls

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

    @staticmethod
    def _structured(spec: StructuredOutput) -> tuple[str, Any]:
        """(``SamplingParams`` keyword, value) for a structured output, in this vLLM's names."""
        value: Any = spec.spec
        if spec.kind == "json_object":
            value = True
        elif spec.kind in ("json", "choice"):
            value = json.loads(spec.spec)
        args = {spec.kind: value}
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:  # vLLM before 0.11
            from vllm.sampling_params import GuidedDecodingParams

            return "guided_decoding", GuidedDecodingParams(**args)
        return "structured_outputs", StructuredOutputsParams(**args)

    def _sampling_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams

        kwargs: dict[str, Any] = dict(
            n=params.n,
            max_tokens=params.max_tokens if params.max_tokens is not None else self.default_max_tokens,
            temperature=max(params.temperature, 0.0),
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,  # -1: off, in every vLLM version
            min_p=params.min_p,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            include_stop_str_in_output=params.include_stop_str_in_output,
            seed=params.seed,
            ignore_eos=params.ignore_eos,
            min_tokens=params.min_tokens,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logit_bias=dict(params.logit_bias) or None,
            allowed_token_ids=list(params.allowed_token_ids) or None,
            logprobs=params.logprobs,
            skip_special_tokens=params.skip_special_tokens,
        )
        if params.structured is not None:
            key, value = self._structured(params.structured)
            kwargs[key] = value
        return VSamplingParams(**kwargs)

    def _logprobs(self, completion: Any, start: int, end: int, k: int) -> tuple[TokenLogprob, ...]:
        """The :class:`TokenLogprob` of tokens ``start:end`` of a completion (vLLM's ``logprobs``: per
        token, a dict of token id -> ``Logprob(logprob, rank, decoded_token)``)."""
        entries = list(completion.logprobs or ())[-(end - start):] if end > start else []
        ids = list(completion.token_ids)[start:end]
        out = []
        for token, entry in zip(ids, entries, strict=False):
            def text(tid: int, lp: Any) -> str:
                decoded = getattr(lp, "decoded_token", None)
                return str(decoded) if decoded is not None else str(self.tokenizer.decode([tid]))

            chosen = entry[token]
            ranked = sorted(((lp.rank, tid, lp) for tid, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                            key=lambda r: r[0])
            out.append(TokenLogprob(text(token, chosen), float(chosen.logprob),
                                    tuple((text(tid, lp), float(lp.logprob)) for _, tid, lp in ranked)))
        return tuple(out)

    async def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                       *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        if self.engine is None:
            raise RuntimeError("the engine is not loaded; call load() first")
        vllm_id = f"{request_id}-{uuid.uuid4().hex[:8]}"
        self._requests += 1
        self._running += 1
        texts: dict[int, str] = {}
        counts: dict[int, int] = {}
        done: set[int] = set()
        finished = False
        try:
            # A chat prompt already holds its special tokens (the template put them there), so it is
            # tokenized without adding any, as vLLM's own OpenAI server does.
            inputs: dict[str, Any] = (
                {"prompt_token_ids": self.tokenizer(prompt, add_special_tokens=False)["input_ids"]} if from_chat
                else {"prompt": prompt})
            stream = self.engine.generate(inputs, self._sampling_params(params), vllm_id, lora_request=adapter)
            async for out in stream:
                prompt_tokens = len(out.prompt_token_ids or ())
                for completion in out.outputs:  # one per choice (n), each cumulative: its text and tokens so far
                    i = int(getattr(completion, "index", 0))
                    if i in done:
                        continue
                    before, tokens = counts.get(i, 0), len(completion.token_ids)
                    new_text = completion.text[len(texts.get(i, "")):]
                    self._generated += tokens - before
                    texts[i], counts[i] = completion.text, tokens
                    reason = completion.finish_reason
                    if reason is not None:
                        done.add(i)
                    if reason == "abort":
                        reason = "stop"
                    logprobs = (self._logprobs(completion, before, tokens, params.logprobs)
                                if params.logprobs is not None else ())
                    if new_text or reason or logprobs:
                        yield EngineOutput(new_text, prompt_tokens, tokens, reason, i, logprobs)
                if out.finished:
                    finished = True
        except ValueError as e:
            # vLLM rejects prompts longer than max_model_len with a ValueError saying so.
            if not counts and "context length" in str(e):
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
