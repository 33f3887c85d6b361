"""quantize: INT8 artifacts with their quality report and gate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .group import main
from .options import force_option, json_option, max_memory_option, output_option, quiet_option


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@output_option("Quantized artifact folder to create.")
@click.option(
    "--mode",
    type=click.Choice(["int8-weight", "int8-dynamic", "int4-weight", "int8-smoothquant"]),
    required=True,
    help="int8-weight: INT8 weights, onnxruntime's fastest CPU form for one decoding row; "
    "int8-dynamic: INT8 weights and per-token INT8 activations on the integer GEMM, fastest "
    "for prefill and batches; int4-weight: INT4 "
    "transformer weights (asymmetric, block 32; LM head and embedding INT8); int8-smoothquant: "
    "W8A8 Q/DQ graph for TensorRT (also runs on onnxruntime).",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration prompts: .txt (one per line) or .jsonl ({'text': ...} or "
    "{'messages': [...]}); default: the packaged set (finance, reasoning, code and prose "
    "chats, English and Chinese).",
)
@click.option(
    "--alpha",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: _alpha(value),
    help="SmoothQuant migration strength in [0, 1] for every layer; auto: int8-smoothquant "
    "searches one per layer on the calibration set, the weight-only modes use 0.5.",
)
@click.option(
    "--keep-float",
    type=float,
    default=None,
    help="int8-smoothquant: fraction of the linear weights that may stay in floating point, "
    "the layers INT8 hurts most first (default 0.145; 0: every layer INT8).",
)
@click.option(
    "--samples",
    type=int,
    default=128,
    show_default=True,
    help="Calibration prompts to use (at most).",
)
@click.option(
    "--gptq",
    is_flag=True,
    help="int4-weight: GPTQ rounding, each channel's error compensated through the calibration "
    "inputs (real 0.5B, block 32: top-1 0.968 either way, perplexity +2.1% vs +1.8%; block 128: "
    "0.939, +2.6%; calibration 4x longer).",
)
@click.option(
    "--block-size",
    type=click.Choice(["32", "64", "128"]),
    default=None,
    help="Input channels per weight scale: int4-weight 32 (default), 64 or 128; int8-weight and "
    "int8-dynamic (its down_proj) 64 (default) or 128. Larger blocks prefill and decode faster "
    "(fewer scales to apply), lose a little accuracy and are not batch invariant on "
    "onnxruntime's CPU kernel (--batch-invariant refuses them); see docs/DESIGN.md for "
    "measurements.",
)
@click.option(
    "--quality-prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out prompts for the quality report (.txt or .jsonl, as for parity); "
    "default: the packaged parity set.",
)
@force_option
@json_option("the quality report")
@max_memory_option
@quiet_option
def quantize(
    artifact: Path,
    out: Path,
    mode: str,
    calibration: Path | None,
    alpha: float | None,
    keep_float: float | None,
    samples: int,
    gptq: bool,
    block_size: str | None,
    quality_prompts: Path | None,
    force: bool,
    as_json: bool,
    max_memory: float | None,
    quiet: bool,
) -> None:
    """Quantize an fp32/fp16 ARTIFACT to INT8 or INT4 and report the quality cost against it.

    Every mode calibrates (SmoothQuant smoothing: the INT8 kernels quantize activations too).
    Exits 1 when the artifact fails its quality gate; the artifact is kept, marked failed."""
    from ..quantize.quality import format_report, gate_message
    from ..quantize.quantizer import quantize_artifact

    manifest = quantize_artifact(
        artifact,
        out,
        mode,
        calibration=calibration,
        alpha=alpha,
        keep_float=keep_float,
        samples=samples,
        gptq=gptq,
        block_size=int(block_size) if block_size else None,
        quality_prompts=quality_prompts,
        force=force,
        progress=not quiet,
        max_memory=max_memory,
    )
    if as_json:
        click.echo(json.dumps(manifest.quality.to_dict(), indent=2))
    else:
        click.echo(format_report(manifest.quality))
    if manifest.quality.failed:
        click.echo(gate_message(manifest.quality, out), err=True)
        sys.exit(1)
    click.echo(f"wrote {mode} artifact to {out}", err=True)


def _alpha(value: str) -> float | None:
    """--alpha: 'auto' (None) or a number."""
    if value == "auto":
        return None
    try:
        return float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither 'auto' nor a number.") from None
