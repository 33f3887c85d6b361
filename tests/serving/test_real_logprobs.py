"""logprobs on the real model: the server's values equal transformers' log-softmax within 1e-4."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from tests.serving.test_server import running_server
from tests.serving.test_server_logprobs import token_id

pytestmark = pytest.mark.real
MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]


@pytest.fixture(scope="module")
def served(real_artifact):
    generator = Generator(real_artifact())
    with (
        running_server(BatchEngine(generator, max_batch=2), "coder") as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        yield generator, client


@pytest.fixture(scope="module")
def transformers_logprobs(real_checkpoint):
    """ids -> transformers' float32 log-softmax of the logits after each position."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(real_checkpoint, dtype=torch.float32)

    def run(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        return torch.log_softmax(logits.double(), -1).numpy()

    return run


def test_chat_logprobs_match_transformers(served, transformers_logprobs):
    generator, client = served
    reply = client.chat.completions.create(
        model="coder",
        messages=MESSAGES,
        temperature=0,
        max_tokens=16,
        logprobs=True,
        top_logprobs=5,
    )
    content = reply.choices[0].logprobs.content
    completion = [token_id(generator.tokenizer, e) for e in content]
    prompt = generator.prompt_ids(messages=MESSAGES)
    logp = transformers_logprobs(prompt + completion[:-1])[len(prompt) - 1 :]
    for step, (entry, token) in enumerate(zip(content, completion, strict=True)):
        assert abs(entry.logprob - logp[step, token]) < 1e-4
        best = np.argsort(-logp[step])[:5]
        assert [token_id(generator.tokenizer, t) for t in entry.top_logprobs] == list(best)
        assert (
            np.abs(np.array([t.logprob for t in entry.top_logprobs]) - logp[step, best]).max()
            < 1e-4
        )


def test_echoed_prompt_logprobs_match_transformers(served, transformers_logprobs):
    """What lm-evaluation-harness' local-completions sends to score a continuation."""
    generator, client = served
    text = "def add(a, b):\n    return a + b\n\n# 加法函数 🙂"
    reply = client.completions.create(
        model="coder", prompt=text, echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    lp = reply.choices[0].logprobs
    ids = generator.prompt_ids(prompt=text)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    logp = transformers_logprobs(ids)
    expected = [logp[i - 1, ids[i]] for i in range(1, len(ids))]
    assert np.abs(np.array(lp.token_logprobs[1 : len(ids)]) - expected).max() < 1e-4
