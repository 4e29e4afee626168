"""Structured outputs: constraints (JSON schema, regex, choice, grammar) as per-token bitmasks.

Host side (this package): `StructuredOutputsParams` from the request shapes, a `GrammarCompiler`
on llguidance bound to one tokenizer, a `GrammarMatcher` per sequence, forced tool-call grammars,
and the engine's `StructuredOutputManager` (per-sample matchers, the step's bitmask).
Device side: `pagedjax.structured_outputs.bitmask.apply_token_bitmask` (needs jax; nothing else
here does).

Names are imported on first use, so `pagedjax.structured_outputs.params` and `.bitmask` load
without llguidance or the tokenizer (the sampler and SamplingParams import them).
"""

import importlib

_EXPORTS = {
    "CompileLimits": "backend", "CompiledGrammar": "backend", "GrammarCompiler": "backend",
    "to_llguidance_grammar": "backend",
    "GrammarMatcher": "matcher",
    "StructuredOutputManager": "manager",
    "KINDS": "params", "StructuredOutputsParams": "params",
    "from_response_format": "request", "from_structured_outputs": "request",
    "structured_outputs_from_request": "request",
    "ForcedToolCallParser": "tools", "forced_function_name": "tools", "forced_tool_calls": "tools",
    "function_specs": "tools", "tool_choice_structured_outputs": "tools",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
