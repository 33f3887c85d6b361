"""`qwen-deploy triton`: the generated repository, its configs, and a real tritonserver serving it.

The server is the `tritonserver` binary from the nvidia-pytriton wheel (Python backend only), in
the isolated env `make triton-env` creates (.venv-triton, or QWEN_DEPLOY_TRITON_ENV); the text
model runs there too. tritonclient and Triton's ModelConfig protobuf are used through
tests/serving/triton_client.py under that env's Python. Greedy tokens are compared with the
Generator here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import onnx
import pytest
from click.testing import CliRunner

from benchmarks._triton import (
    TRITON_ENV,
    TRITON_PYTHON,
    TritonServer,
    port_free,
    triton_missing,
)
from qwen_deploy.artifact import MARKER
from qwen_deploy.cli import main
from qwen_deploy.generation.generator import Generator
from qwen_deploy.manifest import Manifest
from qwen_deploy.records import Engine, EngineLimits
from qwen_deploy.serving.triton_repo import MODEL_TEMPLATE, write_repository

CLIENT = Path(__file__).with_name("triton_client.py")
ONNX_TO_TRITON = {"INT64": "TYPE_INT64", "FLOAT": "TYPE_FP32", "FLOAT16": "TYPE_FP16"}
CHAT = [{"role": "user", "content": "What is the current ratio?"}]
GREEDY = {"temperature": 0, "max_tokens": 10}


needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=triton_missing() or "")


def triton_client(*args: str) -> list:
    """Run tests/serving/triton_client.py in the Triton env; its JSON answer."""
    done = subprocess.run(
        [str(TRITON_PYTHON), str(CLIENT), *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


# -- the repository, no server needed ---------------------------------------------------------


def test_repository_layout(tiny_artifact, tmp_path):
    out = tmp_path / "repo"
    result = cli("triton", tiny_artifact, "-o", out, "--name", "fin_r1", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout.splitlines()[0])
    assert (info["generate_model"], info["decoder_model"]) == ("fin_r1", "fin_r1_decoder")

    # the decoder's version folder is the complete artifact, byte for byte
    version = out / "fin_r1_decoder" / "1"
    files = sorted(p.name for p in tiny_artifact.iterdir() if p.name != MARKER)
    assert sorted(p.name for p in version.iterdir()) == files
    for name in files:
        assert (version / name).read_bytes() == (tiny_artifact / name).read_bytes()
    assert Manifest.load(version).to_dict() == Manifest.load(tiny_artifact).to_dict()
    # weights are shared with the artifact (hard links), the editable small files are not
    assert (version / "model.onnx.data").samefile(tiny_artifact / "model.onnx.data")
    assert not (version / "manifest.json").samefile(tiny_artifact / "manifest.json")

    assert (out / "fin_r1" / "1" / "model.py").read_text() == MODEL_TEMPLATE.read_text()
    readme = (out / "README.md").read_text()
    for command in (
        'tritonserver --model-repository="$REPO"',
        "--load-model=fin_r1",
        "/v2/models/fin_r1/generate_stream",
        'async_stream_infer("fin_r1"',
    ):
        assert command in readme
    assert not list(tmp_path.glob(".repo.partial-*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "tensorrt"], "--backend tensorrt needs a TensorRT engine artifact"),
        (["--name", "my model"], "model name 'my model' is not a valid Triton model name"),
        (["--instances", "0"], "--instances >= 1"),
        (["--python-env", "."], "is not a virtual environment (no bin/activate)"),
        (["--batch-invariant"], "artifact is exported with --attention onnx (its rows are left-"),
    ],
)
def test_bad_options_are_refused(tiny_artifact, tmp_path, args, message):
    result = cli("triton", tiny_artifact, "-o", tmp_path / "repo", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "repo").exists()


def test_batch_invariance_reaches_the_model_config(artifact, tmp_path):
    out = tmp_path / "repo"
    result = cli("triton", artifact(attention="gqa"), "-o", out, "--name", "q", "--batch-invariant")
    assert result.exit_code == 0, result.output
    assert (
        'key: "batch_invariant"\n    value: { string_value: "true" }'
        in (out / "q" / "config.pbtxt").read_text()
    )


def test_existing_output_needs_force(tiny_artifact, tmp_path):
    (tmp_path / "repo").mkdir()
    result = cli("triton", tiny_artifact, "-o", tmp_path / "repo")
    assert result.exit_code == 2
    assert "already exists" in result.output and "--force" in result.output


def _engine_artifact(onnx_artifact: Path, folder: Path, max_batch: int) -> Path:
    """An engine artifact as `qwen-deploy build` lays it out (plan bytes are a stand-in: the
    repository writer copies the plan, it never loads it)."""
    shutil.copytree(onnx_artifact, folder, ignore=shutil.ignore_patterns("model.onnx*"))
    (folder / "model.plan").write_bytes(b"plan")
    (folder / "plugins").mkdir()
    (folder / "plugins" / "libqwen_plugins.so").write_bytes(b"\x7fELF")
    manifest = Manifest.load(onnx_artifact)
    engine = Engine(
        format="tensorrt",
        plan="model.plan",
        profiles=[{"index": 0, "name": "prefill"}, {"index": 1, "name": "decode"}],
        limits=EngineLimits(max_batch=max_batch),
        plugin_libraries=["plugins/libqwen_plugins.so"],
    )
    dataclasses.replace(manifest, model_file="model.plan", data_files=[], engine=engine).save(
        folder
    )
    return folder


def test_tensorrt_repository(tiny_artifact, tmp_path):
    engine = _engine_artifact(tiny_artifact, tmp_path / "engine", max_batch=4)
    too_big = cli("triton", engine, "-o", tmp_path / "big", "--backend", "tensorrt")
    assert too_big.exit_code == 2
    assert "--max-batch 8 exceeds the engine's largest batch (4" in too_big.output
    on_cpu = cli(
        "triton",
        engine,
        "-o",
        tmp_path / "cpu",
        "--backend",
        "tensorrt",
        "--max-batch",
        "4",
        "--provider",
        "cpu",
    )
    assert "use --provider cuda" in on_cpu.output

    repo = write_repository(engine, tmp_path / "repo", name="q", backend="tensorrt", max_batch=4)
    config = (tmp_path / "repo" / "q_decoder" / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in config
    assert 'default_model_filename: "model.plan"' in config
    assert "kind: KIND_GPU" in config and 'profile: [ "0", "1" ]' in config
    assert repo.plugins == ["q_decoder/1/plugins/libqwen_plugins.so"]
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert (
        '--backend-config=tensorrt,plugins="$REPO/q_decoder/1/plugins/libqwen_plugins.so"' in readme
    )
    assert 'LD_PRELOAD="$REPO/q_decoder/1/plugins/libqwen_plugins.so"' in readme
    onnx_only = cli("triton", engine, "-o", tmp_path / "x")
    assert "this artifact is a TensorRT engine: use --backend tensorrt" in onnx_only.output


# -- configs parsed with Triton's own ModelConfig ---------------------------------------------


def _graph_tensors(model_path: Path, batched: bool) -> dict[str, dict]:
    """name -> {data_type, dims} as Triton should declare it, read from the ONNX graph itself."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    defaults = {t.name for t in graph.initializer}  # optional inputs (logits_to_keep): not declared
    tensors = {}
    for value in [*_required(graph.input, defaults), *graph.output]:
        t = value.type.tensor_type
        dims = [str(d.dim_value) if d.HasField("dim_value") else "-1" for d in t.shape.dim]
        tensors[value.name] = {
            "data_type": ONNX_TO_TRITON[onnx.TensorProto.DataType.Name(t.elem_type)],
            "dims": dims[1:] if batched else dims,
        }
    return tensors


def _required(inputs, defaults: set[str]) -> list:
    return [i for i in inputs if i.name not in defaults]


@needs_triton
@pytest.mark.parametrize(("precision", "max_batch"), [("fp32", 8), ("fp16", 0)])
def test_configs_parse_as_triton_model_config(artifact, tmp_path, precision, max_batch):
    art = artifact(precision=precision)
    write_repository(
        art, tmp_path / "repo", name="m", max_batch=max_batch, instances=2, python_env=TRITON_ENV
    )
    engine = _engine_artifact(art, tmp_path / "engine", max_batch=8)
    write_repository(engine, tmp_path / "trt", name="m", backend="tensorrt", max_batch=max_batch)
    decoder, text, trt = triton_client(
        "parse",
        str(tmp_path / "repo/m_decoder/config.pbtxt"),
        str(tmp_path / "repo/m/config.pbtxt"),
        str(tmp_path / "trt/m_decoder/config.pbtxt"),
    )

    expected = _graph_tensors(art / "model.onnx", batched=max_batch > 0)
    for config, platform in ((decoder, "onnxruntime_onnx"), (trt, "tensorrt_plan")):
        assert config["platform"] == platform
        assert config.get("max_batch_size", 0) == max_batch
        declared = {
            t["name"]: {"data_type": t["data_type"], "dims": t["dims"]}
            for t in [*config["input"], *config["output"]]
        }
        assert declared == expected
        graph = onnx.load(str(art / "model.onnx"), load_external_data=False).graph
        assert [t["name"] for t in config["input"]] == [
            i.name for i in _required(graph.input, {t.name for t in graph.initializer})
        ]
        assert ("dynamic_batching" in config) == (max_batch > 0)
    assert decoder["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert trt["instance_group"] == [{"count": 1, "kind": "KIND_GPU", "profile": ["0", "1"]}]

    assert text["backend"] == "python"
    assert text["model_transaction_policy"] == {"decoupled": True}
    assert {t["name"] for t in text["input"]} == {
        "text_input",
        "messages",
        "sampling_parameters",
        "stream",
    }
    assert all(t["optional"] for t in text["input"])
    params = {k: v["string_value"] for k, v in text["parameters"].items()}
    assert params == {
        "artifact": "../m_decoder/1",
        "provider": "cpu",
        "max_batch": str(max_batch),  # the engine's batch in each instance
        "EXECUTION_ENV_PATH": str(TRITON_ENV.resolve()),
    }


# -- a real tritonserver ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served_artifact(artifact) -> Path:
    """The gqa form, served batch-invariant: the model config's option reaches the engine."""
    return artifact(attention="gqa")


@pytest.fixture(scope="module")
def generator(served_artifact) -> Generator:
    return Generator(served_artifact, threads=1)


@pytest.fixture(scope="module")
def server(served_artifact, tmp_path_factory):
    folder = tmp_path_factory.mktemp("triton")
    write_repository(
        served_artifact, folder / "repo", name="qwen", python_env=TRITON_ENV, batch_invariant=True
    )
    server = TritonServer(folder / "repo", "qwen", folder / "server.log")
    yield server
    server.stop()


def _post(server, endpoint: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/qwen/{endpoint}", json=body, timeout=60)


def _request(**inputs) -> dict:
    body = {
        k: json.dumps(v) if k in ("messages", "sampling_parameters") else v
        for k, v in inputs.items()
    }
    return body


@needs_triton
def test_http_generate_matches_runtime(server, generator):
    expected = generator.generate(messages=CHAT, **GREEDY)
    response = _post(server, "generate", _request(messages=CHAT, sampling_parameters=GREEDY))
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["token_ids"] == expected.token_ids and len(expected.token_ids) > 0
    assert out["text_output"] == expected.text
    assert out["content"] == expected.content
    assert out["finish_reason"] == expected.finish_reason
    assert out["prompt_tokens"] == expected.prompt_tokens


@needs_triton
def test_chat_template_kwargs_reach_the_template(server, generator):
    ids = generator.prompt_ids(messages=CHAT, enable_thinking=False)
    assert ids != generator.prompt_ids(messages=CHAT)  # this template reads enable_thinking
    expected = generator.generate(prompt=ids, **GREEDY)
    sampling = {**GREEDY, "chat_template_kwargs": {"enable_thinking": False}}
    out = _post(server, "generate", _request(messages=CHAT, sampling_parameters=sampling)).json()
    assert out["prompt_tokens"] == len(ids)
    assert out["token_ids"] == expected.token_ids


@needs_triton
def test_http_stream_sends_one_event_per_token(server, generator):
    expected = generator.generate(messages=CHAT, **GREEDY)
    response = _post(
        server, "generate_stream", _request(messages=CHAT, sampling_parameters=GREEDY, stream=True)
    )
    assert response.status_code == 200, response.text
    events = [
        json.loads(line[len("data: ") :])
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]
    assert [e["token_ids"] for e in events] == expected.token_ids
    assert "".join(e["text_output"] for e in events) == expected.text
    assert [e["finish_reason"] for e in events] == [""] * (len(events) - 1) + [
        expected.finish_reason
    ]


@needs_triton
def test_one_instance_batches_concurrent_streams(server):
    """One model instance decodes concurrent requests together: every stream has its first
    token before any of them finishes (served one at a time, the second would start only after
    the first ended)."""
    long = {"temperature": 0, "max_tokens": 200, "stop_token_ids": []}
    body = _request(text_input="Hi", sampling_parameters=long, stream=True)

    def stream(_) -> tuple[float, float, int]:
        with httpx.stream(
            "POST", f"{server.url}/v2/models/qwen/generate_stream", json=body, timeout=120
        ) as response:
            times = [
                time.monotonic() for line in response.iter_lines() if line.startswith("data: ")
            ]
        return times[0], times[-1], len(times)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(stream, range(4)))
    assert [n for _, _, n in results] == [200] * 4
    assert max(first for first, _, _ in results) < min(last for _, last, _ in results)


@needs_triton
def test_grpc_streaming_chat_matches_runtime_and_survives_errors(server, generator, tmp_path):
    expected_chat = generator.generate(messages=CHAT, **GREEDY)
    # a raw prompt whose template opened <think>: all output is reasoning until </think>
    thinking = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n"
    expected_think = generator.generate(prompt=thinking, **GREEDY)
    assert expected_think.reasoning_content  # the case really exercises the split
    requests = [
        _request(messages=CHAT, sampling_parameters=GREEDY, stream=True),
        _request(messages=CHAT, sampling_parameters={"temperature": -1}, stream=True),
        _request(text_input=thinking, sampling_parameters=GREEDY, stream=False),
    ]
    (tmp_path / "requests.json").write_text(json.dumps(requests))
    streamed, invalid, think = triton_client(
        "grpc", server.grpc_url, "qwen", str(tmp_path / "requests.json")
    )

    assert streamed["error"] is None
    assert [t for r in streamed["responses"] for t in r["token_ids"]] == expected_chat.token_ids
    assert len(streamed["responses"]) == len(expected_chat.token_ids)
    assert "".join(r["content"] for r in streamed["responses"]) == expected_chat.content
    assert streamed["responses"][-1]["finish_reason"] == expected_chat.finish_reason

    assert invalid["responses"] == []
    assert "temperature=-1 is out of range" in invalid["error"]

    assert think["error"] is None and len(think["responses"]) == 1
    (only,) = think["responses"]
    assert only["token_ids"] == expected_think.token_ids
    assert only["reasoning_content"] == expected_think.reasoning_content
    assert only["content"] == expected_think.content


SCRIPT = ["<think>", "Hmm", "</think>", "Hi", "<|im_end|>"]


@pytest.fixture(scope="module")
def thinking_artifact(checkpoint, tmp_path_factory) -> Path:
    """A tiny model scripted to answer a chat with `<think>Hmm</think>Hi` (greedy) although its
    chat template does not open a think block: the output itself thinks, as QwQ's does.

    Every block writes nothing to the residual stream (o_proj and down_proj are zero), so each
    next token depends on the current one alone; the embedding and LM head rows of the script's
    tokens make each one predict the next, starting from the prompt's last token."""
    from safetensors.numpy import load_file, save_file

    from qwen_deploy.export import export_checkpoint

    work = tmp_path_factory.mktemp("thinking")
    ckpt = work / "ckpt"
    shutil.copytree(checkpoint(), ckpt)
    export_checkpoint(ckpt, work / "plain", progress=False)
    plain = Generator(work / "plain")
    chain = [plain.prompt_ids(messages=CHAT)[-1], *(plain.tokenizer.encode(t)[0] for t in SCRIPT)]
    [weights_file] = ckpt.glob("*.safetensors")
    weights = load_file(weights_file)
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name][...] = 0
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    for k, (token, follower) in enumerate(itertools.pairwise(chain)):
        embed[token] = 0
        embed[token, k] = 1.0
        head[follower] = 0
        head[follower, k] = 10.0
    save_file(weights, weights_file, metadata={"format": "pt"})
    export_checkpoint(ckpt, work / "thinks", progress=False)
    return work / "thinks"


def test_one_request_path_decides_the_reasoning_split(thinking_artifact):
    """Chat output may think; the same ids sent as a raw prompt are text (no template opened a
    think block). The scripted model really emits the block."""
    gen = Generator(thinking_artifact)
    chat = gen.generate(messages=CHAT, temperature=0, max_tokens=8)
    assert (chat.reasoning_content, chat.content, chat.finish_reason) == ("Hmm", "Hi", "stop")
    ids = gen.prepare(messages=CHAT).prompt_ids
    raw = gen.generate(prompt=ids, temperature=0, max_tokens=8)
    assert (raw.reasoning_content, raw.content) == (None, "<think>Hmm</think>Hi")


@needs_triton
def test_triton_splits_reasoning_exactly_as_the_http_server(thinking_artifact, tmp_path):
    """The same chat request through `serve` and through Triton's text model: one request path,
    so the output's think block is reasoning_content in both, and the rest content."""
    from qwen_deploy.generation.engine import BatchEngine
    from tests.serving.test_server import running_server

    engine = BatchEngine(Generator(thinking_artifact))
    body = {"model": "think", "messages": CHAT, "temperature": 0, "max_tokens": 8}
    with running_server(engine, "think") as url:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    engine.close()
    message = reply["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Hmm", "Hi")

    write_repository(thinking_artifact, tmp_path / "repo", name="qwen", python_env=TRITON_ENV)
    server = TritonServer(tmp_path / "repo", "qwen", tmp_path / "server.log")
    try:
        request = _request(messages=CHAT, sampling_parameters={"temperature": 0, "max_tokens": 8})
        out = _post(server, "generate", request).json()
    finally:
        server.stop()
    assert (out["reasoning_content"], out["content"]) == ("Hmm", "Hi")
    assert out["text_output"] == "<think>Hmm</think>Hi"


@needs_triton
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"messages": "[{not json"}, "input messages is not valid JSON"),
        ({"messages": json.dumps({"role": "user"})}, "input messages must be a JSON list"),
        ({"sampling_parameters": json.dumps(GREEDY)}, "send either text_input (a raw prompt)"),
        ({"text_input": "Hi", "messages": json.dumps(CHAT)}, "or messages (JSON chat), not both"),
        (
            _request(messages=CHAT, sampling_parameters={"chat_template_kwargs": [1]}),
            "chat_template_kwargs must be a JSON object",
        ),
        (
            _request(text_input="Hi", sampling_parameters={"beam_width": 2}),
            "unknown sampling parameter(s) beam_width",
        ),
    ],
)
def test_invalid_requests_get_triton_errors(server, body, message):
    response = _post(server, "generate", body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    ok = _post(server, "generate", _request(text_input="Hi", sampling_parameters=GREEDY))
    assert ok.status_code == 200 and ok.json()["token_ids"]


@needs_triton
def test_client_disconnect_cancels_its_generation(server):
    endless = {"temperature": 0, "max_tokens": 3000, "stop_token_ids": []}  # ~40 s of decoding
    body = _request(text_input="Hi", sampling_parameters=endless, stream=True)
    with httpx.stream(
        "POST", f"{server.url}/v2/models/qwen/generate_stream", json=body, timeout=60
    ) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first[len("data: ") :])["finish_reason"] == ""
    # the model instance stops at the next token instead of serving a client that is gone
    start = time.monotonic()
    ok = _post(server, "generate", _request(text_input="Hi", sampling_parameters=GREEDY))
    assert ok.status_code == 200
    assert time.monotonic() - start < 10


@needs_triton
def test_server_stops_and_frees_its_ports(server):
    server.stop()
    assert server.process.returncode is not None
    assert port_free(server.http_port) and port_free(server.grpc_port)
    assert "successfully unloaded 'qwen'" in server.log.read_text()
