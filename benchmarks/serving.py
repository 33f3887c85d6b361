"""Serving under real traffic, measured through HTTP against real `qwen-deploy serve` (and
tritonserver) processes on one artifact: what issue-style acceptance numbers come from.

- triton: 8 concurrent streaming clients on one Triton model instance against the same load on
  `serve`, and Triton's own one-client rate (aggregate generated tokens/s).
- conversation: a first turn carrying ~1,500 tokens of context, then a follow-up: the second
  turn's time to first token over the first's, and the text with `--prefix-cache-gb 0`.
- long_prompt: a 4,000-token prompt arriving while 4 streams decode: their largest gap between
  tokens against one prefill chunk (its last, after ~3,700 cached tokens: attention makes later
  chunks the longest) plus one decode step, both measured in the same run.
- event_loop: while 3 clients send 4 MB bodies (refused: past the context) and one a fresh
  json_schema, a streaming client's largest gap between tokens over its median, and /health's
  answer time; also each of the two alone, to tell which stretches the gap. --threads N runs
  serve with N onnxruntime threads (one core left to the server's own work).
- template: a copy of the artifact whose chat template never ends: the chat's error and time,
  /health while it renders, and how long SIGTERM takes to stop the server.
- echo: an 8,000-token prompt with `echo` and `logprobs: 5`: the server's peak RSS rise (VmHWM,
  reset to the RSS after a warm-up of an ordinary 1,000-token prompt, so neither loading's peak
  nor the first long prompt's one-time buffer growth is counted as the echo's) and, with
  --checkpoint, its prompt logprobs against transformers'.

    .venv/bin/python benchmarks/serving.py ARTIFACT [--checkpoint CKPT] [--only NAME ...]
        [--threads N] [--prefill-chunk N] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import _status_kib  # noqa: E402
from benchmarks._triton import TritonServer, free_port, triton_missing  # noqa: E402
from qwen_deploy.generation.engine import PREFILL_CHUNK  # noqa: E402
from qwen_deploy.generation.tokenizer import Tokenizer  # noqa: E402
from qwen_deploy.manifest import Manifest  # noqa: E402

QWEN_DEPLOY = Path(sys.executable).parent / "qwen-deploy"
SOURCES = sorted((ROOT / "qwen_deploy").rglob("*.py"))


def text_of(tokenizer: Tokenizer, tokens: int) -> str:
    """About `tokens` tokens of real text: this package's own source."""
    text = "\n".join(p.read_text() for p in SOURCES)
    ids = tokenizer.encode(text[: tokens * 8])[:tokens]  # < 8 characters a token in code
    return tokenizer.decode(ids)


class Served:
    """`qwen-deploy serve ARTIFACT *options` on a free port, until closed."""

    def __init__(self, artifact: str, *options: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [
                str(QWEN_DEPLOY),
                "serve",
                artifact,
                "--port",
                str(self.port),
                "--model-name",
                "m",
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("serve did not start in 300 s")

    def peak_rss_mib(self) -> float:
        return (_status_kib(self.process.pid, "VmHWM") or 0) / 1024

    def rss_mib(self) -> float:
        return (_status_kib(self.process.pid, "VmRSS") or 0) / 1024

    def reset_peak_rss(self) -> None:
        """VmHWM back to the current RSS (Linux: 5 to clear_refs), so loading's peak is not
        what a later request is measured against."""
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(60)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *_) -> None:
        self.close()


def stream_times(url: str, body: dict, endpoint: str = "/v1/chat/completions") -> dict:
    """One streamed request: its start, each content chunk's arrival time and the text."""
    times, text = [], []
    start = time.perf_counter()
    with httpx.stream("POST", url + endpoint, json={**body, "stream": True}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
                times.append(time.perf_counter())
                text.append(piece)
    return {"start": start, "times": times, "text": "".join(text)}


def chat(content: str, tokens: int, **extra) -> dict:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": tokens,
        **extra,
    }


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def counting(artifact: str, first: int, tokens: int) -> dict:
    """A streamed chat that keeps decoding for all its `tokens` (the model writes the numbers
    out; asked merely to count, it answers with a short loop in Python; some quantized forms
    write digits and end early, so the artifact's end tokens are biased away)."""
    words = f"Write the numbers from {first} to {first + 299} as words, separated by commas."
    ends = {str(t): -100 for t in Manifest.load(Path(artifact)).eos_token_ids}
    return chat(f"{words} Do not write code.", tokens, logit_bias=ends)


def spanning(times: list[float], end: float) -> list[float]:
    """The stream's arrival times, refused if it ended before `end`: its gaps over a window it
    did not span would measure nothing."""
    if times[-1] < end:
        raise RuntimeError("the stream ended before the window it measures; make it longer")
    return times


# -- the measurements ---------------------------------------------------------------------------
def conversation(artifact: str, tokenizer: Tokenizer) -> dict:
    context = text_of(tokenizer, 1500)
    first = [{"role": "user", "content": f"{context}\n\nWhat does this code do? One sentence."}]
    runs = {}
    for cache in ("1", "0"):
        with Served(artifact, "--prefix-cache-gb", cache) as server:
            stream_times(server.url, chat("warm-up", 2))
            one = stream_times(server.url, {**chat("", 48), "messages": first})
            second = [
                *first,
                {"role": "assistant", "content": one["text"]},
                {"role": "user", "content": "Now say it in five words."},
            ]
            two = stream_times(server.url, {**chat("", 48), "messages": second})
            runs[cache] = [r["times"][0] - r["start"] for r in (one, two)], one["text"], two["text"]
    (ttft, *cached_text), (plain_ttft, *plain_text) = runs["1"], runs["0"]
    return {
        "ttft_turn1_s": ttft[0],
        "ttft_turn2_s": ttft[1],
        "turn2_over_turn1": ttft[1] / ttft[0],
        "no_cache_turn2_over_turn1": plain_ttft[1] / plain_ttft[0],
        "text_identical_to_no_cache": cached_text == plain_text,
    }


def long_prompt(artifact: str, tokenizer: Tokenizer, chunk: int = PREFILL_CHUNK) -> dict:
    long_text = text_of(tokenizer, 4000)  # before the clients run: it holds the GIL a second
    with Served(artifact, "--prefill-chunk", str(chunk)) as server:
        stream_times(server.url, chat("warm-up", 2))
        # one chunk where the long prompt's last one runs: its first 4000 - chunk tokens cached
        # (as token ids: the chat below starts with other tokens and misses the cache)
        ids = tokenizer.encode(long_text)
        head = {"model": "m", "prompt": ids[:-chunk], "max_tokens": 1}
        httpx.post(server.url + "/v1/completions", json=head, timeout=600).raise_for_status()
        start = time.perf_counter()
        last = httpx.post(server.url + "/v1/completions", json={**head, "prompt": ids}, timeout=600)
        chunk_s = time.perf_counter() - start
        cached = last.raise_for_status().json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        with ThreadPoolExecutor(5) as pool:
            streams = [
                pool.submit(stream_times, server.url, counting(artifact, i + 1, 800))
                for i in range(4)
            ]
            time.sleep(3)  # the four are decoding
            arrival = time.perf_counter()
            long = pool.submit(stream_times, server.url, chat(long_text, 4))
            long_ttft = long.result()["times"][0] - arrival
            result = [s.result() for s in streams]
            for r in result:
                spanning(r["times"], arrival + long_ttft)
    during = [
        g
        for r in result
        for t, g in zip(r["times"][1:], gaps(r["times"]), strict=True)
        if arrival <= t <= arrival + long_ttft
    ]
    step = statistics.median(g for r in result for g in gaps(r["times"]))
    return {
        "prefill_chunk": chunk,
        "chunk_s": chunk_s,
        "chunk_after_cached_tokens": cached,
        "decode_step_s": step,
        "largest_gap_during_long_prefill_s": max(during) if during else None,
        "bound_chunk_plus_step_s": chunk_s + step,
        "long_prompt_ttft_s": long_ttft,
    }


def event_loop(artifact: str, *serve_options: str) -> dict:
    """Three rounds on one server, a fresh stream each: the bodies alone, the json_schema
    alone, both (the issue's case), so the largest gap says which of them stretches it."""
    text = ("hello world, this is some text. " * 140_000)[:4_000_000]
    big = json.dumps(chat(text, 8)).encode()
    schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(30)}}

    def fresh(n: int) -> bytes:  # a schema the server has not compiled yet
        form = {"name": f"s{n}", "schema": {**schema, "title": f"round {n}"}}
        body = chat("A JSON.", 8, response_format={"type": "json_schema", "json_schema": form})
        return json.dumps(body).encode()

    def send(content: bytes) -> int:
        headers = {"content-type": "application/json"}
        url = server.url + "/v1/chat/completions"
        return httpx.post(url, content=content, headers=headers, timeout=300).status_code

    def round_(bodies: list[bytes]) -> dict:
        health = []
        with ThreadPoolExecutor(5) as pool:
            streamer = pool.submit(stream_times, server.url, counting(artifact, 1, 400))
            time.sleep(3)  # the stream is decoding
            start = time.perf_counter()
            senders = [pool.submit(send, body) for body in bodies]
            with httpx.Client() as client:
                while not all(s.done() for s in senders):
                    t = time.perf_counter()
                    client.get(server.url + "/health").raise_for_status()
                    health.append(time.perf_counter() - t)
                    time.sleep(0.02)
            end = time.perf_counter()
            codes = sorted(s.result() for s in senders)
            times = spanning(streamer.result()["times"], end)
        before = [g for t, g in zip(times[1:], gaps(times), strict=True) if t < start]
        during = [g for t, g in zip(times[1:], gaps(times), strict=True) if start <= t <= end]
        median = statistics.median(before)
        return {
            "answers": codes,
            "requests_s": end - start,
            "stream_median_gap_s": median,
            "stream_largest_gap_s": max(during, default=0.0),
            "largest_over_median": max(during, default=0.0) / median,
            "health_median_s": statistics.median(health),
            "health_max_s": max(health),
        }

    with Served(artifact, "--prefix-cache-gb", "0", *serve_options) as server:
        stream_times(server.url, chat("warm-up", 2))
        rounds = {
            "bodies": round_([big] * 3),
            "json_schema": round_([fresh(1)]),
            "both": round_([big] * 3 + [fresh(2)]),
        }
    return {f"{name} {key}": value for name, r in rounds.items() for key, value in r.items()}


NEVER_ENDS = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"


def template(artifact: str) -> dict:
    with tempfile.TemporaryDirectory() as work:
        looping = Path(work) / "looping"
        looping.mkdir()
        for file in Path(artifact).iterdir():
            if file.name != "manifest.json":
                os.symlink(file.resolve(), looping / file.name)
        manifest = Manifest.load(Path(artifact))
        manifest.chat_template = NEVER_ENDS
        manifest.save(looping)
        server = Served(str(looping))
        try:
            health = []
            with ThreadPoolExecutor(1) as pool:
                start = time.perf_counter()
                reply = pool.submit(
                    httpx.post, server.url + "/v1/chat/completions", json=chat("hi", 4), timeout=60
                )
                while not reply.done():
                    t = time.perf_counter()
                    httpx.get(server.url + "/health", timeout=10).raise_for_status()
                    health.append(time.perf_counter() - t)
                    time.sleep(0.05)
                response = reply.result()
                seconds = time.perf_counter() - start
            completion = {"model": "m", "prompt": "hello", "max_tokens": 2}
            after = httpx.post(server.url + "/v1/completions", json=completion, timeout=60)
            # SIGTERM with the looping chat rendering again
            pending = ThreadPoolExecutor(1).submit(
                httpx.post, server.url + "/v1/chat/completions", json=chat("hi", 4), timeout=60
            )
            time.sleep(0.5)
            stop = time.perf_counter()
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(60)
            sigterm_s = time.perf_counter() - stop
            pending_status = pending.result().status_code
        finally:
            if server.process.poll() is None:
                server.process.kill()
                server.process.wait(60)
    return {
        "status": response.status_code,
        "error": response.json()["error"]["message"][:80],
        "seconds": seconds,
        "health_max_s": max(health),
        "serves_after": after.status_code,
        "sigterm_to_exit_s": sigterm_s,
        "pending_chat_status": pending_status,
    }


def echo(artifact: str, tokenizer: Tokenizer, checkpoint: str | None) -> dict:
    prompt = text_of(tokenizer, 8000)
    body = {"model": "m", "prompt": prompt, "echo": True, "logprobs": 5, "max_tokens": 1}
    with Served(artifact, "--prefix-cache-gb", "0") as server:
        # a server in service has sized its buffers on ordinary prompts: one of 1,000 tokens
        ordinary = {"model": "m", "prompt": text_of(tokenizer, 1000), "max_tokens": 1}
        httpx.post(server.url + "/v1/completions", json=ordinary, timeout=600).raise_for_status()
        httpx.post(server.url + "/v1/completions", json={**body, "prompt": "warm up"}, timeout=60)
        server.reset_peak_rss()
        before = server.peak_rss_mib()
        start = time.perf_counter()
        response = httpx.post(server.url + "/v1/completions", json=body, timeout=1200)
        reply = response.raise_for_status().json()
        seconds = time.perf_counter() - start
        after = server.peak_rss_mib()
    ours = reply["choices"][0]["logprobs"]["token_logprobs"]
    result = {
        "prompt_tokens": reply["usage"]["prompt_tokens"],
        "seconds": seconds,
        "peak_rss_before_mib": before,
        "peak_rss_rise_mib": after - before,
    }
    if checkpoint:
        ids = tokenizer.encode(prompt)
        reference = transformers_logprobs(checkpoint, ids)
        n = min(len(reference), len(ours) - 1)
        result["max_abs_logprob_diff_vs_transformers"] = max(
            abs(a - b) for a, b in zip(ours[1 : n + 1], reference[:n], strict=True)
        )
    return result


def transformers_logprobs(checkpoint: str, ids: list[int]) -> list[float]:
    """Each token's log-probability after the ones before it, from transformers (float32), the
    LM head applied a chunk of positions at a time (8k x 152k logits would take 5 GB)."""
    import torch

    from qwen_deploy.parity.reference import TorchReference

    model = TorchReference(checkpoint).model
    with torch.no_grad():
        hidden = model.model(torch.tensor([ids])).last_hidden_state[0]
        out = []
        for start in range(0, len(ids) - 1, 512):
            logits = model.lm_head(hidden[start : min(start + 512, len(ids) - 1)])
            logp = torch.log_softmax(logits.double(), dim=-1)
            targets = torch.tensor(ids[start + 1 : start + 1 + len(logits)])
            out += logp[torch.arange(len(logits)), targets].tolist()
    return out


def triton(artifact: str) -> dict:
    missing = triton_missing()
    if missing:
        return {"skipped": missing}
    bodies = [chat(f"Write {n} facts about the number {n}.", 96) for n in range(8)]

    def aggregate(post, clients: int) -> float:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            counts = list(pool.map(post, bodies[:clients]))
        return sum(counts) / (time.perf_counter() - start)

    def via_serve(body: dict) -> int:
        return len(stream_times(serve.url, body)["times"])

    def via_triton(body: dict) -> int:
        sampling = {"temperature": 0, "max_tokens": body["max_tokens"]}
        request = {
            "messages": json.dumps(body["messages"]),
            "sampling_parameters": json.dumps(sampling),
            "stream": True,
        }
        url = f"{server.url}/v2/models/qwen/generate_stream"
        with httpx.stream("POST", url, json=request, timeout=600) as r:
            return sum(1 for line in r.iter_lines() if line.startswith("data: "))

    with tempfile.TemporaryDirectory() as work:
        repo = Path(work) / "repo"
        subprocess.run(
            [
                *(str(QWEN_DEPLOY), "triton", artifact, "-o", str(repo), "--name", "qwen"),
                *("--python-env", str(ROOT / ".venv-triton"), "--max-batch", "8"),
            ],
            check=True,
            capture_output=True,
        )
        server = TritonServer(repo, "qwen", Path(work) / "triton.log")
        try:
            via_triton(bodies[0])
            triton_one, triton_eight = aggregate(via_triton, 1), aggregate(via_triton, 8)
        finally:
            server.stop()
    with Served(artifact, "--prefix-cache-gb", "0") as serve:
        via_serve(bodies[0])
        serve_eight = aggregate(via_serve, 8)
    return {
        "triton_1_client_tok_s": triton_one,
        "triton_8_clients_tok_s": triton_eight,
        "serve_8_clients_tok_s": serve_eight,
        "triton_over_serve": triton_eight / serve_eight,
        "triton_8_over_1": triton_eight / triton_one,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--checkpoint", help="HF folder: compare echo logprobs to transformers")
    parser.add_argument(
        "--only",
        action="append",
        choices=["triton", "conversation", "long_prompt", "event_loop", "template", "echo"],
    )
    parser.add_argument(
        "--threads", type=int, help="serve --threads for event_loop (default: onnxruntime's)"
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        help="serve --prefill-chunk for long_prompt and event_loop",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    serve_options = ("--threads", str(args.threads)) if args.threads else ()
    serve_options += ("--prefill-chunk", str(args.prefill_chunk))
    tokenizer = Tokenizer.from_artifact(Path(args.artifact))
    runs = {
        "triton": lambda: triton(args.artifact),
        "conversation": lambda: conversation(args.artifact, tokenizer),
        "long_prompt": lambda: long_prompt(args.artifact, tokenizer, args.prefill_chunk),
        "event_loop": lambda: event_loop(args.artifact, *serve_options),
        "template": lambda: template(args.artifact),
        "echo": lambda: echo(args.artifact, tokenizer, args.checkpoint),
    }
    results = {}
    for name, run in runs.items():
        if args.only and name not in args.only:
            continue
        results[name] = run()
        if not args.json:
            print(f"{name}:", file=sys.stderr)
            for key, value in results[name].items():
                shown = f"{value:.4g}" if isinstance(value, float) else value
                print(f"  {key:<40} {shown}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
