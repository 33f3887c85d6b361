"""Text <-> token ids from the artifact's own tokenizer files, and streaming detokenization.

`tokenizer.json` is the tokenizer (the `tokenizers` library runs it exactly as transformers'
fast tokenizer does); `tokenizer_config.json` names the special tokens. Byte-level BPE splits one
Chinese character or emoji over several tokens, so streaming decodes a short window of ids and
holds text back until its last character is complete.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from ..errors import ArtifactError
from .structured import Constraint, guidance_tokenizer

# The named special tokens transformers passes to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
REPLACEMENT_CHAR = "\ufffd"
PROBE_CHARS = 6  # a long text's first probe: characters per token of the limit
HEAD_SLACK = 64  # tokens a cut text's head can have beyond the same stretch of the whole text


class TooManyTokens(Exception):
    """A text has `count` tokens (`at_least`: a head of it had that many more than a cut can
    add), at least its limit; its ids were not listed."""

    def __init__(self, count: int, at_least: bool = False):
        super().__init__(count)
        self.count = count
        self.at_least = at_least


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(
            f"{path} cannot be read ({e}); copy it again from the checkpoint."
        ) from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; copy it again from the checkpoint.")
    return data


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_config(folder: str | Path) -> dict:
    """tokenizer_config.json of an artifact or checkpoint folder ({} when it has none)."""
    path = Path(folder) / "tokenizer_config.json"
    return _read_json(path) if path.is_file() else {}


def load_special_tokens(folder: str | Path) -> dict[str, str]:
    """bos/eos/pad/... tokens as the checkpoint defines them, resolved the way transformers does.

    tokenizer_config.json is the source; special_tokens_map.json overrides it only in the legacy
    layout (a config without added_tokens_decoder), as in transformers' from_pretrained.
    """
    config = tokenizer_config(folder)
    names = {k: config.get(k) for k in NAMED_SPECIAL_TOKENS}
    legacy_map = Path(folder) / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and legacy_map.is_file():
        names.update({k: v for k, v in _read_json(legacy_map).items() if k in names})
    resolved = {k: _token_content(v) for k, v in names.items()}
    return {k: v for k, v in resolved.items() if v is not None}


class Tokenizer:
    """The checkpoint's tokenizer: encode adds no special tokens (the chat template writes them)."""

    def __init__(self, tokenizer: HFTokenizer, special_tokens: dict[str, str]):
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens)

    @classmethod
    def from_artifact(cls, folder: str | Path) -> Tokenizer:
        """Load tokenizer.json and tokenizer_config.json from an artifact (or checkpoint) folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(
                f"{folder} has no tokenizer.json; the runtime needs the fast tokenizer file: "
                "save it with transformers (AutoTokenizer.from_pretrained(src)"
                ".save_pretrained(src)) and re-export."
            )
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust loader raises a bare Exception on malformed files
            raise ArtifactError(f"{path} is not a valid tokenizer file ({e}).") from e
        special = load_special_tokens(folder)
        _add_declared_tokens(tok, tokenizer_config(folder), special)
        return cls(tok, special)

    def encode(
        self, text: str, limit: int | None = None, add_special_tokens: bool = False
    ) -> list[int]:
        """Token ids of `text` (no special tokens added unless `add_special_tokens`: then the
        tokenizer's post-processor adds its own, e.g. a BOS; Qwen's adds none), through
        tokenizers' batch path, which releases the GIL for the whole computation: its
        single-text encode holds it while another thread tokenizes (three 2 MB prompts prepared
        at once stopped a server's event loop ~3 s each). With `limit`, a text of that many
        tokens or more raises TooManyTokens before its ids become a Python list, and a text far
        past it is refused from a head of it, without tokenizing the rest (a 4 MB body takes
        seconds of CPU that the running requests' decode steps need)."""
        if limit is not None:
            self._refuse_from_head(text, limit)
        encoding = self._encoding(text, add_special_tokens)
        if limit is not None and len(encoding) >= limit:
            raise TooManyTokens(len(encoding))
        return encoding.ids

    def _encoding(self, text: str, add_special_tokens: bool = False):
        return self._tok.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]

    def _refuse_from_head(self, text: str, limit: int) -> None:
        """TooManyTokens when a head of `text` has `limit` + HEAD_SLACK tokens. Each probe takes
        1.5-4x the characters of the last, as many as its tokens per character say reach the
        limit (while shorter than the text). A head ends before whitespace where it can, so
        pre-tokenization splits it where it splits the whole text and only the last piece can
        differ."""
        need = limit + HEAD_SLACK
        chars = PROBE_CHARS * limit
        while chars < len(text):
            cut = text.rfind(" ", chars // 2, chars)
            count = len(self._encoding(text[: cut if cut > 0 else chars]))
            if count >= need:
                raise TooManyTokens(count - HEAD_SLACK, at_least=True)
            chars = int(chars * min(4.0, max(1.5, 1.2 * need / max(count, 1))))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id as the tokenizer spells it (byte-level BPE's "Ġthe");
        None for an id it does not have."""
        return self._tok.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a token can hold part of a UTF-8 character, so its
        text alone can be wrong): byte-level BPE pieces map back through GPT-2's byte alphabet,
        added tokens are their own text."""
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            return b""
        if int(token_id) in self._added_ids:
            return piece.encode()
        return bytes(_BYTE_OF_CHAR[c] for c in piece)

    def constraint(self, grammar: str) -> Constraint:
        """A fresh grammar state for one sequence over this vocabulary."""
        return Constraint(self._guidance, grammar)

    @functools.cached_property
    def _guidance(self):
        """llguidance's view of this vocabulary (~1 s to build: once per tokenizer)."""
        eos = self.token_to_id(self.special_tokens.get("eos_token", ""))
        return guidance_tokenizer(self._tok.to_str(), eos)

    @functools.cached_property
    def _added_ids(self) -> set[int]:
        return set(self._tok.get_added_tokens_decoder())


def _gpt2_byte_alphabet() -> dict[str, int]:
    """The printable character byte-level BPE writes for each byte (GPT-2's bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + n for n in range(len(others))]
    return {chr(c): b for c, b in zip(chars, printable + others, strict=True)}


_BYTE_OF_CHAR = _gpt2_byte_alphabet()


def _add_declared_tokens(tok: HFTokenizer, config: dict, special: dict[str, str]) -> None:
    """Add the tokens tokenizer_config.json declares and tokenizer.json lacks, as transformers does.

    Real Qwen checkpoints never need this; a config naming e.g. a new pad token does.
    """
    declared = sorted(
        (int(i), spec) for i, spec in (config.get("added_tokens_decoder") or {}).items()
    )
    missing = [
        AddedToken(
            spec["content"],
            single_word=spec.get("single_word", False),
            lstrip=spec.get("lstrip", False),
            rstrip=spec.get("rstrip", False),
            normalized=spec.get("normalized", not spec.get("special", False)),
            special=spec.get("special", False),
        )
        for _, spec in declared
        if tok.token_to_id(spec["content"]) is None
    ]
    have = {t.content for t in missing}
    missing += [
        AddedToken(content, special=True, normalized=False)
        for content in special.values()
        if tok.token_to_id(content) is None and content not in have
    ]
    if missing:
        tok.add_tokens(missing)


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never split a UTF-8 character.

    Decodes the window ids[prefix:]; the text of ids[prefix:read] was already emitted. A delta
    whose last character is U+FFFD is an incomplete multi-byte character: hold it until the next
    token completes it. The concatenation of all deltas plus flush() equals decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: the text before it is final
        self._read = 0  # ids up to here are emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(done) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """The held-back rest at the end of the stream (invalid bytes come out as U+FFFD)."""
        done = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(done) :]
