"""The `qwen-deploy` command line: one thin command per stage; the work lives in the modules."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import QwenDeployError


class Group(click.Group):
    """Turns QwenDeployError into a one-line message on stderr and exit status 2."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except QwenDeployError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(__version__, prog_name="qwen-deploy")
def main() -> None:
    """Export Qwen2-architecture checkpoints to ONNX/TensorRT, check parity, and serve them."""


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
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def random_checkpoint(out: Path, shape: str, dtype: str, seed: int, force: bool) -> None:
    """Write a random Qwen2 checkpoint (real Qwen tokenizer) to OUT, for trying the toolkit."""
    from .artifact import staged_output
    from .random_checkpoint import SHAPES, make_random_checkpoint

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
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Hugging Face checkpoint folder to create.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bf16"]),
    default="float32",
    show_default=True,
    help="Dtype of the dequantized weights.",
)
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert_gguf(model: Path, out: Path, dtype: str, force: bool, quiet: bool) -> None:
    """Convert a Qwen2 GGUF MODEL file (llama.cpp) to a Hugging Face checkpoint folder."""
    from .gguf_convert import convert_gguf as convert

    convert(model, out, dtype=dtype, force=force, progress=not quiet)
    click.echo(f"wrote {dtype} Hugging Face checkpoint of {model.name} to {out}", err=True)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Artifact folder to create.",
)
@click.option("--precision", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option(
    "--attention",
    type=click.Choice(["onnx", "gqa", "decomposed"]),
    default="onnx",
    show_default=True,
    help="onnx: standard Attention op (TensorRT fused attention); "
    "gqa: onnxruntime GroupQueryAttention; decomposed: MatMul/Softmax/MatMul.",
)
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(
    checkpoint: Path, out: Path, precision: str, attention: str, force: bool, quiet: bool
) -> None:
    """Export a Hugging Face Qwen2 CHECKPOINT folder to an ONNX artifact with KV cache."""
    from .export import export_checkpoint

    manifest = export_checkpoint(
        checkpoint, out, precision=precision, attention=attention, force=force, progress=not quiet
    )
    m = manifest.model
    click.echo(
        f"exported {m.num_layers}-layer Qwen2 ({precision}, attention={attention}) to {out}",
        err=True,
    )


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
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--preset", default=None, help="Tolerance preset (default: from the manifest).")
@click.option(
    "--atol", type=float, default=None, help="Override: atol of |diff| <= atol + rtol*|ref|."
)
@click.option("--rtol", type=float, default=None, help="Override: relative part of that bound.")
@click.option("--min-cosine", type=float, default=None, help="Override: minimum cosine.")
@click.option("--min-top1", type=float, default=None, help="Override: minimum top-1 agreement.")
@click.option("--max-kl", type=float, default=None, help="Override: maximum KL divergence.")
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
@click.option("--quiet", is_flag=True, help="No progress bar.")
def parity(
    artifact: Path,
    reference: Path,
    prompts: Path | None,
    steps: int,
    no_batch: bool,
    provider: str,
    preset: str | None,
    atol: float | None,
    rtol: float | None,
    min_cosine: float | None,
    min_top1: float | None,
    max_kl: float | None,
    json_out: Path | None,
    md_out: Path | None,
    reference_dtype: str,
    quiet: bool,
) -> None:
    """Compare ARTIFACT's logits with transformers on the source checkpoint; exit 1 on failure."""
    from .parity.report import markdown, table
    from .parity.runner import run_parity

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


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Show what an ARTIFACT's manifest says."""
    from .inspect import manifest_table
    from .manifest import Manifest

    manifest = Manifest.load(artifact)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
    else:
        click.echo(manifest_table(manifest, artifact))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Quantized artifact folder to create.",
)
@click.option(
    "--mode",
    type=click.Choice(["int8-weight", "int8-smoothquant"]),
    required=True,
    help="int8-weight: INT8 weights, onnxruntime's fastest CPU form; int8-smoothquant: "
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
    "searches one per layer on the calibration set, int8-weight uses 0.5.",
)
@click.option(
    "--keep-float",
    type=float,
    default=None,
    help="int8-smoothquant: fraction of the linear weights that may stay in floating point, "
    "the layers INT8 hurts most first (default 0.08; 0: every layer INT8).",
)
@click.option(
    "--samples",
    type=int,
    default=128,
    show_default=True,
    help="Calibration prompts to use (at most).",
)
@click.option(
    "--quality-prompts",
    type=click.Path(path_type=Path),
    default=None,
    help="Held-out prompts for the quality report (.txt or .jsonl, as for parity); "
    "default: the packaged parity set.",
)
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the quality report as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def quantize(
    artifact: Path,
    out: Path,
    mode: str,
    calibration: Path | None,
    alpha: float | None,
    keep_float: float | None,
    samples: int,
    quality_prompts: Path | None,
    force: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Quantize an fp32/fp16 ARTIFACT to INT8 and report the quality cost against it.

    Both modes calibrate (SmoothQuant smoothing: the INT8 kernels quantize activations too).
    Exits 1 when the artifact fails its quality gate; the artifact is kept, marked failed."""
    from .optimize.quality import format_report, gate_message
    from .optimize.quantize import quantize_artifact

    manifest = quantize_artifact(
        artifact,
        out,
        mode,
        calibration=calibration,
        alpha=alpha,
        keep_float=keep_float,
        samples=samples,
        quality_prompts=quality_prompts,
        force=force,
        progress=not quiet,
    )
    if as_json:
        click.echo(json.dumps(manifest.quality, indent=2))
    else:
        click.echo(format_report(manifest.quality))
    if not manifest.quality["passed"]:
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


@main.command("check-trt")
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--trt-version",
    default="10.15",
    show_default=True,
    help="TensorRT version to check against (>= 10.14).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def check_trt(model: Path, trt_version: str, as_json: bool) -> None:
    """Will TensorRT's ONNX parser import MODEL (artifact folder or .onnx)? Exit 1 on errors."""
    from .optimize.check_trt import check_path, report_json

    report = check_path(model, trt_version=trt_version)
    click.echo(report_json(report) if as_json else report.text())
    if not report.passed:
        sys.exit(1)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Engine artifact folder to create.",
)
@click.option("--max-batch", type=int, default=8, show_default=True)
@click.option(
    "--max-input-len",
    type=int,
    default=2048,
    show_default=True,
    help="Longest prompt (tokens) one prefill step takes.",
)
@click.option(
    "--max-seq-len",
    type=int,
    default=4096,
    show_default=True,
    help="Longest context: prompt + generated tokens.",
)
@click.option("--opt-batch", type=int, default=None, help="Batch TensorRT tunes for [1].")
@click.option(
    "--opt-input-len",
    type=int,
    default=None,
    help="Prompt length TensorRT tunes for [min(512, max-input-len)].",
)
@click.option(
    "--workspace-gb",
    type=float,
    default=None,
    help="Builder workspace limit in GiB [TensorRT's default: the GPU's memory].",
)
@click.option(
    "--timing-cache",
    type=click.Path(path_type=Path),
    default=None,
    help="Timing cache file: read if present, updated after the build.",
)
@click.option(
    "--plugin-lib",
    "plugin_libs",
    type=click.Path(path_type=Path),
    multiple=True,
    help="TensorRT plugin library to load before parsing (repeatable).",
)
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def build(
    artifact: Path,
    out: Path,
    max_batch: int,
    max_input_len: int,
    max_seq_len: int,
    opt_batch: int | None,
    opt_input_len: int | None,
    workspace_gb: float | None,
    timing_cache: Path | None,
    plugin_libs: tuple[Path, ...],
    force: bool,
    quiet: bool,
) -> None:
    """Build a TensorRT engine artifact from an fp16 or Q/DQ INT8 ONNX ARTIFACT."""
    from .optimize.tensorrt_build import BuildOptions, build_engine

    options = BuildOptions(
        max_batch,
        max_input_len,
        max_seq_len,
        opt_batch,
        opt_input_len,
        workspace_gb,
        timing_cache,
        tuple(plugin_libs),
    )
    manifest = build_engine(artifact, out, options, force=force, progress=not quiet)
    e = manifest.engine
    click.echo(
        f"built TensorRT {e['tensorrt_version']} engine for {e['device']['name']} "
        f"(sm {e['device']['compute_capability']}) in {e['build_seconds']} s: {out}",
        err=True,
    )


def _sampling_options(command):
    """Options shared by generate and chat; unset ones keep the artifact's generation_config."""
    options = [
        click.option("--temperature", type=float, help="0 = greedy."),
        click.option("--top-k", type=int, help="0 = off."),
        click.option("--top-p", type=float),
        click.option("--min-p", type=float),
        click.option("--repetition-penalty", type=float),
        click.option("--presence-penalty", type=float),
        click.option("--frequency-penalty", type=float),
        click.option("--seed", type=int, help="Makes sampling reproducible."),
        click.option("--max-tokens", type=int, default=256, show_default=True),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option(
            "--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True
        ),
        click.option("--threads", type=int, help="onnxruntime intra-op threads."),
        click.option("--system", help="System message."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _speculative_options(command):
    """Speculative decoding for generate and chat: the same output in fewer target forwards."""
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
            default=6,
            show_default=True,
            help="Tokens drafted per target forward.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _speculation(
    generator,
    prompt_lookup: bool,
    draft: Path | None,
    draft_tokens: int,
    provider: str,
    threads: int | None,
) -> dict:
    """Generator.stream's drafter and draft_tokens for the chosen drafter (none: {})."""
    from .serve.speculative import DraftModel, PromptLookup

    if prompt_lookup and draft:
        raise click.UsageError("choose one drafter: --prompt-lookup or --draft.")
    if prompt_lookup:
        return {"drafter": PromptLookup(), "draft_tokens": draft_tokens}
    if draft:
        from .serve.generator import open_backend

        backend = open_backend(draft, provider=provider, threads=threads)
        drafter = DraftModel(backend, generator.manifest.model.vocab_size)
        return {"drafter": drafter, "draft_tokens": draft_tokens}
    return {}


def _generator_and_params(artifact: Path, provider: str, threads: int | None, sampling: dict):
    from .manifest import Manifest
    from .serve.generator import Generator
    from .serve.sampling import SamplingParams

    sampling["stop"] = list(sampling["stop"]) or None
    params = SamplingParams.from_defaults(Manifest.load(artifact), **sampling)  # before loading
    return Generator(artifact, provider=provider, threads=threads), params


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@_sampling_options
@_speculative_options
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the chat template.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole result as JSON.")
def generate(
    artifact: Path,
    prompt: str,
    provider: str,
    threads: int | None,
    system: str | None,
    prompt_lookup: bool,
    draft: Path | None,
    draft_tokens: int,
    raw: bool,
    as_json: bool,
    **sampling,
) -> None:
    """Complete PROMPT with ARTIFACT, streaming the answer (reasoning goes to stderr)."""
    import dataclasses

    generator, params = _generator_and_params(artifact, provider, threads, sampling)
    speculation = _speculation(generator, prompt_lookup, draft, draft_tokens, provider, threads)
    if raw:
        request = {"prompt": prompt}
    else:
        system_turn = [{"role": "system", "content": system}] if system else []
        request = {"messages": [*system_turn, {"role": "user", "content": prompt}]}
    if as_json:
        result = generator.generate(**request, params=params, **speculation)
        click.echo(json.dumps(dataclasses.asdict(result), ensure_ascii=False))
        return
    for delta in generator.stream(**request, params=params, **speculation):
        if delta.reasoning_content:
            click.secho(delta.reasoning_content, nl=False, err=True, dim=True)
        click.echo(delta.content, nl=False)
    click.echo()


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@_sampling_options
@_speculative_options
def chat(
    artifact: Path,
    provider: str,
    threads: int | None,
    system: str | None,
    prompt_lookup: bool,
    draft: Path | None,
    draft_tokens: int,
    **sampling,
) -> None:
    """Interactive multi-turn chat with ARTIFACT (/exit or end of input quits, /reset clears)."""
    from .serve.chat import COMMANDS, chat_loop

    generator, params = _generator_and_params(artifact, provider, threads, sampling)
    speculation = _speculation(generator, prompt_lookup, draft, draft_tokens, provider, threads)
    stdin = sys.stdin
    interactive = stdin.isatty()
    if interactive:
        click.echo(f"chatting with {artifact} ({COMMANDS})", err=True)

    def lines():
        while True:
            if interactive:
                click.echo("> ", nl=False)
            line = stdin.readline()
            if not line:
                return
            yield line

    styles = {"reasoning": {"dim": True}, "notice": {"fg": "yellow"}, "error": {"fg": "red"}}

    def write(kind: str, text: str) -> None:
        if kind == "end":
            click.echo()
        elif kind in ("notice", "error"):
            click.secho(f"{kind}: {text}" if kind == "error" else text, err=True, **styles[kind])
        else:
            click.secho(text, nl=False, **styles.get(kind, {}))

    chat_loop(generator, params, lines(), write, system=system, speculation=speculation)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (0.0.0.0 exposes the server to the network).",
)
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--model-name", help="Model id clients send (default: the artifact folder's name).")
@click.option(
    "--api-key",
    envvar="QWEN_DEPLOY_API_KEY",
    help="Require 'Authorization: Bearer KEY' (or set QWEN_DEPLOY_API_KEY).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Requests decoded together; more wait in a queue.",
)
@click.option("--provider", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=int, help="onnxruntime intra-op threads.")
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=4 * 1024 * 1024,
    show_default=True,
    help="Larger request bodies get 413 before they are parsed.",
)
def serve(
    artifact: Path,
    host: str,
    port: int,
    model_name: str | None,
    api_key: str | None,
    max_batch: int,
    provider: str,
    threads: int | None,
    max_body_bytes: int,
) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API with continuous batching."""
    from .serve.server import serve as run_server

    run_server(
        artifact,
        host=host,
        port=port,
        model_name=model_name,
        api_key=api_key,
        max_batch=max_batch,
        provider=provider,
        threads=threads,
        max_body_bytes=max_body_bytes,
    )


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Model repository folder to create.",
)
@click.option("--name", help="Text model name; the graph is NAME_decoder [artifact folder name].")
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="tensorrt needs an engine artifact from `build`.",
)
@click.option(
    "--max-batch",
    type=int,
    default=8,
    show_default=True,
    help="The decoder's max_batch_size (0 = no batching).",
)
@click.option(
    "--instances", type=int, default=1, show_default=True, help="Model instances of each model."
)
@click.option(
    "--provider",
    type=click.Choice(["cpu", "cuda"]),
    help="Where the models run [cpu; cuda for tensorrt].",
)
@click.option(
    "--python-env",
    type=click.Path(path_type=Path),
    help="Virtual env for the Python-backend model (EXECUTION_ENV_PATH).",
)
@click.option("--force", is_flag=True, help="Replace the output folder if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def triton(
    artifact: Path,
    out: Path,
    name: str | None,
    backend: str,
    max_batch: int,
    instances: int,
    provider: str | None,
    python_env: Path | None,
    force: bool,
    as_json: bool,
) -> None:
    """Write a Triton Inference Server model repository for ARTIFACT."""
    from .serve.triton_repo import write_repository

    repo = write_repository(
        artifact,
        out,
        name=name,
        backend=backend,
        max_batch=max_batch,
        instances=instances,
        provider=provider,
        python_env=python_env,
        force=force,
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "path": str(repo.path),
                    "generate_model": repo.generate_model,
                    "decoder_model": repo.decoder_model,
                    "backend": repo.backend,
                    "plugins": repo.plugins,
                }
            )
        )
    click.echo(
        f"wrote Triton repository {out}: models {repo.generate_model} (python, "
        f"decoupled) and {repo.decoder_model} ({backend}); see {out}/README.md",
        err=True,
    )


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    help="Source checkpoint: adds transformers eager generate as a baseline.",
)
@click.option("--prompt-len", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--threads", type=int, help="Intra-op threads for every engine [their default].")
@click.option(
    "--genai-dir",
    type=click.Path(path_type=Path),
    help="Keep (or reuse) onnxruntime-genai's export here [a temp folder].",
)
@click.option("--no-genai", is_flag=True, help="Skip the onnxruntime-genai baseline.")
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
def bench(
    artifact: Path,
    reference: Path | None,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    threads: int | None,
    genai_dir: Path | None,
    no_genai: bool,
    as_json: bool,
) -> None:
    """Time to first token, decode tokens/s (batch 1, 4, 8), peak RSS of ARTIFACT vs its peers."""
    from .bench import BenchConfig, format_report, run_bench

    peers = ("transformers",) if no_genai else ("transformers", "onnxruntime-genai")
    report = run_bench(
        artifact,
        reference,
        BenchConfig(prompt_len, new_tokens, repeats, threads=threads),
        genai_dir=genai_dir,
        peers=peers,
        log=lambda m: click.echo(m, err=True),
    )
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))
