"""GET /metrics and the Triton model's metrics: scraped during a real concurrent load, parsed with
prometheus_client's parser, compared with what the clients were answered (usage, tokens)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from benchmarks._triton import TRITON_ENV, TritonServer, triton_missing
from qwen_deploy.generation.engine import BatchEngine
from qwen_deploy.generation.generator import Generator
from qwen_deploy.generation.speculative import Speculator
from qwen_deploy.serving.metrics import ITL_BUCKETS, TTFT_BUCKETS, token_buckets
from qwen_deploy.serving.server import create_app, host_allow_list
from qwen_deploy.serving.triton_repo import write_repository
from tests.serving.test_server import MESSAGES, MODEL, running_server

CLIENTS = 8
MAX_BATCH = 4  # fewer slots than clients: some requests wait
LOAD_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, its sorted (label, value) pairs) -> value."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items()))
            samples[(s.name, labels)] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum over the series of `name` whose labels include `labels`."""
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    assert found, f"{name} {labels} is not exported"
    return sum(found)


class Scraper:
    """Scrapes `url` every few ms on a thread; keeps the largest value seen of each load gauge."""

    def __init__(self, url: str):
        self.url, self.peak = url, dict.fromkeys(LOAD_GAUGES, 0.0)
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.wait(0.005):
                response = client.get(self.url)
                assert response.status_code == 200
                samples = parse(response.text)
                self.scrapes += 1
                for name in LOAD_GAUGES:
                    self.peak[name] = max(self.peak[name], value(samples, name))

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def check_histograms(samples: dict, ttft_count: int, itl_count: int) -> None:
    """Counts as expected; buckets cumulative, +Inf equal to the count, vLLM's boundaries."""
    for name, count, buckets in (
        ("vllm:time_to_first_token_seconds", ttft_count, TTFT_BUCKETS),
        ("vllm:inter_token_latency_seconds", itl_count, ITL_BUCKETS),
    ):
        assert value(samples, f"{name}_count") == count, name
        assert value(samples, f"{name}_sum") > 0
        series = sorted(
            (float(dict(ls)["le"]), v) for (n, ls), v in samples.items() if n == f"{name}_bucket"
        )
        assert [le for le, _ in series] == [*buckets, float("inf")]
        counts = [v for _, v in series]
        assert counts == sorted(counts) and counts[-1] == count


# -- serve --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(tiny_artifact) -> Generator:
    return Generator(tiny_artifact)


def _streamed_chat(client: openai.OpenAI, max_tokens: int, topic: int) -> dict:
    """A streamed chat of exactly max_tokens tokens (no stop token); its usage, chunk count and
    the client's own timings."""
    messages = [*MESSAGES[:1], {"role": "user", "content": f"Question {topic}: what is a bond?"}]
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"stop_token_ids": []},
    )
    chunks, first, usage = 0, None, None
    for chunk in stream:
        if chunk.choices:
            chunks += 1
            first = first or time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    return {
        "usage": usage,
        "chunks": chunks,
        "ttft": first - start,
        "total": time.perf_counter() - start,
    }


def test_metrics_under_an_8_client_load(generator):
    """8 streaming clients on 4 batch slots: running and waiting requests seen while they run;
    afterwards one TTFT per request, one inter-token latency per token after the first, token
    counters equal to the sum of the usage the clients got, latencies within what clients saw."""
    engine = BatchEngine(generator, max_batch=MAX_BATCH, prefix_cache_bytes=2**26)
    lengths = [48 + 8 * i for i in range(CLIENTS)]
    with (
        running_server(engine, MODEL) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        before = parse(httpx.get(url + "/metrics").text)
        assert value(before, "vllm:generation_tokens_total") == 0
        assert value(before, "vllm:time_to_first_token_seconds_count") == 0
        with Scraper(url + "/metrics") as scraper, ThreadPoolExecutor(CLIENTS) as pool:
            # topics repeat: later prompts find earlier ones' blocks in the prefix cache
            results = list(pool.map(_streamed_chat, [client] * CLIENTS, lengths, [0, 1] * 4))
        response = httpx.get(url + "/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    after = parse(response.text)

    assert scraper.scrapes > 10
    assert scraper.peak["vllm:num_requests_running"] == MAX_BATCH
    assert scraper.peak["vllm:num_requests_waiting"] >= 1
    assert (
        value(after, "vllm:num_requests_running") == value(after, "vllm:num_requests_waiting") == 0
    )

    usages = [r["usage"] for r in results]
    assert [u.completion_tokens for u in usages] == [r["chunks"] for r in results] == lengths
    assert value(after, "vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert value(after, "vllm:generation_tokens_total") == sum(u.completion_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert cached > 0 and value(after, "vllm:prefix_cache_hits_total") == cached
    assert value(after, "vllm:prefix_cache_queries_total") == sum(u.prompt_tokens for u in usages)
    assert value(after, "vllm:request_success_total", finished_reason="length") == CLIENTS
    for reason in ("stop", "abort", "error"):
        assert value(after, "vllm:request_success_total", finished_reason=reason) == 0

    check_histograms(after, CLIENTS, sum(n - 1 for n in lengths))
    for name in ("e2e_request_latency", "request_queue_time", "request_decode_time"):
        assert value(after, f"vllm:{name}_seconds_count") == CLIENTS
    assert value(after, "vllm:request_queue_time_seconds_sum") > 0  # half of them waited
    # the engine's times lie within the clients' (which add HTTP, the template, tokenization)
    assert value(after, "vllm:time_to_first_token_seconds_sum") < sum(r["ttft"] for r in results)
    assert value(after, "vllm:e2e_request_latency_seconds_sum") < sum(r["total"] for r in results)
    # a request's inter-token latencies add up to its decode time; phases add up to e2e
    itl = value(after, "vllm:inter_token_latency_seconds_sum")
    assert itl == pytest.approx(value(after, "vllm:request_decode_time_seconds_sum"), rel=1e-6)
    phases = sum(
        value(after, f"vllm:request_{p}_time_seconds_sum") for p in ("queue", "prefill", "decode")
    )
    assert phases == pytest.approx(value(after, "vllm:e2e_request_latency_seconds_sum"), rel=1e-6)
    assert value(after, "vllm:request_generation_tokens_sum") == sum(lengths)
    assert value(after, "vllm:request_prompt_tokens_count") == CLIENTS
    # labels as vLLM's: the served model's name and the engine
    assert {dict(ls)["model_name"] for (n, ls) in after if n.startswith("vllm:")} == {MODEL}
    assert {dict(ls)["engine"] for (n, ls) in after if n.startswith("vllm:")} == {"0"}


def test_kv_cache_usage_is_the_share_of_the_budget_taken(generator):
    """A request reserves its prompt plus max_tokens; the gauge says what share of the KV budget
    that is while it runs, and 0 once it ended."""
    per_position = generator.backend.capabilities.kv_bytes_per_position
    engine = BatchEngine(generator, max_batch=2, kv_budget_bytes=1000 * per_position)
    prompt = generator.prompt_ids(messages=MESSAGES)
    seen = []
    with running_server(engine, MODEL) as url:
        body = {
            "model": MODEL,
            "messages": MESSAGES,
            "max_tokens": 200,
            "stop_token_ids": [],
            "stream": True,
        }
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and len(seen) < 3:
                    seen.append(
                        value(parse(httpx.get(url + "/metrics").text), "vllm:kv_cache_usage_perc")
                    )
        idle = value(parse(httpx.get(url + "/metrics").text), "vllm:kv_cache_usage_perc")
    assert seen == [pytest.approx((len(prompt) + 200) / 1000)] * 3
    assert idle == 0


def test_speculative_acceptance_and_latency_per_round(generator, tiny_artifact):
    """A request drafting with a copy of its own model (every draft accepted), k=3, 13 tokens:
    the prefill gives one token, 3 rounds give 4 each; one inter-token latency per round."""
    draft = Generator(tiny_artifact).backend
    speculator = Speculator(generator.manifest.model.vocab_size, "draft", draft, draft_tokens=3)
    engine = BatchEngine(generator, max_batch=2)
    with (
        running_server(engine, MODEL, speculator=speculator) as url,
        openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        reply = client.chat.completions.create(
            model=MODEL, messages=MESSAGES, temperature=0, max_tokens=13
        )
        after = parse(httpx.get(url + "/metrics").text)
    stats = reply.usage.speculative
    assert value(after, "vllm:spec_decode_num_drafts_total") == stats["target_forwards"] == 3
    assert value(after, "vllm:spec_decode_num_draft_tokens_total") == stats["drafted"] == 9
    assert value(after, "vllm:spec_decode_num_accepted_tokens_total") == stats["accepted"] == 9
    assert value(after, "vllm:generation_tokens_total") == reply.usage.completion_tokens == 13
    check_histograms(after, ttft_count=1, itl_count=3)


def test_a_client_that_leaves_is_counted_as_abort(generator):
    engine = BatchEngine(generator, max_batch=2)
    with running_server(engine, MODEL) as url:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2000, "stop_token_ids": []}
        body["stream"] = True
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
        deadline = time.monotonic() + 30
        while True:
            samples = parse(httpx.get(url + "/metrics").text)
            if value(samples, "vllm:request_success_total", finished_reason="abort") == 1:
                break
            assert time.monotonic() < deadline, "the cancelled request was not counted"
            time.sleep(0.05)
    assert value(samples, "vllm:request_success_total", finished_reason="length") == 0
    assert value(samples, "vllm:num_requests_running") == 0
    assert value(samples, "vllm:time_to_first_token_seconds_count") == 1


def test_metrics_are_open_and_keep_the_host_guard(generator):
    """No API key needed (scrapers send none), as /health; a keyless loopback server still
    refuses foreign Host names. Apps in one process have registries of their own."""
    engine = BatchEngine(generator, max_batch=1)
    create_app(engine, "other")  # another app's metrics: no clash with the server's
    with running_server(engine, MODEL, api_key="k1") as url:
        assert httpx.get(url + "/v1/models").status_code == 401
        response = httpx.get(url + "/metrics")
        assert response.status_code == 200 and "vllm:num_requests_running" in response.text
    hosts = host_allow_list("127.0.0.1", None)
    with running_server(BatchEngine(generator, max_batch=1), MODEL, allowed_hosts=hosts) as url:
        assert httpx.get(url + "/metrics").status_code == 200
        rebound = httpx.get(url + "/metrics", headers={"Host": "attacker.example"})
        assert rebound.status_code == 400


def test_token_buckets_follow_vllm():
    assert token_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert token_buckets(32768)[-3:] == [5000, 10000, 20000]


# -- Triton -------------------------------------------------------------------------------------


needs_triton = pytest.mark.skipif(triton_missing() is not None, reason=triton_missing() or "")


def _poll(url: str, done: Callable[[dict], bool], timeout: float = 30) -> dict:
    """Scrape until `done(samples)` (the Triton model applies its updates every 0.25 s)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = parse(httpx.get(url).text)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


@needs_triton
def test_triton_reports_the_same_metrics(tiny_artifact, tmp_path):
    """The Triton model, 8 concurrent streams on an engine of 4 slots: Triton's metrics port
    shows running and waiting requests, then TTFT and inter-token counts and token counters
    equal to what the streams received."""
    write_repository(
        tiny_artifact, tmp_path / "repo", name="qwen", max_batch=MAX_BATCH, python_env=TRITON_ENV
    )
    server = TritonServer(tmp_path / "repo", "qwen", tmp_path / "server.log", metrics=True)
    lengths = [300 + 20 * i for i in range(CLIENTS)]

    def stream(n: int) -> tuple[int, int]:
        sampling = {"temperature": 0, "max_tokens": n, "stop_token_ids": []}
        body = {
            "text_input": f"Hi {n}",
            "sampling_parameters": json.dumps(sampling),
            "stream": True,
        }
        url = f"{server.url}/v2/models/qwen/generate_stream"
        with httpx.stream("POST", url, json=body, timeout=300) as response:
            events = [
                json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")
            ]
        return len(events), events[-1]["prompt_tokens"]  # an event per token

    try:
        with Scraper(server.metrics_url) as scraper, ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(stream, lengths))
        after = _poll(
            server.metrics_url,
            lambda s: (
                value(s, "vllm:generation_tokens_total") >= sum(lengths)
                and value(s, "vllm:num_requests_running") == 0
            ),
        )
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "no metrics" not in log and "MetricFamily" not in log, log[-3000:]
    assert [tokens for tokens, _ in results] == lengths
    assert scraper.peak["vllm:num_requests_running"] == MAX_BATCH
    assert scraper.peak["vllm:num_requests_waiting"] >= 1
    assert value(after, "vllm:num_requests_waiting") == 0
    assert value(after, "vllm:generation_tokens_total") == sum(lengths)
    assert value(after, "vllm:prompt_tokens_total") == sum(p for _, p in results)
    assert value(after, "vllm:request_success_total", finished_reason="length") == CLIENTS
    check_histograms(after, CLIENTS, sum(n - 1 for n in lengths))
    engines = {dict(ls)["engine"] for (n, ls) in after if n == "vllm:generation_tokens_total"}
    assert engines == {"qwen_0_0"}
    assert {dict(ls)["model_name"] for (n, ls) in after if n.startswith("vllm:")} == {"qwen"}
