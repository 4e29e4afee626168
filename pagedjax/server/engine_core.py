"""The engine in a process of its own (`pagedjax serve --engine-process`), as vLLM V1's engine core.

In one process the HTTP event loop (request parsing, chat templates, tokenization, SSE framing
for every stream) and the engine loop share one GIL, so the front end's work delays the engine's
steps under load. Here the engine core runs in a spawned child process: it loads the model, runs
`engine.step()` whenever there is work and sends each step's RequestOutputs back; the front end
keeps the HTTP side, a copy of the tokenizer and a grammar compiler to validate constraints.

The two talk over a `multiprocessing` pipe (a Unix socket, pickled messages):
  front end -> core: ("add", call_id, [(request_id, prompt)], params), ("abort", ids), ("stop",)
  core -> front end: ("ready", info, tokenizer) once, ("result", call_id, error or None),
                     ("outputs", outputs, stats, stepped) after each step (or batch of commands),
                     ("fail", ids, error) when a step failed, ("dead", error) before it exits.
Outputs travel as plain tuples and lists (`encode_output`), which pickle several times faster than
the dataclasses: at 256 streams that is about a millisecond of the core's step on a CPU core. A
request's prompt and prompt token ids travel in its first output only; the front end puts them
back in the later ones.

`EngineCoreClient` has AsyncEngine's interface (streams, abort on close, overload and health), so
the app serves either one. The core exits when told to stop or when its pipe closes (the front
end is gone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import multiprocessing
import operator
import pickle
import threading
import time
from typing import Any

from pagedjax.request import CompletionOutput, RequestMetrics, RequestOutput
from pagedjax.server.async_engine import _MAX_STEP_FAILURES, AsyncEngine, EngineDead, add_all

logger = logging.getLogger("pagedjax.server")


_completion_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(CompletionOutput)))
_metrics_fields = operator.attrgetter(*(f.name for f in dataclasses.fields(RequestMetrics)))


def encode_output(out: RequestOutput, with_prompt: bool = True) -> tuple:
    """A RequestOutput as tuples and lists for the pipe (without its prompt unless `with_prompt`)."""
    m = out.metrics
    return (out.request_id, out.prompt if with_prompt else None, out.prompt_token_ids if with_prompt else None,
            out.prompt_logprobs, [_completion_fields(c) for c in out.outputs], out.finished,
            None if m is None else _metrics_fields(m), out.num_cached_tokens)


def decode_output(wire: tuple, prompt: str | None = None, prompt_token_ids: list[int] | None = None) -> RequestOutput:
    """`encode_output`'s inverse; a prompt sent once comes back from `prompt` / `prompt_token_ids`."""
    rid, wire_prompt, wire_ids, prompt_logprobs, completions, finished, metrics, num_cached = wire
    if wire_ids is not None:
        prompt, prompt_token_ids = wire_prompt, wire_ids
    return RequestOutput(rid, prompt, prompt_token_ids if prompt_token_ids is not None else [], prompt_logprobs,
                         [CompletionOutput(*c) for c in completions], finished,
                         None if metrics is None else RequestMetrics(*metrics), num_cached)


def _sendable(error: BaseException) -> BaseException:
    """The error itself if it pickles (ValueError: a 400 in the front end), else its text."""
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def spawn_core(options: Any) -> tuple[Any, Any]:
    """Starts the engine core process for ServerOptions `options`: (its pipe, the process). The CLI
    calls it first thing, so that the core loads and compiles while the front end imports its
    web stack; EngineCoreClient(options, core=...) then waits for it."""
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked JAX state
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_core_main, args=(child, options, logging.getLogger().level),
                       name="pagedjax-engine-core", daemon=True)
    proc.start()
    child.close()
    return conn, proc


class EngineCoreClient(AsyncEngine):
    """AsyncEngine's interface over an engine core process built from ServerOptions `options`.

    The constructor starts the process (or takes one `spawn_core` started) and waits until the
    model is loaded and compiled (raising its error if that failed); `start()` (on the event
    loop) begins reading its outputs.
    """

    def __init__(self, options: Any, *, max_queue: int = 1024, metrics: Any = None,
                 core: tuple[Any, Any] | None = None):
        super().__init__(None, max_queue=max_queue, metrics=metrics)
        self._conn, self._proc = core or spawn_core(options)
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine core process exited with {self._proc.exitcode} before it was ready")
        if message[0] != "ready":
            self._proc.join(5)
            raise message[1]
        _, self.info, tokenizer = message
        self._tokenizer = tokenizer
        self._structured = None
        self._send_lock = threading.Lock()
        self._calls: dict[int, asyncio.Future] = {}
        self._next_call = 0
        self._prompts: dict[str, tuple[Any, list[int]]] = {}  # request id -> (prompt, token ids), reader side
        self._reader: threading.Thread | None = None

    # -- what the app reads (AsyncEngine's come from the engine object) --------------------------

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    @property
    def max_model_len(self) -> int:
        return self.info["max_model_len"]

    @property
    def max_logprobs(self) -> int:
        return self.info["max_logprobs"]

    @property
    def reasoning_parser(self) -> str | None:
        return self.info["reasoning_parser"]

    @property
    def structured(self) -> Any:
        """A grammar compiler of the front end's own: it validates constraints before they are
        sent (the core compiles them again, from its cache after the first time)."""
        if self._structured is None:
            from pagedjax.structured_outputs.manager import CompileLimits, StructuredOutputManager

            self._structured = StructuredOutputManager(
                self._tokenizer, self.vocab_size, reasoning_parser=self.reasoning_parser,
                enable_in_reasoning=self.info["enable_in_reasoning"],
                limits=CompileLimits(time_limit_s=self.info["grammar_compile_timeout"]))
        return self._structured

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="pagedjax-engine-core-reader", daemon=True)
        self._reader.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping = True
        try:
            self._send(("stop",))
        except EngineDead:
            pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        if self._reader is not None:
            self._reader.join(timeout)
        self._conn.close()

    @property
    def is_running(self) -> bool:
        return (self._proc.is_alive() and self.error is None and not self._stopping
                and self._reader is not None and self._reader.is_alive())

    # -- requests --------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as e:  # a closed or broken pipe: the core is gone
            raise EngineDead(f"the engine core process is gone: {e!r}") from None

    def _send_add(self, requests: list[tuple[str, str | list[int]]], params: Any) -> asyncio.Future:
        future = self._loop.create_future()
        call, self._next_call = self._next_call, self._next_call + 1
        self._calls[call] = future
        try:
            self._send(("add", call, requests, params))
        except EngineDead as e:
            del self._calls[call]
            future.set_exception(e)
        return future

    def _send_abort(self, request_ids: list[str]) -> None:
        try:
            self._send(("abort", request_ids))
        except EngineDead:
            # The core died with its requests: the reader fails their streams (EngineDead), so
            # there is nothing left to abort (tests/test_engine_core.py, the dead-core test).
            return

    # -- the reader thread -----------------------------------------------------------------------

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "outputs":
                    self._outputs(*message[1:])
                elif kind == "result":
                    self._post(self._settle, message[1], message[2])
                elif kind == "fail":
                    self._post(self._fail, message[1], message[2])
                elif kind == "dead":
                    error = message[1]
                    break
        except (EOFError, OSError) as e:
            if not self._stopping:
                error = RuntimeError(f"the engine core process ended (exit code {self._proc.exitcode}): {e!r}")
        if error is not None:
            self.error = error
            logger.error("the engine core stopped: %r", error)
        dead = EngineDead(f"the engine loop stopped: {error!r}" if error else "the server is shutting down")
        self._post(self._fail_all, dead)

    def _outputs(self, wires: list, stats: Any, stepped: bool) -> None:
        now = time.monotonic()
        outputs = []
        for wire in wires:
            rid = wire[0]
            if wire[2] is None:  # sent with an earlier output
                out = decode_output(wire, *self._prompts.get(rid, (None, [])))
            else:
                out = decode_output(wire)
                self._prompts[rid] = (out.prompt, out.prompt_token_ids)
            if out.finished:
                self._prompts.pop(rid, None)
            outputs.append(out)
        if self.metrics is not None:  # as AsyncEngine's loop counts them (aborted requests' final outputs too)
            if stepped:
                self.metrics.engine_step([o for o in outputs if o.finished])
            self.metrics.engine_stats(stats)
        if outputs:
            self._post(self._deliver, outputs, now)

    def _settle(self, call: int, error: BaseException | None) -> None:
        future = self._calls.pop(call, None)
        if future is None or future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(None)

    def _fail_all(self, error: BaseException) -> None:
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(error)
        self._fail(list(self._streams), error)


# -- the core process --------------------------------------------------------------------------

def engine_info(engine: Any, startup_seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """What the front end needs of a built LLMEngine (and what `pagedjax serve` prints, with where
    its start-up went: `LLM.startup_seconds`)."""
    cfg = engine.config
    quant = engine.params.config.quantization
    return {"startup_seconds": dict(startup_seconds or {}),
            "vocab_size": engine.params.config.vocab_size, "max_model_len": cfg.max_model_len,
            "max_logprobs": cfg.max_logprobs, "reasoning_parser": cfg.reasoning_parser,
            "enable_in_reasoning": cfg.enable_in_reasoning,
            "grammar_compile_timeout": cfg.grammar_compile_timeout,
            "num_pages": engine.runner.num_pages, "kv_dtype": engine.runner.kv_dtype.name,
            "weights": quant.name if quant else engine.params.dtype.name}


def _core_main(conn, options: Any, log_level: int) -> None:
    """The child process: load the engine as `pagedjax serve` does, report ready, then serve."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front end stops us
    logging.basicConfig(level=log_level or logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s [engine core]: %(message)s")
    try:
        from pagedjax.api import LLM, resolve_dtype

        llm = LLM(options.model, dtype=resolve_dtype(options.dtype), load_format=options.load_format,
                  tokenizer=options.tokenizer, **options.engine)
        engine = llm.engine
        conn.send(("ready", engine_info(engine, llm.startup_seconds), engine.tokenizer))
    except ValueError as e:  # a model or option that cannot run: the front end says it
        conn.send(("error", _sendable(e)))
        return
    except BaseException as e:
        logging.getLogger("pagedjax.server").exception("the engine core failed to start")
        conn.send(("error", _sendable(e)))
        return
    _Core(engine, conn).run()


class _Core:
    """The engine loop of the core process: commands from the pipe between steps."""

    def __init__(self, engine: Any, conn: Any):
        self.engine = engine
        self.conn = conn
        self.live: set[str] = set()  # request ids added and not finished
        self.sent_prompt: set[str] = set()  # request ids whose first output went out
        self.stopping = False

    def run(self) -> None:
        failures = 0
        try:
            while not self.stopping:
                handled = False
                if not self.engine.has_unfinished_requests():
                    self._handle(self.conn.recv())  # idle: block until there is something to do
                    handled = True
                while not self.stopping and self.conn.poll():
                    self._handle(self.conn.recv())
                    handled = True
                if self.stopping:
                    break
                outputs, stepped = [], self.engine.has_unfinished_requests()
                if stepped:
                    ok, outputs = self._step()
                    failures = 0 if ok else failures + 1
                    if failures >= _MAX_STEP_FAILURES:
                        raise RuntimeError(f"{failures} engine steps failed in a row")
                elif not handled:
                    continue
                self.conn.send(("outputs", self._encode(outputs), self.engine.stats(), stepped))
        except EOFError:
            # The front end is gone without a "stop" (killed): no one reads outputs any more, so the
            # core aborts its requests (below) and exits (tests/test_engine_core.py).
            pass
        except BaseException as e:
            logging.getLogger("pagedjax.server").exception("the engine loop stopped")
            try:
                self.conn.send(("dead", _sendable(e)))
            except Exception:  # the pipe broke too: the front end sees EOF and fails the streams itself
                logging.getLogger("pagedjax.server").debug("could not report the engine's death", exc_info=True)
        finally:
            try:  # the pages back before the process ends (an engine in a bad state may refuse)
                self.engine.abort_request(sorted(self.live))
            except Exception:
                logging.getLogger("pagedjax.server").warning("aborting the core's requests failed", exc_info=True)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, call, requests, params = message
            try:
                self.live.update(add_all(self.engine, requests, params))
                self.conn.send(("result", call, None))
            except Exception as e:
                self.conn.send(("result", call, _sendable(e)))
        elif kind == "abort":
            self.engine.abort_request(message[1])
            self.live.difference_update(message[1])
        elif kind == "stop":
            self.stopping = True


    def _step(self) -> tuple[bool, list]:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logging.getLogger("pagedjax.server").exception("engine step failed; aborting the requests in flight")
            ids = sorted(self.live)
            self.live.clear()
            try:
                self.engine.abort_request(ids)
            except Exception:
                logging.getLogger("pagedjax.server").exception("abort after a failed step failed too")
            self.conn.send(("fail", ids, RuntimeError(f"engine step failed: {e!r}")))
            return False, []
        self.live.difference_update(o.request_id for o in outputs if o.finished)
        return True, outputs

    def _encode(self, outputs: list) -> list:
        """The outputs for the pipe; each request's prompt and prompt ids go with its first one only."""
        sent = self.sent_prompt
        wires = []
        for out in outputs:
            rid = out.request_id
            first = rid not in sent
            if first:
                sent.add(rid)
            if out.finished:
                sent.discard(rid)
            wires.append(encode_output(out, with_prompt=first))
        return wires
