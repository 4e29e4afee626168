"""The server's engine loop and error paths, in process, over a fake engine (no model, no compile).

The fake engine gives each running request one token per step and records which thread called
it, so these tests check what the real-process tests cannot pin down: the loop blocks when idle,
only the loop thread touches the engine, a closed stream aborts its requests, the queue limit
answers 503, a failing step ends its requests with an error instead of a hang, shutdown fails
what is pending, and a chunked body past the limit gets 413.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from pagedjax.request import CompletionOutput, RequestOutput
from pagedjax.server.app import build_app
from pagedjax.server.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from pagedjax.tokenizer import load_tokenizer
from tests.tiny_tokenizer import make_test_tokenizer

TOKEN = 120  # the fake engine's only output token


class FakeEngine:
    """LLMEngine's interface: add_request / step / abort_request, one token per request per step."""

    def __init__(self, tokenizer, max_model_len: int = 64):
        self.tokenizer = tokenizer
        self.config = SimpleNamespace(max_model_len=max_model_len, max_logprobs=20)
        self.params = SimpleNamespace(config=SimpleNamespace(vocab_size=tokenizer.vocab_size))
        self.requests: dict[str, dict] = {}
        self.pending: list[RequestOutput] = []
        self.aborted: list[str] = []
        self.threads: set[int] = set()
        self.steps = 0
        self.gate = threading.Event()  # steps wait for it
        self.gate.set()
        self.fail_steps = 0  # the next this many steps raise
        self.step_time = 0.0

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, request_id, prompt, params) -> None:
        self._touch()
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + params.max_tokens > self.config.max_model_len:
            raise ValueError(f"request {request_id!r}: prompt + max_tokens exceeds max_model_len")
        self.requests[request_id] = {"prompt": list(prompt), "params": params, "out": 0}

    def abort_request(self, request_ids) -> None:
        self._touch()
        for rid in [request_ids] if isinstance(request_ids, str) else list(request_ids):
            if self.requests.pop(rid, None) is not None:
                self.aborted.append(rid)
                self.pending.append(self._output(rid, [], [], "abort"))

    def has_unfinished_requests(self) -> bool:
        self._touch()
        return bool(self.requests or self.pending)

    def _output(self, rid, prompt, ids, reason) -> RequestOutput:
        text = self.tokenizer.decode(ids)
        return RequestOutput(rid, None, prompt, None, [CompletionOutput(0, text, ids, finish_reason=reason)],
                             finished=reason is not None)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.gate.wait(30)
        time.sleep(self.step_time)
        self.steps += 1
        if self.fail_steps:
            self.fail_steps -= 1
            raise RuntimeError("boom")
        outputs, self.pending = self.pending, []
        for rid, r in list(self.requests.items()):
            r["out"] += 1
            done = r["out"] >= r["params"].max_tokens
            outputs.append(self._output(rid, r["prompt"], [TOKEN], "length" if done else None))
            if done:
                del self.requests[rid]
        return outputs

    def stats(self):
        used = len(self.requests)
        return SimpleNamespace(num_running=used, num_waiting=0, num_free_pages=10 - used, num_usable_pages=10,
                               num_preemptions=0, kv_cache_usage=used / 10)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(make_test_tokenizer(tmp_path_factory.mktemp("tok"), 300))


def _params(max_tokens: int):
    from pagedjax.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(max_tokens=max_tokens, output_kind=RequestOutputKind.DELTA)


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_loop_serves_blocks_when_idle_and_owns_the_engine(tokenizer):
    async def main():
        fake = FakeEngine(tokenizer)
        engine = AsyncEngine(fake)
        engine.start()
        await asyncio.sleep(0.2)
        assert fake.steps == 0  # no work: no steps
        stream = await engine.add("r", [[5, 6], [7]], _params(3))
        outs = [item async for item in stream]
        stream.close()
        assert sorted(i for i, o in outs if o.finished) == [0, 1]
        assert sum(len(o.outputs[0].token_ids) for _, o in outs) == 6
        steps = fake.steps
        await asyncio.sleep(0.3)
        assert fake.steps == steps  # idle again: blocked, not spinning
        engine.shutdown()
        assert fake.threads == {engine._thread.ident}  # only the loop thread called the engine

    asyncio.run(main())


def test_close_aborts_and_bad_input_adds_nothing(tokenizer):
    async def main():
        fake = FakeEngine(tokenizer)
        engine = AsyncEngine(fake)
        engine.start()
        stream = await engine.add("long", [[5]], _params(50))
        await stream.__anext__()
        stream.close()  # what a disconnect does
        await _until(lambda: fake.aborted == ["long-0"] and not fake.has_unfinished_requests())
        with pytest.raises(ValueError, match="max_model_len"):
            await engine.add("bad", [[5], [6] * 100], _params(4))  # the second prompt is too long
        await _until(lambda: not fake.requests)  # the first prompt was rolled back
        assert engine.num_waiting == 0 and engine.num_in_flight == 0
        engine.shutdown()

    asyncio.run(main())


def test_failed_step_ends_requests_with_an_error(tokenizer):
    async def main():
        fake = FakeEngine(tokenizer)
        fake.fail_steps = 1
        engine = AsyncEngine(fake)
        engine.start()
        stream = await engine.add("r", [[5]], _params(3))
        with pytest.raises(RuntimeError, match="engine step failed"):
            async for _ in stream:
                pass
        stream.close()
        assert fake.aborted == ["r-0"] and engine.is_running
        stream = await engine.add("s", [[5]], _params(2))  # the loop goes on
        assert [o.finished for _, o in [item async for item in stream]] == [False, True]
        engine.shutdown()

    asyncio.run(main())


def test_shutdown_fails_what_is_pending(tokenizer):
    async def main():
        fake = FakeEngine(tokenizer)
        fake.step_time = 0.01
        engine = AsyncEngine(fake)
        engine.start()
        stream = await engine.add("r", [[5]], _params(60))
        await stream.__anext__()
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDead):
            async for _ in stream:
                pass
        with pytest.raises(EngineDead):
            await engine.add("late", [[5]], _params(2))

    asyncio.run(main())


def test_queue_limit(tokenizer):
    async def main():
        fake = FakeEngine(tokenizer)
        fake.gate.clear()  # the first step blocks: nothing gets a first token
        engine = AsyncEngine(fake, max_queue=2)
        engine.start()
        a = await engine.add("a", [[5]], _params(2))
        b = asyncio.create_task(engine.add("b", [[5]], _params(2)))  # queued behind the blocked step
        await _until(lambda: engine.num_waiting == 2)
        with pytest.raises(EngineOverloaded):
            await engine.add("c", [[5]], _params(2))
        fake.gate.set()
        for s in (a, await b):
            assert [o.finished async for _, o in s][-1]
            s.close()
        c = await engine.add("c", [[5]], _params(2))  # room again
        c.close()
        engine.shutdown()

    asyncio.run(main())


def _app_client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


def test_app_overload_is_503_and_auth_is_401(tokenizer):
    async def main():
        fake = FakeEngine(tokenizer)
        fake.gate.clear()
        app = build_app(fake, "fake", api_key="key", max_queue=1)
        async with app.router.lifespan_context(app), _app_client(app) as http:
            auth = {"Authorization": "Bearer key"}
            body = {"model": "fake", "prompt": [5, 6], "max_tokens": 2}
            r = await http.post("/v1/completions", json=body)
            assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
            first = asyncio.create_task(http.post("/v1/completions", json=body, headers=auth))
            await _until(lambda: app.state.async_engine.num_waiting == 1)
            r = await http.post("/v1/completions", json=body, headers=auth)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert "overloaded" in r.json()["error"]["message"]
            fake.gate.set()
            r = await first
            assert r.status_code == 200 and r.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 2,
                                                                   "total_tokens": 4}
            assert (await http.get("/health")).status_code == 200

    asyncio.run(main())


def test_app_chunked_body_over_limit_is_413(tokenizer):
    async def main():
        app = build_app(FakeEngine(tokenizer), "fake", max_body_bytes=1000)

        async def chunks():
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"a" * 200
            yield b'"}'

        async with app.router.lifespan_context(app), _app_client(app) as http:
            r = await http.post("/v1/completions", content=chunks())  # no Content-Length
            assert r.status_code == 413 and r.json()["error"]["message"]
            r = await http.post("/v1/completions", json={"prompt": [5], "max_tokens": 1})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"

    asyncio.run(main())
