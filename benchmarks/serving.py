"""Online serving benchmark: Poisson arrivals against a running OpenAI-compatible server.

For each request rate, sends `--num-prompts` streamed completions whose arrival gaps are
exponential (a Poisson process; rate `inf` sends them all at once), each prompt exactly
`--input-len` tokens (windows of a tokenized text, via the server's /tokenize) and each output
exactly `--output-len` tokens (ignore_eos). Measures per request: TTFT (time to the first token),
TPOT (time per output token after the first), ITL (gaps between streamed chunks that carry
tokens) and end-to-end latency; per rate: throughput in requests/s and tokens/s. Prints a table
and writes JSON. Works against pagedjax or vLLM (it uses vLLM's `continuous_usage_stats`).

    pagedjax serve MODEL --port 8000 &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --request-rates 1,4,16,inf \\
        --num-prompts 200 --input-len 256 --output-len 128 --out serving.json
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import random
import statistics
import sys
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


async def _make_prompts(http: httpx.AsyncClient, model: str | None, n: int, input_len: int,
                        rng: random.Random) -> list[list[int]]:
    """n prompts of exactly input_len token ids: random windows of the tokenized filler text."""
    r = await http.post("/tokenize", json={"prompt": _TEXT, "add_special_tokens": False,
                                           **({"model": model} if model else {})})
    r.raise_for_status()
    ids = r.json()["tokens"]
    ids = ids * (input_len // len(ids) + 2)
    starts = [rng.randrange(len(ids) - input_len) for _ in range(n)]
    return [ids[s:s + input_len] for s in starts]


async def _one(http: httpx.AsyncClient, model: str | None, prompt: list[int], output_len: int
               ) -> RequestResult:
    body = {"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    if model:
        body["model"] = model
    res = RequestResult(ok=False, prompt_tokens=len(prompt))
    start = last = time.perf_counter()
    tokens = 0
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = str(chunk["error"])
                    return res
                usage = chunk.get("usage") or {}
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


async def run_rate(http: httpx.AsyncClient, model: str | None, prompts: list[list[int]], output_len: int,
                   rate: float, max_concurrency: int | None, rng: random.Random) -> dict:
    """Sends every prompt with Poisson arrivals at `rate` requests/s; returns the summary."""
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def send(p: list[int]) -> RequestResult:
        if limit is None:
            return await _one(http, model, p, output_len)
        async with limit:
            return await _one(http, model, p, output_len)

    tasks = []
    t0 = time.perf_counter()
    for p in prompts:
        tasks.append(asyncio.create_task(send(p)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return summarize(results, time.perf_counter() - t0, rate)


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
              f"{f(i['p99']):>7}")


async def main_async(args: argparse.Namespace) -> list[dict]:
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
        prompts = await _make_prompts(http, model, args.num_prompts, args.input_len, rng)
        if args.warmup:
            await asyncio.gather(*(_one(http, model, p, min(args.output_len, 8)) for p in prompts[:args.warmup]))
        rows = []
        for rate in args.request_rates:
            row = await run_rate(http, model, prompts, args.output_len, rate, args.max_concurrency, rng)
            rows.append(row)
            print(f"rate {row['request_rate']}: {row['completed']} ok, {row['failed']} failed in "
                  f"{row['duration_s']:.1f} s", file=sys.stderr)
        return rows


def _rates(text: str) -> list[float]:
    return [math.inf if r.strip() in ("inf", "") else float(r) for r in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=None)
    p.add_argument("--request-rates", type=_rates, default=_rates("1,4,inf"), help="requests/s, comma-separated")
    p.add_argument("--num-prompts", type=int, default=100, help="requests per rate")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup", type=int, default=4, help="short requests before measuring")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    rows = asyncio.run(main_async(args))
    print_table(rows)
    if args.out:
        config = {k: (v if not isinstance(v, list) else [x if math.isfinite(x) else "inf" for x in v])
                  for k, v in vars(args).items() if k != "api_key"}
        with open(args.out, "w") as f:
            json.dump({"date": datetime.datetime.now().isoformat(timespec="seconds"), "config": config,
                       "results": rows}, f, indent=2)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
