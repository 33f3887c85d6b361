"""Tool calls in model output: Qwen's tagged blocks and bare JSON become OpenAI tool_calls."""

from __future__ import annotations

import json

import pytest

from qwen_deploy.generation.tool_calls import ToolCallStream, parse_tool_calls, plan_tools

NAMES = {"get_weather", "get_time"}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": {}}} for n in sorted(NAMES)]
TAGGED = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in parsed[1]]


def test_tagged_blocks_become_calls_with_their_content():
    parsed = parse_tool_calls(TAGGED, NAMES)
    assert parsed[0] == "Let me check."
    assert _calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in parsed[1]}) == 2 and parsed[1][0].id.startswith("call_")
    assert parsed[1][0].to_openai(0) == {
        "index": 0,
        "id": parsed[1][0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '  {"name": "get_weather",\n  "arguments": {"city": "Paris"}}\n',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        '{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}',
    ],
)
def test_bare_json_naming_a_declared_tool_is_a_call(text):
    assert _calls(parse_tool_calls(text, NAMES)) == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize(
    "text",
    [
        "Paris is sunny today.",
        '{"name": "launch_missiles", "arguments": {}}',  # bare JSON, undeclared
        '{"city": "Paris"}',
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"temperature": 18}',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',  # broken
        '<tool_call>\n{"name": "get_weather", "arguments": []}\n</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> and more text',
    ],
)
def test_anything_else_stays_plain_content(text):
    assert parse_tool_calls(text, NAMES) is None
    stream = ToolCallStream(NAMES)
    assert stream.push(text) + stream.finish()[0] == text and stream.finish()[1] == []


@pytest.mark.parametrize(
    "text",
    [TAGGED, "Plain answer, no call <tool", '{"name": "get_weather", "arguments": {}}', "x " * 30],
)
def test_streaming_gives_the_same_answer_however_the_text_is_split(text):
    whole = parse_tool_calls(text, NAMES)
    for size in (1, 2, 3, 7):
        stream, sent = ToolCallStream(NAMES), ""
        for a in range(0, len(text), size):
            sent += stream.push(text[a : a + size])
        held, calls = stream.finish()
        if whole is None:
            assert sent + held == text and calls == []
        else:
            assert [(c.name, c.arguments) for c in calls] == [
                (c.name, c.arguments) for c in whole[1]
            ]
            assert (sent + held).strip() == whole[0]


def test_plain_text_streams_without_waiting_and_holds_only_a_possible_tag():
    stream = ToolCallStream(NAMES)
    assert stream.push("The weather ") == "The weather "
    assert stream.push("is fine <tool") == "is fine "  # could still become <tool_call>
    assert stream.push("s>") == "<tools>"


def test_plans_for_each_tool_choice():
    assert plan_tools(TOOLS, None).names == NAMES and plan_tools(TOOLS, "auto").prefill == ""
    none = plan_tools(TOOLS, "none")
    assert none.tools is None and none.stream() is None
    assert plan_tools(TOOLS, "required").prefill == "<tool_call>\n"
    forced = plan_tools(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert forced.prefill == '<tool_call>\n{"name": "get_time", "arguments": {'
    stream = forced.stream()
    assert stream.push('"zone": "UTC"}}\n</tool_call>') == ""
    assert [(c.name, c.arguments) for c in stream.finish()[1]] == [("get_time", '{"zone": "UTC"}')]
    for tools, choice, words in [
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among the declared"),
        (TOOLS, "always", "is not one of"),
        (None, "required", "needs tools"),
        ([{"type": "function"}], None, "a tool must be"),
    ]:
        with pytest.raises(ValueError, match=words):
            plan_tools(tools, choice)
