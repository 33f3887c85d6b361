"""Triton Python-backend model: qwen-deploy's batching engine behind Triton (copied as model.py).

`qwen-deploy triton` copies this file into the repository; it runs only inside Triton's Python
backend stub (which provides `triton_python_backend_utils`). The model is decoupled: `execute`
hands each request to the instance's BatchEngine (the scheduler `qwen-deploy serve` runs) and
returns, so concurrent requests decode in one batch; each gets one response, or with `stream` one
response per generated token, then a final flag. A bad request gets a Triton error response and
the model goes on serving the next one.

Inputs (all optional TYPE_STRING [1] unless said): text_input (raw prompt), messages (JSON chat
messages), sampling_parameters (JSON object: SamplingParams fields, plus `tools` and
`chat_template_kwargs` for the chat template), stream (TYPE_BOOL [1]).
Outputs: text_output, content, reasoning_content, token_ids (INT64 [-1]), finish_reason,
prompt_tokens (INT64 [1]).

Metrics: each instance's engine reports `serve`'s Prometheus metrics (vLLM's names,
serving/metrics.py) through Triton's custom metrics API, on Triton's metrics port next to
Triton's own; labels model_name (the Triton model) and engine (the instance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen_deploy.backends import open_backend
from qwen_deploy.errors import QwenDeployError
from qwen_deploy.generation.engine import BatchEngine, EngineRequest
from qwen_deploy.generation.generator import Generator, generation_result
from qwen_deploy.generation.requests import PreparedRequest
from qwen_deploy.generation.sequence import StreamDelta
from qwen_deploy.serving.metrics import EngineMetrics, TritonSink

TEMPLATE_KEYS = ("tools", "chat_template_kwargs")


def _string(request, name: str) -> str | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    value = tensor.as_numpy().reshape(-1)
    if value.size != 1:
        raise QwenDeployError(f"input {name} must hold exactly one string, got {value.size}.")
    item = value[0]
    return item.decode("utf-8") if isinstance(item, bytes) else str(item)


def _json(request, name: str, kind: type):
    text = _string(request, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise QwenDeployError(f"input {name} is not valid JSON ({e}).") from e
    if not isinstance(value, kind):
        raise QwenDeployError(
            f"input {name} must be a JSON {kind.__name__}, got {type(value).__name__}."
        )
    return value


def _response(
    text: str,
    content: str,
    reasoning: str,
    token_ids: list[int],
    finish_reason: str | None,
    prompt_tokens: int,
):
    def string(name: str, value: str):
        return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))

    return pb_utils.InferenceResponse(
        output_tensors=[
            string("text_output", text),
            string("content", content),
            string("reasoning_content", reasoning),
            pb_utils.Tensor("token_ids", np.array(token_ids, dtype=np.int64)),
            string("finish_reason", finish_reason or ""),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int64)),
        ]
    )


class _Reply:
    """Where one request's deltas go, from the engine's worker thread: a response per token
    (stream) or one at the end; a client that went away cancels its request."""

    def __init__(self, sender, engine: BatchEngine, stream: bool, prompt_tokens: int):
        self.sender, self.engine, self.stream = sender, engine, stream
        self.prompt_tokens = prompt_tokens
        self.request: EngineRequest | None = None  # set once the engine took it

    def emit(self, item: StreamDelta | BaseException) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if isinstance(item, BaseException):
            _fail(self.sender, item)
            return
        if self.sender.is_cancelled():  # no more deltas arrive once the engine knows
            if self.request is not None:
                self.engine.cancel(self.request)
            self.sender.send(flags=final)
            return
        if self.stream:
            tokens = [] if item.token_id is None else [item.token_id]
            self.sender.send(
                _response(
                    item.text,
                    item.content,
                    item.reasoning_content,
                    tokens,
                    item.finish_reason,
                    self.prompt_tokens,
                ),
                flags=final if item.finish_reason else 0,
            )
        elif item.finish_reason and self.request is not None:
            r = generation_result(self.request.state)
            self.sender.send(
                _response(
                    r.text,
                    r.content,
                    r.reasoning_content or "",
                    r.token_ids,
                    r.finish_reason,
                    r.prompt_tokens,
                ),
                flags=final,
            )


def _fail(sender, error: BaseException) -> None:
    message = str(error) if isinstance(error, QwenDeployError) else f"internal error: {error!r}"
    sender.send(
        pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
    )


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / params.get("artifact", "")
        provider = params.get("provider", "cpu")
        device_id = int(args.get("model_instance_device_id", 0))
        self.generator = Generator(folder, backend=open_backend(folder, provider, None, device_id))
        self.engine = BatchEngine(
            self.generator,
            max_batch=int(params.get("max_batch", 8)),
            batch_invariant=params.get("batch_invariant") == "true" or None,
        )
        self.metrics = None
        try:  # metrics must not keep the model from serving
            self.metrics = TritonSink(pb_utils)
            self.engine.observer = EngineMetrics(
                self.engine,
                self.metrics,
                args["model_name"],
                args.get("model_instance_name", "0"),
            )
        except Exception as e:
            print(f"warning: no metrics ({type(e).__name__}: {e})", file=sys.stderr)
        self.engine.start()

    def execute(self, requests):
        """Hand each request to the instance's engine and return at once: the engine's worker
        batches them with the requests already decoding and sends their responses."""
        for request in requests:
            sender = request.get_response_sender()
            try:
                prepared, stream = self._prepare(request)
                reply = _Reply(sender, self.engine, stream, len(prepared.prompt_ids))
                reply.request = self.engine.add(prepared, reply.emit)
            except Exception as e:  # the request fails, the model keeps serving
                _fail(sender, e)
        return None

    def finalize(self) -> None:
        self.engine.close()  # requests still in flight get an error response
        self.engine.observer = None  # Triton wants a family's metrics released before it
        if self.metrics is not None:
            self.metrics.close()

    def _prepare(self, request) -> tuple[PreparedRequest, bool]:
        prompt = _string(request, "text_input")
        messages = _json(request, "messages", list)
        sampling = _json(request, "sampling_parameters", dict) or {}
        template = {k: sampling.pop(k) for k in TEMPLATE_KEYS if k in sampling}
        stream_input = pb_utils.get_input_tensor_by_name(request, "stream")
        stream = bool(stream_input.as_numpy().reshape(-1)[0]) if stream_input else False
        if (prompt is None) == (messages is None):
            raise QwenDeployError(
                "send either text_input (a raw prompt) or messages (JSON chat), not both."
            )
        kwargs = template.get("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise QwenDeployError("sampling_parameters.chat_template_kwargs must be a JSON object.")
        prepared = self.generator.prepare(
            prompt=prompt,
            messages=messages,
            tools=template.get("tools"),
            template_kwargs=kwargs,
            **sampling,
        )
        return prepared, stream
