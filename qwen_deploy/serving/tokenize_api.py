"""vLLM's tokenizer endpoints: POST /tokenize, POST /detokenize, GET /tokenizer_info.

Same request and response shapes as vLLM's, so clients written for it work here: lm-eval's
`local-completions` probes /tokenizer_info and, when it answers, tokenizes through /tokenize
(its `remote` tokenizer backend) instead of downloading a tokenizer named after the served
model, which fails offline. The ids are the ones generation uses: a prompt through the
artifact's Tokenizer, chat messages through the same role checks and chat template as
/v1/chat/completions (so `count` equals that endpoint's usage.prompt_tokens for the same
messages and tools). The API key, the Host check and the body limit cover these routes as
they cover the others; tokenization runs off the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import QwenDeployError
from ..generation.requests import RequestBuilder, TemplateKwargsError, check_template_kwargs
from ..generation.tokenizer import tokenizer_config
from ..generation.tool_calls import ToolError, plan_tools
from .openai_schema import ChatMessage, FieldError, RequestBody, Tool, tool_dicts

# server.py imports this module inside create_app, so server.py is complete by then
from .server import OpenAIError, OpenAIServer, _templated

# tokenizer_config.json entries that name the checkpoint's files: meaningless to a client
FILE_FIELDS = ("vocab_file", "merges_file", "tokenizer_file")


class TokenizeRequest(RequestBody):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`), as one
    body: exactly one of the two is sent."""

    model: str | None = None  # optional, as in vLLM; a wrong one is a 404
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    # default: True for a prompt, False for messages (the chat template writes them), as vLLM
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    tools: list[Tool] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if self.prompt is None and self.messages is None:
            raise FieldError(
                "prompt", "send `prompt` (text) or `messages` (a chat) to tokenize; got neither."
            )
        if self.prompt is not None and self.messages is not None:
            raise FieldError(
                "messages", "send either `prompt` or `messages` to tokenize, not both."
            )
        if self.messages is None:
            chat_only = ("tools", "chat_template", "chat_template_kwargs")
            sent = [name for name in chat_only if getattr(self, name) is not None]
            if sent:
                raise FieldError(sent[0], f"{sent[0]} applies to `messages`, not to a prompt.")
        return self

    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfoResponse(BaseModel):
    """tokenizer_config.json as the tokenizer sees it (vLLM's shape: special tokens as their
    text, added_tokens_decoder as id -> text, the chat template served), plus tokenizer_class."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str


def tokenizer_info(builder: RequestBuilder) -> TokenizerInfoResponse:
    """The artifact's tokenizer configuration, as vLLM's /tokenizer_info reports it: what
    lm-eval reads is eos_token, bos_token, pad_token and chat_template."""
    config = {k: v for k, v in tokenizer_config(builder.folder).items() if k not in FILE_FIELDS}
    config.update(builder.tokenizer.special_tokens)  # resolved, AddedToken dicts as their text
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        config["added_tokens_decoder"] = {
            str(i): spec.get("content") if isinstance(spec, dict) else spec
            for i, spec in decoder.items()
        }
    if builder.chat_template is not None:  # the one served (chat_template.jinja or the config)
        config["chat_template"] = builder.chat_template.source
    config["tokenizer_class"] = str(config.get("tokenizer_class") or "PreTrainedTokenizerFast")
    return TokenizerInfoResponse(**config)


class TokenizerAPI:
    """The endpoints' work on one server's model: its RequestBuilder (the Generator), tokenizer
    and context limit."""

    def __init__(self, server: OpenAIServer):
        self.server = server
        self.builder: RequestBuilder = server.generator
        self.info = tokenizer_info(self.builder)

    def tokenize(self, body: TokenizeRequest) -> TokenizeResponse:
        """(Off the loop.) The ids of the prompt, or of the messages as the chat endpoint
        renders them."""
        tokenizer = self.builder.tokenizer
        text = body.prompt if body.messages is None else self._chat_text(body)
        ids = tokenizer.encode(text, add_special_tokens=body.special_tokens())
        strs = [tokenizer.id_to_token(i) or "" for i in ids] if body.return_token_strs else None
        return TokenizeResponse(
            count=len(ids),
            max_model_len=self.server.engine.max_context,
            tokens=ids,
            token_strs=strs,
        )

    def _chat_text(self, body: TokenizeRequest) -> str:
        if body.chat_template is not None:
            raise OpenAIError(
                400,
                "chat_template is not supported here: this server renders the artifact's own "
                "template (GET /tokenizer_info shows it); omit chat_template.",
                param="chat_template",
            )
        if body.continue_final_message:
            raise OpenAIError(
                400,
                "continue_final_message is not supported by this server (nor by its chat "
                "completions); send add_generation_prompt instead.",
                param="continue_final_message",
            )
        messages = [_templated(i, m) for i, m in enumerate(body.messages or [])]
        try:  # the tools the chat endpoint hands the template
            plan = plan_tools(tool_dicts(body.tools), None)
            check_template_kwargs(body.chat_template_kwargs)
            return self.builder.chat_text(
                messages,
                plan.tools,
                add_generation_prompt=body.add_generation_prompt,
                **(body.chat_template_kwargs or {}),
            )
        except ToolError as e:
            raise OpenAIError(400, str(e), param=e.param) from e
        except TemplateKwargsError as e:
            raise OpenAIError(400, str(e), param="chat_template_kwargs") from e
        except (ValueError, TypeError, QwenDeployError) as e:
            raise OpenAIError(400, str(e), param="messages") from e

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        """(Off the loop.) The text of the ids, special tokens included."""
        try:
            ids = self.builder.check_token_ids(body.tokens)
        except QwenDeployError as e:
            raise OpenAIError(400, str(e), param="tokens") from e
        return DetokenizeResponse(prompt=self.builder.tokenizer.decode(ids))


def add_tokenizer_routes(app: FastAPI, server: OpenAIServer, auth: list[Any]) -> None:
    """Register /tokenize, /detokenize and /tokenizer_info on `app`, behind `auth` (the
    dependencies the other routes have)."""
    api = TokenizerAPI(server)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        server.check_model(body.model)
        return await server.off_loop(lambda: api.tokenize(body))

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        server.check_model(body.model)
        return await server.off_loop(lambda: api.detokenize(body))

    @app.get("/tokenizer_info", dependencies=auth)
    async def info() -> TokenizerInfoResponse:
        return api.info
