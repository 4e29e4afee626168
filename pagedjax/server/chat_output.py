"""One chat choice's output text -> OpenAI message parts: reasoning_content, content, tool_calls
(host only).

The text goes through the reasoning parser first (`--reasoning-parser`), whose content goes into
the tool-call parser: the one of `--tool-call-parser` for tool_choice "auto", or the forced-call
parser for "required" and a named function. Streamed, each piece of text gives `DeltaMessage`s
(a tool call's id and name first, then argument fragments); non-streamed, the message is the
same stream in one piece, so both agree. Malformed tool-call text falls back to content (the
whole content when nothing of it parsed, vLLM's behaviour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from pagedjax.reasoning import ReasoningParser
from pagedjax.tool_parsers.stream import TextStream
from pagedjax.tool_parsers.types import DeltaMessage, ToolCall, assemble


@dataclass
class ChatMessageParts:
    """A whole choice's message."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ChoiceParser:
    """Parses one choice's text as it streams: reasoning, then tool calls; one per choice."""

    def __init__(self, reasoning: ReasoningParser | None = None, tools: TextStream | None = None, *,
                 include_reasoning: bool = True, forced: str | None = None, tokenizer: Any = None):
        self.reasoning = reasoning
        self.tools = tools
        self.include_reasoning = include_reasoning
        self.forced = forced  # None (auto or no tools), "required" or "named"
        self.tokenizer = tokenizer
        self._deltas: list[DeltaMessage] = []  # everything emitted: the non-streamed message
        self._content: list[str] = []  # the text after reasoning, as the tool parser got it

    @property
    def needs_special_tokens(self) -> bool:
        """Whether a marker the parsers look for is a special token: decode with special tokens kept
        (skip_special_tokens=False), or the marker never shows in the text."""
        markers = list(getattr(self.tools, "markers", ()))
        if self.reasoning is not None:
            markers += [self.reasoning.start_token, self.reasoning.end_token]
        if not markers or self.tokenizer is None:
            return False
        special = set(self.tokenizer.all_special_ids)
        return any(i in special for i in self.tokenizer.convert_tokens_to_ids(markers) if i is not None)

    @property
    def active(self) -> bool:
        """Whether anything parses the text (else it is all content, as it comes)."""
        return self.reasoning is not None or self.tools is not None

    def feed(self, text: str) -> list[DeltaMessage]:
        """The deltas that `text`, appended to the choice's output, decides."""
        if not text:
            return []
        return self._emit(self.reasoning.feed(text) if self.reasoning is not None else [DeltaMessage(content=text)])

    def finish(self) -> list[DeltaMessage]:
        """The deltas held back until the end of the output."""
        out = self._emit(self.reasoning.finish() if self.reasoning is not None else [])
        if self.tools is not None:
            out += self._keep(self.tools.finish())
        return out

    def _emit(self, deltas: list[DeltaMessage]) -> list[DeltaMessage]:
        out = []
        for d in deltas:
            if d.reasoning_content is not None and self.include_reasoning:
                out.append(DeltaMessage(reasoning_content=d.reasoning_content))
            if d.content:
                self._content.append(d.content)
                out += self.tools.feed(d.content) if self.tools is not None else [DeltaMessage(content=d.content)]
        return self._keep(out)

    def _keep(self, deltas: list[DeltaMessage]) -> list[DeltaMessage]:
        self._deltas += deltas
        return deltas

    @property
    def tool_calls_made(self) -> bool:
        """Tool calls came out, well formed (only known for sure after finish())."""
        return self.tools is not None and self.tools.failed is None and self.tools.num_tool_calls > 0

    def message(self) -> ChatMessageParts:
        """The choice's message from everything fed (call finish() first)."""
        msg = assemble(self._deltas)
        reasoning = msg.reasoning_content if self.include_reasoning else None
        if self.tools is not None and self.tools.failed is not None:  # nothing is a call: all content
            return ChatMessageParts("".join(self._content) or None, reasoning)
        return ChatMessageParts(msg.content or None, reasoning, msg.tool_calls)

    def finish_reason(self, reason: str | None) -> str | None:
        """OpenAI's finish reason: "tool_calls" when calls ended the output ("auto" and "required",
        as vLLM; a named function keeps "stop", as OpenAI)."""
        if reason == "stop" and self.forced != "named" and self.tool_calls_made:
            return "tool_calls"
        return reason
