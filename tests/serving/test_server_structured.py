"""response_format on the OpenAI server: constrained decoding makes even a random model's answer
parse and match its schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import jsonschema
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
SCHEMA = {  # every value is short, so even random weights finish within max_tokens
    "type": "object",
    "properties": {
        "approved": {"type": "boolean"},
        "grade": {"enum": ["A", "B", "C"]},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["approved", "grade", "note"],
    "additionalProperties": False,
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    with running_server(BatchEngine(generator, max_batch=4), MODEL) as url:
        yield SimpleNamespace(url=url, generator=generator)


def _chat(served, content: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(served.url + "/v1/chat/completions", json=body, timeout=120)


@pytest.mark.parametrize("seed", range(4))
def test_sampled_answers_match_the_schema(served, seed):
    reply = _chat(
        served,
        "Review my bond.",
        response_format=JSON_SCHEMA,
        temperature=1.0,
        seed=seed,
        max_tokens=64,
    ).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_json_object_mode_returns_an_object(served):
    reply = _chat(
        served, "Any JSON.", response_format={"type": "json_object"}, temperature=0, max_tokens=4
    ).json()
    content = reply["choices"][0]["message"]["content"]
    assert content.startswith("{")  # cut by max_tokens; whatever there is opens an object


def test_completions_take_response_format_and_stream_it(served):
    body = {"model": MODEL, "prompt": "Verdict:", "response_format": JSON_SCHEMA, "max_tokens": 64}
    body |= {"stream": True, "temperature": 0.8, "seed": 5}
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_bad_response_formats_get_400(served):
    for response_format, words in [
        ({"type": "yaml"}, "is not one of"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "json_schema needs"),
        (
            {"type": "json_schema", "json_schema": {"schema": {"type": "object", "$ref": "#/no"}}},
            "cannot be enforced",
        ),
    ]:
        response = _chat(served, "hi", response_format=response_format, max_tokens=2)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "response_format" and words in error["message"], error
    assert _chat(served, "hi", max_tokens=2).status_code == 200
