"""Continuous batching in the transformers engine: total tokens/s and TTFT with 1, 4 and 16 streams.

    python benchmarks/llm_batching.py [--max-tokens 128] [--streams 1,4,16] [--rounds 3]
                                      [--device cpu|cuda] [--size tiny|small] [--max-num-seqs 16]
                                      [--json OUT] [--write-results]

It builds the LLM example's tiny model (a 2-layer Llama with a 64-wide hidden state) with random
weights (``train_steps=0``, seed 0) into a temporary directory, loads it twice in this process
— ``TransformersEngine(batching=True)`` and ``batching=False`` (one generation at a time, the
engine's old behaviour), both on the CPU with one torch thread (``LLMServer``'s default) — and
for each number of streams starts that many requests at once, each asking for exactly
``--max-tokens`` tokens (``ignore_eos``, greedy) with one of a few prompts of different lengths.
Per setting it reports the total completion tokens over the wall time of the whole group of
streams (median of ``--rounds`` rounds; the settings are interleaved round by round so that
other load on the machine hits them alike) and the time to first token of every stream (p50
over all rounds). The engine is called directly: no HTTP, no gateway.

On a GPU machine, ``--device cuda`` loads both engines on the GPU (bfloat16: the engine's
``dtype: auto`` on CUDA); ``--size small`` builds a bigger random Llama with the same tokenizer
(12 layers, hidden 1024, about 170 M parameters, bfloat16), where a decode step costs real
GPU work rather than only kernel launches. ``--write-results`` is for the CPU row only.

The target (issue 20) is 16 streams ≥ 6x the tokens/s of one stream, with batching on.
``--write-results`` puts the table, with the command, into ``benchmarks/RESULTS.md`` between
the markers of its "LLM continuous batching" section (``report.py`` keeps that section when it
rewrites the file).
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["the gateway", "a replica", "shoal serves python models on one machine without a cluster",
           "hello, how can i", "the proxy routes each request to a replica of the ingress deployment",
           "tokens", "streaming sends each token", "a tenant has an api key and"]
TARGET_RATIO = 6.0
START_MARK = "<!-- llm-batching:start -->"
END_MARK = "<!-- llm-batching:end -->"


async def group(engine: Any, streams: int, max_tokens: int) -> tuple[float, int, list[float]]:
    """``streams`` requests at once: wall seconds, completion tokens, each stream's TTFT."""
    from shoal.llm.engines import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one(i: int, t0: float) -> tuple[int, float]:
        first = 0.0
        tokens = 0
        async for out in engine.generate(PROMPTS[i % len(PROMPTS)], params, f"bench-{i}"):
            if out.text and not first:
                first = time.perf_counter() - t0
            tokens = out.completion_tokens
        return tokens, first

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i, t0) for i in range(streams)))
    wall = time.perf_counter() - t0
    return wall, sum(r[0] for r in results), [r[1] for r in results]


def build_small_model(out_dir: Path) -> Path:
    """A random 12-layer Llama (hidden 1024) with the tiny model's tokenizer, saved in bfloat16."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from examples.llm.make_tiny_model import build_tiny_model

    tiny = build_tiny_model(out_dir, train_steps=0, seed=0)
    base = LlamaConfig.from_pretrained(tiny)
    config = LlamaConfig(vocab_size=base.vocab_size, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, bos_token_id=base.bos_token_id, eos_token_id=base.eos_token_id,
                         pad_token_id=base.pad_token_id, tie_word_embeddings=True, torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = base.eos_token_id
    model.generation_config.pad_token_id = base.pad_token_id
    model.save_pretrained(tiny)
    return tiny


def measure(model_dir: str, streams: list[int], rounds: int, max_tokens: int, device: str = "cpu",
            max_num_seqs: int = 16) -> dict[str, Any]:
    from shoal.llm.engines._hf import TransformersEngine

    engines = {}
    for mode in ("on", "off"):
        engine = TransformersEngine(model_dir, device=device, torch_threads=1, batching=mode == "on",
                                    max_num_seqs=max_num_seqs)
        engine.load()
        engines[mode] = engine
    samples: dict[str, dict[int, list[tuple[float, int, list[float]]]]] = {m: {n: [] for n in streams} for m in engines}

    async def main() -> None:
        for engine in engines.values():  # warm-up: first-call costs (allocations, thread start)
            await group(engine, 2, 16)
        for _ in range(rounds):
            for n in streams:
                for mode, engine in engines.items():
                    samples[mode][n].append(await group(engine, n, max_tokens))

    asyncio.run(main())
    batch_stats = engines["on"].stats()
    for engine in engines.values():
        engine.shutdown()
    out: dict[str, Any] = {}
    for mode, by_n in samples.items():
        out[mode] = {}
        for n, runs in by_n.items():
            rates = [tokens / wall for wall, tokens, _ in runs]
            ttfts = [t for _, _, ts in runs for t in ts]
            out[mode][str(n)] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_runs": rates,
                                 "ttft_p50_ms": 1000 * statistics.median(ttfts),
                                 "ttft_max_ms": 1000 * max(ttfts)}
    out["batch_stats"] = {k: v for k, v in batch_stats.items() if k.startswith("batch") or k.startswith("max_")}
    return out


def markdown(result: dict[str, Any], command: str) -> str:
    streams = [int(n) for n in result["on"]]
    single = result["on"][str(streams[0])]["tokens_per_s"]
    lines = [
        START_MARK,
        f"## LLM continuous batching (transformers engine, {result.get('device', 'cpu').upper()})",
        "",
        f"Produced by `{command}` ([llm_batching.py](llm_batching.py) says what it measures); "
        f"{result['date']}, {result['cpus']} CPUs, load average {result['load_average_1m'][0]} -> "
        f"{result['load_average_1m'][1]}, torch {result['torch']}, transformers {result['transformers']}. "
        f"Tiny Llama (2 layers, hidden 64) with random weights, one torch thread, {result['max_tokens']} tokens per "
        f"stream, greedy; median of {result['rounds']} rounds; the engine called in-process (no HTTP).",
        "",
        "| streams | batching on: tokens/s | TTFT p50 | batching off: tokens/s | TTFT p50 | on / off | "
        f"on / on with {streams[0]} stream |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in streams:
        on, off = result["on"][str(n)], result["off"][str(n)]
        lines.append(f"| {n} | {on['tokens_per_s']:,.0f} | {on['ttft_p50_ms']:.1f} ms | {off['tokens_per_s']:,.0f} | "
                     f"{off['ttft_p50_ms']:.1f} ms | {on['tokens_per_s'] / off['tokens_per_s']:.1f}x | "
                     f"{on['tokens_per_s'] / single:.1f}x |")
    top = result["on"][str(max(streams))]["tokens_per_s"] / single
    lines += ["", f"Target: {max(streams)} streams ≥ {TARGET_RATIO:g}x the single-stream tokens/s with batching on: "
              f"{top:.1f}x, **{'met' if top >= TARGET_RATIO else 'not met'}**. Batching off is one generation at "
              "a time (`max_concurrency: 1`), so its TTFT grows with the queue.", END_MARK]
    return "\n".join(lines)


GPU_START_MARK = "<!-- llm-batching-gpu:start -->"
GPU_END_MARK = "<!-- llm-batching-gpu:end -->"
GPU_RUNS = (("tiny", "llm_batching_cuda_tiny_h200.json"), ("small", "llm_batching_cuda_small_h200.json"))
GPU_HTTP = "llm_gpu_switch_interval_h200.json"


def gpu_markdown(folder: Path) -> str:
    """The GPU section of RESULTS.md, from the JSON files a GPU run left in ``folder``
    (``--device cuda --json ...``, and ``scripts/llm_gpu_check.py`` per switch interval)."""
    lines = [GPU_START_MARK, "## LLM continuous batching on a GPU (transformers engine, H200)", "",
             "From `python benchmarks/llm_batching.py --device cuda [--size small] --max-num-seqs 64 --rounds 2 "
             "--json ...` on one H200 (the files named below); the engine in-process, as in the CPU section.", ""]
    for size, name in GPU_RUNS:
        path = folder / name
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        streams = sorted(int(n) for n in result["on"])
        single = result["on"][str(streams[0])]["tokens_per_s"]
        lines += [f"**{size}** ({name}; {result.get('device_name', 'GPU')}, torch {result['torch']}, "
                  f"{result['max_tokens']} tokens per stream):", "",
                  "| streams | batching on: tokens/s | TTFT p50 | batching off: tokens/s | on / one stream |",
                  "|---|---|---|---|---|"]
        for n in streams:
            on, off = result["on"][str(n)], result["off"][str(n)]
            lines.append(f"| {n} | {on['tokens_per_s']:,.0f} | {on['ttft_p50_ms']:.1f} ms | "
                         f"{off['tokens_per_s']:,.0f} | {on['tokens_per_s'] / single:.1f}x |")
        lines.append("")
    http = folder / GPU_HTTP
    if http.is_file():
        runs = json.loads(http.read_text())["runs"]
        lines += ["Through the HTTP gateway (`scripts/llm_gpu_check.py`, tiny model, 16 concurrent streams of 256 "
                  f"tokens against one stream; {GPU_HTTP}), by the replica's switch interval:", "",
                  "| switch interval | one stream: tokens/s | 16 streams: total tokens/s | TTFT p50 | 16 / one |",
                  "|---|---|---|---|---|"]
        for value, run in runs.items():
            lines.append(f"| {float(value) * 1000:g} ms | {run['request_tokens_per_s']:,.0f} | "
                         f"{run['concurrent_total_tokens_per_s']:,.0f} | {run['concurrent_ttft_p50_ms']:.0f} ms | "
                         f"{run['concurrent_vs_single_stream']:.2f}x |")
        lines += ["", "The engine batches on the GPU; over HTTP the gain is lost to the GIL shared by the step "
                  "thread and the replica's event loop (docs/llm-gateway.md); 0.1 ms is the default on CUDA."]
    lines.append(GPU_END_MARK)
    return "\n".join(lines)


def write_section(path: Path, section: str, start: str = START_MARK, end: str = END_MARK) -> None:
    """Replace the section between the markers in ``path``, or append it."""
    text = path.read_text() if path.is_file() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--streams", default="1,4,16", help="comma-separated stream counts (default 1,4,16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model-dir", help="an existing model directory (default: build the tiny one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the engines run (default cpu)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small"],
                        help="the model built when --model-dir is not given (default tiny)")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="the batching engine's max_num_seqs (default 16)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--write-results", action="store_true", help="update the section in benchmarks/RESULTS.md")
    parser.add_argument("--write-gpu-results", action="store_true",
                        help="measure nothing: render the GPU section of benchmarks/RESULTS.md from the JSON files")
    args = parser.parse_args(argv)
    if args.write_gpu_results:
        section = gpu_markdown(REPO / "benchmarks")
        write_section(REPO / "benchmarks" / "RESULTS.md", section, GPU_START_MARK, GPU_END_MARK)
        print(section)
        return 0
    streams = sorted({int(n) for n in args.streams.split(",")})
    if not streams or streams[0] < 1 or args.rounds < 1 or args.max_tokens < 1:
        parser.error("--streams, --rounds and --max-tokens must be positive")

    import torch
    import transformers

    from examples.llm.make_tiny_model import build_tiny_model

    if args.write_results and (args.device != "cpu" or args.size != "tiny"):
        parser.error("--write-results writes the CPU row of the tiny model only")
    where = Path(tempfile.mkdtemp(prefix="tiny-bench-")) / "model"
    model_dir = args.model_dir or str(build_small_model(where) if args.size == "small"
                                      else build_tiny_model(where, train_steps=0, seed=0))
    load_before = os.getloadavg()[0]
    result = measure(model_dir, streams, args.rounds, args.max_tokens, args.device, args.max_num_seqs)
    if args.device == "cuda":
        result.update(device_name=torch.cuda.get_device_name(0),
                      cuda_max_memory_allocated=torch.cuda.max_memory_allocated())
    result.update(max_tokens=args.max_tokens, rounds=args.rounds, cpus=os.cpu_count(), device=args.device,
                  size=args.size, max_num_seqs=args.max_num_seqs,
                  load_average_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
                  torch=torch.__version__, transformers=transformers.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    command = "python benchmarks/llm_batching.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = markdown(result, command.strip())
    print(section)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.write_results:
        write_section(REPO / "benchmarks" / "RESULTS.md", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
