"""Run the reference and the artifact on the same inputs and judge the difference.

Each case is a prefill of its prompt(s) then N decode steps that feed both sides the reference's
greedy token, so the candidate is always judged on the reference's trajectory. The batch case
mixes prompt lengths with left padding; only real (unpadded) positions are compared.

With a float64 reference the verdict is against exact arithmetic, and transformers' own float32
forward is measured against it too (`torch_fp32`), so a report shows who is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .. import memory
from ..backends import open_backend
from ..checkpoint.huggingface import Checkpoint
from ..errors import QwenDeployError
from ..manifest import Artifact, Manifest
from ..memory import Need
from ..runtime.backend import Backend
from ..runtime.decode import Batch
from ..runtime.padding import left_pad
from .metrics import merge_metrics
from .presets import PRESETS, Tolerance, preset_for
from .prompts import load_prompts
from .reference import REFERENCE_LOADS, TorchReference, chat_prompt_ids, check_reference


@dataclass
class StepResult:
    case: str
    step: int  # 0 = prefill, 1.. = decode steps
    metrics: dict[str, float]
    rows: int  # compared logit rows (positions)
    tokens: list[int]  # the input token of each compared row
    torch_fp32: dict[str, float] | None = None  # transformers float32 vs a float64 reference


@dataclass
class ParityReport:
    artifact: str
    reference: str
    precision: str
    preset: str
    tolerance: Tolerance
    reference_dtype: str = "float32"
    reference_load: str = "whole"  # or "by-layer": weights read per layer (memory.py)
    steps: list[StepResult] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, float]:
        """Worst case over every step (top1 is the row-weighted mean agreement)."""
        return merge_metrics([(s.metrics, s.rows) for s in self.steps])

    @property
    def torch_fp32_summary(self) -> dict[str, float] | None:
        """transformers float32 against the float64 reference, when there is one."""
        if self.reference_dtype != "float64":
            return None
        return merge_metrics([(s.torch_fp32, s.rows) for s in self.steps])

    @property
    def failures(self) -> list[str]:
        return self.tolerance.failures(self.summary)

    @property
    def passed(self) -> bool:
        return not self.failures

    def worst_step(self) -> StepResult:
        """The step with the most violated bounds; ties broken by logit error, then mean KL."""
        return max(
            self.steps,
            key=lambda s: (
                len(self.tolerance.failures(s.metrics)),
                s.metrics.get("tol_ratio", 0.0),
                s.metrics["max_abs"],
                s.metrics["kl_mean"],
            ),
        )

    def extreme_row(self) -> tuple[StepResult, int]:
        """The step and row (within the step) with the largest KL: reported, not judged."""
        step = max(self.steps, key=lambda s: s.metrics["kl_max"])
        return step, step.tokens[step.metrics["worst_row"]]

    def to_dict(self) -> dict:
        worst = self.worst_step()
        extreme, token = self.extreme_row()
        data = {
            "artifact": self.artifact,
            "reference": self.reference,
            "reference_dtype": self.reference_dtype,
            "reference_load": self.reference_load,
            "precision": self.precision,
            "preset": self.preset,
            "tolerance": self.tolerance.to_dict(),
            "passed": self.passed,
            "failures": self.failures,
            "summary": self.summary,
            "worst": {"case": worst.case, "step": worst.step, **worst.metrics},
            "largest_kl_row": {
                "case": extreme.case,
                "step": extreme.step,
                "row": extreme.metrics["worst_row"],
                "input_token": token,
                "kl": extreme.metrics["kl_max"],
            },
            "steps": [
                {"case": s.case, "step": s.step, "rows": s.rows, **s.metrics}
                | ({"torch_fp32": s.torch_fp32} if s.torch_fp32 else {})
                for s in self.steps
            ],
        }
        if self.torch_fp32_summary:
            data["torch_fp32_summary"] = self.torch_fp32_summary
        return data


@dataclass
class _Sides:
    """What one case runs: the judge, the candidate, and transformers float32 when the judge
    is float64."""

    reference: TorchReference
    candidate: Backend
    tolerance: Tolerance
    torch_fp32: TorchReference | None = None


def _run_case(
    name: str, rows: list[list[int]], steps: int, sides: _Sides, pad_id: int
) -> list[StepResult]:
    ids, real, _ = left_pad(rows, pad_id)
    shadow = sides.torch_fp32
    sides.reference.reset()
    if shadow:
        shadow.reset()
    batch = Batch(sides.candidate, len(rows))
    keep = real.astype(bool)  # prefill: real positions only
    results = []
    for step in range(steps + 1):
        mask, positions = batch.inputs(ids, real)  # the reference gets the candidate's inputs
        ref = sides.reference.forward(ids, mask, positions)
        cand = batch.extend(ids, real)
        fp32 = shadow.forward(ids, mask, positions) if shadow else None
        ref_rows, cand_rows = (ref[keep], cand[keep]) if step == 0 else (ref, cand)
        results.append(
            StepResult(
                name,
                step,
                sides.tolerance.measure(ref_rows, cand_rows),
                len(ref_rows.reshape(-1, ref.shape[-1])),
                (ids[keep] if step == 0 else ids).reshape(-1).tolist(),
                sides.tolerance.measure(ref_rows, fp32[keep] if step == 0 else fp32)
                if shadow
                else None,
            )
        )
        ids = ref[:, -1].argmax(-1)[:, None].astype(np.int64)
        real = np.ones_like(ids)
    return results


def run_parity(
    artifact: str | Path | Artifact,
    reference: str | Path,
    prompts_file: str | Path | None = None,
    steps: int = 8,
    batch: bool = True,
    provider: str = "cpu",
    preset: str | None = None,
    overrides: dict[str, float | None] | None = None,
    progress: bool = True,
    token_rows: list[list[int]] | None = None,
    reference_dtype: str = "float32",
    backend: str | None = None,
    reference_load: str = "auto",
    max_memory: float | None = None,
) -> ParityReport:
    """Compare `artifact` with transformers on `reference` over every prompt and a padded batch.

    `token_rows` replaces the prompts with ready token ids (models without a tokenizer).
    `reference_dtype` float64 judges against exact arithmetic and also measures transformers'
    float32 forward against it. The artifact runs on the backend its manifest names (a TensorRT
    engine on TensorRT), or on `backend`. `reference_load` whole holds transformers' model in
    memory, by-layer reads each layer's weights as it runs (the same logits); auto takes whole
    when it fits in `max_memory` GB (default: the memory available). A run that cannot fit
    either way is refused before it starts.
    """
    artifact = Artifact.open(artifact)
    manifest = artifact.manifest
    preset = preset or preset_for(manifest.precision, manifest.quantization_mode)
    if preset not in PRESETS:
        raise QwenDeployError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    tolerance = PRESETS[preset].override(**(overrides or {}))
    check_reference(reference, manifest)
    rows = token_rows or chat_prompt_ids(reference, load_prompts(prompts_file))
    load = _reference_load(
        manifest, reference, rows, steps, reference_dtype, reference_load, max_memory, provider
    )
    candidate = open_backend(artifact, provider, backend=backend, max_memory=max_memory)
    sides = _Sides(
        TorchReference(reference, reference_dtype, load),
        candidate,
        tolerance,
        TorchReference(reference, load=load) if reference_dtype == "float64" else None,
    )
    report = ParityReport(
        str(artifact), str(reference), manifest.precision, preset, tolerance, reference_dtype, load
    )
    cases = [(f"prompt {i + 1}", [r]) for i, r in enumerate(rows)]
    if batch and len(rows) > 1:
        cases.append((f"batch of {len(rows)} (left-padded)", rows))
    for name, case_rows in tqdm(cases, desc="parity", unit="case", disable=not progress):
        report.steps.extend(_run_case(name, case_rows, steps, sides, manifest.pad_id))
    return report


def reference_needs(
    manifest: Manifest,
    reference: str | Path,
    rows: list[list[int]],
    steps: int,
    dtype: str,
    provider: str = "cpu",
) -> dict[str, Need]:
    """What a parity run holds at its peak with each reference load: the artifact's session
    (on the host), both sides' logits of the largest case (the batch), and the reference."""
    spec = manifest.model
    source = Checkpoint(reference).tensors["model.embed_tokens.weight"].dtype.itemsize
    positions = sum(map(len, rows)) + len(rows) * steps
    on_host = memory.session(manifest, positions, positions) if provider == "cpu" else Need({})
    base = memory.process() + on_host
    base += Need({"reference logits": 2 * memory.logits_bytes(spec, positions)})
    return {load: base + memory.reference(spec, source, dtype, load) for load in REFERENCE_LOADS}


def _reference_load(
    manifest: Manifest,
    reference: str | Path,
    rows: list[list[int]],
    steps: int,
    dtype: str,
    load: str,
    max_memory: float | None,
    provider: str,
) -> str:
    """The reference's load (auto: whole when it fits), refused when the run cannot fit."""
    if load not in ("auto", *REFERENCE_LOADS):
        raise QwenDeployError(
            f"unknown reference load {load!r}; choose auto, {' or '.join(REFERENCE_LOADS)}."
        )
    needs = reference_needs(manifest, reference, rows, steps, dtype, provider)
    if load == "auto":
        load = "whole" if memory.fits(needs["whole"], max_memory) else "by-layer"
    instead = [f"--reference-load by-layer (about {memory.gb(needs['by-layer'].total)})"]
    if load == "by-layer":
        instead = [
            "check a smaller artifact of the model (quantize --mode int4-weight)",
            "run parity on a machine with more memory",
        ]
    memory.require("parity", needs[load], max_memory, instead)
    return load
