"""What logprobs and constrained decoding cost per token, on one artifact, in one run.

Greedy decode of the same chat prompt with: nothing extra, logprobs (top 5), and a JSON-schema
constraint (llguidance). The three variants alternate for --repeats rounds; decode tokens/s is
generated tokens after the first over the time after the first (prefill excluded); medians and
ratios to plain decoding are printed. The constrained variant writes other tokens (JSON), so its
ratio is per token, not per answer.

    .venv/bin/python benchmarks/openai_features.py ARTIFACT [--tokens 64] [--repeats 5] [--json]
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
from qwen_deploy.generation.structured import grammar_for  # noqa: E402

PROMPT = "Describe a Python function that merges two sorted lists, with an example."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "example": {"type": "string"},
    },
    "required": ["name", "description", "example"],
}


def decode_rate(generator: Generator, ids: list[int], tokens: int, **overrides) -> float:
    """Decode tokens/s after the first token. Unconstrained runs ignore stop ids, so each writes
    exactly `tokens`; a constrained one ends with its JSON (its grammar then allows only EOS)."""
    if "grammar" not in overrides:
        overrides["stop_token_ids"] = []
    stamps = []
    for _ in generator.stream(prompt=ids, temperature=0, max_tokens=tokens, **overrides):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    generator = Generator(args.artifact)
    ids = generator.prompt_ids(messages=[{"role": "user", "content": PROMPT}])
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "f", "schema": SCHEMA}})
    variants = {
        "plain": {},
        "logprobs (top 5)": {"logprobs": 5},
        "json_schema": {"grammar": grammar},
    }
    decode_rate(generator, ids, 8)  # warm-up, and llguidance's vocabulary index
    decode_rate(generator, ids, 8, grammar=grammar)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, overrides in variants.items():
            rates[name].append(decode_rate(generator, ids, args.tokens, **overrides))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    if args.json:
        print(json.dumps({"rounds": rates, "median": medians}, indent=2))
        return
    print(f"decode tok/s, {args.tokens} tokens, median of {args.repeats} (alternated)")
    for name, rate in medians.items():
        print(f"  {name:18} {rate:7.2f}   {rate / medians['plain']:.3f}x plain")


if __name__ == "__main__":
    main()
