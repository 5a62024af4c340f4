"""Language-side tools for building unpaired V+L corpora.

- :mod:`~vlp_core.language.embed`: Sentence-BERT sentence embeddings and the µ-VLA tag query.
- :mod:`~vlp_core.language.phrases`: spaCy noun phrases of retrieved sentences.
- :mod:`~vlp_core.language.linking`: tag ↔ noun-phrase links and their masking probabilities (µ-VLA R-P).
- :mod:`~vlp_core.language.grounding`: visually grounded words and CutMix choices (VLMixer CMC).

Models load lazily (on construction), so importing this package is cheap.
"""

from vlp_core.language.embed import SentenceEncoder, l2_normalise, tag_sentence, to_f16
from vlp_core.language.grounding import (
    COCO_SYNONYMS,
    ConceptVocabulary,
    GroundedWord,
    cutmix_choices,
    plural_forms,
)
from vlp_core.language.linking import (
    Link,
    SbertSimilarity,
    Similarity,
    SpacyVectorSimilarity,
    link_tags_to_phrases,
    mask_probability,
)
from vlp_core.language.phrases import NounPhraseExtractor, Phrase

__all__ = [
    "COCO_SYNONYMS",
    "ConceptVocabulary",
    "GroundedWord",
    "Link",
    "NounPhraseExtractor",
    "Phrase",
    "SbertSimilarity",
    "SentenceEncoder",
    "Similarity",
    "SpacyVectorSimilarity",
    "cutmix_choices",
    "l2_normalise",
    "link_tags_to_phrases",
    "mask_probability",
    "plural_forms",
    "tag_sentence",
    "to_f16",
]
