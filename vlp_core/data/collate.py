"""Collators: samples → the batch dicts the models consume (all torch tensors), and the tokenizer.

Pre-training batch (``PretrainCollator``), B samples, L = longest caption in the batch (≤ ``max_len``):

- ``pixel_values`` float32 ``(B, 3, S, S)``;
- ``input_ids``, ``attention_mask`` int64 ``(B, L)``: the clean caption, ``[CLS] … [SEP] [PAD]…``;
- ``mlm_input_ids``, ``mlm_labels`` int64 ``(B, L)``: masked caption and targets (-100 where not masked);
- ``image_key``, ``text_key``, ``sample_seed`` int64 ``(B,)``.

VQA batch (``VQACollator``): ``pixel_values``, ``input_ids``, ``attention_mask`` (the question),
``answer_scores`` float32 ``(B, A)``, ``question_id`` int64 ``(B,)``.

Unimodal batches (image-only / text-only steps, :mod:`~vlp_core.data.unimodal`): ``TextCollator`` gives the
text keys of the pre-training batch (``input_ids``, ``attention_mask``, ``mlm_input_ids``, ``mlm_labels``,
``text_key``, ``sample_seed``), with the same per-sample masks ``PretrainCollator`` draws for the same text
and seed; ``ImageCollator`` gives ``pixel_values``, ``image_key`` and ``sample_seed``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlp_core.objectives import mask_tokens, mlm_token_ids

__all__ = ["ImageCollator", "PretrainCollator", "TextCollator", "VQACollator", "load_tokenizer"]


def load_tokenizer(path: str | Path | None = None):
    """The fast WordPiece tokenizer of a local model directory; ``None``: the packaged all-MiniLM-L6-v2
    (uncased BERT vocabulary, 30,522 tokens). Never contacts a hub."""
    from transformers import AutoTokenizer

    if path is None:
        from vlp_core.language.embed import default_model_path

        path = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if not tokenizer.is_fast:
        raise ValueError(f"{path}: need a fast tokenizer (tokenizer.json) for word ids")
    return tokenizer


def _tokenize(tokenizer: Any, texts: list[str], max_len: int):
    return tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=max_len,
        return_tensors="pt",
        return_token_type_ids=False,
    )


class _MaskedText:
    """The text part of :class:`PretrainCollator` and :class:`TextCollator` (same arguments): tokenize
    ``sample["text"]`` and MLM-mask each row with a generator seeded by its ``sample_seed``."""

    def __init__(self, tokenizer: Any, max_len: int = 30, mlm_prob: float = 0.15, whole_word: bool = False):
        if whole_word and not getattr(tokenizer, "is_fast", False):
            raise ValueError("whole_word masking needs a fast tokenizer (word_ids)")
        self.tokenizer = tokenizer
        self.max_len = int(max_len)
        self.mlm_prob = float(mlm_prob)
        self.whole_word = bool(whole_word)
        self.mlm_ids = mlm_token_ids(tokenizer)
        self.pad_id = int(tokenizer.pad_token_id)

    def mask_row(self, ids: torch.Tensor, seed: int, word_ids: list[int | None] | None = None):
        """MLM-mask one unpadded row ``(n,)`` with ``Generator().manual_seed(seed)``; returns
        ``(masked (n,), labels (n,))`` int64."""
        generator = torch.Generator().manual_seed(int(seed))
        words = None
        if word_ids is not None:
            words = torch.tensor([[-1 if w is None else w for w in word_ids]], dtype=torch.long)
        masked, labels = mask_tokens(
            ids[None], **self.mlm_ids, prob=self.mlm_prob, generator=generator, whole_word_ids=words
        )
        return masked[0], labels[0]

    def _encode(self, samples: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({input_ids, attention_mask, mlm_input_ids, mlm_labels}, sample_seed (B,) int64)``."""
        enc = _tokenize(self.tokenizer, [s["text"] for s in samples], self.max_len)
        input_ids = enc["input_ids"].long()
        attention_mask = enc["attention_mask"].long()
        seeds = torch.tensor([int(s["sample_seed"]) for s in samples], dtype=torch.int64)
        mlm_input_ids = torch.full_like(input_ids, self.pad_id)
        mlm_labels = torch.full_like(input_ids, -100)
        lengths = attention_mask.sum(1).tolist()
        for i, n in enumerate(lengths):
            word_ids = enc.word_ids(i)[:n] if self.whole_word else None
            mlm_input_ids[i, :n], mlm_labels[i, :n] = self.mask_row(input_ids[i, :n], int(seeds[i]), word_ids)
        text = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mlm_input_ids": mlm_input_ids,
            "mlm_labels": mlm_labels,
        }
        return text, seeds


class PretrainCollator(_MaskedText):
    """Tokenize captions and draw BERT MLM masks, one ``torch.Generator`` per sample.

    Each row is masked on its own unpadded tokens with a generator seeded by the sample's ``sample_seed``:
    the mask of a caption is the same whatever batch, batch size or process it is collated in (masking the
    padded batch would make the random draws depend on the batch's longest caption).

    Args:
        tokenizer: a fast Hugging Face tokenizer (:func:`load_tokenizer`).
        max_len: captions are truncated to this many tokens, [CLS] and [SEP] included.
        mlm_prob: selection probability per token (or per word with ``whole_word``); 80/10/10 corruption.
        whole_word: select whole words (all wordpieces of a word together), using the tokenizer's word ids.
    """

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text, seeds = self._encode(samples)
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]).float(),
            **text,
            "image_key": torch.tensor([int(s["image_key"]) for s in samples], dtype=torch.int64),
            "text_key": torch.tensor([int(s["text_key"]) for s in samples], dtype=torch.int64),
            "sample_seed": seeds,
        }


class VQACollator:
    """Tokenize questions (truncated to ``max_len`` tokens) and stack images and soft answer scores."""

    def __init__(self, tokenizer: Any, max_len: int = 30):
        self.tokenizer = tokenizer
        self.max_len = int(max_len)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        enc = _tokenize(self.tokenizer, [s["question"] for s in samples], self.max_len)
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]).float(),
            "input_ids": enc["input_ids"].long(),
            "attention_mask": enc["attention_mask"].long(),
            "answer_scores": torch.stack([s["answer_scores"] for s in samples]).float(),
            "question_id": torch.tensor([int(s["question_id"]) for s in samples], dtype=torch.int64),
        }


class TextCollator(_MaskedText):
    """Text-only batches (``TextDataset`` samples): tokens and MLM masks exactly as :class:`PretrainCollator`
    draws them (a caption with the same ``sample_seed`` gets the same mask), plus ``text_key`` and
    ``sample_seed``; no images. Arguments as :class:`PretrainCollator`."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text, seeds = self._encode(samples)
        return {
            **text,
            "text_key": torch.tensor([int(s["text_key"]) for s in samples], dtype=torch.int64),
            "sample_seed": seeds,
        }


class ImageCollator:
    """Image-only batches (``ImageDataset`` samples): ``pixel_values`` float32 ``(B, 3, S, S)``, ``image_key``
    and ``sample_seed`` int64 ``(B,)``."""

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": torch.stack([s["pixel_values"] for s in samples]).float(),
            "image_key": torch.tensor([int(s["image_key"]) for s in samples], dtype=torch.int64),
            "sample_seed": torch.tensor([int(s["sample_seed"]) for s in samples], dtype=torch.int64),
        }
