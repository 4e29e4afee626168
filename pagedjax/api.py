"""The Python API: `generate(params, prompts)` for one-off batches, `LLM` to keep an engine alive."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from pagedjax.engine import EngineConfig, LLMEngine
from pagedjax.params import Params
from pagedjax.request import RequestOutput
from pagedjax.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams

if TYPE_CHECKING:
    from pagedjax.beam_search import BeamSearchOutput

Prompt = str | Sequence[int] | dict[str, Any]  # dicts: vLLM's TextPrompt / TokensPrompt
logger = logging.getLogger("pagedjax")


def resolve_dtype(name: str | None) -> Any:
    """A weights dtype by name; "auto" (or None) is bfloat16 on a GPU and float32 on the CPU."""
    import jax

    if name in (None, "auto"):
        return jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    return jnp.dtype(name)


def _from_dict(prompt: Any) -> Any:
    """vLLM's TextPrompt {"prompt": text} and TokensPrompt {"prompt_token_ids": ids} -> the text or
    the ids; anything else as it is. A dict with other keys is a ValueError naming them."""
    if not isinstance(prompt, dict):
        return prompt
    kinds = [k for k in ("prompt", "prompt_token_ids") if k in prompt]
    others = sorted(set(prompt) - {"prompt", "prompt_token_ids"})
    if len(kinds) != 1 or others:
        raise ValueError('a prompt given as a dict needs exactly one of "prompt" (text) or "prompt_token_ids" '
                         f"(vLLM's TextPrompt / TokensPrompt), and nothing else; got keys {sorted(prompt)}")
    return prompt[kinds[0]]


def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string, a list of token ids, or vLLM's {"prompt": ...} / {"prompt_token_ids":
    ...} dict) or many -> a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [_from_dict(prompts)]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # a single prompt given as token ids
    return [_from_dict(p) for p in prompts]


def _per_prompt(sampling_params, n: int) -> list[SamplingParams | BeamSearchParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, (SamplingParams, BeamSearchParams)):
        return [sampling_params] * n
    sampling_params = list(sampling_params)
    if len(sampling_params) != n:
        raise ValueError(f"{len(sampling_params)} sampling params for {n} prompts")
    return sampling_params


class LLM:
    """An engine kept alive across calls: `generate`, `stream`, `chat` (vLLM's `LLM`).

    `model` is a Params (from `load_params`), a checkpoint folder or .gguf file, or None for the
    bundled SmolLM2-135M-Instruct. `load_format="dummy"` (vLLM's) draws random weights of the
    model's config instead of reading them (`model` may then also be "named:<config>").
    `tokenizer`: a HF tokenizer folder or a .gguf file (vocab-only ones too) when the model's own
    is missing or another is wanted. `generation_config` (vLLM's): "auto" samples requests given
    no SamplingParams with the model folder's generation_config.json recommendations
    (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), "vllm" with
    SamplingParams' own defaults, or a folder holding a generation_config.json; see
    `get_default_sampling_params`. Engine options: see `EngineConfig`;
    `quantization` ("fp8", "awq", "gptq", "compressed-tensors") is applied as the weights load.
    """

    def __init__(self, model: Params | str | os.PathLike | None = None, *, dtype: Any = None,
                 tokenizer: str | None = None, load_format: str = "auto", generation_config: str = "auto",
                 **engine_options: Any):
        t0 = time.perf_counter()
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
        from pagedjax.generation_config import sampling_defaults

        self.default_sampling = sampling_defaults(None if isinstance(model, Params) else model, generation_config)
        if isinstance(model, Params):
            params = model
        else:
            from pagedjax import parallel

            tp = engine_options.get("tensor_parallel_size") or 1
            placement = ({"shardings": engine_options["shardings"]} if "shardings" in engine_options
                         else {"mesh": parallel.make_mesh(tp)} if tp > 1 else {})  # straight into shards
            dtype = jnp.dtype(dtype) if dtype else jnp.bfloat16
            if load_format == "dummy":
                from pagedjax.dummy_weights import dummy_params

                params = dummy_params(None if model is None else str(model), dtype=dtype,
                                      seed=engine_options.get("seed", 0),
                                      quantization=engine_options.get("quantization"), **placement)
            else:
                from pagedjax.weights import load_params

                if "mesh" in placement:
                    placement["enable_expert_parallel"] = bool(engine_options.get("enable_expert_parallel"))
                params = load_params(model, dtype=dtype, quantization=engine_options.get("quantization"), **placement)
        engine_options.pop("shardings", None)
        t1 = time.perf_counter()
        self.engine = LLMEngine(params, EngineConfig(**engine_options), tokenizer=tokenizer)
        self._ids = itertools.count()
        # Where start-up went: weights, then the engine's own phases (tokenizer, pool, compiling).
        self.startup_seconds = {"weights": t1 - t0, **self.engine.startup_seconds}
        logger.info("start-up: %s", ", ".join(f"{k} {v:.2f} s" for k, v in self.startup_seconds.items()))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What a call given no SamplingParams samples with: the model's generation config's
        recommendations over SamplingParams' defaults (generation_config="vllm": the defaults)."""
        return SamplingParams(**self.default_sampling)

    def _add(self, prompts, sampling_params, kind: RequestOutputKind | None = None) -> list[str]:
        prompts = _as_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = _per_prompt(sampling_params, len(prompts))
        ids = []
        try:
            for prompt, sp in zip(prompts, params):
                if kind is not None and isinstance(sp, SamplingParams):
                    sp = dataclasses.replace(sp, output_kind=kind)
                rid = f"req-{next(self._ids)}"
                self.engine.add_request(rid, prompt, sp)
                ids.append(rid)
        except Exception:
            self.engine.abort_request(ids)  # nothing half-added stays behind
            raise
        return ids

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params=None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs the prompts to completion; returns their RequestOutputs in input order."""
        ids = self._add(prompts, sampling_params, RequestOutputKind.FINAL_ONLY)
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm and len(ids) > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True)
        try:
            wanted = set(ids)
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            self.engine.abort_request([i for i in ids if i not in done])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[i] for i in ids]

    def stream(self, prompts: Prompt | Sequence[Prompt], sampling_params=None
               ) -> Iterator[RequestOutput]:
        """Yields incremental RequestOutputs (new text and tokens only) as tokens come."""
        ids = self._add(prompts, sampling_params, RequestOutputKind.DELTA)
        pending = set(ids)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            if pending:  # the caller stopped early: give the pages back
                self.engine.abort_request(list(pending))

    def beam_search(self, prompts: Prompt | Sequence[Prompt], params: BeamSearchParams | Sequence[BeamSearchParams],
                    *, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """vLLM's LLM.beam_search: per prompt, its hypotheses as BeamSearchSequences (the prompt's
        tokens and the hypothesis's, decoded together). The engine's beam search runs them, as
        `generate(prompts, params)` does, which gives the same hypotheses as CompletionOutputs."""
        from pagedjax.beam_search import BeamSearchOutput, BeamSearchSequence

        many = params if isinstance(params, (list, tuple)) else [params]
        if not all(isinstance(p, BeamSearchParams) for p in many):
            raise ValueError(f"beam_search takes BeamSearchParams, got {type(params).__name__}")
        tok = self.engine.tokenizer
        results = []
        for out in self.generate(prompts, params, use_tqdm=use_tqdm):
            sequences = []
            for c in out.outputs:
                tokens = [*out.prompt_token_ids, *c.token_ids]
                text = tok.decode(tokens, skip_special_tokens=False) if tok is not None else None
                sequences.append(BeamSearchSequence(tokens, list(c.logprobs or []), c.cumulative_logprob or 0.0,
                                                    text, c.finish_reason, c.stop_reason))
            results.append(BeamSearchOutput(sequences))
        return results

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]], sampling_params=None,
             *, use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Applies the chat template to one conversation (or many) and generates: the tokenizer's,
        or `chat_template` (a Jinja template's text, as vLLM's LLM.chat takes it)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.engine.chat_prompt(c, add_generation_prompt=add_generation_prompt,
                                           tokenize=True, chat_template=chat_template) for c in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


_last: tuple[int, tuple, LLM] | None = None


def generate(params: Params, prompts: Prompt | Sequence[Prompt], sampling_params=None, *,
             use_tqdm: bool = True, **engine_options: Any) -> list[RequestOutput]:
    """Generates for `prompts` with the model in `params`; RequestOutputs in input order.

    Engine options (max_num_seqs, max_num_batched_tokens, num_pages, ...) are `EngineConfig`'s.
    The engine of the last call is reused when params and options are the same.
    """
    global _last
    key = (id(params), tuple(sorted(engine_options.items())))
    if _last is not None and _last[0] == key[0] and _last[1] == key[1] \
            and _last[2].engine.params is params:
        llm = _last[2]
    else:
        _last = None  # drop the old engine (and its pool) before building a new one
        llm = LLM(params, **engine_options)
        _last = (key[0], key[1], llm)
    return llm.generate(prompts, sampling_params, use_tqdm=use_tqdm)
