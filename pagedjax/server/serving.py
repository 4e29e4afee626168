"""OpenAI completions and chat completions over the AsyncEngine: requests in, responses or SSE out.

Every engine request runs with `RequestOutputKind.DELTA`: a non-streamed response is the deltas
joined, a streamed one sends them as they come. So both come from the same outputs, token for
token. A client that disconnects aborts its requests: streamed ones when the response is
cancelled, non-streamed ones through a task that listens for `http.disconnect`.

Output constraints (constraints.py) are compiled on a worker thread before the request reaches
the engine, so a bad or too slow one is a 400 and the engine loop never waits for a compile.
Chat choices go through the reasoning and tool-call parsers (chat_output.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pagedjax.request import CompletionOutput, Logprob
from pagedjax.sampling_params import BeamSearchParams, RequestOutputKind, SamplingParams, truncate_prompt
from pagedjax.server import constraints as C
from pagedjax.server import protocol as P
from pagedjax.server.async_engine import AsyncEngine, RequestStream
from pagedjax.server.chat_output import ChoiceParser
from pagedjax.structured_outputs.params import StructuredOutputsParams

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf: vLLM's floor for impossible tokens
_TEMPLATE_RESERVED = {"messages", "chat_template", "tools", "documents", "add_generation_prompt",
                      "tokenize", "continue_final_message"}


class APIError(Exception):
    """An error with its HTTP status and OpenAI's error body fields."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: int | str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.code = status if code is None else code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, type="BadRequestError", param=param)


def from_value_error(e: ValueError, model: type[P.Strict] | None = None) -> APIError:
    """A ValueError of SamplingParams or the engine as a 400, naming the request field it is about."""
    message = re.sub(r"^request '[^']*': ", "", str(e))  # our internal request id means nothing to the client
    fields = model.model_fields if model is not None else {}
    words = re.findall(r"[A-Za-z_]+", message)
    param = None
    if words[:1] and words[0] in fields and words[1:2] == ["must"]:  # SamplingParams: "top_p must be ..."
        param = words[0]
    elif "max_tokens" in words:  # the engine: "prompt (..) + max_tokens (..) exceeds max_model_len"
        param = "max_tokens"
    elif words[:1] and words[0] in fields and words[0] != "prompt":  # the engine: "logit_bias has ids ..."
        param = words[0]
    elif "prompt" in words:  # the engine: "the prompt has N tokens, max_model_len is M"
        param = "prompt" if "prompt" in fields else "messages"
    return bad_request(message, param)


class ClientDisconnected(Exception):
    """The client went away before its response was complete."""


def _opt(value: Any, default: Any) -> Any:
    return default if value is None else value


def _floor(lp: float) -> float:
    return lp if math.isfinite(lp) else _LOGPROB_FLOOR if not lp > 0 else 0.0


@dataclass
class _Sample:
    """One generated sequence, joined from its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    finish_sent: bool = False  # streaming: the chunk with the finish reason went out

    def add(self, c) -> None:
        self.text += c.text
        self.token_ids += c.token_ids
        self.logprobs += c.logprobs or []
        self.finish_reason = c.finish_reason or self.finish_reason
        self.stop_reason = c.stop_reason if c.stop_reason is not None else self.stop_reason


class OpenAIServing:
    """The handlers of /v1/completions, /v1/chat/completions, /tokenize and /detokenize."""

    def __init__(self, engine: AsyncEngine, *, model_name: str, tokenizer: Any, vocab_size: int,
                 max_model_len: int, max_logprobs: int = 20, max_n: int = 16, max_prompts: int = 256,
                 tool_call_parser: str | None = None, reasoning_parser: str | None = None,
                 chat_template: str | None = None, default_sampling: dict[str, Any] | None = None):
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.chat_template = chat_template  # the server's --chat-template, over the tokenizer's own
        self.default_sampling = dict(default_sampling or {})  # the generation config's, for fields left out
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.max_n = max_n
        self.max_prompts = max_prompts
        self.tool_parser, self.reasoning_parser = None, None  # parser classes (one instance per choice)
        if tool_call_parser is not None:
            from pagedjax.tool_parsers import get_tool_parser

            self.tool_parser = get_tool_parser(tool_call_parser)
        if reasoning_parser is not None:
            from pagedjax.reasoning import get_reasoning_parser

            self.reasoning_parser = get_reasoning_parser(reasoning_parser)
            self.reasoning_parser(tokenizer).end_token_id  # noqa: B018 (a tokenizer without the tags fails now)

    # -- shared --------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist (this server has `{self.model_name}`).",
                           type="NotFoundError", param="model", code="model_not_found")

    def _check_request(self, req: P.SamplingFields) -> None:
        self.check_model(req.model)
        for name in req.unsupported_fields():
            raise bad_request(f"{name} is not supported by this server", name)
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        n = 1 if req.n is None else req.n
        for name, value in (("n", n), ("best_of", req.best_of)):
            if value is not None and value > self.max_n:
                raise bad_request(f"{name} must be <= {self.max_n}, got {value}", name)
        if req.stream and req.best_of is not None and req.best_of != n:
            raise bad_request("best_of must equal n when streaming", "best_of")

    def _sampling_params(self, req: P.SamplingFields, max_tokens: int | None, logprobs: int | None,
                         constraint: StructuredOutputsParams | None = None) -> SamplingParams:
        d = self.default_sampling
        cap = d.get("max_tokens")  # the generation config's max_new_tokens bounds every request's
        if cap is not None:
            max_tokens = cap if max_tokens is None else min(max_tokens, cap)
        try:
            bias = C.logit_bias(req.logit_bias)
            return SamplingParams(
                n=_opt(req.n, 1), best_of=req.best_of,
                presence_penalty=_opt(req.presence_penalty, 0.0),
                frequency_penalty=_opt(req.frequency_penalty, 0.0),
                repetition_penalty=_opt(req.repetition_penalty, d.get("repetition_penalty", 1.0)),
                temperature=_opt(req.temperature, d.get("temperature", 1.0)),
                top_p=_opt(req.top_p, d.get("top_p", 1.0)),
                top_k=_opt(req.top_k, d.get("top_k", 0)), min_p=_opt(req.min_p, d.get("min_p", 0.0)),
                seed=req.seed, stop=req.stop,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, max_tokens=max_tokens,
                min_tokens=req.min_tokens, logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                output_kind=RequestOutputKind.DELTA, structured_outputs=constraint, logit_bias=bias,
                allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
                truncate_prompt_tokens=req.truncate_prompt_tokens)
        except C.FieldError as e:
            raise bad_request(str(e), e.param) from None
        except ValueError as e:
            raise from_value_error(e, type(req)) from None

    def _beam_params(self, req: P.SamplingFields, sp: SamplingParams, logprobs_param: str) -> BeamSearchParams:
        """vLLM's use_beam_search: n beams, the n best hypotheses as the choices. The search is HF's,
        deterministic: the fields that change how a token is drawn must keep their neutral values
        (a 400 names the first that does not), and temperature defaults to 0. Without max_tokens,
        `_beam_max_tokens` sets it once the prompts are known."""
        neutral = {"best_of": (None, sp.n), "top_p": (None, 1.0), "top_k": (None, 0, -1), "min_p": (None, 0.0),
                   "presence_penalty": (None, 0.0), "frequency_penalty": (None, 0.0),
                   "repetition_penalty": (None, 1.0), "logit_bias": (None, {}), "allowed_token_ids": (None,),
                   "bad_words": (None, []), "stop": (None, "", []), "prompt_logprobs": (None,),
                   "truncate_prompt_tokens": (None,)}
        for name, allowed in neutral.items():
            if getattr(req, name) not in allowed:
                raise bad_request(f"{name} cannot be used with use_beam_search", name)
        if req.temperature not in (None, 0):
            raise bad_request(f"use_beam_search runs HF's deterministic beam search: temperature must be 0 (or "
                              f"unset), got {req.temperature}", "temperature")
        if sp.structured_outputs is not None:
            raise bad_request("an output constraint cannot be used with use_beam_search", "use_beam_search")
        if sp.logprobs is not None and sp.logprobs > 2 * sp.n:
            raise bad_request(f"with use_beam_search, {logprobs_param} must be <= 2 * n ({2 * sp.n}): each step "
                              f"keeps its 2 * n most likely tokens, got {sp.logprobs}", logprobs_param)
        try:
            return BeamSearchParams(
                beam_width=sp.n, max_tokens=sp.max_tokens or self.max_model_len, ignore_eos=sp.ignore_eos,
                temperature=_opt(req.temperature, 0.0), length_penalty=_opt(req.length_penalty, 1.0),
                early_stopping=_opt(req.early_stopping, False),
                include_stop_str_in_output=sp.include_stop_str_in_output, stop_token_ids=sp.stop_token_ids,
                min_tokens=sp.min_tokens)
        except ValueError as e:
            raise from_value_error(e, type(req)) from None

    def _beam_max_tokens(self, params: BeamSearchParams, requested: int | None, prompts: list[list[int]]
                         ) -> BeamSearchParams:
        """A beam search without max_tokens runs to max_model_len (the longest prompt's room)."""
        if requested is not None or self.default_sampling.get("max_tokens") is not None:
            return params
        room = self.max_model_len - max(len(ids) for ids in prompts)
        return dataclasses.replace(params, max_tokens=max(room, 1))  # no room: the engine's 400

    async def _constraint(self, req: P.SamplingFields, tools: C.ToolUse | None = None
                          ) -> StructuredOutputsParams | None:
        """The request's output constraint (its own, or a forced tool call's), compiled: a 400 if
        it is invalid or too slow to compile, before the request goes near the engine."""
        try:
            constraint, param = C.output_constraint(req)
        except C.FieldError as e:
            raise bad_request(str(e), e.param) from None
        if tools is not None and tools.constraint is not None:
            if constraint is not None:
                raise bad_request(f"tool_choice {tools.choice!r} forces the output to be a tool call, so it cannot "
                                  f"also be constrained by {param}", param)
            constraint, param = tools.constraint, "tool_choice"
        if constraint is None:
            return None
        structured = self.engine.structured
        if structured is None:
            raise bad_request("this engine does not support output constraints", param)
        try:
            await asyncio.to_thread(structured.compile, constraint)  # cached: add_request finds it
        except ValueError as e:
            raise bad_request(str(e), param) from None
        return constraint

    async def _add(self, request_id: str, prompts: list[list[int]], params: SamplingParams,
                   model: type[P.Strict]) -> RequestStream:
        try:
            return await self.engine.add(request_id, prompts, params)
        except ValueError as e:
            raise from_value_error(e, model) from None

    def _encode(self, prompt: str | list[int], add_special_tokens: bool) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("a text prompt needs a tokenizer; this model has none (send token ids)",
                                  "prompt")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        if not all(0 <= t < self.vocab_size for t in prompt):
            raise bad_request(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        return None, list(prompt)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False) if self.tokenizer is not None else ""

    @staticmethod
    async def _collect(stream: RequestStream, request: Request | None, num_prompts: int,
                       prompt_logprobs: dict[int, list] | None = None
                       ) -> tuple[list[dict[int, _Sample]], list[list[int]], list[int]]:
        """Joins a stream's deltas: per prompt {sample index: _Sample}, the final order, prompt lengths
        (and into `prompt_logprobs`, when given, each prompt's prompt logprobs)."""
        samples: list[dict[int, _Sample]] = [{} for _ in range(num_prompts)]
        order: list[list[int]] = [[] for _ in range(num_prompts)]
        prompt_lens = [0] * num_prompts
        watcher = asyncio.create_task(_watch_disconnect(request, stream)) if request is not None else None
        try:
            async for p, out in stream:
                prompt_lens[p] = len(out.prompt_token_ids)
                if prompt_logprobs is not None and out.prompt_logprobs is not None:
                    prompt_logprobs[p] = out.prompt_logprobs
                for c in out.outputs:
                    samples[p].setdefault(c.index, _Sample()).add(c)
                if out.finished:
                    order[p] = [c.index for c in out.outputs]  # best_of: the n most likely, best first
        finally:
            if watcher is not None:
                watcher.cancel()
            stream.close()
        return samples, order, prompt_lens

    # -- completions ---------------------------------------------------------------------------

    async def completions(self, req: P.CompletionRequest, request: Request | None) -> Response:
        self._check_request(req)
        prompt = req.prompt
        prompts = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else prompt
        if not prompts:
            raise bad_request("prompt must not be empty", "prompt")
        if len(prompts) > self.max_prompts:
            raise bad_request(f"at most {self.max_prompts} prompts per request, got {len(prompts)}", "prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= self.max_logprobs:
            raise bad_request(f"logprobs must be in [0, {self.max_logprobs}], got {req.logprobs}", "logprobs")
        # echo with max_tokens 0 (OpenAI's, vLLM's): the prompt alone, with its logprobs if asked (how
        # evaluation harnesses score text); one token is generated and left out
        echo_only = bool(req.echo) and req.max_tokens == 0
        params = self._sampling_params(req, 1 if echo_only else req.max_tokens, req.logprobs,
                                       await self._constraint(req))
        if req.use_beam_search:
            if req.echo and (echo_only or req.logprobs is not None):  # the beams score no prompt
                raise bad_request("echo with logprobs or max_tokens 0 cannot be used with use_beam_search", "echo")
            params = self._beam_params(req, params, "logprobs")
        k_prompt = self._prompt_logprobs(req)
        if k_prompt is None and req.echo and req.logprobs is not None:  # vLLM: the echoed prompt's tokens too
            k_prompt = req.logprobs
        if k_prompt is not None:
            params = dataclasses.replace(params, prompt_logprobs=k_prompt)
        encoded = await asyncio.to_thread(lambda: [self._encode(p, req.add_special_tokens) for p in prompts])
        if req.truncate_prompt_tokens is not None:  # the engine would cut them; echo shows what it reads
            cut = [truncate_prompt(ids, req.truncate_prompt_tokens, self.max_model_len) for _, ids in encoded]
            encoded = [(t if len(c) == len(ids) else None, c) for (t, ids), c in zip(encoded, cut)]
        if isinstance(params, BeamSearchParams):
            params = self._beam_max_tokens(params, req.max_tokens, [ids for _, ids in encoded])
        texts = [t if t is not None or not req.echo else self._decode(ids) for t, ids in encoded]
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = await self._add(rid, [ids for _, ids in encoded], params, P.CompletionRequest)
        if req.stream:
            return _EventStream(self._completion_stream(rid, req, stream, texts, params, echo_only), stream)
        prompt_lps: dict[int, list] = {}
        samples, order, prompt_lens = await self._collect(stream, request, len(prompts), prompt_lps)
        choices, num_generated = [], 0
        for p, indices in enumerate(order):
            shown = None if req.prompt_logprobs is None else self._prompt_logprobs_body(prompt_lps.get(p, []))
            for rank, i in enumerate(indices):
                s = samples[p][i]
                if echo_only:  # the one token generated is left out
                    s = _Sample(finish_reason="length" if s.finish_reason != "abort" else "abort")
                prefix = texts[p] if req.echo else ""
                lp = None
                if req.logprobs is not None and req.echo:
                    lp = self._completion_logprobs(encoded[p][1] + s.token_ids,
                                                   prompt_lps.get(p, []) + s.logprobs, 0, req.logprobs)
                elif req.logprobs is not None:
                    lp = self._completion_logprobs(s.token_ids, s.logprobs, len(prefix), req.logprobs)
                token_ids = {"prompt_token_ids": encoded[p][1], "token_ids": s.token_ids} if req.return_token_ids else {}
                choices.append(P.CompletionResultChoice(
                    index=p * _num_choices(params) + rank, text=prefix + s.text, logprobs=lp, finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason, prompt_logprobs=shown, **token_ids))
                num_generated += len(s.token_ids)
        usage = P.Usage(prompt_tokens=sum(prompt_lens), completion_tokens=num_generated,
                        total_tokens=sum(prompt_lens) + num_generated)
        body = P.CompletionResult(id=rid, model=self.model_name, choices=choices, usage=usage)
        return _json(body)

    async def _completion_stream(self, rid: str, req: P.CompletionRequest, stream: RequestStream,
                                 texts: list[str | None], params: SamplingParams, echo_only: bool = False
                                 ) -> AsyncIterator[str]:
        created, n = int(time.time()), _num_choices(params)
        echo = set(range(len(texts) * n)) if req.echo else set()
        offsets: dict[int, int] = {}
        prompt_tokens, completion_tokens, seen = 0, 0, set()
        usage_every, include_usage = _usage_options(req)
        finished: set[int] = set()
        prompt_lps: dict[int, list] = {}  # echo + logprobs: each prompt's, from its first output
        with_ids = bool(req.return_token_ids)
        ids_sent: set[int] = set()  # return_token_ids: the choices whose prompt token ids went out

        def event(i: int, text: str, lp=None, finish_reason=None, stop_reason=None, ids=None) -> str:
            if ids is None:
                choice = P.CompletionChoice(index=i, text=text, logprobs=lp, finish_reason=finish_reason,
                                            stop_reason=stop_reason)
                chunk = P.CompletionResponse(id=rid, created=created, model=self.model_name, choices=[choice])
            else:  # return_token_ids: (the prompt's token ids in a choice's first chunk, the new ones)
                choice = P.CompletionIdsChoice(index=i, text=text, logprobs=lp, finish_reason=finish_reason,
                                               stop_reason=stop_reason, prompt_token_ids=ids[0], token_ids=ids[1])
                chunk = P.CompletionIdsResponse(id=rid, created=created, model=self.model_name, choices=[choice])
            if usage_every:
                chunk.usage = _usage(prompt_tokens, completion_tokens)
            return _event(chunk)

        text_chunk = _TextChunks(event)
        try:
            async for p, out in stream:
                if p not in seen:
                    seen.add(p)
                    prompt_tokens += len(out.prompt_token_ids)
                if out.prompt_logprobs is not None:
                    prompt_lps[p] = out.prompt_logprobs
                for c in out.outputs:
                    i = p * n + c.index
                    if i in finished:
                        continue
                    if echo_only:  # the prompt alone: the one token generated is left out
                        c = CompletionOutput(c.index, "", [], None, [],
                                             "length" if c.finish_reason not in (None, "abort") else c.finish_reason)
                    completion_tokens += len(c.token_ids)
                    text, ids, entries = c.text, c.token_ids, c.logprobs or []
                    if i in echo:
                        echo.discard(i)
                        text = texts[p] + text
                        if req.logprobs is not None:
                            ids, entries = out.prompt_token_ids + ids, prompt_lps.get(p, []) + entries
                            offsets[i] = 0
                    if not text and not (c.token_ids and (req.logprobs is not None or with_ids)) \
                            and c.finish_reason is None:
                        continue
                    lp = None
                    if req.logprobs is not None:
                        start = offsets.get(i, len(texts[p] or "") if req.echo else 0)
                        lp = self._completion_logprobs(ids, entries, start, req.logprobs)
                        offsets[i] = start + sum(len(t) for t in lp.tokens)
                    if c.finish_reason is not None:
                        finished.add(i)
                    if lp is None and c.finish_reason is None and not usage_every and not with_ids:
                        yield text_chunk(i, text)
                        continue
                    token_ids = None
                    if with_ids:
                        token_ids = (None if i in ids_sent else out.prompt_token_ids, c.token_ids)
                        ids_sent.add(i)
                    yield event(i, text, lp, c.finish_reason, c.stop_reason, token_ids)
            if include_usage:
                yield _event(P.CompletionResponse(id=rid, created=created, model=self.model_name, choices=[],
                                                  usage=_usage(prompt_tokens, completion_tokens)))
        except (APIError, RuntimeError) as e:
            yield _error_event(e)
        finally:
            stream.close()
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob] | None], offset: int,
                             k: int) -> P.CompletionLogprobs:
        out = P.CompletionLogprobs()
        for t, entry in zip(token_ids, entries):
            token = self._token_text(t, entry or {})
            out.tokens.append(token)
            if entry is None:  # the first prompt token (echo): nothing before it to condition on
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                out.token_logprobs.append(_floor(entry[t].logprob) if t in entry else None)
                out.top_logprobs.append({self._token_text(u, entry): _floor(lp.logprob) for u, lp in entry.items()
                                         if u == t or (lp.rank is not None and lp.rank <= k)})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def _prompt_logprobs(self, req: P.SamplingFields) -> int | None:
        """vLLM's prompt_logprobs of a request, checked (None when not asked for)."""
        k = req.prompt_logprobs
        if k is None:
            return None
        if not 0 <= k <= self.max_logprobs:
            raise bad_request(f"prompt_logprobs must be in [0, {self.max_logprobs}], got {k}", "prompt_logprobs")
        if req.stream:  # as vLLM: they are not streamed
            raise bad_request("prompt_logprobs are not available when stream is true", "prompt_logprobs")
        return k

    def _prompt_logprobs_body(self, entries: list[dict[int, Logprob] | None]) -> P.PromptLogprobs:
        """A prompt's logprobs as vLLM writes them: per position {token id: {logprob, rank,
        decoded_token}} (the prompt's token and the k most likely), None at the first."""
        return [None if entry is None else
                {str(t): P.PromptLogprob(logprob=_floor(lp.logprob), rank=lp.rank,
                                         decoded_token=self._token_text(t, entry)) for t, lp in entry.items()}
                for entry in entries]

    def _token_text(self, token_id: int, entry: dict[int, Logprob]) -> str:
        lp = entry.get(token_id)
        if lp is not None and lp.decoded_token is not None:
            return lp.decoded_token
        return self._decode([token_id]) if self.tokenizer is not None else f"token_id:{token_id}"

    # -- chat completions ----------------------------------------------------------------------

    def _chat_prompt(self, req: P.ChatCompletionRequest | P.TokenizeRequest, add_special_tokens: bool
                     ) -> list[int]:
        tok = self.tokenizer
        if tok is None or not (self.chat_template or tok.has_chat_template):
            raise bad_request("this model's tokenizer has no chat template (serve it with --chat-template); "
                              "use /v1/completions", "messages")
        messages = [_template_message(i, m) for i, m in enumerate(req.messages)]
        kwargs = {k: v for k, v in (getattr(req, "chat_template_kwargs", None) or {}).items()
                  if k not in _TEMPLATE_RESERVED}
        if getattr(req, "tools", None):
            kwargs["tools"] = req.tools  # the template renders them (HF's `tools` variable)
        continue_final = getattr(req, "continue_final_message", False)
        if continue_final and req.add_generation_prompt:
            raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                              "continue_final_message")
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                           continue_final_message=continue_final, chat_template=self.chat_template,
                                           **kwargs)
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        except Exception as e:  # a template that fails on these messages is the request's problem
            raise bad_request(f"the chat template failed on these messages: {e}", "messages") from None
        return tok.encode(text, add_special_tokens=add_special_tokens)

    async def chat(self, req: P.ChatCompletionRequest, request: Request | None) -> Response:
        self._check_request(req)
        if req.top_logprobs is not None:
            if not req.logprobs:
                raise bad_request("top_logprobs needs logprobs to be true", "top_logprobs")
            if not 0 <= req.top_logprobs <= self.max_logprobs:
                raise bad_request(f"top_logprobs must be in [0, {self.max_logprobs}], got {req.top_logprobs}",
                                  "top_logprobs")
        k = _opt(req.top_logprobs, 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        try:
            tools = C.tool_use(req, auto_parser=self.tool_parser and self.tool_parser.name)
        except C.FieldError as e:
            raise bad_request(str(e), e.param) from None
        params = self._sampling_params(req, max_tokens, k, await self._constraint(req, tools))
        if req.use_beam_search:
            params = self._beam_params(req, params, "top_logprobs")
        if (k_prompt := self._prompt_logprobs(req)) is not None:
            params = dataclasses.replace(params, prompt_logprobs=k_prompt)
        ids = await asyncio.to_thread(self._chat_prompt, req, req.add_special_tokens)
        if req.truncate_prompt_tokens is not None:  # the tokens the model reads (return_token_ids shows them)
            ids = truncate_prompt(ids, req.truncate_prompt_tokens, self.max_model_len)
        if isinstance(params, BeamSearchParams):
            params = self._beam_max_tokens(params, max_tokens, [ids])
        new_parser = self._choice_parsers(req, tools, ids)
        if isinstance(params, SamplingParams) and new_parser().needs_special_tokens and params.skip_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)  # the parsers' markers are special
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await self._add(rid, [ids], params, P.ChatCompletionRequest)
        if req.stream:
            return _EventStream(self._chat_stream(rid, req, stream, params, k, new_parser,
                                                  ids if req.return_token_ids else None), stream)
        prompt_lps: dict[int, list] = {}
        samples, order, prompt_lens = await self._collect(stream, request, 1, prompt_lps)
        choices, num_generated = [], 0
        for rank, i in enumerate(order[0]):
            s = samples[0][i]
            lp = P.ChatLogprobs(content=self._chat_logprobs(s.token_ids, s.logprobs, k)) if k is not None else None
            parser, message = new_parser(), P.AssistantMessage(content=s.text)
            if parser.active:
                parser.feed(s.text)
                parser.finish()
                parts = parser.message()
                message = P.AssistantMessage(content=parts.content, reasoning_content=parts.reasoning_content,
                                             tool_calls=[c.to_dict() for c in parts.tool_calls])
            choices.append(P.ChatChoice(index=rank, message=message, logprobs=lp,
                                        finish_reason=parser.finish_reason(s.finish_reason), stop_reason=s.stop_reason,
                                        token_ids=s.token_ids if req.return_token_ids else None))
            num_generated += len(s.token_ids)
        body = P.ChatCompletionResponse(id=rid, model=self.model_name, choices=choices,
                                        usage=_usage(prompt_lens[0], num_generated),
                                        prompt_logprobs=None if req.prompt_logprobs is None
                                        else self._prompt_logprobs_body(prompt_lps.get(0, [])),
                                        prompt_token_ids=ids if req.return_token_ids else None)
        return _json(body)

    def _choice_parsers(self, req: P.ChatCompletionRequest, tools: C.ToolUse, prompt_ids: list[int]):
        """A factory of ChoiceParsers for the request's choices (reasoning, then tool calls)."""
        from pagedjax.structured_outputs.tools import ForcedToolCallParser

        def new() -> ChoiceParser:
            reasoning = None
            if self.reasoning_parser is not None:
                reasoning = self.reasoning_parser.for_prompt(self.tokenizer, prompt_ids)
            parser = None
            if tools.choice == "auto":
                parser = self.tool_parser()
            elif tools.choice in ("required", "named"):
                parser = ForcedToolCallParser(tools.function_name)
            return ChoiceParser(reasoning, parser, include_reasoning=req.include_reasoning,
                                forced=tools.choice if parser is not None and tools.choice != "auto" else None,
                                tokenizer=self.tokenizer)

        return new

    async def _chat_stream(self, rid: str, req: P.ChatCompletionRequest, stream: RequestStream,
                           params: SamplingParams, k: int | None, new_parser, prompt_ids: list[int] | None = None
                           ) -> AsyncIterator[str]:
        """`prompt_ids`: return_token_ids (the prompt's token ids in each choice's first chunk, and
        every chunk's new token ids)."""
        created = int(time.time())
        usage_every, include_usage = _usage_options(req)
        prompt_tokens, completion_tokens = 0, 0
        finished: set[int] = set()
        with_ids = prompt_ids is not None

        def chunk(i: int, delta: P.Delta, logprobs=None, finish_reason=None, stop_reason=None,
                  token_ids: list[int] | None = None, first: bool = False) -> str:
            if not with_ids:
                choice = P.ChatChunkChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                           stop_reason=stop_reason)
                body = P.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[choice])
            else:
                choice = P.ChatChunkIdsChoice(index=i, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                                              stop_reason=stop_reason, token_ids=token_ids)
                body = P.ChatCompletionIdsChunk(id=rid, created=created, model=self.model_name, choices=[choice],
                                                prompt_token_ids=prompt_ids if first else None)
            if usage_every:
                body.usage = _usage(prompt_tokens, completion_tokens)
            return _event(body)

        text_chunk = _TextChunks(lambda i, text: chunk(i, P.Delta(content=text)))
        parsers: dict[int, ChoiceParser] = {}
        try:
            for i in range(_num_choices(params)):
                yield chunk(i, P.Delta(role="assistant", content=""), token_ids=[] if with_ids else None, first=True)
            async for _, out in stream:
                prompt_tokens = len(out.prompt_token_ids)
                for c in out.outputs:
                    if c.index in finished:
                        continue
                    completion_tokens += len(c.token_ids)
                    parser = parsers.setdefault(c.index, new_parser())
                    if parser.active:
                        deltas = [P.Delta(**d.to_dict()) for d in parser.feed(c.text)]
                        if c.finish_reason is not None:
                            deltas += [P.Delta(**d.to_dict()) for d in parser.finish()]
                    else:
                        deltas = [P.Delta(content=c.text)] if c.text else []
                    if not deltas and not (c.token_ids and (k is not None or with_ids)) and c.finish_reason is None:
                        continue
                    lp = P.ChatLogprobs(content=self._chat_logprobs(c.token_ids, c.logprobs or [], k)) \
                        if k is not None else None
                    new_ids = c.token_ids if with_ids else None
                    deltas = deltas or [P.Delta(content="") if not parser.active else P.Delta()]
                    for d in deltas[:-1]:
                        yield chunk(c.index, d, lp, token_ids=new_ids)
                        lp = None  # the step's logprobs (and token ids) go out once, with its first delta
                        new_ids = [] if with_ids else None
                    if c.finish_reason is not None:
                        finished.add(c.index)
                    last = deltas[-1]
                    if (lp is None and c.finish_reason is None and not usage_every and last.content is not None
                            and last.role is None and last.reasoning_content is None and last.tool_calls is None
                            and not with_ids):
                        yield text_chunk(c.index, last.content)
                        continue
                    yield chunk(c.index, last, lp, parser.finish_reason(c.finish_reason), c.stop_reason,
                                token_ids=new_ids)
            if include_usage:
                yield _event(P.ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=[],
                                                   usage=_usage(prompt_tokens, completion_tokens)))
        except (APIError, RuntimeError) as e:
            yield _error_event(e)
        finally:
            stream.close()
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]], k: int
                       ) -> list[P.TokenLogprob]:
        content = []
        for t, entry in zip(token_ids, entries):
            token = self._token_text(t, entry)
            top = sorted(((lp.rank, u, lp) for u, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                         key=lambda x: x[0])[:k]
            content.append(P.TokenLogprob(
                token=token, logprob=_floor(entry[t].logprob) if t in entry else _LOGPROB_FLOOR,
                bytes=list(token.encode("utf-8", "replace")),
                top_logprobs=[P.TopLogprob(token=(s := self._token_text(u, entry)), logprob=_floor(lp.logprob),
                                           bytes=list(s.encode("utf-8", "replace"))) for _, u, lp in top]))
        return content

    # -- tokenize / detokenize -----------------------------------------------------------------

    async def tokenize(self, req: P.TokenizeRequest) -> Response:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", "prompt")
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer", "prompt")
        if req.messages is not None:
            if not req.messages:
                raise bad_request("messages must not be empty", "messages")
            ids = await asyncio.to_thread(self._chat_prompt, req, bool(req.add_special_tokens))
        else:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = await asyncio.to_thread(self.tokenizer.encode, req.prompt, add)
        return _json({"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids})

    async def detokenize(self, req: P.DetokenizeRequest) -> Response:
        self.check_model(req.model)
        if self.tokenizer is None:
            raise bad_request("this model has no tokenizer", "tokens")
        if not all(0 <= t < self.vocab_size for t in req.tokens):
            raise bad_request(f"token ids must be in [0, {self.vocab_size})", "tokens")
        return _json({"prompt": self._decode(req.tokens)})


def _template_message(i: int, m: P.ChatMessage) -> dict[str, Any]:
    """A request message as chat templates read it: tool calls with their arguments as objects
    (what HF templates expect; vLLM does the same), tool results with their call id."""
    msg: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.name is not None:
        msg["name"] = m.name
    if m.tool_call_id is not None:
        msg["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for j, call in enumerate(m.tool_calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise bad_request(f"messages[{i}].tool_calls[{j}] must be {{\"type\": \"function\", \"function\": "
                                  "{\"name\": ..., \"arguments\": ...}}", "messages")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError as e:
                    raise bad_request(f"messages[{i}].tool_calls[{j}].function.arguments is not valid JSON: {e}",
                                      "messages") from None
            calls.append({**call, "function": {**fn, "arguments": args}})
        msg["tool_calls"] = calls
    return msg


async def _watch_disconnect(request: Request, stream: RequestStream) -> None:
    """Ends `stream` with ClientDisconnected when the client goes away (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.queue.put_nowait(ClientDisconnected())
            return


def _num_choices(params: SamplingParams | BeamSearchParams) -> int:
    """The choices a request returns per prompt: n samples, or a beam search's beam_width hypotheses."""
    return params.beam_width if isinstance(params, BeamSearchParams) else params.n


def _usage(prompt_tokens: int, completion_tokens: int) -> P.Usage:
    return P.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


def _json(body: Any, status: int = 200) -> Response:
    content = body.model_dump_json() if hasattr(body, "model_dump_json") else json.dumps(body, ensure_ascii=False)
    return Response(content, status_code=status, media_type="application/json")


# Characters that JSON leaves raw but that some line readers split on (Python's str.splitlines,
# as httpx's aiter_lines uses): escaped in every event, so an event is one line for any reader.
_LINE_BREAKS = re.compile("[\x85\u2028\u2029]")


def _line_safe(text: str) -> str:
    """JSON text with U+0085, U+2028 and U+2029 written as \\u escapes (the same JSON value)."""
    return _LINE_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _event(body: Any) -> str:
    return f"data: {_line_safe(body.model_dump_json())}\n\n"


class _TextChunks:
    """Server-sent events of one stream's plain text chunks (no logprobs, finish reason or usage):
    most of a stream's chunks. Each is the event the pydantic models give for it, rendered once
    per choice index with a marker for the text, which is then spliced in as a JSON string: about
    1 us a chunk where the models take about 7 at 256 streams (tests/test_server.py checks the
    bytes are the same)."""

    _MARK = "\x00pagedjax-text\x00"

    def __init__(self, render: Callable[[int, str], str]):
        self._render = render  # (choice index, text) -> the event, through the models
        self._parts: dict[int, tuple[str, str] | None] = {}  # None: this index always renders

    def __call__(self, index: int, text: str) -> str:
        if index not in self._parts:
            marked = self._render(index, self._MARK)
            quoted = json.dumps(self._MARK)
            self._parts[index] = tuple(marked.split(quoted)) if marked.count(quoted) == 1 else None
        parts = self._parts[index]
        if parts is None:  # the marker did not come out as one JSON string: no splice
            return self._render(index, text)
        return parts[0] + _line_safe(json.dumps(text, ensure_ascii=False)) + parts[1]


def _usage_options(req) -> tuple[bool, bool]:
    """A streamed request's stream_options: (usage on every chunk, usage at the end)."""
    every = bool(req.stream_options and req.stream_options.continuous_usage_stats)
    return every, bool(req.stream_options and req.stream_options.include_usage) or every


def _error_event(e: Exception) -> str:
    err = e if isinstance(e, APIError) else APIError(500, str(e), type="InternalServerError")
    return f"data: {_line_safe(json.dumps(err.body(), ensure_ascii=False))}\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that close their RequestStream however the response ends.

    The generator's own `finally` does it too, but a client that leaves before the first chunk
    cancels the response before the generator ever starts, and then that `finally` never runs.
    """

    def __init__(self, events: AsyncIterator[str], stream: RequestStream):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()
