"""Shared fixtures: tiny random Qwen2 checkpoints and their exported artifacts, built once per run.

`checkpoint(**kwargs)` and `artifact(checkpoint_kwargs, **export_kwargs)` cache by arguments, so
tests asking for the same model share one folder. Defaults: 2 layers, hidden 64, 4 heads, 2 KV
heads, the full Qwen vocabulary (so the real tokenizer's ids are valid), real tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_deploy.export import export_checkpoint
from qwen_deploy.random_checkpoint import make_random_checkpoint


def _key(kwargs: dict) -> str:
    return json.dumps(kwargs, sort_keys=True)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """Factory: checkpoint(**make_random_checkpoint kwargs) -> folder (cached per kwargs)."""
    cache: dict[str, Path] = {}

    def make(**kwargs) -> Path:
        key = _key(kwargs)
        if key not in cache:
            kwargs.setdefault("init_std", 0.2)  # logits up to ~8, like a real model: no greedy ties
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


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint) -> Path:
    """The default tiny checkpoint (fp32, untied, full vocab, real tokenizer)."""
    return checkpoint()


@pytest.fixture(scope="session")
def tiny_artifact(artifact) -> Path:
    """The default tiny checkpoint exported at fp32 with the `onnx` attention form."""
    return artifact()
