"""Structured output on the real model: 20 different prompts, each answer valid against its
json_schema (requests sent 8 at a time through the official async client)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from tests.serving.test_server import running_server

pytestmark = pytest.mark.real
SCHEMA = {
    "type": "object",
    "properties": {
        "language": {"type": "string", "maxLength": 20},
        "function_name": {"type": "string", "pattern": "^[a-z_][a-z0-9_]*$", "maxLength": 40},
        "difficulty": {"enum": ["easy", "medium", "hard"]},
        "lines": {"type": "integer", "minimum": 1, "maximum": 200},
    },
    "required": ["language", "function_name", "difficulty", "lines"],
    "additionalProperties": False,
}
TASKS = [
    "reverse a string",
    "check for a palindrome",
    "sum a list",
    "compute a factorial",
    "merge two sorted lists",
    "find the maximum of an array",
    "count vowels in a word",
    "parse a CSV line",
    "validate an email address",
    "compute Fibonacci numbers",
    "flatten a nested list",
    "remove duplicates from a list",
    "convert Celsius to Fahrenheit",
    "check whether a year is a leap year",
    "compute a GCD",
    "binary search a sorted list",
    "transpose a matrix",
    "count words in a sentence",
    "rotate an array",
    "compute a mean",
]


def test_twenty_json_schema_answers_validate(real_artifact):
    engine = BatchEngine(Generator(real_artifact()), max_batch=8)
    response_format = {"type": "json_schema", "json_schema": {"name": "task", "schema": SCHEMA}}

    async def ask(client, limit, task: str) -> str:
        async with limit:
            reply = await client.chat.completions.create(
                model="coder",
                messages=[
                    {
                        "role": "user",
                        "content": f"Describe, as JSON, a Python function to {task}: its "
                        "language, function_name, difficulty and number of lines.",
                    }
                ],
                response_format=response_format,
                temperature=0,
                max_tokens=64,
            )
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content

    async def ask_all(url: str) -> list[str]:
        limit = asyncio.Semaphore(8)
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            return await asyncio.gather(*(ask(client, limit, task) for task in TASKS))

    with running_server(engine, "coder") as url:
        answers = asyncio.run(ask_all(url))
    parsed = [json.loads(answer) for answer in answers]
    for value in parsed:
        jsonschema.validate(value, SCHEMA)
    assert len({p["function_name"] for p in parsed}) >= 10  # different prompts, different answers
