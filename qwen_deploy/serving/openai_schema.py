"""OpenAI request bodies as pydantic models: types are checked here, value ranges by SamplingParams.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do, so clients that send
extra options (user, metadata, ...) keep working. Strings holding a lone surrogate (JSON allows a
"\\ud800" escape; no UTF-8 text can) are refused by path before anything else reads them.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..generation.sampling import MAX_LOGPROBS
from ..generation.structured import grammar_for

SURROGATE = re.compile("[\ud800-\udfff]")


class FieldError(ValueError):
    """A request field whose value cannot be served; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def lone_surrogate(value: Any) -> str | None:
    """The path (messages.0.content) of the first string or key holding a lone surrogate; None
    if there is none. Iterative: a deeply nested body must not exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str) and not item.isascii() and SURROGATE.search(item):
            return path or "body"
        if not isinstance(item, (dict, list)):
            continue
        for key, child in item.items() if isinstance(item, dict) else enumerate(item):
            if isinstance(key, str) and SURROGATE.search(key):
                return path or "body"  # the key itself cannot be named in the answer
            stack.append((f"{path}.{key}" if path else str(key), child))
    return None


class StreamOptions(BaseModel):
    include_usage: bool = False


class Prediction(BaseModel):
    """OpenAI's predicted output: text the answer is expected to repeat (served by speculative
    decoding: drafts are looked up in it)."""

    type: Literal["content"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" for part in self.content):
            raise FieldError("prediction", "prediction content parts must be of type 'text'.")
        return "".join(str(part.get("text", "")) for part in self.content)


class RequestBody(BaseModel):
    """A request body: unknown fields ignored, lone surrogates refused by path."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        path = lone_surrogate(data)
        if path is not None:
            raise FieldError(
                path,
                f"{path} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is "
                "not valid Unicode; send well-formed text.",
            )
        return data


class SamplingFields(RequestBody):
    """The decoding options both endpoints share; None means the artifact's default."""

    model: str
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None  # token id (a string in JSON) -> [-100, 100]
    prediction: Prediction | None = None
    speculative: str | None = None  # extension: "none", "prompt_lookup" or "draft"

    def requested_logprobs(self) -> int | None:
        """How many top alternatives each token's logprobs should list; None: no logprobs."""
        return None

    def sampling_overrides(self) -> dict[str, Any]:
        """Keyword overrides for SamplingParams.from_defaults (None keeps the default)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "stop_token_ids": self.stop_token_ids,
            "logprobs": self.requested_logprobs(),
            "grammar": self._grammar(),
            "logit_bias": self.logit_bias,
        }

    def _grammar(self) -> str | None:
        try:
            return grammar_for(self.response_format)
        except ValueError as e:
            raise FieldError("response_format", str(e)) from e


class FunctionCall(BaseModel):
    """An assistant turn's call: OpenAI sends the arguments as JSON text."""

    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str | dict[str, Any] = "{}"


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    """A declared tool; typed so a malformed one is refused by its own path (tools.0.function)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"] = "function"
    function: FunctionSpec


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it: text parts joined into one string (and ""
        for none: an assistant turn that only calls tools has null content, which templates
        concatenate), tool call arguments as objects (templates write them with tojson; OpenAI
        sends JSON text). FieldError params are relative to the message (content.0)."""
        message = self.model_dump(exclude_none=True)
        message.setdefault("content", "")
        for i, call in enumerate(message.get("tool_calls", [])):
            function = call["function"]
            if isinstance(function["arguments"], str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except (ValueError, RecursionError) as e:
                    raise FieldError(
                        f"tool_calls.{i}.function.arguments",
                        f"tool call arguments are not valid JSON ({e}); send a JSON object.",
                    ) from e
        if isinstance(self.content, list):
            texts = []
            for i, part in enumerate(self.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise FieldError(
                        f"content.{i}",
                        f"content part of type {part.get('type')!r} is not supported; "
                        'this model reads text parts only ({"type": "text", "text": ...}).',
                    )
                texts.append(part["text"])
            message["content"] = "".join(texts)
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    def requested_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise FieldError(
                "top_logprobs",
                f"top_logprobs={self.top_logprobs} is out of range: it must be an integer in "
                f"[0, {MAX_LOGPROBS}].",
            )
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise FieldError("top_logprobs", "top_logprobs needs logprobs: true.")
            return None
        return self.top_logprobs or 0

    def sampling_overrides(self) -> dict[str, Any]:
        """max_completion_tokens, OpenAI's newer name of max_tokens, wins when both are sent."""
        overrides = super().sampling_overrides()
        limit = self.max_completion_tokens
        if limit is not None and limit < 1:
            raise FieldError(
                "max_completion_tokens",
                f"max_completion_tokens={limit} is out of range: it must be an integer >= 1 or "
                "null.",
            )
        if limit is not None:
            overrides["max_tokens"] = limit
        return overrides


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text or token-id list, or a list of them (OpenAI's batch form)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def tool_dicts(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """Declared tools as the chat template and the tool-call parser take them."""
    return None if tools is None else [t.model_dump(exclude_none=True) for t in tools]
