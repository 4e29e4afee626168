"""HF transformers `generate` (static batches) on the same prompts as benchmarks/throughput.py.

A random-weight HF model is built from one of our named configs (bf16, on the GPU), prompts come
from throughput.make_requests with the same seed and lengths, and every batch generates exactly
the longest output length in it (ignore_eos), which is how vLLM's HF baseline counts too.

  python benchmarks/hf_baseline.py --model named:llama3-8b --dataset sharegpt --num-prompts 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from throughput import _figures, make_requests  # noqa: E402


def hf_model(name: str, device: str):
    """A random-weight transformers model with the architecture of our named config."""
    import torch
    import transformers

    from pagedjax.models.config import get_config

    c = get_config(name)
    if c.architecture != "llama":
        raise SystemExit(f"hf_baseline: only llama configs are mapped, not {c.architecture}")
    scaling = None
    if c.rope_scaling.type == "llama3":
        s = c.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, rope_scaling=scaling, tie_word_embeddings=c.tie_word_embeddings,
        torch_dtype="bfloat16")
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="named:llama3-8b")
    p.add_argument("--dataset", choices=["random", "sharegpt"], default="sharegpt")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=0,
                   help="stop after this many seconds and report the batches done (0: no limit)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from pagedjax.models.config import get_config

    name = args.model.removeprefix("named:")
    requests = make_requests(args, get_config(name).vocab_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(name, device)
    B = args.batch_size
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]))
    done = []
    t0 = time.perf_counter()
    for s in range(0, len(order), B):
        batch = [requests[i] for i in order[s:s + B]]
        L = max(len(q) for q, _ in batch)
        ids = torch.zeros((len(batch), L), dtype=torch.long)
        mask = torch.zeros((len(batch), L), dtype=torch.long)
        for r, (q, _) in enumerate(batch):
            ids[r, L - len(q):] = torch.tensor(q)
            mask[r, L - len(q):] = 1
        new = max(o for _, o in batch)
        with torch.no_grad():
            model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                           max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
        done += batch
        if args.time_limit and time.perf_counter() - t0 > args.time_limit:
            break
    if device == "cuda":
        torch.cuda.synchronize()
    res = _figures(f"hf-generate(static batch {B})", done, time.perf_counter() - t0,
                   completed=f"{len(done)}/{len(requests)}")
    out = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "dataset": args.dataset,
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "mean_input_len": float(np.mean([len(q) for q, _ in requests])),
           "mean_output_len": float(np.mean([o for _, o in requests])), "runs": [res]}
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
