"""Token-level reasoning state of one sequence, for structured outputs: the constraint applies to
the answer only, from the token after `</think>` (host only).

Phases: THINKING (row unconstrained; `</think>` moves to ANSWER and is not given to the grammar),
ANSWER (the grammar's mask; every token goes to the matcher), UNDECIDED (Qwen3 after a prompt
without think tags: the model may open a think block with its first token or answer at once; the
row gets the grammar's mask plus the `<think>` token).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from pagedjax.reasoning.parsers import ReasoningParser


class Phase(enum.Enum):
    THINKING = "thinking"
    UNDECIDED = "undecided"
    ANSWER = "answer"


class ReasoningTracker:
    """Where one sequence is relative to its reasoning, updated token by token."""

    def __init__(self, parser: ReasoningParser, prompt_token_ids: Sequence[int]):
        self.start_token_id, self.end_token_id = parser.start_token_id, parser.end_token_id
        state = parser.in_reasoning_after(prompt_token_ids)
        if state is None:
            self.phase = Phase.THINKING if parser.in_reasoning_by_default else Phase.UNDECIDED
        else:
            self.phase = Phase.THINKING if state else Phase.ANSWER

    @property
    def reasoning_ended(self) -> bool:
        """The next token is answer: it takes the grammar's mask."""
        return self.phase is Phase.ANSWER

    @property
    def constrained(self) -> bool:
        """The next token's row comes from the grammar (ANSWER, or UNDECIDED plus `<think>`)."""
        return self.phase is not Phase.THINKING

    def allow_start_token(self, bitmask: np.ndarray, row: int) -> None:
        """In UNDECIDED, also allows `<think>` in the grammar's row (call after filling it)."""
        if self.phase is Phase.UNDECIDED:
            word, bit = divmod(self.start_token_id, 32)
            bitmask[row, word] |= np.int32(np.uint32(1 << bit).view(np.int32))

    def update(self, token_id: int) -> bool:
        """Moves past one sampled token; True if it belongs to the answer (give it to the matcher)."""
        if self.phase is Phase.ANSWER:
            return True
        if self.phase is Phase.THINKING:
            if token_id == self.end_token_id:
                self.phase = Phase.ANSWER
            return False
        self.phase = Phase.THINKING if token_id == self.start_token_id else Phase.ANSWER
        return self.phase is Phase.ANSWER

    def fork(self) -> ReasoningTracker:
        other = object.__new__(ReasoningTracker)
        other.__dict__.update(self.__dict__)
        return other
