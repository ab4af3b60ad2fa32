"""The bodies of ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Every field the official client may send is declared, so wrapper libraries that send a field with its
default or no-op value (``presence_penalty: 0``, ``logit_bias: {}``, ``store: false``, ``metadata``,
``parallel_tool_calls``, ``service_tier``…) are served. A field that asks for something ftaas does not do
(tools, ``best_of`` above ``n``, ``store: true``…) is a 400 naming it in ``param`` (``unsupported``), never
silently ignored. Penalties, ``logit_bias`` and a JSON ``response_format`` are honoured by the generate worker's
engine (``native_format`` is the native request's ``response_format``). Labels (``user``, ``metadata``,
``safety_identifier``, ``prompt_cache_key``) and scheduling hints (``service_tier``) change nothing in the answer
and are ignored.
Bounds that depend on the deployment (``n``, ``logprobs``, ``max_tokens``) are the native request's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.api.errors import ApiError
from app.api.schemas import MAX_NEW_TOKENS, MAX_PROMPT_CHARS, MAX_PROMPTS, Key, MetaValue

StopStr = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
Label = Annotated[str, StringConstraints(max_length=512)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _empty(v: Any) -> bool:
    return not v


def _none(v: Any) -> bool:
    return v is None


def _false(v: Any) -> bool:
    return not v


#: field -> (holds a value ftaas can honour, what ftaas does instead)
Check = tuple[Callable[[Any], bool], str]


class StreamOptions(Strict):
    include_usage: bool | None = False
    include_obfuscation: bool | None = Field(None, description="Ignored: ftaas pads no chunks.")


class _Sampling(Strict):
    NOOP: ClassVar[dict[str, Check]] = {}
    model: Annotated[str, StringConstraints(min_length=1, max_length=300)]
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy decoding; default 1.")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, description="Choices per prompt (at most the native request's n).")
    stop: StopStr | list[StopStr] | None = Field(None, description="Up to 4 strings.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, int] | None = Field(None, description="Token id -> -100..100, up to 300 entries.")
    response_format: dict[str, Any] | None = Field(None, description="text, json_object or json_schema "
                                                   "({name, schema, strict}): constrained decoding.")
    user: Annotated[str, StringConstraints(max_length=256)] | None = Field(None, description="Ignored.")

    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "invalid_request", "Invalid value for 'stop': up to 4 strings", "stop")
        return stop

    @property
    def native_format(self) -> dict[str, Any] | None:
        """``response_format`` as the native request's (``{"type": "json_schema", "schema": …}``), None for
        text; a 400 naming it when its shape is not OpenAI's."""
        rf = self.response_format
        if rf is None or rf.get("type") == "text":
            return None
        if rf.get("type") == "json_object":
            return {"type": "json_object"}
        spec = rf.get("json_schema")
        if rf.get("type") != "json_schema" or not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, "invalid_request", "Invalid value for 'response_format': expected {'type': "
                           "'text'}, {'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name': "
                           "…, 'schema': {…}}}", "response_format")
        return {"type": "json_schema", "schema": spec["schema"]}

    def unsupported(self) -> None:
        """A 400 naming the first field that asks for what ftaas does not do."""
        for field, (honoured, instead) in self.NOOP.items():
            value = getattr(self, field)
            if not honoured(value):
                raise ApiError(400, "unsupported_parameter",
                               f"Unsupported value for '{field}': {value!r}; {instead}", field)


class CompletionCreate(_Sampling):
    NOOP = {
        "suffix": (_empty, "inserting text before a suffix is not offered"),
    }
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(None, ge=0, le=MAX_NEW_TOKENS, description="Default 16; 0 only with echo.")
    echo: bool | None = Field(False, description="Prepend the prompt to each choice's text (and its logprobs).")
    logprobs: int | None = Field(None, ge=0, description="Log probabilities of the chosen tokens and of this many "
                                 "top alternatives at each position.")
    best_of: int | None = Field(None, ge=1, description="Only equal to n (or 1): every sample is returned.")
    suffix: str | None = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise ApiError(400, "unsupported_parameter",
                           f"Unsupported value for 'best_of': {self.best_of}; only best_of equal to n "
                           f"({self.choices_per_prompt}) is offered (every sample is returned)", "best_of")


class ContentPart(Strict):
    type: Literal["text"]
    text: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_call_id and the like carry nothing ftaas uses
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)] | Annotated[
        list[ContentPart], Field(max_length=16)]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


def _text_only(v: Any) -> bool:
    return v is None or list(v) == ["text"]


def _no_tool_choice(v: Any) -> bool:
    return v is None or v in ("none", "auto")


class ChatCompletionCreate(_Sampling):
    NOOP = {
        "tools": (_empty, "tools (function calling) are not offered"),
        "functions": (_empty, "functions (function calling) are not offered"),
        "tool_choice": (_no_tool_choice, "only 'none' or 'auto' (no tools) is offered"),
        "function_call": (_no_tool_choice, "only 'none' or 'auto' (no functions) is offered"),
        "modalities": (_text_only, "only ['text'] is offered"),
        "audio": (_none, "audio output is not offered"),
        "prediction": (_none, "predicted outputs are not offered"),
        "reasoning_effort": (_none, "the models do not reason in separate tokens"),
        "verbosity": (_none, "not offered"),
        "web_search_options": (_none, "web search is not offered"),
        "store": (_false, "completions are not stored (only store: false is offered)"),
    }
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=64)
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool | None = Field(None, description="Log probabilities of the reply's tokens.")
    top_logprobs: int | None = Field(None, ge=0, description="Top alternatives per token (logprobs must be true).")
    metadata: dict[Key, MetaValue] | None = Field(None, max_length=16, description="Ignored (a label).")
    store: bool | None = None
    parallel_tool_calls: bool | None = Field(None, description="Ignored: there are no tools.")
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = Field(
        None, description="Ignored: every request is served the same way.")
    safety_identifier: Label | None = Field(None, description="Ignored (a label).")
    prompt_cache_key: Label | None = Field(None, description="Ignored: the prompt cache needs no key.")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(None, description="Ignored.")
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None

    def unsupported(self) -> None:
        super().unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "invalid_request",
                           "Invalid value for 'top_logprobs': logprobs must be set to true when top_logprobs is used",
                           "top_logprobs")
