"""Generation on one artifact: prompt ids from text or chat messages, prefill, then decode.

The model runs through runtime.decode.Batch (left-padded rows: each row gets the same tokens it
would get alone), on whichever backend the artifact's manifest names. The manifest's
max_position_embeddings bounds prompt + output: a prompt that leaves no room is refused, and
max_tokens is clipped so the output ends with finish_reason "length" at the limit.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import QwenDeployError
from ..manifest import Manifest
from ..runtime.backend import Backend, open_backend
from ..runtime.decode import Batch
from .requests import PreparedRequest, RequestBuilder
from .sampling import SamplingParams, TokenLogprob, token_logprob
from .sequence import SequenceState, StreamDelta
from .speculative import Drafter, Speculation, SpeculativeStats


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    content: str
    reasoning_content: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    speculative: dict | None = None  # acceptance statistics when a drafter was used


class Generator(RequestBuilder):
    """An artifact loaded on a backend, with its tokenizer, chat template and sampling defaults
    (RequestBuilder: how requests are prepared)."""

    def __init__(
        self,
        artifact: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        backend: Backend | None = None,
    ):
        folder = Path(artifact)
        manifest = Manifest.load(folder)
        self.backend = backend or open_backend(folder, provider, threads)
        limit = min(manifest.model.max_position_embeddings, self.backend.capabilities.max_positions)
        super().__init__(folder, manifest, limit)
        self.pad_id = manifest.pad_id

    def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (the first has none),
        for `echo`: one prefill that keeps every position's logits, on a cache of its own."""
        logits = Batch(self.backend, 1).prefill([prompt_ids], self.pad_id, last_only=False)
        first = TokenLogprob(int(prompt_ids[0]), None, [])
        rest = [
            token_logprob(logits[0, i - 1], prompt_ids[i], top) for i in range(1, len(prompt_ids))
        ]
        return [first, *rest]

    # -- generation ----------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
        params: SamplingParams | None = None,
        drafter: Drafter | None = None,
        draft_tokens: int | None = None,
        stats: SpeculativeStats | None = None,
        request: PreparedRequest | None = None,
        **overrides,
    ) -> Iterator[StreamDelta]:
        """Yield one StreamDelta per generated token; the last one has a finish_reason.

        `request` (from `prepare`) replaces prompt/messages/params. With a `drafter`
        (speculative.py) up to `draft_tokens` tokens (None: its default_k) are drafted per target
        forward: the same output, fewer forwards; `stats` (if given) counts the acceptance."""
        state = self._state(request or self.prepare(prompt, messages, params, **overrides))
        yield from self._one(state, drafter, draft_tokens, stats or SpeculativeStats())

    def generate(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
        params: SamplingParams | None = None,
        drafter: Drafter | None = None,
        draft_tokens: int | None = None,
        request: PreparedRequest | None = None,
        **overrides,
    ) -> GenerationResult:
        """The whole completion of one prompt (speculative with a `drafter`, as in stream)."""
        state = self._state(request or self.prepare(prompt, messages, params, **overrides))
        stats = SpeculativeStats()
        for _ in self._one(state, drafter, draft_tokens, stats):
            pass
        result = generation_result(state)
        if drafter is not None:
            result.speculative = stats.to_dict()
        return result

    def _one(
        self, state: SequenceState, drafter: Drafter | None, k: int | None, stats: SpeculativeStats
    ) -> Iterator[StreamDelta]:
        if drafter is None:
            for deltas in self.run([state]):
                yield deltas[0]
            return
        speculation = Speculation(
            self._batch([state], len(state.prompt_ids)), state, drafter, k, stats
        )
        while not state.finished:
            yield from speculation.round()

    def generate_batch(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[GenerationResult]:
        """Complete several token-id prompts together in one left-padded batch."""
        states = self.states(prompts, params)
        for _ in self.run(states):
            pass
        return [generation_result(s) for s in states]

    def states(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[SequenceState]:
        """One checked SequenceState per token-id prompt (context limit applied)."""
        if len(prompts) != len(params) or not prompts:
            raise QwenDeployError(
                f"a batch needs one SamplingParams per prompt (got {len(prompts)} prompts and "
                f"{len(params)} params)."
            )
        return [
            self._state(self.prepare(prompt=list(ids), params=p))
            for ids, p in zip(prompts, params, strict=True)
        ]

    def _state(self, request: PreparedRequest) -> SequenceState:
        return SequenceState(request.prompt_ids, request.params, self.tokenizer, request.reasoning)

    def run(self, states: list[SequenceState]) -> Iterator[list[StreamDelta | None]]:
        """Prefill all rows, then decode one token per row per step until every row finished.

        Yields each step's deltas (None for rows that had already finished); finished rows
        leave the batch.
        """
        width = max(len(s.prompt_ids) for s in states)
        batch = self._batch(states, width)
        logits = batch.prefill([s.prompt_ids for s in states], self.pad_id)[:, -1]
        rows = list(range(len(states)))  # the state behind each batch row
        while True:
            step: list[StreamDelta | None] = [None] * len(states)
            next_ids = np.full(len(rows), self.pad_id, np.int64)
            for row, index in enumerate(rows):
                state = states[index]
                if not state.finished:
                    next_ids[row] = token = state.sampler(logits[row])
                    step[index] = state.append(token)
            yield step
            live = [row for row, index in enumerate(rows) if not states[index].finished]
            if not live:
                return
            if len(live) < len(rows):
                batch.keep(live)
                rows, next_ids = [rows[r] for r in live], next_ids[live]
            logits = batch.step(next_ids)

    def _batch(self, states: list[SequenceState], width: int) -> Batch:
        """An empty batch for `states`, its cache sized for the whole run."""
        longest = max(s.params.max_tokens or self.max_context for s in states)
        return Batch(self.backend, len(states), min(width + longest, self.max_context))


def generation_result(state: SequenceState) -> GenerationResult:
    """A finished sequence as the caller sees it."""
    return GenerationResult(
        token_ids=list(state.completion_ids),
        text=state.text,
        content=state.content,
        reasoning_content=state.reasoning_content if state.saw_reasoning else None,
        finish_reason=state.finish_reason,
        prompt_tokens=len(state.prompt_ids),
        completion_tokens=len(state.completion_ids),
    )
