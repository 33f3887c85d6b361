"""Generation on one artifact: prompt ids from text or chat messages, prefill, then decode.

The backend keeps the KV cache between steps; a batch is left-padded (position ids count only
real tokens), so each row gets the same tokens it would get alone. The manifest's
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
from ..runtime.backend import Backend
from ..runtime.padding import left_pad
from .chat_template import ChatTemplate
from .reasoning import prompt_opens_think
from .sampling import SamplingParams, TokenLogprob, token_logprob
from .sequence import PROMPT_TAIL, SequenceState, StreamDelta
from .speculative import DRAFT_TOKENS, Drafter, SpeculativeStats, speculative_deltas
from .tokenizer import Tokenizer


class ContextLengthError(QwenDeployError):
    """A prompt leaves no room to generate within the model's context length."""


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


def open_backend(
    artifact: Path, provider: str = "cpu", threads: int | None = None, device_id: int = 0
) -> Backend:
    """The backend an artifact runs on: TensorRT for an engine artifact (`qwen-deploy build`;
    an NVIDIA GPU, whatever `provider` says), onnxruntime on `provider` for an ONNX one."""
    if Manifest.load(artifact).engine:
        from ..tensorrt.backend import TensorRTBackend

        return TensorRTBackend(artifact, device=device_id)
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend

    return OnnxRuntimeBackend(artifact, provider=provider, threads=threads)


class Generator:
    """An artifact loaded on a backend, with its tokenizer, chat template and sampling defaults."""

    def __init__(
        self,
        artifact: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        backend: Backend | None = None,
    ):
        self.folder = Path(artifact)
        self.manifest = Manifest.load(self.folder)
        self.tokenizer = Tokenizer.from_artifact(self.folder)
        self.chat_template = (
            ChatTemplate(self.manifest.chat_template, self.tokenizer.special_tokens)
            if self.manifest.chat_template
            else None
        )
        self.backend = backend or open_backend(self.folder, provider, threads)
        self.pad_id = self.manifest.pad_id
        self.max_context = self.manifest.model.max_position_embeddings
        # onnxruntime: caches sized for the run and bound to the device, rows can leave a batch
        self._bound_caches = hasattr(self.backend, "bound_cache")

    # -- prompts -------------------------------------------------------------------------------
    def prompt_ids(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
        tools: list[dict] | None = None,
        **template_kwargs,
    ) -> list[int]:
        """Token ids of a raw prompt (text or ids) or of chat messages through the chat template."""
        if (prompt is None) == (messages is None):
            raise QwenDeployError("give either a prompt or chat messages, not both or neither.")
        if messages is not None:
            if self.chat_template is None:
                raise QwenDeployError(
                    f"{self.folder} has no chat template (e.g. a base model): send a raw prompt "
                    "instead of chat messages (`--raw` on the command line)."
                )
            text = self.chat_template.render(
                messages, tools=tools, add_generation_prompt=True, **template_kwargs
            )
            ids = self.tokenizer.encode(text)
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            vocab = self.manifest.model.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise QwenDeployError(f"prompt token ids {bad[:5]} are outside [0, {vocab}).")
        if not ids:
            raise QwenDeployError("the prompt is empty; send at least one token.")
        return ids

    def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (the first has none),
        for `echo`: one prefill that keeps every position's logits, on a cache of its own."""
        ids = np.array([prompt_ids], np.int64)
        positions = np.arange(ids.shape[1])[None]
        logits = self.backend.forward(ids, np.ones_like(ids), positions, self.backend.new_cache(1))
        first = TokenLogprob(int(prompt_ids[0]), None, [])
        rest = [token_logprob(logits[0, i - 1], prompt_ids[i], top) for i in range(1, len(ids[0]))]
        return [first, *rest]

    def reasoning_for(self, prompt_ids: list[int]) -> bool:
        """Whether to split <think> blocks out of this prompt's output.

        On for every chat-template model: the parser only acts on a think block that opens the
        output (or that the prompt opened), so models that do not think are unaffected.
        """
        return self.chat_template is not None or self._opens_think(prompt_ids)

    def _opens_think(self, prompt_ids: list[int]) -> bool:
        return prompt_opens_think(self.tokenizer.decode(prompt_ids[-PROMPT_TAIL:]))

    def sampling_params(self, params: SamplingParams | None = None, **overrides) -> SamplingParams:
        """`params` (or the artifact's defaults) with `overrides` applied and validated."""
        if params is None:
            return SamplingParams.from_defaults(self.manifest, **overrides)
        return params.replace(**overrides) if overrides else params

    def check_context(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Refuse a prompt that fills the context; clip max_tokens to the room that is left."""
        room = self.max_context - len(prompt_ids)
        if room < 1:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but this model's context length "
                f"(max_position_embeddings) is {self.max_context}, which must also hold at least "
                "one generated token: shorten the prompt or the conversation."
            )
        if params.max_tokens is None or params.max_tokens > room:
            return params.replace(max_tokens=room)
        return params

    # -- generation ----------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
        params: SamplingParams | None = None,
        drafter: Drafter | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        stats: SpeculativeStats | None = None,
        **overrides,
    ) -> Iterator[StreamDelta]:
        """Yield one StreamDelta per generated token; the last one has a finish_reason.

        With a `drafter` (speculative.py) up to `draft_tokens` tokens are drafted per target
        forward: the same output, fewer forwards; `stats` (if given) counts the acceptance."""
        state = self._state(prompt, messages, params, overrides)
        yield from self._one(state, drafter, draft_tokens, stats or SpeculativeStats())

    def generate(
        self,
        prompt: str | list[int] | None = None,
        messages: list[dict] | None = None,
        params: SamplingParams | None = None,
        drafter: Drafter | None = None,
        draft_tokens: int = DRAFT_TOKENS,
        **overrides,
    ) -> GenerationResult:
        """The whole completion of one prompt (speculative with a `drafter`, as in stream)."""
        state = self._state(prompt, messages, params, overrides)
        stats = SpeculativeStats()
        for _ in self._one(state, drafter, draft_tokens, stats):
            pass
        result = _result(state)
        if drafter is not None:
            result.speculative = stats.to_dict()
        return result

    def _one(
        self, state: SequenceState, drafter: Drafter | None, k: int, stats: SpeculativeStats
    ) -> Iterator[StreamDelta]:
        if drafter is None:
            for deltas in self.run([state]):
                yield deltas[0]
            return
        cache = self._new_cache([state], len(state.prompt_ids))
        yield from speculative_deltas(self.backend, cache, state, drafter, k, stats)

    def generate_batch(
        self, prompts: list[list[int]], params: list[SamplingParams]
    ) -> list[GenerationResult]:
        """Complete several token-id prompts together in one left-padded batch."""
        states = self.states(prompts, params)
        for _ in self.run(states):
            pass
        return [_result(s) for s in states]

    def states(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[SequenceState]:
        """One checked SequenceState per token-id prompt (context limit applied)."""
        if len(prompts) != len(params) or not prompts:
            raise QwenDeployError(
                f"a batch needs one SamplingParams per prompt (got {len(prompts)} prompts and "
                f"{len(params)} params)."
            )
        states = []
        for ids, p in zip(prompts, params, strict=True):
            ids = self.prompt_ids(prompt=list(ids))
            states.append(
                SequenceState(
                    ids, self.check_context(ids, p), self.tokenizer, self.reasoning_for(ids)
                )
            )
        return states

    def _state(self, prompt, messages, params, overrides) -> SequenceState:
        ids = self.prompt_ids(prompt=prompt, messages=messages)
        params = self.check_context(ids, self.sampling_params(params, **overrides))
        # chat output may think; a raw prompt only when it opened a think block itself
        reasoning = self.reasoning_for(ids) if messages is not None else self._opens_think(ids)
        return SequenceState(ids, params, self.tokenizer, reasoning)

    def run(self, states: list[SequenceState]) -> Iterator[list[StreamDelta | None]]:
        """Prefill all rows, then decode one token per row per step until every row finished.

        Yields each step's deltas (None for rows that had already finished). Finished rows leave
        the batch where the backend can rebuild its cache (onnxruntime); elsewhere they keep a pad
        token in it until the last row ends, their outputs ignored.
        """
        ids, mask, positions = left_pad([s.prompt_ids for s in states], self.pad_id)
        width = ids.shape[1]
        cache = self._new_cache(states, width)
        logits = self.backend.forward(ids, mask, positions, cache, last_only=True)[:, -1]
        rows = list(range(len(states)))  # the state behind each batch row
        while True:
            step: list[StreamDelta | None] = [None] * len(states)
            next_ids = np.full((len(rows), 1), self.pad_id, np.int64)
            for row, index in enumerate(rows):
                state = states[index]
                if not state.finished:
                    next_ids[row, 0] = token = state.sampler(logits[row])
                    step[index] = state.append(token)
            yield step
            live = [row for row, index in enumerate(rows) if not states[index].finished]
            if not live:
                return
            if len(live) < len(rows) and self._bound_caches:
                cache, mask = self.backend.keep_rows(cache, mask, live, cache.capacity)
                rows, next_ids, positions = [rows[r] for r in live], next_ids[live], positions[live]
            mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
            positions = positions[:, -1:] + 1
            logits = self.backend.forward(next_ids, mask, positions, cache, last_only=True)[:, -1]

    def _new_cache(self, states: list[SequenceState], width: int):
        """A cache sized for the whole run where the backend preallocates (bound, in place)."""
        if not self._bound_caches:
            return self.backend.new_cache(len(states))
        longest = max(s.params.max_tokens or self.max_context for s in states)
        return self.backend.new_cache(len(states), capacity=min(width + longest, self.max_context))


def _result(state: SequenceState) -> GenerationResult:
    return GenerationResult(
        token_ids=list(state.completion_ids),
        text=state.text,
        content=state.content,
        reasoning_content=state.reasoning_content if state.saw_reasoning else None,
        finish_reason=state.finish_reason,
        prompt_tokens=len(state.prompt_ids),
        completion_tokens=len(state.completion_ids),
    )
