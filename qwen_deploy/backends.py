"""The choice of backend for an artifact, above the backends themselves (runtime/ holds the
interface and onnxruntime, tensorrt/ the engine backend): nothing imports in a circle."""

from __future__ import annotations

from pathlib import Path

from .errors import QwenDeployError
from .manifest import Artifact
from .memory import require_session
from .runtime.backend import BACKENDS, Backend
from .runtime.onnxruntime_backend import OnnxRuntimeBackend


def open_backend(
    artifact: str | Path | Artifact,
    provider: str = "cpu",
    threads: int | None = None,
    device_id: int = 0,
    backend: str | None = None,
    max_memory: float | None = None,
) -> Backend:
    """The backend an artifact runs on, from its manifest: TensorRT for an engine artifact
    (`qwen-deploy build`; an NVIDIA GPU, whatever `provider` says), onnxruntime on `provider`
    for an ONNX one. `backend` names one explicitly and is refused when the artifact does not
    hold what it runs. On the CPU an artifact whose weights would not fit in `max_memory` GB
    (default: the memory available) is refused before it loads (memory.py)."""
    artifact = Artifact.open(artifact)
    kind = "onnxruntime" if artifact.manifest.engine is None else "tensorrt"
    if backend is not None and backend not in BACKENDS:
        raise QwenDeployError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend is not None and backend != kind:
        hint = (
            "build an engine artifact from it with `qwen-deploy build ARTIFACT -o ENGINE`"
            if backend == "tensorrt"
            else "give the ONNX artifact it was built from"
        )
        raise QwenDeployError(
            f"{artifact} is {'a TensorRT engine' if kind == 'tensorrt' else 'an ONNX'} artifact, "
            f"which the {backend} backend cannot run: {hint}."
        )
    if kind == "tensorrt":
        from .tensorrt.backend import TensorRTBackend  # CUDA and TensorRT only when needed

        return TensorRTBackend(artifact, device=device_id)
    if provider == "cpu":
        require_session(str(artifact), artifact.manifest, max_memory)
    return OnnxRuntimeBackend(artifact, provider=provider, threads=threads)
