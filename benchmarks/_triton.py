"""The tritonserver that `make triton-env` installs (nvidia-pytriton's bundled binary and Python
backend), started on free localhost ports: for the Triton tests and benchmarks/serving.py."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TRITON_ENV = Path(os.environ.get("QWEN_DEPLOY_TRITON_ENV", ROOT / ".venv-triton"))
TRITON_PYTHON = TRITON_ENV / "bin" / "python"


def server_dir() -> Path | None:
    found = sorted(TRITON_ENV.glob("lib/python3*/site-packages/pytriton/tritonserver"))
    return found[0] if found else None


def triton_missing() -> str | None:
    server = server_dir()
    if not TRITON_PYTHON.exists() or server is None:
        return f"no Triton env at {TRITON_ENV}: run `make triton-env`"
    if not (server / "backends" / "python" / "triton_python_backend_stub").exists():
        return "the Python backend stub is not installed in the Triton env: run `make triton-env`"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class TritonServer:
    """tritonserver on localhost ports serving the text model of `repo`; with `metrics`, its
    Prometheus metrics (Triton's and the model's own) at `metrics_url`."""

    def __init__(self, repo: Path, model: str, log: Path, metrics: bool = False):
        server = server_dir()
        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        metrics_port = free_port()
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics" if metrics else None
        metrics_options = [
            "--allow-metrics=true",
            "--allow-cpu-metrics=false",
            "--allow-gpu-metrics=false",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={metrics_port}",
        ]
        # the stub embeds the env's Python: its libpython must be on the loader path
        libdir = subprocess.check_output(
            [
                str(TRITON_PYTHON),
                "-c",
                "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))",
            ],
            text=True,
        ).strip()
        env = dict(os.environ, LD_LIBRARY_PATH=f"{libdir}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        self.log = log
        self.process = subprocess.Popen(
            [
                str(server / "bin" / "tritonserver"),
                f"--model-repository={repo}",
                f"--backend-directory={server / 'backends'}",
                "--http-address=127.0.0.1",
                "--grpc-address=127.0.0.1",
                f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}",
                *(metrics_options if metrics else ["--allow-metrics=false"]),
                "--model-control-mode=explicit",
                f"--load-model={model}",
            ],
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self._wait_ready(model)

    def _wait_ready(self, model: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/v2/models/{model}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(
            f"tritonserver not ready in {timeout} s:\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
