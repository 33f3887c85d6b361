"""onnxruntime backend: one InferenceSession over the artifact's model.onnx.

Two kinds of KV cache:
- host (`new_cache(batch)`): numpy arrays replaced by the present outputs after each step; the
  batching engine slices and left-pads them.
- bound (`new_cache(batch, capacity=n)`): the cache stays in OrtValues on the provider's device
  and is fed back through IO binding, so decode steps never move it through the host. With the
  `gqa` attention form the past and present tensors share one preallocated buffer of `capacity`
  positions that GroupQueryAttention updates in place (no per-step copy at all); the concat forms
  (onnx, decomposed) chain each step's present OrtValues into the next step's past.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import onnxruntime.capi.onnxruntime_pybind11_state as ortstate
from google.protobuf.message import DecodeError

from ..contract import ATTENTION_MASK, INPUT_IDS, LOGITS, LOGITS_TO_KEEP, POSITION_IDS, is_past
from ..errors import ArtifactError, QwenDeployError
from ..manifest import Artifact, Manifest
from .backend import PROVIDERS, Capabilities, kv_bytes
from .fp32_compute import Graph, fp32_compute
from .huge_pages import collapse_resident_memory
from .mixed_step import CHUNK, MIXED, add_mixed_step, mixable

NUMPY_DTYPES = {"float": np.float32, "float16": np.float16}
GROW_STEP = 256  # bound in-place caches grow to a multiple of this many positions


def require_provider(provider: str) -> str:
    """onnxruntime's name for 'cpu' / 'cuda', or a clear error when this install lacks it."""
    if provider not in PROVIDERS:
        raise QwenDeployError(f"provider {provider!r} is not one of {', '.join(PROVIDERS)}.")
    available = ort.get_available_providers()
    if PROVIDERS[provider] not in available:
        raise QwenDeployError(
            f"onnxruntime here has no {PROVIDERS[provider]} (available: {available}); "
            "install onnxruntime-gpu (pip install 'qwen-deploy[gpu]') on a machine with an "
            "NVIDIA GPU."
        )
    return PROVIDERS[provider]


def takes_logits_to_keep(session: ort.InferenceSession) -> bool:
    """Whether the graph has the optional `logits_to_keep` input (older artifacts do not)."""
    return any(i.name == LOGITS_TO_KEEP for i in session.get_overridable_initializers())


def logits_to_keep(last_only: bool) -> np.ndarray:
    """The `logits_to_keep` feed: 1 (the last position) or 0 (every position). Module-lifetime
    arrays: an IO binding points at their memory until the run."""
    return _KEEP[last_only]


_KEEP = {True: np.array(1, np.int64), False: np.array(0, np.int64)}
_MIXED = np.array(True)


def bind_logits_to_keep(binding: ort.IOBinding, keep: np.ndarray) -> None:
    """IO binding takes an input that has a default initializer only as an OrtValue."""
    binding.bind_ortvalue_input(LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(keep))


def session_options(threads: int | None) -> ort.SessionOptions:
    """Full graph optimization (fusions) and the requested intra-op thread count."""
    options = ort.SessionOptions()
    # errors only: at load onnxruntime warns that `logits_to_keep` is an initializer among the
    # graph inputs, which is the point of it (a default that callers may override)
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return options


def disabled_optimizers(manifest: Manifest) -> list[str]:
    """onnxruntime's optimizers to leave out for this artifact. A QDQ artifact gives every MatMul
    its own Q/DQ pair; common-subexpression elimination would merge the identical Qs of q/k/v
    (and gate/up), and onnxruntime fuses only single-consumer units into MatMulIntegerToFloat:
    the merged ones stay float MatMuls that dequantize their weights every step (real 0.5B
    SmoothQuant: 40 of 160 INT8 linears fused with it, all 160 without it)."""
    qdq = manifest.quantization is not None and manifest.quantization.format == "QDQ"
    return ["CommonSubexpressionElimination"] if qdq else []


# What onnxruntime and onnx raise on a damaged model or weight file (flipped bytes that kept the
# file's size, which only `inspect --verify` would name).
_LOAD_ERRORS = (
    ortstate.Fail,
    ortstate.InvalidProtobuf,
    ortstate.InvalidGraph,
    ortstate.NoSuchFile,
    ValueError,
    DecodeError,
)


def create_session(
    folder: Path,
    manifest: Manifest,
    options: ort.SessionOptions,
    provider: str,
    mixed_steps: bool = False,
) -> ort.InferenceSession:
    """The artifact's onnxruntime session (fp16 on CPU computes in float32: fp32_compute.py;
    `mixed_steps`: with the two-lane branch of runtime/mixed_step.py)."""
    model_path = folder / manifest.model_file
    providers, disabled = [PROVIDERS[provider]], disabled_optimizers(manifest)
    try:
        graph = None
        if provider == "cpu" and manifest.precision == "fp16":
            graph = fp32_compute(model_path)
        elif mixed_steps:
            graph = Graph(onnx.load(str(model_path), load_external_data=False), folder)
        if graph is None:
            return ort.InferenceSession(
                str(model_path), options, providers=providers, disabled_optimizers=disabled
            )
        if mixed_steps and mixable(graph.model):
            add_mixed_step(graph.model)
        return graph.session(options, providers, disabled)
    except _LOAD_ERRORS as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ArtifactError(
            f"onnxruntime cannot load artifact {folder} ({reason}); `qwen-deploy inspect "
            f"{folder} --verify` names the damaged file; {manifest.rewrite_hint()}."
        ) from e


LaneFeed = tuple[np.ndarray, np.ndarray, np.ndarray, "OrtKVCache"]
"""One lane of a mixed step: input_ids, attention_mask, position_ids and its cache."""


@dataclass
class OrtKVCache:
    """past_key_values per layer ([batch, kv_heads, length, head_dim]) and the cached length.

    `arrays` holds a host cache; a bound cache keeps `values` (OrtValues; with `capacity` > 0 they
    are in-place buffers of that many positions) and leaves `arrays` empty.
    """

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    length: int = 0
    values: dict[str, ort.OrtValue] | None = None
    capacity: int = 0
    # in place on CPU: [slots, kv_heads, capacity, head_dim] each, `values` views its first rows
    buffers: dict[str, np.ndarray] | None = None


class OnnxRuntimeBackend:
    """Runs an exported artifact on onnxruntime (CPU or CUDA provider)."""

    def __init__(
        self,
        artifact: str | Path | Artifact,
        provider: str = "cpu",
        threads: int | None = None,
        spinning: bool = True,
        huge_pages: bool = True,
    ):
        artifact = Artifact.open(artifact)
        self.folder, self.manifest = artifact.folder, artifact.manifest
        require_provider(provider)
        options = session_options(threads)
        if not spinning:
            # Idle workers sleep instead of spinning. Spinning (onnxruntime's default) wins on
            # dedicated cores (0.5B decode 13.6 vs 8 tok/s on an idle 2-core machine), but on
            # shared, busy cores spinning threads steal the time slices the working ones need
            # (decode measured 2-4x slower with it there).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # a step's decode and a prefill chunk in one forward, where rows keep their own lengths
        # and a row's result does not depend on the rows beside it
        m = self.manifest
        wanted = provider == "cpu" and m.own_row_lengths and m.row_independent_kernels
        self.session = create_session(self.folder, self.manifest, options, provider, wanted)
        self._keeps_last = takes_logits_to_keep(self.session)
        # older graphs (no logits_to_keep) stay as they are: mixed where the branch was built
        mixed = any(i.name == MIXED for i in self.session.get_overridable_initializers())
        if provider == "cpu" and huge_pages:
            collapse_resident_memory()  # the weights just loaded: fewer TLB misses per token
        self.device = "cuda" if provider == "cuda" else "cpu"
        kv_input = next(i for i in self.session.get_inputs() if is_past(i.name))
        self.kv_dtype = NUMPY_DTYPES[kv_input.type.removeprefix("tensor(").removesuffix(")")]
        self._pairs = self.manifest.kv_pairs()
        self._past_names = [past for past, _ in self._pairs]
        self._output_names = [
            o.name for o in self.session.get_outputs() if not o.name.startswith(CHUNK)
        ]
        self.in_place = self.manifest.attention == "gqa"  # GroupQueryAttention shares past/present
        self.capabilities = Capabilities(
            device=self.device,
            max_batch=None,
            max_positions=self.manifest.model.max_position_embeddings,
            # onnxruntime's GroupQueryAttention takes a multi-token step after a past only for
            # one row
            batch_chunks_with_past=not self.in_place,
            kv_bytes_per_position=kv_bytes(self.manifest, np.dtype(self.kv_dtype).itemsize),
            # the gqa graph finds each row's length in its mask (export/graph.py _gqa_inputs)
            own_row_lengths=self.manifest.own_row_lengths,
            mixed_steps=mixed,
            row_slots=self.in_place and self.device == "cpu",
        )

    def _kv_shape(self, batch: int, length: int) -> tuple[int, int, int, int]:
        spec = self.manifest.model
        return (batch, spec.num_kv_heads, length, spec.head_dim)

    def new_cache(self, batch: int, capacity: int | None = None) -> OrtKVCache:
        """An empty cache: host arrays, or a bound cache when `capacity` (positions) is given."""
        if capacity is None:
            empty = np.zeros(self._kv_shape(batch, 0), self.kv_dtype)
            return OrtKVCache({name: empty for name in self._past_names}, 0)
        size = _round_up(max(capacity, 1)) if self.in_place else 0
        values = {
            name: self._device_zeros(self._kv_shape(batch, size)) for name in self._past_names
        }
        return OrtKVCache({}, 0, values, size)

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        cache: OrtKVCache,
        last_only: bool = False,
    ) -> np.ndarray:
        """Run one step and extend `cache`; float32 logits [batch, seq, vocab], or
        [batch, 1, vocab] with `last_only` (the LM head then runs on the last position only)."""
        feeds = {
            "input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
            "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64),
            "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64),
        }
        keep = logits_to_keep(last_only) if self._keeps_last else None
        logits = (
            self._forward_bound(feeds, keep, cache)
            if cache.values is not None
            else self._forward_host(feeds, keep, cache)
        )
        return logits[:, -1:] if last_only else logits

    def _forward_host(
        self, feeds: dict[str, np.ndarray], keep: np.ndarray | None, cache: OrtKVCache
    ) -> np.ndarray:
        if keep is not None:
            feeds[LOGITS_TO_KEEP] = keep
        outputs = dict(
            zip(
                self._output_names,
                self.session.run(self._output_names, {**feeds, **cache.arrays}),
                strict=True,
            )
        )
        for past, present in self._pairs:
            cache.arrays[past] = outputs[present]
        cache.length += feeds["input_ids"].shape[1]
        return outputs["logits"].astype(np.float32, copy=False)

    def _forward_bound(
        self, feeds: dict[str, np.ndarray], keep: np.ndarray | None, cache: OrtKVCache
    ) -> np.ndarray:
        seq = feeds["input_ids"].shape[1]
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        if keep is not None:
            bind_logits_to_keep(binding, keep)
        binding.bind_output("logits", self.device)
        self._bind_cache(binding, cache, seq)
        self.session.run_with_iobinding(binding)
        logits, *presents = binding.get_outputs()  # in binding order
        if not self.in_place:
            cache.values = dict(zip(self._past_names, presents, strict=True))
        cache.length += seq
        return logits.numpy().astype(np.float32, copy=False)

    def forward_mixed(self, rows: LaneFeed, chunk: LaneFeed) -> tuple[np.ndarray, np.ndarray]:
        """The running rows' step and a one-row prefill chunk in one forward
        (`capabilities.mixed_steps`; runtime/mixed_step.py): float32 logits at the last position
        of each row [rows, 1, vocab] and of the chunk [1, 1, vocab]; both in-place caches are
        extended."""
        binding = self.session.io_binding()
        feeds = {}  # the binding points at these arrays' memory until the run
        for prefix, (ids, mask, positions, cache) in (("", rows), (CHUNK, chunk)):
            for name, array in (
                (INPUT_IDS, ids),
                (ATTENTION_MASK, mask),
                (POSITION_IDS, positions),
            ):
                feeds[prefix + name] = np.ascontiguousarray(array, dtype=np.int64)
                value = ort.OrtValue.ortvalue_from_numpy(feeds[prefix + name])
                binding.bind_ortvalue_input(prefix + name, value)
            binding.bind_ortvalue_input(
                prefix + LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(_KEEP[True])
            )
            binding.bind_output(prefix + LOGITS, self.device)
            self._bind_cache(binding, cache, ids.shape[1], prefix)
        binding.bind_ortvalue_input(MIXED, ort.OrtValue.ortvalue_from_numpy(_MIXED))
        self.session.run_with_iobinding(binding)
        for ids, _, _, cache in (rows, chunk):
            cache.length += ids.shape[1]
        outputs = binding.get_outputs()  # in binding order: each lane's logits, then its cache
        row_logits, chunk_logits = outputs[0], outputs[1 + len(self._pairs)]
        return (
            row_logits.numpy().astype(np.float32, copy=False),
            chunk_logits.numpy().astype(np.float32, copy=False),
        )

    def _bind_cache(
        self, binding: ort.IOBinding, cache: OrtKVCache, seq: int, prefix: str = ""
    ) -> None:
        """Bind a cache for a step of `seq` positions (an in-place one grown first if they would
        not fit): each past as an input and, in place, as its present output too."""
        if self.in_place and cache.length + seq > cache.capacity:
            self._grow(cache, cache.length + seq)
        for past, present in self._pairs:
            binding.bind_ortvalue_input(prefix + past, cache.values[past])
            if self.in_place:
                binding.bind_ortvalue_output(prefix + present, cache.values[past])
            else:
                binding.bind_output(prefix + present, self.device)

    def _grow(self, cache: OrtKVCache, needed: int) -> None:
        """Move an in-place cache to larger buffers (amortized: at least doubling)."""
        arrays = self.cache_arrays(cache)
        slots = _slots(cache) if cache.buffers else None
        grown = self.cache_from_arrays(
            arrays, cache.length, max(needed, 2 * cache.capacity), slots=slots
        )
        cache.values, cache.capacity, cache.buffers = grown.values, grown.capacity, grown.buffers

    def truncate(self, cache: OrtKVCache, length: int) -> None:
        """Forget every position from `length` on (draft tokens a verify step rejected)."""
        if cache.values is None:
            cache.arrays = {
                k: np.ascontiguousarray(v[:, :, :length]) for k, v in cache.arrays.items()
            }
        elif not self.in_place:
            arrays = {k: v[:, :, :length] for k, v in self.cache_arrays(cache).items()}
            cache.values = self.cache_from_arrays(arrays, length).values
        cache.length = length  # in place, the next step overwrites what lies beyond

    def cache_arrays(self, cache: OrtKVCache) -> dict[str, np.ndarray]:
        """A cache's tensors on the host, [batch, kv_heads, length, head_dim] each: on CPU views
        of its buffers, valid while the cache lives (copy what must outlive it)."""
        if cache.values is None:
            return dict(cache.arrays)
        return {name: v.numpy()[:, :, : cache.length] for name, v in cache.values.items()}

    def cache_from_arrays(
        self,
        arrays: dict[str, np.ndarray],
        length: int,
        capacity: int | None = None,
        lengths: np.ndarray | None = None,
        slots: int | None = None,
    ) -> OrtKVCache:
        """A bound cache holding `arrays` ([batch, kv_heads, length, head_dim] each); in place
        (gqa) with room for at least `capacity` positions, copying only each row's `lengths`
        when given (the rest of a fresh buffer stays untouched zero pages), and on CPU room for
        `slots` rows that later join in place (add_rows). Decode steps themselves copy no
        cache."""
        size = _round_up(max(capacity or 0, length + 1)) if self.in_place else 0
        values, buffers = {}, {}
        for name, array in arrays.items():
            rows = array.shape[0]
            if self.in_place:
                shape = (max(rows, slots or 0), array.shape[1], size, array.shape[3])
                buffer = buffers[name] = np.zeros(shape, self.kv_dtype)
                if lengths is None:
                    buffer[:rows, :, :length] = array[:, :, :length]
                else:
                    for row, n in enumerate(lengths):
                        buffer[row, :, :n] = array[row, :, :n]
            else:
                buffer = np.ascontiguousarray(array, self.kv_dtype)
            values[name] = self._device_value(buffer[:rows])
        on_host = self.in_place and self.device == "cpu"  # values share the buffers' memory
        return OrtKVCache({}, length, values, size, buffers if on_host else None)

    def add_rows(
        self,
        cache: OrtKVCache,
        arrays: dict[str, np.ndarray],
        lengths: np.ndarray,
        length: int,
    ) -> bool:
        """Rows of their own length (`arrays` [n, kv_heads, positions, head_dim], each row's
        `lengths`) written into free slots of an in-place cache, which then spans `length`
        positions: only their positions are copied (it grows at a step that needs more, as
        always). False when it has no free slot or too few positions (the caller rebuilds)."""
        if not cache.buffers:
            return False
        rows, n = _rows(cache), len(lengths)
        if rows + n > _slots(cache) or length >= cache.capacity:
            return False
        for name, array in arrays.items():
            for row, positions in enumerate(lengths):
                cache.buffers[name][rows + row, :, :positions] = array[row, :, :positions]
        self._view(cache, rows + n, length)
        return True

    def keep_rows(
        self,
        cache: OrtKVCache,
        rows: list[int],
        lengths: np.ndarray,
        length: int,
    ) -> bool:
        """Only `rows` (ascending, each with its own length `lengths`) stay in an in-place
        cache, moved down in place over the rows that leave; it then spans `length` positions.
        False where a rebuild is needed (not in place, rows out of order)."""
        if not cache.buffers or rows != sorted(rows):
            return False
        for buffer in cache.buffers.values():
            for row, (source, positions) in enumerate(zip(rows, lengths, strict=True)):
                if source != row:
                    buffer[row, :, :positions] = buffer[source, :, :positions]
        self._view(cache, len(rows), length)
        return True

    def _view(self, cache: OrtKVCache, rows: int, length: int) -> None:
        """Point an in-place cache's values at its buffers' first `rows` rows."""
        cache.values = {name: self._device_value(b[:rows]) for name, b in cache.buffers.items()}
        cache.length = length

    def close(self) -> None:
        """Drop the session (its weights and arena); caches hold their own buffers."""
        self.session = None

    def _device_zeros(self, shape: tuple[int, ...]) -> ort.OrtValue:
        return self._device_value(np.zeros(shape, self.kv_dtype))

    def _device_value(self, array: np.ndarray) -> ort.OrtValue:
        """An OrtValue on the provider's device (on CPU it shares memory with `array`)."""
        return ort.OrtValue.ortvalue_from_numpy(array, self.device, 0)


def _rows(cache: OrtKVCache) -> int:
    return next(iter(cache.values.values())).shape()[0]


def _slots(cache: OrtKVCache) -> int:
    """The rows an in-place cache's buffers have room for."""
    return next(iter(cache.buffers.values())).shape[0]


def _round_up(n: int) -> int:
    return -(-n // GROW_STEP) * GROW_STEP
