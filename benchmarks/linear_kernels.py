"""One linear layer under each form our artifacts use, on onnxruntime's CPU provider: what a step
of M rows (a batch of decoding rows, a prefill chunk) costs against one row.

A random [K, N] weight (default: the 0.5B's LM head, 896 x 151936) is written by the quantizer's
own rewrites into one-node graphs:
- fp32: MatMul;
- int8 b64, int4 b32, int4 b128: com.microsoft MatMulNBits at accuracy_level 4, as the weight-only
  modes write their linears (int8 b64: int8-weight's, and int4-weight's LM head, v and down_proj);
- integer: MatMulInteger on rows quantized at run time (quantize/dynamic.py), as int8-dynamic
  writes its linears and LM head.
Each output is checked against the fp32 product before it is timed (relative error printed).

    .venv/bin/python benchmarks/linear_kernels.py [--shape 896 151936] [--rows 1 2 4 8 16 64 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import median, table
from qwen_deploy.quantize.dynamic import DynamicRows
from qwen_deploy.quantize.linears import LM_HEAD, find_linears
from qwen_deploy.quantize.rewrite import GraphRewrite
from qwen_deploy.quantize.store import SourceTensors, TensorWriter
from qwen_deploy.quantize.weight_only import matmul_nbits

FORMS = {  # name: MatMulNBits (bits, block), or None for the other forms
    "fp32": None,
    "int8 b64": (8, 64),
    "int4 b32": (4, 32),
    "int4 b128": (4, 128),
    "integer": None,
}


def linear_graph(weight: np.ndarray, form: str, folder: Path) -> Path:
    """`form` of x @ weight as a one-linear graph in `folder`; returns its path."""
    k, n = weight.shape
    folder.mkdir(parents=True)
    writer = TensorWriter(folder, "model.onnx.data")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", LM_HEAD], ["y"], name="lm_head/MatMul")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [writer.tensor(LM_HEAD, weight)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    writer.close()
    if form != "fp32":
        writer = TensorWriter(folder, "quantized.onnx.data")
        rw = GraphRewrite(model, SourceTensors(folder, model), writer)
        (lin,) = find_linears(model.graph)
        if form == "integer":
            rows = DynamicRows(rw, np.float32)
            nodes, codes, scale = rows.quantize("x", "x")
            rw.replace(lin.matmul, [*nodes, *rows.matmul(lin, codes, scale, weight)])
        else:
            bits, block = FORMS[form]
            node = matmul_nbits(rw, lin, "x", weight, np.float32, block=block, bits=bits)
            rw.replace(lin.matmul, [node])
        rw.finish()
        writer.close()
    path = folder / "model.onnx"
    onnx.save_model(model, str(path))
    return path


def measure(weight: np.ndarray, rows: list[int], threads: int, repeats: int) -> list[dict]:
    """Median ms per run of every form at every row count, and its error against fp32."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    rng = np.random.default_rng(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {
            form: ort.InferenceSession(
                str(linear_graph(weight, form, Path(tmp) / form.replace(" ", "_"))),
                options,
                providers=["CPUExecutionProvider"],
            )
            for form in FORMS
        }
        for m in rows:
            x = rng.standard_normal((m, weight.shape[0])).astype(np.float32)
            reference = x @ weight
            row = {"rows": m}
            for form, session in sessions.items():
                y = session.run(None, {"x": x})[0]
                error = np.linalg.norm(y - reference) / np.linalg.norm(reference)
                times = []
                for _ in range(repeats if m < 64 else max(3, repeats // 10)):
                    start = time.perf_counter()
                    session.run(None, {"x": x})
                    times.append(time.perf_counter() - start)
                row[form] = {"ms": 1000 * median(times), "relative_error": float(error)}
            results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=2, default=[896, 151936], metavar=("K", "N"))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64, 256])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    k, n = args.shape
    weight = (np.random.default_rng(0).standard_normal((k, n)) * 0.02).astype(np.float32)
    results = measure(weight, args.rows, args.threads, args.repeats)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    first = results[0]
    cells = [
        [r["rows"]] + [f"{r[f]['ms']:.3f} ({r[f]['ms'] / first[f]['ms']:.1f}x)" for f in FORMS]
        for r in results
    ]
    cells.append(["error"] + [f"{first[f]['relative_error']:.1e}" for f in FORMS])
    print(
        f"[M x {k}] @ [{k} x {n}], {args.threads} threads: median ms (against the first row count)"
    )
    print(table(["rows", *FORMS], cells))


if __name__ == "__main__":
    main()
