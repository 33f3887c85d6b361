"""Checkpoints in: Hugging Face folders (config, safetensors, tokenizer), GGUF files converted to
them, and random checkpoints of any Qwen2 shape for tests."""
