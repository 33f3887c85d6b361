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

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..backends import open_backend
from ..errors import QwenDeployError
from ..runtime.backend import Backend
from ..runtime.decode import Batch
from .sequence import SequenceState, StreamDelta

METHODS = ("none", "prompt_lookup", "draft")


class Drafter(Protocol):
    default_k: int  # tokens drafted per target forward unless the caller says otherwise

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

    def add(self, other: SpeculativeStats) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.forwards += other.forwards
        self.tokens += other.tokens

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
    `max_ngram` down to 1) occurred, and what followed it there; `reference` tokens (a predicted
    answer) are searched as if they came before the prompt."""

    default_k = 8  # real 0.5B, code edit: 3.05x at k 8 and 12, 2.96x at 16; no loss on prose

    def __init__(self, max_ngram: int = 3, reference: list[int] | None = None):
        self.max_ngram = max_ngram
        self.reference = list(reference or [])

    def propose(self, tokens: list[int], k: int) -> list[int]:
        seq = np.asarray(self.reference + list(tokens))
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

    # real 0.5B, int8 drafting for fp32 (acceptance 0.9-0.99): 1.35-1.55x at k 8, 1.47-1.83x at
    # 12, 1.33-1.94x at 16; each draft token costs a draft forward, so longer drafts pay off
    # only while the draft keeps agreeing
    default_k = 12

    def __init__(self, backend: Backend, target_vocab: int):
        check_vocab(backend, target_vocab)
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


class Speculation:
    """One sequence decoded speculatively on a one-row batch of its own that holds its prompt,
    a round at a time: `begin` samples the first token from the prefill's logits, each round
    drafts up to k tokens and verifies them in one target forward. Callers stop when
    `state.finished`."""

    def __init__(
        self,
        batch: Batch,
        state: SequenceState,
        drafter: Drafter,
        k: int | None,
        stats: SpeculativeStats,
    ):
        self.batch, self.state, self.drafter, self.stats = batch, state, drafter, stats
        self.k = k or drafter.default_k
        self.tokens = list(state.prompt_ids)  # the prompt and every token generated
        self.last: int | None = None  # the newest token, not yet fed to the model

    def begin(self, logits: np.ndarray) -> StreamDelta:
        """The first token, from the prompt's last logits [vocab]."""
        return self._append(self.state.sampler(logits))

    def round(self) -> list[StreamDelta]:
        """The tokens of one target forward (one or more), as deltas."""
        room = (self.state.params.max_tokens or self.k + 1) - len(self.state.completion_ids)
        drafts = self.drafter.propose(self.tokens, min(self.k, room - 1)) if room > 1 else []
        start = self.batch.length
        logits = self.batch.extend(np.array([[self.last, *drafts]]))[0]
        self.stats.forwards += 1
        self.stats.drafted += len(drafts)
        deltas = []
        for j in range(len(drafts) + 1):  # logits[j] follows [last, *drafts][j]
            token = self.state.sampler(logits[j])
            deltas.append(self._append(token))
            if self.state.finished:
                break
            if j < len(drafts) and token == drafts[j]:
                self.stats.accepted += 1
                continue
            self.batch.truncate(start + j + 1)  # keep [last, *drafts[:j]]
            break
        return deltas

    def _append(self, token: int) -> StreamDelta:
        self.tokens.append(token)
        self.last = token
        self.stats.tokens += 1
        return self.state.append(token)


@dataclass
class Speculator:
    """The speculative decoding a command or server offers: its default method, the draft
    artifact's backend (for "draft") and k (None: each drafter's default_k); a fresh drafter per
    request."""

    target_vocab: int
    method: str | None = None  # None, "prompt_lookup" or "draft"
    draft: Backend | None = None
    draft_tokens: int | None = None

    def __post_init__(self):
        if self.method not in (None, *METHODS[1:]):
            raise QwenDeployError(f"unknown speculative method {self.method!r}.")
        if self.method == "draft" and self.draft is None:
            raise QwenDeployError("speculative method 'draft' needs a draft artifact (--draft).")
        if self.draft is not None:
            check_vocab(self.draft, self.target_vocab)

    @classmethod
    def open(
        cls,
        target_vocab: int,
        prompt_lookup: bool = False,
        draft: str | Path | None = None,
        draft_tokens: int | None = None,
        provider: str = "cpu",
        threads: int | None = None,
    ) -> Speculator:
        """From the command-line options: --prompt-lookup or --draft ART (loaded here)."""
        if prompt_lookup and draft:
            raise QwenDeployError("choose one drafter: --prompt-lookup or --draft.")
        backend = open_backend(draft, provider=provider, threads=threads) if draft else None
        method = "prompt_lookup" if prompt_lookup else "draft" if draft else None
        return cls(target_vocab, method, backend, draft_tokens)

    def drafter(
        self, method: str | None = None, reference: list[int] | None = None
    ) -> Drafter | None:
        """A drafter for one request: `method` overrides the default ("none" turns it off);
        `reference` (token ids of text the answer likely repeats, OpenAI's `prediction`) is
        looked up too, and alone selects prompt lookup."""
        if method is None:
            method = "prompt_lookup" if reference and self.method is None else self.method
        if method in (None, "none"):
            return None
        if method == "prompt_lookup":
            return PromptLookup(reference=reference or [])
        if method == "draft":
            if self.draft is None:
                raise QwenDeployError(
                    "speculative 'draft' needs a draft model; start the server with --draft ART."
                )
            return DraftModel(self.draft, self.target_vocab)
        raise QwenDeployError(
            f"unknown speculative method {method!r}; use one of: {', '.join(METHODS)}."
        )


def check_vocab(draft: Backend, target_vocab: int) -> None:
    """A draft must share the target's tokenizer (checked by vocabulary size)."""
    vocab = draft.manifest.model.vocab_size
    if vocab != target_vocab:
        raise QwenDeployError(
            f"the draft artifact's vocabulary ({vocab}) differs from the target's "
            f"({target_vocab}): a draft must share the target's tokenizer."
        )
