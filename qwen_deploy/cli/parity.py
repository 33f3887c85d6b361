"""parity: an artifact's logits against transformers on its source checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ..runtime.backend import BACKENDS
from .group import main
from .options import max_memory_option, provider_option, quiet_option


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    required=True,
    help="The Hugging Face checkpoint folder the artifact was exported from.",
)
@click.option(
    "--prompts",
    type=click.Path(path_type=Path),
    default=None,
    help=".txt (one user message per line) or .jsonl ({'messages': [...]} or "
    "{'text': ...}); default: the packaged finance/reasoning set.",
)
@click.option(
    "--steps",
    type=click.IntRange(0, 1024),
    default=8,
    show_default=True,
    help="Decode steps after each prefill.",
)
@click.option("--no-batch", is_flag=True, help="Skip the left-padded batch case.")
@provider_option()
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default=None,
    help="Runtime to check the artifact on [from its manifest: tensorrt for an engine].",
)
@click.option("--preset", default=None, help="Tolerance preset (default: from the manifest).")
@click.option(
    "--atol", type=float, default=None, help="Override: atol of |diff| <= atol + rtol*|ref|."
)
@click.option("--rtol", type=float, default=None, help="Override: relative part of that bound.")
@click.option(
    "--min-cosine",
    type=float,
    default=None,
    help="Override: minimum mean over rows of the centered logit cosine.",
)
@click.option("--min-top1", type=float, default=None, help="Override: minimum top-1 agreement.")
@click.option(
    "--max-kl", type=float, default=None, help="Override: maximum mean over rows of the KL (nats)."
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the JSON report here ('-' for stdout).",
)
@click.option(
    "--markdown",
    "md_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write a markdown report here.",
)
@click.option(
    "--reference-dtype",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="float64: judge against exact arithmetic and show transformers float32's own distance "
    "to it (3x the memory of a float32 reference).",
)
@click.option(
    "--reference-load",
    type=click.Choice(["auto", "whole", "by-layer"]),
    default="auto",
    show_default=True,
    help="whole: transformers' model held in memory; by-layer: each layer's weights read from "
    "the checkpoint as it runs (the same logits, at the memory of one layer: a 7B model on a "
    "24 GB machine, slower); auto: whole when it fits.",
)
@max_memory_option
@quiet_option
def parity(
    artifact: Path,
    reference: Path,
    prompts: Path | None,
    steps: int,
    no_batch: bool,
    provider: str,
    backend: str | None,
    preset: str | None,
    atol: float | None,
    rtol: float | None,
    min_cosine: float | None,
    min_top1: float | None,
    max_kl: float | None,
    json_out: Path | None,
    md_out: Path | None,
    reference_dtype: str,
    reference_load: str,
    max_memory: float | None,
    quiet: bool,
) -> None:
    """Compare ARTIFACT's logits with transformers on the source checkpoint; exit 1 on failure."""
    from ..parity.report import markdown, table
    from ..parity.runner import run_parity

    report = run_parity(
        artifact,
        reference,
        prompts,
        steps=steps,
        batch=not no_batch,
        provider=provider,
        preset=preset,
        progress=not quiet,
        overrides={
            "atol": atol,
            "rtol": rtol,
            "cosine": min_cosine,
            "top1": min_top1,
            "kl": max_kl,
        },
        reference_dtype=reference_dtype,
        backend=backend,
        reference_load=reference_load,
        max_memory=max_memory,
    )
    text = json.dumps(report.to_dict(), indent=2)
    if json_out and str(json_out) == "-":
        click.echo(text)
    else:
        if json_out:
            json_out.write_text(text + "\n")
        click.echo(table(report))
    if md_out:
        md_out.write_text(markdown(report))
    if not report.passed:
        sys.exit(1)
