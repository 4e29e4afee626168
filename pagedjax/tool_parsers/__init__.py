"""Tool-call parsers for what models write when they call tools unforced (tool_choice="auto").

    parser = get_tool_parser("hermes")()          # one instance per request
    content, tool_calls = parser.extract_tool_calls(text)
    for piece in pieces: deltas = parser.feed(piece)   # streamed; then parser.finish()
"""

from pagedjax.tool_parsers.base import ToolParser
from pagedjax.tool_parsers.hermes import HermesToolParser
from pagedjax.tool_parsers.llama3_json import Llama3JsonToolParser
from pagedjax.tool_parsers.mistral import MistralToolParser
from pagedjax.tool_parsers.types import DeltaMessage, DeltaToolCall, ToolCall, assemble, make_tool_call_id

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name` (`--tool-call-parser`)."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {', '.join(sorted(TOOL_PARSERS))}.") from None


__all__ = ["TOOL_PARSERS", "DeltaMessage", "DeltaToolCall", "ToolCall", "ToolParser", "assemble",
           "get_tool_parser", "make_tool_call_id"]
