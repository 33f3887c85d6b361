"""The terminal chat: a multi-turn conversation streamed from one Generator.

Input lines come from any iterable (a terminal or a pipe), output goes through `write(kind, text)`
so the CLI decides how reasoning, answers and notices look. The history keeps only the answers:
chat templates drop earlier turns' reasoning anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import QwenDeployError
from .generator import Generator
from .sampling import SamplingParams

COMMANDS = "/exit or /quit ends the chat, /reset starts a new conversation"


def chat_loop(
    generator: Generator,
    params: SamplingParams,
    lines: Iterable[str],
    write: Callable[[str, str], None],
    system: str | None = None,
    speculation: dict | None = None,
) -> None:
    """Answer each input line in turn; kinds written: reasoning, content, end, notice, error.

    `speculation`: drafter and draft_tokens for Generator.stream (speculative decoding)."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = history[:1] if system else []
            write("notice", "(new conversation)")
            continue
        if text.startswith("/"):
            write("notice", f"unknown command {text}; {COMMANDS}")
            continue
        messages = [*history, {"role": "user", "content": text}]
        try:
            content = []
            for delta in generator.stream(messages=messages, params=params, **(speculation or {})):
                if delta.reasoning_content:
                    write("reasoning", delta.reasoning_content)
                if delta.content:
                    write("content", delta.content)
                    content.append(delta.content)
        except QwenDeployError as e:  # e.g. the conversation outgrew the context: say so, go on
            write("error", str(e))
            continue
        write("end", "")
        history = [*messages, {"role": "assistant", "content": "".join(content)}]
