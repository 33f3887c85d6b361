"""Prometheus metrics of the serving engine, named as vLLM names them.

`EngineMetrics` is a BatchEngine's observer: once per step, on the engine's worker thread, it
turns the deltas the step sent into time to first token, inter-token latency, token counters and
finished-request histograms, reads the engine's cumulative counts (cancelled and failed requests,
prefix-cache lookups, speculative acceptance) and sets the load gauges. It writes to a sink:
`PrometheusSink` (prometheus_client metrics in a registry of the server's own, served at `serve`'s
GET /metrics) or `TritonSink` (Triton's custom metrics API, served on Triton's metrics port), so
`serve` and the Triton model report the same metrics by the same code.

Names, types, labels (model_name, engine) and histogram buckets are vLLM's (vllm/v1/metrics/
loggers.py), so dashboards, alerts and autoscalers written for vLLM read these servers unchanged.
Timing is the engine's: a request arrives when it is queued on the engine (after its template
and tokenization), its first token is sent when its prefill ends. Inter-token latency is observed
once per forward that gives a request tokens, as vLLM does: a plain request observes it for each
token after its first, a speculative one once per round (the round's tokens arrive together).
"""

from __future__ import annotations

import sys
import threading
from collections import deque
from typing import Any, Protocol

from ..generation.engine import BatchEngine, EngineLoad, EngineRequest, Sent

TTFT_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0),
)
ITL_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75),
    *(1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0),
)
REQUEST_BUCKETS = (
    *(0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0),
    *(120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0),
)
# vLLM's finish reasons: stop and length end a generation, abort is a client that went away,
# error a model failure
FINISH_REASONS = ("stop", "length", "abort", "error")
TRITON_FLUSH_S = 0.25  # how often the Triton sink applies the engine's updates


def token_buckets(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's buckets of per-request token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Gauge(Protocol):
    def set(self, value: float) -> None: ...


class Histogram(Protocol):
    def observe(self, amount: float) -> None: ...


class Sink(Protocol):
    """Makes metrics: one series of the family `name` with these label values."""

    def counter(self, name: str, doc: str, labels: dict[str, str]) -> Counter: ...

    def gauge(self, name: str, doc: str, labels: dict[str, str]) -> Gauge: ...

    def histogram(
        self, name: str, doc: str, labels: dict[str, str], buckets: tuple | list
    ) -> Histogram: ...


class EngineMetrics:
    """The engine's metrics, vLLM's names; attach with `engine.observer = EngineMetrics(...)`.

    `engine_label`: the `engine` label (vLLM's engine index; a Triton model instance's name, as
    each instance runs an engine of its own). Counter names are given without `_total`: the
    sink adds it (prometheus_client does)."""

    def __init__(self, engine: BatchEngine, sink: Sink, model_name: str, engine_label: str = "0"):
        self.engine = engine
        labels = {"model_name": model_name, "engine": engine_label}

        def counter(name: str, doc: str, **extra: str) -> Counter:
            return sink.counter(name, doc, {**labels, **extra})

        def gauge(name: str, doc: str) -> Gauge:
            return sink.gauge(name, doc, labels)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return sink.histogram(name, doc, labels, buckets)

        self.running = gauge(
            "vllm:num_requests_running", "Requests admitted to the engine: prefilling or decoding."
        )
        self.waiting = gauge(
            "vllm:num_requests_waiting",
            "Requests queued until a batch slot (max_batch) or KV budget frees up.",
        )
        self.kv_usage = gauge(
            "vllm:kv_cache_usage_perc",
            "Share of the KV-cache budget (without one: max_batch rows of the context) the "
            "admitted requests take at their longest; 1 means 100 percent.",
        )
        self.prompt_tokens = counter(
            "vllm:prompt_tokens", "Prompt tokens of requests whose prefill ended (cached included)."
        )
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.success = {
            reason: counter(
                "vllm:request_success",
                "Requests ended, by finished_reason (abort: the client went away; error: the "
                "model failed).",
                finished_reason=reason,
            )
            for reason in FINISH_REASONS
        }
        # read from the engine's cumulative counts at each step
        self.totals = {
            "abort": self.success["abort"],
            "error": self.success["error"],
            "prefix_queries": counter(
                "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache."
            ),
            "prefix_hits": counter(
                "vllm:prefix_cache_hits", "Prompt tokens whose KV the prefix cache held."
            ),
            "drafts": counter(
                "vllm:spec_decode_num_drafts",
                "Speculative rounds (drafts verified in one forward) of finished requests.",
            ),
            "draft_tokens": counter(
                "vllm:spec_decode_num_draft_tokens", "Tokens drafted for finished requests."
            ),
            "accepted_tokens": counter(
                "vllm:spec_decode_num_accepted_tokens",
                "Drafted tokens the model accepted, of finished requests.",
            ),
        }
        self.seen = self._totals()
        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Time from a request's arrival to its first token, in seconds.",
            TTFT_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Time between a request's successive forwards that gave it tokens, in seconds.",
            ITL_BUCKETS,
        )
        requests = {
            "e2e": ("vllm:e2e_request_latency_seconds", "Arrival to last token, in seconds."),
            "queue": ("vllm:request_queue_time_seconds", "Time queued before admission."),
            "prefill": ("vllm:request_prefill_time_seconds", "Admission to first token."),
            "decode": ("vllm:request_decode_time_seconds", "First token to last token."),
            "inference": ("vllm:request_inference_time_seconds", "Admission to last token."),
        }
        self.latency = {
            key: histogram(name, doc, REQUEST_BUCKETS) for key, (name, doc) in requests.items()
        }
        tokens = token_buckets(engine.max_context)
        self.request_prompt = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens of each finished request.", tokens
        )
        self.request_generation = histogram(
            "vllm:request_generation_tokens", "Tokens generated by each finished request.", tokens
        )
        self.load: EngineLoad | None = None
        self._failed = False

    def on_step(self, engine: BatchEngine, sent: list[Sent]) -> None:
        """The engine's hook, after each step (its worker thread)."""
        try:
            self._record(sent)
            self.refresh()
        except Exception as e:  # metrics must never stop the engine
            if not self._failed:
                self._failed = True
                print(
                    f"warning: metrics stopped recording ({type(e).__name__}: {e})", file=sys.stderr
                )

    def refresh(self) -> None:
        """Set the load gauges to the engine's state now (thread-safe)."""
        load = self.engine.load()
        if load != self.load:
            self.load = load
            self.running.set(load.running)
            self.waiting.set(load.waiting)
            self.kv_usage.set(load.kv_usage)

    def _record(self, sent: list[Sent]) -> None:
        generated = prompt = 0
        latest: dict[EngineRequest, float] = {}  # requests given tokens after their first
        finished = []
        for request, at, delta in sent:
            if delta.token_id is not None:
                generated += 1
            if request.first_token_at is None:  # the step that ended its prefill
                prompt += len(request.prompt_ids)
                request.first_token_at = request.last_token_at = at
                if delta.token_id is not None:  # (none: its prompt was only scored)
                    self.ttft.observe(at - request.arrived)
            elif delta.token_id is not None:
                latest[request] = at  # a step gives a request one forward's tokens
            if delta.finish_reason is not None:
                finished.append((request, at, delta.finish_reason))
        for request, at in latest.items():
            self.itl.observe(at - request.last_token_at)
            request.last_token_at = at
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)
        for request, at, reason in finished:
            self._finished(request, at, reason)
        totals = self._totals()
        for key, value in totals.items():
            if value > self.seen[key]:
                self.totals[key].inc(value - self.seen[key])
        self.seen = totals

    def _finished(self, request: EngineRequest, at: float, reason: str) -> None:
        if reason in self.success:
            self.success[reason].inc()
        admitted = request.admitted if request.admitted is not None else request.arrived
        first = request.first_token_at
        for key, seconds in (
            ("e2e", at - request.arrived),
            ("queue", admitted - request.arrived),
            ("prefill", first - admitted),
            ("decode", at - first),
            ("inference", at - admitted),
        ):
            self.latency[key].observe(seconds)
        self.request_prompt.observe(len(request.prompt_ids))
        self.request_generation.observe(len(request.state.completion_ids))

    def _totals(self) -> dict[str, int]:
        """The engine's cumulative counts behind the counters it does not report per step."""
        engine, cache = self.engine, self.engine.prefix_cache
        return {
            "abort": engine.stats["cancelled"],
            "error": engine.stats["failed"],
            "prefix_queries": cache.prompt_tokens if cache is not None else 0,
            "prefix_hits": cache.cached_tokens if cache is not None else 0,
            "drafts": engine.speculative.forwards,
            "draft_tokens": engine.speculative.drafted,
            "accepted_tokens": engine.speculative.accepted,
        }


class PrometheusSink:
    """prometheus_client metrics in a registry of their own (servers in one process, as in the
    tests, do not collide), exposed in Prometheus' text format by `exposition`."""

    def __init__(self):
        import prometheus_client

        self._client = prometheus_client
        self.registry = prometheus_client.CollectorRegistry()
        self.content_type = prometheus_client.CONTENT_TYPE_LATEST
        self._families: dict[str, Any] = {}

    def _series(self, kind, name: str, doc: str, labels: dict[str, str], **options):
        family = self._families.get(name)
        if family is None:
            family = kind(name, doc, list(labels), registry=self.registry, **options)
            self._families[name] = family
        return family.labels(**labels)

    def counter(self, name: str, doc: str, labels: dict[str, str]) -> Counter:
        return self._series(self._client.Counter, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: dict[str, str]) -> Gauge:
        return self._series(self._client.Gauge, name, doc, labels)

    def histogram(self, name: str, doc: str, labels: dict[str, str], buckets) -> Histogram:
        return self._series(self._client.Histogram, name, doc, labels, buckets=buckets)

    def exposition(self) -> bytes:
        return self._client.generate_latest(self.registry)


class _Queued:
    """A Triton metric whose updates wait in the sink's queue."""

    def __init__(self, queue: deque, metric, method: str):
        self._queue, self._metric, self._method = queue, metric, method

    def _put(self, value: float = 1) -> None:
        self._queue.append((self._metric, self._method, value))  # deque.append: thread-safe

    inc = set = observe = _put


class TritonSink:
    """Triton's custom metrics (`pb_utils.MetricFamily`, on Triton's metrics port, default
    8002). Each call into a Triton metric is a round trip to the server process (~40 us
    measured), too slow for the engine's step: the engine only queues its updates and a daemon
    thread applies them every `interval` seconds (counters summed, gauges' last value)."""

    def __init__(self, pb_utils, interval: float = TRITON_FLUSH_S):
        self.pb_utils = pb_utils
        self.interval = interval
        self._families: dict[str, Any] = {}
        self._metrics: list = []
        self._queue: deque = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qwen-deploy-metrics", daemon=True)
        self._thread.start()

    def _series(self, kind, name: str, doc: str, labels: dict[str, str], method: str, **options):
        family = self._families.get(name)
        if family is None:
            family = self.pb_utils.MetricFamily(name=name, description=doc, kind=kind)
            self._families[name] = family
        metric = family.Metric(labels=labels, **options)
        self._metrics.append(metric)
        return _Queued(self._queue, metric, method)

    def counter(self, name: str, doc: str, labels: dict[str, str]) -> Counter:
        kind = self.pb_utils.MetricFamily.COUNTER
        return self._series(kind, f"{name}_total", doc, labels, "increment")

    def gauge(self, name: str, doc: str, labels: dict[str, str]) -> Gauge:
        return self._series(self.pb_utils.MetricFamily.GAUGE, name, doc, labels, "set")

    def histogram(self, name: str, doc: str, labels: dict[str, str], buckets) -> Histogram:
        kind = self.pb_utils.MetricFamily.HISTOGRAM
        return self._series(kind, name, doc, labels, "observe", buckets=list(buckets))

    def flush(self) -> None:
        """Apply the queued updates."""
        sums: dict[int, list] = {}  # id(metric) -> [metric, method, value]
        observed = []
        while self._queue:
            metric, method, value = self._queue.popleft()
            if method == "observe":
                observed.append((metric, value))
            elif method == "increment" and id(metric) in sums:
                sums[id(metric)][2] += value
            else:  # a gauge keeps its last value
                sums[id(metric)] = [metric, method, value]
        for metric, method, value in sums.values():
            getattr(metric, method)(value)
        for metric, value in observed:
            metric.observe(value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        """Stop the thread after a last flush; release the metrics before their families (as
        Triton requires)."""
        self._stop.set()
        self._thread.join()
        self.flush()
        self._metrics.clear()
        self._families.clear()
