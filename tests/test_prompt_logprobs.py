"""Prompt logprobs and min_tokens with stop strings, through the engine, against independent oracles.

Prompt logprobs are checked against HF transformers: log_softmax of the float32 HF model's logits
at every position, in float64 numpy (the logprob of each prompt token, its rank, the top-k ids,
logprobs and ranks, the decoded tokens), for one request, a prompt chunked over several steps,
a prefix another request cached, n=2, a request preempted in the middle of its prompt, the
DELTA output kind and the server's echo + logprobs; the chunked on-device computation is checked
against numpy, and every architecture's head input against HF. The min_tokens test uses the bundled SmolLM2 tokenizer:
the stop strings' expected effect comes from plain `decode` of a free run's tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import warnings

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import pagedjax as pj
from pagedjax import prompt_logprobs as plp
from pagedjax.attention import build_metadata
from pagedjax.engine import EngineConfig, LLMEngine
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.models import get_model, head_logits
from pagedjax.sampling_params import RequestOutputKind
from pagedjax.server.app import build_app

from tests import hf_models

OPTS = dict(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=96)
TOL = 1e-4  # |ours - HF| of a logprob (float32 model, float64 reference)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF model, our Params, HF tokenizer): a tiny random Llama with a 512-token BPE tokenizer."""
    folder = tmp_path_factory.mktemp("llama")
    hf = hf_models.build("llama", folder, seed=11)
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    return hf, pj.load_params(folder, dtype=np.float32, progress=False), tok


@pytest.fixture(scope="module")
def engine(model):
    return LLMEngine(model[1], EngineConfig(**OPTS, num_pages=40))


def run(engine: LLMEngine, requests: list[tuple], every: dict | None = None) -> dict[str, pj.RequestOutput]:
    """Adds `requests` [(id, prompt, params)], steps to completion; the final outputs (and into
    `every`, when given, all outputs by request id). Checks that every page came back."""
    for rid, prompt, sp in requests:
        engine.add_request(rid, prompt, sp)
    done = {}
    for _ in range(1000):
        if not engine.has_unfinished_requests():
            break
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "donated buffers were not usable" = a pool copy
            for out in engine.step():
                if every is not None:
                    every.setdefault(out.request_id, []).append(out)
                if out.finished:
                    done[out.request_id] = out
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and not engine.scheduler.requests
    return done


@contextlib.contextmanager
def recording(engine: LLMEngine):
    """Records every step sent to the device: (its batch of StepRequests, the prompt rows it scores)."""
    log = []
    launch = engine.runner.launch

    def recorded(batch, *args, **kwargs):
        log.append((batch, plp.plan(batch, sum(len(r.token_ids) for r in batch))))
        return launch(batch, *args, **kwargs)

    engine.runner.launch = recorded
    try:
        yield log
    finally:
        del engine.runner.launch


def hf_logprobs(hf, prompt: list[int]) -> np.ndarray:
    """[P, V] float64: log_softmax of HF's logits at each position (row i predicts token i + 1)."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()


def check_prompt_logprobs(got, prompt: list[int], ref: np.ndarray, k: int, tok=None) -> None:
    """vLLM's shape: None, then per position {prompt token, top k} with logprobs and ranks, as HF says."""
    assert got is not None and len(got) == len(prompt) and got[0] is None
    for i in range(1, len(prompt)):
        row, t, entry = ref[i - 1], prompt[i], got[i]
        order = np.argsort(-row, kind="stable")
        assert entry[t].logprob == pytest.approx(row[t], abs=TOL), i
        # vLLM's rank: tokens at least as likely, itself included (bounds allow float32 near-ties)
        assert (row > row[t] + TOL).sum() + 1 <= entry[t].rank <= (row >= row[t] - TOL).sum(), i
        if 0 < k < len(row) and row[order[k - 1]] - row[order[k]] > TOL:  # top-k well defined
            assert set(entry) == {t, *order[:k].tolist()}, i
        for j, u in enumerate(order[:k]):
            if u in entry and u != t:
                assert entry[u].logprob == pytest.approx(row[u], abs=TOL) and entry[u].rank == j + 1, i
        if tok is not None:
            assert all(lp.decoded_token == tok.decode([u]) for u, lp in entry.items()), i


def prompts(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    return hf_models.random_prompts(np.random.default_rng(seed), n, lo, hi)


# ------------------------------------------------------------------------------ through the engine


def test_single_chunked_and_zero_k_match_hf(model, engine):
    hf, _, tok = model
    long, short, plain = prompts(1, 3, 9, 45)
    long, short = long + prompts(2, 1, 45, 45)[0], short[:9]  # 45+ tokens: at least 3 chunks of 16
    greedy = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
    with recording(engine) as log:
        outs = run(engine, [
            ("long", long, pj.SamplingParams(prompt_logprobs=5, **greedy)),
            ("short", short, pj.SamplingParams(prompt_logprobs=0, **greedy)),
            ("plain", plain, pj.SamplingParams(**greedy)),
        ])
    check_prompt_logprobs(outs["long"].prompt_logprobs, long, hf_logprobs(hf, long), 5, tok)
    check_prompt_logprobs(outs["short"].prompt_logprobs, short, hf_logprobs(hf, short), 0, tok)
    assert all(len(e) == 1 for e in outs["short"].prompt_logprobs[1:])  # k=0: the prompt token alone
    assert outs["plain"].prompt_logprobs is None
    for rid, prompt in (("long", long), ("short", short), ("plain", plain)):  # sampling is untouched
        assert outs[rid].outputs[0].token_ids == hf_models.hf_greedy(hf, prompt, 4)
    chunks = [r.num_computed_tokens for batch, _ in log for r in batch
              if r.prompt_token_ids == long and r.num_computed_tokens < len(long) - 1]
    assert len(chunks) >= 3 and chunks[0] == 0  # the prompt was scored over several steps


def test_prefix_cached_by_an_earlier_request_is_recomputed(model, engine):
    hf, _, tok = model
    prefix, a, b = prompts(3, 3, 6, 6)
    prefix = prefix + prompts(4, 1, 34, 34)[0]  # 40 tokens: two full pages of 16
    greedy = dict(temperature=0.0, max_tokens=2)
    run(engine, [("a", prefix + a, pj.SamplingParams(**greedy))])  # caches the prefix's pages
    outs = run(engine, [("b", prefix + b, pj.SamplingParams(prompt_logprobs=3, **greedy))])
    check_prompt_logprobs(outs["b"].prompt_logprobs, prefix + b, hf_logprobs(hf, prefix + b), 3, tok)
    assert outs["b"].num_cached_tokens == 0
    again = run(engine, [("c", prefix + b, pj.SamplingParams(**greedy))])  # the cache was there to hit
    assert again["c"].num_cached_tokens >= 32


def test_n2_scores_the_prompt_once(model, engine):
    hf, _, tok = model
    prompt = prompts(5, 1, 30, 30)[0]
    with recording(engine) as log:
        outs = run(engine, [("n2", prompt, pj.SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3,
                                                             prompt_logprobs=2))])
    out = outs["n2"]
    assert len(out.outputs) == 2
    check_prompt_logprobs(out.prompt_logprobs, prompt, hf_logprobs(hf, prompt), 2, tok)
    spans = [s for _, p in log if p is not None for s in p.spans]
    assert sorted(s.position + j for s in spans for j in range(s.count)) == list(range(1, len(prompt)))


def test_delta_outputs_carry_prompt_logprobs_once(model, engine):
    hf, _, _ = model
    prompt = prompts(6, 1, 20, 20)[0]
    every = {}
    run(engine, [("d", prompt, pj.SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=1,
                                                 output_kind=RequestOutputKind.DELTA))], every)
    sent = [o.prompt_logprobs for o in every["d"] if o.prompt_logprobs is not None]
    assert len(every["d"]) > 1 and len(sent) == 1
    check_prompt_logprobs(sent[0], prompt, hf_logprobs(hf, prompt), 1)


def test_preempted_mid_prompt_resumes_without_duplicates(model):
    hf, params, tok = model
    # 5 usable pages of 16: the first request grows to 4 pages, so the second (admitted later,
    # preempted first) loses its pages in the middle of its prompt and computes it again.
    engine = LLMEngine(params, EngineConfig(**OPTS, num_pages=6))
    first, second = prompts(7, 2, 40, 45)
    second = (second * 2)[:45]
    with recording(engine) as log:
        outs = run(engine, [
            ("first", first, pj.SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
            ("second", second, pj.SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True,
                                                 prompt_logprobs=4)),
        ])
    starts = [r.num_computed_tokens for batch, _ in log for r in batch if r.prompt_token_ids == second]
    assert starts.count(0) >= 2 and engine.stats().num_preemptions >= 1  # it started over
    scored = [s.position + j for batch, p in log if p is not None for s in p.spans
              if batch[s.batch_row].prompt_token_ids == second for j in range(s.count)]
    assert len(scored) > len(set(scored)) and set(scored) == set(range(1, len(second)))  # some twice
    check_prompt_logprobs(outs["second"].prompt_logprobs, second, hf_logprobs(hf, second), 4, tok)
    assert outs["second"].outputs[0].token_ids == hf_models.hf_greedy(hf, second, 3)


def test_out_of_range_prompt_logprobs_are_rejected(engine):
    for k in (21, -1):  # max_logprobs is 20; vLLM's -1 (whole vocabulary) is not served
        with pytest.raises(ValueError, match=r"prompt_logprobs must be in \[0, 20\]"):
            engine.add_request("bad", [5, 6, 7], pj.SamplingParams(prompt_logprobs=k))
    assert not engine.has_unfinished_requests()


def test_server_echo_with_logprobs_scores_the_prompt(model, engine):
    """/v1/completions with echo and logprobs (vLLM): the prompt's tokens come first, the first
    with no logprob, the others with HF's; streamed and not streamed alike."""
    hf, _, tok = model
    prompt = prompts(9, 1, 12, 12)[0]
    ref = hf_logprobs(hf, prompt)
    body = dict(model="tiny", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2, ignore_eos=True)

    async def main():
        app = build_app(engine, "tiny")
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=transport, base_url="http://test", timeout=120) as http:
            full = (await http.post("/v1/completions", json=body)).json()
            streamed = []
            async with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        streamed += [c["logprobs"] for c in json.loads(line[len("data: "):])["choices"]]
        return full, streamed

    full, streamed = asyncio.run(main())
    choice = full["choices"][0]
    lp = choice["logprobs"]
    P = len(prompt)
    assert choice["text"].startswith(tok.decode(prompt))
    assert len(lp["tokens"]) == P + 3 and lp["tokens"][:P] == [tok.decode([t]) for t in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    for i in range(1, P):
        assert lp["token_logprobs"][i] == pytest.approx(ref[i - 1, prompt[i]], abs=TOL)
        top2 = np.argsort(-ref[i - 1])[:2]
        assert {tok.decode([u]) for u in top2} <= set(lp["top_logprobs"][i]) and len(lp["top_logprobs"][i]) <= 3
    joined = {key: [x for part in streamed if part for x in part[key]] for key in lp}
    assert joined == lp


# ------------------------------------------------------------------------------ the device part


def test_chunked_scoring_matches_numpy():
    rng = np.random.default_rng(0)
    Q, E, V, k = 16, 8, 50, 4
    hidden = rng.normal(size=(Q, E)).astype(np.float32)
    w = rng.normal(size=(E, V)).astype(np.float32)
    rows = rng.permutation(Q)[:7].astype(np.int32)
    targets = rng.integers(0, V, size=7).astype(np.int32)
    meta = plp.PromptLogprobsMetadata(rows=np.pad(rows, (0, Q - 7)), target_ids=np.pad(targets, (0, Q - 7)),
                                      num_rows=np.asarray([7], np.int32))
    logits = hidden[rows].astype(np.float64) @ w.astype(np.float64)
    ref = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    for chunk_rows in (3, None):  # 6 chunks of 3 (the last 3 skipped), and one of 16
        fn = jax.jit(lambda h, m, c=chunk_rows: plp.compute(
            lambda x: jnp.einsum("ce,ev->cv", x, w, precision="highest"), h, m, num_logprobs=k, chunk_rows=c))
        out = jax.device_get(fn(hidden, meta))
        np.testing.assert_allclose(out.logprobs[:7], ref[np.arange(7), targets], atol=1e-5)
        np.testing.assert_array_equal(out.ranks[:7], (ref >= ref[np.arange(7), targets][:, None]).sum(1))
        np.testing.assert_array_equal(out.top_token_ids[:7], np.argsort(-ref, axis=1)[:, :k])
        np.testing.assert_allclose(out.top_logprobs[:7], np.sort(ref, axis=1)[:, ::-1][:, :k], atol=1e-5)
        if chunk_rows == 3:  # chunks past the last scored row were skipped
            assert not out.logprobs[9:].any() and not out.top_token_ids[9:].any()


@pytest.mark.parametrize("arch", sorted(hf_models.CONFIGS))
def test_every_architecture_sows_its_head_input(arch, tmp_path):
    """all_hidden: head_logits of the sown head input = HF's logits at every position, and the
    step's own logits rows; without it the model returns the same logits."""
    hf = hf_models.build(arch, tmp_path, seed=2)
    params = pj.load_params(tmp_path, dtype=np.float32, progress=False)
    cfg = params.config
    prompt = prompts(8, 1, 12, 12)[0]
    T, P = 16, 8
    meta = build_metadata([12], [12], [[3, 5, 1]], page_size=4, num_pages=P, num_tokens=T, num_reqs=2,
                          max_pages=4, logits_indices=[11, 4])
    tokens = np.pad(np.asarray(prompt, np.int32), (0, T - 12))
    model = get_model(cfg, attn_impl="reference")

    def pages():
        return init_pages(cfg.num_layers, P, 4, cfg.num_kv_heads, cfg.head_dim, jnp.float32)

    (logits, _), sown = model.apply(params.variables, tokens, pages(), meta, all_hidden=True,
                                    mutable=["intermediates"])
    hidden = sown["intermediates"]["head_input"][0]
    assert hidden.shape[0] == T
    every = np.asarray(head_logits(cfg, params.variables, hidden[:12]), np.float64)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].double().numpy()
    assert np.abs(every - ref).max() / np.abs(ref).max() < 1e-4
    np.testing.assert_allclose(np.asarray(logits), every[[11, 4]], rtol=1e-5, atol=1e-5)
    plain, _ = model.apply(params.variables, tokens, pages(), meta)
    np.testing.assert_allclose(np.asarray(plain), np.asarray(logits), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------ min_tokens, stop strings


@pytest.fixture(scope="module")
def smollm_engine(tmp_path_factory):
    """A tiny random Llama over SmolLM2's 49152-token vocabulary, with the bundled tokenizer."""
    from pagedjax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    folder = tmp_path_factory.mktemp("smollm-vocab")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, initializer_range=0.3,
        bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    params = pj.load_params(folder, dtype=np.float32, progress=False)
    return LLMEngine(params, EngineConfig(**OPTS, num_pages=24), tokenizer=tok), tok


def _stops(tok, ids: list[int], min_tokens: int) -> dict[str, tuple[str, int]] | None:
    """Stop strings for a free run `ids`: {kind: (stop, index of the occurrence that must stop it)},
    where an occurrence counts when the token completing it comes after the first min_tokens (vLLM).
    "before": occurs only within the first min_tokens tokens' text; "after": first occurs past
    them; "both": occurs within them and again past them. None if this run has no such strings."""
    text = tok.decode(ids)
    if not text.isascii() or any(not text.startswith(tok.decode(ids[:m])) for m in range(len(ids))):
        return None
    lens = [len(tok.decode(ids[:m])) for m in range(len(ids) + 1)]

    def counted(s: str) -> list[int]:  # starts of the occurrences completed after min_tokens tokens
        starts = [i for i in range(len(text)) if text.startswith(s, i)]
        return [i for i in starts if next(m for m, n in enumerate(lens) if n >= i + len(s)) > min_tokens]

    found = {}
    for n in (3, 2, 1):
        for i in range(len(text) - n + 1):
            s = text[i:i + n]
            if not s.strip():
                continue
            first, later = text.index(s), counted(s)
            kind = "before" if not later else "after" if later[0] == first else "both"
            found.setdefault(kind, (s, later[0] if later else -1))
    return found if len(found) == 3 else None


def test_stop_strings_wait_for_min_tokens(smollm_engine):
    engine, tok = smollm_engine
    min_tokens, max_tokens = 8, 24
    base = dict(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for seed in range(20):
        prompt = prompts(100 + seed, 1, 5, 10)[0]
        free = run(engine, [("free", prompt, pj.SamplingParams(**base))])["free"].outputs[0]
        stops = _stops(tok, free.token_ids, min_tokens)
        if stops is not None:
            break
    else:
        pytest.fail("no free run with stop strings before, after and around min_tokens")
    text = tok.decode(free.token_ids)
    assert free.text == text
    outs = run(engine, [(kind, prompt, pj.SamplingParams(stop=[s], min_tokens=min_tokens, **base))
                        for kind, (s, _) in stops.items()])
    before = outs["before"].outputs[0]  # ignored: the whole run, nothing cut
    assert (before.text, before.finish_reason, before.stop_reason) == (text, "length", None)
    assert before.token_ids == free.token_ids
    for kind in ("after", "both"):
        s, at = stops[kind]
        out = outs[kind].outputs[0]
        assert (out.text, out.finish_reason, out.stop_reason) == (text[:at], "stop", s), kind
        assert len(out.token_ids) > min_tokens and out.token_ids == free.token_ids[:len(out.token_ids)], kind
        assert s in tok.decode(out.token_ids)[at:]  # it ended on the token that completed this occurrence
    assert stops["both"][0] in text[:stops["both"][1]]  # the earlier occurrence is kept in the text
    # Stop token ids wait for min_tokens too: they are not sampled before it (the sampler bans them).
    j = next(j for j in range(1, min_tokens) if free.token_ids[j] not in free.token_ids[:j])
    tid = free.token_ids[j]
    out = run(engine, [("tok", prompt, pj.SamplingParams(stop_token_ids=[tid], min_tokens=min_tokens,
                                                         **base))])["tok"].outputs[0]
    assert out.token_ids[:j] == free.token_ids[:j] and tid not in out.token_ids[:min_tokens]
    assert out.finish_reason == "length" or (out.stop_reason == tid and len(out.token_ids) > min_tokens)
