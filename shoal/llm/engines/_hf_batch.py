"""Continuous batching for the transformers engine: one thread runs every sequence's steps together.

Iteration-level scheduling. A single step thread loops; each iteration it

1. drops the sequences whose stream was closed (client disconnect, stop string) or that finished;
2. admits waiting requests, in arrival order, while fewer than ``max_num_seqs`` run and the
   iteration's tokens (one per running sequence, plus the admitted prompts padded to their
   longest) stay within ``max_num_batched_tokens`` — the first waiting request is admitted
   whenever a slot is free, however long its prompt, so a long prompt is never starved;
3. prefills the admitted prompts in one forward pass (left-padded to a common length, with an
   attention mask and each row's own position ids), samples their first token and merges their
   key/value cache into the running batch;
4. runs one decode step for every running sequence: one token per row, the batch's cache
   left-padded to a common length, a 2-D attention mask hiding each row's padding, and position
   ids counting only the row's real tokens, so each row computes what it would compute alone.

The cache is a transformers ``DynamicCache`` whose per-layer tensors (``[batch, heads, length,
head_dim]``) the scheduler slices when rows leave and pads/concatenates when rows join; the
leading columns that only padding uses are trimmed when rows leave. Models whose cache is not
made of plain dynamic layers (sliding-window or linear-attention layers, quantised caches), and
transformers older than 4.56 (no per-layer cache objects), are not supported:
:func:`batching_supported` says so and the engine keeps its one-generation-per-thread path.

Sampling is per row: greedy (temperature 0), or temperature, ``top_p`` and ``top_k`` (when the
request carries one), drawn from the request's own ``torch.Generator`` when it has a seed, so a
seeded request gives the same tokens whatever else is in the batch. ``ignore_eos`` masks the
end-of-sequence tokens, as ``min_new_tokens`` does in ``generate``. Requests with any other
sampling option (``HANDLED_FIELDS``) are left to the engine's other path.

New tokens go to the requests' asyncio queues with ``call_soon_threadsafe`` (one wake-up per
step); each request detokenises incrementally. Stop strings are matched above the engine
(``LLMServer``), which closes the stream: closing marks the sequence cancelled, the next
iteration drops it, and ``aclose()`` returns once it has. An exception in a prefill fails the
requests of that prefill; one anywhere else in an iteration fails every request in the batch
with :class:`BatchStepError`, and the thread goes on. Readers wait in bounded polls that check
the thread still runs, so no request waits on a dead thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import threading
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shoal.llm.engines._base import EngineOutput, SamplingParams

__all__ = ["BatchScheduler", "BatchStepError", "batching_supported", "check_batching_kwargs"]

logger = logging.getLogger("shoal.llm")

#: How long a reader waits for its next token before it checks that the step thread still runs.
POLL_S = 1.0
#: How long the idle step thread sleeps before it looks again (a new request wakes it at once).
IDLE_WAIT_S = 1.0
#: How long ``shutdown`` waits for the step thread to end.
JOIN_S = 10.0
#: How long a closed request waits for the step thread to drop its sequence.
RELEASE_WAIT_S = 30.0
#: Tokens a sequence may run ahead of its reader: when every running sequence is that far ahead,
#: the step thread pauses (``LEAD_WAIT_S`` at a time), so a stalled or vanished client wastes little.
MAX_LEAD = 32
LEAD_WAIT_S = 0.005

#: Sent to a sequence's queue once the step thread has dropped it: it computes nothing more.
_RELEASED = object()
#: The :class:`SamplingParams` fields the scheduler applies (``stop`` strings are matched above the
#: engine); a request with any other field away from its default is not for the scheduler.
HANDLED_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "ignore_eos",
                            "stop_token_ids"})


class _Engine(Protocol):
    """What the scheduler uses of :class:`~shoal.llm.engines._hf.TransformersEngine` (its model and counters)."""

    model: Any
    tokenizer: Any
    device: str
    _eos_ids: set[int]
    _pad_id: int | None
    _generated: Any  # a thread-safe counter with add(n)
    _requests: int
    _running: int
    _cancelled: int

    def _adapter_context(self, adapter: str | None) -> Any: ...


class BatchStepError(RuntimeError):
    """The batching step thread failed while this request was in its batch."""


@dataclass(eq=False)
class _Seq:
    """One request in the scheduler: its prompt, its sampling, where its tokens go."""

    prompt: list[int]
    max_new: int
    params: SamplingParams
    stop_ids: frozenset[int]
    suppress: tuple[int, ...]
    top_k: int
    generator: Any  # torch.Generator | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    generated: int = 0
    length: int = 0  # tokens in the cache (prompt + generated - the pending one)
    pending: int = -1  # the last sampled token, fed to the model at the next step
    done: bool = False
    admitted: bool = False  # taken by the step thread: closing waits for _RELEASED
    read: int = 0  # tokens the reader has taken (generated - read: how far ahead the step thread is)


def _torch() -> Any:
    import torch

    return torch


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _get_kv(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _set_kv(cache: Any, kv: Sequence[tuple[Any, Any]]) -> None:
    for layer, (k, v) in zip(cache.layers, kv, strict=True):
        layer.keys, layer.values = k, v


def batching_supported(model: Any) -> str | None:
    """None when the scheduler can run ``model``; otherwise why not (for the log)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:
        return "it needs transformers >= 4.56 (a cache made of layers)"
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params or "attention_mask" not in params:
        return f"{type(model).__name__}.forward takes no position_ids or attention_mask"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported"
    try:
        layers = list(_new_cache(model).layers)
    except Exception as exc:  # any failure means "not supported"
        return f"its cache cannot be built: {exc!r}"
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        kinds = sorted({type(layer).__name__ for layer in layers})
        return f"its cache ({', '.join(kinds)}) is not made of plain dynamic layers"
    return None


def check_batching_kwargs(max_num_seqs: int, max_num_batched_tokens: int) -> None:
    """A ValueError naming the engine kwarg that is out of range."""
    if isinstance(max_num_seqs, bool) or not isinstance(max_num_seqs, int) or max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be an integer of at least 1, got {max_num_seqs!r}")
    if (isinstance(max_num_batched_tokens, bool) or not isinstance(max_num_batched_tokens, int)
            or max_num_batched_tokens < max_num_seqs):
        raise ValueError(f"max_num_batched_tokens must be an integer of at least max_num_seqs ({max_num_seqs}), "
                         f"got {max_num_batched_tokens!r}: every running sequence takes one token per step")


class BatchScheduler:
    """The step thread and its queue of requests; built by :class:`TransformersEngine` when batching is on."""

    def __init__(self, engine: _Engine, *, max_num_seqs: int = 16, max_num_batched_tokens: int = 2048,
                 poll_s: float = POLL_S) -> None:
        check_batching_kwargs(max_num_seqs, max_num_batched_tokens)
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        self.engine = engine
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.poll_s = poll_s
        params = inspect.signature(engine.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._logits_to_keep = "logits_to_keep" in params
        self._cond = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._rows: list[_Seq] = []  # the running batch, in the cache's row order
        self._cache: Any = None
        self._mask: Any = None  # [rows, cache length + 1 after a step], 1 where a row has a real token
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run
        self.lead_waits = 0  # pauses because every reader was MAX_LEAD tokens behind
        self.prefills = 0
        self.batched_rows = 0  # sum over decode steps of the rows in the step
        self.peak_running = 0
        self.failures = 0

    # -- the request side (event loop)
    @staticmethod
    def handles(params: SamplingParams) -> bool:
        """Whether the scheduler applies every sampling option ``params`` uses (see ``HANDLED_FIELDS``)."""
        for f in dataclasses.fields(params):
            if f.name in HANDLED_FIELDS:
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                return False
            if getattr(params, f.name) != default:
                return False
        return True

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       max_new: int) -> AsyncGenerator[EngineOutput, None]:
        """Stream the completion of ``prompt_ids``, as :meth:`TransformersEngine.generate` does."""
        engine = self.engine
        prompt_tokens = len(prompt_ids)
        seq = self._new_seq(prompt_ids, params, max_new)
        engine._requests += 1
        engine._running += 1
        decoder = _Detokenizer(engine.tokenizer)
        finished = False
        try:
            reason: str | None = "length" if max_new <= 0 else None
            if reason is None:
                self._submit(seq)
            while reason is None:
                item = await self._next(seq)
                if item is _RELEASED:
                    continue
                if isinstance(item, BaseException):
                    raise BatchStepError(f"generation failed in the batching step thread: {item!r}") from item
                token, reason = item
                seq.read += 1
                if reason == "stop" and token in seq.stop_ids:
                    continue  # a stop token's text is not part of the answer (and reason ends the loop)
                delta = decoder.add(token)
                if delta:
                    yield EngineOutput(delta, prompt_tokens, seq.read)
            finished = True
            yield EngineOutput("", prompt_tokens, seq.read, reason)
        finally:
            engine._running -= 1
            if not finished:
                engine._cancelled += 1
            if self._cancel(seq):
                await self._released(seq)

    def _new_seq(self, prompt_ids: list[int], params: SamplingParams, max_new: int) -> _Seq:
        torch = _torch()
        generator = None
        if params.seed is not None and not params.greedy:
            # torch takes seeds in [-2**63, 2**64); it raises (overflow) outside, before any work is queued.
            generator = torch.Generator().manual_seed(params.seed)
        eos = frozenset(self.engine._eos_ids)
        extra_stop = frozenset(int(t) for t in (getattr(params, "stop_token_ids", None) or ()))
        top_k = int(getattr(params, "top_k", 0) or 0)
        return _Seq(prompt=list(prompt_ids), max_new=max_new, params=params,
                    stop_ids=extra_stop if params.ignore_eos else eos | extra_stop,
                    suppress=tuple(sorted(eos)) if params.ignore_eos else (), top_k=max(top_k, 0),
                    generator=generator, loop=asyncio.get_running_loop())

    def _submit(self, seq: _Seq) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            self._waiting.append(seq)
            if self._thread is None or not self._thread.is_alive():
                if self._thread is not None:  # it died: what it held is stale
                    self._fail(self._rows, RuntimeError("the batching step thread died"))
                    self._reset()
                self._thread = threading.Thread(target=self._run, name="shoal-llm-batch", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _cancel(self, seq: _Seq) -> bool:
        """Mark ``seq`` cancelled; True when the step thread holds it (then await :meth:`_released`)."""
        with self._cond:
            was_done = seq.done
            seq.cancelled = True
            if seq in self._waiting:
                self._waiting.remove(seq)
            return seq.admitted and not was_done

    async def _released(self, seq: _Seq) -> None:
        """Wait (bounded) until the step thread has dropped ``seq``: once a closed stream's
        ``aclose()`` returns, its sequence computes nothing more."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELEASE_WAIT_S
        while loop.time() < deadline:
            item = await self._next(seq)
            if item is _RELEASED or isinstance(item, BaseException):
                return
        logger.warning("a closed request's sequence was not released within %.0f s", RELEASE_WAIT_S)

    async def _next(self, seq: _Seq) -> Any:
        """The next item for ``seq``, in bounded waits; an error once the step thread is gone."""
        while True:
            try:
                return seq.queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            try:
                async with asyncio.timeout(self.poll_s):
                    return await seq.queue.get()
            except TimeoutError:
                thread = self._thread
                if (thread is None or not thread.is_alive()) and seq.queue.empty():
                    return RuntimeError("the batching step thread is not running")

    def stats(self) -> dict[str, Any]:
        with self._cond:
            # A finished row counts no more from the moment its last token is sent, not from its removal.
            waiting, running = len(self._waiting), sum(1 for s in list(self._rows) if not s.done)
        return {"batching": True, "max_num_seqs": self.max_num_seqs,
                "max_num_batched_tokens": self.max_num_batched_tokens, "batch_running": running,
                "batch_waiting": waiting, "batch_peak_running": self.peak_running, "batch_steps": self.steps,
                "batch_prefills": self.prefills, "batch_failures": self.failures, "batch_lead_waits": self.lead_waits,
                "batch_mean_rows": round(self.batched_rows / self.steps, 2) if self.steps else 0.0}

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_S)

    # -- the step thread
    def _run(self) -> None:
        torch = _torch()
        while True:
            with self._cond:
                if self._stopping:
                    break
                if not self._rows and not self._waiting:
                    self._cond.wait(IDLE_WAIT_S)
                    continue
            group: list[_Seq] = []
            try:
                with torch.inference_mode():
                    self._drop_left()
                    group = self._admit()
                    if group:
                        self._prefill(group)
                    group = []
                    if self._rows and all(s.generated - s.read >= MAX_LEAD for s in self._rows):
                        self.lead_waits += 1
                        with self._cond:  # every reader is behind: let them catch up
                            self._cond.wait(LEAD_WAIT_S)
                    elif self._rows:
                        self._decode()
            except Exception as exc:  # every request in the batch gets it
                logger.exception("the batching step thread failed; failing %d request(s)",
                                 len(self._rows) + len(group))
                self.failures += 1
                self._fail(self._rows + group, exc)
                self._reset()
        error = RuntimeError("the engine was shut down")
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        self._fail(self._rows + waiting, error)
        self._reset()

    def _admit(self) -> list[_Seq]:
        """Take the waiting requests that fit this iteration (see the module docstring)."""
        group: list[_Seq] = []
        budget = self.max_num_batched_tokens - len(self._rows)
        width = 0
        with self._cond:
            while self._waiting and len(self._rows) + len(group) < self.max_num_seqs:
                seq = self._waiting[0]
                new_width = max(width, len(seq.prompt))
                if group and new_width * (len(group) + 1) > budget:
                    break
                self._waiting.popleft()
                seq.admitted = True
                group.append(seq)
                width = new_width
        return group

    def _prefill(self, group: list[_Seq]) -> None:
        """One forward pass over the group's prompts; their first tokens; their rows join the batch."""
        torch = _torch()
        device = self.engine.device
        width = max(len(s.prompt) for s in group)
        pad = self.engine._pad_id if self.engine._pad_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(s.prompt)) + s.prompt for s in group], device=device)
        mask = torch.tensor([[0] * (width - len(s.prompt)) + [1] * len(s.prompt) for s in group], device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(self.engine.model)
        try:
            logits = self._forward(ids, mask, positions, cache, prefill=True)
            tokens = self._sample(logits, group)
        except Exception as exc:  # only this group's requests fail
            logger.exception("prefill of %d request(s) failed", len(group))
            self.failures += 1
            self._fail(group, exc)
            return
        self.prefills += 1
        for seq in group:
            seq.length = len(seq.prompt)
        self._emit(group, tokens)
        keep = [i for i, s in enumerate(group) if not s.done]
        for s in group:
            if s.done:
                self._send(s, _RELEASED)
        if not keep:
            return
        if len(keep) < len(group):
            cache, mask = _select_rows(cache, mask, keep)
        self._merge([group[i] for i in keep], cache, mask)

    def _merge(self, seqs: list[_Seq], cache: Any, mask: Any) -> None:
        if self._cache is None:
            self._rows, self._cache, self._mask = list(seqs), cache, mask
        else:
            torch = _torch()
            length = max(self._mask.shape[1], mask.shape[1])
            kv = [(torch.cat([_left_pad(k0, length, -2), _left_pad(k1, length, -2)]),
                   torch.cat([_left_pad(v0, length, -2), _left_pad(v1, length, -2)]))
                  for (k0, v0), (k1, v1) in zip(_get_kv(self._cache), _get_kv(cache), strict=True)]
            _set_kv(self._cache, kv)
            self._mask = torch.cat([_left_pad(self._mask, length, -1), _left_pad(mask, length, -1)])
            self._rows.extend(seqs)
        self.peak_running = max(self.peak_running, len(self._rows))

    def _decode(self) -> None:
        """One token for every running sequence."""
        torch = _torch()
        device = self.engine.device
        rows = self._rows
        ids = torch.tensor([[s.pending] for s in rows], device=device)
        positions = torch.tensor([[s.length] for s in rows], device=device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits = self._forward(ids, self._mask, positions, self._cache, prefill=False)
        tokens = self._sample(logits, rows)
        self.steps += 1
        self.batched_rows += len(rows)
        for seq in rows:
            seq.length += 1
        self._emit(rows, tokens)
        self._drop_left()

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any, *, prefill: bool) -> Any:
        """The model on one batch; the last position's logits as float32, ``[rows, vocab]``."""
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                                  self._cache_arg: cache, "use_cache": True}
        if prefill and self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with self.engine._adapter_context(None):
            out = self.engine.model(**kwargs)
        return out.logits[:, -1, :].float()

    def _sample(self, logits: Any, seqs: Sequence[_Seq]) -> list[int]:
        """One token per row, each with its request's sampling parameters."""
        torch = _torch()
        suppress = [(i, t) for i, s in enumerate(seqs) for t in s.suppress]
        if suppress:
            rows_idx, cols = zip(*suppress, strict=True)
            logits[list(rows_idx), list(cols)] = float("-inf")
        greedy = [s.params.greedy for s in seqs]
        chosen = logits.argmax(dim=-1)
        if all(greedy):
            return [int(t) for t in chosen.tolist()]
        sampled = [i for i, g in enumerate(greedy) if not g]
        sub = logits[sampled] / torch.tensor([seqs[i].params.temperature for i in sampled],
                                             device=logits.device).unsqueeze(1)
        top_k = [seqs[i].top_k for i in sampled]
        if any(k > 0 for k in top_k):
            width = min(max(top_k), sub.shape[1])
            kth = sub.topk(width, dim=-1).values
            limit = [(k if 0 < k <= width else width) - 1 for k in top_k]
            threshold = kth.gather(1, torch.tensor(limit, device=sub.device).unsqueeze(1))
            keep_all = torch.tensor([k <= 0 for k in top_k], device=sub.device).unsqueeze(1)
            sub = sub.masked_fill((sub < threshold) & ~keep_all, float("-inf"))
        probs = torch.softmax(sub, dim=-1)
        top_p = [seqs[i].params.top_p if seqs[i].params.top_p < 1.0 else float("inf") for i in sampled]
        if any(p < 1.0 for p in top_p):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the more likely tokens
            drop = before >= torch.tensor(top_p, device=sub.device).unsqueeze(1)
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter(1, order, sorted_p)
        # One uniform draw per row, from the request's generator when it has a seed: a seeded row
        # does not depend on what else is in the batch. Inverse CDF picks the token.
        fresh = torch.rand(len(sampled)).tolist()
        uniform = [float(torch.rand((), generator=seqs[i].generator)) if seqs[i].generator is not None
                   else fresh[n] for n, i in enumerate(sampled)]
        cdf = probs.cumsum(dim=-1)
        target = torch.tensor(uniform, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1]
        picks = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
        picks = picks.clamp(max=cdf.shape[1] - 1)
        # Rounding can land on a zero-probability tail token: fall back to the most likely one.
        bad = probs.gather(1, picks.unsqueeze(1)).squeeze(1) <= 0
        picks = torch.where(bad, probs.argmax(dim=-1), picks)
        result = [int(t) for t in chosen.tolist()]
        for i, token in zip(sampled, picks.tolist(), strict=True):
            result[i] = int(token)
        return result

    def _emit(self, seqs: Sequence[_Seq], tokens: Sequence[int]) -> None:
        """Hand each sequence its new token (with the finish reason of its last), one wake-up per event loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Seq, Any]]] = {}
        for seq, token in zip(seqs, tokens, strict=True):
            seq.generated += 1
            seq.pending = token
            reason: str | None = None
            if token in seq.stop_ids:
                reason = "stop"
            elif seq.generated >= seq.max_new:
                reason = "length"
            if reason is not None:
                seq.done = True
            by_loop.setdefault(seq.loop, []).append((seq, (token, reason)))
        self.engine._generated.add(len(seqs))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(seq.queue, item) for seq, item in items])
            except RuntimeError:  # that loop is closed: nobody reads these sequences any more
                for seq, _ in items:
                    seq.cancelled = True

    def _send(self, seq: _Seq, item: Any) -> bool:
        try:
            seq.loop.call_soon_threadsafe(seq.queue.put_nowait, item)
        except RuntimeError:  # the request's loop is closed: nobody reads this sequence any more
            return False
        return True

    def _drop_left(self) -> None:
        """Remove the finished and cancelled rows from the batch (and their cache)."""
        keep = [i for i, s in enumerate(self._rows) if not (s.done or s.cancelled)]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._reset()
            return
        for s in self._rows:
            if s.done or s.cancelled:
                self._send(s, _RELEASED)
        self._cache, self._mask = _select_rows(self._cache, self._mask, keep)
        self._rows = [self._rows[i] for i in keep]

    def _fail(self, seqs: Sequence[_Seq], exc: BaseException) -> None:
        for seq in seqs:
            if not seq.done:
                seq.done = True
                self._send(seq, exc)
                self._send(seq, _RELEASED)

    def _reset(self) -> None:
        """Empty the batch; every row's reader is told its sequence is dropped."""
        for seq in self._rows:
            self._send(seq, _RELEASED)
        self._rows, self._cache, self._mask = [], None, None


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _left_pad(t: Any, length: int, axis: int) -> Any:
    """Zeros on the left of ``axis``: -2 for a ``[rows, heads, len, dim]`` cache, -1 for a ``[rows, len]`` mask."""
    missing = length - t.shape[axis]
    if missing <= 0:
        return t
    import torch.nn.functional as F

    return F.pad(t, (0, 0, missing, 0) if axis == -2 else (missing, 0))


def _select_rows(cache: Any, mask: Any, keep: list[int]) -> tuple[Any, Any]:
    """Keep the rows ``keep`` of the cache and mask; trim the columns that only padding uses now."""
    torch = _torch()
    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    used = mask.sum(dim=0).nonzero()
    start = int(used[0]) if used.numel() else 0
    mask = mask[:, start:]
    _set_kv(cache, [(k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
                    for k, v in _get_kv(cache)])
    return cache, mask


class _Detokenizer:
    """Token ids in, new text out, decoding only a short window of the latest tokens.

    The window starts at the tokens handed out by the previous call: the new text is what decoding
    the window adds to decoding the window without the newest tokens, so a tokenizer that drops
    or adds a space at the start of a decode does it to both (special tokens, which decode to
    nothing, never start a window). An incomplete multi-byte character
    (the decode ends in U+FFFD) waits for its next token. Should the shorter decode not be a
    prefix of the longer one, the whole completion is decoded, as the engine's other path does.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._start = 0  # the window's first token
        self._done = 0  # tokens whose text has been handed out
        self._emitted: list[str] = []
        self._special = frozenset(getattr(tokenizer, "all_special_ids", None) or ())

    @property
    def count(self) -> int:
        return len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True)) if ids else ""

    def add(self, token: int) -> str:
        self._ids.append(token)
        text = self._decode(self._ids[self._start:])
        if text.endswith("\ufffd"):
            return ""
        before = self._decode(self._ids[self._start:self._done])
        if text.startswith(before):
            delta = text[len(before):]
        else:
            emitted = "".join(self._emitted)
            full = self._decode(self._ids)
            delta = full[len(emitted):] if full.startswith(emitted) else ""
        # The next window starts at the first token not yet handed out, unless that is a special
        # token (it decodes to nothing, and a decode starting there would lose a leading space).
        if self._ids[self._done] not in self._special:
            self._start = self._done
        self._done = len(self._ids)
        if delta:
            self._emitted.append(delta)
        return delta
