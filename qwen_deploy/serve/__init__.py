"""The thin runtime: backends, sampling, tokenizer and chat template, generation, HTTP serving.

Never imports torch or transformers (DESIGN.md).
"""
