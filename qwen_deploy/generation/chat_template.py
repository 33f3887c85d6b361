"""The checkpoint's own chat template, rendered as transformers' `apply_chat_template` renders it.

Templates come from the Hub and are untrusted code: they run in jinja2's immutable sandbox. The
environment copies transformers' (utils/chat_template_utils.py): trim_blocks + lstrip_blocks, loop
controls, a `{% generation %}` tag, a `tojson` that does not HTML-escape, `raise_exception`,
`strftime_now`, guarded `dict`/`namespace`; messages are cleaned the same way (None values
dropped, plain JSON types only, reasoning fields aliased) and the named special tokens are
template variables. Any failure inside the template becomes a ChatTemplateError naming it.

Rendering has a time and a size limit, so a template that loops cannot freeze its caller (the
server renders in a worker thread, and a Python thread cannot be stopped from outside): the
rendering thread traces the template's own frames (sys.settrace on that thread only, template
code only) and checks the deadline at each template line, which every loop iteration runs; the
output is generated chunk by chunk and counted; strings and lists grown by `*`, `**`, `+`, `%`,
calls, filters or namespace assignments are checked against the size limit before or as they are
made, and numbers larger than it are refused as call arguments (no `"x".ljust(10**10)`). A single
C-level operation on values within the size limit is not interrupted, but is bounded by it.
Either limit is a ChatTemplateError that names it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import ArtifactError, QwenDeployError
from ..manifest import MANIFEST, Manifest
from .tokenizer import load_special_tokens

TEMPLATE_FILENAME = "<template>"  # what jinja2 calls a template made from a string in tracebacks
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
RENDER_SECONDS = 2.0  # a render's time limit (real templates take well under a millisecond)
RENDER_CHARS = 16 * 2**20  # the limit on the output and on any string or list made while rendering
# "%1000000000d" % 1: a width or precision that alone passes the size limit
_WIDE_FORMAT = re.compile(r"%(\([^)]*\))?[-#0 +]*(\*|\d{8,}|\d*\.(\*|\d{8,}))")


class ChatTemplateError(QwenDeployError):
    """The chat template cannot be compiled, or failed while rendering these messages."""


class _TemplateRaised(jinja2.TemplateError):
    """raise_exception() called by the template itself: its message is meant for the user."""


class _TemplateLimit(Exception):
    """A render passed its time or size limit (the message says which)."""


class _Limits:
    """One render's deadline and size limit; active (thread-local) while it renders."""

    def __init__(self, seconds: float, chars: int):
        self.seconds, self.chars = seconds, chars
        self.deadline = time.monotonic() + seconds

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TemplateLimit(f"ran past its {self.seconds:g} s time limit")

    def check_size(self, value: Any) -> Any:
        if isinstance(value, (str, list, tuple, dict, bytes)) and len(value) > self.chars:
            raise _TemplateLimit(f"made a value longer than its limit of {self.chars} characters")
        return value

    def trace(self, frame, event, arg):
        """sys.settrace's global function: template frames get a line tracer, others none."""
        if frame.f_code.co_filename != TEMPLATE_FILENAME:
            return None
        self.check_time()
        return self._line

    def _line(self, frame, event, arg):
        self.check_time()
        return self._line


def _check_args(limits: _Limits, args: tuple, kwargs: dict) -> None:
    """Refuse a call or filter argument that could make a value over the size limit at once."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and abs(value) > limits.chars:
            raise _TemplateLimit(
                f"passed the number {value}, larger than its limit of {limits.chars} characters"
            )
        limits.check_size(value)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja2's own tojson HTML-escapes <, >, & and ' (wrong in a prompt); transformers overrides it
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` in templates without exposing the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore names (a route to CPython internals)."""

    def __init__(*args, **kwargs):  # jinja2's signature trick, so namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        if _render_limits.current is not None:  # a namespace accumulates across loop iterations
            _render_limits.current.check_size(value)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace ({name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}` marks assistant text for training masks; here it renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


class _RenderLimits(threading.local):
    current: _Limits | None = None


_render_limits = _RenderLimits()


class _LimitedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox with the current render's size limit on the operators, calls and
    filters that can make large values (also keeps jinja2 from folding `10 ** 10 ** 10` at
    compile time: intercepted operators are never constant-folded)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        limits = _render_limits.current
        if limits is not None:
            _check_binop(limits, operator, left, right)
        result = super().call_binop(context, operator, left, right)
        return result if limits is None else limits.check_size(result)

    def call(__self, __context, __obj, *args, **kwargs):
        limits = _render_limits.current
        if limits is not None:
            _check_args(limits, args, kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        return result if limits is None else limits.check_size(result)


def _limited_filter(f: Callable) -> Callable:
    """A filter under the current render's size limit (compiled templates call filters directly,
    not through the environment): `"x"|center(10**10)` is refused before it is made."""

    @functools.wraps(f)  # keeps jinja2's pass_context/pass_environment marks
    def limited(*args, **kwargs):
        limits = _render_limits.current
        if limits is not None:
            _check_args(limits, args, kwargs)
        result = f(*args, **kwargs)
        return result if limits is None else limits.check_size(result)

    return limited


def _check_binop(limits: _Limits, operator: str, left: Any, right: Any) -> None:
    """Refuse an operation whose result would pass the size limit, before it is made."""
    sized, size = (str, list, tuple, bytes), 0
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int):
                size = len(seq) * n
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        size = abs(left).bit_length() * right // 4  # a decimal digit holds ~3.3 bits
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        size = len(left) + len(right)
    elif operator == "%" and isinstance(left, str):
        values = right if isinstance(right, tuple) else (right,)
        wide = any(isinstance(v, int) and abs(v) > limits.chars for v in values)
        if wide or _WIDE_FORMAT.search(left):
            size = limits.chars + 1  # a width or precision that alone passes the limit
    if size > limits.chars:
        raise _TemplateLimit(
            f"would make a value longer than its limit of {limits.chars} characters"
        )


def _environment() -> ImmutableSandboxedEnvironment:
    env = _LimitedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.filters = {name: _limited_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """Rebuild caller data from plain JSON types, so the sandbox sees no object with methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models (the server's requests)
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _clean_messages(messages: list[dict]) -> list[dict]:
    """Drop None values (OpenAI clients send content=None), plain types, alias reasoning fields."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} dicts.")
    cleaned = []
    for i, message in enumerate(_plain(list(messages))):
        if not isinstance(message, dict):
            raise ChatTemplateError(
                f"messages[{i}] is a {type(message).__name__}; each message must be a dict "
                "with 'role' and 'content'."
            )
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
        if reasoning is not None:  # templates read reasoning_content, gpt-oss reads thinking
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        cleaned.append(message)
    return cleaned


def _template_line(error: BaseException) -> int | None:
    """The template line a render error happened on (jinja2 rewrites tracebacks to name it)."""
    line = None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == TEMPLATE_FILENAME:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


class ChatTemplate:
    """A compiled chat template plus the special tokens it sees as variables (bos_token, ...)."""

    def __init__(
        self,
        template: str,
        special_tokens: dict[str, str],
        origin: str = "the chat template",
        seconds: float = RENDER_SECONDS,
        chars: int = RENDER_CHARS,
    ):
        """Compiles `template` now, so that a broken one stops export and serve before any work;
        `origin` names where it came from in that error; `seconds` and `chars`: each render's
        time limit and the limit on its output (and on any value it makes)."""
        self.seconds, self.chars = seconds, chars
        if not isinstance(template, str) or not template.strip():
            raise ChatTemplateError(f"{origin} is empty; it must be a Jinja template string.")
        self.source = template
        self.special_tokens = dict(special_tokens)
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            problem = (e.message or "invalid syntax").rstrip(".")
            raise ChatTemplateError(
                f"{origin} has a Jinja syntax error at line {e.lineno}: {problem}; fix the "
                "template in the checkpoint (chat_template.jinja, or chat_template in "
                "tokenizer_config.json) and export it again."
            ) from e

    @classmethod
    def from_artifact(cls, folder: str | Path) -> ChatTemplate:
        """The template recorded in the manifest, special tokens from tokenizer_config.json."""
        manifest = Manifest.load(folder)
        if not manifest.chat_template:
            raise ArtifactError(
                f"{folder} has no chat template (its checkpoint defines none, e.g. a base model): "
                "send a plain prompt instead of chat messages, or add chat_template to the "
                "checkpoint's tokenizer_config.json and re-export."
            )
        origin = f"the chat template in {Path(folder) / MANIFEST}"
        return cls(manifest.chat_template, load_special_tokens(folder), origin)

    def render(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **kwargs,
    ) -> str:
        """The prompt string for `messages`; kwargs (enable_thinking, documents, ...) reach the
        template as variables and override same-named special tokens, as in transformers."""
        messages = _clean_messages(messages)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise ChatTemplateError("tools must be a list of JSON-schema dicts.")
        variables = {"documents": None, **self.special_tokens, **_plain(kwargs)}
        try:
            return self._render(
                messages=messages,
                tools=_plain(tools),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except _TemplateLimit as e:
            raise ChatTemplateError(
                f"the chat template {e} while rendering these messages (limits: {self.seconds:g} "
                f"s, {self.chars} characters of output); a template that loops without end or "
                "grows its text without bound cannot render: fix the template, or send fewer or "
                "shorter messages."
            ) from e
        except _TemplateRaised as e:
            raise ChatTemplateError(f"the chat template rejected these messages: {e}") from e
        except Exception as e:  # untrusted template code: any failure is a template problem
            line = _template_line(e)
            where = f" at line {line}" if line else ""
            raise ChatTemplateError(
                f"the chat template failed{where} ({type(e).__name__}: {e}); the messages do not "
                "have the shape this template expects (roles, content, tool_calls)."
            ) from e

    def _render(self, **variables) -> str:
        """The template's output within this template's limits (see the module docstring)."""
        limits = _Limits(self.seconds, self.chars)
        previous_limits, previous_trace = _render_limits.current, sys.gettrace()
        _render_limits.current = limits
        sys.settrace(limits.trace)  # this thread only; a debugger's or coverage's comes back after
        try:
            parts, size = [], 0
            for part in self._template.generate(**variables):
                size += len(part)
                if size > self.chars:
                    raise _TemplateLimit(f"wrote more than its limit of {self.chars} characters")
                parts.append(part)
            limits.check_time()
            return "".join(parts)
        finally:
            sys.settrace(previous_trace)
            _render_limits.current = previous_limits
