"""Reasoning parsers (`--reasoning-parser`): split `<think>...</think>` off the answer (host only).

    parser = get_reasoning_parser("qwen3").for_prompt(tokenizer, prompt_token_ids)  # per request
    reasoning_content, content = parser.extract_reasoning(text)
    deltas = parser.feed(piece) ... parser.finish()        # streamed: reasoning_content / content deltas

deepseek_r1: DeepSeek-R1's chat template ends the prompt with "<think>\\n", so the output usually
  starts inside the reasoning and only `</think>` shows; older R1 builds wrote `<think>` first.
  Without `</think>` the whole output is reasoning (as vLLM does).
qwen3: Qwen3 writes `<think>...</think>` first in thinking mode; with enable_thinking=False the
  template puts an empty think block in the prompt and the output has none: all content. The
  Qwen3-2507 "Thinking" templates put `<think>` in the prompt, so the output starts inside it.
Both read the prompt when given one: after a prompt whose last think tag is `<think>` the output
starts inside the reasoning, after one whose last tag is `</think>` it starts in the answer.
The joined deltas equal the non-streamed split, however the text is cut. A `<think>` counts only
as the very first text of the output; after `</think>` everything is content.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from pagedjax.tokenizer import Tokenizer
from pagedjax.tool_parsers.stream import TextStream
from pagedjax.tool_parsers.types import assemble


class ReasoningParser(TextStream):
    """A `<think>`-style reasoning format; one instance per request."""

    name: ClassVar[str]
    start_token: ClassVar[str] = "<think>"
    end_token: ClassVar[str] = "</think>"
    in_reasoning_by_default: ClassVar[bool]  # where the output starts when the prompt has no think tag

    def __init__(self, tokenizer: Tokenizer | None = None, *, prompt_in_reasoning: bool | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.starts_in_reasoning = self.in_reasoning_by_default if prompt_in_reasoning is None \
            else prompt_in_reasoning
        self.entered_reasoning = False

    @classmethod
    def for_prompt(cls, tokenizer: Tokenizer, prompt_token_ids: Sequence[int]) -> ReasoningParser:
        """A parser for the output that follows `prompt_token_ids`."""
        probe = cls(tokenizer)
        return cls(tokenizer, prompt_in_reasoning=probe.in_reasoning_after(prompt_token_ids))

    @property
    def start_token_id(self) -> int:
        return self._token_id(self.start_token)

    @property
    def end_token_id(self) -> int:
        """The token that ends the reasoning: a JSON constraint starts after it."""
        return self._token_id(self.end_token)

    def in_reasoning_after(self, token_ids: Sequence[int]) -> bool | None:
        """True if the last think tag in `token_ids` opens reasoning, False if it closes it, None if none."""
        start, end = self.start_token_id, self.end_token_id
        for t in reversed(token_ids):
            if t == start or t == end:
                return t == start
        return None

    def is_reasoning_end(self, token_ids: Sequence[int]) -> bool:
        """Whether `token_ids` (prompt and output so far) close the reasoning: `</think>` after the last `<think>`."""
        return self.in_reasoning_after(token_ids) is False

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning_content, content) of a whole output; None for a part that is absent or empty."""
        parser = type(self)(self.tokenizer, prompt_in_reasoning=self.starts_in_reasoning)
        msg = assemble(parser.feed(text) + parser.finish())
        reasoning = (msg.reasoning_content or "") if parser.entered_reasoning else None
        return reasoning, msg.content or None

    def _parse(self):
        in_reasoning = self.starts_in_reasoning
        if (yield from self.accept(self.start_token)):
            in_reasoning = True
        if in_reasoning:
            self.entered_reasoning = True
            if (yield from self.text_until([self.end_token], self.emit_reasoning)) is None:
                return
        yield from self.text_until([], self.emit_content)

    def _token_id(self, token: str) -> int:
        if self.tokenizer is None:
            raise ValueError(f"the {self.name} reasoning parser needs the tokenizer for token ids")
        (i,) = self.tokenizer.convert_tokens_to_ids([token])
        if i is None:
            raise ValueError(f"the {self.name} reasoning parser needs a {token} token; this tokenizer has none")
        return i


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    in_reasoning_by_default = True


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
    in_reasoning_by_default = False
