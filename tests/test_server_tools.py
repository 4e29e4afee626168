"""Tool calling and reasoning through the real server process (`--tool-call-parser hermes
--reasoning-parser qwen3`), with the official `openai` client.

The model is a tiny random Llama whose tokenizer has Qwen's <think> and <tool_call> tokens and a
Qwen-style template that renders tools, assistant tool calls and tool results. Forced calls
("required", a named function) are sampled at temperature 1 and must always validate against the
function's schema (`jsonschema`); for the parsers ("auto" + hermes, qwen3 reasoning) the model's
text is scripted with a choice constraint, or compared with the raw text of /v1/completions.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tests import hf_models
from tests.server_process import serve

MAX_LEN = 2048  # the tools in the system turn take ~800 tokens of this tiny vocabulary
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6},
                                         "hours": {"type": "integer", "minimum": -12, "maximum": 14}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What's the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-llama")
    hf_models.build_chat_model("llama", folder, seed=11, max_position_embeddings=MAX_LEN)
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serve(model_dir, log, "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--max-model-len",
               str(MAX_LEN), "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
               "--reasoning-parser", "qwen3") as srv:
        yield srv


@pytest.fixture(scope="module")
def tok(model_dir):
    from pagedjax.tokenizer import load_tokenizer

    return load_tokenizer(model_dir)


def _check_call(call, seed) -> None:
    assert call.type == "function" and re.fullmatch(r"call_[A-Za-z0-9]{24}", call.id), call
    assert call.function.name in SCHEMAS, (seed, call)
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _join_stream(stream) -> dict[int, dict]:
    """Chunks joined per choice, checking OpenAI's tool-call delta order: a call's first delta
    has its index, id, type and name (arguments ""), later ones only argument fragments."""
    out: dict[int, dict] = {}
    for chunk in stream:
        for ch in chunk.choices:
            c = out.setdefault(ch.index, {"content": "", "reasoning": "", "calls": {}, "finish_reason": None})
            d = ch.delta
            c["content"] += d.content or ""
            c["reasoning"] += getattr(d, "reasoning_content", None) or ""
            for t in d.tool_calls or []:
                if t.index not in c["calls"]:
                    assert t.id and t.type == "function" and t.function.name, t
                    c["calls"][t.index] = {"id": t.id, "name": t.function.name, "arguments": t.function.arguments or ""}
                else:
                    assert t.id is None and t.function.name is None, t
                    c["calls"][t.index]["arguments"] += t.function.arguments or ""
            c["finish_reason"] = ch.finish_reason or c["finish_reason"]
    return out


# ------------------------------------------------------------------------------- forced calls


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_always_validate(server, parallel):
    client = server.client()
    for seed in (1, 2):
        r = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=parallel, n=3, temperature=1.0, seed=seed,
                                           max_tokens=900, extra_body=NO_THINKING)
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.tool_calls, (seed, c)
            assert c.message.content is None
            if not parallel:
                assert len(c.message.tool_calls) == 1
            for call in c.message.tool_calls:
                _check_call(call, seed)


def test_named_call_and_its_stream(server):
    client = server.client()
    choice = {"type": "function", "function": {"name": "get_time"}}
    kw = dict(model=server.model, messages=USER, tools=TOOLS, tool_choice=choice, n=2, temperature=1.0, seed=3,
              max_tokens=900, extra_body=NO_THINKING)
    r = client.chat.completions.create(**kw)
    for c in r.choices:
        assert c.finish_reason == "stop" and len(c.message.tool_calls) == 1, c  # OpenAI: a named call "stop"s
        assert c.message.tool_calls[0].function.name == "get_time"
        _check_call(c.message.tool_calls[0], 3)
    streamed = _join_stream(client.chat.completions.create(**kw, stream=True))
    for i, c in streamed.items():
        want = r.choices[i].message.tool_calls[0]
        assert list(c["calls"].values())[0]["name"] == "get_time" and c["finish_reason"] == "stop"
        assert [(x["name"], x["arguments"]) for x in c["calls"].values()] == [("get_time", want.function.arguments)]


def test_streamed_required_calls_equal_non_streamed(server):
    client = server.client()
    kw = dict(model=server.model, messages=USER, tools=TOOLS, tool_choice="required", temperature=1.0, seed=4,
              max_tokens=900, extra_body=NO_THINKING)
    whole = client.chat.completions.create(**kw).choices[0]
    streamed = _join_stream(client.chat.completions.create(**kw, stream=True))[0]
    assert streamed["finish_reason"] == whole.finish_reason == "tool_calls"
    assert [(x["name"], x["arguments"]) for x in streamed["calls"].values()] == \
        [(t.function.name, t.function.arguments) for t in whole.message.tool_calls]


# ------------------------------------------------------------------------------------- parsers


def test_auto_with_the_hermes_parser(server):
    """The model's text forced to a Hermes tool call (a choice constraint): "auto" returns it as a
    tool call, streamed and not; with tool_choice "none" it stays text."""
    client = server.client()
    for text, content in ((HERMES, None), ("Let me check.\n" + HERMES, "Let me check.")):
        kw = dict(model=server.model, messages=USER, tools=TOOLS, temperature=1.0, seed=5, max_tokens=200,
                  extra_body={**NO_THINKING, "guided_choice": [text]})
        c = client.chat.completions.create(**kw).choices[0]
        assert c.finish_reason == "tool_calls", c
        assert (c.message.content or None) == content or c.message.content.strip() == content, c
        assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
            [("get_weather", {"city": "Paris", "unit": "c"})]
        s = _join_stream(client.chat.completions.create(**kw, stream=True))[0]
        assert s["finish_reason"] == "tool_calls" and (s["content"].strip() or None) == content, s
        assert [(x["name"], json.loads(x["arguments"])) for x in s["calls"].values()] == \
            [("get_weather", {"city": "Paris", "unit": "c"})]
    c = client.chat.completions.create(model=server.model, messages=USER, tools=TOOLS, tool_choice="none",
                                       max_tokens=200, extra_body={**NO_THINKING, "guided_choice": [HERMES]}).choices[0]
    assert c.message.content == HERMES and not c.message.tool_calls and c.finish_reason == "stop"


def test_reasoning_content_and_a_constraint_after_it(server, tok):
    """A prompt that opens a think block (the assistant turn continued from "<think>\\n"): the
    reasoning is the model's own text up to </think> (compared with /v1/completions' raw text of
    the same prompt), the answer after it follows the regex."""
    client = server.client()
    messages = USER + [{"role": "assistant", "content": "<think>\n"}]
    cont = {"continue_final_message": True, "add_generation_prompt": False, "ignore_eos": True}
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True),
                        add_special_tokens=False)
    end = tok.convert_tokens_to_ids(["</think>"])[0]
    for bias in (0, 2, 4, 6, 8, 12, 100):  # the smallest push that makes the model close its thinking
        raw = client.completions.create(model=server.model, prompt=prompt, max_tokens=30, temperature=0,
                                        logit_bias={str(end): bias}, extra_body={"ignore_eos": True}).choices[0].text
        if "</think>" in raw:
            break
    reasoning = raw.split("</think>")[0]
    assert reasoning, (bias, raw)  # some thinking before the push closes it
    regex = r"[0-9]{3}"
    kw = dict(model=server.model, messages=messages, max_tokens=40, temperature=0, logit_bias={str(end): bias},
              extra_body={**cont, "guided_regex": regex})
    c = client.chat.completions.create(**kw).choices[0]
    assert c.message.reasoning_content == reasoning, (bias, raw, c)
    assert re.fullmatch(regex, c.message.content) and c.finish_reason == "stop", c
    s = _join_stream(client.chat.completions.create(**kw, stream=True))[0]
    assert s["reasoning"] == reasoning and s["content"] == c.message.content
    hidden = client.chat.completions.create(**{**kw, "extra_body": {**kw["extra_body"], "include_reasoning": False}})
    assert hidden.choices[0].message.reasoning_content is None
    assert hidden.choices[0].message.content == c.message.content


# -------------------------------------------------------------------------------- conversation


def test_two_turns_with_a_tool_result(server, tok):
    """A forced call, its result as a tool message, the answer: the assistant's tool call and the
    result go back through the template (the prompt is the one rendered here)."""
    client = server.client()
    first = client.chat.completions.create(
        model=server.model, messages=USER, tools=TOOLS, tool_choice={"type": "function",
                                                                    "function": {"name": "get_weather"}},
        temperature=1.0, seed=6, max_tokens=900, extra_body=NO_THINKING).choices[0].message
    call = first.tool_calls[0]
    messages = USER + [first.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model=server.model, messages=messages, tools=TOOLS, tool_choice="none",
                                       max_tokens=20, temperature=0, extra_body=NO_THINKING)
    assert r.choices[0].finish_reason in ("stop", "length")
    rendered = [*USER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": "get_weather", "arguments": json.loads(call.function.arguments)}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    text = tok.apply_chat_template(rendered, tools=TOOLS, enable_thinking=False)
    assert "<tool_response>" in text and call.function.name in text and '"get_time"' in text
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
