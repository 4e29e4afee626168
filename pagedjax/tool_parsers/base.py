"""The tool-call parser interface: one instance per request (host only).

Non-streamed: `extract_tool_calls(text) -> (content, tool_calls)`. Streamed: `feed(delta_text)`
for each piece of output text, then `finish()`; each returns `DeltaMessage`s (content deltas; per
call its id and name, then argument fragments). The non-streamed result is the stream of the whole
text: joining the streamed deltas gives it exactly, however the text was cut, as long as the calls
are well formed. Malformed call text falls back to content: non-streamed, the whole text is the
content with no calls (vLLM's behaviour); streamed, the text from the point where it broke is
content (all of it from the start of the tool-call region if no call had gone out yet).

The output must be decoded with the special tokens kept (`skip_special_tokens=False`) when the
markers are special tokens ([TOOL_CALLS], <|python_tag|>, and <tool_call> in some tokenizers).
"""

from __future__ import annotations

from typing import ClassVar

from pagedjax.tool_parsers.stream import TextStream
from pagedjax.tool_parsers.types import ToolCall, assemble


class ToolParser(TextStream):
    """A model family's tool-call format; subclasses write `_parse()`."""

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]]  # text that starts tool calls: decode with special tokens kept

    def extract_tool_calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a whole output; content is None when calls took all of it."""
        parser = type(self)()
        msg = assemble(parser.feed(text) + parser.finish())
        if parser.failed is not None or not msg.tool_calls:
            return text, []
        return msg.content or None, msg.tool_calls
