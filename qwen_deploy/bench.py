"""`qwen-deploy bench`: generation speed and memory of an artifact, measured in this process.

Our engine decodes greedily exactly `new_tokens` tokens from a fixed random prompt, `repeats`
times; medians are reported. The competing engines (transformers, onnxruntime-genai, llama.cpp,
OpenVINO) are measured on the same work by benchmarks/peers/compare.py, each in its own process,
taking turns with ours: it reuses the measurement (`measure`, on anything with a `call`) and the
report (`build_report`, `format_report`) here.

Definitions: time to first token (TTFT) = prompt in -> first token out (prefill + one sample);
decode tokens/s = (tokens - 1) / (last token time - first token time); aggregate tokens/s at
batch B = B * tokens / wall time of B requests submitted together to the continuous-batching
engine that `serve` runs (prefill included); aggregate decode tokens/s leaves the prefills out
(from the last request's first token on). The roofline is the decode speed if every step only
had to stream the weights it reads (all but the embedding table) once from memory.

Speculative decoding (--prompt-lookup, --draft) is measured on text, not random ids: a code edit
whose prompt holds the code (what prompt lookup is for) and an open question, each answered by
plain decoding and by every drafter at every k, alternating; tokens/s end to end (prefill
included) and in the decode phase (after the first token, as for plain decode: the draft's own
prefill falls in it), the speedups over plain, whether the tokens equal plain decoding's, the
acceptance rate and the tokens per target forward.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import QwenDeployError
from .machine import Machine, describe, measured_bandwidth_gbs, this_machine
from .manifest import Manifest

ASSUMED_BANDWIDTH_GBS = 40.0  # this project's reference CPU machine
PROMPT_SEED = 0
OURS = "qwen-deploy"  # our engine's name in a report; it alone runs batches and speculation
EDITED_CODE = '''def moving_average(values, window):
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
SPECULATIVE_WORKLOADS = {
    "code edit": "Rename the function moving_average to rolling_mean and the parameter `values` "
    "to `data` in this code. Reply with the full code only.\n\n" + EDITED_CODE,
    "open question": "Explain how a hash map handles collisions, with a short Python example.",
}


@dataclass
class BenchConfig:
    prompt_len: int = 128
    new_tokens: int = 64
    repeats: int = 3
    batches: tuple[int, ...] = (4, 8)
    threads: int | None = None
    bandwidth_probe_mb: int = 1024  # larger than CPU caches, so the probe reads memory
    prompt_lookup: bool = False  # speculative decoding variants (see the module docstring)
    drafts: tuple[str, ...] = ()
    draft_tokens: tuple[int, ...] = ()  # () : each drafter's default_k
    speculative_tokens: int = 128

    @property
    def speculative(self) -> bool:
        return self.prompt_lookup or bool(self.drafts)

    def check(self) -> None:
        for name in ("prompt_len", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise QwenDeployError(f"--{name.replace('_', '-')} must be >= 1.")
        if self.new_tokens < 2:
            raise QwenDeployError("--new-tokens must be >= 2 to time decoding.")


@dataclass
class EngineResult:
    """Medians over the repeats, the raw runs, and the process's peak RSS."""

    ttft_s: float | None = None
    decode_tok_s: float | None = None
    batches: dict[str, dict] = field(default_factory=dict)
    peak_rss_mb: float | None = None  # single requests (ours: before its batches ran)
    batch_peak_rss_mb: float | None = None  # ours, with its batches too
    runs: dict = field(default_factory=dict)
    skipped: str | None = None
    weights: dict | None = None  # a peer's weights as its file holds them (llama.cpp's GGUF)


def prompts(config: BenchConfig, vocab: int) -> list[list[int]]:
    """Deterministic random prompt ids (ordinary tokens), one per concurrent request."""
    rng = np.random.default_rng(PROMPT_SEED)
    high = min(vocab, 150000)  # below Qwen's special tokens
    count = max((1, *config.batches))
    return [[int(t) for t in rng.integers(0, high, config.prompt_len)] for _ in range(count)]


def timings(start: float, stamps: list[float]) -> dict:
    """TTFT and decode tokens/s of one run from its start and its token times."""
    return {
        "ttft_s": stamps[0] - start,
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
    }


def _summary(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def process_peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). Not getrusage's ru_maxrss where procfs is there: it
    survives exec (a spawned child showed its parent's peak) and clear_refs does not reset it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: an upper bound


# -- the engine: answers `single`, `batch` and `speculative` calls ------------------------------


class QwenDeployRunner:
    def __init__(self, artifact: str, config: BenchConfig):
        from .generation.generator import Generator
        from .generation.sampling import SamplingParams

        self.generator = Generator(artifact, threads=config.threads)
        self.ids = prompts(config, self.generator.manifest.model.vocab_size)
        self.params = SamplingParams(temperature=0, max_tokens=config.new_tokens)  # no stop ids
        self.new_tokens = config.new_tokens
        self.variants = self._variants(config)
        self.speculative_tokens = config.speculative_tokens
        self._timed()  # warm-up: first-run allocations and kernel choices

    def _variants(self, config: BenchConfig) -> dict:
        """Speculative variants: name -> (Speculator, method, k); "plain" first."""
        from .generation.speculative import DraftModel, PromptLookup, Speculator

        if not config.speculative:
            return {}
        vocab = self.generator.manifest.model.vocab_size
        variants = {"plain": (Speculator(vocab), "none", 0)}
        for k in config.draft_tokens or (PromptLookup.default_k,):
            if config.prompt_lookup:
                variants[f"prompt lookup k={k}"] = (Speculator(vocab), "prompt_lookup", k)
        for draft in config.drafts:
            speculator = Speculator.open(vocab, draft=draft, threads=config.threads)
            for k in config.draft_tokens or (DraftModel.default_k,):
                variants[f"draft {Path(draft).name} k={k}"] = (speculator, "draft", k)
        return variants

    def speculative(self) -> dict:
        """One round of every variant on every workload: end-to-end and decode-phase tokens/s,
        token ids, statistics."""
        from .generation.speculative import SpeculativeStats

        runs: dict[str, dict] = {}
        for workload, question in SPECULATIVE_WORKLOADS.items():
            messages = [{"role": "user", "content": question}]
            self.generator.generate(messages=messages, temperature=0, max_tokens=4)  # warm-up
            runs[workload] = {}
            for name, (speculator, method, k) in self.variants.items():
                drafter, stats = speculator.drafter(method), SpeculativeStats()
                token_ids, stamps = [], []
                start = time.perf_counter()
                for delta in self.generator.stream(
                    messages=messages,
                    temperature=0,
                    max_tokens=self.speculative_tokens,
                    drafter=drafter,
                    draft_tokens=k or 1,
                    stats=stats,
                ):
                    stamps.append(time.perf_counter())
                    token_ids.append(delta.token_id)
                runs[workload][name] = {
                    **timings(start, stamps),
                    "tok_s": len(stamps) / (stamps[-1] - start),
                    "token_ids": token_ids,
                    "stats": stats.to_dict() if drafter else None,
                }
        return runs

    def _timed(self) -> tuple[float, list[float]]:
        start = time.perf_counter()
        stream = self.generator.stream(prompt=self.ids[0], params=self.params)
        return start, [time.perf_counter() for _ in stream]

    def single(self) -> dict:
        return timings(*self._timed())

    def peak_rss_mb(self) -> float:
        return process_peak_rss_mb()

    def batch(self, batch: int) -> dict:
        """`batch` requests arriving together at the engine `serve` runs (continuous batching),
        their prompts prefilled PREFILL_CHUNK_ALONE tokens a step: the decode phase (after every
        first token) then has all of them running, as its rate assumes."""
        from .generation.engine import PREFILL_CHUNK_ALONE, BatchEngine

        engine = BatchEngine(self.generator, max_batch=batch, prefill_chunk=PREFILL_CHUNK_ALONE)
        stamps: list[list[float]] = [[] for _ in range(batch)]  # each request's token times
        start = time.perf_counter()
        for ids, times in zip(self.ids[:batch], stamps, strict=True):
            engine.add(
                engine.generator.prepare(prompt=ids, params=self.params),
                lambda _, times=times: times.append(time.perf_counter()),
            )
        while engine.step():
            pass
        first = max(times[0] for times in stamps)  # every request has its first token
        end = max(times[-1] for times in stamps)
        return {
            "aggregate_tok_s": batch * self.new_tokens / (end - start),
            "aggregate_decode_tok_s": batch * (self.new_tokens - 1) / (end - first),
            "ttft_s": first - start,
        }


# -- the measurement and the report ------------------------------------------------------------


class Caller(Protocol):
    """A loaded engine, in this process (InProcess) or another (benchmarks' Worker)."""

    def call(self, method: str, *args: Any) -> Any: ...


class InProcess:
    """A runner in this process, called the way a Worker calls one in its child."""

    def __init__(self, runner: object):
        self.runner = runner

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.runner, method)(*args)


def weight_bytes_per_token(artifact: str | Path) -> int:
    """Bytes of initializers a decode step reads: everything but the embedding table."""
    import onnx

    manifest = Manifest.load(artifact)
    model = onnx.load(str(Path(artifact) / manifest.model_file), load_external_data=False)
    gathered = {
        n.input[0] for n in model.graph.node if n.op_type == "Gather" and "input_ids" in n.input
    }
    total = 0
    for tensor in model.graph.initializer:
        if tensor.name not in gathered:
            count = int(np.prod(tensor.dims, dtype=np.int64))
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def measure(
    callers: Mapping[str, Caller],
    engines: dict[str, EngineResult],
    config: BenchConfig,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Run the loaded engines by turns, one run each per repeat, so a shared machine's changing
    load hits them alike; then ours (OURS) alone runs its batches and speculative variants, after
    its single-request peak RSS is read (a batch's KV cache and arena would otherwise be its peak,
    which the peers, measured on single requests, never pay).

    Fills each caller's `engines` entry (raw runs, medians, our peak RSS); returns the speculative
    comparison ({} without drafters).
    """
    for repeat in range(config.repeats):
        log(f"repeat {repeat + 1}/{config.repeats}")
        for name, caller in callers.items():
            engines[name].runs.setdefault("1", []).append(caller.call("single"))
    engines[OURS].peak_rss_mb = callers[OURS].call("peak_rss_mb")
    speculative_runs: list[dict] = []
    for repeat in range(config.repeats):
        if config.batches or config.speculative:
            log(f"{OURS} batches, repeat {repeat + 1}/{config.repeats}")
        for batch in config.batches:
            run = callers[OURS].call("batch", batch)
            engines[OURS].runs.setdefault(str(batch), []).append(run)
        if config.speculative:
            speculative_runs.append(callers[OURS].call("speculative"))
    for name in callers:
        result = engines[name]
        result.ttft_s, result.decode_tok_s = _summary(result.runs["1"]).values()
        result.batches = {b: _summary(r) for b, r in result.runs.items() if b != "1"}
    return _speculative_summary(speculative_runs)


def build_report(
    artifact: str | Path,
    config: BenchConfig,
    engines: dict[str, EngineResult],
    speculative: dict,
    bandwidth_gbs: float,
    machine: Machine,
) -> dict:
    """The report of measured engines (see module docstring): ours over each peer and each batch
    over batch 1, the roofline at the assumed and at the measured bandwidth, and the machine
    they ran on."""
    bytes_per_token = weight_bytes_per_token(artifact)
    ours = engines[OURS]
    ratios = {}
    for peer in engines:
        if peer != OURS and engines[peer].decode_tok_s:
            ratios[f"decode_vs_{peer}"] = ours.decode_tok_s / engines[peer].decode_tok_s
            ratios[f"ttft_vs_{peer}"] = engines[peer].ttft_s / ours.ttft_s  # > 1: we are faster
    for batch, numbers in ours.batches.items():
        ratios[f"aggregate_decode_b{batch}_vs_b1"] = (
            numbers["aggregate_decode_tok_s"] / ours.decode_tok_s
        )
        ratios[f"aggregate_b{batch}_vs_b1"] = numbers["aggregate_tok_s"] / ours.decode_tok_s
    return {
        "artifact": str(artifact),
        "config": asdict(config),
        "weight_bytes_per_token": bytes_per_token,
        "roofline_tok_s": {
            f"at_{ASSUMED_BANDWIDTH_GBS:g}_gbs": ASSUMED_BANDWIDTH_GBS * 1e9 / bytes_per_token,
            "at_measured_gemv_bandwidth": bandwidth_gbs * 1e9 / bytes_per_token,
        },
        "measured_gemv_bandwidth_gbs": bandwidth_gbs,
        "machine": asdict(machine),
        "engines": {name: asdict(result) for name, result in engines.items()},
        "ratios": ratios,
        "speculative": speculative,
    }


def run_bench(
    artifact: str | Path,
    config: BenchConfig | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict:
    """Measure the artifact in this process; returns the report (see module docstring).

    The peak RSS with the batches is read right after the measurement, and the bandwidth and the
    integer GEMM probed once after it: the probe's matrix (1 GiB by default) would otherwise be
    this process's peak.
    """
    config = config or BenchConfig()
    config.check()
    log(f"loading {OURS} from {artifact}")
    ours = InProcess(QwenDeployRunner(str(artifact), config))
    engines = {OURS: EngineResult()}
    speculative = measure({OURS: ours}, engines, config, log)
    engines[OURS].batch_peak_rss_mb = process_peak_rss_mb()
    bandwidth = measured_bandwidth_gbs(config.bandwidth_probe_mb)
    machine = this_machine(config.threads)
    return build_report(artifact, config, engines, speculative, bandwidth, machine)


def _speculative_summary(runs: list[dict]) -> dict:
    """Per workload and variant: median tokens/s end to end and in the decode phase, speedups
    over plain (medians of the same run), identical tokens (every repeat) and the acceptance
    statistics."""
    summary: dict[str, dict] = {}
    for workload in runs[0] if runs else {}:
        rates = {
            name: {
                key: statistics.median(run[workload][name][key] for run in runs)
                for key in ("tok_s", "decode_tok_s")
            }
            for name in runs[0][workload]
        }
        plain = [run[workload]["plain"]["token_ids"] for run in runs]
        summary[workload] = {
            name: {
                **rate,
                "speedup": rate["tok_s"] / rates["plain"]["tok_s"],
                "decode_speedup": rate["decode_tok_s"] / rates["plain"]["decode_tok_s"],
                "identical": [run[workload][name]["token_ids"] for run in runs] == plain,
                "tokens": len(runs[-1][workload][name]["token_ids"]),
                **(runs[-1][workload][name]["stats"] or {}),
            }
            for name, rate in rates.items()
        }
    return summary


def format_report(report: dict) -> str:
    """A plain-text table of the medians and the ratios."""
    config = report["config"]
    lines = [
        f"prompt {config['prompt_len']} tokens, {config['new_tokens']} new tokens, "
        f"median of {config['repeats']} (greedy)",
        f"{'engine':20s} {'TTFT s':>8s} {'decode tok/s':>13s} {'of roofline':>12s} "
        f"{'peak RSS MB':>12s}",
    ]
    roof = report["roofline_tok_s"]
    for name, engine in report["engines"].items():
        if engine["skipped"]:
            lines.append(f"{name:20s} skipped: {engine['skipped']}")
            continue
        share = engine["decode_tok_s"] / roof["at_measured_gemv_bandwidth"]
        lines.append(
            f"{name:20s} {engine['ttft_s']:8.3f} {engine['decode_tok_s']:13.2f} {share:12.0%} "
            f"{engine['peak_rss_mb']:12.0f}"
        )
        if engine.get("weights"):
            types = ", ".join(f"{t} {n}" for t, n in engine["weights"]["types"].items())
            lines.append(
                f"{'':20s} {engine['weights']['bytes_per_token'] / 1e9:.2f} GB of weights per "
                f"token (weight matrices: {types})"
            )
    ours = report["engines"][OURS]
    if ours["batches"]:
        lines.append(f"qwen-deploy peak RSS with its batches: {ours['batch_peak_rss_mb']:.0f} MB")
    for batch, numbers in ours["batches"].items():
        lines.append(
            f"{OURS} batch {batch}: aggregate {numbers['aggregate_tok_s']:.2f} tok/s "
            f"(decode phase {numbers['aggregate_decode_tok_s']:.2f} tok/s, "
            f"TTFT {numbers['ttft_s']:.3f} s)"
        )
    lines.append(
        f"roofline: {report['weight_bytes_per_token'] / 1e9:.2f} GB of weights per token"
        f" -> {next(iter(roof.values())):.1f} tok/s at {ASSUMED_BANDWIDTH_GBS:g} GB/s, "
        f"{roof['at_measured_gemv_bandwidth']:.1f} tok/s at the "
        f"{report['measured_gemv_bandwidth_gbs']:.1f} GB/s measured now"
    )
    lines.append(describe(report["machine"]))
    lines += [f"{name}: {value:.2f}x" for name, value in report["ratios"].items()]
    for workload, rows in report.get("speculative", {}).items():
        lines.append(
            f"speculative, {workload} (greedy, alternated; tokens/s end to end and after the "
            "first token):"
        )
        for name, row in rows.items():
            same = "same tokens" if row["identical"] else "DIFFERENT tokens"
            extra = (
                f"  acceptance {row['acceptance_rate']:.2f}, "
                f"{row['tokens_per_forward']:.2f} tok/forward"
                if "acceptance_rate" in row
                else ""
            )
            lines.append(
                f"  {name:30s} {row['tok_s']:7.2f} tok/s {row['speedup']:5.2f}x  "
                f"decode {row['decode_tok_s']:7.2f} tok/s {row['decode_speedup']:5.2f}x  "
                f"{same}{extra}"
            )
    return "\n".join(lines)
