"""``LLMServer``: the deployment that holds one language model and streams its generations."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from shoal import serve
from shoal.llm._config import LLMConfig
from shoal.llm._outputs import ChoiceText, EngineOutputs
from shoal.llm._serving_metrics import ServingMetrics, waiting_from_stats
from shoal.llm._tool_calls import plan_tools
from shoal.llm.engines import (
    AdapterNotFoundError,
    Engine,
    GenerationChunk,
    GenerationRequest,
    InvalidParameterError,
    SamplingParams,
    TransformersEngine,
    VLLMEngine,
    engine_class,
)

__all__ = ["LLMServer"]

logger = logging.getLogger("shoal.llm")


@serve.deployment(max_ongoing_requests=64, graceful_shutdown_timeout_s=30)
class LLMServer:
    """One model, one engine, per replica. Usually built by :func:`~shoal.llm.build_openai_app`.

    ``generate`` is a streaming method: call it with ``handle.options(stream=True)``. To use a
    LoRA adapter, send the request with the multiplexed model id ``"<model_id>:<adapter>"``.

    Example::

        server = LLMServer.bind(LLMConfig(model_loading_config={"model_id": "m", "model_source": path}))
        handle = serve.run(server)
        request = GenerationRequest("r1", prompt="Once upon a time", sampling=SamplingParams(max_tokens=16))
        async for chunk in handle.options(stream=True).generate.remote(request):
            print(chunk.text, end="")
    """

    def __init__(self, llm_config: LLMConfig | dict[str, Any], *, engine: Engine | None = None) -> None:
        self.config = LLMConfig.model_validate(llm_config)
        self.model_id = self.config.model_id
        self.created = int(time.time())
        if engine is None:
            cls = engine_class(self.config.llm_engine)
            kwargs = dict(self.config.engine_kwargs)
            if issubclass(cls, VLLMEngine) and self.config.lora_config is not None:
                kwargs.setdefault("enable_lora", True)
            if issubclass(cls, TransformersEngine) and "torch_threads" not in kwargs \
                    and not os.environ.get("OMP_NUM_THREADS"):
                # As Ray does with OMP_NUM_THREADS: as many threads as the replica reserves CPUs. On a
                # small shared machine more threads than cores make decoding several times slower.
                kwargs["torch_threads"] = max(1, math.ceil(self.config.deployment_config.ray_actor_options
                                                           .effective_num_cpus))
            engine = cls(self.config.model_loading_config.source, **kwargs)
        self.engine = engine
        self.engine.load()
        self.serving = ServingMetrics(self.model_id, waiting_from_stats(self.engine))
        self._get_adapter: Callable[[str], Awaitable[Any]] | None = None
        lora = self.config.lora_config
        if lora is not None:
            # Adapters are multiplexed models: loaded on demand, least recently used unloaded, and
            # routers prefer replicas that already hold the one a request names.
            self._get_adapter = serve.multiplexed(max_num_models_per_replica=lora.max_num_adapters_per_replica)(
                self._load_adapter)

    # -- adapters
    def _adapter_dir(self) -> str | None:
        lora = self.config.lora_config
        return lora.dynamic_lora_loading_path if lora is not None else None

    def list_adapters(self) -> list[str]:
        """Adapter names found in ``dynamic_lora_loading_path`` (each a sub-directory)."""
        root = self._adapter_dir()
        if not root or not os.path.isdir(root):
            return []
        return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))

    async def _load_adapter(self, model_id: str) -> Any:
        base, _, name = model_id.partition(":")
        if base != self.model_id or not name or "/" in name or name.startswith("."):
            raise AdapterNotFoundError(f"The model `{model_id}` does not exist.")
        root = self._adapter_dir()
        path = os.path.join(root, name) if root else name
        if root and not os.path.isdir(path):
            raise AdapterNotFoundError(f"The model `{model_id}` does not exist.")
        if not self.engine.supports_adapters:
            raise AdapterNotFoundError(
                f"The model `{model_id}` cannot be served: the {self.engine.name} engine cannot load LoRA "
                "adapters here (the transformers engine needs peft installed, vLLM needs enable_lora)."
            )
        logger.info("loading adapter %s from %s", name, path)
        return await self.engine.load_adapter(name, path)

    # -- requests
    def _check_features(self, request: GenerationRequest) -> None:
        """Refuse optional sampling parameters the engine does not apply (never ignore them)."""
        features: frozenset[str] = getattr(self.engine, "sampling_features", frozenset())
        s = request.sampling
        asked = [("logit_bias", "logit_bias", bool(s.logit_bias)),
                 ("presence_penalty", "penalties", s.presence_penalty != 0.0),
                 ("frequency_penalty", "penalties", s.frequency_penalty != 0.0),
                 ("logprobs", "logprobs", s.logprobs is not None),
                 ("top_k", "top_k", s.top_k > 0),
                 ("min_p", "min_p", s.min_p > 0.0),
                 ("repetition_penalty", "repetition_penalty", s.repetition_penalty != 1.0),
                 ("min_tokens", "min_tokens", s.min_tokens > 0),
                 ("stop_token_ids", "stop_token_ids", bool(s.stop_token_ids)),
                 ("skip_special_tokens", "skip_special_tokens", not s.skip_special_tokens),
                 ("allowed_token_ids", "allowed_token_ids", bool(s.allowed_token_ids))]
        if s.structured is not None:
            kind = s.structured.kind
            asked.append((s.structured.param, "json_object" if kind == "json_object" else "structured_outputs", True))
        for param, feature, used in asked:
            if used and feature not in features:
                what = param
                if s.structured is not None and param == s.structured.param:
                    what = f"{param} {s.structured.kind}"
                hint = "; the vLLM engine supports it" if self.engine.name != "vllm" else ""
                raise InvalidParameterError(param, f"{what} is not supported by this engine (the {self.engine.name} "
                                                   f"engine){hint}.")

    def _streams(self, prompt: str, sampling: SamplingParams, request_id: str, adapter: Any,
                 from_chat: bool) -> EngineOutputs:
        """The engine's outputs for every choice: one stream when the engine makes ``n`` itself, else
        ``n`` streams (choice ``i`` seeded with ``seed + i``)."""
        features: frozenset[str] = getattr(self.engine, "sampling_features", frozenset())
        if sampling.n == 1 or "n" in features:
            return EngineOutputs([self.engine.generate(prompt, sampling, request_id, adapter, from_chat=from_chat)],
                            relabel=False)
        streams = []
        for i in range(sampling.n):
            seed = None if sampling.seed is None else (sampling.seed + i + 2**63) % 2**64 - 2**63  # int64
            streams.append(self.engine.generate(prompt, dataclasses.replace(sampling, n=1, seed=seed),
                                                f"{request_id}-{i}", adapter, from_chat=from_chat))
        return EngineOutputs(streams, relabel=True)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the generation of ``request``; each choice's last chunk carries ``finish_reason``."""
        plan = plan_tools(request.tools, request.tool_choice, self.engine) if request.messages is not None else None
        sampling = request.sampling
        if plan is not None and plan.structured is not None:
            sampling = dataclasses.replace(sampling, structured=plan.structured)
        self._check_features(dataclasses.replace(request, sampling=sampling))
        model_id = serve.get_multiplexed_model_id()
        adapter = None
        if model_id and model_id != self.model_id:
            if self._get_adapter is None:
                raise AdapterNotFoundError(f"The model `{model_id}` does not exist.")
            adapter = await self._get_adapter(model_id)
        if request.messages is not None:
            if request.tools:
                prompt = self.engine.render_chat(request.messages, tools=request.tools)  # type: ignore[call-arg]
            else:
                prompt = self.engine.render_chat(request.messages)
            from_chat = True
        else:
            prompt, from_chat = request.prompt or "", False
        choices = [ChoiceText(i, sampling, hold=plan is not None) for i in range(sampling.n)]
        timer = self.serving.start()
        reason = "abort"
        outputs = self._streams(prompt, sampling, request.request_id, adapter, from_chat)
        try:
            async for index, out in outputs:
                choice = choices[index]
                if choice.done:
                    continue
                if out.completion_tokens:
                    timer.token()
                chunk = choice.feed(out)
                if chunk is not None and plan is not None:
                    text, calls, why = plan.calls(chunk.text, chunk.finish_reason or "stop", self.engine)
                    chunk = dataclasses.replace(chunk, text=text, tool_calls=tuple(calls), finish_reason=why)
                if chunk is not None:
                    yield chunk
                if choice.done:
                    await outputs.stop(index)  # closing an engine's stream stops its generation at once
                    if all(c.done for c in choices):
                        reason = choice.reason or "stop"
                        return
        finally:
            timer.finish(reason, sum(c.tokens for c in choices))
            await outputs.aclose()

    def model_info(self) -> dict[str, Any]:
        """What ``/v1/models`` shows for this model, plus its adapters and context length."""
        max_len = getattr(self.engine, "max_model_len", None)
        return {"id": self.model_id, "created": self.created, "engine": self.engine.name,
                "adapters": self.list_adapters() if self.config.lora_config else [],
                **({"max_model_len": int(max_len)} if max_len else {}),
                **self.config.model_metadata}

    # -- /tokenize and /detokenize (vLLM's server has them; the gateway routes them here)
    def tokenize(self, prompt: str | None = None, messages: tuple[Mapping[str, Any], ...] | None = None,
                 ) -> dict[str, Any]:
        """The token ids of a prompt, or of chat ``messages`` rendered with the model's template."""
        encode = getattr(self.engine, "tokenize", None)
        if encode is None:
            raise InvalidParameterError("model", f"tokenize is not supported by this engine ({self.engine.name}).")
        text = self.engine.render_chat(messages) if messages is not None else (prompt or "")
        tokens = [int(t) for t in encode(text, add_special_tokens=messages is None)]  # as generate does
        max_len = getattr(self.engine, "max_model_len", None)
        return {"count": len(tokens), "max_model_len": int(max_len) if max_len else None, "tokens": tokens}

    def detokenize(self, tokens: list[int]) -> dict[str, Any]:
        decode = getattr(self.engine, "detokenize", None)
        if decode is None:
            raise InvalidParameterError("model", f"detokenize is not supported by this engine ({self.engine.name}).")
        try:
            return {"prompt": decode([int(t) for t in tokens])}
        except (ValueError, IndexError, OverflowError) as e:
            raise InvalidParameterError("tokens", f"Invalid value for 'tokens': {e}") from None

    def stats(self) -> dict[str, Any]:
        """The engine's counters in this replica (requests, running, generated tokens, cancelled)."""
        return {"model": self.model_id, **self.engine.stats()}

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
