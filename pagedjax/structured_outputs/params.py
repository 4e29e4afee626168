"""What a request constrains its output to (vLLM's `StructuredOutputsParams`); host only, no jax.

Exactly one kind per request:
  json            a JSON schema (dict, or its text)
  regex           a regular expression (Rust `regex` syntax, as llguidance reads it), matched in full
  choice          one of a list of strings
  grammar         a context-free grammar: llguidance's Lark dialect, or GBNF (llama.cpp's `::=`
                  EBNF, the form vLLM's xgrammar backend documents), converted to Lark
  json_object     any JSON object
  structural_tag  vLLM's {"structures": [{"begin", "schema", "end"}], "triggers": [...]}: free text
                  in which each trigger starts a tagged JSON segment
Options (JSON kinds only): disable_any_whitespace, disable_additional_properties, whitespace_pattern.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One request's output constraint; exactly one of the kinds is set (a ValueError otherwise)."""

    json: dict | str | None = None  # a JSON schema (an object); text is parsed here
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: dict | str | None = None
    disable_any_whitespace: bool = False  # JSON without optional whitespace
    disable_additional_properties: bool = False  # objects with `properties` get additionalProperties: false
    whitespace_pattern: str | None = None  # the regex optional JSON whitespace must match
    key: str = field(init=False, repr=False, compare=False)  # canonical text: the compile cache key

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            object.__setattr__(self, "json", _load_json("json", self.json))
        if isinstance(self.structural_tag, str):
            object.__setattr__(self, "structural_tag", _load_json("structural_tag", self.structural_tag))
        if self.choice is not None:
            object.__setattr__(self, "choice", list(self.choice) if isinstance(self.choice, (list, tuple))
                               else self.choice)
        given = [k for k in KINDS if self._is_set(k)]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(f"structured outputs need exactly one of {', '.join(KINDS)}; got {what}.")
        self._verify(given[0])
        options = (self.disable_any_whitespace, self.disable_additional_properties, self.whitespace_pattern)
        spec = {"kind": self.kind, "spec": getattr(self, self.kind), "options": options}
        object.__setattr__(self, "key", json.dumps(spec, sort_keys=True, ensure_ascii=False))

    def __hash__(self) -> int:  # the fields hold dicts and lists: hash the canonical text
        return hash(self.key)

    def _is_set(self, kind: str) -> bool:
        value = getattr(self, kind)
        return bool(value) if kind == "json_object" else value is not None

    @property
    def kind(self) -> str:
        """Which constraint this is: one of KINDS."""
        return next(k for k in KINDS if self._is_set(k))

    def _verify(self, kind: str) -> None:
        value = getattr(self, kind)
        if kind == "json" and not isinstance(value, dict):
            raise ValueError(f"json must be a JSON schema (an object, or its text), got {type(value).__name__}.")
        if kind in ("regex", "grammar") and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{kind} must be a non-empty string, got {value!r}.")
        if kind == "choice":
            if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
                raise ValueError(f"choice must be a non-empty list of strings, got {value!r}.")
        if kind == "json_object" and value is not True:
            raise ValueError(f"json_object must be true, got {value!r}.")
        if kind == "structural_tag":
            _verify_structural_tag(value)
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean, got {getattr(self, name)!r}.")
        if self.whitespace_pattern is not None:
            if not isinstance(self.whitespace_pattern, str) or not self.whitespace_pattern:
                raise ValueError(f"whitespace_pattern must be a non-empty string, got {self.whitespace_pattern!r}.")
            if kind not in ("json", "json_object", "structural_tag"):
                raise ValueError(f"whitespace_pattern applies to JSON constraints only, not to {kind}.")
            if self.disable_any_whitespace:
                raise ValueError("whitespace_pattern and disable_any_whitespace contradict each other.")


def _load_json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from None


def _verify_structural_tag(tag: Any) -> None:
    if not isinstance(tag, dict):
        raise ValueError(f"structural_tag must be an object, got {type(tag).__name__}.")
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not isinstance(triggers, list) or not triggers or not all(isinstance(t, str) and t for t in triggers):
        raise ValueError("structural_tag.triggers must be a non-empty list of non-empty strings.")
    if not isinstance(structures, list) or not structures:
        raise ValueError("structural_tag.structures must be a non-empty list.")
    for i, s in enumerate(structures):
        if not isinstance(s, dict) or not isinstance(s.get("begin"), str) or not isinstance(s.get("end"), str) \
                or "schema" not in s:
            raise ValueError(f"structural_tag.structures[{i}] must have a string begin and end, and a schema.")
        if not any(s["begin"].startswith(t) for t in triggers):
            raise ValueError(f"structural_tag.structures[{i}].begin {s['begin']!r} starts with none of the "
                             f"triggers {triggers}.")
