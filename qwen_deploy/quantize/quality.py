"""What quantization cost, measured against the fp32/fp16 source, and the gate it must pass.

Two held-out measurements, neither shared with the calibration set:
- chat prompts (the parity set): each is a prefill then STEPS decode steps; both artifacts are fed
  the source's greedy token, so the quantized model is judged on the reference trajectory
  (top-1 agreement, KL, cosine per logit row).
- real text the package ships (TEXTS: English prose, Chinese prose, Python and SQL code, ~5k
  tokens written for it; INT4's deltas of a few percent still move by a point or more from text
  to text, docs/DESIGN.md): teacher-forced perplexity of each next token, prefilled in chunks
  through the KV cache. Chat prompts alone make a poor perplexity: their tokens are mostly the
  template's fixed system prompt.
The gate is the mode's parity preset (top-1, mean KL and mean cosine over the prompt rows) with a
higher top-1 floor and a perplexity ceiling (GATES): bounds that mean the same on every model
(docs/DESIGN.md "Precisions"); the extreme rows are reported with where they are, not judged.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..backends import open_backend
from ..generation.tokenizer import Tokenizer
from ..manifest import Manifest
from ..parity.metrics import compare_logits, merge_metrics
from ..parity.presets import PRESETS
from ..parity.prompts import load_prompts
from ..records import Quality
from ..runtime.backend import Backend
from ..runtime.decode import Batch
from .text import prompt_ids

STEPS = 8
MAX_TOKENS = 256
HELD_OUT = "qwen_deploy/data/parity_prompts.jsonl"
TEXTS = ("en", "zh", "code")  # qwen_deploy/data/heldout_{name}.txt
TEXT_CHUNK = 256  # prefill positions per step: bounds the [chunk, vocab] logits in memory
ROW_BLOCK = 32  # logit rows exponentiated at once


@dataclass(frozen=True)
class Gate:
    """What quantize adds to the mode's parity preset: a higher top-1 floor on the held-out
    prompts and a ceiling on the relative perplexity increase over the held-out text."""

    top1: float
    perplexity: float


# docs/DESIGN.md "Precisions" gives each bound's measurements on both real models.
GATES = {
    "int8-weight": Gate(top1=0.97, perplexity=0.015),
    "int8-dynamic": Gate(top1=0.96, perplexity=0.015),
    "int8-smoothquant": Gate(top1=0.95, perplexity=0.03),
    "int4-weight": Gate(top1=0.92, perplexity=0.03),
}


def _run(
    backend: Backend,
    prompts: list[list[int]],
    steps: int,
    feed: list[list[int]] | None,
    desc: str,
    progress: bool,
) -> tuple[list[np.ndarray], list[list[int]]]:
    """Logits rows [prompt + steps, vocab] per prompt, and the tokens fed at each decode step.

    feed=None: feed this model's own argmax (the reference); else feed the given tokens.
    """
    logits_out, fed_out = [], []
    for n, ids in enumerate(tqdm(prompts, desc=desc, unit="prompt", disable=not progress)):
        batch = Batch(backend, 1)
        rows = [batch.extend(np.array([ids]))[0]]
        fed = []
        for step in range(steps):
            token = int(rows[-1][-1].argmax()) if feed is None else feed[n][step]
            fed.append(token)
            rows.append(batch.extend(np.array([[token]]))[0])
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


def token_nll(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """-log p(target) per row, a block of rows at a time: the exponentials of the logits less
    their row's max lie in (0, 1], so float32 takes them (no overflow, ~1e-7 relative error
    each: 1e-8 in the NLL, against float64 throughout) and their sum is taken in float64."""
    out = []
    for a in range(0, len(targets), ROW_BLOCK):
        x = np.asarray(logits[a : a + ROW_BLOCK], np.float32)
        top = x.max(axis=-1, keepdims=True)
        shifted = x - top
        np.exp(shifted, out=shifted)
        log_z = top[:, 0].astype(np.float64) + np.log(shifted.sum(axis=-1, dtype=np.float64))
        out.append(log_z - x[np.arange(len(x)), targets[a : a + ROW_BLOCK]])
    return np.concatenate(out)


def load_texts(tokenizer: Tokenizer) -> dict[str, list[int]]:
    """The packaged held-out passages as token ids of `tokenizer` (raw text, no template)."""
    data = resources.files("qwen_deploy.data")
    return {
        name: tokenizer.encode(data.joinpath(f"heldout_{name}.txt").read_text(encoding="utf-8"))
        for name in TEXTS
    }


def _score_text(
    backend: Backend, passages: dict[str, list[int]], desc: str, progress: bool
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(NLL, argmax) of every next token of each passage, teacher-forced."""
    out = {}
    for name, ids in tqdm(passages.items(), desc=desc, unit="text", disable=not progress):
        batch = Batch(backend, 1)
        nll, top = [], []
        for a in range(0, len(ids) - 1, TEXT_CHUNK):
            chunk = ids[a : a + TEXT_CHUNK]
            end = a + len(chunk)
            logits = batch.extend(np.array([chunk]))[0]
            targets = ids[a + 1 : end + 1]  # the last chunk's last row predicts nothing
            logits = logits[: len(targets)]
            nll.append(token_nll(logits, targets))
            top.append(logits.argmax(axis=-1))
        out[name] = np.concatenate(nll), np.concatenate(top)
    return out


def _perplexity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    ref, cand = float(np.exp(reference.mean())), float(np.exp(candidate.mean()))
    return {"reference": ref, "quantized": cand, "delta": cand - ref, "relative": cand / ref - 1.0}


def _text_report(
    reference: dict[str, tuple[np.ndarray, np.ndarray]],
    candidate: dict[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[dict, float]:
    """Perplexity of all passages together and of each, and top-1 agreement on their rows."""
    ref_nll = np.concatenate([reference[n][0] for n in TEXTS])
    cand_nll = np.concatenate([candidate[n][0] for n in TEXTS])
    agree = np.concatenate([reference[n][1] == candidate[n][1] for n in TEXTS])
    return {
        "text": "qwen_deploy/data/heldout_{" + ",".join(TEXTS) + "}.txt",
        "tokens": len(ref_nll),
        **_perplexity(ref_nll, cand_nll),
        "passages": {
            n: {"tokens": len(reference[n][0]), **_perplexity(reference[n][0], candidate[n][0])}
            for n in TEXTS
        },
    }, float(agree.mean())


def gate_bounds(mode: str) -> dict[str, float]:
    """The bounds `mode`'s artifact must meet: its parity preset with GATES applied."""
    preset, gate = PRESETS[mode], GATES[mode]
    bounds = {"top1": max(preset.top1 or 0.0, gate.top1), "perplexity": gate.perplexity}
    return bounds | {k: v for k, v in {"kl": preset.kl, "cosine": preset.cosine}.items() if v}


def gate_failures(mode: str, metrics: dict[str, float], perplexity: float) -> list[str]:
    """The bounds of `mode`'s gate that the measurements violate, worst first.

    Severity is the loss measured over the loss allowed (1 - top-1, relative perplexity, mean
    KL, 1 - mean cosine), so unlike metrics compare.
    """
    bound = gate_bounds(mode)
    top1, ppl = bound["top1"], bound["perplexity"]
    checks = [
        (1 - metrics["top1"], 1 - top1, f"top1 {metrics['top1']:.4f} < {top1:g}"),
        (perplexity, ppl, f"perplexity {perplexity:+.2%} > +{ppl:.1%}"),
    ]
    if "kl" in bound:
        kl = metrics["kl_mean"]
        checks.append((kl, bound["kl"], f"mean KL {kl:.3g} > {bound['kl']:g}"))
    if "cosine" in bound:
        cosine = metrics["cosine_mean"]
        checks.append(
            (1 - cosine, 1 - bound["cosine"], f"mean cosine {cosine:.6f} < {bound['cosine']:g}")
        )
    failed = [(loss / limit, text) for loss, limit, text in checks if loss > limit]
    return [text for _, text in sorted(failed, reverse=True)]


_last_source: tuple[tuple, tuple] | None = None  # (key, results) of the latest source measured


def _source_results(
    reference: str | Path,
    ids: list[list[int]],
    steps: int,
    texts: dict[str, list[int]],
    progress: bool,
    max_memory: float | None = None,
) -> tuple[list[np.ndarray], list[list[int]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The source's logits, greedy feed and text scores: measured once for a run of quantize
    calls on one source (a sweep over modes or block sizes spends half its report time here),
    and again whenever a file of the source artifact changes."""
    global _last_source
    folder = Path(reference).resolve()
    stats = [(f.name, f.stat()) for f in sorted(folder.iterdir())]
    files = tuple((name, stat.st_size, stat.st_mtime_ns) for name, stat in stats)
    key = (str(folder), files, tuple(map(tuple, ids)), steps)  # the texts follow from the files
    if _last_source is None or _last_source[0] != key:
        _last_source = None  # the previous source's logits go before this one's are made
        source = open_backend(reference, max_memory=max_memory)
        logits, fed = _run(source, ids, steps, None, "quality: source", progress)
        text = _score_text(source, texts, "quality: source text", progress)
        source.close()
        _last_source = key, (logits, fed, text)
    return _last_source[1]


def quality_report(
    reference: str | Path,
    candidate: str | Path,
    mode: str,
    prompts: list[dict] | None = None,
    steps: int = STEPS,
    progress: bool = True,
    max_memory: float | None = None,
) -> Quality:
    """Top-1 agreement, KL, cosine and text perplexity of `candidate` against `reference`, and
    whether they pass the gate of `mode` (the quantizer adds its per-layer choices)."""
    ids = prompt_ids(reference, prompts or load_prompts(), MAX_TOKENS)
    tokenizer = Tokenizer.from_artifact(Path(reference))
    texts = load_texts(tokenizer)
    ref_logits, fed, ref_text = _source_results(reference, ids, steps, texts, progress, max_memory)
    quantized = open_backend(candidate, max_memory=max_memory)
    cand_logits, _ = _run(quantized, ids, steps, fed, "quality: int8", progress)
    cand_text = _score_text(quantized, texts, "quality: int8 text", progress)
    quantized.close()
    rows = distinct_rows(ids, fed)
    metrics = _compare(
        np.stack([ref_logits[n][i] for n, i in rows]),
        np.stack([cand_logits[n][i] for n, i in rows]),
    )
    perplexity, text_top1 = _text_report(ref_text, cand_text)
    failures = gate_failures(mode, metrics, perplexity["relative"])
    return Quality(
        reference=str(Path(reference).resolve()),
        reference_precision=Manifest.load(reference).precision,
        prompts=HELD_OUT if prompts is None else "given",
        cases=len(ids),
        decode_steps=steps,
        rows=len(rows),
        top1=metrics["top1"],
        kl_mean=metrics["kl_mean"],
        cosine_mean=metrics["cosine_mean"],
        kl_max=metrics["kl_max"],
        cosine_min=metrics["cosine_min"],
        largest_kl_row=_locate(rows[metrics["worst_row"]], ids, fed, tokenizer),
        max_abs=metrics["max_abs"],
        mean_abs=metrics["mean_abs"],
        perplexity=perplexity,
        text_top1=text_top1,
        preset=mode,
        gate=gate_bounds(mode),
        passed=not failures,
        failures=failures,
    )


def distinct_rows(ids: list[list[int]], fed: list[list[int]]) -> list[tuple[int, int]]:
    """(prompt, position) of each row whose context (its tokens so far) no earlier row had.

    The prompts share the chat template's system prompt: counted once per prompt, each of its
    rows would weigh as much as all the prompts (docs/DESIGN.md, "Precisions")."""
    trie: dict[int, dict] = {}
    rows = []
    for n, tokens in enumerate(p + s for p, s in zip(ids, fed, strict=True)):
        node = trie
        for i, token in enumerate(tokens):
            if token not in node:
                node[token] = {}
                rows.append((n, i))
            node = node[token]
    return rows


def _locate(
    row: tuple[int, int], ids: list[list[int]], fed: list[list[int]], tokenizer: Tokenizer
) -> dict:
    """Which prompt, position and input token a compared row is."""
    n, position = row
    token = (ids[n] + fed[n])[position]
    return {
        "prompt": n + 1,
        "position": position,
        "token": tokenizer.decode([token]),
    }


def _row_label(row: dict) -> str:
    return f"prompt {row['prompt']} position {row['position']} (after {row['token']!r})"


def format_report(report: Quality) -> str:
    """Human-readable quality summary (the CLI prints this)."""
    ppl = report.perplexity
    verdict = "pass" if report.passed else "FAIL: " + "; ".join(report.failures)
    passages = ", ".join(f"{n} {p['relative']:+.2%}" for n, p in ppl["passages"].items())
    lines = [
        f"quality vs the {report.reference_precision} source ({report.cases} held-out "
        f"prompts, prefill + {report.decode_steps} decode steps, {report.rows} distinct rows):",
        f"  top-1 agreement  {report.top1:.4f}",
        f"  KL (mean, nats)  {report.kl_mean:.3g}",
        f"  cosine (mean)    {report.cosine_mean:.6f}",
        f"  largest KL       {report.kl_max:.3g} at {_row_label(report.largest_kl_row)} "
        f"(smallest cosine {report.cosine_min:.6f}; extremes are reported, not judged)",
        f"  perplexity       {ppl['reference']:.4g} -> {ppl['quantized']:.4g} "
        f"({ppl['relative']:+.2%}; {passages}) on {ppl['tokens']} tokens of held-out text",
        f"  text top-1       {report.text_top1:.4f}",
    ]
    lines += _layer_lines(report.layers, report.preset)
    lines.append(f"  preset {report.preset}: {verdict}")
    return "\n".join(lines)


def _layer_lines(layers: dict, mode: str) -> list[str]:
    """The quantizer's per-layer choices: quantized share, groups kept in float and why, alphas."""
    if not layers:
        return []
    label = "INT4/INT8 weights" if mode == "int4-weight" else "INT8 weights     "
    lines = [f"  {label} {layers['int8_weight_fraction']:.1%} of the linear weights"]
    lines += [f"  kept float       {k['linears']}: {k['reason']}" for k in layers["kept_float"]]
    alphas = layers["alphas"]
    if len(set(alphas.values())) == 1:
        return [*lines, f"  alpha            {next(iter(alphas.values()))} for every layer"]
    by_layer: dict[str, list[str]] = {}
    for name, alpha in alphas.items():
        prefix, _, roles = name.rpartition(".")
        layer = prefix.removeprefix("model.").split(".self_attn")[0].split(".mlp")[0]
        by_layer.setdefault(layer or roles, []).append(f"{roles} {alpha:g}")
    lines.append(f"  alpha            {layers['alpha']}:")
    return lines + [f"    {layer}: {', '.join(parts)}" for layer, parts in by_layer.items()]


ADVICE = {
    "int8-smoothquant": "--alpha auto (a search per layer) if a fixed --alpha was given, a larger "
    "--keep-float (e.g. 0.2: more of the most sensitive layers stay in floating point), a "
    "--calibration file that looks like your traffic, or --mode int8-weight",
    "int8-weight": "another --alpha (0.5 by default), a --calibration file that looks like your "
    "traffic, the default --block-size 64 if 128 was given, or the fp16 artifact",
    "int8-dynamic": "another --alpha (0.5 by default), a --calibration file that looks like "
    "your traffic, the default --block-size 64 if 128 was given, or --mode int8-weight",
    "int4-weight": "--gptq (rounding that compensates each channel's error), another --alpha (0.5 "
    "by default), a --calibration file that looks like your traffic, or --mode int8-weight",
}


def gate_message(report: Quality, out: str | Path) -> str:
    """Why the gate failed (worst metric first) and what to try, for stderr."""
    worst, *others = report.failures
    also = f" (also: {'; '.join(others)})" if others else ""
    return (
        f"quality gate {report.preset} FAILED: {worst}{also}. The artifact is kept at {out}, "
        f"marked failed (manifest quality.passed false). Try {ADVICE[report.preset]}."
    )
