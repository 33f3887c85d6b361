"""Where a long prompt's time goes: onnxruntime's per-op profile of a prefill and of decode steps.

The artifact's own backend runs a random prompt in the chunks the engine prefills a prompt in
while nothing else runs (PREFILL_CHUNK_ALONE tokens, the KV cache bound in place), then greedy
decode steps at that context; the profiler's node times are summed per op type, separately for
the two phases. `--batch N` runs N such prompts as one batch
(rows of one length): what a batch of decoding rows costs, op by op, against one row.

    .venv/bin/python benchmarks/profile_ops.py ART [--prompt-len 2048] [--steps 16] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qwen_deploy.generation.engine import PREFILL_CHUNK_ALONE
from qwen_deploy.runtime import onnxruntime_backend


def profile(
    artifact: Path, prompt_len: int, steps: int, threads: int, folder: str, batch: int = 1
) -> dict:
    """{"prefill"|"decode": {"seconds": total, "ops": {op_type: seconds}}} of one run each."""
    plain = onnxruntime_backend.session_options

    def profiled(threads: int | None):
        options = plain(threads)
        options.enable_profiling, options.profile_file_prefix = True, f"{folder}/ort"
        return options

    onnxruntime_backend.session_options = profiled  # the backend builds its session with it
    try:
        backend = onnxruntime_backend.OnnxRuntimeBackend(artifact, threads=threads)
    finally:
        onnxruntime_backend.session_options = plain
    ids = np.random.default_rng(0).integers(0, 150000, (batch, prompt_len))
    cache = backend.new_cache(batch, capacity=prompt_len + steps)
    for start in range(0, prompt_len, PREFILL_CHUNK_ALONE):
        chunk = ids[:, start : start + PREFILL_CHUNK_ALONE]
        end = start + chunk.shape[1]
        mask = np.ones((batch, end), np.int64)
        positions = np.repeat(np.arange(start, end)[None], batch, axis=0)
        logits = backend.forward(chunk, mask, positions, cache, last_only=True)
    for step in range(steps):
        token, end = logits[:, -1:].argmax(-1), prompt_len + step + 1
        mask, positions = np.ones((batch, end), np.int64), np.full((batch, 1), end - 1)
        logits = backend.forward(token, mask, positions, cache, last_only=True)
    events = json.loads(Path(backend.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    chunks = -(-prompt_len // PREFILL_CHUNK_ALONE)
    phases = {"prefill": runs[:chunks], "decode": runs[chunks:]}
    report = {}
    for phase, phase_runs in phases.items():
        begin, end = phase_runs[0]["ts"], phase_runs[-1]["ts"] + phase_runs[-1]["dur"]
        ops: Counter = Counter()
        for e in events:
            node = e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
            # the session's If (runtime/mixed_step.py) spans the nodes of the branch it ran
            if node and e["args"]["op_name"] != "If" and begin <= e["ts"] < end:
                ops[e["args"]["op_name"]] += e["dur"] / 1e6
        seconds = sum(r["dur"] for r in phase_runs) / 1e6
        report[phase] = {
            "seconds": seconds,
            "runs": len(phase_runs),
            "ops": dict(ops.most_common()),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qd-profile-") as folder:
        report = profile(
            args.artifact, args.prompt_len, args.steps, args.threads, folder, args.batch
        )
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for phase, numbers in report.items():
        per_run = numbers["seconds"] / numbers["runs"]
        print(
            f"{phase}: {numbers['seconds']:.2f} s in {numbers['runs']} runs ({per_run:.3f} s each)"
        )
        for op, seconds in list(numbers["ops"].items())[:8]:
            print(f"  {op:28s} {seconds:7.3f} s {seconds / numbers['seconds']:6.1%}")


if __name__ == "__main__":
    main()
