"""Transformer building blocks shared by every backbone.

- :mod:`.attention`: multi-head attention (self or cross) over ``F.scaled_dot_product_attention``.
- :mod:`.feedforward`: the feed-forward sub-block (:class:`FeedForward`) and modality experts
  (:class:`ModalityExperts`, VLMo's V / L / VL FFNs routed by a token-type mask).
- :mod:`.transformer`: :class:`TransformerLayer`, self-attention (+ optional cross-attention) + a pluggable
  feed-forward, post-LN (BERT) or pre-LN (ViT / VLMo).
"""

from vlp_core.models.layers.attention import MultiHeadAttention, key_mask
from vlp_core.models.layers.feedforward import FeedForward, ModalityExperts, Route
from vlp_core.models.layers.transformer import TransformerLayer, init_bert_, selected_rows, take_rows

__all__ = [
    "FeedForward",
    "ModalityExperts",
    "MultiHeadAttention",
    "Route",
    "TransformerLayer",
    "init_bert_",
    "key_mask",
    "selected_rows",
    "take_rows",
]
