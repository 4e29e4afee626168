"""Incremental detokenization for streaming, and stop strings (vLLM's algorithm; host only)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedjax.tokenizer import Tokenizer

# vLLM's window: decode from this many tokens before the read offset so merges across tokens resolve.
_INITIAL_OFFSET = 5


class IncrementalDetokenizer:
    """Token ids in, text deltas out, for streaming (vLLM's prefix_offset / read_offset algorithm).

    A delta never ends in a half-decoded character: text waits until its bytes complete. With
    `stop` strings (and not `include_stop_str_in_output`) the last `max(len(stop)) - 1` characters
    wait too, so a stop string that spans tokens is never streamed. `text` is everything released
    so far: the concatenation of all deltas. After `finish()` (or a matched stop string) it is the
    whole output, which for a byte-level BPE equals `decode(prompt + output)[len(decode(prompt)):]`,
    truncated at the stop string.

    With `min_tokens`, stop strings count only once more than `min_tokens` tokens are out (vLLM):
    a match must end in text of a later token, so one inside the first `min_tokens` tokens' text
    is ignored and that text is kept whole.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        stop: str | Sequence[str] | None = (),
        include_stop_str_in_output: bool = False,
        min_tokens: int = 0,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in ([stop] if isinstance(stop, str) else stop or ()) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stop_str: str | None = None  # the stop string that ended the output, if any
        self.min_tokens = min_tokens
        self._num_outputs = 0  # output tokens added
        self.finished = False
        # The prompt's last tokens are context, so the first output token decodes as it does after
        # them (SentencePiece drops a leading space at the start of a decode).
        self._ids = list(prompt_token_ids[max(len(prompt_token_ids) - _INITIAL_OFFSET - 2, 0) :])
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _INITIAL_OFFSET, 0)
        self._text = ""  # decoded output (truncated at a matched stop string)
        self._released = 0  # characters of _text returned as deltas
        self._hold = max(map(len, self.stop)) - 1 if self.stop and not include_stop_str_in_output else 0

    @property
    def text(self) -> str:
        """The output text released so far (all deltas joined)."""
        return self._text[: self._released]

    def add_tokens(self, new_token_ids: Sequence[int]) -> str:
        """Append generated token ids; return the text that became final (possibly "")."""
        if self.finished:
            raise RuntimeError("add_tokens() after the output finished (a stop string matched or finish())")
        check_from = len(self._text)  # a stop string must end after this character
        for i in new_token_ids:
            self._ids.append(i)
            self._text += self._next_text()
            self._num_outputs += 1
            if self._num_outputs <= self.min_tokens:
                check_from = len(self._text)
        return self._release(check_from, final=False)

    def finish(self) -> str:
        """End of the output: release what was held back (a never-completed character shows as "\ufffd")."""
        if self.finished:
            return ""
        old_len = len(self._text)
        self._text += self._next_text(final=True)
        return self._release(old_len if self._num_outputs > self.min_tokens else len(self._text), final=True)

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=self.skip_special_tokens)

    def _next_text(self, final: bool = False) -> str:
        prefix_text = self._decode(self._prefix_offset, self._read_offset)
        new_text = self._decode(self._prefix_offset)
        # a trailing "\ufffd" means the last token holds part of a character: wait for the rest
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, check_from: int, final: bool) -> str:
        self._text, self.stop_str = check_stop_strings(
            self._text, len(self._text) - check_from, self.stop, self.include_stop_str_in_output
        )
        self.finished = final or self.stop_str is not None
        end = len(self._text) if self.finished else max(len(self._text) - self._hold, self._released)
        delta, self._released = self._text[self._released : end], end
        return delta


def check_stop_strings(
    text: str, new_text_len: int, stop: str | Sequence[str], include_stop_str_in_output: bool
) -> tuple[str, str | None]:
    """Find the earliest stop string that ends within the last `new_text_len` characters of `text`.

    Returns `(text truncated before the stop string, or after it if include_stop_str_in_output,
    the matched stop string)`, or `(text, None)` when none matched.
    """
    if not new_text_len or not stop:
        return text, None
    if isinstance(stop, str):
        stop = [stop]
    best: tuple[int, str] | None = None
    for s in stop:
        if not s:
            continue
        # only search where a match could end inside the new text: the older text was searched before
        i = text.find(s, max(len(text) - new_text_len - len(s) + 1, 0))
        if i != -1 and (best is None or i < best[0]):
            best = (i, s)
    if best is None:
        return text, None
    i, s = best
    return text[: i + len(s) if include_stop_str_in_output else i], s
