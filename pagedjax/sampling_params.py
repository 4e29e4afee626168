"""Sampling and beam-search parameters, with vLLM's meanings and defaults (host only: no jax).

`SamplingParams` follows vLLM (and through it the OpenAI completions API): every field keeps
vLLM's name, default and allowed range, and an out-of-range value raises a ValueError that
names the field, the range and the value. `BeamSearchParams` is vLLM's separate type for beam
search, plus HF's `early_stopping`.

Token ids (logit_bias keys, allowed_token_ids) are checked against the model's vocabulary by the
engine, which knows it; bad_words become token ids there too (`update_from_tokenizer`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # host only: the real import happens in _verify, and only when a constraint is given
    from pagedjax.structured_outputs.params import StructuredOutputsParams

SAMPLING_EPS = 1e-5  # temperature below this is greedy (vLLM's _SAMPLING_EPS)
LOGIT_BIAS_LIMIT = 100.0  # logit_bias values are clamped to [-100, 100], as OpenAI and vLLM's server do


class SamplingType(enum.IntEnum):
    """How a request's next token is chosen."""

    GREEDY = 0  # argmax (temperature < 1e-5)
    RANDOM = 1  # sampled, unseeded
    RANDOM_SEED = 2  # sampled from the request's own seed: reproducible
    BEAM = 3  # beam search


class RequestOutputKind(enum.Enum):
    """What each streamed RequestOutput carries (vLLM's names)."""

    CUMULATIVE = 0  # all the output so far
    DELTA = 1  # only what is new since the previous output
    FINAL_ONLY = 2  # nothing until the request finishes


def _fail(name: str, allowed: str, value: object) -> None:
    raise ValueError(f"{name} must be {allowed}, got {value!r}.")


def _check_int(name: str, value: object, *, minimum: int | None = None, allowed: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"an integer{' ' + allowed if allowed else ''}", value)
    if minimum is not None and value < minimum:
        _fail(name, allowed or f">= {minimum}", value)


def _is_token_id(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, "a finite number", value)


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters for one request (vLLM's `SamplingParams`)."""

    n: int = 1  # outputs returned for the prompt
    best_of: int | None = None  # sequences generated, the best `n` returned (None: n)
    presence_penalty: float = 0.0  # in [-2, 2]; > 0 favours tokens not yet generated
    frequency_penalty: float = 0.0  # in [-2, 2]; > 0 penalizes by the count generated so far
    repetition_penalty: float = 1.0  # > 0; > 1 penalizes tokens of the prompt and the output
    temperature: float = 1.0  # >= 0; 0 is greedy
    top_p: float = 1.0  # in (0, 1]; 1 is off
    top_k: int = 0  # 0 (or -1, stored as 0) is off; else >= 1
    min_p: float = 0.0  # in [0, 1]; relative to the most likely token's probability; 0 is off
    seed: int | None = None  # per-request seed (-1 is read as None)
    stop: str | list[str] | None = None  # strings that end generation (stored as a list)
    stop_token_ids: list[int] | None = None  # tokens that end generation (stored as a list)
    ignore_eos: bool = False  # keep generating after EOS
    max_tokens: int | None = 16  # >= 1; None: up to the model's context length
    min_tokens: int = 0  # before this many tokens: no EOS or stop_token_ids, no stop string match
    logprobs: int | None = None  # top logprobs per output token (-1: the whole vocabulary)
    prompt_logprobs: int | None = None  # top logprobs per prompt token (the engine serves 0..max_logprobs)
    truncate_prompt_tokens: int | None = None  # >= 1: only the prompt's last k tokens (-1: max_model_len's worth)
    detokenize: bool = True
    skip_special_tokens: bool = True
    # No spaces_between_special_tokens: with a `tokenizers` tokenizer (all pagedjax loads) neither
    # vLLM nor transformers 5 reads it; the server accepts the field and ignores it.
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice, grammar, ...
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (clamped to [-100, 100])
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled (non-empty)
    bad_words: list[str] | None = None  # words never generated (vLLM's rule: see update_from_tokenizer)
    # bad_words as token ids (each word with and without a leading space), set by update_from_tokenizer
    _bad_words_token_ids: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self._normalize()
        self._verify()
        if self.temperature < SAMPLING_EPS:
            # Zero temperature means greedy: the filters mean nothing, one output makes sense.
            self._set(top_p=1.0, top_k=0, min_p=0.0)
            if self.n > 1:
                _fail("n", "1 when using greedy sampling (temperature 0)", self.n)
            if self.best_of is not None and self.best_of > 1:
                _fail("best_of", "1 (or None) when using greedy sampling (temperature 0)", self.best_of)

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)  # frozen: normalization happens here only

    def _normalize(self) -> None:
        stop = self.stop
        stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
        stop_ids = list(dict.fromkeys(self.stop_token_ids or []))
        self._set(stop=stop, stop_token_ids=stop_ids)
        if self.seed == -1:
            self._set(seed=None)
        if self.top_k == -1:
            self._set(top_k=0)  # vLLM quietly accepts -1 as "off" and prefers 0
        if self.logprobs is True:
            self._set(logprobs=1)
        if self.prompt_logprobs is True:
            self._set(prompt_logprobs=1)
        if isinstance(self.bad_words, str):
            self._set(bad_words=[self.bad_words])
        if self.bad_words == []:
            self._set(bad_words=None)
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids, (str, bytes)):
            try:
                self._set(allowed_token_ids=list(dict.fromkeys(self.allowed_token_ids)))
            except TypeError:
                pass  # not iterable: _verify names it
        if isinstance(self.logit_bias, dict):
            bias = {}
            for token_id, value in self.logit_bias.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    value = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))
                bias[token_id] = value
            self._set(logit_bias=bias or None)

    def _verify(self) -> None:
        _check_int("n", self.n, minimum=1, allowed=">= 1")
        if self.best_of is not None:
            _check_int("best_of", self.best_of, minimum=self.n, allowed=f">= n (n={self.n})")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_number(name, getattr(self, name))
            if not -2.0 <= getattr(self, name) <= 2.0:
                _fail(name, "in [-2, 2]", getattr(self, name))
        _check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            _fail("repetition_penalty", "> 0", self.repetition_penalty)
        _check_number("temperature", self.temperature)
        if self.temperature < 0.0:
            _fail("temperature", ">= 0", self.temperature)
        _check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", "in (0, 1]", self.top_p)
        _check_int("top_k", self.top_k, minimum=0, allowed="0 or -1 (off), or >= 1")
        _check_number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            _fail("min_p", "in [0, 1]", self.min_p)
        if self.seed is not None:
            _check_int("seed", self.seed, allowed="(or None)")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, minimum=1, allowed=">= 1 (or None)")
        _check_int("min_tokens", self.min_tokens, minimum=0, allowed=">= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"<= max_tokens (max_tokens={self.max_tokens})", self.min_tokens)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=-1, allowed=">= 0, or -1 for the whole vocabulary")
        if self.truncate_prompt_tokens is not None:
            _check_int("truncate_prompt_tokens", self.truncate_prompt_tokens, minimum=-1,
                       allowed=">= 1, or -1 for max_model_len (or None)")
            if self.truncate_prompt_tokens == 0:
                _fail("truncate_prompt_tokens", ">= 1, or -1 for max_model_len (or None)", 0)
        if not all(isinstance(s, str) and s for s in self.stop):
            _fail("stop", "a non-empty string or a list of non-empty strings", self.stop)
        if self.stop and not self.detokenize:
            _fail("detokenize", "True when stop strings are given", self.detokenize)
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", "a list of token ids (integers >= 0)", self.stop_token_ids)
        if not isinstance(self.output_kind, RequestOutputKind):
            _fail("output_kind", "a RequestOutputKind", self.output_kind)
        self._verify_token_controls()

    def _verify_token_controls(self) -> None:
        if self.structured_outputs is not None:
            from pagedjax.structured_outputs.params import StructuredOutputsParams

            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                _fail("structured_outputs", "a StructuredOutputsParams", self.structured_outputs)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                _fail("logit_bias", "a dict of token id -> bias", self.logit_bias)
            for token_id, value in self.logit_bias.items():
                if not _is_token_id(token_id):
                    _fail("logit_bias", "keyed by token ids (integers >= 0)", token_id)
                if isinstance(value, bool) or not isinstance(value, float) or not math.isfinite(value):
                    _fail("logit_bias", f"finite numbers (token {token_id})", value)
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, list) or not all(_is_token_id(t) for t in ids):
                _fail("allowed_token_ids", "a list of token ids (integers >= 0)", ids)
            if not ids:
                _fail("allowed_token_ids", "non-empty when given", ids)
        if self.bad_words is not None:
            if not isinstance(self.bad_words, list) or not all(isinstance(w, str) and w.strip()
                                                                for w in self.bad_words):
                _fail("bad_words", "a list of non-blank strings", self.bad_words)
        if self._bad_words_token_ids is not None:
            ids = self._bad_words_token_ids
            if not isinstance(ids, list) or not all(isinstance(w, list) and w and all(_is_token_id(t) for t in w)
                                                    for w in ids):
                _fail("_bad_words_token_ids", "a list of non-empty token id lists", ids)

    def update_from_tokenizer(self, tokenizer: Any) -> SamplingParams:
        """These params with bad_words as token ids (vLLM's rule: each word as written at the start of
        the text, and after a space when that gives other tokens of the same count)."""
        if not self.bad_words:
            return self
        ids: list[list[int]] = []
        for word in self.bad_words:
            plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            ids.append(plain)
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                ids.append(spaced)
        return dataclasses.replace(self, _bad_words_token_ids=ids)

    # What the host reads for every row of every step, computed once (the params are frozen;
    # `dataclasses.replace` makes a new object with its own values).
    @functools.cached_property
    def has_penalties(self) -> bool:
        """A repetition, frequency or presence penalty is set."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @functools.cached_property
    def needs_token_history(self) -> bool:
        """Sampling reads the row's earlier tokens: penalties, or bad words of several tokens."""
        return self.has_penalties or any(len(w) > 1 for w in self._bad_words_token_ids or ())

    @functools.cached_property
    def needs_token_lists(self) -> bool:
        """The row's sampling metadata has token lists: penalties, tokens banned until
        min_tokens, bad words, or a logit bias. Most rows have none."""
        return self.has_penalties or self.min_tokens > 0 or bool(self._bad_words_token_ids) or bool(self.logit_bias)

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < SAMPLING_EPS:
            return SamplingType.GREEDY
        if self.seed is not None:
            return SamplingType.RANDOM_SEED
        return SamplingType.RANDOM

    @property
    def is_greedy(self) -> bool:
        return self.sampling_type == SamplingType.GREEDY

    @property
    def num_sequences(self) -> int:
        """How many sequences the engine generates for the prompt (best_of, else n)."""
        return self.best_of if self.best_of is not None else self.n

    def for_sample(self, index: int) -> SamplingParams:
        """The params of sample `index` of n > 1: n=1, and seed + index when seeded (as vLLM does)."""
        seed = None if self.seed is None else self.seed + index
        return dataclasses.replace(self, n=1, best_of=None, seed=seed)

    def clone(self) -> SamplingParams:
        return dataclasses.replace(self)


@dataclass(frozen=True)
class BeamSearchParams:
    """Beam search parameters (vLLM's `BeamSearchParams`, plus HF's `early_stopping`)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0  # score = cumulative logprob / length ** length_penalty
    early_stopping: bool | Literal["never"] = False  # HF: True, False (heuristic) or "never"
    include_stop_str_in_output: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0

    def __post_init__(self) -> None:
        _check_int("beam_width", self.beam_width, minimum=1, allowed=">= 1")
        _check_int("max_tokens", self.max_tokens, minimum=1, allowed=">= 1")
        _check_int("min_tokens", self.min_tokens, minimum=0, allowed=">= 0")
        if self.min_tokens > self.max_tokens:
            _fail("min_tokens", f"<= max_tokens (max_tokens={self.max_tokens})", self.min_tokens)
        _check_number("temperature", self.temperature)
        if self.temperature < 0.0:
            _fail("temperature", ">= 0", self.temperature)
        _check_number("length_penalty", self.length_penalty)
        if self.early_stopping not in (True, False, "never"):
            _fail("early_stopping", 'True, False or "never"', self.early_stopping)
        object.__setattr__(self, "stop_token_ids", list(dict.fromkeys(self.stop_token_ids or [])))
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            _fail("stop_token_ids", "a list of token ids (integers >= 0)", self.stop_token_ids)

    @property
    def sampling_type(self) -> SamplingType:
        return SamplingType.BEAM

    @property
    def is_greedy(self) -> bool:
        return False

    @property
    def n(self) -> int:
        return 1  # the engine forks the beams itself (Scheduler.fork_request)

    @property
    def num_sequences(self) -> int:
        return 1


def truncate_prompt(ids: list[int], keep: int | None, max_model_len: int) -> list[int]:
    """A prompt's last `keep` tokens (SamplingParams.truncate_prompt_tokens; -1: max_model_len of
    them; None: all), as vLLM truncates it: from the left."""
    if keep is None:
        return ids
    keep = max_model_len if keep == -1 else keep
    return ids[-keep:] if len(ids) > keep else ids
