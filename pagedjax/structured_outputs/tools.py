"""Forced tool calls (tool_choice "required" or a named function): the constraint, and its output
as OpenAI `tool_calls` (host only). vLLM's approach:

  named function  the output is the function's arguments: a JSON value of its parameters schema
  "required"      the output is a JSON array (at least one item; at most one without
                  parallel_tool_calls) of {"name": <a function>, "parameters": <its arguments>},
                  `anyOf` over the functions, no other keys; their `$defs` are hoisted to the root
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from pagedjax.structured_outputs.params import StructuredOutputsParams
from pagedjax.tool_parsers.stream import Malformed, TextStream
from pagedjax.tool_parsers.types import ToolCall, assemble

_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


def function_specs(tools: Sequence[Any] | None) -> dict[str, dict]:
    """{name: parameters schema} of OpenAI `tools` ([{"type": "function", "function": {...}}])."""
    specs: dict[str, dict] = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{...}}}}.')
        name, params = fn.get("name"), fn.get("parameters")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tools[{i}].function.name must be a non-empty string.")
        if name in specs:
            raise ValueError(f"tools[{i}]: a second function named {name!r}.")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object.")
        specs[name] = params if params else _EMPTY_PARAMETERS
    return specs


def forced_function_name(tool_choice: Any) -> str | None:
    """The function a named tool_choice forces ({"type": "function", "function": {"name": ...}}), if any."""
    if not isinstance(tool_choice, dict):
        return None
    fn = tool_choice.get("function")
    if tool_choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('tool_choice must be "none", "auto", "required" or '
                         '{"type": "function", "function": {"name": ...}}.')
    return fn["name"]


def tool_choice_structured_outputs(tools: Sequence[Any] | None, tool_choice: Any, *,
                                   parallel_tool_calls: bool = True) -> StructuredOutputsParams | None:
    """The constraint that forces `tool_choice` ("required" or a named function); None otherwise."""
    specs = function_specs(tools)
    if tool_choice in (None, "none", "auto"):
        return None
    name = forced_function_name(tool_choice)
    if name is not None:
        if name not in specs:
            known = ", ".join(specs) or "none"
            raise ValueError(f"tool_choice names {name!r}, which is not among the tools ({known}).")
        return StructuredOutputsParams(json=specs[name])
    if tool_choice != "required":
        raise ValueError(f'tool_choice must be "none", "auto", "required" or a named function, got {tool_choice!r}.')
    if not specs:
        raise ValueError('tool_choice "required" needs at least one tool.')
    defs: dict[str, Any] = {}
    branches = []
    for fn_name, params in specs.items():
        params = copy.deepcopy(params)
        for key in ("$defs", "definitions"):  # "#/$defs/X" refs resolve from the root
            for def_name, d in (params.pop(key, None) or {}).items():
                if defs.setdefault(def_name, d) != d:
                    raise ValueError(f"two tools define ${key.strip('$')} {def_name!r} differently; "
                                     "rename one for tool_choice 'required'.")
        branches.append({"properties": {"name": {"type": "string", "enum": [fn_name]}, "parameters": params},
                         "required": ["name", "parameters"], "additionalProperties": False})
    schema: dict[str, Any] = {"type": "array", "minItems": 1,
                              "items": {"type": "object", "anyOf": branches}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return StructuredOutputsParams(json=schema)


def forced_tool_calls(text: str, tool_choice: Any) -> list[ToolCall]:
    """The tool calls of a forced output (ValueError if it does not parse, e.g. cut off by max_tokens)."""
    parser = ForcedToolCallParser(forced_function_name(tool_choice))
    msg = assemble(parser.feed(text) + parser.finish())
    if parser.failed is not None:
        raise ValueError(f"the forced tool call output does not parse: {parser.failed}")
    return msg.tool_calls


class ForcedToolCallParser(TextStream):
    """Streams a forced output as tool-call deltas: the arguments of `function_name`, or (None) the
    "required" array of {"name", "parameters"} objects."""

    def __init__(self, function_name: str | None = None):
        super().__init__()
        self.function_name = function_name

    def _parse(self):
        if self.function_name is not None:
            self.start_tool_call(self.function_name)
            yield from self.json_value(self.emit_arguments)
        else:
            if (yield from self.skip_ws()) != "[":
                raise Malformed("a forced tool call output must be a JSON array")
            self.i += 1
            while True:
                yield from self.tool_call_object(args_keys=("parameters",))
                c = yield from self.skip_ws()
                if c is None:
                    raise Malformed("the tool call array is not closed")
                self.i += 1
                if c == "]":
                    break
                if c != ",":
                    raise Malformed(f"expected ',' or ']' between tool calls, got {c!r}")
        if (yield from self.skip_ws()) is not None:
            raise Malformed("text after the forced tool calls")

