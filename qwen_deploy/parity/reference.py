"""The PyTorch oracle: transformers' Qwen2ForCausalLM on the source checkpoint, in float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import QwenDeployError


class TorchReference:
    """Runs prefill/decode steps on transformers' model with its own KV cache (eager attention)."""

    def __init__(self, checkpoint: str | Path):
        try:
            import torch
            from transformers import Qwen2ForCausalLM
        except ImportError as e:
            raise QwenDeployError(
                "parity needs the PyTorch reference: pip install 'qwen-deploy[reference]' "
                "(torch and transformers)."
            ) from e
        self._torch = torch
        self.model = Qwen2ForCausalLM.from_pretrained(
            str(checkpoint), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.cache = None

    def reset(self) -> None:
        self.cache = None

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray
    ) -> np.ndarray:
        """One step, the cache kept between calls; float32 logits [batch, seq, vocab]."""
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
        return out.logits.float().numpy()


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
