"""Run the reference and the artifact on the same inputs and judge the difference.

Each case is a prefill of its prompt(s) then N decode steps that feed both sides the reference's
greedy token, so the candidate is always judged on the reference's trajectory. The batch case
mixes prompt lengths with left padding; only real (unpadded) positions are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import QwenDeployError
from ..manifest import Manifest
from ..serve.onnxruntime_backend import OnnxRuntimeBackend
from ..serve.padding import left_pad
from .metrics import compare_logits, merge_metrics
from .presets import PRESETS, Tolerance, preset_for
from .prompts import load_prompts
from .reference import TorchReference, chat_prompt_ids


@dataclass
class StepResult:
    case: str
    step: int  # 0 = prefill, 1.. = decode steps
    metrics: dict[str, float]
    rows: int  # compared logit rows (positions)


@dataclass
class ParityReport:
    artifact: str
    reference: str
    precision: str
    preset: str
    tolerance: Tolerance
    steps: list[StepResult] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, float]:
        """Worst case over every step (top1 is the row-weighted mean agreement)."""
        return merge_metrics([(s.metrics, s.rows) for s in self.steps])

    @property
    def failures(self) -> list[str]:
        return self.tolerance.failures(self.summary)

    @property
    def passed(self) -> bool:
        return not self.failures

    def worst_step(self) -> StepResult:
        """The step with the most violated bounds; ties broken by logit error, then cosine."""
        return max(
            self.steps,
            key=lambda s: (
                len(self.tolerance.failures(s.metrics)),
                s.metrics["max_abs"],
                -s.metrics["cosine"],
            ),
        )

    def to_dict(self) -> dict:
        worst = self.worst_step()
        return {
            "artifact": self.artifact,
            "reference": self.reference,
            "precision": self.precision,
            "preset": self.preset,
            "tolerance": self.tolerance.to_dict(),
            "passed": self.passed,
            "failures": self.failures,
            "summary": self.summary,
            "worst": {"case": worst.case, "step": worst.step, **worst.metrics},
            "steps": [
                {"case": s.case, "step": s.step, "rows": s.rows, **s.metrics} for s in self.steps
            ],
        }


def _run_case(
    name: str,
    rows: list[list[int]],
    steps: int,
    ref: TorchReference,
    backend: OnnxRuntimeBackend,
    pad_id: int,
) -> list[StepResult]:
    ids, mask, positions = left_pad(rows, pad_id)
    ref.reset()
    cache = backend.new_cache(len(rows))
    ref_logits = ref.forward(ids, mask, positions)
    cand_logits = backend.forward(ids, mask, positions, cache)
    valid = mask.astype(bool)
    results = [
        StepResult(name, 0, compare_logits(ref_logits[valid], cand_logits[valid]), int(valid.sum()))
    ]
    for step in range(1, steps + 1):
        next_ids = ref_logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones((len(rows), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        ref_logits = ref.forward(next_ids, mask, positions)
        cand_logits = backend.forward(next_ids, mask, positions, cache)
        results.append(StepResult(name, step, compare_logits(ref_logits, cand_logits), len(rows)))
    return results


def run_parity(
    artifact: str | Path,
    reference: str | Path,
    prompts_file: str | Path | None = None,
    steps: int = 8,
    batch: bool = True,
    provider: str = "cpu",
    preset: str | None = None,
    overrides: dict[str, float | None] | None = None,
    progress: bool = True,
    token_rows: list[list[int]] | None = None,
) -> ParityReport:
    """Compare `artifact` with transformers on `reference` over every prompt and a padded batch.

    `token_rows` replaces the prompts with ready token ids (models without a tokenizer).
    """
    manifest = Manifest.load(artifact)
    preset = preset or preset_for(manifest.precision, (manifest.quantization or {}).get("mode"))
    if preset not in PRESETS:
        raise QwenDeployError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    tolerance = PRESETS[preset].override(**(overrides or {}))
    rows = token_rows or chat_prompt_ids(reference, load_prompts(prompts_file))
    backend = OnnxRuntimeBackend(artifact, provider=provider)
    ref = TorchReference(reference)
    pad = manifest.pad_id
    report = ParityReport(str(artifact), str(reference), manifest.precision, preset, tolerance)
    cases = [(f"prompt {i + 1}", [r]) for i, r in enumerate(rows)]
    if batch and len(rows) > 1:
        cases.append((f"batch of {len(rows)} (left-padded)", rows))
    for name, case_rows in tqdm(cases, desc="parity", unit="case", disable=not progress):
        report.steps.extend(_run_case(name, case_rows, steps, ref, backend, pad))
    return report
