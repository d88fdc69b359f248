"""Tool calls (OpenAI's ``tools`` and ``tool_choice``) around an engine that generates text.

``tool_choice``:

* ``"none"``: the tools are rendered into the prompt by the chat template; the answer is text.
* a named function (``{"type": "function", "function": {"name": "f"}}``): the output is
  constrained to a JSON object matching ``f``'s ``parameters`` schema (the engine's
  structured outputs) and answered as one call of ``f`` with that object as its arguments.
* ``"required"``: the output is constrained to a JSON array of ``{"name", "parameters"}``
  objects, one of the tools each, and answered as those calls (``finish_reason: tool_calls``).
* ``"auto"`` (the default with tools): the model decides; the engine's tool-call parser (vLLM's
  ``tool_call_parser``, which knows the model's format) finds the calls in the text.

These are the rules vLLM's server follows. The text of a choice with tool calls is held back
until the choice ends, then sent with its calls in one chunk.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.llm.engines._base import InvalidParameterError, StructuredOutput

__all__ = ["ToolPlan", "plan_tools"]


def _function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    fn: Mapping[str, Any] = tool.get("function") or {}
    return fn


def _parameters(tool: Mapping[str, Any]) -> dict[str, Any]:
    params = _function(tool).get("parameters")
    return dict(params) if isinstance(params, Mapping) else {"type": "object", "properties": {}}


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tool calls are made: ``mode`` ``auto``, ``required`` or ``named``."""

    mode: str
    tools: tuple[Mapping[str, Any], ...]
    name: str | None = None

    @property
    def structured(self) -> StructuredOutput | None:
        """The constraint on the output that ``required`` and ``named`` need (None for ``auto``)."""
        if self.mode == "named":
            tool = next(t for t in self.tools if _function(t).get("name") == self.name)
            return StructuredOutput("json", json.dumps(_parameters(tool), sort_keys=True), param="tool_choice")
        if self.mode == "required":
            items = [{"type": "object", "properties": {"name": {"type": "string", "enum": [_function(t)["name"]]},
                                                       "parameters": _parameters(t)},
                      "required": ["name", "parameters"]} for t in self.tools]
            schema = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
            return StructuredOutput("json", json.dumps(schema, sort_keys=True), param="tool_choice")
        return None

    def calls(self, text: str, finish_reason: str, engine: Any) -> tuple[str, list[dict[str, Any]], str]:
        """The choice's content, its tool calls and finish reason, from its whole text."""
        if self.mode == "named":
            assert self.name is not None
            return "", [_call(self.name, text)], finish_reason
        if self.mode == "required":
            try:
                items = json.loads(text)
                calls = [_call(str(item["name"]), json.dumps(item["parameters"])) for item in items]
            except (ValueError, TypeError, KeyError):  # cut short (max_tokens): the text as it is
                return text, [], finish_reason
            return "", calls, "tool_calls" if finish_reason == "stop" else finish_reason
        content, found = engine.extract_tool_calls(text, self.tools)
        calls = [_call(str(c["name"]), c["arguments"] if isinstance(c["arguments"], str)
                       else json.dumps(c["arguments"])) for c in found]
        return content, calls, "tool_calls" if calls and finish_reason == "stop" else finish_reason


def plan_tools(tools: Sequence[Mapping[str, Any]], tool_choice: Any, engine: Any) -> ToolPlan | None:
    """The :class:`ToolPlan` of a request, None when it makes no calls (no tools, or ``none``);
    an :class:`InvalidParameterError` when the engine cannot make them."""
    if not tools:
        return None
    features: frozenset[str] = getattr(engine, "sampling_features", frozenset())
    if "tools" not in features:
        raise InvalidParameterError("tools", f"tools is not supported by this engine (the {engine.name} engine); "
                                             "the vLLM engine supports it.")
    choice: Any = tool_choice if tool_choice is not None else "auto"
    if choice == "none":
        return None
    if choice == "auto":
        if not getattr(engine, "tool_call_parser", None):
            raise InvalidParameterError(
                "tool_choice", f"tool_choice 'auto' needs a tool-call parser for the model's format: set the "
                               f"{engine.name} engine's `tool_call_parser` (engine_kwargs), or use 'required' or a "
                               "named function.")
        return ToolPlan("auto", tuple(tools))
    if choice == "required":
        return ToolPlan("required", tuple(tools))
    return ToolPlan("named", tuple(tools), str(choice["function"]["name"]))
