"""Tool calling on the real model with the official client: the model's call is parsed (plain and
streamed), answered with a `tool` message, and the final answer streams as content."""

from __future__ import annotations

import json

import openai
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from tests.serving.test_server import running_server

pytestmark = pytest.mark.real
MODEL = "coder"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}
QUESTION = {"role": "user", "content": "What's the weather like in Paris right now?"}


@pytest.fixture(scope="module")
def client(real_artifact):
    engine = BatchEngine(Generator(real_artifact()), max_batch=2)
    with (
        running_server(engine, MODEL) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        yield client


def _streamed_calls(stream) -> tuple[str, list[dict], str | None]:
    """Content, tool calls assembled from their deltas as OpenAI's clients do, finish reason."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for call in choice.delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_weather_call_round_trip(client):
    ask = {"model": MODEL, "messages": [QUESTION], "tools": [WEATHER], "temperature": 0}
    reply = client.chat.completions.create(**ask, max_tokens=64)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    content, calls, finish = _streamed_calls(
        client.chat.completions.create(**ask, max_tokens=64, stream=True)
    )
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert calls[0]["id"].startswith("call_")
    # answer the call (the assistant turn as the client got it: arguments as JSON text)
    messages = [
        QUESTION,
        choice.message.model_dump(exclude_none=True),
        {
            "role": "tool",
            "tool_call_id": call.id,
            "content": '{"temperature_c": 18, "sky": "cloudy"}',
        },
    ]
    final = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], temperature=0, max_tokens=48, stream=True
    )
    content, calls, finish = _streamed_calls(final)
    assert finish in ("stop", "length") and not calls
    assert "18" in content, content


def test_a_named_tool_choice_forces_the_call(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a joke about Berlin."}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=32,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert isinstance(json.loads(choice.message.tool_calls[0].function.arguments), dict)
