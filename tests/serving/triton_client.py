"""Triton-side helper for tests/serving/test_triton.py, run with the isolated Triton env's Python.

tritonclient and Triton's ModelConfig protobuf live in .venv-triton (they pin numpy<2 and
protobuf<7), so the test process asks this script and reads JSON from its stdout:

    python triton_client.py parse CONFIG.pbtxt...        -> [ModelConfig as a dict, ...]
    python triton_client.py grpc URL MODEL REQUESTS.json -> [{"responses": [...], "error": ...}]

REQUESTS.json is a list of input dicts (text_input / messages / sampling_parameters: strings,
stream: bool); each request goes over its own gRPC bidirectional stream.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def parse(paths: list[str]) -> list[dict]:
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    configs = []
    for path in paths:
        config = text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
        configs.append(json_format.MessageToDict(config, preserving_proto_field_name=True))
    return configs


def _inputs(values: dict) -> list:
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in values.items():
        if isinstance(value, bool):
            tensor = grpcclient.InferInput(name, [1], "BOOL")
            tensor.set_data_from_numpy(np.array([value]))
        else:
            tensor = grpcclient.InferInput(name, [1], "BYTES")
            tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
        inputs.append(tensor)
    return inputs


def grpc(url: str, model: str, requests: list[dict]) -> list[dict]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    results = []
    for values in requests:
        responses, errors = [], []

        def callback(result, error, responses=responses, errors=errors):
            if error is not None:
                errors.append(str(error))
                return
            responses.append(
                {
                    "text_output": result.as_numpy("text_output")[0].decode(),
                    "content": result.as_numpy("content")[0].decode(),
                    "reasoning_content": result.as_numpy("reasoning_content")[0].decode(),
                    "token_ids": result.as_numpy("token_ids").tolist(),
                    "finish_reason": result.as_numpy("finish_reason")[0].decode(),
                    "prompt_tokens": int(result.as_numpy("prompt_tokens")[0]),
                }
            )

        client.start_stream(callback=callback)
        client.async_stream_infer(model, _inputs(values))
        client.stop_stream()  # returns once the server closed the stream: all responses are in
        results.append({"responses": responses, "error": errors[0] if errors else None})
    client.close()
    return results


def main() -> None:
    command, *args = sys.argv[1:]
    if command == "parse":
        out = parse(args)
    elif command == "grpc":
        url, model, requests = args
        out = grpc(url, model, json.loads(Path(requests).read_text()))
    else:
        raise SystemExit(f"unknown command {command}")
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
