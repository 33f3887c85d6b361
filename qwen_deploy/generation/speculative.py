"""Speculative decoding: a cheap drafter proposes k tokens, the target checks them in one forward.

Batch-1 decode is bound by reading the weights once per token; a forward over k+1 tokens reads
them once too, so every accepted draft token is a token for free. Drafters propose greedily, so a
draft is one token per position (a one-hot draft distribution). For such drafts speculative
sampling's rule (accept d with probability min(1, p(d)/q(d)) = p(d), else sample from p without
d) is exactly "sample t from the target's p at that position; accept while t equals the draft":
so the target samples every position with its own sampler (penalties, warpers, seed, grammar)
and the output is the target's, token for token the same as plain decoding for greedy and for a
seed. Rejected positions are dropped from the target's cache and from the draft model's.

Drafters: PromptLookup (n-gram matches in the prompt and the text so far: no model; pays off
when the answer copies its input, as code edits do) and DraftModel (a smaller or more quantized
artifact with the same vocabulary).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import QwenDeployError
from ..runtime.backend import Backend
from ..runtime.decode import Batch
from .sequence import SequenceState, StreamDelta

DRAFT_TOKENS = 6  # k: tokens drafted per target forward


class Drafter(Protocol):
    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `tokens` (the prompt and every token so far)."""


@dataclass
class SpeculativeStats:
    """Acceptance of one run: drafted and accepted tokens, target forwards after the prefill."""

    drafted: int = 0
    accepted: int = 0
    forwards: int = 0
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def to_dict(self) -> dict:
        return {
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance,
            "target_forwards": self.forwards,
            "tokens_per_forward": self.tokens_per_forward,
        }


class PromptLookup:
    """Drafts by n-gram lookup: the latest earlier place where the last n tokens (n from
    `max_ngram` down to 1) occurred, and what followed it there."""

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def propose(self, tokens: list[int], k: int) -> list[int]:
        seq = np.asarray(tokens)
        for n in range(min(self.max_ngram, len(seq) - 1), 0, -1):
            tail = seq[-n:]
            starts = np.flatnonzero(np.all(_windows(seq[:-1], n) == tail, axis=1))
            if len(starts):
                follow = int(starts[-1]) + n
                return [int(t) for t in seq[follow : follow + k]]
        return []


def _windows(seq: np.ndarray, n: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(seq, n) if len(seq) >= n else seq[:0, None]


class DraftModel:
    """Drafts greedily with a second artifact; its cache follows the accepted text (what it
    drafted beyond that is truncated away before the next proposal)."""

    def __init__(self, backend: Backend, target_vocab: int):
        vocab = backend.manifest.model.vocab_size
        if vocab != target_vocab:
            raise QwenDeployError(
                f"the draft artifact's vocabulary ({vocab}) differs from the target's "
                f"({target_vocab}): a draft must share the target's tokenizer."
            )
        self.batch = Batch(backend, 1)
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds

    def propose(self, tokens: list[int], k: int) -> list[int]:
        same = 0
        limit = min(len(self.cached), len(tokens) - 1)  # feed at least one token for logits
        while same < limit and self.cached[same] == tokens[same]:
            same += 1
        if same < len(self.cached):
            self.batch.truncate(same)
            del self.cached[same:]
        feed, drafts = tokens[same:], []
        for _ in range(k):
            logits = self.batch.extend(np.array([feed]), last_only=True)[0]
            self.cached += feed
            feed = [int(np.argmax(logits[-1]))]
            drafts.append(feed[0])
        return drafts


def speculative_deltas(
    batch: Batch, state: SequenceState, drafter: Drafter, k: int, stats: SpeculativeStats
) -> Iterator[StreamDelta]:
    """Generate `state` on the (empty, one-row) `batch` with drafts of up to k tokens; one
    delta per token."""
    tokens = list(state.prompt_ids)
    logits = batch.extend(np.array([tokens]), last_only=True)[0]
    token = state.sampler(logits[-1])
    while True:
        tokens.append(token)
        yield state.append(token)
        stats.tokens += 1
        if state.finished:
            return
        room = (state.params.max_tokens or k + 1) - len(state.completion_ids)
        drafts = drafter.propose(tokens, min(k, room - 1)) if room > 1 else []
        start = batch.length
        logits = batch.extend(np.array([[token, *drafts]]))[0]
        stats.forwards += 1
        stats.drafted += len(drafts)
        for j in range(len(drafts) + 1):  # logits[j] follows [token, *drafts][j]
            token = state.sampler(logits[j])
            if j < len(drafts) and token == drafts[j]:
                stats.accepted += 1
                tokens.append(token)
                yield state.append(token)
                stats.tokens += 1
                if state.finished:
                    return
                continue
            batch.truncate(start + j + 1)  # keep [token, *drafts[:j]]
            break
