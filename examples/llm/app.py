"""The LLM example's engine: shoal's transformers engine, building the tiny model on first load.

``serve.yaml`` names it as ``llm_engine: examples.llm.app:TinyChatEngine`` — a custom engine
class is any import path — so ``shoal run examples/llm/serve.yaml`` works on a fresh checkout:
the replica that loads tiny-chat builds it first (about 10 s, offline) if its directory is
empty. With the model built (``python examples/llm/make_tiny_model.py``), ``llm_engine:
transformers`` serves it the same way.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from shoal.llm.engines import TransformersEngine

if __package__:
    from .make_tiny_model import build_tiny_model
else:  # imported from this directory (shoal run with examples/llm as the working directory)
    from make_tiny_model import build_tiny_model  # type: ignore[no-redef]


def ensure_tiny_model(path: str | os.PathLike[str]) -> Path:
    """Build the tiny model into ``path`` unless it is there (one builder at a time across processes)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two replicas starting at once build it once
        if not (out / "config.json").is_file():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            build_tiny_model(out)
    return out


class TinyChatEngine(TransformersEngine):
    """The transformers engine, after building the tiny model if ``model_source`` holds none."""

    def load(self) -> None:
        ensure_tiny_model(self.model_source)
        super().load()

