"""A model's recommended sampling defaults, from its HF `generation_config.json` (vLLM's
`--generation-config`): what a request samples with for the fields it leaves out.

  "auto"   the model folder's generation_config.json (vLLM's default); nothing for a .gguf file,
           a named config or the bundled model, which have none
  "vllm"   none: SamplingParams' own defaults
  a path   a folder holding a generation_config.json

Read: temperature, top_p, top_k, min_p, repetition_penalty, and max_new_tokens (as max_tokens, a
bound on every request's). Like vLLM, `do_sample` is not read: a config that recommends a
temperature gets it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# generation_config.json field -> SamplingParams field
FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
INTS = ("top_k", "max_tokens")


def sampling_defaults(model: str | os.PathLike | None, generation_config: str = "auto") -> dict[str, Any]:
    """{SamplingParams field: value} recommended by the model's generation config (see above)."""
    if generation_config == "vllm":
        return {}
    if generation_config == "auto":
        folder = Path(model) if model is not None and not str(model).startswith("named:") else None
        if folder is None or not folder.is_dir():
            return {}
    else:
        folder = Path(generation_config)
        if not (folder / "generation_config.json").is_file():
            raise ValueError(f"generation_config {generation_config!r}: 'auto', 'vllm', or a folder holding "
                             f"a generation_config.json")
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a JSON object: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: not a JSON object")
    out = {}
    for name, field in FIELDS.items():
        value = cfg.get(name)
        if value is None:
            continue
        ok = isinstance(value, int) if field in INTS else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise ValueError(f"{path}: {name} must be {'an int' if field in INTS else 'a number'}, got {value!r}")
        out[field] = value
    if out:
        logger.info("default sampling from %s: %s (generation_config='vllm' turns it off)", path,
                    ", ".join(f"{k}={v}" for k, v in out.items()))
    return out
