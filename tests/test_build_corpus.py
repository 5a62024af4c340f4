"""The build-corpus flow against the session's real Prefect server: bad input, incremental re-runs, and a
SIGKILL midway that resumes to the same tables as an uninterrupted run."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from conftest import link_fetched

from stores.catalog import connect
from stores.schemas import CORPUS_TABLES
from stores.shards import ShardStore
from vlp_core.paths import REPO_ROOT, DataLayout


def _corpus_dir(real: DataLayout, root: Path, n_images: int) -> Path:
    """n real clip-art PNGs (with their SVGs) + bad files + a text file with bad lines."""
    oca = root / "oca"
    pngs = sorted((real.openclipart / "png" / "animals").rglob("*.png"))[:n_images]
    for p in pngs:
        rel = p.relative_to(real.openclipart / "png")
        (oca / "png" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, oca / "png" / rel)
        svg = real.openclipart / "svg" / rel.with_suffix(".svg")
        if svg.exists():
            (oca / "svg" / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(svg, (oca / "svg" / rel).with_suffix(".svg"))
    bad = oca / "png" / "bad"
    bad.mkdir(parents=True)
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.png").write_text("not an image at all")
    (bad / "truncated.png").write_bytes(pngs[0].read_bytes()[:300])
    shutil.copy(
        real.openclipart / "png" / "signs_and_symbols" / "_italy__lauris_kaplinski_01.png", bad
    )  # 3×2
    (oca / "svg" / "bad").mkdir(parents=True)
    (oca / "svg" / "bad" / "notes.svg").write_text("<svg><metadata>unclosed")
    text = root / "text.txt"
    text.write_bytes(b"A dog sleeps on a red sofa.\n\n\xff\xfe broken bytes\n" + b"word " * 400 + b"\nOk.\n")
    return root


def _config(root: Path, **extra) -> Path:
    cfg = {
        "sources": [
            {"name": "oca", "kind": "openclipart", "options": {"root": str(root / "oca")}},
            {"name": "txt", "kind": "lines", "options": {"paths": str(root / "text.txt")}},
        ],
        "ingest": {"image_shard_size": 10, "max_chars": 300},
        "runner": {"kind": "thread", "max_workers": 1},
        **extra,
    }
    path = root / "corpus.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bad_inputs_become_reject_rows_and_reruns_are_incremental(prefect_stack, real, data_dir, tmp_path):
    from flows.build_corpus import build_corpus

    root = _corpus_dir(real, tmp_path, 25)
    result = build_corpus(config=str(_config(root)))
    assert result["counts"]["ingest"]["images"] == 25
    con = connect(data_dir.catalog)
    reasons = dict(con.execute("select reason, n from rejects_by_reason").fetchall())
    assert reasons == {
        "empty_file": 1,
        "not_an_image": 1,
        "truncated": 1,
        "too_small": 1,
        "svg_metadata_unreadable": 1,
        "invalid_utf8": 1,
        "too_long": 1,
    }
    texts = [r[0] for r in con.execute("select text from texts where source = 'txt' order by uri").fetchall()]
    assert texts == ["A dog sleeps on a red sofa.", "Ok."]
    n_pairs = con.execute("select count(*) from known_pairs").fetchone()[0]
    assert n_pairs >= 25  # every clip-art image here has at least a title
    con.close()

    again = build_corpus(config=str(_config(root)))
    assert again["counts"]["ingest"].get("shards", 0) == 0  # nothing new: every shard skipped

    new = root / "oca" / "png" / "new"
    new.mkdir()
    for p in sorted((real.openclipart / "png" / "food").rglob("*.png"))[:3]:
        shutil.copy(p, new)
    more = build_corpus(config=str(_config(root)))
    assert more["counts"]["ingest"]["inputs"] == 3 and more["counts"]["ingest"]["images"] == 3


def _table_rows(layout: DataLayout, table: str, drop: tuple[str, ...] = ()) -> list[dict]:
    t = ShardStore(layout.store).read_table(table)
    t = t.drop_columns([c for c in drop if c in t.column_names])
    keys = [(c, "ascending") for c in t.column_names if not pa.types.is_nested(t.schema.field(c).type)]
    return t.take(pc.sort_indices(t, sort_keys=keys)).to_pylist()


def test_sigkill_midway_resumes_to_identical_tables(prefect_stack, real, tmp_path, monkeypatch):
    from flows.build_corpus import build_corpus

    root = _corpus_dir(real, tmp_path, 120)
    cfg = _config(root)
    killed = DataLayout(tmp_path / "killed")
    env = {**os.environ, "VLP_DATA_DIR": str(killed.root)}
    code = f"from flows.build_corpus import build_corpus; build_corpus(config={str(cfg)!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    manifests = killed.store / "_manifests" / "ingest" / "oca"
    t0 = time.time()
    while len(list(manifests.glob("*.json"))) < 3:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < 180, "no shard committed within 180 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_done = len(list(manifests.glob("*.json")))
    assert n_done < 13, "killed too late to test a resume"

    monkeypatch.setenv("VLP_DATA_DIR", str(killed.root))
    resumed = build_corpus(config=str(cfg))
    assert resumed["counts"]["ingest"]["shards"] < 14  # only the unfinished shards ran again

    clean = DataLayout(tmp_path / "clean")
    monkeypatch.setenv("VLP_DATA_DIR", str(clean.root))
    build_corpus(config=str(cfg))

    for table, volatile in (
        ("images", ()),
        ("texts", ()),
        ("known_pairs", ()),
        ("rejects", ("rejected_at", "shard")),
    ):
        a, b = _table_rows(killed, table, volatile), _table_rows(clean, table, volatile)
        assert len(a) == len(b) and a == b, table
    assert len(_table_rows(clean, "images")) == 120


def _all_stages_config(real: DataLayout, root: Path) -> Path:
    """Every stage, ingest to ground, over 24 clip-art images and their titles, in shards small enough that
    each sharded stage has several."""
    from vlp_core.config import STAGES

    return _config(
        _corpus_dir(real, root, 24), stages=list(STAGES), regions={"shard_size": 8}, embed={"shard_size": 16},
        retrieve={"shard_size": 8, "top_k": 3}, link={"shard_size": 8}, gallery={"min_score": 0.0},
        ground={"shard_size": 16},
    )  # fmt: skip


def _build_in_subprocess(layout: DataLayout, cfg: Path, kill_at: str | None = None) -> int:
    env = {**os.environ, "VLP_DATA_DIR": str(layout.root)}
    env.pop("VLP_KILL_AT", None)
    if kill_at:
        env["VLP_KILL_AT"] = kill_at
    code = f"from flows.build_corpus import build_corpus; build_corpus(config={str(cfg)!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    if proc.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc.returncode


def _store_bytes(layout: DataLayout) -> dict[str, object]:
    """Every committed data file of the store by name (rejects as rows without their timestamp), plus the
    FAISS index and its id map."""
    store = ShardStore(layout.store)
    out: dict[str, object] = {}
    for table in CORPUS_TABLES:
        if table == "rejects":
            out[table] = _table_rows(layout, table, ("rejected_at",))
            continue
        for f in store.committed_files(table):
            out[str(f.relative_to(layout.store))] = f.read_bytes()
    for name in ("index.faiss", "ids.parquet"):
        out[name] = (layout.indexes / "sentences" / name).read_bytes()
    return out


@pytest.fixture(scope="module")
def all_stages_build(prefect_stack, real, tmp_path_factory):
    """An uninterrupted build of every stage (in this process) and its config."""
    from flows.build_corpus import build_corpus

    root = tmp_path_factory.mktemp("all-stages")
    cfg = _all_stages_config(real, root / "input")
    clean = DataLayout(root / "clean")
    clean.root.mkdir()
    link_fetched(clean.root)
    previous = os.environ["VLP_DATA_DIR"]
    os.environ["VLP_DATA_DIR"] = str(clean.root)
    try:
        build_corpus(config=str(cfg))
    finally:
        os.environ["VLP_DATA_DIR"] = previous
    empty = [t for t in CORPUS_TABLES if ShardStore(clean.store).read_table(t).num_rows == 0]
    assert not empty, f"the comparisons below would not see these tables: {empty}"
    return clean, cfg


def test_sigkill_inside_every_stage_resumes_to_identical_tables(all_stages_build, tmp_path):
    """One build killed once inside each stage in turn (a shard's files renamed into place, its manifest not
    yet written; the index's new version on disk, not yet swapped in), resumed each time: every table equals
    the uninterrupted build's exactly (sorted rows, every column but the rejects' timestamp), and so do the
    FAISS index and its ids."""
    from vlp_core.config import STAGES

    clean, cfg = all_stages_build
    n_shards = {stage: len(list((clean.store / "_manifests" / stage).rglob("*.json"))) for stage in STAGES}
    killed = DataLayout(tmp_path / "killed")
    killed.root.mkdir()
    link_fetched(killed.root)
    for stage in STAGES:
        if stage == "index":
            spec = "before-swap:sentences:1"
        else:
            assert n_shards[stage] >= 1, stage
            spec = f"before-manifest:{stage}:{min(2, n_shards[stage])}"
        assert _build_in_subprocess(killed, cfg, spec) == -signal.SIGKILL, f"not killed in {stage}"
        done = len(list((killed.store / "_manifests" / stage).rglob("*.json")))
        assert done < max(n_shards[stage], 1), f"{stage}: killed after the stage had finished"
    assert _build_in_subprocess(killed, cfg) == 0
    for table in CORPUS_TABLES:  # rows first: a failure names the table
        rows = [_table_rows(layout, table, ("rejected_at",)) for layout in (killed, clean)]
        assert rows[0] == rows[1], table
    a, b = _store_bytes(killed), _store_bytes(clean)
    assert a == b  # the same data files, byte for byte, and the same index


def test_any_shard_rebuilt_alone_in_a_fresh_process_gives_the_same_bytes(all_stages_build, tmp_path):
    """One shard of every stage dropped (and the index removed), then rebuilt by a fresh process: the same
    bytes as the uninterrupted build, although each shard now runs without the others around it."""
    from stores.faiss_store import FaissStore

    clean, cfg = all_stages_build
    copy = DataLayout(tmp_path / "copy")
    shutil.copytree(clean.root, copy.root, symlinks=True)
    store = ShardStore(copy.store)
    dropped = []
    for mdir in sorted((copy.store / "_manifests").glob("*/*")):
        shard = sorted(mdir.glob("*.json"))[-1].stem
        store.drop(mdir.parent.name, mdir.name, shard)
        dropped.append((mdir.parent.name, mdir.name, shard))
    shutil.rmtree(FaissStore(copy.indexes).path("sentences").resolve())
    (copy.indexes / "sentences").unlink()
    stages = {stage for stage, _, _ in dropped}
    assert stages >= {"ingest", "regions", "embed", "retrieve", "phrases", "links", "gallery", "ground"}
    assert _build_in_subprocess(copy, cfg) == 0
    for stage, source, shard in dropped:
        assert store.is_committed(stage, source, shard), (stage, shard)  # the same shard key again
    assert _store_bytes(copy) == _store_bytes(clean)


def test_embed_and_index_stages_are_incremental(prefect_stack, real, data_dir, tmp_path):
    from flows.build_corpus import build_corpus
    from stores.faiss_store import FaissStore, search
    from vlp_core.corpus.stages import sentence_encoder

    root = _corpus_dir(real, tmp_path, 12)
    cfg = str(_config(root, stages=["ingest", "embed", "index"], embed={"shard_size": 16}))
    first = build_corpus(config=cfg)
    con = connect(data_dir.catalog)
    n_texts = con.execute("select count(*) from texts").fetchone()[0]
    con.close()
    assert first["counts"]["embed"]["embedded"] == n_texts > 12
    assert first["counts"]["index"] == {"index_vectors": n_texts, "index_rebuilt": 1}

    index, ids, meta = FaissStore(data_dir.indexes).load("sentences")
    assert meta.factory == "Flat" and index.ntotal == n_texts and len(set(ids)) == n_texts
    enc = sentence_encoder(None, None, 128)
    hits, scores = search(index, ids, enc.encode(["A dog sleeps on a red sofa."]), k=3)
    con = connect(data_dir.catalog)
    top = con.execute("select text from texts where text_id = ?", [hits[0, 0]]).fetchone()[0]
    con.close()
    assert top == "A dog sleeps on a red sofa." and scores[0, 0] > 0.99

    again = build_corpus(config=cfg)
    assert again["counts"]["embed"].get("shards", 0) == 0 and again["counts"]["index"]["index_rebuilt"] == 0

    with open(root / "text.txt", "ab") as f:
        f.write(b"A brand new sentence about a zebra.\n")
    more = build_corpus(config=cfg)
    assert more["counts"]["embed"]["embedded"] == 1
    assert more["counts"]["index"] == {"index_vectors": n_texts + 1, "index_rebuilt": 1}


def test_regions_retrieval_phrases_links(prefect_stack, real, data_dir, tmp_path):
    from PIL import Image
    from skimage import data as skdata

    from flows.build_corpus import build_corpus
    from vlp_core.config import STAGES

    photos = tmp_path / "photos" / "photo"
    photos.mkdir(parents=True)
    for name in ("chelsea", "coffee", "motorcycle_left"):
        arr = getattr(skdata, name)() if name != "motorcycle_left" else skdata.stereo_motorcycle()[0]
        Image.fromarray(arr).save(photos / f"{name}.png")
    root = _corpus_dir(real, tmp_path, 6)
    (tmp_path / "captions.txt").write_text(
        "A tabby cat is sleeping on the sofa.\nA cup of hot espresso coffee on a saucer.\n"
        "A man rides a motor scooter down the street.\nThe stock market fell sharply on Monday.\n"
    )
    cfg = {
        "sources": [
            {"name": "oca", "kind": "openclipart", "options": {"root": str(root / "oca")}},
            {"name": "photos", "kind": "image_dir", "options": {"root": str(tmp_path / "photos")}},
            {"name": "captions", "kind": "lines", "options": {"paths": str(tmp_path / "captions.txt")}},
        ],
        "stages": list(STAGES),  # every stage, ingest to ground
        "regions": {"shard_size": 4},
        "gallery": {"min_score": 0.0},
        "retrieve": {"top_k": 3},
    }
    path = tmp_path / "regions.yaml"
    path.write_text(yaml.safe_dump(cfg))
    first = build_corpus(config=str(path))
    con = connect(data_dir.catalog)
    n_images = con.execute("select count(*) from images").fetchone()[0]
    assert first["counts"]["regions"]["images"] == n_images >= 8  # distinct images (duplicates collapse)
    # wall time and peak memory per stage (sampled; the run's peak is the kernel's untouched high-water mark)
    assert set(first["stage_seconds"]) == set(first["stage_peak_rss_mb"]) == set(cfg["stages"])
    assert 100 < first["stage_peak_rss_mb"]["regions"] <= first["peak_rss_mb"]
    whole = con.execute(
        "select count(*), min(len(feature)), max(len(feature)), min(list_min(box5)), max(list_max(box5)) "
        "from regions where region_idx = 0 and label = 'image'"
    ).fetchone()
    assert whole == (n_images, 1280, 1280, 0.0, 1.0)
    tags = dict(con.execute(
        "select i.uri, t.tags from image_tags t join images i using (image_id) where i.source = 'photos'"
    ).fetchall())  # fmt: skip
    detections = con.execute("select label from regions where region_idx > 0").fetchall()
    con.close()
    chelsea = next(v for k, v in tags.items() if k.endswith("chelsea.png"))
    assert any("cat" in t or "tabby" in t for t in chelsea), chelsea
    motorcycle = next(v for k, v in tags.items() if k.endswith("motorcycle_left.png"))
    assert {"motorbike", "moped", "motor scooter"} & set(motorcycle), motorcycle
    from vlp_core.config import RegionsConfig
    from vlp_core.corpus.stages import vision_models

    vocabulary = set(vision_models(RegionsConfig())[0].labels)
    assert {label for (label,) in detections} <= vocabulary
    # retrieval: each photo's tag sentence finds its own description first
    con = connect(data_dir.catalog)
    top1 = dict(con.execute(
        "select uri, text from retrieval_browser where source = 'photos' and rank = 1"
    ).fetchall())  # fmt: skip
    assert next(v for k, v in top1.items() if k.endswith("chelsea.png")).startswith("A tabby cat")
    assert next(v for k, v in top1.items() if k.endswith("coffee.png")).startswith("A cup of hot espresso")
    n_tagged = con.execute("select count(*) from image_tags where tag_sentence <> ''").fetchone()[0]
    assert con.execute("select count(distinct image_id) from retrieved_pairs").fetchone()[0] == n_tagged
    assert con.execute("select max(rank) from retrieved_pairs").fetchone()[0] == 3
    # noun phrases carry exact spans; links join a tag to a phrase of a retrieved sentence
    bad_spans = con.execute(
        "select count(*) from noun_phrases p join texts t using (text_id) "
        "where substr(t.text, p.start_char + 1, p.end_char - p.start_char) <> p.phrase"
    ).fetchone()[0]
    assert bad_spans == 0
    cat_link = con.execute(
        "select phrase, score, mask_prob from links_detail where uri like '%chelsea.png' "
        "and sentence like 'A tabby cat%' order by score desc limit 1"
    ).fetchone()
    assert cat_link[0] == "A tabby cat" and abs(cat_link[2] - 0.15 * cat_link[1]) < 1e-6
    assert con.execute("select sum(tagged) from tag_coverage").fetchone()[0] == n_tagged
    con.close()

    # the patch gallery: every detection above the threshold, one per (concept, image), with a crop; plus the
    # whole image under each ImageNet tag of probability >= 0.5
    con = connect(data_dir.catalog)
    n_candidates = con.execute(
        "select count(*) from (select distinct label, image_id from regions where region_idx > 0)"
    ).fetchone()[0]
    n_detector = con.execute("select count(*) from patch_gallery where origin = 'detector'").fetchone()[0]
    assert n_candidates >= 1 and n_detector == n_candidates
    n_tagged = con.execute(
        "select count(*) from (select unnest(tag_scores) s, unnest(tag_origins) o from image_tags) "
        "where o = 'imagenet' and s >= 0.5"
    ).fetchone()[0]
    whole = con.execute(
        "select count(*), count(*) filter (where region_idx = 0) from patch_gallery "
        "where origin = 'image_tag'"
    ).fetchone()
    assert whole[0] == whole[1] <= n_tagged and (whole[0] > 0 or n_tagged == 0)
    summary = dict(
        con.execute("select concept, forms from gallery_summary where origin = 'detector'").fetchall()
    )
    assert len(summary) == 80 and "traffic lights" in summary["traffic light"]
    thumbs = con.execute("select thumbnail from patch_gallery").fetchall()
    # grounded words of every sentence, with exact spans, and the CMC coverage over them
    bad_words = con.execute(
        "select count(*) from grounded_words w join texts t using (text_id) "
        "where substr(t.text, w.start_char + 1, w.end_char - w.start_char) <> w.word "
        "or w.concept not in (select concept from patch_gallery)"
    ).fetchone()[0]
    cmc = con.execute(
        "select sentences, grounded_words from cmc_coverage where origin = 'all'"
    ).fetchone()  # fmt: skip
    assert bad_words == 0 and cmc == (
        con.execute("select count(*) from texts").fetchone()[0],
        con.execute("select count(*) from grounded_words").fetchone()[0],
    )
    con.close()
    assert all(Image.open(io.BytesIO(t)).size[0] <= 64 for (t,) in thumbs)
    assert first["counts"]["ground"]["sentences"] == cmc[0] and "cmc_grounded_share" in first["quality"]

    q = first["quality"]  # published with the run; the clip-art images' own captions are known pairs
    assert q["images_evaluated"] >= 1 and 0 <= q["random_alignment_at_k"] <= 1
    assert (data_dir.root / "reports" / "corpus.html").read_text().count("class=card") >= 3

    again = build_corpus(config=str(path))
    assert all(
        again["counts"][s].get("shards", 0) == 0
        for s in ("regions", "retrieve", "phrases", "links", "gallery", "ground")
    )


def test_dask_task_runner_on_a_local_cluster(prefect_stack, real, data_dir, tmp_path):
    """The scale-out runner: the same ingest on a Dask LocalCluster (2 worker processes, loopback only)."""
    from flows.build_corpus import build_corpus

    root = _corpus_dir(real, tmp_path, 20)
    cfg = _config(root, runner={"kind": "dask", "max_workers": 2})
    result = build_corpus(config=str(cfg))
    assert result["counts"]["ingest"]["images"] == 20 and result["counts"]["ingest"]["shards"] == 4
    con = connect(data_dir.catalog)
    assert con.execute("select count(*) from images_raw").fetchone()[0] == 20
    con.close()


def test_stage_peak_memory_leaves_the_run_peak_to_the_kernel():
    """A block's peak comes from sampling; the process's high-water mark is never reset, so the whole run's
    peak (what /usr/bin/time reports) survives every stage."""
    import numpy as np

    from vlp_core.memory import PeakRSS, current_rss_mb, run_peak_rss_mb

    with PeakRSS(interval=0.005) as big:
        block = np.ones(300 * 2**20 // 8)  # 300 MiB, touched
        held = current_rss_mb()
        time.sleep(0.1)  # held for a few sampling intervals (a spike shorter than one can be missed)
        del block
    with PeakRSS(interval=0.005) as small:
        pass
    assert big.peak_mb >= round(held, 1) - 0.1 and held > small.peak_mb + 250
    assert run_peak_rss_mb() >= big.peak_mb - 1  # (to rounding) the run's peak still holds the first block's
