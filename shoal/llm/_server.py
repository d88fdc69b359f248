"""``LLMServer``: the deployment that holds one language model and streams its generations."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from shoal import serve
from shoal.llm._config import LLMConfig
from shoal.llm._serving_metrics import ServingMetrics, waiting_from_stats
from shoal.llm.engines import (
    AdapterNotFoundError,
    Engine,
    GenerationChunk,
    GenerationRequest,
    InvalidParameterError,
    SamplingParams,
    StopMatcher,
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
    def _check_features(self, sampling: SamplingParams) -> None:
        """Refuse optional sampling parameters the engine does not apply (never ignore them)."""
        features: frozenset[str] = getattr(self.engine, "sampling_features", frozenset())
        asked = [("logit_bias", "logit_bias", bool(sampling.logit_bias)),
                 ("presence_penalty", "penalties", sampling.presence_penalty != 0.0),
                 ("frequency_penalty", "penalties", sampling.frequency_penalty != 0.0)]
        for param, feature, used in asked:
            if used and feature not in features:
                raise InvalidParameterError(param, f"{param} is not supported by this engine ({self.engine.name}).")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the generation of ``request``; the last chunk carries ``finish_reason``."""
        self._check_features(request.sampling)
        model_id = serve.get_multiplexed_model_id()
        adapter = None
        if model_id and model_id != self.model_id:
            if self._get_adapter is None:
                raise AdapterNotFoundError(f"The model `{model_id}` does not exist.")
            adapter = await self._get_adapter(model_id)
        if request.messages is not None:
            prompt, from_chat = self.engine.render_chat(request.messages), True
        else:
            prompt, from_chat = request.prompt or "", False
        matcher = StopMatcher(request.sampling.stop)
        timer = self.serving.start()
        reason, generated = "abort", 0
        stream = self.engine.generate(prompt, request.sampling, request.request_id, adapter, from_chat=from_chat)
        try:
            async for out in stream:
                generated = out.completion_tokens
                if out.completion_tokens:
                    timer.token()
                text, stopped = matcher.feed(out.text)
                if stopped:
                    # Closing the engine's stream (below) stops generation at once.
                    reason = "stop"
                    yield GenerationChunk(text, out.prompt_tokens, out.completion_tokens, "stop")
                    return
                if out.finish_reason is not None:
                    text += matcher.flush()
                    reason = out.finish_reason
                if text or out.finish_reason is not None:
                    yield GenerationChunk(text, out.prompt_tokens, out.completion_tokens, out.finish_reason)
        finally:
            timer.finish(reason, generated)
            await stream.aclose()

    def model_info(self) -> dict[str, Any]:
        """What ``/v1/models`` shows for this model, plus its adapters and context length."""
        max_len = getattr(self.engine, "max_model_len", None)
        return {"id": self.model_id, "created": self.created, "engine": self.engine.name,
                "adapters": self.list_adapters() if self.config.lora_config else [],
                **({"max_model_len": int(max_len)} if max_len else {}),
                **self.config.model_metadata}

    # -- /tokenize and /detokenize (vLLM's server has them; the gateway routes them here)
    def tokenize(self, prompt: str | None = None, messages: tuple[Mapping[str, str], ...] | None = None,
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
