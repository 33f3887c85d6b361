"""Make artifacts smaller and faster: INT8 quantization, TensorRT pre-flight and engine builds."""
