"""Pydantic models of the OpenAI-compatible request and response bodies (openai_api.md §1, §2, §5).

Requests are lenient about unknown keys (ignored, as vLLM does) and strict about types: an int
field refuses 1.5 and true, a number field refuses strings and booleans. Range checks that span
several fields live in `validate.py`. Responses are built from these models and dumped to JSON.
"""

from __future__ import annotations

import functools
import math
import time
import types
import typing
import uuid
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr,
                      model_validator)


def _number(v: Any) -> Any:
    # pydantic's lax float accepts "0.5" and true; the API wants JSON numbers only.
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("Input should be a number")
    if not math.isfinite(v):
        raise ValueError("Input should be a finite number")
    return float(v)


Number = Annotated[float, BeforeValidator(_number)]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_not_given(cls, data: Any) -> Any:
        # OpenAI's schema types n, stream, logprobs, echo, ... as "X or null" and clients send null
        # for "not given": a null where the field takes no None means its default
        if isinstance(data, dict):
            defaulted = _defaults_on_null(cls)
            if any(data.get(k, 0) is None for k in defaulted):
                data = {k: v for k, v in data.items() if not (v is None and k in defaulted)}
        return data


@functools.lru_cache(maxsize=None)
def _defaults_on_null(cls: type[BaseModel]) -> frozenset[str]:
    """Fields with a default that do not take None (null in a request means that default)."""
    def takes_none(annotation) -> bool:
        return annotation is type(None) or (typing.get_origin(annotation) in (Union, types.UnionType)
                                            and type(None) in typing.get_args(annotation))
    return frozenset(name for name, f in cls.model_fields.items()
                     if not f.is_required() and not takes_none(f.annotation))


# ---- request pieces ----

class FunctionDefinition(_Lenient):
    name: StrictStr
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolDefinition(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class _FunctionName(_Lenient):
    name: StrictStr


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: _FunctionName


class StreamOptions(_Lenient):
    include_usage: Optional[StrictBool] = False
    continuous_usage_stats: Optional[StrictBool] = False


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None  # {"name", "schema"?, "strict"?, "description"?}


class StructuredOutputsField(_Lenient):
    """vLLM's `structured_outputs` extra: exactly one of json, regex, choice, grammar, json_object."""

    # (pydantic models have a .json method: the field goes by its alias)
    json_: Union[dict[str, Any], StrictStr, None] = Field(default=None, alias="json")
    regex: Optional[StrictStr] = None
    choice: Optional[list[StrictStr]] = None
    grammar: Optional[StrictStr] = None
    json_object: Optional[StrictBool] = None
    disable_any_whitespace: StrictBool = False


class ChatMessage(BaseModel):
    """One input message; extra keys (Qwen-Agent's `extra`, `id`, `function_call`) are kept."""

    model_config = ConfigDict(extra="allow")
    role: StrictStr
    content: Union[StrictStr, list[Any], None] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None


class SamplingFields(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions (OpenAI + vLLM extras)."""

    model: Optional[StrictStr] = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    min_p: Optional[Number] = None
    presence_penalty: Optional[Number] = None
    frequency_penalty: Optional[Number] = None
    repetition_penalty: Optional[Number] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    seed: Optional[StrictInt] = None
    logit_bias: Optional[dict[str, Number]] = None
    min_tokens: StrictInt = 0
    ignore_eos: StrictBool = False
    include_stop_str_in_output: StrictBool = False
    skip_special_tokens: StrictBool = True
    spaces_between_special_tokens: StrictBool = True
    echo: StrictBool = False
    add_special_tokens: StrictBool = False
    truncate_prompt_tokens: Optional[StrictInt] = None
    prompt_logprobs: Optional[StrictInt] = None
    return_tokens_as_token_ids: StrictBool = False
    response_format: Optional[ResponseFormat] = None
    # vLLM structured outputs (extra_body): the newer object, or one of the older guided_* fields
    structured_outputs: Optional[StructuredOutputsField] = None
    guided_json: Union[dict[str, Any], StrictStr, None] = None
    guided_regex: Optional[StrictStr] = None
    guided_choice: Optional[list[StrictStr]] = None
    guided_grammar: Optional[StrictStr] = None
    user: Optional[str] = None
    request_id: Optional[str] = None
    priority: StrictInt = 0
    cache_salt: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    tools: Optional[list[ToolDefinition]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[StrictBool] = None
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = None
    reasoning_effort: Optional[str] = None
    chat_template: Optional[StrictStr] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False
    include_reasoning: StrictBool = True
    # qwen3next extra: per-request override of the server's reasoning split (false = raw content,
    # for Qwen-Agent's thought_in_content clients)
    separate_reasoning: Optional[StrictBool] = None


class CompletionRequest(SamplingFields):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    suffix: Optional[str] = None
    max_tokens: Optional[StrictInt] = 16
    logprobs: Optional[StrictInt] = None
    best_of: Optional[StrictInt] = None


class TokenizeRequest(_Lenient):
    """vLLM extra: POST /tokenize with a raw prompt or chat messages (rendered by the template)."""

    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = None
    tools: Optional[list[ToolDefinition]] = None
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Lenient):
    model: Optional[StrictStr] = None
    tokens: list[StrictInt]


# ---- response pieces ----

def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None
    completion_tokens_details: Optional[CompletionTokensDetails] = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl-tool"))
    type: Literal["function"] = "function"
    function: FunctionCall


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_logprobs: PromptLogprobs = None


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    reasoning: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[Usage] = None


class PromptLogprob(BaseModel):
    """vLLM's prompt_logprobs entry (one per token id of a prompt position)."""

    logprob: float
    rank: int
    decoded_token: str


# prompt_logprobs: one entry per prompt token, the first None; token ids as JSON keys
PromptLogprobs = Optional[list[Optional[dict[str, PromptLogprob]]]]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None
    prompt_logprobs: PromptLogprobs = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "qwen3next"
    root: Optional[str] = None
    parent: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
