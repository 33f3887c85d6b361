"""Drive one `quantize`: check inputs, rewrite the graph, measure the quality, write the artifact.

Everything that can be refused (mode, alpha, float budget, samples, calibration file, source
artifact, existing output) is checked before any work starts; the output folder appears only when
complete, and is kept when the quality gate fails (manifest quality.passed false): the caller
decides what a failed gate means (the CLI exits 1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from .. import memory
from ..artifact import check_output, copy_side_files, staged_output
from ..checkpoint.huggingface import ModelSpec
from ..contract import DATA_FILE, declare_oldest_ir
from ..errors import ArtifactError, QwenDeployError
from ..export.genai_config import write_genai_config
from ..manifest import Manifest, producer_record
from ..memory import Need
from ..parity.prompts import load_prompts
from ..records import Quantization
from .calibration import MAX_TOKENS as CALIBRATION_TOKENS
from .calibration import SAMPLE_TOKENS, collect_activations, load_calibration
from .dynamic import quantize_dynamic
from .gptq import GPTQ_TOKENS
from .linears import find_linears
from .quality import MAX_TOKENS as QUALITY_TOKENS
from .quality import STEPS as QUALITY_STEPS
from .quality import quality_report
from .rewrite import GraphRewrite
from .search import Plan, measured_tensors, plan_smoothquant
from .smoothing import Smoother
from .smoothquant import quantize_smoothquant
from .store import SourceTensors, TensorWriter, load_graph
from .text import prompt_ids
from .weight_only import INT4_BLOCK_SIZES, INT8_BLOCK_SIZES, quantize_weight_only

MODES = ("int8-weight", "int8-dynamic", "int4-weight", "int8-smoothquant")
WEIGHT_ONLY_BITS = {"int8-weight": 8, "int4-weight": 4}
# --block-size per mode: input channels per weight scale (the first is the default)
BLOCK_SIZES = {
    "int4-weight": INT4_BLOCK_SIZES,
    "int8-weight": INT8_BLOCK_SIZES,
    "int8-dynamic": INT8_BLOCK_SIZES,
}
FLOAT_DTYPES = {"fp32": np.float32, "fp16": np.float16}
WEIGHT_ONLY_ALPHA = 0.5  # activations are quantized at run time too: mild smoothing
# SmoothQuant's default float budget, a fraction of the linear weights (so >= 85.5% stay INT8).
# On the real 0.5B model 8% (9 down_proj layers) passed the token-level gate (top-1 0.96, +1.5%)
# but lost 6.7 HumanEval points; 14.5% (16 down_proj layers) loses 1.9-2.5 (top-1 0.98, +0.3%).
KEEP_FLOAT = 0.145


def _check_source(source: Path) -> Manifest:
    manifest = Manifest.load(source)
    if manifest.quantization is not None:
        raise ArtifactError(
            f"{source} is already quantized ({manifest.quantization.mode}); quantize the "
            "fp32 (or fp16) artifact it came from."
        )
    if manifest.engine is not None or manifest.precision not in FLOAT_DTYPES:
        raise ArtifactError(
            f"{source} is not an fp32/fp16 ONNX artifact (precision {manifest.precision}); "
            "quantize the output of `qwen-deploy export`."
        )
    return manifest


@dataclass
class WeightOptions:
    gptq: bool  # int4-weight: GPTQ rounding (gptq.py) instead of the nearest
    block: int | None  # input channels per weight scale (BLOCK_SIZES; None: int8-smoothquant)


def quantize_artifact(
    source: str | Path,
    out: str | Path,
    mode: str,
    calibration: str | Path | None = None,
    alpha: float | None = None,
    keep_float: float | None = None,
    samples: int = 128,
    gptq: bool = False,
    block_size: int | None = None,
    quality_prompts: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    max_memory: float | None = None,
) -> Manifest:
    """Write the quantized artifact `out` from the fp32/fp16 artifact `source`; returns its
    manifest.

    alpha: SmoothQuant's migration strength for every layer; None: SmoothQuant searches one per
    group of layers, the weight-only modes use WEIGHT_ONLY_ALPHA. keep_float: the fraction of the
    linear weights SmoothQuant may leave in floating point, the most sensitive groups first (None:
    KEEP_FLOAT). gptq: int4-weight rounds by GPTQ (gptq.py) instead of to the nearest;
    block_size: input channels per weight scale (BLOCK_SIZES[mode]; default its first). The
    manifest records the scheme under `quantization` and the measured cost
    against `source` under `quality` (on `quality_prompts`, default: the packaged parity prompts,
    and the packaged held-out text), with the gate's verdict. A run whose estimated peak
    (memory_need) exceeds `max_memory` GB (default: the memory available) is refused first.
    """
    source, out = Path(source), Path(out)
    if mode not in MODES:
        raise QwenDeployError(f"mode {mode!r} is not one of {', '.join(MODES)}.")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise QwenDeployError(
            f"--alpha must be within [0, 1] or 'auto' (a search per layer), got {alpha}."
        )
    if gptq and mode != "int4-weight":
        raise QwenDeployError("--gptq applies to --mode int4-weight only.")
    if block_size is not None and mode not in BLOCK_SIZES:
        raise QwenDeployError(
            f"--block-size applies to --mode {', '.join(BLOCK_SIZES)} only (not {mode})."
        )
    if block_size is not None and block_size not in BLOCK_SIZES[mode]:
        raise QwenDeployError(
            f"--block-size for {mode} must be one of {', '.join(map(str, BLOCK_SIZES[mode]))}, "
            f"got {block_size}."
        )
    if keep_float is not None and mode != "int8-smoothquant":
        raise QwenDeployError("--keep-float applies to --mode int8-smoothquant only.")
    if keep_float is not None and not 0.0 <= keep_float < 1.0:
        raise QwenDeployError(
            f"--keep-float must be a fraction of the linear weights in [0, 1), got {keep_float}."
        )
    prompts, origin = load_calibration(calibration, samples)
    held_out = load_prompts(quality_prompts) if quality_prompts is not None else None
    check_output(out, force, [source])
    manifest = _check_source(source)
    _check_memory(source, manifest, mode, gptq, prompts, held_out or load_prompts(), max_memory)
    model = load_graph(source, manifest.model_file)
    find_linears(model.graph)  # refuses graphs without exporter-named linear layers
    dtype = np.dtype(FLOAT_DTYPES[manifest.precision])

    with staged_output(out, force, [source]) as tmp:
        writer = TensorWriter(tmp, DATA_FILE)
        rw = GraphRewrite(model, SourceTensors(source, model), writer)
        budget = KEEP_FLOAT if keep_float is None else keep_float
        try:
            block = block_size or BLOCK_SIZES.get(mode, (None,))[0]
            options = WeightOptions(gptq, block)
            details = _quantize(rw, source, mode, dtype, alpha, budget, prompts, options, progress)
            details["calibration"] = {"source": origin, "samples": len(prompts)}
            rw.finish()
        finally:
            writer.close()
        layers = details.pop("layers_report")
        declare_oldest_ir(model)  # a source exported before exports declared it
        onnx.save_model(model, str(tmp / manifest.model_file))
        copy_side_files(source, tmp, manifest.tokenizer_files)
        manifest.data_files = [DATA_FILE]
        manifest.quantization = Quantization.from_dict({"mode": mode, **details})
        manifest.producer = producer_record(stage="quantize", **{"from": str(source.resolve())})
        manifest.save(tmp)  # the quality run loads the new artifact through its manifest
        report = quality_report(
            source, tmp, mode, held_out, progress=progress, max_memory=max_memory
        )
        manifest.quality = replace(report, layers=layers)
        write_genai_config(manifest, tmp)
        manifest.save(tmp)  # last: it records every file's size and hash
    return manifest


def memory_need(
    spec: ModelSpec,
    source_bytes: int,
    mode: str,
    gptq: bool,
    calibration_tokens: int,
    quality_rows: int,
) -> Need:
    """What quantize holds at its peak: the source artifact's weights (its session maps them),
    the longest calibration prompt's measured inputs plus the rows kept for SmoothQuant's
    searches or GPTQ, and the quality report's logits (both artifacts', then their compared
    rows)."""
    channels = spec.num_layers * (3 * spec.hidden_size + spec.intermediate_size)
    if mode == "int8-smoothquant":  # and the residual stream after o_proj and down_proj
        channels += spec.num_layers * 2 * spec.hidden_size
    kept = SAMPLE_TOKENS if mode == "int8-smoothquant" else GPTQ_TOKENS if gptq else 0
    return memory.process() + Need(
        {
            "source artifact": source_bytes,
            # one prompt's activations twice (onnxruntime's buffers and the returned copies)
            "calibration activations": (2 * calibration_tokens + kept) * channels * 4,
            "quality logits": 4 * memory.logits_bytes(spec, quality_rows),
        }
    )


def _check_memory(
    source: Path,
    manifest: Manifest,
    mode: str,
    gptq: bool,
    calibration: list[dict],
    held_out: list[dict],
    max_memory: float | None,
) -> None:
    spec, source_bytes = manifest.model, memory.artifact_bytes(manifest)
    longest = max(map(len, prompt_ids(source, calibration, CALIBRATION_TOKENS)))
    rows = sum(len(ids) + QUALITY_STEPS for ids in prompt_ids(source, held_out, QUALITY_TOKENS))

    def need(weights: int, with_gptq: bool) -> Need:
        return memory_need(spec, weights, mode, with_gptq, longest, rows)

    instead = []
    if gptq:
        instead.append(
            f"nearest rounding, without --gptq (about {memory.gb(need(source_bytes, False).total)})"
        )
    if manifest.precision == "fp32":
        half = need(memory.artifact_estimate(spec, "fp16"), gptq)
        instead.append(
            "quantize an fp16 export of the checkpoint (qwen-deploy export --precision fp16; "
            f"its quality report is then against fp16): about {memory.gb(half.total)}"
        )
    instead.append("run quantize on a machine with more memory")
    memory.require("quantize", need(source_bytes, gptq), max_memory, instead)


def _quantize(
    rw: GraphRewrite,
    source: Path,
    mode: str,
    dtype: np.dtype,
    alpha: float | None,
    budget: float,
    prompts: list[dict],
    options: WeightOptions,
    progress: bool,
) -> dict:
    """Calibrate, choose each group's smoothing, then quantize in the chosen form; returns the
    scheme details."""
    smoother = Smoother(rw, dtype)
    searched = mode == "int8-smoothquant"
    activations = collect_activations(
        source,
        measured_tensors(smoother) if searched else smoother.activations,
        prompts,
        progress,
        SAMPLE_TOKENS if searched else GPTQ_TOKENS if options.gptq else 0,
    )
    if searched:
        plan = plan_smoothquant(smoother, activations, alpha, budget, progress)
    else:
        fixed = WEIGHT_ONLY_ALPHA if alpha is None else alpha
        plan = Plan({g.input: fixed for g in smoother.groups}, {}, [])
    smoother.apply(activations.absmax, plan.alphas, frozenset(plan.keep_float))
    bar = tqdm(total=len(smoother.linears), desc=mode, unit="layer", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    with bar:
        if mode == "int8-dynamic":
            details = quantize_dynamic(smoother, step, options.block)
        elif mode in WEIGHT_ONLY_BITS:
            rows = activations.rows if options.gptq else None
            bits = WEIGHT_ONLY_BITS[mode]
            details = quantize_weight_only(smoother, step, bits, rows, options.block)
        else:
            details = quantize_smoothquant(smoother, step)
    label = (
        "searched per group" if searched and alpha is None else plan.alphas[smoother.activations[0]]
    )
    details["smoothing"]["alpha"] = label
    details["smoothing"]["kept_float"] = [g.name for g in smoother.groups if not g.quantized]
    details["layers_report"] = layers_report(smoother, plan, label)
    return details


def layers_report(smoother: Smoother, plan: Plan, alpha: str | float) -> dict:
    """Per group: the alpha it got and, for groups left in floating point, why."""
    groups = {g.input: g for g in smoother.groups}
    ranked = sorted(plan.sensitivity, key=lambda n: -plan.sensitivity[n].score)
    total = sum(g.params for g in smoother.groups)

    def reason(name: str) -> str:
        s = plan.sensitivity[name]
        return (
            f"INT8 error {s.logits:.0f}x the median group's at the logits, {s.residual:.0f}x in "
            f"the residual stream: rank {ranked.index(name) + 1} of {len(ranked)} "
            f"({groups[name].params / total:.1%} of the linear weights)"
        )

    int8 = sum(g.params for g in smoother.groups if g.quantized)
    return {
        "alpha": alpha,
        "alphas": smoother.summary()["alphas"],
        "kept_float": [{"linears": groups[n].name, "reason": reason(n)} for n in plan.keep_float],
        "int8_weight_fraction": int8 / total,
    }
