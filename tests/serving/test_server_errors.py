"""Client errors on the OpenAI server: 400 (never 500) naming the parameter the client sent wrong,
with a message that says what is wrong; and logit_bias, applied per request in a batch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.sampling import SamplingParams
from tests.generation.test_tool_calls import TOOLS
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
ASK = [{"role": "user", "content": "What is a convertible bond?"}]
CHAT = {"model": MODEL, "messages": ASK, "max_tokens": 2}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    engine = BatchEngine(generator, max_batch=4)
    with running_server(engine, MODEL) as url:
        yield SimpleNamespace(url=url, engine=engine, generator=generator)


def _post(served, body: dict, path: str = "/v1/chat/completions") -> httpx.Response:
    """POST `body` as JSON text that may hold lone surrogates (escaped, as JSON allows)."""
    return httpx.post(
        served.url + path,
        content=json.dumps(body, ensure_ascii=True).encode(),
        headers={"content-type": "application/json"},
        timeout=60,
    )


def _error(served, body: dict, path: str = "/v1/chat/completions") -> tuple[str, str]:
    """(param, message) of the 400 that `body` gets."""
    response = _post(served, body, path)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error["param"], error["message"]


def _assistant_turn(**call) -> dict:
    """CHAT with an earlier assistant turn that made `call`."""
    history = [ASK[0], {"role": "assistant", "content": None, "tool_calls": [call]}]
    return {**CHAT, "messages": [*history, {"role": "tool", "content": "18C"}], "tools": TOOLS}


def _surrogate(path: str) -> str:
    return (
        f"{path} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not valid "
        "Unicode; send well-formed text."
    )


def test_lone_surrogates_are_refused_by_path(served):
    bad = "caf\ud800"
    cases = [
        ({**CHAT, "model": bad}, "/v1/chat/completions", "model"),
        ({**CHAT, "messages": [{"role": "user", "content": bad}]}, None, "messages.0.content"),
        ({**CHAT, "stop": ["ok", bad]}, None, "stop.1"),
        ({"model": MODEL, "prompt": ["x", bad]}, "/v1/completions", "prompt.1"),
        ({**CHAT, "tools": [{"function": {"name": "f", "parameters": {bad: 1}}}]}, None, None),
    ]
    for body, path, param in cases:
        got = _error(served, body, path or "/v1/chat/completions")
        param = param or "tools.0.function.parameters"  # a key: its object is named
        assert got == (param, _surrogate(param))


def test_bodies_json_cannot_read_get_400_saying_why(served):
    for data, why in [
        (b"[" * 100_000, "it is nested too deeply; flatten it"),
        (b'{"model": "tiny-qwen\xff"}', "it is not UTF-8 text; send UTF-8"),
        (
            b'{"seed": ' + b"9" * 5000 + b"}",
            "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 "
            "digits; shorten the number",
        ),
    ]:
        response = httpx.post(
            served.url + "/v1/chat/completions",
            content=data,
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400
        assert response.json()["error"]["message"] == f"the request body is not valid JSON ({why})."


def test_a_temperature_too_small_for_float32_is_greedy(served):
    """1e-300 is 0 in float32: dividing the logits by it left no finite logit for the JSON
    grammar's tokens (a 500) before such temperatures were taken as greedy."""
    body = {**CHAT, "max_tokens": 4, "response_format": {"type": "json_object"}}
    greedy = _post(served, {**body, "temperature": 0}).json()["choices"][0]["message"]
    for tiny in (1e-300, 5e-324):
        response = _post(served, {**body, "temperature": tiny})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"] == greedy


def test_wrong_types_get_400_naming_the_field(served):
    expected = [
        (
            _assistant_turn(**{**CALL, "function": "get_weather"}),
            "messages.1.tool_calls.0.function",
            "messages.1.tool_calls.0.function: Input should be a valid dictionary or object to "
            "extract fields from.",
        ),
        (
            _assistant_turn(**{**CALL, "function": {"name": "f", "arguments": "{oops"}}),
            "messages.1.tool_calls.0.function.arguments",
            "messages.1.tool_calls.0.function.arguments: tool call arguments are not valid JSON "
            "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1)); send "
            "a JSON object.",
        ),
        (
            {**CHAT, "tools": [{"type": "function", "function": "get_weather"}]},
            "tools.0.function",
            "tools.0.function: Input should be a valid dictionary or object to extract fields "
            "from.",
        ),
        (
            {**CHAT, "tools": [{"type": "function", "function": {"name": ""}}]},
            "tools.0.function.name",
            "tools.0.function.name: String should have at least 1 character.",
        ),
        (
            {**CHAT, "stop": 5},
            "stop",
            "stop: Input should be a valid string or Input should be a valid list.",
        ),
        ({"messages": ASK}, "model", "model: Field required."),
        (
            {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0",
            "messages.0.content.0: content part of type 'image_url' is not supported; this model "
            'reads text parts only ({"type": "text", "text": ...}).',
        ),
        (
            {**CHAT, "logit_bias": "none"},
            "logit_bias",
            "logit_bias: Input should be a valid dictionary.",
        ),
    ]
    for body, param, message in expected:
        assert _error(served, body) == (param, message)


def test_parameters_are_named_as_the_client_sent_them(served):
    vocab = served.generator.manifest.model.vocab_size
    expected = [
        (
            {**CHAT, "max_completion_tokens": 0},
            "max_completion_tokens",
            "max_completion_tokens=0 is out of range: it must be an integer >= 1 or null.",
        ),
        (
            {**CHAT, "chat_template_kwargs": {"tools": [], "add_generation_prompt": False}},
            "chat_template_kwargs",
            "chat template kwargs may not set add_generation_prompt, tools: the request's own "
            "fields give them; send the value there instead.",
        ),
        (
            {**CHAT, "tool_choice": "required"},
            "tool_choice",
            "tool_choice needs tools: declare them in `tools`.",
        ),
        (
            {**CHAT, "logit_bias": {"abc": 1}},
            "logit_bias",
            "logit_bias must map token ids (integers >= 0, as strings in JSON) to biases; 'abc' "
            "is not a token id.",
        ),
        (
            {**CHAT, "logit_bias": {"9" * 5000: 1}},
            "logit_bias",
            "logit_bias must map token ids (integers >= 0, as strings in JSON) to biases; "
            f"{'9' * 24!r} is not a token id.",
        ),
        (
            {**CHAT, "logit_bias": {"5": 101}},
            "logit_bias",
            "logit_bias must map token ids to biases in [-100, 100]; '5' has 101.0.",
        ),
        (
            {**CHAT, "logit_bias": {str(vocab): 1}},
            "logit_bias",
            f"logit_bias must use token ids of this model's vocabulary, [0, {vocab}); [{vocab}] "
            "are outside it.",
        ),
    ]
    for body, param, message in expected:
        assert _error(served, body) == (param, message)
    assert _post(served, CHAT).status_code == 200


def test_logit_bias_steers_each_request_of_a_batch(served):
    """+100 makes a token certain, -100 rules it out; each row of one batch gets its own bias."""
    generator = served.generator
    prompt = generator.prompt_ids(messages=ASK)
    plain = generator.generate(prompt=prompt, temperature=0, max_tokens=6)
    forced = generator.tokenizer.encode(" bond")[0]
    banned = plain.token_ids[0]
    biases = [{}, {forced: 100.0}, {banned: -100.0}]
    engine = BatchEngine(generator, max_batch=3)
    outputs: list[list] = [[] for _ in biases]
    for bias, out in zip(biases, outputs, strict=True):
        params = SamplingParams.from_defaults(
            generator.manifest, temperature=0, max_tokens=6, stop_token_ids=[], logit_bias=bias
        )
        engine.add(generator.prepare(prompt=prompt, params=params), out.append)
    while engine.step():
        pass
    assert engine.stats["peak_batch"] == 3
    tokens = [[d.token_id for d in out] for out in outputs]
    assert tokens[0] == plain.token_ids
    assert tokens[1] == [forced] * 6
    assert tokens[2][0] != banned
    # the server takes OpenAI's form (ids as strings) to the same sampler
    body = {**CHAT, "messages": ASK, "temperature": 0, "max_tokens": 6}
    reply = _post(served, {**body, "logit_bias": {str(forced): 100}}).json()
    assert reply["choices"][0]["message"]["content"] == " bond" * 6
    reply = _post(served, {**body, "logit_bias": {str(banned): -100}}).json()
    assert reply["choices"][0]["message"]["content"] == generator.tokenizer.decode(tokens[2])
