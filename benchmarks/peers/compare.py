"""qwen-deploy and its peers on the same work, each engine in its own process, taking turns.

`qwen-deploy bench`'s measurement and report, with every engine in a benchmarks._common.Worker
(its peak RSS and thread pools are its own) and one run each per repeat, so a shared machine's
changing load hits them alike; qwen-deploy also runs its batches in its turn.

Peers: transformers eager `generate` on the source checkpoint (--reference); onnxruntime-genai on
its own fp32 CPU export of that checkpoint (when the package is installed); llama.cpp
(llama-cpp-python) on each GGUF file given (--llama-gguf); OpenVINO (openvino-genai) on each model
folder given (--openvino, what `optimum-cli export openvino` writes). A peer that cannot run is
listed with the reason. All decode greedily exactly `new_tokens` tokens from the same random
prompt ids.

    .venv/bin/python benchmarks/peers/compare.py ARTIFACT [--reference CKPT] [--genai-dir DIR]
        [--no-genai] [--llama-gguf FILE ...] [--openvino DIR ...] [--prompt-len 128]
        [--new-tokens 64] [--repeats 3] [--batches 4,8] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks._common import Worker, WorkerError  # noqa: E402
from benchmarks.peers.models import (  # noqa: E402
    genai_model,
    gguf_weights,
    llama_cpp_missing,
    openvino_missing,
)
from qwen_deploy.bench import (  # noqa: E402
    OURS,
    BenchConfig,
    EngineResult,
    build_report,
    format_report,
    measure,
)
from qwen_deploy.machine import measured_bandwidth_gbs, this_machine  # noqa: E402
from qwen_deploy.manifest import Manifest  # noqa: E402

RUNNERS = "benchmarks.peers.runners"


def compare(
    artifact: str | Path,
    reference: str | Path | None = None,
    config: BenchConfig | None = None,
    genai_dir: str | Path | None = None,
    peers: Iterable[str] = ("transformers", "onnxruntime-genai"),
    log: Callable[[str], None] = lambda _: None,
    llama_ggufs: Iterable[str | Path] = (),
    openvino_dirs: Iterable[str | Path] = (),
) -> dict:
    """Measure the artifact and its peers; returns qwen_deploy.bench's report with a row and
    ratios for each peer. The bandwidth is probed before and after (their mean), in this
    process, which holds no engine."""
    config = config or BenchConfig()
    config.check()
    manifest = Manifest.load(artifact)
    source = Path(reference) if reference else Path(manifest.source.get("path", ""))
    engines: dict[str, EngineResult] = {OURS: EngineResult()}
    targets = {OURS: ("qwen_deploy.bench:QwenDeployRunner", str(artifact))}
    files = [
        (f"llama.cpp {Path(f).stem}", f, "LlamaCppRunner", llama_cpp_missing, gguf_weights)
        for f in llama_ggufs
    ]
    files += [
        (f"openvino {Path(d).name}", d, "OpenVinoRunner", openvino_missing, None)
        for d in openvino_dirs
    ]
    for name, path, runner, missing, weights in files:
        engines[name] = EngineResult(skipped=missing(Path(path)))
        if engines[name].skipped:
            log(f"skipping {name}: {engines[name].skipped}")
        else:
            targets[name] = (f"{RUNNERS}:{runner}", str(path))
            engines[name].weights = weights(path) if weights else None
    if "transformers" in peers:
        if reference is None:
            engines["transformers"] = EngineResult(skipped="no --reference checkpoint given")
        else:
            engines["transformers"] = EngineResult()
            targets["transformers"] = (f"{RUNNERS}:TransformersRunner", str(reference))
    bandwidth_before = measured_bandwidth_gbs(config.bandwidth_probe_mb)
    with tempfile.TemporaryDirectory(prefix="qd-genai-") as tmp:
        if "onnxruntime-genai" in peers:
            folder = Path(genai_dir) if genai_dir else Path(tmp) / "model"
            reason = genai_model(source, folder, log)
            engines["onnxruntime-genai"] = EngineResult(skipped=reason)
            if reason:
                log(f"skipping onnxruntime-genai: {reason}")
            else:
                targets["onnxruntime-genai"] = (f"{RUNNERS}:GenaiRunner", str(folder))
        speculative = _measure_in_workers(targets, engines, config, log)
    bandwidth = statistics.mean(
        [bandwidth_before, measured_bandwidth_gbs(config.bandwidth_probe_mb)]
    )
    machine = this_machine(config.threads)
    return build_report(artifact, config, engines, speculative, bandwidth, machine)


def _measure_in_workers(
    targets: dict[str, tuple[str, str]],
    engines: dict[str, EngineResult],
    config: BenchConfig,
    log: Callable[[str], None],
) -> dict:
    """Load each engine in its own Worker (a peer that fails to load is skipped with the last
    line of its error), measure them by turns, then stop each for its peak RSS."""
    with contextlib.ExitStack() as stack:
        workers = {}
        for name, (runner, source) in targets.items():
            log(f"loading {name} from {source}")
            try:
                workers[name] = stack.enter_context(Worker(runner, source, config, name=name))
            except WorkerError as e:
                if name == OURS:
                    raise
                engines[name].skipped = f"failed: {str(e).strip().splitlines()[-1]}"
                log(f"skipping {name}: {engines[name].skipped}")
        speculative = measure(workers, engines, config, log)
        for name, worker in workers.items():
            peak = worker.close()
            if name == OURS:  # its single-request peak came before its batches
                engines[name].batch_peak_rss_mb = peak
            else:
                engines[name].peak_rss_mb = peak
    return speculative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument(
        "--reference", type=Path, help="source checkpoint: adds transformers eager generate"
    )
    parser.add_argument(
        "--genai-dir", type=Path, help="keep (or reuse) onnxruntime-genai's export here"
    )
    parser.add_argument("--no-genai", action="store_true", help="skip onnxruntime-genai")
    parser.add_argument(
        "--llama-gguf",
        type=Path,
        action="append",
        default=[],
        help="a GGUF file of the same model: adds llama.cpp (llama-cpp-python); repeatable",
    )
    parser.add_argument(
        "--openvino",
        type=Path,
        action="append",
        default=[],
        help="an OpenVINO model folder of the same model (optimum-cli export openvino): adds "
        "openvino-genai; repeatable",
    )
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--batches",
        default="4,8",
        help="concurrent requests for qwen-deploy's aggregate rows, comma-separated ('' for none)",
    )
    parser.add_argument("--threads", type=int, help="intra-op threads for every engine")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()

    report = compare(
        args.artifact,
        args.reference,
        BenchConfig(
            args.prompt_len,
            args.new_tokens,
            args.repeats,
            batches=tuple(int(b) for b in args.batches.split(",") if b),
            threads=args.threads,
        ),
        genai_dir=args.genai_dir,
        peers=("transformers",) if args.no_genai else ("transformers", "onnxruntime-genai"),
        log=lambda message: print(message, file=sys.stderr, flush=True),
        llama_ggufs=args.llama_gguf,
        openvino_dirs=args.openvino,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))


if __name__ == "__main__":
    main()
