"""Structured outputs: constraints (JSON schema, regex, choice, grammar) as per-token bitmasks.

Host side (this package): `StructuredOutputsParams` from the request shapes, a `GrammarCompiler`
on llguidance bound to one tokenizer, a `GrammarMatcher` per sequence, forced tool-call grammars.
Device side: `pagedjax.structured_outputs.bitmask.apply_token_bitmask` (imported on its own: it
needs jax, this package does not).
"""

from pagedjax.structured_outputs.backend import CompiledGrammar, CompileLimits, GrammarCompiler, to_llguidance_grammar
from pagedjax.structured_outputs.matcher import GrammarMatcher
from pagedjax.structured_outputs.params import KINDS, StructuredOutputsParams
from pagedjax.structured_outputs.request import (
    from_response_format,
    from_structured_outputs,
    structured_outputs_from_request,
)
from pagedjax.structured_outputs.tools import (
    ForcedToolCallParser,
    forced_function_name,
    forced_tool_calls,
    function_specs,
    tool_choice_structured_outputs,
)

__all__ = [
    "KINDS", "CompileLimits", "CompiledGrammar", "ForcedToolCallParser", "GrammarCompiler", "GrammarMatcher",
    "StructuredOutputsParams", "forced_function_name", "forced_tool_calls", "from_response_format",
    "from_structured_outputs", "function_specs", "structured_outputs_from_request",
    "to_llguidance_grammar", "tool_choice_structured_outputs",
]
