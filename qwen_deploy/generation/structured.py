"""Structured output: OpenAI's `response_format` enforced by constrained decoding.

llguidance (Rust, CPU, no torch) compiles a JSON schema to a grammar and, per token, computes the
set of tokens that keep the output inside it; the sampler sets every other logit to -inf before
any other processing, so the answer always parses and matches the schema (unless max_tokens cuts
it short: finish_reason "length"). Measured on Qwen2.5's 152k vocabulary: the tokenizer index is
built once per process (~1.1 s), a schema compiles in ~1 ms, a token's mask costs ~0.2 ms next to
a decode step of 60-100 ms. (outlines-core builds a whole-vocabulary index per schema instead:
0.27 s before the first token for a three-field schema; xgrammar needs torch.)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from ..errors import QwenDeployError

# one JSON layout, the one json.dumps writes and models imitate: free whitespace would let a
# model pad an answer with blanks until max_tokens (a schema's "x-guidance" may still ask for it)
JSON_STYLE = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError as e:
        raise QwenDeployError(
            "response_format needs the llguidance package: pip install 'qwen-deploy[serve]'."
        ) from e
    return llguidance


def grammar_for(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of an OpenAI response_format (None: unconstrained text).

    Raises ValueError naming what is wrong with the request."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError('json_schema needs {"name": ..., "schema": {...}}.')
        schema = spec.get("schema", {})
    else:
        raise ValueError(
            f"response_format type {kind!r} is not one of 'text', 'json_object', 'json_schema'."
        )
    llg = _llguidance()
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_STYLE)
    error = llg.LLMatcher.validate_grammar(grammar)
    if error:
        raise ValueError(f"the JSON schema cannot be enforced: {error}")
    return grammar


def guidance_tokenizer(tokenizer_json: str, eos_id: int | None):
    """llguidance's view of a vocabulary, from the tokenizer.json text (~1 s: build it once)."""
    return _llguidance().LLTokenizer(tokenizer_json, eos_token=eos_id)


class Constraint:
    """One sequence's grammar state: masks the logits before sampling, follows each token."""

    def __init__(self, vocabulary, grammar: str):
        llg = _llguidance()
        self._numpy = llg.numpy
        self._matcher = llg.LLMatcher(vocabulary, grammar)
        if self._matcher.is_error():
            raise QwenDeployError(f"the grammar cannot be used: {self._matcher.get_error()}")
        self._mask = llg.numpy.allocate_token_bitmask(1, vocabulary.vocab_size)
        # the first mask is the slowest (the grammar's lexer is built on demand): computed here,
        # where the request is prepared, not in the decode step it would hold up for every row
        self._fill()

    def _fill(self) -> None:
        self._numpy.fill_next_token_bitmask(self._matcher, self._mask, 0)
        self._filled = True

    def apply(self, logits: np.ndarray) -> None:
        """Set the logits of tokens the grammar forbids next to -inf (in place, [vocab])."""
        if not self._filled:
            self._fill()
        self._numpy.apply_token_bitmask_inplace(logits[None], self._mask)

    def accept(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise QwenDeployError(f"the grammar refused token {token}: {self._matcher.get_error()}")
        self._filled = False
