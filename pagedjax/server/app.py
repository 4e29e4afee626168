"""The FastAPI app: OpenAI's routes, errors in OpenAI's shape, the API key, a body size limit.

`build_app(engine, served_model_name)` wraps an `LLMEngine` (whose loop starts with the app);
`run_server(ServerOptions(...))` loads a model and serves it with uvicorn (`pagedjax serve`).

Status codes: 400 for any invalid input (schema, values, what the engine rejects), 401 for a
missing or wrong API key, 404 for an unknown model or route, 413 for a body over the limit,
503 when too many requests wait (with Retry-After) or the engine loop has stopped.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import sys
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from pagedjax.bundled import BUNDLED_MODEL_NAME
from pagedjax.server import protocol as P
from pagedjax.server.async_engine import AsyncEngine, EngineDead, EngineOverloaded
from pagedjax.server.engine_core import EngineCoreClient, engine_info
from pagedjax.server.metrics import ServerMetrics
from pagedjax.server.options import ServerOptions
from pagedjax.server.serving import APIError, ClientDisconnected, OpenAIServing, bad_request

logger = logging.getLogger("pagedjax.server")

MAX_BODY_BYTES = 4 << 20


def _error(status: int, message: str, type: str, param: str | None = None, code: Any = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": status if code is None else code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(e: ValidationError | RequestValidationError) -> APIError:
    """Pydantic's first complaint as a 400: `field.path: what is wrong`."""
    errors = e.errors(include_url=False, include_input=False) if isinstance(e, ValidationError) else e.errors()
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first["type"] == "json_invalid":
        return bad_request(f"the body is not valid JSON: {first['msg']}")
    message = f"{'.'.join(loc)}: {first['msg']}" if loc else first["msg"]
    if len(errors) > 1:
        message += f" ({len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return bad_request(message, loc[0] if loc else None)


def build_app(engine: Any, served_model_name: str, api_key: str | None = None, max_queue: int = 1024, *,
              max_body_bytes: int = MAX_BODY_BYTES, max_n: int = 16, model_root: str | None = None,
              tool_call_parser: str | None = None, chat_template: str | None = None,
              default_sampling: dict[str, Any] | None = None) -> FastAPI:
    """The OpenAI-compatible app over `engine`: an LLMEngine, whose loop then runs on a thread of
    this process, or an EngineCoreClient (the engine in a process of its own); either runs while
    the app does.

    `tool_call_parser` (hermes, llama3_json, mistral) parses tool calls for tool_choice "auto";
    `chat_template` (its text) renders chats in place of the tokenizer's own template;
    `default_sampling` ({SamplingParams field: value}, generation_config.sampling_defaults) fills
    the sampling fields a request leaves out (max_tokens: a bound on every request's);
    the engine's reasoning parser, if any, fills chat responses' reasoning_content.
    """
    metrics = ServerMetrics()
    if isinstance(engine, EngineCoreClient):
        async_engine = engine
        async_engine.max_queue, async_engine.metrics = max_queue, metrics
    else:
        async_engine = AsyncEngine(engine, max_queue=max_queue, metrics=metrics)
    e = async_engine
    serving = OpenAIServing(e, model_name=served_model_name, tokenizer=e.tokenizer, vocab_size=e.vocab_size,
                            max_model_len=e.max_model_len, max_logprobs=e.max_logprobs, max_n=max_n,
                            tool_call_parser=tool_call_parser, reasoning_parser=e.reasoning_parser,
                            chat_template=chat_template, default_sampling=default_sampling)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    from pagedjax import __version__

    app = FastAPI(title="pagedjax", version=__version__, lifespan=lifespan)
    app.state.async_engine, app.state.metrics, app.state.serving = async_engine, metrics, serving

    # -- errors --------------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        return await _api_error(request, _validation_error(e))

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, e: EngineOverloaded):
        return _error(503, str(e), "ServiceUnavailableError", headers={"Retry-After": "1"})

    @app.exception_handler(EngineDead)
    async def _dead(request: Request, e: EngineDead):
        return _error(503, str(e), "ServiceUnavailableError")

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, e: ClientDisconnected):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), "NotFoundError" if e.status_code == 404 else "BadRequestError",
                      headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error(500, f"internal server error: {type(e).__name__}", "InternalServerError")

    # -- helpers -------------------------------------------------------------------------------

    async def read_json(request: Request, model: type[BaseModel]) -> Any:
        """The body as `model`: 413 past the size limit, 400 for anything malformed."""
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise bad_request("invalid Content-Length header")
            if int(length) > max_body_bytes:
                raise APIError(413, f"the request body is {int(length)} bytes, the limit is {max_body_bytes}",
                               type="RequestTooLargeError")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(413, f"the request body exceeds the limit of {max_body_bytes} bytes",
                               type="RequestTooLargeError")
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            raise _validation_error(e) from None

    async def check_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or invalid API key (send `Authorization: Bearer <key>`)",
                           type="AuthenticationError", code="invalid_api_key")

    # -- routes --------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            return _error(503, f"the engine loop is not running: {async_engine.error!r}", "ServiceUnavailableError")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    api = APIRouter(dependencies=[Depends(check_api_key)])

    @api.get("/v1/models")
    async def models() -> Response:
        card = P.ModelCard(id=served_model_name, root=model_root, max_model_len=async_engine.max_model_len)
        return Response(P.ModelList(data=[card]).model_dump_json(), media_type="application/json")

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serving.completions(await read_json(request, P.CompletionRequest), request)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serving.chat(await read_json(request, P.ChatCompletionRequest), request)

    @api.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return await serving.tokenize(await read_json(request, P.TokenizeRequest))

    @api.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return await serving.detokenize(await read_json(request, P.DetokenizeRequest))

    app.include_router(api)
    return app


def startup_phases(seconds: dict[str, float]) -> str:
    """`LLM.startup_seconds` as the serving line prints it: "weights 6.1 s, tokenizer 0.2 s, ..."."""
    return ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) or "not reported"


def run_server(options: ServerOptions, core: Any = None) -> int:
    """`pagedjax serve`: loads the model, builds the engine (compiling its steps), serves until stopped.
    `core`: the engine core process already started for these options (`engine_core.spawn_core`)."""
    import socket

    import uvicorn

    from pagedjax.api import LLM, resolve_dtype

    o = options
    if o.enable_auto_tool_choice and o.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json or mistral)")
    if o.tool_call_parser is not None:
        from pagedjax.tool_parsers import get_tool_parser

        get_tool_parser(o.tool_call_parser)  # an unknown name fails before the model loads
    from pagedjax.generation_config import sampling_defaults

    default_sampling = sampling_defaults(o.model, o.generation_config)  # a bad value fails here too
    try:  # a model or an option that cannot run (a ValueError naming it): said in one line, exit 2
        if o.engine_process:  # loaded there: this process never touches the accelerator
            engine = EngineCoreClient(o, core=core)
            info = engine.info
        else:
            llm = LLM(o.model, dtype=resolve_dtype(o.dtype), load_format=o.load_format, tokenizer=o.tokenizer,
                      **o.engine)  # loads as LLM does (TP shards included)
            engine = llm.engine
            info = engine_info(engine, llm.startup_seconds)
    except ValueError as e:
        print(f"pagedjax serve: {e}", file=sys.stderr)
        return 2
    if o.engine_process:
        import jax

        jax.config.update("jax_platforms", "cpu")  # should anything here init JAX, not on the core's GPU
    name = o.served_model_name or o.model or BUNDLED_MODEL_NAME
    api_key = o.api_key or os.environ.get("PAGEDJAX_API_KEY") or None
    app = build_app(engine, name, api_key=api_key, max_queue=o.max_queue,
                    model_root=str(o.model) if o.model else BUNDLED_MODEL_NAME, tool_call_parser=o.tool_call_parser,
                    chat_template=o.chat_template, default_sampling=default_sampling)
    config = uvicorn.Config(app, log_level="info" if o.verbose else "warning", access_log=o.verbose,
                            timeout_keep_alive=30, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # Bound here, so that port 0 takes a free port with no race and the real one can be printed.
    family = socket.AF_INET6 if ":" in o.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((o.host, o.port))
    port = sock.getsockname()[1]
    print(f"[pagedjax] serving {name!r} on http://{o.host}:{port} "
          f"(max_model_len {info['max_model_len']}, {info['num_pages'] - 1} KV pages of {info['kv_dtype']}, "
          f"weights {info['weights']}{', engine in its own process' if o.engine_process else ''}; "
          f"{'default sampling ' + str(default_sampling) + ' from the generation config; ' if default_sampling else ''}"
          f"start-up: {startup_phases(info['startup_seconds'])})", file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0 if server.started else 1
