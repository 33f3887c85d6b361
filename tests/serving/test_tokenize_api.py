"""vLLM's tokenizer endpoints (/tokenize, /detokenize, /tokenizer_info) on a real server: the ids
are the ones generation uses, chat counts equal the chat endpoint's usage, errors are 400s naming
the field, and the API key and Host rules cover them as they cover the other routes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest

from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.manifest import Manifest
from tests.generation.test_tool_calls import TOOLS
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
TEXT = "def add(a, b):\n    return a + b  # 加法 🙂 <|im_end|>"
MESSAGES = [
    {"role": "system", "content": "You are a careful financial analyst."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "What is a "}, {"type": "text", "text": "bond?"}],
    },
]


@pytest.fixture(scope="module")
def served(tiny_artifact) -> Iterator[SimpleNamespace]:
    generator = Generator(tiny_artifact)
    engine = BatchEngine(generator, max_batch=4, max_context=4096)
    with running_server(engine, MODEL) as url, httpx.Client(base_url=url, timeout=60) as http:
        yield SimpleNamespace(url=url, http=http, engine=engine, generator=generator)


def _tokenize(served, **body) -> dict:
    response = served.http.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def _error(served, path: str, body: dict | str, status: int = 400) -> tuple[str | None, str]:
    """(param, message) of the error `body` gets (JSON text with lone surrogates kept)."""
    content = body if isinstance(body, str) else json.dumps(body, ensure_ascii=True)
    response = served.http.post(
        path, content=content.encode(), headers={"content-type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    return error["param"], error["message"]


def test_prompt_round_trip(served):
    tokenizer = served.generator.tokenizer
    out = _tokenize(served, prompt=TEXT)
    ids = tokenizer.encode(TEXT)
    assert out == {"count": len(ids), "max_model_len": 4096, "tokens": ids, "token_strs": None}
    assert tokenizer.token_to_id("<|im_end|>") in ids  # special tokens in text are parsed
    # add_special_tokens (vLLM's default for a prompt) adds what the tokenizer's post-processor
    # adds: nothing for Qwen
    assert out["tokens"] == tokenizer.encode(TEXT, add_special_tokens=True)
    assert _tokenize(served, prompt=TEXT, add_special_tokens=False)["tokens"] == ids
    back = served.http.post("/detokenize", json={"tokens": ids, "model": MODEL})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": TEXT}
    assert _tokenize(served, prompt="")["tokens"] == []
    assert served.http.post("/detokenize", json={"tokens": []}).json() == {"prompt": ""}


def test_token_strs(served):
    out = _tokenize(served, prompt="hello world", return_token_strs=True, model=MODEL)
    assert out["token_strs"] == ["hello", "Ġworld"]
    assert out["tokens"] == [served.generator.tokenizer.token_to_id(s) for s in out["token_strs"]]


def test_chat_count_equals_chat_usage(served):
    """The chat form renders as /v1/chat/completions does (roles, content parts, tools), so
    count is that endpoint's usage.prompt_tokens."""
    for extra in ({}, {"tools": TOOLS}):
        chat = served.http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1, **extra},
        )
        assert chat.status_code == 200, chat.text
        out = _tokenize(served, messages=MESSAGES, **extra)
        assert out["count"] == chat.json()["usage"]["prompt_tokens"]
        flat = [
            {**m, "content": m["content"] if isinstance(m["content"], str) else "What is a bond?"}
            for m in MESSAGES
        ]
        assert out["tokens"] == served.generator.prompt_ids(messages=flat, tools=extra.get("tools"))
    text = served.generator.tokenizer.decode(out["tokens"])
    assert text.endswith("<|im_start|>assistant\n")
    # without the generation prompt: the conversation as it stands
    closed = _tokenize(served, messages=MESSAGES, add_generation_prompt=False)["tokens"]
    assert served.generator.tokenizer.decode(closed).endswith("What is a bond?<|im_end|>\n")
    # the developer role is the system role, as in the chat endpoint
    developer = [{**MESSAGES[0], "role": "developer"}, MESSAGES[1]]
    assert (
        _tokenize(served, messages=developer)["tokens"]
        == _tokenize(served, messages=MESSAGES)["tokens"]
    )


def test_tokenizer_info(served, tiny_artifact):
    response = served.http.get("/tokenizer_info")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["tokenizer_class"] == "Qwen2Tokenizer"
    assert (info["eos_token"], info["pad_token"], info["bos_token"]) == (
        "<|im_end|>",
        "<|endoftext|>",
        None,
    )
    assert info["chat_template"] == Manifest.load(tiny_artifact).chat_template
    assert info["added_tokens_decoder"]["151645"] == "<|im_end|>"
    assert not {"vocab_file", "merges_file", "tokenizer_file"} & set(info)
    # what lm-eval's remote tokenizer does with it: the EOS id is the encoding of its text
    eos = _tokenize(served, prompt=info["eos_token"], add_special_tokens=False)["tokens"]
    assert eos == [served.generator.tokenizer.token_to_id("<|im_end|>")]


@pytest.mark.parametrize(
    ("path", "body", "param", "fragment"),
    [
        ("/tokenize", {}, "prompt", "got neither"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "messages", "not both"),
        ("/tokenize", {"prompt": "a", "tools": TOOLS}, "tools", "applies to `messages`"),
        ("/tokenize", {"prompt": 3}, "prompt", "valid string"),
        ("/tokenize", {"messages": []}, "messages", "at least 1"),
        (
            "/tokenize",
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages.0.role",
            "robot",
        ),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content.0",
            "image_url",
        ),
        (
            "/tokenize",
            {"messages": MESSAGES, "chat_template": "{{ x }}"},
            "chat_template",
            "not supported",
        ),
        (
            "/tokenize",
            {"messages": MESSAGES, "continue_final_message": True},
            "continue_final_message",
            "not supported",
        ),
        (
            "/tokenize",
            {"messages": MESSAGES, "chat_template_kwargs": {"add_generation_prompt": False}},
            "chat_template_kwargs",
            "add_generation_prompt",
        ),
        (
            "/tokenize",
            {"messages": MESSAGES, "tools": [{"type": "function"}]},
            "tools.0.function",
            "Field required",
        ),
        ("/tokenize", {"prompt": "a\ud800"}, "prompt", "lone surrogate"),
        ("/detokenize", {"tokens": [1, 151936]}, "tokens", "151936"),
        ("/detokenize", {"tokens": [-1]}, "tokens", "-1"),
        ("/detokenize", {"tokens": ["x"]}, "tokens.0", "valid integer"),
        ("/detokenize", {}, "tokens", "Field required"),
    ],
)
def test_errors_name_the_field(served, path, body, param, fragment):
    got_param, message = _error(served, path, body)
    assert got_param == param
    assert fragment in message


def test_wrong_model_is_404(served):
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        param, message = _error(served, path, {**body, "model": "gpt-4"}, 404)
        assert param == "model"
        assert MODEL in message
    param, _ = _error(served, "/tokenize", "{not json")
    assert param is None


def test_api_key_and_host_rules(tiny_artifact):
    generator = Generator(tiny_artifact)
    with running_server(BatchEngine(generator), MODEL, api_key="k") as url:
        for method, path, body in (
            ("POST", "/tokenize", {"prompt": "a"}),
            ("POST", "/detokenize", {"tokens": [1]}),
            ("GET", "/tokenizer_info", None),
        ):
            refused = httpx.request(method, url + path, json=body)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"]["code"] == "invalid_api_key"
            headers = {"Authorization": "Bearer k"}
            assert httpx.request(method, url + path, json=body, headers=headers).status_code == 200
    hosts = frozenset({"localhost", "127.0.0.1"})
    with running_server(BatchEngine(generator), MODEL, allowed_hosts=hosts) as url:
        rebound = httpx.get(url + "/tokenizer_info", headers={"Host": "evil.example"})
        assert rebound.status_code == 400
        assert rebound.json()["error"]["code"] == "invalid_host"
        assert httpx.get(url + "/tokenizer_info").status_code == 200
