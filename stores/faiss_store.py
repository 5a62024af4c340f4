"""FAISS indexes on disk: ``<name>/index.faiss`` + ``ids.parquet`` (row → id) + ``meta.json``, where
``<name>`` is a link to the current version folder ``.<name>.v-*`` (a rebuild swaps the link atomically).

Vectors are L2-normalised and searched by inner product (= cosine). The index type follows the corpus size
and a memory budget (the autofaiss rule of thumb), and can be forced with ``factory``:

- fewer than ``exact_below`` vectors: ``Flat`` (exact);
- float32 vectors fit the budget: ``IVF{k},Flat`` with k ≈ 4·√n;
- otherwise ``OPQ{m},IVF{k},PQ{m}`` (m sub-quantisers of 8 bits, dim divisible by m).

Training uses a sample of at most ``train_sample`` vectors. A GPU is used when faiss-gpu is installed and a
device is visible (same API); otherwise the CPU build.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stores.failpoints import kill_point


@dataclass
class IndexMeta:
    name: str
    factory: str
    dim: int
    count: int
    metric: str = "inner_product"
    nprobe: int = 1
    built_at: float = 0.0
    seconds: float = 0.0
    signature: str = ""  # what it was built from (the flow rebuilds when this changes)


#: below this many vectors the index is exact (``Flat``). Measured on the bundled corpus's real sentence
#: embeddings (167,489 MiniLM vectors, queried by 1,273 real tag sentences, one core), exact search ran
#: 670-718 queries/s (a corpus of 13k images retrieved in about 20 s), and no approximate index reached
#: 0.95 of its recall@5 at 10x its speed: IVF2048,Flat 0.84 at nprobe 16 (16x), 0.955 at nprobe 128 (1.9x);
#: HNSW32 0.964 at efSearch 128 (3.2x). Tag-sentence queries sit among many near-tied sentences, so
#: approximate search buys little speed for much recall. Exact search costs n x dim per query (1M vectors:
#: about 120 queries/s on one core, extrapolated linearly).
EXACT_BELOW = 1_000_000


def choose_factory(
    n: int, dim: int, memory_budget_bytes: int = 4 * 2**30, exact_below: int = EXACT_BELOW
) -> str:
    """Index factory string for ``n`` vectors of ``dim`` under a memory budget: exact below ``exact_below``
    vectors while float32 vectors fit the budget, then IVF (flat lists), then OPQ + IVF + PQ."""
    fits = n * dim * 4 <= memory_budget_bytes
    if n < exact_below and fits:
        return "Flat"
    k = int(min(65536, max(16, 2 ** round(math.log2(4 * math.sqrt(n))))))
    k = min(k, max(1, n // 39))  # FAISS wants >= 39 training points per centroid
    if fits:
        return f"IVF{k},Flat"
    m = next(m for m in (64, 48, 32, 24, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim)
    return f"OPQ{m},IVF{k},PQ{m}"


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, order="C", copy=True)  # never normalise the caller's array in place
    faiss.normalize_L2(x)
    return x


def _maybe_gpu(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return faiss.index_cpu_to_all_gpus(index)
    return index


def build_index(
    vectors: np.ndarray,
    factory: str | None = None,
    train_sample: int = 262_144,
    memory_budget_bytes: int = 4 * 2**30,
    seed: int = 0,
    add_batch: int = 65_536,
) -> tuple[faiss.Index, str]:
    """Build (train + add) an inner-product index over normalised ``vectors`` [n, dim] held in memory."""
    n, dim = vectors.shape

    def batches() -> Iterator[np.ndarray]:
        for i in range(0, n, add_batch):
            yield vectors[i : i + add_batch]

    if factory is None:
        factory = choose_factory(n, dim, memory_budget_bytes)
    if n > train_sample:  # a random (not leading) sample when the vectors are all here anyway
        rng = np.random.default_rng(seed)
        sample = vectors[np.sort(rng.choice(n, train_sample, replace=False))]
    else:
        sample = vectors
    return build_index_streaming(batches, n, dim, factory, sample=sample), factory


def build_index_streaming(
    batches: Callable[[], Iterable[np.ndarray]],
    n: int,
    dim: int,
    factory: str,
    sample: np.ndarray | None = None,
    train_sample: int = 262_144,
) -> faiss.Index:
    """Build an index from a re-iterable stream of [b, dim] batches: memory ~ one batch + the training sample.

    Without ``sample`` the first ``train_sample`` vectors of the stream train the index (store files are in
    content-hash order, which is as good as random).
    """
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        if sample is None:
            parts, got = [], 0
            for b in batches():
                parts.append(np.asarray(b, dtype=np.float32)[: train_sample - got])
                got += len(parts[-1])
                if got >= train_sample:
                    break
            sample = np.concatenate(parts)
        index = _maybe_gpu(index)
        index.train(_normalise(sample))
    added = 0
    for b in batches():
        index.add(_normalise(b))
        added += len(b)
    if added != n:
        raise ValueError(f"stream gave {added} vectors, expected {n}")
    if hasattr(faiss, "index_gpu_to_cpu") and faiss.get_num_gpus() > 0:
        index = faiss.index_gpu_to_cpu(index)
    return index


class FaissStore:
    """Named indexes under ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / name

    def save(self, name: str, index: faiss.Index, ids: list[str] | np.ndarray, meta: IndexMeta) -> Path:
        """Write index, id map and meta into a new version folder, then swap it in with one atomic rename of
        the ``<name>`` link: readers see the old version or the new one, never a mix or nothing, and a kill at
        any point leaves only leftovers that the next save (or :meth:`collect_garbage`) removes."""
        if index.ntotal != len(ids):
            raise ValueError(f"index has {index.ntotal} vectors but {len(ids)} ids")
        self.collect_garbage(name)
        final = self.path(name)
        version = final.with_name(f".{name}.v-{time.time_ns()}-{os.getpid()}")
        tmp = version.with_name(version.name.replace(".v-", ".tmp-", 1))
        tmp.mkdir(parents=True)
        faiss.write_index(index, str(tmp / "index.faiss"))
        pq.write_table(
            pa.table({"row": np.arange(len(ids), dtype=np.int64), "id": pa.array(ids)}), tmp / "ids.parquet"
        )
        (tmp / "meta.json").write_text(json.dumps(asdict(meta), indent=1))
        os.replace(tmp, version)  # complete: a version folder never holds a partial index
        if final.is_dir() and not final.is_symlink():  # a store of the layout before version folders
            os.replace(final, final.with_name(f".{name}.old-{os.getpid()}"))
        link = final.with_name(f".{name}.link-{os.getpid()}")
        link.unlink(missing_ok=True)
        link.symlink_to(version.name)  # relative: the store can move
        kill_point("before-swap", name)
        os.replace(link, final)  # the swap: atomic
        self.collect_garbage(name)
        return final

    def collect_garbage(self, name: str | None = None) -> int:
        """Remove what interrupted saves left (``.<name>.tmp-*``, ``.<name>.link-*``, ``.<name>.old-*`` and
        version folders the ``<name>`` link does not point to); returns how many. Saves of one name must not
        run concurrently (the corpus flow builds each index in one task)."""
        if not self.root.exists():
            return 0
        current = {
            os.readlink(p) for p in self.root.iterdir() if p.is_symlink() and not p.name.startswith(".")
        }
        removed = 0
        for p in self.root.iterdir():
            if not p.name.startswith("."):
                continue
            base, dot, kind = p.name[1:].rpartition(".")
            if not dot or (name is not None and base != name):
                continue
            if kind.split("-")[0] in ("tmp", "old", "link", "v") and p.name not in current:
                if p.is_symlink() or p.is_file():
                    p.unlink()
                else:
                    shutil.rmtree(p)
                removed += 1
        return removed

    def load_meta(self, name: str) -> IndexMeta:
        p = self.path(name) / "meta.json"
        if not p.exists():
            raise FileNotFoundError(f"no index {name!r} under {self.root}")
        return IndexMeta(**json.loads(p.read_text()))

    def load(self, name: str) -> tuple[faiss.Index, np.ndarray, IndexMeta]:
        if not (self.path(name) / "meta.json").exists():
            raise FileNotFoundError(f"no index {name!r} under {self.root}")
        p = self.path(name).resolve()  # one version for all three files, even if a save swaps meanwhile
        meta = IndexMeta(**json.loads((p / "meta.json").read_text()))
        index = faiss.read_index(str(p / "index.faiss"))
        if "IVF" in meta.factory:  # reaches the IVF inside OPQ/PQ wrappers too (plain setattr does not)
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", meta.nprobe)
        ids = pq.read_table(p / "ids.parquet").column("id").to_numpy(zero_copy_only=False)
        return index, ids, meta

    def build_and_save(
        self,
        name: str,
        vectors: np.ndarray,
        ids: list[str] | np.ndarray,
        factory: str | None = None,
        nprobe: int = 16,
        **kw,
    ) -> IndexMeta:
        t0 = time.time()
        index, factory = build_index(vectors, factory, **kw)
        meta = IndexMeta(
            name=name,
            factory=factory,
            dim=vectors.shape[1],
            count=len(ids),
            nprobe=nprobe,
            built_at=time.time(),
            seconds=round(time.time() - t0, 3),
        )
        self.save(name, index, ids, meta)
        return meta


def search(index: faiss.Index, ids: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (ids [q, k], scores [q, k]) for ``queries`` [q, dim]; missing hits have id None."""
    scores, rows = index.search(_normalise(queries), k)
    out = np.full(rows.shape, None, dtype=object)
    ok = rows >= 0
    out[ok] = ids[rows[ok]]
    return out, scores
