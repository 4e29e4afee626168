"""The shapes users send a constraint in, to `StructuredOutputsParams` (host only).

Three sources, at most one per request:
  response_format     OpenAI: {"type": "text" | "json_object" | "json_schema", "json_schema": {"name",
                      "schema", "strict", "description"}}; vLLM also takes {"type": "structural_tag", ...}
  structured_outputs  vLLM's dict of StructuredOutputsParams fields
  guided_*            vLLM's older fields: guided_json, guided_regex, guided_choice, guided_grammar,
                      guided_json_object, guided_whitespace_pattern, guided_decoding_backend
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pagedjax.structured_outputs.params import StructuredOutputsParams

# The one backend here; vLLM's names for it, and "auto", are accepted.
BACKEND_NAMES = ("auto", "guidance", "llguidance")
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar", "guided_json_object": "json_object"}
_SO_FIELDS = {"json", "regex", "choice", "grammar", "json_object", "structural_tag", "disable_any_whitespace",
              "disable_additional_properties", "whitespace_pattern"}
_SO_IGNORED = {"disable_fallback"}  # vLLM's backend fallback: there is only one backend here
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def structured_outputs_from_request(fields: Mapping[str, Any]) -> StructuredOutputsParams | None:
    """The constraint of a completions / chat request's fields (unset ones absent or None), if any."""
    get = fields.get
    guided = {k: get(k) for k in (*_GUIDED, "guided_whitespace_pattern") if get(k) is not None}
    backend = get("guided_decoding_backend")
    if backend is not None and backend not in BACKEND_NAMES:
        raise ValueError(f"guided_decoding_backend={backend!r} is not available: structured outputs run on "
                         f"llguidance here (accepted names: {', '.join(BACKEND_NAMES)}).")
    response_format = get("response_format")
    if response_format is not None and _is_text(response_format):
        response_format = None
    sources = [name for name, given in (("response_format", response_format is not None),
                                        ("structured_outputs", get("structured_outputs") is not None),
                                        ("guided_*", bool(guided))) if given]
    if len(sources) > 1:
        raise ValueError(f"give the output constraint once: {' and '.join(sources)} were both set.")
    if response_format is not None:
        return from_response_format(response_format)
    if get("structured_outputs") is not None:
        return from_structured_outputs(get("structured_outputs"))
    if guided:
        kinds = {_GUIDED[k]: v for k, v in guided.items() if k in _GUIDED}
        if kinds.get("json_object") is False:
            del kinds["json_object"]
        return StructuredOutputsParams(**kinds, whitespace_pattern=guided.get("guided_whitespace_pattern"))
    return None


def from_structured_outputs(so: Any) -> StructuredOutputsParams:
    """vLLM's `structured_outputs` request field (a dict of StructuredOutputsParams fields)."""
    if isinstance(so, StructuredOutputsParams):
        return so
    if not isinstance(so, Mapping):
        raise ValueError(f"structured_outputs must be an object, got {type(so).__name__}.")
    unknown = sorted(set(so) - _SO_FIELDS - _SO_IGNORED)
    if unknown:
        raise ValueError(f"structured_outputs has unknown field(s) {unknown}; known: {sorted(_SO_FIELDS)}.")
    return StructuredOutputsParams(**{k: v for k, v in so.items() if k in _SO_FIELDS})


def from_response_format(rf: Any) -> StructuredOutputsParams | None:
    """OpenAI's `response_format` (None for {"type": "text"})."""
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise ValueError('response_format must be an object with a "type".')
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        _no_extra(rf, {"type"})
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        _no_extra(rf, {"type", "json_schema"})
        js = rf.get("json_schema")
        if not isinstance(js, Mapping):
            raise ValueError('response_format of type "json_schema" needs a "json_schema" object.')
        _no_extra(js, {"name", "schema", "strict", "description"}, "response_format.json_schema")
        name = js.get("name")
        if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
            raise ValueError(f"response_format.json_schema.name must be 1-64 letters, digits, _ or -, got {name!r}.")
        if js.get("strict") not in (None, True, False):
            raise ValueError(f"response_format.json_schema.strict must be a boolean, got {js.get('strict')!r}.")
        schema = js.get("schema")
        if schema is None:  # OpenAI makes the schema optional: any JSON object
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=schema)
    if kind == "structural_tag":  # vLLM's extension
        return StructuredOutputsParams(structural_tag={k: v for k, v in rf.items() if k != "type"})
    raise ValueError(f"response_format.type must be text, json_object, json_schema or structural_tag, got {kind!r}.")


def _is_text(rf: Any) -> bool:
    return isinstance(rf, Mapping) and rf.get("type") == "text" and set(rf) == {"type"}


def _no_extra(obj: Mapping, allowed: set[str], where: str = "response_format") -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise ValueError(f"{where} has unknown field(s) {extra}; allowed: {sorted(allowed)}.")
