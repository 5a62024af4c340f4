"""Training data: the pair index over a small real store (ingest stage on real clip art + a hand-written
retrieved_pairs table), held-out exclusion, the sampler's partition and resume, per-sample determinism across
DataLoader workers and batch splits, MLM masks, damaged images, and the VQA readers."""

from __future__ import annotations

import hashlib
import json
import pickle
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.utils.data import DataLoader

from stores.shards import ShardStore, to_table
from vlp_core.corpus.images import load_rgb
from vlp_core.corpus.ingest import ingest_images, ingest_texts
from vlp_core.corpus.sources import TextRecord, build_source
from vlp_core.data import (
    AnswerVocab,
    ImageDecodeError,
    PairDataset,
    PairsConfig,
    PretrainCollator,
    ResumableSampler,
    VQACollator,
    VQADataset,
    build_pair_index,
    eval_transform,
    heldout_split,
    load_image_file,
    load_tokenizer,
    make_pair_index,
    normalize_answer,
    read_easy_vqa,
    read_vqa_v2,
    soft_score,
    stable_keys,
    train_transform,
)

FIXTURES = Path(__file__).parent / "fixtures" / "vqa_v2"
SALT, FRACTION, MAX_RANK = "test-salt", 0.25, 4
MEAN = STD = (0.5, 0.5, 0.5)
INT_KEYS = (
    "input_ids",
    "attention_mask",
    "mlm_input_ids",
    "mlm_labels",
    "image_key",
    "text_key",
    "sample_seed",
)
SENTENCES = [
    "A frog sits on a green leaf.",
    "The bird flies over the lake at dawn.",
    "Two cats sleep on a red sofa.",
    "An armadillo walks across the desert road.",
    "A lizard basks on a warm rock.",
    "The dog chases a ball in the park.",
    "A bat hangs upside down in a cave.",
    "Bison graze on the open prairie.",
    "A penguin waddles along the icy shore.",
    "Unbelievably colourful butterflies flutter everywhere.",
    "A turtle swims slowly through clear water.",
    "The horse gallops across a wide field.",
    "An owl watches from a tall pine tree.",
    "A small mouse nibbles some cheese.",
    "The elephant sprays water with its trunk.",
    "A fish jumps out of the river.",
]


def _commit(store: ShardStore, stage: str, source: str, shard: str, tables: dict) -> None:
    store.commit(stage, source, shard, "test", [(shard, shard)], tables)


def _held(image_ids, salt=SALT, fraction=FRACTION) -> set[str]:
    """The documented held-out rule, written out independently of the library."""

    def unit(image_id: str) -> float:
        digest = hashlib.blake2b(f"{salt}\0{image_id}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2.0**64

    return {i for i in image_ids if unit(i) < fraction}


@pytest.fixture(scope="module")
def corpus(real, tmp_path_factory):
    """Ingest 24 real clip-art PNGs (two shards, plus three of them again as a second source) and some
    sentences, exactly as the ingest stage does, then write retrieved_pairs ourselves (ranks 1..5, with
    held-out captions among the retrieved sentences and a row repeated across two shards)."""
    store = ShardStore(tmp_path_factory.mktemp("store"))
    store.ensure_tables()
    src = build_source("openclipart", "oca", root=str(real.openclipart))
    units = [u for u in src.units() if u.key.endswith(".png")][:24]
    for i, chunk in enumerate([units[:12], units[12:], units[:3]]):
        source = "oca_copy" if i == 2 else "oca"
        rows = ingest_images(src.read(chunk), source, f"s{i}")
        _commit(store, "ingest", source, f"s{i}", {n: to_table(n, r) for n, r in rows.tables.items()})
    text_rows = ingest_texts([TextRecord(f"lines:{i}", s) for i, s in enumerate(SENTENCES)], "lines", "t0")
    _commit(store, "ingest", "lines", "t0", {"texts": to_table("texts", text_rows.tables["texts"])})

    known = {(r["image_id"], r["text_id"]) for r in store.read_table("known_pairs").to_pylist()}
    owners: dict[str, set[str]] = {}
    for i, t in known:
        owners.setdefault(t, set()).add(i)
    unique = {t for t, imgs in owners.items() if len(imgs) == 1}
    captioned = sorted({i for i, t in known if t in unique})  # images with a caption of their own
    held_images = _held(captioned)
    held_texts = {t for i, t in known if i in held_images and t in unique}
    images = sorted(set(store.read_table("images", ["image_id"])["image_id"].to_pylist()))
    texts = sorted(set(store.read_table("texts", ["text_id"])["text_id"].to_pylist()))
    rng = np.random.default_rng(0)
    retrieved = []
    for k, iid in enumerate(images):
        picks = [texts[j] for j in rng.choice(len(texts), size=5, replace=False)]
        if iid not in held_images and held_texts:  # a held-out caption retrieved for a pre-training image
            picks[1] = sorted(held_texts)[k % len(held_texts)]
        retrieved += [{"image_id": iid, "rank": r + 1, "text_id": t, "score": 1.0 - r / 10} for r, t in
                      enumerate(dict.fromkeys(picks))]  # fmt: skip
    half = len(retrieved) // 2
    _commit(
        store, "retrieve", "corpus", "r0", {"retrieved_pairs": to_table("retrieved_pairs", retrieved[:half])}
    )
    _commit(
        store, "retrieve", "corpus", "r1",
        {"retrieved_pairs": to_table("retrieved_pairs", retrieved[half - 3 :])},  # 3 rows in both shards
    )  # fmt: skip
    text_of = dict(zip(*store.read_table("texts", ["text_id", "text"]).to_pydict().values(), strict=True))
    sources = store.read_table("images", ["image_id", "source"]).to_pylist()
    copy_images = {r["image_id"] for r in sources if r["source"] == "oca_copy"}
    return SimpleNamespace(
        store=store, images=images, captioned=captioned, known=known, held_images=held_images,
        held_texts=held_texts, retrieved=retrieved, text_of=text_of, copy_images=copy_images,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _cfg(**kw) -> PairsConfig:
    return PairsConfig(**{"heldout_fraction": FRACTION, "heldout_salt": SALT, "max_rank": MAX_RANK, **kw})


def _pairs(index: pa.Table) -> list[tuple[str, str]]:
    return list(zip(index["image_id"].to_pylist(), index["text_id"].to_pylist(), strict=True))


def _expected_retrieved(corpus) -> set[tuple[str, str]]:
    return {
        (r["image_id"], r["text_id"])
        for r in corpus.retrieved
        if r["rank"] <= MAX_RANK
        and r["image_id"] not in corpus.held_images
        and r["text_id"] not in corpus.held_texts
    }


# ------------------------------------------------------------------------------------------------ sampler


def _keys(sampler: ResumableSampler) -> list[tuple[int, int]]:
    return list(iter(sampler))


def test_sampler_splits_each_global_batch_across_ranks_exactly():
    n, gb = 50, 12
    single = ResumableSampler(n, gb, seed=3)
    assert single.batches_per_epoch == 4 and len(single) == 48
    per_batch = np.array([i for _, i in _keys(single)]).reshape(4, gb)
    assert len(set(per_batch.ravel())) == 48  # no repeats within an epoch
    for world in (2, 3, 4):
        ranks = [ResumableSampler(n, gb, rank=r, world_size=world, seed=3) for r in range(world)]
        local = [np.array([i for _, i in _keys(s)]).reshape(4, gb // world) for s in ranks]
        assert all(len(s) == 4 * gb // world for s in ranks)
        np.testing.assert_array_equal(np.concatenate(local, axis=1), per_batch)
    single.set_epoch(1)
    assert not np.array_equal(np.array([i for _, i in _keys(single)]).reshape(4, gb), per_batch)
    assert {e for e, _ in _keys(single)} == {1}

    padded = ResumableSampler(n, gb, rank=1, world_size=2, seed=3, drop_last=False)
    assert padded.batches_per_epoch == 5 and len(padded) == 30
    whole = [ResumableSampler(n, gb, rank=r, world_size=2, seed=3, drop_last=False) for r in range(2)]
    assert {i for s in whole for _, i in _keys(s)} == set(range(n))  # the partial batch wraps around
    with pytest.raises(ValueError):
        ResumableSampler(n, 10, world_size=3)


def test_sampler_resume_yields_the_uninterrupted_tail():
    n, gb = 40, 8
    full = ResumableSampler(n, gb, rank=1, world_size=2, seed=7)
    full.set_epoch(2)
    uninterrupted = _keys(full)
    # The interrupted run consumed 3 batches of epoch 2 (advance once per batch), then saved its state.
    run = ResumableSampler(n, gb, rank=1, world_size=2, seed=7)
    run.set_epoch(2)
    it = iter(run)
    for _ in range(3 * run.local_batch):
        next(it)
    run.advance(3)
    state = run.state_dict()
    assert (state["epoch"], state["batches_done"]) == (2, 3)

    resumed = ResumableSampler(n, gb, rank=1, world_size=2, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's epoch loop re-selects the saved epoch: position kept
    assert _keys(resumed) == uninterrupted[3 * run.local_batch :]
    resumed.set_epoch(3)  # the next epoch starts from batch 0
    full.set_epoch(3)
    assert _keys(resumed) == _keys(full)

    # Resuming on a different number of processes sees the same global batches.
    one = ResumableSampler(n, gb, world_size=1, seed=7)
    one.load_state_dict(state)
    tail = [i for _, i in _keys(one)]
    two = [ResumableSampler(n, gb, rank=r, world_size=2, seed=7) for r in range(2)]
    for s in two:
        s.load_state_dict(state)
    halves = [np.array([i for _, i in _keys(s)]).reshape(-1, 4) for s in two]
    assert np.concatenate(halves, axis=1).ravel().tolist() == tail
    with pytest.raises(ValueError, match="global_batch"):
        ResumableSampler(n, 4, seed=7).load_state_dict(state)


# --------------------------------------------------------------------------------------------- pair index


def test_heldout_images_and_their_captions_never_reach_pretraining(corpus):
    held = heldout_split(corpus.store, FRACTION, SALT)
    assert set(held["image_id"].to_pylist()) == corpus.held_images and corpus.held_images
    assert set(held["text_id"].to_pylist()) == corpus.held_texts
    assert all(
        corpus.text_of[t] == x
        for t, x in zip(held["text_id"].to_pylist(), held["text"].to_pylist(), strict=True)
    )
    assert held.num_rows == len(
        {(i, t) for i, t in corpus.known if i in corpus.held_images and t in corpus.held_texts}
    )
    # The raw corpus does pair held-out data with pre-training images, so the filter has work to do.
    assert any(
        r["text_id"] in corpus.held_texts and r["image_id"] not in corpus.held_images
        for r in corpus.retrieved
    )
    assert any(r["image_id"] in corpus.held_images for r in corpus.retrieved)
    for cfg in (_cfg(), _cfg(mode="known"), _cfg(mode="random"), _cfg(mode="mixed", paired_ratio=0.5)):
        index = build_pair_index(corpus.store, cfg, seed=1)
        assert index.num_rows > 0
        assert not set(index["image_id"].to_pylist()) & corpus.held_images, cfg.mode
        assert not set(index["text_id"].to_pylist()) & corpus.held_texts, cfg.mode


def test_retrieved_and_known_modes_hold_exactly_the_expected_pairs(corpus):
    index = build_pair_index(corpus.store, _cfg(), seed=0)
    assert index.schema.names == ["image_id", "text_id", "image_key", "text_key", "origin"]
    assert index.schema.field("image_key").type == pa.int64()
    pairs = _pairs(index)
    assert len(pairs) == len(set(pairs))  # the row repeated across shards appears once
    assert set(pairs) == _expected_retrieved(corpus)
    assert set(index["origin"].to_pylist()) == {"retrieved"}
    np.testing.assert_array_equal(index["image_key"].to_numpy(), stable_keys(index["image_id"]))
    assert index == build_pair_index(corpus.store, _cfg(), seed=0)  # deterministic

    known = build_pair_index(corpus.store, _cfg(mode="known"), seed=0)
    expected = {(i, t) for i, t in corpus.known if i not in corpus.held_images and t not in corpus.held_texts}
    assert set(_pairs(known)) == expected and known.num_rows == len(expected)

    limited = build_pair_index(corpus.store, _cfg(limit=5), seed=0)
    assert limited.num_rows == 5 and set(_pairs(limited)) <= set(pairs)

    copy_only = build_pair_index(corpus.store, _cfg(sources=["oca_copy"]), seed=0)
    assert set(copy_only["image_id"].to_pylist()) <= corpus.copy_images
    with pytest.raises(ValueError, match="no_such_source"):
        build_pair_index(corpus.store, _cfg(sources=["no_such_source"]), seed=0)


def test_random_mode_keeps_the_retrieved_images_and_sentences_but_not_their_alignment(corpus):
    retrieved = build_pair_index(corpus.store, _cfg(), seed=0)
    rand = build_pair_index(corpus.store, _cfg(mode="random"), seed=0)
    assert Counter(rand["image_id"].to_pylist()) == Counter(retrieved["image_id"].to_pylist())
    assert Counter(rand["text_id"].to_pylist()) == Counter(retrieved["text_id"].to_pylist())
    aligned = set(_pairs(retrieved))
    assert sum(p in aligned for p in _pairs(rand)) < rand.num_rows / 2
    assert set(rand["origin"].to_pylist()) == {"random"}
    assert _pairs(build_pair_index(corpus.store, _cfg(mode="random"), seed=1)) != _pairs(rand)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_mixed_mode_draws_the_paired_ratio_of_true_pairs(corpus, ratio):
    retrieved = _expected_retrieved(corpus)
    known = {(i, t) for i, t in corpus.known if i not in corpus.held_images and t not in corpus.held_texts}
    index = build_pair_index(corpus.store, _cfg(mode="mixed", paired_ratio=ratio), seed=0)
    n = len(retrieved)
    origins = Counter(index["origin"].to_pylist())
    assert index.num_rows == n
    assert origins["known"] == round(ratio * n) and origins["retrieved"] == n - round(ratio * n)
    rows = _pairs(index)
    orig = index["origin"].to_pylist()
    true_rows = [p for p, o in zip(rows, orig, strict=True) if o == "known"]
    weak_rows = [p for p, o in zip(rows, orig, strict=True) if o == "retrieved"]
    assert set(true_rows) <= known and set(weak_rows) <= retrieved and len(set(weak_rows)) == len(weak_rows)
    if true_rows:  # more requested than exist → every known pair used equally often (±1)
        uses = Counter(true_rows)
        assert max(uses.values()) - min(uses.values()) <= 1
        assert len(uses) == min(len(known), len(true_rows))


# ------------------------------------------------------------------------------------------------ dataset


@pytest.fixture(scope="module")
def dataset(corpus):
    index = build_pair_index(corpus.store, _cfg(), seed=0)
    return PairDataset(corpus.store, index, train_transform(48, MEAN, STD, randaugment=True), seed=5)


def test_pair_dataset_serves_the_stored_image_and_sentence(corpus, dataset):
    index = build_pair_index(corpus.store, _cfg(), seed=0)
    images = corpus.store.read_table("images", ["image_id", "image"]).to_pydict()
    jpeg_of = dict(zip(images["image_id"], images["image"], strict=True))
    plain = PairDataset(corpus.store, index, eval_transform(40, MEAN, STD), seed=5, cache_bytes=1)
    assert plain._cache is None  # nothing read at construction
    tf = eval_transform(40, MEAN, STD)
    for i in range(len(plain)):
        s = plain[(0, i)]
        iid, tid = index["image_id"][i].as_py(), index["text_id"][i].as_py()
        assert s["text"] == corpus.text_of[tid]
        torch.testing.assert_close(s["pixel_values"], tf(load_rgb(jpeg_of[iid])), rtol=0, atol=0)
        assert (
            s["image_key"] == index["image_key"][i].as_py() and s["text_key"] == index["text_key"][i].as_py()
        )
        assert s["pixel_values"].shape == (3, 40, 40) and s["pixel_values"].dtype == torch.float32
        assert len(plain._cache.items) == 1  # the byte bound evicts all but the newest row group
    assert plain._cache.misses > 1
    clone = pickle.loads(pickle.dumps(plain))  # as a spawned worker receives it: no cache, same samples
    assert clone._cache is None and torch.equal(clone[(0, 1)]["pixel_values"], plain[(0, 1)]["pixel_values"])
    # Augmentation is a function of (seed, epoch, index): same key → same crop; another epoch → another.
    a, b, c = dataset[(0, 3)], dataset[(0, 3)], dataset[(1, 3)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["sample_seed"] == b["sample_seed"]
    assert not torch.equal(a["pixel_values"], c["pixel_values"]) and a["sample_seed"] != c["sample_seed"]


def _loader_batches(dataset, collator, world, rank, workers):
    """One whole epoch (an exhausted loader stops its workers at once)."""
    sampler = ResumableSampler(len(dataset), 8, rank=rank, world_size=world, seed=11)
    # spawn, not fork: by now the test process runs the session's Prefect client threads, and forking a
    # threaded process can leave a worker with a lock held by a thread that no longer exists.
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=workers,
                        collate_fn=collator, drop_last=True,
                        multiprocessing_context="spawn" if workers else None)  # fmt: skip
    return list(loader)


def _rows(batch) -> list[dict]:
    """Per sample, without the batch's padding."""
    rows = []
    for i in range(len(batch["sample_seed"])):
        n = int(batch["attention_mask"][i].sum())
        rows.append(
            {k: (v[i, :n] if v.dim() == 2 else v[i]) for k, v in batch.items() if k != "attention_mask"}
        )
    return rows


def test_samples_and_masks_do_not_depend_on_workers_or_batch_split(dataset, tokenizer):
    collator = PretrainCollator(tokenizer, max_len=24, mlm_prob=0.3, whole_word=True)
    reference = _loader_batches(dataset, collator, world=1, rank=0, workers=0)
    with_workers = _loader_batches(dataset, collator, world=1, rank=0, workers=2)
    assert len(reference) == len(with_workers) == len(dataset) // 8
    for a, b in zip(reference, with_workers, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # Four ranks of 2 samples: their batches pad to other lengths than the global batch of 8 does.
    split = [_loader_batches(dataset, collator, world=4, rank=r, workers=0) for r in range(4)]
    for g, whole in enumerate(reference):
        parts = [row for rank in split for row in _rows(rank[g])]
        for x, y in zip(_rows(whole), parts, strict=True):
            for k in x:
                assert torch.equal(x[k], y[k]), k
    b = reference[0]
    assert b["pixel_values"].shape == (8, 3, 48, 48)
    for k in INT_KEYS:
        assert b[k].dtype == torch.int64, k
    assert (b["mlm_labels"] != -100).any()


def test_mlm_masks_whole_words_and_never_specials_or_padding(tokenizer):
    texts = ["unbelievable armadillos zigzagging photosynthetically", "a cat", "frogs jump over lily pads"]
    samples = [
        {
            "pixel_values": torch.zeros(3, 4, 4),
            "text": t,
            "image_key": i,
            "text_key": i,
            "sample_seed": 100 + i,
        }
        for i, t in enumerate(texts)
    ]
    collator = PretrainCollator(tokenizer, max_len=30, mlm_prob=0.5, whole_word=True)
    batch = collator(samples)
    enc = tokenizer(texts, padding="longest")
    selected_words = 0
    for i in range(len(texts)):
        words = enc.word_ids(i)
        labels = batch["mlm_labels"][i]
        for pos, w in enumerate(words):
            if w is None:  # [CLS], [SEP], [PAD]
                assert labels[pos] == -100
        for w in set(x for x in words if x is not None):
            sel = {bool(labels[p] != -100) for p, x in enumerate(words) if x == w}
            assert len(sel) == 1, (texts[i], w)  # all pieces of a word, or none
            selected_words += sel == {True}
        keep = labels == -100
        assert torch.equal(batch["mlm_input_ids"][i][keep], batch["input_ids"][i][keep])
        assert torch.equal(labels[~keep], batch["input_ids"][i][~keep])
    assert selected_words > 0
    alone = collator(samples[1:2])  # the same caption collated alone: the same mask
    n = int(alone["attention_mask"][0].sum())
    assert torch.equal(alone["mlm_labels"][0], batch["mlm_labels"][1][:n])
    assert torch.equal(alone["mlm_input_ids"][0], batch["mlm_input_ids"][1][:n])


def test_an_undecodable_image_raises_naming_the_image(corpus, tmp_path):
    store = ShardStore(tmp_path / "store")
    good = corpus.store.read_table("images").slice(0, 1).to_pylist()[0]
    bad = {**good, "image_id": "f" * 32, "uri": "broken.png", "image": b"\xff\xd8\xff\xe0 not a jpeg at all"}
    _commit(store, "ingest", "oca", "s0", {"images": to_table("images", [good, bad])})
    tid = next(iter(corpus.text_of))
    sentence = corpus.text_of[tid]
    text = {"text_id": tid, "source": "lines", "uri": "x", "text": sentence, "n_chars": len(sentence)}
    _commit(store, "ingest", "lines", "t0", {"texts": to_table("texts", [text])})
    index = make_pair_index(
        pa.table({"image_id": [good["image_id"], "f" * 32], "text_id": [tid, tid]}), "known"
    )
    ds = PairDataset(store, index, eval_transform(32, MEAN, STD))
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ImageDecodeError, match="f" * 32):
        ds[1]
    loader = DataLoader(ds, batch_size=2, num_workers=1, collate_fn=lambda s: s)
    try:  # re-raised from the worker process, not skipped
        next(iter(loader))
    except ImageDecodeError as exc:
        assert "f" * 32 in str(exc)
        # torch's re-raise leaves the exception in a reference cycle with the loader's iterator; break it so
        # the worker stops now rather than at some later garbage collection (which waits for it).
        exc.__traceback__ = None
    else:
        pytest.fail("a batch with an undecodable image was returned")
    missing = make_pair_index(pa.table({"image_id": ["0" * 32], "text_id": [tid]}), "known")
    with pytest.raises(KeyError, match="0" * 32):
        PairDataset(store, missing, eval_transform(32, MEAN, STD))


# -------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("Two ", "2"), ("The Dog!", "dog"), ("1,000", "1000"), ("t-shirt", "t shirt"), ("yes.", "yes"),
     ("dont know", "don't know"), ("2.5", "2.5"), ("an Umbrella", "umbrella"), ("red, white", "red white"),
     ("none", "0"), ("a\tcat\n", "cat")],
)  # fmt: skip
def test_normalize_answer_follows_the_official_rules(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_v2_fixture_soft_scores_and_vocab(tokenizer):
    records = read_vqa_v2(
        FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json",
        FIXTURES / "v2_mscoco_val2014_annotations.json",
    )
    assert [r.question_id for r in records] == [42000, 42001, 73000]
    r0, r1, r2 = records
    assert r0.image == "val2014/COCO_val2014_000000000042.jpg" and r2.image_id == 73
    assert r0.answers == ["2", "2", "2", "2", "3", "3", "2", "2", "4", "2"]
    assert r0.scores == pytest.approx({"2": 1.0, "3": 2 / 3, "4": 1 / 3})
    assert r1.scores == pytest.approx({"yes": 1.0, "no": 2 / 3, "maybe": 1 / 3})
    third = 1 / 3
    assert r2.scores == pytest.approx(
        {"frisbee": 1.0, "t shirt": 2 * third, "umbrella": 2 * third, "don't know": third, "1000": third}
    )
    assert (r0.answer_type, r0.multiple_choice_answer) == ("number", "2")
    assert (r2.answer_type, r2.multiple_choice_answer) == ("other", "frisbee")
    assert [soft_score(c) for c in (0, 1, 2, 3, 7)] == pytest.approx([0, 1 / 3, 2 / 3, 1, 1])
    unlabelled = read_vqa_v2(FIXTURES / "v2_OpenEnded_mscoco_val2014_questions.json")
    assert unlabelled[1].question == "Is the dog sleeping?" and unlabelled[1].scores == {}

    vocab = AnswerVocab.build(records, top_k=5)  # every answer is in one question: alphabetical
    assert vocab.answers == ["1000", "2", "3", "4", "don't know"]
    assert AnswerVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))).answers == vocab.answers
    torch.testing.assert_close(vocab.scores(r0), torch.tensor([0, 1, 2 / 3, 1 / 3, 0]))
    assert not vocab.scores(r1).any()  # answers outside the vocabulary: an all-zero row
    assert vocab.coverage(records) == pytest.approx(2 / 3)

    image = read_easy_vqa("test")[0].image  # a real picture stands in for the COCO files
    ds = VQADataset(
        records, vocab, eval_transform(32, MEAN, STD), image_loader=lambda rel: load_image_file(image)
    )
    batch = VQACollator(tokenizer, max_len=12)([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert (
        batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == batch["attention_mask"].shape
    )
    assert batch["answer_scores"].shape == (3, 5) and batch["answer_scores"].dtype == torch.float32
    torch.testing.assert_close(batch["answer_scores"][0], vocab.scores(r0))
    assert batch["question_id"].tolist() == [42000, 42001, 73000]
    broken = VQADataset(records, vocab, eval_transform(32, MEAN, STD), image_loader=load_image_file)
    with pytest.raises(RuntimeError, match="42000"):
        broken[0]


def test_easy_vqa_reader_counts():
    import easy_vqa

    answers = set(easy_vqa.get_answers())
    for split, n_questions, n_images in (("train", 38575, 4000), ("test", 9673, 1000)):
        records = read_easy_vqa(split)
        assert len(records) == n_questions
        assert len({r.image_id for r in records}) == n_images
        assert len({r.question_id for r in records}) == n_questions
        assert {r.multiple_choice_answer for r in records} <= answers
        assert all(r.scores == {r.answers[0]: 1.0} for r in records)
        assert Path(records[0].image).is_file()
    vocab = AnswerVocab.build(read_easy_vqa("test"))
    assert set(vocab.answers) == answers


def test_shared_captions_are_neither_evaluation_targets_nor_held_out(tmp_path):
    """Image a has a caption of its own and a caption shared with b; b has only the shared one."""
    store = ShardStore(tmp_path / "store")
    store.ensure_tables()
    rows = [
        {"image_id": "a", "text_id": "own-a", "source": "s", "kind": "title", "text": "a red apple"},
        {"image_id": "a", "text_id": "shared", "source": "s", "kind": "keywords", "text": "fruit, food"},
        {"image_id": "b", "text_id": "shared", "source": "s", "kind": "keywords", "text": "fruit, food"},
        {"image_id": "c", "text_id": "own-c", "source": "s", "kind": "title", "text": "a green pear"},
    ]
    _commit(store, "ingest", "s", "k0", {"known_pairs": to_table("known_pairs", rows)})
    held = heldout_split(store, 0.999999, SALT)  # every candidate is held out
    assert sorted(zip(held["image_id"].to_pylist(), held["text_id"].to_pylist(), strict=True)) == [
        ("a", "own-a"),
        ("c", "own-c"),
    ]  # b has no caption of its own; "shared" names no single image
