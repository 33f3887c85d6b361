"""Fuzzing the OpenAI server: thousands of random and mutated requests (valid ones with any part
replaced by garbage or removed, and raw bodies that are not JSON at all) get answers, never a 500
or a traceback in the server's log, every error in one line; the server is healthy afterwards.

The mutations reach every field at any depth: wrong types, lone surrogates, huge and negative
numbers, NaN and Infinity (Python's JSON writes and reads them), nested garbage inside messages,
tools and tool calls. Seeded (derandomize): a CI run fuzzes the same requests every time; each
request is cheap (a tiny random model, a short context).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.serving.openai_schema import ChatCompletionRequest, CompletionRequest
from tests.serving.test_server import running_server, wait_idle

MODEL = "tiny-qwen"
REQUESTS = 2000
CONTEXT = 128  # tokens: room for a one-tool prompt, and a bound on any request's cost
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
USER = {"role": "user", "content": "Weather in Paris?"}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
BASES: list[tuple[str, dict]] = [  # valid requests, each a few tokens of work
    (CHAT, {"model": MODEL, "messages": [USER], "max_tokens": 2}),
    (
        CHAT,
        {
            "model": MODEL,
            "messages": [
                USER,
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
            ],
            "max_tokens": 2,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["\n"],
        },
    ),
    (
        CHAT,
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_completion_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    ),
    (
        CHAT,
        {
            "model": MODEL,
            "messages": [USER],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 2,
            "seed": 3,
            "logit_bias": {"15": 5},
            "presence_penalty": 0.5,
            "chat_template_kwargs": {"enable_thinking": False},
        },
    ),
    (
        CHAT,
        {
            "model": MODEL,
            "messages": [USER],
            "max_tokens": 3,
            "response_format": {"type": "json_object"},
            "prediction": {"type": "content", "content": "Paris is mild."},
        },
    ),
    (COMPLETIONS, {"model": MODEL, "prompt": "The yield of a bond", "max_tokens": 2}),
    (
        COMPLETIONS,
        {"model": MODEL, "prompt": [785, 7540], "max_tokens": 2, "echo": True, "logprobs": 1},
    ),
    (
        COMPLETIONS,
        {
            "model": MODEL,
            "prompt": ["Hello"],
            "max_tokens": 2,
            "stream": True,
            "speculative": "prompt_lookup",
            "stop_token_ids": [0],
        },
    ),
]
FIELDS = sorted({*ChatCompletionRequest.model_fields, *CompletionRequest.model_fields})
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"]
NASTY_TEXT = [
    "",
    "\ud800",
    "a\udfffb",
    "<|im_start|>",
    "<tool_call>",
    "{",
    "\x00",
    "é" * 50,
    "9" * 5000,
]

text = st.one_of(
    st.text(max_size=12),
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.sampled_from(NASTY_TEXT),
)
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, -1, 1, 2**31, -(2**63), 2**64, 10**30, -(10**30)]),
    st.floats(),  # NaN and +-Infinity included
)
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
garbage = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
plausible = st.one_of(  # values a field may well accept: requests get past validation too
    st.integers(0, 4),
    st.floats(0, 2),
    st.booleans(),
    st.none(),
    st.sampled_from(["auto", "x", 5e-324, 1e-300, 1e-6, 1e300]),  # floats past float32's range
)
json_values = st.one_of(garbage, plausible)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path into `value` (keys and list indices), containers and leaves."""
    if prefix:
        yield prefix
    if isinstance(value, (dict, list)):
        for key, child in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _paths(child, (*prefix, key))


def _mutate(body: dict, path: tuple, value: Any, delete: bool) -> None:
    """Set (or delete) `path` in `body`; a missing last key is added."""
    *parents, last = path
    node = body
    for key in parents:
        node = node[key]
    if delete:
        del node[last]
    elif isinstance(node, list) and last >= len(node):
        node.append(value)
    else:
        node[last] = value


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """A valid request with one to three parts replaced, added or removed."""
    path, body = draw(st.sampled_from(BASES))
    body = copy.deepcopy(body)
    for _ in range(draw(st.integers(1, 3))):
        paths = [
            *_paths(body),
            *((field,) for field in FIELDS),
            *(("messages", 0, field) for field in MESSAGE_FIELDS if body.get("messages")),
        ]
        where = draw(st.sampled_from(paths))
        delete = draw(st.integers(0, 4)) == 0
        try:
            _mutate(body, where, draw(json_values), delete)
        except (KeyError, IndexError, TypeError):  # an earlier mutation changed the shape
            continue
    return path, json.dumps(body).encode()  # ensure_ascii: lone surrogates as \ud800 escapes


@st.composite
def raw(draw) -> tuple[str, bytes]:
    """Bodies that are not a request object: broken, truncated, non-UTF-8, deep, or other JSON."""
    path, body = draw(st.sampled_from(BASES))
    whole = json.dumps(body).encode()
    data = draw(
        st.one_of(
            st.binary(max_size=64),
            st.integers(0, len(whole)).map(lambda n: whole[:n]),
            st.just(json.dumps(body, ensure_ascii=False).replace('"', '"\ud800', 1)).map(
                lambda s: s.encode("utf-8", "surrogatepass")
            ),
            st.sampled_from(
                [b"[" * 100_000, b'{"a":' * 50_000, b'{"n": ' + b"9" * 5000 + b"}", b"null", b"[]"]
            ),
            json_values.map(lambda v: json.dumps(v).encode()),
        )
    )
    return path, data


def _check(response: httpx.Response) -> None:
    """Never a 500; errors in OpenAI's shape and one line; streams end with [DONE]."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and "\n" not in error["message"], error
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]"), response.text
        assert "server_error" not in response.text, response.text
    else:
        assert response.json()["choices"], response.text


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    # a request without max_tokens gets the artifact's default: a few tokens, as generation_config
    # may set it, so a mutation that drops max_tokens costs no more than the rest
    generator.manifest.generation = replace(generator.manifest.generation, max_new_tokens=4)
    engine = BatchEngine(generator, max_batch=4, max_context=CONTEXT)
    with running_server(engine, MODEL) as url:
        yield SimpleNamespace(url=url, engine=engine)


def test_fuzzed_requests_get_no_500_and_no_traceback(served, capfd, caplog):
    caplog.set_level(logging.WARNING)
    statuses: list[int] = []
    start = time.monotonic()
    with httpx.Client(base_url=served.url, timeout=60) as client:

        @settings(
            max_examples=REQUESTS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(st.one_of(mutated(), mutated(), mutated(), raw()))
        def one(request: tuple[str, bytes]) -> None:
            path, data = request
            response = client.post(path, content=data, headers={"content-type": "application/json"})
            statuses.append(response.status_code)
            _check(response)

        one()
    elapsed = time.monotonic() - start
    assert len(statuses) >= REQUESTS
    assert statuses.count(200) > REQUESTS // 20  # the mutations leave many requests valid
    # healthy afterwards: nothing left running, a plain request answered
    wait_idle(served.engine)
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    reply = httpx.post(served.url + CHAT, json=BASES[0][1], timeout=60)
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in ASGI application" not in err, err
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    with capfd.disabled():
        print(f"\n{len(statuses)} fuzzed requests in {elapsed:.1f} s, {statuses.count(200)} 200s")
