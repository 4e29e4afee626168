"""Incremental parsing of model output text into OpenAI deltas (tool calls, reasoning).

A parser's `_parse()` is a generator that reads `self.buf` from `self.i` and yields whenever it
needs more text; `feed(delta)` appends text and runs it as far as the text allows, `finish()` runs
it to the end. Text is released only once it is decided (a possible marker prefix is held back),
so whatever way the text is cut into deltas, the joined deltas are the same: the non-streamed
result is the stream of the whole text in one piece.

JSON inside tool calls is re-emitted with its insignificant whitespace normalized (", " and ": "
separators, no other whitespace outside strings); strings and numbers are kept as written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Sequence

from pagedjax.tool_parsers.types import DeltaMessage, DeltaToolCall, make_tool_call_id

Reader = Generator[None, None, object]  # what `yield from` helpers are
_WS = " \t\n\r"


class Malformed(Exception):
    """The text does not have the format the parser expects."""


class TextStream:
    """Base of the streaming parsers: the buffer, the generator driver and reading helpers."""

    def __init__(self) -> None:
        self.buf = ""  # all text fed so far
        self.i = 0  # read position
        self.eof = False
        self.failed: str | None = None  # why the text turned out malformed (the rest then passes as content)
        self.rewind_to: int | None = None  # where malformed text starts to pass as content if no call began
        self.num_tool_calls = 0
        self._out: list[DeltaMessage] = []
        self._gen: Generator | None = None
        self._done = False

    def feed(self, text: str) -> list[DeltaMessage]:
        """The deltas that `text`, appended to the output so far, decides."""
        if self.eof:
            raise ValueError("feed() after finish()")
        self.buf += text
        return self._run()

    def finish(self) -> list[DeltaMessage]:
        """The deltas held back until the end of the output."""
        self.eof = True
        return self._run()

    def _parse(self) -> Generator:
        raise NotImplementedError

    def _run(self) -> list[DeltaMessage]:
        if self._gen is None:
            self._gen = self._parse()
        if not self._done:
            try:
                next(self._gen)
            except StopIteration:
                self._done = True
            except Malformed as e:
                self.failed, self._done = str(e) or "malformed output", True
        if self._done and self.failed is not None:  # from here on everything is content
            if self.rewind_to is not None and self.num_tool_calls == 0:
                self.i, self.rewind_to = self.rewind_to, None  # nothing of it went out as a call
            self.emit_content(self.buf[self.i:])
            self.i = len(self.buf)
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------------------ emitting

    def emit_content(self, text: str) -> None:
        self._emit_text(text, "content")

    def emit_reasoning(self, text: str) -> None:
        self._emit_text(text, "reasoning_content")

    def _emit_text(self, text: str, kind: str) -> None:
        if not text:
            return
        last = self._out[-1] if self._out else None
        if last is not None and not last.tool_calls and getattr(last, kind) is not None:  # same kind: extend
            setattr(last, kind, getattr(last, kind) + text)
        else:
            self._out.append(DeltaMessage(**{kind: text}))

    def new_tool_call_id(self) -> str:
        return make_tool_call_id()

    def start_tool_call(self, name: str) -> None:
        call = DeltaToolCall(self.num_tool_calls, self.new_tool_call_id(), name, "")
        self._out.append(DeltaMessage(tool_calls=[call]))
        self.num_tool_calls += 1

    def emit_arguments(self, text: str) -> None:
        """Arguments of the current (last started) tool call."""
        if not text:
            return
        index = self.num_tool_calls - 1
        last = self._out[-1] if self._out else None
        if last is not None and last.tool_calls and last.tool_calls[-1].index == index:
            last.tool_calls[-1].arguments = (last.tool_calls[-1].arguments or "") + text
        else:
            self._out.append(DeltaMessage(tool_calls=[DeltaToolCall(index, arguments=text)]))

    # ------------------------------------------------------------------------------- reading

    def peek(self) -> Reader:
        """The next character (not consumed), or None at the end of the output."""
        while self.i >= len(self.buf):
            if self.eof:
                return None
            yield
        return self.buf[self.i]

    def skip_ws(self, also: str = "") -> Reader:
        """Consumes whitespace (and characters of `also`); returns the next character or None."""
        while True:
            c = yield from self.peek()
            if c is None or (c not in _WS and c not in also):
                return c
            self.i += 1

    def peek_non_ws(self) -> Reader:
        """The first non-whitespace character from the read position, consuming nothing."""
        j = self.i
        while True:
            while j < len(self.buf) and self.buf[j] in _WS:
                j += 1
            if j < len(self.buf):
                return self.buf[j]
            if self.eof:
                return None
            yield

    def accept(self, marker: str) -> Reader:
        """Consumes `marker` if the text continues with it; True if it did."""
        while True:
            rest = self.buf[self.i:self.i + len(marker)]
            if rest == marker:
                self.i += len(marker)
                return True
            if not marker.startswith(rest) or self.eof:
                return False
            yield

    def text_until(self, markers: Sequence[str], sink: Callable[[str], None] | None) -> Reader:
        """Passes text to `sink` up to the first of `markers`, which it consumes and returns
        (None at the end of the output). A tail that could start a marker waits for more text."""
        while True:
            hits = [(j, m) for m in markers if (j := self.buf.find(m, self.i)) >= 0]
            if hits:
                j, m = min(hits)
                if sink:
                    sink(self.buf[self.i:j])
                self.i = j + len(m)
                return m
            end = len(self.buf) if self.eof else len(self.buf) - _held(self.buf, self.i, markers)
            if sink:
                sink(self.buf[self.i:end])
            self.i = end
            if self.eof:
                return None
            yield

    def json_value(self, sink: Callable[[str], None] | None) -> Reader:
        """Reads one JSON value, passing it to `sink` with normalized whitespace; returns the value."""
        c = yield from self.skip_ws()
        if c is None:
            raise Malformed("the output ends where a JSON value should start")
        start, depth, in_string, escaped = self.i, 0, False, False
        emit = sink or (lambda s: None)
        while True:
            c = yield from self.peek()
            if c is None:
                if depth == 0 and not in_string:
                    break  # a top-level number or literal that ends the text
                raise Malformed("the output ends inside a JSON value")
            if in_string:
                self.i += 1
                emit(c)
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
                    if depth == 0:
                        break
                continue
            if c in _WS:
                if depth == 0:
                    break  # ends a top-level scalar
                self.i += 1
                continue
            if depth == 0 and self.i > start and c in ',:]}"{[':
                break  # a top-level scalar ended
            self.i += 1
            if c == '"':
                in_string = True
                emit(c)
            elif c in "{[":
                depth += 1
                emit(c)
            elif c in "}]":
                depth -= 1
                if depth < 0:
                    raise Malformed(f"unbalanced {c!r} in JSON")
                emit(c)
                if depth == 0:
                    break
            elif c in ",:":
                if depth == 0:
                    raise Malformed(f"unexpected {c!r} in JSON")
                emit(c + " ")
            else:
                emit(c)
        raw = self.buf[start:self.i]
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise Malformed(f"invalid JSON {raw[:80]!r}: {e}") from None

    def tool_call_object(self, args_keys: Sequence[str] = ("arguments", "parameters")) -> Reader:
        """Reads {"name": ..., "arguments": {...}} (keys in any order, others skipped), streaming the
        call: its id and name once the name is read, then the arguments as they come."""
        c = yield from self.skip_ws()
        if c != "{":
            raise Malformed(f"expected a tool call object, got {c!r}")
        self.i += 1
        name, held_args, has_args = None, None, False
        c = yield from self.skip_ws()
        if c == "}":
            raise Malformed("a tool call object without a name")
        while True:
            if c != '"':
                raise Malformed(f"expected a key in the tool call object, got {c!r}")
            key = yield from self.json_value(None)
            if (yield from self.skip_ws()) != ":":
                raise Malformed("expected ':' after a key in the tool call object")
            self.i += 1
            if key == "name" and name is None:
                name = yield from self.json_value(None)
                if not isinstance(name, str) or not name:
                    raise Malformed(f"a tool call's name must be a non-empty string, got {name!r}")
                self.start_tool_call(name)
                if held_args is not None:
                    self.emit_arguments("".join(held_args))
            elif key in args_keys and not has_args:
                has_args = True
                if name is not None:
                    args = yield from self.json_value(self.emit_arguments)
                else:  # arguments before the name: held until the call has an id
                    held_args = []
                    args = yield from self.json_value(held_args.append)
                if not isinstance(args, dict):
                    raise Malformed(f"a tool call's arguments must be a JSON object, got {type(args).__name__}")
            else:
                yield from self.json_value(None)
            c = yield from self.skip_ws()
            if c == "}":
                self.i += 1
                break
            if c != ",":
                raise Malformed(f"expected ',' or '}}' in the tool call object, got {c!r}")
            self.i += 1
            c = yield from self.skip_ws()
        if name is None:
            raise Malformed("a tool call object without a name")
        if not has_args:
            self.emit_arguments("{}")


def _held(buf: str, start: int, markers: Sequence[str]) -> int:
    """Length of the longest tail of buf[start:] that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(buf) - start), best, -1):
            if buf.endswith(m[:n]):
                best = n
                break
    return best
