"""Tools on the OpenAI server (tiny random model: what the request handling guarantees whatever
the model writes); the real model's calls are tested in test_real_tool_calls.py."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.serving.openai_schema import ChatMessage
from tests.generation.test_tool_calls import TOOLS
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}]}


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    with running_server(BatchEngine(generator, max_batch=2), MODEL) as url:
        yield SimpleNamespace(url=url, generator=generator)


def _chat(served, **extra) -> httpx.Response:
    body = {**ASK, "temperature": 0, "max_tokens": 8, **extra}
    return httpx.post(served.url + "/v1/chat/completions", json=body, timeout=60)


def test_a_forced_call_the_model_botches_comes_back_as_content(served):
    """Random weights cannot finish a call's JSON: the answer is content, never a 500."""
    forced = {"type": "function", "function": {"name": "get_weather"}}
    for stream in (False, True):
        response = _chat(served, tools=TOOLS, tool_choice=forced, stream=stream)
        assert response.status_code == 200, response.text
    choice = _chat(served, tools=TOOLS, tool_choice=forced).json()["choices"][0]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"].startswith('<tool_call>\n{"name": "get_weather"')


def test_tool_choice_none_hides_the_tools_from_the_prompt(served):
    with_tools = _chat(served, tools=TOOLS).json()["usage"]["prompt_tokens"]
    hidden = _chat(served, tools=TOOLS, tool_choice="none").json()["usage"]["prompt_tokens"]
    plain = _chat(served).json()["usage"]["prompt_tokens"]
    assert hidden == plain < with_tools


def test_bad_tool_requests_get_400_naming_the_problem(served):
    for extra, words in [
        ({"tool_choice": "required"}, "needs tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "'x'"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "is not one of"),
    ]:
        response = _chat(served, **extra)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "tool_choice" and words in error["message"], error
    assert _chat(served).status_code == 200


def test_a_tool_turn_renders_with_its_call_arguments_as_json(served):
    call = {"id": "call_1", "type": "function"}
    call["function"] = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    messages = [
        ASK["messages"][0],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 18}'},
    ]
    response = _chat(served, messages=messages, tools=TOOLS)
    assert response.status_code == 200, response.text
    # what the server rendered: arguments as an object, the tool's answer as a response block
    rendered = [ChatMessage(**m).for_template() for m in messages]
    prompt = served.generator.chat_template.render(
        rendered, tools=TOOLS, add_generation_prompt=True
    )
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '<tool_response>\n{"temperature_c": 18}\n</tool_response>' in prompt
    bad = [
        *messages[:1],
        {
            "role": "assistant",
            "tool_calls": [call | {"function": {"name": "f", "arguments": "{oops"}}],
        },
    ]
    response = _chat(served, messages=bad, tools=TOOLS)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
