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
        _check_prompt(item, f"{origin} line {n}")
        prompts.append(item)
    return prompts


def _is_message(message: object) -> bool:
    """A chat message: a role and text content (none beside tool calls, as OpenAI sends)."""
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and (isinstance(message.get("content"), str) or "tool_calls" in message)
    )


def _check_prompt(item: dict, where: str) -> None:
    """A prompt's values have the types the chat template and tokenizer take: caught here, a
    wrong one is one line naming the file and line instead of a crash mid-run."""
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages or not all(map(_is_message, messages)):
            raise QwenDeployError(
                f"{where}: 'messages' must be a non-empty list of "
                '{"role": "...", "content": "..."} objects with string values; got '
                f"{json.dumps(messages, ensure_ascii=False)[:80]}."
            )
    elif not isinstance(item["text"], str):
        raise QwenDeployError(
            f"{where}: 'text' must be a string; got {json.dumps(item['text'])[:80]}."
        )


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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QwenDeployError(
            f"{path} is not UTF-8 text: byte 0x{e.object[e.start]:02x} at offset {e.start} "
            f"({e.reason}); save the file as UTF-8."
        ) from e
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
