"""Structured outputs on llguidance with the real bundled tokenizer (SmolLM2, 49152 ids).

The oracle is independent of the grammar library: every output is checked with `json` and the
`jsonschema` library, `re.fullmatch`, Python's `ast`, or membership in the choices. A "random
model" samples uniformly among the tokens the bitmask allows (a temperature-1 stand-in for a
model) until EOS; at every step, EOS must be allowed exactly when the text so far is complete.
"""

import ast
import json
import re

import jsonschema
import numpy as np
import pytest

from pagedjax.structured_outputs import GrammarCompiler, StructuredOutputsParams
from pagedjax.tokenizer import load_tokenizer

EXTRA_IDS = 77  # the model's vocab is larger than the tokenizer's: these ids must never be allowed


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, tok.vocab_size + EXTRA_IDS)


def allowed_ids(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    """Unpacks one int32 bitmask row (bit j of word w = token 32*w + j) with numpy alone."""
    words = bitmask_row.astype(np.int64) & 0xFFFFFFFF  # [W]
    bits = (words[:, None] >> np.arange(32)) & 1  # [W, 32]
    return np.flatnonzero(bits.reshape(-1)[:vocab])


def random_walk(compiler, tok, matcher, seed, *, is_complete, max_tokens=600, prefix=()):
    """Samples allowed tokens at random until EOS; returns the text. Checks on every step that the
    mask row is fully written, never allows ids past the tokenizer's, and allows EOS exactly when
    `is_complete(text so far)`."""
    rng = np.random.default_rng(seed)
    eos = tok.eos_token_id
    out = list(prefix)
    for _ in range(max_tokens):
        rows = np.stack([np.zeros(compiler.bitmask_width, np.int32), np.full(compiler.bitmask_width, -1, np.int32)])
        matcher.fill_bitmask(rows, 0)  # poisoned both ways: every word must be written
        matcher.fill_bitmask(rows, 1)
        assert np.array_equal(rows[0], rows[1]), f"seed={seed}: a bitmask word was left unwritten"
        ids = allowed_ids(rows[0], compiler.vocab_size)
        assert len(ids) > 0, f"seed={seed}: no token allowed after {tok.decode(out)!r}"
        assert ids[-1] < tok.vocab_size, f"seed={seed}: id {ids[-1]} past the tokenizer's vocab allowed"
        text = tok.decode(out, skip_special_tokens=False)
        complete = "\ufffd" not in text and is_complete(text)
        assert (eos in ids) == complete, f"seed={seed}: EOS allowed={eos in ids} but complete={complete}: {text!r}"
        t = int(rng.choice(ids))
        assert matcher.accept_token(t), f"seed={seed}: an allowed token {t} was refused"
        if t == eos:
            assert matcher.is_finished and not matcher.is_stuck
            return text
        out.append(t)
    raise AssertionError(f"seed={seed}: no EOS within {max_tokens} tokens: {tok.decode(out)!r}")


def valid_json(schema):
    def check(text: str) -> bool:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            return False
        return True
    return check


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
        "kind": {"enum": ["cat", "dog", "red fox"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "parent": {"anyOf": [{"type": "null"}, {
            "type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                             "ok": {"type": "boolean"}},
            "required": ["id"], "additionalProperties": False}]},
        "matrix": {"type": "array", "maxItems": 2,
                   "items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {"enum": [0, 1]}}},
    },
    "required": ["name", "age", "kind", "tags", "parent"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", range(6))
def test_random_model_json_schema(compiler, tok, seed):
    sp = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    text = random_walk(compiler, tok, compiler.matcher(sp), seed, is_complete=valid_json(PERSON))
    jsonschema.validate(json.loads(text), PERSON)


def test_random_model_additional_properties_closed_by_option(compiler, tok):
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"type": "object", "properties": {"c": {"type": "boolean"}}}},
              "required": ["a"]}
    closed = {**schema, "additionalProperties": False,
              "properties": {**schema["properties"], "b": {**schema["properties"]["b"], "additionalProperties": False}}}
    sp = StructuredOutputsParams(json=schema, disable_any_whitespace=True, disable_additional_properties=True)
    for seed in range(4):
        text = random_walk(compiler, tok, compiler.matcher(sp), seed, is_complete=valid_json(closed))
        jsonschema.validate(json.loads(text), closed)


def test_random_model_json_object_and_whitespace_pattern(compiler, tok):
    sp = StructuredOutputsParams(
        json={"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 5}},
              "required": ["x"], "additionalProperties": False},
        whitespace_pattern=r"[ ]?")
    for seed in range(3):
        text = random_walk(compiler, tok, compiler.matcher(sp), seed,
                           is_complete=lambda t: re.fullmatch(r'\{ ?"x" ?: ?[0-5] ?\}', t) is not None)
        assert 0 <= json.loads(text)["x"] <= 5


@pytest.mark.parametrize("seed", range(4))
def test_random_model_regex(compiler, tok, seed):
    pattern = r"[0-9]{3}-[a-z]{2,4}(\.[A-Z])?"
    sp = StructuredOutputsParams(regex=pattern)
    text = random_walk(compiler, tok, compiler.matcher(sp), seed,
                       is_complete=lambda t: re.fullmatch(pattern, t) is not None)
    assert re.fullmatch(pattern, text)


def test_random_model_choice(compiler, tok):
    choices = ["yes", "no", "maybe so", "n/a", "yes!"]
    sp = StructuredOutputsParams(choice=choices)
    seen = set()
    for seed in range(12):
        text = random_walk(compiler, tok, compiler.matcher(sp), seed, is_complete=lambda t: t in choices)
        seen.add(text)
    assert seen <= set(choices) and len(seen) >= 3


ARITH_LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""


def _is_arith(text: str) -> bool:
    """An expression of + and - over integers of 1-3 digits and parentheses (Python's parser)."""
    if not re.fullmatch(r"[0-9+\-()]+", text) or re.search(r"[0-9]{4}", text):
        return False
    try:  # the grammar's numbers may have leading zeros, Python's may not
        tree = ast.parse(re.sub(r"(?<![0-9])0+(?=[0-9])", "", text), mode="eval")
    except SyntaxError:
        return False
    ok = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Constant)
    return all(isinstance(n, ok) for n in ast.walk(tree)) and not re.search(r"[+\-]{2}|\(\)|^[+-]|\([+-]", text)


@pytest.mark.parametrize("seed", range(4))
def test_random_model_lark_grammar(compiler, tok, seed):
    sp = StructuredOutputsParams(grammar=ARITH_LARK)
    text = random_walk(compiler, tok, compiler.matcher(sp), seed, is_complete=_is_arith)
    assert _is_arith(text)
    assert isinstance(eval(re.sub(r"(?<![0-9])0+(?=[0-9])", "", text), {"__builtins__": {}}), int)  # noqa: S307


def test_gbnf_grammar_is_converted(compiler, tok):
    gbnf = 'root ::= answer " " number\nanswer ::= "yes" | "no"\nnumber ::= [1-9] [0-9]?'
    sp = StructuredOutputsParams(grammar=gbnf)
    for seed in range(4):
        text = random_walk(compiler, tok, compiler.matcher(sp), seed,
                           is_complete=lambda t: re.fullmatch(r"(yes|no) [1-9][0-9]?", t) is not None)
        assert re.fullmatch(r"(yes|no) [1-9][0-9]?", text)


def _feed(compiler, tok, sp, text):
    m = compiler.matcher(sp)
    ok = all(m.accept_token(t) for t in tok.encode(text, add_special_tokens=False))
    return m, ok


def test_flexible_whitespace_takes_pretty_json_and_refuses_invalid(compiler, tok):
    sp = StructuredOutputsParams(json=PERSON)
    doc = {"name": "Ann", "age": 41, "kind": "red fox", "tags": ["a", "bc"], "parent": {"id": 7, "ok": True},
           "matrix": [[0, 1]]}
    jsonschema.validate(doc, PERSON)
    m, ok = _feed(compiler, tok, sp, json.dumps(doc, indent=2))
    assert ok and tok.eos_token_id in m.allowed_token_ids()
    assert m.accept_token(tok.eos_token_id) and m.terminated
    for bad in ({**doc, "age": 121}, {**doc, "kind": "cow"}, {**doc, "tags": ["a", "b", "c", "d"]},
                {**doc, "name": "too long name"}, {**doc, "extra": 1}, {**doc, "parent": {"id": 0}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, PERSON)
        m, ok = _feed(compiler, tok, sp, json.dumps(bad))
        assert not ok and m.is_stuck and m.error, bad
        row = compiler.allocate_bitmask(1)
        m.fill_bitmask(row, 0)
        assert list(allowed_ids(row[0], compiler.vocab_size)) == [tok.eos_token_id]  # stuck: EOS only


def test_eos_follows_vllm(compiler, tok):
    sp = StructuredOutputsParams(regex="ab(c)?")
    m = compiler.matcher(sp)
    assert not m.accept_token(tok.eos_token_id) and m.is_stuck  # EOS before the grammar accepts: refused
    m = compiler.matcher(sp)
    for t in tok.encode("ab", add_special_tokens=False):
        assert m.accept_token(t)
    assert m.is_accepting and not m.is_finished  # "ab" is complete, "abc" still possible
    assert tok.eos_token_id in m.allowed_token_ids()
    m2 = m.fork()
    assert m.accept_token(tok.eos_token_id) and m.terminated and m.is_finished
    for t in tok.encode("c", add_special_tokens=False):
        assert m2.accept_token(t)
    assert m2.is_finished and not m2.terminated  # nothing but EOS can follow
    assert list(m2.allowed_token_ids()) == [tok.eos_token_id]
    assert m2.accept_token(tok.eos_token_id) and m2.terminated
    assert not m2.accept_token(tok.encode("c", add_special_tokens=False)[0])  # nothing after EOS


def test_fork_for_n_samples_and_rollback(compiler, tok):
    sp = StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)
    parent = compiler.matcher(sp)
    for t in tok.encode('{"name":"Bo","age":3', add_special_tokens=False):
        assert parent.accept_token(t)
    before = parent.allowed_token_ids()
    forks = [parent.fork() for _ in range(3)]
    prefix = tok.encode('{"name":"Bo","age":3', add_special_tokens=False)
    for seed, f in enumerate(forks):
        text = random_walk(compiler, tok, f, seed, is_complete=valid_json(PERSON), prefix=prefix)
        jsonschema.validate(json.loads(text), PERSON)
    assert np.array_equal(parent.allowed_token_ids(), before)  # the samples did not move the parent
    n = parent.num_tokens
    for t in tok.encode(',"kind":"cat"', add_special_tokens=False):
        assert parent.accept_token(t)
    parent.rollback(parent.num_tokens - n)
    assert np.array_equal(parent.allowed_token_ids(), before)


def test_ids_past_the_tokenizer_are_refused(compiler, tok):
    m = compiler.matcher(StructuredOutputsParams(json_object=True))
    assert compiler.bitmask_width == -(-(tok.vocab_size + EXTRA_IDS) // 32)
    assert not m.accept_token(tok.vocab_size + 3) and m.is_stuck


def test_compile_cache_reuses_grammars(compiler):
    a = compiler.compile(StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "string"}}}))
    b = compiler.compile(StructuredOutputsParams(json='{"properties": {"a": {"type": "string"}}, "type": "object"}'))
    assert a is b  # same schema, other key order and given as text
    c = compiler.compile(StructuredOutputsParams(json={"type": "object"}, disable_any_whitespace=True))
    assert c is not compiler.compile(StructuredOutputsParams(json={"type": "object"}))


def test_fill_bitmasks_in_parallel_matches_one_by_one(compiler, tok):
    specs = [StructuredOutputsParams(json=PERSON), StructuredOutputsParams(regex="[a-z]+"),
             StructuredOutputsParams(choice=["red", "green"])]
    matchers = [compiler.matcher(s) for s in specs]
    together = np.zeros((4, compiler.bitmask_width), np.int32)
    compiler.fill_bitmasks([(m, r) for r, m in zip((3, 0, 1), matchers)], together)
    for r, m in zip((3, 0, 1), matchers):
        one = compiler.allocate_bitmask(1)
        m.fill_bitmask(one, 0)
        assert np.array_equal(together[r], one[0])
    assert not together[2].any()  # a row no matcher was given stays as it was


def test_structural_tag_constrains_only_the_tagged_json(compiler, tok):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
              "additionalProperties": False}
    sp = StructuredOutputsParams(structural_tag={
        "triggers": ["<function="],
        "structures": [{"begin": "<function=get_weather>", "schema": schema, "end": "</function>"}]})
    m, ok = _feed(compiler, tok, sp, 'Let me check. <function=get_weather>{"city": "Paris"}</function> Done.')
    assert ok and tok.eos_token_id in m.allowed_token_ids()
    for bad in ('<function=get_weather>{"town": "Paris"}</function>', '<function=get_time>{}</function>',
                '<function=get_weather>{"city": "Paris"}</fun'):
        m, ok = _feed(compiler, tok, sp, bad)
        assert not ok or tok.eos_token_id not in m.allowed_token_ids(), bad
