"""lm-eval through `qwen-deploy serve` against lm-eval's own transformers backend, same checkpoint.

Runs lm-eval (its own venv, `make lmeval-env`) twice on local task files (lm_eval_tasks/: a
multiple-choice task and a rolling-perplexity task, small jsonl datasets; no hub, offline):

1. `local-completions` against `qwen-deploy serve ARTIFACT`, with `--batch_size` (4 by default:
   lists of prompts per /v1/completions request) and no `tokenizer=` argument: lm-eval finds
   the server's /tokenizer_info and tokenizes through /tokenize (its remote tokenizer).
2. `hf` on the checkpoint the artifact was exported from (fp32, CPU), same batch size.

It prints both metric tables, each metric's difference, and the largest difference between the
two backends' per-request log-likelihoods (from lm-eval's logged samples); exit status 1 when a
metric differs by more than --tolerance (1e-3).

    make lmeval-env
    .venv/bin/python benchmarks/lm_eval.py ARTIFACT --checkpoint CKPT [--batch-size 4]
        [--limit N] [--tolerance 1e-3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving import Served  # noqa: E402

LM_EVAL = ROOT / ".venv-lmeval" / "bin" / "lm_eval"
TASKS_DIR = ROOT / "benchmarks" / "lm_eval_tasks"  # its YAMLs name their data from ROOT
TASKS = ("qd_python_mc", "qd_code_ppl")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
METRIC_SKIP = ("alias", "sample_len")  # not metrics


def run_lm_eval(
    model: str,
    model_args: str,
    out: Path,
    batch_size: int,
    limit: int | None,
    extra: tuple[str, ...] = (),
) -> dict:
    """One lm-eval run (from ROOT, offline) into `out`: {"results": ..., "samples": {task: [...]},
    "seconds": wall time}."""
    command = [
        str(LM_EVAL),
        "run",
        "--model",
        model,
        "--model_args",
        model_args,
        "--tasks",
        ",".join(TASKS),
        "--include_path",
        str(TASKS_DIR),
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(out),
        "--log_samples",
        *extra,
    ]
    if limit is not None:
        command += ["--limit", str(limit)]
    print("$ " + " ".join(command), file=sys.stderr)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env={**os.environ, **OFFLINE}, check=True)
    seconds = time.perf_counter() - start
    [results_file] = sorted(out.rglob("results_*.json"))[-1:]
    samples = {}
    for task in TASKS:
        [samples_file] = sorted(results_file.parent.glob(f"samples_{task}_*.jsonl"))[-1:]
        samples[task] = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return {
        "results": json.loads(results_file.read_text())["results"],
        "samples": samples,
        "seconds": seconds,
    }


def metrics(results: dict) -> dict[tuple[str, str], float]:
    """{(task, "acc,none"): value}: the numbers lm-eval reports (stderr entries left out)."""
    return {
        (task, name): float(value)
        for task, values in results.items()
        for name, value in values.items()
        if name not in METRIC_SKIP and "stderr" not in name and isinstance(value, (int, float))
    }


def loglikelihoods(samples: dict[str, list[dict]]) -> dict[tuple, float]:
    """{(task, doc_id, request index): log-likelihood} of every request lm-eval sent."""
    out = {}
    for task, rows in samples.items():
        for row in rows:
            for i, resp in enumerate(row["resps"]):
                value = resp[0][0] if isinstance(resp[0], list) else resp[0]
                out[(task, row["doc_id"], i)] = float(value)
    return out


def compare(served: dict, reference: dict) -> dict:
    a, b = metrics(served["results"]), metrics(reference["results"])
    rows = [
        {
            "task": task,
            "metric": name,
            "served": a[task, name],
            "hf": b[task, name],
            "diff": abs(a[task, name] - b[task, name]),
        }
        for task, name in sorted(a.keys() & b.keys())
    ]
    la, lb = loglikelihoods(served["samples"]), loglikelihoods(reference["samples"])
    common = la.keys() & lb.keys()
    return {
        "metrics": rows,
        "max_metric_diff": max((r["diff"] for r in rows), default=math.nan),
        "requests": len(common),
        "requests_missing": len(la.keys() ^ lb.keys()),
        "max_loglikelihood_diff": max((abs(la[k] - lb[k]) for k in common), default=math.nan),
        "seconds": {"served": served["seconds"], "hf": reference["seconds"]},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", help="an artifact exported from --checkpoint")
    parser.add_argument("--checkpoint", required=True, help="the Hugging Face checkpoint folder")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--limit", type=int, default=None, help="documents per task")
    parser.add_argument("--tolerance", type=float, default=1e-3)
    parser.add_argument("--json", action="store_true", help="the comparison as JSON on stdout")
    args = parser.parse_args()
    if not LM_EVAL.is_file():
        sys.exit(f"{LM_EVAL} is missing: run `make lmeval-env` first.")

    with tempfile.TemporaryDirectory(prefix="qd-lm-eval-") as tmp:
        with Served(args.artifact, "--max-batch", str(max(args.batch_size, 1))) as served:
            # no tokenizer=: lm-eval detects /tokenizer_info and tokenizes through the server
            model_args = f"model=m,base_url={served.url}/v1/completions,max_retries=1"
            ours = run_lm_eval(
                "local-completions", model_args, Path(tmp) / "served", args.batch_size, args.limit
            )
        theirs = run_lm_eval(
            "hf",
            f"pretrained={args.checkpoint},dtype=float32",
            Path(tmp) / "hf",
            args.batch_size,
            args.limit,
            ("--device", "cpu"),
        )
    report = compare(ours, theirs)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"\nlm-eval, batch size {args.batch_size}: qwen-deploy serve (local-completions, "
            "remote tokenizer) vs transformers (hf), same checkpoint"
        )
        print(f"{'task':<14} {'metric':<24} {'serve':>12} {'hf':>12} {'|diff|':>10}")
        for r in report["metrics"]:
            print(
                f"{r['task']:<14} {r['metric']:<24} {r['served']:>12.6f} {r['hf']:>12.6f} "
                f"{r['diff']:>10.2e}"
            )
        print(
            f"max metric difference {report['max_metric_diff']:.2e} (tolerance "
            f"{args.tolerance:g}); per-request log-likelihoods: {report['requests']} compared, "
            f"max difference {report['max_loglikelihood_diff']:.2e}; wall time serve "
            f"{report['seconds']['served']:.0f} s, hf {report['seconds']['hf']:.0f} s"
        )
    ok = report["max_metric_diff"] <= args.tolerance and not report["requests_missing"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
