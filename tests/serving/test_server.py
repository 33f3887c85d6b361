"""A real server on localhost, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.speculative import SpeculativeStats, Speculator
from qwen_deploy.manifest import Manifest
from qwen_deploy.serving.server import REQUEST_TIMEOUT_S, create_app, server_config

MODEL = "tiny-qwen"
MESSAGES = [
    {"role": "system", "content": "You are a careful financial analyst."},
    {"role": "user", "content": "What is a convertible bond?"},
]
THINK_TEMPLATE = (  # DeepSeek-R1 style: the prompt ends inside an opened think block
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def _port_is_free(port: int) -> bool:
    """Nothing listens on `port` (SO_REUSEADDR: closed connections in TIME_WAIT don't count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def running_server(
    engine: BatchEngine,
    name: str,
    api_key: str | None = None,
    request_timeout: float = REQUEST_TIMEOUT_S,
    **app_options,
) -> Iterator[str]:
    """uvicorn in a thread on a free localhost port, configured as `serve` configures it;
    stopped, port freed, engine idle at exit."""
    # proto TCP, as uvicorn's own sockets: asyncio sets TCP_NODELAY only then (else each answer
    # waits 40 ms for the client's delayed ACK)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds its own
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        server_config(
            create_app(engine, name, api_key, **app_options),
            request_timeout=request_timeout,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()
        assert _port_is_free(port)


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    engine = BatchEngine(generator, max_batch=8)
    with (
        running_server(engine, MODEL) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        yield SimpleNamespace(url=url, engine=engine, generator=generator, client=client)


def _chunks(stream) -> tuple[list, object]:
    """(chunks that carry a choice, the usage chunk's usage)."""
    chunks, usage = [], None
    for chunk in stream:
        if chunk.choices:
            chunks.append(chunk)
        if chunk.usage is not None:
            usage = chunk.usage
    return chunks, usage


def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(served.url + "/health").json()
    assert health == {
        "status": "ok",
        "model": MODEL,
        "active": 0,
        "max_batch": 8,
        "speculative": SpeculativeStats().to_dict() | health["speculative"],
        "prefix_cache": None,  # this engine keeps none
        "warnings": [],
    }


def test_a_conversation_reuses_its_history_and_says_so(tiny_artifact, served):
    """The second turn starts from the first turn's cached prompt: usage reports the reused
    tokens (OpenAI's cached_tokens), /health the hit rate, and the answer is unchanged."""
    generator = Generator(tiny_artifact)
    engine = BatchEngine(generator, prefix_cache_bytes=2**26)
    first = [{"role": "user", "content": "Tell me about bonds. " * 20}]
    with (
        running_server(engine, MODEL) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        turns = []
        for cached_server in (client, served.client):
            one = cached_server.chat.completions.create(
                model=MODEL, messages=first, temperature=0, max_tokens=6
            )
            second = [
                *first,
                {"role": "assistant", "content": one.choices[0].message.content},
                {"role": "user", "content": "And stocks?"},
            ]
            two = cached_server.chat.completions.create(
                model=MODEL, messages=second, temperature=0, max_tokens=6
            )
            turns.append((one, two))
        health = httpx.get(url + "/health").json()
    (one, two), (plain_one, plain_two) = turns
    assert one.usage.prompt_tokens_details.cached_tokens == 0
    reused = two.usage.prompt_tokens_details.cached_tokens
    assert reused == one.usage.prompt_tokens // 16 * 16 > 0
    assert plain_two.usage.prompt_tokens_details.cached_tokens == 0
    assert [t.choices[0].message.content for t in (one, two)] == [
        t.choices[0].message.content for t in (plain_one, plain_two)
    ]
    assert health["prefix_cache"]["hit_rate"] == 0.5


def test_chat_greedy_equals_the_generator(served):
    expected = served.generator.generate(messages=MESSAGES, temperature=0, max_tokens=12)
    reply = served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.content
    assert choice.finish_reason == expected.finish_reason == "length"
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens == 12
    assert reply.usage.total_tokens == expected.prompt_tokens + 12
    # max_completion_tokens is the newer spelling of max_tokens
    newer = served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_completion_tokens=5
    )
    assert newer.usage.completion_tokens == 5
    assert expected.content.startswith(newer.choices[0].message.content)


def test_streaming_chat_sends_one_chunk_per_token(served):
    expected = served.generator.generate(messages=MESSAGES, temperature=0, max_tokens=10)
    stream = served.client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        temperature=0,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks, usage = _chunks(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.content
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 9 + ["length"]
    assert usage.completion_tokens == len(chunks) == expected.completion_tokens


def test_completions_plain_and_streaming(served):
    prompt = "The yield of a bond"
    expected = served.generator.generate(prompt=prompt, temperature=0, max_tokens=8)
    reply = served.client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=8
    )
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (
        expected.prompt_tokens,
        expected.completion_tokens,
    )
    ids = served.generator.prompt_ids(prompt=prompt)
    chunks, usage = _chunks(
        served.client.completions.create(
            model=MODEL,
            prompt=ids,
            temperature=0,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert usage.completion_tokens == len(chunks) == 8


def test_stop_strings_and_seeded_sampling(served):
    free = served.generator.generate(messages=MESSAGES, temperature=0, max_tokens=12).text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    reply = served.client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=12, stop=[stop]
    )
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == free[: free.index(stop)]
    sampled = [
        served.client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=1.0, top_p=0.9, seed=7, max_tokens=8
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    expected = served.generator.generate(
        messages=MESSAGES, temperature=1.0, top_p=0.9, seed=7, max_tokens=8
    )
    assert sampled == [expected.content] * 2


def _raw(served, path: str, body: bytes | dict, status: int) -> dict:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        served.url + path, content=data, headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


def test_errors_have_the_openai_shape_and_the_server_keeps_serving(served):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    error = _raw(served, "/v1/chat/completions", b'{"model": "x", "messages": [', 400)
    assert "not valid JSON" in error["message"]
    error = _raw(served, "/v1/chat/completions", {**chat, "model": "gpt-4o"}, 404)
    assert (error["param"], error["code"]) == ("model", "model_not_found")
    assert "gpt-4o" in error["message"] and MODEL in error["message"]
    for name, value, valid in [
        ("temperature", -1, ">= 0"),
        ("top_p", 2, "(0, 1]"),
        ("top_k", -5, ">= 0"),
        ("presence_penalty", 3, "[-2, 2]"),
        ("max_tokens", 0, "ask for at least 1 token"),
    ]:
        error = _raw(served, "/v1/chat/completions", {**chat, name: value}, 400)
        assert error["param"] == name and valid in error["message"], error
    error = _raw(served, "/v1/chat/completions", {**chat, "temperature": "hot"}, 400)
    assert error["param"] == "temperature"
    error = _raw(served, "/v1/chat/completions", {**chat, "n": 0}, 400)
    assert error["param"] == "n" and "n=0 is out of range" in error["message"]
    error = _raw(served, "/v1/chat/completions", {**chat, "messages": []}, 400)
    assert error["param"] == "messages"
    error = _raw(served, "/v1/completions", {"model": MODEL, "prompt": ""}, 400)
    assert error["param"] == "prompt" and "prompt is empty" in error["message"]
    error = _raw(served, "/v1/completions", {"model": MODEL, "prompt": [1, 10**7]}, 400)
    assert error["param"] == "prompt" and "outside" in error["message"]
    error = _raw(served, "/v1/completions", {"model": MODEL, "prompt": "bond " * 5000}, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "maximum context length is 4096 tokens" in error["message"]
    long_chat = {**chat, "messages": [{"role": "user", "content": "bond " * 5000}]}
    error = _raw(served, "/v1/chat/completions", long_chat, 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    # the official client raises the matching exception types
    with pytest.raises(openai.NotFoundError) as caught:
        served.client.chat.completions.create(model="nope", messages=MESSAGES)
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="top_p"):
        served.client.chat.completions.create(model=MODEL, messages=MESSAGES, top_p=2)
    # ... and the server still answers normally
    reply = served.client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert reply.usage.completion_tokens == 3
    wait_idle(served.engine)  # the finished request leaves the engine at its next step


def test_eight_concurrent_streams_are_batched_and_complete(served):
    questions = [
        "What is a bond?",
        "Define equity.",
        "什么是可转债？",
        "Explain leverage.",
        "What is an ETF?",
        "Why diversify?",
        "What is duration?",
        "Price a call option.",
    ]
    lengths = [24, 17, 30, 20, 26, 13, 28, 22]
    conversations = [[{"role": "user", "content": q}] for q in questions]
    expected = [
        served.generator.generate(messages=m, temperature=0, max_tokens=n)
        for m, n in zip(conversations, lengths, strict=True)
    ]
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    steps_before = served.engine.stats["steps"]

    async def one(messages: list[dict], max_tokens: int) -> tuple[str, int, int]:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        text, count, usage = "", 0, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                count += 1
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return text, count, usage

    async def main():
        try:
            return await asyncio.gather(
                *(one(m, n) for m, n in zip(conversations, lengths, strict=True))
            )
        finally:
            await client.close()

    results = asyncio.run(main())
    for (text, count, usage), want in zip(results, expected, strict=True):
        assert text == want.content
        assert count == usage == want.completion_tokens
    assert served.engine.stats["steps"] - steps_before < sum(lengths)  # decode steps were shared
    assert served.engine.stats["peak_batch"] > 1


def test_client_disconnect_frees_its_slot(served):
    engine = served.engine
    cancelled = engine.stats["cancelled"]
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": 3000,
        "stream": True,
    }
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", served.url + "/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        received = [next(lines) for _ in range(4)]  # two data events and their blank lines
        assert received[0].startswith("data: ")
        assert engine.active == 1
    wait_idle(engine)
    assert engine.stats["cancelled"] == cancelled + 1
    # a non-streaming client that gives up is noticed too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    wait_idle(engine)
    assert engine.stats["cancelled"] == cancelled + 2


def wait_idle(engine: BatchEngine) -> None:
    """Finished or cancelled requests leave the engine between steps: wait for the last one."""
    deadline = time.time() + 20
    while engine.active and time.time() < deadline:
        time.sleep(0.05)
    assert engine.active == 0


def test_reasoning_content_for_a_thinking_template(served, tiny_artifact, tmp_path):
    folder = tmp_path / "think-model"
    folder.mkdir()
    for file in Path(tiny_artifact).iterdir():
        if file.name != "manifest.json":
            os.symlink(file, folder / file.name)
    manifest = Manifest.load(tiny_artifact)
    manifest.chat_template = THINK_TEMPLATE
    manifest.save(folder)
    generator = Generator(folder)
    expected = generator.generate(messages=MESSAGES, temperature=0, max_tokens=10)
    assert expected.reasoning_content  # the opened block takes the whole (random) output
    with (
        running_server(BatchEngine(generator), "think-model") as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        reply = client.chat.completions.create(
            model="think-model", messages=MESSAGES, temperature=0, max_tokens=10
        )
        message = reply.choices[0].message
        assert message.reasoning_content == expected.reasoning_content
        assert message.content == expected.content
        chunks, _ = _chunks(
            client.chat.completions.create(
                model="think-model", messages=MESSAGES, temperature=0, max_tokens=10, stream=True
            )
        )
    streamed = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert streamed == expected.reasoning_content


def test_api_key_is_checked(served):
    with running_server(BatchEngine(served.generator), MODEL, api_key="s3cret") as url:
        assert httpx.get(url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(url + "/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0) as good:
            assert [m.id for m in good.models.list().data] == [MODEL]
        with (
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0) as bad,
            pytest.raises(openai.AuthenticationError),
        ):
            bad.models.list()


def test_speculative_requests_answer_as_plain_ones_and_report_acceptance(served):
    """Per request: OpenAI's `prediction` (drafts looked up in the predicted text) and the
    `speculative` extension; greedy answers equal the plain one, usage counts the drafts."""
    chat = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 16}
    plain = served.client.chat.completions.create(**chat)
    text = plain.choices[0].message.content
    assert plain.usage.completion_tokens_details is None  # nothing was drafted
    before = httpx.get(served.url + "/health").json()["speculative"]
    predicted = served.client.chat.completions.create(
        **chat, prediction={"type": "content", "content": text}
    )
    assert predicted.choices[0].message.content == text
    details, stats = predicted.usage.completion_tokens_details, predicted.usage.speculative
    assert details.accepted_prediction_tokens == stats["accepted"] >= 8  # the answer was predicted
    assert details.rejected_prediction_tokens == stats["drafted"] - stats["accepted"]
    assert stats["tokens_per_forward"] > 2
    stream = served.client.chat.completions.create(
        **chat,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"speculative": "prompt_lookup"},
    )
    chunks, usage = _chunks(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert usage.speculative["target_forwards"] + 1 <= usage.completion_tokens == 16
    after = httpx.get(served.url + "/health").json()["speculative"]
    assert (
        after["accepted"] - before["accepted"] == stats["accepted"] + usage.speculative["accepted"]
    )
    for value, words in [("draft", "--draft"), ("medusa", "prompt_lookup")]:
        error = _raw(served, "/v1/chat/completions", {**chat, "speculative": value}, 400)
        assert error["param"] == "speculative" and words in error["message"], error
    error = _raw(
        served,
        "/v1/chat/completions",
        {**chat, "prediction": {"type": "content", "content": [{"type": "image_url"}]}},
        400,
    )
    assert error["param"] == "prediction"


def test_a_server_with_a_draft_model_drafts_by_default(tiny_artifact):
    """serve --draft: every request drafts with the draft artifact unless it opts out."""
    generator = Generator(tiny_artifact)
    draft = Generator(tiny_artifact).backend  # drafting for itself: every greedy draft is right
    speculator = Speculator(generator.manifest.model.vocab_size, "draft", draft, draft_tokens=3)
    engine = BatchEngine(generator, max_batch=2)
    with (
        running_server(engine, MODEL, speculator=speculator) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        chat = {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 13}
        drafted = client.chat.completions.create(**chat)
        off = client.chat.completions.create(**chat, extra_body={"speculative": "none"})
    expected = generator.generate(messages=MESSAGES, temperature=0, max_tokens=13)
    assert drafted.choices[0].message.content == off.choices[0].message.content == expected.content
    stats = drafted.usage.speculative
    # 13 tokens: the prefill gives one, each of 3 forwards 3 drafts and one more
    assert stats["accepted"] == stats["drafted"] == 9 and stats["target_forwards"] == 3
    assert off.usage.completion_tokens_details is None


def test_cli_serve_names_the_model_after_the_folder(tiny_artifact):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("qwen-deploy", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "qwen_deploy.cli"]
    env = {**os.environ, "QWEN_DEPLOY_API_KEY": "k1"}
    process = subprocess.Popen(
        [
            *command,
            *("serve", str(tiny_artifact), "--port", str(port), "--max-batch", "2"),
            *("--prompt-lookup", "--draft-tokens", "4"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, process.stderr.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert time.time() < deadline, "qwen-deploy serve did not come up"
            time.sleep(0.2)
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="k1", max_retries=0
        ) as client:
            assert [m.id for m in client.models.list().data] == [Path(tiny_artifact).name]
            reply = client.chat.completions.create(
                model=Path(tiny_artifact).name, messages=MESSAGES, max_tokens=6
            )
            spec = reply.usage.speculative  # --prompt-lookup: the default
            assert spec["target_forwards"] + spec["accepted"] + 1 == 6
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["max_batch"] == 2
    finally:
        process.terminate()
        process.wait(30)
        process.stderr.close()
    assert _port_is_free(port)


def test_a_request_whose_kv_cannot_fit_is_a_400(tiny_artifact):
    generator = Generator(tiny_artifact)
    budget = 100 * generator.backend.capabilities.kv_bytes_per_position
    with running_server(BatchEngine(generator, kv_budget_bytes=budget), MODEL) as url:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 200}
        refused = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        fits = httpx.post(url + "/v1/chat/completions", json={**body, "max_tokens": 5}, timeout=60)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "MiB of KV cache" in error["message"] and "lower max_tokens" in error["message"]
    assert fits.status_code == 200
