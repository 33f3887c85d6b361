"""Stream weights from the checkpoint's memory maps into one ONNX external-data file.

Each tensor is converted and written in row chunks, so peak memory stays at one chunk plus the
pages of the tensor being read, whatever the checkpoint size (a 7B export fits in a few GB).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

ALIGN = 4096  # page-aligned offsets let onnxruntime memory-map large initializers
CHUNK_BYTES = 64 << 20
TRANSPOSE_TILE = 256


def _row_chunks(rows: int, row_bytes: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class ExternalData:
    """Appends tensors to `<folder>/<file_name>` and returns TensorProtos that point into it."""

    def __init__(self, folder: Path, file_name: str):
        self.file_name = file_name
        self._f = (folder / file_name).open("wb")

    def close(self) -> None:
        self._f.close()

    def _pad(self) -> None:
        pad = (-self._f.tell()) % ALIGN
        if pad:
            self._f.write(b"\0" * pad)

    def _proto(
        self, name: str, dtype: np.dtype, shape: tuple[int, ...], offset: int
    ) -> TensorProto:
        length = self._f.tell() - offset
        tensor = TensorProto()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        tensor.dims.extend(shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.file_name), ("offset", offset), ("length", length)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        return tensor

    def write(self, name: str, array: np.ndarray, dtype: np.dtype) -> TensorProto:
        """Write `array` converted to `dtype`, chunked along the first axis."""
        dtype = np.dtype(dtype)
        self._pad()
        offset = self._f.tell()
        rows = array.shape[0] if array.ndim else 1
        flat = array.reshape(rows, -1)
        for a, b in _row_chunks(rows, flat.shape[1] * dtype.itemsize):
            self._f.write(np.ascontiguousarray(flat[a:b], dtype=dtype).data)
        return self._proto(name, dtype, tuple(array.shape), offset)

    def write_transposed(self, name: str, weight: np.ndarray, dtype: np.dtype) -> TensorProto:
        """Write W^T for a [out, in] linear weight, so the graph can use MatMul(x, W^T)."""
        dtype = np.dtype(dtype)
        out_features, in_features = weight.shape
        self._pad()
        offset = self._f.tell()
        for a, b in _row_chunks(in_features, out_features * dtype.itemsize):
            # transpose in the source dtype, tile by tile (cache-friendly), then cast once:
            # numpy's strided transpose-and-cast in one go is ~4x slower on a 7B LM head
            block = weight[:, a:b]
            buf = np.empty((b - a, out_features), weight.dtype)
            for i in range(0, out_features, TRANSPOSE_TILE):
                buf[:, i : i + TRANSPOSE_TILE] = block[i : i + TRANSPOSE_TILE].T
            self._f.write(np.ascontiguousarray(buf, dtype=dtype).data)
        return self._proto(name, dtype, (in_features, out_features), offset)
