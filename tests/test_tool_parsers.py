"""Tool-call parsers on outputs written in each family's real format; streams cut at every position
(and at many random positions) must join to exactly the non-streamed result.

Formats, from the model families' own documentation:
- hermes: NousResearch Hermes-2-Pro model card ("<tool_call>\\n{"arguments": ..., "name": ...}\\n
  </tool_call>", arguments first) and Qwen2.5 / Qwen3 chat templates and Qwen's function-calling
  guide ("<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>").
- llama3_json: Meta's Llama 3.1 / 3.2 prompt format, JSON-based tool calling
  ({"name": "function_name", "parameters": {...}}), optionally after <|python_tag|>.
- mistral: mistral-common's tokenizers; v3 (Mistral-7B-Instruct-v0.3 model card):
  "[TOOL_CALLS] [{"name": ..., "arguments": {...}}]"; v11+ (Mistral-Small-3.2):
  "[TOOL_CALLS]name[ARGS]{...}".
"""

import json

import numpy as np
import pytest

from pagedjax.tool_parsers import TOOL_PARSERS, assemble, get_tool_parser

SEED = 4242

# (parser, model output, expected content, expected [(name, arguments as a Python value)])
CASES = [
    ("hermes",  # Hermes-2-Pro: arguments before name
     '<tool_call>\n{"arguments": {"symbol": "TSLA"}, "name": "get_stock_fundamentals"}\n</tool_call>',
     None, [("get_stock_fundamentals", {"symbol": "TSLA"})]),
    ("hermes",  # Qwen2.5 function-calling guide: two parallel calls
     '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, '
     'USA", "date": "2024-10-01"}}\n</tool_call>',
     None, [("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ("get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"})]),
    ("hermes",  # Qwen3: a sentence first; unicode, escapes and braces inside strings
     'I\'ll look that up for you.\n\n<tool_call>\n{"name": "search", "arguments": {"query": "Zürich \\"café\\" '
     '{menu}", "filters": {"max": 3, "tags": ["a", "b"], "exact": true, "near": null, "ratio": -1.5e-3}}}\n'
     '</tool_call>',
     "I'll look that up for you.\n\n",
     [("search", {"query": 'Zürich "café" {menu}',
                  "filters": {"max": 3, "tags": ["a", "b"], "exact": True, "near": None, "ratio": -1.5e-3}})]),
    ("hermes",  # the model stopped right after the object (no closing tag); no arguments key
     'Calling now <tool_call>\n{"name": "get_time"}', "Calling now ", [("get_time", {})]),
    ("hermes", "The capital of France is Paris. Use <b>bold</b> if you like <tool",
     "The capital of France is Paris. Use <b>bold</b> if you like <tool", []),
    ("llama3_json",  # Llama 3.1 JSON-based tool calling
     '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}',
     None, [("get_current_conditions", {"location": "San Francisco, CA", "unit": "Fahrenheit"})]),
    ("llama3_json",  # after <|python_tag|>, two calls separated by ';', "arguments" spelling
     '<|python_tag|>{"name": "spotify_trending_songs", "parameters": {"n": 5}}; '
     '{"name": "get_weather", "arguments": {"city": "Tokyo", "days": [1, 2]}}',
     None, [("spotify_trending_songs", {"n": 5}), ("get_weather", {"city": "Tokyo", "days": [1, 2]})]),
    ("llama3_json", "\n\n{\"name\": \"noop\", \"parameters\": {}}", None, [("noop", {})]),
    ("llama3_json", "The answer is {x: 1} in set notation.", "The answer is {x: 1} in set notation.", []),
    ("mistral",  # v3 tokenizer, Mistral-7B-Instruct-v0.3
     '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
     '"format": "celsius"}}]',
     None, [("get_current_weather", {"location": "Paris, France", "format": "celsius"})]),
    ("mistral",  # v3 with two calls and an id key the model copied from its template
     '[TOOL_CALLS][{"name": "add", "arguments": {"a": 3, "b": 4}, "id": "abc123xyz"}, '
     '{"name": "multiply", "arguments": {"a": 2.5, "b": -1}}]',
     None, [("add", {"a": 3, "b": 4}), ("multiply", {"a": 2.5, "b": -1})]),
    ("mistral",  # v11+, Mistral-Small-3.2: content first, then name[ARGS]{...} per call
     'Let me check both cities.[TOOL_CALLS]get_current_weather[ARGS]{"location": "Paris, France", '
     '"format": "celsius"}[TOOL_CALLS]get_current_weather[ARGS]{"location": "Tōkyō", "format": "celsius"}',
     "Let me check both cities.",
     [("get_current_weather", {"location": "Paris, France", "format": "celsius"}),
      ("get_current_weather", {"location": "Tōkyō", "format": "celsius"})]),
    ("mistral", '[TOOL_CALLS]lookup{"q": "[ARGS] is literal here"}', None,
     [("lookup", {"q": "[ARGS] is literal here"})]),
    ("mistral", "No tools needed: 2 + 2 = 4.", "No tools needed: 2 + 2 = 4.", []),
]


def _key(msg):
    return msg.content, [(c.name, c.arguments) for c in msg.tool_calls]


def _stream(parser_cls, pieces):
    p = parser_cls()
    deltas = [d for piece in pieces for d in p.feed(piece)] + p.finish()
    return assemble(deltas), deltas


@pytest.mark.parametrize("name, text, content, calls", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_extract_and_stream(name, text, content, calls):
    cls = get_tool_parser(name)
    got_content, got_calls = cls().extract_tool_calls(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    for c in got_calls:  # arguments are JSON text with normalized separators
        assert c.arguments == json.dumps(json.loads(c.arguments), ensure_ascii=False) or "e-" in c.arguments
        assert (len(c.id) == 9 and c.id.isalnum()) if name == "mistral" else c.id.startswith("call_")
    assert len({c.id for c in got_calls}) == len(got_calls)
    whole = (content or "", [(c.name, c.arguments) for c in got_calls])
    for cut in range(len(text) + 1):  # two pieces, cut everywhere
        msg, _ = _stream(cls, [text[:cut], text[cut:]])
        assert _key(msg) == whole, f"cut at {cut}"
    msg, deltas = _stream(cls, list(text))  # one character at a time
    assert _key(msg) == whole
    rng = np.random.default_rng(SEED)
    for trial in range(100):  # many random cuts
        cuts = np.sort(rng.choice(len(text) + 1, size=rng.integers(1, 12), replace=True))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        msg, _ = _stream(cls, pieces)
        assert _key(msg) == whole, f"seed={SEED} trial={trial} cuts={cuts.tolist()}"


def test_delta_shapes_are_openai_chunks():
    text = 'Sure.<tool_call>{"name": "f", "arguments": {"x": "yz"}}</tool_call>'
    p = get_tool_parser("hermes")()
    out = [d.to_dict() for piece in (text[:8], text[8:30], text[30:50], text[50:]) for d in p.feed(piece)]
    out += [d.to_dict() for d in p.finish()]
    assert out[0] == {"content": "Sure."}
    first = next(d for d in out if "tool_calls" in d)["tool_calls"][0]
    assert first["index"] == 0 and first["type"] == "function" and first["id"].startswith("call_")
    assert first["function"] == {"name": "f", "arguments": ""}  # the name first, arguments after
    later = [d["tool_calls"][0] for d in out if "tool_calls" in d][1:]
    assert later and all(set(t) == {"index", "function"} and set(t["function"]) == {"arguments"} for t in later)
    assert "".join(t["function"]["arguments"] for t in later) == '{"x": "yz"}'
    assert len(later) >= 2  # the arguments streamed in pieces, not at the end


@pytest.mark.parametrize("name, text", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'),  # object not closed
    ("hermes", '<tool_call>\n{"function": "f"}\n</tool_call>'),  # no name
    ("hermes", "<tool_call>\nnot json at all\n</tool_call>"),
    ("llama3_json", '{"answer": 42, "units": "none"}'),  # plain JSON, not a call
    ("llama3_json", '<|python_tag|>brave_search.call(query="weather")'),  # Llama's built-in tool syntax
    ("mistral", "[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": [1, 2]}]"),  # arguments not an object
    ("mistral", "[TOOL_CALLS]f[ARGS]{\"a\": 1"),  # cut off by max_tokens
])
def test_malformed_calls_fall_back_to_content(name, text):
    cls = get_tool_parser(name)
    assert cls().extract_tool_calls(text) == (text, [])
    for cut in range(len(text) + 1):  # a stream whose calls never started also gives back the text
        msg, _ = _stream(cls, [text[:cut], text[cut:]])
        if not msg.tool_calls:
            assert msg.content == text, f"cut at {cut}"


def test_registry():
    assert set(TOOL_PARSERS) == {"hermes", "llama3_json", "mistral"}
    with pytest.raises(ValueError, match="unknown tool call parser 'qwen9'; known: hermes, llama3_json, mistral"):
        get_tool_parser("qwen9")
    p = get_tool_parser("mistral")()
    p.finish()
    with pytest.raises(ValueError, match="after finish"):
        p.feed("x")
