"""The artifact's graph contract: the names that the exporter writes and that every consumer
(backends, quantization, the TensorRT pre-flight and builder, Triton, peers' configs) reads.

Spelled once here so that a rename cannot leave a reader behind (docs/artifact.md describes it).
"""

from __future__ import annotations

from onnx import ModelProto, helper

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # every initializer, as ONNX external data
MS_DOMAIN = "com.microsoft"  # onnxruntime's contrib operators (GroupQueryAttention, MatMulNBits)

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"  # [batch, past + sequence]: 1 real token, 0 padding
POSITION_IDS = "position_ids"
LOGITS = "logits"
LOGITS_TO_KEEP = "logits_to_keep"
"""Optional scalar graph input: logits for the last k positions only (0, its default: all)."""

# dynamic dimension names
BATCH = "batch_size"
SEQUENCE = "sequence_length"
PAST = "past_sequence_length"
TOTAL = "total_sequence_length"
LOGITS_LENGTH = "logits_length"

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
KV_PARTS = ("key", "value")


def past_name(layer: int | str, part: str) -> str:
    """The graph input holding layer `layer`'s cached keys or values (`part`: key | value)."""
    return f"{PAST_PREFIX}{layer}.{part}"


def present_name(layer: int | str, part: str) -> str:
    """The graph output holding layer `layer`'s keys or values after the step."""
    return f"{PRESENT_PREFIX}{layer}.{part}"


def is_past(name: str) -> bool:
    """Whether a graph input is a KV-cache input."""
    return name.startswith(PAST_PREFIX)


def kv_pairs(num_layers: int) -> list[tuple[str, str]]:
    """(past, present) names of every layer's key and value, in layer order."""
    return [
        (past_name(layer, part), present_name(layer, part))
        for layer in range(num_layers)
        for part in KV_PARTS
    ]


def declare_oldest_ir(model: ModelProto) -> None:
    """The oldest IR version the model's opsets allow, not the installed onnx's newest: an
    artifact written by onnx 1.23 (IR 14) does not load on onnxruntime 1.31 (reads up to 13)."""
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
