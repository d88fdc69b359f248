"""The documentation's runnable code blocks run as written.

A Python block in ``docs/*.md`` is runnable when the line before its opening fence is
``<!-- runnable -->``. Each one runs in a fresh interpreter from the repository root (so it
shares nothing with other blocks or with this process) and must exit 0 within the timeout.
Blocks that start a server use port 0 and call ``serve.shutdown()``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
MARKER = "<!-- runnable -->"
_BLOCK = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```", re.S | re.M)


def runnable_blocks() -> list[tuple[str, str]]:
    """``(id, code)`` for every runnable block, ids like ``batching.md:2`` (1-based, per page)."""
    out = []
    for page in sorted(DOCS.rglob("*.md")):
        text = page.read_text()
        blocks = _BLOCK.findall(text)
        # A marker that is not followed by a Python fence is a mistake, not a skipped block.
        assert text.count(MARKER) == len(blocks), f"{page.name}: a {MARKER} marker is not before a ```python block"
        rel = page.relative_to(DOCS).as_posix()
        out += [(f"{rel}:{i}", code) for i, code in enumerate(blocks, 1)]
    return out


BLOCKS = runnable_blocks()


def test_the_docs_have_runnable_blocks() -> None:
    pages = {block_id.split(":")[0] for block_id, _ in BLOCKS}
    assert {"index.md", "concepts.md", "batching.md", "testing.md", "autoscaling.md"} <= pages


@pytest.mark.parametrize("code", [code for _, code in BLOCKS], ids=[block_id for block_id, _ in BLOCKS])
def test_runnable_block(code: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "SHOAL_RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
