"""Build a TensorRT engine artifact from an ONNX artifact (TensorRT >= 10.14, 10.x and 11.x).

The network is strongly typed: precision comes from the graph (fp16 weights and casts, or Q/DQ
INT8), never from builder flags, which TensorRT 11 removed. Two optimization profiles, because
TensorRT picks kernels for each profile's `opt` shape and one shape cannot serve both phases:
  0 "prefill": seq 1..max_input_len (opt: --opt-input-len), past 0..max_seq_len-1;
  1 "decode":  seq fixed at 1 (GEMV-shaped kernels), past 0..max_seq_len-1 (opt: opt-input-len).
Batch is 1..max_batch in both (opt: --opt-batch). The runtime picks decode when seq == 1.
Everything but the build itself (options, profiles, manifest) is pure and tested without a GPU.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from ..artifact import check_output, copy_side_files, staged_output
from ..contract import BATCH, PAST, TOTAL
from ..contract import SEQUENCE as SEQ
from ..errors import QwenDeployError
from ..manifest import Manifest, producer_record
from ..records import Engine, EngineDevice, EngineLimits
from .preflight import MIN_TRT, check_path, parse_version

PLAN_FILE = "model.plan"
PLUGIN_DIR = "plugins"
INSTALL_HINT = (
    "install TensorRT's Python package from NVIDIA's package index: "
    "pip install --extra-index-url https://pypi.nvidia.com 'tensorrt>=10.14' "
    "(or the qwen-deploy[tensorrt] extra with that index), on a machine with an NVIDIA GPU."
)


@dataclass(frozen=True)
class BuildOptions:
    """CLI options of `qwen-deploy build`; None means 'derive a sensible default'."""

    max_batch: int = 8
    max_input_len: int = 2048
    max_seq_len: int = 4096
    opt_batch: int | None = None
    opt_input_len: int | None = None
    workspace_gb: float | None = None
    timing_cache: Path | None = None
    plugin_libs: tuple[Path, ...] = ()


def resolve_options(options: BuildOptions, manifest: Manifest) -> BuildOptions:
    """Check the options against each other and the model; fill in the opt-shape defaults."""
    o = options
    for name in ("max_batch", "max_input_len", "max_seq_len"):
        if getattr(o, name) < 1:
            raise QwenDeployError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(o, name)}."
            )
    limit = manifest.model.max_position_embeddings
    if o.max_seq_len > limit:
        raise QwenDeployError(
            f"--max-seq-len {o.max_seq_len} exceeds the model's max_position_embeddings "
            f"({limit}): the graph's RoPE table has no positions beyond it."
        )
    if o.max_input_len > o.max_seq_len:
        raise QwenDeployError(
            f"--max-input-len {o.max_input_len} exceeds --max-seq-len {o.max_seq_len}: a prompt "
            "must fit in the context."
        )
    opt_batch = 1 if o.opt_batch is None else o.opt_batch
    opt_input = min(512, o.max_input_len) if o.opt_input_len is None else o.opt_input_len
    if not 1 <= opt_batch <= o.max_batch:
        raise QwenDeployError(
            f"--opt-batch {opt_batch} must be between 1 and --max-batch {o.max_batch}."
        )
    if not 1 <= opt_input <= o.max_input_len:
        raise QwenDeployError(
            f"--opt-input-len {opt_input} must be between 1 and --max-input-len {o.max_input_len}."
        )
    if o.workspace_gb is not None and o.workspace_gb <= 0:
        raise QwenDeployError(f"--workspace-gb must be > 0, got {o.workspace_gb}.")
    for lib in o.plugin_libs:
        if not Path(lib).is_file():
            raise QwenDeployError(f"--plugin-lib {lib} does not exist.")
    names = [Path(lib).name for lib in o.plugin_libs]
    if len(set(names)) != len(names):
        raise QwenDeployError(
            "--plugin-lib files must have distinct file names (they are "
            "copied into the engine artifact side by side)."
        )
    if o.timing_cache is not None and not Path(o.timing_cache).parent.is_dir():
        raise QwenDeployError(f"the folder of --timing-cache {o.timing_cache} does not exist.")
    return replace(o, opt_batch=opt_batch, opt_input_len=opt_input)


def profile_shapes(manifest: Manifest, options: BuildOptions) -> list[dict]:
    """[{"name", "shapes": {input: {"min", "opt", "max"}}}] for prefill and decode.

    Each symbolic dimension of the manifest's inputs gets (min, opt, max); fixed dims pass through.
    """
    o = options
    if o.opt_batch is None or o.opt_input_len is None:
        raise ValueError("resolve_options() first")
    top = o.max_seq_len - 1
    phases = {
        "prefill": {
            BATCH: (1, o.opt_batch, o.max_batch),
            SEQ: (1, o.opt_input_len, o.max_input_len),
            PAST: (0, 0, top),
            TOTAL: (1, o.opt_input_len, o.max_seq_len),
        },
        "decode": {
            BATCH: (1, o.opt_batch, o.max_batch),
            SEQ: (1, 1, 1),
            PAST: (0, min(o.opt_input_len, top), top),
            TOTAL: (1, min(o.opt_input_len + 1, o.max_seq_len), o.max_seq_len),
        },
    }
    profiles = []
    for name, dims in phases.items():
        shapes = {}
        for tensor in manifest.inputs:
            unknown = [d for d in tensor.shape if isinstance(d, str) and d not in dims]
            if unknown:
                raise QwenDeployError(
                    f"input {tensor.name} has dimension {unknown[0]!r}, which the TensorRT "
                    "builder has no range for; re-export the artifact with this qwen-deploy."
                )
            shapes[tensor.name] = {
                key: [dims[d][i] if isinstance(d, str) else d for d in tensor.shape]
                for i, key in enumerate(("min", "opt", "max"))
            }
        profiles.append({"name": name, "shapes": shapes})
    return profiles


def engine_manifest(source: Manifest, engine: Engine) -> Manifest:
    """The engine artifact's manifest: the source contract plus where the plan came from.

    Plugin libraries are listed in engine.plugin_libraries (paths inside the artifact); the
    runtime loads them before deserializing the plan.
    """
    return replace(
        source,
        model_file=PLAN_FILE,
        data_files=[],
        engine=engine,
        producer=producer_record(),
    )


def engine_record(
    trt_version: str,
    device: dict,
    options: BuildOptions,
    profiles: list[dict],
    plugin_files: list[str],
    source: Manifest,
    seconds: float,
) -> Engine:
    """manifest.engine: what the runtime checks before loading and what users need to know."""
    return Engine(
        format="tensorrt",
        plan=PLAN_FILE,
        tensorrt_version=trt_version,
        device=EngineDevice.from_dict(device),
        strongly_typed=True,
        profiles=[{"index": i, **p} for i, p in enumerate(profiles)],
        limits=EngineLimits(options.max_batch, options.max_input_len, options.max_seq_len),
        workspace_bytes=None if options.workspace_gb is None else int(options.workspace_gb * 2**30),
        plugin_libraries=plugin_files,
        source={
            "precision": source.precision,
            "attention": source.attention,
            "quantization": source.quantization_mode,
            "model_file": source.model_file,
        },
        build_seconds=round(seconds, 1),
    )


def import_tensorrt():
    """The tensorrt module, or a clear error naming how to install it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise QwenDeployError(f"TensorRT is not installed here: {INSTALL_HINT}") from None
    if parse_version(trt.__version__) < MIN_TRT:
        raise QwenDeployError(
            f"TensorRT {trt.__version__} is too old: qwen-deploy needs >= "
            f"{MIN_TRT[0]}.{MIN_TRT[1]} (ONNX Attention import, strongly typed networks); "
            f"{INSTALL_HINT}"
        )
    return trt


def _progress_monitor(trt):
    """A tqdm bar per top-level builder phase (TensorRT calls this from several threads)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.lock = threading.Lock()
            self.bars: dict[str, tqdm] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            with self.lock:
                if parent_phase is None:
                    self.bars[phase_name] = tqdm(
                        total=num_steps, desc=phase_name, leave=False, file=sys.stderr
                    )

        def step_complete(self, phase_name, step):
            with self.lock:
                if phase_name in self.bars:
                    self.bars[phase_name].update(1)
            return True

        def phase_finish(self, phase_name):
            with self.lock:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()

    return Monitor()


def _parse(trt, network, logger, model_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(model_path)):
        return
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = e.node_name() if hasattr(e, "node_name") else e.node()
        errors.append(f"node {node}: {e.desc()}")
    raise QwenDeployError(
        "TensorRT's ONNX parser rejected the graph:\n  "
        + "\n  ".join(errors)
        + "\n(`qwen-deploy check-trt` lists the known causes and fixes)"
    )


def _timing_cache(config, path: Path | None):
    data = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False) and data:  # built by another TensorRT or GPU
        print(
            f"warning: timing cache {path} does not match this TensorRT/GPU; starting empty",
            file=sys.stderr,
        )
        config.set_timing_cache(config.create_timing_cache(b""), False)


def _save_timing_cache(config, path: Path) -> None:
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    tmp.replace(path)


def build_engine(
    artifact: str | Path,
    out: str | Path,
    options: BuildOptions,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    """Check, parse and build `artifact`'s ONNX graph into an engine artifact at `out`."""
    from .cuda import CudaDriver

    artifact, out = Path(artifact), Path(out)
    source = Manifest.load(artifact)
    if source.engine is not None or not source.model_file.endswith(".onnx"):
        raise QwenDeployError(
            f"{artifact} is already an engine artifact; build from the ONNX artifact it came from."
        )
    options = resolve_options(options, source)
    profiles = profile_shapes(source, options)
    check_output(out, force, [artifact])
    source.verify(artifact, progress)  # TensorRT would build damaged weights into the engine
    trt = import_tensorrt()
    device = CudaDriver().info()  # clear error when there is no GPU, before TensorRT's own
    logger = trt.Logger(trt.Logger.WARNING)
    registry = trt.get_plugin_registry()
    for lib in options.plugin_libs:  # before parsing: the parser looks plugins up by op name
        if registry.load_library(str(lib)) is None:
            raise QwenDeployError(f"TensorRT could not load plugin library {lib}.")
    plugin_ops = {getattr(c, "name", "") for c in registry.all_creators}
    report = check_path(artifact, trt_version=trt.__version__, plugin_ops=plugin_ops)
    if not report.passed:
        raise QwenDeployError(
            "the graph will not import into TensorRT:\n  "
            + "\n  ".join(f.line() for f in report.errors)
        )
    start = time.time()
    builder = trt.Builder(logger)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    _parse(trt, network, logger, artifact / source.model_file)
    config = builder.create_builder_config()
    if options.workspace_gb is not None:
        config.set_memory_pool_limit(
            trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30)
        )
    for p in profiles:
        profile = builder.create_optimization_profile()
        for name, s in p["shapes"].items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    _timing_cache(config, options.timing_cache)
    monitor = _progress_monitor(trt) if progress else None  # must outlive the build
    if monitor is not None:
        config.progress_monitor = monitor
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise QwenDeployError(
            "TensorRT failed to build the engine (its log above says why; "
            "a larger --workspace-gb or smaller profiles may help)."
        )
    if options.timing_cache is not None:
        _save_timing_cache(config, options.timing_cache)
    with staged_output(out, force, [artifact]) as tmp:
        plan_bytes = memoryview(plan)  # TensorRT's host memory, not copied
        (tmp / PLAN_FILE).write_bytes(plan_bytes)
        plugin_files = []
        if options.plugin_libs:
            (tmp / PLUGIN_DIR).mkdir()
        for lib in options.plugin_libs:
            shutil.copy2(lib, tmp / PLUGIN_DIR / Path(lib).name)
            plugin_files.append(f"{PLUGIN_DIR}/{Path(lib).name}")
        copy_side_files(artifact, tmp, source.tokenizer_files)
        engine = engine_record(
            trt.__version__,
            device.to_dict(),
            options,
            profiles,
            plugin_files,
            source,
            time.time() - start,
        )
        engine = replace(engine, plan_sha256=hashlib.sha256(plan_bytes).hexdigest())
        manifest = engine_manifest(source, engine)
        manifest.save(tmp)
    return manifest
