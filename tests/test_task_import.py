"""Importing a real downstream dataset into the store: examples, reject rows (malformed records and missing
images), nothing redone for unchanged files, a changed file re-imported in place; and the same through
``vlp import-task`` against the session's Prefect server, read back through the catalog's views."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from stores.shards import ShardStore
from vlp_core.data.task_build import import_dataset
from vlp_core.data.task_data import read_task_examples
from vlp_core.paths import REPO_ROOT

GOOD = [
    {"identifier": "dev-1-0-0", "sentence": "Both images show a dog.", "label": "True", "synset": "dog"},
    {
        "identifier": "dev-1-0-1",
        "sentence": "The left image has two dogs.",
        "label": "False",
        "synset": "dog",
    },
    {"identifier": "dev-2-3-0", "sentence": "There is a cat.", "label": "True", "synset": "cat"},
]


def _nlvr2(tmp: Path) -> tuple[Path, Path]:
    images = tmp / "nlvr2-images"
    (images / "dev").mkdir(parents=True)
    for stem in ("dev-1-0", "dev-2-3"):
        for side in (0, 1):
            if stem == "dev-2-3" and side == 1:
                continue  # the right image of dev-2-3 is missing
            Image.new("RGB", (32, 24), (side * 200, 10, 10)).save(images / "dev" / f"{stem}-img{side}.png")
    lines = [json.dumps(r) for r in GOOD] + [
        '{"identifier": "dev-9-0-0", "sentence": "broken',  # not JSON
        json.dumps({"identifier": "dev-1-0-2", "sentence": "No label here."}),
    ]
    path = tmp / "dev.json"
    path.write_text("\n".join(lines) + "\n")
    return path, images


def test_import_nlvr2_with_rejects_then_nothing_to_redo(data_dir, tmp_path):
    store = ShardStore(data_dir.store)
    store.ensure_tables()
    path, images = _nlvr2(tmp_path)
    out = import_dataset(store, "nlvr2", [path], images)
    assert not out["skipped"] and out["split:dev"] == 2
    assert out["reject:bad_json"] == out["reject:missing_field"] == out["reject:missing_image"] == 1
    examples, roots = read_task_examples(store, "nlvr2", ["dev"])
    assert [e.example_id for e in examples] == ["dev-1-0-0", "dev-1-0-1"]
    assert examples[0].images == ("dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png")
    assert [e.label for e in examples] == ["true", "false"] and roots == [str(images.resolve())] * 2
    rejects = store.read_table("rejects").to_pylist()
    assert sorted((r["stage"], r["reason"]) for r in rejects) == [
        ("import", "bad_json"), ("import", "missing_field"), ("import", "missing_image"),
    ]  # fmt: skip
    assert next(r for r in rejects if r["reason"] == "missing_image")["input_id"] == "dev-2-3-0"

    assert import_dataset(store, "nlvr2", [path], images)["skipped"]  # unchanged: nothing to do
    # the missing image appears and the file changes: re-imported in place, old rows gone
    Image.new("RGB", (32, 24)).save(images / "dev" / "dev-2-3-img1.png")
    path.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    out = import_dataset(store, "nlvr2", [path], images)
    assert not out["skipped"] and out["split:dev"] == 3 and not any(k.startswith("reject") for k in out)
    assert len(read_task_examples(store, "nlvr2", ["dev"])[0]) == 3
    assert store.read_table("rejects").num_rows == 0


def test_vlp_import_task_through_the_server(prefect_stack, data_dir, tmp_path):
    path, images = _nlvr2(tmp_path)
    env = {**os.environ, "VLP_DATA_DIR": str(data_dir.root), "COLUMNS": "200"}
    vlp = str(Path(sys.executable).with_name("vlp"))
    cmd = [vlp, "import-task", "nlvr2", "--file", str(path), "--images", str(images)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "nlvr2" in proc.stdout and "missing_image" in proc.stdout and "bad_json" in proc.stdout
    sql = [vlp, "sql", "SELECT task, split, examples, labels, chance FROM task_summary"]
    proc = subprocess.run(sql, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "nlvr2" in proc.stdout and "0.5" in proc.stdout, proc.stdout + proc.stderr
    bad = subprocess.run(
        [vlp, "import-task", "nlvr3", "--file", str(path), "--images", str(images)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "nlvr3" in bad.stderr and "Traceback" not in bad.stderr
