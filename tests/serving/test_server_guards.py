"""The server's exposure guards: connection timeouts, the Host allow-list of a keyless localhost
server, the API key over every route (docs included), start-up refusals, the quality warning."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from click.testing import CliRunner

from qwen_deploy.cli import main
from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.manifest import Manifest
from qwen_deploy.records import Quality
from qwen_deploy.serving.server import host_allow_list
from tests.serving.test_server import running_server

MODEL = "tiny-qwen"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
TIMEOUT = 0.5  # the request timeout these tests serve with


@pytest.fixture(scope="module")
def generator(tiny_artifact) -> Generator:
    return Generator(tiny_artifact)


@pytest.fixture(scope="module")
def served(generator) -> Iterator[SimpleNamespace]:
    with running_server(BatchEngine(generator), MODEL, request_timeout=TIMEOUT) as url:
        yield SimpleNamespace(url=url, address=(url.split("//")[1].split(":")[0], _port(url)))


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes `sock` (it sends nothing but, maybe, one response)."""
    start = time.monotonic()
    sock.settimeout(TIMEOUT + 5)
    while sock.recv(65536):  # b"": the server closed the connection
        pass
    return time.monotonic() - start


def test_idle_and_half_sent_connections_are_closed(served):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    body = json.dumps(CHAT).encode()
    full = head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    sends = {
        "nothing": b"",
        "half a head": head,
        "half a body": full + body[: len(body) // 2],
    }
    for what, data in sends.items():
        with socket.create_connection(served.address) as sock:
            sock.sendall(data)
            assert TIMEOUT * 0.8 < _closed_after(sock) < TIMEOUT + 2, what
    # many idle connections are all closed: none is held open
    socks = [socket.create_connection(served.address) for _ in range(50)]
    time.sleep(TIMEOUT + 0.5)
    for sock in socks:
        sock.settimeout(1)
        assert sock.recv(1) == b""
        sock.close()
    # a keep-alive connection that starts a second request and stops is closed too
    with socket.create_connection(served.address) as sock:
        sock.sendall(full + body)
        sock.settimeout(30)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        sock.sendall(head)
        assert _closed_after(sock) < TIMEOUT + 2


def test_a_long_answer_is_not_cut_by_the_request_timeout(served):
    body = {**CHAT, "max_tokens": 300, "stop_token_ids": [], "stream": True}
    start, count = time.monotonic(), 0
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, timeout=60) as r:
        count = sum(line.startswith("data: {") for line in r.iter_lines())
    assert time.monotonic() - start > TIMEOUT
    assert count == 300


def test_a_keyless_localhost_server_answers_only_loopback_host_names(generator):
    assert host_allow_list("0.0.0.0", None) is None  # on the network: the key is the guard
    assert host_allow_list("127.0.0.1", "key") is None
    assert host_allow_list("::1", None, ["::2", "Box.Internal"]) == {
        "localhost",
        "127.0.0.1",
        "[::1]",
        "[::2]",
        "box.internal",
    }
    allowed = host_allow_list("127.0.0.1", None, ["box.internal"])
    with running_server(BatchEngine(generator), MODEL, allowed_hosts=allowed) as url:
        port = _port(url)
        for host in ("localhost", f"127.0.0.1:{port}", "[::1]:80", "BOX.internal:9"):
            assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host
        for path in ("/health", "/v1/models"):
            response = httpx.get(url + path, headers={"Host": f"rebound.example:{port}"})
            assert response.status_code == 400
            assert response.json()["error"] == {
                "message": f"Host 'rebound.example:{port}' is not served here: a server without "
                "an API key on localhost answers only 127.0.0.1, [::1], box.internal, localhost "
                "(a guard against DNS rebinding); add the name with --allowed-host, or set "
                "--api-key.",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_host",
            }
        response = httpx.post(
            url + "/v1/chat/completions", json=CHAT, headers={"Host": "rebound.example"}
        )
        assert response.status_code == 400
        assert httpx.post(url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_the_api_key_covers_the_docs_and_an_empty_bearer(generator):
    with running_server(BatchEngine(generator), MODEL, api_key="s3cret") as url:
        for path in ("/docs", "/openapi.json", "/v1/models"):
            for auth in ({}, {"Authorization": "Bearer"}, {"Authorization": "bearer"}):
                response = httpx.get(url + path, headers=auth)
                assert response.status_code == 401, (path, auth)
                assert response.json()["error"]["code"] == "invalid_api_key"
            good = httpx.get(url + path, headers={"Authorization": "Bearer s3cret"})
            assert good.status_code == 200
        schema = httpx.get(url + "/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert "/v1/chat/completions" in schema.json()["paths"]
        assert httpx.get(url + "/redoc").status_code == 404
    # an empty key matches no request (serve refuses one at start)
    with running_server(BatchEngine(generator), MODEL, api_key="") as url:
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer"}).status_code == 401
    with running_server(BatchEngine(generator), MODEL, docs=False) as url:
        assert httpx.get(url + "/docs").status_code == 404
        assert httpx.get(url + "/openapi.json").status_code == 404
        assert httpx.get(url + "/health").status_code == 200


def test_serve_guards_a_keyless_localhost_server(tiny_artifact):
    """The command wires the guards: Host names (with --allowed-host), docs off with --no-docs."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("qwen-deploy", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "qwen_deploy.cli"]
    args = ["serve", str(tiny_artifact), "--port", str(port), "--allowed-host", "box.internal"]
    env = {k: v for k, v in os.environ.items() if k != "QWEN_DEPLOY_API_KEY"}
    process = subprocess.Popen([*command, *args, "--no-docs"], env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert time.time() < deadline, "qwen-deploy serve did not come up"
            time.sleep(0.2)
        assert httpx.get(url + "/health", headers={"Host": "box.internal"}).status_code == 200
        refused = httpx.get(url + "/v1/models", headers={"Host": "rebound.example"})
        assert (refused.status_code, refused.json()["error"]["code"]) == (400, "invalid_host")
        assert httpx.get(url + "/docs").status_code == 404
        assert httpx.get(url + "/openapi.json").status_code == 404
    finally:
        process.terminate()
        process.wait(30)
        process.stderr.close()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "99999"], {}, "error: --port 99999 is not a TCP port: use one in 1-65535.\n"),
        (["--port", "0"], {}, "error: --port 0 is not a TCP port: use one in 1-65535.\n"),
        (
            ["--api-key", ""],
            {},
            "error: the API key is empty (--api-key or QWEN_DEPLOY_API_KEY): give a non-empty "
            "key, or unset both to serve without one.\n",
        ),
        (
            [],
            {"QWEN_DEPLOY_API_KEY": ""},
            "error: the API key is empty (--api-key or QWEN_DEPLOY_API_KEY): give a non-empty "
            "key, or unset both to serve without one.\n",
        ),
    ],
)
def test_serve_refuses_bad_options_in_one_line(tiny_artifact, args, env, message):
    result = CliRunner().invoke(main, ["serve", str(tiny_artifact), *args], env=env)
    assert (result.exit_code, result.stderr) == (2, message)


def test_a_failed_quality_gate_is_warned_at_start_and_in_health(tiny_artifact, tmp_path, capsys):
    folder = tmp_path / "failed-int8"
    folder.mkdir()
    for file in Path(tiny_artifact).iterdir():
        if file.name != "manifest.json":
            os.symlink(file, folder / file.name)
    manifest = Manifest.load(tiny_artifact)
    manifest.quality = Quality(preset="int8-weight", passed=False, failures=["top-1 0.81 < 0.95"])
    manifest.save(folder)
    warning = (
        "this artifact failed its quantization quality gate (int8-weight: top-1 0.81 < 0.95); "
        "its answers may be worse than its source model's: quantize it again (`quantize` prints "
        "what to try) or serve the source artifact."
    )
    with running_server(BatchEngine(Generator(folder)), MODEL) as url:
        assert httpx.get(url + "/health").json()["warnings"] == [warning]
    assert capsys.readouterr().err == f"warning: {warning}\n"
