"""The storage layer: atomic shard commits, planning (resume, incremental, stale), GC, catalog, FAISS."""

from __future__ import annotations

import hashlib
import importlib
import os
import sys
import uuid

import duckdb
import faiss
import numpy as np
import pytest

from stores.catalog import build_catalog, connect
from stores.faiss_store import FaissStore, choose_factory, search
from stores.shards import ShardStore, code_version, to_table


def _texts(*pairs):
    return to_table(
        "texts",
        [{"text_id": i, "source": "s", "uri": f"u{i}", "text": t, "n_chars": len(t)} for i, t in pairs],
    )


def test_plan_commit_resume_incremental_stale(tmp_path):
    store = ShardStore(tmp_path)
    units = [(f"f{i}", "fp") for i in range(5)]
    plan = store.plan("ingest", "s", units, "sig", shard_size=2)
    assert [len(u) for _, u in plan.todo] == [2, 2, 1] and not plan.done
    # commit the first two shards only (a run killed after two shards)
    for key, chunk in plan.todo[:2]:
        store.commit("ingest", "s", key, "sig", chunk, {"texts": _texts((key[:4], "x"))})
    again = store.plan("ingest", "s", units, "sig", shard_size=2)
    assert len(again.done) == 2 and [u for _, u in again.todo] == [[("f4", "fp")]]
    # a new unit → only it (and the unfinished one) is planned
    more = store.plan("ingest", "s", [*units, ("f5", "fp")], "sig", shard_size=2)
    assert [k for _, c in more.todo for k, _ in c] == ["f4", "f5"]
    # a changed fingerprint makes its shard stale; its other unit is redone too
    changed = [("f0", "fp2"), *units[1:]]
    stale = store.plan("ingest", "s", changed, "sig", shard_size=2)
    assert len(stale.stale) == 1 and {k for _, c in stale.todo for k, _ in c} == {"f0", "f1", "f4"}
    # new parameters or code → everything stale
    assert len(store.plan("ingest", "s", units, "sig2", shard_size=2).stale) == 2


def test_streamed_plan_from_sql_matches_the_list_plan_and_carries_extra_columns(tmp_path):
    store = ShardStore(tmp_path)
    units = [(f"u{i:02d}", f"fp{i % 3}") for i in range(11)]
    first = store.plan("embed", "s", units, "sig", shard_size=4)
    for key, chunk in first.todo[:1]:  # one shard committed, then the units change under the second
        store.commit("embed", "s", key, "sig", chunk, {})
    store.commit("embed", "s", "old", "sig", [("u04", "fp-old")], {})  # stale: a fingerprint changed
    store.commit("embed", "s", "gone", "sig", [("zz", "fp")], {})  # stale: its unit is gone
    store.commit("embed", "s", "empty", "sig", [], {})  # valid: nothing to check
    listed = store.plan("embed", "s", units, "sig", shard_size=4)
    con = duckdb.connect()
    values = ", ".join(f"('{k}', '{fp}', 'file{i // 5}')" for i, (k, fp) in enumerate(units))
    con.execute(f"CREATE TABLE src AS SELECT * FROM (VALUES {values}) t(key, fp, file)")
    streamed = store.plan_stream(con, "embed", "s", "SELECT * FROM src", "sig", 4, order_by="file, key")
    shards = list(streamed.shards())
    assert [(k, u) for k, u, _ in shards] == listed.todo  # same units, same order, same shard keys
    assert sorted(streamed.stale) == sorted(listed.stale) == ["gone", "old"]
    assert sorted(streamed.done) == sorted(listed.done) and "empty" in listed.done
    assert streamed.n_units_todo == sum(len(u) for _, u in listed.todo) == 7 and streamed.n_todo == 2
    assert shards[0][2] == {"file": ["file0", "file1", "file1", "file1"]}  # the extra column, unit by unit
    assert [k for k, _ in shards[0][1]] == ["u04", "u05", "u06", "u07"]


def test_plan_reads_many_manifests_within_a_small_memory_limit(tmp_path):
    """Hundreds of tiny manifests under a 64 MB limit (DuckDB's JSON reader needed 32 MiB a thread for any
    file, and a 150-shard benchmark failed to plan at the 128 MB default)."""
    store = ShardStore(tmp_path)
    units = [(f"u{i:03d}", "fp") for i in range(300)]
    for key, chunk in store.plan("bench", "s", units, "sig", shard_size=1).todo[:290]:
        store.commit("bench", "s", key, "sig", chunk, {})
    con = duckdb.connect()
    values = ", ".join(f"('{k}', '{fp}')" for k, fp in units)
    con.execute(f"CREATE TABLE src AS SELECT * FROM (VALUES {values}) t(key, fp)")
    plan = store.plan_stream(con, "bench", "s", "SELECT * FROM src", "sig", 1, memory_mb=64)
    assert len(plan.done) == 290 and not plan.stale
    assert [u for _, u, _ in plan.shards()] == [[u] for u in units[290:]]


def test_gc_removes_uncommitted_and_temp_files(tmp_path):
    store = ShardStore(tmp_path)
    store.ensure_tables()
    m = store.commit("ingest", "s", "k1", "sig", [("a", "1")], {"texts": _texts(("1", "hello"))})
    kept = tmp_path / m.outputs["texts"]["file"]
    orphan = tmp_path / "texts" / "s" / "ingest-k2.parquet"  # renamed, but the manifest never written
    orphan.write_bytes(kept.read_bytes())
    tmp = tmp_path / "texts" / "s" / "ingest-k3.parquet.tmp-99"
    tmp.write_bytes(b"half a file")
    assert store.collect_garbage() == 2
    assert kept.exists() and not orphan.exists() and not tmp.exists()
    assert store.read_table("texts").num_rows == 1
    store.drop("ingest", "s", "k1")
    assert not kept.exists() and store.read_table("texts").num_rows == 0


def test_files_without_a_manifest_are_invisible_to_every_reader(tmp_path, monkeypatch):
    """The manifest is the only commit point readers see: a shard's data files planted (or left by a crash
    between their rename and the manifest) without a manifest are read neither by the catalog's views, nor by
    `vlp sql`, nor by the store's own readers, before any clean-up."""
    import os
    import subprocess
    import sys

    from vlp_core.paths import REPO_ROOT

    store = ShardStore(tmp_path / "store")
    m = store.commit(
        "ingest", "s", "k1", "sig", [("a", "1")], {"texts": _texts(("t1", "one"), ("t2", "two"))}
    )
    planted = store.root / "texts" / "s" / "ingest-k2.parquet"
    planted.write_bytes((store.root / m.outputs["texts"]["file"]).read_bytes())  # 2 more rows, uncommitted
    build_catalog(tmp_path / "catalog.duckdb", store.root)
    con = connect(tmp_path / "catalog.duckdb")
    assert con.execute("select count(*) from texts_raw").fetchone() == (2,)
    con.close()
    assert store.read_table("texts").num_rows == 2 and store.committed_files("texts") == [
        planted.with_stem("ingest-k1")
    ]
    env = dict(os.environ, VLP_DATA_DIR=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-m", "flows.cli", "sql", "select count(*) n from texts_raw", "--format", "csv"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and out.stdout.split() == ["n", "2"], out.stdout + out.stderr
    # committing k2 (its manifest) is what makes the same file visible
    store.commit("ingest", "s", "k2", "sig", [("b", "1")], {"texts": _texts(("t3", "three"))})
    con = connect(tmp_path / "catalog.duckdb")
    assert con.execute("select count(*) from texts_raw").fetchone() == (3,)
    con.close()


def test_commit_casts_to_schema_and_rejects_bad_names(tmp_path):
    store = ShardStore(tmp_path)
    with pytest.raises(ValueError):
        store.commit("ingest", "../evil", "k", "sig", [], {})
    with pytest.raises(KeyError, match="unknown table"):
        store.commit("ingest", "s", "k", "sig", [], {"nope": _texts()})


def test_code_version_of_a_package_covers_every_submodule(tmp_path, monkeypatch):
    """A module is hashed by its file (as before packages were covered); a package by every ``.py`` file
    under its directory, so editing, adding or renaming any submodule changes its version."""
    name = f"cv_pkg_{uuid.uuid4().hex}"  # a fresh package name: no stale module cache between runs
    root = tmp_path / name
    (root / "inner").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    return 1\n",
        "inner/__init__.py": "",
        "inner/b.py": "X = 1\n",
    }
    for rel, text in files.items():
        (root / rel).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pkg = importlib.import_module(name)
        sub = importlib.import_module(f"{name}.a")
        assert pkg.__file__.endswith("__init__.py") and pkg.f() == 1
        # a plain module: the hash of its file's bytes, as it always was
        assert code_version(sub) == hashlib.blake2b((root / "a.py").read_bytes(), digest_size=8).hexdigest()
        base = code_version(pkg)
        assert code_version(pkg) == base != code_version(sub)
        seen = {base}
        for rel, text in [("a.py", "def f():\n    return 2\n"), ("inner/b.py", "X = 2\n")]:
            (root / rel).write_text(text)  # code_version reads the files: no reload needed
            got = code_version(pkg)
            assert got not in seen, rel
            seen.add(got)
            (root / rel).write_text(files[rel])
            assert code_version(pkg) == base
        (root / "inner" / "c.py").write_text("")  # a new (empty) submodule
        assert code_version(pkg) not in seen
        (root / "inner" / "c.py").unlink()
        (root / "inner" / "b.py").rename(root / "inner" / "d.py")  # same bytes, another module
        assert code_version(pkg) not in seen
    finally:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]


def test_catalog_views_dedup_and_empty_store(tmp_path):
    store = ShardStore(tmp_path / "store")
    cat = tmp_path / "catalog.duckdb"
    views = build_catalog(cat, store.root)
    assert {"images", "texts", "known_pairs", "rejects", "rejects_by_reason", "ingest_summary"} <= set(views)
    con = connect(cat)
    assert con.execute("select count(*) from images").fetchone() == (0,)  # empty store: views still work
    con.close()
    store.commit("ingest", "a", "k1", "sig", [], {"texts": _texts(("t1", "same"), ("t2", "other"))})
    store.commit("ingest", "b", "k2", "sig", [], {"texts": _texts(("t1", "same"))})
    con = connect(cat)
    assert con.execute("select count(*) from texts_raw").fetchone() == (3,)
    assert con.execute("select count(*) from texts").fetchone() == (2,)
    with pytest.raises(duckdb.Error):  # read-only: inspection can't change anything
        con.execute("create table x as select 1")
    con.close()


def test_choose_factory_by_size():
    assert choose_factory(500, 384) == choose_factory(200_000, 384) == "Flat"
    assert choose_factory(2_000_000, 384).startswith("IVF") and choose_factory(2_000_000, 384).endswith(
        ",Flat"
    )
    assert choose_factory(200_000, 384, memory_budget_bytes=2**20).startswith("OPQ")  # Flat would not fit
    assert choose_factory(50_000_000, 384, memory_budget_bytes=2**30).startswith("OPQ")


def test_faiss_store_roundtrip_and_recall(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 32)).astype("float32")
    ids = np.array([f"id{i}" for i in range(len(x))], dtype=object)
    fs = FaissStore(tmp_path)
    meta = fs.build_and_save(
        "sent", x, ids, factory=choose_factory(len(x), 32, exact_below=10_000), nprobe=32
    )
    assert meta.factory.startswith("IVF") and meta.count == 20_000
    index, got_ids, meta2 = fs.load("sent")
    assert meta2 == meta and list(got_ids[:3]) == ["id0", "id1", "id2"]
    assert faiss.extract_index_ivf(index).nprobe == 32
    q = x[:50] + 0.01 * rng.standard_normal((50, 32)).astype("float32")
    q_before = q.copy()
    hits, scores = search(index, got_ids, q, k=5)
    assert np.array_equal(q, q_before)  # the caller's queries are not normalised in place
    assert (hits[:, 0] == ids[:50]).mean() >= 0.9  # IVF finds the near-duplicate query
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    fs.build_and_save("sent", x[:100], ids[:100], factory="Flat")  # replace atomically
    assert fs.load("sent")[2].count == 100


def test_faiss_swap_is_one_rename_and_interrupted_saves_leave_nothing_for_good(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype("float32")
    ids = np.array([f"id{i}" for i in range(50)], dtype=object)
    legacy = tmp_path / "sent"  # an index folder of the layout before version folders
    legacy.mkdir(parents=True)
    (legacy / "meta.json").write_text("{}")
    fs = FaissStore(tmp_path)
    fs.build_and_save("sent", x, ids, factory="Flat")
    assert (tmp_path / "sent").is_symlink() and fs.load("sent")[2].count == 50
    # what kills at each point of a save leave: a half-written folder, a finished version never linked, a
    # link made but not swapped in, the legacy folder moved aside
    (tmp_path / ".sent.tmp-5-99").mkdir()
    (tmp_path / ".sent.tmp-5-99" / "index.faiss").write_bytes(b"half")
    (tmp_path / ".sent.v-6-99").mkdir()
    (tmp_path / ".sent.link-99").symlink_to(".sent.v-6-99")
    (tmp_path / ".sent.old-99").mkdir()
    current = os.readlink(tmp_path / "sent")
    assert fs.collect_garbage() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["sent", current])
    fs.build_and_save("sent", x[:10], ids[:10], factory="Flat")
    assert fs.load("sent")[2].count == 10 and len(list(tmp_path.iterdir())) == 2  # the old version is gone
