"""The transformers engine's logits processors, log probabilities and token texts.

``generate`` runs the processors returned by :func:`logits_processors` in order, after none of
its own (the engine passes it no option that adds one) and before its temperature, top-k,
top-p and min-p warpers:

1. :class:`LogprobRecorder` (with ``logprobs``): the log-softmax of the model's raw logits,
   read by the streamer when the step's token is known — so log probabilities are those of
   the raw distribution, before everything below (vLLM's default);
2. the adjustments (:func:`_adjuster`): ``logit_bias`` added; presence and frequency penalties
   subtracted over the generated tokens (as vLLM); ``repetition_penalty`` over the prompt and
   the generated tokens (positive logits divided by it, negative ones multiplied, as vLLM and
   transformers); end-of-sequence and ``stop_token_ids`` masked while fewer than
   ``min_tokens`` were generated, and end-of-sequence always with ``ignore_eos``; every token
   but ``allowed_token_ids`` masked;
3. :class:`JsonLogits` (JSON mode, :mod:`._json_mode`): every token that would break the JSON.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Sequence
from typing import Any

from shoal.llm.engines._base import SamplingParams, TokenLogprob
from shoal.llm.engines._json_mode import JsonMode, JsonVocabulary

__all__ = ["LogprobRecorder", "TokenTexts", "json_vocabulary", "logits_processors"]

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's characters -> the bytes they stand for (GPT-2's scheme: printable Latin-1
    bytes are themselves, the others are shifted past 255 in order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class TokenTexts:
    """What each token id adds to a text (its text after another token, so that a SentencePiece
    ``▁`` is a space), and its bytes when it holds a piece of a multi-byte character."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self._texts: dict[int, str] = {}
        anchors = tokenizer.encode("a", add_special_tokens=False) or [0]
        self._anchor = int(anchors[-1])
        self._anchor_text = str(tokenizer.decode([self._anchor]))
        self._special = frozenset(getattr(tokenizer, "all_special_ids", None) or ())
        self._byte_map: dict[str, int] | None = None
        try:
            decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
            if decoder.get("type") == "ByteLevel":
                self._byte_map = _byte_level_alphabet()
        except Exception:  # a slow tokenizer, or no byte-level decoder: texts are enough
            self._byte_map = None

    def _decode_pairs(self, ids: Sequence[int]) -> list[str]:
        pairs = self.tokenizer.batch_decode([[self._anchor, i] for i in ids], skip_special_tokens=True)
        out = []
        for i, text in zip(ids, pairs, strict=True):
            if text.startswith(self._anchor_text):
                out.append(text[len(self._anchor_text):])
            else:
                out.append(str(self.tokenizer.decode([i], skip_special_tokens=True)))
        return out

    def text(self, token: int) -> str:
        with self._lock:
            hit = self._texts.get(token)
        if hit is None:
            hit = self._decode_pairs([token])[0]
            with self._lock:
                self._texts[token] = hit
        return hit

    def all(self, vocab_size: int) -> list[str]:
        """Every token's text (special tokens, and ids the tokenizer lacks: empty), in batches."""
        known = min(vocab_size, len(self.tokenizer))
        out: list[str] = []
        for start in range(0, known, 4096):
            out += self._decode_pairs(range(start, min(start + 4096, known)))
        return out + [""] * (vocab_size - known)

    def shown(self, token: int) -> str:
        """The text a log probability shows: a special token's own name (it adds no text)."""
        if token in self._special:
            return str(self.tokenizer.convert_ids_to_tokens(token))
        return self.text(token)

    def raw(self, token: int) -> bytes | None:
        """The token's bytes when they are not its text's UTF-8 (a piece of a character), else None."""
        piece = self.tokenizer.convert_ids_to_tokens(token)
        data: bytes | None = None
        match = _BYTE_TOKEN.fullmatch(piece or "")
        if match:
            data = bytes([int(match.group(1), 16)])
        elif self._byte_map is not None and piece and all(c in self._byte_map for c in piece):
            data = bytes(self._byte_map[c] for c in piece)
        if data is None:
            return None
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return data
        return None

    def logprob(self, token: int, row: Any, k: int) -> TokenLogprob:
        """The :class:`TokenLogprob` of ``token`` from a step's log-probability row."""
        top: tuple[tuple[str, float], ...] = ()
        if k > 0:
            values, indices = row.topk(min(k, row.shape[-1]))
            top = tuple((self.shown(int(i)), float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True))
        return TokenLogprob(self.shown(token), float(row[token]), top, self.raw(token))


def json_vocabulary(engine: Any) -> JsonVocabulary:
    """The engine's :class:`JsonVocabulary`, built on first use (once per engine)."""
    cached: JsonVocabulary | None = getattr(engine, "_json_vocabulary", None)
    if cached is None:
        vocab = int(getattr(engine.model.config, "vocab_size", None) or len(engine.tokenizer))
        cached = JsonVocabulary(engine.token_texts.all(vocab), set(engine._eos_ids), vocab)
        engine._json_vocabulary = cached
    return cached


class LogprobRecorder:
    """Keeps each step's raw log probabilities until the streamer takes them with the step's token."""

    def __init__(self, texts: TokenTexts, k: int) -> None:
        self.texts = texts
        self.k = k
        self._rows: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self._rows.append(torch.log_softmax(scores[0].float(), dim=-1))
        return scores

    def take(self, tokens: Sequence[int]) -> list[TokenLogprob]:
        rows, self._rows = self._rows[:len(tokens)], self._rows[len(tokens):]
        return [self.texts.logprob(t, row, self.k) for t, row in zip(tokens, rows, strict=False)]


class JsonLogits:
    """Masks the tokens that would break the JSON (see :mod:`._json_mode`)."""

    def __init__(self, mode: JsonMode, prompt_tokens: int) -> None:
        self.mode = mode
        self.prompt_tokens = prompt_tokens

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.mode.advance([int(t) for t in input_ids[0, self.prompt_tokens:].tolist()])
        allowed = torch.tensor(self.mode.allowed(), dtype=torch.long, device=scores.device)
        mask = torch.full_like(scores, float("-inf"))
        mask[:, allowed] = 0.0
        return scores + mask


def _adjuster(params: SamplingParams, prompt_tokens: int, eos_ids: set[int]) -> Any:
    """The adjustments of step 2 (see the module docstring); None when the request has none."""
    presence, frequency, repetition = params.presence_penalty, params.frequency_penalty, params.repetition_penalty
    ends = sorted(set(eos_ids) | set(params.stop_token_ids))
    if not (params.logit_bias or presence or frequency or repetition != 1.0 or params.min_tokens
            or params.ignore_eos or params.allowed_token_ids):
        return None
    import torch

    ids = [i for i, _ in params.logit_bias]
    biases = [b for _, b in params.logit_bias]

    def adjust(input_ids: Any, scores: Any) -> Any:
        if ids:
            index = torch.tensor(ids, device=scores.device)
            scores = scores.index_add(1, index, torch.tensor(biases, dtype=scores.dtype, device=scores.device)
                                      .expand(scores.shape[0], -1))
        generated = input_ids[:, prompt_tokens:]
        if (presence or frequency) and generated.shape[1]:
            ones = torch.ones_like(generated, dtype=scores.dtype)
            counts = torch.zeros_like(scores).scatter_add(1, generated, ones)
            scores = scores - frequency * counts - presence * (counts > 0).to(scores.dtype)
        if repetition != 1.0:
            seen = scores.gather(1, input_ids)
            seen = torch.where(seen > 0, seen / repetition, seen * repetition)
            scores = scores.scatter(1, input_ids, seen)
        banned = list(eos_ids) if params.ignore_eos else []
        if generated.shape[1] < params.min_tokens:
            banned = ends
        if banned:
            scores = scores.index_fill(1, torch.tensor(banned, device=scores.device), float("-inf"))
        if params.allowed_token_ids:
            keep = torch.full_like(scores, float("-inf"))
            keep[:, list(params.allowed_token_ids)] = 0.0
            scores = scores + keep
        return scores

    return _Processor(adjust)


class _Processor:
    """A function as a logits processor (``generate`` inspects ``__call__``'s parameters)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return self.fn(input_ids, scores)


def logits_processors(engine: Any, params: SamplingParams, prompt_tokens: int
                      ) -> tuple[list[Any], LogprobRecorder | None, JsonMode | None]:
    """The processors of a request (see the module docstring), its recorder and its JSON state."""
    processors: list[Any] = []
    recorder = None
    if params.logprobs is not None:
        recorder = LogprobRecorder(engine.token_texts, params.logprobs)
        processors.append(recorder)
    adjust = _adjuster(params, prompt_tokens, set(engine._eos_ids))
    if adjust is not None:
        processors.append(adjust)
    mode = None
    if params.structured is not None and params.structured.kind == "json_object":
        mode = JsonMode(json_vocabulary(engine))
        processors.append(JsonLogits(mode, prompt_tokens))
    return processors, recorder, mode
