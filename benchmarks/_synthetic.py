"""Write a large random Qwen2 checkpoint (Fin-R1's shapes, 15 GB bf16) without building it in torch.

Shards are written tensor by tensor from one 64 MB pool of random bf16 values (cycled from random
offsets), so the generator's memory stays at the pool whatever the checkpoint size. The files are
standard safetensors (8-byte header length, JSON header, contiguous data) with the
model.safetensors.index.json and config.json that transformers writes for Qwen2.5-7B.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen_deploy.checkpoint.huggingface import expected_shapes, spec_from_config
from qwen_deploy.checkpoint.random_model import QWEN25_GENERATION_CONFIG, SHAPES, qwen_tokenizer_dir

POOL_VALUES = 32 << 20  # 64 MB of bf16
SHARD_BYTES = 4 << 30


def fin_r1_config() -> dict:
    """config.json as Fin-R1 (a Qwen2.5-7B fine-tune) ships it: transformers 4 spelling."""
    layers, hidden, heads, kv_heads, intermediate = SHAPES["fin-r1"]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": layers,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 152064,
    }


def _tensor_plan(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in model order, with its shape (biases included)."""
    shapes = expected_shapes(spec_from_config(config))

    def order(name: str) -> tuple:
        if name.startswith("model.layers."):
            return (1, int(name.split(".")[2]), name)
        return (0 if name.startswith("model.embed") else 2, 0, name)

    return [(name, shapes[name]) for name in sorted(shapes, key=order)]


def _shards(plan: list, itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in plan:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_shard(path: Path, tensors: list, pool: np.ndarray, rng: np.random.Generator) -> int:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * pool.itemsize
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    raw_pool = pool.view(np.uint16)  # bf16 has no buffer-protocol format: write its bits
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape in tensors:
            left = int(np.prod(shape))
            start = int(rng.integers(0, pool.size))
            while left:
                n = min(left, pool.size - start)
                f.write(raw_pool[start : start + n].data)
                left -= n
                start = 0
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # the export reads it cold
    return offset


def write_random_checkpoint(out: Path, config: dict | None = None, seed: int = 0) -> dict:
    """Write a random bf16 checkpoint (default: Fin-R1's shapes) to `out`; returns its layout."""
    out.mkdir(parents=True, exist_ok=True)
    config = config or fin_r1_config()
    rng = np.random.default_rng(seed)
    pool = (rng.standard_normal(POOL_VALUES, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shards = _shards(_tensor_plan(config), pool.itemsize)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += _write_shard(out / name, tensors, pool, rng)
        weight_map.update({t: name for t, _ in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(QWEN25_GENERATION_CONFIG, indent=2))
    for file in qwen_tokenizer_dir().iterdir():
        shutil.copy2(file, out / file.name)
    return {"bytes": total, "shards": len(shards), "tensors": len(weight_map)}
