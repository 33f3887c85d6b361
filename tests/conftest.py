"""Shared fixtures: tiny random Qwen2 checkpoints and their exported artifacts, built once per run.

`checkpoint(**kwargs)` and `artifact(checkpoint_kwargs, **export_kwargs)` cache by arguments, so
tests asking for the same model share one folder. Defaults: 2 layers, hidden 64, 4 heads, 2 KV
heads, the full Qwen vocabulary (so the real tokenizer's ids are valid), real tokenizer files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from qwen_deploy.checkpoint.random_model import make_random_checkpoint
from qwen_deploy.export import export_checkpoint


def _key(kwargs: dict) -> str:
    return json.dumps(kwargs, sort_keys=True)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Factory: checkpoint(**make_random_checkpoint kwargs) -> folder (cached per kwargs)."""
    cache: dict[str, Path] = {}

    def make(**kwargs) -> Path:
        key = _key(kwargs)
        if key not in cache:
            # logits up to ~8 whatever the width, like a real model: no greedy ties, and fp32
            # rounding in the reference itself stays well below the 1e-4 parity bound
            kwargs.setdefault("init_std", 1.6 / kwargs.get("hidden", 64) ** 0.5)
            folder = tmp_path_factory.mktemp("ckpt")
            cache[key] = make_random_checkpoint(folder / "model", **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def artifact(checkpoint, tmp_path_factory):
    """Factory: artifact(ckpt_kwargs=None, **export kwargs) -> exported artifact folder."""
    cache: dict[str, Path] = {}

    def make(ckpt_kwargs: dict | None = None, **export_kwargs) -> Path:
        ckpt_kwargs = ckpt_kwargs or {}
        key = _key({"ckpt": ckpt_kwargs, "export": export_kwargs})
        if key not in cache:
            out = tmp_path_factory.mktemp("artifact") / "a"
            export_checkpoint(checkpoint(**ckpt_kwargs), out, progress=False, **export_kwargs)
            cache[key] = out
        return cache[key]

    return make


# where `make real-model` and `make real-model-2` put the real models: model.gguf and its float32
# conversion. The parity presets and quantize gates are checked on both.
_CACHE = Path.home() / ".cache" / "qwen-deploy"
REAL_MODELS = {  # name -> (folder, the make target that fills it)
    "0.5b": (
        Path(os.environ.get("QWEN_DEPLOY_REAL_MODEL", _CACHE / "qwen2.5-coder-0.5b-instruct")),
        "make real-model",
    ),
    "1.5b": (
        Path(os.environ.get("QWEN_DEPLOY_REAL_MODEL_2", _CACHE / "qwen2.5-coder-1.5b-instruct")),
        "make real-model-2",
    ),
}
REAL_MODEL = REAL_MODELS["0.5b"][0]


def real_model_checkpoint(model: str) -> Path:
    """The real `model`'s float32 Hugging Face folder, or a skip naming the make target."""
    folder, target = REAL_MODELS[model]
    path = folder / "checkpoint"
    if not (path / "config.json").is_file():
        pytest.skip(f"the real {model} model is not converted ({path}): run `{target}`")
    return path


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The real model's GGUF file (Q4_K_M), as `make real-model` fetched it."""
    path = REAL_MODEL / "model.gguf"
    if not path.is_file():
        pytest.skip(f"the real model is not fetched ({path} is missing): run `make real-model`")
    return path


@pytest.fixture(scope="session")
def real_checkpoint(real_gguf) -> Path:
    """The real model converted to a float32 Hugging Face folder by `make real-model`."""
    return real_model_checkpoint("0.5b")


@pytest.fixture(scope="session")
def real_openvino() -> Path:
    """OpenVINO's int4 export of the real model, as `make openvino-peer` wrote it."""
    path = REAL_MODEL / "openvino-int4"
    if not (path / "openvino_model.xml").is_file():
        pytest.skip(f"no OpenVINO export of the real model ({path}): run `make openvino-peer`")
    return path


@pytest.fixture(scope="session")
def real_artifact(tmp_path_factory):
    """Factory: real_artifact(model="0.5b", **export kwargs) -> that real model exported (cached
    per arguments; a skip when the model is not fetched)."""
    cache: dict[str, Path] = {}

    def make(model: str = "0.5b", **export_kwargs) -> Path:
        key = _key({"model": model, **export_kwargs})
        if key not in cache:
            checkpoint = real_model_checkpoint(model)
            out = tmp_path_factory.mktemp("real_artifact") / "a"
            export_checkpoint(checkpoint, out, progress=False, **export_kwargs)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint) -> Path:
    """The default tiny checkpoint (fp32, untied, full vocab, real tokenizer)."""
    return checkpoint()


@pytest.fixture(scope="session")
def tiny_artifact(artifact) -> Path:
    """The default tiny checkpoint exported at fp32 with the `onnx` attention form."""
    return artifact()


@pytest.fixture(scope="session")
def r1_tokenizer_dir(tmp_path_factory) -> Path:
    """DeepSeek-R1-Distill-Qwen tokenizer files (tests/fixtures/deepseek_r1_distill/README.md)."""
    from qwen_deploy.checkpoint.random_model import qwen_tokenizer_dir

    fixture = Path(__file__).parent / "fixtures" / "deepseek_r1_distill"
    out = tmp_path_factory.mktemp("r1_tokenizer")
    tokenizer = json.loads((qwen_tokenizer_dir() / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"] = json.loads(
        (fixture / "added_tokens.tokenizer_json.json").read_text(encoding="utf-8")
    )
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_bytes((fixture / "tokenizer_config.json").read_bytes())
    return out
