"""Sampling parameters and the numpy sampler, with transformers' logits-processor semantics.

The processing order is the one transformers' `generate` applies: repetition penalty (over prompt
and generated ids), then the warpers temperature, top-k, top-p, min-p. OpenAI-style presence and
frequency penalties (over generated ids only) come right after the repetition penalty, and
OpenAI's logit_bias before all of them, on the raw logits (after a structured-output mask), as
OpenAI and vLLM add it. Each step keeps only the still-finite logits in play, so top-p/min-p sort
a top-k survivor set, not the whole vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import QwenDeployError
from ..manifest import Manifest
from .structured import Constraint

# transformers' values for what a generation_config.json leaves unset (by Generation field)
TRANSFORMERS_DEFAULTS = {
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}


@dataclass
class SamplingParams:
    """One request's decoding settings. temperature 0 (below 1e-5) means greedy (argmax after
    penalties)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # 0: the prompt is only scored (echo), nothing generated
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the sampled token's and the top k alternatives'
    grammar: str | None = None  # llguidance grammar the output must follow (structured.py)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = _token_biases(self.logit_bias)
        self.validate()

    @classmethod
    def from_defaults(cls, manifest: Manifest, **overrides) -> SamplingParams:
        """Defaults from the artifact's generation_config, then `overrides` (None = keep default).

        Like transformers, a generation config without do_sample=true decodes greedily.
        """
        gen = manifest.generation
        values = {k: getattr(gen, k) for k in TRANSFORMERS_DEFAULTS}
        values = {k: v if v is not None else TRANSFORMERS_DEFAULTS[k] for k, v in values.items()}
        if not gen.do_sample:
            values["temperature"] = 0.0
        values["max_tokens"] = gen.max_new_tokens
        values["stop_token_ids"] = list(manifest.eos_token_ids)
        unknown = sorted(set(overrides) - set(cls.__dataclass_fields__))
        if unknown:
            raise QwenDeployError(
                f"unknown sampling parameter(s) {', '.join(unknown)}; known: "
                f"{', '.join(cls.__dataclass_fields__)}."
            )
        values.update({k: v for k, v in overrides.items() if v is not None})
        params = cls(**values)
        vocab = manifest.model.vocab_size
        outside = sorted(t for t in params.logit_bias if t >= vocab)
        if outside:
            raise QwenDeployError(
                f"logit_bias must use token ids of this model's vocabulary, [0, {vocab}); "
                f"{outside[:5]} are outside it."
            )
        return params

    def replace(self, **overrides) -> SamplingParams:
        """A validated copy with `overrides` applied (None values are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """Raise QwenDeployError naming the first out-of-range value and its valid range."""
        _number(
            "temperature",
            self.temperature,
            "a finite number >= 0 (0 = greedy)",
            lambda v: 0 <= v < math.inf,
        )
        _integer("top_k", self.top_k, "an integer >= 0 (0 = off)", lambda v: v >= 0)
        _number("top_p", self.top_p, "in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _number("min_p", self.min_p, "in [0, 1] (0 = off)", lambda v: 0 <= v <= 1)
        _number(
            "repetition_penalty",
            self.repetition_penalty,
            "a finite number > 0 (1 = off)",
            lambda v: 0 < v < math.inf,
        )
        _number("presence_penalty", self.presence_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        _number("frequency_penalty", self.frequency_penalty, "in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _integer(
                "seed", self.seed, "an integer in [0, 2**64) or null", lambda v: 0 <= v < 2**64
            )
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, "an integer >= 0 or null", lambda v: v >= 0)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise QwenDeployError(f"stop must be a list of non-empty strings, got {self.stop!r}.")
        for token in self.stop_token_ids:
            _integer("stop_token_ids", token, "a list of integers >= 0", lambda v: v >= 0)
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, f"an integer in [0, {MAX_LOGPROBS}]", _logprobs_ok)

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW are greedy, as vLLM treats them: dividing float32
        logits by a tinier one overflows (1e-300 is 0 in float32)."""
        return self.temperature < GREEDY_BELOW


MAX_LOGPROBS = 20  # OpenAI's limit on top_logprobs
GREEDY_BELOW = 1e-5  # vLLM's _SAMPLING_EPS


def _logprobs_ok(value: int) -> bool:
    return 0 <= value <= MAX_LOGPROBS


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the top alternatives', from the raw logits."""

    token_id: int
    logprob: float | None  # None: the first prompt token, which nothing predicts
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """log-softmax of the model's logits before penalties and warpers, as vLLM and OpenAI report
    them: what the model thinks, not what the sampling settings made of it."""
    x = np.asarray(logits, np.float64)
    shifted = x - x.max()
    logp = shifted - np.log(np.exp(shifted).sum())
    best = np.argpartition(-logp, top)[:top] if 0 < top < len(logp) else np.arange(top)
    best = best[np.argsort(-logp[best], kind="stable")]
    return TokenLogprob(int(token), float(logp[token]), [(int(i), float(logp[i])) for i in best])


def _token_biases(bias: object) -> dict[int, float]:
    """logit_bias as {token id: bias}; OpenAI's JSON sends the ids as strings."""
    if not isinstance(bias, dict):
        raise QwenDeployError(
            f"logit_bias must be an object of token id -> bias, got {type(bias).__name__}."
        )
    out = {}
    for key, value in bias.items():
        token = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 18:
            token = int(key)  # longer digit strings are no vocabulary's ids (nor int()'s input)
        if token is None or token < 0:
            raise QwenDeployError(
                f"logit_bias must map token ids (integers >= 0, as strings in JSON) to biases; "
                f"{str(key)[:24]!r} is not a token id."
            )
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not (number and -100 <= value <= 100):  # NaN fails the comparison too
            raise QwenDeployError(
                f"logit_bias must map token ids to biases in [-100, 100]; {key!r} has {value!r}."
            )
        out[token] = float(value)
    return out


def _number(name: str, value, valid: str, ok) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not ok(value)
    ):
        raise QwenDeployError(f"{name}={value!r} is out of range: it must be {valid}.")


def _integer(name: str, value, valid: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not ok(value):
        raise QwenDeployError(f"{name}={value!r} is out of range: it must be {valid}.")


# -- the processors, each exactly as transformers computes it (float32, -inf = filtered) ---------


def repetition_penalty(logits: np.ndarray, ids: np.ndarray, penalty: float) -> np.ndarray:
    """RepetitionPenaltyLogitsProcessor: divide positive / multiply negative logits of seen ids."""
    seen = np.unique(ids)
    seen = seen[seen < logits.shape[-1]]
    score = logits[seen]
    logits[seen] = np.where(score < 0, score * np.float32(penalty), score / np.float32(penalty))
    return logits


def presence_frequency_penalty(
    logits: np.ndarray, generated: np.ndarray, presence: float, frequency: float
) -> np.ndarray:
    """OpenAI: logit[j] -= count[j] * frequency + (count[j] > 0) * presence, generated ids only."""
    tokens, counts = np.unique(generated, return_counts=True)
    keep = tokens < logits.shape[-1]
    tokens, counts = tokens[keep], counts[keep]
    logits[tokens] -= (counts * frequency + presence).astype(np.float32)
    return logits


def logit_bias(logits: np.ndarray, ids: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """OpenAI's logit_bias: add each id's bias (ids past the logits are padding: skipped)."""
    keep = ids < logits.shape[-1]
    logits[ids[keep]] += biases[keep]
    return logits


def temperature(logits: np.ndarray, value: float) -> np.ndarray:
    """TemperatureLogitsWarper."""
    return logits / np.float32(value)


def top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """TopKLogitsWarper: drop logits below the k-th largest (ties at the k-th are kept)."""
    if k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, logits.shape[-1] - k)[logits.shape[-1] - k]
    logits[logits < kth] = -np.inf
    return logits


def _finite(logits: np.ndarray) -> np.ndarray:
    """Indices of the logits still in play (filtered ones are -inf and have probability 0)."""
    return np.flatnonzero(logits > -np.inf)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum(dtype=np.float32)


def top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """TopPLogitsWarper: drop the low tail whose cumulative probability is <= 1 - p."""
    live = _finite(logits)
    order = live[np.argsort(logits[live], kind="stable")]  # ascending, as transformers sorts
    cumulative = np.cumsum(_softmax(logits[order]), dtype=np.float32)
    remove = cumulative <= np.float32(1 - p)
    remove[-1] = False  # min_tokens_to_keep = 1
    logits[order[remove]] = -np.inf
    return logits


def min_p(logits: np.ndarray, p: float) -> np.ndarray:
    """MinPLogitsWarper: drop tokens whose probability is below p times the top probability."""
    live = _finite(logits)
    probs = _softmax(logits[live])
    remove = probs < np.float32(p) * probs.max()
    remove[np.argmax(probs)] = False
    logits[live[remove]] = -np.inf
    return logits


class Sampler:
    """Picks each next token of one sequence; remembers prompt and generated ids for penalties."""

    def __init__(
        self, params: SamplingParams, prompt_ids: list[int], constraint: Constraint | None = None
    ):
        self.params = params
        self.constraint = constraint
        self._prompt_seen = np.unique(np.asarray(prompt_ids, np.int64))  # once, not per token
        self._bias_ids = np.fromiter(params.logit_bias, np.int64, len(params.logit_bias))
        self._biases = np.fromiter(params.logit_bias.values(), np.float32, len(params.logit_bias))
        self.generated: list[int] = []
        self.rng = np.random.default_rng(params.seed)
        self.last_logprob: TokenLogprob | None = None  # of the last token, when params ask

    def process(self, logits: np.ndarray) -> np.ndarray:
        """Processed logits [vocab] (float32, -inf = excluded) the next token is drawn from."""
        p = self.params
        x = np.array(logits, dtype=np.float32)  # a copy: callers' logits stay untouched
        if self.constraint is not None:  # first, so no warper can leave only forbidden tokens
            self.constraint.apply(x)
        if len(self._bias_ids):
            x = logit_bias(x, self._bias_ids, self._biases)
        if p.repetition_penalty != 1.0:
            seen = np.concatenate([self._prompt_seen, np.asarray(self.generated, np.int64)])
            x = repetition_penalty(x, seen, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and self.generated:
            x = presence_frequency_penalty(
                x, np.asarray(self.generated, np.int64), p.presence_penalty, p.frequency_penalty
            )
        if p.greedy:
            return x
        if p.temperature != 1.0:
            x = temperature(x, p.temperature)
        if p.top_k:
            x = top_k(x, p.top_k)
        if p.top_p < 1.0:
            x = top_p(x, p.top_p)
        if p.min_p:
            x = min_p(x, p.min_p)
        return x

    def __call__(self, logits: np.ndarray) -> int:
        """The next token for logits [vocab]; recorded for the penalties of later steps."""
        x = self.process(logits)
        if self.params.greedy:
            token = int(np.argmax(x))
        else:
            live = _finite(x)
            probs = np.exp(x[live].astype(np.float64) - x[live].max())
            cumulative = np.cumsum(probs)
            pick = np.searchsorted(cumulative, self.rng.random() * cumulative[-1], side="right")
            token = int(live[min(pick, len(live) - 1)])
        self.generated.append(token)
        if self.constraint is not None:
            self.constraint.accept(token)
        if self.params.logprobs is not None:
            self.last_logprob = token_logprob(logits, token, self.params.logprobs)
        return token
