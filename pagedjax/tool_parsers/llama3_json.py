"""Llama 3.x JSON tool calls: `{"name": ..., "parameters": {...}}`, several separated by `;`.

Meta's Llama 3.1 / 3.2 / 3.3 prompt format for custom tools ("JSON based tool calling"): the model
answers with the JSON object alone, optionally after `<|python_tag|>` (the token that opens tool
code; vLLM's `llama3_json` accepts both), "arguments" in place of "parameters" taken too. An output
is a tool call when its first non-space character is `{`, or from a `<|python_tag|>` on (text
before the tag is content); otherwise it is all content.
"""

from __future__ import annotations

from pagedjax.tool_parsers.base import ToolParser

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def _parse(self):
        if (yield from self.peek_non_ws()) == "{":
            self.rewind_to = 0
            yield from self._calls()
        while True:
            marker = yield from self.text_until([PYTHON_TAG], self.emit_content)
            if marker is None:
                return
            self.rewind_to = self.i - len(PYTHON_TAG)
            yield from self._calls()

    def _calls(self):
        while True:
            yield from self.tool_call_object()
            if (yield from self.skip_ws(";")) != "{":
                return
