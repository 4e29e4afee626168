"""Mistral tool calls, both generations of the format.

Before tokenizer v11 (Mistral-7B-Instruct-v0.3, Mistral-Nemo, Mistral-Large-2407; mistral-common's
`InstructTokenizerV3`): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
From v11 on (Mistral-Small-3.x, Magistral, Devstral; `InstructTokenizerV11`):
`[TOOL_CALLS]name[ARGS]{...}`, one `[TOOL_CALLS]` per call (vLLM also accepts `name{...}`, as
some decodings drop `[ARGS]`). Text before `[TOOL_CALLS]` is content. Ids are 9 letters and
digits: Mistral's chat templates reject any other id when the conversation comes back.
"""

from __future__ import annotations

from pagedjax.tool_parsers.base import ToolParser
from pagedjax.tool_parsers.stream import Malformed
from pagedjax.tool_parsers.types import make_tool_call_id

TOOL_CALLS, ARGS = "[TOOL_CALLS]", "[ARGS]"


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = (TOOL_CALLS, ARGS)

    def new_tool_call_id(self) -> str:
        return make_tool_call_id(9, prefix="")

    def _parse(self):
        while True:
            marker = yield from self.text_until([TOOL_CALLS], self.emit_content)
            if marker is None:
                return
            self.rewind_to = self.i - len(TOOL_CALLS)
            if (yield from self.skip_ws()) == "[":
                yield from self._call_array()
            else:
                yield from self._named_call()
            yield from self.skip_ws()

    def _call_array(self):
        self.i += 1
        if (yield from self.skip_ws()) == "]":
            self.i += 1
            return
        while True:
            yield from self.tool_call_object()
            c = yield from self.skip_ws()
            if c is None:
                raise Malformed("the Mistral tool call array is not closed")
            self.i += 1
            if c == "]":
                return
            if c != ",":
                raise Malformed(f"expected ',' or ']' between Mistral tool calls, got {c!r}")

    def _named_call(self):
        name = []
        if (yield from self.text_until([ARGS, "{"], name.append)) is None:
            raise Malformed("a Mistral tool call name without arguments")
        if self.buf[self.i - 1] == "{":
            self.i -= 1  # the brace opens the arguments
        name = "".join(name).strip()
        if not name or any(c in name for c in ' "{}[]'):
            raise Malformed(f"invalid Mistral tool call name {name!r}")
        self.start_tool_call(name)
        args = yield from self.json_value(self.emit_arguments)
        if not isinstance(args, dict):
            raise Malformed("Mistral tool call arguments must be a JSON object")
