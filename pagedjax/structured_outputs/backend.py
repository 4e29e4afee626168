"""Grammars on llguidance, compiled for one tokenizer, cached, within a time limit (host only).

Dims: R bitmask rows (constrained rows of a step), V vocab (the model's, >= the tokenizer's),
W = ceil(V / 32) int32 words per row; bit j of word w is token 32*w + j, set = allowed.

A bad constraint is a ValueError naming the problem: an unsupported JSON-schema keyword
("Unimplemented keys: [...]"), an invalid regex, an unknown grammar rule, or a limit. Compilation
runs with llguidance's own work limits and, around them, a wall-clock limit: llguidance builds the
grammar with the GIL released, on a thread we wait for at most `time_limit_s`, so a pathological
schema (deep anyOf nesting, a huge enum) answers with a ValueError within the limit, never a hang.
"""

from __future__ import annotations

import atexit
import copy
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

try:  # constraints need llguidance; an engine serving none runs without it
    import llguidance as llg
    import llguidance.numpy as llg_np
except ImportError as _missing:  # pragma: no cover - exercised where llguidance is not installed
    llg = llg_np = None
    _LLG_ERROR = _missing
import numpy as np

from pagedjax.structured_outputs.ll_tokenizer import ll_tokenizer
from pagedjax.structured_outputs.matcher import GrammarMatcher
from pagedjax.structured_outputs.params import StructuredOutputsParams
from pagedjax.tokenizer import Tokenizer

# Compiles that outlived their time limit, still running in their daemon threads. The process
# waits for them at exit: a daemon thread inside llguidance while the interpreter finalizes
# crashes it (a segfault after everything else passed). llguidance's fuel limits bound each.
_LEFT_RUNNING: set[threading.Thread] = set()
_LEFT_RUNNING_LOCK = threading.Lock()


@atexit.register
def _wait_for_compiles() -> None:
    with _LEFT_RUNNING_LOCK:
        threads = list(_LEFT_RUNNING)
    for t in threads:
        t.join()


@dataclass(frozen=True)
class CompileLimits:
    """Bounds on one constraint's compilation: past any of them, a ValueError."""

    time_limit_s: float = 10.0  # wall clock for building the grammar and its first mask
    max_spec_chars: int = 1_000_000  # the schema / regex / grammar text
    max_schema_depth: int = 64  # nesting of the JSON-schema document
    max_enum_values: int = 10_000  # enum + const values in a schema, or choices
    max_grammar_size: int = 500_000  # llguidance: symbols in the grammar's productions
    initial_lexer_fuel: int = 1_000_000  # llguidance: work building the lexer (~50k/ms)
    step_lexer_fuel: int = 200_000  # llguidance: lexer work per mask (~14k/ms)
    step_max_items: int = 50_000  # llguidance: Earley items per mask (~20k/ms)


class CompiledGrammar:
    """A compiled constraint: makes a fresh matcher per request (or per sample)."""

    def __init__(self, params: StructuredOutputsParams, ll_matcher: llg.LLMatcher, compiler: GrammarCompiler):
        self.params = params
        self._template = ll_matcher  # never advanced: copies are
        self._compiler = compiler

    def new_matcher(self) -> GrammarMatcher:
        """A matcher at the start of the grammar."""
        c = self._compiler
        return GrammarMatcher(self._template.deep_copy(), c.eos_token_ids, c.vocab_size)


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` for one tokenizer; the compiled grammars live in an LRU."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None, *,
                 limits: CompileLimits = CompileLimits(), cache_size: int = 256):
        if llg is None:
            raise ValueError(f"structured outputs need llguidance (pip install llguidance): {_LLG_ERROR}")
        if not tokenizer.eos_token_ids:
            raise ValueError("structured outputs need a tokenizer with an EOS token.")
        # The model's vocab may be larger than the tokenizer's (padded embeddings): ids past the
        # tokenizer's have no text, and llguidance never allows them.
        self.vocab_size = max(vocab_size or 0, tokenizer.vocab_size)
        self.eos_token_ids = tuple(tokenizer.eos_token_ids)
        self.ll_tokenizer = ll_tokenizer(tokenizer.backend, self.vocab_size, self.eos_token_ids,
                                         tokenizer.bos_token_id)
        self.limits = limits
        self._ll_limits = llg.LLParserLimits(
            max_grammar_size=limits.max_grammar_size, initial_lexer_fuel=limits.initial_lexer_fuel,
            step_lexer_fuel=limits.step_lexer_fuel, step_max_items=limits.step_max_items,
            verbose_errors=False)  # errors name the problem without echoing the parser state
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor: llg.LLExecutor | None = None

    @property
    def bitmask_width(self) -> int:
        """W: int32 words per bitmask row."""
        return (self.vocab_size + 31) // 32

    def allocate_bitmask(self, num_rows: int) -> np.ndarray:
        """A [num_rows, W] int32 bitmask with every token allowed."""
        return np.full((num_rows, self.bitmask_width), -1, np.int32)

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """The compiled grammar of `params` (cached by its canonical text); ValueError if it is bad."""
        with self._lock:
            hit = self._cache.get(params.key)
            if hit is not None:
                self._cache.move_to_end(params.key)
                return hit
        compiled = CompiledGrammar(params, self._build(params), self)
        with self._lock:
            self._cache[params.key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        """A fresh matcher for one request (compiling or reusing its grammar)."""
        return self.compile(params).new_matcher()

    def fill_bitmasks(self, rows: list[tuple[GrammarMatcher, int]], bitmask: np.ndarray) -> None:
        """Fills row r of `bitmask` [R, W] for each (matcher, r), on llguidance's thread pool."""
        if self._executor is None:
            self._executor = llg.LLExecutor()
        for m, r in rows:
            m._check_row(bitmask, r)
        live = [(m._ll, r) for m, r in rows]
        if live:
            llg_np.fill_next_token_bitmask_par(self._executor, live, bitmask)

    # ------------------------------------------------------------------------------------ build

    def _build(self, params: StructuredOutputsParams) -> llg.LLMatcher:
        check_size(params, self.limits)
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                grammar = to_llguidance_grammar(params)
                m = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=self._ll_limits)
                if not m.is_error():  # the first mask builds the lexer: part of compiling
                    m.compute_bitmask()
                result["matcher"] = m
            except Exception as e:  # noqa: BLE001 (re-raised below, on the caller's thread)
                result["error"] = e
            finally:
                with _LEFT_RUNNING_LOCK:
                    _LEFT_RUNNING.discard(threading.current_thread())

        thread = threading.Thread(target=work, name="grammar-compile", daemon=True)
        with _LEFT_RUNNING_LOCK:
            _LEFT_RUNNING.add(thread)
        thread.start()
        thread.join(self.limits.time_limit_s)
        if thread.is_alive():  # left to finish on its own (waited for at exit): fuel limits bound it
            raise ValueError(f"the {params.kind} constraint did not compile within {self.limits.time_limit_s:g} s "
                             "(too complex: simplify the schema, e.g. less anyOf nesting or smaller enums).")
        if "error" in result:
            e = result["error"]
            raise ValueError(f"invalid {params.kind} constraint: {e}") from e
        m = result["matcher"]
        if m.is_error():
            raise ValueError(f"invalid {params.kind} constraint: {_first_line(m.get_error())}")
        return m


def to_llguidance_grammar(params: StructuredOutputsParams) -> str:
    """The llguidance grammar text of `params` (JSON schema, regex, choice, Lark/GBNF, structural tag)."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = params.json if kind == "json" else {"type": "object"}
        return _json_grammar(schema, params)
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llg.grammar_from("choice", json.dumps(params.choice))
    if kind == "grammar":
        return llg.grammar_from("grammar", params.grammar)  # Lark as is, GBNF converted to Lark
    tags = []
    for s in params.structural_tag["structures"]:
        trigger = next(t for t in params.structural_tag["triggers"] if s["begin"].startswith(t))
        tags.append(llg.StructTag(trigger=trigger, begin=s["begin"], end=s["end"],
                                  grammar=_prepare_schema(s["schema"], params)))
    return llg.StructTag.to_grammar(tags)


def _json_grammar(schema: dict, params: StructuredOutputsParams) -> str:
    options: dict[str, Any] = {"whitespace_flexible": not params.disable_any_whitespace}
    if params.whitespace_pattern is not None:
        options["whitespace_pattern"] = params.whitespace_pattern
    return llg.LLMatcher.grammar_from_json_schema(_prepare_schema(schema, params), defaults=options)


def _prepare_schema(schema: Any, params: StructuredOutputsParams) -> Any:
    if not params.disable_additional_properties:
        return schema
    schema = copy.deepcopy(schema)
    _close_objects(schema)
    return schema


def _close_objects(node: Any) -> None:
    """additionalProperties: false on every object schema with properties that does not say (vLLM's option)."""
    if isinstance(node, list):
        for x in node:
            _close_objects(x)
    elif isinstance(node, dict):
        if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for k, v in node.items():
            if k not in ("enum", "const", "default", "examples"):  # values, not schemas
                _close_objects(v)


def check_size(params: StructuredOutputsParams, limits: CompileLimits) -> None:
    """ValueError if the constraint text, its nesting or its enums are past `limits` (cheap, before compiling)."""
    spec = getattr(params, params.kind)
    text = spec if isinstance(spec, str) else json.dumps(spec, ensure_ascii=False)
    if len(text) > limits.max_spec_chars:
        raise ValueError(f"the {params.kind} constraint has {len(text)} characters; the limit is "
                         f"{limits.max_spec_chars}.")
    if params.kind == "choice" and len(spec) > limits.max_enum_values:
        raise ValueError(f"choice has {len(spec)} options; the limit is {limits.max_enum_values}.")
    if isinstance(spec, dict):
        depth, values = _measure(spec)
        if depth > limits.max_schema_depth:
            raise ValueError(f"the schema nests {depth} levels deep; the limit is {limits.max_schema_depth}.")
        if values > limits.max_enum_values:
            raise ValueError(f"the schema has {values} enum/const values; the limit is {limits.max_enum_values}.")


def _measure(root: Any) -> tuple[int, int]:
    """(nesting depth, number of enum and const values) of a JSON document, without recursion."""
    depth, values, stack = 0, 0, [(root, 1)]
    while stack:
        node, d = stack.pop()
        depth = max(depth, d)
        if isinstance(node, dict):
            values += len(node["enum"]) if isinstance(node.get("enum"), list) else 0
            values += 1 if "const" in node else 0
            stack.extend((v, d + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
    return depth, values


def _first_line(message: str) -> str:
    """llguidance's message, short: its first line, and the regex parser's "error: ..." line if any."""
    lines = [line.strip() for line in message.strip().splitlines()]
    if not lines:
        return "unknown error"
    detail = next((line for line in lines[1:] if line.startswith("error:")), None)
    return lines[0] + (" " + detail if detail else "")
