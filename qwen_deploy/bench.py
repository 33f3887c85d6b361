"""`qwen-deploy bench`: generation speed of an artifact, next to its peers measured in the same run.

Each engine lives in its own fresh process (spawned), so its peak RSS is its own and thread pools
do not mix: qwen-deploy on the artifact; transformers eager `generate` on the source checkpoint
(with --reference); onnxruntime-genai on its own fp32 CPU export of that checkpoint (when the
package is installed); llama.cpp (llama-cpp-python) on each GGUF file given (--llama-gguf);
OpenVINO (openvino-genai) on each model folder given (--openvino, what `optimum-cli export openvino`
writes). All decode greedily exactly `new_tokens` tokens from the same random prompt ids, so the
work is identical. The engines take turns, one run each per repeat, so a
shared machine's changing load hits them alike; medians over the repeats are reported.

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

import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import QwenDeployError
from .manifest import Manifest

ASSUMED_BANDWIDTH_GBS = 40.0  # this project's reference CPU machine
PROMPT_SEED = 0
LLAMA_CPP_BUILD = (
    "llama-cpp-python is not installed; build it (8-11 minutes) with "
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON '
    "-DGGML_AVX512_VBMI=OFF -DGGML_AVX_VNNI=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    '-DGGML_AMX_BF16=OFF" pip install llama-cpp-python, turning on only what /proc/cpuinfo '
    "lists (a native build here dies with an illegal instruction: it emits AMX, and VBMI or "
    "AVX-VNNI where a VM hides them)"
)
OPENVINO_INSTALL = (
    "openvino-genai is not installed (pip install 'qwen-deploy[openvino]'); export the model "
    "with optimum-cli export openvino --weight-format int4 in a separate environment "
    "(optimum-intel pulls a CUDA torch and pins transformers)"
)
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
    peak_rss_mb: float | None = None
    runs: dict = field(default_factory=dict)
    skipped: str | None = None
    weights: dict | None = None  # llama.cpp: what its file holds (gguf_weights)


def prompts(config: BenchConfig, vocab: int) -> list[list[int]]:
    """Deterministic random prompt ids (ordinary tokens), one per concurrent request."""
    rng = np.random.default_rng(PROMPT_SEED)
    high = min(vocab, 150000)  # below Qwen's special tokens
    count = max((1, *config.batches))
    return [[int(t) for t in rng.integers(0, high, config.prompt_len)] for _ in range(count)]


def _timings(start: float, stamps: list[float]) -> dict:
    return {
        "ttft_s": stamps[0] - start,
        "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
    }


def _summary(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def _peak_rss_mb() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: a spawned child inherits its
    parent's (the bench parent's 1 GiB bandwidth probe showed as every engine's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: an upper bound


# -- engines: each lives in its own spawned process and answers `single` / `batch` calls --------


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
                    **_timings(start, stamps),
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
        return _timings(*self._timed())

    def batch(self, batch: int) -> dict:
        """`batch` requests arriving together at the engine `serve` runs (continuous batching)."""
        from .generation.engine import BatchEngine

        engine = BatchEngine(self.generator, max_batch=batch)
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


class TransformersRunner:
    def __init__(self, checkpoint: str, config: BenchConfig):
        import torch

        from .parity.reference import TorchReference

        if config.threads:
            torch.set_num_threads(config.threads)
        self.torch = torch
        self.model = TorchReference(checkpoint).model  # float32, eager attention
        self.ids = torch.tensor(prompts(config, self.model.config.vocab_size)[:1])
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []

        class Stamps(BaseStreamer):
            def put(self, value):  # the first put is the prompt itself
                stamps.append(time.perf_counter())

            def end(self):
                pass

        start = time.perf_counter()
        with self.torch.inference_mode():
            self.model.generate(
                self.ids,
                attention_mask=self.torch.ones_like(self.ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                streamer=Stamps(),
                pad_token_id=0,
            )
        return _timings(start, stamps[1:])

    def single(self) -> dict:
        return self._timed(self.new_tokens)


class GenaiRunner:
    def __init__(self, model_dir: str, config: BenchConfig):
        import onnxruntime_genai as og

        og_config = og.Config(model_dir)
        if config.threads:
            options = {"intra_op_num_threads": config.threads}
            og_config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og = og
        self.model = og.Model(og_config)
        genai_config = json.loads((Path(model_dir) / "genai_config.json").read_text())
        self.ids = prompts(config, genai_config["model"]["vocab_size"])[0]
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        params = self.og.GeneratorParams(self.model)
        total = len(self.ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        start = time.perf_counter()
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(self.ids)
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        return _timings(start, stamps)

    def single(self) -> dict:
        return self._timed(self.new_tokens)


class LlamaCppRunner:
    def __init__(self, gguf: str, config: BenchConfig):
        from llama_cpp import Llama

        threads = config.threads or os.cpu_count()  # llama.cpp's default is half the cores
        self.llm = Llama(
            model_path=gguf,
            n_ctx=config.prompt_len + config.new_tokens + 16,
            n_batch=max(config.prompt_len, 32),
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.ids = prompts(config, self.llm.n_vocab())[0]
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        self.llm.reset()  # no prefix reuse from the previous run
        stamps = []
        start = time.perf_counter()
        for _ in self.llm.generate(self.ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:  # exactly new_tokens, end of text or not
                break
        return _timings(start, stamps)

    def single(self) -> dict:
        return self._timed(self.new_tokens)


class OpenVinoRunner:
    """openvino-genai's LLMPipeline on CPU with the f32 precision hint: it decodes faster here than
    the default bf16 (AMX) hint, which speeds up prefill instead."""

    def __init__(self, model_dir: str, config: BenchConfig):
        import openvino as ov
        import openvino_genai as og

        self.og, self.ov = og, ov
        self.pipe = og.LLMPipeline(
            model_dir,
            "CPU",
            INFERENCE_NUM_THREADS=config.threads or os.cpu_count(),
            INFERENCE_PRECISION_HINT="f32",
        )
        self.vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        self.ids = np.array(prompts(config, self.vocab)[:1], np.int64)
        self.new_tokens = config.new_tokens
        self._timed(2)

    def _timed(self, new_tokens: int) -> dict:
        # the pipeline keeps the last run's KV cache and reuses a shared prefix: a changed first
        # token makes every run prefill the whole prompt, as the other engines do
        self.ids[0, 0] = (self.ids[0, 0] + 1) % self.vocab
        config = self.og.GenerationConfig()
        config.max_new_tokens = config.min_new_tokens = new_tokens
        config.do_sample, config.ignore_eos = False, True
        stamps: list[float] = []
        og = self.og

        class Stamps(og.StreamerBase):
            def write(self, token):
                stamps.append(time.perf_counter())
                return og.StreamingStatus.RUNNING

            def end(self):
                pass

        inputs = og.TokenizedInputs(
            self.ov.Tensor(self.ids), self.ov.Tensor(np.ones_like(self.ids))
        )
        start = time.perf_counter()
        self.pipe.generate(inputs, config, Stamps())
        return _timings(start, stamps)

    def single(self) -> dict:
        return self._timed(self.new_tokens)


RUNNERS = {
    "qwen-deploy": QwenDeployRunner,
    "transformers": TransformersRunner,
    "onnxruntime-genai": GenaiRunner,
    "llama.cpp": LlamaCppRunner,
    "openvino": OpenVinoRunner,
}


def _serve(kind: str, source: str, config: BenchConfig, conn) -> None:
    """Child process: load one engine, then answer (method, args) calls until ("stop", ())."""
    try:
        runner = RUNNERS[kind](source, config)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", None))
    while True:
        method, args = conn.recv()
        if method == "stop":
            conn.send(("ok", _peak_rss_mb()))
            return
        try:
            conn.send(("ok", getattr(runner, method)(*args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class EngineProcess:
    """One engine loaded in a fresh spawned process (its own peak RSS and thread pools)."""

    def __init__(self, engine: str, source: str, config: BenchConfig, kind: str | None = None):
        context = multiprocessing.get_context("spawn")
        self.engine = engine
        self.conn, child = context.Pipe()
        args = (kind or engine, source, config, child)
        self.process = context.Process(target=_serve, args=args)
        self.process.start()
        child.close()
        self._receive()

    def _receive(self):
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.process.join()
            status, value = "error", f"the process died (exit code {self.process.exitcode})"
        if status == "error":
            self.process.kill()
            raise QwenDeployError(f"{self.engine} benchmark failed:\n{value}")
        return value

    def call(self, method: str, *args):
        self.conn.send((method, args))
        return self._receive()

    def close(self) -> float:
        """Stop the process; returns its peak RSS in MB."""
        rss = self.call("stop")
        self.process.join()
        return rss


# -- the whole comparison ----------------------------------------------------------------------


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


def gguf_weights(gguf: str | Path) -> dict | None:
    """Bytes of the tensors a llama.cpp decode step reads (all but the embedding table, unless
    the LM head is tied to it) and the count of weight matrices of each type; None without the
    `gguf` package or a readable file. The file type's name alone misleads: a "Q4_K_M" file of
    a model whose rows are not a multiple of 256 (Qwen2.5-0.5B: 896) stores those matrices in
    llama.cpp's fallback type, Q5_0 (5.5 bits per weight)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    try:
        tensors = GGUFReader(gguf).tensors
    except (ValueError, IndexError, OSError):  # unreadable: llama.cpp's own load says why
        return None
    tied = not any(t.name == "output.weight" for t in tensors)
    read = [t for t in tensors if t.name != "token_embd.weight" or tied]
    # weight matrices only: norms and biases are F32 vectors
    types = Counter(t.tensor_type.name for t in read if len(t.shape) > 1)
    return {"bytes_per_token": sum(int(t.n_bytes) for t in read), "types": dict(types)}


def measured_bandwidth_gbs(size_mb: int = 1024, repeats: int = 5) -> float:
    """Bandwidth now: a float32 matrix-vector product over 1 GiB, larger than CPU caches."""
    matrix = np.ones(size_mb << 18, np.float32).reshape(-1, 1024)  # size_mb MiB of float32
    vector = np.ones((1024,), np.float32)
    matrix @ vector
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matrix @ vector
        times.append(time.perf_counter() - start)
    return matrix.nbytes / statistics.median(times) / 1e9


def genai_model(checkpoint: Path, folder: Path, log: Callable[[str], None]) -> str | None:
    """onnxruntime-genai's own fp32 CPU export of `checkpoint` in `folder` (reused if present).

    Returns the reason it is unavailable, or None.
    """
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        return "onnxruntime-genai is not installed (pip install 'qwen-deploy[bench]')"
    if (folder / "genai_config.json").is_file():
        return None
    log(f"building the onnxruntime-genai model of {checkpoint} (fp32, cpu) in {folder}")
    with tempfile.TemporaryDirectory(prefix="qd-genai-cache-") as cache:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(checkpoint),
                "-o",
                str(folder),
                "-p",
                "fp32",
                "-e",
                "cpu",
                "-c",
                cache,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0 or not (folder / "genai_config.json").is_file():
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"its model builder failed: {last}"
    return None


def run_bench(
    artifact: str | Path,
    reference: str | Path | None = None,
    config: BenchConfig | None = None,
    genai_dir: str | Path | None = None,
    peers: Iterable[str] = ("transformers", "onnxruntime-genai"),
    log: Callable[[str], None] = lambda _: None,
    llama_ggufs: Iterable[str | Path] = (),
    openvino_dirs: Iterable[str | Path] = (),
) -> dict:
    """Measure the artifact and its peers; returns the report (see module docstring)."""
    config = config or BenchConfig()
    config.check()
    manifest = Manifest.load(artifact)
    source = Path(reference) if reference else Path(manifest.source.get("path", ""))
    engines: dict[str, EngineResult] = {"qwen-deploy": EngineResult()}
    sources = {"qwen-deploy": str(artifact)}
    files = [
        (f"llama.cpp {Path(f).stem}", f, _llama_cpp_missing, gguf_weights) for f in llama_ggufs
    ]
    files += [(f"openvino {Path(d).name}", d, _openvino_missing, None) for d in openvino_dirs]
    for name, path, missing, weights in files:
        engines[name] = EngineResult(skipped=missing(Path(path)))
        if engines[name].skipped:
            log(f"skipping {name}: {engines[name].skipped}")
        else:
            sources[name] = str(path)
            engines[name].weights = weights(path) if weights else None
    if "transformers" in peers:
        if reference is None:
            engines["transformers"] = EngineResult(skipped="no --reference checkpoint given")
        else:
            engines["transformers"], sources["transformers"] = EngineResult(), str(reference)
    bandwidth_before = measured_bandwidth_gbs(config.bandwidth_probe_mb)
    with tempfile.TemporaryDirectory(prefix="qd-genai-") as tmp:
        if "onnxruntime-genai" in peers:
            folder = Path(genai_dir) if genai_dir else Path(tmp) / "model"
            reason = _genai_source(source, folder, log)
            engines["onnxruntime-genai"] = EngineResult(skipped=reason)
            if reason:
                log(f"skipping onnxruntime-genai: {reason}")
            else:
                sources["onnxruntime-genai"] = str(folder)
        speculative = _measure(engines, sources, config, log)
    bytes_per_token = weight_bytes_per_token(artifact)
    bandwidth = statistics.mean(
        [bandwidth_before, measured_bandwidth_gbs(config.bandwidth_probe_mb)]
    )
    ours = engines["qwen-deploy"]
    ratios = {}
    for peer in engines:
        if peer != "qwen-deploy" and engines[peer].decode_tok_s:
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
            "at_measured_gemv_bandwidth": bandwidth * 1e9 / bytes_per_token,
        },
        "measured_gemv_bandwidth_gbs": bandwidth,
        "engines": {name: asdict(result) for name, result in engines.items()},
        "ratios": ratios,
        "speculative": speculative,
    }


def _llama_cpp_missing(gguf: Path) -> str | None:
    """Why llama.cpp cannot run `gguf` (None when it can)."""
    if not gguf.is_file():
        return f"GGUF file {gguf} not found"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return LLAMA_CPP_BUILD
    return None


def _openvino_missing(folder: Path) -> str | None:
    """Why OpenVINO cannot run `folder` (None when it can)."""
    if not (folder / "openvino_model.xml").is_file():
        return f"{folder} holds no openvino_model.xml (optimum-cli export openvino writes one)"
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        return OPENVINO_INSTALL
    return None


def _genai_source(source: Path, folder: Path, log: Callable[[str], None]) -> str | None:
    """Why onnxruntime-genai cannot run (None when its model is ready in `folder`)."""
    if not (source / "config.json").is_file():
        return f"source checkpoint {source} not found; pass --reference"
    return genai_model(source, folder, log)


def _measure(
    engines: dict[str, EngineResult],
    sources: dict[str, str],
    config: BenchConfig,
    log: Callable[[str], None],
) -> dict:
    """Load every engine, then take turns (repeat by repeat) so load changes hit all alike;
    returns the speculative comparison ({} without drafters)."""
    processes = {}
    speculative_runs: list[dict] = []
    try:
        for name, source in sources.items():
            log(f"loading {name} from {source}")
            try:
                kind = name.split(" ")[0]  # "llama.cpp <file>", "openvino <folder>"
                processes[name] = EngineProcess(name, source, config, kind)
            except QwenDeployError as e:
                if name == "qwen-deploy":
                    raise
                engines[name].skipped = f"failed: {str(e).strip().splitlines()[-1]}"
                log(f"skipping {name}: {engines[name].skipped}")
        measured = list(processes)
        for repeat in range(config.repeats):
            log(f"repeat {repeat + 1}/{config.repeats}")
            for name, process in processes.items():
                engines[name].runs.setdefault("1", []).append(process.call("single"))
            for batch in config.batches:
                run = processes["qwen-deploy"].call("batch", batch)
                engines["qwen-deploy"].runs.setdefault(str(batch), []).append(run)
            if config.speculative:
                speculative_runs.append(processes["qwen-deploy"].call("speculative"))
        for name, process in list(processes.items()):
            engines[name].peak_rss_mb = process.close()
            del processes[name]
    finally:
        for process in processes.values():
            process.process.kill()
    for name in measured:
        result = engines[name]
        result.ttft_s, result.decode_tok_s = _summary(result.runs["1"]).values()
        result.batches = {b: _summary(r) for b, r in result.runs.items() if b != "1"}
    return _speculative_summary(speculative_runs)


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
    ours = report["engines"]["qwen-deploy"]
    for batch, numbers in ours["batches"].items():
        lines.append(
            f"qwen-deploy batch {batch}: aggregate {numbers['aggregate_tok_s']:.2f} tok/s "
            f"(decode phase {numbers['aggregate_decode_tok_s']:.2f} tok/s, "
            f"TTFT {numbers['ttft_s']:.3f} s)"
        )
    lines.append(
        f"roofline: {report['weight_bytes_per_token'] / 1e9:.2f} GB of weights per token"
        f" -> {next(iter(roof.values())):.1f} tok/s at {ASSUMED_BANDWIDTH_GBS:g} GB/s, "
        f"{roof['at_measured_gemv_bandwidth']:.1f} tok/s at the "
        f"{report['measured_gemv_bandwidth_gbs']:.1f} GB/s measured now"
    )
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
