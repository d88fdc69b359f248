"""The gateway's request models against OpenAI's API: every field has a documented treatment,
null means the default, refused values are 400s naming the field, and docs/llm-gateway.md's
conformance table is what shoal.llm.conformance generates from the models now.

No sockets and no engine here; the gateway itself is tested in tests/e2e/test_llm_conformance.py.
"""

from __future__ import annotations

import json
import shutil
import typing
from pathlib import Path
from typing import Any

import pytest

from shoal.llm import conformance
from shoal.llm._protocol import (
    ENDPOINTS,
    NOT_APPLICABLE,
    REJECTED,
    OpenAIError,
    parse_request,
    support_of,
)
from shoal.runtime.http.errors import OPENAI_INGRESSES, refusal_body

ROOT = Path(__file__).resolve().parents[2]
REQUIRED: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "m", "prompt": "hi"},
    "/v1/embeddings": {"model": "m", "input": "hi"},
}


def fields(*statuses: str) -> list[Any]:
    return [pytest.param(path, name, id=f"{path}:{name}")
            for path, model in ENDPOINTS.items() for name, info in model.model_fields.items()
            if not info.is_required() and (not statuses or support_of(info).status in statuses)]  # type: ignore[union-attr]


def refused(path: str, body: dict[str, Any]) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse_request(ENDPOINTS[path], {**REQUIRED[path], **body})
    assert caught.value.status == 400
    return caught.value


def test_the_docs_table_is_what_the_models_generate() -> None:
    page = (ROOT / "docs" / "llm-gateway.md").read_text(encoding="utf-8")
    assert conformance.BEGIN in page and conformance.END in page
    assert conformance.render_page(page) == page, \
        "docs/llm-gateway.md's conformance table is stale: run `python -m shoal.llm.conformance`"
    assert conformance.conformance_table() in page


def test_the_command_rewrites_and_checks_a_page(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    shutil.copy(ROOT / "docs" / "llm-gateway.md", page)
    assert conformance.main(["--check", "--page", str(page)]) == 0
    page.write_text(page.read_text().replace("| `seed` | supported |", "| `seed` | rejected with 400 |"))
    assert conformance.main(["--check", "--page", str(page)]) == 1
    assert conformance.main(["--page", str(page)]) == 0
    assert conformance.main(["--check", "--page", str(page)]) == 0
    with pytest.raises(ValueError, match="markers"):
        conformance.render_page("# no markers")


def test_every_field_says_how_the_gateway_treats_it() -> None:
    for model in ENDPOINTS.values():
        for name, info in model.model_fields.items():
            assert support_of(info) is not None, f"{model.__name__}.{name}"


def test_every_parameter_of_the_openai_client_is_a_field() -> None:
    """The official client's request parameters (of the version installed) are all in the
    models, so the table documents each one (none falls through as an unknown field)."""
    pytest.importorskip("openai")
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.chat import completion_create_params as chat_params

    for path, params in [("/v1/chat/completions", chat_params.CompletionCreateParamsStreaming),
                         ("/v1/completions", completion_create_params.CompletionCreateParamsStreaming),
                         ("/v1/embeddings", embedding_create_params.EmbeddingCreateParams)]:
        names = set(typing.get_type_hints(params))
        missing = sorted(names - set(ENDPOINTS[path].model_fields))
        assert not missing, f"{path}: parameters of the openai client without a field: {missing}"


@pytest.mark.parametrize(("path", "name"), fields())
def test_null_means_the_default(path: str, name: str) -> None:
    model = ENDPOINTS[path]
    with_null = parse_request(model, {**REQUIRED[path], name: None})
    assert with_null == parse_request(model, REQUIRED[path])
    assert getattr(with_null, name) == model.model_fields[name].default


_SAMPLES = {"boolean": True, "integer": 1, "string": "x", "object": {"type": "x"}, "array": [{"type": "x"}]}


@pytest.mark.parametrize(("path", "name"), fields(REJECTED))
def test_rejected_fields_are_a_400_naming_them(path: str, name: str) -> None:
    kind = conformance._json_type(ENDPOINTS[path].model_fields[name].annotation).split(" or ")[0]
    error = refused(path, {name: _SAMPLES[kind]})
    assert error.param == name and error.code == "invalid_value", error.message
    assert error.body()["error"]["message"].startswith(f"Invalid value for '{name}'")


@pytest.mark.parametrize(("path", "name"), fields(NOT_APPLICABLE))
def test_fields_without_effect_are_accepted(path: str, name: str) -> None:
    kind = conformance._json_type(ENDPOINTS[path].model_fields[name].annotation).split(" or ")[0]
    value = {"object": {"k": "v"}}.get(kind, _SAMPLES[kind])
    parse_request(ENDPOINTS[path], {**REQUIRED[path], name: value})


@pytest.mark.parametrize(("body", "param"), [
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": False, "stream_options": {}}, "stream_options"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "g"}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "g"}}], "tool_choice": "any"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "g", "parameters": "x"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "g"}}], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"function_call": {"name": "f"}}, "function_call"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}}, "response_format"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"allowed_token_ids": [3, -4]}, "allowed_token_ids"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_partly_supported_fields_refuse_other_values(body: dict[str, Any], param: str) -> None:
    assert refused("/v1/chat/completions", body).param == param


def test_partly_supported_fields_take_their_supported_values() -> None:
    chat = parse_request(ENDPOINTS["/v1/chat/completions"], {
        **REQUIRED["/v1/chat/completions"], "n": 1, "tool_choice": "none", "function_call": "auto",
        "response_format": {"type": "text"}, "modalities": ["text"], "stream": True,
        "stream_options": {"include_usage": None}, "logit_bias": {"7": -100, "3": 2.5}, "logprobs": False})
    assert chat.sampling(None).logit_bias == ((3, 2.5), (7, -100.0))
    assert chat.sampling(None).logprobs is None and chat.sampling(None).structured is None
    assert not chat.include_usage()
    text = parse_request(ENDPOINTS["/v1/completions"], {"model": "m", "prompt": ["one"], "best_of": 1,
                                                        "echo": False, "max_tokens": None})
    assert text.text() == "one" and text.max_tokens == 16
    assert refused("/v1/completions", {"prompt": ["a", "b"]}).param == "prompt"
    assert refused("/v1/completions", {"logprobs": 6}).param == "logprobs"
    assert refused("/v1/completions", {"echo": True}).param == "echo"


def test_sampling_parameters_reach_the_engine() -> None:
    chat = parse_request(ENDPOINTS["/v1/chat/completions"], {
        **REQUIRED["/v1/chat/completions"], "n": 3, "logprobs": True, "top_logprobs": 4, "top_k": -1, "min_p": 0.05,
        "repetition_penalty": 1.1, "min_tokens": 2, "stop_token_ids": [9, 8], "skip_special_tokens": False,
        "allowed_token_ids": [1, 2], "include_stop_str_in_output": True, "max_tokens": 9,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "object"}}}})
    s = chat.sampling(chat.max_new_tokens())
    assert (s.n, s.logprobs, s.top_k, s.min_p, s.repetition_penalty, s.min_tokens) == (3, 4, 0, 0.05, 1.1, 2)
    assert (s.stop_token_ids, s.allowed_token_ids, s.skip_special_tokens) == ((9, 8), (1, 2), False)
    assert s.include_stop_str_in_output and s.max_tokens == 9
    assert s.structured is not None and (s.structured.kind, s.structured.param) == ("json", "response_format")
    assert json.loads(s.structured.spec) == {"type": "object"}
    plain = parse_request(ENDPOINTS["/v1/chat/completions"], {**REQUIRED["/v1/chat/completions"], "logprobs": True})
    assert plain.sampling(None).logprobs == 0  # logprobs without top_logprobs: the token's own only
    mode = parse_request(ENDPOINTS["/v1/chat/completions"], {**REQUIRED["/v1/chat/completions"],
                                                             "response_format": {"type": "json_object"}})
    assert mode.sampling(None).structured is not None and mode.sampling(None).structured.kind == "json_object"
    text = parse_request(ENDPOINTS["/v1/completions"], {"model": "m", "prompt": "p", "logprobs": 0, "top_k": 5,
                                                        "structured_outputs": {"choice": ["yes", "no"]}})
    t = text.sampling(text.max_tokens)
    assert t.logprobs == 0 and t.top_k == 5 and t.structured is not None
    assert (t.structured.kind, json.loads(t.structured.spec), t.structured.param) == (
        "choice", ["yes", "no"], "structured_outputs")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    call = [{"id": "c", "type": "function"}]
    called = parse_request(ENDPOINTS["/v1/chat/completions"], {
        **REQUIRED["/v1/chat/completions"], "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "f"}},
        "messages": [{"role": "assistant", "content": None, "tool_calls": call},
                     {"role": "tool", "tool_call_id": "c", "content": "42"}]})
    assert called.tool_list() == tuple(tools)
    assert called.chat_messages() == ({"role": "assistant", "content": "", "tool_calls": call},
                                      {"role": "tool", "content": "42", "tool_call_id": "c"})


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages.0.content.0.text"),
    ("/v1/chat/completions", {"user": "\ud83d"}, "user"),
    ("/v1/completions", {"prompt": ["\ud800"]}, "prompt.0"),
    ("/v1/completions", {"suffix": "x\udfff"}, "suffix"),
    ("/v1/embeddings", {"input": ["ok", "no\ud800"]}, "input.1"),
    ("/v1/embeddings", {"metadata": {"k\ud800": "v"}}, "metadata"),
])
def test_a_lone_surrogate_is_refused_where_it_is(path: str, body: dict[str, Any], param: str) -> None:
    error = refused(path, body)
    assert error.param == param and "surrogate" in error.message
    # A complete pair (JSON's "\\ud83d\\ude00") is ordinary text.
    parse_request(ENDPOINTS[path], {**REQUIRED[path], "user": json.loads('"\\ud83d\\ude00"')})


def test_the_fronts_refusal_on_the_gateways_routes_is_openai_shaped() -> None:
    assert "OpenAiIngress" in OPENAI_INGRESSES
    body = refusal_body(413, "rid", "OpenAiIngress")
    assert body == {"error": {"message": "Request body too large for this server.", "type": "invalid_request_error",
                              "param": None, "code": "request_too_large"}}
    assert refusal_body(413, "rid", "SomethingElse") == {"error": "request body too large", "request_id": "rid"}
    assert refusal_body(413, "rid") == {"error": "request body too large", "request_id": "rid"}
