"""Parity on the real Qwen2.5-Coder-0.5B- and 1.5B-Instruct: the presets pass honest exports of
every form and precision, and fail the bugs an exporter could really have
(tests/parity/broken_exports.py), on both models' shapes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qwen_deploy.cli import main
from qwen_deploy.export import export_checkpoint
from qwen_deploy.manifest import Manifest
from qwen_deploy.parity.presets import PRESETS
from tests.conftest import real_model_checkpoint
from tests.forms import forms
from tests.parity.broken_exports import (
    decode_positions_off_by_one,
    drop_qkv_bias,
    rope_theta_checkpoint,
)

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("Write a Python function that reverses a string.\n用一句话解释什么是债券。\n")
    return path


def _parity(artifact, checkpoint, prompts, *extra) -> tuple[int, dict]:
    args = ["parity", str(artifact), "--reference", str(checkpoint), "--prompts", str(prompts)]
    result = CliRunner().invoke(main, [*args, "--quiet", "--json", "-", *extra])
    return result.exit_code, json.loads(result.stdout)


@pytest.mark.parametrize(
    ("model", "precision", "attention"),
    forms(
        [
            (model, precision, attention)
            for model in ("0.5b", "1.5b")
            for precision in ("fp32", "fp16")
            for attention in ("onnx", "gqa", "decomposed")
        ],
        # one form per model, the 1.5B's in the form its other tests export anyway (the fp16
        # preset against transformers runs in CI on the tiny model: test_export_parity)
        [("0.5b", "fp32", "gqa"), ("1.5b", "fp32", "onnx")],
    ),
)
def test_default_presets_pass_every_form(real_artifact, prompts, model, precision, attention):
    artifact = real_artifact(model, precision=precision, attention=attention)
    code, report = _parity(artifact, real_model_checkpoint(model), prompts, "--steps", "8")
    assert code == 0 and report["passed"], report["failures"]
    assert report["preset"] == precision
    assert {s["case"] for s in report["steps"]} == {
        "prompt 1",
        "prompt 2",
        "batch of 2 (left-padded)",
    }
    summary = report["summary"]
    assert summary["top1"] == 1.0
    # honest exports sit well inside the bounds, not at their edge
    assert summary["tol_ratio"] < 0.5 and summary["kl_mean"] < PRESETS[precision].kl / 10


@pytest.fixture(scope="module")
def broken(real_artifact, tmp_path_factory):
    """broken(model, name) -> a broken fp32 export of the real `model`, made once."""
    made: dict[tuple[str, str], Path] = {}

    def make(model: str, bug: str) -> Path:
        if (model, bug) not in made:
            good, work = real_artifact(model), tmp_path_factory.mktemp("broken")
            made[model, bug] = BUGS[bug](good, real_model_checkpoint(model), work)
        return made[model, bug]

    return make


def _theta_1e4(good: Path, checkpoint: Path, work: Path) -> Path:
    """The graph rotates with 1e4 while the manifest records the checkpoint's theta, as an
    exporter bug would (a recorded 1e4 is refused before any forward: the models differ)."""
    theta = work / "theta"
    theta_ckpt = rope_theta_checkpoint(checkpoint, work / "theta-ckpt", 1e4)
    export_checkpoint(theta_ckpt, theta, progress=False)
    manifest = Manifest.read(theta)
    manifest.model = dataclasses.replace(
        manifest.model, rope_theta=Manifest.read(good).model.rope_theta
    )
    manifest.save(theta)
    return theta


BUGS = {
    "rope theta 1e4": _theta_1e4,
    "layer 3 q/k/v bias dropped": lambda good, _, work: drop_qkv_bias(good, work / "bias", 3),
    "decode positions off by one": lambda good, _, work: decode_positions_off_by_one(
        good, work / "positions"
    ),
}


@pytest.mark.parametrize(
    ("model", "bug"),
    forms(
        [(model, bug) for model in ("0.5b", "1.5b") for bug in BUGS],
        [("0.5b", bug) for bug in BUGS],
    ),
)
def test_broken_exports_fail(broken, prompts, model, bug):
    """Run under the fp16 preset; the fp32 preset, at least as tight in every bound it shares
    (its elementwise bound is under fp16's at every logit), fails them too."""
    code, report = _parity(
        broken(model, bug),
        real_model_checkpoint(model),
        prompts,
        "--steps",
        "2",
        "--no-batch",
        "--preset",
        "fp16",
    )
    assert code == 1 and not report["passed"]
    assert report["failures"][0].startswith("logits beyond atol"), report["failures"]
    fp32, fp16 = PRESETS["fp32"], PRESETS["fp16"]
    assert fp32.atol <= fp16.atol and fp32.rtol <= fp16.rtol
    assert fp32.cosine >= fp16.cosine and fp32.top1 >= fp16.top1 and fp32.kl <= fp16.kl


def test_float64_view_shows_both_sides_near_exact(real_artifact, real_checkpoint, prompts):
    code, report = _parity(
        real_artifact(),
        real_checkpoint,
        prompts,
        "--steps",
        "2",
        "--no-batch",
        "--reference-dtype",
        "float64",
    )
    assert code == 0, report["failures"]
    ours, torch_fp32 = report["summary"], report["torch_fp32_summary"]
    for side in (ours, torch_fp32):  # float32 rounding on logits up to ~20: 1e-5..1e-4
        assert 1e-6 < side["max_abs"] < 2e-4 and side["top1"] == 1.0


@pytest.mark.exhaustive
def test_by_layer_reference_gives_the_whole_ones_verdicts(real_artifact, broken, prompts):
    """The memory-bounded reference (weights read per layer) judges like the whole model: the
    honest export passes and every planted bug fails the fp32 preset, with identical numbers."""
    checkpoint = real_model_checkpoint("0.5b")
    for artifact in [real_artifact("0.5b"), *(broken("0.5b", bug) for bug in BUGS)]:
        runs = {
            load: _parity(artifact, checkpoint, prompts, "--steps", "2", "--reference-load", load)
            for load in ("whole", "by-layer")
        }
        (code, whole), (code_by_layer, by_layer) = runs["whole"], runs["by-layer"]
        assert by_layer["reference_load"] == "by-layer" and whole["preset"] == "fp32"
        assert code_by_layer == code == (0 if artifact == real_artifact("0.5b") else 1)
        assert by_layer["summary"] == whole["summary"]
        assert by_layer["failures"] == whole["failures"]
