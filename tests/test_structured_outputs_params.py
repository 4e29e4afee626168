"""Constraint specs from the request shapes, and bad constraints: each a clear ValueError, fast."""

import json
import time

import pytest

from pagedjax.structured_outputs import (
    CompileLimits,
    GrammarCompiler,
    StructuredOutputsParams,
    structured_outputs_from_request,
)
from pagedjax.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(load_tokenizer())


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize("fields, expected", [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA,
                                                                  "strict": True, "description": "d"}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "any"}}},
     StructuredOutputsParams(json_object=True)),
    ({"structured_outputs": {"regex": "[a-z]+"}}, StructuredOutputsParams(regex="[a-z]+")),
    ({"structured_outputs": {"json": json.dumps(SCHEMA), "disable_any_whitespace": True}},
     StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
    ({"structured_outputs": {"choice": ["a", "b"], "disable_fallback": True}},
     StructuredOutputsParams(choice=["a", "b"])),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "guidance", "guided_whitespace_pattern": " ?"},
     StructuredOutputsParams(json=SCHEMA, whitespace_pattern=" ?")),
    ({"guided_regex": "x+", "guided_decoding_backend": "auto"}, StructuredOutputsParams(regex="x+")),
    ({"guided_choice": ["yes", "no"]}, StructuredOutputsParams(choice=["yes", "no"])),
    ({"guided_grammar": "start: \"a\""}, StructuredOutputsParams(grammar="start: \"a\"")),
    ({"guided_json_object": True}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "structural_tag", "triggers": ["<f="],
                          "structures": [{"begin": "<f=x>", "schema": SCHEMA, "end": "</f>"}]}},
     StructuredOutputsParams(structural_tag={"triggers": ["<f="], "structures": [
         {"begin": "<f=x>", "schema": SCHEMA, "end": "</f>"}]})),
])
def test_request_shapes(fields, expected):
    got = structured_outputs_from_request(fields)
    assert got == expected
    if expected is not None:
        assert got.kind == expected.kind and got.key == expected.key and hash(got) == hash(expected)


@pytest.mark.parametrize("fields, words", [
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
     "response_format and structured_outputs"),
    ({"structured_outputs": {"regex": "a"}, "guided_regex": "b"}, "structured_outputs and guided_*"),
    ({"response_format": {"type": "json_object"}, "guided_json": SCHEMA}, "response_format and guided_*"),
    ({"guided_json": SCHEMA, "guided_decoding_backend": "xgrammar"}, "llguidance"),
    ({"guided_json": SCHEMA, "guided_regex": "a"}, "exactly one"),
    ({"response_format": {"type": "json_schema"}}, '"json_schema" object'),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}, "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}}, "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "bad": 1}}},
     "unknown field"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format must be"),
    ({"structured_outputs": {"regexp": "a"}}, "unknown field"),
    ({"structured_outputs": {}}, "exactly one"),
    ({"guided_regex": "a", "guided_whitespace_pattern": " "}, "JSON constraints only"),
])
def test_bad_request_shapes(fields, words):
    with pytest.raises(ValueError, match=None) as e:
        structured_outputs_from_request(fields)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("kwargs, words", [
    ({}, "exactly one"),
    ({"json": SCHEMA, "regex": "a"}, "json, regex"),
    ({"json_object": False}, "exactly one"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": "[1, 2]"}, "JSON schema"),
    ({"regex": ""}, "non-empty string"),
    ({"grammar": 3}, "non-empty string"),
    ({"choice": []}, "non-empty list"),
    ({"choice": ["a", 1]}, "non-empty list"),
    ({"choice": "ab"}, "non-empty list"),
    ({"json": SCHEMA, "whitespace_pattern": " ", "disable_any_whitespace": True}, "contradict"),
    ({"structural_tag": {"triggers": ["<a"], "structures": [{"begin": "<b>", "schema": {}, "end": ""}]}},
     "none of the triggers"),
])
def test_bad_params(kwargs, words):
    with pytest.raises(ValueError) as e:
        StructuredOutputsParams(**kwargs)
    assert words in str(e.value), str(e.value)


@pytest.mark.parametrize("spec, words", [
    ({"json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, '"not"'),
    ({"json": {"type": "string", "if": {"maxLength": 2}, "then": {"minLength": 1}}}, '"if"'),
    ({"json": {"type": "array", "uniqueItems": True}}, '"uniqueItems"'),
    ({"json": {"type": "object", "propertyNames": {"maxLength": 3}}}, '"propertyNames"'),
    ({"json": {"oneOf": [{"type": "integer"}, {"type": "number"}]}}, "oneOf"),  # overlapping branches
    ({"json": {"type": "strin"}}, "strin"),
    ({"json": {"$ref": "#/$defs/missing"}}, "missing"),
    ({"json": {"type": "string", "format": "not-a-format"}}, "not-a-format"),
    ({"json": {"type": "string", "pattern": "(("}}, "unclosed group"),
    ({"regex": "a(b"}, "unclosed group"),
    ({"regex": "[z-a]"}, "invalid"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"grammar": 'root ::= "a" | missing'}, "missing"),
    ({"grammar": "start: /[/"}, "regex"),
])
def test_bad_constraints_name_the_problem(compiler, spec, words):
    t0 = time.perf_counter()
    with pytest.raises(ValueError) as e:
        compiler.compile(StructuredOutputsParams(**spec))
    assert words in str(e.value), str(e.value)
    assert time.perf_counter() - t0 < 5.0  # an error, not a long compile


def _nested_any_of(depth: int) -> dict:
    s: dict = {"type": "integer"}
    for i in range(depth):
        s = {"anyOf": [s, {"type": "object", "properties": {f"x{i}": s, "y": s}, "required": [f"x{i}"]}]}
    return s


def test_size_limits_refuse_before_compiling(compiler):
    tok = load_tokenizer()
    small = GrammarCompiler(tok, limits=CompileLimits(max_spec_chars=2000, max_schema_depth=8, max_enum_values=50))
    with pytest.raises(ValueError, match="characters; the limit is 2000"):
        small.compile(StructuredOutputsParams(regex="a" * 2001))
    with pytest.raises(ValueError, match="nests .* levels deep; the limit is 8"):
        small.compile(StructuredOutputsParams(json=_nested_any_of(3)))
    with pytest.raises(ValueError, match="51 enum/const values; the limit is 50"):
        small.compile(StructuredOutputsParams(json={"enum": list(range(51))}))
    with pytest.raises(ValueError, match="choice has 51 options"):
        small.compile(StructuredOutputsParams(choice=[str(i) for i in range(51)]))
    with pytest.raises(ValueError, match="enum/const values"):  # the default limit: a huge enum
        compiler.compile(StructuredOutputsParams(json={"enum": [f"value_{i}" for i in range(20_000)]}))


def test_pathological_schema_hits_the_time_limit():
    tok = load_tokenizer()
    limit = 0.05
    fast = GrammarCompiler(tok, limits=CompileLimits(time_limit_s=limit))
    schema = _nested_any_of(8)  # ~0.4 MB, compiles in ~0.3 s here: 6x the limit
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="did not compile within 0.05 s"):
        fast.compile(StructuredOutputsParams(json=schema))
    assert time.perf_counter() - t0 < limit + 1.0  # answered at the limit, not when compiling ended


def test_llguidance_limits_end_an_exploding_schema(compiler):
    with pytest.raises(ValueError, match="too large|too big|limit"):
        compiler.compile(StructuredOutputsParams(json=_nested_any_of(10)))
