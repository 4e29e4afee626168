"""`pagedjax serve`'s options (no web framework imported: the CLI starts the engine core from them
before it loads the HTTP side)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerOptions:
    """What `pagedjax serve` runs: the model, the HTTP side, and the engine's options."""

    model: str | None = None  # HF folder or .gguf; None: the bundled SmolLM2
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the one taken is printed)
    api_key: str | None = None  # else $PAGEDJAX_API_KEY, else none
    served_model_name: str | None = None
    max_queue: int = 1024  # waiting requests before 503
    dtype: str = "auto"  # weights dtype: "auto" (bfloat16 on GPU, float32 on CPU), or a dtype name
    load_format: str = "auto"  # "dummy": random weights of the model's config (vLLM's --load-format dummy)
    tokenizer: str | None = None  # a HF tokenizer folder or .gguf file; default: the model's
    verbose: bool = False
    tool_call_parser: str | None = None  # hermes, llama3_json, mistral: tool_choice "auto"
    chat_template: str | None = None  # the text of a chat template used over the tokenizer's own
    # vLLM's --generation-config: "auto" (the model folder's generation_config.json recommends the
    # sampling defaults), "vllm" (SamplingParams' own) or a folder holding one
    generation_config: str = "auto"
    # The engine in a process of its own (pagedjax/server/engine_core.py), as vLLM V1 runs it; False:
    # its loop on a thread of this process, sharing the front end's GIL (on the H200 its steps were
    # then 30% slower under load: benchmarks/RESULTS.md, 2026-12-05)
    engine_process: bool = True
    enable_auto_tool_choice: bool = False  # vLLM's flag: accepted, needs tool_call_parser
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig options (reasoning_parser among them)
