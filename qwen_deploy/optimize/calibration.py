"""Activation statistics for SmoothQuant: per-channel absmax at each linear layer's input.

The fp32 graph itself is the instrument: the inputs of the linear layers are added as graph
outputs and the calibration prompts (rendered through the chat template) are run one at a time
as prefills under onnxruntime. The statistic is a running maximum, so the result depends only on
the prompts, not on their order or on threading: the same input gives the same scales.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from tqdm import tqdm

from ..errors import QwenDeployError
from ..manifest import Manifest
from ..parity.prompts import load_prompts
from ..serve.fp32_compute import widen_fp16_model
from .store import load_graph
from .text import prompt_ids

DEFAULT_FILE = "calibration.jsonl"
MAX_TOKENS = 512  # per sample: long enough to see real activation ranges, bounded in memory
SUFFIXES = (".txt", ".jsonl")


def check_calibration_file(path: str | Path | None) -> None:
    """Fail early, before any work, on a --calibration file that cannot be used."""
    if path is None:
        return
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise QwenDeployError(
            f"calibration file {path} must be .txt (one prompt per line) or .jsonl "
            "({'text': ...} or {'messages': [...]} per line)."
        )
    if not path.is_file():
        raise QwenDeployError(f"calibration file {path} does not exist.")


def load_calibration(path: str | Path | None, samples: int) -> tuple[list[dict], str]:
    """The first `samples` prompts of `path` (default: the packaged finance/reasoning set)."""
    if samples < 1:
        raise QwenDeployError(f"--samples must be at least 1, got {samples}.")
    check_calibration_file(path)
    if path is None:
        with resources.as_file(resources.files("qwen_deploy.data") / DEFAULT_FILE) as default:
            prompts = load_prompts(default)
        origin = f"qwen_deploy/data/{DEFAULT_FILE}"
    else:
        prompts = load_prompts(path)
        origin = str(Path(path).resolve())
    return prompts[:samples], origin


@contextlib.contextmanager
def _session(
    folder: Path, manifest: Manifest, tensors: list[str]
) -> Iterator[ort.InferenceSession]:
    """The graph with `tensors` as its outputs, its weights read from where they lie."""
    with tempfile.TemporaryDirectory(prefix="qwen-deploy-calib-") as tmp:
        model_path = folder / manifest.model_file
        if manifest.precision == "fp16":  # CPU runs fp16 graphs with float32 compute
            model_path = widen_fp16_model(model_path, tmp)
        model = load_graph(model_path.parent, model_path.name)
        del model.graph.output[:]  # only the measured tensors: logits and KV outputs go unrun
        model.graph.output.extend(
            helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(model_path.parent)
        )
        yield ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )


def collect_absmax(
    folder: str | Path, tensors: list[str], prompts: list[dict], progress: bool = True
) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each named tensor over every token of every prompt."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    samples = prompt_ids(folder, prompts, MAX_TOKENS)
    spec = manifest.model
    stats: dict[str, np.ndarray] = {}
    with _session(folder, manifest, tensors) as session:
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        past = {i.name: empty for i in session.get_inputs() if i.name.startswith("past_key")}
        for ids in tqdm(samples, desc="calibrate", unit="prompt", disable=not progress):
            n = len(ids)
            feeds = {
                "input_ids": np.array([ids], np.int64),
                "attention_mask": np.ones((1, n), np.int64),
                "position_ids": np.arange(n, dtype=np.int64)[None],
                **past,
            }
            for name, value in zip(tensors, session.run(tensors, feeds), strict=True):
                channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                stats[name] = np.maximum(stats[name], channel_max) if name in stats else channel_max
    return stats
