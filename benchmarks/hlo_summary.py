"""What XLA made of a compiled step: the GEMMs by kind and operand types, and the large converts.

Reads the optimized HLO that XLA dumps (`XLA_FLAGS="--xla_dump_to=DIR --xla_dump_hlo_as_text"`):

  python benchmarks/hlo_summary.py DIR [--match jit__step] [--out summary.json]

For each module whose name matches (the largest by default), counts:
- GEMM custom calls by target (`__cublas$lt$matmul$f8` is cuBLASLt's FP8 GEMM, `__cublas$gemm`
  a plain one, our `pagedjax_*` kernels) with the element types of their first two operands;
- Triton GEMM fusions (`__triton_gemm` in the backend config) and plain `dot(` instructions;
- converts out of f8 / s4 / u4 whose operand has at least --min-elements elements: a weight
  dequantized in memory on every step, which is what a fused FP8 or int4 matmul must avoid.

`--fusions NAME,...` also prints what each named kernel is: the instruction that launches it (a
profiler's kernel name, `input_reduce_fusion_64`, is the HLO instruction `input_reduce_fusion.64`)
with its backend config (a Triton GEMM's tiles and split-K), and the body of the computation it calls.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys

_SHAPE = re.compile(r"\b(f8e4m3fn|f8e5m2|s4|u4|bf16|f16|f32|s8|s32)\[([0-9,]*)\]")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _elements(dims: str) -> int:
    n = 1
    for d in filter(None, dims.split(",")):
        n *= int(d)
    return n


def summarize(text: str, min_elements: int) -> dict:
    calls = collections.Counter()
    triton, dots = 0, 0
    converts = collections.Counter()
    for line in text.splitlines():
        line = line.strip()
        m = _TARGET.search(line)
        if m:
            args = line[line.find("custom-call(") + len("custom-call("):]  # the operands, after the result type
            types = [t for t, _ in _SHAPE.findall(args)[:2]]
            calls[f"{m.group(1)} ({' x '.join(types)})"] += 1
        if "__triton_gemm" in line and "fusion(" in line:
            triton += 1
        if re.search(r"\bdot\(", line):
            dots += 1
        if re.search(r"\bconvert\(", line):
            shapes = _SHAPE.findall(line)
            if len(shapes) >= 2 and shapes[1][0] in ("f8e4m3fn", "f8e5m2", "s4", "u4") \
                    and _elements(shapes[1][1]) >= min_elements:
                converts[f"{shapes[1][0]}[{shapes[1][1]}] -> {shapes[0][0]}"] += 1
    return {"custom_calls": dict(calls.most_common()), "triton_gemm_fusions": triton, "dots": dots,
            "large_converts_from_low_precision": dict(converts.most_common())}


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")


def fusion_bodies(text: str, names: list[str], max_lines: int = 60) -> dict:
    """{kernel name: the launching instruction and its called computation's lines}."""
    comps, cur, body = {}, None, []
    instrs = {}
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            cur, body = m.group(1), []
            continue
        if line.startswith("}"):
            if cur is not None:
                comps[cur] = body
            cur = None
            continue
        if cur is not None:
            body.append(line.strip())
            im = _INSTRUCTION.match(line)
            if im:
                instrs[im.group(1).replace(".", "_").replace("-", "_")] = line.strip()
    res = {}
    for name in names:
        line = instrs.get(name.replace(".", "_").replace("-", "_"))
        if line is None:
            res[name] = {"instruction": None}
            continue
        called = re.search(r"calls=%?([\w.\-]+)", line)
        body = comps.get(called.group(1), []) if called else []
        res[name] = {"instruction": line[:1500], "body": body[:max_lines]}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dump_dir")
    p.add_argument("--match", default="", help="substring of the module file names to consider")
    p.add_argument("--all", action="store_true", help="every matching module, not only the largest")
    p.add_argument("--min-elements", type=int, default=1 << 20)
    p.add_argument("--fusions", default="", help="comma-separated kernel names to describe (see above)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    files = [f for f in glob.glob(os.path.join(args.dump_dir, "*after_optimizations.txt")) if args.match in f]
    if not files:
        print(f"no *after_optimizations.txt matching {args.match!r} in {args.dump_dir}", file=sys.stderr)
        return 1
    files.sort(key=os.path.getsize, reverse=True)
    res = {}
    for f in files if args.all else files[:1]:
        with open(f) as fh:
            text = fh.read()
        res[os.path.basename(f)] = summarize(text, args.min_elements)
        if args.fusions:
            res[os.path.basename(f)]["fusions"] = fusion_bodies(text, [n for n in args.fusions.split(",") if n])
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
