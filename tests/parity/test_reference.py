"""The transformers reference keeps its KV cache across steps on every transformers it supports."""

from __future__ import annotations

import numpy as np

from qwen_deploy.parity.reference import TorchReference, cache_name


class _OlderQwen2:  # transformers < 5.25: the cache is `past_key_values`, in and out
    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, **kwargs): ...


def test_cache_name_is_what_the_model_takes_and_returns(tiny_checkpoint):
    import torch

    reference = TorchReference(tiny_checkpoint)
    name = cache_name(reference.model)
    with torch.no_grad():
        out = reference.model(input_ids=torch.tensor([[11, 22, 33]]), use_cache=True)
    assert getattr(out, name) is not None  # "cache" on transformers >= 5.25
    assert cache_name(_OlderQwen2()) == "past_key_values"


def test_decode_steps_see_the_cached_prompt(tiny_checkpoint):
    ids = np.array([[11, 22, 33, 44, 55]], np.int64)
    mask, positions = np.ones_like(ids), np.arange(5)[None]
    reference = TorchReference(tiny_checkpoint)
    whole = reference.forward(ids, mask, positions)[0, -1]
    reference.reset()
    reference.forward(ids[:, :4], mask[:, :4], positions[:, :4])
    step = reference.forward(ids[:, 4:], mask, positions[:, 4:])[0, -1]
    np.testing.assert_allclose(step, whole, atol=1e-5)
