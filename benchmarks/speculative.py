"""Speculative decoding vs plain decoding, batch 1, in one run: tokens/s, acceptance, identity.

Workloads on the target artifact (greedy): a code edit whose prompt holds the code to change
(what prompt lookup is for) and an open question. Drafters: prompt lookup, and each --draft
artifact (e.g. the int8-weight artifact of the same model) at each --draft-tokens k. Variants
alternate for --repeats rounds; end-to-end tokens/s (prefill included) medians, ratios to plain,
whether the tokens equal plain decoding's, acceptance rate and tokens per target forward.

    .venv/bin/python benchmarks/speculative.py TARGET [--draft INT8_ARTIFACT] [--draft-tokens 4 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qwen_deploy.generation.generator import Generator  # noqa: E402
from qwen_deploy.generation.speculative import DraftModel, PromptLookup  # noqa: E402
from qwen_deploy.runtime.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402

CODE = '''def moving_average(values, window):
    """Return the moving averages of `values` over `window` items."""
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
'''
WORKLOADS = {
    "code edit": "Rename the function moving_average to rolling_mean and the parameter `values` "
    "to `data` in this code. Reply with the full code only.\n\n" + CODE,
    "open question": "Explain how a hash map handles collisions, with a short Python example.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("--draft", type=Path, action="append", default=[])
    parser.add_argument("--draft-tokens", type=int, nargs="+", default=[6])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    generator = Generator(args.target)
    vocab = generator.manifest.model.vocab_size
    drafters = {"plain": (None, 0)}
    for k in args.draft_tokens:
        drafters[f"prompt lookup k={k}"] = (PromptLookup(), k)
        for draft in args.draft:
            model = DraftModel(OnnxRuntimeBackend(draft), vocab)
            drafters[f"draft {draft.name} k={k}"] = (model, k)
    results = {}
    for workload, question in WORKLOADS.items():
        messages = [{"role": "user", "content": question}]
        generator.generate(messages=messages, temperature=0, max_tokens=4)  # warm-up
        rates: dict[str, list[float]] = {name: [] for name in drafters}
        outputs, spec = {}, {}
        for _ in range(args.repeats):
            for name, (drafter, k) in drafters.items():
                extra = {"drafter": drafter, "draft_tokens": k} if drafter else {}
                start = time.perf_counter()
                result = generator.generate(
                    messages=messages, temperature=0, max_tokens=args.tokens, **extra
                )
                rates[name].append(result.completion_tokens / (time.perf_counter() - start))
                outputs[name], spec[name] = result.token_ids, result.speculative
        plain = statistics.median(rates["plain"])
        results[workload] = {
            name: {
                "tok_s": statistics.median(r),
                "speedup": statistics.median(r) / plain,
                "identical": outputs[name] == outputs["plain"],
                **(spec[name] or {}),
            }
            for name, r in rates.items()
        }
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for workload, rows in results.items():
        print(f"{workload} ({args.tokens} tokens, greedy, median of {args.repeats}, alternated)")
        for name, row in rows.items():
            extra = (
                f"  acceptance {row['acceptance_rate']:.2f}, "
                f"{row['tokens_per_forward']:.2f} tok/forward"
                if "acceptance_rate" in row
                else ""
            )
            same = "same tokens" if row["identical"] else "DIFFERENT tokens"
            print(f"  {name:34} {row['tok_s']:6.2f} tok/s  {row['speedup']:.2f}x  {same}{extra}")


if __name__ == "__main__":
    main()
