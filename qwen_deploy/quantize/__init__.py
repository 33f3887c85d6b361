"""INT8 quantization of an ONNX artifact: calibration, SmoothQuant or weight-only rewrites, and
the quality report and gate that judge the result."""
