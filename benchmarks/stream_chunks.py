"""The server's streamed chunks: one step's plain text chunks for N streams (a few characters of
text each), rendered through the pydantic models and by `_TextChunks`' splice, timed in the same
run (ms per step, best of 5 repeats of --calls), for chat and for completions.

  python benchmarks/stream_chunks.py --streams 256 --out chunks.json

With the engine on a thread (the default server) this work shares the engine's GIL; with
`--engine-process` it is the front end's.
"""

from __future__ import annotations

import sys
import time

from common import best_ms, emit, per_stream_args


def main(argv=None) -> int:
    args = per_stream_args(__doc__, argv)

    from pagedjax.server import protocol as P
    from pagedjax.server.serving import _event, _TextChunks

    def chat(rid):
        def render(i, text):
            choice = P.ChatChunkChoice(index=i, delta=P.Delta(content=text))
            return _event(P.ChatCompletionChunk(id=rid, created=1796400000, model="llama3", choices=[choice]))
        return render

    def completion(rid):
        def render(i, text):
            choice = P.CompletionChoice(index=i, text=text)
            return _event(P.CompletionResponse(id=rid, created=1796400000, model="llama3", choices=[choice]))
        return render

    def ms(fn) -> float:
        return best_ms(fn, args.calls)

    res = {"date": time.strftime("%Y-%m-%d"), "streams": args.streams}
    for name, make in (("chat", chat), ("completion", completion)):
        renders = [make(f"chatcmpl-{i:032x}") for i in range(args.streams)]
        splices = [_TextChunks(r) for r in renders]
        res[name] = {"models_ms": ms(lambda renders=renders: [r(0, " word") for r in renders]),
                     "splice_ms": ms(lambda splices=splices: [s(0, " word") for s in splices])}
    return emit(res, args.out)


if __name__ == "__main__":
    sys.exit(main())
