"""onnxruntime on CUDA with IO binding: the KV cache never leaves the GPU.

Past/present are bound to two preallocated full-capacity device buffers per tensor
(DeviceKVCache ping-pong, the layout the TensorRT backend shares), so even the concat attention
forms allocate nothing per step; only token ids go up and the logits come down (the last
position's [batch, 1, vocab] at decode). The Generator's own path, OnnxRuntimeBackend with a bound
cache, keeps the cache on the device too (in place for gqa); this backend is what the GPU decode
benchmark (benchmarks/gpu_decode.py) measures. Meant for fp16 artifacts. The same code runs
with device="cpu" (CPU provider, CPU buffers), which is how it is tested without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from qwen_deploy.contract import is_past
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.manifest import Manifest
from qwen_deploy.runtime.onnxruntime_backend import (
    NUMPY_DTYPES,
    PROVIDERS,
    bind_logits_to_keep,
    logits_to_keep,
    require_provider,
    session_options,
    takes_logits_to_keep,
)
from qwen_deploy.tensorrt.device_cache import DeviceKVCache, check_step

DEFAULT_MAX_SEQ_LEN = 4096


class OnnxRuntimeIOBindingBackend:
    """Runs an exported artifact with device-resident KV cache (Backend interface)."""

    def __init__(
        self,
        artifact: str | Path,
        device: str = "cuda",
        device_id: int = 0,
        max_seq_len: int | None = None,
        threads: int | None = None,
    ):
        self.folder = Path(artifact)
        self.manifest = Manifest.load(self.folder)
        require_provider(device)
        if device == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels, when installed that way
        spec = self.manifest.model
        self.max_seq_len = max_seq_len or min(DEFAULT_MAX_SEQ_LEN, spec.max_position_embeddings)
        if not 1 <= self.max_seq_len <= spec.max_position_embeddings:
            raise QwenDeployError(
                f"max_seq_len {self.max_seq_len} must be between 1 and the model's "
                f"max_position_embeddings ({spec.max_position_embeddings})."
            )
        options = session_options(threads)
        provider = (
            (PROVIDERS[device], {"device_id": device_id}) if device == "cuda" else PROVIDERS[device]
        )
        self.session = ort.InferenceSession(
            str(self.folder / self.manifest.model_file), options, providers=[provider]
        )
        self.device, self.device_id = device, device_id
        kv_input = next(t for t in self.manifest.inputs if is_past(t.name))
        self.kv_dtype = NUMPY_DTYPES[kv_input.dtype]
        self._pairs = self.manifest.kv_pairs()
        self.binding = self.session.io_binding()
        self._keeps_last = takes_logits_to_keep(self.session)

    def new_cache(self, batch: int) -> DeviceKVCache:
        """Two full-capacity buffers per cache tensor, allocated once on the device."""
        spec = self.manifest.model
        shape = [batch, spec.num_kv_heads, self.max_seq_len, spec.head_dim]
        cache = DeviceKVCache(batch, self.max_seq_len)
        for past, _ in self._pairs:
            cache.buffers[past] = tuple(
                ort.OrtValue.ortvalue_from_shape_and_type(
                    shape, self.kv_dtype, self.device, self.device_id
                )
                for _ in range(2)
            )
        return cache

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: DeviceKVCache,
        last_only: bool = False,
    ) -> np.ndarray:
        """One step; float32 logits [batch, seq, vocab] ([batch, 1, vocab] with last_only)."""
        ids, mask, pos = check_step(
            input_ids, attention_mask, position_ids, cache.batch, cache.length, cache.capacity
        )
        spec = self.manifest.model
        batch, seq = ids.shape
        io = self.binding
        io.clear_binding_inputs()
        io.clear_binding_outputs()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        io.bind_cpu_input("position_ids", pos)
        if self._keeps_last:
            bind_logits_to_keep(io, logits_to_keep(last_only))
        io.bind_output("logits", "cpu")  # bound first: get_outputs() follows binding order
        past_shape = [batch, spec.num_kv_heads, cache.length, spec.head_dim]
        present_shape = [batch, spec.num_kv_heads, cache.length + seq, spec.head_dim]
        for past, present in self._pairs:
            io.bind_input(
                past,
                self.device,
                self.device_id,
                self.kv_dtype,
                past_shape,
                cache.read(past).data_ptr(),
            )
            io.bind_output(
                present,
                self.device,
                self.device_id,
                self.kv_dtype,
                present_shape,
                cache.write(past).data_ptr(),
            )
        self.session.run_with_iobinding(io)
        logits = io.get_outputs()[0].numpy()  # the step's only device -> host copy
        cache.advance(seq)
        if last_only:
            logits = logits[:, -1:]
        return logits.astype(np.float32, copy=False)
