"""Continuous batching in the transformers engine, on tiny models built here from configs.

The reference for every output is the engine's other path (``batching=False``: ``generate``
on one sequence alone): a row of a batch must give the same tokens as its prompt alone, which
catches padding, position and attention-mask mistakes. Where a test needs requests to meet in
the batch at a given moment, a gate on the scheduler's decode step holds the step thread, so
nothing depends on timing. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from examples.llm.make_tiny_model import build_tiny_model
from shoal.llm.engines import EngineOutput, SamplingParams
from shoal.llm.engines._hf import TransformersEngine
from shoal.llm.engines._hf_batch import MAX_LEAD, BatchScheduler, BatchStepError, _Detokenizer, batching_supported

pytestmark = pytest.mark.llm

BOUND_S = 60.0  # every wait in these tests ends by then
PROMPTS = ["the gateway", "a", "shoal serves python models on one machine without a", "hello, how",
           "the proxy routes each request to a replica of the ingress deployment", "tokens"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.getbasetemp() / "tiny-chat"  # shared with the other LLM test modules
    if not (path / "config.json").is_file():
        build_tiny_model(path, train_steps=60)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with random weights and the tiny tokenizer: learned absolute positions."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    path = tmp_path_factory.mktemp("gpt2-tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_engine(path: Path, **kwargs: Any) -> TransformersEngine:
    engine = TransformersEngine(str(path), device="cpu", torch_threads=1, **kwargs)
    engine.load()
    return engine


@pytest.fixture(scope="module")
def alone(model_dir: Path) -> TransformersEngine:
    return make_engine(model_dir, batching=False)


@pytest.fixture()
def batched(model_dir: Path) -> Any:
    engine = make_engine(model_dir, batching=True, max_num_seqs=8)
    yield engine
    engine.shutdown()


def scheduler(engine: TransformersEngine) -> BatchScheduler:
    assert isinstance(engine._batcher, BatchScheduler)
    return engine._batcher


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, BOUND_S)

    return asyncio.run(bounded())


async def collect(engine: TransformersEngine, prompt: str, **params: Any) -> tuple[str, int, str | None]:
    outs: list[EngineOutput] = [o async for o in engine.generate(prompt, SamplingParams(**params), "t")]
    return "".join(o.text for o in outs), outs[-1].completion_tokens, outs[-1].finish_reason


def reference(engine: TransformersEngine, prompts: list[str], **params: Any) -> list[tuple[str, int, str | None]]:
    return [run(collect(engine, p, **params)) for p in prompts]


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


class StepGate:
    """Wraps a scheduler's decode step. While closed, each step waits for a permit (bounded);
    each step that runs records its rows."""

    def __init__(self, sched: BatchScheduler) -> None:
        self.rows: list[list[Any]] = []
        self.held = False  # a step is waiting at the gate now
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()
        self._open.set()
        original = sched._decode

        def decode() -> None:
            if not self._open.is_set():
                self.held = True
                self._permits.acquire(timeout=BOUND_S)
                self.held = False
            self.rows.append(list(sched._rows))
            original()

        sched._decode = decode  # type: ignore[method-assign]

    def close(self) -> None:
        self._open.clear()

    def allow(self, steps: int) -> None:
        for _ in range(steps):
            self._permits.release()

    def open(self) -> None:
        self._open.set()
        self.allow(1)


GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}


@pytest.mark.parametrize("params", [GREEDY, {"temperature": 0, "max_tokens": 80}], ids=["fixed-length", "to-eos"])
def test_a_batch_of_mixed_prompts_equals_each_prompt_alone(alone: TransformersEngine, batched: TransformersEngine,
                                                           params: dict[str, Any]) -> None:
    expected = reference(alone, PROMPTS, **params)

    async def together() -> list[tuple[str, int, str | None]]:
        return list(await asyncio.gather(*(collect(batched, p, **params) for p in PROMPTS)))

    assert run(together()) == expected
    stats = batched.stats()
    assert stats["batching"] is True and stats["batch_peak_running"] > 1, stats  # they did share steps
    assert stats["running"] == 0 and stats["batch_running"] == 0


def test_gpt2_positions_in_a_batch(gpt2_dir: Path) -> None:
    """GPT-2 adds learned absolute position embeddings: a left-padded row must still get its own positions."""
    plain = make_engine(gpt2_dir, batching=False)
    engine = make_engine(gpt2_dir, batching=True)
    try:
        expected = reference(plain, PROMPTS, **GREEDY)

        async def together() -> list[tuple[str, int, str | None]]:
            return list(await asyncio.gather(*(collect(engine, p, **GREEDY) for p in PROMPTS)))

        assert run(together()) == expected
    finally:
        engine.shutdown()


def test_a_request_joins_a_running_batch(alone: TransformersEngine, batched: TransformersEngine) -> None:
    long_params = {**GREEDY, "max_tokens": 60}
    expected = reference(alone, [PROMPTS[2]], **long_params) + reference(alone, [PROMPTS[0]], **GREEDY)
    sched = scheduler(batched)
    gate = StepGate(sched)

    async def scenario() -> list[Any]:
        gate.close()
        first = asyncio.ensure_future(collect(batched, PROMPTS[2], **long_params))
        await until(lambda: len(sched._rows) == 1)
        gate.allow(3)
        await until(lambda: len(gate.rows) == 3 and gate.held)  # the 4th step waits: no admission until it ran
        second = asyncio.ensure_future(collect(batched, PROMPTS[0], **GREEDY))
        await until(lambda: len(sched._waiting) == 1)
        gate.open()
        return list(await asyncio.gather(first, second))

    assert run(scenario()) == expected
    assert all(len(rows) == 1 for rows in gate.rows[:3])  # the first ran alone, then the second joined it
    assert any(len(rows) == 2 for rows in gate.rows)
    assert len(gate.rows[-1]) == 1  # and left once done, the first going on alone
    assert batched.stats()["running"] == 0


def test_closing_a_stream_frees_its_slot_within_a_step(alone: TransformersEngine, model_dir: Path) -> None:
    engine = make_engine(model_dir, batching=True, max_num_seqs=1)
    sched = scheduler(engine)
    gate = StepGate(sched)
    expected = reference(alone, [PROMPTS[3]], **GREEDY)[0]

    async def scenario() -> tuple[str, int, str | None]:
        gate.close()
        stream = engine.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=1500, ignore_eos=True), "c")
        await anext(stream)  # the prefill's token: the sequence holds the only slot
        waiting = asyncio.ensure_future(collect(engine, PROMPTS[3], **GREEDY))
        await until(lambda: len(sched._waiting) == 1)
        assert len(sched._rows) == 1  # max_num_seqs=1: the second request waits
        steps_at_close = len(gate.rows)
        closing = asyncio.ensure_future(stream.aclose())
        await until(lambda: sched._rows[0].cancelled)
        gate.open()
        await closing  # returns once the step thread has dropped the sequence
        result = await waiting
        later = gate.rows[steps_at_close:]
        closed_in = [i for i, rows in enumerate(later) if any(s.max_new == 1500 for s in rows)]
        assert closed_in in ([], [0]), closed_in  # at most the step already under way
        return result

    try:
        assert run(scenario()) == expected
        stats = engine.stats()
        assert stats["cancelled"] == 1 and stats["running"] == 0 and stats["batch_running"] == 0
    finally:
        engine.shutdown()


def test_max_num_seqs_bounds_the_batch(alone: TransformersEngine, model_dir: Path) -> None:
    engine = make_engine(model_dir, batching=True, max_num_seqs=2)
    sched = scheduler(engine)
    gate = StepGate(sched)
    prompts = PROMPTS[:5]
    expected = reference(alone, prompts, **GREEDY)

    async def scenario() -> list[Any]:
        gate.close()
        tasks = [asyncio.ensure_future(collect(engine, p, **GREEDY)) for p in prompts]
        await until(lambda: len(sched._waiting) + len(sched._rows) == 5)
        assert len(sched._rows) <= 2 and len(sched._waiting) >= 3  # the extra requests wait
        gate.open()
        return list(await asyncio.gather(*tasks))

    try:
        assert run(scenario()) == expected  # and then run
        assert max(len(rows) for rows in gate.rows) == 2
        assert engine.stats()["batch_peak_running"] == 2
    finally:
        engine.shutdown()


def test_the_token_budget_splits_prefills(alone: TransformersEngine, model_dir: Path) -> None:
    """With room for ~one prompt per step, the prompts are prefilled over several iterations."""
    engine = make_engine(model_dir, batching=True, max_num_seqs=4, max_num_batched_tokens=16)
    try:
        prompts = [PROMPTS[2], PROMPTS[4], PROMPTS[0], PROMPTS[1]]
        expected = reference(alone, prompts, **GREEDY)

        async def together() -> list[Any]:
            return list(await asyncio.gather(*(collect(engine, p, **GREEDY) for p in prompts)))

        assert run(together()) == expected
        assert engine.stats()["batch_prefills"] >= 3
    finally:
        engine.shutdown()


def test_a_reader_that_falls_behind_pauses_its_sequence(alone: TransformersEngine, batched: TransformersEngine) -> None:
    """Generation runs at most MAX_LEAD tokens ahead of the reader (a stalled client wastes little)."""
    params = {**GREEDY, "max_tokens": 4 * MAX_LEAD}
    expected = reference(alone, [PROMPTS[0]], **params)[0]
    sched = scheduler(batched)

    async def scenario() -> tuple[tuple[str, int, str | None], int]:
        stream = batched.generate(PROMPTS[0], SamplingParams(**params), "slow")
        outs = [await anext(stream)]
        await until(lambda: bool(sched._rows) and sched._rows[0].generated - sched._rows[0].read >= MAX_LEAD)
        await asyncio.sleep(0.2)  # the step thread, were it not paused, would go on to max_tokens here
        ahead = sched._rows[0].generated
        outs += [o async for o in stream]
        return ("".join(o.text for o in outs), outs[-1].completion_tokens, outs[-1].finish_reason), ahead

    result, ahead = run(scenario())
    assert result == expected
    assert ahead <= MAX_LEAD + 2, ahead


def test_seeded_sampling_does_not_depend_on_the_batch(batched: TransformersEngine) -> None:
    sampled = {"temperature": 1.3, "top_p": 0.9, "max_tokens": 30, "ignore_eos": True}
    alone_1 = run(collect(batched, "a", seed=1, **sampled))

    async def mixed() -> list[Any]:
        return list(await asyncio.gather(collect(batched, "a", seed=1, **sampled),
                                         collect(batched, PROMPTS[2], seed=7, **sampled),
                                         collect(batched, "hello", **sampled),
                                         collect(batched, "a", seed=2, **sampled),
                                         collect(batched, "a", **GREEDY)))

    first, _, _, other_seed, _ = run(mixed())
    assert first == alone_1
    assert run(collect(batched, "a", seed=1, **sampled)) == alone_1
    assert len({alone_1[0], other_seed[0], run(collect(batched, "a", seed=3, **sampled))[0]}) > 1


def test_a_fault_in_a_decode_step_fails_every_request_in_the_batch(batched: TransformersEngine) -> None:
    sched = scheduler(batched)
    forward = sched._forward

    def faulty(*args: Any, prefill: bool) -> Any:
        if not prefill and len(sched._rows) == 3:
            raise RuntimeError("injected fault")
        return forward(*args, prefill=prefill)

    sched._forward = faulty  # type: ignore[method-assign,assignment]

    async def three() -> list[Any]:
        return list(await asyncio.gather(*(collect(batched, p, **GREEDY) for p in PROMPTS[:3]),
                                         return_exceptions=True))

    results = run(three())
    assert all(isinstance(r, BatchStepError) and "injected fault" in str(r) for r in results), results
    sched._forward = forward  # type: ignore[method-assign]
    assert run(collect(batched, "a", **GREEDY))[2] == "length"  # the thread serves on
    stats = batched.stats()
    assert stats["batch_failures"] == 1 and stats["running"] == 0 and stats["batch_running"] == 0


def test_a_fault_in_a_prefill_fails_only_the_joining_requests(alone: TransformersEngine,
                                                             batched: TransformersEngine) -> None:
    sched = scheduler(batched)
    gate = StepGate(sched)
    forward = sched._forward
    long_params = {**GREEDY, "max_tokens": 40}
    expected = reference(alone, [PROMPTS[0]], **long_params)[0]

    def faulty(*args: Any, prefill: bool) -> Any:
        if prefill and sched._rows:
            raise RuntimeError("injected prefill fault")
        return forward(*args, prefill=prefill)

    sched._forward = faulty  # type: ignore[method-assign,assignment]

    async def scenario() -> tuple[Any, Any]:
        gate.close()
        running = asyncio.ensure_future(collect(batched, PROMPTS[0], **long_params))
        await until(lambda: len(sched._rows) == 1)
        joining = asyncio.ensure_future(collect(batched, PROMPTS[1], **GREEDY))
        await until(lambda: len(sched._waiting) == 1)
        gate.open()
        return await running, (await asyncio.gather(joining, return_exceptions=True))[0]

    first, second = run(scenario())
    assert first == expected
    assert isinstance(second, BatchStepError) and "injected prefill fault" in str(second)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_step_thread_ends_its_requests_with_an_error(batched: TransformersEngine) -> None:
    sched = scheduler(batched)
    sched.poll_s = 0.05
    admit = sched._admit

    def die() -> Any:
        raise SystemExit("the step thread dies")  # not an Exception: it ends the thread itself

    sched._admit = die  # type: ignore[method-assign]
    with pytest.raises(BatchStepError, match="not running"):
        run(collect(batched, "a", **GREEDY))
    sched._admit = admit  # type: ignore[method-assign]
    assert run(collect(batched, "a", **GREEDY))[2] == "length"  # the next request starts a new thread


def test_models_the_scheduler_cannot_run_keep_the_other_path(model_dir: Path, tmp_path: Path) -> None:
    """A sliding-window cache is not one the scheduler can pad: such a model generates the other way."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16, eos_token_id=tokenizer.eos_token_id))
    assert "DynamicSlidingWindowLayer" in str(batching_supported(mistral))
    mistral.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = make_engine(tmp_path, batching=True)
    assert engine._batcher is None and engine.stats()["batching"] is False
    assert run(collect(engine, "a", **GREEDY))[1:] == (24, "length")
    assert make_engine(model_dir, batching=False).stats()["batching"] is False


@pytest.mark.parametrize(("kwargs", "field"), [({"max_num_seqs": 0}, "max_num_seqs"),
                                               ({"max_num_seqs": 8, "max_num_batched_tokens": 4},
                                                "max_num_batched_tokens")])
def test_bad_batching_kwargs_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TransformersEngine("unused", **kwargs)


def test_incremental_detokenisation_matches_a_full_decode(alone: TransformersEngine) -> None:
    tokenizer = alone.tokenizer
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)]
        decoder = _Detokenizer(tokenizer)
        assert "".join(decoder.add(t) for t in ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_requests_with_options_the_scheduler_lacks_take_the_other_path(batched: TransformersEngine) -> None:
    handles = BatchScheduler.handles
    assert handles(SamplingParams(temperature=0.7, top_p=0.9, seed=3, max_tokens=5, stop=("x",), ignore_eos=True))
    assert not handles(SamplingParams(presence_penalty=0.5))
    assert not handles(SamplingParams(logit_bias=((3, -100.0),)))
    prefills = batched.stats()["batch_prefills"]
    assert run(collect(batched, "a", frequency_penalty=0.5, **GREEDY))[1:] == (24, "length")
    assert batched.stats()["batch_prefills"] == prefills  # generated by generate() on its own thread
    assert run(collect(batched, "a", **GREEDY))[1:] == (24, "length")
    assert batched.stats()["batch_prefills"] == prefills + 1
