"""Memory-mapped safetensors reading, bf16 included, without torch.

The safetensors library's numpy loader cannot produce bfloat16 arrays, and Qwen checkpoints ship in
bf16, so we read the (documented, trivial) format directly: an 8-byte little-endian header length,
a JSON header of name -> dtype/shape/data_offsets, then the raw data. Memory mapping lets the
exporter stream a 15 GB checkpoint through a few hundred MB of RSS.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointError

DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives inside a safetensors file."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor's bytes are present in the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no header); re-download or re-save it.")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(
                f"{path} is truncated: its header claims {header_len} bytes but the file has "
                f"{size}; re-download or re-save it."
            )
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({e}).") from e
    base = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {meta['dtype']}.")
        start, end = meta["data_offsets"]
        if base + end > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} needs bytes up to {base + end} but the file "
                f"has {size}; re-download or re-save the checkpoint."
            )
        tensors[name] = TensorInfo(
            path, DTYPES[meta["dtype"]], tuple(meta["shape"]), base + start, end - start
        )
    return tensors


def memmap(info: TensorInfo) -> np.ndarray:
    """A read-only view of the tensor's bytes on disk (no copy)."""
    count = int(np.prod(info.shape, dtype=np.int64))
    if count == 0:
        return np.zeros(info.shape, info.dtype)
    return np.memmap(info.file, dtype=info.dtype, mode="r", offset=info.offset, shape=info.shape)
