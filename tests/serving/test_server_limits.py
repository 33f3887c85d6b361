"""Request limits of the OpenAI server: body size, roles, max_tokens past the context."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import openai
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
LIMIT = 64 * 1024
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    engine = BatchEngine(generator, max_batch=4)
    with running_server(engine, MODEL, max_body_bytes=LIMIT) as url:
        yield SimpleNamespace(url=url, engine=engine, generator=generator)


def _post(served, body) -> httpx.Response:
    """POST a dict as JSON, or raw bytes (an iterator of them: a chunked upload)."""
    kwargs = {"json": body} if isinstance(body, dict) else {"content": body}
    headers = {"content-type": "application/json"}
    return httpx.post(served.url + "/v1/chat/completions", headers=headers, timeout=60, **kwargs)


def _ok(served) -> None:
    """The server still answers a normal request."""
    response = _post(served, CHAT)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 2


def test_a_body_over_the_limit_gets_413_before_it_is_parsed(served):
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * (LIMIT + 1)}]}
    response = _post(served, huge)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and f"limit of {LIMIT} bytes" in error["message"]
    # no Content-Length (chunked upload): counted as it arrives, same answer
    chunks = iter(
        [b'{"model": "tiny-qwen", "messages": [{"role": "user", "content": "']
        + [b"y" * 8192] * 16
        + [b'"}]}']
    )
    response = _post(served, chunks)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # invalid JSON under the limit is still parsed and refused as such
    response = _post(served, b'{"model": ')
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    _ok(served)


def test_unknown_roles_are_refused_by_name(served):
    body = {**CHAT, "messages": [{"role": "hacker", "content": "hi"}]}
    response = _post(served, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages.0.role" and "'hacker'" in error["message"]
    assert "system, developer, user, assistant, tool" in error["message"]
    _ok(served)


def test_developer_role_is_rendered_as_system(served):
    as_developer = [{"role": "developer", "content": "Be brief."}, CHAT["messages"][0]]
    as_system = [{"role": "system", "content": "Be brief."}, CHAT["messages"][0]]
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)
    replies = [
        client.chat.completions.create(model=MODEL, messages=m, temperature=0, max_tokens=4)
        for m in (as_developer, as_system)
    ]
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content


def test_max_tokens_past_the_context_is_clipped_and_ends_with_length(served):
    context = served.generator.max_context
    prompt = "bond " * (context - 20)  # one token per repetition: about 20 tokens of room left
    prompt_tokens = len(served.generator.prompt_ids(prompt=prompt))
    assert context - 40 < prompt_tokens < context
    response = httpx.post(
        served.url + "/v1/completions",
        json={"model": MODEL, "prompt": prompt, "max_tokens": 10**9, "temperature": 0},
        timeout=600,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["total_tokens"] == context
    assert body["usage"]["prompt_tokens"] == prompt_tokens
