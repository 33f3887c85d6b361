"""TensorRT: the pre-flight check of a graph, the engine builder, and the engine backend with its
CUDA helpers. TensorRT itself is imported lazily: every module loads without it."""
