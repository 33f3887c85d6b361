"""Runtime benchmark: generation speed on a Qwen2-0.5B-shaped fp32 artifact vs its peers.

Builds (once, in --workdir) a random checkpoint with Qwen2-0.5B's shapes and its fp32 exports
with the `gqa` and `onnx` attention forms, then runs benchmarks/peers/compare.py on each: time
to first token, batch-1 decode tokens/s, aggregate tokens/s at 4 and 8 concurrent requests, peak
RSS, next to transformers eager `generate` and onnxruntime-genai (its own fp32 CPU export)
measured in the same run (on the first form only: the peers do not depend on our attention form).

    .venv/bin/python benchmarks/runtime.py [--workdir /tmp/qd-runtime] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.peers.compare import compare  # noqa: E402
from qwen_deploy.bench import BenchConfig, format_report  # noqa: E402

CLI = [str(Path(sys.executable).with_name("qwen-deploy"))]  # the console script of this venv


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(workdir: Path, forms: list[str]) -> tuple[Path, dict[str, Path]]:
    """The 0.5B-shaped checkpoint and one fp32 artifact per attention form (reused if present)."""
    checkpoint = workdir / "ckpt"
    if not (checkpoint / "config.json").is_file():
        log(f"writing a random Qwen2-0.5B-shaped checkpoint to {checkpoint}")
        subprocess.run(
            [*CLI, "random-checkpoint", str(checkpoint), "--shape", "0.5b", "--force"], check=True
        )
    artifacts = {}
    for form in forms:
        artifacts[form] = workdir / f"fp32-{form}"
        if not (artifacts[form] / "manifest.json").is_file():
            log(f"exporting it with --attention {form}")
            subprocess.run(
                [
                    *CLI,
                    "export",
                    str(checkpoint),
                    "-o",
                    str(artifacts[form]),
                    "--attention",
                    form,
                    "--force",
                    "--quiet",
                ],
                check=True,
            )
    return checkpoint, artifacts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qd-runtime"))
    parser.add_argument("--forms", default="gqa,onnx", help="attention forms, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    args = parser.parse_args()

    checkpoint, artifacts = prepare(args.workdir, args.forms.split(","))
    config = BenchConfig(args.prompt_len, args.new_tokens, args.repeats, threads=args.threads)
    reports = {}
    for i, (form, artifact) in enumerate(artifacts.items()):
        peers = ("transformers", "onnxruntime-genai") if i == 0 else ()
        reports[form] = compare(
            artifact, checkpoint, config, genai_dir=args.workdir / "genai", peers=peers, log=log
        )
    if args.json:
        print(json.dumps(reports, indent=2))
        return
    for form, report in reports.items():
        print(f"== attention={form} ==\n{format_report(report)}\n")


if __name__ == "__main__":
    main()
