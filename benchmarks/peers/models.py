"""What each peer runs on, and why it cannot run: install hints, the GGUF file's weights,
onnxruntime-genai's own export of the checkpoint."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

LLAMA_CPP_BUILD = (
    "llama-cpp-python is not installed; build it (8-11 minutes) with "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
    "-DGGML_AVX512_VBMI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    '-DGGML_AMX_BF16=OFF" pip install llama-cpp-python, turning on only what /proc/cpuinfo '
    "lists (a native build here dies with an illegal instruction: it emits AMX, and VBMI or "
    "AVX-VNNI where a VM hides them)"
)
OPENVINO_INSTALL = (
    "openvino-genai is not installed (pip install 'qwen-deploy[openvino]'); export the model "
    "with optimum-cli export openvino --weight-format int4 in a separate environment "
    "(optimum-intel pulls a CUDA torch and pins transformers)"
)


def gguf_weights(gguf: str | Path) -> dict | None:
    """Bytes of the tensors a llama.cpp decode step reads (all but the embedding table, unless
    the LM head is tied to it) and the count of weight matrices of each type; None without the
    `gguf` package or a readable file. The file type's name alone misleads: a "Q4_K_M" file of
    a model whose rows are not a multiple of 256 (Qwen2.5-0.5B: 896) stores those matrices in
    llama.cpp's fallback type, Q5_0 (5.5 bits per weight)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        tensors = GGUFReader(gguf).tensors
    except (ValueError, IndexError, OSError):  # unreadable: llama.cpp's own load says why
        return None
    tied = not any(t.name == "output.weight" for t in tensors)
    read = [t for t in tensors if t.name != "token_embd.weight" or tied]
    # weight matrices only: norms and biases are F32 vectors
    types = Counter(t.tensor_type.name for t in read if len(t.shape) > 1)
    return {"bytes_per_token": sum(int(t.n_bytes) for t in read), "types": dict(types)}


def genai_model(checkpoint: Path, folder: Path, log: Callable[[str], None]) -> str | None:
    """onnxruntime-genai's own fp32 CPU export of `checkpoint` in `folder` (reused if present).

    Returns the reason it is unavailable, or None.
    """
    if not (checkpoint / "config.json").is_file():
        return f"source checkpoint {checkpoint} not found; pass --reference"
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install 'qwen-deploy[bench]')"
    if (folder / "genai_config.json").is_file():
        return None
    log(f"building the onnxruntime-genai model of {checkpoint} (fp32, cpu) in {folder}")
    with tempfile.TemporaryDirectory(prefix="qd-genai-cache-") as cache:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(checkpoint),
                "-o",
                str(folder),
                "-p",
                "fp32",
                "-e",
                "cpu",
                "-c",
                cache,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0 or not (folder / "genai_config.json").is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"its model builder failed: {last}"
    return None


def llama_cpp_missing(gguf: Path) -> str | None:
    """Why llama.cpp cannot run `gguf` (None when it can)."""
    if not gguf.is_file():
        return f"GGUF file {gguf} not found"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return LLAMA_CPP_BUILD
    return None


def openvino_missing(folder: Path) -> str | None:
    """Why OpenVINO cannot run `folder` (None when it can)."""
    if not (folder / "openvino_model.xml").is_file():
        return f"{folder} holds no openvino_model.xml (optimum-cli export openvino writes one)"
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return OPENVINO_INSTALL
    return None
