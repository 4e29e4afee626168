"""`pagedjax generate | serve | bench`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and KV cache dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + output (default: the model's, capped at 4096)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="requests per step")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step")
    p.add_argument("--num-pages", type=int, default=None, help="KV pages (default: from memory)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--no-prefix-caching", action="store_true", help="disable the prefix cache")
    p.add_argument("--attn-impl", default="auto", choices=["auto", "reference", "ffi"])
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"],
                   help="what a preempted request's pages become: recomputed later, or swapped to host memory")
    p.add_argument("--swap-space", type=float, default=4.0, help="GiB of host memory for swapped pages")
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="wait for each step's tokens before scheduling the next")


def _engine_options(args: argparse.Namespace) -> dict:
    opts = {
        "max_model_len": args.max_model_len,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "num_pages": args.num_pages,
        "page_size": args.page_size,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "enable_prefix_caching": not args.no_prefix_caching,
        "attn_impl": args.attn_impl,
        "tensor_parallel_size": args.tensor_parallel_size,
        "preemption_mode": args.preemption_mode,
        "swap_space": args.swap_space,
        "async_scheduling": not args.no_async_scheduling,
    }
    return {k: v for k, v in opts.items() if v is not None}


def _dtype(name: str):
    import jax
    import jax.numpy as jnp

    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(name)


def cmd_generate(args: argparse.Namespace) -> int:
    """Streams the completion of one prompt to the terminal."""
    from pagedjax.api import LLM
    from pagedjax.sampling_params import SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=_dtype(args.dtype), **_engine_options(args))
    tok = llm.tokenizer
    prompt = args.prompt
    if not args.no_chat and tok is not None and tok.has_chat_template:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt = llm.engine.chat_prompt(messages, tokenize=True)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    print(f"[pagedjax] ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    t1 = time.perf_counter()
    n_tokens, first = 0, None
    finish = None
    for out in llm.stream(prompt, sp):
        c = out.outputs[0]
        if c.token_ids and first is None:
            first = time.perf_counter() - t1
        n_tokens += len(c.token_ids)
        sys.stdout.write(c.text)
        sys.stdout.flush()
        finish = c.finish_reason or finish
    dt = time.perf_counter() - t1
    sys.stdout.write("\n")
    print(f"[pagedjax] {n_tokens} tokens in {dt:.2f} s ({n_tokens / max(dt, 1e-9):.1f} tok/s, "
          f"first token {1000 * (first or 0):.0f} ms), finish_reason={finish}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs the OpenAI-compatible HTTP server."""
    from pagedjax.server.app import run_server

    return run_server(args, engine_options=_engine_options(args), dtype=_dtype(args.dtype))


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    """Runs a script from the checkout's benchmarks/ folder (throughput, serving, kernels)."""
    import os
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = {"throughput": "throughput.py", "serving": "serving.py",
              "kernels": os.path.join("kernels", "paged_attention.py")}[args.which]
    path = os.path.join(root, "benchmarks", script)
    if not os.path.exists(path):
        print(f"pagedjax bench: {path} not found (benchmarks live in the source checkout)",
              file=sys.stderr)
        return 2
    sys.argv = [path, *rest]
    runpy.run_path(path, run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pagedjax", description="LLM inference and serving in JAX")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from one prompt, streaming to the terminal")
    g.add_argument("prompt", nargs="?", default="What is the capital of France?")
    g.add_argument("--model", default=None, help="HF folder or .gguf (default: bundled SmolLM2)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--system", default=None, help="system message for chat models")
    g.add_argument("--no-chat", action="store_true", help="send the prompt without the chat template")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("model", nargs="?", default=None, help="HF folder or .gguf (default: bundled)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 503")
    _engine_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks (arguments after the name go to the script)")
    b.add_argument("which", choices=["throughput", "serving", "kernels"])
    b.set_defaults(func=None)

    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        return cmd_bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
