"""Prompts -> token ids through an artifact's own tokenizer and chat template.

Calibration and the quality report must see text as the deployed model sees it: chat messages
rendered by the checkpoint's template (a conversation ending with an assistant turn is rendered
as is, otherwise with the generation prompt), plain {"text": ...} entries tokenized raw.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QwenDeployError
from ..generation.chat_template import ChatTemplate
from ..generation.tokenizer import Tokenizer
from ..manifest import Manifest


def prompt_ids(folder: str | Path, prompts: list[dict], max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt (at most `max_tokens`, the start kept)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    tokenizer = Tokenizer.from_artifact(folder)
    template = (
        ChatTemplate(manifest.chat_template, tokenizer.special_tokens)
        if manifest.chat_template
        else None
    )
    out = []
    for prompt in prompts:
        if "messages" in prompt:
            messages = prompt["messages"]
            if template is not None:
                text = template.render(
                    messages, add_generation_prompt=messages[-1].get("role") != "assistant"
                )
            else:  # a base model without a template: the conversation as plain text
                text = "\n\n".join(str(m.get("content", "")) for m in messages)
        else:
            text = prompt["text"]
        ids = tokenizer.encode(text)[:max_tokens]
        if not ids:
            raise QwenDeployError(f"a prompt tokenizes to nothing: {prompt!r}; remove it.")
        out.append(ids)
    return out
