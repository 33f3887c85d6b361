"""OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON, or SSE with `stream: true`
ending in `data: [DONE]`), GET /v1/models, GET /health, GET /metrics (Prometheus: metrics.py).
Streams send one chunk per generated token, so a client can count tokens; with
`stream_options.include_usage` a last chunk carries usage.
Errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}: any error a request
causes is a 4xx naming its parameter; 500 is kept for the server's own failures.

Exposure guards: an API key covers every route but /health and /metrics (the docs too: metrics
tell load and latency, as /health does, and Prometheus scrapers send no key); a keyless server on
loopback answers only loopback Host names (a web page that rebinds its DNS name to 127.0.0.1
cannot reach it); a connection whose request has not fully arrived within `request_timeout` of
opening (or of its previous response) is closed, since uvicorn's keep-alive timer stops at the
first byte and a half-sent request would hold the connection forever.

Nothing blocks the event loop: a request's CPU work (sampling parameters and its grammar,
messages through the chat template, tokenization, the prediction's tokenization, the engine's
admission with its grammar state) runs in a worker thread (`OpenAIServer.off_loop`: daemon
threads, at most PREPARE_THREADS at once, so work that never ends cannot hold the process at
exit), and the chat template renders within a time and size limit (generation/chat_template.py).
The tokenizer's Rust code and llguidance release the GIL; llguidance's vocabulary index does
not (~1-3 s), so `serve` builds it before it listens (`warm_structured`). `serve` stops within
seconds of SIGTERM: shutdown fails the engine's open requests first (a stream ends with an error
chunk, a waiting request gets 503), then waits at most SHUTDOWN_GRACE_S for responses to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import h11
import psutil
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import QwenDeployError
from ..generation.engine import (
    PREFILL_CHUNK,
    PREFIX_CACHE_GB,
    BatchEngine,
    EngineRequest,
    EngineStream,
)
from ..generation.requests import (
    ContextLengthError,
    PreparedRequest,
    TemplateKwargsError,
)
from ..generation.sampling import SamplingParams, TokenLogprob
from ..generation.sequence import StreamDelta
from ..generation.speculative import Drafter, SpeculativeStats, Speculator
from ..generation.structured import grammar_for
from ..generation.tokenizer import Tokenizer
from ..generation.tool_calls import ToolCall, ToolCallStream, ToolError, plan_tools
from ..manifest import Manifest
from .metrics import EngineMetrics, PrometheusSink
from .openai_schema import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FieldError,
    SamplingFields,
    error_body,
    tool_dicts,
)

API_KEY_ENV = "QWEN_DEPLOY_API_KEY"
MAX_BODY_BYTES = 4 * 1024 * 1024  # a full 32k-token context is ~130 KB of text
KEEP_ALIVE_S = 5  # an idle connection between requests is closed after this (uvicorn's default)
KV_MEMORY_SHARE = 0.5  # of the memory free after loading, for the requests' KV by default
REQUEST_TIMEOUT_S = 30.0  # a request's head and body must arrive within this
PREPARE_THREADS = 4  # requests prepared at once off the event loop; more wait their turn
PREPARE_NICE = 10  # their threads' CPU priority: a request's preparation yields to decode steps
MAX_CHOICES = 64  # choices (prompts x n) one request may ask for: the rest of the queue waits
SHUTDOWN_GRACE_S = 2  # after SIGTERM, how long open responses may take to end
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})
# OpenAI's "developer" role is its newer name for "system"; chat templates know only these four
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


async def _events(
    streams: Sequence[EngineStream],
    head: dict,
    include_usage: bool,
    choices: Sequence[Callable[[StreamDelta, int], dict]],
    n: int = 1,
) -> AsyncIterator[str]:
    """SSE chunks, one per delta of any choice as it comes (choice i's carry index i), then the
    optional usage chunk and [DONE]; an error ends the stream with an error chunk."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: EngineStream) -> None:
        try:
            async for d in stream:
                merged.put_nowait((index, d))
        except Exception as e:  # handed to the response
            merged.put_nowait((index, e))
        merged.put_nowait((index, None))

    pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    counts, running = [0] * len(streams), len(streams)
    try:
        while running:
            index, item = await merged.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                yield _sse(error_body(str(item), "server_error"))
                return
            else:
                choice = {**choices[index](item, counts[index]), "index": index}
                counts[index] += item.token_id is not None
                yield _sse({**head, "choices": [choice]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(streams, counts, n)})
        yield _sse("[DONE]")
    finally:
        for task in pumps:
            task.cancel()
        for stream in streams:
            stream.cancel()


class OpenAIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before anything parses it.

    A declared Content-Length is checked up front; otherwise the body is read (up to the limit)
    and replayed to the app, so a chunked upload cannot get past the limit either.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, scope, receive, send) -> None:
        body = error_body(
            f"the request body is larger than this server's limit of {self.limit} bytes "
            "(serve --max-body-bytes).",
            code="request_too_large",
        )
        await JSONResponse(body, 413)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body arrived
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            more = message.get("more_body", False)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # later reads watch for the client disconnecting
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


class HostCheck:
    """ASGI middleware: requests whose Host header is not in `allowed` (names, any port) get 400
    before anything reads them."""

    def __init__(self, app, allowed: Collection[str]):
        self.app, self.allowed = app, frozenset(allowed)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        host = _host_name(raw)
        if host in self.allowed:
            return await self.app(scope, receive, send)
        body = error_body(
            f"Host {raw!r} is not served here: a server without an API key on localhost answers "
            f"only {', '.join(sorted(self.allowed))} (a guard against DNS rebinding); add the "
            "name with --allowed-host, or set --api-key.",
            code="invalid_host",
        )
        await JSONResponse(body, 400)(scope, receive, send)


def _host_name(host: str) -> str:
    """A Host header's name without its port, lowercased ("[::1]:8000" -> "[::1]")."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.partition(":")[0]


def host_allow_list(
    host: str, api_key: str | None, extra: Sequence[str] = ()
) -> frozenset[str] | None:
    """The Host names a server bound to `host` answers; None: any. Only a keyless server on a
    loopback address is restricted: its clients are local, so any other name is a rebinding."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        loopback = False
    if api_key or not loopback:
        return None
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in extra}
    return LOOPBACK_HOSTS | {n.lower() for n in names}


def _timed_h11(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request (head and body) has not
    fully arrived `seconds` after the connection opened or its previous response ended."""

    class TimedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _watch(self) -> None:
            """Arm the deadline while a request is awaited (not re-armed per byte: a slow
            trickle of bytes gets no longer); disarm it once the request is in."""
            awaited = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
            if awaited and self._deadline is None and not self.transport.is_closing():
                self._deadline = self.loop.call_later(seconds, self.transport.close)
            elif not awaited and self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

    return TimedH11


class Server(uvicorn.Server):
    """uvicorn's server that, when shutdown begins (SIGTERM, SIGINT), first fails the engine's
    open requests, so open streams end at once (with an error chunk) instead of holding the
    graceful wait; requests still being prepared get 503."""

    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.openai: OpenAIServer = config.app.state.server

    async def shutdown(self, sockets=None) -> None:
        await self.openai.close()
        await super().shutdown(sockets)


def warm_structured(tokenizer: Tokenizer) -> None:
    """Build llguidance's index of the vocabulary now (~1-3 s with the GIL held: it would stop
    the event loop if the first response_format request built it); nothing without llguidance."""
    with contextlib.suppress(QwenDeployError):
        tokenizer.constraint(grammar_for({"type": "json_object"}))


def server_config(
    app: FastAPI, request_timeout: float = REQUEST_TIMEOUT_S, **options
) -> uvicorn.Config:
    """uvicorn's configuration with this server's connection timeouts."""
    return uvicorn.Config(
        app, http=_timed_h11(request_timeout), timeout_keep_alive=KEEP_ALIVE_S, **options
    )


def artifact_warnings(manifest: Manifest) -> list[str]:
    """What a client should know about the artifact served: a failed quantization gate."""
    quality = manifest.quality
    if quality is None or not quality.failed:
        return []
    failures = "; ".join(quality.failures) or "see `qwen-deploy inspect`"
    return [
        f"this artifact failed its quantization quality gate ({quality.preset}: "
        f"{failures}); its answers may be worse than its source model's: quantize it again "
        "(`quantize` prints what to try) or serve the source artifact."
    ]


def _param_of(error: QwenDeployError) -> str | None:
    """The sampling parameter a SamplingParams error names (its message starts `name=`)."""
    match = re.match(r"(\w+)(=| must)", str(error))
    return (
        match.group(1) if match and match.group(1) in SamplingParams.__dataclass_fields__ else None
    )


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _EngineSSE(StreamingResponse):
    """An SSE response that cancels its engine requests however the response ends."""

    def __init__(self, content: AsyncIterator[str], streams: Sequence[EngineStream]):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
        self.engine_streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.engine_streams:
                stream.cancel()  # no-op when it finished; frees the slot otherwise


class OpenAIServer:
    """The request handling: validation, prompt building, engine submission, response shapes."""

    def __init__(self, engine: BatchEngine, model_name: str, speculator: Speculator | None = None):
        self.engine = engine
        self.generator = engine.generator
        self.speculator = speculator or Speculator(engine.manifest.model.vocab_size)
        self.model_name = model_name
        self.created = int(time.time())
        self.closing = False  # shutdown began: the engine fails what is open, new work gets 503
        self._slots = asyncio.Semaphore(PREPARE_THREADS)
        self._pending: set[asyncio.Future] = set()  # off_loop work being awaited

    async def off_loop(self, work: Callable[[], Any], abandon: Callable[[Any], None] | None = None):
        """`work()` in a daemon worker thread (at most PREPARE_THREADS at once), awaited from the
        event loop; its exception is raised here. `abandon(result)` runs if the awaiting task was
        cancelled before the work ended (a client gone, a shutdown), to release what it made."""
        async with self._slots:
            if self.closing:
                raise _shutting_down()
            loop = asyncio.get_running_loop()
            future = loop.create_future()

            def settle(result: Any, error: BaseException | None) -> None:
                if future.done():  # cancelled, or failed by shutdown
                    if error is None and abandon is not None:
                        abandon(result)
                elif error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            def run() -> None:
                _lower_priority()
                try:
                    outcome = (work(), None)
                except BaseException as e:  # handed to the awaiting task
                    outcome = (None, e)
                try:
                    loop.call_soon_threadsafe(settle, *outcome)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    if outcome[1] is None and abandon is not None:
                        abandon(outcome[0])

            threading.Thread(target=run, name="qwen-deploy-prepare", daemon=True).start()
            self._pending.add(future)
            try:
                return await future
            finally:
                self._pending.discard(future)

    async def close(self) -> None:
        """Shutdown began: refuse new requests, fail the engine's open ones and those being
        prepared (503; what their threads make is released when they end)."""
        self.closing = True
        # the engine's worker ends its current step first (a prefill chunk at most)
        await asyncio.to_thread(self.engine.close)
        for future in list(self._pending):
            if not future.done():
                future.set_exception(_shutting_down())

    def _channel(self) -> tuple[asyncio.Queue, Callable]:
        """An engine request's delta queue on this loop and the thread-safe emit that fills it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(item: StreamDelta | BaseException) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        return queue, emit

    # -- validation ----------------------------------------------------------------------------
    def check_common(self, body: SamplingFields) -> None:
        self.check_model(body.model)

    def check_model(self, model: str | None) -> None:
        """A request naming another model is a 404 (None: the field is optional there)."""
        if model is not None and model != self.model_name:
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                param="model",
                code="model_not_found",
            )

    def choice_count(self, body: SamplingFields, prompts: int = 1) -> int:
        """n, checked, and within MAX_CHOICES with `prompts` prompts."""
        n = 1 if body.n is None else body.n
        if n < 1:
            raise OpenAIError(400, f"n={n} is out of range: it must be an integer >= 1.", param="n")
        if n * prompts > MAX_CHOICES:
            asked = f"{prompts} prompts x n={n}" if prompts > 1 else f"n={n}"
            raise OpenAIError(
                400,
                f"this request asks for {n * prompts} choices ({asked}); this server returns at "
                f"most {MAX_CHOICES} per request: split it into several requests.",
                param="n" if prompts == 1 else "prompt",
            )
        return n

    def sampling_params(self, body: SamplingFields, scoring: bool = False) -> SamplingParams:
        """The request's sampling parameters; max_tokens 0 only where the prompt is scored
        (`scoring`: completions with echo)."""
        try:
            overrides = body.sampling_overrides()
        except FieldError as e:
            raise OpenAIError(400, str(e), param=e.param) from e
        if overrides["max_tokens"] == 0 and not scoring:
            raise OpenAIError(
                400,
                "max_tokens=0 generates nothing: it is for scoring a prompt with echo: true on "
                "/v1/completions; ask for at least 1 token.",
                param="max_tokens",
            )
        try:
            return SamplingParams.from_defaults(self.generator.manifest, **overrides)
        except QwenDeployError as e:
            raise OpenAIError(400, str(e), param=_param_of(e)) from e

    def prepare(self, param: str, **kwargs) -> PreparedRequest:
        """generator.prepare within the engine's context; errors as OpenAI's, on `param`."""
        try:
            return self.generator.prepare(**kwargs, max_context=self.engine.max_context)
        except ContextLengthError as e:
            raise OpenAIError(400, str(e), param=param, code="context_length_exceeded") from e
        except TemplateKwargsError as e:
            raise OpenAIError(400, str(e), param="chat_template_kwargs") from e
        except (ValueError, TypeError, QwenDeployError) as e:
            raise OpenAIError(400, str(e), param=param) from e

    def drafter(self, body: SamplingFields) -> Drafter | None:
        """The request's drafter: its `speculative` choice or the server's default; a
        `prediction` is looked up for drafts."""
        try:
            text = body.prediction.text() if body.prediction else ""
            reference = self.generator.tokenizer.encode(text) if text else None
            return self.speculator.drafter(body.speculative, reference)
        except FieldError as e:
            raise OpenAIError(400, str(e), param=e.param) from e
        except QwenDeployError as e:
            raise OpenAIError(400, str(e), param="speculative") from e

    def add(
        self,
        request: PreparedRequest,
        body: SamplingFields,
        param: str,
        emit: Callable,
        prompt_logprobs: int | None = None,
    ) -> EngineRequest:
        """Queue a prepared request on the engine (its drafter and grammar state made here: call
        it off the loop)."""
        drafter = self.drafter(body)
        try:
            return self.engine.add(
                request, emit, drafter, self.speculator.draft_tokens, prompt_logprobs
            )
        except QwenDeployError as e:
            if self.closing:
                raise _shutting_down() from e
            raise OpenAIError(400, str(e), param=param) from e

    def add_choices(
        self,
        request: PreparedRequest,
        body: SamplingFields,
        param: str,
        emits: Sequence[Callable],
        prompt_logprobs: int | None = None,
    ) -> list[EngineRequest]:
        """`add` once per choice (n of one prompt); a seeded choice j samples with seed + j, so
        choice 0 is what n=1 gives. If one cannot be queued, none stays queued."""
        queued = []
        try:
            for j, emit in enumerate(emits):
                seed = request.params.seed
                if j and seed is not None:
                    params = request.params.replace(seed=(seed + j) % 2**64)
                    request = dataclasses.replace(request, params=params)
                queued.append(self.add(request, body, param, emit, prompt_logprobs))
        except BaseException:
            for made in queued:
                self.engine.cancel(made)
            raise
        return queued

    async def start(
        self, begin: Callable[[list[Callable]], tuple], count: int = 1
    ) -> tuple[Any, list[EngineStream]]:
        """Run `begin(emits)` off the loop: it prepares a request and queues one engine request
        per emit (its `count` choices), returning (anything, [EngineRequest]); here they become
        streams."""
        if self.closing:
            raise _shutting_down()
        channels = [self._channel() for _ in range(count)]

        def abandon(result: tuple) -> None:
            for queued in result[1]:
                self.engine.cancel(queued)

        made, queued = await self.off_loop(
            lambda: begin([emit for _, emit in channels]), abandon=abandon
        )
        queues = [queue for queue, _ in channels]
        return made, [EngineStream(self.engine, *pair) for pair in zip(queued, queues, strict=True)]

    # -- endpoints -----------------------------------------------------------------------------
    def _begin_chat(self, body: ChatCompletionRequest, emits: list[Callable]) -> tuple:
        """A chat request's CPU work (off the loop): ((params, tool plan), engine requests)."""
        params = self.sampling_params(body)
        try:
            plan = plan_tools(tool_dicts(body.tools), body.tool_choice)
        except ToolError as e:
            raise OpenAIError(400, str(e), param=e.param) from e
        messages = [_templated(i, m) for i, m in enumerate(body.messages)]
        prepared = self.prepare(
            "messages",
            messages=messages,
            params=params,
            tools=plan.tools,
            template_kwargs=body.chat_template_kwargs,
            suffix=plan.prefill,
        )
        return (params, plan), self.add_choices(prepared, body, "messages", emits)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        self.check_common(body)
        n = self.choice_count(body)
        (params, plan), streams = await self.start(lambda e: self._begin_chat(body, e), n)
        meta = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.model_name,
        }
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            head = {**meta, "object": "chat.completion.chunk"}
            choices = [self._chat_chunks(plan.stream()) for _ in streams]
            return _EngineSSE(_events(streams, head, include_usage, choices, n), streams)
        answers = await self.collect(streams, request)
        return {
            **meta,
            "object": "chat.completion",
            "choices": [
                self._chat_choice(i, deltas, stream, params, plan.stream())
                for i, (stream, deltas) in enumerate(zip(streams, answers, strict=True))
            ],
            "usage": _usage(streams, map(_generated, answers), n),
        }

    def _chat_choice(
        self,
        index: int,
        deltas: list[StreamDelta],
        stream: EngineStream,
        params: SamplingParams,
        tools: ToolCallStream | None,
    ) -> dict:
        """One choice of a whole chat answer: its message (tool calls parsed out), logprobs and
        finish reason."""
        finish = deltas[-1].finish_reason if deltas else None
        content, calls = _answer("".join(d.content for d in deltas), tools)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["content"] = content or None
            message["tool_calls"] = [c.to_openai() for c in calls]
            finish = "tool_calls"
        if stream.state.saw_reasoning:
            message["reasoning_content"] = "".join(d.reasoning_content for d in deltas)
        return {
            "index": index,
            "message": message,
            "logprobs": self._chat_logprobs(deltas, params),
            "finish_reason": finish,
        }

    def _chat_chunks(self, tools: ToolCallStream | None) -> Callable[[StreamDelta, int], dict]:
        """The choice of each chat stream chunk; with tools, text that may be a call is held
        and the calls go out whole in the last chunk."""

        def choice(d: StreamDelta, index: int) -> dict:
            content, calls = d.content, []
            if tools is not None:
                content = tools.push(d.content)
                if d.finish_reason:
                    held, calls = tools.finish()
                    content += held
            delta: dict[str, Any] = {"role": "assistant"} if index == 0 else {}
            if d.reasoning_content:
                delta["reasoning_content"] = d.reasoning_content
            if content or not d.reasoning_content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = [c.to_openai(i) for i, c in enumerate(calls)]
            return {
                "index": 0,
                "delta": delta,
                "logprobs": {"content": [self._token_entry(d.logprob)]} if d.logprob else None,
                "finish_reason": "tool_calls" if calls else d.finish_reason,
            }

        return choice

    def _token_text(self, token_id: int) -> tuple[str, list[int]]:
        raw = self.generator.tokenizer.token_bytes(token_id)
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _token_entry(self, lp: TokenLogprob) -> dict:
        """One token of chat logprobs.content, OpenAI's shape; top_logprobs: the k most likely
        and the chosen token when it is not among them (k + 1 at most, none for k = 0)."""
        text, raw = self._token_text(lp.token_id)
        top = []
        for token_id, logprob in _with_chosen(lp) if lp.top else []:
            alt_text, alt_raw = self._token_text(token_id)
            top.append({"token": alt_text, "logprob": logprob, "bytes": alt_raw})
        return {"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top}

    def _chat_logprobs(self, deltas: list[StreamDelta], params: SamplingParams) -> dict | None:
        if params.logprobs is None:
            return None
        return {"content": [self._token_entry(d.logprob) for d in deltas if d.logprob]}

    def _completion_logprobs(self, tokens: list[TokenLogprob], offset: int = 0) -> dict | None:
        """Completions' logprobs shape: parallel lists, top alternatives as {token: logprob}
        with the chosen token always among them (logprobs + 1 at most, as OpenAI's); an echoed
        first prompt token has null for both."""
        if not tokens:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in tokens:
            text = self._token_text(lp.token_id)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            top = {self._token_text(i)[0]: v for i, v in _with_chosen(lp)}
            out["top_logprobs"].append(None if lp.logprob is None else top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    async def completions(self, body: CompletionRequest, request: Request):
        self.check_common(body)
        if body.best_of not in (None, 1):
            raise OpenAIError(
                400, "best_of must be 1 (or omitted) on this server.", param="best_of"
            )
        if body.suffix:
            raise OpenAIError(400, "suffix is not supported by this server.", param="suffix")
        prompts = body.prompts()
        n = self.choice_count(body, len(prompts))
        echo_texts, streams = await self._start_prompts(body, prompts, n)
        meta = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.model_name,
            "object": "text_completion",
        }
        # a choice's echoed prompt logprobs are complete when its first delta arrives
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = [
                self._completion_chunks(echo_texts[i // n], s.request.prompt_logprobs)
                for i, s in enumerate(streams)
            ]
            return _EngineSSE(_events(streams, meta, include_usage, chunks, n), streams)
        answers = await self.collect(streams, request)
        choices = []
        for i, (stream, deltas) in enumerate(zip(streams, answers, strict=True)):
            tokens = stream.request.prompt_logprobs + [d.logprob for d in deltas if d.logprob]
            choices.append(
                {
                    "index": i,
                    "text": echo_texts[i // n] + "".join(d.text for d in deltas),
                    "logprobs": self._completion_logprobs(tokens),
                    "finish_reason": deltas[-1].finish_reason if deltas else None,
                }
            )
        return {**meta, "choices": choices, "usage": _usage(streams, map(_generated, answers), n)}

    async def _start_prompts(
        self, body: CompletionRequest, prompts: list[str | list[int]], n: int
    ) -> tuple[list[str], list[EngineStream]]:
        """Prepare and queue every prompt's n choices at once (they join the batch together):
        the prompts' echoed texts and the streams in OpenAI's choice order (prompt by prompt).
        If one prompt is refused, the others' requests are cancelled."""
        params = [f"prompt.{i}" if len(prompts) > 1 else "prompt" for i in range(len(prompts))]
        started = await asyncio.gather(
            *(
                self.start(lambda e, p=p, q=q: self._begin_completion(body, p, q, e), n)
                for p, q in zip(prompts, params, strict=True)
            ),
            return_exceptions=True,
        )
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            for result in started:
                if not isinstance(result, BaseException):
                    for stream in result[1]:
                        stream.cancel()
            raise failed[0]
        return [text for text, _ in started], [s for _, streams in started for s in streams]

    def _begin_completion(
        self, body: CompletionRequest, prompt: str | list[int], param: str, emits: list[Callable]
    ) -> tuple:
        """A prompt's CPU work (off the loop): (echoed prompt text, its choices' requests)."""
        params = self.sampling_params(body, scoring=body.echo)
        # the completions API has no reasoning_content: the text is returned as it is
        prepared = self.prepare(param, prompt=prompt, params=params, reasoning=False)
        echo_text = ""
        if body.echo:  # the prompt's text (and its tokens' logprobs) ahead of the completion
            echo_text = (
                prompt
                if isinstance(prompt, str)
                else self.generator.tokenizer.decode(prepared.prompt_ids)
            )
        scored = params.logprobs if body.echo else None  # in the prefill that starts generation
        return echo_text, self.add_choices(prepared, body, param, emits, scored)

    async def collect(self, streams: Sequence[EngineStream], request: Request) -> list[list]:
        """_collect; a request failed by shutdown is a 503."""
        try:
            return await _collect(streams, request)
        except OpenAIError:
            if self.closing:
                raise _shutting_down() from None
            raise

    def _completion_chunks(
        self, echo_text: str = "", echo_logprobs: list[TokenLogprob] | None = None
    ) -> Callable[[StreamDelta, int], dict]:
        """The choice of each completion stream chunk: the first carries the echoed prompt;
        token offsets run on across chunks."""
        offset = 0

        def choice(d: StreamDelta, index: int) -> dict:
            nonlocal offset
            tokens = [d.logprob] if d.logprob else []
            if index == 0:
                tokens = (echo_logprobs or []) + tokens
            logprobs = self._completion_logprobs(tokens, offset)
            if logprobs:
                offset += sum(len(t) for t in logprobs["tokens"])
            return {
                "index": 0,
                "text": (echo_text if index == 0 else "") + d.text,
                "logprobs": logprobs,
                "finish_reason": d.finish_reason,
            }

        return choice

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "qwen-deploy",
        }


def _shutting_down() -> OpenAIError:
    return OpenAIError(
        503,
        "the server is shutting down; send the request again to a running server.",
        "server_error",
        code="shutting_down",
    )


def _answer(content: str, tools: ToolCallStream | None) -> tuple[str, list[ToolCall]]:
    """A whole answer's content and the tool calls in it (the stream's rules, in one go)."""
    if tools is None:
        return content, []
    sent = tools.push(content)
    held, calls = tools.finish()
    return sent + held, calls


def _templated(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message for the chat template; a role the template does not know is refused."""
    if message.role not in ROLES:
        raise OpenAIError(
            400,
            f"messages[{index}] has the unknown role {message.role!r}; use one of "
            f"{', '.join(ROLES)}.",
            param=f"messages.{index}.role",
        )
    try:
        return {**message.for_template(), "role": ROLES[message.role]}
    except FieldError as e:
        param = f"messages.{index}.{e.param}"
        raise OpenAIError(400, f"{param}: {e}", param=param) from e


def _with_chosen(lp: TokenLogprob) -> list[tuple[int, float]]:
    """The top alternatives and, when it is not among them, the chosen token (last: it is less
    likely than any of them)."""
    if lp.logprob is None or any(token == lp.token_id for token, _ in lp.top):
        return lp.top
    return [*lp.top, (lp.token_id, lp.logprob)]


def _generated(deltas: list[StreamDelta]) -> int:
    """Tokens generated (a scored-only request's one delta carries none)."""
    return sum(d.token_id is not None for d in deltas)


def _usage(streams: Sequence[EngineStream], completion_tokens: Iterable[int], n: int = 1) -> dict:
    """OpenAI's usage over a request's choices (n per prompt: a prompt counts once); speculative
    requests add their draft tokens accepted and rejected (as OpenAI counts predicted outputs)
    and, as an extension, their acceptance statistics."""
    prompt_tokens = sum(s.prompt_tokens for s in streams[::n])
    completion = sum(completion_tokens)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": sum(s.request.cached_tokens for s in streams)},
    }
    speculative = [s.speculative for s in streams if s.speculative is not None]
    if speculative:
        stats = SpeculativeStats()
        for one in speculative:
            stats.add(one)
        usage["completion_tokens_details"] = {
            "accepted_prediction_tokens": stats.accepted,
            "rejected_prediction_tokens": stats.drafted - stats.accepted,
        }
        usage["speculative"] = stats.to_dict()
    return usage


async def _collect(streams: Sequence[EngineStream], request: Request) -> list[list]:
    """All deltas of each of a non-streaming request's choices; a client that disconnects
    cancels them."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for stream in streams:
            stream.cancel()

    async def deltas(stream: EngineStream) -> list:
        return [d async for d in stream]

    watcher = asyncio.create_task(watch())
    try:
        return list(await asyncio.gather(*map(deltas, streams)))
    except QwenDeployError as e:
        raise OpenAIError(500, str(e), "server_error") from e
    finally:
        watcher.cancel()
        for stream in streams:
            stream.cancel()


def _api_key_check(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if (
            scheme.lower() != "bearer"
            or not token
            or not hmac.compare_digest(token.encode(), api_key.encode())
        ):
            raise OpenAIError(
                401,
                "Incorrect or missing API key; send it as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )

    return check


def _validation_error(e: RequestValidationError) -> JSONResponse:
    """A body pydantic refused: 400 naming the field as the client sent it (pydantic's union and
    type tags, such as `str` in stop.str, are not fields)."""
    errors = e.errors()
    first = errors[0] if errors else {}
    cause = first.get("ctx", {}).get("error")
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"the request body is not valid JSON ({cause})."), 400)
    if isinstance(cause, FieldError):  # our own validators name the field and the fix
        return JSONResponse(error_body(str(cause), param=cause.param), 400)
    param = _field(first, e.body)
    problems = dict.fromkeys(
        x.get("msg", "invalid value") for x in errors if _field(x, e.body) == param
    )
    message = f"{param or 'body'}: {' or '.join(problems)}."
    return JSONResponse(error_body(message, param=param), 400)


def _unparsable(cause: Exception) -> str:
    """Why json.loads failed where it raises no JSONDecodeError."""
    if isinstance(cause, RecursionError):
        return "it is nested too deeply; flatten it"
    if isinstance(cause, UnicodeDecodeError):
        return "it is not UTF-8 text; send UTF-8"
    return f"{str(cause).split(';')[0]}; shorten the number"  # Python's 4300-digit int limit


def _field(error: dict, body: Any) -> str | None:
    """The dotted path (messages.0.content) of the part of `body` a pydantic error is about."""
    path, node = [], body
    for key in error.get("loc", ())[1:]:  # after "body"
        if (isinstance(node, dict) and key in node) or (
            isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node)
        ):
            node = node[key]
        else:
            if error.get("type") == "missing":
                path.append(str(key))
            break
        path.append(str(key))
    return ".".join(path) or None


def _lower_priority() -> None:
    """This thread's CPU priority to PREPARE_NICE (Linux gives each thread its own nice value):
    on cores the model's threads keep busy, tokenizing a 4 MB body or compiling a grammar takes
    their time slices, and every running stream's next token waits."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)


def create_app(
    engine: BatchEngine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    speculator: Speculator | None = None,
    allowed_hosts: Collection[str] | None = None,
    docs: bool = True,
) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine's worker thread (and prints the
    artifact's warnings). `speculator`: the speculative decoding requests get by default and may
    choose (none without it); `allowed_hosts`: the Host names answered (None: any, see
    host_allow_list); `docs`: /docs and /openapi.json, behind the API key like the API."""
    server = OpenAIServer(engine, model_name, speculator)
    # a text is tokenized in the (lowered) thread that asks, not on tokenizers' own thread pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    warnings = artifact_warnings(engine.manifest)
    sink = PrometheusSink()  # GET /metrics
    metrics = EngineMetrics(engine, sink, model_name)
    engine.observer = metrics

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        for warning in warnings:
            print(f"warning: {warning}", file=sys.stderr)
        engine.start()
        yield
        engine.close()

    app = FastAPI(
        title="qwen-deploy", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)  # outermost: before the body
    app.state.server = server
    auth = [Depends(_api_key_check(api_key))]

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        message = str(e.detail)
        if isinstance(e.__cause__, (ValueError, RecursionError)):  # FastAPI's json.loads failed
            message = f"the request body is not valid JSON ({_unparsable(e.__cause__)})."
        return JSONResponse(error_body(message, kind), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, e: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500
        )

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "model": model_name,
            "active": engine.active,
            "max_batch": engine.max_batch,
            "speculative": engine.speculative.to_dict(),  # over finished speculative requests
            "prefix_cache": engine.prefix_cache.stats() if engine.prefix_cache else None,
            "warnings": warnings,
        }

    @app.get("/metrics", include_in_schema=False)  # open like /health: scrapers send no key
    async def prometheus_metrics() -> Response:
        metrics.refresh()
        return Response(sink.exposition(), media_type=sink.content_type)

    if docs:

        @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
        async def openapi() -> dict:
            return app.openapi()

        @app.get("/docs", dependencies=auth, include_in_schema=False)
        async def swagger() -> HTMLResponse:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="qwen-deploy")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        return server.models()

    @app.get("/v1/models/{model_id}", dependencies=auth)
    async def model(model_id: str) -> dict:
        if model_id != model_name:
            raise OpenAIError(
                404,
                f"The model `{model_id}` does not exist.",
                param="model",
                code="model_not_found",
            )
        return server.model_card()

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await server.chat(body, request)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await server.completions(body, request)

    from .tokenize_api import add_tokenizer_routes  # it imports this module

    add_tokenizer_routes(app, server, auth)  # /tokenize, /detokenize, /tokenizer_info (vLLM's)
    return app


def check_options(port: int, api_key: str | None) -> None:
    """Refuse options that cannot work before anything is loaded."""
    if not 1 <= port <= 65535:
        raise QwenDeployError(f"--port {port} is not a TCP port: use one in 1-65535.")
    if api_key is not None and not api_key.strip():
        raise QwenDeployError(
            f"the API key is empty (--api-key or {API_KEY_ENV}): give a non-empty key, or unset "
            "both to serve without one."
        )


def kv_budget(kv_cache_gb: float | None, prefix_cache_gb: float) -> int:
    """The requests' KV budget: as given, else half of the memory free once the model is
    loaded, less the prefix cache's share."""
    if kv_cache_gb is not None:
        return int(kv_cache_gb * 2**30)
    free = psutil.virtual_memory().available * KV_MEMORY_SHARE
    return max(int(free - prefix_cache_gb * 2**30), 0)


def serve(
    artifact: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key: str | None = None,
    max_batch: int = 8,
    provider: str = "cpu",
    threads: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    prompt_lookup: bool = False,
    draft: str | Path | None = None,
    draft_tokens: int | None = None,
    allowed_hosts: Sequence[str] = (),
    docs: bool = True,
    prefix_cache_gb: float = PREFIX_CACHE_GB,
    prefill_chunk: int = PREFILL_CHUNK,
    kv_cache_gb: float | None = None,
    batch_invariant: bool | None = None,
    max_memory: float | None = None,
) -> None:
    """Load the artifact (and the draft artifact) and serve it until interrupted."""
    from ..generation.generator import Generator

    check_options(port, api_key)
    generator = Generator(artifact, provider=provider, threads=threads, max_memory=max_memory)
    engine = BatchEngine(
        generator,
        max_batch=max_batch,
        prefill_chunk=prefill_chunk,
        prefix_cache_bytes=int(prefix_cache_gb * 2**30),
        kv_budget_bytes=kv_budget(kv_cache_gb, prefix_cache_gb),
        batch_invariant=batch_invariant,
    )
    vocab = generator.manifest.model.vocab_size
    speculator = Speculator.open(vocab, prompt_lookup, draft, draft_tokens, provider, threads)
    name = model_name or Path(artifact).resolve().name
    hosts = host_allow_list(host, api_key, allowed_hosts)
    if hosts is None and not api_key:
        print(
            f"warning: serving on {host} without an API key; anyone who can reach this port "
            f"can use the model (set --api-key or {API_KEY_ENV}).",
            file=sys.stderr,
        )
    print(
        f"serving {name} on http://{host}:{port}/v1 (max batch {max_batch}, KV cache "
        f"{engine.kv_budget / 2**30:.1f} GiB, prefix cache {prefix_cache_gb:g} GB)",
        file=sys.stderr,
    )
    app = create_app(engine, name, api_key, max_body_bytes, speculator, hosts, docs)
    warm_structured(generator.tokenizer)
    server = Server(
        server_config(
            app,
            host=host,
            port=port,
            log_level="info",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        )
    )
    server.run()
    if not server.started:
        raise QwenDeployError(
            f"could not listen on {host}:{port} (uvicorn's error above says why): free the port "
            "or choose another --port or --host."
        )
