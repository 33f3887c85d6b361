"""Attention over a KV cache, one layer on onnxruntime's CPU provider: what GroupQueryAttention
costs at long context against a graph without it, for a decode step and for a prefill chunk.

Two graphs feed `new` tokens (1: a decode step) after `context` cached positions, the cache bound
in place as the runtime binds it:
- gqa: com.microsoft GroupQueryAttention, the gqa form's op (past and present share a buffer);
- scatter: ONNX TensorScatter (opset 24) writes the tokens' keys and values into the cache in
  place, then attention as two batched MatMuls per KV head in the cache's own layout (every query
  head of a KV head and every new token as one GEMM's columns), a causal -inf bias and a softmax.
Both outputs are checked against numpy's attention before they are timed.

    .venv/bin/python benchmarks/attention.py [--context 128 2048 4096] [--new 1] [--heads 14 2 64]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import median, table

HEADROOM = 64  # cache positions past the new tokens, as the runtime allocates


def _value(name: str, shape: list[int], dtype: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def gqa_graph(heads: int, kv_heads: int, dim: int, new: int, capacity: int) -> bytes:
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"],
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        num_heads=heads,
        kv_num_heads=kv_heads,
    )
    cache = [1, kv_heads, capacity, dim]
    graph = helper.make_graph(
        [node],
        "gqa",
        [
            _value("q", [1, new, heads * dim]),
            _value("k", [1, new, kv_heads * dim]),
            _value("v", [1, new, kv_heads * dim]),
            _value("past_k", cache),
            _value("past_v", cache),
            _value("seqlens_k", [1], TensorProto.INT32),
            _value("total", [], TensorProto.INT32),
        ],
        [
            _value("out", [1, new, heads * dim]),
            _value("present_k", cache),
            _value("present_v", cache),
        ],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def scatter_graph(heads: int, kv_heads: int, dim: int, new: int, capacity: int) -> bytes:
    columns = heads // kv_heads * new  # a KV head's query heads x the new tokens
    nodes = [
        helper.make_node("TensorScatter", ["past_k", "k", "index"], ["present_k"], axis=2),
        helper.make_node("TensorScatter", ["past_v", "v", "index"], ["present_v"], axis=2),
        helper.make_node("Transpose", ["q"], ["q_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["present_k", "q_t"], ["scores_t"]),  # [1, kv, capacity, cols]
        helper.make_node("Mul", ["scores_t", "scale"], ["scaled_t"]),
        helper.make_node("Add", ["scaled_t", "bias"], ["masked_t"]),
        helper.make_node("Transpose", ["masked_t"], ["masked"], perm=[0, 1, 3, 2]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present_v"], ["out"]),  # [1, kv, cols, dim]
    ]
    cache = [1, kv_heads, capacity, dim]
    graph = helper.make_graph(
        nodes,
        "scatter",
        [
            _value("q", [1, kv_heads, columns, dim]),
            _value("k", [1, kv_heads, new, dim]),
            _value("v", [1, kv_heads, new, dim]),
            _value("past_k", cache),
            _value("past_v", cache),
            _value("index", [1], TensorProto.INT64),
            _value("bias", [1, 1, capacity, columns]),
        ],
        [
            _value("out", [1, kv_heads, columns, dim]),
            _value("present_k", cache),
            _value("present_v", cache),
        ],
        initializer=[helper.make_tensor("scale", TensorProto.FLOAT, [], [dim**-0.5])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=12
    ).SerializeToString()


def reference(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Causal attention of the last `new` positions' query heads q [kv, group, new, dim] over
    keys/values [kv, T, dim] (the new tokens last)."""
    new, total = q.shape[2], keys.shape[1]
    scores = np.einsum("kgnd,ktd->kgnt", q, keys) / np.sqrt(q.shape[-1])
    visible = np.arange(total)[None] <= (total - new + np.arange(new))[:, None]
    scores = np.where(visible, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return np.einsum("kgnt,ktd->kgnd", probs / probs.sum(-1, keepdims=True), values)


def _median_ms(run, repeats: int) -> float:
    for _ in range(min(10, repeats)):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return median(times) * 1000


def measure(
    context: int, new: int, heads: int, kv_heads: int, dim: int, threads: int, repeats: int
) -> dict[str, float]:
    """ms per layer of each graph for `new` tokens after `context` cached positions, and each
    output's largest difference from numpy's attention."""
    capacity, group = context + new + HEADROOM, heads // kv_heads
    rng = np.random.default_rng(0)
    cache = {n: rng.standard_normal((1, kv_heads, capacity, dim), np.float32) for n in "kv"}
    q = rng.standard_normal((kv_heads, group, new, dim), np.float32)
    fresh = {n: rng.standard_normal((kv_heads, new, dim), np.float32) for n in "kv"}
    keys, values = (np.concatenate([cache[n][0, :, :context], fresh[n]], 1) for n in "kv")
    expected = reference(q, keys, values)
    token_major = {  # [1, new, heads * dim]: head h = kv head h // group, then its group member
        "q": q.transpose(2, 0, 1, 3).reshape(1, new, -1),
        **{n: fresh[n].transpose(1, 0, 2).reshape(1, new, -1) for n in "kv"},
    }
    visible = np.arange(capacity)[:, None] <= context + np.arange(new)[None]  # [capacity, new]
    bias = np.where(np.tile(visible, (1, group)), 0, -np.inf).astype(np.float32)
    feeds = {
        "gqa": {
            **token_major,
            "seqlens_k": np.array([context + new - 1], np.int32),
            "total": np.array(context + new, np.int32),
        },
        "scatter": {
            "q": q.reshape(1, kv_heads, group * new, dim),
            "k": fresh["k"][None],
            "v": fresh["v"][None],
            "index": np.array([context], np.int64),
            "bias": bias[None, None],
        },
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    result = {"context": context, "new": new}
    for name, build in (("gqa", gqa_graph), ("scatter", scatter_graph)):
        session = ort.InferenceSession(
            build(heads, kv_heads, dim, new, capacity), options, providers=["CPUExecutionProvider"]
        )
        binding = session.io_binding()
        for key, array in feeds[name].items():
            binding.bind_cpu_input(key, array)
        for n in "kv":  # the cache in place: one buffer as past and present
            buffer = ort.OrtValue.ortvalue_from_numpy(cache[n].copy())
            binding.bind_ortvalue_input(f"past_{n}", buffer)
            binding.bind_ortvalue_output(f"present_{n}", buffer)
        binding.bind_output("out")
        session.run_with_iobinding(binding)
        out = binding.get_outputs()[2].numpy()
        if name == "gqa":  # [1, new, heads * dim] back to [kv, group, new, dim]
            out = out.reshape(new, kv_heads, group, dim).transpose(1, 2, 0, 3)
        out = out.reshape(kv_heads, group, new, dim)
        result[f"{name}_max_error"] = float(np.abs(out - expected).max())
        result[f"{name}_ms"] = _median_ms(
            lambda s=session, b=binding: s.run_with_iobinding(b), repeats
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, nargs="+", default=[128, 2048, 4096])
    parser.add_argument("--new", type=int, default=1, help="tokens fed (1: a decode step)")
    parser.add_argument(
        "--heads", type=int, nargs=3, default=[14, 2, 64], metavar=("Q", "KV", "DIM")
    )
    parser.add_argument("--layers", type=int, default=24, help="scales per-layer ms to a step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(c, args.new, *args.heads, args.threads, args.repeats) for c in args.context]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cells = []
    for r in rows:
        gqa, scatter = r["gqa_ms"] * args.layers, r["scatter_ms"] * args.layers
        error = max(r["gqa_max_error"], r["scatter_max_error"])
        cells.append(
            [r["context"], f"{gqa:.2f}", f"{scatter:.2f}", f"{gqa / scatter:.2f}", f"{error:.1e}"]
        )
    print(f"{args.new} new token(s); ms per step of {args.layers} layers")
    print(table(["context", "gqa", "scatter", "ratio", "max error"], cells))


if __name__ == "__main__":
    main()
