"""Hermes / Qwen tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated.

The format of NousResearch's Hermes-2-Pro and of Qwen2.5 / Qwen3, whose chat templates instruct:
"For each function call, return a json object with function name and arguments within
<tool_call></tool_call> XML tags". Text outside the tags is content (vLLM's `hermes` parser keeps
only the text before the first call); whitespace right after a closing tag is dropped. A missing
final `</tool_call>` (the model stopped right after the object) is accepted.
"""

from __future__ import annotations

from pagedjax.tool_parsers.base import ToolParser
from pagedjax.tool_parsers.stream import Malformed

START, END = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = (START, END)

    def _parse(self):
        while True:
            marker = yield from self.text_until([START], self.emit_content)
            if marker is None:
                return
            self.rewind_to = self.i - len(START)
            yield from self.tool_call_object()
            yield from self.skip_ws()
            if not (yield from self.accept(END)) and (yield from self.peek()) is not None:
                raise Malformed(f"expected {END} after the tool call")
            yield from self.skip_ws()
