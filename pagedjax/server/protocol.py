"""OpenAI's request and response schemas (completions, chat completions, models), plus vLLM's extras.

Requests are strict: an unknown field, a wrong type or a non-finite number is a 400. Every field
the official `openai` client sends is declared; the ones that would change the meaning of a request
and that pagedjax does not implement (suffix, functions, audio, ...) are declared too, so that
setting them gets a clear "not supported" 400 instead of a silent wrong answer
(`unsupported_fields`). Output constraints come as OpenAI's `response_format`, vLLM's
`structured_outputs` or its older `guided_*` fields (at most one of them); tools as OpenAI's.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

Prompt = str | list[str] | list[int] | list[list[int]]


class Strict(BaseModel):
    """A request object: unknown fields, type coercions and NaN/inf are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    def unsupported_fields(self) -> list[str]:
        """Fields set to a value this server cannot honour."""
        return []


class StreamOptions(Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: not needed here
    continuous_usage_stats: bool | None = None  # vLLM: usage in every chunk


class SamplingFields(Strict):
    """Fields shared by completions and chat completions (OpenAI's, then vLLM's extras)."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    # vLLM's extras
    best_of: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None  # the k most likely tokens at each prompt position, and the prompt's own
    truncate_prompt_tokens: int | None = None  # only the prompt's last k tokens (-1: max_model_len's worth)
    return_token_ids: bool | None = None  # the prompt's and each choice's token ids beside the text
    use_beam_search: bool | None = None  # n beams; the choices are the n best hypotheses
    length_penalty: float | None = None  # beam search: score = cumulative logprob / length ** length_penalty
    early_stopping: bool | Literal["never"] | None = None  # beam search (HF's): True, False or "never"
    skip_special_tokens: bool = True
    # Accepted, ignored: vLLM reads it only for slow (Python) tokenizers, and every tokenizer here
    # is a `tokenizers` one, which decodes special tokens without added spaces (transformers too).
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    # Output constraints (pagedjax.structured_outputs.request reads them): OpenAI's, then vLLM's.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_json_object: bool | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    echo: bool | None = False
    logprobs: int | None = None
    max_tokens: int | None = 16
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM: BOS etc. when tokenizing a text prompt

    def unsupported_fields(self) -> list[str]:
        return super().unsupported_fields() + (["suffix"] if self.suffix else [])


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    """One message of a conversation (the fields a client echoes back from a response included)."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: Any | None = None
    function_call: Any | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    # OpenAI fields that only label or route a request: accepted, ignored.
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI fields this server cannot honour: a 400 when set.
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    # vLLM's extras
    echo: bool = False
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True  # with a reasoning parser: return reasoning_content

    def unsupported_fields(self) -> list[str]:
        bad = super().unsupported_fields()
        bad += [f for f in ("functions", "function_call", "audio", "prediction",
                            "web_search_options", "moderation") if getattr(self, f)]
        if "audio" in (self.modalities or []):
            bad.append("modalities")
        return bad


class TokenizeRequest(Strict):
    """POST /tokenize: a text prompt or a conversation."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]


# ------------------------------------------------------------------------------------ responses


class OpenAIObject(BaseModel):
    """A response object (built by the server, so no validation worries)."""

    model_config = ConfigDict(extra="forbid")


class Usage(OpenAIObject):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class CompletionLogprobs(OpenAIObject):
    text_offset: list[int] = []
    token_logprobs: list[float | None] = []
    tokens: list[str] = []
    top_logprobs: list[dict[str, float] | None] = []


class CompletionChoice(OpenAIObject):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class CompletionResponse(OpenAIObject):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class PromptLogprob(OpenAIObject):
    """vLLM's Logprob: one token's logprob at a prompt position, its rank, its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# vLLM's prompt_logprobs: per prompt position {token id: PromptLogprob}; None at the first
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionIdsChoice(CompletionChoice):
    """A completion choice with vLLM's return_token_ids: the prompt's token ids (streamed: in a
    choice's first chunk) and the choice's (streamed: each chunk's new ones)."""

    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionIdsResponse(CompletionResponse):
    """A streamed completion chunk with return_token_ids."""

    choices: list[CompletionIdsChoice]


class CompletionResultChoice(CompletionIdsChoice):
    """A choice of a whole (not streamed) completion: with its prompt's logprobs when asked."""

    prompt_logprobs: PromptLogprobs | None = None


class CompletionResult(CompletionResponse):
    """The body of a whole (not streamed) completion."""

    choices: list[CompletionResultChoice]


class TopLogprob(OpenAIObject):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(OpenAIObject):
    content: list[TokenLogprob] | None = None


class AssistantMessage(OpenAIObject):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with a reasoning parser (vLLM's field)
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = []  # ToolCall.to_dict()s


class ChatChoice(OpenAIObject):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = None  # return_token_ids


class ChatCompletionResponse(OpenAIObject):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids


class Delta(OpenAIObject):
    """A streamed message delta: only the fields that are set (`{"content": "..."}`)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # DeltaToolCall.to_dict()s: id and name first, then arguments

    @model_serializer(mode="wrap")
    def _drop_nones(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(OpenAIObject):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIObject):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ChatChunkIdsChoice(ChatChunkChoice):
    token_ids: list[int] | None = None  # return_token_ids: the chunk's new token ids


class ChatCompletionIdsChunk(ChatCompletionChunk):
    """A streamed chat chunk with return_token_ids: the prompt's token ids in the first chunk."""

    choices: list[ChatChunkIdsChoice]
    prompt_token_ids: list[int] | None = None


class ModelCard(OpenAIObject):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagedjax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIObject):
    object: Literal["list"] = "list"
    data: list[ModelCard]
