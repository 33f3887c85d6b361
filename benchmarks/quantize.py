"""INT8 benchmark: size and CPU decode speed of quantized artifacts against their fp32 source.

A Qwen2-0.5B-shaped random checkpoint is exported (fp32, --attention gqa), quantized with
`qwen-deploy quantize`, and each artifact decodes the same prompt with a plain onnxruntime loop
(batch 1, KV cache fed back, greedy). Sessions stay loaded and run in interleaved rounds, so a
burst of load from other processes hits one round, not one artifact: tok/s is the median (and
best) over rounds, the speedup the median of the per-round ratios to fp32.

    .venv/bin/python benchmarks/quantize.py [--candidates] [--workdir DIR] [--json]

--candidates adds the other INT8 forms onnxruntime offers for the linear layers (same weights,
no smoothing, fp32 embedding), to show why int8-weight uses the form it does:
MatMulNBits (bits=8) at other block sizes / accuracy levels, DequantizeLinear + MatMul (per
channel), DynamicQuantizeMatMul (per-channel weights, dynamic per-tensor activations).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from _common import folder_bytes, median, table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen_deploy.contract import MS_DOMAIN
from qwen_deploy.manifest import Manifest
from qwen_deploy.quantize.linears import find_linears
from qwen_deploy.quantize.rewrite import GraphRewrite
from qwen_deploy.quantize.smoothquant import dequantized_weight, quantize_per_channel
from qwen_deploy.quantize.store import SourceTensors, TensorWriter, load_graph
from qwen_deploy.quantize.weight_only import matmul_nbits

CLI = [str(Path(sys.executable).with_name("qwen-deploy"))]
CANDIDATES = {
    # name: (form, block size, accuracy level)
    "MatMulNBits b32 acc4": ("nbits", 32, 4),
    "MatMulNBits b128 acc4": ("nbits", 128, 4),
    "MatMulNBits b256 acc4": ("nbits", 256, 4),
    "MatMulNBits b64 acc0": ("nbits", 64, 0),
    "DequantizeLinear+MatMul": ("dq", None, None),
    "DynamicQuantizeMatMul": ("dqmm", None, None),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(*args: str) -> None:
    """One qwen-deploy command; its stdout (reports) is not part of this script's output."""
    subprocess.run([*CLI, *args], check=True, stdout=subprocess.DEVNULL)


def build_candidate(
    source: Path, out: Path, form: str, block: int | None, level: int | None
) -> None:
    """One alternative INT8 form of every linear layer (a benchmark-only graph rewrite)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    manifest = Manifest.load(source)
    model = load_graph(source, manifest.model_file)
    writer = TensorWriter(out, "model.onnx.data")
    rw = GraphRewrite(model, SourceTensors(source, model), writer)
    for lin in find_linears(model.graph):
        weight = np.asarray(rw.source.array(lin.weight), np.float32)
        if form == "nbits":
            node = matmul_nbits(rw, lin, lin.input, weight, np.float32, block, level)
            rw.replace(lin.matmul, [node])
        elif form == "dq":
            dq = dequantized_weight(rw, lin, weight)
            matmul = onnx.helper.make_node(
                "MatMul", [lin.input, dq.output[0]], list(lin.matmul.output)
            )
            rw.replace(lin.matmul, [dq, matmul])
        else:
            name = lin.weight.removesuffix(".weight")
            codes, scales = quantize_per_channel(weight)
            q, s = rw.initializer(name + ".q", codes), rw.initializer(name + ".s", scales)
            zero = rw.initializer(name + ".z", np.zeros(weight.shape[1], np.int8))
            inputs = [lin.input, q, s, zero, *([lin.bias] if lin.bias else [])]
            if lin.bias:
                rw.replace(lin.bias_add, [])
            rw.replace(
                lin.matmul,
                [
                    rw.node(
                        "DynamicQuantizeMatMul",
                        inputs,
                        name,
                        outputs=[lin.output],
                        domain=MS_DOMAIN,
                    )
                ],
            )
    rw.finish()
    writer.close()
    onnx.save_model(model, str(out / manifest.model_file))
    Manifest.read(source).save(out)


class Decoder:
    """A plain onnxruntime decode loop over one artifact (batch 1, KV cache fed back)."""

    def __init__(self, folder: Path, threads: int | None):
        manifest = Manifest.load(folder)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(folder / manifest.model_file), options, providers=["CPUExecutionProvider"]
        )
        spec = manifest.model
        self.empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.layers = spec.num_layers

    def decode(self, prompt: np.ndarray, new_tokens: int) -> float:
        """Prefill `prompt`, then time `new_tokens` greedy steps; returns tokens per second."""
        past = {
            f"past_key_values.{i}.{p}": self.empty
            for i in range(self.layers)
            for p in ("key", "value")
        }
        ids, start, elapsed = prompt[None], 0, 0.0
        for step in range(new_tokens + 1):
            if step == 1:
                elapsed = time.perf_counter()
            total = start + ids.shape[1]
            feeds = {
                "input_ids": ids,
                "attention_mask": np.ones((1, total), np.int64),
                "position_ids": np.arange(start, total, dtype=np.int64)[None],
                **past,
            }
            out = dict(zip(self.outputs, self.session.run(None, feeds), strict=True))
            past = {k: out[k.replace("past_key_values.", "present.")] for k in past}
            ids, start = np.array([[int(out["logits"][0, -1].argmax())]]), total
        return new_tokens / (time.perf_counter() - elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="Where checkpoint and artifacts go (default: a temp folder, removed "
        "at the end unless --keep; an existing one is reused).",
    )
    parser.add_argument("--keep", action="store_true")
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="Also measure the other INT8 forms of the linear layers.",
    )
    parser.add_argument(
        "--smoothquant",
        action="store_true",
        help="Also measure the int8-smoothquant (Q/DQ) artifact on onnxruntime.",
    )
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--samples", type=int, default=32, help="Calibration prompts.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qd-bench-quantize-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        artifacts = prepare(workdir, args)
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, 20_000, args.prompt_len).astype(np.int64)
        decoders = {name: Decoder(path, args.threads) for name, path in artifacts.items()}
        speeds: dict[str, list[float]] = {name: [] for name in artifacts}
        for d in decoders.values():  # warm-up: first runs allocate and prepack
            d.decode(prompt, 2)
        for r in range(args.rounds):
            for name, d in decoders.items():
                speeds[name].append(d.decode(prompt, args.new_tokens))
            log(
                f"round {r + 1}/{args.rounds}: "
                + ", ".join(f"{n} {s[-1]:.1f}" for n, s in speeds.items())
                + f" tok/s (load {os.getloadavg()[0]:.1f})"
            )
        report = summarize(artifacts, speeds, args)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    rows = [
        [
            r["name"],
            f"{r['bytes'] / 1e6:,.0f} MB",
            f"{r['size_ratio']:.1%}",
            f"{r['tok_s']:.2f}",
            f"{r['best_tok_s']:.2f}",
            f"{r['speedup']:.2f}x",
            r["note"],
        ]
        for r in report["results"]
    ]
    print(table(["artifact", "size", "of fp32", "tok/s", "best", "vs fp32", ""], rows))
    print(
        f"\nbatch 1, prompt {args.prompt_len} tokens, {args.new_tokens} decode steps; tok/s: "
        f"median and best of {args.rounds} interleaved rounds; vs fp32: median of the per-round "
        f"ratios; {report['machine']}"
    )
    goal = report["int8_weight_vs_fp32"]
    print(
        f"int8-weight: decode {goal['speedup']:.2f}x fp32 (target >= 2.5x), size "
        f"{goal['size_ratio']:.1%} of fp32 (target <= 35%)"
    )


def prepare(workdir: Path, args: argparse.Namespace) -> dict[str, Path]:
    checkpoint, fp32 = workdir / "ckpt", workdir / "fp32"
    if not (checkpoint / "config.json").is_file():
        log("writing a random Qwen2-0.5B-shaped checkpoint")
        run("random-checkpoint", str(checkpoint), "--shape", "0.5b", "--force")
    if not (fp32 / "manifest.json").is_file():
        log("exporting it (fp32, --attention gqa)")
        run("export", str(checkpoint), "-o", str(fp32), "--attention", "gqa", "--force", "--quiet")
    artifacts = {"fp32": fp32, "int8-weight": workdir / "int8-weight"}
    modes = ["int8-weight", *(["int8-smoothquant"] if args.smoothquant else [])]
    for mode in modes:
        artifacts[mode] = workdir / mode
        if not (artifacts[mode] / "manifest.json").is_file():
            log(f"quantize --mode {mode}")
            run(
                "quantize",
                str(fp32),
                "-o",
                str(artifacts[mode]),
                "--mode",
                mode,
                "--samples",
                str(args.samples),
                "--force",
                "--quiet",
            )
    if args.candidates:
        for name, (form, block, level) in CANDIDATES.items():
            folder = workdir / ("cand-" + name.replace(" ", "_").replace("+", "_"))
            if not (folder / "manifest.json").is_file():
                log(f"building candidate {name}")
                build_candidate(fp32, folder, form, block, level)
            artifacts[name] = folder
    return artifacts


def summarize(
    artifacts: dict[str, Path], speeds: dict[str, list[float]], args: argparse.Namespace
) -> dict:
    base_bytes = folder_bytes(artifacts["fp32"])
    results = []
    for name, folder in artifacts.items():
        manifest = Manifest.load(folder)
        q = manifest.quantization
        note = ""
        if manifest.quantization_mode == "int8-weight":
            note = (
                f"MatMulNBits b{q.block_size} acc{q.accuracy_level}, "
                f"embedding {q.embedding}, smoothed"
            )
        elif manifest.quantization_mode == "int8-smoothquant":
            note = "Q/DQ W8A8 (TensorRT form)"
        elif name in CANDIDATES:
            note = "candidate: linear layers only"
        # paired per round: a burst of load from other processes hits one round of both
        ratios = [a / b for a, b in zip(speeds[name], speeds["fp32"], strict=True)]
        results.append(
            {
                "name": name,
                "bytes": folder_bytes(folder),
                "size_ratio": folder_bytes(folder) / base_bytes,
                "tok_s": median(speeds[name]),
                "best_tok_s": max(speeds[name]),
                "speedup": median(ratios),
                "rounds": speeds[name],
                "note": note,
            }
        )
    by_name = {r["name"]: r for r in results}
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"onnxruntime {ort.__version__}",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "results": results,
        "int8_weight_vs_fp32": {k: by_name["int8-weight"][k] for k in ("speedup", "size_ratio")},
    }


if __name__ == "__main__":
    main()
