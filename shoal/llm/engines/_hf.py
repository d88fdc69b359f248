"""The transformers engine: ``AutoModelForCausalLM.generate`` in a worker thread, streamed token by token.

Runs on the CPU, and on CUDA (or Apple's MPS) when ``device`` is ``auto`` and one is visible
to the replica (give the deployment ``ray_actor_options: {num_gpus: 1}``). torch and
transformers are imported when the engine loads, never when shoal is imported.

Engine kwargs:

* ``device``: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:1``, ``mps``;
* ``dtype``: ``auto`` (bfloat16 or float16 on CUDA, float32 elsewhere), ``float32``, ``float16``, ``bfloat16``;
* ``batching``: continuous batching (``shoal/llm/engines/_hf_batch.py``): one step thread runs
  every running sequence's next token in one forward pass, new requests joining at the next step
  and finished or closed ones leaving at once. Default: on for the CPU and CUDA, off for MPS.
  Requests for a LoRA adapter, and models whose cache is not made of plain dynamic layers
  (sliding-window or linear-attention layers, quantised caches; transformers < 4.56; the log says
  so at load) take the path below instead, as do requests with sampling options it lacks
  (``logit_bias``, penalties);
* ``max_num_seqs``: sequences in the batch at once (default 16; the others wait);
* ``max_num_batched_tokens``: tokens per step, prompts being prefilled (padded to the longest)
  plus one per running sequence (default 2048; a prompt longer than that is prefilled alone);
* ``max_concurrency``: without batching (``batching: false``, adapters, unsupported models),
  ``generate`` calls run at once, each in its own thread (default 1; the others wait their turn);
* ``default_max_tokens``: ``max_tokens`` when a request gives none (default 256, capped by the context);
* ``torch_threads``: torch's CPU threads (``LLMServer`` defaults it to the replica's ``num_cpus``, 1 unless set);
* ``trust_remote_code``, ``tokenizer_source``, ``model_kwargs`` (passed to ``from_pretrained``).

Generation stops within one token when its stream is closed (client disconnect, stop
sequence): a stopping criterion reads a per-request event that closing sets.
LoRA adapters load through ``peft`` when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import sys
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shoal.llm.engines._base import (
    AdapterNotFoundError,
    ContextLengthError,
    EngineOutput,
    InvalidParameterError,
    SamplingParams,
    fallback_chat_prompt,
    hf_detokenize,
    hf_tokenize,
)
from shoal.llm.engines._hf_batch import BatchScheduler, batching_supported, check_batching_kwargs
from shoal.llm.engines._hf_logits import LogprobRecorder, TokenTexts, logits_processors
from shoal.llm.engines._json_mode import JsonMode

__all__ = ["TransformersEngine", "pick_device"]

logger = logging.getLogger("shoal.llm")

_END = object()

#: How long the reader waits for the next token before it checks that the generation thread still runs.
_POLL_S = 1.0


#: The interpreter's thread switch interval in a process whose batching engine runs on CUDA
#: (Python's default is 5 ms); ``$SHOAL_LLM_SWITCH_INTERVAL_S`` overrides it, 0 leaves Python's.
#: On a GPU the step thread is mostly Python (kernel launches), so it holds the GIL; the
#: replica's event loop, which streams the tokens out, then waits up to a whole interval for it
#: at every wake-up.
CUDA_SWITCH_INTERVAL_S = 0.0001


def apply_switch_interval() -> float:
    """Set the switch interval for a CUDA batching engine (see :data:`CUDA_SWITCH_INTERVAL_S`);
    returns the interval in force."""
    import os

    raw = os.environ.get("SHOAL_LLM_SWITCH_INTERVAL_S", "")
    try:
        value = float(raw) if raw else CUDA_SWITCH_INTERVAL_S
    except ValueError:
        raise ValueError(f"SHOAL_LLM_SWITCH_INTERVAL_S={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"SHOAL_LLM_SWITCH_INTERVAL_S={raw!r} must be >= 0 (0: Python's default)")
    if value > 0:
        sys.setswitchinterval(value)
    return sys.getswitchinterval()


def pick_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``mps`` when available, else ``cpu``."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def _pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype != "auto":
        value = getattr(torch, dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
        return value
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class _Counter:
    """A thread-safe running total (the generation threads add, the loop reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


class _QueueStreamer:
    """transformers' streamer interface, handing each new token to an asyncio queue.

    ``generate`` first puts the prompt (skipped here), then one token per step, then calls ``end``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any], generated: _Counter,
                 recorder: LogprobRecorder | None = None) -> None:
        self._loop = loop
        self._queue = queue
        self._generated = generated
        self._recorder = recorder
        self._prompt_seen = False

    def _send(self, item: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the replica is going away
            pass

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        ids = [int(t) for t in value.reshape(-1).tolist()]
        self._generated.add(len(ids))
        self._send((ids, self._recorder.take(ids) if self._recorder is not None else []))

    def end(self) -> None:
        self._send(_END)


class TransformersEngine:
    """Hugging Face transformers on CPU or GPU; see the module docstring for its kwargs."""

    name = "transformers"
    #: The optional sampling parameters this engine applies (LLMServer refuses the others:
    #: ``structured_outputs`` other than JSON mode, ``tools``). ``n`` is LLMServer's: n generations.
    sampling_features = frozenset({"logit_bias", "penalties", "logprobs", "json_object", "top_k", "min_p",
                                   "repetition_penalty", "min_tokens", "stop_token_ids", "skip_special_tokens",
                                   "allowed_token_ids"})

    def __init__(self, model_source: str, *, device: str = "auto", dtype: str = "auto", max_concurrency: int = 1,
                 default_max_tokens: int = 256, trust_remote_code: bool = False, torch_threads: int | None = None,
                 tokenizer_source: str | None = None, model_kwargs: dict[str, Any] | None = None,
                 batching: bool | None = None, max_num_seqs: int = 16, max_num_batched_tokens: int = 2048) -> None:
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        check_batching_kwargs(max_num_seqs, max_num_batched_tokens)
        self.batching = batching
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self._batcher: BatchScheduler | None = None
        self.model_source = model_source
        self.device_setting = device
        self.dtype_setting = dtype
        self.max_concurrency = max_concurrency
        self.default_max_tokens = default_max_tokens
        self.trust_remote_code = trust_remote_code
        self.torch_threads = torch_threads
        self.tokenizer_source = tokenizer_source or model_source
        self.model_kwargs = dict(model_kwargs or {})
        self.device = "cpu"
        self.model: Any = None
        self.tokenizer: Any = None
        self.max_context: int | None = None
        self._eos_ids: set[int] = set()
        self._pad_id: int | None = None
        self._token_texts: TokenTexts | None = None
        self._json_vocabulary: Any = None  # built on the first JSON-mode request (_hf_logits.json_vocabulary)
        self._pool: ThreadPoolExecutor | None = None
        self._slots: asyncio.Semaphore | None = None
        # peft switches adapters on the shared model, so generations must not overlap once one is loaded.
        self._adapter_lock = threading.Lock()
        self._adapters: set[str] = set()
        self._unload: set[str] = set()
        self._active: set[threading.Event] = set()
        self._generated = _Counter()
        self._requests = 0
        self._running = 0
        self._cancelled = 0

    # -- loading
    def load(self) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if self.torch_threads:
            torch.set_num_threads(int(self.torch_threads))
        self.device = pick_device(self.device_setting)
        dtype = _pick_dtype(self.dtype_setting, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source, trust_remote_code=self.trust_remote_code)
        # transformers 5 names the argument `dtype`; 4.x calls it `torch_dtype`.
        dtype_arg = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kwargs = {dtype_arg: dtype, "trust_remote_code": self.trust_remote_code, **self.model_kwargs}
        model: Any = AutoModelForCausalLM.from_pretrained(self.model_source, **kwargs)
        self.model = model.to(self.device).eval()
        config = self.model.config
        self.max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        gen_config = getattr(self.model, "generation_config", None)
        eos = getattr(gen_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self._eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (min(self._eos_ids) if self._eos_ids else None)
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="shoal-llm-generate")
        auto = self.device == "cpu" or self.device.startswith("cuda")
        if self.batching if self.batching is not None else auto:
            why_not = batching_supported(self.model)
            if why_not is None:
                if self.device.startswith("cuda"):
                    apply_switch_interval()
                self._batcher = BatchScheduler(self, max_num_seqs=self.max_num_seqs,
                                               max_num_batched_tokens=self.max_num_batched_tokens)
            else:
                logger.warning("continuous batching is off for %s: %s", self.model_source, why_not)
        logger.info("loaded %s on %s (%s), context %s", self.model_source, self.device, dtype, self.max_context)

    @property
    def token_texts(self) -> TokenTexts:
        """Each token's text (log probabilities, JSON mode), built on first use."""
        if self._token_texts is None:
            self._token_texts = TokenTexts(self.tokenizer)
        return self._token_texts

    # -- prompts
    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            return str(text)
        return fallback_chat_prompt(messages)

    # -- adapters
    @property
    def supports_adapters(self) -> bool:
        return importlib.util.find_spec("peft") is not None

    async def load_adapter(self, name: str, path: str) -> Any:
        if not self.supports_adapters:
            raise AdapterNotFoundError(
                f"LoRA adapter {name!r} cannot be served: the transformers engine loads adapters with peft, "
                "which is not installed (pip install peft)"
            )
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._load_adapter, name, path)

    def _load_adapter(self, name: str, path: str) -> _Adapter:
        from peft import PeftModel

        with self._adapter_lock:
            self._drop_unloaded()
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, path, adapter_name=name).eval()
            self._adapters.add(name)
        return _Adapter(self, name)

    def _release_adapter(self, name: str) -> None:
        # Called when the multiplexing cache evicts the adapter; the next generation deletes it.
        self._unload.add(name)

    def _drop_unloaded(self) -> None:
        for name in list(self._unload):
            self._unload.discard(name)
            if name in self._adapters and hasattr(self.model, "delete_adapter"):
                self.model.delete_adapter(name)
                self._adapters.discard(name)

    # -- generation
    def _run(self, kwargs: dict[str, Any], seed: int | None, adapter: str | None) -> None:
        import torch

        with torch.inference_mode(), self._adapter_context(adapter):
            if seed is not None:
                torch.manual_seed(seed)
            self.model.generate(**kwargs)

    def _adapter_context(self, adapter: str | None) -> Any:
        import contextlib

        if not self._adapters and adapter is None:
            return contextlib.nullcontext()
        engine = self

        @contextlib.contextmanager
        def switched() -> Any:
            with engine._adapter_lock:
                engine._drop_unloaded()
                if adapter is None:
                    with engine.model.disable_adapter():
                        yield
                else:
                    engine.model.set_adapter(adapter)
                    yield

        return switched()

    def _generate_kwargs(self, input_ids: Any, attention_mask: Any, params: SamplingParams, max_new: int,
                         streamer: _QueueStreamer, stop_event: threading.Event, processors: list[Any],
                         json_mode: JsonMode | None) -> dict[str, Any]:
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        prompt_tokens = int(input_ids.shape[1])

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                done = stop_event.is_set()
                if json_mode is not None and not done:  # the JSON object is complete: stop there
                    json_mode.advance([int(t) for t in input_ids[0, prompt_tokens:].tolist()])
                    done = json_mode.complete
                return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "max_new_tokens": max_new,
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([Cancelled()]),
            "pad_token_id": self._pad_id,
        }
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                          min_p=params.min_p or None)
        if params.stop_token_ids:  # end-of-sequence (unless ignored) and the request's stop tokens end it
            ends = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos_ids)
            kwargs["eos_token_id"] = sorted(ends)
        # ignore_eos and min_tokens mask end-of-sequence in the processors (transformers' own
        # min_new_tokens processor would run before the log-probability recorder).
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        return kwargs

    def _max_new_tokens(self, prompt_tokens: int, params: SamplingParams) -> int:
        """Tokens the completion may have: ``max_tokens``, else the default within the context;
        :class:`ContextLengthError` when the prompt and the completion exceed the context."""
        room = self.max_context - prompt_tokens if self.max_context else None
        if params.max_tokens is not None:
            max_new = params.max_tokens
        else:
            max_new = self.default_max_tokens if room is None else max(1, min(self.default_max_tokens, room))
        if room is not None and max_new > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{prompt_tokens + max_new} tokens ({prompt_tokens} in the prompt, {max_new} for the completion). "
                "Please reduce the prompt or max_tokens."
            )
        return max_new

    async def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                       *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        if self.model is None or self._pool is None:
            raise RuntimeError("the engine is not loaded; call load() first")
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not from_chat)
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device) if "attention_mask" in enc else None
        prompt_tokens = int(input_ids.shape[1])
        max_new = self._max_new_tokens(prompt_tokens, params)
        self._check_token_ids(params)
        if self._batcher is not None and not isinstance(adapter, _Adapter) and self._batcher.handles(params):
            prompt_ids = [int(t) for t in enc["input_ids"][0].tolist()]
            async with contextlib.aclosing(self._batcher.generate(prompt_ids, params, max_new)) as stream:
                async for out in stream:  # closing this generator closes that one (and drops the sequence)
                    yield out
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stop_event = threading.Event()
        processors, recorder, json_mode = logits_processors(self, params, prompt_tokens)
        streamer = _QueueStreamer(loop, queue, self._generated, recorder)
        kwargs = self._generate_kwargs(input_ids, attention_mask, params, max_new, streamer, stop_event, processors,
                                       json_mode)
        adapter_name = adapter.name if isinstance(adapter, _Adapter) else None

        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        slots = self._slots
        await slots.acquire()
        # The slot is released when the thread ends, not when this generator does: a cancelled
        # request's thread finishes its current step before the next request may start.
        try:
            job = loop.run_in_executor(self._pool, self._run, kwargs, params.seed, adapter_name)
        except BaseException:
            slots.release()
            raise
        job.add_done_callback(lambda _: slots.release())
        # A thread that dies before its streamer ends (e.g. torch rejects the seed) still wakes the reader.
        job.add_done_callback(lambda _: queue.put_nowait(_END))
        self._requests += 1
        self._running += 1
        self._active.add(stop_event)
        ids: list[int] = []
        logprobs: list[Any] = []
        emitted = ""
        finished = False
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else self._eos_ids)
        try:
            while True:
                item = await next_item(queue, job)
                if item is _END:
                    break
                ids.extend(item[0])
                logprobs.extend(item[1])
                shown = ids[:-1] if ids[-1] in ends else ids  # a stop token's text is not part of the answer
                text = self.tokenizer.decode(shown, skip_special_tokens=params.skip_special_tokens)
                if text.endswith("\ufffd"):
                    continue  # an incomplete multi-byte character: wait for the next token
                delta = text[len(emitted):] if text.startswith(emitted) else ""
                emitted = text
                if delta:
                    yield EngineOutput(delta, prompt_tokens, len(ids), logprobs=tuple(logprobs))
                    logprobs = []
            await job  # re-raise an error of the generation thread
            if (ids and ids[-1] in ends) or (json_mode is not None and json_mode.complete):
                reason = "stop"
            else:
                reason = "length" if len(ids) >= max_new else "stop"
            finished = True
            yield EngineOutput("", prompt_tokens, len(ids), reason, logprobs=tuple(logprobs))
        finally:
            stop_event.set()
            self._active.discard(stop_event)
            self._running -= 1
            failed = job.done() and not job.cancelled() and job.exception() is not None
            if not finished and not failed:  # a failed thread's error went to the caller (await job)
                self._cancelled += 1
                job.add_done_callback(_log_thread_error)

    def _check_token_ids(self, params: SamplingParams) -> None:
        """A 400 naming the field that names a token id outside the vocabulary."""
        vocab = getattr(self.model.config, "vocab_size", None)
        if vocab is None:
            return
        for param, ids in (("logit_bias", [i for i, _ in params.logit_bias]),
                           ("stop_token_ids", params.stop_token_ids), ("allowed_token_ids", params.allowed_token_ids)):
            outside = [i for i in ids if i >= vocab]
            if outside:
                raise InvalidParameterError(param, f"{param} names token ids outside the vocabulary of {vocab} "
                                                   f"tokens: {outside[:5]}.")

    @property
    def max_model_len(self) -> int | None:
        return int(self.max_context) if self.max_context else None

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """As ``generate`` tokenizes: special tokens for a raw prompt, none for a rendered chat."""
        return hf_tokenize(self.tokenizer, text, add_special_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        return hf_detokenize(self.tokenizer, ids)

    def stats(self) -> dict[str, Any]:
        out = {"engine": self.name, "device": self.device, "requests": self._requests, "running": self._running,
               "generated_tokens": self._generated.value, "cancelled": self._cancelled,
               "adapters_loaded": sorted(self._adapters), "batching": False}
        if self._batcher is not None:
            out.update(self._batcher.stats())
        if self.device.startswith("cuda"):
            import torch

            out["cuda_device_name"] = torch.cuda.get_device_name(self.model.device)
            out["cuda_memory_allocated"] = int(torch.cuda.memory_allocated(self.model.device))
            out["switch_interval_s"] = sys.getswitchinterval()
        return out

    def shutdown(self) -> None:
        for event in list(self._active):  # generation threads stop within a token
            event.set()
        if self._batcher is not None:
            self._batcher.shutdown()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class _Adapter:
    """A loaded LoRA adapter; dropping the last reference (multiplexing eviction) unloads it."""

    def __init__(self, engine: TransformersEngine, name: str) -> None:
        self._engine = engine
        self.name = name

    def __del__(self) -> None:
        self._engine._release_adapter(self.name)


async def next_item(queue: asyncio.Queue[Any], job: asyncio.Future[Any], poll_s: float = _POLL_S) -> Any:
    """The next item the generation thread put on ``queue``, or ``_END`` once the thread has ended.

    Every wait is bounded by ``poll_s``; between waits the reader checks that ``job`` (the
    thread) still runs, so a thread that ends without a last item cannot leave it waiting
    forever. The caller then awaits ``job``, which re-raises the thread's exception.
    """
    if poll_s <= 0:
        raise ValueError(f"poll_s must be positive, got {poll_s}")
    while True:
        try:
            return await asyncio.wait_for(queue.get(), poll_s)
        except TimeoutError:
            if job.done() and queue.empty():
                return _END


def _log_thread_error(job: asyncio.Future[Any]) -> None:
    if not job.cancelled() and job.exception() is not None:
        logger.warning("generation thread of a cancelled request failed: %r", job.exception())
