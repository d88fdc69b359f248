"""Log probabilities in OpenAI's two response shapes, from the engines' :class:`TokenLogprob`\\ s.

Chat (``logprobs: true``, ``top_logprobs: k``): ``choices[].logprobs.content`` is a list with
one entry per generated token, ``{token, logprob, bytes, top_logprobs: [{token, logprob,
bytes}, ...k]}``. Completions (``logprobs: k``): ``choices[].logprobs`` is ``{tokens,
token_logprobs, top_logprobs, text_offset}``, parallel lists with one item per token, where
each ``top_logprobs`` item maps the k most likely tokens, and the sampled one, to their log
probabilities, and ``text_offset`` is where each token starts in the completion's text. In a
stream each chunk carries the log probabilities of its own tokens (offsets keep counting from
the completion's start).

The values are those of the model's raw distribution, before ``logit_bias``, penalties,
temperature and top-p/top-k (what vLLM returns by default): they say how likely the model
found each token, not how likely the sampler was to pick it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shoal.llm.engines._base import TokenLogprob

__all__ = ["chat_logprobs", "completion_logprobs"]


def _finite(x: float) -> float:
    # JSON has no -Infinity: a token the model gives no chance at all gets the lowest float instead.
    return x if math.isfinite(x) else -9999.0


def _entry(token: str, logprob: float, raw: bytes | None = None) -> dict[str, Any]:
    return {"token": token, "logprob": _finite(logprob),
            "bytes": list(raw if raw is not None else token.encode("utf-8", errors="replace"))}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or of one stream chunk) for ``tokens``."""
    content = []
    for t in tokens:
        entry = _entry(t.token, t.logprob, t.raw)
        entry["top_logprobs"] = [_entry(text, lp) for text, lp in t.top]
        content.append(entry)
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> tuple[dict[str, Any], int]:
    """``choices[].logprobs`` of a text completion for ``tokens``, the first starting at
    ``offset`` in the completion's text; and the offset after the last (for the next chunk)."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        out["tokens"].append(t.token)
        out["token_logprobs"].append(_finite(t.logprob))
        top = {text: _finite(lp) for text, lp in t.top}
        top.setdefault(t.token, _finite(t.logprob))  # the sampled token is always there (OpenAI: up to k+1)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(t.token)
    return out, offset
