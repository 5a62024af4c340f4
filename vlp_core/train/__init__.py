"""The one training loop shared by every method, its typed config, checkpoints, metrics and tasks.

Run: ``python -m vlp_core.train --config albef_tiny``, or on N GPUs / processes
``torchrun --nproc_per_node N -m vlp_core.train ...``.
"""

from vlp_core.train.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config"]
