"""Pre-training objectives shared by every method: contrastive (ITC), matching (ITM), masked LM, momentum.

Each loss is a small standalone module or function; a method composes them, it does not fork them.
"""

from vlp_core.objectives.contrastive import (
    ContrastiveLoss,
    ContrastiveOutput,
    FeatureQueue,
    Temperature,
    soft_cross_entropy,
)
from vlp_core.objectives.ema import alpha_ramp, copy_params_, ema_update_, freeze_, momentum_copy
from vlp_core.objectives.itm import (
    HardNegatives,
    ITMHead,
    ItmPairs,
    build_itm_pairs,
    itm_loss,
    match_probability,
    sample_hard_negatives,
)
from vlp_core.objectives.mlm import mask_tokens, mlm_distill_loss, mlm_token_ids

__all__ = [
    "ContrastiveLoss",
    "ContrastiveOutput",
    "FeatureQueue",
    "HardNegatives",
    "ITMHead",
    "ItmPairs",
    "Temperature",
    "alpha_ramp",
    "build_itm_pairs",
    "copy_params_",
    "ema_update_",
    "freeze_",
    "itm_loss",
    "mask_tokens",
    "match_probability",
    "mlm_distill_loss",
    "mlm_token_ids",
    "momentum_copy",
    "sample_hard_negatives",
    "soft_cross_entropy",
]
