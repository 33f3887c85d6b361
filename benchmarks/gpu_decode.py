"""GPU checks for a machine with an NVIDIA GPU and onnxruntime-gpu (run through benchmarks/gpu.sh).

Stages, each its own process (so each starts with a clean GPU), results as JSON under --out:
  parity   fp16 artifacts on the CUDA provider (IO-binding backend and the plain backend) against
           transformers' fp32 model: a left-padded batch, prefill + --parity-steps greedy steps,
           judged with the fp16 preset; tiny and Qwen2-0.5B shapes, every attention form.
  prepare  a random Fin-R1-shaped bf16 checkpoint (15 GB) and its fp16 export (--attention).
  ort      batch-1 greedy decode tokens/s of that fp16 artifact on the IO-binding CUDA backend.
  torch    the same decode in PyTorch eager (transformers, fp16, DynamicCache) on the same GPU,
           plus the GPU's measured copy bandwidth.
  report   tokens/s next to the memory-bandwidth roofline (weight + KV bytes read per token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# HBM bandwidth from NVIDIA's data sheets, bytes/s; matched against the device name.
PEAK_BANDWIDTH = [
    ("H200", 4.8e12),
    ("H100 NVL", 3.9e12),
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM5 80GB HBM3
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB PCIe", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
]
PROMPT_LEN = 128


def _save(out: Path, stage: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stage}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({stage: result}, indent=2), file=sys.stderr)


def _padded_batch(rng: np.random.Generator, vocab: int):
    ids = rng.integers(0, vocab, (2, 12))
    mask = np.ones((2, 12), np.int64)
    mask[1, :5] = 0
    return ids, mask, np.clip(np.cumsum(mask, 1) - 1, 0, None)


def _parity_run(reference, backend, vocab: int, steps: int) -> dict:
    from qwen_deploy.parity.presets import PRESETS

    ids, mask, pos = _padded_batch(np.random.default_rng(0), vocab)
    reference.reset()
    cache = backend.new_cache(2)
    ref_rows, cand_rows = [], []
    ref, cand = reference.forward(ids, mask, pos), backend.forward(ids, mask, pos, cache)
    real = mask.astype(bool)
    ref_rows.append(ref[real])
    cand_rows.append(cand[real])
    for _ in range(steps):
        token = ref[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        ref, cand = reference.forward(token, mask, pos), backend.forward(token, mask, pos, cache)
        ref_rows.append(ref[:, -1])
        cand_rows.append(cand[:, -1])
    return PRESETS["fp16"].measure(np.concatenate(ref_rows), np.concatenate(cand_rows))


def stage_parity(work: Path, steps: int) -> dict:
    from iobinding_backend import OnnxRuntimeIOBindingBackend

    from qwen_deploy.checkpoint.random_model import SHAPES, make_random_checkpoint
    from qwen_deploy.export import export_checkpoint
    from qwen_deploy.parity.presets import PRESETS
    from qwen_deploy.parity.reference import TorchReference
    from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend

    results = {}
    for shape, init_std, forms in (
        ("tiny", 0.2, ("onnx", "gqa", "decomposed")),
        ("0.5b", 0.02, ("onnx", "gqa")),
    ):
        layers, hidden, heads, kv, inter = SHAPES[shape]
        ckpt = work / f"parity-{shape}"
        if not (ckpt / "config.json").is_file():
            make_random_checkpoint(
                ckpt,
                layers=layers,
                hidden=hidden,
                heads=heads,
                kv_heads=kv,
                intermediate=inter,
                init_std=init_std,
                tokenizer=False,
                tie_word_embeddings=shape == "0.5b",
            )
        reference = TorchReference(ckpt)
        for form in forms:
            folder = work / f"parity-{shape}-{form}-fp16"
            manifest = export_checkpoint(
                ckpt, folder, precision="fp16", attention=form, force=True, progress=False
            )
            vocab = manifest.model.vocab_size
            for name, backend in (
                ("iobinding", lambda f=folder: OnnxRuntimeIOBindingBackend(f, device="cuda")),
                ("plain", lambda f=folder: OnnxRuntimeBackend(f, provider="cuda")),
            ):
                key = f"{shape}/{form}/{name}"
                try:
                    metrics = _parity_run(reference, backend(), vocab, steps)
                except Exception as e:  # reported, the other cases still run
                    results[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
                    continue
                failures = PRESETS["fp16"].failures(metrics)
                results[key] = {**metrics, "passed": not failures, "failures": failures}
    return {"preset": PRESETS["fp16"].to_dict(), "steps": steps, "cases": results}


def stage_prepare(work: Path, attention: str) -> dict:
    from _synthetic import write_random_checkpoint

    from qwen_deploy.errors import QwenDeployError
    from qwen_deploy.export import export_checkpoint

    ckpt, artifact = work / "fin-r1", work / f"fin-r1-fp16-{attention}"
    start = time.perf_counter()
    if not (ckpt / "model.safetensors.index.json").is_file():
        try:
            write_random_checkpoint(ckpt)
        except QwenDeployError as e:  # the tokenizer files: not needed to measure decode
            print(f"note: {e}", file=sys.stderr)
    written = time.perf_counter()
    export_checkpoint(
        ckpt, artifact, precision="fp16", attention=attention, force=True, progress=True
    )
    return {
        "checkpoint_s": round(written - start, 1),
        "export_s": round(time.perf_counter() - written, 1),
        "artifact": str(artifact),
    }


def _weight_bytes(folder: Path) -> tuple[int, int]:
    """(bytes a decode step reads from weights, total weight bytes) of an artifact."""
    import onnx

    from qwen_deploy.manifest import Manifest

    manifest = Manifest.load(folder)
    model = onnx.load(str(folder / manifest.model_file), load_external_data=False)
    total = gathered = 0
    for t in model.graph.initializer:
        size = (
            int(np.prod(t.dims))
            * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        )
        total += size
        if t.name == "model.embed_tokens.weight":  # a Gather reads one row per token
            gathered = size
    return total - gathered, total


def _kv_bytes_per_token(spec, context: int, itemsize: int = 2) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize * context


def stage_ort(work: Path, attention: str, steps: int) -> dict:
    from iobinding_backend import OnnxRuntimeIOBindingBackend

    folder = work / f"fin-r1-fp16-{attention}"
    start = time.perf_counter()
    backend = OnnxRuntimeIOBindingBackend(
        folder, device="cuda", max_seq_len=PROMPT_LEN + steps + 16
    )
    load_s = time.perf_counter() - start
    spec = backend.manifest.model
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (1, PROMPT_LEN))
    mask, pos = np.ones_like(ids), np.arange(PROMPT_LEN)[None]
    cache = backend.new_cache(1)
    t0 = time.perf_counter()
    logits = backend.forward(ids, mask, pos, cache, last_only=True)
    prefill_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        token = logits[:, -1].argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        pos = pos[:, -1:] + 1
        t0 = time.perf_counter()
        logits = backend.forward(token, mask, pos, cache, last_only=True)
        times.append(time.perf_counter() - t0)
    warm = times[8:]  # the first steps pay allocator and kernel-selection costs
    return {
        "attention": attention,
        "session_load_s": round(load_s, 1),
        "prefill_tokens": PROMPT_LEN,
        "prefill_s": prefill_s,
        "decode_steps": len(warm),
        "decode_tokens_per_s": len(warm) / sum(warm),
        "decode_ms_median": 1e3 * float(np.median(warm)),
        "finite": bool(np.isfinite(logits).all()),
    }


def stage_torch(work: Path, steps: int) -> dict:
    import torch
    from transformers import DynamicCache, Qwen2ForCausalLM

    from qwen_deploy.parity.reference import cache_name

    device = torch.device("cuda")
    n = 1 << 30  # measured copy bandwidth: read + write of a 1 GiB buffer
    a, b = (
        torch.empty(n, dtype=torch.uint8, device=device),
        torch.empty(n, dtype=torch.uint8, device=device),
    )
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    copy_bw = 2 * n * 20 / (time.perf_counter() - t0)
    del a, b
    start = time.perf_counter()
    model = Qwen2ForCausalLM.from_pretrained(str(work / "fin-r1"), dtype=torch.float16).to(device)
    model.eval()
    load_s = time.perf_counter() - start
    ids = torch.from_numpy(
        np.random.default_rng(0).integers(0, model.config.vocab_size, (1, PROMPT_LEN))
    ).to(device)
    times = []
    kv = {cache_name(model): DynamicCache()}
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=True, **kv).logits
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            token.item()  # the same host round trip per token as the ONNX runtime's sampler
            t0 = time.perf_counter()
            logits = model(input_ids=token, use_cache=True, **kv).logits
            logits[0, -1, 0].item()
            times.append(time.perf_counter() - t0)
    warm = times[8:]
    return {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_Bps": copy_bw,
        "model_load_s": round(load_s, 1),
        "decode_steps": len(warm),
        "decode_tokens_per_s": len(warm) / sum(warm),
        "decode_ms_median": 1e3 * float(np.median(warm)),
        "torch": torch.__version__,
    }


def stage_report(work: Path, out: Path, attention: str, steps: int) -> dict:
    from qwen_deploy.manifest import Manifest

    results = {
        s: json.loads((out / f"{s}.json").read_text())
        for s in ("parity", "ort", "torch")
        if (out / f"{s}.json").is_file()
    }
    folder = work / f"fin-r1-fp16-{attention}"
    report: dict = {"parity": results.get("parity")}
    if folder.is_dir() and "torch" in results:
        spec = Manifest.load(folder).model
        read, total = _weight_bytes(folder)
        per_token = read + _kv_bytes_per_token(spec, PROMPT_LEN + steps // 2)
        name = results["torch"]["device"]
        peak = next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)
        bandwidths = {"spec_peak": peak, "measured_copy": results["torch"]["copy_bandwidth_Bps"]}
        rows = {}
        for runtime in ("ort", "torch"):
            if runtime not in results:
                continue
            tps = results[runtime]["decode_tokens_per_s"]
            rows[runtime] = {
                "tokens_per_s": tps,
                **{
                    f"fraction_of_{k}_roofline": tps / (bw / per_token)
                    for k, bw in bandwidths.items()
                    if bw
                },
            }
        report.update(
            {
                "device": name,
                "bytes_per_token": per_token,
                "weight_bytes": total,
                "roofline_tokens_per_s": {k: bw / per_token for k, bw in bandwidths.items() if bw},
                "bandwidth_Bps": bandwidths,
                "decode": rows,
                "ort_details": results.get("ort"),
                "torch_details": results.get("torch"),
            }
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("stage", choices=["parity", "prepare", "ort", "torch", "report"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qd-gpu"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attention", default="gqa", choices=["gqa", "onnx", "decomposed"])
    parser.add_argument("--steps", type=int, default=128, help="decode steps to time")
    parser.add_argument("--parity-steps", type=int, default=8)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.stage == "parity":
        result = stage_parity(args.work, args.parity_steps)
    elif args.stage == "prepare":
        result = stage_prepare(args.work, args.attention)
    elif args.stage == "ort":
        result = stage_ort(args.work, args.attention, args.steps)
    elif args.stage == "torch":
        result = stage_torch(args.work, args.steps)
    else:
        result = stage_report(args.work, args.out, args.attention, args.steps)
    _save(args.out, args.stage, result)


if __name__ == "__main__":
    main()
