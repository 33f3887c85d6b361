"""Perplexity of llama.cpp quantizations next to ours, on the same held-out text and token ids.

qwen-deploy's quality report measures perplexity on the packaged held-out passages
(qwen_deploy/data/heldout_{en,zh,code}.txt, tokenized by the artifact's tokenizer, no template).
This script feeds the same ids to llama.cpp (llama-cpp-python, the `llama` extra) for each GGUF
file, teacher-forced over the whole passage as our report does, and prints the perplexity and
its change against the first file (the reference: an F32 GGUF of the model). `--requantize
F32.gguf TYPE...` first writes llama.cpp's own quantizations of that file (Q4_K_M, Q4_0, ...), and
`--ours ART...` adds the numbers our quantized artifacts' manifests recorded.

    .venv/bin/python benchmarks/llama_perplexity.py build/coder \\
        --requantize build/coder-f32.gguf Q4_K_M Q4_1 --ours build/coder-int4w [--json]

An F32 GGUF of a Q4_K_M download: --requantize model.gguf F32 writes one (llama.cpp converts).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np

from qwen_deploy.generation.tokenizer import Tokenizer
from qwen_deploy.manifest import Manifest
from qwen_deploy.quantize.quality import TEXTS, load_texts, token_nll


def requantize(source: Path, kind: str, folder: Path) -> Path:
    """llama.cpp's `kind` quantization (a LLAMA_FTYPE_MOSTLY_* or ALL_F32 name) of `source`."""
    import llama_cpp

    name = "LLAMA_FTYPE_ALL_F32" if kind == "F32" else f"LLAMA_FTYPE_MOSTLY_{kind}"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize = getattr(llama_cpp, name), True
    out = folder / f"{source.stem}-{kind}.gguf"
    if llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    ):
        sys.exit(f"llama.cpp could not quantize {source} to {kind}")
    return out


def nll(gguf: Path, passages: dict[str, list[int]], threads: int) -> dict[str, np.ndarray]:
    """-log p(next token) of every passage position but the last, under llama.cpp."""
    from llama_cpp import Llama

    longest = max(map(len, passages.values()))
    llm = Llama(
        str(gguf), n_ctx=longest, n_batch=256, n_threads=threads, logits_all=True, verbose=False
    )
    out = {}
    for name, ids in passages.items():
        llm.reset()
        llm.eval(ids)
        out[name] = token_nll(llm.scores[: len(ids) - 1], ids[1:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="a qwen-deploy artifact: its tokenizer")
    parser.add_argument("gguf", type=Path, nargs="*", help="GGUF files; the first is the reference")
    parser.add_argument("--requantize", nargs="+", metavar=("F32.gguf", "TYPE"))
    parser.add_argument("--workdir", type=Path, default=Path("build/llama-perplexity"))
    parser.add_argument("--ours", type=Path, nargs="*", default=[], help="quantized artifacts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    files = list(args.gguf)
    if args.requantize:
        source, *kinds = map(str, args.requantize)
        args.workdir.mkdir(parents=True, exist_ok=True)
        files = [Path(source), *files]
        for kind in kinds:
            print(f"llama.cpp: {source} -> {kind}", file=sys.stderr)
            files.append(requantize(Path(source), kind, args.workdir))
    passages = load_texts(Tokenizer.from_artifact(Path(args.artifact)))
    rows = []
    for gguf in files:
        print(f"perplexity of {gguf}", file=sys.stderr)
        scores = nll(gguf, passages, args.threads)
        total = np.concatenate([scores[n] for n in TEXTS])
        rows.append({"name": f"llama.cpp {gguf.name}", "perplexity": float(np.exp(total.mean()))})
    if rows:
        for row in rows:
            row["relative"] = row["perplexity"] / rows[0]["perplexity"] - 1.0
    for folder in args.ours:
        ppl = Manifest.load(folder).quality.perplexity
        rows.append(
            {"name": f"qwen-deploy {folder.name}", "perplexity": ppl["quantized"],
             "relative": ppl["relative"], "reference": ppl["reference"]}
        )  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"held-out text, {sum(len(p) - 1 for p in passages.values())} predicted tokens")
    for row in rows:
        print(f"{row['name']:50s} {row['perplexity']:9.4f} {row['relative']:+8.2%}")


if __name__ == "__main__":
    main()
