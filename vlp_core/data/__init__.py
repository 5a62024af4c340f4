"""Training data: pre-training pairs from the corpus store, VQA, samplers, transforms and collators.

- :mod:`~vlp_core.data.pairs`: the pair index (retrieved / known / random / mixed, held-out images removed)
  and ``PairDataset`` (JPEGs read lazily from the ``images`` table through a bounded per-worker cache).
- :mod:`~vlp_core.data.unimodal`: image-only and text-only indexes and datasets (held-out data removed), for
  round-robin over image-only, text-only and paired batches.
- :mod:`~vlp_core.data.sampler`: ``ResumableSampler`` (global batches split across ranks, exact resume) and
  the per-sample seeds that make augmentation and masks independent of processes and batch split.
- :mod:`~vlp_core.data.transforms`: train / eval image transforms.
- :mod:`~vlp_core.data.collate`: the tokenizer and the batch collators (the batch contract).
- :mod:`~vlp_core.data.vqa`: VQA v2 and easy-VQA readers, answer normalisation, soft scores, vocabulary.
"""

from vlp_core.data.collate import ImageCollator, PretrainCollator, TextCollator, VQACollator, load_tokenizer
from vlp_core.data.pairs import (
    MODES,
    ImageDecodeError,
    PairDataset,
    PairsConfig,
    build_pair_index,
    heldout_split,
    make_pair_index,
    stable_keys,
)
from vlp_core.data.sampler import ResumableSampler, sample_seed
from vlp_core.data.transforms import eval_transform, train_transform
from vlp_core.data.unimodal import (
    ImageDataset,
    TextDataset,
    UnimodalConfig,
    build_image_index,
    build_text_index,
)
from vlp_core.data.vqa import (
    AnswerVocab,
    VQADataset,
    VQARecord,
    load_image_file,
    normalize_answer,
    read_easy_vqa,
    read_vqa_v2,
    soft_score,
)

__all__ = [
    "MODES",
    "AnswerVocab",
    "ImageDecodeError",
    "ImageCollator",
    "ImageDataset",
    "PairDataset",
    "PairsConfig",
    "PretrainCollator",
    "ResumableSampler",
    "TextCollator",
    "TextDataset",
    "UnimodalConfig",
    "VQACollator",
    "VQADataset",
    "VQARecord",
    "build_image_index",
    "build_pair_index",
    "build_text_index",
    "eval_transform",
    "heldout_split",
    "load_image_file",
    "load_tokenizer",
    "make_pair_index",
    "normalize_answer",
    "read_easy_vqa",
    "read_vqa_v2",
    "sample_seed",
    "soft_score",
    "stable_keys",
    "train_transform",
]
