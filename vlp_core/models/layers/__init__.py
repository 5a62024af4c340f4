"""Transformer building blocks shared by every backbone.

- :mod:`.attention`: multi-head attention (self or cross) over ``F.scaled_dot_product_attention`` (the plain
  product where the CPU dropout draws the probabilities' mask), and :func:`gather_rows`.
- :mod:`.dropout`: :class:`Dropout`, torch's dropout with masks drawn for a fifth of the cost on CPUs.
- :mod:`.feedforward`: the feed-forward sub-block (:class:`FeedForward`) and modality experts
  (:class:`ModalityExperts`, VLMo's V / L / VL FFNs routed by a token-type mask).
- :mod:`.packing`: :class:`Packing`, a padded batch's real tokens as one matrix (the text and fusion layers
  run their per-token work on those alone).
- :mod:`.transformer`: :class:`TransformerLayer`, self-attention (+ optional cross-attention) + a pluggable
  feed-forward, post-LN (BERT) or pre-LN (ViT / VLMo).
"""

from vlp_core.models.layers.attention import MultiHeadAttention, gather_rows, key_mask
from vlp_core.models.layers.dropout import Dropout
from vlp_core.models.layers.feedforward import FeedForward, ModalityExperts, Route
from vlp_core.models.layers.packing import Packing
from vlp_core.models.layers.transformer import TransformerLayer, init_bert_, selected_rows, take_rows

__all__ = [
    "Dropout",
    "FeedForward",
    "ModalityExperts",
    "MultiHeadAttention",
    "Packing",
    "Route",
    "TransformerLayer",
    "gather_rows",
    "init_bert_",
    "key_mask",
    "selected_rows",
    "take_rows",
]
