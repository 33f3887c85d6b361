"""Export a Qwen2 checkpoint folder to an ONNX artifact folder (graph + manifest + tokenizer)."""

from .exporter import export_checkpoint

__all__ = ["export_checkpoint"]
