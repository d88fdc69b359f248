"""An LLM engine whose generation raises (the fault suite's stand-in for a crashing engine thread).

A module of its own, so that replica processes can import it by path ("failing_engine:FailingEngine")."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from shoal.llm.engines import EngineOutput, MockEngine, SamplingParams


class EngineThreadDied(RuntimeError):
    pass


class FailingEngine(MockEngine):
    """The mock engine, except that generation raises after ``fail_after`` tokens."""

    name = "failing"

    def __init__(self, model_source: str, *, fail_after: int = 0, **kwargs: Any) -> None:
        super().__init__(model_source, **kwargs)
        self.fail_after = fail_after

    async def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                       *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        for n in range(self.fail_after):
            yield EngineOutput(f" w{n}", 1, n + 1)
        raise EngineThreadDied("the generation thread raised")
