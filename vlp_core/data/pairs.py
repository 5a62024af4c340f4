"""Image-text pairs for pre-training: which pairs (the pair index) and the samples themselves (PairDataset).

Modes of :func:`build_pair_index`:

- ``retrieved``: the weakly aligned corpus, ``retrieved_pairs`` with ``rank <= max_rank`` (µ-VLA).
- ``known``: the captions that came with the images (``known_pairs``): the paired upper bound.
- ``random``: the retrieved pairs' images and sentences with the sentences permuted (seeded): the same
  images and the same sentences as ``retrieved``, without alignment (the unaligned baseline).
- ``mixed``: ``round(paired_ratio * N)`` true (known) pairs plus ``N - that`` retrieved pairs drawn without
  replacement, ``N`` = the size of the retrieved set, so the number of samples per epoch does not change with
  the ratio. If there are fewer known pairs than requested, every known pair is used equally often (±1)
  by cycling through seeded permutations of them.

Held-out evaluation images (:func:`heldout_split`) and their evaluation captions are removed from every
mode, so retrieval evaluation never sees a pre-training image or caption. Only captions that belong to
exactly one image are evaluation captions: Open Clip Art shares many captions across hundreds of images
("gramastar" and "stars, shapes, magick, geometry" each caption 1,375 images), and such a caption has no
single right image to retrieve; holding all of them out would also remove most true pairs from training.

Keys: ``image_key`` / ``text_key`` are stable 63-bit hashes of ``image_id`` / ``text_id`` (not row numbers),
so they mean the same image or sentence in any index built from the same store, whatever the mode, limit or
seed; ITC uses them as ``ids`` (pairs with the same image are not each other's negatives).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from stores.shards import ShardStore
from vlp_core.data.sampler import sample_seed
from vlp_core.corpus.images import load_rgb

__all__ = [
    "MODES",
    "ImageDecodeError",
    "PairDataset",
    "PairsConfig",
    "build_pair_index",
    "heldout_split",
    "make_pair_index",
    "stable_keys",
]

MODES = ("retrieved", "known", "random", "mixed")
_KEY_MASK = (1 << 63) - 1
_PAIR_COLUMNS = ["image_id", "text_id"]


@dataclass
class PairsConfig:
    """Which image-text pairs a pre-training run sees.

    Attributes:
        mode: ``retrieved`` | ``known`` | ``random`` | ``mixed`` (see the module docstring).
        paired_ratio: mixed mode: fraction of the samples that are true (known) pairs, in [0, 1].
        sources: image sources (the ``source`` column of ``images``) whose images are used; ``None``: all.
        max_rank: retrieved pairs with ``rank <= max_rank`` (1 = best).
        heldout_fraction: fraction of the captioned images held out for evaluation, in [0, 1).
        heldout_salt: salt of the held-out hash; change it to draw a different held-out set.
        limit: keep at most this many pairs (a seeded shuffle, then the first ``limit``), for small runs.
    """

    mode: str = "retrieved"
    paired_ratio: float = 0.0
    sources: list[str] | None = None
    max_rank: int = 5
    heldout_fraction: float = 0.1
    heldout_salt: str = "heldout-v1"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} not in {MODES}")
        if not 0.0 <= self.paired_ratio <= 1.0:
            raise ValueError(f"paired_ratio {self.paired_ratio} outside [0, 1]")
        if self.max_rank < 1:
            raise ValueError(f"max_rank {self.max_rank} < 1")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction {self.heldout_fraction} outside [0, 1)")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit {self.limit} < 1")


# ----------------------------------------------------------------------------------------- keys and hashes


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def stable_keys(ids: Iterable[str] | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``(N,)`` int64 keys: a 63-bit BLAKE2b hash of each id string (equal ids → equal keys).

    The ids are content hashes already; hashing them again makes keys from any string and keeps them
    non-negative. A collision between two distinct ids has probability ~N²/2⁶⁴ (negligible).
    """
    if isinstance(ids, pa.ChunkedArray | pa.Array):
        ids = ids.to_pylist()
    ids = list(ids)
    uniq = {s: _hash64(s) & _KEY_MASK for s in dict.fromkeys(ids)}
    return np.fromiter((uniq[s] for s in ids), dtype=np.int64, count=len(ids))


def _unit_interval(salt: str, image_id: str) -> float:
    """Salted hash of an id mapped to [0, 1): independent of every other id, so the held-out set of an
    image never changes when the corpus grows."""
    return _hash64(f"{salt}\0{image_id}") / 2.0**64


def _as_store(store: ShardStore | str | Path) -> ShardStore:
    return store if isinstance(store, ShardStore) else ShardStore(store)


def _distinct_sorted(table: pa.Table, columns: list[str]) -> pa.Table:
    """Distinct rows of ``columns``, sorted by them (shards may repeat rows; file order is not meaningful)."""
    t = table.select(columns).group_by(columns).aggregate([])
    return t.sort_by([(c, "ascending") for c in columns])


def _not_in(table: pa.Table, column: str, values: set[str]) -> pa.Table:
    if not values:
        return table
    mask = pc.invert(pc.is_in(table[column], value_set=pa.array(sorted(values), pa.string())))
    return table.filter(mask)


def _only_in(table: pa.Table, column: str, values: set[str]) -> pa.Table:
    return table.filter(pc.is_in(table[column], value_set=pa.array(sorted(values), pa.string())))


# ------------------------------------------------------------------------------------------- the index


def heldout_split(store: ShardStore | str | Path, fraction: float, salt: str = "heldout-v1") -> pa.Table:
    """The held-out evaluation set: images with a caption of their own, hash below ``fraction``.

    A caption is *unique* when it is the known caption of exactly one image. Candidates are the images with
    at least one unique caption; an image is held out iff ``blake2b(salt, image_id) / 2**64 < fraction``, a
    property of the image alone (adding sources never moves an image in or out, unless a caption stops being
    unique). Shared captions are not evaluation targets and are not held out.

    Returns:
        a table ``(image_id, text_id, text)``, one row per (held-out image, unique caption), sorted.
    """
    kp = _as_store(store).read_table("known_pairs", ["image_id", "text_id", "text"])
    empty = pa.table(
        {"image_id": pa.array([], pa.string()), "text_id": pa.array([], pa.string()),
         "text": pa.array([], pa.string())}
    )  # fmt: skip
    if fraction <= 0 or kp.num_rows == 0:
        return empty
    kp = _distinct_sorted(kp, ["image_id", "text_id", "text"])
    counts = pc.value_counts(kp["text_id"]).to_pylist()
    unique = {c["values"] for c in counts if c["counts"] == 1}
    kp = _only_in(kp, "text_id", unique)
    image_ids = pc.unique(kp["image_id"]).to_pylist()
    held = {i for i in image_ids if _unit_interval(salt, i) < fraction}
    return _distinct_sorted(_only_in(kp, "image_id", held), ["image_id", "text_id", "text"])


def make_pair_index(pairs: pa.Table, origin: str | Iterable[str]) -> pa.Table:
    """Add ``image_key``, ``text_key`` and ``origin`` to an ``(image_id, text_id)`` table: the index format
    :class:`PairDataset` reads (also for evaluation sets, e.g. the rows of :func:`heldout_split`)."""
    n = pairs.num_rows
    origins = pa.array([origin] * n if isinstance(origin, str) else list(origin), pa.string())
    if len(origins) != n:
        raise ValueError(f"{len(origins)} origins for {n} pairs")
    return pa.table(
        {
            "image_id": pairs["image_id"].combine_chunks().cast(pa.string()),
            "text_id": pairs["text_id"].combine_chunks().cast(pa.string()),
            "image_key": pa.array(stable_keys(pairs["image_id"]), pa.int64()),
            "text_key": pa.array(stable_keys(pairs["text_id"]), pa.int64()),
            "origin": origins,
        }
    )


def _allowed_images(store: ShardStore, sources: list[str] | None) -> set[str] | None:
    """Image ids found in any of ``sources`` (``None``: no restriction). Reads two small columns only."""
    if sources is None:
        return None
    images = store.read_table("images", ["image_id", "source"])
    present = set(pc.unique(images["source"]).to_pylist())
    missing = sorted(set(sources) - present)
    if missing:
        raise ValueError(f"image sources {missing} have no images in the store; present: {sorted(present)}")
    return set(_only_in(images, "source", set(sources))["image_id"].to_pylist())


def _filter_pairs(pairs: pa.Table, allowed: set[str] | None, held_images: set[str], held_texts: set[str]):
    if allowed is not None:
        pairs = _only_in(pairs, "image_id", allowed)
    return _not_in(_not_in(pairs, "image_id", held_images), "text_id", held_texts)


def build_pair_index(store: ShardStore | str | Path, cfg: PairsConfig, seed: int = 0) -> pa.Table:
    """The pre-training pairs of ``cfg.mode`` (see the module docstring), held-out data removed.

    Deterministic given the store contents, ``cfg`` and ``seed`` (inputs are de-duplicated and sorted before
    any seeded step, so shard layout and file order do not matter).

    Returns:
        a table with columns ``image_id`` (string), ``text_id`` (string), ``image_key`` (int64),
        ``text_key`` (int64) and ``origin`` (``known`` | ``retrieved`` | ``random``), one row per sample.

    Raises:
        ValueError: when the mode finds no pairs (e.g. the retrieve stage has not run), or ``mixed`` asks for
            true pairs and there are none.
    """
    store = _as_store(store)
    rng = np.random.default_rng(sample_seed(seed, 0, _hash64(f"pairs:{cfg.mode}") & _KEY_MASK))
    held = heldout_split(store, cfg.heldout_fraction, cfg.heldout_salt)
    held_images = set(held["image_id"].to_pylist())
    held_texts = set(held["text_id"].to_pylist())
    allowed = _allowed_images(store, cfg.sources)

    def retrieved() -> pa.Table:
        rp = store.read_table("retrieved_pairs", ["image_id", "text_id", "rank"])
        rp = rp.filter(pc.less_equal(rp["rank"], cfg.max_rank))
        rp = _distinct_sorted(_filter_pairs(rp, allowed, held_images, held_texts), _PAIR_COLUMNS)
        if rp.num_rows == 0:
            raise ValueError("no retrieved pairs left (has the retrieve stage run? are all images held out?)")
        return rp

    def known() -> pa.Table:
        kp = store.read_table("known_pairs", _PAIR_COLUMNS)
        return _distinct_sorted(_filter_pairs(kp, allowed, held_images, held_texts), _PAIR_COLUMNS)

    if cfg.mode == "retrieved":
        index = make_pair_index(retrieved(), "retrieved")
    elif cfg.mode == "known":
        kp = known()
        if kp.num_rows == 0:
            raise ValueError("no known pairs left outside the held-out set")
        index = make_pair_index(kp, "known")
    elif cfg.mode == "random":
        rp = retrieved()
        shuffled = rp["text_id"].take(pa.array(rng.permutation(rp.num_rows)))
        index = make_pair_index(pa.table({"image_id": rp["image_id"], "text_id": shuffled}), "random")
    else:  # mixed
        rp = retrieved()
        n = rp.num_rows
        n_true = round(cfg.paired_ratio * n)
        parts = []
        if n_true:
            kp = known()
            if kp.num_rows == 0:
                raise ValueError(f"mixed mode wants {n_true} true pairs but no known pairs are left")
            reps = -(-n_true // kp.num_rows)
            cycle = np.concatenate([rng.permutation(kp.num_rows) for _ in range(reps)])[:n_true]
            parts.append(make_pair_index(kp.take(pa.array(cycle)), "known"))
        keep = np.sort(rng.choice(n, size=n - n_true, replace=False))
        parts.append(make_pair_index(rp.take(pa.array(keep, pa.int64())), "retrieved"))
        index = pa.concat_tables(parts)

    order = rng.permutation(index.num_rows)
    if cfg.limit is not None:
        order = order[: cfg.limit]
    return index.take(pa.array(order, pa.int64()))


# ----------------------------------------------------------------------------------------- the dataset


class ImageDecodeError(RuntimeError):
    """A stored image cannot be decoded. The ingest stage writes only JPEGs it has decoded and re-encoded,
    so this means the store is damaged; the message names the image and where it is stored."""


def _table_files(store: ShardStore, table: str) -> list[Path]:
    return store.committed_files(table)


def _locate(
    files: list[Path], key: str, wanted: pa.Array, columns: list[str] | None = None
) -> tuple[np.ndarray, list[tuple[np.ndarray, pa.Table]]]:
    """Find each id of ``wanted`` (distinct strings) in the ``key`` column of ``files``, one row group at a
    time (memory: one row group's ``key`` (+ ``columns``) at a time). The first occurrence in file order wins.
    One dict lookup per stored row: the cost grows with the table, not with tables × wanted ids.

    Returns:
        ``loc``: ``(len(wanted), 3)`` int64 ``(file, row group, row in group)``, -1 where not found;
        ``found``: ``[(slots, rows)]``, the ``columns`` of the rows found (when ``columns`` is given).
    """
    slot_of = {s: i for i, s in enumerate(wanted.to_pylist())}
    loc = np.full((len(wanted), 3), -1, dtype=np.int64)
    found: list[tuple[np.ndarray, pa.Table]] = []
    for fi, path in enumerate(files):
        pf = pq.ParquetFile(path)
        try:
            for rg in range(pf.num_row_groups):
                part = pf.read_row_group(rg, columns=[key, *(columns or [])])
                ids = part[key].to_pylist()
                slot = np.fromiter((slot_of.get(x, -1) for x in ids), dtype=np.int64, count=len(ids))
                rows = np.flatnonzero(slot >= 0)
                if not len(rows):
                    continue
                slots = slot[rows]
                slots, first = np.unique(slots, return_index=True)  # an id twice in one row group
                rows = rows[first]
                new = loc[slots, 0] < 0
                slots, rows = slots[new], rows[new]
                loc[slots] = np.stack([np.full_like(rows, fi), np.full_like(rows, rg), rows], axis=1)
                if columns:
                    found.append((slots, part.select(columns).take(pa.array(rows, pa.int64()))))
        finally:
            pf.close()
    return loc, found


def _distinct_ids(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    uniq = pc.unique(column)
    return (uniq.combine_chunks() if isinstance(uniq, pa.ChunkedArray) else uniq).cast(pa.string())


def _positions(column: pa.ChunkedArray | pa.Array, uniq: pa.Array) -> np.ndarray:
    """``(N,)`` int32 position of each value of ``column`` in ``uniq`` (every value must be there)."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.index_in(col.cast(pa.string()), value_set=uniq).to_numpy().astype(np.int32)


def _missing(kind: str, wanted: pa.Array, loc: np.ndarray, index: str = "pair index") -> None:
    miss = np.flatnonzero(loc[:, 0] < 0)
    if len(miss):
        examples = [wanted[int(i)].as_py() for i in miss[:3]]
        raise KeyError(f"{len(miss)} {kind} of the {index} are not in the store, e.g. {examples}")


def _read_sentences(
    store: ShardStore, text_ids: pa.ChunkedArray | pa.Array, index: str = "pair index"
) -> tuple[pa.Array, np.ndarray]:
    """The sentences of ``text_ids``, each stored once: ``(texts, rows)`` with ``texts`` one Arrow string
    array of the distinct ids' ``text`` (read from ``texts`` one row group at a time) and ``rows`` the
    ``(N,)`` int32 position of each id of ``text_ids`` in it. KeyError if a sentence is not stored."""
    uniq_texts = _distinct_ids(text_ids)
    text_loc, found = _locate(_table_files(store, "texts"), "text_id", uniq_texts, ["text"])
    _missing("sentences", uniq_texts, text_loc, index)
    if found:
        slots = np.concatenate([s for s, _ in found])
        texts = pa.concat_arrays([t["text"].combine_chunks() for _, t in found])
        by_slot = texts.take(pa.array(np.argsort(slots), pa.int64()))
    else:
        by_slot = pa.array([], pa.string())
    return by_slot, _positions(text_ids, uniq_texts)


def _split_key(key: tuple[int, int] | int, n: int) -> tuple[int, int]:
    """A sampler key ``(epoch, index)`` (a plain int: epoch 0) → ``(epoch, index)``; IndexError outside."""
    epoch, index = key if isinstance(key, tuple) else (0, key)
    index = int(index)
    if not 0 <= index < n:
        raise IndexError(f"index {index} outside [0, {n})")
    return epoch, index


class _RowGroupCache:
    """LRU of row groups' JPEG columns, bounded by their size in bytes (at least one row group is kept).

    Parquet cannot read a single row of a row group, so a miss reads the row group's ``image`` column and
    later hits on any of its images are free. With the ingest defaults a row group is one shard (≤ 500
    images, a few MB to ~20 MB of JPEGs).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple[int, int], load: Callable[[], pa.Array]) -> pa.Array:
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        value = load()
        self.items[key] = value
        self.nbytes += value.nbytes
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes
        return value


class _StoredImages(Dataset):
    """Lazy JPEG reads of an index's images from the ``images`` table (shared by :class:`PairDataset` and the
    unimodal ``ImageDataset``): an ``image_id → (file, row group, row)`` locator built from the ``image_id``
    column only, and a per-process LRU of row groups' JPEGs, bounded by ``cache_bytes``. A subclass calls
    :meth:`_init_images` in its constructor and sets ``transform`` for :meth:`_pixels`."""

    def _init_images(
        self, store: ShardStore, image_ids: pa.ChunkedArray | pa.Array, cache_bytes: int, index: str
    ) -> None:
        """Distinct ids → where they are stored; rows of the index point at the distinct ids. No image
        bytes are read here."""
        self.cache_bytes = int(cache_bytes)
        uniq_images = _distinct_ids(image_ids)
        self._row_image = _positions(image_ids, uniq_images)
        self._files = [str(p) for p in _table_files(store, "images")]
        self._image_ids = uniq_images
        self._image_loc, _ = _locate([Path(f) for f in self._files], "image_id", uniq_images)
        _missing("images", uniq_images, self._image_loc, index)
        self._cache: _RowGroupCache | None = None
        self._pid = -1

    def _row_group_images(self, file: int, row_group: int) -> pa.Array:
        pf = pq.ParquetFile(self._files[file])
        try:
            return pf.read_row_group(row_group, columns=["image"])["image"].combine_chunks()
        finally:
            pf.close()

    def image_bytes(self, index: int) -> bytes:
        """The stored JPEG of row ``index``'s image, through this process's cache."""
        if self._pid != os.getpid():  # a new (forked) worker: never share the parent's cache
            self._cache, self._pid = _RowGroupCache(self.cache_bytes), os.getpid()
        file, rg, row = (int(v) for v in self._image_loc[self._row_image[index]])
        column = self._cache.get((file, rg), lambda: self._row_group_images(file, rg))
        return column[row].as_py()

    def load_image(self, index: int):
        """Row ``index``'s image as a PIL RGB image; :class:`ImageDecodeError` if it cannot be decoded."""
        data = self.image_bytes(index)
        try:
            return load_rgb(data)
        except Exception as exc:  # any decoder failure is a damaged store; say which image, where
            u = int(self._row_image[index])
            file, rg, row = (int(v) for v in self._image_loc[u])
            raise ImageDecodeError(
                f"image {self._image_ids[u].as_py()} (index row {index}; {self._files[file]}, "
                f"row group {rg}, row {row}, {len(data)} bytes) cannot be decoded: "
                f"{type(exc).__name__}: {exc}. The ingest stage stores only decodable JPEGs, so this shard "
                "is damaged: drop it and re-run ingest."
            ) from exc

    def _pixels(self, index: int, seed: int) -> torch.Tensor:
        """Row ``index``'s image through ``self.transform`` under ``torch.manual_seed(seed)`` in
        ``fork_rng``: the augmentation does not depend on the worker, the rank or the batch."""
        image = self.load_image(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_pid"] = None, -1  # caches are per process
        return state


class PairDataset(_StoredImages):
    """Map-style pre-training samples of a pair index, keyed by the sampler's ``(epoch, index)``.

    At construction (in the main process) it reads only the ``image_id`` column of the ``images`` files to
    build an ``image_id → (file, row group, row)`` locator, and the ``text`` of the index's sentences from
    ``texts`` (one row group at a time; kept as one Arrow string array, shared copy-on-write by forked
    DataLoader workers). No image bytes are read in the main process.

    Each worker process reads JPEGs lazily through its own LRU cache of row groups, bounded by
    ``cache_bytes`` (default 256 MiB): host memory for images is about ``cache_bytes × (num_workers + 1)``.
    A cache at least as large as the ``images`` table (~70 MB for all of Open Clip Art) reads each row
    group once per worker; with a much larger corpus most samples miss and each miss reads a whole row group,
    so then ingest with smaller shards or give the workers more cache.

    ``__getitem__((epoch, index))`` returns ``{"pixel_values": (3, S, S) float32, "text": str,
    "image_key": int, "text_key": int, "sample_seed": int}``; ``sample_seed = sample_seed(seed, epoch,
    index)`` and ``transform`` runs under ``torch.manual_seed(sample_seed)`` inside ``fork_rng``, so the
    augmentation does not depend on the worker, the rank or the batch. A plain int key means epoch 0.

    Raises:
        KeyError: at construction, if an image or sentence of the index is missing from the store.
        ImageDecodeError: when a stored JPEG cannot be decoded (never skipped silently: the ingest stage only
            writes decodable JPEGs, so a bad one means a damaged store).
    """

    def __init__(
        self,
        store: ShardStore | str | Path,
        index: pa.Table,
        transform: Callable[[Any], torch.Tensor],
        seed: int = 0,
        *,
        cache_bytes: int = 256 * 2**20,
    ):
        store = _as_store(store)
        self.transform = transform
        self.seed = int(seed)
        self.image_keys = index["image_key"].to_numpy().astype(np.int64)
        self.text_keys = index["text_key"].to_numpy().astype(np.int64)
        self._init_images(store, index["image_id"], cache_bytes, "pair index")
        # Sentences: only those of the index, each stored once (rows point at them).
        self._texts, self._row_text = _read_sentences(store, index["text_id"])

    def __len__(self) -> int:
        return len(self.image_keys)

    # -- samples
    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = _split_key(key, len(self))
        seed = sample_seed(self.seed, epoch, index)
        return {
            "pixel_values": self._pixels(index, seed),
            "text": self._texts[int(self._row_text[index])].as_py(),
            "image_key": int(self.image_keys[index]),
            "text_key": int(self.text_keys[index]),
            "sample_seed": seed,
        }
