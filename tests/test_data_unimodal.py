"""Image-only and text-only training data over a small real store (the ingest stage on real clip art, as in
test_data.py): held-out exclusion, determinism, lazy and bounded reads, per-sample determinism across
DataLoader workers and batch splits, and the collators (TextCollator's masks are PretrainCollator's)."""

from __future__ import annotations

import hashlib
import pickle
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from stores.shards import ShardStore, to_table
from vlp_core.corpus.images import load_rgb
from vlp_core.corpus.ingest import ingest_images, ingest_texts
from vlp_core.corpus.sources import TextRecord, build_source
from vlp_core.data import (
    ImageCollator,
    ImageDataset,
    ImageDecodeError,
    PairsConfig,
    PretrainCollator,
    ResumableSampler,
    TextCollator,
    TextDataset,
    UnimodalConfig,
    build_image_index,
    build_text_index,
    eval_transform,
    load_tokenizer,
    sample_seed,
    stable_keys,
    train_transform,
)

SALT, FRACTION = "test-salt", 0.25
MEAN = STD = (0.5, 0.5, 0.5)
TEXT_KEYS = ("input_ids", "attention_mask", "mlm_input_ids", "mlm_labels")
SENTENCES = [
    "A frog sits on a green leaf.",
    "The bird flies over the lake at dawn.",
    "Two cats sleep on a red sofa.",
    "An armadillo walks across the desert road.",
    "A lizard basks on a warm rock.",
    "The dog chases a ball in the park.",
    "A bat hangs upside down in a cave.",
    "Bison graze on the open prairie.",
    "Unbelievably colourful butterflies flutter everywhere.",
    "The elephant sprays water with its trunk.",
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
    """test_data.py's store without retrieved pairs: 24 real clip-art PNGs (two shards, plus three of them
    again as a second source, so images and captions repeat across shards) and sentences in two shards (one
    repeated, one equal to a held-out caption, so that a text source other than the images' holds one)."""
    store = ShardStore(tmp_path_factory.mktemp("store"))
    store.ensure_tables()
    src = build_source("openclipart", "oca", root=str(real.openclipart))
    units = [u for u in src.units() if u.key.endswith(".png")][:24]
    for i, chunk in enumerate([units[:12], units[12:], units[:3]]):
        source = "oca_copy" if i == 2 else "oca"
        rows = ingest_images(src.read(chunk), source, f"s{i}")
        _commit(store, "ingest", source, f"s{i}", {n: to_table(n, r) for n, r in rows.tables.items()})

    known = {(r["image_id"], r["text_id"]) for r in store.read_table("known_pairs").to_pylist()}
    owners: dict[str, set[str]] = {}
    for i, t in known:
        owners.setdefault(t, set()).add(i)
    captioned = sorted({i for i, t in known if len(owners[t]) == 1})  # images with a caption of their own
    held_images = _held(captioned)
    held_texts = {t for i, t in known if i in held_images and len(owners[t]) == 1}
    assert held_images and held_texts
    text_of = dict(zip(*store.read_table("texts", ["text_id", "text"]).to_pydict().values(), strict=True))
    held_caption = text_of[min(held_texts)]
    lines = [*SENTENCES, held_caption]
    for shard, part in (("t0", lines[:6]), ("t1", lines[5:])):  # SENTENCES[5] in both shards
        records = [TextRecord(f"lines:{shard}:{i}", s) for i, s in enumerate(part)]
        rows = ingest_texts(records, "lines", shard)
        _commit(store, "ingest", "lines", shard, {"texts": to_table("texts", rows.tables["texts"])})
    sources = store.read_table("texts", ["text_id", "source"]).to_pylist()
    line_ids = {r["text_id"] for r in sources if r["source"] == "lines"}
    assert min(held_texts) in line_ids and len(line_ids) == len(lines)  # the caption as a plain sentence
    text_of = dict(zip(*store.read_table("texts", ["text_id", "text"]).to_pydict().values(), strict=True))
    images = store.read_table("images", ["image_id", "source"]).to_pylist()
    return SimpleNamespace(
        store=store,
        images={r["image_id"] for r in images},
        copy_images={r["image_id"] for r in images if r["source"] == "oca_copy"},
        texts=set(text_of),
        line_ids=line_ids,
        text_of=text_of,
        held_images=held_images,
        held_texts=held_texts,
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _cfg(**kw) -> UnimodalConfig:
    return UnimodalConfig(**{"heldout_fraction": FRACTION, "heldout_salt": SALT, **kw})


class _ReadSpy:
    """Records the columns of every Parquet read (None = all columns)."""

    def __init__(self, monkeypatch):
        self.columns: list[list[str] | None] = []
        for owner, name in ((pq.ParquetFile, "read_row_group"), (pq.ParquetFile, "read"), (pq, "read_table")):
            original = getattr(owner, name)

            def spy(*args, _original=original, **kwargs):
                self.columns.append(kwargs.get("columns"))
                return _original(*args, **kwargs)

            monkeypatch.setattr(owner, name, spy)

    def read_any(self, column: str) -> bool:
        return any(c is None or column in c for c in self.columns)


# ---------------------------------------------------------------------------------------------- indexes


def test_config_shares_the_heldout_defaults_and_validates():
    cfg, pairs = UnimodalConfig(), PairsConfig()
    assert (cfg.heldout_fraction, cfg.heldout_salt) == (pairs.heldout_fraction, pairs.heldout_salt)
    for bad in ({"heldout_fraction": 1.0}, {"heldout_fraction": -0.1}, {"limit": 0}, {"sources": []},
                {"text_sources": "lines"}):  # fmt: skip
        with pytest.raises(ValueError):
            UnimodalConfig(**bad)


def test_image_index_is_every_image_but_the_heldout_ones(corpus):
    index = build_image_index(corpus.store, _cfg(), seed=0)
    assert index.schema.names == ["image_id", "image_key"]
    assert index.schema.field("image_key").type == pa.int64()
    ids = index["image_id"].to_pylist()
    assert len(ids) == len(set(ids))  # the images stored twice (two sources) appear once
    assert corpus.held_images <= corpus.images
    assert set(ids) == corpus.images - corpus.held_images
    np.testing.assert_array_equal(index["image_key"].to_numpy(), stable_keys(index["image_id"]))

    assert index == build_image_index(corpus.store, _cfg(), seed=0)  # deterministic
    other = build_image_index(corpus.store, _cfg(), seed=1)
    assert set(other["image_id"].to_pylist()) == set(ids) and other["image_id"].to_pylist() != ids
    limited = build_image_index(corpus.store, _cfg(limit=5), seed=0)
    assert limited["image_id"].to_pylist() == ids[:5]  # a seeded shuffle, then the first `limit`

    copy_only = build_image_index(corpus.store, _cfg(sources=["oca_copy"]), seed=0)
    assert set(copy_only["image_id"].to_pylist()) == corpus.copy_images - corpus.held_images
    with pytest.raises(ValueError, match="no_such_source"):
        build_image_index(corpus.store, _cfg(sources=["no_such_source"]), seed=0)
    # Nothing held out: every distinct image.
    everything = build_image_index(corpus.store, _cfg(heldout_fraction=0.0), seed=0)
    assert set(everything["image_id"].to_pylist()) == corpus.images


def test_text_index_is_every_sentence_but_the_heldout_captions(corpus, monkeypatch):
    reads: list[tuple[str, list[str] | None]] = []
    read_table = ShardStore.read_table

    def spy(self, table, columns=None):
        reads.append((table, columns))
        return read_table(self, table, columns)

    monkeypatch.setattr(ShardStore, "read_table", spy)
    index = build_text_index(corpus.store, _cfg(), seed=0)
    lines = build_text_index(corpus.store, _cfg(text_sources=["lines"]), seed=0)
    monkeypatch.undo()
    text_reads = [columns for table, columns in reads if table == "texts"]
    assert text_reads and all(c is not None and set(c) <= {"text_id", "source"} for c in text_reads)

    assert index.schema.names == ["text_id", "text_key"]
    assert index.schema.field("text_key").type == pa.int64()
    ids = index["text_id"].to_pylist()
    assert len(ids) == len(set(ids))  # captions stored by two sources and a repeated sentence appear once
    assert corpus.held_texts <= corpus.texts
    assert set(ids) == corpus.texts - corpus.held_texts
    np.testing.assert_array_equal(index["text_key"].to_numpy(), stable_keys(index["text_id"]))
    # A held-out caption is held out whichever source holds the sentence.
    assert set(lines["text_id"].to_pylist()) == corpus.line_ids - corpus.held_texts
    assert len(lines) == len(corpus.line_ids) - 1

    assert index == build_text_index(corpus.store, _cfg(), seed=0)  # deterministic
    other = build_text_index(corpus.store, _cfg(), seed=1)
    assert set(other["text_id"].to_pylist()) == set(ids) and other["text_id"].to_pylist() != ids
    assert build_text_index(corpus.store, _cfg(limit=4), seed=0)["text_id"].to_pylist() == ids[:4]
    with pytest.raises(ValueError, match="no_such_source"):
        build_text_index(corpus.store, _cfg(text_sources=["no_such_source"]), seed=0)


def test_indexes_do_not_depend_on_shard_layout(corpus, tmp_path):
    """The same rows in other shards, in another order: the same indexes."""
    relaid = ShardStore(tmp_path / "store")
    relaid.ensure_tables()
    for table in ("images", "texts", "known_pairs"):
        rows = corpus.store.read_table(table).to_pylist()[::-1]
        cut = len(rows) // 3
        for k, part in enumerate((rows[:cut], rows[cut:])):
            _commit(relaid, "ingest", "mixed", f"{table}{k}", {table: to_table(table, part)})
    for build in (build_image_index, build_text_index):
        assert build(relaid, _cfg(), seed=3) == build(corpus.store, _cfg(), seed=3), build.__name__


# --------------------------------------------------------------------------------------------- datasets


@pytest.fixture(scope="module")
def image_dataset(corpus):
    index = build_image_index(corpus.store, _cfg(), seed=0)
    return ImageDataset(corpus.store, index, train_transform(40, MEAN, STD, randaugment=True), seed=5)


@pytest.fixture(scope="module")
def text_dataset(corpus):
    return TextDataset(corpus.store, build_text_index(corpus.store, _cfg(), seed=0), seed=5)


def test_image_dataset_reads_images_lazily_through_the_bounded_cache(corpus, image_dataset, monkeypatch):
    index = build_image_index(corpus.store, _cfg(), seed=0)
    spy = _ReadSpy(monkeypatch)
    plain = ImageDataset(corpus.store, index, eval_transform(32, MEAN, STD), seed=5, cache_bytes=1)
    assert spy.columns and not spy.read_any("image")  # construction reads ids only, never image bytes
    assert plain._cache is None

    images = corpus.store.read_table("images", ["image_id", "image"]).to_pydict()
    jpeg_of = dict(zip(images["image_id"], images["image"], strict=True))
    tf = eval_transform(32, MEAN, STD)
    for i in range(len(plain)):
        s = plain[(0, i)]
        assert s.keys() == {"pixel_values", "image_key", "sample_seed"}
        torch.testing.assert_close(s["pixel_values"], tf(load_rgb(jpeg_of[index["image_id"][i].as_py()])))
        assert s["image_key"] == index["image_key"][i].as_py()
        assert s["sample_seed"] == sample_seed(5, 0, i)
        assert len(plain._cache.items) == 1  # the byte bound evicts all but the newest row group
    assert spy.read_any("image") and plain._cache.misses > 1
    clone = pickle.loads(pickle.dumps(plain))  # as a spawned worker receives it: no cache, same samples
    assert clone._cache is None and torch.equal(clone[(0, 1)]["pixel_values"], plain[(0, 1)]["pixel_values"])
    with pytest.raises(IndexError):
        plain[(0, len(plain))]
    # Augmentation is a function of (seed, epoch, index): same key → same crop; another epoch → another.
    a, b, c = image_dataset[(0, 3)], image_dataset[3], image_dataset[(1, 3)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["sample_seed"] == b["sample_seed"]
    assert not torch.equal(a["pixel_values"], c["pixel_values"]) and a["sample_seed"] != c["sample_seed"]


def test_image_dataset_names_missing_and_undecodable_images(corpus, tmp_path):
    store = ShardStore(tmp_path / "store")
    good = corpus.store.read_table("images").slice(0, 1).to_pylist()[0]
    bad = {**good, "image_id": "f" * 32, "uri": "broken.png", "image": b"\xff\xd8\xff\xe0 not a jpeg at all"}
    _commit(store, "ingest", "oca", "s0", {"images": to_table("images", [good, bad])})
    ids = pa.array([good["image_id"], "f" * 32])
    ds = ImageDataset(
        store, pa.table({"image_id": ids, "image_key": stable_keys(ids)}), eval_transform(32, MEAN, STD)
    )
    assert ds[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ImageDecodeError, match="f" * 32):
        ds[1]
    missing = pa.array(["0" * 32])
    with pytest.raises(KeyError, match="0" * 32):
        ImageDataset(store, pa.table({"image_id": missing, "image_key": stable_keys(missing)}), lambda x: x)


def test_text_dataset_keeps_only_the_index_sentences(corpus, monkeypatch):
    index = build_text_index(corpus.store, _cfg(limit=5), seed=2)
    spy = _ReadSpy(monkeypatch)
    ds = TextDataset(corpus.store, index, seed=7)
    assert all(c is not None and set(c) <= {"text_id", "text"} for c in spy.columns)
    assert isinstance(ds._texts, pa.StringArray) and len(ds._texts) == 5  # nothing beyond the index
    for i in range(len(ds)):
        s = ds[(2, i)]
        assert s == {
            "text": corpus.text_of[index["text_id"][i].as_py()],
            "text_key": index["text_key"][i].as_py(),
            "sample_seed": sample_seed(7, 2, i),
        }
    assert pickle.loads(pickle.dumps(ds))[(2, 4)] == ds[(2, 4)]
    with pytest.raises(IndexError):
        ds[5]
    missing = pa.array(["0" * 32])
    with pytest.raises(KeyError, match="0" * 32):
        TextDataset(corpus.store, pa.table({"text_id": missing, "text_key": stable_keys(missing)}))


def _loader_batches(dataset, collator, world, rank, workers):
    """One whole epoch (spawned workers, as in test_data.py: forking the threaded test process is unsafe)."""
    sampler = ResumableSampler(len(dataset), 4, rank=rank, world_size=world, seed=11)
    loader = DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=workers,
                        collate_fn=collator, drop_last=True,
                        multiprocessing_context="spawn" if workers else None)  # fmt: skip
    return list(loader)


def _rows(batch) -> list[dict]:
    """Per sample, without the batch's padding."""
    rows = []
    for i in range(len(batch["sample_seed"])):
        n = int(batch["attention_mask"][i].sum()) if "attention_mask" in batch else None
        rows.append({k: (v[i, :n] if k.endswith("ids") or k.endswith("labels") else v[i]) for k, v in
                     batch.items() if k != "attention_mask"})  # fmt: skip
    return rows


@pytest.mark.parametrize("kind", ["image", "text"])
def test_samples_and_masks_do_not_depend_on_workers_or_batch_split(
    kind, image_dataset, text_dataset, tokenizer
):
    if kind == "image":
        dataset, collator = image_dataset, ImageCollator()
    else:
        dataset, collator = text_dataset, TextCollator(tokenizer, max_len=24, mlm_prob=0.3, whole_word=True)
    reference = _loader_batches(dataset, collator, world=1, rank=0, workers=0)
    with_workers = _loader_batches(dataset, collator, world=1, rank=0, workers=2)
    assert len(reference) == len(with_workers) == len(dataset) // 4 >= 3
    for a, b in zip(reference, with_workers, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # Four ranks of 1 sample: text batches pad to other lengths than the global batch of 4 does.
    split = [_loader_batches(dataset, collator, world=4, rank=r, workers=0) for r in range(4)]
    for g, whole in enumerate(reference):
        parts = [row for rank in split for row in _rows(rank[g])]
        for x, y in zip(_rows(whole), parts, strict=True):
            for k in x:
                assert torch.equal(x[k], y[k]), k


# -------------------------------------------------------------------------------------------- collators


def test_text_collator_masks_are_the_pretrain_collators(tokenizer):
    texts = ["unbelievable armadillos zigzagging photosynthetically", "a cat", "frogs jump over lily pads"]
    samples = [
        {"pixel_values": torch.zeros(3, 4, 4), "text": t, "image_key": 10 + i, "text_key": 20 + i,
         "sample_seed": 100 + i}
        for i, t in enumerate(texts)
    ]  # fmt: skip
    for whole_word in (False, True):
        text = TextCollator(tokenizer, max_len=8, mlm_prob=0.5, whole_word=whole_word)
        pair = PretrainCollator(tokenizer, max_len=8, mlm_prob=0.5, whole_word=whole_word)
        tb = text([{k: s[k] for k in ("text", "text_key", "sample_seed")} for s in samples])
        pb = pair(samples)
        assert list(tb) == [*TEXT_KEYS, "text_key", "sample_seed"]
        for k, v in tb.items():
            assert v.dtype == torch.int64 and torch.equal(v, pb[k]), k
        assert tb["input_ids"].shape == (3, 8)  # truncated to max_len
        assert tb["mlm_input_ids"].shape == tb["mlm_labels"].shape == tb["attention_mask"].shape == (3, 8)
        assert (tb["mlm_labels"] != -100).any()
        assert tb["text_key"].tolist() == [20, 21, 22] and tb["sample_seed"].tolist() == [100, 101, 102]


def test_image_collator_stacks_pixels_and_keys():
    samples = [
        {"pixel_values": torch.full((3, 6, 6), float(i), dtype=torch.float64), "image_key": 2**62 + i,
         "sample_seed": 2**62 + 7 * i}
        for i in range(3)
    ]  # fmt: skip
    batch = ImageCollator()(samples)
    assert list(batch) == ["pixel_values", "image_key", "sample_seed"]
    assert batch["pixel_values"].shape == (3, 3, 6, 6) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert batch["image_key"].dtype == batch["sample_seed"].dtype == torch.int64
    assert batch["image_key"].tolist() == [2**62, 2**62 + 1, 2**62 + 2]
    assert batch["sample_seed"].tolist() == [2**62, 2**62 + 7, 2**62 + 14]
