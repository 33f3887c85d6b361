"""Running an artifact: the backend interface, the onnxruntime backend and its KV caches, and the
one prefill/decode loop every caller uses. Never imports torch or transformers (DESIGN.md)."""
