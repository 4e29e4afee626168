"""The engine core's outputs on the pipe (`pagedjax serve --engine-process`): one step's outputs for
N streaming requests, each a one-token delta, as the core sends them and the front end reads them.

  python benchmarks/engine_core_wire.py --streams 256 --out wire.json

Two encodings, timed in the same run (ms per step, best of 5 repeats of --calls):
- `dataclasses`: the RequestOutputs themselves, their prompts dropped with `dataclasses.replace`
  (what the core sent before `encode_output`), pickled and unpickled;
- `tuples`: `encode_output` (plain tuples and lists), pickled, unpickled and `decode_output`.
The core's share (encode + pickle) is on the engine's critical path; the front end's (unpickle +
decode) is in the other process.
"""

from __future__ import annotations

import dataclasses
import pickle
import sys
import time

from common import best_ms, emit, per_stream_args


def main(argv=None) -> int:
    args = per_stream_args(__doc__, argv)

    from pagedjax.request import CompletionOutput, RequestMetrics, RequestOutput
    from pagedjax.server.engine_core import decode_output, encode_output

    outputs = [RequestOutput(
        request_id=f"chatcmpl-{i:032x}", prompt="a chat prompt " * 20, prompt_token_ids=list(range(200)),
        prompt_logprobs=None, outputs=[CompletionOutput(0, " word", [1234], -0.5, None, None, None)],
        finished=False, metrics=RequestMetrics(1.0, 2.0, 3.0, 4.0), num_cached_tokens=0)
        for i in range(args.streams)]

    def ms(fn) -> float:
        return best_ms(fn, args.calls)

    def old_send():
        return pickle.dumps([dataclasses.replace(o, prompt=None, prompt_token_ids=None) for o in outputs])

    def new_send():
        return pickle.dumps([encode_output(o, with_prompt=False) for o in outputs])

    old_bytes, new_bytes = old_send(), new_send()
    res = {"date": time.strftime("%Y-%m-%d"), "streams": args.streams,
           "dataclasses": {"core_ms": ms(old_send), "front_end_ms": ms(lambda: pickle.loads(old_bytes)),
                           "bytes": len(old_bytes)},
           "tuples": {"core_ms": ms(new_send),
                      "front_end_ms": ms(lambda: [decode_output(w, "p", [1]) for w in pickle.loads(new_bytes)]),
                      "bytes": len(new_bytes)}}
    return emit(res, args.out)


if __name__ == "__main__":
    sys.exit(main())
