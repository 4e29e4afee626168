"""A request's output constraint, tool use and token controls, from its OpenAI / vLLM fields
(host only). Errors are `FieldError`s: a ValueError that names the request field (the 400's param).

Tool use follows vLLM: tool_choice defaults to "auto" when tools are given ("none" otherwise);
"auto" needs a tool-call parser (`--tool-call-parser`); "required" and a named function force the
output with a grammar, so the arguments always validate against the function's schema; a forced
call and another output constraint cannot both be given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedjax.structured_outputs.params import StructuredOutputsParams
from pagedjax.structured_outputs.request import structured_outputs_from_request
from pagedjax.structured_outputs.tools import forced_function_name, function_specs, tool_choice_structured_outputs

CONSTRAINT_FIELDS = ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                     "guided_grammar", "guided_json_object", "guided_decoding_backend", "guided_whitespace_pattern")


class FieldError(ValueError):
    """Bad input in one request field."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolUse:
    """How a chat request uses its tools."""

    choice: str  # "none", "auto", "required" or "named"
    constraint: StructuredOutputsParams | None = None  # the forced call's grammar ("required", "named")
    function_name: str | None = None  # "named": the function


def output_constraint(req: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint (response_format, structured_outputs or guided_*) and the field it came in."""
    fields = {name: getattr(req, name, None) for name in CONSTRAINT_FIELDS}
    given = [name for name, value in fields.items() if value is not None and name != "guided_decoding_backend"]
    try:
        constraint = structured_outputs_from_request(fields)
    except ValueError as e:
        param = "guided_decoding_backend" if "guided_decoding_backend" in str(e) else (given[-1] if given else None)
        raise FieldError(str(e), param) from None
    return constraint, given[0] if constraint is not None else None


def tool_use(req: Any, *, auto_parser: str | None) -> ToolUse:
    """How the request uses tools; FieldError for malformed tools or an impossible tool_choice."""
    try:
        function_specs(req.tools)
    except ValueError as e:
        raise FieldError(str(e), "tools") from None
    choice = req.tool_choice
    if choice is None:
        choice = "auto" if req.tools else "none"
    if choice == "none" or (choice == "auto" and not req.tools):
        return ToolUse("none")
    if choice == "auto":
        if auto_parser is None:
            raise FieldError('tool_choice "auto" (the default when tools are given) needs a tool call parser: start '
                             'the server with --tool-call-parser (hermes, llama3_json or mistral), or send '
                             'tool_choice "none", "required" or a named function',
                             "tools" if req.tool_choice is None else "tool_choice")
        return ToolUse("auto")
    try:
        constraint = tool_choice_structured_outputs(req.tools, choice,
                                                    parallel_tool_calls=req.parallel_tool_calls is not False)
        name = forced_function_name(choice)
    except ValueError as e:
        raise FieldError(str(e), "tool_choice") from None
    return ToolUse("named" if name is not None else "required", constraint, name)


def logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias (token ids as JSON keys) keyed by int; SamplingParams clamps the values."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise FieldError(f"logit_bias keys must be token ids (integers), got {key!r}", "logit_bias") from None
    return out
