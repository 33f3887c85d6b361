"""Nothing blocks the server's event loop: a request's CPU work (template, tokenization, grammar,
prediction) runs off it, a chat template that never ends is a 400 naming its limit, and SIGTERM
stops `serve` within seconds with requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from qwen_deploy.generation.chat_template import ChatTemplate, ChatTemplateError
from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.manifest import Manifest
from qwen_deploy.serving.server import PREPARE_NICE, OpenAIServer, warm_structured
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
NEVER_ENDS = (  # 10^10 iterations, no output, no call: only the line tracer can stop it
    "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
)
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def looping_artifact(tiny_artifact, tmp_path_factory) -> Path:
    """The tiny artifact whose chat template never ends."""
    folder = tmp_path_factory.mktemp("looping") / "a"
    folder.mkdir()
    for file in Path(tiny_artifact).iterdir():
        if file.name != "manifest.json":
            os.symlink(file, folder / file.name)
    manifest = Manifest.load(tiny_artifact)
    manifest.chat_template = NEVER_ENDS
    manifest.save(folder)
    return folder


@pytest.mark.parametrize(
    ("template", "limit"),
    [
        (NEVER_ENDS, "ran past its 0.5 s time limit"),
        (
            "{% for a in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
            "wrote more than its limit of 100000 characters",
        ),
        ("{{ 'x' * 10**10 }}", "would make a value longer than its limit of 100000 characters"),
        ("{{ 'x'.ljust(10**10) }}", "passed the number 10000000000, larger than its limit"),
        ("{{ 'x'|center(10**10) }}", "passed the number 10000000000, larger than its limit"),
        ("{{ '%1000000000d' % 1 }}", "would make a value longer than its limit"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
            "{% endfor %}{{ ns.s }}",
            "made a value longer than its limit of 100000 characters",
        ),
        ("{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('ab') }}", "made a value longer"),
    ],
)
def test_a_template_render_stops_at_its_limits(template, limit):
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        ChatTemplate(template, {}, seconds=0.5, chars=100_000).render(MESSAGES)
    assert time.monotonic() - start < 5
    assert str(e.value).startswith(f"the chat template {limit}")
    assert "(limits: 0.5 s, 100000 characters of output)" in str(e.value)
    # a template within its limits renders as before, its own tracer restored after
    tracer = sys.gettrace()
    ok = ChatTemplate("{% for m in messages %}{{ m.content * 3 }}{% endfor %}", {}, chars=10)
    assert ok.render(MESSAGES) == "hihihi"
    assert sys.gettrace() is tracer


def _stream_gaps(url: str, gaps: list[float], stop: threading.Event) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 3000,
        "stop_token_ids": [],
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        last = None
        for line in r.iter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
            if stop.is_set():
                break


def test_health_and_streams_go_on_while_large_bodies_are_prepared(tiny_artifact):
    """Three 1.5 MB prompts (refused from a head of their text: the context is 4096 tokens) and
    a fresh json_schema: on the event loop each prompt held it ~2 s on a 2-core machine; off it,
    /health and a running stream go on."""
    generator = Generator(tiny_artifact)
    warm_structured(generator.tokenizer)  # as serve does before it listens
    text = ("hello world, this is some text. " * 50000)[:1_500_000]
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": text}]}).encode()
    schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(30)}}
    structured = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 8,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    }
    headers = {"content-type": "application/json"}
    answers, health, gaps, stop = [], [], [], threading.Event()
    with running_server(BatchEngine(generator), MODEL) as url:

        def send_big() -> None:
            r = httpx.post(url + "/v1/chat/completions", content=big, headers=headers, timeout=120)
            answers.append((r.status_code, r.json()["error"]["code"]))

        def send_structured() -> None:
            r = httpx.post(url + "/v1/chat/completions", json=structured, timeout=120)
            answers.append((r.status_code, None))

        streamer = threading.Thread(target=_stream_gaps, args=(url, gaps, stop))
        streamer.start()
        while len(gaps) < 20:
            time.sleep(0.05)
        before = len(gaps)
        clients = [threading.Thread(target=send_big) for _ in range(3)]
        clients.append(threading.Thread(target=send_structured))
        for client in clients:
            client.start()
        with httpx.Client() as c:
            # from the clients' start until they are answered, 3 probes at least (the answers
            # can all be in within ~50 ms)
            while any(client.is_alive() for client in clients) or len(health) < 3:
                start = time.perf_counter()
                assert c.get(url + "/health").status_code == 200
                health.append(time.perf_counter() - start)
                time.sleep(0.02)
        stop.set()
        streamer.join(60)
    during = gaps[before:]
    assert sorted(answers) == [(200, None)] + [(400, "context_length_exceeded")] * 3
    # bounds for a loaded 2-core machine (measured there: /health at most ~0.2 s, stream gaps
    # ~4x their median; with the work on the loop: /health and the stream stop for seconds)
    assert max(health) < 1.0, (max(health), statistics.median(health))
    assert during and max(during) < 1.0, (max(during), statistics.median(during))


def test_a_template_that_never_ends_is_a_400_and_the_server_stays_healthy(looping_artifact):
    with running_server(BatchEngine(Generator(looping_artifact)), MODEL) as url:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
        result = {}
        chat = threading.Thread(
            target=lambda: result.update(
                response=httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            )
        )
        start = time.monotonic()
        chat.start()
        time.sleep(0.3)
        health = []
        while chat.is_alive():  # the server answers while the template runs
            t = time.perf_counter()
            assert httpx.get(url + "/health", timeout=5).status_code == 200
            health.append(time.perf_counter() - t)
            time.sleep(0.05)
        elapsed = time.monotonic() - start
        response = result["response"]
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "messages"
        assert error["message"].startswith(
            "the chat template ran past its 2 s time limit while rendering these messages "
            "(limits: 2 s, 16777216 characters of output)"
        )
        assert 2 <= elapsed < 10
        assert health and max(health) < 1.0
        # and it goes on serving
        completion = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=completion).status_code == 200


def _serve(artifact: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("qwen-deploy", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "qwen_deploy.cli"]
    env = {k: v for k, v in os.environ.items() if k != "QWEN_DEPLOY_API_KEY"}
    process = subprocess.Popen(
        [*command, "serve", str(artifact), "--port", str(port), "--model-name", MODEL],
        env=env,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        assert process.poll() is None, process.stderr.read().decode()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health").status_code == 200:
                return process, url
        assert time.time() < deadline, "qwen-deploy serve did not come up"
        time.sleep(0.2)


def test_sigterm_stops_serve_within_5_s_with_requests_in_flight(looping_artifact):
    """A stream in flight and a chat whose template never ends: SIGTERM ends the stream with an
    error chunk, answers the chat 503 and ends the process within 5 s (measured: ~0.3 s)."""
    process, url = _serve(looping_artifact)
    try:
        lines, results = [], {}

        def stream() -> None:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 100000, "stream": True}
            body["stop_token_ids"] = []
            with (
                contextlib.suppress(httpx.HTTPError),
                httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r,
            ):
                lines.extend(r.iter_lines())

        def chat() -> None:
            body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2}
            with contextlib.suppress(httpx.HTTPError):
                results["chat"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)

        clients = [threading.Thread(target=stream), threading.Thread(target=chat)]
        for client in clients:
            client.start()
        sent = time.monotonic()
        while httpx.get(url + "/health").json()["active"] < 1:  # the stream; chat is rendering
            time.sleep(0.05)
        assert time.monotonic() - sent < 1.5  # the chat's template runs 2 s: it is in flight
        start = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(30)
        took = time.monotonic() - start
        for client in clients:
            client.join(30)
        assert took < 5, took
        assert code in (0, -signal.SIGTERM)  # uvicorn raises the signal again once it is done
        assert any("the server is shutting down" in line for line in lines), lines[-3:]
        # the chat still rendering is answered at once, not after its template's 2 s
        assert results["chat"].status_code == 503
        assert results["chat"].json()["error"] == {
            "message": "the server is shutting down; send the request again to a running server.",
            "type": "server_error",
            "param": None,
            "code": "shutting_down",
        }
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        process.stderr.close()


@pytest.mark.skipif(sys.platform != "linux", reason="a nice value per thread is Linux's")
def test_requests_are_prepared_at_a_lower_cpu_priority_than_the_engine(tiny_artifact):
    """The model's threads keep the cores busy: a request's preparation must yield to them."""
    server = OpenAIServer(BatchEngine(Generator(tiny_artifact)), MODEL)

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def prepared() -> int:
        return await server.off_loop(priority)

    if priority() >= PREPARE_NICE:
        pytest.skip(f"the tests already run at nice {priority()}, no higher than the workers'")
    assert asyncio.run(prepared()) == PREPARE_NICE
    assert priority() < PREPARE_NICE  # the thread that asked keeps its own
