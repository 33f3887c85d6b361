"""What a newcomer's prefill chunk costs the running rows, on one artifact in-process: the decode
step alone, the step followed by the chunk as a forward of its own, and both as one mixed step
(runtime/mixed_step.py), by running rows and chunk length. Every variant runs on the same caches,
alternated round by round; the mixed step's logits are compared with the separate forwards' first
(max |difference|: 0 when bit for bit). The ratio to the decode step is what a streaming client's
gap grows by while a prompt is prefilled beside it (`serve --prefill-chunk`).

    .venv/bin/python benchmarks/mixed_step.py ARTIFACT [--rows 1 4] [--chunks 4 8 16 32 64]
        [--context 256] [--rounds 7] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import median, table
from qwen_deploy.runtime.decode import Batch
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend


def _row(backend: OnnxRuntimeBackend, ids: np.ndarray, capacity: int) -> Batch:
    batch = Batch(backend, 1, capacity, own_lengths=True)
    batch.extend(ids[None], chunk=256)
    return batch


class Setup:
    """`rows` running rows of `context` tokens and a newcomer with `context` tokens cached."""

    def __init__(self, backend: OnnxRuntimeBackend, rows: int, context: int, capacity: int):
        rng = np.random.default_rng(rows)
        self.backend, self.capacity = backend, capacity
        self.prompts = [rng.integers(100, 20_000, context) for _ in range(rows + 1)]
        self.arrays = []
        for prompt in self.prompts:
            batch = _row(backend, prompt, capacity)  # alive while its buffers are copied
            self.arrays.append({k: v.copy() for k, v in backend.cache_arrays(batch.cache).items()})
        self.context = context

    def fresh(self) -> tuple[Batch, Batch]:
        """The running batch and the newcomer, caches as after their prefills."""
        batches = [
            Batch.resume(self.backend, arrays, self.capacity, own_lengths=True)
            for arrays in self.arrays
        ]
        running = batches[0]
        for other in batches[1:-1]:
            running.merge(other, self.capacity)
        return running, batches[-1]


def measure(backend: OnnxRuntimeBackend, rows: int, chunks: list[int], context: int, rounds: int):
    setup = Setup(backend, rows, context, context + max(chunks) + 64)
    tokens = list(range(1, rows + 1))
    results = []
    for chunk in chunks:
        ids = np.random.default_rng(chunk).integers(100, 20_000, (1, chunk))
        running, newcomer = setup.fresh()
        alone = running.step(tokens), newcomer.extend(ids, last_only=True)[0, -1]
        running, newcomer = setup.fresh()
        mixed = running.step_with_chunk(tokens, newcomer, ids)
        difference = max(float(np.abs(a - m).max()) for a, m in zip(alone, mixed, strict=True))
        times: dict[str, list[float]] = {"decode": [], "separate": [], "mixed": []}
        for _ in range(rounds):
            for name in times:
                running, newcomer = setup.fresh()
                start = time.perf_counter()
                if name == "mixed":
                    running.step_with_chunk(tokens, newcomer, ids)
                else:
                    running.step(tokens)
                    if name == "separate":
                        newcomer.extend(ids, last_only=True)
                times[name].append(time.perf_counter() - start)
        ms = {name: 1000 * median(values) for name, values in times.items()}
        results.append(
            {
                "rows": rows,
                "chunk": chunk,
                **{f"{name}_ms": value for name, value in ms.items()},
                "separate_over_decode": ms["separate"] / ms["decode"],
                "mixed_over_decode": ms["mixed"] / ms["decode"],
                "max_difference": difference,
            }
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--context", type=int, default=256, help="tokens each row has cached")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    backend = OnnxRuntimeBackend(args.artifact, threads=args.threads)
    if not backend.capabilities.mixed_steps:
        sys.exit(f"error: {args.artifact} has no mixed steps (a gqa artifact on the CPU has them)")
    results = [
        r
        for rows in args.rows
        for r in measure(backend, rows, args.chunks, args.context, args.rounds)
    ]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    headers = [
        "rows",
        "chunk",
        "decode ms",
        "+ chunk apart",
        "mixed",
        "apart/decode",
        "mixed/decode",
        "max |diff|",
    ]
    print(
        table(
            headers,
            [
                [
                    str(r["rows"]),
                    str(r["chunk"]),
                    f"{r['decode_ms']:.1f}",
                    f"{r['separate_ms']:.1f}",
                    f"{r['mixed_ms']:.1f}",
                    f"{r['separate_over_decode']:.2f}x",
                    f"{r['mixed_over_decode']:.2f}x",
                    f"{r['max_difference']:.3g}",
                ]
                for r in results
            ],
        )
    )


if __name__ == "__main__":
    main()
