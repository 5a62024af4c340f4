"""Tasks: what a backbone is trained or evaluated for (data, head, loss, metric), for any backbone.

A task is a registered typed config (``task: {kind: ..., ...}`` in a train config) and a ``build(config,
env) -> TrainSpec``. Known kinds:

- ``pretrain``: the method's recipe on corpus batches, its stages; zero-shot retrieval on the held-out clip
  art.
- ``retrieval``: fine-tune a run with exactly the retrieval losses named; retrieval on the held-out clip art.
- ``vqa``: answer classification on any backbone (easy-VQA or VQA v2); VQA accuracy.
- ``nlvr2``, ``snli_ve``, ``gqa``, ``refcoco``: the downstream tasks over the store's ``task_examples``
  (bundled scene tasks, or real datasets imported from their files); accuracy per split
  (:mod:`vlp_core.tasks.downstream`).
- ``multitask``: one backbone trained jointly on several of the tasks above, a task per step drawn with
  sampling ratios (UniT).

Adding a task means a module here with a config, a build function and a ``register_task`` call, imported
below; the trainer does not change.
"""

from vlp_core.tasks.base import (
    TASKS,
    TaskConfig,
    build_spec,
    load_backbone_weights_,
    register_task,
    task_config,
)
from vlp_core.tasks.downstream import GQATask, NLVR2Task, RefTask, SNLIVETask
from vlp_core.tasks.multitask import MultiTask, MultiTaskModel
from vlp_core.tasks.pretrain import PretrainTask, heldout_retrieval_data
from vlp_core.tasks.retrieval import RetrievalTask
from vlp_core.tasks.vqa import VQATask

__all__ = [
    "TASKS",
    "GQATask",
    "MultiTask",
    "MultiTaskModel",
    "NLVR2Task",
    "RefTask",
    "SNLIVETask",
    "PretrainTask",
    "RetrievalTask",
    "TaskConfig",
    "VQATask",
    "build_spec",
    "heldout_retrieval_data",
    "load_backbone_weights_",
    "register_task",
    "task_config",
]
