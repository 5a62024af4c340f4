"""Tasks: how a :class:`TrainConfig` becomes a model, a dataset, a collate function and an evaluation.

- ``pretrain``: corpus pairs (``data.pairs``: retrieved | known | random | mixed) → the method's pre-training
  objectives; evaluation = zero-shot retrieval on the held-out clip art.
- ``retrieval``: the same model and pairs (usually ``mode: known``) from a pre-trained run, with the method's
  fine-tuning loss (ALBEF: ITC + ITM, ``mlm_weight=0``); evaluation = retrieval on the held-out clip art.
- ``vqa``: answer classification on easy-VQA or VQA v2 from a pre-trained run; evaluation = VQA accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from torch import nn

from stores.shards import ShardStore
from vlp_core.data import (
    AnswerVocab,
    PairDataset,
    PairsConfig,
    PretrainCollator,
    VQACollator,
    VQADataset,
    build_pair_index,
    eval_transform,
    heldout_split,
    load_image_file,
    load_tokenizer,
    make_pair_index,
    read_easy_vqa,
    read_vqa_v2,
    train_transform,
)
from vlp_core.eval import RetrievalSet, evaluate_retrieval, vqa_accuracy
from vlp_core.models import build_model, load_backbone_state_
from vlp_core.train.checkpoint import load_pretrained_weights
from vlp_core.train.config import TrainConfig
from vlp_core.train.trainer import DistEnv, TrainJob

__all__ = ["build_job", "heldout_retrieval_data", "resolve_init"]


def _model_dict(config: TrainConfig) -> dict[str, Any]:
    """The method's config dict: the preset, the run seed (ITM sampling), then the ``model`` overrides."""
    return {"preset": config.preset, "seed": config.seed, **config.model}


def resolve_init(config: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The weights named by ``init_from`` (``{data}`` expands to the data directory), or None."""
    if not config.init_from:
        return None
    path = Path(config.init_from.format(data=config.layout().root))
    if not path.exists():
        raise FileNotFoundError(
            f"init_from {path} does not exist: run pre-training first (prefect deployment run pretrain/albef)"
            " or pass init_from=<run or checkpoint dir>"
        )
    return load_pretrained_weights(path)


def heldout_retrieval_data(
    store: ShardStore, pairs: PairsConfig, max_images: int | None
) -> tuple[pa.Table, pa.Table, RetrievalSet]:
    """The held-out clip art as a retrieval set: (images index, texts table, positives).

    The first ``max_images`` held-out images in id order (ids are content hashes, so this is a fixed random
    sample) and all their known captions."""
    held = heldout_split(store, pairs.heldout_fraction, pairs.heldout_salt)
    if held.num_rows == 0:
        raise ValueError("the held-out split is empty (no known pairs, or heldout_fraction is 0)")
    images = sorted(set(held["image_id"].to_pylist()))
    if max_images is not None:
        images = images[:max_images]
    keep = set(images)
    rows = [r for r in held.to_pylist() if r["image_id"] in keep]
    texts = sorted({(r["text_id"], r["text"]) for r in rows})
    text_pos = {t: i for i, (t, _) in enumerate(texts)}
    image_pos = {im: i for i, im in enumerate(images)}
    data = RetrievalSet.from_pairs(
        [image_pos[r["image_id"]] for r in rows],
        [text_pos[r["text_id"]] for r in rows],
        len(images),
        len(texts),
    )
    # One index row per image (any of its captions) so PairDataset can decode it.
    first_text = {}
    for r in rows:
        first_text.setdefault(r["image_id"], r["text_id"])
    index = make_pair_index(
        pa.table({"image_id": images, "text_id": [first_text[i] for i in images]}), "heldout"
    )
    text_table = pa.table({"text_id": [t for t, _ in texts], "text": [s for _, s in texts]})
    return index, text_table, data


def _retrieval_eval(
    config: TrainConfig, store: ShardStore, pairs: PairsConfig, tokenizer: Any
) -> Callable[[nn.Module, torch.device], dict[str, float]]:
    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        index, texts, data = heldout_retrieval_data(store, pairs, config.eval.retrieval_images)
        transform = eval_transform(model.image_size, model.image_mean, model.image_std)
        images = PairDataset(store, index, transform, seed=0)
        pixels = torch.stack([images[i]["pixel_values"] for i in range(len(images))])
        enc = tokenizer(
            texts["text"].to_pylist(),
            padding=True,
            truncation=True,
            max_length=config.data.max_len,
            return_tensors="pt",
        )
        with torch.no_grad():
            return evaluate_retrieval(
                model,
                pixels,
                (enc["input_ids"], enc["attention_mask"]),
                data,
                device=device,
                batch_size=config.eval.batch_size,
                itm_k=config.eval.itm_rerank_k,
            )

    return evaluate


def _pairs_job(config: TrainConfig, env: DistEnv) -> TrainJob:
    store = ShardStore(config.layout().store)
    model = build_model(config.method, _model_dict(config))
    init = resolve_init(config)
    if init is not None:
        model.load_pretrained_state_dict(init)
    pairs = PairsConfig(**config.data.pairs)
    index = build_pair_index(store, pairs, seed=config.seed)
    if config.data.limit is not None:
        index = index.slice(0, config.data.limit)
    transform = train_transform(
        model.image_size,
        model.image_mean,
        model.image_std,
        scale=tuple(config.data.crop_scale),
        randaugment=config.data.randaugment,
    )
    tokenizer = load_tokenizer()
    origins = index["origin"].value_counts().to_pylist()
    info = {
        "pairs": index.num_rows,
        "images": len(set(index["image_id"].to_pylist())),
        "texts": len(set(index["text_id"].to_pylist())),
        "origins": {d["values"]: d["counts"] for d in origins},
        "init_from": config.init_from,
    }
    return TrainJob(
        model=model,
        dataset=PairDataset(store, index, transform, seed=config.seed),
        collate=PretrainCollator(tokenizer, config.data.max_len, whole_word=config.data.whole_word_mask),
        evaluate=_retrieval_eval(config, store, pairs, tokenizer),
        info=info,
    )


def _vqa_records(config: TrainConfig, split: str):
    d = config.data
    if d.vqa_dataset == "easy_vqa":
        return read_easy_vqa(split), load_image_file
    questions = d.vqa_questions if split == "train" else d.vqa_eval_questions
    annotations = d.vqa_annotations if split == "train" else d.vqa_eval_annotations
    images = d.vqa_images if split == "train" else d.vqa_eval_images
    if not questions or not images:
        raise ValueError(f"vqa_v2 needs data.vqa_{'' if split == 'train' else 'eval_'}questions and images")
    root = Path(images)
    return read_vqa_v2(questions, annotations), lambda rel: load_image_file(root / rel)


def _vqa_job(config: TrainConfig, env: DistEnv) -> TrainJob:
    train_records, loader = _vqa_records(config, "train")
    vocab = AnswerVocab.build(train_records, top_k=config.data.vqa_top_answers)
    if config.data.limit is not None:
        train_records = train_records[: config.data.limit]
    model = build_model("vqa", {"backbone": _model_dict(config), "num_answers": len(vocab)})
    init = resolve_init(config)
    if init is not None:
        load_backbone_state_(model, init)
    run_dir = config.resolved_run_dir()
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "answer_vocab.json").write_text(json.dumps(vocab.to_dict()))
    # No flip: "left"/"right" in a question must keep meaning what it says.
    transform = train_transform(
        model.image_size, model.image_mean, model.image_std, scale=tuple(config.data.crop_scale), hflip=False
    )
    tokenizer = load_tokenizer()
    collate = VQACollator(tokenizer, config.data.max_len)

    def evaluate(model: nn.Module, device: torch.device) -> dict[str, float]:
        records, test_loader = _vqa_records(config, "test")
        if config.eval.vqa_questions is not None:
            records = records[: config.eval.vqa_questions]
        records = [r for r in records if r.scores]  # unannotated test questions cannot be scored
        dataset = VQADataset(
            records,
            vocab,
            eval_transform(model.image_size, model.image_mean, model.image_std),
            image_loader=test_loader,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=config.eval.batch_size,
            collate_fn=collate,
            num_workers=config.data.num_workers,
        )
        logits, scores = [], []
        with torch.no_grad():
            for batch in loader:
                logits.append(
                    model.logits(
                        batch["pixel_values"].to(device),
                        batch["input_ids"].to(device),
                        batch["attention_mask"].to(device),
                    )
                    .float()
                    .cpu()
                )
                scores.append(batch["answer_scores"])
        all_logits, all_scores = torch.cat(logits), torch.cat(scores)
        out = {
            "vqa_accuracy": vqa_accuracy(all_logits, all_scores),
            "n_questions": float(len(records)),
            "answer_coverage": vocab.coverage(records),
        }
        for kind in sorted({r.answer_type for r in records if r.answer_type}):
            sel = torch.tensor([r.answer_type == kind for r in records])
            out[f"vqa_accuracy_{kind.replace('/', '_')}"] = vqa_accuracy(all_logits[sel], all_scores[sel])
        return out

    info = {"questions": len(train_records), "answers": len(vocab), "init_from": config.init_from}
    return TrainJob(
        model=model,
        dataset=VQADataset(train_records, vocab, transform, image_loader=loader, seed=config.seed),
        collate=collate,
        evaluate=evaluate,
        info=info,
    )


def build_job(config: TrainConfig, env: DistEnv) -> TrainJob:
    """The :class:`TrainJob` of ``config.task``."""
    if config.task in ("pretrain", "retrieval"):
        return _pairs_job(config, env)
    if config.task == "vqa":
        return _vqa_job(config, env)
    raise ValueError(f"unknown task {config.task!r}")
