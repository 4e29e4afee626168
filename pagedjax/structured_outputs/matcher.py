"""One sequence's position in its grammar: consume sampled tokens, fill its bitmask row (host only).

Dims: W int32 words per bitmask row (ceil(V / 32)); bit j of word w is token 32*w + j.

Per step, for a constrained row: `fill_bitmask(bitmask, r)` before the step (the mask of the next
token), then `accept_token(t)` with the token the step sampled. EOS follows vLLM: it is allowed
exactly when the grammar accepts what came so far; once the grammar can take nothing more
(`is_finished`) EOS is the only token allowed. A matcher that consumed a token the grammar does not
allow, or hit a work limit, is `is_stuck`: its row then allows EOS only, and the engine should end
the request with an error rather than pass that EOS off as a valid end.
"""

from __future__ import annotations

try:  # see backend.py: only constraints need it
    import llguidance as llg
except ImportError:  # pragma: no cover
    llg = None
import numpy as np


class GrammarMatcher:
    """A per-sequence matcher over one compiled grammar (`CompiledGrammar.new_matcher()`)."""

    def __init__(self, ll_matcher: llg.LLMatcher, eos_token_ids: tuple[int, ...], vocab_size: int):
        self._ll = ll_matcher
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.num_tokens = 0  # tokens consumed, EOS included
        self.terminated = False  # EOS consumed: the sequence is over
        self._error: str | None = None

    def accept_token(self, token_id: int) -> bool:
        """Advances by one sampled token; False (and the matcher is stuck) if the grammar forbids it."""
        if self.terminated or self._error is not None:
            return False
        if not 0 <= token_id < self.vocab_size:
            self._error = f"token id {token_id} is outside the vocabulary [0, {self.vocab_size})"
            return False
        is_eos = token_id in self.eos_token_ids
        if is_eos and self._ll.is_stopped() and not self._ll.is_error():
            ok = True  # llguidance has nothing left to consume: EOS is the end it was waiting for
        else:
            ok = self._ll.consume_token(token_id)
        if not ok:
            self._error = _first_line(self._ll.get_error()) or f"token {token_id} is not allowed here"
            return False
        self.num_tokens += 1
        self.terminated = is_eos
        return True

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the allowed next tokens into row `row` of `bitmask` [R, W] int32 (every word)."""
        self._check_row(bitmask, row)
        v = bitmask[row]
        self._ll.unsafe_compute_mask_ptr(v.ctypes.data, v.nbytes)  # EOS only when finished or stuck

    def allowed_token_ids(self) -> np.ndarray:
        """The ids allowed next, ascending (for tests and debugging: one mask, unpacked)."""
        mask = np.zeros((1, (self.vocab_size + 31) // 32), np.int32)
        self.fill_bitmask(mask, 0)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[: self.vocab_size]
        return np.flatnonzero(bits)

    @property
    def is_finished(self) -> bool:
        """The grammar is complete: EOS consumed, or nothing but EOS can follow."""
        return self.terminated or (self._error is None and self._ll.is_stopped())

    @property
    def is_accepting(self) -> bool:
        """What was consumed is a complete match (EOS would be allowed now)."""
        return self.terminated or (self._error is None and self._ll.is_accepting())

    @property
    def is_stuck(self) -> bool:
        """A disallowed token was consumed or a limit was hit: no valid continuation exists."""
        return self._error is not None or self._ll.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher is stuck (None if it is not)."""
        if self._error is None and self._ll.is_error():
            self._error = _first_line(self._ll.get_error())
        return self._error

    def fork(self) -> GrammarMatcher:
        """An independent copy at the same position (a new sample of n > 1, a beam)."""
        m = GrammarMatcher(self._ll.deep_copy(), self.eos_token_ids, self.vocab_size)
        m.num_tokens, m.terminated, m._error = self.num_tokens, self.terminated, self._error
        return m

    def rollback(self, num_tokens: int) -> None:
        """Undoes the last `num_tokens` accepted tokens (speculative decoding, a dropped async step)."""
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(f"cannot roll back {num_tokens} tokens: {self.num_tokens} were accepted")
        if num_tokens == 0:
            return
        # An EOS taken after llguidance had stopped was never given to it: not its to roll back.
        ll_tokens = num_tokens - (1 if self.terminated and self._ll.stop_reason() != "EndOfSentence" else 0)
        if ll_tokens and not self._ll.rollback(ll_tokens):
            raise ValueError(f"llguidance could not roll back {ll_tokens} tokens: {self._ll.get_error()}")
        self.num_tokens -= num_tokens
        self.terminated = False

    def _check_row(self, bitmask: np.ndarray, row: int) -> None:
        W = (self.vocab_size + 31) // 32
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or bitmask.shape[1] != W:
            raise ValueError(f"bitmask must be int32 [R, {W}], got {bitmask.dtype} {list(bitmask.shape)}")
        if not bitmask.flags["C_CONTIGUOUS"] or not 0 <= row < bitmask.shape[0]:
            raise ValueError(f"bitmask must be C-contiguous with row {row} in [0, {bitmask.shape[0]})")


def _first_line(message: str) -> str:
    """llguidance's message, short: its first line, and the regex parser's "error: ..." line if any."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if not lines:
        return ""
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    return lines[0] + (" " + detail if detail else "")
