"""TensorRT backend: a built engine artifact behind the same interface as onnxruntime's.

One execution context; the optimization profile is chosen per step from the input shapes (decode
when seq == 1, prefill otherwise) and switched only when it changes. The KV cache lives in device
buffers (DeviceKVCache ping-pong), so a decode step moves token ids up and the last position's
logits down, nothing else. TensorRT is imported lazily: this module loads without it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from ..errors import QwenDeployError
from ..manifest import Artifact
from ..records import Engine
from ..runtime.backend import Capabilities, kv_bytes
from .cuda import CudaDriver, DeviceBuffer, DeviceInfo
from .device_cache import DeviceKVCache, check_step


def check_engine_compat(engine: Engine, trt_version: str, device: DeviceInfo) -> list[str]:
    """Refuse a plan this TensorRT/GPU cannot run, naming both sides; returns soft warnings.

    Plans load only in the TensorRT version that built them and only on the compute capability
    they were built for (no version- or hardware-compatibility mode is used).
    """
    built = str(engine.tensorrt_version or "unknown")
    if built.split(".")[:3] != str(trt_version).split(".")[:3]:
        raise QwenDeployError(
            f"this engine was built with TensorRT {built} but this machine has TensorRT "
            f"{trt_version}; TensorRT plans load only in the version that built them. Rebuild "
            f"it here with `qwen-deploy build` (or install TensorRT {built})."
        )
    target = engine.device
    if target.compute_capability != device.compute_capability:
        raise QwenDeployError(
            f"this engine was built for {target.name or 'an unknown GPU'} (compute "
            f"capability {target.compute_capability or '?'}) but this GPU is {device.name} "
            f"(compute capability {device.compute_capability}); rebuild the engine on this GPU "
            "with `qwen-deploy build`."
        )
    if target.name != device.name:
        return [
            f"engine built on {target.name}, running on {device.name} (same compute "
            "capability): it runs, but its kernels were timed on the other GPU."
        ]
    return []


def select_profile(profiles: list[dict], shapes: dict[str, tuple[int, ...]]) -> int:
    """The profile whose ranges hold `shapes`, preferring the closest opt input_ids shape.

    input_ids decides first (its seq length is the phase: decode kernels for seq 1), then the
    distance over all inputs; ties go to the lower index.
    """
    best, best_key = None, None
    for i, profile in enumerate(profiles):
        ranges = profile["shapes"]
        fits = all(
            all(
                lo <= d <= hi
                for lo, d, hi in zip(ranges[n]["min"], shape, ranges[n]["max"], strict=True)
            )
            for n, shape in shapes.items()
        )
        if not fits:
            continue
        distance = {
            n: sum(abs(o - d) for o, d in zip(ranges[n]["opt"], shape, strict=True))
            for n, shape in shapes.items()
        }
        key = (distance["input_ids"], sum(distance.values()))
        if best_key is None or key < best_key:
            best, best_key = i, key
    if best is None:
        limits = "; ".join(
            f"{p['name']}: input_ids {p['shapes']['input_ids']['min']}.."
            f"{p['shapes']['input_ids']['max']}, attention_mask up to "
            f"{p['shapes']['attention_mask']['max']}"
            for p in profiles
        )
        raise QwenDeployError(
            f"no optimization profile of the engine covers input_ids "
            f"{list(shapes['input_ids'])} with attention_mask {list(shapes['attention_mask'])} "
            f"({limits}); rebuild with larger --max-batch/--max-input-len/--max-seq-len."
        )
    return best


class TensorRTBackend:
    """Runs an engine artifact written by `qwen-deploy build` (Backend interface)."""

    def __init__(self, artifact: str | Path | Artifact, device: int = 0):
        from .builder import import_tensorrt

        artifact = Artifact.open(artifact)
        self.folder, self.manifest = artifact.folder, artifact.manifest
        engine = self.manifest.engine
        if engine is None or engine.format != "tensorrt":
            raise QwenDeployError(
                f"{artifact} is not a TensorRT engine artifact; build one with "
                "`qwen-deploy build ARTIFACT -o OUT`."
            )
        trt = import_tensorrt()
        self.driver = CudaDriver(device)
        for warning in check_engine_compat(engine, trt.__version__, self.driver.info()):
            print(f"warning: {warning}", file=sys.stderr)
        logger = trt.Logger(trt.Logger.WARNING)
        registry = trt.get_plugin_registry()
        for lib in engine.plugin_libraries:
            if registry.load_library(str(self.folder / lib)) is None:
                raise QwenDeployError(f"TensorRT could not load plugin library {lib}.")
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(
            (self.folder / self.manifest.model_file).read_bytes()
        )
        if self.engine is None:
            raise QwenDeployError(
                f"TensorRT could not deserialize {self.manifest.model_file} "
                "(its log above says why); rebuild the engine."
            )
        self.context = self.engine.create_execution_context()
        self.stream = self.driver.stream()
        self.profiles = engine.profiles
        self.capacity = int(engine.limits.max_seq_len)
        self.max_batch = int(engine.limits.max_batch)
        self._profile: int | None = None
        self._profile_for: dict[tuple[int, int, int], int] = {}  # (batch, seq, past) -> profile
        self.dtypes = {
            self.engine.get_tensor_name(i): np.dtype(
                trt.nptype(self.engine.get_tensor_dtype(self.engine.get_tensor_name(i)))
            )
            for i in range(self.engine.num_io_tensors)
        }
        self._pairs = self.manifest.kv_pairs()
        self._inputs = {
            name: DeviceBuffer(self.driver)
            for name in ("input_ids", "attention_mask", "position_ids")
        }
        self._logits = DeviceBuffer(self.driver)
        self.capabilities = Capabilities(
            device="cuda",
            max_batch=self.max_batch,
            max_positions=self.capacity,
            batch_chunks_with_past=True,
            kv_bytes_per_position=kv_bytes(self.manifest, self.dtypes[self._pairs[0][0]].itemsize),
        )

    def new_cache(self, batch: int, capacity: int | None = None) -> DeviceKVCache:
        """Device buffers for `batch` rows of the engine's max_seq_len positions."""
        if not 1 <= batch <= self.max_batch:
            raise QwenDeployError(
                f"batch {batch} is outside the engine's 1..{self.max_batch}; "
                "rebuild with a larger --max-batch."
            )
        if capacity is not None and capacity > self.capacity:
            raise QwenDeployError(
                f"{capacity} positions do not fit the engine's max_seq_len {self.capacity}; "
                "rebuild with a larger --max-seq-len."
            )
        spec = self.manifest.model
        cache = DeviceKVCache(batch, self.capacity)
        for past, _ in self._pairs:
            nbytes = (
                batch
                * spec.num_kv_heads
                * self.capacity
                * spec.head_dim
                * self.dtypes[past].itemsize
            )
            cache.buffers[past] = (
                DeviceBuffer(self.driver, nbytes),
                DeviceBuffer(self.driver, nbytes),
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
        past_shape = (batch, spec.num_kv_heads, cache.length, spec.head_dim)
        step = (batch, seq, cache.length)  # all the step's shapes follow from these
        if step not in self._profile_for:
            shapes = {
                "input_ids": ids.shape,
                "attention_mask": mask.shape,
                "position_ids": pos.shape,
                **{past: past_shape for past, _ in self._pairs},
            }
            self._profile_for[step] = select_profile(self.profiles, shapes)
        profile = self._profile_for[step]
        ctx = self.context
        if profile != self._profile:
            ctx.set_optimization_profile_async(profile, self.stream)
            self._profile = profile
        staged = []  # host arrays stay alive until the stream is synchronized
        for name, array in (("input_ids", ids), ("attention_mask", mask), ("position_ids", pos)):
            host = np.ascontiguousarray(array, dtype=self.dtypes[name])
            staged.append(host)
            ptr = self._inputs[name].reserve(host.nbytes)
            self.driver.upload(ptr, host, self.stream)
            ctx.set_input_shape(name, host.shape)
            ctx.set_tensor_address(name, ptr)
        for past, present in self._pairs:
            ctx.set_input_shape(past, past_shape)
            ctx.set_tensor_address(past, cache.read(past).ptr)
            ctx.set_tensor_address(present, cache.write(past).ptr)
        vocab = spec.vocab_size
        item = self.dtypes["logits"].itemsize
        logits_ptr = self._logits.reserve(batch * seq * vocab * item)
        ctx.set_tensor_address("logits", logits_ptr)
        if not ctx.execute_async_v3(self.stream):
            raise QwenDeployError("TensorRT failed to enqueue the step (its log above says why).")
        rows = 1 if last_only else seq
        out = np.empty((batch, rows, vocab), self.dtypes["logits"])
        for b in range(batch):  # each row's last `rows` positions are contiguous on the device
            self.driver.download(
                out[b], logits_ptr + ((b * seq + seq - rows) * vocab) * item, self.stream
            )
        self.driver.synchronize(self.stream)
        cache.advance(seq)
        return out.astype(np.float32, copy=False)

    def cache_arrays(self, cache: DeviceKVCache) -> dict[str, np.ndarray]:
        """Host copies of the cache ([batch, kv_heads, length, head_dim], dense at the start of
        each buffer)."""
        out = {}
        for past, _ in self._pairs:
            array = np.empty(self._kv_shape(cache.batch, cache.length), self.dtypes[past])
            if array.size:
                self.driver.download(array, cache.read(past).ptr, self.stream)
            out[past] = array
        self.driver.synchronize(self.stream)
        return out

    def cache_from_arrays(
        self,
        arrays: dict[str, np.ndarray],
        length: int,
        capacity: int | None = None,
        lengths: np.ndarray | None = None,
    ) -> DeviceKVCache:
        """A device cache holding `arrays`: rows join or leave a running batch this way (whole
        rows are uploaded; `lengths` is for backends whose rows keep their own, not this one)."""
        batch = len(next(iter(arrays.values())))
        cache = self.new_cache(batch, capacity)
        staged = []  # host arrays stay alive until the stream is synchronized
        for past, _ in self._pairs:
            host = np.ascontiguousarray(arrays[past][:, :, :length], self.dtypes[past])
            staged.append(host)
            if host.size:
                self.driver.upload(cache.read(past).ptr, host, self.stream)
        self.driver.synchronize(self.stream)
        cache.length = length
        return cache

    def truncate(self, cache: DeviceKVCache, length: int) -> None:
        """Forget positions from `length` on: a shorter [B, KV, T, D] is laid out differently,
        so the kept prefix is copied through the host."""
        if length >= cache.length:
            return
        arrays = {k: v[:, :, :length] for k, v in self.cache_arrays(cache).items()}
        shorter = self.cache_from_arrays(arrays, length)
        cache.buffers, cache.current, cache.length = shorter.buffers, shorter.current, length

    def close(self) -> None:
        """Free the execution context, the engine and the step buffers."""
        for buffer in [*self._inputs.values(), self._logits]:
            buffer.release()
        self.context = None
        self.engine = None

    def _kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        spec = self.manifest.model
        return (batch, spec.num_kv_heads, length, spec.head_dim)
