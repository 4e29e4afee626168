"""The engine core process (pagedjax/server/engine_core.py) without HTTP: EngineCoreClient against
an engine of the same model built in this process.

A tiny random Llama (`--load-format dummy`, float32) runs in the spawned core. Its streamed greedy
tokens must equal this process's `LLM.generate`; every output carries its request's prompt ids
again (the core sends them once); bad input raises ValueError and nothing is left behind; a stream
closed early aborts its request and the pool's pages all come back; a core that dies fails the open
streams with EngineDead and turns the client unhealthy (an abort then is a no-op); a core whose front
end is gone exits.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pagedjax.api import LLM
from pagedjax.sampling_params import RequestOutputKind, SamplingParams
from pagedjax.server.app import ServerOptions
from pagedjax.server.async_engine import EngineDead
from pagedjax.server.engine_core import EngineCoreClient

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=96, num_pages=24, precompile=False)
OPTIONS = ServerOptions(model="named:tiny-llama", load_format="dummy", dtype="float32", engine=ENGINE)


class Stats:
    """The metrics hooks the client calls; keeps the last pool stats."""

    def __init__(self):
        self.last = None
        self.steps = 0

    def engine_stats(self, stats):
        self.last = stats

    def engine_step(self, finished):
        self.steps += 1

    def first_token(self, *a): pass

    def inter_token(self, *a): pass

    def generated(self, *a): pass

    def e2e_latency(self, *a): pass


@pytest.fixture(scope="module")
def client():
    c = EngineCoreClient(OPTIONS)
    yield c
    c.shutdown()


def _prompts(seed: int, n: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 200, size=int(rng.integers(4, 20))).tolist() for _ in range(n)]


def test_streams_equal_generate_and_bad_input_and_abort(client):
    prompts = _prompts(7, 3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
    local = LLM("named:tiny-llama", load_format="dummy", dtype="float32", **ENGINE)
    want = [o.outputs[0].token_ids for o in local.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0,
                                                                                        ignore_eos=True))]
    stats = Stats()

    async def run():
        client.metrics = stats
        client.start()
        got = []
        for i, p in enumerate(prompts):
            stream = await client.add(f"r{i}", [p], params)
            tokens = []
            try:
                async for _, out in stream:
                    assert out.prompt_token_ids == p  # put back by the client after the first output
                    tokens += out.outputs[0].token_ids
            finally:
                stream.close()
            got.append(tokens)
        with pytest.raises(ValueError, match="prompt token ids"):
            await client.add("bad", [[10**9]], params)
        assert client.is_running
        # A stream closed after its first output aborts its request: every page comes back.
        long = SamplingParams(max_tokens=70, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = await client.add("cut", [prompts[0]], long)
        async for _ in stream:
            break
        stream.close()
        for _ in range(200):
            await asyncio.sleep(0.05)
            if stats.last is not None and stats.last.num_free_pages == stats.last.num_usable_pages \
                    and stats.last.num_running == 0:
                break
        return got

    got = asyncio.run(run())
    assert got == want
    assert stats.steps > 0
    assert stats.last.num_running == 0 and stats.last.num_free_pages == stats.last.num_usable_pages


def test_a_dead_core_fails_open_streams_and_new_requests():
    c = EngineCoreClient(OPTIONS)
    params = SamplingParams(max_tokens=70, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def run():
        c.start()
        stream = await c.add("long", [_prompts(3, 1)[0]], params)
        c._proc.kill()  # the core dies mid-request
        with pytest.raises(EngineDead):
            async for _ in stream:
                pass
        for _ in range(100):
            if not c.is_running:
                break
            await asyncio.sleep(0.05)
        assert not c.is_running
        with pytest.raises(EngineDead):
            await c.add("after", [[1, 2, 3]], params)
        c._send_abort(["long"])  # an abort after the death (a disconnect) is a no-op, not an error

    try:
        asyncio.run(run())
    finally:
        c.shutdown(timeout=5)


def test_the_core_exits_when_the_front_end_is_gone():
    """The front end's end of the pipe closes without a "stop" (a killed front end): the core
    reads EOF, aborts what it holds and exits, rather than live on as an orphan holding the device."""
    c = EngineCoreClient(OPTIONS)
    try:
        c._conn.close()
        c._proc.join(60)
        assert not c._proc.is_alive() and c._proc.exitcode == 0
    finally:
        c.shutdown(timeout=5)



def test_an_option_that_cannot_run_is_one_line_and_exit_2(capfd):
    """An engine option the model cannot run (a ValueError when the engine is built): `pagedjax
    serve`, in either process mode, and `pagedjax generate` print it in one line and exit with 2;
    no traceback, and no server left behind."""
    from pagedjax.cli import main

    args = ["--load-format", "dummy", "--dtype", "float32", "--max-model-len", "100000"]
    for cmd in (["serve", "named:tiny-llama", "--port", "0", *args],
                ["serve", "named:tiny-llama", "--port", "0", "--no-engine-process", *args],
                ["generate", "--model", "named:tiny-llama", "hi", *args]):
        assert main(cmd) == 2, cmd
        err = capfd.readouterr().err  # the core process's too
        assert f"pagedjax {cmd[0]}: max_model_len 100000 exceeds the model's" in err, (cmd, err)
        assert "Traceback" not in err, (cmd, err)


def test_outputs_cross_the_pipe_whole():
    """encode_output / decode_output, through pickle as the pipe does: every field of a request
    with two samples, logprobs, prompt logprobs and metrics comes back equal; a later output sent
    without its prompt gets the one given back."""
    import pickle

    from pagedjax.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from pagedjax.server.engine_core import decode_output, encode_output

    rng = np.random.default_rng(7)
    lps = [{int(t): Logprob(float(rng.normal()), int(r), "x") for r, t in enumerate(rng.integers(0, 99, 3))}
           for _ in range(2)]
    out = RequestOutput(
        request_id="cmpl-1", prompt="a prompt", prompt_token_ids=[5, 6, 7],
        prompt_logprobs=[None, {6: Logprob(-1.5, 2, "b")}, {7: Logprob(-0.25, 1, None)}],
        outputs=[CompletionOutput(0, "hi", [11, 12], -3.5, lps, "stop", "</s>"),
                 CompletionOutput(1, "ho", [13], -1.25, lps[:1], None, None)],
        finished=True, metrics=RequestMetrics(1.0, 2.0, 3.0, 4.0, 5.0), num_cached_tokens=2)
    back = decode_output(pickle.loads(pickle.dumps(encode_output(out))))
    assert back == out and back.outputs[0].logprobs[1] == lps[1]
    later = pickle.loads(pickle.dumps(encode_output(out, with_prompt=False)))
    assert later[1] is None and later[2] is None
    assert decode_output(later, "a prompt", [5, 6, 7]) == out
    assert decode_output(later).prompt_token_ids == []
