"""One engine loop for every HTTP request.

The engine is not thread-safe, so exactly one thread (the loop) calls it. HTTP handlers, on the
asyncio event loop, talk to it through a command queue: `add` and `abort` are closures that the
loop runs between steps. The loop steps while any request is unfinished, blocks on a condition
variable when there is no work (it never spins), and hands each step's RequestOutputs back to the
event loop in one `call_soon_threadsafe`, where they go to their HTTP request's `RequestStream`.

A stream that is closed before it finished (a client that disconnected, a cancelled handler)
aborts its engine requests, which gives their pages back to the pool at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from pagedjax.request import RequestOutput
from pagedjax.sampling_params import SamplingParams

logger = logging.getLogger("pagedjax.server")

_MAX_STEP_FAILURES = 3  # consecutive failed steps before the loop gives up (health turns 503)


def add_all(engine: Any, requests: Sequence[tuple[str, str | list[int]]], params: SamplingParams) -> list[str]:
    """Adds every (request id, prompt) to `engine`, or none of them (a bad one aborts those
    already added and raises); returns the ids added."""
    added = []
    try:
        for rid, prompt in requests:
            engine.add_request(rid, prompt, params)
            added.append(rid)
    except Exception:
        engine.abort_request(added)
        raise
    return added


class EngineOverloaded(Exception):
    """Too many requests are waiting: the client should retry later (HTTP 503)."""


class EngineDead(RuntimeError):
    """The engine loop has stopped; no request can be served (HTTP 503)."""


class RequestStream:
    """The outputs of one HTTP request's engine requests (one per prompt): `(prompt_index, output)`.

    Iterate it until it stops (every engine request finished); `close()` it in a `finally`:
    closing an unfinished stream aborts what is left.
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str]):
        self._engine = engine
        self.request_ids = request_ids
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self.unfinished = set(request_ids)  # engine requests without a final output yet
        self.waiting = set(request_ids)  # engine requests without any output yet
        self.arrival = time.monotonic()
        self.last_token_time: dict[str, float] = {}
        self.added = False
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[int, RequestOutput]:
        if not self.unfinished and self.queue.empty():
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Unregisters the stream; aborts its engine requests that have not finished (idempotent)."""
        self._engine._close(self)


class AsyncEngine:
    """Runs `engine.step()` on a thread of its own; HTTP handlers `add` requests and read streams."""

    def __init__(self, engine: Any, *, max_queue: int = 1024, metrics: Any = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics
        self.error: BaseException | None = None  # why the loop stopped, if it did
        self._cv = threading.Condition()
        self._commands: list[Callable[[], None]] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Event-loop side: engine request id -> its stream; requests without a first output.
        self._streams: dict[str, RequestStream] = {}
        self.num_waiting = 0
        # Loop side: engine request ids added and not yet finished.
        self._live: set[str] = set()

    # -- lifecycle (event loop) ----------------------------------------------------------------

    def start(self) -> None:
        """Starts the loop thread; call from the event loop that will read the streams."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="pagedjax-engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the loop thread (aborting whatever is left) and waits for it."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    # -- what the app reads of the engine ----------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.params.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    @property
    def max_logprobs(self) -> int:
        return self.engine.config.max_logprobs

    @property
    def reasoning_parser(self) -> str | None:
        return getattr(self.engine.config, "reasoning_parser", None)

    @property
    def structured(self) -> Any:
        """The engine's grammar compiler (constraints are validated with it), if it has one."""
        return getattr(self.engine, "structured", None)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # -- requests (event loop) -----------------------------------------------------------------

    async def add(self, request_id: str, prompts: Sequence[str | list[int]],
                  params: SamplingParams) -> RequestStream:
        """Adds one engine request per prompt ("{request_id}-{i}"); returns their stream.

        Raises ValueError (bad input: nothing was added), EngineOverloaded or EngineDead.
        """
        if not self.is_running:
            raise EngineDead("the engine loop is not running")
        if self.num_waiting + len(prompts) > self.max_queue:
            raise EngineOverloaded(f"the server is overloaded: {self.num_waiting} requests are "
                                   f"waiting (limit {self.max_queue}); retry later")
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        stream = RequestStream(self, ids)
        for rid in ids:  # registered first: outputs may arrive before the add is confirmed
            self._streams[rid] = stream
        self.num_waiting += len(ids)
        try:
            await self._send_add(list(zip(ids, prompts)), params)
        except BaseException:
            stream.close()
            raise
        stream.added = True
        return stream

    def _close(self, stream: RequestStream) -> None:
        if stream.closed:
            return
        stream.closed = True
        left = [rid for rid in stream.request_ids if self._streams.get(rid) is stream]
        for rid in left:
            del self._streams[rid]
        self.num_waiting -= len(stream.waiting)
        stream.waiting.clear()
        if left:
            self._send_abort(left)

    def _deliver(self, outputs: list[RequestOutput], now: float) -> None:
        """On the event loop: each output to its stream (outputs of closed streams are dropped)."""
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            rid = out.request_id
            if rid in stream.waiting:
                stream.waiting.discard(rid)
                self.num_waiting -= 1
            if self.metrics is not None:
                self._observe(stream, out, now)
            if out.finished:
                stream.unfinished.discard(rid)
                del self._streams[rid]
            stream.queue.put_nowait((stream.index[rid], out))

    def _observe(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        rid = out.request_id
        if new_tokens:
            last = stream.last_token_time.get(rid)
            if last is None:
                self.metrics.first_token(now - stream.arrival, len(out.prompt_token_ids))
            else:  # an output of k tokens a sample (stream_interval): k gaps of a k-th of the wait
                k = max(len(c.token_ids) for c in out.outputs)
                for _ in range(k):
                    self.metrics.inter_token((now - last) / k)
            stream.last_token_time[rid] = now
            self.metrics.generated(new_tokens, now)
        if out.finished:
            self.metrics.e2e_latency(now - stream.arrival)

    def _fail(self, request_ids: list[str], error: BaseException) -> None:
        """On the event loop: ends these requests' streams with `error`."""
        for rid in request_ids:
            stream = self._streams.pop(rid, None)
            if stream is None:
                continue
            stream.unfinished.discard(rid)
            if rid in stream.waiting:
                stream.waiting.discard(rid)
                self.num_waiting -= 1
            stream.queue.put_nowait(error)

    # -- crossing threads (EngineCoreClient crosses processes instead) --------------------------

    def _send_add(self, requests: list[tuple[str, str | list[int]]], params: SamplingParams) -> asyncio.Future:
        """Adds the requests on the loop thread (all or nothing); the outcome in a future."""
        return self._call(self._add_all, requests, params)

    def _send_abort(self, request_ids: list[str]) -> None:
        self._submit(lambda: self._abort(request_ids))

    def _submit(self, command: Callable[[], None]) -> bool:
        """Queues a command for the loop thread; False if the loop has stopped (it never runs)."""
        with self._cv:
            if self._stopping:
                return False
            self._commands.append(command)
            self._cv.notify()
            return True

    def _call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Runs fn(*args) on the loop thread; its result (or exception) in an asyncio future."""
        loop = self._loop
        future = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.cancelled():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def command() -> None:
            try:
                result, error = fn(*args), None
            except Exception as e:
                result, error = None, e
            self._post(settle, result, error)

        command.future = future  # failed by the loop if it stops before running the command
        if not self._submit(command):
            future.set_exception(EngineDead("the engine loop is not running"))
        return future

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        """Runs fn(*args) on the event loop (from the loop thread)."""
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # -- the loop thread -----------------------------------------------------------------------

    def _add_all(self, requests: list[tuple[str, str | list[int]]], params: SamplingParams) -> None:
        self._live.update(add_all(self.engine, requests, params))

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)
        self._live.difference_update(request_ids)

    def _run(self) -> None:
        failures = 0
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                        self._cv.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                for command in commands:
                    command()
                if self.engine.has_unfinished_requests():
                    failures = 0 if self._step() else failures + 1
                    if failures >= _MAX_STEP_FAILURES:
                        raise RuntimeError(f"{failures} engine steps failed in a row")
                if self.metrics is not None:
                    self.metrics.engine_stats(self.engine.stats())
        except BaseException as e:
            self.error = e
            logger.exception("the engine loop stopped")
        finally:
            self._stop_all()

    def _step(self) -> bool:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; aborting the requests in flight")
            ids = sorted(self._live)
            self._live.clear()
            try:
                self.engine.abort_request(ids)
            except Exception:
                logger.exception("abort after a failed step failed too")
            self._post(self._fail, ids, RuntimeError(f"engine step failed: {e!r}"))
            return False
        now = time.monotonic()
        self._live.difference_update(o.request_id for o in outputs if o.finished)
        if self.metrics is not None:  # counted here, where aborted requests' final outputs still pass
            self.metrics.engine_step([o for o in outputs if o.finished])
        if outputs:
            self._post(self._deliver, outputs, now)
        return True

    def _stop_all(self) -> None:
        """The loop is ending: fail every pending command and every stream; abort everything."""
        error = EngineDead(f"the engine loop stopped: {self.error!r}" if self.error else
                           "the server is shutting down")
        with self._cv:
            commands, self._commands = self._commands, []
            self._stopping = True
        for command in commands:
            future = getattr(command, "future", None)
            if future is not None:
                self._post(lambda f=future: f.cancelled() or f.done() or f.set_exception(error))
        ids = sorted(self._live)
        self._live.clear()
        try:
            self.engine.abort_request(ids)
        except Exception:
            pass
        self._post(lambda: self._fail(list(self._streams), error))
