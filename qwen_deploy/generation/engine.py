"""Continuous batching: one worker thread runs the model, requests join and leave between steps.

The running requests are one runtime.decode.Batch on the generator's backend (onnxruntime or a
TensorRT engine): per layer a cache tensor [batch, kv_heads, length, head_dim] on the device, with
an attention mask marking real positions. With onnxruntime's gqa form the rows keep lengths of their
own (right-padded) and decode steps extend one preallocated buffer in place, so a step copies no
cache and a row's logits do not depend on its batch mates (batch invariance); other forms and
TensorRT left-pad the rows. A step (1) drops finished and cancelled rows and trims all-padding
columns, (2) prefills up to `prefill_chunk` prompt tokens (PREFILL_CHUNK_ALONE while no request
decodes), first come first served, each request on a one-row batch of its own (starting from the
longest cached prefix of its prompt), so a long prompt arrives in chunks beside the running rows'
decode steps instead of stalling them, (3) moves requests whose prompt is complete into the running
batch (rows of their own length on onnxruntime CPU: the newcomer's positions copied into a free
row slot, the running batch having room for max_batch rows; otherwise a copy of each row's
cached positions through host arrays per join or leave, left-padded layouts padding the shorter
rows to the common length), and (4) decodes one token (seq=1) for every running row. Where the
backend runs mixed steps (runtime/mixed_step.py: rows of their own length on onnxruntime CPU), the
first prefilling request's chunk runs inside that decode forward, so a newcomer costs the running
rows what a larger batch costs, not a forward of its own.
A prompt's tokens give the same logits however its prefill is chunked (one row, chunks of two or
more tokens) and whichever forward carries a chunk, so neither the chunking, the mixing nor a
prefix-cache hit changes what a request generates.

A request with a drafter (speculative decoding) runs on a one-row batch of its own: each step
gives it one round (draft up to k tokens, verify them in one forward), next to the batched decode
of the others; it takes one of the max_batch slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import QwenDeployError
from ..manifest import ROW_INDEPENDENT_BLOCK, Manifest
from ..runtime.decode import Batch
from ..runtime.prefix_cache import PrefixCache
from .requests import PreparedRequest
from .sampling import TokenLogprob, token_logprob
from .sequence import SequenceState, StreamDelta
from .speculative import Drafter, Speculation, SpeculativeStats

if TYPE_CHECKING:  # the generator drives its requests through an engine of its own
    from .generator import Generator

Emit = Callable[[StreamDelta | BaseException], None]
BOUND_HEADROOM = 256  # positions a rebuilt running cache can grow before it is moved
PREFILL_CHUNK = 16  # prompt tokens per step beside decoding rows: what a newcomer slows them by
PREFILL_CHUNK_ALONE = 256  # prompt tokens per step while no request decodes
PREFIX_CACHE_GB = 1.0  # a server's default room for earlier prompts' KV
ECHO_CHUNK = 64  # echo's chunks hold every position's logits: [chunk, vocab] float32
_CANCELLED = object()


@dataclasses.dataclass(eq=False)
class EngineRequest:
    """One request inside the engine: its sequence state and where its deltas go."""

    id: int
    prompt_ids: list[int]
    state: SequenceState
    emit: Emit
    cancelled: bool = False
    failed: bool = False
    pending: int | None = None  # last sampled token, fed to the model at the next decode step
    drafter: Drafter | None = None  # speculative decoding on a batch of its own
    draft_tokens: int | None = None
    speculation: Speculation | None = None  # made when its prefill ends
    speculative: SpeculativeStats = dataclasses.field(default_factory=SpeculativeStats)
    # prefill: the request's own one-row batch and how much of the prompt it holds
    prefill: Batch | None = None
    prefilled: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    # echo: each prompt token's logprob and `prompt_top` alternatives, filled during its prefill
    prompt_top: int | None = None
    prompt_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    # timing (time.perf_counter) for the engine's observer: queued, admitted, its tokens
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    admitted: float | None = None
    first_token_at: float | None = None  # set by the observer
    last_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.cancelled or self.failed or self.state.finished


Sent = tuple[EngineRequest, float, StreamDelta]  # a delta as the observer sees it, time sent


@dataclasses.dataclass(frozen=True)
class EngineLoad:
    """The engine now: requests admitted (prefilling or decoding), requests queued, and the share
    of its KV capacity (the budget; without one, max_batch rows of max_context) that the admitted
    requests' caches take at their longest."""

    running: int
    waiting: int
    kv_usage: float


class EngineObserver(Protocol):
    """Told what the engine did (serving/metrics.py): on the worker thread, once per step, with
    the deltas the step sent, in order. The next step waits for it: keep it short."""

    def on_step(self, engine: BatchEngine, sent: list[Sent]) -> None: ...


class EngineStream:
    """Async iterator of one request's StreamDelta; closing it early cancels the request."""

    def __init__(self, engine: BatchEngine, request: EngineRequest, queue: asyncio.Queue):
        self.engine = engine
        self.request = request
        self._queue = queue
        self._finished = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def state(self) -> SequenceState:
        return self.request.state

    @property
    def speculative(self) -> SpeculativeStats | None:
        """Acceptance statistics when the request was decoded speculatively."""
        return self.request.speculative if self.request.drafter else None

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self

    async def __anext__(self) -> StreamDelta:
        if self._finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _CANCELLED:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        if item.finish_reason is not None:
            self._finished = True
        return item

    def cancel(self) -> None:
        """Free the request's batch slot (a client went away); no more deltas arrive."""
        if not self._finished:
            self._finished = True
            self.engine.cancel(self.request)
            self._queue.put_nowait(_CANCELLED)  # wakes a consumer waiting in __anext__


class BatchEngine:
    """Runs many requests on one Generator's backend, batching their decode steps.

    Use `submit` from asyncio code (the worker thread must be running: `start()`), or drive it
    synchronously with `add` + `step` (tests, benchmarks).
    """

    def __init__(
        self,
        generator: Generator,
        max_batch: int = 8,
        prefill_chunk: int = PREFILL_CHUNK,
        max_context: int | None = None,
        prefix_cache_bytes: int = 0,
        kv_budget_bytes: int | None = None,
        batch_invariant: bool | None = None,
    ):
        """max_context: tokens per sequence (prompt + output), at most the model's positions;
        prefill_chunk: prompt tokens prefilled per step, between the running rows' decode steps
        (what a long prompt can delay them by); max_batch is lowered to what the backend runs at
        once (a TensorRT engine's --max-batch); prefix_cache_bytes: host memory for the KV of
        earlier prompts (0: no prefix cache); kv_budget_bytes: what the requests' caches may
        take at their longest (None: no limit): a request that would pass it waits for rows to
        leave, one that cannot fit alone is refused; batch_invariant: True requires rows of
        their own length (a request's logits then do not depend on its batch mates), False
        left-pads them, None (default) keeps own lengths where the backend has them."""
        limit = generator.max_context
        if max_batch < 1:
            raise QwenDeployError(f"max_batch must be >= 1 (got {max_batch}).")
        if prefill_chunk < 2:
            raise QwenDeployError(f"prefill_chunk must be >= 2 tokens (got {prefill_chunk}).")
        # a TensorRT engine runs at most the batch it was built for; more requests wait
        max_batch = min(max_batch, generator.backend.capabilities.max_batch or max_batch)
        if max_context is not None and not 1 < max_context <= limit:
            raise QwenDeployError(
                f"max_context must be in [2, {limit}] (the positions the model and its backend "
                "hold), "
                f"got {max_context}."
            )
        self.generator = generator
        self.backend = generator.backend
        self.own_lengths = own_row_lengths(generator, batch_invariant)
        self.manifest = generator.manifest
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.mixed_steps = self.own_lengths and self.backend.capabilities.mixed_steps
        self.max_context = max_context or limit
        self.pad_id = generator.pad_id
        self.kv_budget = kv_budget_bytes
        self._kv_per_position = self.backend.capabilities.kv_bytes_per_position
        names = [past for past, _ in self.manifest.kv_pairs()]
        self.prefix_cache = PrefixCache(names, prefix_cache_bytes) if prefix_cache_bytes else None
        self.stats = {
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
            "steps": 0,
            "mixed_steps": 0,  # decode steps that carried a prefill chunk (runtime/mixed_step.py)
            "peak_batch": 0,
        }
        self.speculative = SpeculativeStats()  # totals over finished speculative requests
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._prefilling: list[EngineRequest] = []  # admitted, prefilling on batches of their own
        self._running: list[EngineRequest] = []
        self._speculating: list[EngineRequest] = []  # each on a one-row batch of its own
        self._batch: Batch | None = None  # the running requests' rows
        self._thread: threading.Thread | None = None
        self._closed = False
        self.observer: EngineObserver | None = None  # metrics; its deltas are gathered per step
        self._sent: list[Sent] = []

    # -- admission ---------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Requests waiting, prefilling or running (cancelled ones count until dropped)."""
        with self._cond:
            return (
                len(self._waiting)
                + len(self._prefilling)
                + len(self._running)
                + len(self._speculating)
            )

    def add(
        self,
        request: PreparedRequest,
        emit: Emit,
        drafter: Drafter | None = None,
        draft_tokens: int | None = None,
        prompt_logprobs: int | None = None,
        stats: SpeculativeStats | None = None,
    ) -> EngineRequest:
        """Queue a request (generator.prepare); it is prefilled in chunks between decode steps,
        then joins the running batch (with a `drafter`: it is decoded speculatively,
        `draft_tokens` per round, on its own batch, its acceptance counted in `stats`). With
        `prompt_logprobs` (top alternatives, 0-20) every prompt token's logprob is computed in
        the same prefill (`EngineRequest.prompt_logprobs`, complete at the first delta). Its
        max_tokens is clipped to this engine's context; a prompt that fills it is refused
        (ContextLengthError). Thread-safe."""
        params = self.generator.check_context(request.prompt_ids, request.params, self.max_context)
        need = (len(request.prompt_ids) + params.max_tokens) * self._kv_per_position
        if self.kv_budget is not None and need > self.kv_budget:
            raise KVBudgetError(
                f"this request needs {need / 2**20:,.0f} MiB of KV cache "
                f"({len(request.prompt_ids)} prompt tokens + max_tokens {params.max_tokens}), more "
                f"than the server's {self.kv_budget / 2**20:,.0f} MiB; lower max_tokens or "
                "shorten the prompt."
            )
        state = SequenceState(
            request.prompt_ids, params, self.generator.tokenizer, request.reasoning
        )
        queued = EngineRequest(
            next(self._ids),
            list(request.prompt_ids),
            state,
            emit,
            drafter=drafter,
            draft_tokens=draft_tokens,
            speculative=stats or SpeculativeStats(),
            prompt_top=prompt_logprobs,
        )
        with self._cond:
            if self._closed:
                raise QwenDeployError("the engine is shut down.")
            self._waiting.append(queued)
            self._cond.notify()
        return queued

    async def submit(
        self,
        request: PreparedRequest,
        drafter: Drafter | None = None,
        draft_tokens: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> EngineStream:
        """Queue a prepared request from asyncio code (as `add`); iterate the returned stream
        for its deltas."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item: StreamDelta | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        queued = self.add(request, emit, drafter, draft_tokens, prompt_logprobs)
        return EngineStream(self, queued, queue)

    def cancel(self, request: EngineRequest) -> None:
        """Mark a request cancelled; the worker frees its slot before the next decode step."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    # -- the worker thread -------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="qwen-deploy-engine", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        """Stop the worker; requests still in flight get an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            left = [*self._waiting, *self._prefilling, *self._running, *self._speculating]
            self._waiting.clear()
            self._prefilling, self._running, self._speculating = [], [], []
        for request in left:
            if not request.done:
                self._send(request, QwenDeployError("the server is shutting down."))
        self._batch = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self.active):
                    self._cond.wait()
                if self._closed:
                    return
            self.step()

    # -- one scheduling step -----------------------------------------------------------------
    def step(self) -> bool:
        """Drop done rows, admit newcomers, prefill up to `prefill_chunk` prompt tokens, decode
        one token for the running rows (one speculative round for each speculative request);
        True if work remains."""
        self._drop_done()
        self._admit()
        work = self._prefill_chunks()
        mixed = work.pop(0) if work and self._running and self._mixes(work[0][0]) else None
        for request, tokens in work:
            try:
                self._prefill(request, tokens)
            except Exception as e:  # this request fails alone
                self._fail([request], e)
        if self._running:
            try:
                self._decode(mixed)
                self.stats["steps"] += 1
            except Exception as e:  # a model failure ends the batch's requests, not the server
                self._fail(list(self._running) + ([mixed[0]] if mixed else []), e)
                with self._cond:
                    self._running = []
                self._batch = None
        for request in self._speculating:
            self._speculate(request)
        self._drop_done()
        if self.observer is not None:
            sent, self._sent = self._sent, []
            self.observer.on_step(self, sent)
        return bool(self.active)

    def _admit(self) -> None:
        with self._cond:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                self._count_cancelled(request)
            busy = len(self._running) + len(self._speculating) + len(self._prefilling)
            while self._waiting and busy < self.max_batch and self._fits(self._waiting[0]):
                self._prefilling.append(self._waiting.popleft())
                self._prefilling[-1].admitted = time.perf_counter()
                busy += 1

    def _fits(self, newcomer: EngineRequest) -> bool:
        """Whether the caches stay within the KV budget at their longest with `newcomer` in:
        the batch's rows are all as long as its longest, a speculative request's are its own.
        The first request always fits (add refused what cannot fit alone)."""
        if self.kv_budget is None or not self.active - len(self._waiting):
            return True
        batched = [*self._running, *self._prefilling]
        own = list(self._speculating)
        (own if newcomer.drafter else batched).append(newcomer)
        return _reserved(batched, own) * self._kv_per_position <= self.kv_budget

    def load(self) -> EngineLoad:
        """Requests running and waiting, and the KV capacity they take (thread-safe)."""
        with self._cond:
            batched = [*self._running, *self._prefilling]
            own = list(self._speculating)
            waiting = len(self._waiting)
        if self.kv_budget is not None:
            capacity = self.kv_budget // max(self._kv_per_position, 1)
        else:
            capacity = self.max_batch * self.max_context
        usage = _reserved(batched, own) / capacity if capacity else 0.0
        return EngineLoad(len(batched) + len(own), waiting, min(usage, 1.0))

    def _prefill_chunks(self) -> list[tuple[EngineRequest, int]]:
        """This step's prefill work, first come first served: (request, tokens) within the
        budget. A chunk never leaves a prompt's last token alone: a one-token forward rounds
        differently from the same position in a longer chunk."""
        work, budget = [], self.prefill_chunk
        if not (self._running or self._speculating):  # nobody to delay: fewer, larger forwards
            budget = max(budget, PREFILL_CHUNK_ALONE)
        for request in list(self._prefilling):
            if budget < 2 or request.done:
                continue
            if request.prefill is None:
                self._start_prefill(request)
            remaining = len(request.prompt_ids) - request.prefilled
            take = min(remaining, budget, ECHO_CHUNK if request.prompt_top is not None else budget)
            if remaining - take == 1:
                take = take - 1 if take > 2 else remaining
            work.append((request, take))
            budget -= take
        return work

    def _start_prefill(self, request: EngineRequest) -> None:
        """The request's own one-row batch, from the longest cached prefix of its prompt (at
        least two tokens left to prefill; none for echo, which needs every position's
        logits)."""
        cached = None
        # room for the whole prompt and the running batch's headroom: chunks write in place
        # and the batch it starts needs no copy
        capacity = self._room(len(request.prompt_ids))
        if self.prefix_cache is not None and request.prompt_top is None:
            length, cached = self.prefix_cache.lookup(
                request.prompt_ids, len(request.prompt_ids) - 2
            )
        if cached is None:
            request.prefill = Batch(self.backend, 1, capacity, self.own_lengths)
            return
        request.prefill = Batch.resume(self.backend, cached, capacity, self.own_lengths)
        request.prefilled = request.cached_tokens = length

    def _mixes(self, request: EngineRequest) -> bool:
        """Whether the request's next chunk runs inside the running rows' decode step (not echo,
        whose chunks keep every position's logits)."""
        return self.mixed_steps and request.prompt_top is None

    def _chunk(self, request: EngineRequest, take: int) -> np.ndarray:
        """The next `take` tokens of a request's prompt, [1, take]."""
        start = request.prefilled
        return np.array([request.prompt_ids[start : start + take]], np.int64)

    def _prefill(self, request: EngineRequest, take: int) -> None:
        """`take` more tokens of a request's prompt on its own forward."""
        echo = request.prompt_top is not None
        logits = request.prefill.extend(self._chunk(request, take), last_only=not echo)[0]
        if echo:
            self._score_prompt(request, request.prefilled, logits)
        self._prefilled(request, take, logits)

    def _prefilled(self, request: EngineRequest, take: int, logits: np.ndarray) -> None:
        """After `take` more tokens of a request's prompt (`logits`: [positions, vocab], the last
        is the next token's); after the last chunk, its first token and its move into the
        running batch (or onto its speculative batch)."""
        request.prefilled += take
        if request.prefilled < len(request.prompt_ids):
            return
        batch, request.prefill = request.prefill, None
        if self.prefix_cache is not None:
            self.prefix_cache.insert(request.prompt_ids, self.backend.cache_arrays(batch.cache))
        with self._cond:
            self._prefilling.remove(request)
        if request.state.params.max_tokens == 0:  # the prompt was only to be scored (echo)
            self._send(request, request.state.end("length"))
            self._finish_if_done(request)
            return
        if request.drafter is not None:
            longest = len(request.prompt_ids) + (request.state.params.max_tokens or 0)
            batch.keep([0], min(longest, self.max_context))  # a cache sized for its run
            request.speculation = Speculation(
                batch, request.state, request.drafter, request.draft_tokens, request.speculative
            )
            self._send(request, request.speculation.begin(logits[-1]))
            self._finish_if_done(request)
            with self._cond:
                self._speculating.append(request)
            return
        self._sample(request, logits[-1])
        if request.done:
            self._count_cancelled(request)  # cancelled at its first token: it never runs
            return
        if self._batch is None:
            # room for max_batch rows now, while no row decodes: rows that join later are
            # copied in, not the batch
            batch.reserve(self.max_batch, self._room(batch.length))
            self._batch = batch
        else:
            self._batch.merge(batch, self._room(max(self._batch.length, batch.length)))
        with self._cond:
            self._running.append(request)
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._running))

    def _score_prompt(self, request: EngineRequest, start: int, logits: np.ndarray) -> None:
        """Logprobs of the prompt tokens this chunk's logits predict; only they are kept."""
        prompt = request.prompt_ids
        if start == 0:
            request.prompt_logprobs.append(TokenLogprob(prompt[0], None, []))
        for i, row in enumerate(logits):
            if start + i + 1 < len(prompt):
                request.prompt_logprobs.append(
                    token_logprob(row, prompt[start + i + 1], request.prompt_top)
                )

    def _speculate(self, request: EngineRequest) -> None:
        """One round of a speculative request."""
        if request.done:
            return
        try:
            for delta in request.speculation.round():
                self._send(request, delta)
        except Exception as e:  # this request fails alone
            self._fail([request], e)
            return
        self._finish_if_done(request)

    def _finish_if_done(self, request: EngineRequest) -> None:
        if request.state.finished:
            self.stats["finished"] += 1
            self.speculative.add(request.speculative)

    def _decode(self, mixed: tuple[EngineRequest, int] | None) -> None:
        """One token for every running row; with `mixed` (a request and its chunk's length),
        that request's next prefill chunk in the same forward."""
        tokens = [r.pending for r in self._running]
        if mixed is None:
            logits = self._batch.step(tokens)
        else:
            newcomer, take = mixed
            ids = self._chunk(newcomer, take)
            logits, chunk = self._batch.step_with_chunk(tokens, newcomer.prefill, ids)
            self.stats["mixed_steps"] += 1
        running = list(self._running)  # a request that finishes its prefill joins after
        if mixed is not None:
            try:
                self._prefilled(newcomer, take, chunk[None])
            except Exception as e:  # this request fails alone
                self._fail([newcomer], e)
        for row, request in enumerate(running):
            if not request.done:
                self._sample(request, logits[row])

    def _sample(self, request: EngineRequest, logits: np.ndarray) -> None:
        token = request.state.sampler(logits)
        request.pending = token
        delta = request.state.append(token)
        if request.done and not request.state.finished:
            return
        self._send(request, delta)
        if request.state.finished:
            self.stats["finished"] += 1

    def _drop_done(self) -> None:
        """Slice finished and cancelled rows out of the batch; trim all-padding left columns;
        forget finished speculative requests (and their batches) and cancelled prefills."""
        with self._cond:
            for queue in (self._speculating, self._prefilling):
                for request in [r for r in queue if r.done]:
                    queue.remove(request)
                    self._count_cancelled(request)
        if not any(r.done for r in self._running):
            return
        keep = [i for i, r in enumerate(self._running) if not r.done]
        with self._cond:
            for request in self._running:
                self._count_cancelled(request)
            self._running = [self._running[i] for i in keep]
        if not keep:
            self._batch = None
            return
        self._batch.keep(keep, self._room(self._batch.length))

    def _room(self, length: int) -> int:
        """A cache's capacity for rows `length` long: room to grow before it is moved."""
        return min(length + BOUND_HEADROOM, self.max_context)

    def _count_cancelled(self, request: EngineRequest) -> None:
        if request.cancelled and not request.failed and not request.state.finished:
            self.stats["cancelled"] += 1

    def _fail(self, requests: list[EngineRequest], error: Exception) -> None:
        """Send `error` to every affected request, which leaves at the next drop."""
        if not isinstance(error, QwenDeployError):
            error = QwenDeployError(
                f"the model failed on this batch ({type(error).__name__}: "
                f"{error}); the request was dropped, please retry."
            )
        for request in requests:
            if not request.done:
                self._send(request, error)
                self.stats["failed"] += 1
                request.failed = True
                request.prefill = None

    def _send(self, request: EngineRequest, item: StreamDelta | BaseException) -> None:
        if self.observer is not None and isinstance(item, StreamDelta):
            self._sent.append((request, time.perf_counter(), item))
        with contextlib.suppress(RuntimeError):  # the client's event loop is already closed
            request.emit(item)


def own_row_lengths(generator: Generator, batch_invariant: bool | None) -> bool:
    """Whether the engine's rows keep lengths of their own (see BatchEngine); a clear error when
    batch invariance is required of an artifact or backend that cannot give it."""
    capable = generator.backend.capabilities.own_row_lengths
    if batch_invariant:
        require_batch_invariance(generator.manifest, capable)
    return capable if batch_invariant is None else batch_invariant


def require_batch_invariance(manifest: Manifest, own_row_lengths: bool) -> None:
    """A clear error unless rows of their own length and row-independent kernels make the
    artifact's decoding batch invariant."""
    if not (own_row_lengths and manifest.row_independent_kernels):
        raise batch_invariance_error(manifest)


def batch_invariance_error(manifest: Manifest) -> QwenDeployError:
    """Why `manifest`'s artifact cannot decode batch-invariantly, and the fix."""
    if manifest.precision == "fp16":
        return QwenDeployError(
            "batch-invariant decoding needs kernels that compute each row on its own; an fp16 "
            "artifact's matrix products round a row differently beside other rows: export with "
            "--precision fp32 (or quantize it), or leave out --batch-invariant."
        )
    if not manifest.row_independent_kernels:
        q = manifest.quantization
        return QwenDeployError(
            f"batch-invariant decoding needs kernels that compute each row on its own; this "
            f"{q.mode} artifact was quantized with --block-size {q.block_size}, where "
            f"onnxruntime's INT{q.bits} kernel rounds a row differently beside other rows: "
            f"quantize with the default --block-size {ROW_INDEPENDENT_BLOCK[q.mode]}, or leave "
            "out --batch-invariant."
        )
    if manifest.engine is not None:
        what = "a TensorRT engine (its rows are left-padded)"
    elif manifest.attention != "gqa":
        what = f"exported with --attention {manifest.attention} (its rows are left-padded)"
    else:
        what = "exported before the gqa graph kept each row's length"
    return QwenDeployError(
        f"batch-invariant decoding needs a KV cache whose rows keep lengths of their own; this "
        f"artifact is {what}: run an artifact exported by this qwen-deploy with `qwen-deploy "
        "export CHECKPOINT --attention gqa` on onnxruntime, or leave out --batch-invariant."
    )


def _positions(request: EngineRequest) -> int:
    """The positions a request's cache row holds at its longest."""
    return len(request.prompt_ids) + request.state.params.max_tokens


def _reserved(batched: list[EngineRequest], own: list[EngineRequest]) -> int:
    """Cache positions at their longest: a batch's rows are all as long as its longest, a
    speculative request's (`own`) are its own."""
    longest = max((_positions(r) for r in batched), default=0)
    return len(batched) * longest + sum(_positions(r) for r in own)


class KVBudgetError(QwenDeployError):
    """A request whose KV cache alone would exceed the engine's budget."""
