"""OpenAI-shaped tool calls and streamed message deltas (host only, plain dataclasses).

`ToolCall.to_dict()` is an entry of a chat message's `tool_calls`; `DeltaMessage.to_dict()` is a
streamed chunk's `delta`. A streamed tool call arrives as one delta with its index, id, type and
name (arguments ""), then deltas with the same index and argument fragments; joining the fragments
gives the non-streamed `arguments`.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field

_ALNUM = string.ascii_letters + string.digits


def make_tool_call_id(length: int = 24, prefix: str = "call_") -> str:
    """A random id like OpenAI's: `call_` and 24 letters and digits."""
    return prefix + "".join(secrets.choice(_ALNUM) for _ in range(length))


@dataclass(frozen=True)
class ToolCall:
    """One function call of an assistant message; `arguments` is JSON text."""

    id: str
    name: str
    arguments: str

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class DeltaToolCall:
    """A piece of the `index`-th tool call: its id and name first, then argument fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None

    def to_dict(self) -> dict:
        d: dict = {"index": self.index}
        if self.id is not None:
            d["id"], d["type"] = self.id, "function"
        fn = {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}
        if fn:
            d["function"] = fn
        return d


@dataclass
class DeltaMessage:
    """What one streamed chunk adds to the assistant message."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def to_dict(self) -> dict:
        d: dict = {k: v for k, v in (("content", self.content), ("reasoning_content", self.reasoning_content))
                   if v is not None}
        if self.tool_calls:
            d["tool_calls"] = [t.to_dict() for t in self.tool_calls]
        return d


@dataclass
class AssembledMessage:
    """Deltas joined back into one message (what a client rebuilds from a stream)."""

    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


def assemble(deltas: Iterable[DeltaMessage]) -> AssembledMessage:
    """Joins streamed deltas: content and reasoning concatenated, tool calls by index."""
    content, reasoning, calls = [], None, {}
    for d in deltas:
        if d.content is not None:
            content.append(d.content)
        if d.reasoning_content is not None:
            reasoning = (reasoning or "") + d.reasoning_content
        for t in d.tool_calls:
            call = calls.setdefault(t.index, {"id": None, "name": None, "arguments": ""})
            if t.id is not None:
                if call["id"] is not None:
                    raise ValueError(f"tool call {t.index} got a second id")
                call["id"], call["name"] = t.id, t.name
            elif call["id"] is None:
                raise ValueError(f"tool call {t.index} got arguments before its id and name")
            call["arguments"] += t.arguments or ""
    if sorted(calls) != list(range(len(calls))):
        raise ValueError(f"tool call indices {sorted(calls)} are not 0..{len(calls) - 1}")
    tool_calls = [ToolCall(c["id"], c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    return AssembledMessage("".join(content), reasoning, tool_calls)
