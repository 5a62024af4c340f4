"""The training loop's shape on a toy model (no corpus, seconds): batch kinds mixed round-robin or by
weights, stages that rebuild the optimiser over only their trainable modules, learning-rate multipliers per
role (0 freezes), periodic evaluation, and exact resume from a checkpoint inside a stage and at a stage
boundary."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from vlp_core.data import sample_seed
from vlp_core.models import ModelOutput
from vlp_core.recipes import Stage
from vlp_core.train.config import TrainConfig
from vlp_core.train.metrics import read_metrics
from vlp_core.train.spec import BatchMixer, Stream, TrainSpec, param_groups, stage_bounds
from vlp_core.train.trainer import train


class Toy(nn.Module):
    """Two linear heads: ``pair`` batches use ``a``, the other kinds ``a + b``; dropout makes RNG matter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.2)

    def forward(self, batch, *, step, steps_per_epoch, kind="pair", stage=None):
        x = self.drop(batch["x"])
        out = self.a(x) if kind == "pair" else self.a(x) + self.b(x)
        loss = ((out.squeeze(-1) - batch["y"]) ** 2).mean()
        return ModelOutput(loss=loss, metrics={f"loss_{kind}": loss.detach()})


class ToyData(Dataset):
    def __init__(self, n: int, shift: float) -> None:
        self.n, self.shift = n, shift

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        epoch, index = key
        g = torch.Generator().manual_seed(sample_seed(0, epoch, index))
        x = torch.randn(4, generator=g)
        return {"x": x, "y": x.sum() + self.shift}


def collate(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def _config(tmp: Path, **kw) -> TrainConfig:
    base = {
        "run_dir": str(tmp), "batch_size": 4, "max_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 20,
        "log_every": 1, "data": {"num_workers": 0}, "optim": {"lr": 0.05, "warmup_steps": 1},
        "device": "cpu",
    }  # fmt: skip
    for key, value in kw.items():
        base[key] = value
    return TrainConfig.model_validate(base)


def _spec_builder(stages, evaluate=None, lr_roles=None, calls=None):
    def build(config, env):
        model = Toy()
        return TrainSpec(
            model=model,
            streams={"pair": Stream(ToyData(24, 0.0), collate), "image": Stream(ToyData(16, 1.0), collate)},
            stages=stages,
            evaluate=evaluate,
            roles={"slow": [model.b]} if lr_roles else {},
        )

    return build


def test_round_robin_and_weighted_mixing_are_functions_of_the_step():
    rr = BatchMixer(Stage("s", None, ("pair", "image", "text")), 0, seed=0)
    assert [rr.kind(i) for i in range(5)] == ["pair", "image", "text", "pair", "image"]
    w = Stage("s", None, ("pair", "image"), mixing="weighted", weights={"pair": 3.0, "image": 1.0})
    draws = [BatchMixer(w, 0, seed=0).kind(i) for i in range(400)]
    assert draws == [BatchMixer(w, 0, seed=0).kind(i) for i in range(400)]  # same on every rank / resume
    assert 0.68 < Counter(draws)["pair"] / 400 < 0.82
    assert BatchMixer(w, 0, seed=0).share("image") == pytest.approx(0.25)
    with pytest.raises(ValueError):
        Stage("s", None, ("pair", "image"), mixing="weighted", weights={"pair": 1.0})


def test_stage_bounds_cover_max_steps_exactly():
    stages = [Stage("a", 2), Stage("b", 3), Stage("c", None)]
    assert stage_bounds(stages, 10) == [(0, 2), (2, 5), (5, 10)]
    with pytest.raises(ValueError):
        stage_bounds([Stage("a", 2), Stage("b", 3)], 10)
    with pytest.raises(ValueError):
        stage_bounds([Stage("a", 12), Stage("b", None)], 10)


def test_lr_multipliers_by_role_and_zero_freezes():
    model = Toy()
    groups = param_groups(model, 0.1, {"slow": 0.1}, {"slow": [model.b]})
    by_mult = {(g["lr_mult"], g["weight_decay"]): len(g["params"]) for g in groups}
    assert by_mult == {(1.0, 0.1): 1, (1.0, 0.0): 1, (0.1, 0.1): 1, (0.1, 0.0): 1}
    frozen = Toy()
    groups = param_groups(frozen, 0.1, {"slow": 0.0}, {"slow": [frozen.b]})
    assert not frozen.b.weight.requires_grad and sum(len(g["params"]) for g in groups) == 2
    with pytest.raises(KeyError):
        param_groups(model, 0.1, {"nope": 0.5}, {"slow": [model.b]})


def test_stages_train_only_their_modules_and_the_mixer_alternates(tmp_path):
    stages = [
        Stage("first", 4, ("pair", "image"), trainable=lambda m: [m.a]),
        Stage("second", None, ("image",)),
    ]
    result = train(_config(tmp_path), _spec_builder(stages))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["pair", "image", "pair", "image"] + ["image"] * 4
    assert [r["stage"] for r in records] == ["first"] * 4 + ["second"] * 4
    from safetensors.torch import load_file

    c2 = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    c4 = load_file(str(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"))
    c6 = load_file(str(tmp_path / "checkpoints" / "step_00000006" / "model.safetensors"))
    assert torch.equal(c2["b.weight"], c4["b.weight"]) and not torch.equal(c2["a.weight"], c4["a.weight"])
    assert not torch.equal(c4["b.weight"], c6["b.weight"]) and not torch.equal(c4["a.weight"], c6["a.weight"])
    first = torch.load(tmp_path / "checkpoints" / "step_00000002" / "trainer.pt", weights_only=False)
    assert first["stage"] == 0 and sum(len(g["params"]) for g in first["optimizer"]["param_groups"]) == 2
    assert result.step == 8


@pytest.mark.parametrize("resume_at", [2, 4])
def test_resume_inside_a_stage_and_at_a_boundary_is_exact(tmp_path, resume_at):
    stages = [
        Stage("first", 4, ("pair", "image"), trainable=lambda m: [m.a]),
        Stage("second", None, ("pair", "image"), mixing="weighted", weights={"pair": 1.0, "image": 2.0}),
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    train(_config(ref), _spec_builder(stages, lr_roles=True))
    # A run killed after its checkpoint at `resume_at`: later checkpoints never happened.
    shutil.copytree(ref, cut)
    for ckpt in (cut / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > resume_at:
            shutil.rmtree(ckpt)
    result = train(_config(cut), _spec_builder(stages, lr_roles=True))
    assert result.resumed_from == resume_at
    strip = ("samples_per_s", "data_time_frac")
    curve = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(ref / "metrics.jsonl")]
    again = [{k: v for k, v in r.items() if k not in strip} for r in read_metrics(cut / "metrics.jsonl")]
    assert again == curve


def test_periodic_evaluation_every_n_steps_and_at_the_end(tmp_path):
    seen = []

    def evaluate(model, device):
        seen.append(model.training)
        return {"w": float(model.a.weight.detach().sum())}

    train(_config(tmp_path, eval={"every": 3}), _spec_builder([Stage("main", None)], evaluate=evaluate))
    lines = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [3, 6, 8] and seen == [False, False, False]
    assert json.loads((tmp_path / "eval.json").read_text())["w"] == lines[-1]["w"]


@pytest.mark.parametrize(
    ("method", "losses", "trained"),
    [
        ("albef", None, {"itc", "itm"}),
        ("vlmo", None, {"itc"}),
        ("flava", None, {"itc", "itm"}),
        ("albef", ["itc"], {"itc"}),
        ("u-visualbert", None, {"itm"}),
        ("vlmixer", None, {"itm"}),
        ("mu-vla", None, {"itm"}),
    ],
)
def test_retrieval_trains_exactly_the_losses_it_names(method, losses, trained):
    """Retrieval fine-tuning zeroes every other loss of the method (the ALBEF issue's retrieval preset
    trained MLM too) and trains the ones it names even where pre-training had them at weight 0 (U-VisualBERT
    and VLMixer have no ITM in pre-training: their retrieval fine-tuning once trained nothing, loss 0, and
    scored exactly as zero-shot); an unknown loss name is an error."""
    from vlp_core.tasks.retrieval import retrieval_recipe_config

    cfg = TrainConfig.model_validate({"task": {"kind": "retrieval", "losses": losses}, "method": method})
    weights = retrieval_recipe_config(cfg).loss_weights()
    assert {k for k, w in weights.items() if w > 0} == trained
    bad = TrainConfig.model_validate(
        {"task": {"kind": "retrieval", "losses": ["itc", "nope"]}, "method": method}
    )
    with pytest.raises(ValueError, match="nope"):
        retrieval_recipe_config(bad)


def test_configs_are_validated_when_loaded():
    """Unknown kinds, methods, tasks and fields, and values of the wrong type, fail at load time."""
    from vlp_core.train.config import load_train_config

    for overrides in (
        {"method": "nope"},
        {"backbone.kind": "nope"},
        {"backbone.text.num_layrs": 2},
        {"recipe.queue_sise": 64},
        {"recipe.queue_size": "big"},
        {"task.kind": "nope"},
        {"task.eval_questions": 5},  # a vqa field on a pretrain task
        {"optim.lr_mult.vision": -1.0},
    ):
        with pytest.raises(ValueError):
            load_train_config("albef_tiny", overrides)
    ok = load_train_config("vlmo_tiny", {"recipe.vision_steps": 5, "optim.lr_mult.vision_pretrained": 0.1})
    assert ok.recipe_config().vision_steps == 5 and ok.backbone_config().registry_kind == "multiway"
    assert ok.optim.lr_mult == {"vision_pretrained": 0.1}
