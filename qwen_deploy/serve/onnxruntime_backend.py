"""onnxruntime backend: one InferenceSession over the artifact's model.onnx."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import QwenDeployError
from ..manifest import Manifest
from .fp32_compute import fp32_compute_copy

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
NUMPY_DTYPES = {"float": np.float32, "float16": np.float16}


@dataclass
class OrtKVCache:
    """past_key_values arrays per layer, replaced by the present outputs after each step."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0


class OnnxRuntimeBackend:
    """Runs an exported artifact on onnxruntime (CPU or CUDA provider)."""

    def __init__(self, artifact: str | Path, provider: str = "cpu", threads: int | None = None):
        self.folder = Path(artifact)
        self.manifest = Manifest.load(self.folder)
        if provider not in PROVIDERS:
            raise QwenDeployError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}.")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise QwenDeployError(
                f"onnxruntime here has no {PROVIDERS[provider]} (available: {available}); "
                "install onnxruntime-gpu for --provider cuda."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        model_path = self.folder / self.manifest.model_file
        if provider == "cpu" and self.manifest.precision == "fp16":
            model_path, self._widened = fp32_compute_copy(model_path)
        self.session = ort.InferenceSession(
            str(model_path), options, providers=[PROVIDERS[provider]]
        )
        self.provider = provider
        kv_input = next(i for i in self.session.get_inputs() if i.name.startswith("past_key"))
        self.kv_dtype = NUMPY_DTYPES[kv_input.type.removeprefix("tensor(").removesuffix(")")]
        spec = self.manifest.model
        self._past_names = [n for i in range(spec.num_layers) for n in self.manifest.kv_names(i)[:2]]
        self._output_names = [o.name for o in self.session.get_outputs()]

    def new_cache(self, batch: int) -> OrtKVCache:
        spec = self.manifest.model
        empty = np.zeros((batch, spec.num_kv_heads, 0, spec.head_dim), self.kv_dtype)
        return OrtKVCache({name: empty for name in self._past_names}, 0)

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                position_ids: np.ndarray, cache: OrtKVCache) -> np.ndarray:
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
            **cache.arrays,
        }
        outputs = dict(zip(self._output_names, self.session.run(None, feeds), strict=True))
        for past in self._past_names:
            cache.arrays[past] = outputs[past.replace("past_key_values.", "present.")]
        cache.length += input_ids.shape[1]
        return outputs["logits"].astype(np.float32, copy=False)
