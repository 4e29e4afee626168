"""Constrained decoding through the engine, on a tiny random Llama (float32) whose tokenizer has
Qwen's think and tool-call tokens.

The oracles are independent of the code under test: `jsonschema` and `json`, `re.fullmatch`,
membership in the choices, HF transformers' logits for the logit-bias and allowed-token checks,
and runs of the same seeded requests under other engine settings (async scheduling off,
preemption by recompute and by swap, the prefix cache), which must give the same tokens.
A random model at temperature 1 is the hardest user of a grammar: it tries everything the mask
allows.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
import torch

import pagedjax as pj
from pagedjax.engine import EngineConfig, LLMEngine
from pagedjax.structured_outputs import StructuredOutputsParams as SO
from pagedjax.tokenizer import load_tokenizer

from tests import hf_models

MAX_LEN = 1024  # JSON from a random model with flexible whitespace: ~200 tokens, a long tail
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


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF torch model, our float32 Params, tokenizer)."""
    folder = tmp_path_factory.mktemp("chat-llama")
    hf = hf_models.build_chat_model("llama", folder, seed=3, max_position_embeddings=MAX_LEN)
    params = pj.load_params(folder, dtype=np.float32, progress=False)
    return hf, params, load_tokenizer(folder)


def make_engine(params, **opts) -> LLMEngine:
    opts = {"max_num_seqs": 8, "max_num_batched_tokens": 64, "max_model_len": MAX_LEN, "precompile": False, **opts}
    return LLMEngine(params, EngineConfig(**opts))


def run(engine: LLMEngine, requests, launches: list | None = None) -> dict[str, pj.RequestOutput]:
    """Adds (rid, prompt, params) requests, steps to the end; checks the pool is whole again and
    no constrained sample is left behind. `launches` collects each launch's pending-token count."""
    if launches is not None:
        launch = engine.runner.launch

        def counting(batch, *a, **k):
            launches.append(sum(s.token_ids[-1] == -1 for s in batch))
            return launch(batch, *a, **k)

        engine.runner.launch = counting
    for rid, prompt, sp in requests:
        engine.add_request(rid, prompt, sp)
    done = {}
    for _ in range(5000):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests(), "the engine does not make progress"
    engine.step()  # an idle step: the scheduler reports the last finished ids
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and stats.num_free_host_pages == stats.num_host_pages
    assert not engine.structured.active
    return done


def tokens(done: dict[str, pj.RequestOutput]) -> dict:
    return {rid: [(c.index, c.token_ids, c.finish_reason) for c in out.outputs] for rid, out in done.items()}


def check_json(out: pj.RequestOutput, schema: dict, seed) -> None:
    for c in out.outputs:
        assert c.finish_reason == "stop", f"seed={seed}: {c.finish_reason} after {len(c.token_ids)} tokens"
        jsonschema.validate(json.loads(c.text), schema)


def hf_last_logits(hf, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0, -1].double().numpy()


# ------------------------------------------------------------------------------------- grammars


def test_json_schema_n_samples_async_equals_sync(model):
    """n=3 seeded samples at temperature 1 all validate; async scheduling (constrained steps
    pipelined: the mask waits for the previous tokens while the model runs) gives the same tokens."""
    _, params, tok = model
    requests = [(f"r{i}", f"Describe user number {i}.", pj.SamplingParams(
        n=3, temperature=1.0, seed=100 + i, max_tokens=900, structured_outputs=SO(json=SCHEMA))) for i in range(3)]
    requests.append(("plain", "Hello", pj.SamplingParams(temperature=1.0, seed=5, max_tokens=40)))
    results = []
    for async_scheduling in (False, True):
        launches = []
        done = run(make_engine(params, async_scheduling=async_scheduling), requests, launches)
        for rid, _, sp in requests[:-1]:
            check_json(done[rid], SCHEMA, sp.seed)
            assert len({tuple(c.token_ids) for c in done[rid].outputs}) == 3  # n=3: three samples
        results.append(tokens(done))
        assert (sum(launches) > 50) == async_scheduling, launches  # pending tokens read on the device
    assert results[0] == results[1]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_keeps_the_grammar_state(model, mode):
    """A pool too small for the batch: requests are preempted mid-JSON and resume with the same
    tokens as with a pool that fits them all; the matchers keep their state meanwhile."""
    _, params, _ = model
    requests = [(f"r{i}", f"Record {i}:", pj.SamplingParams(
        temperature=1.0, seed=7 + i, max_tokens=600, structured_outputs=SO(json=SCHEMA))) for i in range(6)]
    roomy = run(make_engine(params), requests)
    small = make_engine(params, num_pages=41, preemption_mode=mode, swap_space=2**-8)
    tight = run(small, requests)
    assert small.stats().num_preemptions > 0
    assert (small.stats().num_swapped_out > 0) == (mode == "swap")
    for rid, _, sp in requests:
        check_json(tight[rid], SCHEMA, sp.seed)
    assert tokens(tight) == tokens(roomy)


def test_prefix_cache_hit_same_constrained_output(model):
    _, params, tok = model
    prompt = tok.encode("The quick brown fox jumps over the lazy dog. " * 6)  # several full pages
    sp = pj.SamplingParams(temperature=1.0, seed=42, max_tokens=900, structured_outputs=SO(json=SCHEMA))
    engine = make_engine(params)
    first = run(engine, [("a", prompt, sp)])
    hits = engine.stats().prefix_cache_hits
    second = run(engine, [("b", prompt, sp)])
    assert engine.stats().prefix_cache_hits >= hits + 3 * 16
    check_json(second["b"], SCHEMA, 42)
    assert second["b"].outputs[0].token_ids == first["a"].outputs[0].token_ids


def test_regex_and_choice_at_temperature_one(model):
    _, params, _ = model
    regex = r"(ab|cd)[0-9]{2,4}-[a-z]{1,5}"
    choices = ["Paris", "London", "New York", "東京"]
    requests = []
    for i in range(3):
        requests.append((f"re{i}", f"Code {i}:", pj.SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=200,
                                                                   structured_outputs=SO(regex=regex))))
        requests.append((f"ch{i}", f"City {i}:", pj.SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=50,
                                                                   logprobs=2, structured_outputs=SO(choice=choices))))
    done = run(make_engine(params), requests)
    for rid, _, sp in requests:
        for c in done[rid].outputs:
            assert c.finish_reason == "stop", (rid, c)
            if rid.startswith("re"):
                assert re.fullmatch(regex, c.text), f"seed={sp.seed}: {c.text!r}"
            else:
                assert c.text in choices, f"seed={sp.seed}: {c.text!r}"
                # logprobs are of the constrained distribution: the chosen token's is finite
                assert all(np.isfinite(e[t].logprob) for t, e in zip(c.token_ids, c.logprobs))


def test_stop_strings_cut_a_constrained_output(model):
    _, params, _ = model
    regex = r"[a-z]{2,5}(,[a-z]{2,5}){3,6}"
    reqs = [("cut", "List:", pj.SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=200, stop=[","],
                                              structured_outputs=SO(regex=regex))),
            ("keep", "List:", pj.SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=200, stop=[","],
                                               include_stop_str_in_output=True, structured_outputs=SO(regex=regex)))]
    done = run(make_engine(params), reqs)
    for c in done["cut"].outputs:
        assert c.finish_reason == "stop" and c.stop_reason == "," and re.fullmatch(r"[a-z]{2,5}", c.text), c
    for c in done["keep"].outputs:
        assert c.stop_reason == "," and re.fullmatch(r"[a-z]{2,5},", c.text), c


def test_a_complete_grammar_ends_the_request(model):
    """ignore_eos and min_tokens cannot extend a finished grammar (nothing but EOS may follow)."""
    _, params, tok = model
    sp = pj.SamplingParams(temperature=1.0, seed=1, max_tokens=60, ignore_eos=True, min_tokens=30,
                           structured_outputs=SO(regex=r"(ab|cd)e"))
    done = run(make_engine(params), [("r", "Go:", sp)])
    c = done["r"].outputs[0]
    assert c.finish_reason == "stop" and c.text in ("abe", "cde") and len(c.token_ids) <= 3, c
    assert tok.eos_token_id not in c.token_ids


def test_no_allowed_token_ends_with_an_error(model):
    """allowed_token_ids that the grammar never allows: the request ends with finish_reason
    "error" and a reason; its neighbour in the batch is untouched."""
    _, params, tok = model
    digits = [tok.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    bad = pj.SamplingParams(temperature=0.0, max_tokens=20, allowed_token_ids=digits,
                            structured_outputs=SO(regex="[a-z]+"))
    good = pj.SamplingParams(temperature=0.0, max_tokens=10)
    engine = make_engine(params)
    alone = run(engine, [("good", "Hello", good)])
    done = run(engine, [("bad", "Hello", bad), ("good2", "Hello", good)])
    c = done["bad"].outputs[0]
    assert c.finish_reason == "error" and "allowed_token_ids" in c.stop_reason, c
    assert done["good2"].outputs[0].token_ids == alone["good"].outputs[0].token_ids


def test_reasoning_then_constraint(model):
    """With a reasoning parser the grammar starts after </think>: the thinking tokens are the
    unconstrained model's (same greedy tokens, same logit bias), the answer matches the regex."""
    _, params, tok = model
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    regex = r"[0-9]{3}"
    engine = make_engine(params, reasoning_parser="deepseek_r1")
    prompt = tok.encode("<|im_start|>user\nPick a number.<|im_end|>\n<|im_start|>assistant\n<think>\n",
                        add_special_tokens=False)
    for bias in (0.0, 2.0, 4.0, 6.0, 8.0, 12.0, 100.0):  # the smallest push that makes the model close its thinking
        free = run(engine, [("free", prompt, pj.SamplingParams(temperature=0.0, max_tokens=24,
                                                               logit_bias={end: bias}))])["free"].outputs[0]
        if end in free.token_ids:
            break
    p = free.token_ids.index(end)
    assert p >= 1, (bias, free.token_ids)  # some thinking before the push closes it
    sp = pj.SamplingParams(temperature=0.0, max_tokens=40, logit_bias={end: bias}, structured_outputs=SO(regex=regex))
    c = run(engine, [("r1", prompt, sp)])["r1"].outputs[0]
    assert c.token_ids[:p + 1] == free.token_ids[:p + 1], (bias, free.token_ids, c.token_ids)
    assert re.fullmatch(regex, tok.decode(c.token_ids[p + 1:])) and c.finish_reason == "stop", c
    # Qwen3 after a prompt that closed the think block (enable_thinking=False): the answer at once.
    engine = make_engine(params, reasoning_parser="qwen3")
    closed = tok.apply_chat_template([{"role": "user", "content": "Pick."}], tokenize=True, enable_thinking=False)
    c = run(engine, [("q", closed, pj.SamplingParams(temperature=1.0, seed=2, max_tokens=40,
                                                       structured_outputs=SO(regex=regex)))])["q"].outputs[0]
    assert re.fullmatch(regex, c.text) and c.finish_reason == "stop", c
    # Qwen3 with no think tag in the prompt: the first token may open a think block, which the
    # grammar alone would forbid (a +100 bias shows it is allowed); else it answers at once.
    open_ = tok.apply_chat_template([{"role": "user", "content": "Pick."}], tokenize=True)
    outs = run(engine, [("u", open_, pj.SamplingParams(temperature=0.0, max_tokens=3, logit_bias={start: 100.0},
                                                         structured_outputs=SO(regex=regex)))])
    assert outs["u"].outputs[0].token_ids[0] == start
    # With enable_in_reasoning the grammar applies from the first token: no think block.
    engine = make_engine(params, reasoning_parser="deepseek_r1", enable_in_reasoning=True)
    c = run(engine, [("in", prompt, sp)])["in"].outputs[0]
    assert re.fullmatch(regex, c.text) and end not in c.token_ids, c


# ----------------------------------------------------------------------- logit controls (HF oracle)


def test_logit_bias_bans_and_forces(model):
    hf, params, tok = model
    prompt = tok.encode("Once upon a time", add_special_tokens=False)
    logits = hf_last_logits(hf, prompt)
    first, second = np.argsort(-logits)[:2]
    engine = make_engine(params)
    plain = run(engine, [("p", prompt, pj.SamplingParams(temperature=0.0, max_tokens=6))])["p"].outputs[0]
    assert plain.token_ids[0] == first  # the engine agrees with HF
    banned = run(engine, [("b", prompt, pj.SamplingParams(temperature=0.0, max_tokens=6,
                                                            logit_bias={int(first): -100}))])["b"].outputs[0]
    assert banned.token_ids[0] == second and int(first) not in banned.token_ids
    forced_id = int(np.argsort(-logits)[-1])  # the least likely token
    forced = run(engine, [("f", prompt, pj.SamplingParams(temperature=1.0, seed=0, max_tokens=6,
                                                            logit_bias={forced_id: 100}))])["f"].outputs[0]
    assert forced.token_ids == [forced_id] * 6


def test_allowed_token_ids(model):
    hf, params, tok = model
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    rng = np.random.default_rng(9)
    allowed = sorted(int(t) for t in rng.choice(np.arange(3, 508), size=12, replace=False))
    logits = hf_last_logits(hf, prompt)
    done = run(make_engine(params), [
        ("g", prompt, pj.SamplingParams(temperature=0.0, max_tokens=5, allowed_token_ids=allowed)),
        ("s", prompt, pj.SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=30, allowed_token_ids=allowed))])
    assert done["g"].outputs[0].token_ids[0] == allowed[int(np.argmax(logits[allowed]))]
    for out in done.values():
        for c in out.outputs:
            assert set(c.token_ids) <= set(allowed) and c.finish_reason == "length", c


def test_bad_words_never_appear(model):
    _, params, tok = model
    prompt = tok.encode("The quick brown fox", add_special_tokens=False)
    engine = make_engine(params)
    free = run(engine, [("f", prompt, pj.SamplingParams(temperature=0.0, max_tokens=24))])["f"].outputs[0].token_ids
    # A token of the output that is a word of its own (one token as written), and a two-token word.
    single = next(t for t in free if len(w := tok.decode([t]).strip()) > 1
                  and tok.encode(w, add_special_tokens=False) == [t])
    pair = next((free[j], free[j + 1]) for j in range(len(free) - 1)
                if tok.encode(w := tok.decode(free[j:j + 2]).lstrip(), add_special_tokens=False) == free[j:j + 2]
                and w.strip() and free[j] != single and free[j + 1] != single)
    words = [tok.decode([single]).strip(), tok.decode(list(pair)).lstrip()]
    out = run(engine, [("b", prompt, pj.SamplingParams(temperature=0.0, max_tokens=24, bad_words=words))]
              )["b"].outputs[0].token_ids
    assert single not in out
    assert all((out[j], out[j + 1]) != pair for j in range(len(out) - 1))
    assert out != free


# ------------------------------------------------------------------------------ costs and errors


def test_unconstrained_steps_pay_nothing(model, monkeypatch):
    """No bitmask, no look at the rows, no sampler variant with a mask, while nothing is
    constrained -- also after constrained requests have come and gone."""
    _, params, _ = model
    engine = make_engine(params)
    masks = []
    sample = engine.runner.sample
    engine.runner.sample = lambda launched, token_bitmask=None: (masks.append(token_bitmask is not None),
                                                                  sample(launched, token_bitmask))[1]
    plain = [(f"p{i}", f"Hi {i}", pj.SamplingParams(temperature=1.0, seed=i, max_tokens=12, logprobs=1)) for i in range(4)]
    run(engine, plain)
    assert masks and not any(masks)
    run(engine, [("c", "Hi", pj.SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=SO(regex="[a-z]+")))])
    assert any(masks)
    masks.clear()

    def look(*_):
        raise AssertionError("an unconstrained step looked at its rows")

    monkeypatch.setattr(engine.structured, "needs_bitmask", look)
    run(engine, [(f"q{i}", p, sp) for i, (_, p, sp) in enumerate(plain)])
    assert masks and not any(masks)


def test_mixed_batch_leaves_unconstrained_rows_alone(model):
    _, params, _ = model
    plain = [(f"p{i}", f"Story {i}:", pj.SamplingParams(temperature=0.0, max_tokens=16)) for i in range(3)]
    engine = make_engine(params)
    alone = run(engine, plain)
    mixed = run(engine, plain + [(f"c{i}", f"Story {i}:", pj.SamplingParams(
        temperature=1.0, seed=i, max_tokens=200, structured_outputs=SO(regex="[a-z ]{5,20}"))) for i in range(3)])
    assert tokens({k: mixed[k] for k in alone}) == tokens(alone)


@pytest.mark.parametrize("params_kw, words", [
    (dict(structured_outputs=SO(json={"type": "object", "properties": {"a": {"not": {"type": "string"}}}})), '"not"'),
    (dict(structured_outputs=SO(regex="a(b")), "unclosed group"),
    (dict(logit_bias={512: 1.0}), "logit_bias"),
    (dict(allowed_token_ids=[3, 512]), "allowed_token_ids"),
])
def test_bad_requests_raise_before_anything_is_queued(model, params_kw, words):
    _, params, _ = model
    engine = make_engine(params)
    with pytest.raises(ValueError, match=re.escape(words)):
        engine.add_request("x", "Hello", pj.SamplingParams(**params_kw))
    assert not engine.has_unfinished_requests() and not engine.structured.active
    engine.add_request("x", "Hello", pj.SamplingParams(max_tokens=2))  # the id is still free
    run(engine, [])
