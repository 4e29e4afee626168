"""Structured outputs under load: the same requests with and without a JSON schema, one engine,
one process -- throughput, TTFT, grammar compile time and the host's per-step mask work.

W1-sized: 1000 requests with ShareGPT-like lengths (benchmarks/common.py), each constrained one
carrying a realistic schema of a few dozen fields (an order record: nested customer and address,
an array of line items, enums, bounded integers and numbers, strings with lengths, nullable
fields). Several variants of it (field names and enums differ) are compiled cold first, then
hit the compile cache as real traffic does. Runs, in this order on one engine: a warm-up, the
load unconstrained (ignore_eos: every request runs its length), the load constrained (a request
ends when its JSON is complete, or at its length: random weights fill every string to its
maxLength, so most JSONs outrun ShareGPT lengths), with --sync-too the constrained load
again with async scheduling off (its steps wait for each token before building the next mask;
with it on, the mask is built while the model runs: both give the same tokens), and with
--json-max-tokens N once more with N tokens allowed, so that the JSONs complete. Every run has
the same prompts and seeds, the prefix cache emptied before it. Random weights write random
JSON, which is the hard case for a grammar: every allowed token gets tried.

  python benchmarks/structured.py                                   # CPU: SmolLM2-sized, 24 requests
  python benchmarks/structured.py --model named:llama3-8b --num-prompts 1000 --max-len 4096 \\
      --max-num-seqs 256 --sync-too --json-max-tokens 1000 --out results/structured.json   # the GPU run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import numpy as np

from common import figures, load, make_requests, stats_ms

NUM_VARIANTS = 8  # distinct schemas in the load


def order_schema(variant: int = 0) -> dict:
    """An order record of 36 leaf fields; `variant` renames fields and changes enums."""
    v = f"_{variant}" if variant else ""

    def s(n):  # a bounded string
        return {"type": "string", "minLength": 1, "maxLength": n}

    address = {"type": "object", "additionalProperties": False,
               "properties": {"street": s(40), "city": s(24), "postal_code": {"type": "string", "pattern": "^[0-9]{5}$"},
                              "country": {"enum": ["FR", "DE", "US", "JP", "BR"][: 3 + variant % 3]},
                              "apartment": {"anyOf": [s(8), {"type": "null"}]}},
               "required": ["street", "city", "postal_code", "country", "apartment"]}
    item = {"type": "object", "additionalProperties": False,
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "name": s(30),
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                           "unit_price": {"type": "number", "minimum": 0, "maximum": 10000},
                           "gift": {"type": "boolean"}},
            "required": ["sku", "name", "quantity", "unit_price", "gift"]}
    props = {
        f"order_id{v}": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "created_at": {"type": "string", "format": "date-time"},
        "customer": {"type": "object", "additionalProperties": False,
                     "properties": {"id": {"type": "integer", "minimum": 1}, "first_name": s(20), "last_name": s(20),
                                    "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z]{1,12}\\.[a-z]{2,3}$"},
                                    "phone": {"anyOf": [{"type": "string", "pattern": "^\\+[0-9]{8,12}$"},
                                                        {"type": "null"}]},
                                    "loyalty_tier": {"enum": ["none", "silver", "gold", "platinum"]},
                                    "newsletter": {"type": "boolean"}},
                     "required": ["id", "first_name", "last_name", "email", "phone", "loyalty_tier", "newsletter"]},
        "shipping_address": address,
        "billing_address": {"anyOf": [address, {"type": "null"}]},
        "items": {"type": "array", "items": item, "minItems": 1, "maxItems": 4},
        "currency": {"enum": ["EUR", "USD", "JPY"]},
        "subtotal": {"type": "number", "minimum": 0},
        "tax": {"type": "number", "minimum": 0},
        "discount_code": {"anyOf": [s(12), {"type": "null"}]},
        "total": {"type": "number", "minimum": 0},
        "notes": {"anyOf": [s(80), {"type": "null"}]},
        f"priority{v}": {"type": "integer", "minimum": 0, "maximum": 5},
    }
    return {"type": "object", "additionalProperties": False, "properties": props, "required": list(props)}


def run(llm, requests, *, tag: str, constrained: bool, schemas=None, compact: bool = True) -> dict:
    """All requests queued at once, stepped to the end; the figures of the run."""
    import pagedjax as pj
    from pagedjax.sampling_params import RequestOutputKind
    from pagedjax.structured_outputs import StructuredOutputsParams

    eng = llm.engine
    mask_s, accept_s, steps0 = [0.0], [0.0], eng.num_steps
    timed = _time_methods(eng.structured, mask_s, accept_s)
    ids = [f"{tag}-{i}" for i in range(len(requests))]
    t0 = time.perf_counter()
    for i, (rid, (prompt, n)) in enumerate(zip(ids, requests)):
        so = StructuredOutputsParams(json=schemas[i % len(schemas)], disable_any_whitespace=compact) \
            if constrained else None
        eng.add_request(rid, prompt, pj.SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True,
                                                       structured_outputs=so,
                                                       output_kind=RequestOutputKind.FINAL_ONLY))
    done = {}
    while len(done) < len(ids):
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    elapsed = time.perf_counter() - t0
    timed()
    outs = [done[r] for r in ids]
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    reasons = {}
    for o in outs:
        reasons[o.outputs[0].finish_reason] = reasons.get(o.outputs[0].finish_reason, 0) + 1
    steps = eng.num_steps - steps0
    res = figures(tag, requests, elapsed, steps=steps, finish_reasons=reasons, generated_tokens=n_out,
                  generated_tok_per_s=round(n_out / elapsed, 1), **_latencies(outs))
    if constrained:
        res["host_mask_ms_per_step"] = round(1000 * mask_s[0] / max(steps, 1), 3)
        res["host_accept_ms_per_step"] = round(1000 * accept_s[0] / max(steps, 1), 3)
        res["valid_json"] = _count_valid(outs, schemas)
    return res


def _latencies(outs) -> dict:
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs if o.metrics.first_token_time]
    return stats_ms("ttft", ttft)


def _time_methods(structured, mask_s, accept_s):
    """Wraps the manager's bitmask() and accept() with timers; returns the unwrap."""
    bitmask, accept = structured.bitmask, structured.accept

    def timed_bitmask(*a, **k):
        t = time.perf_counter()
        try:
            return bitmask(*a, **k)
        finally:
            mask_s[0] += time.perf_counter() - t

    def timed_accept(*a, **k):
        t = time.perf_counter()
        try:
            return accept(*a, **k)
        finally:
            accept_s[0] += time.perf_counter() - t

    structured.bitmask, structured.accept = timed_bitmask, timed_accept
    return lambda: [structured.__dict__.pop(n, None) for n in ("bitmask", "accept")]


def _count_valid(outs, schemas) -> str:
    """Finished-by-grammar outputs that parse and validate (jsonschema when installed)."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    stopped = valid = 0
    for i, o in enumerate(outs):
        c = o.outputs[0]
        if c.finish_reason != "stop":
            continue
        stopped += 1
        try:
            value = json.loads(c.text)
            if jsonschema is not None:
                jsonschema.validate(value, schemas[i % len(schemas)])
            valid += 1
        except Exception:  # noqa: BLE001 (counted, not raised)
            pass
    return f"{valid}/{stopped}"


def fresh(requests, vocab_size: int, seed: int, num_special: int = 16):
    """The same lengths with other prompt ids: no run reads another's prompts from the prefix cache."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(num_special, vocab_size, size=len(p)).tolist(), n) for p, n in requests]


def compile_times(llm, schemas) -> dict:
    """Cold compile of each schema variant (the first also builds llguidance's tokenizer), then a
    cache hit; milliseconds."""
    from pagedjax.structured_outputs import StructuredOutputsParams

    st = llm.engine.structured
    t = time.perf_counter()
    st.compiler  # noqa: B018 (the tokenizer, once)
    tokenizer_ms = 1000 * (time.perf_counter() - t)
    cold, hot = [], []
    for schema in schemas:
        p = StructuredOutputsParams(json=schema)
        t = time.perf_counter()
        st.compile(p)
        cold.append(1000 * (time.perf_counter() - t))
        t = time.perf_counter()
        st.compile(StructuredOutputsParams(json=schema))
        hot.append(1000 * (time.perf_counter() - t))
    return {"llguidance_tokenizer_ms": round(tokenizer_ms, 1), "compile_cold_ms_mean": round(float(np.mean(cold)), 2),
            "compile_cold_ms_max": round(float(np.max(cold)), 2), "compile_cached_ms_mean": round(float(np.mean(hot)), 4),
            "schema_chars": len(json.dumps(schemas[0]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="named:smollm2-135m",
                   help="HF folder, .gguf, or named:<config> for random weights (default: named:smollm2-135m)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or .gguf (default: the model's, else the bundled SmolLM2's)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--max-len", type=int, default=1024, help="max_model_len; ShareGPT lengths clip to half")
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--sync-too", action="store_true", help="also run the constrained load with async scheduling off")
    p.add_argument("--whitespace", choices=["none", "flexible"], default="none",
                   help="JSON whitespace: none (vLLM's disable_any_whitespace) or flexible; random weights given "
                        "flexible whitespace mostly write whitespace, hundreds of tokens are spaces and newlines")
    p.add_argument("--json-max-tokens", type=int, default=0,
                   help="also run the constrained load with this max_tokens (capped by max_len): large enough, "
                        "every JSON completes and is validated; compare its generated tok/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args(argv)

    import jax

    import pagedjax as pj
    from pagedjax.bundled import bundled_model_path

    if args.dtype is None:
        args.dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    params = load(args)
    tokenizer = args.tokenizer or (None if params.tokenizer is not None else str(bundled_model_path()))
    t0 = time.perf_counter()
    llm = pj.LLM(params, tokenizer=tokenizer, max_model_len=args.max_len, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens)
    startup = time.perf_counter() - t0
    w = argparse.Namespace(dataset="sharegpt", num_prompts=args.num_prompts, input_len=0, output_len=0,
                           max_len=args.max_len, seed=args.seed)
    V = min(params.config.vocab_size, llm.tokenizer.vocab_size)  # prompts the tokenizer can show
    requests = make_requests(w, V)
    schemas = [order_schema(v) for v in range(NUM_VARIANTS)]
    r = llm.engine.runner
    results = {"date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0].device_kind), "model": args.model,
               "tokenizer": args.tokenizer or ("bundled SmolLM2-135M-Instruct" if tokenizer else "the model's"),
               "dtype": args.dtype, "whitespace": args.whitespace, "startup_s": round(startup, 2),
               "engine": {"max_model_len": r.max_model_len, "max_num_seqs": r.max_num_seqs,
                          "max_num_batched_tokens": r.max_num_batched_tokens, "num_pages": r.num_pages},
               "compile": compile_times(llm, schemas), "runs": []}
    print("compile", json.dumps(results["compile"]), flush=True)
    warm = requests[: max(4, len(requests) // 16)]  # every sampler variant compiled before the timed runs
    run(llm, fresh(warm, V, 1), tag="warmup-plain", constrained=False)
    compact = args.whitespace == "none"
    run(llm, fresh(warm, V, 2), tag="warmup-json", constrained=True, schemas=schemas, compact=compact)
    runs = [("unconstrained", False, True, 0), ("json-schema", True, True, 0)]
    if args.sync_too:
        runs.append(("json-schema-sync", True, False, 0))
    if args.json_max_tokens:
        runs.append(("json-schema-complete", True, True, args.json_max_tokens))
    for tag, constrained, async_scheduling, max_tokens in runs:
        llm.engine.config = dataclasses.replace(llm.engine.config, async_scheduling=async_scheduling)
        llm.engine.scheduler.kv_cache.allocator.reset_prefix_cache()  # no run reads another's prompts
        load_k = [(p, min(max_tokens, args.max_len - len(p)) if max_tokens else n) for p, n in requests]
        res = run(llm, load_k, tag=tag, constrained=constrained, schemas=schemas, compact=compact)
        results["runs"].append(res)
        print(tag, json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print(table(results["runs"]))
    return 0


def table(runs: list[dict]) -> str:
    rows = ["| run | req/s | generated tok/s | tokens | TTFT mean/med ms | steps | mask ms/step | valid |",
            "|" + "---|" * 8]
    for x in runs:
        rows.append(f"| {x['engine']} | {x['req_per_s']} | {x['generated_tok_per_s']} | {x['generated_tokens']} | "
                    f"{x.get('ttft_mean_ms', '-')}/{x.get('ttft_median_ms', '-')} | {x['steps']} | "
                    f"{x.get('host_mask_ms_per_step', '-')} | {x.get('valid_json', '-')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
