"""Text in, text out on one backend: tokenizer, chat template, sampling, reasoning split,
requests, the generator and speculative decoding."""
