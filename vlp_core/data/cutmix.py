"""Text-only samples with their visually grounded words, and VLMixer's cross-modal CutMix (CMC) batches.

The corpus's ``ground`` stage finds, in every sentence, the words that name a concept of the patch gallery
(``grounded_words``); the ``gallery`` stage keeps region patches per concept (``patch_gallery``). Here a
sentence becomes a *mixed view*: each grounded word is chosen with probability ``p`` (at least one per
sentence that has any; :func:`~vlp_core.language.grounding.cutmix_choices`), and a chosen word's wordpieces
are replaced by **one patch token**: a random gallery patch of its concept (feature + box), placed where the
word began. Every draw comes from the sample's seed, so a sentence's view is the same in any batch, worker
or process.

Batches (:class:`CutMixCollator`): the keys of :class:`~vlp_core.data.collate.TextCollator` (the plain
sentence, its MLM masks) plus, L' = longest mixed sentence:

- ``mix_ids``, ``mix_mask`` int64 (B, L'): the mixed sentence (a patch position holds ``[UNK]``, its
  embedding is the patch's); ``mix_is_patch`` int64 (B, L'); ``mix_patch_feats`` float32 (B, L', F) and
  ``mix_patch_boxes`` (B, L', 5), zero off patches;
- ``mix_mlm_ids``, ``mix_mlm_labels`` (B, L'): MLM on the mixed sentence's words (patches never masked);
- ``has_mix`` bool (B,): the sentence has at least one patch (CMCL contrasts only those);
- ``n_grounded``, ``n_replaced`` int64 (B,): grounded words and replaced words of each sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from stores.shards import ShardStore
from vlp_core.data.collate import _MaskedText
from vlp_core.data.pairs import _as_store, _split_key
from vlp_core.data.unimodal import TextDataset
from vlp_core.language.grounding import GroundedWord, cutmix_choices
from vlp_core.objectives import mask_tokens

__all__ = ["CutMixCollator", "Gallery", "GroundedTextDataset", "load_gallery"]

CMC_SALT = 0x5EED_0010
MIX_MLM_SALT = 0x5EED_0011
_SEED_MASK = (1 << 63) - 1


@dataclass
class Gallery:
    """Patch features and boxes per concept (float32), in the table's sorted order."""

    feats: dict[str, np.ndarray]
    boxes: dict[str, np.ndarray]

    @property
    def dim(self) -> int:
        return next(iter(self.feats.values())).shape[1] if self.feats else 0

    def __len__(self) -> int:
        return sum(len(f) for f in self.feats.values())


def load_gallery(store: ShardStore | str | Path) -> Gallery:
    """The ``patch_gallery`` table as per-concept arrays, sorted by (concept, image_id, region_idx) so the
    index a seed picks means the same patch whatever the shard layout. Its size is capped by the gallery
    stage (``max_per_concept`` per concept)."""
    t = _as_store(store).read_table("patch_gallery", ["concept", "image_id", "region_idx", "box5", "feature"])
    t = t.sort_by([("concept", "ascending"), ("image_id", "ascending"), ("region_idx", "ascending")])
    rows = t.to_pydict()
    feats: dict[str, list] = {}
    boxes: dict[str, list] = {}
    seen: set[tuple[str, str, int]] = set()
    for concept, iid, idx, box, feat in zip(*rows.values(), strict=True):
        if (concept, iid, idx) in seen:  # a shard rebuilt twice
            continue
        seen.add((concept, iid, idx))
        feats.setdefault(concept, []).append(np.asarray(feat, np.float32))
        boxes.setdefault(concept, []).append(np.asarray(box, np.float32))
    return Gallery({c: np.stack(v) for c, v in feats.items()}, {c: np.stack(v) for c, v in boxes.items()})


class GroundedTextDataset(TextDataset):
    """Text-only samples of a text index (``text_id``, ``text_key``) with their grounded words: a
    :class:`~vlp_core.data.unimodal.TextDataset` sample plus ``"grounded": [(start_char, end_char,
    concept)]``; only words whose concept has patches in ``concepts`` (the gallery's) are kept."""

    def __init__(self, store: ShardStore | str | Path, index: pa.Table, concepts: set[str], seed: int = 0):
        store = _as_store(store)
        super().__init__(store, index, seed)
        wanted = set(index["text_id"].to_pylist())
        rows = store.read_table(
            "grounded_words", ["text_id", "start_char", "end_char", "concept"]
        ).to_pydict()
        grounded: dict[str, set[tuple[int, int, str]]] = {}
        for tid, a, b, concept in zip(*rows.values(), strict=True):
            if tid in wanted and concept in concepts:
                grounded.setdefault(tid, set()).add((a, b, concept))
        self._text_ids = index["text_id"].to_pylist()
        self._grounded = {t: sorted(g) for t, g in grounded.items()}

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        sample = super().__getitem__(key)
        _, index = _split_key(key, len(self))
        return sample | {"grounded": list(self._grounded.get(self._text_ids[index], []))}


class CutMixCollator(_MaskedText):
    """Text-only batches with CMC mixed views (module docstring).

    Args:
        tokenizer, max_len, mlm_prob, whole_word: as :class:`~vlp_core.data.collate.TextCollator`.
        gallery: the patch gallery (:func:`load_gallery`).
        prob: per-grounded-word replacement probability (0: no mixing, the mixed view is the sentence).
        at_least_one: a sentence with grounded words gets at least one patch.
    """

    def __init__(
        self,
        tokenizer: Any,
        gallery: Gallery,
        max_len: int = 30,
        mlm_prob: float = 0.15,
        whole_word: bool = False,
        prob: float = 0.5,
        at_least_one: bool = True,
    ):
        super().__init__(tokenizer, max_len, mlm_prob, whole_word)
        self.gallery = gallery
        self.prob = float(prob)
        self.at_least_one = bool(at_least_one)
        self.unk_id = int(tokenizer.unk_token_id)

    def mix(self, text: str, grounded: list[tuple[int, int, str]], seed: int):
        """One sentence's mixed view: ``(ids, patch (n,) bool, feats (n, F), boxes (n, 5), n_replaced)``."""
        enc = self.tokenizer(text, truncation=True, max_length=self.max_len, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        rng = np.random.default_rng((int(seed) ^ CMC_SALT) & _SEED_MASK)
        words = [GroundedWord(a, b, text[a:b], c) for a, b, c in grounded if c in self.gallery.feats]
        chosen = cutmix_choices(words, self.prob, rng, self.at_least_one) if self.prob > 0 else []
        spans = []
        for w in chosen:
            k = int(rng.integers(len(self.gallery.feats[w.concept])))
            spans.append(
                (w.start_char, w.end_char, self.gallery.feats[w.concept][k], self.gallery.boxes[w.concept][k])
            )
        dim = self.gallery.dim
        out_ids, patch, feats, boxes, used = [], [], [], [], set()
        for tok, (a, b) in zip(ids, offsets, strict=True):
            hit = next((j for j, (s, e, _, _) in enumerate(spans) if b > a and a < e and b > s), None)
            if hit is None:
                out_ids.append(tok)
                patch.append(False)
                feats.append(np.zeros(dim, np.float32))
                boxes.append(np.zeros(5, np.float32))
            elif hit not in used:  # the word's first wordpiece becomes the patch token
                used.add(hit)
                out_ids.append(self.unk_id)
                patch.append(True)
                feats.append(spans[hit][2])
                boxes.append(spans[hit][3])
        return out_ids, patch, feats, boxes, len(used)

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        text, seeds = self._encode(samples)
        mixed = [self.mix(s["text"], s["grounded"], int(s["sample_seed"])) for s in samples]
        n, width, dim = len(samples), max(len(m[0]) for m in mixed), max(self.gallery.dim, 1)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        is_patch = torch.zeros((n, width), dtype=torch.long)
        feats = torch.zeros((n, width, dim))
        boxes = torch.zeros((n, width, 5))
        mlm_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mlm_labels = torch.full((n, width), -100, dtype=torch.long)
        for i, (row, patch, f, b, _) in enumerate(mixed):
            k = len(row)
            ids[i, :k] = torch.tensor(row)
            mask[i, :k] = 1
            is_patch[i, :k] = torch.tensor(patch, dtype=torch.long)
            if any(patch):
                feats[i, :k] = torch.as_tensor(np.stack(f))
                boxes[i, :k] = torch.as_tensor(np.stack(b))
            gen = torch.Generator().manual_seed((int(seeds[i]) ^ MIX_MLM_SALT) & _SEED_MASK)
            masked, labels = mask_tokens(
                ids[i : i + 1, :k], **self.mlm_ids, prob=self.mlm_prob, generator=gen,
                special_mask=is_patch[i : i + 1, :k].bool(),
            )  # fmt: skip
            mlm_ids[i, :k], mlm_labels[i, :k] = masked[0], labels[0]
        return {
            **text,
            "mix_ids": ids,
            "mix_mask": mask,
            "mix_is_patch": is_patch,
            "mix_patch_feats": feats,
            "mix_patch_boxes": boxes,
            "mix_mlm_ids": mlm_ids,
            "mix_mlm_labels": mlm_labels,
            "has_mix": is_patch.any(1),
            "n_grounded": torch.tensor([len(s["grounded"]) for s in samples], dtype=torch.long),
            "n_replaced": torch.tensor([m[4] for m in mixed], dtype=torch.long),
            "text_key": torch.tensor([int(s["text_key"]) for s in samples], dtype=torch.int64),
            "sample_seed": seeds,
        }
