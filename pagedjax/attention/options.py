"""Per-call attention options every implementation takes: sliding window and logit soft-cap.

Both are static (a layer's property, part of the compiled call), checked here once:
  sliding_window W: a query at position p sees keys at p - W < k <= p (HF transformers'
    `sliding_window_overlay`, vLLM's `sliding_window`); None: every earlier key.
  logit_softcap c: each scaled score s = scale * q.k becomes c * tanh(s / c) before masking and
    softmax (Gemma 2's `attn_logit_softcapping`); None: no cap.
"""

from __future__ import annotations

import math
import numbers


def check_options(sliding_window: int | None, logit_softcap: float | None, where: str) -> None:
    """Raises ValueError unless the window is None or a positive int and the cap None or > 0."""
    if sliding_window is not None and (
            isinstance(sliding_window, bool) or not isinstance(sliding_window, numbers.Integral)
            or sliding_window < 1 or sliding_window > 2**31 - 1):
        raise ValueError(f"{where}: sliding_window must be None or a positive int, got {sliding_window!r}")
    if logit_softcap is not None and (
            isinstance(logit_softcap, bool) or not isinstance(logit_softcap, numbers.Real)
            or not math.isfinite(logit_softcap) or logit_softcap <= 0):
        raise ValueError(f"{where}: logit_softcap must be None or a finite float > 0, got {logit_softcap!r}")
