"""vlp_core.language: SBERT embeddings, noun phrases, tag–phrase linking, grounded words for CutMix.

Expected values below were checked by hand against the sentences (and against what the packaged spaCy
``en_core_web_sm`` parser does with them). Models load once per module.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from vlp_core.language import (  # noqa: E402
    COCO_SYNONYMS,
    ConceptVocabulary,
    GroundedWord,
    Link,
    NounPhraseExtractor,
    SbertSimilarity,
    SentenceEncoder,
    SpacyVectorSimilarity,
    cutmix_choices,
    link_tags_to_phrases,
    mask_probability,
    plural_forms,
    tag_sentence,
    to_f16,
)

COCO_LABELS = ["person", "bicycle", "car", "traffic light", "cat", "dog", "umbrella", "frisbee", "skis"]
COCO_LABELS += ["hot dog", "orange", "teddy bear", "mouse", "knife", "wine glass", "diningtable", "bear"]


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    return SentenceEncoder()


@pytest.fixture(scope="module")
def extractor() -> NounPhraseExtractor:
    return NounPhraseExtractor()


@pytest.fixture(scope="module")
def vocab() -> ConceptVocabulary:
    return ConceptVocabulary(COCO_LABELS, synonyms={"person": ["man", "woman"], "skis": ["ski"]})


# ---------------------------------------------------------------- embeddings


def test_encode_shape_dtype_and_unit_norm(encoder):
    emb = encoder.encode(["a dog runs", "", "stock market report", "x" * 2000])
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert encoder.dim == 384 and encoder.device in ("cpu", "cuda")
    assert encoder.encode([]).shape == (0, 384)


def test_encode_semantics(encoder):
    a, b, c = encoder.encode(["a dog runs", "a puppy running", "stock market report"])
    assert a @ b > a @ c + 0.3


class _RecordingModel:
    """Stands in for SentenceTransformer: embeds a text as (len, hash) and records each batch it is given."""

    def __init__(self):
        self.batches: list[list[str]] = []

    def encode(self, batch, **kwargs):
        self.batches.append(list(batch))
        return np.array([[len(t) + 1.0, float(sum(map(ord, t)) % 97)] for t in batch], dtype=np.float32)

    def get_embedding_dimension(self):
        return 2


def test_encode_sorts_batches_by_length_and_restores_order_exactly():
    enc = SentenceEncoder.__new__(SentenceEncoder)  # the batching logic, without loading a model
    enc.model, enc.batch_size, enc.device, enc._amp_dtype = _RecordingModel(), 3, "cpu", None
    texts = ["bb", "a", "dddd", "ccc", "eeeee", "a", "", "ffffff"]
    out = enc.encode(texts)
    lengths = [len(t) for batch in enc.model.batches for t in batch]
    assert lengths == sorted(lengths, reverse=True)  # longest first across batches
    assert [len(b) for b in enc.model.batches] == [3, 3, 2]
    expected = np.stack([enc.model.encode([t])[0] for t in texts])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_array_equal(out, expected)


def test_encode_order_matches_one_by_one(encoder):
    texts = ["a cat", "a very long sentence about a man riding a horse on the beach at sunset", "tree", ""]
    old = encoder.batch_size
    encoder.batch_size = 2
    try:
        batched = encoder.encode(texts)
    finally:
        encoder.batch_size = old
    singles = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(batched, singles, atol=1e-4)


def test_bf16_encoding_stays_close_to_fp32(encoder):
    """``precision="bf16"`` (autocast) gives float32, normalised rows within rounding of fp32's."""
    texts = ["a cat on a mat", "two dogs play in the snow", "a red apple", "the stock market fell sharply"]
    bf16 = SentenceEncoder(precision="bf16")
    assert encoder.precision == "fp32" and bf16.precision == "bf16"
    a, b = encoder.encode(texts), bf16.encode(texts)
    assert b.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert ((a * b).sum(axis=1) > 0.999).all()
    assert ((b @ b.T).argsort(axis=1)[:, -2] == (a @ a.T).argsort(axis=1)[:, -2]).all()


def test_encode_rejects_bad_input(encoder):
    with pytest.raises(TypeError, match="single str"):
        encoder.encode("a dog runs")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["ok", None])


def test_encode_f16(encoder):
    emb = encoder.encode(["a dog", "a cat"])
    half = encoder.encode_f16(["a dog", "a cat"])
    assert half.dtype == np.float16 and half.shape == (2, 384)
    np.testing.assert_allclose(half.astype(np.float32), emb, atol=1e-3)
    assert to_f16(emb).dtype == np.float16


def test_tag_sentence():
    assert tag_sentence(["dog", "dog", "frisbee"]) == "dog frisbee"
    assert (
        tag_sentence(["Person", "dog", "person", " ", "PERSON", "coffee  table"]) == "Person dog coffee table"
    )
    assert tag_sentence(["a", "b", "a", "c"], max_tags=2) == "a b"
    assert tag_sentence([]) == ""
    with pytest.raises(TypeError):
        tag_sentence("dog")


# ---------------------------------------------------------------- noun phrases


@pytest.mark.parametrize(
    ("sentence", "chunks", "lemmas"),
    [
        (
            "A brown dog catches the red frisbee in the park.",
            ["A brown dog", "the red frisbee", "the park"],
            ["dog", "frisbee", "park"],
        ),
        (
            "  Two dogs chase a cat near the traffic lights.",
            ["Two dogs", "a cat", "the traffic lights"],
            ["dog", "cat", "light"],
        ),
        (
            "She said that the old man with a hat sold three apples.",
            ["the old man", "a hat", "three apples"],
            ["man", "hat", "apple"],
        ),
    ],
)
def test_noun_phrases_and_spans(extractor, sentence, chunks, lemmas):
    (phrases,) = extractor.extract([sentence])
    assert [p.text for p in phrases] == chunks
    assert [p.root_lemma for p in phrases] == lemmas
    for p in phrases:
        assert sentence[p.start_char : p.end_char] == p.text


def test_noun_phrases_batch_and_pronouns(extractor):
    texts = ["He throws a ball.", "", "Cats."]
    out = extractor.extract(texts)
    assert len(out) == 3 and out[1] == []
    assert [p.text for p in out[0]] == ["a ball"]  # "He" dropped
    extractor.drop_pronouns = False
    try:
        assert [p.text for p in extractor.extract_one("He throws a ball.")] == ["He", "a ball"]
    finally:
        extractor.drop_pronouns = True
    with pytest.raises(TypeError):
        extractor.extract("He throws a ball.")


# ---------------------------------------------------------------- linking

PHRASES = ["a brown dog", "the red frisbee", "the park"]


def test_link_with_sbert(encoder):
    links = link_tags_to_phrases(["dog", "frisbee", "dog"], PHRASES, SbertSimilarity(encoder))
    assert [lk.phrase_index for lk in links] == [0, 1, 0]
    assert links[0] == links[2]
    assert all(0.3 < lk.score <= 1.0 for lk in links)


def test_link_with_spacy_vectors():
    sim = SpacyVectorSimilarity()
    links = link_tags_to_phrases(["dog", "frisbee"], PHRASES, sim)
    assert [lk.phrase_index for lk in links] == [0, 1]
    m = sim.matrix(["dog", "frisbee"], PHRASES)
    assert m.shape == (2, 3) and m.dtype == np.float32
    assert m[0, 0] > m[0, 1] and m[1, 1] > m[1, 0]
    # A text with no known word has a zero vector: cosine 0 with everything.
    np.testing.assert_array_equal(sim.matrix(["qwzxv"], PHRASES), 0.0)


def test_link_edge_cases(encoder):
    sim = SbertSimilarity(encoder)
    assert link_tags_to_phrases(["dog"], [], sim) == [None]
    assert link_tags_to_phrases([], PHRASES, sim) == []
    assert link_tags_to_phrases(["dog"], PHRASES, sim, min_score=1.01) == [None]
    assert sim.matrix([], PHRASES).shape == (0, 3)


def test_similarity_caches_repeated_strings(encoder):
    sim = SbertSimilarity(encoder)
    seen: list[list[str]] = []
    embed = sim._embed
    sim._embed = lambda texts: (seen.append(list(texts)), embed(texts))[1]
    first = sim.matrix(["dog", "dog", "frisbee"], PHRASES)
    second = sim.matrix(["frisbee", "dog"], PHRASES + ["a cat"])
    assert seen == [["dog", "frisbee", *PHRASES], ["a cat"]]
    np.testing.assert_allclose(second[:, :3], first[[2, 0]], atol=1e-6)


def test_link_rows_of_a_shard_do_not_depend_on_what_the_process_embedded_before(encoder):
    """The links stage's output is a function of its shard: the same bytes whether the similarity met other
    strings first (through its cache, a string's embedding would carry the batch it first came in) or not."""
    from vlp_core.corpus.stages import link_rows

    def shard(words: list[str]) -> list[dict]:
        return [
            {"image_id": f"i{k}", "tags": [(w, 0), ("person", 1)],
             "texts": [(f"t{k}", [(0, f"a small {w} on the grass"), (1, "a woman"), (2, "the old red bus")])]}
            for k, w in enumerate(words)
        ]  # fmt: skip

    b = shard(["dog", "frisbee", "pizza", "umbrella", "teddy bear"])
    alone = link_rows(SbertSimilarity(encoder), b, 0.0, 0.15).tables["phrase_links"]
    warm = SbertSimilarity(encoder)
    for text in ("dog", "person", "a woman", "a small dog on the grass"):  # one at a time, as a later image's
        warm.embeddings([text])  # lone new phrase would be: a batch of one gives other low bits
    link_rows(warm, shard(["cat", "dog", "bicycle"]), 0.0, 0.15)
    after = link_rows(warm, b, 0.0, 0.15).tables["phrase_links"]
    assert after == alone and len(alone) == 10


def test_mask_probability():
    assert mask_probability(0.8) == pytest.approx(0.12)
    assert mask_probability(1.0) == pytest.approx(0.15)
    assert mask_probability(-0.4) == 0.0
    assert mask_probability(0.9, base=2.0) == 1.0
    np.testing.assert_allclose(mask_probability(np.array([-1.0, 0.0, 0.5])), [0.0, 0.0, 0.075])
    assert isinstance(Link(0, 0.5).score, float)


# ---------------------------------------------------------------- grounding (VLMixer CMC)


def _found(vocab, sentence):
    words = vocab.find(sentence)
    for g in words:
        assert sentence[g.start_char : g.end_char] == g.text
    return [(g.text, g.concept) for g in words]


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        (
            "Two dogs chase a cat near the traffic lights.",
            [("dogs", "dog"), ("cat", "cat"), ("traffic lights", "traffic light")],
        ),
        ("He ate hot dogs.", [("hot dogs", "hot dog")]),
        ("He ate a hot-dog.", [("hot-dog", "hot dog")]),
        ("A person holds an umbrella.", [("person", "person"), ("umbrella", "umbrella")]),
        ("Dogs run.", [("Dogs", "dog")]),  # sentence-initial: tagged PROPN, lemma "Dogs"
        ("A teddy bear and two Teddy Bears.", [("teddy bear", "teddy bear"), ("Teddy Bears", "teddy bear")]),
        ("Mice ate the knives.", [("Mice", "mouse"), ("knives", "knife")]),
        ("He eats an orange.", [("orange", "orange")]),
        ("People and a man on skis.", [("People", "person"), ("man", "person"), ("skis", "skis")]),
    ],
)
def test_grounded_words(vocab, sentence, expected):
    assert _found(vocab, sentence) == expected


@pytest.mark.parametrize(
    "sentence",
    [
        "The catalog lists dogma and cartoons.",  # substrings of cat / dog / car
        "She wears an orange shirt.",  # adjective, not the fruit
        "I can't bear it.",  # verb, not the animal
        "Scattered hotdogs",  # one-word spelling is not the two-word label (add it as a synonym)
    ],
)
def test_no_false_grounding(vocab, sentence):
    assert _found(vocab, sentence) == []


def test_grounding_batch_and_options(vocab):
    out = vocab.find(["Cats sleep.", "", "A wine glass."])
    assert [[(g.text, g.concept) for g in s] for s in out] == [
        [("Cats", "cat")],
        [],
        [("wine glass", "wine glass")],
    ]
    coco = ConceptVocabulary(
        ["diningtable", "tvmonitor"],
        nlp=vocab.nlp,
        synonyms={k: COCO_SYNONYMS[k] for k in ("diningtable", "tvmonitor")},
    )
    assert _found(coco, "A TV on the dining table.") == [("TV", "tvmonitor"), ("dining table", "diningtable")]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ConceptVocabulary(["dog"], nlp=vocab.nlp, synonyms={"cat": ["kitty"]})
    no_pos = ConceptVocabulary(["orange"], nlp=vocab.nlp, head_pos=None)
    assert _found(no_pos, "She wears an orange shirt.") == [("orange", "orange")]


def test_plural_forms():
    assert plural_forms("dog") == ("dogs",)
    assert plural_forms("glass") == ("glasses",)
    assert plural_forms("person") == ("people", "persons")
    assert "knives" in plural_forms("knife")
    assert plural_forms("sheep") == ("sheep",)


def test_cutmix_choices():
    words = [GroundedWord(i, i + 1, "w", f"c{i}") for i in range(8)]
    a = cutmix_choices(words, p=0.5, rng=np.random.default_rng(0))
    b = cutmix_choices(words, p=0.5, rng=np.random.default_rng(0))
    assert a == b and set(a) <= set(words)
    assert a == sorted(a, key=words.index)
    assert cutmix_choices(words, p=1.0, rng=1) == words
    assert cutmix_choices([], rng=0) == []
    # At least one: p = 0 still replaces exactly one word, drawn uniformly; without the rule, none.
    rng = np.random.default_rng(3)
    picks = [cutmix_choices(words, p=0.0, rng=rng) for _ in range(400)]
    assert all(len(p) == 1 for p in picks)
    assert {p[0] for p in picks} == set(words)
    assert cutmix_choices(words, p=0.0, rng=0, at_least_one=False) == []
    # Over many sentences the per-word rate is p (plus the rare at-least-one top-up).
    rate = np.mean([len(cutmix_choices(words, p=0.5, rng=rng)) for _ in range(2000)]) / len(words)
    assert 0.47 < rate < 0.54
    with pytest.raises(ValueError):
        cutmix_choices(words, p=1.5)
