"""Read an artifact's initializers one at a time and write new ones to external data.

A 7B fp32 graph is ~30 GB: loading it whole (onnx.load with external data) does not fit in memory,
so initializers are memory-mapped from model.onnx.data on demand and each rewritten tensor is
streamed straight into the new artifact's data file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ArtifactError
from ..export.weights import ExternalData

INLINE_BYTES = 1024  # scalars and tiny vectors stay inside model.onnx


def load_graph(folder: Path, model_file: str) -> onnx.ModelProto:
    """The graph proto without its external data (weights are read lazily by `SourceTensors`)."""
    path = folder / model_file
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; re-export the artifact.")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise ArtifactError(f"{path} is not a readable ONNX model ({e}); re-export it.") from e


class SourceTensors:
    """Initializers of a graph by name, read from external data by memory map when needed."""

    def __init__(self, folder: Path, model: onnx.ModelProto):
        self.folder = Path(folder)
        self.protos = {t.name: t for t in model.graph.initializer}

    def array(self, name: str) -> np.ndarray:
        tensor = self.protos[name]
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        path = self.folder / info["location"]
        if not path.is_file():
            raise ArtifactError(f"{path} (external data of {name}) is missing; re-export.")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
        shape = tuple(tensor.dims)
        return np.memmap(
            path, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=shape
        )


class TensorWriter:
    """New initializers: large ones appended to the new data file, tiny ones kept inline."""

    def __init__(self, folder: Path, file_name: str):
        self._data = ExternalData(Path(folder), file_name)

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.asarray(array)
        if array.nbytes <= INLINE_BYTES:
            return numpy_helper.from_array(array.copy(order="C"), name)
        return self._data.write(name, array, array.dtype)

    def close(self) -> None:
        self._data.close()
