"""The runtime on the real Qwen2.5-Coder-0.5B-Instruct, proven against transformers: greedy
generation (on the 1.5B model too) and the OpenAI server under batching (INT8 quality:
tests/quantize/test_quantize.py)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from tests.conftest import real_model_checkpoint
from tests.serving.test_server import running_server, wait_idle

pytestmark = pytest.mark.real

MESSAGES = [
    {
        "role": "user",
        "content": "Write a Python function that checks whether a string is a palindrome.",
    }
]
NEW_TOKENS = 64
MODEL = "qwen2.5-coder-0.5b-instruct"
QUESTIONS = [  # different prompt lengths: the batch is left-padded
    "Write a Python one-liner that sums a list.",
    "What does the `yield` keyword do in Python?",
    "Explain Big-O notation in one sentence.",
    "用Python写一个计算阶乘的函数。",
    "How do I reverse a linked list in C?",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that counts the rows of a table named users.",
    "Fix this code: print('hello'",
]
LENGTHS = [24, 20, 28, 22, 26, 18, 24, 21]  # rows leave the running batch at different steps


def transformers_greedy(checkpoint) -> SimpleNamespace:
    """transformers' greedy answer to MESSAGES (float32, its own chat template and EOS ids)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    prompt = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(
            **prompt,
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
    prompt_ids = prompt["input_ids"][0].tolist()
    new = out[0, len(prompt_ids) :].tolist()  # one sequence: generate stops at EOS, no padding
    return SimpleNamespace(
        prompt_ids=prompt_ids,
        token_ids=new,
        text=tokenizer.decode(new, skip_special_tokens=True),
        eos=eos,
    )


@pytest.fixture(scope="module")
def reference(real_checkpoint) -> SimpleNamespace:
    return transformers_greedy(real_checkpoint)


@pytest.fixture(scope="module")
def generator(real_artifact) -> Generator:
    """The fp32 `onnx`-form artifact, loaded once for generation and the server."""
    return Generator(real_artifact())


def assert_same_greedy_text(generator: Generator, reference: SimpleNamespace) -> None:
    """Same prompt ids (chat template), EOS ids and sampling defaults give the same 64 tokens."""
    assert generator.manifest.eos_token_ids == reference.eos
    assert generator.prompt_ids(messages=MESSAGES) == reference.prompt_ids
    result = generator.generate(messages=MESSAGES, temperature=0, max_tokens=NEW_TOKENS)
    assert len(reference.token_ids) == NEW_TOKENS  # no early EOS: all 64 tokens are compared
    assert result.token_ids == reference.token_ids
    assert result.content == result.text == reference.text
    assert result.finish_reason == "length"


def test_greedy_generation_equals_transformers(generator, reference):
    assert_same_greedy_text(generator, reference)


@pytest.mark.exhaustive
def test_greedy_generation_equals_transformers_on_the_second_model(real_artifact):
    """The 1.5B model (other shapes: 28 layers, hidden 1536, 12/2 heads); CI runs the 0.5B's."""
    checkpoint = real_model_checkpoint("1.5b")
    assert_same_greedy_text(Generator(real_artifact("1.5b")), transformers_greedy(checkpoint))


@pytest.fixture(scope="module")
def served(generator):
    """The server as tests/serving/test_server.py runs it, on the real artifact."""
    engine = BatchEngine(generator, max_batch=8)
    with (
        running_server(engine, MODEL) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        yield SimpleNamespace(url=url, engine=engine, client=client)


def test_server_answers_the_openai_client_with_transformers_text(served, reference):
    """The official client gets transformers' greedy text: template, engine and JSON in between."""
    reply = served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=NEW_TOKENS
    )
    assert reply.choices[0].message.content == reference.text
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == NEW_TOKENS


def test_eight_concurrent_streams_give_each_request_its_solo_greedy_text(served):
    """Batching (left padding, rows joining and leaving) must not change greedy output."""
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    solo = [  # one at a time: batch 1
        served.client.chat.completions.create(model=MODEL, messages=m, temperature=0, max_tokens=n)
        for m, n in zip(conversations, LENGTHS, strict=True)
    ]
    peak_before = served.engine.stats["peak_batch"]
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)

    async def one(messages: list[dict], max_tokens: int) -> tuple[str, int, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=max_tokens, stream=True
        )
        text, chunks, finish = "", 0, None
        async for chunk in stream:
            text += chunk.choices[0].delta.content or ""
            chunks += 1
            finish = chunk.choices[0].finish_reason
        return text, chunks, finish

    async def run_all():
        try:
            return await asyncio.gather(
                *(one(m, n) for m, n in zip(conversations, LENGTHS, strict=True))
            )
        finally:
            await client.close()

    streamed = asyncio.run(run_all())
    for (text, chunks, finish), want in zip(streamed, solo, strict=True):
        assert text == want.choices[0].message.content
        assert finish == want.choices[0].finish_reason is not None
        assert chunks == want.usage.completion_tokens  # one chunk per token
    assert peak_before == 1 and served.engine.stats["peak_batch"] > 1  # they really were batched
    wait_idle(served.engine)
    health = httpx.get(served.url + "/health").json()
    assert {k: health[k] for k in ("status", "model", "active", "max_batch")} == {
        "status": "ok",
        "model": MODEL,
        "active": 0,
        "max_batch": 8,
    }
    assert health["speculative"]["target_forwards"] == 0  # no request asked for speculation
