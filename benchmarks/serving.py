"""Online serving benchmark: Poisson arrivals against a running OpenAI-compatible server.

For each request rate, sends the same requests as streamed completions whose arrival gaps are
exponential (a Poisson process; rate `inf` sends them all at once). Requests are either fixed
(`--dataset fixed`: each prompt exactly `--input-len` token ids, each output `--output-len`
tokens) or ShareGPT-like (`--dataset sharegpt`: the log-normal lengths of
benchmarks/throughput.py, prompts sent as text). Prompts are windows of a tokenized filler text
(via the server's /tokenize, and /detokenize for text); outputs run to their length (ignore_eos).
Measures per request: TTFT (time to the first token), TPOT (time per output token after the
first), ITL (gaps between streamed chunks that carry tokens) and end-to-end latency; per rate:
throughput in requests/s and tokens/s, and the busiest client process's CPU share (requests go
round-robin to `--client-procs` processes, so that the client is not what sets the pace). Prints
a table and writes JSON. Works against pagedjax or
vLLM (it uses vLLM's `continuous_usage_stats`).

    pagedjax serve MODEL --port 8000 &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rates 1,4,16,inf \\
        --num-prompts 200 --input-len 256 --output-len 128 --out serving.json

With `--launch "SERVE ARGS"` it starts `pagedjax serve SERVE ARGS` itself and times its start-up
(launch to the first successful /health, and the phases the server's line reports: weights,
tokenizer, engine, compiling, the rest as "other"; `--startup-runs 2` starts it twice, and with
`--fresh-compile-cache` the first start compiles into an empty cache: cold, then warm). With
`--offline` it then runs the last rate's requests on the offline engine those arguments build, in
this process after the server has exited, so the serving and offline figures come from one run:

    python benchmarks/serving.py --launch "named:llama3-8b --load-format dummy \\
        --tokenizer ggml-vocab-llama-bpe.gguf" --dataset sharegpt --num-prompts 1000 \\
        --request-rates 1,4,16,inf --startup-runs 2 --fresh-compile-cache --offline --out serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx

_TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time there was a little model that "
         "could generate text, one token at a time. def fib(n): return n if n < 2 else fib(n - 1) + "
         "fib(n - 2). The capital of France is Paris; 0123456789 3.14159 2.71828. ")
PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0  # seconds to the first token
    latency: float = 0.0  # seconds to the last chunk
    itl: list[float] = field(default_factory=list)  # gaps between chunks with tokens
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


Prompt = list[int] | str  # token ids, or text


async def _make_prompts(http: httpx.AsyncClient, model: str | None, args: argparse.Namespace,
                        rng: random.Random) -> list[tuple[Prompt, int]]:
    """[(prompt, output length)]: windows of the tokenized filler text, as ids or as text."""
    extra = {"model": model} if model else {}
    r = await http.post("/tokenize", json={"prompt": _TEXT, "add_special_tokens": False, **extra})
    r.raise_for_status()
    ids = r.json()["tokens"]
    if args.dataset == "sharegpt":
        import numpy as np

        from common import sharegpt_lengths

        ins, outs = sharegpt_lengths(np.random.default_rng(args.seed), args.num_prompts, args.max_len)
        lengths = list(zip(ins.tolist(), outs.tolist()))
    else:
        lengths = [(args.input_len, args.output_len)] * args.num_prompts
    longest = max(i for i, _ in lengths)
    ids = ids * (longest // len(ids) + 2)
    vocab = sorted(set(ids))
    out: list[tuple[Prompt, int]] = []
    for i, o in lengths:
        if args.dataset == "sharegpt":  # the filler's tokens in random order: no two prompts share a prefix
            window = [rng.choice(vocab) for _ in range(i)]
        else:
            start = rng.randrange(len(ids) - i)
            window = ids[start:start + i]
        if args.text:
            r = await http.post("/detokenize", json={"tokens": window, **extra})
            r.raise_for_status()
            out.append((r.json()["prompt"], o))
        else:
            out.append((window, o))
    return out


async def _sse_lines(r: httpx.Response):
    """The response's lines as server-sent events define them (ended by LF, CR LF or CR), not as
    str.splitlines does (httpx's aiter_lines), which also splits JSON text at U+2028 and the like."""
    buf = ""
    async for piece in r.aiter_text():
        *lines, buf = (buf + piece).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        for line in lines:
            yield line
    if buf:
        yield buf


async def _one(http: httpx.AsyncClient, model: str | None, prompt: Prompt, output_len: int
               ) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if model:
        body["model"] = model
    res = RequestResult(ok=False, prompt_tokens=len(prompt) if isinstance(prompt, list) else 0)
    start = last = time.perf_counter()
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in _sse_lines(r):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                usage = chunk.get("usage") or {}
                res.prompt_tokens = usage.get("prompt_tokens", res.prompt_tokens)
                new = usage.get("completion_tokens", tokens) - tokens
                if new <= 0:
                    continue
                now = time.perf_counter()
                if tokens == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last, tokens = now, tokens + new
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = repr(e)
        return res
    res.latency = last - start
    res.output_tokens = tokens
    res.ok = tokens > 0
    return res


async def _client_jobs(base_url: str, headers: dict, timeout: float, model: str | None,
                       jobs: list[tuple[float, Prompt, int]], t_start: float, max_concurrency: int | None
                       ) -> tuple[list[RequestResult], float, float]:
    """Sends each (offset s, prompt, output length) at wall time t_start + offset on a client of its
    own; returns the results, the wall time the last one ended and this process's CPU seconds."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=timeout, limits=limits,
                                 trust_env=False) as http:
        async def send(offset: float, p: Prompt, o: int) -> RequestResult:
            delay = t_start + offset - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                return await _one(http, model, p, o)
            async with limit:
                return await _one(http, model, p, o)

        cpu0 = time.process_time()
        results = await asyncio.gather(*(send(*job) for job in jobs))
        return list(results), time.time(), time.process_time() - cpu0


def _client_process(*args) -> tuple[list[RequestResult], float, float]:
    return asyncio.run(_client_jobs(*args))


def _occupy(seconds: float) -> None:
    time.sleep(seconds)


class Clients:
    """The benchmark's client: `procs` processes (each an asyncio loop with its own connections), so
    that parsing thousands of streamed chunks a second does not make the client the bottleneck."""

    def __init__(self, args: argparse.Namespace, headers: dict, model: str | None):
        self.args, self.headers, self.model = args, headers, model
        self.procs = max(1, args.client_procs)
        self.pool = None
        if self.procs > 1:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(self.procs, mp_context=multiprocessing.get_context("spawn"))
            list(self.pool.map(_occupy, [1.0] * self.procs))  # the workers started and imported before timing

    async def run_rate(self, requests: list[tuple[Prompt, int]], rate: float, rng: random.Random) -> dict:
        """Sends every request with Poisson arrivals at `rate` requests/s (round-robin over the
        processes); returns the summary."""
        offsets, t = [], 0.0
        for _ in requests:
            offsets.append(t)
            if math.isfinite(rate):
                t += rng.expovariate(rate)
        jobs = [(t, p, o) for t, (p, o) in zip(offsets, requests)]
        a = self.args
        each = -(-a.max_concurrency // self.procs) if a.max_concurrency else None  # the limit split evenly
        t_start = time.time() + 0.2
        if self.pool is None:
            parts = [await _client_jobs(a.base_url, self.headers, a.timeout, self.model, jobs, t_start, each)]
        else:
            loop = asyncio.get_running_loop()
            parts = await asyncio.gather(*(
                loop.run_in_executor(self.pool, _client_process, a.base_url, self.headers, a.timeout, self.model,
                                     jobs[i::self.procs], t_start, each) for i in range(self.procs)))
        results = [r for rs, _, _ in parts for r in rs]
        duration = max(end for _, end, _ in parts) - t_start
        # The busiest client process's CPU share: near 1.0 means the client, not the server, set the pace.
        cpu = max(c for _, _, c in parts) / duration
        return {**summarize(results, duration, rate), "client_procs": self.procs, "client_cpu_frac": cpu}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _stats(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    v = sorted(x * scale for x in values)
    pct = {f"p{q}": v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))] for q in PERCENTILES}
    return {"mean": statistics.fmean(v), **pct}


def summarize(results: list[RequestResult], duration: float, rate: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    return {
        "request_rate": rate if math.isfinite(rate) else "inf",
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2e_ms": _stats([r.latency for r in ok]),
    }


def print_table(rows: list[dict]) -> None:
    def f(x):
        return "-" if x is None else f"{x:.1f}"

    head = (f"{'rate':>6} {'ok':>5} {'fail':>4} {'req/s':>7} {'out tok/s':>10} | {'TTFT mean':>9} {'p50':>7} "
            f"{'p99':>7} | {'TPOT mean':>9} {'p50':>7} {'p99':>7} | {'ITL mean':>8} {'p50':>7} {'p99':>7}  (ms)")
    print(head)
    print("-" * len(head))
    for r in rows:
        t, p, i = r["ttft_ms"], r["tpot_ms"], r["itl_ms"]
        print(f"{str(r['request_rate']):>6} {r['completed']:>5} {r['failed']:>4} {r['request_throughput']:>7.2f} "
              f"{r['output_throughput']:>10.1f} | {f(t['mean']):>9} {f(t['p50']):>7} {f(t['p99']):>7} | "
              f"{f(p['mean']):>9} {f(p['p50']):>7} {f(p['p99']):>7} | {f(i['mean']):>8} {f(i['p50']):>7} "
              f"{f(i['p99']):>7}  client CPU {r.get('client_cpu_frac', 0):.0%}")


async def main_async(args: argparse.Namespace) -> tuple[list[dict], list[tuple[Prompt, int]]]:
    """Runs every rate; returns the rows and the last rate's requests (the offline run repeats them)."""
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.timeout, limits=limits,
                                 trust_env=False) as http:
        model = args.model
        if model is None:
            r = await http.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        if args.warmup:
            warm = await _make_prompts(http, model, args, random.Random(f"{args.seed}-warmup"))
            await asyncio.gather(*(_one(http, model, p, min(o, 8)) for p, o in warm[:args.warmup]))
        rows, requests = [], []
        clients = Clients(args, headers, model)
        try:
            for rate in args.request_rates:
                # the same lengths at every rate; with --dataset sharegpt, other prompts at each (no prefix
                # hits from an earlier rate's run)
                requests = await _make_prompts(http, model, args, random.Random(f"{args.seed}-{rate}"))
                if args.max_duration and math.isfinite(rate):  # the first rate * D requests: D s of arrivals
                    requests = requests[:max(1, math.ceil(rate * args.max_duration))]
                row = await clients.run_rate(requests, rate, rng)
                rows.append(row)
                print(f"rate {row['request_rate']}: {row['completed']} ok, {row['failed']} failed in "
                      f"{row['duration_s']:.1f} s", file=sys.stderr)
        finally:
            clients.close()
        return rows, requests


_SERVING = re.compile(r"\[pagedjax\] serving .* on (http://\S+:\d+)")
_PHASE = re.compile(r"(\w+) ([\d.]+) s")


class Launched:
    """`pagedjax serve ARGS --port 0` as a child process; `startup_s`: launch to the first /health 200."""

    def __init__(self, serve_args: list[str], log_path: str, timeout: float):
        cmd = [sys.executable, "-m", "pagedjax.cli", "serve", *serve_args, "--host", "127.0.0.1", "--port", "0"]
        self.log = open(log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.url, self.phases = None, {}
        for line in self.proc.stdout:  # the line with the bound port (stderr) comes before serving starts
            self.log.write(line)
            m = _SERVING.search(line)
            if m:
                self.url = m.group(1)
                _, _, startup = line.partition("start-up: ")
                self.phases = {k: float(v) for k, v in _PHASE.findall(startup)}  # weights, tokenizer, engine, ...
                break
        if self.url is None:
            raise SystemExit(f"the server exited ({self.proc.wait()}) before serving; see {log_path}")
        # The rest of its output to the log, so a full pipe never blocks the server.
        threading.Thread(target=lambda: [self.log.write(line) for line in self.proc.stdout], daemon=True).start()
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.perf_counter() - t0 > timeout:
                raise SystemExit(f"the server did not come up; see {log_path}")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - t0
        # The rest: Python and imports, the model's config, uvicorn, the first /health.
        self.phases["other"] = round(self.startup_s - sum(self.phases.values()), 2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_offline(serve_args: list[str], requests: list[tuple[Prompt, int]], warmup: int) -> dict:
    """The last rate's requests on the offline engine the `serve` arguments build (all queued at
    once; a fresh engine, as the server met them: with --dataset sharegpt no earlier prompt shares
    a prefix with them)."""
    import pagedjax as pj
    from pagedjax.cli import build_parser, llm_from_args

    t0 = time.perf_counter()
    llm = llm_from_args(build_parser().parse_args(["serve", *serve_args]))
    startup = time.perf_counter() - t0
    if warmup:
        llm.generate([f"Warm-up request {i}: say something." for i in range(warmup)],  # prompts of its own
                     pj.SamplingParams(max_tokens=8, temperature=0.0))
    params = [pj.SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for _, o in requests]
    t0 = time.perf_counter()
    outs = llm.generate([p for p, _ in requests], params)
    elapsed = time.perf_counter() - t0
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"completed": len(outs), "duration_s": elapsed, "startup_s": startup,
            "request_throughput": len(outs) / elapsed, "output_throughput": n_out / elapsed,
            "total_token_throughput": (n_in + n_out) / elapsed}


def _rates(text: str) -> list[float]:
    return [math.inf if r.strip() in ("inf", "") else float(r) for r in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rates", type=_rates, default=_rates("1,4,inf"), help="requests/s, comma-separated")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--max-duration", type=float, default=None, metavar="S",
                   help="at a finite rate r, only the first ceil(r * S) of the requests (S s of arrivals)")
    p.add_argument("--dataset", choices=["fixed", "sharegpt"], default="fixed",
                   help="fixed: --input-len / --output-len; sharegpt: log-normal lengths, prompts as text")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=4096, help="sharegpt: lengths clipped to half of this")
    p.add_argument("--text", action=argparse.BooleanOptionalAction, default=None,
                   help="send prompts as text (default: with --dataset sharegpt) rather than token ids")
    p.add_argument("--launch", default=None, metavar="SERVE_ARGS",
                   help="start `pagedjax serve SERVE_ARGS` on a free port and time its start-up")
    p.add_argument("--startup-runs", type=int, default=1,
                   help="with --launch: start the server this many times (the first cold, the rest warm)")
    p.add_argument("--fresh-compile-cache", action="store_true",
                   help="with --launch: the servers compile into a new empty cache folder (the first start is "
                        "cold, the next ones warm)")
    p.add_argument("--offline", action="store_true",
                   help="with --launch: then run the same requests on the offline engine of SERVE_ARGS")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (split evenly "
                   "over the client processes)")
    p.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 4)),
                   help="client processes sending the requests (default: a quarter of the cores, at most 4)")
    p.add_argument("--warmup", type=int, default=4, help="short requests before measuring")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.text is None:
        args.text = args.dataset == "sharegpt"
    if args.offline and not args.launch:
        p.error("--offline needs --launch (the engine options to build offline)")
    serve_args = shlex.split(args.launch) if args.launch else []
    startups, startup_phases, server = [], [], None
    if args.fresh_compile_cache:
        import tempfile

        os.environ["PAGEDJAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="pagedjax-compile-")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
    for i in range(args.startup_runs if args.launch else 0):
        if server is not None:
            server.stop()
        server = Launched(serve_args, os.path.join(out_dir, f"serving-server-{i}.log"), args.timeout)
        startups.append(round(server.startup_s, 2))
        startup_phases.append(server.phases)
        print(f"server start-up {i}: {server.startup_s:.1f} s ({server.phases})", file=sys.stderr)
        args.base_url = server.url
    try:
        rows, requests = asyncio.run(main_async(args))
    finally:
        if server is not None:
            server.stop()
    print_table(rows)
    offline = None
    if args.offline:
        offline = run_offline(serve_args, requests, args.warmup)
        inf = next((r for r in rows if r["request_rate"] == "inf"), None)
        if inf is not None:
            offline["serving_inf_over_offline"] = round(inf["output_throughput"] / offline["output_throughput"], 3)
        print(f"offline: {offline['request_throughput']:.2f} req/s, {offline['output_throughput']:.1f} out tok/s"
              + (f"; serving at rate inf gives {offline['serving_inf_over_offline']:.1%} of it"
                 if inf is not None else ""))
    if args.out:
        config = {k: (v if not isinstance(v, list) else [x if math.isfinite(x) else "inf" for x in v])
                  for k, v in vars(args).items() if k != "api_key"}
        with open(args.out, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "config": config,
                       "startup_s": startups, "startup_phases_s": startup_phases, "results": rows,
                       "offline": offline}, f, indent=2)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
