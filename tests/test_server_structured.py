"""Output constraints and logit controls through the real server process, with the official
`openai` client: response_format (json_object, json_schema), vLLM's structured_outputs and
guided_* fields, logit_bias, allowed_token_ids, bad_words, and the 400s of bad constraints.

The model is a tiny random Llama: a constraint must hold whatever it says. Oracles: `jsonschema`,
`re.fullmatch`, membership in the choices, and HF `generate` (greedy, with the bias applied by
a logits processor written here) for logit_bias.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pydantic
import pytest
import torch

from tests import hf_models
from tests.server_process import serve

MAX_LEN = 1024
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "email": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                     "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "email", "tags", "address"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "Describe a user."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-llama")
    hf = hf_models.build_chat_model("llama", folder, seed=5, max_position_embeddings=MAX_LEN)
    return folder, hf


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    """The server with a 0.1 s compile limit: the schemas here compile in a few ms (15 ms on a busy
    machine), the "too slow" one takes 0.5 s on an idle one."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(model[0], log, "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--max-model-len",
               str(MAX_LEN), "--grammar-compile-timeout", "0.1") as srv:
        yield srv


@pytest.fixture(scope="module")
def tok(model):
    from pagedjax.tokenizer import load_tokenizer

    return load_tokenizer(model[0])


def _join_stream(stream) -> dict[int, dict]:
    """Streamed chat chunks joined per choice: content and finish reason."""
    out: dict[int, dict] = {}
    for chunk in stream:
        for ch in chunk.choices:
            c = out.setdefault(ch.index, {"content": "", "finish_reason": None})
            c["content"] += ch.delta.content or ""
            c["finish_reason"] = ch.finish_reason or c["finish_reason"]
    return out


# ------------------------------------------------------------------------------------- JSON


def test_json_schema_n3_plain_and_streamed(server):
    client = server.client()
    rf = {"type": "json_schema", "json_schema": {"name": "user", "schema": SCHEMA, "strict": True}}
    for seed in (1, 2):
        r = client.chat.completions.create(model=server.model, messages=USER, n=3, temperature=1.0, seed=seed,
                                           max_tokens=900, response_format=rf)
        assert len(r.choices) == 3
        for c in r.choices:
            assert c.finish_reason == "stop", (seed, c)
            jsonschema.validate(json.loads(c.message.content), SCHEMA)
        streamed = _join_stream(client.chat.completions.create(
            model=server.model, messages=USER, n=3, temperature=1.0, seed=seed, max_tokens=900, response_format=rf,
            stream=True))
        assert sorted(streamed) == [0, 1, 2]
        for c in streamed.values():
            assert c["finish_reason"] == "stop", (seed, c)
            jsonschema.validate(json.loads(c["content"]), SCHEMA)
        # the same seed, the same samples, streamed or not
        assert sorted(c["content"] for c in streamed.values()) == sorted(c.message.content for c in r.choices)


def test_completions_with_structured_outputs_and_guided_json(server):
    client = server.client()
    for extra in ({"structured_outputs": {"json": SCHEMA}}, {"guided_json": SCHEMA},
                  {"guided_json": json.dumps(SCHEMA)}):
        r = client.completions.create(model=server.model, prompt="User record:", n=3, temperature=1.0, seed=3,
                                      max_tokens=900, extra_body=extra)
        for c in r.choices:
            assert c.finish_reason == "stop", (extra, c)
            jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object(server, tok):
    """Any JSON object. A random model writes endless strings in an unbounded one: a bias towards
    '"' and '}' (a logit_bias with a constraint, as a user could send) lets them close."""
    client = server.client()
    bias = {str(tok.encode(ch, add_special_tokens=False)[0]): 5 for ch in '"}'}
    r = client.chat.completions.create(model=server.model, messages=USER, n=3, temperature=1.0, seed=4,
                                       max_tokens=900, logit_bias=bias, response_format={"type": "json_object"})
    for c in r.choices:
        assert c.finish_reason == "stop" and isinstance(json.loads(c.message.content), dict), c


class Address(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=6)
    zip: int = pydantic.Field(ge=10000, le=99999)


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=1, max_length=6)
    age: int = pydantic.Field(ge=0, le=120)
    role: Literal["admin", "user", "guest"]
    email: str | None = pydantic.Field(max_length=8)
    tags: list[pydantic.constr(max_length=4)] = pydantic.Field(max_length=2)
    address: Address


def test_openai_parse_with_a_pydantic_model(server):
    r = server.client().chat.completions.parse(model=server.model, messages=USER, temperature=1.0, seed=6,
                                               max_tokens=900, response_format=Person)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and isinstance(msg.parsed, Person), msg
    assert Person.model_validate_json(msg.content) == msg.parsed


# ----------------------------------------------------------------------------- regex, choice


def test_regex_and_choice(server):
    client = server.client()
    regex = r"(ab|cd)[0-9]{2,4}-[a-z]{1,5}"
    r = client.completions.create(model=server.model, prompt="Code:", n=3, temperature=1.0, seed=7, max_tokens=200,
                                  extra_body={"guided_regex": regex})
    assert all(re.fullmatch(regex, c.text) and c.finish_reason == "stop" for c in r.choices), r.choices
    choices = ["Paris", "London", "New York"]
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        r = client.chat.completions.create(model=server.model, messages=USER, n=3, temperature=1.0, seed=8,
                                           max_tokens=50, extra_body=extra)
        assert all(c.message.content in choices and c.finish_reason == "stop" for c in r.choices), r.choices
        streamed = _join_stream(client.chat.completions.create(
            model=server.model, messages=USER, n=3, temperature=1.0, seed=8, max_tokens=50, extra_body=extra,
            stream=True))
        assert all(c["content"] in choices for c in streamed.values()), streamed


# ------------------------------------------------------------------------------ logit controls


class _Bias:
    """A HF logits processor adding a logit bias (the oracle's own, not the server's code)."""

    def __init__(self, bias: dict[int, float]):
        self.bias = bias

    def __call__(self, input_ids, scores):
        for t, v in self.bias.items():
            scores[:, t] += v
        return scores


def _hf_greedy(hf, prompt: list[int], n: int, bias: dict[int, float] | None = None) -> list[int]:
    import transformers

    processors = transformers.LogitsProcessorList([_Bias(bias)] if bias else [])
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                          logits_processor=processors)
    return out[0, len(prompt):].tolist()


def test_logit_bias_bans_and_forces(server, model, tok):
    client, (_, hf) = server.client(), model
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    plain_ids = _hf_greedy(hf, prompt, 6)

    def complete(bias):
        r = client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0,
                                      logit_bias=bias, extra_body={"ignore_eos": True})
        return r.choices[0].text

    assert complete(None) == tok.decode(plain_ids)
    ban = {plain_ids[0]: -100.0}
    banned_ids = _hf_greedy(hf, prompt, 6, ban)
    assert banned_ids[0] != plain_ids[0] and plain_ids[0] not in banned_ids
    assert complete({str(plain_ids[0]): -100}) == tok.decode(banned_ids)
    forced = tok.encode(" fox", add_special_tokens=False)[0]
    assert complete({str(forced): 100}) == tok.decode([forced] * 6)
    assert complete({str(forced): 1e6}) == tok.decode([forced] * 6)  # clamped to 100, not an error


def test_allowed_token_ids_and_bad_words(server, tok):
    client = server.client()
    letters = "abcd"
    allowed = [tok.encode(ch, add_special_tokens=False)[0] for ch in letters]
    r = client.completions.create(model=server.model, prompt="Letters:", n=2, temperature=1.0, seed=9, max_tokens=20,
                                  extra_body={"allowed_token_ids": allowed})
    for c in r.choices:
        assert set(c.text) <= set(letters) and len(c.text) == 20, c
    # bad_words beat logit_bias (vLLM: the ban is -inf, the bias adds to it): "The" pushed with +100
    # (as written, and after a space: one token each) never comes out once it is a bad word.
    the = [tok.encode(w, add_special_tokens=False) for w in ("The", " The")]
    assert all(len(ids) == 1 for ids in the)
    bias = {str(ids[0]): 100 for ids in the}
    kw = dict(model=server.model, prompt="Go:", max_tokens=8, temperature=1.0, seed=10, logit_bias=bias)
    pushed = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    assert pushed.replace(" ", "") == "The" * 8, pushed
    out = client.completions.create(**kw, extra_body={"ignore_eos": True, "bad_words": ["The"]}).choices[0].text
    assert "The" not in out and len(out) > 0, out


# -------------------------------------------------------------------------------- bad inputs


def _nested_any_of(depth: int) -> dict:
    s: dict = {"type": "integer"}
    for i in range(depth):
        s = {"anyOf": [s, {"type": "object", "properties": {f"x{i}": s, "y": s}, "required": [f"x{i}"]}]}
    return s


CHAT, CMPL = "/v1/chat/completions", "/v1/completions"
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
BAD = [
    ("invalid schema", CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}}, "response_format", "strin"),
    ("unsupported keyword", CHAT, {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}}},
     "response_format", "not"),
    ("schema not JSON", CMPL, {"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ("invalid regex", CMPL, {"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
    ("invalid grammar", CMPL, {"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
    ("empty choice", CMPL, {"guided_choice": []}, "guided_choice", "choice"),
    ("unknown structured_outputs field", CMPL, {"structured_outputs": {"jsn": {}}}, "structured_outputs", "jsn"),
    ("unknown backend", CMPL, {"guided_regex": "a", "guided_decoding_backend": "outlines"},
     "guided_decoding_backend", "outlines"),
    ("response_format and structured_outputs", CHAT, {"response_format": {"type": "json_object"},
                                                       "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "were both set"),
    ("response_format type", CHAT, {"response_format": {"type": "xml"}}, "response_format", "xml"),
    ("schema too large", CMPL, {"guided_json": _nested_any_of(9)}, "guided_json", "the limit is"),
    ("schema too slow", CMPL, {"guided_json": _nested_any_of(8)}, "guided_json", "did not compile within"),
    ("unknown tool in tool_choice", CHAT, {"tools": TOOLS, "tool_choice": {"type": "function",
                                                                            "function": {"name": "g"}}},
     "tool_choice", "'g'"),
    ("required without tools", CHAT, {"tool_choice": "required"}, "tool_choice", "at least one tool"),
    ("auto without a parser", CHAT, {"tools": TOOLS}, "tools", "--tool-call-parser"),
    ("malformed tool", CHAT, {"tools": [{"type": "function", "function": {}}], "tool_choice": "none"}, "tools",
     "name"),
    ("tool call and response_format", CHAT, {"tools": TOOLS, "tool_choice": "required",
                                             "response_format": {"type": "json_object"}}, "response_format", "forces"),
    ("logit_bias out of vocab", CMPL, {"logit_bias": {"100000": 1}}, "logit_bias", "outside the vocabulary"),
    ("logit_bias negative id", CMPL, {"logit_bias": {"-1": 1}}, "logit_bias", "token ids"),
    ("logit_bias not an id", CMPL, {"logit_bias": {"abc": 1}}, "logit_bias", "'abc'"),
    ("allowed_token_ids out of vocab", CMPL, {"allowed_token_ids": [1, 100000]}, "allowed_token_ids",
     "outside the vocabulary"),
    ("allowed_token_ids empty", CMPL, {"allowed_token_ids": []}, "allowed_token_ids", "non-empty"),
    ("bad_words blank", CMPL, {"bad_words": [" "]}, "bad_words", "non-blank"),
    ("bad assistant tool call", CHAT, {"messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                                              "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages", "not valid JSON"),
]


@pytest.mark.parametrize("case, path, body, param, words", BAD, ids=[b[0] for b in BAD])
def test_bad_constraints_are_400s(server, case, path, body, param, words):
    base = {"messages": USER} if path == CHAT else {"prompt": "hi"}
    r = server.http.post(path, json={"model": server.model, "max_tokens": 4, **base, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == 400
    assert err["param"] == param and words in err["message"], err
    server.assert_healthy()


def test_still_serving_after_bad_inputs(server):
    for _, path, body, _, _ in BAD:  # all of them again, back to back
        base = {"messages": USER} if path == CHAT else {"prompt": "hi"}
        assert server.http.post(path, json={"model": server.model, "max_tokens": 4, **base, **body}).status_code == 400
    server.assert_healthy()
    r = server.client().chat.completions.create(model=server.model, messages=USER, max_tokens=50, temperature=0,
                                                extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no")
