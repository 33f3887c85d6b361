"""One request's output bookkeeping: detokenize, stop, count, split reasoning.

Shared by the Generator and the batching engine; the caller samples (state.sampler) and feeds
each token to `append`, which returns what a stream should send for it. Text that might be the
start of a stop string is held back until the next tokens settle it, so a stop string split
across tokens is found and never leaks into the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from .reasoning import ReasoningParser, held_tail, prompt_opens_think
from .sampling import Sampler, SamplingParams, TokenLogprob
from .tokenizer import IncrementalDecoder, Tokenizer

PROMPT_TAIL = 8  # prompt tokens decoded to see whether the template opened <think>


def opens_think(tokenizer: Tokenizer, prompt_ids: list[int]) -> bool:
    """Whether the prompt itself opened a think block (a template that starts the answer with
    <think>): its output is reasoning from the first token."""
    return prompt_opens_think(tokenizer.decode(prompt_ids[-PROMPT_TAIL:]))


@dataclass
class StreamDelta:
    """What one generated token adds: raw text, its content/reasoning split, and the end reason."""

    token_id: int | None
    text: str
    content: str
    reasoning_content: str
    finish_reason: str | None  # "stop" | "length" | None
    logprob: TokenLogprob | None = None  # when the request asked for logprobs


class SequenceState:
    """Output of one sequence; `finished` once a stop id, a stop string or max_tokens is hit."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, reasoning: bool
    ):
        self.prompt_ids = list(prompt_ids)
        self.params = params
        constraint = tokenizer.constraint(params.grammar) if params.grammar else None
        self.sampler = Sampler(params, self.prompt_ids, constraint)
        self.completion_ids: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.text = ""
        self.content = ""
        self.reasoning_content = ""
        self._decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self._stop_ids = set(params.stop_token_ids)
        self._pending = ""  # decoded, not yet released: may be the start of a stop string
        self._parser = None
        if reasoning:
            self._parser = ReasoningParser(started=opens_think(tokenizer, self.prompt_ids))

    @property
    def saw_reasoning(self) -> bool:
        """True when the output had a think block (or the prompt opened one)."""
        return bool(self._parser and self._parser.saw_reasoning)

    def append(self, token_id: int) -> StreamDelta:
        """Record one generated token; return the text it releases and whether output ended."""
        if self.finished:
            raise RuntimeError("append() on a finished sequence")
        token_id = int(token_id)
        self.completion_ids.append(token_id)
        reason = None
        if token_id in self._stop_ids:  # the stop token itself is not text
            reason, new = "stop", self._decoder.flush()
        else:
            new = self._decoder.push(token_id)
            if (
                self.params.max_tokens is not None
                and len(self.completion_ids) >= self.params.max_tokens
            ):
                reason, new = "length", new + self._decoder.flush()
        self._pending += new
        hits = [i for i in (self._pending.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            reason, self._pending = "stop", self._pending[: min(hits)]
        if reason is None:
            keep = held_tail(self._pending, self.params.stop) if self.params.stop else 0
            out, self._pending = (
                self._pending[: len(self._pending) - keep],
                self._pending[len(self._pending) - keep :],
            )
        else:
            out, self._pending = self._pending, ""
            self.finished, self.finish_reason = True, reason
        return self._release(token_id, out, reason)

    def end(self, reason: str) -> StreamDelta:
        """Finish without generating (max_tokens 0: the prompt was only scored)."""
        self.finished, self.finish_reason = True, reason
        return StreamDelta(None, "", "", "", reason)

    def _release(self, token_id: int, text: str, reason: str | None) -> StreamDelta:
        if self._parser is None:
            reasoning, content = "", text
        else:
            reasoning, content = self._parser.push(text)
            if reason is not None:
                tail_reasoning, tail_content = self._parser.flush()
                reasoning, content = reasoning + tail_reasoning, content + tail_content
        self.text += text
        self.content += content
        self.reasoning_content += reasoning
        logprob = self.sampler.last_logprob if self.params.logprobs is not None else None
        return StreamDelta(token_id, text, content, reasoning, reason, logprob)
