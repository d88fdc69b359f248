"""OpenAI's response bodies and stream chunks, assembled from an LLM deployment's chunks.

A request with ``n`` choices gets :class:`GenerationChunk`\\ s of its choices interleaved (each
names its ``index``); :class:`Choices` keeps each choice's text, finish reason, log
probabilities and tool calls, and builds the non-streaming body (:meth:`Choices.body`) or the
stream's chunks (:meth:`Choices.stream_chunks`). ``usage`` counts the prompt once and the
tokens of every choice, as OpenAI does.
"""

from __future__ import annotations

import time
from typing import Any

from shoal.llm._logprobs import chat_logprobs, completion_logprobs
from shoal.llm.engines import GenerationChunk
from shoal.llm.engines._base import TokenLogprob

__all__ = ["Choices", "usage"]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Choices:
    """The choices of one chat or text completion; see the module docstring.

    ``logprobs``: whether the request asked for log probabilities (each choice then carries
    them, else ``"logprobs": null``).
    """

    def __init__(self, rid: str, model: str, *, chat: bool, n: int = 1, logprobs: bool = False,
                 include_usage: bool = False, created: int | None = None) -> None:
        self.rid = rid
        self.model = model
        self.chat = chat
        self.n = n
        self.logprobs = logprobs
        self.include_usage = include_usage
        self.created = created or int(time.time())
        self.prompt_tokens = 0
        self._tokens = [0] * n
        self._text: list[list[str]] = [[] for _ in range(n)]
        self._reasons: list[str | None] = [None] * n
        self._logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self._calls: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self._offsets = [0] * n

    # -- counting
    def _count(self, chunk: GenerationChunk) -> int:
        i = chunk.index
        if not 0 <= i < self.n:
            raise ValueError(f"a chunk of choice {i}, but the request has {self.n} choice(s)")
        self.prompt_tokens = chunk.prompt_tokens
        self._tokens[i] = max(self._tokens[i], chunk.completion_tokens)
        if chunk.finish_reason is not None:
            self._reasons[i] = chunk.finish_reason
        return i

    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens)

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self._reasons)

    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)

    # -- a whole response
    def add(self, chunk: GenerationChunk) -> None:
        """Record a chunk (for :meth:`body`)."""
        i = self._count(chunk)
        self._text[i].append(chunk.text)
        self._logprobs[i].extend(chunk.logprobs)
        self._calls[i].extend(_numbered(chunk.tool_calls, len(self._calls[i])))

    def body(self) -> dict[str, Any]:
        """The ``chat.completion`` / ``text_completion`` object."""
        choices: list[dict[str, Any]] = []
        for i in range(self.n):
            text, reason = "".join(self._text[i]), self._reasons[i] or "stop"
            lp = self._logprobs[i]
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
                if self._calls[i]:
                    message["content"] = text or None
                    message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in self._calls[i]]
                choices.append({"index": i, "message": message,
                                "logprobs": chat_logprobs(lp) if self.logprobs else None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": text,
                                "logprobs": completion_logprobs(lp)[0] if self.logprobs else None,
                                "finish_reason": reason})
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage(),
                "system_fingerprint": None}

    # -- a stream
    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                               "created": self.created, "model": self.model, "system_fingerprint": None,
                               "choices": [choice]}
        if self.include_usage:
            out["usage"] = None
        return out

    def _lp(self, i: int, tokens: tuple[TokenLogprob, ...]) -> dict[str, Any] | None:
        if not self.logprobs or not tokens:
            return None
        if self.chat:
            return chat_logprobs(tokens)
        body, self._offsets[i] = completion_logprobs(tokens, self._offsets[i])
        return body

    def first_chunks(self) -> list[dict[str, Any]]:
        """What a chat stream starts with: each choice's role."""
        if not self.chat:
            return []
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(self.n)]

    def stream_chunks(self, chunk: GenerationChunk) -> list[dict[str, Any]]:
        """The stream chunks for one of the deployment's chunks (none when it carries nothing)."""
        i = self._count(chunk)
        reason = chunk.finish_reason
        lp = self._lp(i, chunk.logprobs)
        if not self.chat:
            if not chunk.text and reason is None and lp is None:
                return []
            return [self._chunk({"index": i, "text": chunk.text, "logprobs": lp, "finish_reason": reason})]
        out: list[dict[str, Any]] = []
        if chunk.text or (lp is not None and reason is None):
            out.append(self._chunk({"index": i, "delta": {"content": chunk.text}, "logprobs": lp,
                                    "finish_reason": None}))
            lp = None
        if chunk.tool_calls:
            calls = _numbered(chunk.tool_calls, 0)
            out.append(self._chunk({"index": i, "delta": {"tool_calls": calls}, "logprobs": None,
                                    "finish_reason": None}))
        if reason is not None:
            out.append(self._chunk({"index": i, "delta": {}, "logprobs": lp, "finish_reason": reason}))
        return out

    def usage_chunk(self) -> dict[str, Any]:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "system_fingerprint": None, "choices": [],
                "usage": self.usage()}


def _numbered(calls: Any, start: int) -> list[dict[str, Any]]:
    """Tool calls with their position (``index``, as OpenAI's stream deltas number them)."""
    return [{"index": start + k, **dict(c)} for k, c in enumerate(calls)]
