"""The PyTorch oracle: transformers' Qwen2ForCausalLM on the source checkpoint.

float32 is the reference a deployment is judged against. float64 shows exact arithmetic: it
tells whether a difference comes from the artifact or from PyTorch's own float32 rounding.
transformers' RMSNorm and eager softmax compute in float32 whatever the model's dtype, so the
float64 model gets float64 versions of both (its RoPE tables stay float32, as the model defines
them and the exporter writes them).
"""

from __future__ import annotations

import inspect
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


REFERENCE_LOADS = ("whole", "by-layer")


def _transformers():
    try:
        import torch
        import transformers
        from transformers.models.qwen2 import modeling_qwen2
    except ImportError as e:
        raise QwenDeployError(
            "parity needs the PyTorch reference: pip install 'qwen-deploy[reference]' "
            "(torch and transformers)."
        ) from e
    return torch, transformers, modeling_qwen2


def _load_model(checkpoint: str | Path, dtype: str, load: str = "whole"):
    """transformers' model with every weight in memory (`whole`), or with each decoder layer's
    weights read from the checkpoint just before the layer runs and dropped after it
    (`by-layer`): the same modules and arithmetic, at the memory of the largest layer."""
    torch, transformers, qwen2 = _transformers()
    if dtype not in REFERENCE_DTYPES:
        raise QwenDeployError(
            f"unknown reference dtype {dtype!r}; choose {' or '.join(REFERENCE_DTYPES)}."
        )
    if load not in REFERENCE_LOADS:
        raise QwenDeployError(
            f"unknown reference load {load!r}; choose {' or '.join(REFERENCE_LOADS)}."
        )
    exact = dtype == "float64"
    if exact:
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        transformers.AttentionInterface.register(FLOAT64_ATTENTION, _float64_attention)
        AttentionMaskInterface.register(FLOAT64_ATTENTION, eager_mask)  # additive, as eager's
    attention = FLOAT64_ATTENTION if exact else "eager"
    if load == "whole":
        model = transformers.Qwen2ForCausalLM.from_pretrained(
            str(checkpoint), dtype=getattr(torch, dtype), attn_implementation=attention
        )
    else:
        model = _layered_model(torch, transformers, qwen2, checkpoint, dtype, attention)
    model.eval()
    if exact:
        for module in model.modules():
            if isinstance(module, qwen2.Qwen2RMSNorm):
                module.forward = types.MethodType(_float64_rms_norm, module)
    return torch, model


def _layered_model(torch, transformers, qwen2, checkpoint, dtype: str, attention: str):
    """The model built without weights (meta tensors); hooks put each decoder layer's and the
    LM head's weights in place from the checkpoint's memory map for one forward and drop them
    after it. The embedding reads only the rows of the step's tokens."""
    source = Checkpoint(checkpoint)
    torch_dtype = getattr(torch, dtype)
    config = transformers.AutoConfig.from_pretrained(str(checkpoint))
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM._from_config(
            config, attn_implementation=attention, dtype=torch_dtype
        )
    model.model.rotary_emb = qwen2.Qwen2RotaryEmbedding(config)  # computed, not stored

    def weight(name: str, rows: np.ndarray | None = None):
        stored = source.tensor(name)
        array = np.array(stored if rows is None else stored[rows])  # a copy, off the map
        if str(array.dtype) == "bfloat16":  # torch widens bf16 faster than numpy does
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).to(torch_dtype)
        return torch.from_numpy(array).to(torch_dtype)

    def load(module, prefix: str, names: dict[str, str] | None = None) -> None:
        names = names or {n: prefix + n for n, _ in module.named_parameters()}
        module.load_state_dict({n: weight(stored) for n, stored in names.items()}, assign=True)

    def hooked(module, prefix: str, names: dict[str, str] | None = None) -> None:
        """Weights in place for the module's forward, meta tensors again after it (hooks that
        return None leave the inputs and outputs as they are)."""

        def drop(*_) -> None:
            module.to("meta")

        module.register_forward_pre_hook(lambda *_: load(module, prefix, names))
        module.register_forward_hook(drop)

    for i, layer in enumerate(model.model.layers):
        hooked(layer, f"model.layers.{i}.")
    hooked(model.lm_head, "", {"weight": source.spec.lm_head_name})
    load(model.model.norm, "model.norm.")

    def embed_rows(ids):
        unique, inverse = np.unique(ids.numpy(), return_inverse=True)
        rows = weight("model.embed_tokens.weight", unique)
        return torch.nn.functional.embedding(torch.from_numpy(inverse.reshape(ids.shape)), rows)

    model.model.embed_tokens.forward = embed_rows
    return model


def cache_name(model) -> str:
    """The KV cache's argument and output name: transformers 5.25 renamed `past_key_values` to
    `cache`; an older one takes `cache=` into **kwargs and has no `out.cache` (parity failed with
    an AttributeError on transformers 5.17)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchReference:
    """Runs prefill/decode steps on transformers' model with its own KV cache (eager attention).

    load: `whole` holds the model in `dtype`; `by-layer` reads each layer's weights from the
    checkpoint as it runs (parity of a model larger than the memory, bit-identical logits)."""

    def __init__(self, checkpoint: str | Path, dtype: str = "float32", load: str = "whole"):
        self.dtype = dtype
        self._torch, self.model = _load_model(checkpoint, dtype, load)
        self._cache_name = cache_name(self.model)
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
                use_cache=True,
                **{self._cache_name: self.cache},
            )
        self.cache = getattr(out, self._cache_name)
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
