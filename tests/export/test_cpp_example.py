"""examples/cpp: built with CMake against the onnxruntime wheel's library, same greedy tokens.

Headers come from `make cpp-deps` (build/cpp-deps/include, or QWEN_DEPLOY_CPP_DEPS/include).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import onnxruntime
import pytest

from qwen_deploy.generation.generator import Generator
from qwen_deploy.manifest import Manifest

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "examples" / "cpp"
INCLUDE = Path(os.environ.get("QWEN_DEPLOY_CPP_DEPS", ROOT / "build" / "cpp-deps")) / "include"
ORT_LIBS = sorted((Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
PROMPT = "The balance sheet shows"
NEW_TOKENS = 12


def _missing() -> str | None:
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install cmake g++)"
    if not (INCLUDE / "onnxruntime" / "onnxruntime_cxx_api.h").is_file():
        return f"no ONNX Runtime headers in {INCLUDE}: run `make cpp-deps`"
    if not ORT_LIBS:
        return "the onnxruntime wheel has no libonnxruntime.so here"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("cpp-build")
    configure = subprocess.run(
        [
            "cmake",
            "-S",
            str(SOURCE),
            "-B",
            str(build),
            f"-DONNXRUNTIME_INCLUDE_DIR={INCLUDE / 'onnxruntime'}",
            f"-DONNXRUNTIME_LIBRARY={ORT_LIBS[0]}",
            f"-DJSON_INCLUDE_DIR={INCLUDE}",
        ],
        capture_output=True,
        text=True,
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compiled = subprocess.run(["cmake", "--build", str(build)], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    return build / "qwen_generate"


def run(binary: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(binary), *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "export", [{"precision": "fp32"}, {"precision": "fp16", "attention": "gqa"}]
)
def test_greedy_tokens_match_python_runtime(binary, artifact, export):
    art = artifact(**export)
    generator = Generator(art, threads=1)
    prompt = generator.tokenizer.encode(PROMPT)
    expected = generator.generate(
        prompt=prompt, temperature=0, repetition_penalty=1.0, max_tokens=NEW_TOKENS
    )
    done = run(binary, art, "--max-new-tokens", NEW_TOKENS, "--threads", 1, *prompt)
    assert done.returncode == 0, done.stderr
    assert [int(t) for t in done.stdout.split()] == expected.token_ids
    assert len(expected.token_ids) > 1  # the KV cache carried over at least one decode step
    assert f"prefill {len(prompt)} tokens" in done.stderr


def test_stops_at_eos(binary, tiny_artifact, tmp_path):
    """With the first greedy token declared EOS, generation ends right after it."""
    generator = Generator(tiny_artifact, threads=1)
    prompt = generator.tokenizer.encode(PROMPT)
    first = generator.generate(
        prompt=prompt, temperature=0, repetition_penalty=1.0, max_tokens=1
    ).token_ids[0]
    art = tmp_path / "eos"
    shutil.copytree(tiny_artifact, art)
    manifest = Manifest.load(art)
    dataclasses.replace(manifest, eos_token_ids=[first]).save(art)
    done = run(binary, art, "--max-new-tokens", NEW_TOKENS, *prompt)
    assert done.stdout.split() == [str(first)]
    ignored = run(binary, art, "--max-new-tokens", 3, "--ignore-eos", *prompt)
    assert len(ignored.stdout.split()) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "1", "2"], "manifest.json not found"),
        (["{artifact}", "12", "x"], "token ids are integers, got 'x'"),
        (["{artifact}", "--max-new-tokens", "0", "1"], "--max-new-tokens must be >= 1"),
        (["{artifact}"], "give the prompt as token ids"),
    ],
)
def test_bad_input_is_reported(binary, tiny_artifact, tmp_path, args, message):
    args = [a.format(missing=tmp_path / "none", artifact=tiny_artifact) for a in args]
    done = run(binary, *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr
