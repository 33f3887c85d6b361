"""OpenAI request bodies as pydantic models: types are checked here, value ranges by SamplingParams.

Unknown fields are accepted and ignored, as OpenAI-compatible servers do, so clients that send
extra options (user, logit_bias=None, ...) keep working.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..generation.structured import grammar_for


class FieldError(ValueError):
    """A request field whose value cannot be served; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


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


class SamplingFields(BaseModel):
    """The decoding options both endpoints share; None means the artifact's default."""

    model_config = ConfigDict(extra="allow")

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
        }

    def _grammar(self) -> str | None:
        try:
            return grammar_for(self.response_format)
        except ValueError as e:
            raise FieldError("response_format", str(e)) from e


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None
    reasoning_content: str | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as a chat template expects it: text parts joined into one string (and ""
        for none: an assistant turn that only calls tools has null content, which templates
        concatenate), tool call arguments as objects (templates write them with tojson; OpenAI
        sends JSON text)."""
        message = self.model_dump(exclude_none=True)
        message.setdefault("content", "")
        for call in message.get("tool_calls", []):
            function = call.get("function") or {}
            if isinstance(function.get("arguments"), str):
                try:
                    function["arguments"] = json.loads(function["arguments"])
                except json.JSONDecodeError as e:
                    raise ValueError(f"tool call arguments are not valid JSON ({e}).") from e
        if isinstance(self.content, list):
            texts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(
                        f"content part of type {part.get('type')!r} is not supported; "
                        "this model reads text parts only."
                    )
                texts.append(part["text"])
            message["content"] = "".join(texts)
        return message


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise FieldError("top_logprobs", "top_logprobs needs logprobs: true.")
            return None
        return self.top_logprobs or 0


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def requested_logprobs(self) -> int | None:
        return self.logprobs


def error_body(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """The OpenAI error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
