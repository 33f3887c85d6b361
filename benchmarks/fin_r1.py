"""Fin-R1's size end to end on one machine: every command a user runs, its wall time and peak RSS.

A checkpoint with Fin-R1's shapes (Qwen2.5-7B: 28 layers, hidden 3584, 28/4 heads, intermediate
18944, vocab 152064, untied; random bf16 weights written shard by shard, _synthetic.py), or
`--checkpoint` a real one, goes through the CLI as a user would run it:

    export (fp16, gqa) -> quantize (each --modes) -> parity of each artifact
    -> generate 32 tokens -> serve one chat request -> bench (decode at 128 and a 2,048-token
    prompt)

Each command runs in its own process; its peak RSS is the kernel's high-water mark of that
process (wait4's ru_maxrss, memory-mapped weight pages included). A command refused by its memory
estimate (memory.py) is reported with its message: that is the outcome on this machine.

    .venv/bin/python benchmarks/fin_r1.py [--workdir DIR] [--modes int4-weight,int8-weight]
        [--samples 16] [--reuse] [--json]

`--reuse` keeps outputs from an earlier run in the work folder (their stage is marked reused,
no time measured). The work folder needs ~45 GB: checkpoint 15, fp16 15, int8 8, int4 6.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from _common import GB, table

QWEN_DEPLOY = Path(sys.executable).parent / "qwen-deploy"
ROOT = Path(__file__).resolve().parents[1]
CHAT = {"messages": [{"role": "user", "content": "What is a bond's yield to maturity?"}]}


@dataclass
class Stage:
    name: str
    command: str
    wall_s: float | None = None
    peak_rss_gb: float | None = None
    exit_code: int | None = None
    note: str = ""  # reused, or the last line of stderr when it failed
    report: dict | None = None  # the command's --json output, where it has one


def _measure(process: subprocess.Popen, start: float) -> tuple[int, float, float]:
    """Wait for `process`; (exit code, wall seconds, its own peak RSS in GB)."""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024 / GB


def run(name: str, args: list[str], log: Path, json_out: bool = False) -> Stage:
    """One CLI command in its own process, stderr to `log`."""
    stage = Stage(name, "qwen-deploy " + " ".join(args))
    print(f"[{time.strftime('%H:%M:%S')}] {stage.command}", file=sys.stderr, flush=True)
    with log.open("w") as err:
        start = time.perf_counter()
        process = subprocess.Popen(
            [str(QWEN_DEPLOY), *args], stdout=subprocess.PIPE, stderr=err, text=True
        )
        stdout = process.stdout.read()
        stage.exit_code, stage.wall_s, stage.peak_rss_gb = _measure(process, start)
    lines = [x for x in log.read_text().splitlines() if x.strip()]
    if stage.exit_code and lines:
        stage.note = lines[-1][-600:]
    if json_out and stdout.strip():
        try:
            stage.report = json.loads(stdout)
        except json.JSONDecodeError:
            stage.note = stage.note or stdout.strip().splitlines()[-1][-300:]
    return stage


def serve_one_chat(artifact: Path) -> Stage:
    """`serve` (benchmarks/serving.py's Served), one chat request once /health answers, then
    SIGTERM; the server's own peak RSS, read before it stops."""
    from serving import Served

    stage = Stage("serve + 1 chat", f"qwen-deploy serve {artifact}")
    print(f"[{time.strftime('%H:%M:%S')}] {stage.command}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        with Served(str(artifact)) as server:
            ready = time.perf_counter() - start
            body = {"model": "m", "max_tokens": 32, "temperature": 0, **CHAT}
            t = time.perf_counter()
            answer = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1800)
            stage.report = {
                "load_s": ready,
                "request_s": time.perf_counter() - t,
                "status": answer.status_code,
                "completion_tokens": answer.json().get("usage", {}).get("completion_tokens"),
            }
            stage.peak_rss_gb = server.peak_rss_mib() * 2**20 / GB
        stage.exit_code = 0 if server.process.returncode in (0, -signal.SIGTERM) else 1
    except RuntimeError as e:  # it exited before answering /health: its stderr says why
        stage.exit_code, stage.note = 1, str(e).strip().splitlines()[-1][-600:]
    stage.wall_s = time.perf_counter() - start
    return stage


def reused(name: str, output: Path) -> Stage:
    return Stage(name, f"(kept {output})", note="reused")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fin-r1"))
    parser.add_argument("--checkpoint", type=Path, help="A real checkpoint instead of random.")
    parser.add_argument("--modes", default="int4-weight,int8-weight,int8-smoothquant")
    parser.add_argument("--samples", type=int, default=16, help="Calibration prompts.")
    parser.add_argument("--parity-steps", type=int, default=8)
    parser.add_argument(
        "--no-fp16-parity",
        action="store_true",
        help="Skip the fp16 artifact's parity (on a CPU it widens every weight at every step).",
    )
    parser.add_argument("--reuse", action="store_true", help="Keep outputs of an earlier run.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    stages: list[Stage] = []
    modes = [m for m in args.modes.split(",") if m]

    checkpoint = args.checkpoint or work / "checkpoint"
    if args.checkpoint is None:
        if args.reuse and (checkpoint / "config.json").is_file():
            stages.append(reused("random checkpoint", checkpoint))
        else:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import _synthetic

            start = time.perf_counter()
            _synthetic.write_random_checkpoint(checkpoint)
            stages.append(Stage("random checkpoint", "_synthetic.py", time.perf_counter() - start))

    def step(name: str, output: Path | None, cmd: list[str], json_out: bool = False) -> Stage:
        if output is not None and args.reuse and (output / "manifest.json").is_file():
            stage = reused(name, output)
        else:
            stage = run(name, cmd, logs / f"{name.replace(' ', '_')}.log", json_out)
        stages.append(stage)
        return stage

    fp16 = work / "fp16"
    step(
        "export fp16",
        fp16,
        [
            "export",
            str(checkpoint),
            "-o",
            str(fp16),
            "--precision",
            "fp16",
            "--attention",
            "gqa",
            "--quiet",
            "--force",
        ],
    )
    quantized = {}
    for mode in modes:
        out = work / mode
        step(
            f"quantize {mode}",
            out,
            [
                "quantize",
                str(fp16),
                "-o",
                str(out),
                "--mode",
                mode,
                "--samples",
                str(args.samples),
                "--quiet",
                "--json",
                "--force",
            ],
            json_out=True,
        )
        if (out / "manifest.json").is_file():
            quantized[mode] = out
    checked = quantized if args.no_fp16_parity else {"fp16": fp16, **quantized}
    for mode, out in checked.items():
        step(
            f"parity {mode}",
            None,
            [
                "parity",
                str(out),
                "--reference",
                str(checkpoint),
                "--steps",
                str(args.parity_steps),
                "--quiet",
                "--json",
                "-",
            ],
            json_out=True,
        )
    runner = quantized.get("int4-weight") or next(iter(quantized.values()), fp16)
    step(
        "generate 32 tokens",
        None,
        [
            "generate",
            str(runner),
            CHAT["messages"][0]["content"],
            "--max-tokens",
            "32",
            "--temperature",
            "0",
            "--json",
        ],
        json_out=True,
    )
    stages.append(serve_one_chat(runner))
    for length, new in ((128, 32), (2048, 8)):
        step(
            f"bench {length}",
            None,
            [
                "bench",
                str(runner),
                "--prompt-len",
                str(length),
                "--new-tokens",
                str(new),
                "--repeats",
                "1",
                "--batches",
                "",
                "--json",
            ],
            json_out=True,
        )
    result = {
        "checkpoint": str(checkpoint),
        "artifact_run": str(runner),
        "stages": [asdict(s) for s in stages],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(stages))
    return 0 if all(s.exit_code in (0, None) for s in stages) else 1


def _detail(stage: Stage) -> str:
    report = stage.report or {}
    if stage.name.startswith("quantize") and "top1" in report:
        verdict = "pass" if report.get("passed") else "FAIL"
        ppl = report["perplexity"]["relative"]
        return f"gate {verdict}: top-1 {report['top1']:.3f}, perplexity {ppl:+.2%}"
    if stage.name.startswith("parity") and "summary" in report:
        verdict = "PASS" if report["passed"] else "FAIL"
        return (
            f"{verdict} ({report['preset']}, reference {report['reference_load']}): "
            f"top-1 {report['summary']['top1']:.3f}"
        )
    if stage.name.startswith("bench") and "engines" in report:
        ours = next(iter(report["engines"].values()))
        roof = report["roofline_tok_s"]["at_measured_gemv_bandwidth"]
        return (
            f"TTFT {ours['ttft_s']:.2f} s, decode {ours['decode_tok_s']:.2f} tok/s "
            f"({ours['decode_tok_s'] / roof:.0%} of the roofline at "
            f"{report['measured_gemv_bandwidth_gbs']:.0f} GB/s)"
        )
    if stage.name.startswith("serve") and report:
        return (
            f"loaded in {report['load_s']:.0f} s, answered {report['status']} in "
            f"{report['request_s']:.1f} s"
        )
    if stage.name.startswith("generate") and "completion_tokens" in report:
        return f"{report['completion_tokens']} tokens, finish {report['finish_reason']}"
    return ""


def format_table(stages: list[Stage]) -> str:
    rows = [
        [
            s.name,
            "" if s.wall_s is None else f"{s.wall_s:.0f}",
            "" if s.peak_rss_gb is None else f"{s.peak_rss_gb:.1f}",
            "" if s.exit_code is None else str(s.exit_code),
            _detail(s) or s.note,
        ]
        for s in stages
    ]
    return table(["stage", "wall s", "peak RSS GB", "exit", "result"], rows)


if __name__ == "__main__":
    sys.exit(main())
