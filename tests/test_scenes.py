"""The bundled scene tasks (vlp_core.data.scenes): determinism across calls, slices and processes; every
label re-derived from the scene metadata by an independent checker (parsing the text); label balance;
referring expressions; boxes; the train / test sprite partition."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import REAL, needs_real_data

from vlp_core.data import scenes
from vlp_core.data.examples import ENTAILMENT_LABELS
from vlp_core.data.scenes import SCENE_TASKS, build_split, chance_level, encode_png, generate

ROOT = REAL.openclipart / "png"
REPO = Path(__file__).resolve().parent.parent

# What each test samples (task -> split -> number of units); small, so the module runs in seconds.
SAMPLE = {
    "scene-pairs": {"train": 24, "test": 10},
    "scene-pairs-easy": {"train": 24, "test": 10},
    "scene-entailment": {"train": 60, "test": 12},
    "scene-refs": {"train": 16, "testA": 8, "testB": 8},
    "scene-qa": {"train": 36, "test": 18},
    "scene-captions": {"train": 6, "test": 4},
}

SHAPES = {"circle", "rectangle", "triangle"}
COLORS = {"black", "blue", "brown", "gray", "green", "red", "teal", "yellow"}
NOUNS = {"animal", "building", "food", "person", "plant", "tool", "vehicle"}
NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5}
REL_WORDS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
REL = "(to the left of|to the right of|above|below)"


@pytest.fixture(scope="module")
def built() -> dict[str, dict[str, tuple[list, dict]]]:
    needs_real_data(ROOT)
    return {
        task: {split: build_split(task, split, 0, n, seed=0, clipart_root=ROOT) for split, n in sizes.items()}
        for task, sizes in SAMPLE.items()
    }


def examples(built, task):
    return [e for exs, _ in built[task].values() for e in exs]


# --------------------------------------------------------------------------- an independent checker


def phrase_matcher(phrase: str):
    """A predicate over scene-object dicts for a noun phrase ("a red circle", "the animal", "red shapes",
    "clip-art objects", "food", "people", ...)."""
    words = phrase.split()
    if words[0] in ("a", "an", "the"):
        words = words[1:]
    text = " ".join(words)
    if text in ("object", "objects"):
        return lambda o: True
    if text in ("clip-art object", "clip-art objects"):
        return lambda o: o["kind"] == "clipart"
    if text in ("food", "food items"):
        return lambda o: o["kind"] == "clipart" and o["name"] == "food"
    if text == "people":
        return lambda o: o["kind"] == "clipart" and o["name"] == "person"
    color = words[0] if words[0] in COLORS else None
    rest = words[1:] if color else words
    assert len(rest) == 1, phrase
    noun = rest[0][:-1] if rest[0].endswith("s") and rest[0][:-1] in SHAPES | NOUNS | {"shape"} else rest[0]
    if noun in NOUNS:
        assert color is None, phrase
        return lambda o: o["kind"] == "clipart" and o["name"] == noun
    assert noun in SHAPES | {"shape"}, phrase
    return lambda o: (
        o["kind"] == "shape"
        and (noun == "shape" or o["name"] == noun)
        and (color is None or o["color"] == color)
    )


def count(objs, phrase) -> int:
    m = phrase_matcher(phrase)
    return sum(m(o) for o in objs)


def center(o):
    x1, y1, x2, y2 = o["box"]
    return (x1 + x2) / 2, (y1 + y2) / 2


def rel_of(a, b, rel) -> bool | None:
    """Is ``a`` ``rel`` ``b`` (centres, 16 px margin; None = too close to say)."""
    (ax, ay), (bx, by) = center(a), center(b)
    d = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[rel]
    return True if d > 16 else False if d < -16 else None


def scene_meta(ex):
    return json.loads(ex.meta["scenes"])


def the(objs, phrase):
    hits = [o for o in objs if phrase_matcher(phrase)(o)]
    assert len(hits) == 1, f"{phrase!r} is not unique"
    return hits[0]


def check_pair(text: str, left, right) -> bool:
    side = {"left": left, "right": right}
    if m := re.fullmatch(r"The (left|right) image contains (.+)\.", text):
        return count(side[m[1]], m[2]) > 0
    if m := re.fullmatch(r"Both images contain the same number of (.+)\.", text):
        return count(left, m[1]) == count(right, m[1])
    if m := re.fullmatch(r"Both images contain (.+)\.", text):
        return count(left, m[1]) > 0 and count(right, m[1]) > 0
    if m := re.fullmatch(r"Exactly one image contains (.+)\.", text):
        return (count(left, m[1]) > 0) + (count(right, m[1]) > 0) == 1
    if m := re.fullmatch(r"Neither image contains (.+)\.", text):
        return count(left, m[1]) == 0 and count(right, m[1]) == 0
    if m := re.fullmatch(
        r"There are more (.+) in the (left|right) image than in the (left|right) image\.", text
    ):
        assert m[2] != m[3]
        return count(side[m[2]], m[1]) > count(side[m[3]], m[1])
    if m := re.fullmatch(r"The (left|right) image has exactly (\w+) (.+)\.", text):
        return count(side[m[1]], m[3]) == NUMBERS[m[2]]
    raise AssertionError(f"unparsed statement {text!r}")


def check_entailment(text: str, objs) -> str:
    """Every premise has an occluder that may hide one object of any kind."""
    if m := re.fullmatch(r"There (?:is|are) at least (\w+) (.+)\.", text):
        n, c = NUMBERS[m[1]], count(objs, m[2])
        return "entailment" if c >= n else "neutral" if c + 1 == n else "contradiction"
    if m := re.fullmatch(r"There (?:is|are) at most (\w+) (.+)\.", text):
        n, c = NUMBERS[m[1]], count(objs, m[2])
        return "entailment" if c < n else "neutral" if c == n else "contradiction"
    if m := re.fullmatch(r"There are more (.+) than (.+)\.", text):
        x, y = count(objs, m[1]), count(objs, m[2])
        return "entailment" if x >= y + 2 else "neutral" if x in (y, y + 1) else "contradiction"
    raise AssertionError(f"unparsed hypothesis {text!r}")


def in_relation(objs, ref, rel, phrase):
    """The objects matching ``phrase`` (not ``ref``) that are ``rel`` ``ref``; fails on an undecided one."""
    out = []
    for o in objs:
        if o is ref or not phrase_matcher(phrase)(o):
            continue
        r = rel_of(o, ref, rel)
        assert r is not None, "question rests on an undecided relation"
        if r:
            out.append(o)
    return out


def check_qa(text: str, objs) -> str:
    if m := re.fullmatch(rf"What color is the shape {REL} the (.+)\?", text):
        (hit,) = in_relation(objs, the(objs, m[2]), REL_WORDS[m[1]], "shape")
        return hit["color"]
    if m := re.fullmatch(rf"What is the object {REL} the (.+)\?", text):
        (hit,) = in_relation(objs, the(objs, m[2]), REL_WORDS[m[1]], "object")
        return hit["name"]
    if m := re.fullmatch(r"Is there (.+) in the image\?", text):
        return "yes" if count(objs, m[1]) else "no"
    if m := re.fullmatch(rf"Is there (.+?) {REL} the (.+)\?", text):
        return "yes" if in_relation(objs, the(objs, m[3]), REL_WORDS[m[2]], m[1]) else "no"
    if m := re.fullmatch(r"How many (.+) are there\?", text):
        return str(count(objs, m[1]))
    if m := re.fullmatch(r"Are there more (.+) than (.+)\?", text):
        return "yes" if count(objs, m[1]) > count(objs, m[2]) else "no"
    raise AssertionError(f"unparsed question {text!r}")


def split_list(text: str) -> list[str]:
    head, _, last = text.rpartition(" and ")
    return [*head.split(", "), last] if head else [text]


def signature(o, colour=True, name=True):
    return (o["kind"], o["name"] if name or o["kind"] == "clipart" else None, o["color"] if colour else None)


def item_signature(item: str):
    words = item.split()
    if words[0] in ("a", "an"):
        words = words[1:]
    if words == ["food"] or (len(words) == 1 and words[0] in NOUNS):
        return ("clipart", words[0], None)
    color = words[0] if words[0] in COLORS else None
    name = words[-1] if words[-1] in SHAPES else None
    return ("shape", name, color)


# --------------------------------------------------------------------------- determinism


def rows_and_bytes(task, split, index, seed):
    exs, ims = generate(task, split, index, seed, clipart_root=ROOT)
    return [e.row() for e in exs], {n: hashlib.sha256(encode_png(im)).hexdigest() for n, im in ims.items()}


def test_same_call_twice_same_examples_and_bytes():
    needs_real_data(ROOT)
    for task, spec in SCENE_TASKS.items():
        split = spec.splits[-1]
        assert rows_and_bytes(task, split, 3, 7) == rows_and_bytes(task, split, 3, 7)
        assert rows_and_bytes(task, split, 3, 7) != rows_and_bytes(task, split, 3, 8)


def test_fresh_process_gives_the_same_bytes():
    needs_real_data(ROOT)
    # vlp_core.data's __init__ imports torch & co (seconds); the scene module needs none of it
    script = (
        "import hashlib, json, sys, types\n"
        "import vlp_core\n"
        "pkg = types.ModuleType('vlp_core.data')\n"
        "pkg.__path__ = [vlp_core.__path__[0] + '/data']\n"
        "sys.modules['vlp_core.data'] = pkg\n"
        "from vlp_core.data.scenes import generate, encode_png\n"
        "assert 'torch' not in sys.modules\n"
        "out = {}\n"
        "for task, split, i in [('scene-qa', 'test', 4), ('scene-pairs', 'train', 2)]:\n"
        "    exs, ims = generate(task, split, i, 1, clipart_root=sys.argv[1])\n"
        "    out[task] = [[e.row() for e in exs],\n"
        "                 {n: hashlib.sha256(encode_png(im)).hexdigest() for n, im in ims.items()}]\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for task, split, i in [("scene-qa", "test", 4), ("scene-pairs", "train", 2)]:
        rows, hashes = rows_and_bytes(task, split, i, 1)
        assert json.loads(json.dumps(rows)) == theirs[task][0]
        assert hashes == theirs[task][1]


def test_threads_give_the_same_examples():
    """Prefect runs shards in threads: concurrent generation shares the sprite caches."""
    from concurrent.futures import ThreadPoolExecutor

    needs_real_data(ROOT)
    keys = [(task, SCENE_TASKS[task].splits[-1], i) for task in SCENE_TASKS for i in (20, 21)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda k: rows_and_bytes(*k, 11), keys))
    assert threaded == [rows_and_bytes(*k, 11) for k in keys]


def test_slices_agree_on_their_overlap():
    needs_real_data(ROOT)
    for task in SCENE_TASKS:
        split = SCENE_TASKS[task].splits[0]
        a_ex, a_im = build_split(task, split, 0, 10, seed=3, clipart_root=ROOT)
        b_ex, b_im = build_split(task, split, 5, 15, seed=3, clipart_root=ROOT)
        per = len(a_ex) // 10  # captions: 5 examples per scene
        assert a_ex[5 * per :] == b_ex[: 5 * per]
        for name in set(a_im) & set(b_im):
            assert encode_png(a_im[name]) == encode_png(b_im[name])
        assert len(set(a_im) & set(b_im)) == len(a_im) // 2


def test_image_names_and_registry():
    defaults = {"scene-pairs", "scene-entailment", "scene-refs", "scene-qa", "scene-captions"}
    assert set(scenes.default_tasks()) == defaults
    assert set(SCENE_TASKS) == defaults | {"scene-pairs-easy"}
    shapes = {s.name: s.shape for s in SCENE_TASKS.values()}
    assert shapes == {
        "scene-pairs": "nlvr2",
        "scene-pairs-easy": "nlvr2",
        "scene-entailment": "snli-ve",
        "scene-refs": "refcoco",
        "scene-qa": "gqa",
        "scene-captions": "retrieval",
    }
    for spec in SCENE_TASKS.values():
        assert spec.splits == tuple(spec.sizes) and spec.description
    assert SCENE_TASKS["scene-refs"].splits == ("train", "val", "testA", "testB")
    with pytest.raises(ValueError):
        generate("scene-refs", "test", 0)
    with pytest.raises(KeyError):
        generate("nope", "train", 0)
    with pytest.raises(ValueError, match="level"):
        scenes.generate_pairs("train", 0, level="medium")


def test_images_referenced_exist_and_names_follow_the_scheme(built):
    for task, per_split in built.items():
        for split, (exs, ims) in per_split.items():
            for e in exs:
                assert e.task == task and e.split == split
                for name in e.images:
                    assert name in ims
                    assert re.fullmatch(rf"{task}/{split}/[0-9a-f]{{16}}(-left|-right)?\.png", name)
            assert len({e.example_id for e in exs}) == len(exs)
            for im in ims.values():
                assert im.size == (256, 256) and im.mode == "RGB"


# --------------------------------------------------------------------------- labels by construction


#: per level: the statement families, the objects a scene, whether coloured shapes and nouns are named.
PAIR_LEVELS = {
    "scene-pairs": ({"exist", "both", "exactly_one", "neither", "more", "same_count", "count"}, (2, 4), True),
    "scene-pairs-easy": ({"exist", "both", "exactly_one", "neither"}, (1, 2), False),
}


@pytest.mark.parametrize("task", sorted(PAIR_LEVELS))
def test_pairs_labels_and_balance(built, task):
    exs = examples(built, task)
    pairs = [[scene["objects"] for scene in scene_meta(e)] for e in exs]
    for e, (left, right) in zip(exs, pairs, strict=True):
        truth = check_pair(e.text, left, right)
        assert e.label == ("true" if truth else "false"), e.text
    families, (lo, hi), specific = PAIR_LEVELS[task]
    assert {e.meta["family"] for e in exs} <= families
    assert all(lo <= len(side) <= hi for sides in pairs for side in sides)
    coloured = re.compile(rf"({'|'.join(COLORS)}) ({'|'.join(SHAPES)})")
    named = [any(n in e.text for n in NOUNS | {"people"}) or bool(coloured.search(e.text)) for e in exs]
    assert any(named) if specific else not any(named)
    train = built[task]["train"][0]
    assert Counter(e.label for e in train) == {"true": 12, "false": 12}
    assert chance_level(task, train) == 0.5
    # the images are needed: most statements are true of some of the sampled pairs and false of others
    varies = [len({check_pair(e.text, lt, rt) for lt, rt in pairs}) == 2 for e in exs]
    assert sum(varies) >= 0.8 * len(exs)


def test_entailment_labels_balance_and_no_single_modality_cue(built):
    exs = examples(built, "scene-entailment")
    for e in exs:
        (scene,) = scene_meta(e)
        assert scene["occluder"] is not None  # every premise: its presence says nothing
        assert e.label == check_entailment(e.text, scene["objects"]), e.text
    train = built["scene-entailment"]["train"][0]
    assert Counter(e.label for e in train) == {"entailment": 20, "neutral": 20, "contradiction": 20}
    # a hypothesis is not its label: premises of 1-4 objects give every one of them all three labels
    pool = [{"kind": "shape", "name": n, "color": c} for n in SHAPES for c in COLORS]
    pool += [{"kind": "clipart", "name": n, "color": None} for n in NOUNS]
    by_family: dict[str, set] = {}
    for e in exs:
        # one object of each sort the hypothesis tells apart (same labels at every count)
        sorts = {tuple(check_entailment(e.text, [o] * k) for k in range(1, 5)): o for o in pool}
        reps = list(sorts.values())
        labels = {
            check_entailment(e.text, [a] * i + [b] * j)
            for a in reps for b in reps for i in range(5) for j in range(5 - i) if i + j
        }  # fmt: skip
        assert labels == set(ENTAILMENT_LABELS), (e.text, labels)
        by_family.setdefault(e.meta["family"], set()).add(e.label)
    assert set(by_family) == {"at_least", "at_most", "more"}
    assert all(len(v) == 3 for v in by_family.values()), by_family


def test_refs_expressions_identify_exactly_the_target(built):
    for split, (exs, _) in built["scene-refs"].items():
        for e in exs:
            (scene,) = scene_meta(e)
            objs = scene["objects"]
            assert 3 <= len(objs) <= 4
            assert e.boxes == tuple(tuple(float(v) for v in o["box"]) for o in objs)
            assert re.fullmatch(r"the [a-z -]+", e.text) and not any(w in e.text for w in REL_WORDS)
            hits = [i for i, o in enumerate(objs) if phrase_matcher(e.text)(o)]
            assert hits == [e.target], (e.text, objs)
            kind = objs[e.target]["kind"]
            if split == "testA":
                assert kind == "shape"
            if split == "testB":
                assert kind == "clipart"
    exs = examples(built, "scene-refs")
    # distractors share an attribute with shape targets often: the expression is more than the kind
    shape_targets = [e for e in exs if e.meta["target_kind"] == "shape"]
    assert sum(e.meta["expression"] != "shape" for e in shape_targets) >= len(shape_targets) // 3
    assert chance_level("scene-refs", exs) == pytest.approx(sum(1 / len(e.boxes) for e in exs) / len(exs))


def test_qa_answers_and_yes_no_balance(built):
    exs = examples(built, "scene-qa")
    for e in exs:
        (scene,) = scene_meta(e)
        assert e.label == check_qa(e.text, scene["objects"]), e.text
        assert len(e.label.split()) == 1
    train = built["scene-qa"]["train"][0]
    types = Counter(e.meta["qtype"] for e in train)
    assert types == dict(query_color=4, query_name=4, count=4, verify_rel=8, verify_exist=8, compare=8)
    for qtype in ("verify_rel", "verify_exist", "compare"):
        assert Counter(e.label for e in train if e.meta["qtype"] == qtype) == {"yes": 4, "no": 4}


def test_captions_describe_their_scene(built):
    for split, (exs, ims) in built["scene-captions"].items():
        assert len(exs) == 5 * SAMPLE["scene-captions"][split]
        groups = Counter(e.group for e in exs)
        assert set(groups.values()) == {5} and set(groups) == set(ims)
        for e in exs:
            (scene,) = scene_meta(e)
            objs = scene["objects"]
            style, text = e.meta["style"], e.text
            assert e.images == (e.group,)
            if style == "list":
                assert sorted(map(item_signature, split_list(text))) == sorted(map(signature, objs))
            elif style == "names":
                items = split_list(text.removeprefix("an image with "))
                want = sorted(signature(o, colour=False) for o in objs)
                assert sorted(item_signature(i) for i in items) == want
            elif style == "colors":
                items = split_list(text.removeprefix("a scene showing "))
                want = sorted(signature(o, name=False) for o in objs)
                assert sorted(item_signature(i) for i in items) == want
            elif style == "left_to_right":
                m = re.fullmatch(r"(\w+) objects?, from left to right: (.+)", text)
                assert NUMBERS[m[1]] == len(objs)
                ltr = sorted(objs, key=center)
                assert [item_signature(i) for i in split_list(m[2])] == [signature(o) for o in ltr]
            else:
                m = re.fullmatch(rf"a picture of (.+?) ({REL[1:-1]}|next to) (.+)", text)
                assert m, text
                a = [o for o in objs if signature(o) == item_signature(m[1])]
                b = [o for o in objs if signature(o) == item_signature(m[3])]
                if m[2] != "next to":
                    assert any(rel_of(x, y, REL_WORDS[m[2]]) for x in a for y in b if x is not y)
        assert chance_level("scene-captions", exs) == 1 / SAMPLE["scene-captions"][split]


# --------------------------------------------------------------------------- scenes and sprites


def test_boxes_inside_the_canvas_and_apart(built):
    n = 0
    for task in built:
        for e in examples(built, task):
            for scene in scene_meta(e):
                w, h = scene["size"]
                boxes = [o["box"] for o in scene["objects"]] + (
                    [scene["occluder"]] if scene["occluder"] else []
                )
                for x1, y1, x2, y2 in boxes:
                    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
                for i, a in enumerate(boxes):
                    for b in boxes[i + 1 :]:
                        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
                for o in scene["objects"]:
                    x1, y1, x2, y2 = o["box"]
                    assert 24 <= max(x2 - x1, y2 - y1) <= 96
                n += 1
    assert n > 100


def test_objects_are_drawn_where_their_boxes_are(built):
    """The pixels inside a box differ from the background; the pixels outside every box and the occluder
    are the background."""
    import numpy as np

    exs, ims = built["scene-entailment"]["train"]
    for e in exs[:12]:
        (scene,) = scene_meta(e)
        arr = np.asarray(ims[e.images[0]]).astype(int)
        bg = np.array(scene["background"])
        covered = np.zeros(arr.shape[:2], bool)
        for o in scene["objects"]:
            x1, y1, x2, y2 = o["box"]
            assert (np.abs(arr[y1:y2, x1:x2] - bg).max(axis=-1) > 0).mean() > 0.1  # line art: ~20 %
            covered[y1:y2, x1:x2] = True
        x1, y1, x2, y2 = scene["occluder"]
        assert (arr[y1:y2, x1:x2] == scenes.OCCLUDER_GREY).all()
        covered[y1:y2, x1:x2] = True
        assert (arr[~covered] == bg).all()


def test_train_and_test_scenes_use_disjoint_sprites(built):
    train, test = scenes.sprite_banks("train", ROOT), scenes.sprite_banks("test", ROOT)
    train_files = {r for rels in train.clipart.by_noun.values() for r in rels}
    test_files = {r for rels in test.clipart.by_noun.values() for r in rels}
    assert train_files and test_files and not train_files & test_files
    for per_split in built.values():
        for split, (exs, _) in per_split.items():
            part = "test" if split in scenes.TEST_SPLITS else "train"
            for e in exs:
                for scene in scene_meta(e):
                    for o in scene["objects"]:
                        src = o["source"]
                        if src.startswith("easy-vqa:"):
                            assert src.startswith(f"easy-vqa:{part}/")
                        else:
                            assert src.removeprefix("openclipart:") in (
                                test_files if part == "test" else train_files
                            )


def test_easy_vqa_parsing():
    texts = [
        "what is the red shape?",
        "is there a circle?",
        "what shape is present?",
        "is there a blue shape?",
        "is no red shape present?",
        "does the image not contain a circle?",
        "is there a triangle?",
        "is there a rectangle?",
    ]
    answers = ["circle", "yes", "triangle", "no", "no", "no", "no", "no"]
    got = scenes._parse_easy_vqa(texts, answers, [0, 0, 1, 1, 2, 2, 3, 3])
    assert got[0] == ("circle", "red")
    assert got[1] == "undetermined"  # a triangle, not blue: colour unknown
    assert got[2] == ("circle", "red")  # negated questions answered "no"
    assert got[3] == "undetermined"  # the circle by elimination, colour unknown
    texts = ["what color is the shape?", "is there a triangle?", "is there a rectangle?"]
    got = scenes._parse_easy_vqa(texts, ["blue", "no", "no"], [5, 5, 5])
    assert got[5] == ("circle", "blue")  # the shape left when the others are absent
    got = scenes._parse_easy_vqa(
        ["what is the red shape?", "what color is the circle?"], ["circle", "blue"], [6, 6]
    )
    assert got[6] == "conflicting"
