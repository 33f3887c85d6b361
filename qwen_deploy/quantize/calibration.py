"""Activation statistics for SmoothQuant: per-channel absmax at each linear layer's input, and
sampled rows of those inputs for the per-layer searches (search.py).

The fp32 graph itself is the instrument: the inputs of the linear layers are added as graph
outputs and the calibration prompts (rendered through the chat template) are run one at a time
as prefills under onnxruntime. The absmax is a running maximum, so it depends only on the prompts,
not on their order or on threading; the rows are every token of evenly spaced prompts (about
SAMPLE_TOKENS in all), in prompt order: the same input gives the same scales and choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from tqdm import tqdm

from ..contract import is_past
from ..errors import QwenDeployError
from ..manifest import Manifest
from ..parity.prompts import load_prompts
from ..runtime.fp32_compute import Graph, fp32_compute
from .store import load_graph
from .text import prompt_ids

DEFAULT_FILE = "calibration.jsonl"
MAX_TOKENS = 512  # per sample: long enough to see real activation ranges, bounded in memory
SAMPLE_TOKENS = 1024  # rows kept for the searches (0.5B: 0.7 GB; 4x more moved no alpha by >0.1)
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


def _session(folder: Path, manifest: Manifest, tensors: list[str]) -> ort.InferenceSession:
    """The graph with `tensors` as its outputs, its weights read from where they lie (an fp16
    graph with float32 compute, as the CPU runs it)."""
    model_path = folder / manifest.model_file
    if manifest.precision == "fp16":
        loadable = fp32_compute(model_path)
    else:
        loadable = Graph(load_graph(folder, manifest.model_file), folder)
    graph = loadable.model.graph
    del graph.output[:]  # only the measured tensors: logits and KV outputs go unrun
    graph.output.extend(
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors
    )
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return loadable.session(options, ["CPUExecutionProvider"])


@dataclass
class Activations:
    """What calibration measured at each tensor: absmax per channel over every token; the rows
    [tokens, channels] of the sampled prompts; and the absmax of the other prompts alone, which
    lets a search judge a choice on rows that did not set its scales (as at run time)."""

    absmax: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    unsampled_absmax: dict[str, np.ndarray] = field(default_factory=dict)


def _running_max(stats: dict[str, np.ndarray], name: str, value: np.ndarray) -> None:
    previous = stats.get(name)
    stats[name] = value if previous is None else np.maximum(previous, value)


def collect_activations(
    folder: str | Path,
    tensors: list[str],
    prompts: list[dict],
    progress: bool = True,
    sample_tokens: int = SAMPLE_TOKENS,
) -> Activations:
    """Absmax per last-axis channel of each named tensor over every token of every prompt, and
    the rows of every k-th prompt, k chosen to keep about `sample_tokens` rows (0: none)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    samples = prompt_ids(folder, prompts, MAX_TOKENS)
    every = 0
    if sample_tokens:
        every = min(len(samples), max(1, round(sum(map(len, samples)) / sample_tokens)))
    spec = manifest.model
    found = Activations()
    rows: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    session = _session(folder, manifest, tensors)
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
    past = {i.name: empty for i in session.get_inputs() if is_past(i.name)}
    for n, ids in enumerate(tqdm(samples, desc="calibrate", unit="prompt", disable=not progress)):
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None],
            **past,
        }
        sampled = every > 0 and n % every == every - 1
        for name, value in zip(tensors, session.run(tensors, feeds), strict=True):
            value = value.reshape(-1, value.shape[-1])
            channel_max = np.abs(value).max(axis=0)
            _running_max(found.absmax, name, channel_max)
            if sampled:
                rows[name].append(value)
            else:
                _running_max(found.unsampled_absmax, name, channel_max)
    found.rows = {name: np.concatenate(r) for name, r in rows.items() if r}
    return found
