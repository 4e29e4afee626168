"""Start-up: wall time from spawning a fresh Python process to its first generated token.

Three children, one after another, each a new process that imports jax and pagedjax, draws random
weights of a named config, builds pj.LLM (which compiles every step bucket) and generates one
token from a random prompt:
- cold: the persistent compilation cache in a fresh, empty temporary directory;
- warm: the same directory again, now filled by the cold child;
- off: PAGEDJAX_COMPILE_CACHE="" (no persistent cache).
Each child reports its own breakdown (interpreter start, imports, backend init, weights, engine
init with its compiles, first token), all from time.time() against the parent's clock read just
before the spawn. Caches outside pagedjax's (the CUDA driver's PTX cache) are not cleared.

  python benchmarks/startup.py --model named:llama3-8b --out startup.json
  python benchmarks/startup.py --model named:tiny-llama --max-len 128 --max-num-batched-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

T_MODULE = time.time()  # the child's first line of ours: the interpreter has started
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

MARK = "STARTUP_JSON "


def child(args) -> int:
    """Runs in the fresh process: times each stage up to the first token, prints one JSON line."""
    t = {"spawn": args.t_spawn, "interpreter": T_MODULE}
    import jax
    import numpy as np

    import pagedjax as pj
    from pagedjax.compile_cache import compile_cache_dir
    from pagedjax.models.config import get_config
    from pagedjax.dummy_weights import random_params

    t["import"] = time.time()
    device = str(jax.devices()[0].device_kind)
    t["backend"] = time.time()
    dtype = args.dtype or ("bfloat16" if jax.default_backend() == "gpu" else "float32")
    config = get_config(args.model.removeprefix("named:"))
    params = random_params(config, dtype=dtype, seed=0)
    jax.block_until_ready(jax.tree.leaves(params.variables))
    t["weights"] = time.time()
    llm = pj.LLM(params, max_model_len=args.max_len, max_num_seqs=args.max_num_seqs,
                 max_num_batched_tokens=args.max_num_batched_tokens)
    t["engine"] = time.time()
    prompt = np.random.default_rng(0).integers(16, config.vocab_size, size=args.prompt_len).tolist()
    out = llm.generate([prompt], pj.SamplingParams(max_tokens=1, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 1
    t["first_token"] = time.time()
    names = list(t)
    stages = {f"{b}_s": round(t[b] - t[a], 3) for a, b in zip(names, names[1:])}
    print(MARK + json.dumps({"device": device, "dtype": dtype, "compile_cache": compile_cache_dir(),
                             "total_s": round(t["first_token"] - t["spawn"], 3), **stages}), flush=True)
    return 0


def spawn(args, cache: str, timeout: float) -> dict:
    """One fresh child with PAGEDJAX_COMPILE_CACHE=cache; its report plus the process's own wall time."""
    env = dict(os.environ, PAGEDJAX_COMPILE_CACHE=cache)
    t0 = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--t-spawn", repr(t0), "--model", args.model,
           "--max-len", str(args.max_len), "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--prompt-len", str(args.prompt_len)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(MARK)]
    if p.returncode or not lines:
        return {"error": f"exit {p.returncode}: {(p.stderr or p.stdout)[-1500:]}"}
    return {**json.loads(lines[-1][len(MARK):]), "process_exit_s": round(time.time() - t0, 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="named:llama3-8b", help="named:<config> (random weights)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--max-len", type=int, default=4096)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--modes", default="cold,warm,off", help="comma list of cold, warm, off")
    p.add_argument("--child-timeout", type=float, default=240, help="seconds per child")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--t-spawn", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    cache = tempfile.mkdtemp(prefix="pagedjax-startup-cache-")
    res = {"date": time.strftime("%Y-%m-%d"), "model": args.model,
           "engine": {"max_model_len": args.max_len, "max_num_seqs": args.max_num_seqs,
                      "max_num_batched_tokens": args.max_num_batched_tokens}, "runs": {}}
    try:
        for mode in args.modes.split(","):
            dirs = {"cold": cache, "warm": cache, "off": ""}
            r = spawn(args, dirs[mode], args.child_timeout)
            if mode in ("cold", "warm"):
                r["cache_files_after"] = sum(len(f) for _, _, f in os.walk(cache))
            res["runs"][mode] = r
            print(mode, json.dumps(r), flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(res, f, indent=1)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    keys = ["total_s", "interpreter_s", "import_s", "backend_s", "weights_s", "engine_s", "first_token_s"]
    print(f"\n{args.model}: seconds from spawn to first token (engine_s includes the step compiles)")
    print("| cache | " + " | ".join(keys) + " |\n|" + "---|" * (len(keys) + 1))
    for mode, r in res["runs"].items():
        cells = [str(r.get(k, "-")) for k in keys] if "error" not in r else [r["error"][-200:].replace("\n", " ")]
        print(f"| {mode} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
