"""logprobs on the OpenAI server: OpenAI's shapes, and values equal to the model's log-softmax."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.tokenizer import _BYTE_OF_CHAR
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
MESSAGES = [{"role": "user", "content": "What is a convertible bond?"}]


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    engine = BatchEngine(generator, max_batch=4)
    with (
        running_server(engine, MODEL) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        yield SimpleNamespace(url=url, generator=generator, client=client)


def teacher_forced_logprobs(artifact, prompt_ids: list[int], completion_ids: list[int]):
    """log-softmax (float64) of the logits that predicted each completion token."""
    ids = np.array([prompt_ids + completion_ids[:-1]], np.int64)
    backend = OnnxRuntimeBackend(artifact)
    logits = backend.forward(
        ids, np.ones_like(ids), np.arange(ids.shape[1])[None], backend.new_cache(1)
    )[0, len(prompt_ids) - 1 :].astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_chat_logprobs_equal_the_models_log_softmax(served, tiny_artifact):
    expected = served.generator.generate(messages=MESSAGES, temperature=0, max_tokens=6)
    reply = served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == 6
    prompt_ids = served.generator.prompt_ids(messages=MESSAGES)
    logp = teacher_forced_logprobs(tiny_artifact, prompt_ids, expected.token_ids)
    tokenizer = served.generator.tokenizer
    for step, (entry, token) in enumerate(zip(content, expected.token_ids, strict=True)):
        assert bytes(entry.bytes) == tokenizer.token_bytes(token)
        assert abs(entry.logprob - logp[step, token]) < 1e-5
        best = np.argsort(-logp[step])[:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(logp[step, best], abs=1e-5)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [
            tokenizer.token_bytes(i) for i in best
        ]
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best
    # streamed: one entry per chunk, the same values
    stream = served.client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed = [c.choices[0].logprobs.content[0] for c in stream if c.choices]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_logprobs_are_raw_model_values_whatever_the_sampling_settings(served, tiny_artifact):
    """Penalties and temperature change what is sampled, not the reported log-probabilities."""
    reply = served.client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0.7,
        seed=3,
        max_tokens=4,
        logprobs=True,
        extra_body={"repetition_penalty": 1.3, "top_k": 5},
    )
    content = reply.choices[0].logprobs.content
    prompt_ids = served.generator.prompt_ids(messages=MESSAGES)
    token_ids = [token_id(served.generator.tokenizer, e) for e in content]
    logp = teacher_forced_logprobs(tiny_artifact, prompt_ids, token_ids)
    for step, (entry, token) in enumerate(zip(content, token_ids, strict=True)):
        assert entry.logprob == pytest.approx(logp[step, token], abs=1e-5)
        assert entry.top_logprobs == []


def token_id(tokenizer, entry) -> int:
    """The vocabulary id of a logprobs entry: its bytes spelled in byte-level BPE's alphabet."""
    char_of_byte = {b: c for c, b in _BYTE_OF_CHAR.items()}
    return tokenizer.token_to_id("".join(char_of_byte[b] for b in entry.bytes))


def test_completion_logprobs_shape(served):
    body = {"model": MODEL, "prompt": "Bonds pay", "max_tokens": 4, "temperature": 0, "logprobs": 2}
    plain = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()
    lp = plain["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    assert "".join(lp["tokens"]) == plain["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(4)]
    assert all(len(top) <= 2 and max(top.values()) <= 0 for top in lp["top_logprobs"])
    streamed = served.client.completions.create(**body, stream=True)
    chunks = [c.choices[0].logprobs for c in streamed if c.choices]
    assert [c.token_logprobs[0] for c in chunks] == lp["token_logprobs"]
    assert [c.text_offset[0] for c in chunks] == lp["text_offset"]


def test_bad_logprobs_requests_are_refused(served):
    chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
    for extra, param, words in [
        ({"top_logprobs": 3}, "top_logprobs", "needs logprobs: true"),
        (
            {"logprobs": True, "top_logprobs": 21},
            "top_logprobs",
            "top_logprobs=21 is out of range: it must be an integer in [0, 20].",
        ),
        ({"top_logprobs": -1}, "top_logprobs", "top_logprobs=-1 is out of range"),
    ]:
        response = httpx.post(served.url + "/v1/chat/completions", json={**chat, **extra})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == param and words in error["message"], error
    assert served.client.chat.completions.create(**chat).usage.completion_tokens == 2


def test_echo_returns_the_prompt_with_its_logprobs(served, tiny_artifact):
    prompt = "Convertible bonds pay coupons"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True}
    plain = httpx.post(served.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert plain["text"].startswith(prompt) and plain["logprobs"] is None
    scored = httpx.post(
        served.url + "/v1/completions", json={**body, "logprobs": 2}, timeout=60
    ).json()["choices"][0]
    assert scored["text"] == plain["text"]
    lp = scored["logprobs"]
    prompt_ids = served.generator.prompt_ids(prompt=prompt)
    completion = served.generator.generate(prompt=prompt, temperature=0, max_tokens=3).token_ids
    ids = prompt_ids + completion
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == scored["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts it
    logp = teacher_forced_logprobs(tiny_artifact, ids[:1], ids[1:])
    expected = [logp[i, token] for i, token in enumerate(ids[1:])]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    for step, (text, top) in enumerate(zip(lp["tokens"][1:], lp["top_logprobs"][1:], strict=True)):
        in_top_2 = ids[step + 1] in np.argsort(-logp[step])[:2]
        assert len(top) == (2 if in_top_2 else 3)  # the chosen token is always among them
        assert top[text] == pytest.approx(logp[step, ids[step + 1]], abs=1e-5)
    # streamed: the first chunk carries the prompt, the offsets run on
    streamed = served.client.completions.create(**body, logprobs=2, stream=True)
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.text for c in chunks) == scored["text"]
    assert [o for c in chunks for o in c.logprobs.text_offset] == lp["text_offset"]
