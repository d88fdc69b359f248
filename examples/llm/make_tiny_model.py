"""Build a tiny chat model from a config, offline: a BPE tokenizer and a 2-layer Llama.

Nothing is downloaded. The tokenizer is trained with the ``tokenizers`` library on the short
corpus below (a few lines of it are JSON objects, so that JSON mode has something to follow);
the model is a ``LlamaConfig`` with 2 layers and a 64-wide hidden state (about 100k
parameters), trained for a few seconds on the same corpus so that it babbles corpus-like
words and ends its answers, instead of emitting random tokens forever. The
tokenizer carries a chat template, so chat requests use it.

    python examples/llm/make_tiny_model.py [OUT_DIR] [--train-steps N] [--no-chat-template]

``OUT_DIR`` defaults to ``examples/llm/models/tiny-chat``. It is a model directory like any
other (``config.json``, ``model.safetensors``, ``tokenizer.json``), loadable with
``AutoModelForCausalLM.from_pretrained``. It takes a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "models" / "tiny-chat"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = """\
shoal serves python models on one machine without a cluster.
a deployment is a class with replicas, and each replica is a process.
the proxy routes each request to a replica of the ingress deployment.
a handle calls another deployment, and the router picks a replica.
the gateway speaks the openai api, so any openai client can talk to it.
a language model turns a prompt into tokens, one token at a time.
streaming sends each token to the client as soon as it is ready.
when the client goes away, generation stops, and the replica is free again.
batching groups requests so that the model runs fewer, larger steps.
autoscaling adds replicas when queues grow and removes them when they shrink.
a tenant has an api key, a request limit and a token limit.
rate limits refill over time, like water filling a bucket.
embeddings map text to vectors, and similar texts get similar vectors.
the tiny model is small enough to run on a laptop cpu in a few seconds.
hello, how can i help you today?
i am a tiny model, and i know a little about serving models.
the quick brown fox jumps over the lazy dog.
models, prompts, tokens and replicas are the words i know best.
{"model": "tiny", "replicas": 2, "stream": true}
{"tenant": "team-a", "tokens": [16, 256], "limit": null}
{"answer": "a replica is a process", "ok": true}
"""


def corpus_lines() -> list[str]:
    return [line.strip() for line in CORPUS.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-free BPE tokenizer (Metaspace pre-tokenisation, so every token decodes to text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # JSON's punctuation and digits are in the alphabet whatever the corpus (JSON mode needs them).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=list('{}[]":,.-+0123456789'))
    tok.train_from_iterator(corpus_lines() * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<pad>", additional_special_tokens=SPECIAL_TOKENS[4:])


def build_tiny_model(out_dir: str | os.PathLike[str] = DEFAULT_OUT, *, train_steps: int = 120,
                     chat_template: bool = True, seed: int = 0, max_position_embeddings: int = 2048) -> Path:
    """Write the tokenizer and model to ``out_dir`` and return it (overwriting what is there)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    vocab = len(tokenizer)
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in ("<s>", "</s>", "<pad>")}
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    if train_steps > 0:
        _train(model, tokenizer, train_steps, seed)
    model.generation_config.eos_token_id = ids["</s>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _train(model: Any, tokenizer: Any, steps: int, seed: int) -> None:
    """A few seconds of next-token prediction on the corpus, as chat turns and as plain text."""
    import torch

    # A model this small trains several times faster on one thread than on several.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_steps(model, tokenizer, steps, seed)
    finally:
        torch.set_num_threads(threads)


def _train_steps(model: Any, tokenizer: Any, steps: int, seed: int) -> None:
    import random

    import torch

    rng = random.Random(seed)
    lines = corpus_lines()
    texts = []
    for line in lines:
        texts.append(f"<s>{line}</s>")
        question = rng.choice(lines)
        texts.append(f"<|user|>{question}<|end|><|assistant|>{line}</s>")
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = rng.sample(encoded, k=min(16, len(encoded)))
        width = max(len(x) for x in batch)
        input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in batch])
        labels = torch.tensor([x + [-100] * (width - len(x)) for x in batch])
        mask = (labels != -100).long()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT))
    parser.add_argument("--train-steps", type=int, default=120)
    parser.add_argument("--no-chat-template", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = build_tiny_model(args.out_dir, train_steps=args.train_steps, chat_template=not args.no_chat_template)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
