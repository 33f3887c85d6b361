"""One request's preparation, shared by generate/chat, the HTTP server and the Triton model: prompt
ids (chat messages through the template), their checks, the sampling parameters with the
artifact's defaults, the context limit, and whether the output's <think> block is reasoning.

One path, so the three front ends cannot disagree: a chat request's output is split into
reasoning and content wherever it is served.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import QwenDeployError
from ..manifest import Manifest
from .chat_template import ChatTemplate
from .sampling import SamplingParams
from .sequence import opens_think
from .tokenizer import Tokenizer, TooManyTokens


class ContextLengthError(QwenDeployError):
    """A prompt leaves no room to generate within the model's context length."""


class TemplateKwargsError(QwenDeployError):
    """Chat template kwargs that would replace the request's own messages, tools or prompt."""


# what prepare() itself hands the template: kwargs may not override them
TEMPLATE_ARGUMENTS = ("prompt", "messages", "tools", "add_generation_prompt")


@dataclass(frozen=True)
class PreparedRequest:
    """What a model needs to run one request."""

    prompt_ids: list[int]
    params: SamplingParams  # max_tokens clipped to the room the context leaves
    reasoning: bool  # split a <think> block out of the output as reasoning_content


class RequestBuilder:
    """An artifact's tokenizer, chat template and generation defaults, and its context limit."""

    def __init__(self, folder: Path, manifest: Manifest, max_context: int):
        self.folder = folder
        self.manifest = manifest
        self.tokenizer = Tokenizer.from_artifact(folder)
        self.chat_template = (
            ChatTemplate(manifest.chat_template, self.tokenizer.special_tokens)
            if manifest.chat_template
            else None
        )
        self.max_context = max_context

    def prepare(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
        params: SamplingParams | None = None,
        tools: list[dict] | None = None,
        template_kwargs: dict | None = None,
        suffix: str = "",
        reasoning: bool | None = None,
        max_context: int | None = None,
        **overrides,
    ) -> PreparedRequest:
        """A checked request from a raw prompt (text or ids) or chat messages (with `tools` and
        `template_kwargs` for the template; `suffix` text appended after it).

        reasoning None decides: chat output may think (the parser only acts on a think block
        that opens the output or that the prompt opened, so models that do not think are
        unaffected); a raw prompt only when it opened a think block itself. `max_context` lowers
        the model's limit (a server's)."""
        check_template_kwargs(template_kwargs)
        limit = self.context_limit(max_context)
        try:
            ids = self._prompt_ids(prompt, messages, tools, limit, **(template_kwargs or {}))
        except TooManyTokens as e:  # no room to generate, whatever the suffix
            count = e.count + (len(self.tokenizer.encode(suffix)) if suffix else 0)
            raise _context_error(limit, count, e.at_least) from None
        if suffix:
            ids += self.tokenizer.encode(suffix)
        if reasoning is None:
            reasoning = messages is not None and self.chat_template is not None
            reasoning = reasoning or opens_think(self.tokenizer, ids)
        params = self.sampling_params(params, **overrides)
        return PreparedRequest(ids, self.check_context(ids, params, max_context), reasoning)

    def prompt_ids(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> list[int]:
        """Token ids of a raw prompt (text or ids) or of chat messages through the chat template."""
        return self._prompt_ids(prompt, messages, tools, None, **template_kwargs)

    def _prompt_ids(
        self,
        prompt: str | list[int] | None,
        messages: list[dict] | None,
        tools: list[dict] | None,
        limit: int | None,
        **template_kwargs,
    ) -> list[int]:
        """prompt_ids; a text of `limit` tokens or more raises TooManyTokens (Tokenizer.encode)."""
        if (prompt is None) == (messages is None):
            raise QwenDeployError("give either a prompt or chat messages, not both or neither.")
        if messages is not None:
            ids = self.tokenizer.encode(self.chat_text(messages, tools, **template_kwargs), limit)
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, limit)
        else:
            ids = self.check_token_ids(prompt, "prompt token ids")
        if not ids:
            raise QwenDeployError("the prompt is empty; send at least one token.")
        return ids

    def chat_text(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs,
    ) -> str:
        """The prompt text of chat messages: the chat template rendered (ChatTemplate.render)."""
        if self.chat_template is None:
            raise QwenDeployError(
                f"{self.folder} has no chat template (e.g. a base model): send a raw prompt "
                "instead of chat messages (`--raw` on the command line)."
            )
        return self.chat_template.render(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
        )

    def check_token_ids(self, ids: list[int], what: str = "token ids") -> list[int]:
        """`ids` as ints; ids outside the model's vocabulary are refused (QwenDeployError)."""
        ids = [int(t) for t in ids]
        vocab = self.manifest.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise QwenDeployError(f"{what} {bad[:5]} are outside [0, {vocab}).")
        return ids

    def sampling_params(self, params: SamplingParams | None = None, **overrides) -> SamplingParams:
        """`params` (or the artifact's defaults) with `overrides` applied and validated."""
        if params is None:
            return SamplingParams.from_defaults(self.manifest, **overrides)
        return params.replace(**overrides) if overrides else params

    def context_limit(self, max_context: int | None = None) -> int:
        """The context a request may fill: the model's, or a lower `max_context`."""
        return min(max_context or self.max_context, self.max_context)

    def check_context(
        self, prompt_ids: list[int], params: SamplingParams, max_context: int | None = None
    ) -> SamplingParams:
        """Refuse a prompt that fills the context (one that is only scored, max_tokens 0, may
        fill it); clip max_tokens to the room that is left."""
        limit = self.context_limit(max_context)
        room = limit - len(prompt_ids)
        if room < (params.max_tokens != 0):
            raise _context_error(limit, len(prompt_ids))
        if params.max_tokens is None or params.max_tokens > room:
            return params.replace(max_tokens=room)
        return params


def check_template_kwargs(template_kwargs: dict | None) -> None:
    """Refuse chat template kwargs that would replace the request's own messages, tools or
    prompt (TemplateKwargsError)."""
    taken = sorted(set(template_kwargs or {}) & set(TEMPLATE_ARGUMENTS))
    if taken:
        raise TemplateKwargsError(
            f"chat template kwargs may not set {', '.join(taken)}: the request's own fields "
            "give them; send the value there instead."
        )


def _context_error(limit: int, count: int, at_least: bool = False) -> ContextLengthError:
    has = f"at least {count}" if at_least else f"{count}"
    return ContextLengthError(
        f"this model's maximum context length is {limit} tokens, but the prompt has {has} "
        "tokens (at least one must be left to generate); shorten the prompt or the conversation."
    )
