"""Tool calls in a model's answer: Qwen2.5's `<tool_call>{json}</tool_call>` blocks (the Hermes
format its chat template asks for) become OpenAI `tool_calls`.

Small models often drop the tags and answer with the bare JSON object the template describes
(Qwen2.5-Coder-0.5B-Instruct does, greedy, for a weather question). So an answer that is nothing
but such objects, one per line (or in one ```json fence), each naming a declared tool, is a call
too. Anything that does not parse is left as plain content: a malformed call never fails a request.
Streams hold text back only while it may still become a call: from a leading `{`, a leading code
fence, or a `<tool_call>` tag on; calls are sent whole, when the answer ends.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from .reasoning import held_tail

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)
FENCE = re.compile(r"^```(?:json)?\s*\n(.*?)\n?```$", re.DOTALL)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's function.arguments)
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function"}
        call["function"] = {"name": self.name, "arguments": self.arguments}
        return call if index is None else {"index": index, **call}


def _call(text: str, names: set[str] | None) -> ToolCall | None:
    """One {"name": ..., "arguments": {...}} object; None if it is not one (or, with `names`,
    names an undeclared tool)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    if names is not None and obj["name"] not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str, names: set[str]) -> tuple[str, list[ToolCall]] | None:
    """(content before the calls, calls) when `text` holds tool calls; None: it is plain content.

    Tagged blocks may name any function (the model said it is a call); bare JSON must name one
    of `names`, the declared tools, to count.
    """
    if OPEN in text:
        start = text.index(OPEN)
        blocks = BLOCK.findall(text, start)
        calls = [_call(block.strip(), None) for block in blocks]
        leftover = BLOCK.sub("", text[start:]).strip()
        if not calls or None in calls or leftover:
            return None
        return text[:start].strip(), calls
    body = text.strip()
    fenced = FENCE.match(body)
    lines = [line for line in (fenced.group(1) if fenced else body).splitlines() if line.strip()]
    calls = [_call(line, names) for line in lines]
    if not calls or None in calls:
        whole = _call(fenced.group(1) if fenced else body, names)  # one object over many lines
        return ("", [whole]) if whole else None
    return "", calls


class ToolCallStream:
    """Streaming form of parse_tool_calls: push content deltas, get (content to send now,
    calls); finish() settles whatever was held back."""

    def __init__(self, names: set[str], prefill: str = ""):
        self.names = names
        self._held = prefill  # a forced call's opening, which the prompt already holds
        self._holding = bool(prefill)
        self._started = False  # any non-space content seen

    def push(self, text: str) -> str:
        """The content that can be sent now; the rest is held until it is settled."""
        if self._holding:
            self._held += text
            return ""
        pending = self._held + text
        if not self._started:
            lead = pending.lstrip()
            if not lead:
                self._held = pending
                return ""
            self._started = True
            if lead.startswith(("{", "```")) or OPEN.startswith(lead[: len(OPEN)]):
                self._held, self._holding = pending, True
                return ""
        if OPEN in pending:
            start = pending.index(OPEN)
            self._held, self._holding = pending[start:], True
            return pending[:start]
        keep = held_tail(pending, [OPEN])
        self._held = pending[len(pending) - keep :] if keep else ""
        return pending[: len(pending) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the answer: (held content to send, the calls it made)."""
        held, self._held = self._held, ""
        parsed = parse_tool_calls(held, self.names) if self._holding else None
        return parsed if parsed else (held, [])


FUNCTION_SHAPE = '{"type": "function", "function": {"name": ...}}'


class ToolError(ValueError):
    """A request's tools or tool_choice that cannot be served; `param` names which."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolPlan:
    """What a request's `tools` and `tool_choice` mean for the prompt and the answer."""

    tools: list[dict] | None  # what the chat template renders
    names: frozenset[str]  # declared functions; empty: the answer is not parsed for calls
    prefill: str = ""  # the opening of a forced call, appended to the prompt

    def stream(self) -> ToolCallStream | None:
        return ToolCallStream(set(self.names), self.prefill) if self.names else None


def plan_tools(tools: list[dict] | None, choice: str | dict | None) -> ToolPlan:
    """OpenAI's tool_choice: "auto" (default) parses calls, "none" hides the tools, "required"
    and a named function force a call by writing its opening after the generation prompt.
    Raises ToolError naming the parameter and what is wrong."""
    declared = [_function_name(tool) for tool in tools or []]
    if None in declared:
        index = declared.index(None)
        raise ToolError(f"tools.{index}", f"a tool must be {FUNCTION_SHAPE}; tools.{index} is not.")
    names = frozenset(n for n in declared if n)
    if not names:
        if choice not in (None, "none", "auto"):
            raise ToolError("tool_choice", "tool_choice needs tools: declare them in `tools`.")
        return ToolPlan(None, frozenset())
    if choice in (None, "auto"):
        return ToolPlan(tools, names)
    if choice == "none":
        return ToolPlan(None, frozenset())
    if choice == "required":
        return ToolPlan(tools, names, OPEN + "\n")
    forced = _function_name(choice)
    if forced is None:
        raise ToolError(
            "tool_choice",
            f"tool_choice {choice!r} is not one of 'auto', 'none', 'required' or {FUNCTION_SHAPE}.",
        )
    if forced not in names:
        raise ToolError(
            "tool_choice",
            f"tool_choice names {forced!r}, which is not among the declared tools; declare it in "
            "`tools` or name one of them.",
        )
    return ToolPlan(tools, names, f'{OPEN}\n{{"name": {json.dumps(forced)}, "arguments": {{')


def _function_name(entry: object) -> str | None:
    """The function name of a {"type": "function", "function": {"name": ...}} entry; None if it
    is not one."""
    function = entry.get("function") if isinstance(entry, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None
