"""Speculative decoding: drafts change how many forwards the target runs, never what it writes."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.speculative import DraftModel, PromptLookup, SpeculativeStats
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

# sampling from the raw softmax's top 5 (no penalty, no top-p: the artifact's defaults have them)
PLAIN_TOP5 = {"temperature": 1.0, "top_k": 5, "top_p": 1.0, "repetition_penalty": 1.0}
PLAIN_TOP5["stop_token_ids"] = []
CHI2_DF4_P001 = 18.467  # chi-square quantile: 4 degrees of freedom, p = 0.001
# repeated text, so prompt lookup finds n-grams to draft from
PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n\ndef add("


def test_prompt_lookup_drafts_what_followed_the_latest_longest_match():
    lookup = PromptLookup(max_ngram=3)
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3]
    assert lookup.propose(tokens, 2) == [7, 8]  # "2 3" last seen before position 8
    assert lookup.propose([5, 6, 7, 5, 6], 4) == [7, 5, 6]  # runs into the tail: what exists
    assert lookup.propose([1, 2, 3], 4) == []  # no earlier occurrence
    assert lookup.propose([4, 1, 2, 3, 9, 2, 3], 1) == [9]  # trigram absent, bigram "2 3" found


@pytest.fixture(scope="module", params=["onnx", "gqa"])
def generator(request, artifact) -> Generator:
    """Both cache kinds: host/bound concat caches (onnx) and in-place buffers (gqa)."""
    return Generator(artifact(attention=request.param))


def test_greedy_output_is_the_plain_output_with_every_drafter(generator, artifact, checkpoint):
    plain = generator.generate(prompt=PROMPT, temperature=0, max_tokens=24)
    other = artifact(ckpt_kwargs={"seed": 7})  # a different random model, same vocabulary
    drafters = {
        "lookup": PromptLookup(),
        "itself": DraftModel(OnnxRuntimeBackend(generator.folder), 151936),
        "other": DraftModel(OnnxRuntimeBackend(other), 151936),
    }
    for name, drafter in drafters.items():
        result = generator.generate(prompt=PROMPT, temperature=0, max_tokens=24, drafter=drafter)
        assert result.token_ids == plain.token_ids, name
        assert result.finish_reason == plain.finish_reason == "length"
        spec = result.speculative
        assert spec["target_forwards"] < 24 or name == "other", spec
    # a draft model identical to the target is always right: k+1 tokens per forward
    itself = generator.generate(
        prompt=PROMPT, temperature=0, max_tokens=24, drafter=drafters["itself"], draft_tokens=3
    ).speculative
    assert itself["acceptance_rate"] == 1.0 and itself["tokens_per_forward"] > 3.5


def test_sampled_output_equals_plain_decoding_for_each_seed(generator):
    settings = {"temperature": 1.0, "top_k": 5, "max_tokens": 12}
    for seed in range(5):
        plain = generator.generate(prompt=PROMPT, seed=seed, **settings)
        drafted = generator.generate(prompt=PROMPT, seed=seed, drafter=PromptLookup(), **settings)
        assert drafted.token_ids == plain.token_ids


def test_sampled_tokens_follow_the_targets_distribution(generator):
    """Chi-square: tokens accepted or resampled after a draft are distributed as the target's
    own next-token probabilities (top-k 5 at temperature 1, so every bin is well filled)."""
    drafter = PromptLookup()
    pairs = [
        tuple(
            generator.generate(
                prompt=PROMPT, seed=seed, max_tokens=2, drafter=drafter, **PLAIN_TOP5
            ).token_ids
        )
        for seed in range(400)
    ]
    first, _ = Counter(p[0] for p in pairs).most_common(1)[0]
    seconds = Counter(p[1] for p in pairs if p[0] == first)
    # the target's exact probabilities for the second token, given the prompt and `first`
    ids = [*generator.prompt_ids(prompt=PROMPT), first]
    backend = generator.backend
    logits = backend.forward(
        np.array([ids]),
        np.ones((1, len(ids)), np.int64),
        np.arange(len(ids))[None],
        backend.new_cache(1),
    )[0, -1].astype(np.float64)
    top = np.argsort(-logits)[:5]
    p = np.exp(logits[top] - logits[top].max())
    p /= p.sum()
    observed = np.array([seconds.get(int(t), 0) for t in top])
    assert observed.sum() == sum(seconds.values())  # nothing outside the top 5
    expected = p * observed.sum()
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_DF4_P001, (observed, expected)


def test_stats_count_drafts_and_forwards():
    s = SpeculativeStats(drafted=10, accepted=6, forwards=4, tokens=12)
    assert s.to_dict() == {
        "drafted": 10,
        "accepted": 6,
        "acceptance_rate": 0.6,
        "target_forwards": 4,
        "tokens_per_forward": 3.0,
    }


def test_prompt_lookup_searches_a_reference_before_the_prompt():
    lookup = PromptLookup(reference=[7, 8, 9, 1, 2, 4])  # OpenAI's `prediction`, tokenized
    assert lookup.propose([1, 2], 2) == [4, 1]
    assert lookup.propose([5, 9], 3) == [1, 2, 4]


def test_speculator_gives_each_request_its_drafter(tiny_artifact):
    from qwen_deploy.errors import QwenDeployError
    from qwen_deploy.generation.speculative import Speculator

    vocab = 151936
    plain = Speculator(vocab)
    assert plain.drafter() is None
    assert isinstance(plain.drafter(reference=[1, 2]), PromptLookup)  # a prediction drafts
    assert plain.drafter("none", reference=[1, 2]) is None
    with pytest.raises(QwenDeployError, match="start the server with --draft ART"):
        plain.drafter("draft")
    with pytest.raises(QwenDeployError, match="use one of: none, prompt_lookup, draft"):
        plain.drafter("medusa")
    draft = OnnxRuntimeBackend(tiny_artifact)
    with_draft = Speculator(vocab, "draft", draft)
    first, second = with_draft.drafter(), with_draft.drafter()
    assert isinstance(first, DraftModel) and first.batch is not second.batch  # a cache each
    assert isinstance(with_draft.drafter("prompt_lookup"), PromptLookup)
    with pytest.raises(QwenDeployError, match="needs a draft artifact"):
        Speculator(vocab, "draft")
    with pytest.raises(QwenDeployError, match=r"vocabulary \(151936\) differs.*\(1000\)"):
        Speculator(1000, draft=draft)
    with pytest.raises(QwenDeployError, match="choose one drafter"):
        Speculator.open(vocab, prompt_lookup=True, draft=tiny_artifact)
