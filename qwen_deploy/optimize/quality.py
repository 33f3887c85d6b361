"""What quantization cost: a quantized artifact against its fp32 source on held-out prompts.

Each prompt is a prefill then STEPS decode steps; both artifacts are fed the source's greedy token,
so the quantized model is judged on the reference trajectory. Held-out means the parity prompt
set, which shares no prompt with the calibration set. Perplexity is teacher-forced over each
prompt's own tokens (real text), the delta is quantized minus reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..manifest import Manifest
from ..parity.metrics import compare_logits, merge_metrics
from ..parity.presets import PRESETS
from ..parity.prompts import load_prompts
from ..serve.onnxruntime_backend import OnnxRuntimeBackend
from .text import prompt_ids

STEPS = 8
MAX_TOKENS = 256
HELD_OUT = "qwen_deploy/data/parity_prompts.jsonl"


def _run(
    folder: Path,
    prompts: list[list[int]],
    steps: int,
    feed: list[list[int]] | None,
    desc: str,
    progress: bool,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Logits rows [prompt + steps, vocab] per prompt, and the tokens fed at each decode step.

    feed=None: feed this model's own argmax (the reference); else feed the given tokens.
    """
    backend = OnnxRuntimeBackend(folder)
    logits_out, fed_out = [], []
    for n, ids in enumerate(tqdm(prompts, desc=desc, unit="prompt", disable=not progress)):
        cache = backend.new_cache(1)
        length = len(ids)
        rows = [
            backend.forward(
                np.array([ids]), np.ones((1, length), np.int64), np.arange(length)[None], cache
            )[0]
        ]
        fed = []
        for step in range(steps):
            token = int(rows[-1][-1].argmax()) if feed is None else feed[n][step]
            fed.append(token)
            position = cache.length
            rows.append(
                backend.forward(
                    np.array([[token]]),
                    np.ones((1, position + 1), np.int64),
                    np.array([[position]]),
                    cache,
                )[0]
            )
        logits_out.append(np.concatenate(rows))
        fed_out.append(fed)
    return logits_out, fed_out


def _compare(reference: np.ndarray, candidate: np.ndarray, chunk: int = 8) -> dict[str, float]:
    """compare_logits over all rows, computed in row chunks (5x faster on a 152k vocabulary)."""
    return merge_metrics(
        [
            (
                compare_logits(reference[a : a + chunk], candidate[a : a + chunk]),
                len(reference[a : a + chunk]),
            )
            for a in range(0, len(reference), chunk)
        ]
    )


def _perplexity(logits: list[np.ndarray], prompts: list[list[int]]) -> float:
    """exp(mean NLL) of each prompt token given its prefix (prefill rows only)."""
    nll = []
    for rows, ids in zip(logits, prompts, strict=True):
        x = rows[: len(ids) - 1].astype(np.float64)
        top = x.max(axis=-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(x - top).sum(axis=-1))
        nll.append(log_z - x[np.arange(len(ids) - 1), ids[1:]])
    return float(np.exp(np.concatenate(nll).mean()))


def quality_report(
    reference: str | Path,
    candidate: str | Path,
    mode: str,
    prompts: list[dict] | None = None,
    steps: int = STEPS,
    progress: bool = True,
) -> dict:
    """Top-1 agreement, KL, cosine and perplexity delta of `candidate` against `reference`."""
    ids = prompt_ids(reference, prompts or load_prompts(), MAX_TOKENS)
    ref_logits, fed = _run(Path(reference), ids, steps, None, "quality: source", progress)
    cand_logits, _ = _run(Path(candidate), ids, steps, fed, "quality: int8", progress)
    metrics = _compare(np.concatenate(ref_logits), np.concatenate(cand_logits))
    ppl_ref = _perplexity(ref_logits, ids)
    ppl_cand = _perplexity(cand_logits, ids)
    failures = PRESETS[mode].failures(metrics) if mode in PRESETS else []
    return {
        "reference": str(Path(reference).resolve()),
        "reference_precision": Manifest.load(reference).precision,
        "prompts": HELD_OUT if prompts is None else "given",
        "cases": len(ids),
        "decode_steps": steps,
        "rows": int(sum(len(x) for x in ref_logits)),
        "top1": metrics["top1"],
        "kl_max": metrics["kl"],
        "cosine_min": metrics["cosine"],
        "max_abs": metrics["max_abs"],
        "mean_abs": metrics["mean_abs"],
        "perplexity": {
            "reference": ppl_ref,
            "quantized": ppl_cand,
            "delta": ppl_cand - ppl_ref,
            "relative": ppl_cand / ppl_ref - 1.0,
        },
        "preset": mode,
        "passed": not failures,
        "failures": failures,
    }


def format_report(report: dict) -> str:
    """Human-readable quality summary (the CLI prints this)."""
    ppl = report["perplexity"]
    verdict = "pass" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    return "\n".join(
        [
            f"quality vs the {report['reference_precision']} source ({report['cases']} held-out "
            f"prompts, prefill + {report['decode_steps']} decode steps, {report['rows']} rows):",
            f"  top-1 agreement  {report['top1']:.4f}",
            f"  cosine (min)     {report['cosine_min']:.6f}",
            f"  KL (max, nats)   {report['kl_max']:.3g}",
            f"  perplexity       {ppl['reference']:.4g} -> {ppl['quantized']:.4g} "
            f"({ppl['relative']:+.2%})",
            f"  preset {report['preset']}: {verdict}",
        ]
    )
