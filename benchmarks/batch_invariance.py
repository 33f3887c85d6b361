"""What batch-invariant decoding costs: the engine with rows of their own length (the default on
gqa artifacts, what `--batch-invariant` requires) against the left-padded layout, on one
artifact, at 1, 4 and 8 concurrent greedy requests of mixed prompt lengths.

Each run submits N requests at once to one engine stepped in this process and reports the
aggregate generated tokens/s (all tokens over the wall time, prefills included), the decode
phase's (the tokens after the last request's first token, over that time) and the median time
to first token. Layouts alternate run by run; medians over --repeats. It also counts, per
layout, the requests whose tokens differ from their solo run (the invariance itself).

    .venv/bin/python benchmarks/batch_invariance.py ARTIFACT [--repeats 3] [--max-tokens 64]
        [--json] [--serve]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    times: list[float] = []  # when each token came
    start = time.perf_counter()
    for question in questions:
        seen: list[int] = []
        tokens.append(seen)

        def emit(delta, seen=seen) -> None:
            now = time.perf_counter() - start
            if not seen:
                firsts.append(now)
            seen.append(delta.token_id)
            times.append(now)

        request = generator.prepare(messages=[{"role": "user", "content": question}], params=params)
        engine.add(request, emit)
    while engine.step():
        pass
    wall = time.perf_counter() - start
    batched = max(firsts)  # from here on every request decodes, none prefills
    decoded = sum(t > batched for t in times)
    return {
        "tok_s": len(times) / wall,
        "decode_tok_s": decoded / (wall - batched) if decoded else float("nan"),
        "ttft": median(firsts),
        "tokens": tokens,
    }


def served_answers(artifact: Path, runs: int, max_tokens: int) -> dict:
    """Through `qwen-deploy serve ARTIFACT --batch-invariant` and the openai client: each question
    alone, then `runs` times all of them at once; greedy chat answers with logprobs (top 5)
    compared exactly (tokens, logprobs and alternatives). The counts of answers unlike solo."""
    from benchmarks.accuracy import Server

    def ask(client, question: str) -> list:
        reply = client.chat.completions.create(
            model="q",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=max_tokens,
            logprobs=True,
            top_logprobs=5,
        )
        return [
            (t.token, t.logprob, [(a.token, a.logprob) for a in t.top_logprobs])
            for t in reply.choices[0].logprobs.content
        ]

    with Server(artifact, "q", ["--batch-invariant"]) as client:
        solo = [ask(client, q) for q in QUESTIONS]
        unlike = []
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            for _ in range(runs):
                together = list(pool.map(lambda q: ask(client, q), QUESTIONS))
                unlike.append(sum(a != b for a, b in zip(solo, together, strict=True)))
    return {"concurrent": len(QUESTIONS), "runs": runs, "answers_unlike_solo_per_run": unlike}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="instead: 8 concurrent chat requests through `serve --batch-invariant`, --repeats "
        "runs, against each alone (tokens and logprobs exactly)",
    )
    args = parser.parse_args()
    if args.serve:
        print(json.dumps(served_answers(args.artifact, args.repeats, args.max_tokens)))
        return
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
                "decode_tok_s": median([r["decode_tok_s"] for r in runs]),
                "ttft_s": median([r["ttft"] for r in runs]),
                "answers_unlike_solo": f"{differ}/{n * len(runs)}",
            }
        )
    if args.json:
        print(json.dumps({"artifact": str(args.artifact), "rows": rows}, indent=2))
        return
    print(
        table(
            ["layout", "concurrent", "tok/s", "decode tok/s", "TTFT s", "answers unlike solo"],
            [
                [
                    r["layout"],
                    str(r["concurrent"]),
                    f"{r['tok_s']:.1f}",
                    f"{r['decode_tok_s']:.1f}",
                    f"{r['ttft_s']:.2f}",
                    r["answers_unlike_solo"],
                ]
                for r in rows
            ],
        )
    )


if __name__ == "__main__":
    main()
