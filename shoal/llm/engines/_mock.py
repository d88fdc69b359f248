"""A deterministic stand-in engine: it echoes the prompt's words, one word per token.

It needs no model and no ML library, so gateways can be tested, demonstrated and load-tested
anywhere (``llm_engine: mock``). Greedy decoding (temperature 0) echoes the last message's
words in order, then stops; sampling shuffles them with the request's ``seed``. ``ignore_eos``
keeps cycling until ``max_tokens``. An adapter's name is emitted first as ``[name]``.

Engine kwargs: ``token_delay_s`` (seconds per token, to imitate decoding), ``max_context``
(the context window, in words; default 4096), ``default_max_tokens`` (default 256).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.llm.engines._base import (
    AdapterNotFoundError,
    ContextLengthError,
    EngineOutput,
    SamplingParams,
    fallback_chat_prompt,
)

__all__ = ["MockEngine"]


@dataclass(frozen=True)
class MockAdapter:
    name: str
    path: str


class MockEngine:
    """Echoes words; see the module docstring."""

    name = "mock"

    def __init__(self, model_source: str, *, token_delay_s: float = 0.0, max_context: int = 4096,
                 default_max_tokens: int = 256) -> None:
        self.model_source = model_source
        self.token_delay_s = float(token_delay_s)
        self.max_context = int(max_context)
        self.default_max_tokens = int(default_max_tokens)
        self.adapters_loaded: list[str] = []
        self._generated = 0
        self._requests = 0
        self._running = 0
        self._cancelled = 0
        self._vocab: dict[str, int] = {}

    def load(self) -> None:
        return None

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        return fallback_chat_prompt(messages)

    @property
    def supports_adapters(self) -> bool:
        return True

    async def load_adapter(self, name: str, path: str) -> Any:
        if not os.path.isdir(path):
            raise AdapterNotFoundError(f"adapter {name!r} not found at {path}")
        self.adapters_loaded.append(name)
        return MockAdapter(name, path)

    @staticmethod
    def _words(prompt: str) -> list[str]:
        # A rendered chat prompt echoes the last message, not the role labels and the cue.
        lines = [ln for ln in prompt.splitlines() if ln.strip() and ln.strip() != "Assistant:"]
        last = lines[-1] if lines else ""
        if ": " in last and last.split(": ", 1)[0] in ("User", "System", "Assistant", "Tool"):
            last = last.split(": ", 1)[1]
        return last.split() or ["..."]

    async def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                       *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        prompt_tokens = len(prompt.split())
        max_tokens = params.max_tokens if params.max_tokens is not None else self.default_max_tokens
        if prompt_tokens + max_tokens > self.max_context:
            raise ContextLengthError(
                f"This model's maximum context length is {self.max_context} tokens, but {prompt_tokens} prompt "
                f"tokens plus max_tokens={max_tokens} exceed it."
            )
        words = self._words(prompt)
        if not params.greedy:
            random.Random(params.seed).shuffle(words)
        if adapter is not None:
            words = [f"[{adapter.name}]", *words]
        self._requests += 1
        self._running += 1
        done = False
        n = 0
        try:
            while n < max_tokens:
                if n >= len(words) and not params.ignore_eos:
                    break
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                word = words[n % len(words)]
                n += 1
                self._generated += 1
                yield EngineOutput(word if n == 1 else f" {word}", prompt_tokens, n)
            done = True
            yield EngineOutput("", prompt_tokens, n, "length" if n >= max_tokens else "stop")
        finally:
            self._running -= 1
            if not done:
                self._cancelled += 1

    @property
    def max_model_len(self) -> int:
        return self.max_context

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """One token per word; ids are given out as words are first seen (per replica)."""
        return [self._vocab.setdefault(word, len(self._vocab)) for word in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        words = {i: w for w, i in self._vocab.items()}
        unknown = [i for i in ids if i not in words]
        if unknown:
            raise ValueError(f"unknown token id(s) {unknown[:5]} (this engine knows {len(words)} ids)")
        return " ".join(words[i] for i in ids)

    def stats(self) -> dict[str, Any]:
        return {"engine": self.name, "requests": self._requests, "running": self._running,
                "generated_tokens": self._generated, "cancelled": self._cancelled,
                "adapters_loaded": list(self.adapters_loaded)}

    def shutdown(self) -> None:
        return None
