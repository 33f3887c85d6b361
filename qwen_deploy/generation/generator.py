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

from ..backends import open_backend
from ..errors import QwenDeployError
from ..manifest import Artifact
from ..runtime.backend import Backend
from .engine import BatchEngine, EngineRequest
from .requests import PreparedRequest, RequestBuilder
from .sampling import SamplingParams
from .sequence import SequenceState, StreamDelta
from .speculative import Drafter, SpeculativeStats


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
    (RequestBuilder: how requests are prepared). Its own requests run through a BatchEngine,
    stepped in the caller's thread, which keeps the KV of earlier prompts when given
    `prefix_cache_bytes` (a chat's history is not prefilled again at every turn). An artifact
    whose weights would not fit in `max_memory` GB (default: the memory available) is refused
    before it loads."""

    def __init__(
        self,
        artifact: str | Path | Artifact,
        provider: str = "cpu",
        threads: int | None = None,
        backend: Backend | None = None,
        prefix_cache_bytes: int = 0,
        batch_invariant: bool | None = None,
        max_memory: float | None = None,
    ):
        artifact = Artifact.open(artifact)
        manifest = artifact.manifest
        self.backend = backend or open_backend(artifact, provider, threads, max_memory=max_memory)
        limit = min(manifest.model.max_position_embeddings, self.backend.capabilities.max_positions)
        super().__init__(artifact.folder, manifest, limit)
        self.pad_id = manifest.pad_id
        self.batch_invariant = batch_invariant
        self.engine = BatchEngine(
            self, prefix_cache_bytes=prefix_cache_bytes, batch_invariant=batch_invariant
        )

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
        prepared = request or self.prepare(prompt, messages, params, **overrides)
        yield from self._run(prepared, drafter, draft_tokens, stats)[1]

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
        prepared = request or self.prepare(prompt, messages, params, **overrides)
        stats = SpeculativeStats()
        queued, deltas = self._run(prepared, drafter, draft_tokens, stats)
        for _ in deltas:
            pass
        result = generation_result(queued.state)
        if drafter is not None:
            result.speculative = stats.to_dict()
        return result

    def _run(
        self,
        prepared: PreparedRequest,
        drafter: Drafter | None,
        draft_tokens: int | None,
        stats: SpeculativeStats | None,
    ) -> tuple[EngineRequest, Iterator[StreamDelta]]:
        """Queue one request on this generator's engine; its deltas as the engine is stepped."""
        deltas: list[StreamDelta | BaseException] = []
        queued = self.engine.add(prepared, deltas.append, drafter, draft_tokens, stats=stats)

        def follow() -> Iterator[StreamDelta]:
            try:
                while not queued.done or deltas:
                    if not deltas:
                        self.engine.step()
                        continue
                    item = deltas.pop(0)
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                if not queued.done:  # the caller stopped reading: free its slot
                    self.engine.cancel(queued)
                    self.engine.step()

        return queued, follow()

    def generate_batch(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[GenerationResult]:
        """Complete several token-id prompts together: they decode in one batch."""
        if len(prompts) != len(params) or not prompts:
            raise QwenDeployError(
                f"a batch needs one SamplingParams per prompt (got {len(prompts)} prompts and "
                f"{len(params)} params)."
            )
        errors: list[BaseException] = []

        def failed(item: StreamDelta | BaseException) -> None:
            if isinstance(item, BaseException):
                errors.append(item)

        engine = BatchEngine(self, max_batch=len(prompts), batch_invariant=self.batch_invariant)
        queued = [
            engine.add(self.prepare(prompt=list(ids), params=p), failed)
            for ids, p in zip(prompts, params, strict=True)
        ]
        while engine.step():
            pass
        if errors:
            raise errors[0]
        return [generation_result(q.state) for q in queued]


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
