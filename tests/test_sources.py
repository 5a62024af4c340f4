"""Source readers on tiny fixtures in the real formats, and on the fetched real data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlp_core.corpus.sources import (
    LineTextSource,
    OpenClipArtSource,
    build_source,
    parse_svg_metadata,
)


def _png(color="red", size=(32, 32)) -> bytes:
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="PNG")
    return b.getvalue()


def _lines(src: LineTextSource) -> list[tuple[str, bytes]]:
    return [(r.uri, r.data) for r in src.read(src.units())]


@pytest.mark.parametrize("unit_bytes", [1, 3, 7, 16, 1000])
def test_line_ranges_cover_every_line_once(tmp_path, unit_bytes):
    body = b"alpha\r\nbeta\n\n  \ngamma delta\nlast-no-newline"
    f = tmp_path / "corpus.txt"
    f.write_bytes(body)
    src = LineTextSource("t", str(f), unit_bytes=unit_bytes)
    got = _lines(src)
    assert [d for _, d in got] == [b"alpha", b"beta", b"gamma delta", b"last-no-newline"]
    offsets = [int(u.rsplit("@", 1)[1]) for u, _ in got]
    assert [body[o : o + 4] for o in offsets] == [b"alph", b"beta", b"gamm", b"last"]  # ids are byte offsets


def test_jsonl_bad_records(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "A cat."}\n{broken\n{"other": 1}\n')
    recs = list(
        build_source("jsonl", "j", paths=str(f)).read(build_source("jsonl", "j", paths=str(f)).units())
    )
    assert recs[0].data == "A cat."
    assert [r.error.reason for r in recs[1:]] == ["invalid_json", "missing_field"]


def test_parquet_text(tmp_path):
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["one sentence.", None]}), f)
    src = build_source("parquet_text", "p", paths=str(f))
    recs = list(src.read(src.units()))
    assert recs[0].data == "one sentence." and recs[1].error.reason == "empty_text"


def test_webdataset_tar(tmp_path):
    f = tmp_path / "shard-000000.tar"
    members = {
        "a/0001.jpg": _png(),  # (png bytes under a jpg name: the decoder sniffs content)
        "a/0001.txt": b"a red square",
        "a/0002.png": _png("blue"),
        "a/0002.json": json.dumps({"caption": "a blue square"}).encode(),
        "a/0003.txt": b"caption without image",
    }
    with tarfile.open(f, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    src = build_source("webdataset", "w", paths=str(tmp_path / "*.tar"))
    recs = list(src.read(src.units()))
    assert [r.uri.rsplit("::", 1)[1] for r in recs] == ["a/0001", "a/0002", "a/0003"]
    assert recs[0].captions == [("caption", "a red square")]
    assert recs[1].captions == [("caption", "a blue square")]
    assert recs[2].error.reason == "no_image"


def test_webdataset_truncated_tar_is_a_reject(tmp_path):
    f = tmp_path / "bad.tar"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        data = _png() * 20
        info = tarfile.TarInfo("k/0001.png")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    f.write_bytes(buf.getvalue()[:1500])
    src = build_source("webdataset", "w", paths=str(f))
    recs = list(src.read(src.units()))
    assert recs and recs[-1].error is not None


def test_parquet_image_manifest(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(_png("green"))
    f = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table(
            {
                "jpg": [_png(), None, None, None],
                "path": [None, "imgs/x.png", None, None],
                "url": [None, None, "http://example.com/a.jpg", None],
                "caption": ["red", "green", "remote", None],
            }
        ),
        f,
    )
    src = build_source("parquet_images", "m", paths=str(f))
    recs = list(src.read(src.units()))
    assert recs[0].data and recs[0].captions == [("caption", "red")]
    assert recs[1].data and recs[1].uri.endswith("imgs/x.png")
    assert recs[2].error.reason == "remote_url"
    assert recs[3].error.reason == "no_image"


def test_unknown_kind_and_bad_options():
    with pytest.raises(ValueError, match="choose one of"):
        build_source("nope", "x")
    with pytest.raises(ValueError, match="bad options"):
        build_source("jsonl", "x", paths="a", colour="red")


def test_openclipart_real_metadata(real):
    svg = real.openclipart / "svg" / "science" / "medicine" / "barattolo_di_pillole_arc_01.svg"
    meta = parse_svg_metadata(svg)
    # the work's title, not the publisher/creator agent titles; the generic keyword "unsorted" dropped
    assert meta == {"title": "Barattolo di pillole", "description": None, "keywords": []}
    src = OpenClipArtSource("oca", real.openclipart)
    units = src.units()
    assert len(units) == 8121
    (rec,) = src.read([u for u in units if u.key.endswith("barattolo_di_pillole_arc_01.png")][:1])
    assert rec.category == "science" and rec.captions == [("title", "Barattolo di pillole")]


def test_wordnet_real(real):
    src = build_source("wordnet", "wn", root=str(real.wordnet))
    recs = []
    for r in src.read([u for u in src.units() if u.key == "data.adv"]):
        recs.append(r)
        if len(recs) > 200:
            break
    kinds = {r.uri.rsplit(":", 1)[1][:2] for r in recs}
    assert kinds == {"de", "ex"}
    assert all('"' not in r.data for r in recs)


def test_gensim_news_is_documents():
    src = build_source("gensim_news", "news")
    assert src.documents and Path(src.units()[0].key.rsplit("@", 1)[0]).exists()


def test_easy_vqa_source_limit_per_split():
    from vlp_core.corpus.sources import EasyVQASource

    every = EasyVQASource("e").units()
    assert len(every) == 5000 and all("/images/" in u.key for u in every)
    some = EasyVQASource("e", limit_per_split={"train": 7, "test": 3}).units()
    splits = [u.key.split("/", 1)[0] for u in some]
    assert splits.count("train") == 7 and splits.count("test") == 3
    assert [u.key for u in some if u.key.startswith("test/")] == [
        u.key for u in every if u.key.startswith("test/")
    ][:3]
    only_test = EasyVQASource("e", limit_per_split={"test": 2}).units()
    assert len(only_test) == 4000 + 2  # a split not named keeps all its images
