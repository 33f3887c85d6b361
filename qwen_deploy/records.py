"""The manifest's typed records: generation defaults, KV-cache layout, quantization scheme,
quality report and TensorRT engine (docs/artifact.md describes every field).

Readers use attributes (`manifest.quantization.mode`, `manifest.engine.limits.max_batch`), not
dict lookups. The sections are open-ended (each quantization mode records its own details, a
report grows metrics): a record types the fields qwen-deploy knows and keeps any other key in
`extra`. A record read from a manifest writes back exactly the keys it read, in their order (plus
fields set since), so loading and saving an artifact written by any qwen-deploy changes no byte
of its manifest; a field the artifact lacks reads as its default (None, an empty list or dict).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")
_OWN = ("extra", "read_keys")  # the record's bookkeeping, never a manifest key


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


@dataclass(frozen=True)
class Record:
    """Typed fields plus `extra` (the keys not typed); `read_keys`: the keys as read, in order
    (None: built in code, which writes every field)."""

    extra: dict[str, Any] = field(default_factory=dict, kw_only=True)
    read_keys: tuple[str, ...] | None = field(default=None, kw_only=True, repr=False, compare=False)
    NESTED: ClassVar[dict[str, type[Record]]] = {}  # fields that are records themselves

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        """The record of a manifest section; unknown keys go to `extra`, none is dropped."""
        typed = {f.name for f in fields(cls)} - set(_OWN)
        values = {}
        for key, value in data.items():
            if key in typed:
                nested = cls.NESTED.get(key)
                values[key] = (
                    nested.from_dict(value) if nested and isinstance(value, dict) else value
                )
        extra = {k: v for k, v in data.items() if k not in typed}
        return cls(**values, extra=extra, read_keys=tuple(data))

    def to_dict(self) -> dict[str, Any]:
        """The JSON section: the keys read in their order, then fields set away from their
        default, then `extra`; a record built in code writes all its fields in declared order."""
        own = [f for f in fields(self) if f.name not in _OWN]
        values = {f.name: getattr(self, f.name) for f in own}
        if self.read_keys is None:
            written = set(values)
        else:
            changed = {f.name for f in own if values[f.name] != _default(f)}
            written = set(self.read_keys) | changed
        out: dict[str, Any] = {}
        for key in (*(self.read_keys or ()), *values, *self.extra):
            if key in out:
                continue
            if key in values and key in written:
                value = values[key]
                out[key] = value.to_dict() if isinstance(value, Record) else value
            elif key in self.extra:
                out[key] = self.extra[key]
        return out


@dataclass(frozen=True)
class Generation(Record):
    """Sampling defaults from the source's generation_config.json (None: not set there)."""

    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class KVCache(Record):
    """The KV-cache tensors' layout: what a C++/Triton user allocates and feeds back."""

    layout: str | None = None  # "BNSH": batch, kv heads, sequence, head dim
    shape: list[int | str] | None = None
    dtype: str | None = None
    past: str | None = None  # name pattern of the past inputs
    present: str | None = None  # name pattern of the present outputs
    update: str | None = None  # "concat": present = past + this step
    # OWN_LENGTH: a row may be right-padded; its new tokens go after its mask's last 1 (gqa).
    # None: rows are left-padded, every row's new tokens go after the last column.
    rows: str | None = None


OWN_LENGTH = "own-length"  # KVCache.rows of a graph whose rows keep lengths of their own


@dataclass(frozen=True)
class Quantization(Record):
    """How `quantize` rewrote the graph. Absent (manifest.quantization is None) for a float
    artifact; each mode records the details it has, the others stay at their defaults."""

    mode: str  # int8-weight, int8-dynamic, int4-weight, int8-smoothquant
    weights: str | None = None
    activations: str | None = None
    format: str | None = None  # "QDQ": explicit QuantizeLinear/DequantizeLinear pairs
    op: str | None = None  # the linear layers' operator (com.microsoft.MatMulNBits, MatMulInteger)
    zero_point: int | None = None
    bits: int | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    layers: int | None = None
    lm_head: bool | str | None = None
    embedding: str | None = None
    smoothing: dict[str, Any] = field(default_factory=dict)
    int8_roles: list[str] = field(default_factory=list)
    rounding: str | None = None  # int4: "gptq" or "nearest"
    calibration: dict[str, Any] = field(default_factory=dict)  # source and sample count


@dataclass(frozen=True)
class Quality(Record):
    """What quantization cost against the float source, and the gate's verdict (quality.py).
    Absent (manifest.quality is None) for an artifact `quantize` did not write."""

    reference: str | None = None
    reference_precision: str | None = None
    prompts: str | None = None
    cases: int | None = None
    decode_steps: int | None = None
    rows: int | None = None
    top1: float | None = None
    kl_mean: float | None = None
    cosine_mean: float | None = None
    kl_max: float | None = None  # the extremes: reported, not judged
    cosine_min: float | None = None
    largest_kl_row: dict[str, Any] = field(default_factory=dict)  # prompt, position, token
    max_abs: float | None = None
    mean_abs: float | None = None
    perplexity: dict[str, Any] = field(default_factory=dict)
    text_top1: float | None = None
    preset: str | None = None
    gate: dict[str, float] = field(default_factory=dict)
    passed: bool | None = None
    failures: list[str] = field(default_factory=list)
    layers: dict[str, Any] = field(default_factory=dict)  # the quantizer's per-layer choices

    @property
    def failed(self) -> bool:
        """The gate ran and failed (an artifact without a verdict has not failed)."""
        return self.passed is False


@dataclass(frozen=True)
class EngineDevice(Record):
    """The GPU an engine was built on: plans run only on its compute capability."""

    name: str | None = None
    compute_capability: str | None = None


@dataclass(frozen=True)
class EngineLimits(Record):
    """The largest shapes the engine's optimization profiles accept."""

    max_batch: int | None = None
    max_input_len: int | None = None
    max_seq_len: int | None = None


@dataclass(frozen=True)
class Engine(Record):
    """A TensorRT engine artifact's build: absent (manifest.engine is None) for an ONNX
    artifact. Profiles stay as written (shapes per input, per phase)."""

    NESTED: ClassVar[dict[str, type[Record]]] = {"device": EngineDevice, "limits": EngineLimits}

    format: str | None = None  # "tensorrt"
    plan: str | None = None  # the plan file inside the artifact
    tensorrt_version: str | None = None
    device: EngineDevice = field(default_factory=EngineDevice)
    strongly_typed: bool | None = None
    profiles: list[dict[str, Any]] = field(default_factory=list)
    limits: EngineLimits = field(default_factory=EngineLimits)
    workspace_bytes: int | None = None
    plugin_libraries: list[str] = field(default_factory=list)  # paths inside the artifact
    source: dict[str, Any] = field(default_factory=dict)  # what the plan was built from
    build_seconds: float | None = None
    plan_sha256: str | None = None
