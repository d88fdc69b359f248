"""What every engine shares: requests, outputs, the engine protocol, stop sequences, chat prompts.

An engine turns a prompt into a stream of :class:`EngineOutput` deltas. Everything above it
(stop sequences, usage counts, OpenAI formatting) is engine-independent and lives in
:class:`~shoal.llm.LLMServer` and the gateway.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "AdapterNotFoundError",
    "ContextLengthError",
    "Engine",
    "EngineOutput",
    "GenerationChunk",
    "GenerationRequest",
    "InvalidParameterError",
    "SamplingParams",
    "StopMatcher",
    "StructuredOutput",
    "TokenLogprob",
    "fallback_chat_prompt",
]


class ContextLengthError(ValueError):
    """The prompt plus ``max_tokens`` does not fit the model's context window."""

    #: A client error: the HTTP status it answers (replicas log it without a traceback).
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AdapterNotFoundError(LookupError):
    """A LoRA adapter was asked for that does not exist (or the engine cannot load adapters)."""

    status_code = 404

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidParameterError(ValueError):
    """A request parameter this engine cannot honour (``logit_bias`` on an engine without it, a
    token id outside the vocabulary): a 400 naming ``param``."""

    status_code = 400

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.param, self.message))


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text: ``kind`` ``json_object`` (any JSON object: OpenAI's JSON
    mode), ``json`` (``spec`` is a JSON schema, as JSON text), ``regex``, ``choice`` (``spec`` is a
    JSON array of strings) or ``grammar`` (vLLM's names). ``param`` is the request field it
    came from (what a refusal names)."""

    kind: str
    spec: str = ""
    param: str = "structured_outputs"


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy decoding.

    The fields after ``frequency_penalty`` are optional: an engine applies those its
    ``sampling_features`` name, and :class:`~shoal.llm.LLMServer` refuses a request that sets
    one it lacks (a 400 naming the request field), so none is ever silently ignored.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: Keep generating past the end-of-sequence token (vLLM's name; for benchmarks and tests).
    ignore_eos: bool = False
    #: Applied by engines whose ``sampling_features`` have ``"penalties"`` (others refuse them).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: (token id, bias) pairs added to the logits; engines whose ``sampling_features`` have
    #: ``"logit_bias"`` apply them (others refuse them).
    logit_bias: tuple[tuple[int, float], ...] = ()
    #: Completions to generate; an engine with the ``"n"`` feature generates them itself, for
    #: the others ``LLMServer`` runs ``n`` generations (choice ``i`` seeded with ``seed + i``).
    n: int = 1
    #: Log probabilities of each generated token with this many alternatives (0: the token's own
    #: only); None: none. Feature ``"logprobs"``.
    logprobs: int | None = None
    #: vLLM's extra sampling parameters, each its own feature of the same name.
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    allowed_token_ids: tuple[int, ...] = ()  # empty: every token
    #: Applied by ``LLMServer`` (stop strings are matched there) for every engine.
    include_stop_str_in_output: bool = False
    #: Feature ``"json_object"`` for JSON mode, ``"structured_outputs"`` for the other kinds.
    structured: StructuredOutput | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log probability and its most likely alternatives (``top``: (token
    text, log probability) pairs, most likely first). ``token`` is the token's text; ``raw`` its
    bytes when they are not whole UTF-8 characters on their own (a piece of a multi-byte one)."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()
    raw: bytes | None = None

    def token_bytes(self) -> list[int]:
        return list(self.raw if self.raw is not None else self.token.encode("utf-8"))


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: a raw ``prompt``, or chat ``messages`` the server renders with the model's template."""

    request_id: str
    prompt: str | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    #: OpenAI's ``tools`` (function definitions) and ``tool_choice`` (``"none"``, ``"auto"``,
    #: ``"required"`` or ``{"type": "function", "function": {"name": ...}}``): engines with the
    #: ``"tools"`` feature (vLLM) only.
    tools: tuple[Mapping[str, Any], ...] = ()
    tool_choice: str | Mapping[str, Any] | None = None


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of generated text, as :meth:`LLMServer.generate` streams it.

    ``prompt_tokens`` and ``completion_tokens`` are running totals; ``finish_reason`` is set
    on the last chunk (``"stop"``: end of sequence or a stop sequence, ``"length"``: ``max_tokens``).
    With ``n > 1`` the chunks of the choices interleave: ``index`` says whose, and
    ``completion_tokens`` counts that choice's tokens. ``logprobs`` are the tokens' that made
    this text (when asked for); ``tool_calls`` (OpenAI's shape) come on a choice's last chunk.
    """

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class EngineOutput:
    """A delta from an engine: new text, how many tokens it took, the running totals; ``index``
    the choice (engines with the ``"n"`` feature), ``logprobs`` those of the new tokens."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()


@runtime_checkable
class Engine(Protocol):
    """What :class:`~shoal.llm.LLMServer` needs from an engine.

    ``generate`` must stop producing (and free what it holds) when its iterator is closed
    or cancelled: that is how a client disconnect stops generation.

    An engine may also have ``sampling_features``, the optional :class:`SamplingParams` it
    applies: ``"logit_bias"``, ``"penalties"`` (presence and frequency), ``"n"``,
    ``"logprobs"``, ``"json_object"``, ``"structured_outputs"``, ``"tools"``, and vLLM's
    ``"top_k"``, ``"min_p"``, ``"repetition_penalty"``, ``"min_tokens"``, ``"stop_token_ids"``,
    ``"skip_special_tokens"``, ``"allowed_token_ids"``. A request that uses one the engine lacks
    is refused with :class:`InvalidParameterError` (none when absent); without ``"n"``,
    ``LLMServer`` runs ``n`` generations itself.
    """

    name: str

    def load(self) -> None:
        """Load the model (blocking; called once, from the deployment's constructor)."""

    def render_chat(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The prompt for chat ``messages``: the tokenizer's chat template, else :func:`fallback_chat_prompt`."""

    def generate(self, prompt: str, params: SamplingParams, request_id: str, adapter: Any = None,
                 *, from_chat: bool = False) -> AsyncGenerator[EngineOutput, None]:
        """Stream the completion of ``prompt`` (``from_chat``: it came from :meth:`render_chat`,
        so it already holds the special tokens it needs). The last output has ``finish_reason`` set."""

    @property
    def supports_adapters(self) -> bool: ...

    async def load_adapter(self, name: str, path: str) -> Any: ...

    def stats(self) -> dict[str, Any]: ...

    def shutdown(self) -> None:
        """Free the engine's resources (threads, GPU memory)."""


def fallback_chat_prompt(messages: Sequence[Mapping[str, str]]) -> str:
    """The prompt for models whose tokenizer has no chat template: one labelled block per message.

    ::

        System: You are terse.
        User: Hi!
        Assistant:
    """
    lines = [f"{m.get('role', 'user').capitalize()}: {m.get('content') or ''}" for m in messages]
    lines.append("Assistant:")
    return "\n".join(lines)


class StopMatcher:
    """Cuts streamed text at the first stop sequence, holding back what could be the start of one.

    Feed it deltas; it returns the text that is safe to emit and whether a stop was hit.
    At the end, :meth:`flush` returns what was held back.

    Example::

        m = StopMatcher(["\\n\\n"])
        m.feed("Hello\\n")      # -> ("Hello", False): "\\n" may start a stop sequence
        m.feed("\\nmore")       # -> ("", True): stopped; nothing after it is emitted
    """

    def __init__(self, stop: Sequence[str], *, include: bool = False) -> None:
        self._stops = [s for s in stop if s]
        self._include = include  # keep the stop sequence itself (vLLM's include_stop_str_in_output)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        found = [(i, -len(s)) for i, s in ((text.find(s), s) for s in self._stops) if i >= 0]
        if found:
            cut, minus_len = min(found)
            self._held = ""
            self.stopped = True
            return text[:cut - minus_len if self._include else cut], True
        # Hold back the longest suffix of text that is a proper prefix of some stop sequence.
        keep = 0
        for s in self._stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


def hf_tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """A Hugging Face tokenizer's ids for ``text`` (the transformers and vLLM engines' ``tokenize``)."""
    return [int(t) for t in tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]]


def hf_detokenize(tokenizer: Any, ids: Sequence[int]) -> str:
    """The text of ``ids``; an id outside the vocabulary is a ``ValueError`` naming it."""
    vocab = len(tokenizer)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"token id(s) {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    return str(tokenizer.decode(list(ids)))
