"""The batch-invariance checks' probe runs: a probe prompt beside random strangers, its tokens and
top-2 logprobs under greedy and seeded sampling (tests/test_batch_invariance.py and
tests/test_batch_invariance_tp.py, and at Llama-3-8B's widths on the GPU,
tests/test_batch_invariance_gpu.py)."""

from __future__ import annotations

import numpy as np

import pagedjax as pj

MAX_TOKENS = 8

# The CPU checks' engine and probe (tests/test_batch_invariance.py, tests/test_batch_invariance_tp.py):
# the bundled SmolLM2-135M-Instruct in bf16, a probe of 300 tokens of this text.
SMOLLM2_ENGINE = dict(max_num_seqs=72, max_model_len=512, max_num_batched_tokens=256, precompile=False,
                      enable_prefix_caching=False)
PROBE_TEXT = ("The Roman Empire was the post-Republican state of ancient Rome. It included territory around "
              "the Mediterranean in Europe, North Africa, and Western Asia, and was ruled by emperors. ")


def smollm2_params():
    import jax.numpy as jnp

    return pj.load_params(None, dtype=jnp.bfloat16)


def smollm2_probe(params) -> list[int]:
    from pagedjax.tokenizer import load_tokenizer

    ids = load_tokenizer(params.tokenizer).encode(PROBE_TEXT * 10, add_special_tokens=False)[:300]
    assert len(ids) == 300
    return ids


def probe_params(max_tokens: int = MAX_TOKENS) -> list[pj.SamplingParams]:
    return [pj.SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2, ignore_eos=True),
            pj.SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=123, logprobs=2,
                              ignore_eos=True)]


def strangers(n: int, seed: int, max_tokens: tuple[int, int] = (2, 16), prompt_len: tuple[int, int] = (4, 80)
              ) -> tuple[list[list[int]], list]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(100, 40000, int(rng.integers(*prompt_len))).tolist() for _ in range(n)]
    sps = [pj.SamplingParams(max_tokens=int(rng.integers(*max_tokens)), ignore_eos=True,
                             **({"temperature": 0.0} if i % 2 else {"temperature": 1.0, "seed": i}))
           for i in range(n)]
    return prompts, sps


def run(llm: pj.LLM, probe: list[int], n: int = 0, seed: int = 0, probe_last: bool = False,
        max_tokens: int = MAX_TOKENS, stranger_tokens: tuple[int, int] = (2, 16),
        stranger_prompts: tuple[int, int] = (4, 80)) -> list:
    """The probe's (token ids, [{id: logprob}]) under each of probe_params(), beside n strangers."""
    others, other_sps = strangers(n, seed, stranger_tokens, stranger_prompts)
    out = []
    for sp in probe_params(max_tokens):
        prompts, sps = ([*others, probe], [*other_sps, sp]) if probe_last else ([probe, *others], [sp, *other_sps])
        got = llm.generate(prompts, sps)[-1 if probe_last else 0].outputs[0]
        assert len(got.token_ids) == max_tokens and got.finish_reason == "length"
        out.append((list(got.token_ids), [{t: lp.logprob for t, lp in d.items()} for d in got.logprobs]))
    return out


def same(a: list, b: list) -> bool:
    """Bitwise: the same tokens and the same float logprobs (== on floats, no tolerance)."""
    return a == b


def reference_runs(params, probe: list[int], engine: dict) -> dict[bool, list]:
    """The probe alone on a fresh engine of options `engine`, with and without batch_invariant:
    the references the checks compare with."""
    return {bi: run(pj.LLM(params, batch_invariant=bi, **engine), probe) for bi in (True, False)}

