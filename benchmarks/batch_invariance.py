"""What batch-invariant decoding costs: the engine with rows of their own length (the default on
gqa artifacts, what `--batch-invariant` requires) against the left-padded layout, on one
artifact, at 1, 4 and 8 concurrent greedy requests of mixed prompt lengths.

Each run submits N requests at once to one engine stepped in this process and reports the
aggregate generated tokens/s (all tokens over the wall time) and the median time to first
token. Layouts alternate run by run; medians over --repeats. It also counts, per layout, the
requests whose tokens differ from their solo run (the invariance itself).

    .venv/bin/python benchmarks/batch_invariance.py ARTIFACT [--repeats 3] [--max-tokens 48]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import median, table
from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.sampling import SamplingParams

CODE = "def merge(a, b):\n    out = []\n    while a and b:\n        out.append(a.pop(0))\n"
QUESTIONS = [  # ~20 to ~600 prompt tokens
    "Write a Python one-liner that sums a list.",
    f"Explain what this code does and fix its bug:\n```python\n{CODE * 24}```",
    "What does the `yield` keyword do in Python?",
    "用Python写一个计算阶乘的函数。",
    f"Review this function:\n```python\n{CODE * 6}```",
    "How do I reverse a linked list in C?",
    "Write a SQL query that counts the rows of a table named users.",
    f"Add type hints to:\n```python\n{CODE * 12}```",
]
LAYOUTS = {"own-length (invariant)": True, "left-padded": False}


def run(generator: Generator, questions: list[str], invariant: bool, max_tokens: int) -> dict:
    """The questions submitted together: aggregate tokens/s, median TTFT, each answer's tokens."""
    engine = BatchEngine(generator, max_batch=len(questions), batch_invariant=invariant)
    params = SamplingParams.from_defaults(
        generator.manifest, temperature=0, max_tokens=max_tokens, stop_token_ids=[]
    )
    firsts: list[float] = []
    tokens: list[list[int]] = []
    start = time.perf_counter()
    for question in questions:
        seen: list[int] = []
        tokens.append(seen)

        def emit(delta, seen=seen) -> None:
            if not seen:
                firsts.append(time.perf_counter() - start)
            seen.append(delta.token_id)

        request = generator.prepare(messages=[{"role": "user", "content": question}], params=params)
        engine.add(request, emit)
    while engine.step():
        pass
    wall = time.perf_counter() - start
    return {"tok_s": sum(map(len, tokens)) / wall, "ttft": median(firsts), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    generator = Generator(args.artifact, threads=args.threads)
    # each question alone: the answers batching must not change
    solo = {q: run(generator, [q], True, args.max_tokens)["tokens"][0] for q in QUESTIONS}
    results: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.repeats):
        for n in (1, 4, 8):
            for name, invariant in LAYOUTS.items():
                results.setdefault((name, n), []).append(
                    run(generator, QUESTIONS[:n], invariant, args.max_tokens)
                )
    rows = []
    for (name, n), runs in results.items():
        differ = sum(
            got != solo[q] for r in runs for q, got in zip(QUESTIONS[:n], r["tokens"], strict=True)
        )
        rows.append(
            {
                "layout": name,
                "concurrent": n,
                "tok_s": median([r["tok_s"] for r in runs]),
                "ttft_s": median([r["ttft"] for r in runs]),
                "answers_unlike_solo": f"{differ}/{n * len(runs)}",
            }
        )
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), "rows": rows}, indent=2))
        return
    print(
        table(
            ["layout", "concurrent", "tok/s", "TTFT s", "answers unlike solo"],
            [
                [
                    r["layout"],
                    str(r["concurrent"]),
                    f"{r['tok_s']:.1f}",
                    f"{r['ttft_s']:.2f}",
                    r["answers_unlike_solo"],
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
