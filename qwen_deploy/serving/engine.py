"""Continuous batching: one worker thread runs the model, requests join and leave between steps.

The running requests are one runtime.decode.Batch on the generator's backend (onnxruntime or a
TensorRT engine): per layer a cache tensor [batch, kv_heads, length, head_dim] on the device,
left-padded, with an attention mask marking real positions; with onnxruntime's gqa form decode
steps extend one preallocated buffer in place, so a step copies no cache (batch 8 at 1024-token
prompts on 0.5B: 52 vs 44 tok/s through host arrays). A step (1) drops finished and cancelled rows
and trims all-padding left columns, (2) prefills newcomers without past (several at once,
left-padded, within a token budget) and merges them into the running batch by left-padding the
shorter cache to the common length (both rebuild the cache through host arrays: a copy per join
or leave, not per token), and (3) decodes one token (seq=1) for every running row. Prefill never
runs a batch>1 chunk with past, which onnxruntime's GroupQueryAttention does not support.

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
from collections import deque
from collections.abc import AsyncIterator, Callable

import numpy as np

from ..errors import QwenDeployError
from ..generation.generator import Generator
from ..generation.requests import PreparedRequest
from ..generation.sequence import SequenceState, StreamDelta
from ..generation.speculative import Drafter, Speculation, SpeculativeStats
from ..runtime.decode import Batch

Emit = Callable[[StreamDelta | BaseException], None]
BOUND_HEADROOM = 256  # positions a rebuilt running cache can grow before it is moved
_CANCELLED = object()


@dataclasses.dataclass(eq=False)
class EngineRequest:
    """One request inside the engine: its sequence state and where its deltas go."""

    id: int
    prompt_ids: list[int]
    state: SequenceState
    emit: Emit
    cancelled: bool = False
    pending: int | None = None  # last sampled token, fed to the model at the next decode step
    drafter: Drafter | None = None  # speculative decoding on a batch of its own
    draft_tokens: int | None = None
    speculation: Speculation | None = None  # made at its first round
    speculative: SpeculativeStats = dataclasses.field(default_factory=SpeculativeStats)

    @property
    def done(self) -> bool:
        return self.cancelled or self.state.finished


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
        prefill_tokens: int = 512,
        max_context: int | None = None,
    ):
        """max_context: tokens per sequence (prompt + output), at most the model's positions;
        prefill_tokens: padded tokens per prefill call (bounds its activation memory); max_batch
        is lowered to what the backend runs at once (a TensorRT engine's --max-batch).
        """
        limit = generator.max_context
        if max_batch < 1:
            raise QwenDeployError(f"max_batch must be >= 1 (got {max_batch}).")
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
        self.manifest = generator.manifest
        self.max_batch = max_batch
        self.prefill_tokens = max(1, prefill_tokens)
        self.max_context = max_context or limit
        self.pad_id = generator.pad_id
        self.stats = {"finished": 0, "cancelled": 0, "failed": 0, "steps": 0, "peak_batch": 0}
        self.speculative = SpeculativeStats()  # totals over finished speculative requests
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: deque[EngineRequest] = deque()
        self._prefilling: list[EngineRequest] = []  # admitted, not yet in the running batch
        self._running: list[EngineRequest] = []
        self._speculating: list[EngineRequest] = []  # each on a one-row batch of its own
        self._batch: Batch | None = None  # the running requests' rows
        self._thread: threading.Thread | None = None
        self._closed = False

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
    ) -> EngineRequest:
        """Queue a request (generator.prepare); it joins the running batch at the next step (with
        a `drafter`: it is decoded speculatively, `draft_tokens` per round, on its own batch).
        Its max_tokens is clipped to this engine's context; a prompt that fills it is refused
        (ContextLengthError). Thread-safe."""
        params = self.generator.check_context(request.prompt_ids, request.params, self.max_context)
        state = SequenceState(
            request.prompt_ids, params, self.generator.tokenizer, request.reasoning
        )
        ids = list(request.prompt_ids)
        queued = EngineRequest(
            next(self._ids), ids, state, emit, drafter=drafter, draft_tokens=draft_tokens
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
    ) -> EngineStream:
        """Queue a prepared request from asyncio code (as `add`); iterate the returned stream
        for its deltas."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item: StreamDelta | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        return EngineStream(self, self.add(request, emit, drafter, draft_tokens), queue)

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
                while not (self._closed or self._waiting or self._running or self._speculating):
                    self._cond.wait()
                if self._closed:
                    return
            self.step()

    # -- one scheduling step -----------------------------------------------------------------
    def step(self) -> bool:
        """Drop done rows, admit and prefill newcomers, decode one token (one speculative round
        for each speculative request); True if work remains."""
        self._drop_done()
        newcomers = self._admit()
        try:
            if newcomers:
                self._prefill(newcomers)
            if self._running:
                self._decode()
                self.stats["steps"] += 1
        except Exception as e:  # a model failure ends the affected requests, not the server
            self._fail([*newcomers, *self._running], e)
        for request in self._speculating:
            self._speculate(request)
        self._drop_done()
        with self._cond:
            return bool(self._waiting or self._running or self._speculating)

    def _admit(self) -> list[EngineRequest]:
        with self._cond:
            for request in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(request)
                self._count_cancelled(request)
            busy = len(self._running) + len(self._speculating)
            admitted = [
                self._waiting.popleft()
                for _ in range(min(self.max_batch - busy, len(self._waiting)))
            ]
            self._speculating += [r for r in admitted if r.drafter]
            self._prefilling = [r for r in admitted if not r.drafter]
            return list(self._prefilling)

    def _prefill(self, newcomers: list[EngineRequest]) -> None:
        """Prefill newcomers in groups within the token budget, sample their first tokens, merge."""
        group: list[EngineRequest] = []
        for request in sorted(newcomers, key=lambda r: len(r.prompt_ids)):
            longest = max([len(request.prompt_ids), *(len(r.prompt_ids) for r in group)])
            if group and longest * (len(group) + 1) > self.prefill_tokens:
                self._prefill_group(group)
                group = []
            group.append(request)
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[EngineRequest]) -> None:
        """Prefill a group without past (one long prompt in chunks of `prefill_tokens`, bounding
        its activations), sample each row's first token, move the live rows into the batch."""
        prompts = [r.prompt_ids for r in group]
        batch = Batch(self.backend, len(group))
        chunk = self.prefill_tokens if len(group) == 1 else None
        logits = batch.prefill(prompts, self.pad_id, chunk=chunk)[:, -1]
        for row, request in enumerate(group):
            self._sample(request, logits[row])
        live = [i for i, r in enumerate(group) if not r.done]
        if live and self._batch is None:
            batch.keep(live, batch.length + BOUND_HEADROOM)
            self._batch = batch
        elif live:
            width = max(self._batch.length, batch.length)
            self._batch.merge(batch, width + BOUND_HEADROOM, rows=live)
        with self._cond:
            for request in group:
                self._prefilling.remove(request)
                if request.cancelled:
                    self._count_cancelled(request)
            self._running.extend(group[i] for i in live)
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self._running))

    def _speculate(self, request: EngineRequest) -> None:
        """One round of a speculative request (the first one prefills its own batch)."""
        if request.done:
            return
        try:
            if request.speculation is None:
                longest = len(request.prompt_ids) + (request.state.params.max_tokens or 0)
                batch = Batch(self.backend, 1, min(longest, self.max_context))
                request.speculation = Speculation(
                    batch, request.state, request.drafter, request.draft_tokens, request.speculative
                )
            for delta in request.speculation.round():
                self._send(request, delta)
        except Exception as e:  # this request fails alone
            self._fail([request], e, reset=False)
            return
        if request.state.finished:
            self.stats["finished"] += 1
            self.speculative.add(request.speculative)

    def _decode(self) -> None:
        logits = self._batch.step([r.pending for r in self._running])
        for row, request in enumerate(self._running):
            if not request.cancelled:
                self._sample(request, logits[row])

    def _sample(self, request: EngineRequest, logits: np.ndarray) -> None:
        token = request.state.sampler(logits)
        request.pending = token
        delta = request.state.append(token)
        if request.cancelled:
            return
        self._send(request, delta)
        if request.state.finished:
            self.stats["finished"] += 1

    def _drop_done(self) -> None:
        """Slice finished and cancelled rows out of the batch; trim all-padding left columns;
        forget finished speculative requests (and their batches)."""
        with self._cond:
            for request in [r for r in self._speculating if r.done]:
                self._speculating.remove(request)
                if request.cancelled:
                    self._count_cancelled(request)
        if not any(r.done for r in self._running):
            return
        keep = [i for i, r in enumerate(self._running) if not r.done]
        with self._cond:
            for request in self._running:
                if request.cancelled:
                    self._count_cancelled(request)
            self._running = [self._running[i] for i in keep]
        if not keep:
            self._batch = None
            return
        self._batch.keep(keep, self._batch.length + BOUND_HEADROOM)

    def _count_cancelled(self, request: EngineRequest) -> None:
        if not request.state.finished:
            self.stats["cancelled"] += 1

    def _fail(self, requests: list[EngineRequest], error: Exception, reset: bool = True) -> None:
        """Send `error` to every affected request and (unless `reset` is False: a speculative
        request failing alone) reset the batch."""
        if not isinstance(error, QwenDeployError):
            error = QwenDeployError(
                f"the model failed on this batch ({type(error).__name__}: "
                f"{error}); the request was dropped, please retry."
            )
        for request in requests:
            if not request.done:
                self._send(request, error)
                self.stats["failed"] += 1
                request.cancelled = True
        if not reset:
            return
        with self._cond:
            self._prefilling, self._running = [], []
        self._batch = None

    @staticmethod
    def _send(request: EngineRequest, item: StreamDelta | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the client's event loop is already closed
            request.emit(item)
