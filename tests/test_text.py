"""Text normalisation and the bad-line rules."""

from __future__ import annotations

from vlp_core.corpus.ingest import ingest_texts
from vlp_core.corpus.sources import TextRecord
from vlp_core.corpus.text import TextLimits, TextReject, clean_text, decode_utf8, normalise, split_sentences


def test_normalise():
    assert normalise("  a\u0301\tb\x00c \n\n d\u200b ") == "\u00e1 bc d"


def test_invalid_utf8_rejected_with_position():
    out = decode_utf8(b"caf\xe9 au lait")
    assert isinstance(out, TextReject) and out.reason == "invalid_utf8" and "byte 3" in out.detail
    assert decode_utf8("\ufeffhello".encode()) == "hello"


def test_long_line_is_split_and_nothing_good_lost():
    good = "A dog runs on the beach. " * 3
    huge = "x" * 50
    parts = list(clean_text(good + huge + ".", TextLimits(max_chars=40)))
    kept = [p for p in parts if isinstance(p, str)]
    rejected = [p for p in parts if isinstance(p, TextReject)]
    assert kept == ["A dog runs on the beach."] * 3
    assert [r.reason for r in rejected] == ["too_long"]


def test_short_and_empty():
    assert [p.reason for p in clean_text(" \t ")] == ["empty_text"]
    assert [p.reason for p in clean_text("a")] == ["too_short"]


def test_split_sentences_documents():
    assert split_sentences("It rained. The fire  spread!  Why?") == ["It rained.", "The fire spread!", "Why?"]


def test_ingest_texts_rows_and_rejects():
    recs = [
        TextRecord("f@0", b"A red car."),
        TextRecord("f@11", b"\xff\xfe bad"),
        TextRecord("f@20", b"First one. Second one.", split=True),
        TextRecord("f@40", None, error=None),
    ]
    recs[-1].data = "A red car."  # duplicate content → same id
    rows = ingest_texts(recs, "t", "shard0")
    texts = rows.tables["texts"]
    assert [t["text"] for t in texts] == ["A red car.", "First one.", "Second one.", "A red car."]
    assert texts[0]["text_id"] == texts[3]["text_id"]
    assert [t["uri"] for t in texts[1:3]] == ["f@20#s0", "f@20#s1"]
    (rej,) = rows.tables["rejects"]
    assert (rej["stage"], rej["source"], rej["input_id"], rej["reason"]) == (
        "ingest",
        "t",
        "f@11",
        "invalid_utf8",
    )
