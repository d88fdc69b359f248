"""Real-GPU check of the LLM gateway: the tiny model, the transformers engine on CUDA, over HTTP.

Run on a machine with an NVIDIA GPU, PyTorch, transformers, tokenizers and httpx (and shoal
with its core dependencies; neither the OpenAI client nor sentence-transformers is needed)::

    python scripts/llm_gpu_check.py [OUT.json]

It builds the example's tiny chat model (examples/llm/make_tiny_model.py) in a temporary
directory, serves it with ``build_openai_app`` — one ``LLMServer`` replica with
``ray_actor_options: {num_gpus: 1}`` and ``engine_kwargs: {device: cuda}`` behind the
``OpenAiIngress`` — and sends with plain httpx:

* a chat completion (non-streaming);
* streamed chat completions of ``TOKENS`` tokens each (``ignore_eos``), measuring the time to
  the first content chunk and the decode rate;
* ``CONCURRENT`` streamed chat completions at once (``CONCURRENT_TOKENS`` tokens each, from
  threads), giving the total tokens/s over HTTP with the engine's continuous batching and the
  peak number of sequences it ran in one batch;
* ``GET /v1/usage``, whose engine counters say which device the replica generated on.

It prints (and writes) one JSON report: the device name, TTFT, tokens/s and ``ok`` — true when
both requests succeeded, every stream had ``TOKENS`` tokens and the engine ran on CUDA.
``LLM_GPU_CHECK_DRY=1`` rehearses it on the CPU (no GPU asked for; ``ok`` then only means the
requests worked).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DRY = os.environ.get("LLM_GPU_CHECK_DRY") == "1"
TOKENS = 512
RUNS = 3
CONCURRENT = 16
CONCURRENT_TOKENS = 256
MESSAGES = [{"role": "user", "content": "what is a replica?"}]


def stream_once(url: str, max_tokens: int) -> tuple[float, float, int, str]:
    """(seconds to the first content chunk, seconds from first to last, completion tokens, text)."""
    import httpx

    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    parts: list[str] = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                parts.append(chunk["choices"][0]["delta"]["content"])
                first = first or now
                last = now
    return first - t0, last - first, tokens, "".join(parts)


def check(report: dict[str, Any]) -> None:
    import httpx
    import torch

    from examples.llm.make_tiny_model import build_tiny_model
    from shoal import serve
    from shoal.llm import build_openai_app

    report["torch"] = torch.__version__
    report["cuda_available"] = torch.cuda.is_available()
    report["device_name"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if not DRY and not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (set LLM_GPU_CHECK_DRY=1 to rehearse on the CPU)")

    t0 = time.perf_counter()
    model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-chat-")) / "tiny-chat")
    report["build_model_s"] = round(time.perf_counter() - t0, 2)

    llm: dict[str, Any] = {
        "model_loading_config": {"model_id": "tiny-chat", "model_source": str(model_dir)},
        "llm_engine": "transformers",
        "engine_kwargs": {"device": "cpu" if DRY else "cuda"},
    }
    if not DRY:
        llm["deployment_config"] = {"ray_actor_options": {"num_gpus": 1}}
    serve.start(http_options={"port": 0}, _run_dir=tempfile.mkdtemp(prefix="shoal-gpu", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        serve.run(build_openai_app({"llm_configs": [llm]}))
        report["deploy_s"] = round(time.perf_counter() - t0, 2)
        url = serve.http_address()

        chat = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny-chat", "messages": MESSAGES, "max_tokens": 32, "temperature": 0})
        report["chat_status"] = chat.status_code
        body = chat.json()
        report["chat_text"] = body["choices"][0]["message"]["content"] if chat.status_code == 200 else body
        report["chat_usage"] = body.get("usage")

        stream_once(url, 16)  # warm-up (CUDA kernels, caches)
        runs = [stream_once(url, TOKENS) for _ in range(RUNS)]
        report["stream_tokens"] = [r[2] for r in runs]
        report["ttft_ms"] = round(1000 * statistics.median(r[0] for r in runs), 2)
        report["decode_tokens_per_s"] = round(statistics.median((r[2] - 1) / r[1] for r in runs), 1)
        report["request_tokens_per_s"] = round(statistics.median(r[2] / (r[0] + r[1]) for r in runs), 1)
        report["stream_text_head"] = runs[0][3][:120]

        from concurrent.futures import ThreadPoolExecutor

        t0 = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            together = list(pool.map(lambda _: stream_once(url, CONCURRENT_TOKENS), range(CONCURRENT)))
        wall = time.perf_counter() - t0
        report["concurrent_streams"] = CONCURRENT
        report["concurrent_tokens"] = [r[2] for r in together]
        report["concurrent_total_tokens_per_s"] = round(sum(r[2] for r in together) / wall, 1)
        report["concurrent_ttft_p50_ms"] = round(1000 * statistics.median(r[0] for r in together), 2)
        report["concurrent_vs_single_stream"] = round(
            report["concurrent_total_tokens_per_s"] / report["request_tokens_per_s"], 2)

        usage = httpx.get(f"{url}/v1/usage", timeout=30).json()
        engine = usage["engines"]["tiny-chat"]
        report["engine"] = engine
        on_gpu = str(engine.get("device", "")).startswith("cuda")
        report["ok"] = (chat.status_code == 200 and bool(report["chat_text"])
                        and all(r[2] == TOKENS for r in runs) and (on_gpu or DRY)
                        and all(r[2] == CONCURRENT_TOKENS for r in together))
    finally:
        serve.shutdown()


def main() -> int:
    report: dict[str, Any] = {"ok": False, "dry_run": DRY, "tokens_per_stream": TOKENS}
    try:
        check(report)
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["traceback"] = traceback.format_exc()
    text = json.dumps(report, indent=2, default=str)
    print(text)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
