"""The VLMixer patch gallery with image-tag patches, the ``ground`` stage's rows and the CMC coverage view, on
tiny hand-made stores (no detector, no network; spaCy's small English model only)."""

from __future__ import annotations

import inspect
import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flows.build_corpus import gallery_candidates, ground_signature
from stores.catalog import build_catalog, connect
from stores.shards import ShardStore, to_table
from vlp_core.config import GalleryConfig
from vlp_core.corpus.quality import expected_cutmix_replacements
from vlp_core.corpus.stages import concept_matcher, gallery_rows, ground_rows
from vlp_core.language import ConceptVocabulary, cutmix_choices
from vlp_core.paths import DataLayout

LABELS = ["dog", "cup", "traffic light", "hot dog", "cell phone"]  # the "detector's" vocabulary


@pytest.fixture(scope="module")
def nlp():
    import spacy

    from vlp_core.language.grounding import DEFAULT_SPACY_MODEL

    return spacy.load(DEFAULT_SPACY_MODEL, disable=["parser", "ner"])


def _jpeg(w: int, h: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _region(image_id, idx, label, score, box, w, h):
    x1, y1, x2, y2 = box
    b5 = [x1 / w, y1 / h, x2 / w, y2 / h, (x2 - x1) * (y2 - y1) / (w * h)]
    return {"image_id": image_id, "region_idx": idx, "label": label, "score": score, "box": box, "box5": b5,
            "detector": "whole" if idx == 0 else "test", "feature": [float(idx), score, 0.5]}  # fmt: skip


def _commit(store: ShardStore, stage: str, tables: dict[str, list[dict]]) -> None:
    store.commit(stage, "corpus", stage, "sig", [("u", "u")],
                 {name: to_table(name, rows) for name, rows in tables.items()})  # fmt: skip


# image id -> (size, detections [(label, score, box)], image-level tags [(tag, score, origin)])
IMAGES = {
    "a": (
        (80, 40),
        [("dog", 0.8, [10, 5, 50, 35])],
        [("dog", 0.8, "detector"), ("envelope", 0.9, "imagenet")],
    ),
    "b": ((40, 40), [], [("envelope", 0.6, "imagenet"), ("binder", 0.3, "imagenet")]),
    "c": ((40, 40), [], [("envelope", 0.5, "imagenet")]),  # exactly the threshold: in
    "d": ((40, 40), [], [("envelope", 0.49, "imagenet")]),  # just below: out
    "e": ((40, 40), [("cup", 0.9, [0, 0, 20, 20])], [("cup", 0.9, "detector"), ("cup", 0.95, "imagenet")]),
    "f": ((60, 30), [("dog", 0.2, [0, 0, 10, 10])], [("dog", 0.99, "imagenet")]),  # detection below 0.3
}


@pytest.fixture()
def tiny(tmp_path) -> DataLayout:
    """A store with images, regions (region 0 = whole image) and image tags, and its catalog."""
    layout = DataLayout(tmp_path / "data")
    store = ShardStore(layout.store)
    images, regions, tags = [], [], []
    for i, (iid, ((w, h), dets, image_tags)) in enumerate(IMAGES.items()):
        jpeg = _jpeg(w, h, (40 * i, 100, 200))
        images.append({"image_id": iid, "source": "t", "uri": f"t/{iid}.png", "orig_width": w,
                       "orig_height": h, "width": w, "height": h, "n_bytes": len(jpeg),
                       "image": jpeg})  # fmt: skip
        regions.append(_region(iid, 0, "image", 1.0, [0.0, 0.0, float(w), float(h)], w, h))
        regions += [
            _region(iid, k + 1, lab, s, [float(v) for v in box], w, h) for k, (lab, s, box) in enumerate(dets)
        ]
        tags.append({"image_id": iid, "tags": [t for t, _, _ in image_tags],
                     "tag_scores": [s for _, s, _ in image_tags],
                     "tag_origins": [o for _, _, o in image_tags],
                     "tag_sentence": " ".join(t for t, _, _ in image_tags)})  # fmt: skip
    _commit(store, "ingest", {"images": images})
    _commit(store, "regions", {"regions": regions, "image_tags": tags})
    build_catalog(layout.catalog, layout.store)
    return layout


def _candidates(layout: DataLayout, **options) -> list[dict]:
    con = connect(layout.catalog)
    try:
        return gallery_candidates(con, GalleryConfig(**options))
    finally:
        con.close()


def _key(c: dict) -> tuple:
    return c["concept"], c["image_id"], c["region_idx"], c["origin"], round(c["score"], 4)


def test_image_tag_patches_only_above_the_threshold_and_capped(tiny, nlp):
    cands, jpeg_of = _candidates(tiny)
    assert [_key(c) for c in cands] == [
        ("cup", "e", 1, "detector", 0.9),  # e's imagenet "cup" is no second patch of the same image
        ("dog", "a", 1, "detector", 0.8),  # detector patches first, whatever the image-tag scores
        ("dog", "f", 0, "image_tag", 0.99),
        ("envelope", "a", 0, "image_tag", 0.9),
        ("envelope", "b", 0, "image_tag", 0.6),
        ("envelope", "c", 0, "image_tag", 0.5),  # >= threshold; d (0.49) and b's binder (0.3) are out
    ]
    assert sorted(jpeg_of) == ["a", "b", "c", "e", "f"]
    capped, _ = _candidates(tiny, max_per_concept=1, image_tag_min_score=0.55)
    assert [_key(c) for c in capped] == [
        ("cup", "e", 1, "detector", 0.9),
        ("dog", "a", 1, "detector", 0.8),
        ("envelope", "a", 0, "image_tag", 0.9),
    ]
    assert len(_candidates(tiny, max_per_concept=2)[0]) == 5  # envelope keeps a and b

    rows = gallery_rows(cands, jpeg_of, LABELS, thumb_side=32, nlp=nlp)
    patches = rows.tables["patch_gallery"]
    whole = [p for p in patches if p["origin"] == "image_tag"]
    assert all(p["region_idx"] == 0 and p["box5"] == [0.0, 0.0, 1.0, 1.0, 1.0] for p in whole)
    thumb = Image.open(io.BytesIO(next(p for p in whole if p["image_id"] == "a")["thumbnail"]))
    assert thumb.size == (32, 16)  # the whole 80x40 image, longer side <= thumb_side
    concepts = rows.tables["concepts"]
    assert [c["concept"] for c in concepts] == [*LABELS, "envelope"]
    by = {c["concept"]: c for c in concepts}
    assert by["envelope"]["origin"] == "image_tag" and by["dog"]["origin"] == "detector"
    assert (by["envelope"]["n_patches"], by["dog"]["n_patches"], by["hot dog"]["n_patches"]) == (3, 2, 0)
    assert set(by["envelope"]["forms"]) == {"envelope", "envelopes"}  # plural_forms, as detector labels
    assert rows.stats["image_tag_patches"] == 4 and rows.stats["concepts_with_patches"] == 3


LEGACY_SQL = (  # the detector-only gallery query before image-tag patches
    "WITH best AS (SELECT label AS concept, image_id, region_idx, score, box, box5, feature "
    "  FROM regions WHERE region_idx > 0 AND score >= ? "
    "  QUALIFY row_number() OVER (PARTITION BY label, image_id ORDER BY score DESC, region_idx) = 1) "
    "SELECT * FROM best "
    "QUALIFY row_number() OVER (PARTITION BY concept ORDER BY score DESC, image_id) <= ? "
    "ORDER BY concept, score DESC, image_id"
)


def _parquet_bytes(rows, table: str) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_table(table, rows.tables[table]), buf)
    return buf.getvalue()


def test_option_off_reproduces_the_detector_only_gallery_and_rebuilds_are_identical(tiny, nlp):
    off, jpeg_off = _candidates(tiny, image_tag_patches=False, min_score=0.1)
    con = connect(tiny.catalog)
    rel = con.execute(LEGACY_SQL, [0.1, 64])
    legacy = [dict(zip([d[0] for d in rel.description], r, strict=True)) for r in rel.fetchall()]
    con.close()
    assert [{k: v for k, v in c.items() if k != "origin"} for c in off] == legacy
    assert {c["origin"] for c in off} == {"detector"}
    on, jpeg_on = _candidates(tiny, min_score=0.1)
    assert [c for c in on if c["origin"] == "detector"] == off  # image tags only add patches

    rows = gallery_rows(off, jpeg_off, LABELS, thumb_side=32, nlp=nlp)
    assert [c["concept"] for c in rows.tables["concepts"]] == LABELS
    assert {c["origin"] for c in rows.tables["concepts"]} == {"detector"}
    again = gallery_rows(*_candidates(tiny, image_tag_patches=False, min_score=0.1), LABELS, 32, nlp=nlp)
    for table in ("patch_gallery", "concepts"):  # a pure function of its inputs: the same bytes
        assert _parquet_bytes(rows, table) == _parquet_bytes(again, table)
    full = gallery_rows(on, jpeg_on, LABELS, 32, nlp=nlp)
    assert _parquet_bytes(full, "patch_gallery") == _parquet_bytes(
        gallery_rows(*_candidates(tiny, min_score=0.1), LABELS, 32, nlp=nlp), "patch_gallery"
    )


SENTENCES = {
    "t1": "Two traffic lights and a dog.",
    "t2": "He ate hot dogs at the game.",  # "hot dog" has no patches, but "dogs" is no dog here
    "t3": "My cell-phone rang twice, and the Dogs barked.",
    "t4": "Nothing grounded here.",
}


def _forms(labels, nlp) -> dict[str, list[str]]:
    vocab = ConceptVocabulary(labels, nlp=nlp)
    forms: dict[str, list[str]] = {}
    for pattern, concept in vocab.patterns.items():
        forms.setdefault(concept, []).append(" ".join(pattern))
    return forms


def test_ground_finds_multi_word_concepts_and_is_deterministic(nlp):
    forms = _forms(LABELS, nlp)
    with_patches = frozenset({"dog", "traffic light", "cell phone"})
    ids, texts = list(SENTENCES), list(SENTENCES.values())
    rows = ground_rows(concept_matcher(forms), ids, texts, with_patches)
    got = [(r["text_id"], r["word_idx"], r["word"], r["concept"]) for r in rows.tables["grounded_words"]]
    assert got == [
        ("t1", 0, "traffic lights", "traffic light"),
        ("t1", 1, "dog", "dog"),
        ("t3", 0, "cell-phone", "cell phone"),
        ("t3", 1, "Dogs", "dog"),
    ]
    for r in rows.tables["grounded_words"]:
        assert SENTENCES[r["text_id"]][r["start_char"] : r["end_char"]] == r["word"]
    assert dict(rows.stats) == {"sentences": 4, "grounded_sentences": 2, "grounded_words": 4}
    # matching follows the concepts table's forms exactly: the same rows as the label vocabulary finds
    direct = ConceptVocabulary(LABELS, nlp=nlp).find(texts)
    assert [(g.text, g.concept) for found in direct for g in found if g.concept in with_patches] == [
        (w, c) for _, _, w, c in got
    ]
    # deterministic: a fresh run (in another order of shards) writes the same rows
    again = ground_rows(concept_matcher(dict(reversed(forms.items()))), ids, texts, with_patches)
    assert again.tables == rows.tables


def test_ground_signature_follows_the_concept_set_not_the_gallery_sizes():
    base = [("dog", ["dog", "dogs"], 3), ("cup", ["cup", "cups"], 0)]
    sig = ground_signature(base)
    assert ground_signature(list(reversed(base))) == sig
    assert ground_signature([("dog", ["dog", "dogs"], 5), ("cup", ["cup", "cups"], 0)]) == sig
    assert ground_signature([("dog", ["dog", "dogs"], 3), ("cup", ["cup", "cups"], 1)]) != sig
    assert ground_signature([*base, ("envelope", ["envelope", "envelopes"], 2)]) != sig


def _patch(concept, image_id, origin):
    return {"concept": concept, "image_id": image_id, "region_idx": 0, "score": 0.9,
            "box5": [0.0, 0.0, 1.0, 1.0, 1.0], "feature": [0.0], "thumbnail": b"x",
            "origin": origin}  # fmt: skip


def _word(text_id, idx, text, word, concept):
    start = text.index(word)
    return {"text_id": text_id, "word_idx": idx, "start_char": start, "end_char": start + len(word),
            "word": word, "concept": concept}  # fmt: skip


def test_cmc_coverage_view_matches_hand_computed_values(tmp_path):
    from flows.report import quality_metrics, write_html

    layout = DataLayout(tmp_path / "data")
    store = ShardStore(layout.store)
    texts = {"t1": "a dog and a traffic light", "t2": "an envelope for the dog", "t3": "nothing to see",
             "t4": "one cat"}  # fmt: skip
    _commit(store, "ingest", {"texts": [
        {"text_id": k, "source": "s", "uri": k, "text": v, "n_chars": len(v)} for k, v in texts.items()
    ]})  # fmt: skip
    _commit(store, "gallery", {"patch_gallery": [
        _patch("dog", "i1", "detector"), _patch("dog", "i2", "detector"),
        _patch("traffic light", "i3", "detector"), _patch("envelope", "i4", "image_tag"),
    ]})  # fmt: skip
    _commit(store, "ground", {"grounded_words": [
        _word("t1", 0, texts["t1"], "dog", "dog"),
        _word("t1", 1, texts["t1"], "traffic light", "traffic light"),
        _word("t2", 0, texts["t2"], "envelope", "envelope"), _word("t2", 1, texts["t2"], "dog", "dog"),
        _word("t4", 0, texts["t4"], "cat", "cat"),  # a concept no longer in the gallery: not counted
    ]})  # fmt: skip
    build_catalog(layout.catalog, layout.store)
    con = connect(layout.catalog)
    rel = con.execute("SELECT * FROM cmc_coverage")
    rows = {r[0]: dict(zip([d[0] for d in rel.description], r, strict=True)) for r in rel.fetchall()}
    con.close()
    # 16 whitespace words in 4 sentences. all: t1 has 2 spans (1 + 2 words), t2 has 2 (1 + 1); each span is
    # replaced with probability 0.5 + 0.5^2 / 2 = 0.625 -> 2.5 spans, 0.625 * 3 + 0.625 * 2 = 3.125 words.
    # detector: t1 as above (1.25 spans, 1.875 words), t2 only "dog" (n = 1: always replaced) -> 2.25, 2.875.
    # image_tag: t2's "envelope" only -> 1 span, 1 word.
    expected = {
        "all": (2, 0.5, 4, 2.5, 3.125),
        "detector": (2, 0.5, 3, 2.25, 2.875),
        "image_tag": (1, 0.25, 1, 1.0, 1.0),
    }
    assert list(rows) == ["all", "detector", "image_tag"]
    for origin, (n_sent, share, n_words, spans, replaced) in expected.items():
        r = rows[origin]
        assert (r["sentences"], r["words"], r["grounded_sentences"], r["grounded_words"]) == (
            4,
            16,
            n_sent,
            n_words,
        )
        assert r["grounded_share"] == pytest.approx(share)
        assert r["expected_replaced_spans"] == pytest.approx(spans)
        assert r["expected_replaced_words"] == pytest.approx(replaced)
        assert r["expected_replaced_share"] == pytest.approx(replaced / 16)
    assert expected_cutmix_replacements([[1, 2], [1, 1], []]) == pytest.approx((2.5, 3.125))

    metrics = quality_metrics(layout)  # the quality report carries the whole gallery's row
    q = metrics["quality"]
    assert (q["cmc_grounded_sentences"], q["cmc_grounded_words"]) == (2, 4)
    assert q["cmc_grounded_share"] == pytest.approx(0.5)
    assert q["cmc_expected_replaced_share"] == pytest.approx(3.125 / 16)
    page = write_html(layout, tmp_path / "report.html", metrics).read_text()
    assert "CutMix (CMC) coverage" in page and "19.53%" in page


def test_view_expectation_is_cutmix_choices_with_its_defaults():
    params = inspect.signature(cutmix_choices).parameters
    assert params["p"].default == 0.5 and params["at_least_one"].default is True
    words = [2, 1, 1]  # one sentence, three grounded spans
    rng = np.random.default_rng(0)
    draws = [sum(len(g.text.split()) for g in cutmix_choices(_spans(words), rng=rng)) for _ in range(20_000)]
    assert np.mean(draws) == pytest.approx(expected_cutmix_replacements([words])[1], abs=0.02)


def _spans(words: list[int]):
    from vlp_core.language import GroundedWord

    return [GroundedWord(0, 0, " ".join(["w"] * n), "c") for n in words]


def test_grounded_words_schema_is_registered():
    from stores.schemas import schema_of

    schema = schema_of("grounded_words")
    assert schema.names == ["text_id", "word_idx", "start_char", "end_char", "word", "concept"]
    assert schema_of("patch_gallery").field("origin").type == pa.string()
    assert "origin" in schema_of("concepts").names
