"""The numpy sampler vs transformers' own logits processors, seeds, parameter validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, PretrainedConfig
from transformers.generation import logits_process as tlp
from transformers.generation.utils import GenerationMixin

from qwen_deploy.errors import QwenDeployError
from qwen_deploy.generation import sampling
from qwen_deploy.generation.sampling import Sampler, SamplingParams
from qwen_deploy.manifest import Manifest
from qwen_deploy.records import Generation

VOCAB = 151936


@pytest.fixture
def logits() -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(VOCAB) * 3).astype(np.float32)


def _probs(x: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(np.asarray(x, np.float32)), -1).numpy()


def assert_same_distribution(ours: np.ndarray, theirs: torch.Tensor) -> None:
    theirs = theirs.reshape(-1).numpy()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))  # same tokens filtered
    finite = np.isfinite(ours)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(_probs(ours), _probs(theirs), rtol=0, atol=1e-6)


def transformers_chain(params: SamplingParams) -> list:
    """The processors transformers' generate builds for these settings, in its own order."""
    owner = GenerationMixin()
    owner.config = PretrainedConfig()
    config = GenerationConfig(
        do_sample=True,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
    )
    return GenerationMixin._get_logits_processor(
        owner,
        config,
        input_ids_seq_length=1,
        encoder_input_ids=torch.zeros(1, 1, dtype=torch.long),
        device="cpu",
    )


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (
            lambda x, ids: sampling.repetition_penalty(x, ids, 1.3),
            tlp.RepetitionPenaltyLogitsProcessor(1.3),
        ),
        (
            lambda x, ids: sampling.repetition_penalty(x, ids, 0.7),
            tlp.RepetitionPenaltyLogitsProcessor(0.7),
        ),
        (lambda x, ids: sampling.temperature(x, 0.6), tlp.TemperatureLogitsWarper(0.6)),
        (lambda x, ids: sampling.top_k(x, 20), tlp.TopKLogitsWarper(20)),
        (lambda x, ids: sampling.top_p(x, 0.8), tlp.TopPLogitsWarper(0.8)),
        (lambda x, ids: sampling.top_p(x, 0.05), tlp.TopPLogitsWarper(0.05)),
        (lambda x, ids: sampling.min_p(x, 0.1), tlp.MinPLogitsWarper(0.1)),
    ],
    ids=["rep1.3", "rep0.7", "temp", "topk", "topp0.8", "topp0.05", "minp"],
)
def test_each_processor_equals_transformers(logits, ours, theirs):
    ids = np.random.default_rng(1).integers(0, VOCAB, 40)
    ids[:5] = ids[5]  # repeated ids are penalized once
    expected = theirs(torch.from_numpy(ids)[None], torch.from_numpy(logits.copy())[None])
    assert_same_distribution(ours(logits.copy(), ids), expected)


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),  # Qwen2.5 defaults
        dict(temperature=1.3, top_k=0, top_p=0.95, min_p=0.02, repetition_penalty=1.2),
        dict(temperature=0.5, top_k=500, top_p=1.0, min_p=0.1, repetition_penalty=1.0),
        dict(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.5),
    ],
)
def test_combined_chain_equals_transformers_generate_order(logits, settings):
    params = SamplingParams(**settings, seed=3)
    # random ids plus the 15 best tokens, so the penalty moves tokens that survive the warpers
    prompt = [int(i) for i in np.random.default_rng(2).integers(0, VOCAB, 30)]
    prompt += [int(i) for i in np.argsort(logits)[-15:]]
    sampler = Sampler(params, prompt)
    for step in range(3):  # generated ids join the penalized set
        step_logits = logits + np.float32(step)
        ids = torch.tensor([prompt + sampler.generated])
        expected = torch.from_numpy(step_logits.copy())[None]
        for processor in transformers_chain(params):
            expected = processor(ids, expected)
        assert_same_distribution(sampler.process(step_logits), expected)
        token = sampler(step_logits)
        assert np.isfinite(expected[0, token].item()), "sampled a token transformers filtered out"


def test_greedy_is_argmax_after_repetition_penalty(logits):
    prompt = [int(np.argmax(logits))]  # the best token was seen: the penalty must move it
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=100.0), prompt)
    expected = tlp.RepetitionPenaltyLogitsProcessor(100.0)(
        torch.tensor([prompt]), torch.from_numpy(logits.copy())[None]
    )
    token = sampler(logits)
    assert token == int(expected.argmax()) != prompt[0]


def test_presence_and_frequency_penalties_follow_openai(logits):
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, prompt_ids=[7, 7, 7])  # the prompt does not count (OpenAI)
    sampler.generated = [3, 3, 9]
    out = sampler.process(logits)
    expected = logits.copy()
    expected[3] -= 2 * 0.25 + 0.5
    expected[9] -= 1 * 0.25 + 0.5
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)


def test_same_seed_same_tokens_and_draws_follow_the_distribution():
    rng = np.random.default_rng(5)
    rows = (rng.standard_normal((30, 64)) * 2).astype(np.float32)
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.9, seed=1234)
    first = [Sampler(params, [1, 2])(row) for row in rows]
    runs = []
    for _ in range(2):
        sampler = Sampler(params, [1, 2])
        runs.append([sampler(row) for row in rows])
    assert runs[0] == runs[1]
    other = Sampler(dataclasses.replace(params, seed=99), [1, 2])
    assert [other(row) for row in rows] != runs[0]
    assert first  # one-step samplers share the seed too
    # empirical frequencies match the processed distribution
    row = rows[0]
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=4, seed=0), [])
    expected = _probs(sampler.process(row))
    draws = np.bincount([sampler(row) for _ in range(20000)], minlength=64) / 20000
    np.testing.assert_allclose(draws, expected, atol=0.015)
    assert set(np.flatnonzero(draws)) <= set(np.flatnonzero(expected))


@pytest.mark.parametrize(
    ("field", "value", "range_text"),
    [
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), ">= 0"),
        ("top_k", -1, ">= 0"),
        ("top_k", 2.5, ">= 0"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("min_p", 1.1, "[0, 1]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("frequency_penalty", -3, "[-2, 2]"),
        ("seed", -1, "[0, 2**64)"),
        ("max_tokens", -1, ">= 0"),
        ("stop_token_ids", [-5], ">= 0"),
    ],
)
def test_invalid_values_are_refused_with_their_range(field, value, range_text):
    with pytest.raises(QwenDeployError) as e:
        SamplingParams(**{field: value})
    assert field in str(e.value)
    assert range_text in str(e.value)


def test_empty_stop_string_is_refused():
    with pytest.raises(QwenDeployError, match="stop must be a list of non-empty strings"):
        SamplingParams(stop=["ok", ""])


def test_defaults_come_from_the_artifacts_generation_config(tiny_artifact):
    manifest = Manifest.load(tiny_artifact)
    params = SamplingParams.from_defaults(manifest)
    assert (params.temperature, params.top_k, params.top_p, params.repetition_penalty) == (
        0.7,
        20,
        0.8,
        1.05,
    )
    assert params.stop_token_ids == [151645, 151643]
    tuned = SamplingParams.from_defaults(manifest, temperature=0, top_k=None, stop="\n")
    assert (tuned.temperature, tuned.top_k, tuned.stop) == (0, 20, ["\n"])
    manifest.generation = Generation(do_sample=False)
    greedy = SamplingParams.from_defaults(manifest)
    assert greedy.greedy and greedy.top_k == 50  # transformers' default for an unset top_k
    with pytest.raises(QwenDeployError, match="unknown sampling parameter"):
        SamplingParams.from_defaults(manifest, temprature=0.5)
    with pytest.raises(QwenDeployError, match=r"top_p=2 is out of range: it must be in \(0, 1\]"):
        SamplingParams.from_defaults(manifest, top_p=2)
