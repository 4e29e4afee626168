"""Reasoning parsers: `reasoning_content` apart from `content`, and where a constraint may start."""

from pagedjax.reasoning.parsers import DeepSeekR1ReasoningParser, Qwen3ReasoningParser, ReasoningParser
from pagedjax.reasoning.tracker import Phase, ReasoningTracker

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    p.name: p for p in (DeepSeekR1ReasoningParser, Qwen3ReasoningParser)
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as `name` (`--reasoning-parser`)."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; known: {', '.join(sorted(REASONING_PARSERS))}.") \
            from None


__all__ = ["REASONING_PARSERS", "Phase", "ReasoningParser", "ReasoningTracker", "get_reasoning_parser"]
