"""Export benchmark: qwen-deploy's streaming exporter vs torch.onnx.export(dynamo=True), and 7B.

1. A Qwen2-0.5B-shaped random checkpoint (tied embeddings, like the real 0.5B): qwen-deploy's
   export time and peak RSS next to torch.onnx.export(dynamo=True) of the same weights
   (transformers' Qwen2ForCausalLM with a DynamicCache KV cache), each in a fresh child process.
2. A checkpoint with Fin-R1's exact shapes (random bf16 weights, 15 GB, written shard by shard
   without torch): qwen-deploy's fp16 (and, disk allowing, fp32) export time and peak RSS, next to
   the disk's measured sequential speed, whose bytes/speed is the floor for the export time.

    .venv/bin/python benchmarks/export.py [--skip-7b] [--skip-torch] [--workdir DIR] [--json]

Times exclude interpreter start and imports; "flush" is the fsync of the written output after the
export returns (the exporter leaves the last dirty pages to the kernel).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    GB,
    ChildResult,
    disk_speed,
    drop_file_cache,
    folder_bytes,
    free_disk,
    fsync_file,
    median,
    run_child,
    table,
)

FIN_R1_PARAMS_BYTES_BF16 = 15.3e9
DISK_MARGIN = 3e9


# -- jobs run in child processes (`_common.run_child("export:<name>", kwargs)`) ------------------
def make_05b_checkpoint(out: str, dtype: str) -> dict:
    """A random checkpoint with Qwen2-0.5B's shapes, tied embeddings and 32k positions."""
    from qwen_deploy.checkpoint.random_model import SHAPES, make_random_checkpoint

    layers, hidden, heads, kv_heads, intermediate = SHAPES["0.5b"]
    start = time.perf_counter()
    make_random_checkpoint(
        out,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        tie_word_embeddings=True,
        dtype=dtype,
        max_position_embeddings=32768,
    )
    return {"seconds": time.perf_counter() - start, "bytes": folder_bytes(Path(out))}


def make_7b_checkpoint(out: str) -> dict:
    import _synthetic

    start = time.perf_counter()
    info = _synthetic.write_random_checkpoint(Path(out))
    return {"seconds": time.perf_counter() - start, **info}


def qwen_export(source: str, out: str, precision: str, attention: str) -> dict:
    from qwen_deploy.export import export_checkpoint

    start = time.perf_counter()
    export_checkpoint(source, out, precision=precision, attention=attention, progress=False)
    return {"seconds": time.perf_counter() - start, "bytes": folder_bytes(Path(out))}


def _torch_inputs(model, with_cache: bool) -> tuple[dict, dict]:
    """Sample kwargs and dynamic shapes: batch 2, 3 new tokens, 4 past tokens."""
    import torch
    from transformers import DynamicCache

    cfg = model.config
    batch, seq, past = 2, 3, 4 if with_cache else 0
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kwargs = {
        "input_ids": torch.randint(0, cfg.vocab_size, (batch, seq)),
        "attention_mask": torch.ones(batch, past + seq, dtype=torch.int64),
        "position_ids": torch.arange(past, past + seq).expand(batch, seq),
    }
    b, s = torch.export.Dim("batch_size"), torch.export.Dim("sequence_length")
    shapes = {"input_ids": {0: b, 1: s}, "position_ids": {0: b, 1: s}}
    if not with_cache:
        shapes["attention_mask"] = {0: b, 1: s}
        kwargs["use_cache"] = False
        shapes["use_cache"] = None
        return kwargs, shapes
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        kv = torch.randn(2, batch, cfg.num_key_value_heads, past, head_dim)
        cache.update(kv[0], kv[1], i)
    p = torch.export.Dim("past_sequence_length")
    kwargs.update(past_key_values=cache, use_cache=True)
    shapes["attention_mask"] = {0: b, 1: torch.export.Dim.AUTO}  # = past + seq, derived
    shapes["past_key_values"] = [{0: b, 2: p}] * (2 * cfg.num_hidden_layers)
    shapes["use_cache"] = None
    return kwargs, shapes


def torch_export(source: str, out: str) -> dict:
    """Load the checkpoint in fp32 and export it with torch.onnx.export(dynamo=True).

    transformers 5's DynamicCache goes through torch.export once registered as a pytree node
    (transformers' own exporter helper does that). Falls back to the no-cache forward if the
    cache export fails, and says so.
    """
    import onnx
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model

    start = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    loaded = time.perf_counter()
    register_cache_pytrees_for_model(model)
    note = "with DynamicCache KV cache"
    try:
        kwargs, shapes = _torch_inputs(model, with_cache=True)
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamic_shapes=shapes, dynamo=True)
    except Exception as e:
        note = f"NO KV cache: export with DynamicCache failed ({type(e).__name__}: {e})"[:300]
        kwargs, shapes = _torch_inputs(model, with_cache=False)
        program = torch.onnx.export(model, (), kwargs=kwargs, dynamic_shapes=shapes, dynamo=True)
    exported = time.perf_counter()
    Path(out).mkdir(parents=True)
    program.save(str(Path(out) / "model.onnx"), external_data=True)
    saved = time.perf_counter()
    graph = onnx.load(str(Path(out) / "model.onnx"), load_external_data=False).graph
    return {
        "seconds": saved - start,
        "load_s": loaded - start,
        "export_s": exported - loaded,
        "save_s": saved - exported,
        "bytes": folder_bytes(Path(out)),
        "note": note,
        "graph_inputs": len(graph.input),
        "graph_outputs": len(graph.output),
        "nodes": len(graph.node),
        "versions": {
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "onnxscript": _version("onnxscript"),
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# -- the parent: runs the jobs, measures, prints ------------------------------------------------
def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure_export(target: str, kwargs: dict, out: Path, flush_file: str) -> dict:
    """One export in a child; then flush its output to disk, measure, and delete it."""
    result: ChildResult = run_child(target, kwargs)
    row = {
        "seconds": result.report.get("seconds"),
        "peak_rss": result.peak_rss,
        "peak_anon": result.peak_anon,
        "child_wall_s": result.wall_s,
        "error": result.error,
        **{k: v for k, v in result.report.items() if k != "seconds"},
    }
    data = out / flush_file
    row["flush_s"] = fsync_file(data) if data.is_file() else None
    shutil.rmtree(out, ignore_errors=True)
    if result.error:
        log(f"  {target} failed: {result.error}")
    return row


def _summary(runs: list[dict]) -> dict:
    ok = [r for r in runs if not r["error"]]
    return {
        "runs": runs,
        "n": len(ok),
        "seconds": median([r["seconds"] for r in ok]),
        "flush_s": median([r["flush_s"] or 0.0 for r in ok]),
        "peak_rss": max((r["peak_rss"] for r in ok), default=0),
        "peak_anon": max((r["peak_anon"] for r in ok), default=0),
        "bytes": ok[0]["bytes"] if ok else 0,
        "error": None if ok else runs[-1]["error"],
    }


def bench_05b(work: Path, args: argparse.Namespace) -> dict:
    ckpt = work / "qwen2-0.5b"
    log(f"0.5B: writing a random {args.dtype} checkpoint (tied embeddings) to {ckpt}")
    made = run_child("export:make_05b_checkpoint", {"out": str(ckpt), "dtype": args.dtype})
    if made.error:
        raise SystemExit(f"error: building the 0.5B checkpoint failed: {made.error}")
    result = {"checkpoint": {"dtype": args.dtype, **made.report}, "rows": {}}
    for precision in ("fp32", "fp16"):
        runs = []
        for i in range(args.repeats):
            log(f"0.5B: qwen-deploy export {precision} ({i + 1}/{args.repeats})")
            kwargs = {
                "source": str(ckpt),
                "out": str(work / "qd-05b"),
                "precision": precision,
                "attention": "onnx",
            }
            runs.append(
                measure_export("export:qwen_export", kwargs, work / "qd-05b", "model.onnx.data")
            )
        result["rows"][f"qwen-deploy export, {precision}"] = _summary(runs)
    if not args.skip_torch:
        runs = []
        for i in range(args.torch_repeats):
            log(f"0.5B: torch.onnx.export(dynamo=True), fp32 ({i + 1}/{args.torch_repeats})")
            kwargs = {"source": str(ckpt), "out": str(work / "torch-05b")}
            runs.append(
                measure_export("export:torch_export", kwargs, work / "torch-05b", "model.onnx.data")
            )
        result["rows"]["torch.onnx.export(dynamo=True), fp32"] = _summary(runs)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def bench_7b(work: Path, args: argparse.Namespace, disk: dict) -> dict:
    ckpt = work / "fin-r1-shaped"
    free = free_disk(work)
    need = 2 * FIN_R1_PARAMS_BYTES_BF16 + DISK_MARGIN
    if free < need:
        return {"skipped": f"needs {need / GB:.0f} GB free in {work}, has {free / GB:.0f} GB"}
    log(f"7B: writing a random bf16 checkpoint with Fin-R1's shapes to {ckpt} (~15 GB)")
    made = run_child("export:make_7b_checkpoint", {"out": str(ckpt)})
    if made.error:
        raise SystemExit(f"error: writing the 7B checkpoint failed: {made.error}")
    result = {
        "checkpoint": {**made.report, "peak_rss": made.peak_rss, "peak_anon": made.peak_anon},
        "rows": {},
    }
    for precision, factor in (("fp16", 1), ("fp32", 2)):
        free = free_disk(work)
        need = factor * FIN_R1_PARAMS_BYTES_BF16 + DISK_MARGIN
        if free < need:
            result["rows"][f"qwen-deploy export, {precision}"] = {
                "skipped": f"needs {need / GB:.0f} GB free, has {free / GB:.0f} GB"
            }
            continue
        for shard in ckpt.glob("*.safetensors"):
            drop_file_cache(shard)  # read the checkpoint from disk, not from the page cache
        log(f"7B: qwen-deploy export {precision} (cold checkpoint cache)")
        kwargs = {
            "source": str(ckpt),
            "out": str(work / f"qd-7b-{precision}"),
            "precision": precision,
            "attention": "onnx",
        }
        row = measure_export(
            "export:qwen_export", kwargs, work / f"qd-7b-{precision}", "model.onnx.data"
        )
        read_bytes = made.report["bytes"]
        row["floor_write_s"] = row["bytes"] / disk["write_Bps"] if row.get("bytes") else None
        if row["floor_write_s"] is not None:
            row["floor_read_write_s"] = row["floor_write_s"] + read_bytes / disk["read_Bps"]
        result["rows"][f"qwen-deploy export, {precision}"] = row
        log(f"7B: {precision} done in {row['seconds']} s, peak RSS {row['peak_rss'] / GB:.2f} GB")
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    return result


def _gb(n: float | None) -> str:
    return "-" if not n else f"{n / GB:.2f}"


def _s(n: float | None) -> str:
    return "-" if n is None else f"{n:.1f}"


def render(report: dict) -> str:
    disk = report["disk"]
    lines = [
        f"machine: {report['machine']}",
        f"disk ({report['workdir']}): sequential write {disk['write_Bps'] / 1e6:.0f} MB/s "
        f"(fsync'd), cold read {disk['read_Bps'] / 1e6:.0f} MB/s "
        f"({disk['bytes'] / GB:.1f} GB file)",
        "times exclude interpreter start and imports; peak RSS = the child's VmHWM; "
        "peak anon = polled anonymous RSS (without memory-mapped checkpoint pages)",
    ]
    headers = ["job", "n", "time s (median)", "flush s", "peak RSS GB", "peak anon GB", "output GB"]
    if "05b" in report:
        r = report["05b"]
        ck = r["checkpoint"]
        lines += [
            "",
            f"Qwen2-0.5B shapes, tied embeddings, {ck['dtype']} checkpoint "
            f"({ck['bytes'] / GB:.2f} GB, built in {ck['seconds']:.0f} s)",
        ]
        rows, notes = [], []
        for name, s in r["rows"].items():
            rows.append(
                [
                    name,
                    s["n"],
                    _s(s["seconds"]),
                    _s(s["flush_s"]),
                    _gb(s["peak_rss"]),
                    _gb(s["peak_anon"]),
                    _gb(s["bytes"]),
                ]
            )
            if s["error"]:
                notes.append(f"  {name}: FAILED: {s['error']}")
            run = next((x for x in s["runs"] if not x["error"]), None)
            if run and "note" in run:
                notes.append(
                    f"  {name}: {run['note']}; load {run['load_s']:.1f} s + export "
                    f"{run['export_s']:.1f} s + save {run['save_s']:.1f} s; graph "
                    f"{run['graph_inputs']} inputs, {run['graph_outputs']} outputs, "
                    f"{run['nodes']} nodes; {run['versions']}"
                )
        lines += [table(headers, rows), *notes]
    if "7b" in report:
        r = report["7b"]
        lines.append("")
        if "skipped" in r:
            lines.append(f"Fin-R1 shapes: skipped ({r['skipped']})")
        else:
            ck = r["checkpoint"]
            lines.append(
                f"Fin-R1 shapes (28 layers, hidden 3584, 28/4 heads, inter 18944, vocab 152064, "
                f"untied): random bf16, {ck['shards']} shards, {ck['bytes'] / GB:.2f} GB, written "
                f"in {ck['seconds']:.0f} s with peak RSS {ck['peak_rss'] / GB:.2f} GB; "
                "export reads it cold"
            )
            rows = []
            for name, s in r["rows"].items():
                if "skipped" in s:
                    rows.append([name, "skipped: " + s["skipped"], "", "", "", "", "", "", ""])
                    continue
                floor = s.get("floor_write_s")
                ratio = f"{(s['seconds'] + s['flush_s']) / floor:.1f}x" if floor else "-"
                rows.append(
                    [
                        name,
                        _s(s["seconds"]),
                        _s(s["flush_s"]),
                        _gb(s["peak_rss"]),
                        _gb(s["peak_anon"]),
                        _gb(s.get("bytes")),
                        _s(floor),
                        _s(s.get("floor_read_write_s")),
                        ratio,
                    ]
                )
                if s["error"]:
                    lines.append(f"  {name}: FAILED: {s['error']}")
            lines.append(
                table(
                    [
                        "job",
                        "time s",
                        "flush s",
                        "peak RSS GB",
                        "peak anon GB",
                        "output GB",
                        "floor write s",
                        "floor read+write s",
                        "(time+flush)/floor",
                    ],
                    rows,
                )
            )
            lines.append(
                "  floor write = output bytes / disk write speed; floor read+write adds "
                "checkpoint bytes / cold read speed. Target: peak RSS <= 4 GB."
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-7b", action="store_true", help="skip the Fin-R1-shaped 15 GB run")
    p.add_argument("--skip-torch", action="store_true", help="skip torch.onnx.export(dynamo=True)")
    p.add_argument("--workdir", type=Path, help="where checkpoints and outputs go (default: /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the work folder's checkpoints")
    p.add_argument("--json", action="store_true", help="print the results as JSON to stdout")
    p.add_argument("--repeats", type=int, default=3, help="qwen-deploy 0.5B exports per precision")
    p.add_argument("--torch-repeats", type=int, default=1, help="torch 0.5B exports (slow)")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="on-disk dtype of the 0.5B checkpoint",
    )
    p.add_argument("--disk-test-gb", type=float, default=2.0, help="size of the disk speed file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="qwen-deploy-bench-", dir=args.workdir or "/tmp"))
    report: dict = {"workdir": str(work), "machine": _machine()}
    try:
        log(f"disk speed: {args.disk_test_gb:g} GB sequential write + fsync, then cold read")
        report["disk"] = disk_speed(work, int(args.disk_test_gb * (1 << 30)))
        report["05b"] = bench_05b(work, args)
        if not args.skip_7b:
            report["7b"] = bench_7b(work, args, report["disk"])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _machine() -> str:
    import psutil

    return (
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / (1 << 30):.0f} GiB RAM, Python "
        f"{platform.python_version()}"
    )


if __name__ == "__main__":
    sys.exit(main())
