"""Drive one `quantize`: check inputs, rewrite the graph, measure the quality, write the artifact.

Everything that can be refused (mode, alpha, samples, calibration file, source artifact, existing
output) is checked before any work starts; the output folder appears only when complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from ..artifact import check_output, copy_side_files, staged_output
from ..errors import ArtifactError, QwenDeployError
from ..genai_config import write_genai_config
from ..manifest import Manifest, producer_record
from ..parity.prompts import load_prompts
from .calibration import collect_absmax, load_calibration
from .int8_weight import quantize_weight_only
from .linears import find_linears
from .quality import quality_report
from .rewrite import GraphRewrite
from .smoothing import Smoother
from .smoothquant import quantize_smoothquant
from .store import SourceTensors, TensorWriter, load_graph

MODES = ("int8-weight", "int8-smoothquant")
DATA_FILE = "model.onnx.data"
FLOAT_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def _check_source(source: Path) -> Manifest:
    manifest = Manifest.load(source)
    if manifest.quantization:
        raise ArtifactError(
            f"{source} is already quantized ({manifest.quantization.get('mode')}); quantize the "
            "fp32 (or fp16) artifact it came from."
        )
    if manifest.engine or manifest.precision not in FLOAT_DTYPES:
        raise ArtifactError(
            f"{source} is not an fp32/fp16 ONNX artifact (precision {manifest.precision}); "
            "quantize the output of `qwen-deploy export`."
        )
    return manifest


def quantize_artifact(
    source: str | Path,
    out: str | Path,
    mode: str,
    calibration: str | Path | None = None,
    alpha: float = 0.5,
    samples: int = 128,
    quality_prompts: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
) -> Manifest:
    """Write the INT8 artifact `out` from the fp32/fp16 artifact `source`; returns its manifest.

    The manifest records the scheme under `quantization` and the measured cost against `source`
    under `quality` (on `quality_prompts`, default: the packaged parity prompts).
    """
    source, out = Path(source), Path(out)
    if mode not in MODES:
        raise QwenDeployError(f"mode {mode!r} is not one of {', '.join(MODES)}.")
    if not 0.0 <= alpha <= 1.0:
        raise QwenDeployError(
            f"--alpha must be within [0, 1] (0.5 is the usual choice), got {alpha}."
        )
    prompts, origin = load_calibration(calibration, samples)
    held_out = load_prompts(quality_prompts) if quality_prompts is not None else None
    if out.resolve() == source.resolve():
        raise QwenDeployError("the output folder must differ from the source artifact.")
    check_output(out, force)
    manifest = _check_source(source)
    model = load_graph(source, manifest.model_file)
    find_linears(model.graph)  # refuses graphs without exporter-named linear layers
    dtype = np.dtype(FLOAT_DTYPES[manifest.precision])

    with staged_output(out, force) as tmp:
        writer = TensorWriter(tmp, DATA_FILE)
        rw = GraphRewrite(model, SourceTensors(source, model), writer)
        try:
            details = _quantize(rw, source, mode, dtype, alpha, prompts, progress)
            details["calibration"] = {"source": origin, "samples": len(prompts)}
            rw.finish()
        finally:
            writer.close()
        onnx.save_model(model, str(tmp / manifest.model_file))
        copy_side_files(source, tmp, manifest.tokenizer_files)
        manifest.data_files = [DATA_FILE]
        manifest.quantization = {"mode": mode, **details}
        manifest.producer = producer_record(stage="quantize", **{"from": str(source.resolve())})
        manifest.save(tmp)  # the quality run loads the new artifact through its manifest
        manifest.quality = quality_report(source, tmp, mode, held_out, progress=progress)
        manifest.save(tmp)
        write_genai_config(manifest, tmp)
    return manifest


def _quantize(
    rw: GraphRewrite,
    source: Path,
    mode: str,
    dtype: np.dtype,
    alpha: float,
    prompts: list[dict],
    progress: bool,
) -> dict:
    """Calibrate, smooth, then quantize in the chosen form; returns the scheme details."""
    smoother = Smoother(rw, alpha, dtype)
    smoother.apply(collect_absmax(source, smoother.activations, prompts, progress))
    bar = tqdm(total=len(smoother.linears), desc=mode, unit="layer", disable=not progress)

    def step(name: str) -> None:
        bar.set_postfix_str(name, refresh=False)
        bar.update(1)

    with bar:
        if mode == "int8-weight":
            return quantize_weight_only(smoother, step)
        return quantize_smoothquant(smoother, step)
