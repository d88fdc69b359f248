"""Tokens per second and time to first token of the LLM example on the CPU.

    python benchmarks/llm_cpu.py [--requests 5] [--max-tokens 256] [--concurrency 4] [--json OUT]

It builds the example's tiny model (examples/llm/make_tiny_model.py, into a temporary
directory), then measures the same generations three ways:

* **engine**: the transformers engine called directly in this process (no serving at all);
* **HTTP, one at a time**: through `serve.run(build_openai_app(...))` — gateway replica,
  model replica, HTTP — as streamed chat completions read with httpx; TTFT is the time from
  sending the request to the first content chunk, decode tokens/s is the completion tokens
  after the first divided by the time between the first and the last chunk;
* **HTTP, concurrent**: ``--concurrency`` streams at once, total completion tokens per second.

Every request asks for exactly ``--max-tokens`` tokens (``ignore_eos``) at temperature 0. The
CPU is shared with whatever else runs on the machine: the load average is printed with the
numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = [{"role": "user", "content": "what is a replica?"}]


def engine_run(model_dir: str, n: int, max_tokens: int) -> dict[str, float]:
    from shoal.llm.engines import SamplingParams
    from shoal.llm.engines._hf import TransformersEngine

    engine = TransformersEngine(model_dir, device="cpu", torch_threads=1)
    engine.load()
    prompt = engine.render_chat(PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        first = last = 0.0
        tokens = 0
        async for out in engine.generate(prompt, params, "bench", from_chat=True):
            now = time.perf_counter()
            if out.text and not first:
                first = now
            last, tokens = now, out.completion_tokens
        return first - t0, last - first, tokens

    async def main() -> list[tuple[float, float, int]]:
        await one()  # warm-up
        return [await one() for _ in range(n)]

    runs = asyncio.run(main())
    engine.shutdown()
    return {"ttft_ms": 1000 * statistics.median(r[0] for r in runs),
            "decode_tokens_per_s": statistics.median((r[2] - 1) / r[1] for r in runs)}


async def http_stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[float, float, int]:
    body = {"model": "tiny-chat", "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or now
                last = now
    return first - t0, last - first, tokens


def http_run(model_dir: str, n: int, max_tokens: int, concurrency: int) -> dict[str, float]:
    from shoal import serve
    from shoal.llm import build_openai_app

    run_dir = tempfile.mkdtemp(prefix="shoal-llm-b", dir="/tmp")
    serve.start(http_options={"port": 0}, _run_dir=run_dir)
    try:
        serve.run(build_openai_app({"llm_configs": [{
            "model_loading_config": {"model_id": "tiny-chat", "model_source": model_dir},
            "llm_engine": "transformers", "engine_kwargs": {"device": "cpu"},
        }]}))
        url = serve.http_address()

        async def main() -> dict[str, float]:
            async with httpx.AsyncClient(timeout=300) as client:
                await http_stream(client, url, 16)  # warm-up
                runs = [await http_stream(client, url, max_tokens) for _ in range(n)]
                t0 = time.perf_counter()
                together = await asyncio.gather(*(http_stream(client, url, max_tokens) for _ in range(concurrency)))
                wall = time.perf_counter() - t0
            return {
                "ttft_ms": 1000 * statistics.median(r[0] for r in runs),
                "decode_tokens_per_s": statistics.median((r[2] - 1) / r[1] for r in runs),
                "request_tokens_per_s": statistics.median(r[2] / (r[0] + r[1]) for r in runs),
                "concurrent_total_tokens_per_s": sum(r[2] for r in together) / wall,
                "concurrent_ttft_ms_max": 1000 * max(r[0] for r in together),
            }

        return asyncio.run(main())
    finally:
        serve.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--model-dir", help="an existing tiny model (default: build one in a temporary directory)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    from examples.llm.make_tiny_model import build_tiny_model

    model_dir = args.model_dir or str(build_tiny_model(Path(tempfile.mkdtemp(prefix="tiny-chat-")) / "tiny-chat"))
    load_before = os.getloadavg()[0]
    engine = engine_run(model_dir, args.requests, args.max_tokens)
    http = http_run(model_dir, args.requests, args.max_tokens, args.concurrency)
    result = {"max_tokens": args.max_tokens, "requests": args.requests, "concurrency": args.concurrency,
              "cpus": os.cpu_count(), "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "engine": engine, "http": http}
    print(f"tiny-chat, transformers engine on the CPU, {args.max_tokens} tokens per request, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  engine alone         TTFT {engine['ttft_ms']:7.1f} ms   "
          f"decode {engine['decode_tokens_per_s']:6.1f} tok/s")
    print(f"  HTTP, one at a time  TTFT {http['ttft_ms']:7.1f} ms   decode {http['decode_tokens_per_s']:6.1f} tok/s"
          f"   whole request {http['request_tokens_per_s']:6.1f} tok/s")
    print(f"  HTTP, {args.concurrency} at once      {http['concurrent_total_tokens_per_s']:6.1f} tok/s in total, "
          f"slowest TTFT {http['concurrent_ttft_ms_max']:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
