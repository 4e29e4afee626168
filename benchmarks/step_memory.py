"""The largest step's memory from XLA's own analysis, compiled from abstract weights (nothing is
allocated, so a 30B model's step compiles on a small machine): its temporaries and arguments on
this backend. A CPU's figures are its own compiler's (its fusions and lowerings, `ragged_dot`'s
above all, are not a GPU's); run it where the engine runs for the figure the KV pool is sized by.

    python benchmarks/step_memory.py --model named:qwen3-30b-a3b --tokens 2048 --moe-impl capacity
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pagedjax.attention.metadata import AttentionMetadata
from pagedjax.kv_cache import page_pool
from pagedjax.model_runner import _step, pack
from pagedjax.models import abstract_params
from pagedjax.models.named import NAMED_CONFIGS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="named:llama3-8b", help="named:<config>")
    p.add_argument("--tokens", type=int, default=2048, help="the step's tokens (max_num_batched_tokens)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--moe-impl", default=None, help="MoE models: capacity, ragged or dense")
    p.add_argument("--attn-impl", default="reference")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cfg = NAMED_CONFIGS[args.model.removeprefix("named:")]
    if args.moe_impl:
        cfg = dataclasses.replace(cfg, moe_impl=args.moe_impl)
    T, R, B = args.tokens, min(args.tokens, args.max_num_seqs), args.page_size
    variables = {"params": abstract_params(cfg, jnp.bfloat16)[0]}
    meta = AttentionMetadata(positions=np.zeros(T, np.int32), slot_mapping=page_pool.padding_slots(T, 2, B),
                             block_tables=np.zeros((R, -(-args.max_model_len // B)), np.int32),
                             seq_lens=np.zeros(R, np.int32), query_start_loc=np.zeros(R + 1, np.int32),
                             logits_indices=np.zeros(R, np.int32))
    buf, layout = pack((np.zeros(T, np.int32), np.full(T, -1, np.int32), meta, None))
    pool = jax.ShapeDtypeStruct((2, B, cfg.num_kv_heads, cfg.head_dim), jnp.bfloat16)  # two pages a layer
    t0 = time.perf_counter()
    compiled = _step.lower(cfg, args.attn_impl, variables, [(pool, pool)] * cfg.num_layers,
                           jax.ShapeDtypeStruct(buf.shape, buf.dtype), jax.ShapeDtypeStruct((args.max_num_seqs,), jnp.int32),
                           jax.ShapeDtypeStruct((R, cfg.vocab_size), jnp.float32), layout=layout, mesh=None).compile()
    ma = compiled.memory_analysis()
    row = {"model": args.model, "tokens": T, "moe_impl": args.moe_impl, "backend": jax.default_backend(),
           "temp_gib": ma.temp_size_in_bytes / 2**30, "argument_gib": ma.argument_size_in_bytes / 2**30,
           "compile_s": time.perf_counter() - t0}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=2)


if __name__ == "__main__":
    main()
