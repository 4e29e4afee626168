"""Forced tool calls: every completion the grammar allows parses into calls whose arguments
validate (jsonschema) against the called function's parameters; a random model drives it."""

import json

import jsonschema
import numpy as np
import pytest

from pagedjax.structured_outputs import (
    ForcedToolCallParser,
    GrammarCompiler,
    forced_tool_calls,
    tool_choice_structured_outputs,
)
from pagedjax.tokenizer import load_tokenizer
from pagedjax.tool_parsers import assemble

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 6},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": -50, "maximum": 50},
            "b": {"$ref": "#/$defs/Small"}},
            "required": ["a", "b"], "additionalProperties": False,
            "$defs": {"Small": {"type": "integer", "minimum": 0, "maximum": 9}}}}},
    {"type": "function", "function": {"name": "ping"}},  # no parameters: {}
]
PARAMS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "properties": {}})
          for t in TOOLS}
def allowed_ids(bitmask_row: np.ndarray, vocab: int) -> np.ndarray:
    """Unpacks one int32 bitmask row (bit j of word w = token 32*w + j) with numpy alone."""
    bits = np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


CLOSED = {**PARAMS, "ping": {"type": "object", "properties": {}, "additionalProperties": False}}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok)


def sample(compiler, tok, sp, seed, max_tokens=400):
    rng = np.random.default_rng(seed)
    m = compiler.matcher(sp)
    out = []
    row = compiler.allocate_bitmask(1)
    for _ in range(max_tokens):
        m.fill_bitmask(row, 0)
        t = int(rng.choice(allowed_ids(row[0], compiler.vocab_size)))
        assert m.accept_token(t), f"seed={seed}"
        if t == tok.eos_token_id:
            return tok.decode(out, skip_special_tokens=False)
        out.append(t)
    raise AssertionError(f"seed={seed}: no EOS within {max_tokens} tokens: {tok.decode(out)!r}")


def check_calls(calls, seed, text):
    assert calls, f"seed={seed}: no calls in {text!r}"
    for c in calls:
        assert c.id.startswith("call_") and len(c.id) == 29
        assert c.name in CLOSED, f"seed={seed}: {c.name!r}"
        jsonschema.validate(json.loads(c.arguments), CLOSED[c.name])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_random_model(compiler, tok, parallel):
    sp = tool_choice_structured_outputs(TOOLS, "required", parallel_tool_calls=parallel)
    sp = type(sp)(json=sp.json, disable_any_whitespace=True, disable_additional_properties=True)
    names = set()
    for seed in range(8):
        text = sample(compiler, tok, sp, seed)
        calls = forced_tool_calls(text, "required")
        check_calls(calls, seed, text)
        assert parallel or len(calls) == 1
        names |= {c.name for c in calls}
        # the calls equal an independent parse of the JSON array
        assert [(c.name, json.loads(c.arguments)) for c in calls] == \
            [(x["name"], x["parameters"]) for x in json.loads(text)]
    assert len(names) >= 2, names


@pytest.mark.parametrize("name", ["get_weather", "add", "ping"])
def test_named_function_random_model(compiler, tok, name):
    sp = tool_choice_structured_outputs(TOOLS, {"type": "function", "function": {"name": name}})
    sp = type(sp)(json=sp.json, disable_any_whitespace=True, disable_additional_properties=True)
    for seed in range(4):
        text = sample(compiler, tok, sp, seed)
        (call,) = forced_tool_calls(text, {"type": "function", "function": {"name": name}})
        assert call.name == name
        check_calls([call], seed, text)
        assert json.loads(call.arguments) == json.loads(text)


def test_forced_output_streams_to_the_same_calls():
    text = '[{"name": "add", "parameters": {"a": -3, "b": 4}},\n {"name":"ping","parameters":{}}]'
    whole = forced_tool_calls(text, "required")
    for cut in range(len(text) + 1):
        p = ForcedToolCallParser(None)
        msg = assemble(p.feed(text[:cut]) + p.feed(text[cut:]) + p.finish())
        assert [(c.name, c.arguments) for c in msg.tool_calls] == [(c.name, c.arguments) for c in whole]
        assert msg.content == ""
    assert [(c.name, json.loads(c.arguments)) for c in whole] == [("add", {"a": -3, "b": 4}), ("ping", {})]


@pytest.mark.parametrize("tools, choice, words", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    (TOOLS, "sometimes", "tool_choice must be"),
    (TOOLS, {"type": "function"}, "tool_choice must be"),
    ([], "required", "at least one tool"),
    ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}],
     "required", "second function"),
    ([{"type": "retrieval"}], "required", "tools[0]"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"$defs": {"X": {"type": "integer"}}}}},
      {"type": "function", "function": {"name": "b", "parameters": {"$defs": {"X": {"type": "string"}}}}}],
     "required", "differently"),
])
def test_bad_tool_choice(tools, choice, words):
    with pytest.raises(ValueError) as e:
        tool_choice_structured_outputs(tools, choice)
    assert words in str(e.value), str(e.value)


def test_unforced_choices_give_no_constraint():
    for choice in (None, "none", "auto"):
        assert tool_choice_structured_outputs(TOOLS, choice) is None


def test_cut_off_output_is_an_error():
    with pytest.raises(ValueError, match="does not parse"):
        forced_tool_calls('[{"name": "add", "parameters": {"a": 1', "required")
