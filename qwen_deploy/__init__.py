"""qwen-deploy: ship Qwen2-architecture checkpoints as ONNX/TensorRT artifacts and serve them."""

__version__ = "0.1.0"
