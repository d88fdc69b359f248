"""The transformers engine with a fault injected into its generation thread.

A module of its own, so that replica processes import it by path ("llm_faulty_engine:FaultyEngine").
The request's ``seed`` says where the fault hits: the generation thread raises
:class:`InjectedFault` after that many tokens (0: before the first one); a request without a
seed runs without a fault. Only the thread's streamer is wrapped; everything else is the real
engine on its generate-per-thread path.
"""

from __future__ import annotations

import inspect
from typing import Any

from shoal.llm.engines import TransformersEngine


class InjectedFault(RuntimeError):
    pass


class FaultyEngine(TransformersEngine):
    name = "faulty-transformers"

    def __init__(self, model_source: str, **kwargs: Any) -> None:
        if "batching" in inspect.signature(TransformersEngine.__init__).parameters:
            kwargs.setdefault("batching", False)  # the generation thread's path, where the fault is injected
        super().__init__(model_source, **kwargs)

    def _run(self, kwargs: dict[str, Any], seed: int | None, adapter: str | None) -> None:
        if seed is None:
            super()._run(kwargs, None, adapter)
            return
        streamer = kwargs["streamer"]
        put = streamer.put
        fail_after = seed
        calls = 0

        def failing_put(value: Any) -> None:
            nonlocal calls
            put(value)
            calls += 1  # the first call hands over the prompt, then one call per token
            if calls > fail_after:
                raise InjectedFault(f"injected fault after {fail_after} tokens")

        streamer.put = failing_put
        super()._run(kwargs, None, adapter)
