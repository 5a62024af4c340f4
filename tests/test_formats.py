"""The readers of the real downstream formats (vlp_core.data.formats): a tiny fixture in each dataset's exact
file format (a few good records, malformed ones that must each become a reject with a specific reason),
checked field by field."""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import shlex
import struct
from pathlib import Path

import pytest

from vlp_core.data.examples import TaskExample
from vlp_core.data.formats import (
    READERS,
    read_gqa,
    read_karpathy,
    read_nlvr2,
    read_refcoco,
    read_snli_ve,
    read_task_file,
)


def _jsonl(path: Path, lines: list[object]) -> Path:
    """Write JSON lines; a ``str`` item is written verbatim (a malformed line)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------------------
# NLVR2


def _nlvr2_record(identifier: str, sentence: str, label: object, directory: int | None = None) -> dict:
    record = {
        "validation": {"1": "True"},
        "sentence": sentence,
        "left_url": "https://example.org/left.jpg",
        "writer": "103",
        "label": label,
        "right_url": "https://example.org/right.jpg",
        "synset": "pencil case",
        "query": "group of pencil cases17",
        "identifier": identifier,
        "extra_validations": {},
    }
    if directory is not None:
        record["directory"] = directory
    return record


def test_nlvr2(tmp_path: Path) -> None:
    train = _jsonl(
        tmp_path / "train.json",
        [
            _nlvr2_record("train-10171-0-0", " An image shows one leather pencil case. ", "False", 77),
            _nlvr2_record("train-10171-0-1", "Both cases are open.", "True", 77),
            '{"identifier": "train-1-0-0", "sentence": ',  # line 3: bad_json
            _nlvr2_record("train-2-0-0", "Two dogs.", "maybe", 3),  # bad_label
            _nlvr2_record("train-3-0-0", "   ", "True", 3),  # empty_text
            _nlvr2_record("train-4-0", "A dog.", "True", 3),  # bad_identifier
            _nlvr2_record("train-5-0-0", "A dog.", "True"),  # missing_field: train without directory
            {"identifier": "train-6-0-0", "label": "True", "directory": 1},  # missing_field: no sentence
            [1, 2],  # line 9: bad_record
            _nlvr2_record("train-10171-0-0", "Again.", "True", 77),  # duplicate_id
            "",  # blank line: skipped
        ],
    )
    result = read_nlvr2(train)
    assert result.examples == [
        TaskExample(
            task="nlvr2",
            split="train",
            example_id="train-10171-0-0",
            images=("train/77/train-10171-0-img0.png", "train/77/train-10171-0-img1.png"),
            text="An image shows one leather pencil case.",
            label="false",
            meta={"synset": "pencil case", "query": "group of pencil cases17"},
        ),
        TaskExample(
            task="nlvr2",
            split="train",
            example_id="train-10171-0-1",
            images=("train/77/train-10171-0-img0.png", "train/77/train-10171-0-img1.png"),
            text="Both cases are open.",
            label="true",
            meta={"synset": "pencil case", "query": "group of pencil cases17"},
        ),
    ]
    assert [(r.source, r.input_id, r.reason) for r in result.rejects] == [
        ("train.json", "line 3", "bad_json"),
        ("train.json", "train-2-0-0", "bad_label"),
        ("train.json", "train-3-0-0", "empty_text"),
        ("train.json", "train-4-0", "bad_identifier"),
        ("train.json", "train-5-0-0", "missing_field"),
        ("train.json", "train-6-0-0", "missing_field"),
        ("train.json", "line 9", "bad_record"),
        ("train.json", "train-10171-0-0", "duplicate_id"),
    ]
    assert all(r.detail for r in result.rejects)

    dev = _jsonl(
        tmp_path / "dev.json",
        [
            _nlvr2_record("dev-850-0-0", "One dog.", "true"),  # lower case accepted
            _nlvr2_record("test1-0-1-2", "No dog.", "FALSE"),
        ],
    )
    result = read_nlvr2(dev)
    assert not result.rejects
    assert [(e.split, e.images, e.label) for e in result.examples] == [
        ("dev", ("dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png"), "true"),
        ("test1", ("test1/test1-0-1-img0.png", "test1/test1-0-1-img1.png"), "false"),
    ]
    # The split argument names the examples' split, not the image folder.
    result = read_nlvr2(dev, split="balanced_dev")
    assert [e.split for e in result.examples] == ["balanced_dev", "balanced_dev"]
    assert result.examples[0].images[0] == "dev/dev-850-0-img0.png"


# ---------------------------------------------------------------------------------------------------------
# SNLI-VE


def _snli_record(pair_id: str, label: object, hypothesis: object, image: str = "3416050480.jpg") -> dict:
    caption_id = pair_id[: pair_id.rindex("#") + 2]
    return {
        "annotator_labels": [label],
        "captionID": caption_id,
        "gold_label": label,
        "pairID": pair_id,
        "sentence1": "A person on a horse jumps over a broken down airplane. ",
        "sentence1_binary_parse": "( ( ( A person ) ... ) . )",
        "sentence1_parse": "(ROOT (S ...))",
        "sentence2": hypothesis,
        "sentence2_binary_parse": "( ( A person ) ... )",
        "sentence2_parse": "(ROOT (S ...))",
        "Flikr30kID": image,
    }


def test_snli_ve(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "snli_ve_dev.jsonl",
        [
            _snli_record("3416050480.jpg#4r1n", "neutral", "A person is training his horse. "),
            _snli_record(
                "3416050480.jpg#4r1c", "contradiction", "A person is at a diner.", image="3416050480"
            ),
            _snli_record("3416050480.jpg#4r1e", "Entailment", "A person is outdoors, on a horse."),
            _snli_record("3416050480.jpg#4r2n", "-", "A person rides."),  # bad_label: no consensus
            _snli_record("3416050480.jpg#4r3n", "neutral", ""),  # empty_text
            {"pairID": "3416050480.jpg#4r4n", "gold_label": "neutral", "sentence2": "x"},  # missing_field
            "not json",  # line 7: bad_json
        ],
    )
    result = read_snli_ve(path)
    premise = "A person on a horse jumps over a broken down airplane."
    assert result.examples == [
        TaskExample(
            task="snli-ve",
            split="dev",
            example_id="3416050480.jpg#4r1n",
            images=("3416050480.jpg",),
            text="A person is training his horse.",
            label="neutral",
            meta={"premise": premise, "caption_id": "3416050480.jpg#4"},
        ),
        TaskExample(
            task="snli-ve",
            split="dev",
            example_id="3416050480.jpg#4r1c",
            images=("3416050480.jpg",),  # ".jpg" added
            text="A person is at a diner.",
            label="contradiction",
            meta={"premise": premise, "caption_id": "3416050480.jpg#4"},
        ),
        TaskExample(
            task="snli-ve",
            split="dev",
            example_id="3416050480.jpg#4r1e",
            images=("3416050480.jpg",),
            text="A person is outdoors, on a horse.",
            label="entailment",
            meta={"premise": premise, "caption_id": "3416050480.jpg#4"},
        ),
    ]
    assert [(r.source, r.input_id, r.reason) for r in result.rejects] == [
        ("snli_ve_dev.jsonl", "3416050480.jpg#4r2n", "bad_label"),
        ("snli_ve_dev.jsonl", "3416050480.jpg#4r3n", "empty_text"),
        ("snli_ve_dev.jsonl", "3416050480.jpg#4r4n", "missing_field"),
        ("snli_ve_dev.jsonl", "line 7", "bad_json"),
    ]
    assert "Flikr30kID" in result.rejects[2].detail
    assert {e.split for e in read_snli_ve(path, split="test").examples} == {"test"}
    other = _jsonl(tmp_path / "hypotheses.jsonl", [_snli_record("1.jpg#0r1n", "neutral", "x")])
    with pytest.raises(ValueError, match="hypotheses.jsonl"):
        read_snli_ve(other)


# ---------------------------------------------------------------------------------------------------------
# RefCOCO+

_IMAGE_A, _IMAGE_B = 581857, 9


def _instances() -> dict:
    def ann(ann_id: int, image_id: int, bbox: list, category_id: int = 1) -> dict:
        return {
            "segmentation": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]],
            "area": 100.0,
            "iscrowd": 0,
            "image_id": image_id,
            "bbox": bbox,
            "category_id": category_id,
            "id": ann_id,
        }

    def image(image_id: int, width: int, height: int) -> dict:
        name = f"COCO_train2014_{image_id:012d}.jpg"
        return {
            "license": 1,
            "file_name": name,
            "coco_url": f"http://images.cocodataset.org/train2014/{name}",
            "height": height,
            "width": width,
            "date_captured": "2013-11-14 16:28:13",
            "flickr_url": "http://farm4.staticflickr.com/x.jpg",
            "id": image_id,
        }

    return {
        "info": {"description": "This is stable 1.0 version of the 2014 MS COCO dataset."},
        "images": [image(_IMAGE_A, 427, 640), image(_IMAGE_B, 640, 480)],
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1}],
        # Out of id order on purpose: candidates are sorted by annotation id.
        "annotations": [
            ann(1720000, _IMAGE_A, [10, 20, 30, 40], category_id=18),
            ann(1719310, _IMAGE_A, [103.93, 299.99, 134.22, 177.42]),
            ann(1719000, _IMAGE_A, [5.0, 5.0, 0.0, 12.0]),  # bad_box: zero width, dropped
            ann(500, _IMAGE_B, [0, 0, 64, 48], category_id=18),
            ann(501, 424242, [0, 0, 1, 1]),  # unknown_image
        ],
        "categories": [
            {"supercategory": "person", "id": 1, "name": "person"},
            {"supercategory": "animal", "id": 18, "name": "dog"},
        ],
    }


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[tuple[int, str]]) -> dict:
    return {
        "image_id": image_id,
        "split": split,
        "sentences": [
            {"tokens": sent.split(), "raw": sent.upper(), "sent_id": sid, "sent": sent}
            for sid, sent in sentences
        ],
        "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
        "category_id": 1,
        "ann_id": ann_id,
        "sent_ids": [sid for sid, _ in sentences],
        "ref_id": ref_id,
    }


def _refs() -> list:
    no_sentences = _ref(45, 1719310, _IMAGE_A, "val", [])
    del no_sentences["sentences"]
    return [
        _ref(0, 1719310, _IMAGE_A, "train", [(0, "the lady with the blue shirt"), (1, "  "), (2, "lady")]),
        {**_ref(7, 500, _IMAGE_B, "testA", [(10, "dog on the left")]), "category_id": 18},
        _ref(40, 1720000, 31337, "train", [(20, "x")]),  # unknown_image
        _ref(41, 500, _IMAGE_A, "train", [(21, "x")]),  # unknown_annotation (it is of image B)
        _ref(42, 1719000, _IMAGE_A, "testB", [(22, "x")]),  # bad_box: its own box is bad
        no_sentences,  # missing_field
        "not a ref",  # bad_record
    ]


def _check_refcoco(result, refs_name: str) -> None:
    box_a = (103.93, 299.99, 103.93 + 134.22, 299.99 + 177.42)
    meta_a = {
        "category": "person",
        "category_id": "1",
        "ann_id": "1719310",
        "image_id": str(_IMAGE_A),
        "width": "427",
        "height": "640",
    }
    common = {
        "task": "refcoco+",
        "split": "train",
        "images": (f"train2014/COCO_train2014_{_IMAGE_A:012d}.jpg",),
        "boxes": (box_a, (10.0, 20.0, 40.0, 60.0)),
        "target": 0,
        "group": "0",
        "meta": meta_a,
    }
    assert result.examples == [
        TaskExample(example_id="0-0", text="the lady with the blue shirt", **common),
        TaskExample(example_id="0-2", text="lady", **common),
        TaskExample(
            task="refcoco+",
            split="testA",
            example_id="7-10",
            images=(f"train2014/COCO_train2014_{_IMAGE_B:012d}.jpg",),
            text="dog on the left",
            boxes=((0.0, 0.0, 64.0, 48.0),),
            target=0,
            group="7",
            meta={
                "category": "dog",
                "category_id": "18",
                "ann_id": "500",
                "image_id": str(_IMAGE_B),
                "width": "640",
                "height": "480",
            },
        ),
    ]
    assert all(isinstance(x, float) for e in result.examples for b in e.boxes for x in b)
    assert [(r.source, r.input_id, r.reason) for r in result.rejects] == [
        ("instances.json", "annotation 1719000", "bad_box"),
        ("instances.json", "annotation 501", "unknown_image"),
        (refs_name, "0-1", "empty_text"),
        (refs_name, "40", "unknown_image"),
        (refs_name, "41", "unknown_annotation"),
        (refs_name, "42", "bad_box"),
        (refs_name, "45", "missing_field"),
        (refs_name, "ref #6", "bad_record"),
    ]
    assert "sentences" in result.rejects[6].detail


def test_refcoco_pickle(tmp_path: Path) -> None:
    refs = tmp_path / "refs(unc).p"
    with refs.open("wb") as f:
        pickle.dump(_refs(), f, protocol=2)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_instances()))
    _check_refcoco(read_refcoco(refs, instances), "refs(unc).p")
    assert read_refcoco(refs, instances, dataset="refcoco").examples[0].task == "refcoco"


def test_refcoco_json_refs(tmp_path: Path) -> None:
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(_refs()))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_instances()))
    _check_refcoco(read_refcoco(refs, instances), "refs.json")


def _py2_pickle(obj: object) -> bytes:
    """Protocol-2 pickle of plain data as Python 2 writes it: ``str`` as raw bytes (SHORT_BINSTRING /
    BINSTRING, here UTF-8), which Python 3's pickler never writes."""
    out = bytearray(b"\x80\x02")

    def put(x: object) -> None:
        if isinstance(x, dict):
            out.extend(b"}(")
            for k, v in x.items():
                put(k)
                put(v)
            out.extend(b"u")
        elif isinstance(x, list):
            out.extend(b"](")
            for v in x:
                put(v)
            out.extend(b"e")
        elif isinstance(x, str):
            data = x.encode("utf-8")
            out.extend(b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data)))
            out.extend(data)
        elif isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        elif isinstance(x, float):
            out.extend(b"G" + struct.pack(">d", x))
        else:
            raise TypeError(type(x))

    put(obj)
    out.extend(b".")
    return bytes(out)


def test_refcoco_python2_pickle(tmp_path: Path) -> None:
    ref = _ref(3, 500, _IMAGE_B, "val", [(5, "the café dog")])
    data = _py2_pickle([ref])
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert "SHORT_BINSTRING" in ops and "BINUNICODE" not in ops  # the Python 2 opcodes
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(data)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_instances()))
    result = read_refcoco(refs, instances)
    assert [(e.example_id, e.split, e.text, e.group, e.target) for e in result.examples] == [
        ("3-5", "val", "the café dog", "3", 0)
    ]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def test_refcoco_pickle_with_global_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    refs = tmp_path / "refs(unc).p"
    with refs.open("wb") as f:
        pickle.dump([_ref(0, 500, _IMAGE_B, "train", [(0, "dog")]), {"x": _Evil(marker)}], f, protocol=2)
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_instances()))
    with pytest.raises(ValueError, match=r"refs\(unc\)\.p.*refused.*system"):
        read_refcoco(refs, instances)
    assert not marker.exists()


def test_refcoco_unreadable_files(tmp_path: Path) -> None:
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_instances()))
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps(_refs(), protocol=2)[:-30])  # truncated
    with pytest.raises(ValueError, match="not a readable pickle"):
        read_refcoco(refs, instances)
    refs.write_bytes(pickle.dumps({"refs": []}, protocol=2))
    with pytest.raises(ValueError, match="not a list"):
        read_refcoco(refs, instances)
    with pytest.raises(FileNotFoundError, match="nope.p"):
        read_refcoco(tmp_path / "nope.p", instances)
    refs.write_bytes(pickle.dumps(_refs(), protocol=2))
    instances.write_text('{"images": []}')
    with pytest.raises(ValueError, match="instances.json"):
        read_refcoco(refs, instances)
    instances.write_text("{")
    with pytest.raises(ValueError, match="instances.json is not valid JSON"):
        read_refcoco(refs, instances)


# ---------------------------------------------------------------------------------------------------------
# GQA


def _gqa_question(image_id: str, question: object, answer: object = None, full: str | None = None) -> dict:
    record = {
        "semantic": [{"operation": "select", "dependencies": [], "argument": "sky (2486325)"}],
        "entailed": ["02930160"],
        "equivalent": ["02930152"],
        "question": question,
        "imageId": image_id,
        "isBalanced": True,
        "groups": {"global": None, "local": "06-sky_dark"},
        "semanticStr": "select: sky (2486325)->verify color: dark [0]",
        "annotations": {"answer": {}, "question": {"2": "2486325"}, "fullAnswer": {"2": "2486325"}},
        "types": {"detailed": "verifyAttr", "semantic": "attr", "structural": "verify"},
    }
    if answer is not None:
        record["answer"] = answer
        record["fullAnswer"] = full
    return record


def test_gqa(tmp_path: Path) -> None:
    path = tmp_path / "testdev_balanced_questions.json"
    questions = {
        "02930152": _gqa_question("2354786", "Is the sky dark?", " Yes ", "Yes, the sky is dark."),
        "07333408": _gqa_question(
            "n161313", "What is on the white wall?", "pipe", "The pipe is on the wall."
        ),
        "20240871": _gqa_question("2417468", "Who is wearing the shirt?"),  # unlabelled: label None
        "05451384": _gqa_question("2417468", "  "),  # empty_text
        "00000001": {"question": "Where?", "answer": "here"},  # missing_field (imageId)
        "00000002": ["not", "a", "question"],  # bad_record
        "00000003": _gqa_question("1", "Is it?", ""),  # bad_label
    }
    path.write_text(json.dumps(questions))
    result = read_gqa(path)
    types = {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}
    assert result.examples == [
        TaskExample(
            task="gqa",
            split="testdev",
            example_id="02930152",
            images=("2354786.jpg",),
            text="Is the sky dark?",
            label="yes",
            meta={**types, "full_answer": "Yes, the sky is dark."},
        ),
        TaskExample(
            task="gqa",
            split="testdev",
            example_id="07333408",
            images=("n161313.jpg",),
            text="What is on the white wall?",
            label="pipe",
            meta={**types, "full_answer": "The pipe is on the wall."},
        ),
        TaskExample(
            task="gqa",
            split="testdev",
            example_id="20240871",
            images=("2417468.jpg",),
            text="Who is wearing the shirt?",
            label=None,
            meta=types,
        ),
    ]
    assert [(r.source, r.input_id, r.reason) for r in result.rejects] == [
        (path.name, "05451384", "empty_text"),
        (path.name, "00000001", "missing_field"),
        (path.name, "00000002", "bad_record"),
        (path.name, "00000003", "bad_label"),
    ]
    assert {e.split for e in read_gqa(path, split="val").examples} == {"val"}
    listed = tmp_path / "train_balanced_questions.json"
    listed.write_text(json.dumps([questions["02930152"]]))
    with pytest.raises(ValueError, match="train_balanced_questions.json"):
        read_gqa(listed)
    unnamed = tmp_path / "questions.json"
    unnamed.write_bytes(path.read_bytes())
    with pytest.raises(ValueError, match="cannot tell the split.*questions.json"):
        read_gqa(unnamed)


# ---------------------------------------------------------------------------------------------------------
# Karpathy splits


def _karpathy_image(imgid: int, split: str, sentences: list[tuple[int, str]], **extra: object) -> dict:
    return {
        **extra,
        "sentids": [sid for sid, _ in sentences],
        "imgid": imgid,
        "sentences": [
            {"tokens": raw.lower().split(), "raw": raw, "imgid": imgid, "sentid": sid}
            for sid, raw in sentences
        ],
        "split": split,
    }


def test_karpathy_coco(tmp_path: Path) -> None:
    name = "COCO_val2014_000000391895.jpg"
    no_file = _karpathy_image(3, "train", [(40, "A cat.")], filepath="train2014", cocoid=7)  # no filename
    images = [
        _karpathy_image(
            0,
            "test",
            [
                (770337, "A man with a red helmet on a small moped on a dirt road. "),
                (771687, "  "),
                (772707, "x"),
            ],
            filepath="val2014",
            filename=name,
            cocoid=391895,
        ),
        _karpathy_image(
            1, "restval", [(1, "Two giraffes.")], filepath="val2014", filename="COCO_val2014_1.jpg", cocoid=1
        ),
        _karpathy_image(2, "train", [], filepath="train2014", filename="COCO_train2014_2.jpg", cocoid=2),
        no_file,
        _karpathy_image(4, "val", [(1, "Same sentid.")], filepath="val2014", filename="COCO_val2014_4.jpg"),
    ]
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    result = read_karpathy(path)
    key = f"val2014/{name}"
    meta = {"imgid": "0", "cocoid": "391895"}
    assert result.examples == [
        TaskExample(
            task="coco-karpathy",
            split="test",
            example_id="770337",
            images=(key,),
            text="A man with a red helmet on a small moped on a dirt road.",
            group=key,
            meta=meta,
        ),
        TaskExample(
            task="coco-karpathy",
            split="test",
            example_id="772707",
            images=(key,),
            text="x",
            group=key,
            meta=meta,
        ),
        TaskExample(
            task="coco-karpathy",
            split="restval",
            example_id="1",
            images=("val2014/COCO_val2014_1.jpg",),
            text="Two giraffes.",
            group="val2014/COCO_val2014_1.jpg",
            meta={"imgid": "1", "cocoid": "1"},
        ),
        # sentid 1 again, but in another split: ids are unique within (task, split).
        TaskExample(
            task="coco-karpathy",
            split="val",
            example_id="1",
            images=("val2014/COCO_val2014_4.jpg",),
            text="Same sentid.",
            group="val2014/COCO_val2014_4.jpg",
            meta={"imgid": "4"},
        ),
    ]
    assert [(r.source, r.input_id, r.reason) for r in result.rejects] == [
        ("dataset_coco.json", "771687", "empty_text"),
        ("dataset_coco.json", "train2014/COCO_train2014_2.jpg", "no_captions"),
        ("dataset_coco.json", "image 3", "missing_field"),
    ]


def test_karpathy_flickr30k(tmp_path: Path) -> None:
    images = [
        _karpathy_image(0, "train", [(0, "Two guys."), (1, "Two friends.")], filename="1000092795.jpg"),
        _karpathy_image(1, "train", [(1, "A duplicate sentid.")], filename="10002456.jpg"),
    ]
    images[1]["sentences"].append({"tokens": [], "imgid": 1})  # missing_field: no raw, no sentid
    path = tmp_path / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    result = read_karpathy(path)
    assert [(e.task, e.split, e.example_id, e.images, e.text, e.group, e.meta) for e in result.examples] == [
        (
            "flickr30k-karpathy",
            "train",
            "0",
            ("1000092795.jpg",),
            "Two guys.",
            "1000092795.jpg",
            {"imgid": "0"},
        ),
        (
            "flickr30k-karpathy",
            "train",
            "1",
            ("1000092795.jpg",),
            "Two friends.",
            "1000092795.jpg",
            {"imgid": "0"},
        ),
    ]
    assert [(r.input_id, r.reason) for r in result.rejects] == [
        ("1", "duplicate_id"),
        ("10002456.jpg sentence 1", "missing_field"),
    ]
    assert read_karpathy(path, dataset="f30k").examples[0].task == "f30k-karpathy"
    path.write_text(json.dumps({"images": images}))
    with pytest.raises(ValueError, match="names no dataset"):
        read_karpathy(path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="dataset_flickr30k.json"):
        read_karpathy(path)


# ---------------------------------------------------------------------------------------------------------
# Dispatch


def test_read_task_file(tmp_path: Path) -> None:
    assert set(READERS) == {"nlvr2", "snli_ve", "refcoco", "gqa", "karpathy"}
    path = _jsonl(tmp_path / "dev.json", [_nlvr2_record("dev-850-0-0", "One dog.", "True")])
    assert read_task_file("nlvr2", path) == read_nlvr2(path)
    assert read_task_file("nlvr2", path, split="x").examples[0].split == "x"
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps(_refs()))
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps(_instances()))
    result = read_task_file("refcoco", refs, instances, dataset="refcocog")
    assert result.examples[0].task == "refcocog"
    with pytest.raises(
        ValueError, match="unknown task file kind 'vqa'.*nlvr2.*snli_ve.*refcoco.*gqa.*karpathy"
    ):
        read_task_file("vqa", path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_task_file("nlvr2", tmp_path / "missing.json")
