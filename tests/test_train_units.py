"""Trainer components and evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vlp_core.eval import RetrievalSet, recall_at_k, rerank_topk, vqa_accuracy
from vlp_core.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from vlp_core.train.config import load_train_config
from vlp_core.train.metrics import MetricsLogger, read_metrics
from vlp_core.train.trainer import cosine_schedule, param_groups


def test_cosine_schedule_hand_values():
    kw = {"total": 10, "warmup": 2, "lr": 1e-4, "min_lr": 1e-5}
    assert cosine_schedule(0, **kw) == pytest.approx(0.5)
    assert cosine_schedule(1, **kw) == pytest.approx(1.0)
    assert cosine_schedule(2, **kw) == pytest.approx(1.0)
    # halfway through the decay: floor + (1 - floor) / 2 with floor 0.1
    assert cosine_schedule(6, **kw) == pytest.approx(0.55)
    assert cosine_schedule(10, **kw) == pytest.approx(0.1)
    assert cosine_schedule(50, **kw) == pytest.approx(0.1)


def test_param_groups_skip_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.add_module("frozen", nn.Linear(2, 2).requires_grad_(False))
    decay, no_decay = param_groups(model, 0.02)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert sorted(p.numel() for p in no_decay["params"]) == [4, 4, 4]
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0


def test_recall_at_k_many_to_many():
    # image 0 has texts {0, 1}; image 1 has {2}; text 3 belongs to images 1 and 2.
    data = RetrievalSet.from_pairs([0, 0, 1, 1, 2], [0, 1, 2, 3, 3], 3, 4)
    i2t = torch.tensor([[1, 2, 0, 3], [0, 1, 3, 2], [2, 0, 1, 3]])
    t2i = torch.tensor([[1, 0, 2], [0, 1, 2], [2, 0, 1], [2, 1, 0]])
    r = recall_at_k(i2t, t2i, data, ks=(1, 3))
    assert r["i2t_r1"] == pytest.approx(1 / 3)  # only image 0 (text 1 first)
    assert r["i2t_r3"] == pytest.approx(2 / 3)  # image 1 finds text 3; image 2's text 3 is 4th
    assert r["t2i_r1"] == pytest.approx(2 / 4)  # texts 1 and 3
    assert r["t2i_r3"] == pytest.approx(1.0)
    assert r["mean_r"] == pytest.approx((1 / 3 + 2 / 3 + 0.5 + 1.0) / 4)


def test_retrieval_set_rejects_orphans():
    with pytest.raises(ValueError, match="every image"):
        RetrievalSet(torch.tensor([[True, False], [False, False]]))


def test_rerank_reorders_only_the_top_k():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    # the scorer prefers higher candidate index: top-3 [0, 1, 2] becomes [2, 1, 0]; 3 stays last
    ranking = rerank_topk(sim, 3, lambda q, c: c.float())
    assert ranking.tolist() == [[2, 1, 0, 3]]
    assert rerank_topk(sim, 0, lambda q, c: c.float()).tolist() == [[0, 1, 2, 3]]


def test_vqa_accuracy_uses_soft_scores():
    logits = torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    scores = torch.tensor([[0.0, 2 / 3, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert vqa_accuracy(logits, scores) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_checkpoint_round_trip_restores_weights_rng_and_state(tmp_path):
    model = nn.Linear(3, 2)
    model.register_buffer("ptr", torch.tensor(7))
    state = {"step": 5, "world_size": 1, "sampler": {"epoch": 1, "batches_done": 3}}
    torch.manual_seed(123)
    save_checkpoint(tmp_path, 5, model, state, keep=2)
    expected_draw = torch.rand(3)
    for step in (10, 15):
        save_checkpoint(tmp_path, step, model, {**state, "step": step}, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000010", "step_00000015"]  # keep=2 drops the oldest
    # a half-written checkpoint (no trainer.pt) is never picked for resume
    (tmp_path / "checkpoints" / "step_00000020.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000015"

    torch.manual_seed(123)
    save_checkpoint(tmp_path, 25, model, {**state, "step": 25})
    other = nn.Linear(3, 2)
    other.register_buffer("ptr", torch.tensor(0))
    torch.manual_seed(999)
    loaded = load_trainer_state(latest_checkpoint(tmp_path), other)
    assert loaded["step"] == 25 and loaded["sampler"] == {"epoch": 1, "batches_done": 3}
    assert torch.equal(other.weight, model.weight) and int(other.ptr) == 7
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues exactly where the save left it


def test_metrics_resume_cuts_back_to_the_checkpoint(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=False)
    for step in range(1, 8):
        log.log({"step": step, "loss": 1.0 / step})
    log.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 8, "lo')  # torn line of a killed run
    log = MetricsLogger(tmp_path, tensorboard=False, resume_step=5)
    log.log({"step": 6, "loss": 0.5})
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert not math.isnan(read_metrics(tmp_path / "metrics.jsonl")[-1]["loss"])


def test_train_presets_validate_and_reject_typos():
    for name in ("albef_tiny", "albef_base", "vqa_easy", "retrieval_clipart"):
        cfg = load_train_config(name)
        assert cfg.batch_size > 0
    with pytest.raises(ValueError, match="extra"):
        load_train_config("albef_tiny", {"optim.lrr": 1.0})
    with pytest.raises(FileNotFoundError, match="presets"):
        load_train_config("nope")


def test_weights_file_keeps_every_name_of_tied_parameters(tmp_path):
    from safetensors.torch import load_file

    from vlp_core.train.checkpoint import load_weights, save_weights

    def tied() -> nn.Module:
        m = nn.Module()
        m.embed = nn.Embedding(5, 3)
        m.decoder = nn.Linear(3, 5, bias=False)
        m.decoder.weight = m.embed.weight
        return m

    model = tied()
    save_weights(model, tmp_path / "w.safetensors")
    state = load_file(str(tmp_path / "w.safetensors"))
    assert set(state) == {"embed.weight", "decoder.weight"}  # a part can be loaded by its own name
    other = tied()
    load_weights(other, tmp_path / "w.safetensors")
    assert torch.equal(other.embed.weight, model.embed.weight)
    assert other.decoder.weight is other.embed.weight  # still tied after loading
