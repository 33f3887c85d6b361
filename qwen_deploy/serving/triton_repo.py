"""Write a Triton Inference Server model repository from an artifact.

Two models, so Triton users get both levels:
- `{name}_decoder`: the graph itself (`onnxruntime_onnx` or `tensorrt_plan`), config.pbtxt
  generated from the manifest, for clients that drive prefill/decode and the KV cache themselves.
  Its version folder holds the whole artifact (manifest, tokenizer files), so it stays one.
- `{name}`: a Python-backend model (decoupled, so it can stream) that runs qwen-deploy's own
  Generator on that artifact: chat messages or a prompt plus sampling parameters in, text out.
The configs are written as protobuf text by hand (the toolkit does not depend on Triton); the
tests parse them with Triton's own ModelConfig definition.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..artifact import MARKER, check_output, staged_output
from ..errors import QwenDeployError
from ..generation.engine import require_batch_invariance
from ..manifest import Manifest, TensorSpec
from ..runtime.backend import PROVIDERS

BACKENDS = ("onnxruntime", "tensorrt")
VERSION = "1"
TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "float": "TYPE_FP32",
    "double": "TYPE_FP64",
}
MODEL_TEMPLATE = Path(__file__).with_name("triton_model.py")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The generation model's tensors: (name, Triton type, dims, optional)
GENERATE_INPUTS = [
    ("text_input", "TYPE_STRING", [1], True),
    ("messages", "TYPE_STRING", [1], True),
    ("sampling_parameters", "TYPE_STRING", [1], True),
    ("stream", "TYPE_BOOL", [1], True),
]
GENERATE_OUTPUTS = [
    ("text_output", "TYPE_STRING", [1]),
    ("content", "TYPE_STRING", [1]),
    ("reasoning_content", "TYPE_STRING", [1]),
    ("token_ids", "TYPE_INT64", [-1]),
    ("finish_reason", "TYPE_STRING", [1]),
    ("prompt_tokens", "TYPE_INT64", [1]),
]


@dataclass
class TritonRepository:
    """What `write_repository` produced, for the CLI and for tests."""

    path: Path
    generate_model: str
    decoder_model: str
    backend: str
    plugins: list[str]


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    fields = [
        f"name: {_quote(name)}",
        f"data_type: {dtype}",
        f"dims: [ {', '.join(str(d) for d in dims)} ]",
    ]
    if optional:
        fields.append("optional: true")
    return "  {\n" + "".join(f"    {f}\n" for f in fields) + "  }"


def _block(key: str, items: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(items) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    items = [
        f"  {{\n    key: {_quote(k)}\n    value: {{ string_value: {_quote(v)} }}\n  }}"
        for k, v in params.items()
    ]
    return _block("parameters", items)


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    """Triton dims: symbolic dims become -1; with batching the leading batch dim is implicit."""
    dims = [d if isinstance(d, int) else -1 for d in spec.shape]
    return dims[1:] if batched else dims


def _triton_dtype(spec: TensorSpec) -> str:
    if spec.dtype not in TRITON_DTYPES:
        raise QwenDeployError(
            f"tensor {spec.name} has dtype {spec.dtype!r}, which has no Triton type here "
            f"(known: {', '.join(TRITON_DTYPES)}); re-export the artifact."
        )
    return TRITON_DTYPES[spec.dtype]


def decoder_config(
    manifest: Manifest, name: str, backend: str, max_batch: int, instances: int, provider: str
) -> str:
    """config.pbtxt of the graph model: every input/output of the manifest with its type."""
    batched = max_batch > 0
    lines = [f"name: {_quote(name)}"]
    if backend == "tensorrt":
        lines += [
            'platform: "tensorrt_plan"',
            f"default_model_filename: {_quote(_engine_file(manifest))}",
        ]
    else:
        lines += [
            'platform: "onnxruntime_onnx"',
            f"default_model_filename: {_quote(manifest.model_file)}",
        ]
    lines.append(f"max_batch_size: {max_batch}")
    text = "\n".join(lines) + "\n"
    text += _block(
        "input", [_tensor(t.name, _triton_dtype(t), _dims(t, batched)) for t in manifest.inputs]
    )
    text += _block(
        "output", [_tensor(t.name, _triton_dtype(t), _dims(t, batched)) for t in manifest.outputs]
    )
    if batched:
        # Requests are merged only when all their shapes agree (same prompt/past lengths).
        text += "dynamic_batching {\n  max_queue_delay_microseconds: 100\n}\n"
    kind = "KIND_GPU" if provider == "cuda" else "KIND_CPU"
    group = [f"    count: {instances}", f"    kind: {kind}"]
    profiles = _engine_profiles(manifest) if backend == "tensorrt" else 0
    if profiles:
        # an instance may pick any of the engine's optimization profiles that fits a request
        group.append("    profile: [ " + ", ".join(f'"{i}"' for i in range(profiles)) + " ]")
    text += _block("instance_group", ["  {\n" + "\n".join(group) + "\n  }"])
    return text


def generate_config(
    name: str,
    artifact_rel: str,
    instances: int,
    provider: str,
    python_env: Path | None,
    max_batch: int = 8,
    batch_invariant: bool | None = None,
) -> str:
    """config.pbtxt of the Python-backend text generation model (decoupled: it streams, and each
    instance batches up to `max_batch` concurrent requests on one engine)."""
    text = f'name: {_quote(name)}\nbackend: "python"\nmax_batch_size: 0\n'
    text += "model_transaction_policy {\n  decoupled: true\n}\n"
    text += _block("input", [_tensor(*t) for t in GENERATE_INPUTS])
    text += _block("output", [_tensor(*t) for t in GENERATE_OUTPUTS])
    text += _block("instance_group", [f"  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}"])
    params = {"artifact": artifact_rel, "provider": provider, "max_batch": str(max_batch)}
    if batch_invariant:
        params["batch_invariant"] = "true"
    if python_env is not None:
        params["EXECUTION_ENV_PATH"] = str(python_env)
    return text + _parameters(params)


def _engine_file(manifest: Manifest) -> str:
    engine = manifest.engine
    return engine.plan if engine is not None and engine.plan else manifest.model_file


def _engine_profiles(manifest: Manifest) -> int:
    return 0 if manifest.engine is None else len(manifest.engine.profiles)


def _engine_plugins(manifest: Manifest, artifact: Path) -> list[str]:
    """Plugin libraries the engine needs (paths inside the artifact), checked to be there."""
    libs = [] if manifest.engine is None else list(manifest.engine.plugin_libraries)
    for lib in libs:
        if not (artifact / lib).is_file():
            raise QwenDeployError(
                f"the engine needs plugin library {lib}, missing from {artifact}; rebuild the "
                "engine artifact with `qwen-deploy build --plugin-lib ...`."
            )
    return libs


def _copy_artifact(artifact: Path, manifest: Manifest, dst: Path) -> None:
    """The whole artifact into `dst`. The model and weight files are hard-linked where the
    filesystem allows (a 15 GB model is not duplicated; nobody edits them in place); the small
    files are copied, so editing the repository never changes the artifact."""
    weights = {manifest.model_file, *manifest.data_files}
    dst.mkdir(parents=True)
    for path in sorted(artifact.rglob("*")):
        target = dst / path.relative_to(artifact)
        if path.is_dir():
            target.mkdir(exist_ok=True)
            continue
        if path.name == MARKER:  # the repository's own marker says who wrote it
            continue
        if target.relative_to(dst).as_posix() in weights:
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        shutil.copy2(path, target)


def _check_python_env(python_env: str | Path | None) -> Path | None:
    if python_env is None:
        return None
    env = Path(python_env).expanduser().resolve()
    if not (env / "bin" / "activate").is_file():
        raise QwenDeployError(
            f"--python-env {python_env} is not a virtual environment (no bin/activate); Triton's "
            "Python backend activates it: create it with `make triton-env` or `python -m venv`."
        )
    return env


def _check_options(
    manifest: Manifest, name: str, backend: str, max_batch: int, instances: int, provider: str
) -> None:
    if backend not in BACKENDS:
        raise QwenDeployError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}.")
    if provider not in PROVIDERS:
        raise QwenDeployError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}.")
    if not _NAME.match(name):
        raise QwenDeployError(
            f"model name {name!r} is not a valid Triton model name: use letters, digits, '_', "
            "'-' and '.', starting with a letter or digit."
        )
    if max_batch < 0 or instances < 1:
        raise QwenDeployError("--max-batch must be >= 0 (0 = no batching) and --instances >= 1.")
    if backend == "tensorrt":
        if manifest.engine is None:
            raise QwenDeployError(
                "--backend tensorrt needs a TensorRT engine artifact (its manifest has `engine`): "
                "run `qwen-deploy build` first, or use --backend onnxruntime."
            )
        if provider != "cuda":
            raise QwenDeployError("TensorRT engines run on the GPU: use --provider cuda.")
        limit = manifest.engine.limits.max_batch
        if limit is not None and max_batch > limit:
            raise QwenDeployError(
                f"--max-batch {max_batch} exceeds the engine's largest batch ({limit}, its "
                f"optimization profiles): pass --max-batch {limit} or rebuild the engine."
            )
    elif manifest.engine is not None:
        raise QwenDeployError(
            "this artifact is a TensorRT engine: use --backend tensorrt (or the ONNX artifact "
            "it was built from for --backend onnxruntime)."
        )


def default_name(artifact: str | Path) -> str:
    """A Triton model name from the artifact folder's name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(artifact).resolve().name).strip("_.-")
    return name or "qwen"


def write_repository(
    artifact: str | Path,
    out: str | Path,
    name: str | None = None,
    backend: str = "onnxruntime",
    max_batch: int = 8,
    instances: int = 1,
    provider: str | None = None,
    python_env: str | Path | None = None,
    batch_invariant: bool | None = None,
    force: bool = False,
    progress: bool = False,
) -> TritonRepository:
    """Write the model repository `out` for `artifact` (atomically: all or nothing), after
    checking every byte of the artifact against its manifest."""
    artifact = Path(artifact)
    manifest = Manifest.load(artifact)
    name = name or default_name(artifact)
    provider = provider or ("cuda" if backend == "tensorrt" else "cpu")
    _check_options(manifest, name, backend, max_batch, instances, provider)
    if batch_invariant:
        require_batch_invariance(manifest, manifest.own_row_lengths)
    env = _check_python_env(python_env)
    check_output(out, force, [artifact])
    manifest.verify(artifact, progress)  # a copy of damaged weights would fail only at load
    decoder = f"{name}_decoder"
    plugins = [f"{decoder}/{VERSION}/{lib}" for lib in _engine_plugins(manifest, artifact)]
    with staged_output(out, force, [artifact]) as tmp:
        _copy_artifact(artifact, manifest, tmp / decoder / VERSION)
        (tmp / decoder / "config.pbtxt").write_text(
            decoder_config(manifest, decoder, backend, max_batch, instances, provider)
        )
        (tmp / name / VERSION).mkdir(parents=True)
        shutil.copy2(MODEL_TEMPLATE, tmp / name / VERSION / "model.py")
        (tmp / name / "config.pbtxt").write_text(
            generate_config(
                name,
                f"../{decoder}/{VERSION}",
                instances,
                provider,
                env,
                max_batch,
                batch_invariant,
            )
        )
        (tmp / "README.md").write_text(
            readme(manifest, name, decoder, backend, provider, env, plugins)
        )
    return TritonRepository(Path(out), name, decoder, backend, plugins)


def readme(
    manifest: Manifest,
    name: str,
    decoder: str,
    backend: str,
    provider: str,
    env: Path | None,
    plugins: list[str],
) -> str:
    """The repository's README.md: what each model is and the exact commands to run and query."""
    platform = "tensorrt_plan" if backend == "tensorrt" else "onnxruntime_onnx"
    m = manifest.model
    preload = ""
    if plugins:
        libs = ";".join(f"$REPO/{p}" for p in plugins)
        preload = (
            "The engine uses TensorRT plugin libraries (in its artifact folder). Triton must load\n"
            "them before the plan; either name them in the TensorRT backend's config:\n\n"
            '    tritonserver --model-repository="$REPO" \\\n'
            f'        --backend-config=tensorrt,plugins="{libs}"\n\n'
            "or preload them into the server process:\n\n"
            f'    LD_PRELOAD="{":".join(f"$REPO/{p}" for p in plugins)}" '
            'tritonserver --model-repository="$REPO"\n\n'
        )
    env_line = (
        f"`EXECUTION_ENV_PATH` in `{name}/config.pbtxt` points at `{env}`: Triton's Python "
        "backend activates that virtual environment before loading `model.py`."
        if env
        else f"No `--python-env` was given: `{name}` runs in the Python that Triton's Python "
        "backend stub finds. Add to its config.pbtxt `parameters` an `EXECUTION_ENV_PATH` "
        "naming a virtual environment (or regenerate with `--python-env`)."
    )
    return f"""# Triton model repository: {m.num_layers}-layer Qwen2 ({manifest.precision})

Written by `qwen-deploy triton`. Models:

- `{name}` (backend `python`, decoupled): chat messages or a prompt plus sampling parameters in,
  text out (streamed token by token on request), `reasoning_content` split from `<think>`
  blocks. It runs qwen-deploy's runtime on `{decoder}/{VERSION}` ({provider}).
- `{decoder}` (platform `{platform}`): the decoder graph with its KV cache. You feed
  `input_ids`, `attention_mask`, `position_ids`, `past_key_values.*` and get `logits`,
  `present.*` (qwen-deploy's docs/artifact.md says what to feed at prefill and decode).

`{decoder}/{VERSION}/` is the complete qwen-deploy artifact (manifest.json, tokenizer files).

## Environment of the Python model

`{name}` needs numpy, onnxruntime, tokenizers, jinja2 and qwen-deploy importable in the Python
that runs it, with numpy < 2 for the Triton 2.51 Python backend stub. {env_line}
The stub's Python version must equal that environment's.

## Launch

    REPO="$(pwd)"    # this folder
    tritonserver --model-repository="$REPO"

Only the text model (for example when this Triton build has no {backend} backend):

    tritonserver --model-repository="$REPO" --model-control-mode=explicit --load-model={name}

{preload}Triton from PyPI: the `nvidia-pytriton` wheel bundles `tritonserver` with the Python
backend (no {backend} backend). Copy
`pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub` (3.X: the Python
of the environment above) into `pytriton/tritonserver/backends/python/`, then run
`pytriton/tritonserver/bin/tritonserver` with
`--backend-directory=<that>/pytriton/tritonserver/backends` and the explicit model control above.
The stub links `libpython3.X.so.1.0`: if the system has none, put the environment's Python
library folder (`python -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"`)
on `LD_LIBRARY_PATH`. qwen-deploy's `make triton-env` sets this up in `.venv-triton`.

## Query

Inputs of `{name}` (all optional, but exactly one of `text_input` / `messages`):
`text_input` (raw prompt, no chat template), `messages` (JSON list of chat messages),
`sampling_parameters` (JSON object: temperature, top_k, top_p, min_p, repetition_penalty,
presence_penalty, frequency_penalty, seed, max_tokens, stop, stop_token_ids; also `tools` and
`chat_template_kwargs` for the chat template; unset values come from the model's
generation_config), `stream` (bool). Outputs: `text_output`, `content`, `reasoning_content`,
`token_ids`, `finish_reason` ("stop" / "length", empty on intermediate stream responses),
`prompt_tokens`. Streaming sends one response per generated token with the deltas.
The model renders `tools` into the prompt, but parsing its answer into OpenAI `tool_calls`,
`tool_choice`, `logprobs` and the request limits are features of `qwen-deploy serve` (HTTP):
here a call comes back as the model wrote it, in `content`.

HTTP, one response:

    curl -s localhost:8000/v2/models/{name}/generate -d '{{
      "messages": "[{{\\"role\\": \\"user\\", \\"content\\": \\"What is EBITDA?\\"}}]",
      "sampling_parameters": "{{\\"temperature\\": 0, \\"max_tokens\\": 64}}"}}'

HTTP, streamed (server-sent events, one per token):

    curl -sN localhost:8000/v2/models/{name}/generate_stream -d '{{
      "messages": "[{{\\"role\\": \\"user\\", \\"content\\": \\"What is EBITDA?\\"}}]",
      "stream": true}}'

gRPC streaming with `tritonclient` (`pip install tritonclient[grpc]`):

```python
import json, numpy as np, tritonclient.grpc as grpcclient

def text(name, value):
    t = grpcclient.InferInput(name, [1], "BYTES")
    t.set_data_from_numpy(np.array([value.encode()], dtype=object))
    return t

stream = grpcclient.InferInput("stream", [1], "BOOL")
stream.set_data_from_numpy(np.array([True]))
client = grpcclient.InferenceServerClient("localhost:8001")
client.start_stream(callback=lambda result, error: print(
    error or result.as_numpy("text_output")[0].decode(), end="", flush=True))
client.async_stream_infer("{name}", [
    text("messages", json.dumps([{{"role": "user", "content": "What is EBITDA?"}}])),
    text("sampling_parameters", json.dumps({{"max_tokens": 64}})), stream])
client.stop_stream()   # waits for the last response
```

An invalid request (bad JSON, an out-of-range sampling value, both or neither of `text_input` and
`messages`) gets a Triton error naming the problem; the model keeps serving.
"""
