"""Checkpoint commands: random-checkpoint and convert-gguf."""

from __future__ import annotations

from pathlib import Path

import click

from .group import main
from .options import force_option, max_memory_option, output_option, quiet_option


@main.command("random-checkpoint")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--shape",
    type=click.Choice(["tiny", "0.5b", "fin-r1"]),
    default="tiny",
    show_default=True,
    help="Architecture numbers to use.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
)
@click.option("--seed", type=int, default=0, show_default=True)
@force_option
def random_checkpoint(out: Path, shape: str, dtype: str, seed: int, force: bool) -> None:
    """Write a random Qwen2 checkpoint (real Qwen tokenizer) to OUT, for trying the toolkit."""
    from ..artifact import staged_output
    from ..checkpoint.random_model import SHAPES, make_random_checkpoint

    layers, hidden, heads, kv, inter = SHAPES[shape]
    with staged_output(out, force) as tmp:
        make_random_checkpoint(
            tmp,
            layers=layers,
            hidden=hidden,
            heads=heads,
            kv_heads=kv,
            intermediate=inter,
            dtype=dtype,
            seed=seed,
            init_std=0.02 if shape != "tiny" else 0.2,
        )
    click.echo(f"wrote random {shape} Qwen2 checkpoint to {out}", err=True)


@main.command("convert-gguf")
@click.argument("model", type=click.Path(path_type=Path))
@output_option("Hugging Face checkpoint folder to create.")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bf16"]),
    default="float32",
    show_default=True,
    help="Dtype of the dequantized weights.",
)
@force_option
@max_memory_option
@quiet_option
def convert_gguf(
    model: Path, out: Path, dtype: str, force: bool, max_memory: float | None, quiet: bool
) -> None:
    """Convert a Qwen2 GGUF MODEL file (llama.cpp) to a Hugging Face checkpoint folder."""
    from ..checkpoint.gguf import convert_gguf as convert

    convert(model, out, dtype=dtype, force=force, progress=not quiet, max_memory=max_memory)
    click.echo(f"wrote {dtype} Hugging Face checkpoint of {model.name} to {out}", err=True)
