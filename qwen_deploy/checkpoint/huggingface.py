"""Read and validate a Hugging Face Qwen2-architecture checkpoint folder.

Everything the exporter needs is checked here, before a single byte is written, so that what
qwen-deploy cannot export faithfully is refused with a message naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from .safetensors_io import TensorInfo, memmap, read_header

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
SUPPORTED_ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class ModelSpec:
    """The architecture numbers of a Qwen2 decoder, as the exporter and runtime use them."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rope_type: str
    rope_factor: float
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelSpec:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    @property
    def lm_head_name(self) -> str:
        """The checkpoint tensor the LM head reads (the embedding table when tied)."""
        return "model.embed_tokens.weight" if self.tie_word_embeddings else "lm_head.weight"

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies in float32, computed as transformers does."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32)
        inv = 1.0 / (np.float32(self.rope_theta) ** (exponents / np.float32(self.head_dim)))
        inv = inv.astype(np.float32)
        if self.rope_type == "linear":
            inv = (inv / np.float32(self.rope_factor)).astype(np.float32)
        return inv


def _rope(config: dict, origin: str) -> tuple[float, str, float]:
    """RoPE theta and scaling from either spelling: transformers 4 or transformers 5."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if isinstance(params, dict) and "rope_theta" in params:
        block, prefix = params, "rope_parameters."
        theta = _number(params, "rope_theta", origin, prefix=prefix)
    elif "rope_theta" in config:
        theta = _number(config, "rope_theta", origin)
        block, prefix = (scaling, "rope_scaling.") if isinstance(scaling, dict) else ({}, "")
    else:
        raise CheckpointError(
            f"{origin} has no RoPE theta: expected 'rope_theta' (transformers 4) or "
            "'rope_parameters.rope_theta' (transformers 5). Add the model's value "
            "(Qwen2.5: 1000000)."
        )
    rope_type = block.get("rope_type", block.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        field = "rope_parameters.rope_type" if params else "rope_scaling.type"
        raise CheckpointError(
            f"{origin} {field} is {rope_type!r}; qwen-deploy implements "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}. Remove the scaling block to export the model "
            "with its native context length."
        )
    factor = _number(block, "factor", origin, 1.0, prefix)
    return theta, rope_type, factor


def _field(config: dict, key: str, origin: str, default: object, prefix: str) -> object:
    """config[key], or `default` when absent or null (a None default: the field is required)."""
    value = config.get(key)
    if value is not None:
        return value
    if default is None:
        raise CheckpointError(f"{origin} lacks required field '{prefix}{key}'.")
    return default


def _count(
    config: dict, key: str, origin: str, default: int | None = None, prefix: str = ""
) -> int:
    """A size field: a positive JSON integer (a string or float here would fail deep in export)."""
    value = _field(config, key, origin, default, prefix)
    if type(value) is not int or value < 1:
        raise CheckpointError(
            f"{origin} field '{prefix}{key}' is {json.dumps(value)}; it must be a positive integer."
        )
    return value


def _number(
    config: dict, key: str, origin: str, default: float | None = None, prefix: str = ""
) -> float:
    """A positive finite JSON number (RoPE theta and factor, RMSNorm epsilon)."""
    value = _field(config, key, origin, default, prefix)
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise CheckpointError(
            f"{origin} field '{prefix}{key}' is {json.dumps(value)}; it must be a positive number."
        )
    return float(value)


def spec_from_config(config: dict, origin: str = "config.json") -> ModelSpec:
    """Validate a Qwen2 config.json (`origin` names it in messages) and turn it into a
    ModelSpec."""
    archs = config.get("architectures") or []
    if config.get("model_type") != "qwen2" or not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise CheckpointError(
            f"{origin} describes model_type={config.get('model_type')!r}, "
            f"architectures={archs}; qwen-deploy exports Qwen2ForCausalLM "
            "(model_type 'qwen2') only."
        )
    if config.get("use_sliding_window"):
        raise CheckpointError(
            f"{origin} use_sliding_window is true; qwen-deploy exports full attention only. "
            "Set it to false (Qwen2.5 checkpoints ship it false) or use a runtime with "
            "sliding-window support."
        )
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{origin} hidden_act is {act!r}; Qwen2 uses 'silu'.")
    hidden = _count(config, "hidden_size", origin)
    heads = _count(config, "num_attention_heads", origin)
    kv_heads = _count(config, "num_key_value_heads", origin, heads)
    head_dim = _count(config, "head_dim", origin, hidden // heads)
    if heads % kv_heads:
        raise CheckpointError(
            f"{origin} num_attention_heads={heads} is not a multiple of "
            f"num_key_value_heads={kv_heads}."
        )
    tie = config.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise CheckpointError(
            f"{origin} field 'tie_word_embeddings' is {json.dumps(tie)}; it must be true or false."
        )
    theta, rope_type, factor = _rope(config, origin)
    return ModelSpec(
        num_layers=_count(config, "num_hidden_layers", origin),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=_count(config, "intermediate_size", origin),
        vocab_size=_count(config, "vocab_size", origin),
        rope_theta=theta,
        rope_type=rope_type,
        rope_factor=factor,
        rms_norm_eps=_number(config, "rms_norm_eps", origin, 1e-6),
        max_position_embeddings=_count(config, "max_position_embeddings", origin, 32768),
        tie_word_embeddings=tie,
    )


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor the exporter reads, with the shape the config implies."""
    h, d = spec.hidden_size, spec.head_dim
    q, kv, inter = spec.num_heads * d, spec.num_kv_heads * d, spec.intermediate_size
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.q_proj.bias": (q,),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.v_proj.bias": (kv,),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, h)
    return shapes


def read_text(path: Path) -> str:
    """A checkpoint's text file; one that is not UTF-8 is one line naming it and the byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "restore the file from the model's source."
        ) from e


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as an object; a damaged file is one line naming it."""
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e}); restore the file from the model's source."
        ) from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object.")
    return data


class Checkpoint:
    """A validated Hugging Face Qwen2 checkpoint folder; tensors are read lazily by memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(
                f"checkpoint folder {self.path} does not exist; pass the folder that holds "
                "config.json and the safetensors files."
            )
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{self.path} has no config.json; is this a Hugging Face checkpoint folder?"
            )
        self.config = read_json(config_path)
        self.spec = spec_from_config(self.config, str(config_path))
        self.tensors = self._index_tensors()
        self._validate_tensors()

    def _weight_files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map", {})
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise CheckpointError(
                    f"model.safetensors.index.json lists shard(s) missing from {self.path}: "
                    f"{', '.join(missing)}; download every shard."
                )
            return [self.path / f for f in files]
        single = self.path / "model.safetensors"
        if single.is_file():
            return [single]
        if list(self.path.glob("*.bin")):
            raise CheckpointError(
                f"{self.path} holds PyTorch .bin weights only; convert them to safetensors "
                "(model.save_pretrained(..., safe_serialization=True))."
            )
        raise CheckpointError(
            f"{self.path} has no model.safetensors or model.safetensors.index.json."
        )

    def _index_tensors(self) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            tensors.update(read_header(file))
        return tensors

    def _validate_tensors(self) -> None:
        for name, shape in expected_shapes(self.spec).items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(
                    f"tensor {name} is missing from the checkpoint's safetensors files; "
                    "the checkpoint is incomplete or not a Qwen2 model."
                )
            if info.shape != shape:
                raise CheckpointError(
                    f"tensor {name} has shape {list(info.shape)} but config.json implies "
                    f"{list(shape)}; the weights and config.json do not belong together."
                )
            if info.dtype.kind != "f" and str(info.dtype) != "bfloat16":
                raise CheckpointError(f"tensor {name} has non-float dtype {info.dtype}.")

    def tensor(self, name: str) -> np.ndarray:
        """A read-only memory map of one tensor in its stored dtype."""
        return memmap(self.tensors[name])

    @cached_property
    def source_dtype(self) -> str:
        return str(self.tensors["model.embed_tokens.weight"].dtype)

    @cached_property
    def generation_config(self) -> dict:
        path = self.path / "generation_config.json"
        return read_json(path) if path.is_file() else {}

    @cached_property
    def tokenizer_config(self) -> dict:
        path = self.path / "tokenizer_config.json"
        return read_json(path) if path.is_file() else {}

    @property
    def chat_template(self) -> str | None:
        """The chat template from chat_template.jinja, chat_template.json or tokenizer_config."""
        return self._chat_template_and_origin[0]

    @property
    def chat_template_origin(self) -> str:
        """The file (and field) chat_template comes from, for messages about it."""
        return self._chat_template_and_origin[1]

    @cached_property
    def _chat_template_and_origin(self) -> tuple[str | None, str]:
        jinja = self.path / "chat_template.jinja"
        if jinja.is_file():
            return read_text(jinja), str(jinja)
        js = self.path / "chat_template.json"
        if js.is_file():
            return read_json(js).get("chat_template"), f"{js} field chat_template"
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        return template, f"{self.path / 'tokenizer_config.json'} field chat_template"

    def tokenizer_files(self) -> list[Path]:
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]

    def fingerprint(self) -> str:
        """A cheap, stable hash of the checkpoint: config plus every safetensors header."""
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name in sorted(self.tensors):
            info = self.tensors[name]
            h.update(f"{name}:{info.dtype}:{info.shape}:{info.file.name}:{info.offset}".encode())
            h.update(str(info.file.stat().st_size).encode())
        return h.hexdigest()
