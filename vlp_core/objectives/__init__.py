"""Pre-training objectives shared by every method: contrastive (ITC), matching (ITM), masked LM, momentum.

- ``reduce``: global-count means and step seeds (world-size independence); ``itm.hard_negative_itm``: ITM
  on global hard negatives for any fused scorer; ``ema.MomentumTwin``: EMA copies of named parts;
  ``mim``: block masks, k-means codebook targets and the MIM loss.

Each loss is a small standalone module or function; a method composes them, it does not fork them.
"""

from vlp_core.objectives.contrastive import (
    ContrastiveLoss,
    ContrastiveOutput,
    FeatureQueue,
    Temperature,
    soft_cross_entropy,
)
from vlp_core.objectives.ema import (
    MomentumTwin,
    alpha_ramp,
    copy_params_,
    ema_update_,
    freeze_,
    momentum_copy,
)
from vlp_core.objectives.itm import (
    HardNegatives,
    ITMHead,
    ItmPairs,
    ITMResult,
    build_itm_pairs,
    hard_negative_itm,
    itm_loss,
    match_probability,
    sample_hard_negatives,
    swap_captions,
    swapped_texts,
)
from vlp_core.objectives.mim import KMeansCodebook, MIMHead, MIMTargets, block_mask, block_masks, mim_loss
from vlp_core.objectives.mlm import mask_tokens, masked_lm_loss, mlm_distill_loss, mlm_token_ids
from vlp_core.objectives.reduce import global_mean_scale, step_seed
from vlp_core.objectives.regions import (
    draw_masks,
    global_item_mean,
    per_sample_mean,
    region_feature_loss,
    token_set_loss,
)

__all__ = [
    "draw_masks",
    "global_item_mean",
    "per_sample_mean",
    "region_feature_loss",
    "token_set_loss",
    "swap_captions",
    "swapped_texts",
    "ITMResult",
    "MomentumTwin",
    "global_mean_scale",
    "hard_negative_itm",
    "step_seed",
    "ContrastiveLoss",
    "ContrastiveOutput",
    "FeatureQueue",
    "HardNegatives",
    "ITMHead",
    "ItmPairs",
    "KMeansCodebook",
    "MIMHead",
    "MIMTargets",
    "Temperature",
    "alpha_ramp",
    "block_mask",
    "block_masks",
    "build_itm_pairs",
    "copy_params_",
    "ema_update_",
    "freeze_",
    "itm_loss",
    "mask_tokens",
    "masked_lm_loss",
    "match_probability",
    "mim_loss",
    "mlm_distill_loss",
    "mlm_token_ids",
    "momentum_copy",
    "sample_hard_negatives",
    "soft_cross_entropy",
]
