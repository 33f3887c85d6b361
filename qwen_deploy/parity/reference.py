"""The PyTorch oracle: transformers' Qwen2ForCausalLM on the source checkpoint.

float32 is the reference a deployment is judged against. float64 shows exact arithmetic: it
tells whether a difference comes from the artifact or from PyTorch's own float32 rounding.
transformers' RMSNorm and eager softmax compute in float32 whatever the model's dtype, so the
float64 model gets float64 versions of both (its RoPE tables stay float32, as the model defines
them and the exporter writes them).
"""

from __future__ import annotations

import types
from dataclasses import fields
from pathlib import Path

import numpy as np

from ..checkpoint.huggingface import Checkpoint
from ..errors import CheckpointError, QwenDeployError
from ..manifest import Manifest

REFERENCE_DTYPES = ("float32", "float64")
FLOAT64_ATTENTION = "qwen_deploy_float64_eager"


def _float64_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    """Eager attention with the softmax in the inputs' dtype (transformers' upcasts to float32)."""
    import torch

    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _float64_rms_norm(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * (variance + self.variance_epsilon).rsqrt())


def check_reference(reference: str | Path, manifest: Manifest) -> None:
    """Refuse a reference that is not the artifact's model, before any forward pass.

    The folder is read as export reads it (config.json and tensor shapes), so a missing folder
    is never taken for a Hub id, and every architecture number is compared with the manifest's:
    another model would run for minutes and then fail parity numerically, naming nothing."""
    spec = Checkpoint(reference).spec
    differ = [
        f"{f.name} {getattr(spec, f.name)}, the artifact {getattr(manifest.model, f.name)}"
        for f in fields(spec)
        if getattr(spec, f.name) != getattr(manifest.model, f.name)
    ]
    if differ:
        source = manifest.source.get("path")
        raise CheckpointError(
            f"reference {reference} has {'; '.join(differ)}: parity compares the same model; "
            "pass the checkpoint the artifact was exported from"
            + (f" ({source})." if source else ".")
        )


def _load_model(checkpoint: str | Path, dtype: str):
    try:
        import torch
        from transformers import AttentionInterface, Qwen2ForCausalLM
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    except ImportError as e:
        raise QwenDeployError(
            "parity needs the PyTorch reference: pip install 'qwen-deploy[reference]' "
            "(torch and transformers)."
        ) from e
    if dtype not in REFERENCE_DTYPES:
        raise QwenDeployError(
            f"unknown reference dtype {dtype!r}; choose {' or '.join(REFERENCE_DTYPES)}."
        )
    exact = dtype == "float64"
    if exact:
        AttentionInterface.register(FLOAT64_ATTENTION, _float64_attention)
        AttentionMaskInterface.register(FLOAT64_ATTENTION, eager_mask)  # additive, as eager's
    model = Qwen2ForCausalLM.from_pretrained(
        str(checkpoint),
        dtype=getattr(torch, dtype),
        attn_implementation=FLOAT64_ATTENTION if exact else "eager",
    ).eval()
    if exact:
        for module in model.modules():
            if isinstance(module, Qwen2RMSNorm):
                module.forward = types.MethodType(_float64_rms_norm, module)
    return torch, model


class TorchReference:
    """Runs prefill/decode steps on transformers' model with its own KV cache (eager attention)."""

    def __init__(self, checkpoint: str | Path, dtype: str = "float32"):
        self.dtype = dtype
        self._torch, self.model = _load_model(checkpoint, dtype)
        self.cache = None

    def reset(self) -> None:
        self.cache = None

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray:
        """One step, the cache kept between calls; logits [batch, seq, vocab], model dtype."""
        torch = self._torch
        with torch.no_grad():
            out = self.model(
                input_ids=torch.from_numpy(input_ids),
                attention_mask=torch.from_numpy(attention_mask),
                position_ids=torch.from_numpy(position_ids),
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        return out.logits.numpy()


def chat_prompt_ids(checkpoint: str | Path, prompts: list[dict]) -> list[list[int]]:
    """Token ids of each prompt through the checkpoint's own tokenizer and chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    ids = []
    for prompt in prompts:
        if "messages" in prompt and tokenizer.chat_template:
            text = tokenizer.apply_chat_template(
                prompt["messages"], tokenize=False, add_generation_prompt=True
            )
        else:
            text = prompt.get("text") or prompt["messages"][-1]["content"]
        ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids
