"""Parity prompt sets: the shipped default (finance/reasoning, English/Chinese) or a file."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..errors import QwenDeployError


def _parse_jsonl(text: str, origin: str) -> list[dict]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise QwenDeployError(f"{origin} line {n} is not valid JSON: {e}") from e
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not ({"text", "messages"} & item.keys()):
            raise QwenDeployError(
                f"{origin} line {n} needs a 'text' string or a 'messages' list of chat messages."
            )
        prompts.append(item)
    return prompts


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """Prompts as dicts with 'messages' (rendered by the chat template) or 'text' (used raw).

    A .txt file holds one user message per line; a .jsonl file holds {"messages": [...]} or
    {"text": "..."} objects. Without a path, the packaged default set is used.
    """
    if path is None:
        text = resources.files("qwen_deploy.data").joinpath("parity_prompts.jsonl").read_text()
        return _parse_jsonl(text, "default prompts")
    path = Path(path)
    if not path.is_file():
        raise QwenDeployError(f"prompt file {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = _parse_jsonl(text, str(path))
    else:
        prompts = [
            {"messages": [{"role": "user", "content": line}]}
            for line in text.splitlines()
            if line.strip()
        ]
    if not prompts:
        raise QwenDeployError(f"prompt file {path} holds no prompts.")
    return prompts
