"""Decoding through the engine against independent oracles: HF `generate` and HF logits in numpy.

One tiny float32 Llama whose EOS is likely in any context (so beams end at different lengths
and HF's early-stopping rules matter), and two engines with the same options, so they share
compiled steps: the default one and one without prefix caching, for page counting. The pool is
small (13 pages of 16 tokens), so some tests also run through preemption.

Covers greedy = temperature 0 = top_k 1, seeds across batches, n > 1 and best_of, penalties and
logprobs (numpy, HF transition scores), beam search (HF beam search, pages shared), stop
strings, min/max tokens, ignore_eos, and the errors of bad parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import numpy as np
import pytest
import torch
import transformers

import pagedjax as pj
from pagedjax.engine import EngineConfig, LLMEngine
from pagedjax.sampling_params import BeamSearchParams, RequestOutputKind

from tests import hf_models

EOS = hf_models.EOS
OPTS = dict(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=64, num_pages=14)
SHORT = [17, 99, 250, 31, 400, 77, 5, 123, 9]  # greedy reaches EOS a few tokens in (see `model`)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF model, our Params, folder): a tiny Llama where EOS is likely in any context.

    EOS's output row points along the mean final hidden state, scaled so that its logit is about
    0.7 of the typical largest one: sequences (and beams) end after a few tokens or run on.
    """
    folder = tmp_path_factory.mktemp("llama")
    hf = hf_models.build("llama", folder, seed=7)
    with torch.no_grad():
        h = torch.cat([hf(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0]
                       for p in prompts(99, 20, 10, 30)])  # [tokens, D]
        mean = h.mean(0)  # [D]
        top = (h @ hf.lm_head.weight.T).max(1).values.mean()
        hf.lm_head.weight[EOS] = 0.7 * top / (h @ mean).mean() * mean
    hf.save_pretrained(folder)
    assert EOS in hf_models.hf_greedy(hf, SHORT, 8)
    return hf, pj.load_params(folder, dtype=np.float32, progress=False), folder


@pytest.fixture(scope="module")
def engine(model):
    return LLMEngine(model[1], EngineConfig(**OPTS))


@pytest.fixture(scope="module")
def engine_nocache(model):
    return LLMEngine(model[1], EngineConfig(**OPTS, enable_prefix_caching=False))


@pytest.fixture(scope="module")
def tokenizer(model):
    return transformers.AutoTokenizer.from_pretrained(model[2])


def run(engine: LLMEngine, arrivals: dict[int, list[tuple]],
        seen: dict[str, list[pj.RequestOutput]] | None = None) -> dict[str, pj.RequestOutput]:
    """Steps to completion, adding arrivals[k] = [(id, prompt, params)] before step k; final outputs
    (and every output, finished or not, into `seen[id]` when given).

    Checks after the run that every page is back and nothing is left running.
    """
    done = {}
    step = 0
    while engine.has_unfinished_requests() or any(k >= step for k in arrivals):
        for rid, prompt, sp in arrivals.get(step, []):
            engine.add_request(rid, prompt, sp)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "donated buffers were not usable" = a pool copy
            for out in engine.step():
                if seen is not None:
                    seen.setdefault(out.request_id, []).append(out)
                if out.finished:
                    assert out.request_id not in done
                    done[out.request_id] = out
        step += 1
        assert step < 1000, "no progress"
    stats = engine.stats()
    assert stats.num_free_pages == stats.num_usable_pages and not engine.scheduler.requests
    return done


@contextlib.contextmanager
def recording(engine: LLMEngine, probe=None):
    """Records every runner call: [(StepRequests, pages in use, probe())]."""
    log = []
    launch = engine.runner.launch
    alloc = engine.scheduler.kv_cache.allocator

    def recorded(batch, copies=(), num_logprobs=0, prev=None):
        log.append((batch, alloc.num_usable_pages - alloc.num_free_pages, probe() if probe else None))
        return launch(batch, copies, num_logprobs, prev)

    engine.runner.launch = recorded
    try:
        yield log
    finally:
        del engine.runner.launch


def prompts(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    return hf_models.random_prompts(np.random.default_rng(seed), n, lo, hi)


def hf_logits(hf, prompt: list[int], output: list[int]) -> np.ndarray:
    """[len(output), V] float64: the logits each output token was chosen from."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0].double().numpy()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(output)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------- sampling


def test_greedy_equals_temperature_zero_equals_top_k_one(model, engine):
    hf = model[0]
    ps = prompts(1, 2, 5, 20)
    variants = [pj.SamplingParams(temperature=0.0), pj.SamplingParams(top_k=1, seed=3),
                pj.SamplingParams(top_k=1, temperature=0.7), pj.SamplingParams(top_p=1e-9, temperature=1.5),
                pj.SamplingParams(min_p=1.0, seed=9)]
    reqs = [(f"{i}-{j}", p, dataclasses.replace(v, max_tokens=10, ignore_eos=True))
            for i, p in enumerate(ps) for j, v in enumerate(variants)]
    outs = run(engine, {0: reqs[:5], 2: reqs[5:]})
    for i, p in enumerate(ps):
        expected = hf_models.hf_greedy(hf, p, 10)
        for j in range(len(variants)):
            assert outs[f"{i}-{j}"].outputs[0].token_ids == expected, (i, variants[j])


def test_seed_reproducible_whatever_the_batch(engine):
    p, *others = prompts(2, 6, 3, 25)
    sp = pj.SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_tokens=12, ignore_eos=True)
    alone = run(engine, {0: [("x", p, sp)]})["x"].outputs[0].token_ids
    # Again, joining a batch of other requests (other seeds, unseeded, greedy, other filters) late.
    neighbours = [(f"o{i}", q, pj.SamplingParams(temperature=0.8 + 0.1 * i, top_k=5 * i, max_tokens=9,
                                                   seed=i if i % 2 else None, ignore_eos=True))
                  for i, q in enumerate(others)]
    crowd = run(engine, {0: neighbours[:3], 3: [("x", p, sp)] + neighbours[3:]})
    assert crowd["x"].outputs[0].token_ids == alone
    other_seed = run(engine, {0: [("y", p, dataclasses.replace(sp, seed=4321))]})
    assert other_seed["y"].outputs[0].token_ids != alone
    unseeded = run(engine, {0: [(f"u{i}", p, dataclasses.replace(sp, seed=None))
                                for i in range(2)]})
    assert unseeded["u0"].outputs[0].token_ids != unseeded["u1"].outputs[0].token_ids


def test_n_samples_share_the_prompt_pages_and_prefill_it_once(engine_nocache):
    """n=8 against 8 independent requests with the samples' seeds (seed + i, vLLM's rule)."""
    p = prompts(3, 1, 24, 24)[0]
    sp = pj.SamplingParams(n=8, temperature=0.9, seed=50, max_tokens=8, ignore_eos=True)
    with recording(engine_nocache) as shared_log:
        shared = run(engine_nocache, {0: [("n8", p, sp)]})["n8"]
    indep_reqs = [(f"i{i}", p, pj.SamplingParams(temperature=0.9, seed=50 + i, max_tokens=8, ignore_eos=True))
                  for i in range(8)]
    with recording(engine_nocache) as indep_log:
        indep = run(engine_nocache, {0: indep_reqs})
    assert [c.index for c in shared.outputs] == list(range(8))
    for i, c in enumerate(shared.outputs):
        assert c.token_ids == indep[f"i{i}"].outputs[0].token_ids
        assert c.cumulative_logprob == pytest.approx(indep[f"i{i}"].outputs[0].cumulative_logprob, abs=1e-4)
    assert len({tuple(c.token_ids) for c in shared.outputs}) > 1

    def prompt_tokens(log):  # prompt positions computed, over all steps and rows
        return sum(max(0, min(r.num_computed_tokens + len(r.token_ids), len(p)) - r.num_computed_tokens)
                   for batch, _, _ in log for r in batch)

    # Sample 0 computes the prompt; every sample computes the last prompt token for its own logits.
    assert prompt_tokens(shared_log) == len(p) - 1 + 8
    assert prompt_tokens(indep_log) >= 8 * len(p)
    peak_shared = max(used for _, used, _ in shared_log)
    peak_indep = max(used for _, used, _ in indep_log)
    assert peak_shared <= 1 + 8 + 1 < peak_indep  # the full prompt page, one page each, a spare


def test_best_of_keeps_the_most_likely(engine):
    p = prompts(4, 1, 10, 10)[0]
    sp = pj.SamplingParams(n=2, best_of=5, temperature=1.2, seed=11, max_tokens=6, ignore_eos=True)
    reqs = [("best", p, sp)] + [(f"i{i}", p, pj.SamplingParams(temperature=1.2, seed=11 + i, max_tokens=6,
                                                                ignore_eos=True)) for i in range(5)]
    outs = run(engine, {0: reqs})
    indep = [outs[f"i{i}"].outputs[0] for i in range(5)]
    order = sorted(range(5), key=lambda i: -indep[i].cumulative_logprob)[:2]
    got = outs["best"].outputs
    assert [c.index for c in got] == order
    for c in got:
        assert c.token_ids == indep[c.index].token_ids


def test_penalties_and_logprobs_match_numpy(model, engine, tokenizer):
    """Greedy with all three penalties and 5 logprobs, against HF's logits with the penalty math in float64."""
    hf = model[0]
    p = prompts(9, 1, 5, 5)[0]  # greedy decoding repeats a token here
    rep, freq, pres = 1.4, 0.7, 0.5
    sp = pj.SamplingParams(temperature=0.0, repetition_penalty=rep, frequency_penalty=freq,
                           presence_penalty=pres, logprobs=5, max_tokens=10, ignore_eos=True)
    c = run(engine, {0: [("pen", p, sp)]})["pen"].outputs[0]
    out = c.token_ids
    logits = hf_logits(hf, p, out)
    logprobs = log_softmax(logits)
    changed = 0
    for j, tok in enumerate(out):
        x = logits[j].copy()
        changed += tok != int(np.argmax(x))
        seen = np.zeros_like(x, bool)
        seen[p + out[:j]] = True
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
        counts = np.bincount(out[:j], minlength=x.size)
        x = x - freq * counts - pres * (counts > 0)
        top2 = np.sort(x)[-2:]
        assert top2[1] - top2[0] > 1e-4, "ambiguous argmax"
        assert tok == int(np.argmax(x)), f"step {j}"
        entry = c.logprobs[j]
        lp = logprobs[j]
        top5 = np.argsort(-lp, kind="stable")[:5]
        assert set(entry) == set(top5.tolist()) | {tok}
        assert entry[tok].logprob == pytest.approx(lp[tok], abs=1e-4)
        assert entry[tok].rank == int(np.sum(lp >= lp[tok]))
        for rank, t in enumerate(top5.tolist(), start=1):
            assert entry[t].logprob == pytest.approx(lp[t], abs=1e-4)
            if t != tok:
                assert entry[t].rank == rank
            assert entry[t].decoded_token == tokenizer.decode([t])
    assert changed  # the penalties changed the greedy choice somewhere
    assert c.cumulative_logprob == pytest.approx(sum(logprobs[j, t] for j, t in enumerate(out)), abs=1e-3)


def penalized_greedy(hf, prompt: list[int], n: int, rep: float, freq: float, pres: float, *,
                     count_prompt: bool = False, rep_over_prompt: bool = True) -> list[int]:
    """n greedy tokens with vLLM's penalties written out: HF's float32 logits, then in float64
    repetition over prompt + output (x > 0: x / rep, else x * rep) and x -= freq * count +
    pres * (count > 0), counts over the output only. The keywords give the wrong rules (counts
    over the prompt too; repetition over the output only), to show that the cases tell them apart.
    """
    right = not count_prompt and rep_over_prompt
    out: list[int] = []
    for _ in range(n):
        with torch.no_grad():
            x = hf(torch.tensor([prompt + out])).logits[0, -1].double().numpy()  # [V]
        seen = np.zeros(x.size, bool)
        seen[(prompt if rep_over_prompt else []) + out] = True
        x = np.where(seen, np.where(x > 0, x / rep, x * rep), x)
        counts = np.bincount((prompt if count_prompt else []) + out, minlength=x.size)  # [V]
        x = x - freq * counts - pres * (counts > 0)
        top2 = np.sort(x)[-2:]
        assert not right or top2[1] - top2[0] > 1e-4, f"ambiguous argmax after {out}"
        out.append(int(np.argmax(x)))
    return out


PENALTIES = [  # (repetition, frequency, presence)
    (1.0, 1.5, 0.0),
    (1.0, 0.0, 1.5),
    (1.0, -1.0, -0.5),  # negative: repeats are favoured
    (1.6, 0.0, 0.0),
    (1.3, 0.8, 0.6),
]


def test_penalties_predicted_token_by_token(model, engine):
    """Each penalty alone and together, in one batch, against `penalized_greedy`: every token.

    The prompt holds the model's own greedy continuation, the tokens it is inclined to repeat, so
    that counting the prompt in the frequency or presence penalty, or leaving it out of the
    repetition penalty, changes the output of each case (checked here too)."""
    hf = model[0]
    start = prompts(15, 1, 6, 6)[0]
    p = start + hf_models.hf_greedy(hf, start, 16)
    expected, requests = {}, []
    for k, (rep, freq, pres) in enumerate(PENALTIES):
        expected[k] = penalized_greedy(hf, p, 12, rep, freq, pres)
        if freq or pres:
            assert penalized_greedy(hf, p, 12, rep, freq, pres, count_prompt=True) != expected[k], k
        if rep != 1.0:
            assert penalized_greedy(hf, p, 12, rep, freq, pres, rep_over_prompt=False) != expected[k], k
        requests.append((f"pen{k}", p, pj.SamplingParams(temperature=0.0, repetition_penalty=rep,
                                                          frequency_penalty=freq, presence_penalty=pres,
                                                          max_tokens=12, ignore_eos=True)))
    outs = run(engine, {0: requests})
    for k, penalties in enumerate(PENALTIES):
        assert outs[f"pen{k}"].outputs[0].token_ids == expected[k], f"(repetition, frequency, presence) = {penalties}"


def test_logprobs_match_hf_transition_scores(model, engine):
    hf = model[0]
    p = prompts(6, 1, 12, 12)[0]
    c = run(engine, {0: [("lp", p, pj.SamplingParams(temperature=0.0, logprobs=0, max_tokens=10,
                                                     ignore_eos=True))]})["lp"].outputs[0]
    with torch.no_grad():
        g = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                        max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=EOS,
                        output_scores=True, return_dict_in_generate=True)
        scores = hf.compute_transition_scores(g.sequences, g.scores, normalize_logits=True)[0].numpy()
    assert c.token_ids == g.sequences[0, len(p):].tolist()
    assert all(len(entry) == 1 and entry[t].rank is not None and entry[t].rank >= 1
               for entry, t in zip(c.logprobs, c.token_ids))
    np.testing.assert_allclose([e[t].logprob for e, t in zip(c.logprobs, c.token_ids)], scores, atol=1e-4)
    assert c.cumulative_logprob == pytest.approx(float(scores.sum()), abs=1e-3)


# ---------------------------------------------------------------------------------- beam search


def hf_beam_search(hf, prompt, bp: BeamSearchParams, eos: list[int] | None):
    """HF's beam search: ([(generated tokens up to the first eos, score)] best first, steps run)."""
    with torch.no_grad():
        g = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=bp.max_tokens, min_new_tokens=bp.min_tokens or None, num_beams=bp.beam_width,
            num_return_sequences=bp.beam_width, length_penalty=bp.length_penalty,
            early_stopping=bp.early_stopping, do_sample=False, eos_token_id=eos,
            pad_token_id=(eos or [EOS])[0], output_scores=True, return_dict_in_generate=True)
    results = []
    for seq, score in zip(g.sequences[:, len(prompt):].tolist(), g.sequences_scores.tolist()):
        end = next((i + 1 for i, t in enumerate(seq) if eos and t in eos), bp.max_tokens)
        results.append((seq[:end], score))
    return results, len(g.scores)


BEAM_SETTINGS = [
    dict(beam_width=2, length_penalty=1.0, early_stopping=False),
    dict(beam_width=3, length_penalty=0.5, early_stopping=True),
    dict(beam_width=4, length_penalty=2.0, early_stopping="never"),
    dict(beam_width=3, length_penalty=-1.0, early_stopping=False),
    dict(beam_width=4, length_penalty=1.0, early_stopping="never", min_tokens=5),
    dict(beam_width=3, length_penalty=1.0, early_stopping=True, stop=1),  # + stop token ids
    dict(beam_width=2, length_penalty=1.0, early_stopping=False, stop=3),  # many finish early
    dict(beam_width=3, length_penalty=2.0, early_stopping="never", stop=3),
    dict(beam_width=2, length_penalty=1.0, early_stopping=False, ignore_eos=True),
]


@pytest.mark.parametrize("setting", BEAM_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_beam_search_matches_hf(model, engine, setting):
    hf = model[0]
    setting = dict(setting)
    num_stop = setting.pop("stop", 0)
    for k, p in enumerate([SHORT] + prompts(7, 1, 20, 24)):  # EOS early; a full page of prompt
        greedy = hf_models.hf_greedy(hf, p, 2 * num_stop) if num_stop else []
        stop_ids = list(dict.fromkeys(t for t in greedy[1::2] if t != EOS))  # reached early
        bp = BeamSearchParams(max_tokens=12, stop_token_ids=stop_ids, **setting)
        eos = None if bp.ignore_eos else [EOS] + stop_ids
        W = bp.beam_width

        def probe():  # live beams: how many, their first pages, its reference count, pages named
            live = [r for r in engine.scheduler.requests.values() if r.parent_id == "b" and r.block_table]
            first = {r.block_table[0] for r in live}
            refs = engine.scheduler.kv_cache.allocator.ref_count(min(first)) if first else 0
            return len(live), first, refs, sum(len(r.block_table) for r in live)

        with recording(engine, probe) as log:
            out = run(engine, {0: [("b", p, bp)]})["b"]
        expected, num_steps = hf_beam_search(hf, p, bp, eos)
        assert sum(any(r.sample for r in batch) for batch, _, _ in log) == num_steps  # stopped when HF did
        assert len(out.outputs) == W
        assert [c.index for c in out.outputs] == list(range(W))
        for c, (tokens, score) in zip(out.outputs, expected):
            assert c.token_ids == tokens, f"prompt {k}"
            assert c.cumulative_logprob / len(tokens) ** bp.length_penalty == pytest.approx(score, abs=2e-4)
            last = tokens[-1]
            if eos and last in eos:
                assert (c.finish_reason, c.stop_reason) == ("stop", last if last in stop_ids else None)
            else:
                assert c.finish_reason == "length" and len(tokens) == bp.max_tokens
        # Beams share pages: every live beam holds the prompt's first page (one reference each),
        # and the pool holds fewer pages than the beams' tables name.
        multi = [(n, first, refs, named, used) for _, used, (n, first, refs, named) in log if n > 1]
        assert multi
        if len(p) >= 16:
            assert all(len(first) == 1 and refs == n for n, first, refs, _, _ in multi)
            assert any(used < named for _, _, _, named, used in multi)


def test_beam_search_under_page_pressure_matches_hf(model, engine):
    """Three groups of 4 beams: more beams than max_num_seqs, a pool they overflow, so beams are
    preempted, wait for their siblings and give their pages back; results still match HF."""
    hf = model[0]
    ps = prompts(8, 3, 28, 30)
    bp = BeamSearchParams(beam_width=4, max_tokens=14, early_stopping="never")
    before = engine.stats().num_preemptions  # the engine is shared: earlier tests preempted too
    outs = run(engine, {0: [(f"g{i}", p, bp) for i, p in enumerate(ps)]})
    assert engine.stats().num_preemptions > before, "this run was meant to preempt beams"
    for i, p in enumerate(ps):
        for c, (tokens, score) in zip(outs[f"g{i}"].outputs, hf_beam_search(hf, p, bp, [EOS])[0]):
            assert c.token_ids == tokens
            assert c.cumulative_logprob / len(tokens) == pytest.approx(score, abs=2e-4)


def test_generate_api_runs_beam_search(model, engine, tokenizer):
    bp = BeamSearchParams(beam_width=3, max_tokens=8)
    via_api = pj.LLM(model[1], **OPTS).generate([SHORT, SHORT[:5]], bp, use_tqdm=False)
    direct = run(engine, {0: [("a", SHORT, bp), ("b", SHORT[:5], bp)]})
    for out, rid in zip(via_api, "ab"):
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in direct[rid].outputs]
        for c in out.outputs:
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
    # vLLM's LLM.beam_search: prompt dicts in, per prompt the hypotheses (prompt tokens included,
    # decoded with them), scored as HF's beam search scores them
    hf = model[0]
    got = pj.LLM(model[1], **OPTS).beam_search([{"prompt_token_ids": SHORT}, {"prompt_token_ids": SHORT[:5]}], bp)
    for p, out in zip([SHORT, SHORT[:5]], got):
        expected = hf_beam_search(hf, p, bp, [EOS])[0]
        assert len(out.sequences) == len(expected) == bp.beam_width
        for seq, (tokens, score) in zip(out.sequences, expected):
            assert seq.tokens == p + tokens
            assert seq.cum_logprob / len(tokens) ** bp.length_penalty == pytest.approx(score, abs=2e-4)
            assert seq.text == tokenizer.decode(p + tokens, skip_special_tokens=False)
            assert seq.finish_reason == ("stop" if tokens[-1] == EOS else "length")
            # each token's logprob, rank and its row's 2W most likely tokens: HF's log-softmax of
            # the model's logits on the hypothesis
            with torch.no_grad():
                rows = torch.log_softmax(hf(torch.tensor([p + tokens])).logits[0, len(p) - 1:-1].double(), -1)
            assert len(seq.logprobs) == len(tokens)
            for t, entry, row in zip(tokens, seq.logprobs, rows):
                assert entry[t].logprob == pytest.approx(row[t].item(), abs=2e-4)
                assert entry[t].rank == 1 + int((row > row[t]).sum())
                top = torch.topk(row, 2 * bp.beam_width)
                others = {u: lp for u, lp in entry.items() if u != t or lp.rank <= 2 * bp.beam_width}
                assert sorted(others, key=lambda u: others[u].rank) == top.indices.tolist()
                assert [others[u].logprob for u in top.indices.tolist()] == pytest.approx(top.values.tolist(),
                                                                                         abs=2e-4)
            assert sum(e[t].logprob for t, e in zip(tokens, seq.logprobs)) == pytest.approx(seq.cum_logprob,
                                                                                            abs=1e-4)
    with pytest.raises(ValueError, match="BeamSearchParams"):
        pj.LLM(model[1], **OPTS).beam_search([SHORT], pj.SamplingParams(max_tokens=3))


def test_beam_search_abort_frees_its_pages(engine):
    p = prompts(9, 1, 20, 20)[0]
    engine.add_request("ab", p, BeamSearchParams(beam_width=3, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        assert not engine.step()
    engine.abort_request("ab")
    outs = run(engine, {})
    assert list(outs) == ["ab"] and all(c.finish_reason == "abort" for c in outs["ab"].outputs)


# ---------------------------------------------------------------------------------- stops


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)  # as the engine shows text


def find_stops(tokenizer, free: list[int]) -> dict[str, tuple[str, int, int]]:
    """Stop strings cut from the text of `free` where a stop check's off-by-ones show:
    {kind: (stop, where it starts in the text, the number of tokens that complete it)}.

    "at_end": it ends with the last character of a token's text (a check that misses a match
    ending at the very end of the new text never stops). "one_in": its last character is the first
    of a token's text, the rest ends the text before (a hold one character short streams the stop
    string's first character). Both span a token boundary; each is its first occurrence.
    """
    text = decode(tokenizer, free)
    ends = [len(t) if text.startswith(t) else None  # None: a character split across tokens
            for t in (decode(tokenizer, free[:m]) for m in range(len(free) + 1))]
    found: dict[str, tuple[str, int, int]] = {}
    for m in range(1, len(free) + 1):
        prev, end = ends[m - 1], ends[m]
        if prev is None or end is None or end == prev:
            continue
        for L in (3, 4, 2):
            for kind, start in (("at_end", end - L), ("one_in", prev + 1 - L)):
                stop = text[max(start, 0):start + L]
                if (kind not in found and 0 <= start < prev and "\ufffd" not in stop
                        and stop.isprintable() and not stop.isspace() and text.find(stop) == start):
                    found[kind] = (stop, start, m)
    return found


def test_stop_strings_spanning_tokens(model, engine, tokenizer):
    """Stop strings ending at a token's last character and at a token's first one, alone (the hold
    is then exactly one character short of the string), excluded or included, streamed (DELTA),
    cumulative and final only: no output ever shows a character past the cut, and the text ends
    exactly before the stop string (or after it with include_stop_str_in_output)."""
    hf = model[0]
    cases: dict[str, tuple] = {}  # kind -> (prompt, free run, stop, start, tokens to complete it)
    for p in prompts(10, 16, 4, 12):
        free = hf_models.hf_greedy(hf, p, 16)
        if decode(tokenizer, p + free) != decode(tokenizer, p) + decode(tokenizer, free):
            continue  # a character split between prompt and output: the output's text is not decode(free)
        for kind, found in find_stops(tokenizer, free).items():
            cases.setdefault(kind, (p, free, *found))
    assert set(cases) == {"at_end", "one_in"}, f"stop strings of every kind in 16 greedy runs: {cases}"
    base = dict(temperature=0.0, max_tokens=16, ignore_eos=True)
    kinds = {"d": RequestOutputKind.DELTA, "c": RequestOutputKind.CUMULATIVE,
             "f": RequestOutputKind.FINAL_ONLY}
    requests, expected = [], {}
    for kind, (p, free, stop, start, m) in cases.items():
        text = decode(tokenizer, free)
        for include in (False, True):
            for k, output_kind in kinds.items():
                rid = f"{kind}-{'in' if include else 'ex'}-{k}"
                requests.append((rid, p, pj.SamplingParams(stop=stop, include_stop_str_in_output=include,
                                                           output_kind=output_kind, **base)))
                want = text[:start + len(stop)] if include else text[:start]
                expected[rid] = (want, "stop", stop, free[:m])
        # Beside a longer stop string that never matches; and that one alone: no stop, the whole text.
        requests.append((f"{kind}-two", p, pj.SamplingParams(stop=["#never#", stop], **base)))
        expected[f"{kind}-two"] = (text[:start], "stop", stop, free[:m])
        requests.append((f"{kind}-none", p, pj.SamplingParams(stop="#never#", **base)))
        expected[f"{kind}-none"] = (text, "length", None, free)
    seen: dict[str, list[pj.RequestOutput]] = {}
    run(engine, {0: requests}, seen)
    for rid, (want, reason, stop_reason, token_ids) in expected.items():
        outs = seen[rid]
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True], rid
        c = outs[-1].outputs[0]
        assert (c.finish_reason, c.stop_reason) == (reason, stop_reason), rid
        if rid.endswith("-d"):  # deltas: text and tokens add up, and no delta runs past the cut
            streamed = ""
            for o in outs:
                streamed += o.outputs[0].text
                assert want.startswith(streamed), (rid, stop_reason, streamed, want)
            assert streamed == want, rid
            assert sum((o.outputs[0].token_ids for o in outs), []) == token_ids, rid
        else:
            assert len(outs) == 1 or not rid.endswith("-f"), rid  # FINAL_ONLY: one output
            for o in outs:  # cumulative: every text so far is a prefix of the final one
                assert want.startswith(o.outputs[0].text), (rid, stop_reason, o.outputs[0].text, want)
            assert (c.text, c.token_ids) == (want, token_ids), rid


def test_eos_min_tokens_max_tokens_ignore_eos(model, engine, tokenizer):
    hf = model[0]
    free = hf_models.hf_greedy(hf, SHORT, 10)
    k = free.index(EOS)
    assert 1 <= k <= 7  # room for max_tokens=k and min_tokens=k+2
    greedy = dict(temperature=0.0)
    outs = run(engine, {0: [
        ("eos", SHORT, pj.SamplingParams(max_tokens=10, **greedy)),
        ("ign", SHORT, pj.SamplingParams(max_tokens=10, ignore_eos=True, **greedy)),
        ("min", SHORT, pj.SamplingParams(max_tokens=10, min_tokens=k + 2, **greedy)),
        ("max", SHORT, pj.SamplingParams(max_tokens=k, **greedy)),
    ]})
    eos, ign, mn, mx = (outs[r].outputs[0] for r in ("eos", "ign", "min", "max"))
    assert (eos.token_ids, eos.finish_reason, eos.stop_reason) == (free[:k + 1], "stop", None)
    assert eos.text == decode(tokenizer, free[:k])  # EOS is not text
    assert (ign.token_ids, ign.finish_reason) == (free, "length")
    with torch.no_grad():
        hf_min = hf.generate(torch.tensor([SHORT]), attention_mask=torch.ones(1, len(SHORT), dtype=torch.long),
                             max_new_tokens=10, min_new_tokens=k + 2, do_sample=False, eos_token_id=EOS,
                             pad_token_id=EOS)[0, len(SHORT):].tolist()
    hf_min = hf_min[:hf_min.index(EOS) + 1] if EOS in hf_min else hf_min
    assert mn.token_ids == hf_min and EOS not in mn.token_ids[:k + 2]
    assert (mx.token_ids, mx.finish_reason) == (free[:k], "length")


def test_special_tokens_in_text_as_transformers_decodes_them(model, engine, tokenizer):
    """skip_special_tokens=False: the EOS tokens generated past ignore_eos show in the text, as
    transformers decodes them (each token's text as is: no spaces added around special tokens;
    pagedjax has no spaces_between_special_tokens, which vLLM reads only for slow tokenizers)."""
    hf = model[0]
    free = hf_models.hf_greedy(hf, SHORT, 16)
    assert free.count(EOS) >= 2, free  # EOS is likely here (see `model`)
    outs = run(engine, {0: [(k, SHORT, pj.SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True,
                                                           skip_special_tokens=k == "skip"))
                            for k in ("skip", "keep")]})
    for k, skip in (("skip", True), ("keep", False)):
        c = outs[k].outputs[0]
        prompt_text = tokenizer.decode(SHORT, skip_special_tokens=skip)
        assert c.token_ids == free
        assert c.text == tokenizer.decode(SHORT + free, skip_special_tokens=skip)[len(prompt_text):], k
    assert outs["keep"].outputs[0].text.count(tokenizer.decode([EOS])) == free.count(EOS)


# ---------------------------------------------------------------------------------- bad input


def test_out_of_range_parameters_are_rejected(engine):
    bad = [
        (pj.SamplingParams(logprobs=21), "logprobs"),
        (pj.SamplingParams(logprobs=-1), "logprobs"),
        (pj.SamplingParams(prompt_logprobs=21), "prompt_logprobs"),
        (pj.SamplingParams(prompt_logprobs=-1), "prompt_logprobs"),
        (pj.SamplingParams(stop_token_ids=[hf_models.VOCAB]), "stop_token_ids"),
        (pj.SamplingParams(max_tokens=60), "max_model_len"),
        (BeamSearchParams(beam_width=2, max_tokens=4, temperature=0.5), "temperature"),
        (BeamSearchParams(beam_width=300, max_tokens=4), "beam_width"),
        (BeamSearchParams(beam_width=2, max_tokens=4, stop_token_ids=[hf_models.VOCAB + 1]), "stop_token_ids"),
        (BeamSearchParams(beam_width=2, max_tokens=60), "max_model_len"),
    ]
    for sp, match in bad:
        with pytest.raises(ValueError, match=match):
            engine.add_request("bad", SHORT, sp)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("bad", [], BeamSearchParams(beam_width=2, max_tokens=4))
    engine.add_request("ok", SHORT, BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", SHORT, pj.SamplingParams())
    outs = run(engine, {})  # nothing of the rejected requests is left behind
    assert list(outs) == ["ok"]
    # Values no engine accepts fail when the params are built, naming the field.
    for kwargs, field in [(dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"),
                          (dict(top_k=-2), "top_k"), (dict(min_p=1.5), "min_p"), (dict(n=0), "n"),
                          (dict(n=3, best_of=2), "best_of"), (dict(presence_penalty=2.5), "presence_penalty"),
                          (dict(frequency_penalty=-3), "frequency_penalty"),
                          (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
                          (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(stop=[""]), "stop"),
                          (dict(n=2, temperature=0.0), "n")]:
        with pytest.raises(ValueError, match=field):
            pj.SamplingParams(**kwargs)
    for kwargs, field in [(dict(beam_width=0), "beam_width"), (dict(early_stopping="soon"), "early_stopping"),
                          (dict(max_tokens=0), "max_tokens")]:
        with pytest.raises(ValueError, match=field):
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})


def test_stream_interval_sends_deltas_of_that_many_tokens(model, engine):
    """With stream_interval=4 a streamed (DELTA) request's outputs carry its first token, then 4
    new tokens each, then the rest with the final one; joined, their tokens, text and logprobs are
    those of the same requests streamed token by token (greedy, and seeded sampling with n=2).
    CUMULATIVE outputs are not held back.
    The option reaches the engine from the CLI and is checked."""
    from pagedjax.cli import build_parser, engine_options

    assert engine_options(build_parser().parse_args(["generate", "m", "--stream-interval", "4"]))[
        "stream_interval"] == 4
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(stream_interval=0)
    delta = dict(output_kind=RequestOutputKind.DELTA, max_tokens=11, ignore_eos=True, logprobs=2)
    requests = [("greedy", prompts(3, 1, 5, 9)[0], pj.SamplingParams(temperature=0.0, **delta)),
                ("sampled", prompts(4, 1, 5, 9)[0], pj.SamplingParams(temperature=1.0, seed=11, n=2, **delta)),
                ("cumulative", prompts(5, 1, 5, 9)[0],
                 pj.SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                   output_kind=RequestOutputKind.CUMULATIVE))]
    by_token: dict[str, list[pj.RequestOutput]] = {}
    run(engine, {0: requests}, by_token)
    chunked: dict[str, list[pj.RequestOutput]] = {}
    run(LLMEngine(model[1], EngineConfig(**OPTS, stream_interval=4)), {0: requests}, chunked)
    assert [len(o.outputs[0].token_ids) for o in by_token["greedy"]] == [1] * 11
    assert [len(o.outputs[0].token_ids) for o in chunked["cumulative"]] == [1, 2, 3, 4, 5, 6]
    for rid, n in (("greedy", 1), ("sampled", 2)):
        outs = chunked[rid]
        assert [o.finished for o in outs] == [False, False, False, True], rid
        for i in range(n):
            def joined(outs, i=i):
                cs = [next(c for c in o.outputs if c.index == i) for o in outs]
                return ([len(c.token_ids) for c in cs], sum((c.token_ids for c in cs), []), "".join(c.text for c in cs),
                        [e for c in cs for e in c.logprobs], cs[-1].finish_reason)
            sizes, *rest = joined(outs)
            assert sizes == [1, 4, 4, 2], (rid, i, sizes)
            assert rest == list(joined(by_token[rid])[1:]), (rid, i)
