"""Image-text retrieval: Recall@K in both directions, ranked by ITC similarity, optionally re-ranked by ITM.

Ground truth is a set of positives per query: an image can have several captions (title, description) and,
because texts are de-duplicated by content, one caption text can belong to several images. Image-to-text
R@K is the share of images with at least one of their captions in the top K; text-to-image R@K the share of
texts with one of their images in the top K (the COCO / Flickr30K protocol, generalised to many-to-many).

ITM re-ranking follows ALBEF: compute ITC similarities for every pair, then re-score each query's top ``k``
candidates with the ITM match probability; candidates outside the top ``k`` keep their ITC order below them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["RetrievalSet", "evaluate_retrieval", "recall_at_k", "rerank_topk"]


@dataclass
class RetrievalSet:
    """``positives[i, t]`` is True when text ``t`` describes image ``i``; ``(n_images, n_texts)`` bool."""

    positives: torch.Tensor

    def __post_init__(self) -> None:
        if self.positives.dim() != 2 or self.positives.dtype != torch.bool:
            raise ValueError("positives must be a (n_images, n_texts) bool tensor")
        if not bool(self.positives.any(1).all()) or not bool(self.positives.any(0).all()):
            raise ValueError("every image needs a caption and every text an image in a retrieval set")

    @classmethod
    def from_pairs(cls, image_of: Sequence[int], text_of: Sequence[int], n_images: int, n_texts: int):
        pos = torch.zeros(n_images, n_texts, dtype=torch.bool)
        pos[torch.as_tensor(list(image_of)), torch.as_tensor(list(text_of))] = True
        return cls(pos)


def recall_at_k(
    ranking_i2t: torch.Tensor, ranking_t2i: torch.Tensor, data: RetrievalSet, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall@K from rankings (candidate indices, best first).

    Args:
        ranking_i2t: ``(n_images, >= max k)`` text indices per image.
        ranking_t2i: ``(n_texts, >= max k)`` image indices per text.
        data: the positives.

    Returns:
        ``{"i2t_r1": ..., "t2i_r1": ..., ..., "mean_r": mean of all}`` as fractions in [0, 1].
    """
    pos = data.positives
    out: dict[str, float] = {}
    for k in ks:
        hit_i2t = pos.gather(1, ranking_i2t[:, :k]).any(1)
        hit_t2i = pos.t().gather(1, ranking_t2i[:, :k]).any(1)
        out[f"i2t_r{k}"] = hit_i2t.float().mean().item()
        out[f"t2i_r{k}"] = hit_t2i.float().mean().item()
    out["mean_r"] = sum(out.values()) / len(out)
    return out


def rerank_topk(
    sim: torch.Tensor, k: int, score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Full ranking of candidates per query row of ``sim`` with the top ``k`` re-ordered by ``score_pairs``.

    Args:
        sim: ``(Q, C)`` ITC similarities.
        k: how many of each query's best candidates to re-score (clipped to C).
        score_pairs: ``(query_idx (N,), cand_idx (N,)) -> (N,)`` scores (e.g. ITM match probability); called
            once per query with its k candidates.

    Returns:
        ``(Q, C)`` candidate indices, best first.
    """
    order = sim.argsort(dim=1, descending=True)
    k = min(k, sim.shape[1])
    if k <= 1:
        return order
    top = order[:, :k].clone()
    for q in range(sim.shape[0]):
        scores = score_pairs(torch.full((k,), q, dtype=torch.long), top[q])
        top[q] = top[q][scores.argsort(descending=True).cpu()]
    return torch.cat([top, order[:, k:]], dim=1)


@torch.no_grad()
def evaluate_retrieval(
    model: torch.nn.Module,
    images: torch.Tensor | Callable[[], Sequence[torch.Tensor]],
    texts: tuple[torch.Tensor, torch.Tensor],
    data: RetrievalSet,
    *,
    device: torch.device,
    batch_size: int = 64,
    itm_k: int = 16,
) -> dict[str, float]:
    """Zero-shot / fine-tuned retrieval of a model with ``image_embed``, ``text_embed`` and ``itm_scores``.

    Args:
        images: ``(n_images, 3, S, S)`` transformed pixels, or a callable yielding batches of them in order.
        texts: ``(input_ids, attention_mask)``, each ``(n_texts, L)``.
        itm_k: re-rank the ITC top-k with ITM (0 disables).

    Returns:
        ``itc_*`` recalls, and ``itm_*`` recalls when ``itm_k > 1``.
    """
    batches = list(images.split(batch_size)) if torch.is_tensor(images) else images()
    img_tokens, img_feats = [], []
    for px in batches:
        tokens, feats = model.image_embed(px.to(device))
        img_tokens.append(tokens.cpu())
        img_feats.append(feats.float().cpu())
    image_tokens = torch.cat(img_tokens)
    image_feats = torch.cat(img_feats)
    ids, mask = texts
    txt_hidden, txt_feats = [], []
    for a, m in zip(ids.split(batch_size), mask.split(batch_size), strict=True):
        hidden, feats = model.text_embed(a.to(device), m.to(device))
        txt_hidden.append(hidden.cpu())
        txt_feats.append(feats.float().cpu())
    text_hidden = torch.cat(txt_hidden)
    text_feats = torch.cat(txt_feats)
    if image_tokens.shape[0] != data.positives.shape[0] or text_hidden.shape[0] != data.positives.shape[1]:
        raise ValueError("images/texts do not match the positives matrix")

    sim = image_feats @ text_feats.t()
    out = {
        f"itc_{k}": v
        for k, v in recall_at_k(
            sim.argsort(1, descending=True), sim.t().argsort(1, descending=True), data
        ).items()
    }
    if itm_k > 1:

        def i2t(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return model.itm_scores(image_tokens[q].to(device), text_hidden[c].to(device), mask[c].to(device))

        def t2i(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return model.itm_scores(image_tokens[c].to(device), text_hidden[q].to(device), mask[q].to(device))

        ranked = recall_at_k(rerank_topk(sim, itm_k, i2t), rerank_topk(sim.t(), itm_k, t2i), data)
        out.update({f"itm_{k}": v for k, v in ranked.items()})
    out["n_images"] = float(data.positives.shape[0])
    out["n_texts"] = float(data.positives.shape[1])
    return out
