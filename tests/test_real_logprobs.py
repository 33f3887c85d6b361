"""logprobs on the real model: the server's values equal transformers' log-softmax within 1e-4."""

from __future__ import annotations

import numpy as np
import openai
import pytest
from test_server import running_server
from test_server_logprobs import token_id

from qwen_deploy.serve.engine import BatchEngine
from qwen_deploy.serve.generator import Generator

pytestmark = pytest.mark.real
MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def test_chat_logprobs_match_transformers(real_artifact, real_checkpoint):
    import torch
    from transformers import AutoModelForCausalLM

    generator = Generator(real_artifact())
    with (
        running_server(BatchEngine(generator, max_batch=2), "coder") as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
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
    model = AutoModelForCausalLM.from_pretrained(real_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion[:-1]])).logits[0, len(prompt) - 1 :]
    logp = torch.log_softmax(logits.double(), -1).numpy()
    for step, (entry, token) in enumerate(zip(content, completion, strict=True)):
        assert abs(entry.logprob - logp[step, token]) < 1e-4
        best = np.argsort(-logp[step])[:5]
        assert [token_id(generator.tokenizer, t) for t in entry.top_logprobs] == list(best)
        assert (
            np.abs(np.array([t.logprob for t in entry.top_logprobs]) - logp[step, best]).max()
            < 1e-4
        )
