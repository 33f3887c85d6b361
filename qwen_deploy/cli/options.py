"""Options that several commands share, declared once so they read and behave the same."""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.backend import PROVIDERS

force_option = click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")
threads_option = click.option("--threads", type=int, help="onnxruntime intra-op threads.")
max_memory_option = click.option(
    "--max-memory",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="GB this command may use at its peak; it is refused before it starts when its "
    "estimate is larger [default: the memory available].",
)


def output_option(what: str):
    """-o/--output: the folder a command creates (refused if it exists, unless --force)."""
    return click.option(
        "-o", "--output", "out", type=click.Path(path_type=Path), required=True, help=what
    )


def json_option(what: str):
    """--json: machine output on stdout instead of the human table."""
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as JSON.")


def provider_option(default: str | None = "cpu", help: str | None = None):
    """--provider: where onnxruntime runs the model."""
    return click.option(
        "--provider",
        type=click.Choice(list(PROVIDERS)),
        default=default,
        show_default=default is not None,
        help=help,
    )


def speculative_options(command):
    """Speculative decoding (generate, chat; serve: the requests' default): the same output in
    fewer target forwards."""
    options = [
        click.option(
            "--prompt-lookup",
            is_flag=True,
            help="Draft by n-gram lookup in the prompt and the text so far (no model): fast "
            "when the answer copies its input, as code edits do.",
        ),
        click.option(
            "--draft",
            type=click.Path(path_type=Path),
            help="Draft with this artifact (same tokenizer: e.g. the int8 artifact of the model).",
        ),
        click.option(
            "--draft-tokens",
            type=click.IntRange(1, 32),
            default=None,
            help="Tokens drafted per target forward [8 with --prompt-lookup, 12 with --draft].",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


batch_invariant_option = click.option(
    "--batch-invariant",
    is_flag=True,
    default=None,
    help="Require batch-invariant decoding: each request gets bit for bit the logits it would "
    "get alone, whatever runs next to it (an error for artifacts that cannot: TensorRT engines, "
    "attention forms other than gqa). gqa artifacts decode this way by default.",
)
