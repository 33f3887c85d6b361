"""Split a thinking model's output into reasoning (`<think>...</think>`) and the answer.

DeepSeek-R1 distills and Fin-R1 think first. Their chat templates often end the prompt with
`<think>\\n` already, so the output starts inside the block and only closes it: `started=True`.
Text is pushed as it streams, so a tag may arrive split over several pushes ("</th" + "ink>");
the parser holds back any tail that could still become a tag. Newlines that only frame the tags
are dropped, as the Qwen templates drop them when they render the turn again: reasoning is
stripped of newlines at both ends, the answer after `</think>` of leading newlines.
"""

from __future__ import annotations

OPEN = "<think>"
CLOSE = "</think>"


def prompt_opens_think(prompt: str) -> bool:
    """True when the rendered prompt ends inside an opened think block (output starts reasoning)."""
    return prompt.rstrip().endswith(OPEN)


def held_tail(text: str, tags: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `tags`: text a
    stream holds back until the next tokens show whether a tag (or stop string) follows."""
    longest = max(len(t) for t in tags) - 1
    for n in range(min(longest, len(text)), 0, -1):
        tail = text[-n:]
        if any(t.startswith(tail) for t in tags):
            return n
    return 0


class ReasoningParser:
    """Streaming splitter: push text deltas, get (reasoning delta, content delta) back.

    Only a `<think>` at the very start of the output (after whitespace) opens a block, and only
    one block is parsed; tags after it are ordinary answer text.
    """

    def __init__(self, started: bool = False):
        self._state = "start"  # start -> reasoning -> content, or start -> content
        self._fallback = "reasoning" if started else "content"
        self._pending = ""
        self._trim_lead = False  # drop newlines opening the reasoning / the answer after it
        self.saw_reasoning = started

    def push(self, text: str) -> tuple[str, str]:
        """Add a text delta; return the (reasoning, content) text that is now certain."""
        self._pending += text
        reasoning, content = "", ""
        if self._state == "start":
            stripped = self._pending.lstrip()
            if stripped.startswith(OPEN):
                self._pending = stripped[len(OPEN) :]
                self._enter_reasoning()
            elif OPEN.startswith(stripped):
                return "", ""  # still could become "<think>"
            elif self._fallback == "reasoning":
                self._enter_reasoning()
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = self._pending.find(CLOSE)
            if end < 0:
                hold = held_tail(self._pending, [CLOSE])
                body = self._pending[: len(self._pending) - hold]
                ready = body.rstrip("\n")  # trailing newlines may frame "</think>": hold them
                self._pending = self._pending[len(ready) :]
                return self._trim(ready), ""
            reasoning = self._trim(self._pending[:end].rstrip("\n"))
            self._pending = self._pending[end + len(CLOSE) :]
            self._state = "content"
            self._trim_lead = True
        content, self._pending = self._trim(self._pending), ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """End of output: release held-back text (an unclosed block stays reasoning)."""
        rest, self._pending = self._pending, ""
        if self._state == "start":
            if self._fallback == "content":
                return "", rest
            self._enter_reasoning()
        if self._state == "reasoning":
            return self._trim(rest.rstrip("\n")), ""
        return "", self._trim(rest)

    def _enter_reasoning(self) -> None:
        self._state = "reasoning"
        self._trim_lead = True
        self.saw_reasoning = True

    def _trim(self, text: str) -> str:
        if self._trim_lead:
            text = text.lstrip("\n")
            self._trim_lead = not text
        return text


def split_reasoning(text: str, started: bool = False) -> tuple[str | None, str]:
    """(reasoning_content, content) of a whole output; reasoning is None if there was no block."""
    parser = ReasoningParser(started)
    reasoning, content = parser.push(text)
    tail_reasoning, tail_content = parser.flush()
    reasoning += tail_reasoning
    return (reasoning if parser.saw_reasoning else None), content + tail_content
