"""What a command will hold in memory at its peak, estimated before any work starts.

A 7B model on a workstation fails by arithmetic, not by bad luck: its float32 weights alone are
30 GB. So every command that loads a model adds up what it will hold from the manifest (or the
checkpoint's headers) and refuses, naming the need and what to run instead, when the machine
cannot give it that much, rather than being OOM-killed halfway. The estimates are the bytes that
must be resident at once; docs/DESIGN.md ("Memory") compares them with measured peaks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from .checkpoint.huggingface import ModelSpec, expected_shapes
from .errors import QwenDeployError
from .manifest import Manifest

GB = 10**9
PROCESS = int(0.4 * GB)  # interpreter, onnxruntime, tokenizers, numpy: a loaded process
CGROUP = Path("/sys/fs/cgroup")
# a quantized fp16 artifact's load on the CPU also holds its scales widened to float32 constants
# (runtime/fp32_compute.py) while onnxruntime packs the codes: measured peak on the Fin-R1-shaped
# int4-weight artifact, 1.56x its bytes beyond the process
FP16_QUANTIZED_LOAD = 0.6


class MemoryNeedError(QwenDeployError):
    """A command would need more memory than the machine (or --max-memory) gives it."""


@dataclass(frozen=True)
class Need:
    """The parts a command holds at its peak, in bytes."""

    parts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def __add__(self, other: Need) -> Need:
        return Need(self.parts | other.parts)

    def describe(self) -> str:
        shown = {name: size for name, size in self.parts.items() if size >= GB / 20}
        return ", ".join(f"{name} {gb(size)}" for name, size in shown.items())


def gb(size: float) -> str:
    return f"{size / GB:.1f} GB"


def available() -> tuple[int, str]:
    """Bytes this process may still take, and where the number comes from: the kernel's
    MemAvailable, or a cgroup v2 limit when that is smaller (a container's own limit)."""
    free, origin = psutil.virtual_memory().available, "available on this machine"
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        used = int((CGROUP / "memory.current").read_text())
    except (OSError, ValueError):
        return free, origin
    if limit != "max" and int(limit) - used < free:
        return int(limit) - used, "left under this container's memory limit"
    return free, origin


def budget(max_memory_gb: float | None) -> tuple[int, str]:
    """The bytes a command may plan for: --max-memory when given, else what is available."""
    if max_memory_gb is not None:
        return int(max_memory_gb * GB), "allowed by --max-memory"
    return available()


def fits(need: Need, max_memory_gb: float | None) -> bool:
    return need.total <= budget(max_memory_gb)[0]


def require(what: str, need: Need, max_memory_gb: float | None, instead: Iterable[str]) -> None:
    """Refuse, before the work, a command whose peak would not fit; `instead` says what would."""
    limit, origin = budget(max_memory_gb)
    if need.total <= limit:
        return
    options = "; or ".join(instead)
    raise MemoryNeedError(
        f"{what} needs about {gb(need.total)} of memory at its peak ({need.describe()}), more "
        f"than the {gb(limit)} {origin}."
        + (f" Instead: {options}." if options else "")
        + ("" if max_memory_gb else " (--max-memory GB plans for another amount.)")
    )


# -- the pieces ----------------------------------------------------------------------------------
def parameters(spec: ModelSpec) -> dict[str, int]:
    """Element count of every tensor of the checkpoint."""
    return {name: int(np.prod(shape)) for name, shape in expected_shapes(spec).items()}


def layer_parameters(spec: ModelSpec) -> int:
    """Elements of one decoder layer (they all have the same shapes)."""
    return sum(n for name, n in parameters(spec).items() if name.startswith("model.layers.0."))


def artifact_bytes(manifest: Manifest) -> int:
    """The bytes of the model file and its external data, as the manifest records them."""
    names = [manifest.model_file, *manifest.data_files]
    return sum(int(manifest.files.get(name, {}).get("size", 0)) for name in names)


def kv_bytes(spec: ModelSpec, positions: int, itemsize: int = 4) -> int:
    """A KV cache of `positions` (rows x length) in float32, as the CPU runtime keeps it."""
    return positions * spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * itemsize


def logits_bytes(spec: ModelSpec, rows: int) -> int:
    return rows * spec.vocab_size * 4


def session(manifest: Manifest, positions: int = 0, rows: int = 1, label: str = "") -> Need:
    """An onnxruntime session of the artifact: its weights as stored (onnxruntime maps the data
    file; fp16 is widened per use in slices), the load's transient for a quantized fp16
    artifact, the KV cache of `positions` and `rows` of logits."""
    spec = manifest.model
    name = label or f"{manifest.quantization_mode or manifest.precision} artifact"
    weights = artifact_bytes(manifest)
    widened = manifest.precision == "fp16" and manifest.quantization_mode is not None
    return Need(
        {
            name: weights,
            f"{name} load": int(weights * FP16_QUANTIZED_LOAD) if widened else 0,
            f"{name} KV cache": kv_bytes(spec, positions),
            f"{name} logits": logits_bytes(spec, rows),
        }
    )


def process() -> Need:
    return Need({"process": PROCESS})


def reference(spec: ModelSpec, source_itemsize: int, dtype: str, load: str) -> Need:
    """transformers' model: the whole model in `dtype`, or (by layer) the largest piece it holds
    at once, a decoder layer or the LM head, widened from the checkpoint's copy. A float64
    reference runs a float32 one beside it."""
    itemsize = np.dtype(dtype).itemsize
    if load == "whole":
        shadow = 4 if itemsize == 8 else 0
        label = f"transformers {dtype}" + (" + float32" if shadow else "")
        return Need({label: sum(parameters(spec).values()) * (itemsize + shadow)})
    piece = max(layer_parameters(spec), spec.vocab_size * spec.hidden_size)
    return Need({f"transformers {dtype} by layer": piece * (itemsize + source_itemsize)})


# quantize/weight_only.py: codes plus a scale in the source's float type per block (INT4: 32
# channels and a 4-bit zero point; INT8: 64); the embedding is INT8 rows
INT8_BLOCK, INT4_BLOCK = 64, 32
INT8_IN_INT4 = ("v_proj", "down_proj")  # weight_only.INT8_ROLES, the LM head aside


def artifact_estimate(spec: ModelSpec, form: str, source: str = "fp32") -> int:
    """Bytes of an artifact of the model: an fp32 or fp16 export, or a weight-only
    quantization of a `source` (fp32 or fp16) export."""
    float_bytes = {"fp32": 4, "fp16": 2}
    sizes = parameters(spec)
    if form in float_bytes:
        return sum(sizes.values()) * float_bytes[form]
    scale = float_bytes[source]
    int8, int4 = 1 + scale / INT8_BLOCK, 0.5 + (scale + 0.5) / INT4_BLOCK
    total = 0.0
    for name, n in sizes.items():
        if name == "model.embed_tokens.weight":
            total += n
        elif not name.endswith("proj.weight") and name != "lm_head.weight":
            total += n * scale  # norms and biases stay in the source's float type
        elif form == "int4-weight" and not any(r in name for r in INT8_IN_INT4):
            total += n * (int4 if name != "lm_head.weight" else int8)
        else:
            total += n * int8
    if spec.tie_word_embeddings:
        total += sizes["model.embed_tokens.weight"] * int8  # the LM head's own INT8 copy
    return int(total)


def smaller_forms(manifest: Manifest) -> list[str]:
    """What would run in less memory than this artifact: a lower precision or a quantization."""
    mode = manifest.quantization_mode or manifest.precision
    order = ["fp32", "fp16", "int8-weight", "int4-weight"]
    if mode not in order[:-1]:
        return ["run it on a machine with more memory"]
    forms = order[order.index(mode) + 1 :]
    how = {
        "fp16": "an fp16 export (qwen-deploy export --precision fp16)",
        "int8-weight": "quantize --mode int8-weight",
        "int4-weight": "quantize --mode int4-weight",
    }
    source = "fp16" if "fp16" in order[: order.index(mode) + 1] else "fp32"
    return [
        f"{how[f]} (weights about {gb(artifact_estimate(manifest.model, f, source))})"
        for f in forms
    ]


def require_session(artifact_name: str, manifest: Manifest, max_memory_gb: float | None) -> None:
    """Refuse to open an artifact whose weights alone would not fit."""
    require(
        f"running {artifact_name}",
        process() + session(manifest),
        max_memory_gb,
        smaller_forms(manifest),
    )
