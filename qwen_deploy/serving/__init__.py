"""Serving: the OpenAI-compatible HTTP server and its schema, the continuous-batching engine, and
the Triton model repository with its Python model."""
