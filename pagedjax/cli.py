"""`pagedjax generate | serve | bench`: the command line.

Engine options are EngineConfig's fields with vLLM's flag names; their defaults come from
EngineConfig, the one place they are written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from pagedjax.config import ATTN_IMPLS, KV_CACHE_DTYPES, MOE_IMPLS, QUANTIZATION_METHODS, EngineConfig


def _token_buckets(text: str) -> str | tuple[int, ...]:
    """--token-buckets: coarse, fine, or a comma list of token counts."""
    if text in ("coarse", "fine"):
        return text
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected coarse, fine or a comma list of token counts, got {text!r}") from None


# (flag, EngineConfig field, type, help); bool type = a switch and its --no- form, as vLLM spells
# them (--enable-prefix-caching / --no-enable-prefix-caching); True type = a flag that turns it on
_ENGINE_FLAGS = (
    ("--max-model-len", "max_model_len", int, "longest prompt + output (default: the model's, capped at 4096)"),
    ("--max-num-seqs", "max_num_seqs", int, "requests per step (default: 256 on GPU, 32 on CPU)"),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, "tokens per step (default: 2048 on GPU, 256 on CPU)"),
    ("--num-pages", "num_pages", int, "KV pages (default: as many as memory allows)"),
    ("--page-size", "page_size", int, "tokens per KV page"),
    ("--gpu-memory-utilization", "gpu_memory_utilization", float, "share of device memory to use"),
    ("--kv-cache-dtype", "kv_cache_dtype", KV_CACHE_DTYPES, "KV cache dtype (auto: the weights')"),
    ("--quantization", "quantization", QUANTIZATION_METHODS,
     "weights quantization: fp8 quantizes a float checkpoint at load; quantized checkpoints are detected"),
    ("--long-prefill-token-threshold", "long_prefill_token_threshold", int,
     "> 0: a request computes at most this many tokens a step"),
    ("--attn-impl", "attn_impl", ATTN_IMPLS, "attention implementation"),
    ("--tensor-parallel-size", "tensor_parallel_size", int, "devices to split the model over"),
    ("--enable-expert-parallel", "enable_expert_parallel", True,
     "MoE models: split whole experts over the tensor-parallel devices, not each expert's MLP"),
    ("--moe-impl", "moe_impl", MOE_IMPLS, "MoE models: how the experts run (default: the model's, auto)"),
    ("--max-logprobs", "max_logprobs", int, "most logprobs a request may ask for"),
    ("--stream-interval", "stream_interval", int,
     "streamed outputs: send a request's new tokens once this many are in (its first token and its end at once)"),
    ("--seed", "seed", int, "seed of the random draws of requests that bring no seed"),
    ("--preemption-mode", "preemption_mode", ("recompute", "swap"),
     "what a preempted request's pages become: recomputed later, or swapped to host memory"),
    ("--swap-space", "swap_space", float, "GiB of host memory for swapped pages"),
    ("--enable-prefix-caching", "enable_prefix_caching", bool, "automatic prefix caching"),
    ("--enable-chunked-prefill", "enable_chunked_prefill", bool,
     "split long prompts into chunks that share steps with decodes (off: each prompt in one step)"),
    ("--async-scheduling", "async_scheduling", bool,
     "schedule and launch each step before the last one's tokens reach the host (off: wait for them)"),
    ("--reasoning-parser", "reasoning_parser", ("deepseek_r1", "qwen3"),
     "split <think> reasoning off the answer (reasoning_content); output constraints start after it"),
    ("--structured-outputs-enable-in-reasoning", "enable_in_reasoning", True,
     "with a reasoning parser: apply output constraints to the reasoning too"),
    ("--batch-invariant", "batch_invariant", True,
     "a request's tokens and logprobs independent of the rest of the batch (fixed-tile matmuls, unsplit attention)"),
    ("--token-buckets", "token_buckets", _token_buckets,
     "step sizes compiled and padded to: fine (the default: 1, 4, 16, 64, 256, 384, 512, 768, 1024, 1536, ...), "
     "coarse (1, 4, 16, 64, 256, 1024, ...: fewer compiles), or a comma list of token counts"),
    ("--grammar-compile-timeout", "grammar_compile_timeout", float,
     "seconds for compiling one output constraint (JSON schema, regex, grammar) before a 400"),
)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (auto: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="dummy: random weights of the model's config (a folder's config.json, a .gguf's "
                        "metadata, or named:<config>), nothing read")
    p.add_argument("--tokenizer", default=None,
                   help="HF tokenizer folder or .gguf file (vocab-only ones too); default: the model's")
    defaults = EngineConfig.defaults()
    g = p.add_argument_group("engine")
    for flag, field, kind, help in _ENGINE_FLAGS:
        default = defaults[field]
        if kind is bool:
            g.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=default,
                           help=f"{help} (default: {'on' if default else 'off'})")
        elif kind is True:
            g.add_argument(flag, dest=field, action="store_true", default=None, help=help)
        elif isinstance(kind, tuple):
            g.add_argument(flag, dest=field, choices=kind, default=default, help=f"{help} (default: {default})")
        else:
            g.add_argument(flag, dest=field, type=kind, default=default,
                           help=help if default is None else f"{help} (default: {default})")
    for old_flag, field in (("--no-prefix-caching", "enable_prefix_caching"),  # earlier spellings
                            ("--no-chunked-prefill", "enable_chunked_prefill")):
        p.add_argument(old_flag, dest=field, action="store_false", help=argparse.SUPPRESS)
    p.add_argument("-tp", dest="tensor_parallel_size", type=int, help=argparse.SUPPRESS)
    p.add_argument("-q", dest="quantization", choices=QUANTIZATION_METHODS, help=argparse.SUPPRESS)


def engine_options(args: argparse.Namespace) -> dict:
    """The EngineConfig options given on the command line (those left at None pick defaults)."""
    opts = {field: getattr(args, field) for _, field, _, _ in _ENGINE_FLAGS}
    return {k: v for k, v in opts.items() if v is not None}


def _chat_template(args: argparse.Namespace) -> str | None:
    """The text of --chat-template (a file's or the template given), None without it; ValueError if bad."""
    if args.chat_template is None:
        return None
    from pagedjax.tokenizer import load_chat_template

    return load_chat_template(args.chat_template)


def cmd_generate(args: argparse.Namespace) -> int:
    """Streams the completion of one prompt to the terminal."""
    from pagedjax.api import LLM, resolve_dtype
    from pagedjax.sampling_params import SamplingParams

    t0 = time.perf_counter()
    try:
        template = _chat_template(args)
    except ValueError as e:
        print(f"pagedjax generate: --chat-template: {e}", file=sys.stderr)
        return 2
    # One prompt: compile the step buckets it uses, when it uses them (from the cache when warm).
    try:  # a model or an option that cannot run (a ValueError naming it): said in one line, exit 2
        llm = LLM(args.model, dtype=resolve_dtype(args.dtype), load_format=args.load_format,
                  tokenizer=args.tokenizer, **{"precompile": False, **engine_options(args)})
    except ValueError as e:
        print(f"pagedjax generate: {e}", file=sys.stderr)
        return 2
    tok = llm.tokenizer
    prompt = args.prompt
    if not args.no_chat and tok is not None and (template or tok.has_chat_template):
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        prompt = llm.engine.chat_prompt(messages, tokenize=True, chat_template=template)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k)
    phases = ", ".join(f"{k} {v:.1f}" for k, v in llm.startup_seconds.items())
    print(f"[pagedjax] ready in {time.perf_counter() - t0:.1f} s ({phases})", file=sys.stderr)
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
    compiled = llm.engine.runner.executables
    print(f"[pagedjax] {n_tokens} tokens in {dt:.2f} s ({n_tokens / max(dt, 1e-9):.1f} tok/s, "
          f"first token {1000 * (first or 0):.0f} ms), finish_reason={finish}; compiled steps: "
          f"{compiled.disk_hits} from the cache, {compiled.misses} compiled", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Runs the OpenAI-compatible HTTP server."""
    from pagedjax.server.options import ServerOptions

    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        print("pagedjax serve: --enable-auto-tool-choice needs --tool-call-parser", file=sys.stderr)
        return 2
    try:
        template = _chat_template(args)
    except ValueError as e:
        print(f"pagedjax serve: --chat-template: {e}", file=sys.stderr)
        return 2
    from pagedjax.generation_config import sampling_defaults

    try:
        sampling_defaults(args.model, args.generation_config)  # checked before anything loads
    except ValueError as e:
        print(f"pagedjax serve: --generation-config: {e}", file=sys.stderr)
        return 2
    options = ServerOptions(
        model=args.model, host=args.host, port=args.port, api_key=args.api_key,
        served_model_name=args.served_model_name, max_queue=args.max_queue, dtype=args.dtype,
        load_format=args.load_format, tokenizer=args.tokenizer, verbose=args.verbose,
        tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
        chat_template=template, generation_config=args.generation_config,
        engine_process=args.engine_process, engine=engine_options(args))
    core = None
    if options.engine_process:  # the core loads while this process imports the web stack
        from pagedjax.server.engine_core import spawn_core

        core = spawn_core(options)
    from pagedjax.server.app import run_server

    return run_server(options, core=core)


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    """Runs a script from the checkout's benchmarks/ folder (throughput, serving, kernels)."""
    import os
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = {"throughput": "throughput.py", "serving": "serving.py", "latency": "latency.py",
              "kernels": os.path.join("kernels", "paged_attention.py")}[args.which]
    path = os.path.join(root, "benchmarks", script)
    if not os.path.exists(path):
        print(f"pagedjax bench: {path} not found (benchmarks live in the source checkout)",
              file=sys.stderr)
        return 2
    sys.argv = [path, *rest]
    sys.path.insert(0, os.path.dirname(path))
    runpy.run_path(path, run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `pagedjax` parser (benchmarks/serving.py reads a `serve` command line with it)."""
    parser = argparse.ArgumentParser(prog="pagedjax", description="LLM inference and serving in JAX")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate from one prompt, streaming to the terminal")
    g.add_argument("prompt", nargs="?", default="What is the capital of France?")
    g.add_argument("--model", default=None,
                   help="HF folder, .gguf, or named:<config> with --load-format dummy (default: bundled SmolLM2)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--system", default=None, help="system message for chat models")
    g.add_argument("--no-chat", action="store_true", help="send the prompt without the chat template")
    g.add_argument("--chat-template", default=None,
                   help="a chat template (a .jinja file, or the template's text) used in place of the tokenizer's")
    _engine_args(g)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("model", nargs="?", default=None,
                   help="HF folder, .gguf, or named:<config> with --load-format dummy (default: bundled SmolLM2)")
    s.add_argument("--model", dest="model", default=argparse.SUPPRESS, help="the same as the positional MODEL")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=None)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--max-queue", type=int, default=1024, help="waiting requests before 503")
    s.add_argument("--generation-config", default="auto",
                   help="sampling defaults for the fields a request leaves out: 'auto' (the model folder's "
                        "generation_config.json recommendations), 'vllm' (none), or a folder holding one")
    s.add_argument("--chat-template", default=None,
                   help="a chat template (a .jinja file, or the template's text) used in place of the tokenizer's")
    s.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral"], default=None,
                   help="parse the model's tool calls for tool_choice 'auto' (the model family's format)")
    s.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="vLLM's flag, accepted: --tool-call-parser enables tool_choice 'auto'")
    s.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine in a process of its own, apart from the HTTP front end (its event "
                        "loop, tokenization, SSE) and its GIL, as vLLM V1's engine core (the default); "
                        "--no-engine-process runs its loop on a thread of the server's process")
    _engine_args(s)
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("bench", help="benchmarks (arguments after the name go to the script)")
    b.add_argument("which", choices=["throughput", "latency", "serving", "kernels"])
    b.set_defaults(func=None)
    return parser


def llm_from_args(args: argparse.Namespace):
    """The LLM that `generate` / `serve` with these parsed arguments builds (compiled ahead)."""
    from pagedjax.api import LLM, resolve_dtype

    return LLM(args.model, dtype=resolve_dtype(args.dtype), load_format=args.load_format, tokenizer=args.tokenizer,
               **engine_options(args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
