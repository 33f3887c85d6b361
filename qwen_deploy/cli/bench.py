"""bench: speed and memory of an artifact (its peers: benchmarks/peers/compare.py)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .group import main
from .options import json_option


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in value.split(",") if b.strip())
    except ValueError:
        sizes = (0,)
    if any(b < 2 for b in sizes):
        raise click.BadParameter(f"{value!r}: give batch sizes of 2 or more, like 4,8, or ''.")
    return sizes


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, help="Intra-op threads [onnxruntime's default].")
@click.option(
    "--batches",
    default="4,8",
    show_default=True,
    callback=lambda _ctx, _param, value: _batch_sizes(value),
    help="Batch sizes measured after batch 1, comma-separated ('' for none).",
)
@click.option(
    "--prompt-lookup", is_flag=True, help="Compare speculative decoding by prompt lookup."
)
@click.option(
    "--draft",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Compare speculative decoding with this draft artifact; repeatable.",
)
@click.option(
    "--draft-tokens",
    type=click.IntRange(1, 32),
    multiple=True,
    help="k for the speculative variants; repeatable [each drafter's default: 8 for prompt "
    "lookup, 12 for a draft artifact].",
)
@click.option(
    "--speculative-tokens",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Tokens each speculative workload answer gets.",
)
@json_option("the whole report")
def bench(
    artifact: Path,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    threads: int | None,
    batches: tuple[int, ...],
    prompt_lookup: bool,
    draft: tuple[Path, ...],
    draft_tokens: tuple[int, ...],
    speculative_tokens: int,
    as_json: bool,
) -> None:
    """Time to first token, decode tokens/s (batch 1, 4, 8) and peak RSS of ARTIFACT, measured in
    this process; speculative decoding against plain decoding. Its peers (transformers,
    onnxruntime-genai, llama.cpp, OpenVINO) on the same work: benchmarks/peers/compare.py."""
    from ..bench import BenchConfig, format_report, run_bench

    report = run_bench(
        artifact,
        BenchConfig(
            prompt_len,
            new_tokens,
            repeats,
            batches=batches,
            threads=threads,
            prompt_lookup=prompt_lookup,
            drafts=tuple(str(d) for d in draft),
            draft_tokens=draft_tokens,
            speculative_tokens=speculative_tokens,
        ),
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
