"""The OpenAI wire format: request models, response bodies, stream chunks, errors.

Field names, defaults and error shapes follow OpenAI's API reference (and vLLM's server where
OpenAI leaves room), so the official clients work unchanged. Every field of a request model
carries a :class:`Support` that says how the gateway treats it: supported, partly supported
(other values, or values the model's engine does not apply, are a 400 naming the field),
rejected with a 400 when set (it would change the result and is not implemented: ``echo``,
``suffix``, ...), or not applicable
(accepted and without effect here: ``user``, ``store``, ...). The conformance table in
docs/llm-gateway.md is generated from them (:mod:`shoal.llm.conformance`). JSON ``null`` means
"the default" for every optional field, as in OpenAI's API; unknown extra fields are ignored,
as vLLM does. A string holding a lone UTF-16 surrogate (``"\\ud800"``) is a 400 naming where.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo

from shoal.llm.engines import SamplingParams
from shoal.llm.engines._base import StructuredOutput

__all__ = [
    "ENDPOINTS",
    "NOT_APPLICABLE",
    "PARTIAL",
    "REJECTED",
    "STATUSES",
    "SUPPORTED",
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "OpenAIError",
    "Support",
    "parse_request",
    "sse",
    "support_of",
]


class OpenAIError(Exception):
    """An error the gateway answers in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (self.status, self.message, self.type, self.code, self.param, self.headers))


def _rebuild_error(status: int, message: str, type: str, code: str | None, param: str | None,
                   headers: dict[str, str]) -> OpenAIError:
    return OpenAIError(status, message, type=type, code=code, param=param, headers=headers)


#: ``seed`` is an int64 (OpenAI's and vLLM's type; torch's ``manual_seed`` rejects larger values).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1

# How the gateway treats a request field (the conformance table's column).
SUPPORTED = "supported"
PARTIAL = "partly supported"
REJECTED = "rejected with 400"
NOT_APPLICABLE = "not applicable"
STATUSES = (SUPPORTED, PARTIAL, REJECTED, NOT_APPLICABLE)


def _unset(value: Any) -> bool:
    """Whether a value asks for nothing: null, false, an empty string, list or object (not 0)."""
    return value is None or value is False or (isinstance(value, (str, list, dict)) and not value)


@dataclass(frozen=True)
class Support:
    """How the gateway treats one request field; see the module docstring.

    ``refuse`` maps a value to why the gateway refuses it (a 400 naming the field), or None.
    A :data:`REJECTED` field without one refuses every value that asks for something.
    """

    status: str
    note: str = ""
    refuse: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    def problem(self, value: Any) -> str | None:
        if self.refuse is not None:
            return self.refuse(value)
        if self.status == REJECTED and not _unset(value):
            return "not supported by this gateway"
        return None


def support_of(info: FieldInfo) -> Support | None:
    """The :class:`Support` of a request model's field (None: a field without one)."""
    return next((m for m in info.metadata if isinstance(m, Support)), None)


def _only(allowed: Any, message: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in allowed else message


def _invalid(param: str, problem: str) -> OpenAIError:
    return OpenAIError(400, f"Invalid value for '{param}': {problem}", param=param, code="invalid_value")


def _S(status: str, note: str = "", refuse: Callable[[Any], str | None] | None = None) -> Support:
    return Support(status, note, refuse)


class _Request(BaseModel):
    # Clients send fields this gateway does not know: ignore them, as vLLM does.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI marks its optional fields nullable: null asks for the default, like leaving it out.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}

    @model_validator(mode="after")
    def _supported(self) -> Self:
        for name, info in type(self).model_fields.items():
            support = support_of(info)
            problem = support.problem(getattr(self, name)) if support is not None else None
            if problem:
                raise _invalid(name, problem)
        self._cross_check()
        return self

    def _cross_check(self) -> None:
        """Rules between fields (a subclass's); raise :func:`_invalid` for the field at fault."""


class StreamOptions(_Request):
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    #: An assistant turn's tool calls and a tool turn's answer to one: passed to the chat template.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts: list[str] = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


_IGNORED = "accepted; no effect here"
_ENGINES = "applied by the transformers and vLLM engines; the mock engine answers 400"
_PENALTY = "applied by the transformers and vLLM engines; others (mock) answer 400 when it is not 0"
_VLLM = "vLLM's extension; " + _ENGINES
#: The most choices one request may ask for (``n``).
MAX_N = 16
_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def _structured(v: dict[str, Any]) -> StructuredOutput:
    """vLLM's ``structured_outputs`` object as a :class:`StructuredOutput` (exactly one kind set)."""
    kinds = [k for k in _STRUCTURED_KINDS if v.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise ValueError(f"set exactly one of {', '.join(_STRUCTURED_KINDS)}; got {kinds or 'none'}")
    kind, value = kinds[0], v[kinds[0]]
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "choice" and not (isinstance(value, list) and value and all(isinstance(c, str) for c in value)):
        raise ValueError("choice is a non-empty list of strings")
    if kind in ("regex", "grammar") and not isinstance(value, str):
        raise ValueError(f"{kind} is a string")
    if kind == "json" and isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("json is a JSON schema (an object, or its JSON text)") from None
    if kind == "json" and not isinstance(value, dict):
        raise ValueError("json is a JSON schema (an object, or its JSON text)")
    return StructuredOutput(kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True))


class _Sampling(_Request):
    model: Annotated[str, _S(SUPPORTED, "a configured model id, or `base:adapter` for a LoRA adapter")]
    temperature: Annotated[float, _S(SUPPORTED, "0 is greedy decoding")] = Field(1.0, ge=0.0, le=2.0)
    top_p: Annotated[float, _S(SUPPORTED)] = Field(1.0, gt=0.0, le=1.0)
    n: Annotated[int, _S(SUPPORTED, f"1 to {MAX_N} choices; `usage` counts the prompt once and every "
                                    "choice's tokens; with a `seed`, choice i is seeded with seed + i (except on "
                                    "vLLM, which seeds them itself)")] = Field(1, ge=1, le=MAX_N)
    stream: Annotated[bool, _S(SUPPORTED, "Server-Sent Events ending with `data: [DONE]`")] = False
    stream_options: Annotated[StreamOptions | None, _S(
        SUPPORTED, "`include_usage`; only with `stream: true` (else 400)")] = None
    stop: Annotated[str | list[str] | None, _S(SUPPORTED, "a string or up to 4")] = None
    seed: Annotated[int | None, _S(SUPPORTED, "an int64")] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: Annotated[float, _S(PARTIAL, _PENALTY)] = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: Annotated[float, _S(PARTIAL, _PENALTY)] = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: Annotated[dict[str, float] | None, _S(
        PARTIAL, "token id → bias in [-100, 100]; " + _ENGINES)] = None
    user: Annotated[str | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    # vLLM's extensions (its server takes them in the body; the OpenAI client sends them as extra_body).
    ignore_eos: Annotated[bool, _S(SUPPORTED, "vLLM's extension: generate past the end of sequence")] = False
    top_k: Annotated[int | None, _S(PARTIAL, _VLLM + "; 0 or -1: off")] = Field(None, ge=-1)
    min_p: Annotated[float | None, _S(PARTIAL, _VLLM)] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Annotated[float | None, _S(
        PARTIAL, _VLLM + "; divides positive logits (multiplies negative ones) of prompt and generated tokens"
    )] = Field(None, gt=0.0, le=2.0)
    min_tokens: Annotated[int | None, _S(PARTIAL, _VLLM + "; at most `max_tokens`")] = Field(None, ge=0)
    stop_token_ids: Annotated[list[int] | None, _S(PARTIAL, _VLLM)] = None
    skip_special_tokens: Annotated[bool, _S(PARTIAL, _VLLM + " when `false`")] = True
    include_stop_str_in_output: Annotated[bool, _S(SUPPORTED, "vLLM's extension: keep the stop string")] = False
    allowed_token_ids: Annotated[list[int] | None, _S(PARTIAL, _VLLM)] = None
    structured_outputs: Annotated[dict[str, Any] | None, _S(
        PARTIAL, "vLLM's extension: one of `json` (a schema), `regex`, `choice`, `grammar`, `json_object`; the "
                 "vLLM engine applies all, the transformers engine `json_object` only (others: 400)")] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _biases(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids (non-negative integers as strings), got {key[:40]!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} is {bias}; biases range from -100 to 100")
        return v

    @field_validator("stop_token_ids", "allowed_token_ids")
    @classmethod
    def _token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v and any(t < 0 for t in v):
            raise ValueError("token ids are non-negative integers")
        return v

    @field_validator("structured_outputs")
    @classmethod
    def _structured_outputs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _structured(v)
        return v

    def _cross_check(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise _invalid("stream_options", "stream_options is only allowed with stream: true")
        limit = self.max_new_tokens()
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise _invalid("min_tokens", f"min_tokens ({self.min_tokens}) must be at most max_tokens ({limit})")

    def max_new_tokens(self) -> int | None:
        return None

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def structured(self) -> StructuredOutput | None:
        return _structured(self.structured_outputs) if self.structured_outputs is not None else None

    def top_logprobs_wanted(self) -> int | None:
        return None

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        bias = tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items()))
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, stop=self.stop_list(),
            seed=self.seed, ignore_eos=self.ignore_eos, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, logit_bias=bias, n=self.n, logprobs=self.top_logprobs_wanted(),
            top_k=max(self.top_k or 0, 0), min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty if self.repetition_penalty is not None else 1.0,
            min_tokens=self.min_tokens or 0, stop_token_ids=tuple(self.stop_token_ids or ()),
            skip_special_tokens=self.skip_special_tokens, allowed_token_ids=tuple(self.allowed_token_ids or ()),
            include_stop_str_in_output=self.include_stop_str_in_output, structured=self.structured())


def _response_format(v: dict[str, Any] | None) -> str | None:
    kind = "text" if v is None else v.get("type", "text")
    if kind in ("text", "json_object"):
        return None
    if kind == "json_schema":
        spec = v.get("json_schema") if v is not None else None
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            return "json_schema needs a `json_schema` object whose `schema` is a JSON schema"
        return None
    return f"unknown response format type {kind!r}; use text, json_object or json_schema"


def _no_calls(v: Any) -> str | None:
    return None if v in (None, "none", "auto") else "only 'none' and 'auto' are supported (no function calls here)"


def _tool_choice(v: Any) -> str | None:
    if v is None or v in ("none", "auto", "required"):
        return None
    name = v.get("function", {}).get("name") if isinstance(v, dict) and v.get("type") == "function" else None
    if not isinstance(name, str) or not name:
        return "use 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": {\"name\": ...}}"
    return None


def _tools(v: list[Any] | None) -> str | None:
    for i, tool in enumerate(v or ()):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"tool {i} is not a function tool: {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}"
        if not isinstance(fn.get("parameters", {}), dict):
            return f"the parameters of tool {i} ({fn['name']}) are not a JSON schema object"
    return None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], _S(
        SUPPORTED, "text content (strings or `text` parts); roles system, developer, user, assistant, tool")] \
        = Field(min_length=1)
    max_tokens: Annotated[int | None, _S(
        SUPPORTED, "default: the engine's `default_max_tokens`, within the context")] \
        = Field(None, ge=1)
    max_completion_tokens: Annotated[int | None, _S(SUPPORTED, "wins over `max_tokens`")] = Field(None, ge=1)
    logprobs: Annotated[bool | None, _S(
        PARTIAL, "each generated token's log probability (of the model's raw distribution, before "
                 "`logit_bias`, penalties and temperature, as vLLM); " + _ENGINES)] = None
    top_logprobs: Annotated[int | None, _S(SUPPORTED, "alternatives per token; needs `logprobs: true`")] \
        = Field(None, ge=0, le=20)
    tools: Annotated[list[Any] | None, _S(
        PARTIAL, "function tools; the vLLM engine (the transformers and mock engines answer 400)", _tools)] = None
    tool_choice: Annotated[str | dict[str, Any] | None, _S(
        PARTIAL, "`none`, `auto`, `required` or a named function; other than `none`, with `tools` (vLLM)",
        _tool_choice)] = None
    functions: Annotated[list[Any] | None, _S(REJECTED, "the deprecated form of `tools`")] = None
    function_call: Annotated[str | dict[str, Any] | None, _S(PARTIAL, "`none` or `auto`", _no_calls)] = None
    parallel_tool_calls: Annotated[bool | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    response_format: Annotated[dict[str, Any] | None, _S(
        PARTIAL, "`text`; `json_object` (JSON mode: the output is one JSON object); `json_schema` on the vLLM "
                 "engine (the transformers engine answers 400)", _response_format)] = None
    modalities: Annotated[list[str] | None, _S(PARTIAL, "`[\"text\"]` only", lambda v: None if v is None or set(v)
                                               <= {"text"} else "only the 'text' modality is supported")] = None
    audio: Annotated[dict[str, Any] | None, _S(REJECTED, "audio output")] = None
    web_search_options: Annotated[dict[str, Any] | None, _S(REJECTED, "no web search here")] = None
    moderation: Annotated[dict[str, Any] | None, _S(REJECTED, "no moderation model here")] = None
    prediction: Annotated[dict[str, Any] | None, _S(NOT_APPLICABLE, "a latency hint; " + _IGNORED)] = None
    reasoning_effort: Annotated[str | None, _S(NOT_APPLICABLE, "for reasoning models; " + _IGNORED)] = None
    verbosity: Annotated[str | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    metadata: Annotated[dict[str, str] | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    store: Annotated[bool | None, _S(NOT_APPLICABLE, "nothing is stored")] = None
    service_tier: Annotated[str | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    safety_identifier: Annotated[str | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    prompt_cache_key: Annotated[str | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    prompt_cache_retention: Annotated[str | None, _S(NOT_APPLICABLE, _IGNORED)] = None
    prompt_cache_options: Annotated[dict[str, Any] | None, _S(NOT_APPLICABLE, _IGNORED)] = None

    def _cross_check(self) -> None:
        super()._cross_check()
        if self.top_logprobs is not None and not self.logprobs:
            raise _invalid("top_logprobs", "top_logprobs needs logprobs: true")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not self.tools:
            raise _invalid("tool_choice", "tool_choice needs tools")
        if isinstance(choice, dict):
            names = [t["function"]["name"] for t in self.tools or ()]
            if choice["function"]["name"] not in names:
                raise _invalid("tool_choice", f"the function {choice['function']['name']!r} is not in tools")
        fmt = (self.response_format or {}).get("type", "text")
        if fmt != "text" and self.structured_outputs is not None:
            raise _invalid("structured_outputs", "use response_format or structured_outputs, not both")
        if self.tools and choice not in (None, "none", "auto") and (fmt != "text" or self.structured_outputs):
            raise _invalid("tool_choice", f"tool_choice {choice if isinstance(choice, str) else 'named'} cannot be "
                                          "combined with response_format or structured_outputs")

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def structured(self) -> StructuredOutput | None:
        fmt = self.response_format or {}
        if fmt.get("type") == "json_object":
            return StructuredOutput("json_object", param="response_format")
        if fmt.get("type") == "json_schema":
            return StructuredOutput("json", json.dumps(fmt["json_schema"].get("schema", {}), sort_keys=True),
                                    param="response_format")
        return super().structured()

    def tool_list(self) -> tuple[dict[str, Any], ...]:
        return tuple(self.tools or ())

    def chat_messages(self) -> tuple[dict[str, Any], ...]:
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        out: list[dict[str, Any]] = []
        for m in self.messages:
            message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            message.update({k: v for k, v in (("tool_calls", m.tool_calls), ("tool_call_id", m.tool_call_id),
                                              ("name", m.name)) if v is not None})
            out.append(message)
        return tuple(out)


def _one_prompt(v: Any) -> str | None:
    if isinstance(v, list) and len(v) != 1:
        return "exactly one prompt is supported (a string or a list of one string)"
    return None


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (the legacy text completion API)."""

    prompt: Annotated[str | list[str], _S(PARTIAL, "one string (or a list of one); token arrays are refused",
                                          _one_prompt)]
    max_tokens: Annotated[int, _S(SUPPORTED)] = Field(16, ge=1)
    echo: Annotated[bool, _S(REJECTED, "`true` is refused")] = False
    suffix: Annotated[str | None, _S(REJECTED, "insertion is not implemented")] = None
    logprobs: Annotated[int | None, _S(
        PARTIAL, "log probabilities of each token and this many alternatives (the model's raw distribution); "
                 + _ENGINES)] = Field(None, ge=0, le=5)
    best_of: Annotated[int | None, _S(PARTIAL, "1 only", _only((None, 1), "only best_of=1 is supported"))] = None

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings``."""

    model: Annotated[str, _S(SUPPORTED, "a configured embedding model id")]
    input: Annotated[str | list[str], _S(PARTIAL, "strings, each within the model's context (else 400); token "
                                                  "arrays are refused")]
    encoding_format: Annotated[Literal["float", "base64"], _S(SUPPORTED)] = "float"
    dimensions: Annotated[int | None, _S(PARTIAL, "the model's own number only")] = Field(None, ge=1)
    user: Annotated[str | None, _S(NOT_APPLICABLE, _IGNORED)] = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_inputs(cls, v: Any) -> Any:
        if isinstance(v, list) and v and not all(isinstance(x, str) for x in v):
            raise ValueError("only text inputs are supported (a string or a list of strings), not token arrays")
        if isinstance(v, list) and not v:
            raise ValueError("input must not be empty")
        return v

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


#: The request model of each endpoint (what the conformance table documents).
ENDPOINTS: dict[str, type[_Request]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
}


def _surrogate_at(value: Any, path: tuple[str, ...] = ()) -> tuple[str, ...] | None:
    """Where ``value`` (parsed JSON) holds a string with a lone UTF-16 surrogate, or None."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            found = _surrogate_at(k, path) or _surrogate_at(v, (*path, str(k)))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = _surrogate_at(v, (*path, str(i)))
            if found is not None:
                return found
    return None


def _is_type_tag(part: Any) -> bool:
    # pydantic names the member of a union that failed ("str", "list[str]", "function-after[...]").
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def parse_request(model: type[_Request], body: Any) -> Any:
    """Validate a JSON body; a problem is a 400 naming the first offending field as ``param``."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    where = _surrogate_at(body)
    if where is not None:
        param = ".".join(where) or None
        raise OpenAIError(400, f"Invalid value for '{param}': the string holds a lone UTF-16 surrogate (an "
                               "unpaired \\ud800-\\udfff escape), which is not valid Unicode text.",
                          param=param, code="invalid_value")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"] if not _is_type_tag(p)]
        param = ".".join(loc) or None
        msg = err["msg"].removeprefix("Value error, ")
        missing = err["type"] == "missing"
        text = f"Missing required parameter: '{param}'." if missing else f"Invalid value for '{param}': {msg}"
        raise OpenAIError(400, text, param=param, code="missing_required_parameter" if missing else "invalid_value"
                          ) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict[str, Any] | str) -> str:
    """One Server-Sent Event: ``data: <json>`` and a blank line (``data: [DONE]`` for the end)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
