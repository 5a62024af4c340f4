"""Text normalisation and sentence splitting for corpus ingest.

Rules (documented in ARCHITECTURE.md, "Bad input"):

- bytes that are not valid UTF-8 → reject ``invalid_utf8`` (the record is kept out rather than guessed at;
  the reject row shows where it broke);
- Unicode NFC, control characters removed, runs of whitespace collapsed to one space, ends stripped;
- blank lines in line-oriented files are separators, not records: they are counted, not rejected;
  an empty text in a record-oriented source (jsonl, parquet) → reject ``empty_text``;
- fewer than ``min_chars`` characters → reject ``too_short``;
- more than ``max_chars`` characters → the text is split into sentences and every sentence within the limit is
  kept; a sentence still over the limit → reject ``too_long`` (so nothing good in a huge line is lost).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

_CONTROL = {c for c in map(chr, range(0x20)) if c not in "\t\n\r"} | {chr(0x7F)}
_CONTROL_RE = re.compile("[" + re.escape("".join(sorted(_CONTROL))) + "\u200b\ufeff]")
_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class TextLimits:
    """Length limits in characters (after normalisation)."""

    min_chars: int = 2
    max_chars: int = 1000


@dataclass(frozen=True)
class TextReject:
    reason: str
    detail: str


def decode_utf8(data: bytes) -> str | TextReject:
    """Strict UTF-8 decode; a BOM is dropped."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[max(0, exc.start - 8) : exc.end + 8]
        return TextReject("invalid_utf8", f"byte {exc.start}: {exc.reason} near {bad!r}")


def normalise(text: str) -> str:
    """NFC, control characters removed, whitespace collapsed, stripped."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL_RE.sub("", text)
    return _SPACE_RE.sub(" ", text).strip()


@functools.lru_cache(maxsize=1)
def _sentencizer():
    # A blank English pipeline with the rule-based sentencizer: no model download, fast, deterministic.
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.max_length = 50_000_000
    return nlp


def split_sentences(text: str) -> list[str]:
    """Split a document into normalised, non-empty sentences."""
    doc = _sentencizer()(text)
    return [s for s in (normalise(sent.text) for sent in doc.sents) if s]


def clean_text(
    text: str, limits: TextLimits = TextLimits(), split: bool = False
) -> Iterator[str | TextReject]:
    """Normalise one record; yield the kept sentence(s) and a reject for each bad part.

    With ``split`` the text is a document and always split into sentences; otherwise it is split only when
    it exceeds ``limits.max_chars``.
    """
    norm = normalise(text)
    if not norm:
        yield TextReject("empty_text", "empty after normalisation")
        return
    parts = split_sentences(norm) if split or len(norm) > limits.max_chars else [norm]
    for part in parts:
        if len(part) > limits.max_chars:
            yield TextReject("too_long", f"{len(part)} chars > max_chars={limits.max_chars}: {part[:80]!r}…")
        elif len(part) < limits.min_chars:
            yield TextReject("too_short", f"{len(part)} chars < min_chars={limits.min_chars}: {part!r}")
        else:
            yield part
