"""Parity: PyTorch (transformers) reference vs an exported artifact, with metrics and a verdict."""
