"""The OpenAI-compatible HTTP server (`pagedjax serve`): FastAPI + uvicorn over one engine loop.

protocol.py      OpenAI's request/response schemas (strict: unknown fields are 400s)
async_engine.py  the engine loop thread; add/abort marshalled to it; per-request streams
serving.py       completions and chat completions: SamplingParams in, JSON or SSE out
metrics.py       Prometheus metrics (GET /metrics)
engine_core.py   the engine in a process of its own (the default) and its client, AsyncEngine's interface
options.py       ServerOptions (what `pagedjax serve` runs)
app.py           the FastAPI app (`build_app`), errors, API key, body limit; `run_server`
"""
