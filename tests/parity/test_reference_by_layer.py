"""The by-layer reference (each decoder layer's weights read as it runs) gives transformers'
logits bit for bit, holds no weights between steps, and parity chooses and refuses by memory."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from qwen_deploy import memory
from qwen_deploy.cli import main
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.manifest import Manifest
from qwen_deploy.parity.reference import TorchReference
from qwen_deploy.parity.runner import _reference_load, reference_needs

IDS = np.array([[11, 22, 33, 44, 55, 66], [0, 0, 77, 88, 99, 111]], np.int64)
REAL = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int64)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("What is a bond?\n什么是股票？\n")
    return path


def _steps(reference: TorchReference) -> list[np.ndarray]:
    """A left-padded prefill then two greedy decode steps."""
    mask, positions = REAL, np.clip(REAL.cumsum(-1) - 1, 0, None)
    ids, out = IDS, []
    for _ in range(3):
        logits = reference.forward(ids, mask, positions)
        out.append(logits)
        ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(ids)], axis=1)
        positions = positions[:, -1:] + 1
    return out


@pytest.mark.parametrize(
    ("weights", "dtype"),
    [
        ({"dtype": "bfloat16"}, "float32"),  # a bf16 checkpoint widened per layer
        ({"tie_word_embeddings": True}, "float32"),  # the LM head read from the embedding
        ({"dtype": "bfloat16"}, "float64"),
    ],
)
def test_by_layer_logits_equal_the_whole_models(checkpoint, weights, dtype):
    folder = checkpoint(**weights)
    whole = _steps(TorchReference(folder, dtype, "whole"))
    by_layer = TorchReference(folder, dtype, "by-layer")
    streamed = _steps(by_layer)
    for a, b in zip(whole, streamed, strict=True):
        assert a.dtype == b.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(a, b)
    # between steps no layer or LM head weight is held, only the final norm's
    held = {n for n, p in by_layer.model.named_parameters() if p.device.type != "meta"}
    assert held == {"model.norm.weight"}


def test_parity_by_layer_reports_the_same_numbers(tiny_artifact, tiny_checkpoint, prompts_file):
    reports = {}
    for load in ("whole", "by-layer"):
        args = ["parity", str(tiny_artifact), "--reference", str(tiny_checkpoint), "--quiet"]
        extra = ["--prompts", str(prompts_file), "--steps", "2", "--reference-load", load]
        result = CliRunner().invoke(main, [*args, *extra, "--json", "-"])
        assert result.exit_code == 0, result.output
        reports[load] = json.loads(result.stdout)
    assert reports["by-layer"]["reference_load"] == "by-layer"
    assert reports["by-layer"]["summary"] == reports["whole"]["summary"]
    assert reports["by-layer"]["steps"] == reports["whole"]["steps"]


def test_auto_takes_by_layer_when_the_whole_model_does_not_fit(checkpoint, artifact):
    """A bf16 checkpoint: by layer it holds the LM head at float32 + bf16, whole the model."""
    folder = checkpoint(dtype="bfloat16")
    manifest = Manifest.load(artifact({"dtype": "bfloat16"}))
    rows = [[5] * 10, [6] * 7]
    needs = reference_needs(manifest, folder, rows, 2, "float32")
    whole, by_layer = needs["whole"].total, needs["by-layer"].total
    assert by_layer < whole
    # the parts differ only in the reference: the whole fp32 model against one widened piece
    params = sum(memory.parameters(manifest.model).values())
    assert whole - by_layer == params * 4 - manifest.model.vocab_size * 64 * (4 + 2)

    def choice(budget_bytes: float) -> str:
        gb = budget_bytes / memory.GB
        return _reference_load(manifest, folder, rows, 2, "float32", "auto", gb, "cpu")

    assert choice(whole) == "whole"
    assert choice(whole - 1) == "by-layer"
    with pytest.raises(QwenDeployError, match=r"^parity needs about .* by layer"):
        choice(by_layer - 1)


def test_parity_that_cannot_fit_is_refused_before_it_starts(
    tiny_artifact, tiny_checkpoint, prompts_file
):
    args = ["parity", str(tiny_artifact), "--reference", str(tiny_checkpoint), "--quiet"]
    result = CliRunner().invoke(
        main, [*args, "--prompts", str(prompts_file), "--max-memory", "0.1"]
    )
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert "\n" not in message and "Traceback" not in result.output
    assert message.startswith("error: parity needs about ")
    assert "by layer" in message and "0.1 GB allowed by --max-memory" in message
    assert "quantize --mode int4-weight" in message


def test_budget_is_what_the_machine_has_unless_given():
    free, origin = memory.budget(None)
    assert 0 < free <= memory.psutil.virtual_memory().total
    assert origin.startswith(("available", "left under"))
    assert memory.budget(2.5) == (2_500_000_000, "allowed by --max-memory")
